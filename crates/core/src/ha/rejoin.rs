//! Following a leader, and rejoining it: timeline divergence, rewind, re-clone, upstream choice.

use crate::cluster::Lsn;

use super::action::{Action, MemberState, StartRole, StopMode};
use super::decide::{Ctx, Plan};
use super::reason::Reason;
use super::slots;
use super::types::PgProcess;

/// Whether this node's WAL can continue on the leader's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// Our WAL is a prefix of the leader's history.
    No,
    /// Our WAL passed the switch point (or our timeline is not in the leader's history).
    Yes {
        /// Where our timeline ended in the leader's history.
        switch_point: Option<Lsn>,
    },
    /// The leader's history is not published far enough to tell.
    Unknown,
}

/// Rule "rejoin": compares our timeline and WAL end with the leader's timeline history.
///
/// Equal timelines: no divergence. Ours higher than the leader's: diverged (we were promoted on
/// a timeline the leader never saw). Ours lower: find where our timeline ended in the history;
/// WAL beyond that switch point diverged. When the history is `authoritative` (the leader
/// confirmed it is the history of its current timeline) a timeline missing from it is a fork
/// (diverged) and a position at or before the switch point is safe; otherwise only "diverged" can
/// be concluded and everything else is unknown.
pub fn divergence(
    our_timeline: Option<u32>,
    our_position: Lsn,
    leader_timeline: Option<u32>,
    history: Option<&[crate::cluster::HistoryEntry]>,
    authoritative: bool,
) -> Divergence {
    let history_tl = history.map(|h| h.last().map_or(1, |e| e.parent_timeline + 1));
    let Some(ours) = our_timeline else {
        return Divergence::No;
    };
    let Some(leader) = leader_timeline.max(history_tl) else {
        return Divergence::No;
    };
    if ours == leader {
        return Divergence::No;
    }
    if ours > leader {
        return Divergence::Yes { switch_point: None };
    }
    let entry = history.and_then(|h| h.iter().find(|e| e.parent_timeline == ours));
    match entry {
        Some(e) if our_position > e.switch_lsn => Divergence::Yes {
            switch_point: Some(e.switch_lsn),
        },
        Some(_) if authoritative => Divergence::No,
        None if authoritative => Divergence::Yes { switch_point: None },
        _ => Divergence::Unknown,
    }
}

/// Whether a backup that ended at `stop` on `timeline` can become a replica of the cluster
/// `view` describes: its WAL must be a prefix of the cluster's current timeline. The current
/// timeline is the highest one a member publishes or the `history` key implies; a backup on an
/// older timeline fits when it stopped at or before that timeline's switch point in `history`
/// (after a point-in-time restore the newest backups lie past the fork and do not). With no
/// timeline known at all, none fits. `Err` says why the backup does not fit.
pub fn backup_fits_cluster(
    view: &crate::cluster::ClusterView,
    timeline: u32,
    stop: Lsn,
) -> Result<(), String> {
    let history = view.history.as_deref();
    let history_tl = history.map(|h| h.last().map_or(1, |e| e.parent_timeline + 1));
    let member_tl = view.members.values().filter_map(|m| m.data.timeline).max();
    let Some(current) = member_tl.max(history_tl) else {
        return Err("the cluster's timeline is not known".into());
    };
    // The history key describes the current timeline only when it reaches it.
    let authoritative = history_tl == Some(current);
    match divergence(Some(timeline), stop, Some(current), history, authoritative) {
        Divergence::No => Ok(()),
        Divergence::Yes {
            switch_point: Some(at),
        } => Err(format!(
            "it stopped at {stop} on timeline {timeline}, past that timeline's end at {at} in the cluster's history (now on timeline {current})"
        )),
        Divergence::Yes { switch_point: None } => Err(format!(
            "timeline {timeline} is not in the history of the cluster's timeline {current}"
        )),
        Divergence::Unknown => Err(format!(
            "the cluster is on timeline {current} but its history in the DCS does not reach it yet"
        )),
    }
}

/// Whether a backup that ended at `stop` on `timeline` leads to `newest`, the timeline a
/// standby restored from the archive follows, whose history file holds `history`: the same
/// check PostgreSQL makes before it replays onto `newest`.
pub fn backup_fits_timeline(
    timeline: u32,
    stop: Lsn,
    newest: u32,
    history: &[crate::cluster::HistoryEntry],
) -> Result<(), String> {
    match divergence(Some(timeline), stop, Some(newest), Some(history), true) {
        Divergence::No => Ok(()),
        Divergence::Yes {
            switch_point: Some(at),
        } => Err(format!(
            "it stopped at {stop} on timeline {timeline}, past that timeline's end at {at} in the history of timeline {newest}"
        )),
        _ => Err(format!(
            "timeline {timeline} is not in the history of timeline {newest}, the newest in the archive"
        )),
    }
}

/// The member to stream from: the `replicatefrom` member when it is running, none for
/// `nostream`, otherwise the leader.
pub(crate) fn desired_upstream(cx: &Ctx<'_>, leader: &str) -> Option<String> {
    let tags = &cx.obs.tags;
    if tags.nostream {
        return None;
    }
    if let Some(rf) = tags.replicatefrom.as_deref()
        && rf != cx.me()
        && cx.member(rf).is_some_and(|m| m.state == "running")
    {
        return Some(rf.to_owned());
    }
    Some(leader.to_owned())
}

/// The member to clone from: a running `clonefrom` member (by name order), else the leader when
/// it runs.
pub(crate) fn clone_source(cx: &Ctx<'_>) -> Option<String> {
    let me = cx.me();
    let running = |n: &str| cx.member(n).is_some_and(|m| m.state == "running");
    if let Some((n, _)) = cx
        .view
        .members
        .iter()
        .find(|(n, m)| n.as_str() != me && m.data.tags.clonefrom && running(n))
    {
        return Some(n.clone());
    }
    let leader = cx.view.leader.as_ref()?.name.as_str();
    (leader != me && running(leader)).then(|| leader.to_owned())
}

/// Rule family "follow the leader" (another member holds the key).
pub(crate) fn follow(cx: &mut Ctx<'_>, leader: &str) -> Plan {
    let pg = &cx.obs.pg;
    if cx.obs.requests.reinitialize {
        return reinitialize(cx, leader);
    }
    let paused = cx.cfg.pause;
    let leader_member = cx.member(leader);
    let div = divergence(
        pg.timeline,
        pg.wal_position,
        leader_member.and_then(|m| m.timeline),
        cx.view.history.as_deref(),
        leader_member.is_some_and(super::member::leader_history_authoritative),
    );
    let upstream = desired_upstream(cx, leader);
    let leader_tl = leader_member.and_then(|m| m.timeline);
    // A replica streaming from the leader on (at least) the leader's published timeline is on
    // the leader's history (PostgreSQL would refuse to stream otherwise), whatever a stale view
    // says. Not on an older timeline: a replica that followed the new leader before it promoted
    // can be past the new timeline's switch point while its receiver still says "streaming".
    let div = if pg.is_running_replica()
        && pg.streaming
        && pg.upstream.as_deref() == Some(leader)
        && leader_tl.is_none_or(|t| pg.timeline.is_some_and(|ours| ours >= t))
    {
        Divergence::No
    } else {
        div
    };
    // A stopped former primary on the leader's timeline with WAL past what the leader has
    // published, while the leader has not promoted yet: once it does, that WAL is past the
    // switch point. Starting now would serve those commits (lost to the cluster) to readers
    // until the rewind; wait for the new timeline instead.
    let div = match (div, leader_member) {
        (Divergence::No, Some(l))
            if pg.process == PgProcess::Stopped
                && !pg.in_recovery
                && l.role != "primary"
                && leader_tl.is_some()
                && pg.timeline == leader_tl
                && l.xlog_location.is_some_and(|x| pg.wal_position > x) =>
        {
            Divergence::Unknown
        }
        (d, _) => d,
    };
    match pg.process {
        PgProcess::Starting | PgProcess::Stopping | PgProcess::Promoting => {
            Plan::new(MemberState::Starting, Reason::WaitingForPostgres)
        }
        PgProcess::Running => {
            if let Divergence::Yes { switch_point } = div
                && !paused
            {
                return Plan::new(MemberState::Rewinding, diverged_reason(cx, switch_point)).with(
                    Action::Stop {
                        mode: StopMode::Fast,
                    },
                );
            }
            if cx.obs.requests.restart {
                return Plan::new(MemberState::Replica, Reason::RestartRequested)
                    .with(Action::Restart);
            }
            let reason = if div == Divergence::Unknown {
                Reason::WaitingForHistory
            } else {
                Reason::FollowingLeader {
                    upstream: upstream.clone(),
                }
            };
            let mut p = Plan::new(MemberState::Replica, reason);
            if pg.upstream != upstream && !paused {
                p = p.with(Action::Follow { upstream });
            }
            for a in slots::on_replica(cx) {
                p = p.with(a);
            }
            if div == Divergence::No {
                for a in slots::logical_on_replica(cx, leader) {
                    p = p.with(a);
                }
            }
            p
        }
        PgProcess::Stopped if paused => Plan::new(MemberState::Stopped, Reason::Paused),
        PgProcess::Stopped => match div {
            Divergence::Unknown => Plan::new(MemberState::Stopped, Reason::WaitingForHistory),
            Divergence::Yes { switch_point } => rewind_or_reclone(cx, leader, switch_point),
            Divergence::No => {
                Plan::new(MemberState::Starting, Reason::StartingReplica).with(Action::Start {
                    role: StartRole::Replica { upstream },
                })
            }
        },
    }
}

fn diverged_reason(cx: &Ctx<'_>, switch_point: Option<Lsn>) -> Reason {
    Reason::Diverged {
        timeline: cx.obs.pg.timeline.unwrap_or(0),
        position: cx.obs.pg.wal_position,
        switch_point,
    }
}

/// Rewind from the leader when `use_pg_rewind` is on and no rewind failed; re-clone otherwise.
/// Both need the leader to run as primary.
fn rewind_or_reclone(cx: &Ctx<'_>, leader: &str, switch_point: Option<Lsn>) -> Plan {
    // A leader that just promoted must first checkpoint: pg_rewind takes the source's timeline
    // from its control file and would otherwise find "nothing to rewind".
    let leader_ready = cx.member(leader).is_some_and(|m| {
        m.state == "running" && m.role == "primary" && m.checkpoint_after_promote != Some(false)
    });
    if !leader_ready {
        return Plan::new(MemberState::Rewinding, diverged_reason(cx, switch_point));
    }
    if cx.cfg.use_pg_rewind && !cx.obs.rewind_failed {
        Plan::new(MemberState::Rewinding, diverged_reason(cx, switch_point)).with(Action::Rewind {
            source: leader.to_owned(),
        })
    } else {
        Plan::new(MemberState::Cloning, Reason::RecloneAfterDivergence).with(Action::Clone {
            source: leader.to_owned(),
            wipe: true,
        })
    }
}

fn reinitialize(cx: &Ctx<'_>, leader: &str) -> Plan {
    if !matches!(cx.obs.pg.process, PgProcess::Stopped) {
        return Plan::new(MemberState::Cloning, Reason::Reinitialize).with(Action::Stop {
            mode: StopMode::Fast,
        });
    }
    let source = if cx.obs.requests.reinitialize_from_leader {
        leader.to_owned()
    } else {
        clone_source(cx).unwrap_or_else(|| leader.to_owned())
    };
    Plan::new(MemberState::Cloning, Reason::Reinitialize).with(Action::Clone { source, wipe: true })
}
