//! The leader race: who may take the leader key when nobody holds it, and the takeover guard.

use crate::cluster::{Initialize, Tags};

use super::action::{Action, MemberState, StartRole};
use super::decide::{Ctx, Plan};
use super::member;
use super::reason::{RaceLoss, Reason};
use super::types::{DataDir, Millis, PgProcess};

/// The effective failover priority: `nofailover` wins over a priority; unset means 1.
pub fn failover_priority(tags: &Tags) -> i64 {
    if tags.nofailover {
        0
    } else {
        tags.failover_priority.unwrap_or(1)
    }
}

/// The takeover guard when it can be proven shorter than `ttl` from now; called once this
/// node's view shows its own leader key, so `deleted_leader` is the deletion that preceded our
/// create.
///
/// A holder's deadline is at most `ttl` after the send time of its last renewal, and every
/// renewal puts the key. When the watch delivered that last put, the guard ends `ttl` after it
/// arrived (normally about when the key expired: no extra wait). When the old holder published
/// the release marker for exactly that revision, its PostgreSQL is stopped: no wait. (When we
/// were the holder ourselves, the promotion rule carries our previous guard over.) Otherwise
/// (`None`) the caller waits `ttl` from now: the last renewal happened before the key was
/// deleted, which happened before our create. This makes an early lease revocation
/// (etcd#15247), an etcd clock running fast, or a view that missed a whole leadership harmless.
pub(crate) fn takeover_not_before(cx: &Ctx<'_>) -> Option<Millis> {
    let del = cx.obs.dcs.deleted_leader.as_ref()?;
    if cx
        .member(&del.name)
        .is_some_and(|m| member::released_at(m, del.mod_revision))
    {
        return Some(cx.now);
    }
    del.put_seen_at.map(|t| t + cx.cfg.ttl)
}

/// The previous leader's name, if known.
fn former_leader<'a>(cx: &'a Ctx<'_>) -> Option<&'a str> {
    cx.obs
        .dcs
        .deleted_leader
        .as_ref()
        .map(|l| l.name.as_str())
        .or_else(|| cx.mem.last_leader.as_ref().map(|l| l.name.as_str()))
}

/// Rule family "leader race" (no leader key).
pub(crate) fn plan(cx: &mut Ctx<'_>) -> Plan {
    let pg = &cx.obs.pg;
    let me = cx.me();
    let paused = cx.cfg.pause;
    let request = cx.view.pending_failover();
    let candidate = request.and_then(|r| r.member.as_deref());
    let i_am_candidate = candidate == Some(me);
    let mut pre = Vec::new();
    if cx.view.initialize.is_none()
        && let DataDir::Initialised { system_id } = &pg.data_dir
    {
        // Patroni: a node with data publishes its system id when `initialize` is missing.
        pre.push(Action::WriteInitialize {
            system_id: system_id.clone(),
            create_only: true,
        });
    }
    let lose = |why: RaceLoss| Plan::new(MemberState::Candidate, Reason::NotHealthiest(why));

    if paused {
        if pg.is_running_primary() {
            // Pause: a running primary without a key takes it.
            return with_pre(
                pre,
                Plan::new(MemberState::Candidate, Reason::Paused).with(Action::AcquireLeaderKey),
            );
        }
        if !i_am_candidate {
            return with_pre(pre, lose(RaceLoss::Paused));
        }
    }
    if failover_priority(&cx.obs.tags) <= 0 {
        let mut p = Plan::new(MemberState::Stopped, Reason::NoLeaderNotEligible);
        if pg.process == PgProcess::Stopped && !paused {
            p = p.with(Action::Start {
                role: StartRole::Replica { upstream: None },
            });
        }
        return with_pre(pre, p);
    }
    match pg.process {
        PgProcess::Running if pg.in_recovery => {}
        PgProcess::Stopped if !paused => {
            return with_pre(
                pre,
                Plan::new(MemberState::Starting, Reason::StartingToRace).with(Action::Start {
                    role: StartRole::Replica { upstream: None },
                }),
            );
        }
        _ => return with_pre(pre, lose(RaceLoss::NotRunning)),
    }
    if cx.obs.watchdog_failed {
        return with_pre(pre, lose(RaceLoss::WatchdogFailed));
    }
    // A named candidate other than us: defer while it looks able to take over.
    if let Some(c) = candidate
        && !i_am_candidate
    {
        let absent_for = cx.now - cx.mem.leader_absent_since.unwrap_or(cx.now);
        let alive = cx
            .member(c)
            .is_some_and(|m| m.state == "running" && failover_priority(&m.tags) > 0);
        if alive && absent_for < cx.cfg.switchover_timeout {
            return with_pre(
                pre,
                Plan::new(
                    MemberState::Candidate,
                    Reason::DeferringToCandidate {
                        candidate: c.to_owned(),
                    },
                )
                .wake(cx.now + cx.cfg.loop_wait),
            );
        }
    }
    let sync = cx
        .sync_active()
        .then(|| &cx.view.sync.as_ref().expect("sync_active").value);
    if let Some(s) = sync
        && !s.contains(me)
    {
        return with_pre(pre, lose(RaceLoss::NotSynchronous));
    }
    let own = pg.wal_position;
    if !i_am_candidate && let Some(optime) = cx.view.status.optime {
        let lag = optime.0.saturating_sub(own.0);
        if lag > cx.cfg.maximum_lag_on_failover {
            return with_pre(pre, lose(RaceLoss::LagTooHigh { lag }));
        }
    }
    if cx.cfg.check_timeline
        && let Some(cluster) = cx.view.history_timeline()
        && pg.timeline.is_none_or(|t| t < cluster)
    {
        return with_pre(
            pre,
            lose(RaceLoss::TimelineBehind {
                ours: pg.timeline,
                cluster,
            }),
        );
    }
    // A switchover to this node: the old leader stopped PostgreSQL and released the key only
    // after this node confirmed its shutdown checkpoint, so no peer can be ahead or still
    // primary. Asking them would only lengthen the write outage (Patroni: the candidate is the
    // healthiest node at once).
    if i_am_candidate && request.is_some_and(|r| r.leader.is_some()) {
        return with_pre(
            pre,
            Plan::new(MemberState::Candidate, Reason::AcquiringLeaderKey)
                .with(Action::AcquireLeaderKey),
        );
    }
    let Some(report) = &cx.obs.peers else {
        let mut members: Vec<String> = cx
            .view
            .members
            .keys()
            .filter(|n| n.as_str() != me)
            .cloned()
            .collect();
        if let Some(f) = former_leader(cx)
            && f != me
            && !members.iter().any(|m| m == f)
        {
            members.push(f.to_owned());
        }
        return with_pre(
            pre,
            Plan::new(MemberState::Candidate, Reason::NeedPeerStatus)
                .with(Action::FetchPeerStatus { members }),
        );
    };
    let former = former_leader(cx);
    let cluster_tl = cx.view.history_timeline();
    let my_prio = failover_priority(&cx.obs.tags);
    for (name, st) in &report.answers {
        if name == me {
            continue;
        }
        if st.running && st.primary {
            return with_pre(
                pre,
                lose(RaceLoss::PrimaryStillAlive { peer: name.clone() }),
            );
        }
        // Peers that cannot win are no competition: no failover, broken watchdog, outside
        // `/sync`, or (check_timeline) on a timeline behind the cluster's.
        let behind =
            cx.cfg.check_timeline && cluster_tl.is_some_and(|c| st.timeline.is_none_or(|t| t < c));
        if i_am_candidate
            || failover_priority(&st.tags) <= 0
            || st.watchdog_failed
            || behind
            || sync.is_some_and(|s| !s.contains(name))
        {
            continue;
        }
        if st.wal_position > own {
            let former_sync_leader = sync.is_some_and(|s| {
                s.leader
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(name))
            });
            if !former_sync_leader {
                return with_pre(pre, lose(RaceLoss::PeerAhead { peer: name.clone() }));
            }
        } else if st.wal_position == own
            && Some(name.as_str()) != former
            && failover_priority(&st.tags) > my_prio
        {
            return with_pre(
                pre,
                lose(RaceLoss::PeerHigherPriority { peer: name.clone() }),
            );
        }
    }
    with_pre(
        pre,
        Plan::new(MemberState::Candidate, Reason::AcquiringLeaderKey)
            .with(Action::AcquireLeaderKey),
    )
}

fn with_pre(pre: Vec<Action>, mut p: Plan) -> Plan {
    if !pre.is_empty() {
        let mut actions = pre;
        actions.append(&mut p.actions);
        p.actions = actions;
    }
    p
}

/// True when the cluster was bootstrapped (has an `initialize` system id or a leader).
pub(crate) fn cluster_initialised(cx: &Ctx<'_>) -> bool {
    matches!(cx.view.initialize, Some(Initialize::SystemId(_))) || cx.view.leader.is_some()
}
