//! Switchover, manual failover, scheduled switchover.

use super::*;

fn stopped_after_switchover(candidate: Option<&str>) -> Fx {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), candidate);
    let d = fx.decide();
    fx.obs.memory = d.memory;
    fx.obs.pg.process = PgProcess::Stopped;
    fx.obs.pg.wal_position = Lsn(1100);
    fx
}

#[test]
fn switchover_stops_primary_with_checkpoint() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::SwitchoverStopping {
            candidate: Some("n2".into())
        }
    );
    assert_eq!(d.state, MemberState::Demoting);
    assert_eq!(
        acts(&d),
        vec![
            Action::RenewLeaderKey,
            Action::Checkpoint,
            Action::Stop {
                mode: StopMode::Fast
            }
        ]
    );
}

#[test]
fn switchover_waits_for_candidate_to_confirm_checkpoint() {
    let mut fx = stopped_after_switchover(Some("n2"));
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverAwaitingCandidate);
    assert!(d.has(|a| *a
        == Action::FetchPeerStatus {
            members: vec!["n2".into()]
        }));
    // At the start of the checkpoint record is not past it.
    fx.peers(&[("n2", false, 1100)]);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverAwaitingCandidate);
    assert!(!d.has(|a| *a == Action::ReleaseLeaderKey));
    assert!(!d.has(|a| matches!(a, Action::FetchPeerStatus { .. })));
}

#[test]
fn switchover_releases_key_after_candidate_has_checkpoint() {
    let mut fx = stopped_after_switchover(Some("n2"));
    fx.peers(&[("n2", false, 1180)]);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ReleasingLeaderKey);
    let Action::PublishMember(m) = &d.actions[0] else {
        panic!("{d:?}")
    };
    assert_eq!(m.other[RELEASED_FIELD], 10);
    assert_eq!(m.role, "demoted");
    assert_eq!(d.actions[1], Action::ReleaseLeaderKey);
    assert_eq!(d.actions.len(), 2);
}

#[test]
fn switchover_without_candidate_accepts_any_member_with_checkpoint() {
    let mut fx = stopped_after_switchover(None);
    fx.peers(&[("n2", false, 1000), ("n3", false, 1180)]);
    assert!(fx.decide().has(|a| *a == Action::ReleaseLeaderKey));
}

#[test]
fn switchover_times_out_and_resumes_as_primary() {
    let mut fx = stopped_after_switchover(Some("n2"));
    fx.now = fx.now + fx.cfg.switchover_timeout;
    fx.obs.dcs.leader_lease.as_mut().unwrap().sent_at = fx.now;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverTimedOut);
    assert!(d.has(|a| *a
        == Action::ClearFailover {
            expected_revision: 50
        }));
    assert!(d.has(|a| *a
        == Action::Start {
            role: StartRole::Primary
        }));
    assert!(d.memory.handover.is_none());
}

#[test]
fn switchover_rejected_without_healthy_candidate() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.member("n2").state = "stopped".into();
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::FailoverRequestRejected(RejectedFailover::NoHealthyCandidate)
    );
    assert!(d.has(|a| *a
        == Action::ClearFailover {
            expected_revision: 50
        }));
    // nofailover and lagging candidates are not healthy either.
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.member("n2").tags.nofailover = true;
    assert!(matches!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(_)
    ));
    // A candidate whose key lags is asked for its current position first; still behind, it
    // is rejected.
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.obs.pg.wal_position = Lsn(3 << 20);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverCheckingCandidates);
    assert!(d.has(|a| *a
        == Action::FetchPeerStatus {
            members: vec!["n2".into()]
        }));
    fx.peers(&[("n2", false, 1000)]);
    assert!(matches!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(_)
    ));
}

#[test]
fn switchover_trusts_a_candidates_fresh_position_over_its_stale_key() {
    // A WAL switch moved the primary 16 MiB ahead; the candidate followed, its key is a loop old.
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.obs.pg.wal_position = Lsn(16 << 20);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverCheckingCandidates);
    fx.peers(&[("n2", false, 16 << 20)]);
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::SwitchoverStopping {
            candidate: Some("n2".into())
        }
    );
}

#[test]
fn switchover_request_for_other_leader_is_cleared() {
    let mut fx = Fx::leader();
    fx.failover(Some("n3"), Some("n2"));
    assert_eq!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(RejectedFailover::LeaderMismatch)
    );
}

#[test]
fn completed_switchover_request_is_cleared_by_new_leader() {
    let mut fx = Fx::leader();
    fx.failover(Some("n2"), Some("n1"));
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::FailoverRequestRejected(RejectedFailover::Completed)
    );
    assert!(d.has(|a| *a
        == Action::ClearFailover {
            expected_revision: 50
        }));
}

#[test]
fn switchover_to_the_leader_itself_is_cleared() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n1"));
    assert_eq!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(RejectedFailover::CandidateIsLeader)
    );
}

#[test]
fn release_marker_stays_until_a_new_leader_appears() {
    let mut fx = stopped_after_switchover(Some("n2"));
    fx.peers(&[("n2", false, 1180)]);
    let d = fx.decide();
    assert_eq!(d.memory.released_revision, Some(10));
    // Key gone: the member key keeps the marker.
    let mut fx = Fx::leaderless("n1");
    fx.obs.memory.released_revision = Some(10);
    fx.peers(&[]);
    let d = fx.decide();
    let Some(Action::PublishMember(m)) = d.actions.last() else {
        panic!()
    };
    assert_eq!(m.other[RELEASED_FIELD], 10);
    // Another leader does not clear it (its first decision may still need it) ...
    let mut fx = Fx::replica("n1");
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.view.leader.as_mut().unwrap().mod_revision = 11;
    fx.obs.memory.released_revision = Some(10);
    assert_eq!(fx.decide().memory.released_revision, Some(10));
    // ... leading again does.
    let mut fx = Fx::leader();
    fx.obs.memory.released_revision = Some(5);
    assert_eq!(fx.decide().memory.released_revision, None);
}

#[test]
fn sync_mode_switchover_only_to_sync_standby() {
    let mut fx = Fx::leader();
    fx.sync("n1", &["n3"]);
    fx.obs.pg.sync_standby_names = SyncStandbyNames::all_of(vec!["n3".into()]);
    fx.failover(Some("n1"), Some("n2"));
    assert!(matches!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(_)
    ));
    fx.failover(Some("n1"), Some("n3"));
    assert!(matches!(
        fx.decide().reason,
        Reason::SwitchoverStopping { .. }
    ));
}

#[test]
fn scheduled_switchover_waits_until_due() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.view.failover.as_mut().unwrap().value.scheduled_at =
        Some(format_rfc3339(fx.obs.wall_clock_ms + 60_000));
    let d = fx.decide();
    assert!(matches!(
        d.reason,
        Reason::ScheduledSwitchoverPending { .. }
    ));
    assert!(!d.has(|a| matches!(a, Action::Stop { .. })));
    // Due within a cycle: wake at the exact time.
    fx.view.failover.as_mut().unwrap().value.scheduled_at =
        Some(format_rfc3339(fx.obs.wall_clock_ms + 1_500));
    assert_eq!(fx.decide().wake_at, fx.now + Millis(1_500));
    // Due now.
    fx.view.failover.as_mut().unwrap().value.scheduled_at =
        Some(format_rfc3339(fx.obs.wall_clock_ms - 1_000));
    assert!(matches!(
        fx.decide().reason,
        Reason::SwitchoverStopping { .. }
    ));
}

#[test]
fn stale_scheduled_switchover_is_cleared() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.view.failover.as_mut().unwrap().value.scheduled_at =
        Some(format_rfc3339(fx.obs.wall_clock_ms - 3_001));
    assert_eq!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(RejectedFailover::Stale)
    );
}

#[test]
fn scheduled_switchover_refused_in_pause() {
    let mut fx = Fx::leader();
    fx.cfg.pause = true;
    fx.failover(Some("n1"), Some("n2"));
    fx.view.failover.as_mut().unwrap().value.scheduled_at =
        Some(format_rfc3339(fx.obs.wall_clock_ms));
    assert_eq!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(RejectedFailover::ScheduledInPause)
    );
}

#[test]
fn manual_failover_with_a_leader_is_a_switchover() {
    let mut fx = Fx::leader();
    fx.failover(None, Some("n3"));
    assert_eq!(
        fx.decide().reason,
        Reason::SwitchoverStopping {
            candidate: Some("n3".into())
        }
    );
}

#[test]
fn manual_failover_candidate_races_without_lag_check() {
    let mut fx = Fx::leaderless("n2");
    fx.failover(None, Some("n2"));
    fx.view.status.optime = Some(Lsn(50 << 20));
    fx.peers(&[("n3", false, 5000)]);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::AcquiringLeaderKey);
}

#[test]
fn others_defer_to_named_candidate() {
    let mut fx = Fx::leaderless("n3");
    fx.failover(Some("n1"), Some("n2"));
    fx.obs.memory.leader_absent_since = Some(fx.now);
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::DeferringToCandidate {
            candidate: "n2".into()
        }
    );
    // ... but not for ever.
    fx.obs.memory.leader_absent_since = Some(fx.now - fx.cfg.switchover_timeout);
    assert_eq!(fx.decide().reason, Reason::NeedPeerStatus);
}

#[test]
fn switchover_candidate_takes_the_released_key_without_asking_peers() {
    let mut fx = Fx::leaderless("n2");
    fx.failover(Some("n1"), Some("n2"));
    let d = fx.decide();
    assert_eq!(d.reason, Reason::AcquiringLeaderKey);
    assert!(d.actions.contains(&Action::AcquireLeaderKey));
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::FetchPeerStatus { .. }))
    );
    // A manual failover (no leader named) still asks the peers first.
    let mut fx = Fx::leaderless("n2");
    fx.failover(None, Some("n2"));
    assert_eq!(fx.decide().reason, Reason::NeedPeerStatus);
}

#[test]
fn switchover_after_an_unclean_stop_is_never_confirmed() {
    let mut fx = stopped_after_switchover(Some("n2"));
    fx.obs.pg.crashed = true;
    fx.peers(&[("n2", false, 5000)]);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::SwitchoverAwaitingCandidate);
    assert!(!d.has(|a| *a == Action::ReleaseLeaderKey));
}

#[test]
fn a_fresh_answer_outranks_the_member_key() {
    // The key says n2 is caught up; n2 itself says it is 16 MiB behind (re-cloned since, say).
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.obs.pg.wal_position = Lsn(16 << 20);
    fx.member("n2").xlog_location = Some(Lsn(16 << 20));
    fx.peers(&[("n2", false, 1000)]);
    assert_eq!(
        fx.decide().reason,
        Reason::FailoverRequestRejected(RejectedFailover::NoHealthyCandidate)
    );
}
