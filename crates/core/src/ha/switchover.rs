//! Planned switchover, manual failover, scheduled switchover, and every deliberate hand-over of
//! the leader key (start timeout, shutdown, pause).

use crate::cluster::FailoverRequest;

use super::action::{Action, MemberState, StartRole, StopMode};
use super::decide::{Ctx, Plan};
use super::member;
use super::reason::{RaceLoss, Reason, RejectedFailover};
use super::types::{Handover, HandoverKind, Millis, PgProcess};

/// How fit a member is to take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fitness {
    Fit,
    /// Fit but for its lag behind this primary.
    Lagging,
    Unfit,
}

/// `name`'s fitness from its member data: running replica, failover allowed, on our timeline
/// when `check_timeline`, in synchronous mode listed in `/sync`, and within
/// `maximum_lag_on_failover`. When the shell fetched its status this cycle, its own answer's
/// position and timeline replace its member key's (a key can be a loop old).
fn fitness(cx: &Ctx<'_>, name: &str) -> Fitness {
    let Some(m) = cx.member(name) else {
        return Fitness::Unfit;
    };
    if name == cx.me()
        || m.tags.nofailover
        || m.tags.failover_priority.is_some_and(|p| p <= 0)
        || m.state != "running"
        || m.role != "replica"
    {
        return Fitness::Unfit;
    }
    let fresh = cx
        .obs
        .peers
        .as_ref()
        .and_then(|r| r.answers.get(name))
        .filter(|s| s.running && !s.primary);
    let timeline = fresh.map_or(m.timeline, |s| s.timeline);
    if cx.cfg.check_timeline && timeline.is_some() && timeline != cx.obs.pg.timeline {
        return Fitness::Unfit;
    }
    if cx.sync_active() {
        let sync = &cx.view.sync.as_ref().expect("sync_active").value;
        if !sync.standbys().iter().any(|s| s.eq_ignore_ascii_case(name)) {
            return Fitness::Unfit;
        }
    }
    let pos = fresh.map_or(m.xlog_location.unwrap_or_default(), |s| s.wal_position);
    let optime = cx.obs.pg.wal_position;
    if optime.0.saturating_sub(pos.0) > cx.cfg.maximum_lag_on_failover {
        return Fitness::Lagging;
    }
    Fitness::Fit
}

/// True when `name` is a replica fit to take over (see [`fitness`]).
pub(crate) fn fit_replica(cx: &Ctx<'_>, name: &str) -> bool {
    fitness(cx, name) == Fitness::Fit
}

/// `is_failover_possible`: some other member (the candidate, if named) is fit to take over.
pub(crate) fn failover_possible(cx: &Ctx<'_>, candidate: Option<&str>) -> bool {
    match candidate {
        Some(c) => fit_replica(cx, c),
        None => cx.view.members.keys().any(|n| fit_replica(cx, n)),
    }
}

/// What the leader does about `/failover` this cycle.
pub(crate) enum LeaderRequest {
    /// Start the hand-over: this plan replaces the normal cycle.
    Act(Plan),
    /// Keep leading; add these actions, this reason and wake-up to the normal cycle.
    Note {
        reason: Reason,
        actions: Vec<Action>,
        wake: Option<Millis>,
    },
}

/// Leader rule "switchover": act on `/failover` while running as primary. Returns `None` when
/// nothing is requested.
pub(crate) fn on_leader(cx: &mut Ctx<'_>) -> Option<LeaderRequest> {
    let fo = cx.view.failover.as_ref()?;
    let req: &FailoverRequest = &fo.value;
    if req.is_empty() {
        return None;
    }
    let revision = fo.mod_revision;
    let me = cx.me();
    let reject = |why: RejectedFailover| {
        Some(LeaderRequest::Note {
            reason: Reason::FailoverRequestRejected(why),
            actions: vec![Action::ClearFailover {
                expected_revision: revision,
            }],
            wake: None,
        })
    };
    let pending = |at_ms: i64, wait: u64| {
        Some(LeaderRequest::Note {
            reason: Reason::ScheduledSwitchoverPending { at_unix_ms: at_ms },
            actions: Vec::new(),
            wake: Some(cx.now + Millis(wait)),
        })
    };
    let to_me = req.member.as_deref() == Some(me);
    match req.leader.as_deref() {
        // A switchover away from another leader that ended with us leading: done.
        Some(l) if l != me && (to_me || req.member.is_none()) => {
            return reject(RejectedFailover::Completed);
        }
        Some(l) if l != me => return reject(RejectedFailover::LeaderMismatch),
        Some(_) if to_me => return reject(RejectedFailover::CandidateIsLeader),
        None if to_me => return reject(RejectedFailover::Completed),
        _ => {}
    }
    if let Some(at) = &req.scheduled_at {
        if cx.cfg.pause {
            return reject(RejectedFailover::ScheduledInPause);
        }
        let Some(at_ms) = parse_rfc3339(at) else {
            return reject(RejectedFailover::BadSchedule);
        };
        let wall = cx.obs.wall_clock_ms;
        let loop_wait = i64::try_from(cx.cfg.loop_wait.0).unwrap_or(i64::MAX);
        if at_ms - wall > loop_wait {
            return pending(at_ms, u64::try_from(at_ms - wall).unwrap_or(0));
        }
        if wall - at_ms > loop_wait + loop_wait / 2 {
            return reject(RejectedFailover::Stale);
        }
        if at_ms > wall {
            // Due within this cycle: come back at the exact time.
            return pending(at_ms, u64::try_from(at_ms - wall).unwrap_or(0));
        }
    }
    if cx.cfg.pause && req.member.is_none() {
        return reject(RejectedFailover::NoHealthyCandidate);
    }
    if !failover_possible(cx, req.member.as_deref()) {
        // Candidates fit but for a lag their member keys show: a key is up to a loop old, and a
        // burst of WAL (or a WAL switch) moves the primary megabytes ahead at once. Ask them
        // once for their current position before rejecting (Patroni asks them too).
        let lagging: Vec<String> = cx
            .view
            .members
            .keys()
            .filter(|n| req.member.as_ref().is_none_or(|c| c == *n))
            .filter(|n| fitness(cx, n) == Fitness::Lagging)
            .cloned()
            .collect();
        if !lagging.is_empty() && cx.obs.peers.is_none() {
            return Some(LeaderRequest::Note {
                reason: Reason::SwitchoverCheckingCandidates,
                actions: vec![Action::FetchPeerStatus { members: lagging }],
                wake: None,
            });
        }
        return reject(RejectedFailover::NoHealthyCandidate);
    }
    cx.mem.handover = Some(Handover {
        kind: HandoverKind::Switchover,
        candidate: req.member.clone(),
        started_at: cx.now,
        confirmed: false,
    });
    Some(LeaderRequest::Act(continue_handover(cx)))
}

/// Drives a hand-over in progress: stop PostgreSQL (fast for a switchover or shutdown, immediate
/// otherwise), for a switchover wait until a candidate confirms it received the shutdown
/// checkpoint, then publish the release marker and delete the leader key.
pub(crate) fn continue_handover(cx: &mut Ctx<'_>) -> Plan {
    let h = cx.mem.handover.clone().expect("handover in progress");
    let pg = &cx.obs.pg;
    let graceful = matches!(h.kind, HandoverKind::Switchover | HandoverKind::Shutdown);
    let stopping_reason = match h.kind {
        HandoverKind::Switchover => Reason::SwitchoverStopping {
            candidate: h.candidate.clone(),
        },
        HandoverKind::Shutdown => Reason::ShuttingDown,
        HandoverKind::StartTimeout => Reason::PrimaryStartTimeout,
        HandoverKind::PausedNotPrimary => Reason::Paused,
        HandoverKind::NotSynchronous => Reason::NotHealthiest(RaceLoss::NotSynchronous),
    };
    match pg.process {
        PgProcess::Running | PgProcess::Starting | PgProcess::Promoting => {
            let mode = if graceful {
                StopMode::Fast
            } else {
                StopMode::Immediate
            };
            // A holder whose PostgreSQL cannot commit just lets go of the key, unless the agent
            // shuts down.
            if pg.may_commit() || h.kind == HandoverKind::Shutdown {
                let mut p =
                    Plan::new(MemberState::Demoting, stopping_reason).with(Action::RenewLeaderKey);
                if h.kind == HandoverKind::Switchover && pg.may_commit() {
                    p = p.with(Action::Checkpoint);
                }
                return p.with(Action::Stop { mode });
            }
        }
        PgProcess::Stopping => {
            return Plan::new(MemberState::Demoting, stopping_reason).with(Action::RenewLeaderKey);
        }
        PgProcess::Stopped => {}
    }
    if h.kind == HandoverKind::Switchover {
        let candidates: Vec<String> = match &h.candidate {
            Some(c) => vec![c.clone()],
            None => cx
                .view
                .members
                .keys()
                .filter(|n| n.as_str() != cx.me())
                .cloned()
                .collect(),
        };
        // The stopped primary's position lies inside its shutdown checkpoint record (the shell
        // reports the record's start + 1); a candidate that has the record is past it. A stop that was not clean has no such
        // record to wait for: no confirmation, the hand-over times out and the leader stays.
        let confirmed = h.confirmed
            || (!pg.crashed
                && cx.obs.peers.as_ref().is_some_and(|r| {
                    r.answers.iter().any(|(n, st)| {
                        candidates.contains(n)
                            && st.running
                            && !st.primary
                            && st.wal_position > pg.wal_position
                            && !st.tags.nofailover
                    })
                }));
        if confirmed && let Some(h) = cx.mem.handover.as_mut() {
            // Remember it: the decision that releases may be dropped by a busy shell.
            h.confirmed = true;
        }
        if !confirmed {
            if cx.now >= h.started_at + cx.cfg.switchover_timeout {
                cx.mem.handover = None;
                let mut p = Plan::new(MemberState::Recovering, Reason::SwitchoverTimedOut)
                    .with(Action::RenewLeaderKey);
                if let Some(fo) = &cx.view.failover {
                    p = p.with(Action::ClearFailover {
                        expected_revision: fo.mod_revision,
                    });
                }
                return p.with(Action::Start {
                    role: StartRole::Primary,
                });
            }
            let p = Plan::new(MemberState::Demoting, Reason::SwitchoverAwaitingCandidate)
                .with(Action::RenewLeaderKey);
            return if cx.obs.peers.is_none() {
                p.with(Action::FetchPeerStatus {
                    members: candidates,
                })
            } else {
                // Ask again soon: a hand-over in progress is a write outage (each ask is one
                // authenticated GET to the candidate, which reads its positions live).
                p.wake(cx.now + cx.cfg.loop_wait.min(Millis(20)))
            };
        }
    }
    release(cx)
}

/// Publishes the release marker for the current leader key revision, then deletes the key. No
/// renewal after the marker: the marker must name the key's last revision.
fn release(cx: &mut Ctx<'_>) -> Plan {
    let revision = cx
        .obs
        .dcs
        .leader_lease
        .map(|l| l.revision)
        .or_else(|| cx.view.leader.as_ref().map(|l| l.mod_revision))
        .unwrap_or(0);
    cx.mem.released_revision = Some(revision);
    let data = member::member_data(cx, MemberState::Demoting);
    Plan::new(MemberState::Demoting, Reason::ReleasingLeaderKey)
        .with(Action::PublishMember(Box::new(data)))
        .with(Action::ReleaseLeaderKey)
}

/// Parses the ISO-8601 / RFC 3339 times Patroni accepts for `scheduled_at`
/// (`YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH[:MM]]`, no zone meaning UTC) into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let year = num(0..4)?;
    (b.get(4) == Some(&b'-')).then_some(())?;
    let month = num(5..7)?;
    (b.get(7) == Some(&b'-')).then_some(())?;
    let day = num(8..10)?;
    matches!(b.get(10), Some(b'T' | b't' | b' ')).then_some(())?;
    let hour = num(11..13)?;
    (b.get(13) == Some(&b':')).then_some(())?;
    let minute = num(14..16)?;
    let mut i = 16;
    let mut second = 0;
    let mut millis = 0;
    if b.get(i) == Some(&b':') {
        second = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            let frac = s.get(start..end)?;
            let ms: String = frac.chars().chain("000".chars()).take(3).collect();
            millis = ms.parse().ok()?;
            i = end;
        }
    }
    let offset_min = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let h = num(i + 1..i + 3)?;
            let rest = s.get(i + 3..)?;
            let m = match rest {
                "" => 0,
                r if r.starts_with(':') => num(i + 4..i + 6).filter(|_| r.len() == 3)?,
                _ => num(i + 3..i + 5).filter(|_| rest.len() == 2)?,
            };
            let off = h * 60 + m;
            if sign == b'-' { -off } else { off }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}+00:00",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

// Howard Hinnant's days-from-civil algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_at_parses_patroni_forms() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5+00:00"), Some(1500));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01 00:00-0100"), Some(3_600_000));
        assert_eq!(
            parse_rfc3339("2026-07-24T12:00:00+00:00"),
            Some(1_784_894_400_000)
        );
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("tomorrow"), None);
    }

    #[test]
    fn format_round_trips() {
        for ms in [0, 1_784_894_400_123, 951_782_400_000, -86_400_000] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms));
        }
    }
}
