//! Lease deadline, fencing, the leader's cycle, crash recovery, watchdog.

use super::*;
use crate::cluster::{ClusterStatus, HistoryEntry};

#[test]
fn leader_renews_every_cycle_and_arms_the_watchdog_until_the_deadline() {
    let fx = Fx::leader();
    let d = fx.decide();
    assert_eq!(d.reason, Reason::LeaderRenewed);
    assert_eq!(d.state, MemberState::Primary);
    assert_eq!(acts(&d), vec![Action::RenewLeaderKey]);
    // deadline = sent (now - 1 s) + 10 s - 2 s = now + 7 s
    let deadline = fx.now + Millis(7000);
    assert_eq!(d.watchdog, WatchdogCmd::Arm { until: deadline });
    assert_eq!(d.wake_at, fx.now + fx.cfg.loop_wait);
}

#[test]
fn fence_when_lease_deadline_passes() {
    let mut fx = Fx::leader();
    fx.now = fx.now + Millis(6999);
    assert!(!fx.decide().has(|a| *a == Action::Fence));
    fx.now = fx.now + Millis(1);
    let d = fx.decide();
    assert_eq!(acts(&d)[..2], [Action::Fence, Action::RenewLeaderKey]);
    assert!(matches!(d.reason, Reason::LeaseDeadlinePassed { .. }));
    assert_eq!(d.state, MemberState::Fencing);
}

#[test]
fn wake_no_later_than_the_lease_deadline() {
    let mut fx = Fx::leader();
    fx.obs.dcs.leader_lease.as_mut().unwrap().sent_at = fx.now - Millis(7000);
    let d = fx.decide();
    assert_eq!(d.wake_at, fx.now + Millis(1000));
}

#[test]
fn deadline_counts_from_keepalive_send_time_and_granted_ttl() {
    let mut fx = Fx::leader();
    // etcd granted only 5 s: deadline = now - 1 s + 5 s - 2 s = now + 2 s.
    fx.obs.dcs.leader_lease.as_mut().unwrap().granted_ttl = Millis(5000);
    fx.now = fx.now + Millis(2000);
    assert!(fx.decide().has(|a| *a == Action::Fence));
}

#[test]
fn fence_at_once_when_keepalive_answers_ttl_zero() {
    let mut fx = Fx::leader();
    fx.obs.dcs.lease_revoked = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::LeaseRevoked);
    assert_eq!(acts(&d), vec![Action::Fence]);
}

#[test]
fn fence_at_once_when_watch_shows_key_gone() {
    let mut fx = Fx::leader();
    fx.view.leader = None;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::LeaderKeyGone);
    assert_eq!(acts(&d)[0], Action::Fence);
}

#[test]
fn fence_at_once_when_key_taken_by_another() {
    let mut fx = Fx::leader();
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.view.leader.as_mut().unwrap().mod_revision = 90;
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::LeaderKeyTaken {
            holder: "n2".into()
        }
    );
    assert_eq!(acts(&d), vec![Action::Fence]);
    assert_eq!(d.watchdog, WatchdogCmd::Disarm);
}

#[test]
fn own_put_newer_than_the_view_counts_as_holding_the_key() {
    let mut fx = Fx::leader();
    fx.view.leader = None;
    fx.obs.dcs.view_revision = 5;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::LeaderRenewed);
}

#[test]
fn fence_primary_without_lease_proof_after_agent_restart() {
    let mut fx = Fx::leader();
    fx.obs.dcs.leader_lease = None;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::NoLeaseProof);
    assert_eq!(acts(&d), vec![Action::Fence, Action::RenewLeaderKey]);
}

#[test]
fn fence_stops_a_promotion_in_progress() {
    let mut fx = Fx::leader();
    fx.obs.pg.process = PgProcess::Promoting;
    fx.obs.pg.in_recovery = true;
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    assert!(fx.decide().has(|a| *a == Action::Fence));
}

#[test]
fn pause_still_fences_on_deadline() {
    let mut fx = Fx::leader();
    fx.cfg.pause = true;
    fx.now = fx.now + Millis(7000);
    assert!(fx.decide().has(|a| *a == Action::Fence));
}

/// The shell reports its last proof as it is once the deadline passed (it used to drop it, and
/// a paused primary then kept committing without a lease). Whatever the view shows, the
/// paused primary is fenced, and only renews afterwards.
#[test]
fn paused_primary_with_an_expired_proof_is_fenced_whatever_the_view_shows() {
    let mut fx = Fx::leader();
    fx.cfg.pause = true;
    fx.now = fx.now + Millis(7000);
    let d = fx.decide();
    assert_eq!(acts(&d), vec![Action::Fence, Action::RenewLeaderKey]);
    assert!(matches!(d.reason, Reason::LeaseDeadlinePassed { .. }));
    // The view still shows the old key (a partition); or already none; or another holder
    // (`ctl failover`, allowed in pause).
    fx.view.leader = None;
    assert_eq!(fx.decide().reason, Reason::LeaderKeyGone);
    fx.view.leader = Some(crate::cluster::LeaderKey {
        name: "n2".into(),
        lease: 2,
        mod_revision: 90,
    });
    assert_eq!(
        fx.decide().reason,
        Reason::LeaderKeyTaken {
            holder: "n2".into()
        }
    );
}

/// After the fence, an expired proof makes the holder renew and nothing else: no start as
/// primary, no promotion, and it bounds nothing (the shell gives the renewal its full time).
#[test]
fn expired_proof_only_renews() {
    for pause in [false, true] {
        let mut fx = Fx::leader();
        fx.cfg.pause = pause;
        fx.now = fx.now + Millis(7000);
        fx.obs.pg.process = PgProcess::Stopped;
        fx.obs.pg.crashed = true;
        let d = fx.decide();
        assert_eq!(acts(&d), vec![Action::RenewLeaderKey], "pause {pause}");
        assert_eq!(d.watchdog, WatchdogCmd::Hold);
        fx.obs.pg.process = PgProcess::Running;
        fx.obs.pg.in_recovery = true;
        assert_eq!(acts(&fx.decide()), vec![Action::RenewLeaderKey]);
    }
}

#[test]
fn replica_disarms_the_watchdog() {
    let d = Fx::replica("n2").decide();
    assert_eq!(d.watchdog, WatchdogCmd::Disarm);
}

#[test]
fn leader_writes_initialize_when_missing() {
    let mut fx = Fx::leader();
    fx.view.initialize = Some(Initialize::InProgress);
    assert!(fx.decide().has(|a| matches!(
        a,
        Action::WriteInitialize { system_id, create_only: false } if system_id == SYSID
    )));
}

#[test]
fn leader_publishes_history_of_its_timeline() {
    let mut fx = Fx::leader();
    fx.obs.pg.timeline = Some(3);
    fx.obs.pg.timeline_history = vec![
        HistoryEntry {
            parent_timeline: 1,
            switch_lsn: Lsn(500),
            reason: "r".into(),
            timestamp: None,
            new_leader: None,
        },
        HistoryEntry {
            parent_timeline: 2,
            switch_lsn: Lsn(900),
            reason: "r".into(),
            timestamp: None,
            new_leader: None,
        },
    ];
    let d = fx.decide();
    let Some(Action::WriteHistory(h)) = d
        .actions
        .iter()
        .find(|a| matches!(a, Action::WriteHistory(_)))
    else {
        panic!("no history write: {d:?}")
    };
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].new_leader.as_deref(), Some("n1"));
    assert!(
        h[1].timestamp
            .as_deref()
            .unwrap()
            .starts_with("2026-07-24T")
    );
    // Once published, the member key vouches for it.
    fx.view.history = Some(h.clone());
    let d = fx.decide();
    assert!(!d.has(|a| matches!(a, Action::WriteHistory(_))));
    let Some(Action::PublishMember(m)) = d.actions.last() else {
        panic!()
    };
    assert_eq!(m.other[HISTORY_TL_FIELD], 3);
}

#[test]
fn history_reset_to_empty_on_timeline_one() {
    let mut fx = Fx::leader();
    fx.view.history = Some(vec![HistoryEntry {
        parent_timeline: 1,
        switch_lsn: Lsn(1),
        reason: String::new(),
        timestamp: None,
        new_leader: None,
    }]);
    assert!(fx.decide().has(|a| *a == Action::WriteHistory(Vec::new())));
}

#[test]
fn leader_writes_status_optime_when_it_changed() {
    let mut fx = Fx::leader();
    fx.obs.pg.wal_position = Lsn(2000);
    let d = fx.decide();
    assert!(d.has(|a| matches!(
        a,
        Action::WriteStatus(ClusterStatus {
            optime: Some(Lsn(2000)),
            ..
        })
    )));
}

#[test]
fn crashed_primary_restarts_locally_within_primary_start_timeout() {
    let mut fx = Fx::leader();
    fx.obs.pg.process = PgProcess::Stopped;
    fx.obs.pg.crashed = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::RestartingCrashedPrimary);
    assert_eq!(
        acts(&d),
        vec![
            Action::RenewLeaderKey,
            Action::Start {
                role: StartRole::Primary
            }
        ]
    );
    assert_eq!(d.memory.primary_start_began, Some(fx.now));
    assert!(matches!(d.watchdog, WatchdogCmd::Arm { .. }));
}

#[test]
fn crashed_primary_hands_over_after_primary_start_timeout_when_failover_possible() {
    let mut fx = Fx::leader();
    fx.obs.pg.process = PgProcess::Starting;
    fx.obs.memory.primary_start_began = Some(fx.now - DEFAULT_PRIMARY_START_TIMEOUT);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::PrimaryStartTimeout);
    assert_eq!(
        acts(&d),
        vec![
            Action::RenewLeaderKey,
            Action::Stop {
                mode: StopMode::Immediate
            }
        ]
    );
    // Stopped: publish the release marker, then delete the key.
    fx.obs.pg.process = PgProcess::Stopped;
    fx.obs.memory = d.memory;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ReleasingLeaderKey);
    let Action::PublishMember(m) = &d.actions[0] else {
        panic!("{d:?}")
    };
    assert_eq!(m.other[RELEASED_FIELD], 10);
    assert_eq!(d.actions[1], Action::ReleaseLeaderKey);
    assert!(!d.has(|a| *a == Action::RenewLeaderKey));
}

#[test]
fn crashed_primary_keeps_recovering_when_no_failover_possible() {
    let mut fx = Fx::leader();
    fx.obs.pg.process = PgProcess::Starting;
    fx.obs.memory.primary_start_began = Some(fx.now - Millis::from_secs(600));
    for n in ["n2", "n3"] {
        fx.member(n).state = "stopped".into();
    }
    let d = fx.decide();
    assert_eq!(d.reason, Reason::NoFailoverPossible);
    assert!(!d.has(|a| matches!(a, Action::Stop { .. })));
}

#[test]
fn primary_start_timeout_zero_hands_over_at_once() {
    let mut fx = Fx::leader();
    fx.cfg.primary_start_timeout = Millis::ZERO;
    fx.obs.pg.process = PgProcess::Stopped;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ImmediateFailoverAfterCrash);
    assert!(d.has(|a| *a == Action::ReleaseLeaderKey));
}

#[test]
fn default_primary_start_timeout_is_thirty_seconds() {
    assert_eq!(
        HaConfig::default().primary_start_timeout,
        Millis::from_secs(30)
    );
}

#[test]
fn lagging_replica_makes_no_failover_possible() {
    let mut fx = Fx::leader();
    fx.obs.pg.process = PgProcess::Stopped;
    fx.cfg.primary_start_timeout = Millis::ZERO;
    fx.obs.pg.wal_position = Lsn(10 << 20);
    assert_eq!(fx.decide().reason, Reason::NoFailoverPossible);
}

#[test]
fn shutdown_leader_stops_then_releases() {
    let mut fx = Fx::leader();
    fx.obs.requests.shutdown = true;
    let d = fx.decide();
    assert_eq!(d.state, MemberState::Demoting);
    assert!(d.has(|a| *a
        == Action::Stop {
            mode: StopMode::Fast
        }));
    fx.obs.memory = d.memory;
    fx.obs.pg.process = PgProcess::Stopped;
    assert!(fx.decide().has(|a| *a == Action::ReleaseLeaderKey));
}

#[test]
fn restart_requested_on_replica() {
    let mut fx = Fx::replica("n2");
    fx.obs.requests.restart = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::RestartRequested);
    assert!(d.has(|a| *a == Action::Restart));
}

#[test]
fn busy_background_operation_waits() {
    let mut fx = Fx::replica("n2");
    fx.obs.busy = Some(LongOperation::Rewind);
    fx.obs.pg.process = PgProcess::Stopped;
    let d = fx.decide();
    assert_eq!((d.state, d.reason), (MemberState::Rewinding, Reason::Busy));
}

#[test]
fn no_dcs_view_yet_decides_nothing_but_fencing() {
    let mut fx = Fx::replica("n2");
    fx.obs.dcs.view_revision = 0;
    fx.view = ClusterView::default();
    let d = fx.decide();
    assert_eq!(d.reason, Reason::NoDcsView);
    assert!(acts(&d).is_empty());
    fx.obs.pg.in_recovery = false;
    assert!(fx.decide().has(|a| *a == Action::Fence));
}
