//! The leader race and the takeover guard.

use super::*;

fn won(d: &Decision) -> bool {
    d.reason == Reason::AcquiringLeaderKey && d.has(|a| *a == Action::AcquireLeaderKey)
}

fn lost(d: &Decision) -> RaceLoss {
    match &d.reason {
        Reason::NotHealthiest(l) => l.clone(),
        other => panic!("expected a race loss, got {other:?}"),
    }
}

#[test]
fn race_asks_peers_first() {
    let fx = Fx::leaderless("n2");
    let d = fx.decide();
    assert_eq!(d.reason, Reason::NeedPeerStatus);
    assert_eq!(
        acts(&d),
        vec![Action::FetchPeerStatus {
            members: vec!["n3".into(), "n1".into()]
        }]
    );
}

#[test]
fn race_takes_key_when_healthiest() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n3", false, 900)]);
    let d = fx.decide();
    assert!(won(&d));
    assert_eq!(d.state, MemberState::Candidate);
}

#[test]
fn race_lag_beyond_maximum_lag_on_failover_does_not_race() {
    let mut fx = Fx::leaderless("n2");
    fx.view.status.optime = Some(Lsn(1000 + (1 << 20) + 1));
    assert_eq!(
        lost(&fx.decide()),
        RaceLoss::LagTooHigh { lag: (1 << 20) + 1 }
    );
}

#[test]
fn race_timeline_behind_does_not_race() {
    let mut fx = Fx::leaderless("n2");
    fx.view.history = Some(vec![crate::cluster::HistoryEntry {
        parent_timeline: 1,
        switch_lsn: Lsn(900),
        reason: String::new(),
        timestamp: None,
        new_leader: None,
    }]);
    assert_eq!(
        lost(&fx.decide()),
        RaceLoss::TimelineBehind {
            ours: Some(1),
            cluster: 2
        }
    );
    fx.cfg.check_timeline = false;
    assert_eq!(fx.decide().reason, Reason::NeedPeerStatus);
}

#[test]
fn race_nofailover_never_races() {
    let mut fx = Fx::leaderless("n2");
    fx.obs.tags.nofailover = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::NoLeaderNotEligible);
    assert!(!d.has(|a| *a == Action::AcquireLeaderKey));
}

#[test]
fn failover_priority_zero_is_nofailover() {
    let mut fx = Fx::leaderless("n2");
    fx.obs.tags.failover_priority = Some(0);
    assert_eq!(fx.decide().reason, Reason::NoLeaderNotEligible);
}

#[test]
fn race_defers_to_peer_ahead() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n3", false, 1001)]);
    assert_eq!(
        lost(&fx.decide()),
        RaceLoss::PeerAhead { peer: "n3".into() }
    );
}

#[test]
fn race_defers_when_a_peer_is_still_primary() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n1", true, 1000), ("n3", false, 900)]);
    assert_eq!(
        lost(&fx.decide()),
        RaceLoss::PrimaryStillAlive { peer: "n1".into() }
    );
}

#[test]
fn race_equal_wal_higher_priority_wins() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n3", false, 1000)]);
    fx.obs
        .peers
        .as_mut()
        .unwrap()
        .answers
        .get_mut("n3")
        .unwrap()
        .tags
        .failover_priority = Some(5);
    assert_eq!(
        lost(&fx.decide()),
        RaceLoss::PeerHigherPriority { peer: "n3".into() }
    );
    // The former leader's priority does not count.
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n1", false, 1000)]);
    fx.obs
        .peers
        .as_mut()
        .unwrap()
        .answers
        .get_mut("n1")
        .unwrap()
        .tags
        .failover_priority = Some(5);
    assert!(won(&fx.decide()));
}

#[test]
fn race_nofailover_peer_ahead_is_ignored() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[("n3", false, 5000)]);
    fx.obs
        .peers
        .as_mut()
        .unwrap()
        .answers
        .get_mut("n3")
        .unwrap()
        .tags
        .nofailover = true;
    assert!(won(&fx.decide()));
}

#[test]
fn race_peer_behind_cluster_timeline_is_no_competition() {
    let mut fx = Fx::leaderless("n2");
    fx.obs.pg.timeline = Some(2);
    fx.view.history = Some(vec![crate::cluster::HistoryEntry {
        parent_timeline: 1,
        switch_lsn: Lsn(900),
        reason: String::new(),
        timestamp: None,
        new_leader: None,
    }]);
    fx.peers(&[("n3", false, 5000)]);
    assert!(won(&fx.decide()));
}

#[test]
fn race_sync_mode_only_sync_members_race() {
    let mut fx = Fx::leaderless("n2");
    fx.sync("n1", &["n3"]);
    assert_eq!(lost(&fx.decide()), RaceLoss::NotSynchronous);
    let mut fx = Fx::leaderless("n3");
    fx.sync("n1", &["n3"]);
    // n2 is ahead but outside /sync: no competition.
    fx.peers(&[("n2", false, 5000)]);
    assert!(won(&fx.decide()));
}

#[test]
fn race_sync_mode_former_sync_leader_ahead_is_ignored() {
    let mut fx = Fx::leaderless("n3");
    fx.sync("n1", &["n3"]);
    fx.peers(&[("n1", false, 5000)]);
    assert!(won(&fx.decide()));
}

#[test]
fn race_stopped_replica_starts_before_racing() {
    let mut fx = Fx::leaderless("n2");
    fx.obs.pg.process = PgProcess::Stopped;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::StartingToRace);
    assert_eq!(
        acts(&d),
        vec![Action::Start {
            role: StartRole::Replica { upstream: None }
        }]
    );
}

#[test]
fn race_in_pause_replicas_do_not_race() {
    let mut fx = Fx::leaderless("n2");
    fx.cfg.pause = true;
    assert_eq!(lost(&fx.decide()), RaceLoss::Paused);
}

#[test]
fn race_in_pause_running_primary_takes_key() {
    let mut fx = Fx::leaderless("n2");
    fx.cfg.pause = true;
    fx.obs.pg.in_recovery = false;
    fx.obs.dcs.deleted_leader = None;
    fx.obs.memory.last_leader = None;
    let d = fx.decide();
    assert!(!d.has(|a| *a == Action::Fence));
    assert!(d.has(|a| *a == Action::AcquireLeaderKey));
}

#[test]
fn race_watchdog_failed_does_not_race() {
    let mut fx = Fx::leaderless("n2");
    fx.obs.watchdog_failed = true;
    assert_eq!(lost(&fx.decide()), RaceLoss::WatchdogFailed);
}

fn guard(fx: &Fx) -> Option<Millis> {
    fx.decide().memory.promote_not_before
}

#[test]
fn race_leaves_the_guard_to_the_first_decision_holding_the_key() {
    let mut fx = Fx::leaderless("n2");
    fx.peers(&[]);
    fx.obs.memory.promote_not_before = Some(Millis(1));
    // Unchanged by the race (it may carry over to our next term).
    assert_eq!(guard(&fx), Some(Millis(1)));
    assert!(!fx.decide().memory.guard_computed);
}

#[test]
fn takeover_guard_counts_ttl_from_last_seen_renewal() {
    let fx = holding("n2");
    let d = fx.decide();
    // The last renewal's put arrived 9 s ago: promote 1 s from now.
    assert_eq!(d.memory.promote_not_before, Some(fx.now + Millis(1000)));
    assert_eq!(
        d.reason,
        Reason::TakeoverGuard {
            until: fx.now + Millis(1000)
        }
    );
    assert_eq!(d.wake_at, fx.now + Millis(1000));
}

#[test]
fn takeover_guard_full_ttl_when_last_revision_unknown() {
    // The watch did not deliver the holder's last put (missed renewals, reconnect).
    let mut fx = holding("n2");
    fx.obs.dcs.deleted_leader.as_mut().unwrap().put_seen_at = None;
    assert_eq!(guard(&fx), Some(fx.now + fx.cfg.ttl));
    // No deletion known at all.
    fx.obs.dcs.deleted_leader = None;
    assert_eq!(guard(&fx), Some(fx.now + fx.cfg.ttl));
}

#[test]
fn takeover_guard_skipped_after_deliberate_release() {
    let mut fx = holding("n2");
    let mut m = member("replica", 1000, 1);
    m.other.insert(RELEASED_FIELD.into(), 10.into());
    fx.view.members.insert(
        "n1".into(),
        MemberKey {
            data: m,
            mod_revision: 11,
            lease: 1,
        },
    );
    assert_eq!(guard(&fx), Some(fx.now));
    assert!(fx.decide().has(|a| *a == Action::Promote));
    // A marker for an older revision does not count.
    fx.view
        .members
        .get_mut("n1")
        .unwrap()
        .data
        .other
        .insert(RELEASED_FIELD.into(), 9.into());
    assert_eq!(guard(&fx), Some(fx.now + Millis(1000)));
}

#[test]
fn takeover_guard_carries_over_when_we_held_the_key_last() {
    // We held the key before (never promoted) and lost it; the guard of the holder before us
    // still runs until now + 3 s.
    let mut fx = holding("n2");
    fx.obs.dcs.deleted_leader.as_mut().unwrap().name = "n2".into();
    fx.obs.memory.promote_not_before = Some(fx.now + Millis(3000));
    assert_eq!(guard(&fx), Some(fx.now + Millis(3000)));
    // Our old guard long past (we were primary): promote now.
    fx.obs.memory.promote_not_before = Some(Millis(5));
    assert_eq!(guard(&fx), Some(fx.now));
    // Memory lost (agent restart): a full ttl.
    fx.obs.memory.promote_not_before = None;
    assert_eq!(guard(&fx), Some(fx.now + fx.cfg.ttl));
}

#[test]
fn takeover_guard_is_computed_once_per_term() {
    let mut fx = holding("n2");
    fx.obs.memory.was_holding = true;
    fx.obs.memory.guard_computed = true;
    fx.obs.memory.promote_not_before = Some(fx.now + Millis(5000));
    assert_eq!(guard(&fx), Some(fx.now + Millis(5000)));
    // A new term (we were not holding at the previous decision) recomputes it.
    fx.obs.memory.was_holding = false;
    assert_eq!(guard(&fx), Some(fx.now + Millis(1000)));
}

#[test]
fn promote_waits_until_the_view_shows_our_own_key() {
    let mut fx = holding("n2");
    // Our create succeeded (revision 20) but the view is older and still leaderless.
    fx.view.leader = None;
    fx.obs.dcs.view_revision = 15;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::WaitingForOwnKey);
    assert_eq!(d.memory.promote_not_before, None);
    assert_eq!(acts(&d), vec![Action::RenewLeaderKey]);
}

#[test]
fn promote_waits_for_takeover_guard() {
    let mut fx = Fx::replica("n2");
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 10,
    });
    fx.obs.memory.promote_not_before = Some(fx.now + Millis(500));
    fx.obs.memory.was_holding = true;
    fx.obs.memory.guard_computed = true;
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::TakeoverGuard {
            until: fx.now + Millis(500)
        }
    );
    assert_eq!(d.state, MemberState::LeaderPending);
    assert_eq!(d.wake_at, fx.now + Millis(500));
    assert!(!d.has(|a| *a == Action::Promote));
    fx.now = fx.now + Millis(500);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::Promoting);
    assert_eq!(acts(&d), vec![Action::RenewLeaderKey, Action::Promote]);
    assert!(matches!(d.watchdog, WatchdogCmd::Arm { .. }));
}

#[test]
fn promote_after_agent_restart_waits_a_full_ttl() {
    let mut fx = Fx::replica("n2");
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 10,
    });
    let d = fx.decide();
    assert_eq!(d.memory.promote_not_before, Some(fx.now + fx.cfg.ttl));
}

#[test]
fn holder_without_proof_only_renews() {
    let mut fx = Fx::replica("n2");
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    let d = fx.decide();
    assert_eq!(acts(&d), vec![Action::RenewLeaderKey]);
}
