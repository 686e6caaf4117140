//! Synchronous replication: ordering of `synchronous_standby_names` and `/sync`.

use super::*;

fn row(name: &str, flush: u64, sync: bool) -> ReplicationRow {
    ReplicationRow {
        application_name: name.into(),
        streaming: true,
        flush_lsn: Lsn(flush),
        sync,
    }
}

fn sync_leader(standbys: &[&str]) -> Fx {
    let mut fx = Fx::leader();
    fx.sync("n1", standbys);
    fx.obs.pg.replication = vec![row("n2", 1000, false), row("n3", 1000, false)];
    fx
}

fn sync_writes(d: &Decision) -> Vec<(Vec<String>, Option<i64>)> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteSync {
                state,
                expected_revision,
            } => Some((state.standbys(), *expected_revision)),
            _ => None,
        })
        .collect()
}

fn ssn(names: &[&str]) -> SyncStandbyNames {
    SyncStandbyNames::all_of(names.iter().map(|s| s.to_string()).collect())
}

#[test]
fn sync_add_to_ssn_before_sync_key() {
    let fx = sync_leader(&[]);
    let d = fx.decide();
    assert!(d.has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n2"]))));
    assert!(sync_writes(&d).is_empty());
    // The threshold waits for PostgreSQL to show n2 as synchronous.
    assert_eq!(d.memory.sync_change_lsn, None);
}

/// Commits acknowledged by the old standbys between the decision and the reload's effect are
/// covered: the threshold is the primary's position when n2 first shows as `sync`.
#[test]
fn sync_threshold_taken_once_postgres_waits_for_the_standby() {
    let mut fx = sync_leader(&[]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.wal_position = Lsn(1200);
    fx.obs.pg.replication = vec![row("n2", 1100, false)];
    let d = fx.decide();
    assert!(sync_writes(&d).is_empty());
    assert_eq!(d.memory.sync_change_lsn, None);
    fx.obs.pg.replication = vec![row("n2", 1100, true)];
    let d = fx.decide();
    assert!(sync_writes(&d).is_empty());
    assert_eq!(d.memory.sync_change_lsn, Some(Lsn(1200)));
    fx.obs.memory = d.memory;
    fx.obs.pg.wal_position = Lsn(1300);
    fx.obs.pg.replication = vec![row("n2", 1200, true)];
    assert_eq!(
        sync_writes(&fx.decide()),
        vec![(vec!["n2".to_string()], Some(40))]
    );
}

#[test]
fn sync_confirm_standby_after_it_flushed() {
    let mut fx = sync_leader(&[]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.memory.sync_change_lsn = Some(Lsn(1000));
    fx.obs.pg.replication = vec![row("n2", 999, true), row("n3", 990, false)];
    assert!(sync_writes(&fx.decide()).is_empty());
    fx.obs.pg.replication[0].flush_lsn = Lsn(1000);
    assert_eq!(
        sync_writes(&fx.decide()),
        vec![(vec!["n2".to_string()], Some(40))]
    );
}

#[test]
fn sync_confirmation_after_agent_restart_needs_current_position() {
    let mut fx = sync_leader(&[]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.wal_position = Lsn(2000);
    fx.obs.pg.replication = vec![row("n2", 1500, true)];
    assert!(sync_writes(&fx.decide()).is_empty());
}

#[test]
fn sync_remove_from_sync_key_before_ssn() {
    let mut fx = sync_leader(&["n2"]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.replication = vec![row("n3", 1000, false)];
    let d = fx.decide();
    assert_eq!(sync_writes(&d), vec![(vec![], Some(40))]);
    assert!(!d.has(|a| matches!(a, Action::SetSyncStandbyNames(_))));
}

#[test]
fn sync_strict_without_candidates_uses_placeholder() {
    let mut fx = sync_leader(&[]);
    fx.cfg.synchronous_mode_strict = true;
    fx.obs.pg.replication.clear();
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(SyncStandbyNames::placeholder()))
    );
}

#[test]
fn sync_strict_keeps_last_sync_standby() {
    let mut fx = sync_leader(&["n2"]);
    fx.cfg.synchronous_mode_strict = true;
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.replication.clear();
    let d = fx.decide();
    assert!(sync_writes(&d).is_empty());
    assert!(!d.has(|a| matches!(a, Action::SetSyncStandbyNames(_))));
}

#[test]
fn sync_non_strict_without_candidates_turns_asynchronous() {
    let mut fx = sync_leader(&[]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.replication.clear();
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(SyncStandbyNames::default()))
    );
}

#[test]
fn sync_nosync_tag_never_chosen() {
    let mut fx = sync_leader(&[]);
    fx.member("n2").tags.nosync = true;
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n3"])))
    );
    let mut fx = sync_leader(&[]);
    fx.member("n2").tags.sync_priority = Some(0);
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n3"])))
    );
}

#[test]
fn sync_priority_and_position_order_candidates() {
    let mut fx = sync_leader(&[]);
    fx.member("n3").tags.sync_priority = Some(2);
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n3"])))
    );
    let mut fx = sync_leader(&[]);
    fx.obs.pg.replication[1].flush_lsn = Lsn(1001);
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n3"])))
    );
    // Members that can fail over are preferred.
    let mut fx = sync_leader(&[]);
    fx.member("n2").tags.nofailover = true;
    assert!(
        fx.decide()
            .has(|a| *a == Action::SetSyncStandbyNames(ssn(&["n3"])))
    );
}

#[test]
fn sync_count_two() {
    let mut fx = sync_leader(&[]);
    fx.cfg.synchronous_node_count = 2;
    let d = fx.decide();
    let want = ssn(&["n2", "n3"]);
    assert_eq!(want.num, 2);
    assert!(d.has(|a| *a == Action::SetSyncStandbyNames(want.clone())));
}

#[test]
fn sync_takes_over_sync_key_on_first_cycle() {
    let mut fx = sync_leader(&[]);
    fx.sync("n9", &["n2"]);
    assert_eq!(sync_writes(&fx.decide()), vec![(vec![], Some(40))]);
}

#[test]
fn sync_promote_writes_sync_key_first() {
    let mut fx = Fx::replica("n2");
    fx.sync("n1", &["n2"]);
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 10,
    });
    fx.obs.memory.promote_not_before = Some(fx.now);
    fx.obs.memory.was_holding = true;
    fx.obs.memory.guard_computed = true;
    let d = fx.decide();
    let a = acts(&d);
    assert_eq!(a[0], Action::RenewLeaderKey);
    assert!(
        matches!(&a[1], Action::WriteSync { state, expected_revision: Some(40) }
        if state.leader.as_deref() == Some("n2") && state.standbys().is_empty())
    );
    assert_eq!(a[2], Action::Promote);
    fx.cfg.synchronous_mode_strict = true;
    let a = acts(&fx.decide());
    assert_eq!(
        a[2],
        Action::SetSyncStandbyNames(SyncStandbyNames::placeholder())
    );
    assert_eq!(a[3], Action::Promote);
}

#[test]
fn sync_mode_off_deletes_sync_key() {
    let mut fx = sync_leader(&["n2"]);
    fx.cfg.synchronous_mode = SyncMode::Off;
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    let d = fx.decide();
    let del = d.actions.iter().position(|a| {
        *a == Action::DeleteSync {
            expected_revision: 40,
        }
    });
    let set = d
        .actions
        .iter()
        .position(|a| *a == Action::SetSyncStandbyNames(SyncStandbyNames::default()));
    assert!(del.unwrap() < set.unwrap());
}

#[test]
fn ssn_formatting_patroni_style() {
    assert_eq!(ssn(&[]).to_guc(), "");
    assert_eq!(ssn(&["n1"]).to_guc(), "n1");
    assert_eq!(ssn(&["postgres-1"]).to_guc(), "\"postgres-1\"");
    assert_eq!(ssn(&["b", "a"]).to_guc(), "2 (a,b)");
    assert_eq!(ssn(&["first"]).to_guc(), "\"first\"");
    assert_eq!(SyncStandbyNames::placeholder().to_guc(), STRICT_PLACEHOLDER);
}

#[test]
fn sync_ssn_shrinks_only_after_a_cas_on_sync() {
    // The view says /sync = {n1} (it may be stale: our own write adding n2 may be missing).
    let mut fx = sync_leader(&[]);
    fx.obs.pg.sync_standby_names = ssn(&["n2"]);
    fx.obs.pg.replication = vec![row("n3", 1000, false)];
    let a = acts(&fx.decide());
    let cas = a
        .iter()
        .position(|x| {
            matches!(x, Action::WriteSync { expected_revision: Some(40), state }
                if state.standbys().is_empty())
        })
        .expect("CAS on /sync");
    let set = a
        .iter()
        .position(|x| *x == Action::SetSyncStandbyNames(ssn(&["n3"])))
        .expect("ssn change");
    assert!(cas < set);
}

#[test]
fn sync_holder_no_longer_in_sync_releases_instead_of_promoting() {
    let mut fx = Fx::replica("n2");
    fx.sync("n3", &[]);
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 10,
    });
    fx.obs.memory.promote_not_before = Some(fx.now);
    fx.obs.memory.was_holding = true;
    fx.obs.memory.guard_computed = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ReleasingLeaderKey);
    assert!(d.has(|a| *a == Action::ReleaseLeaderKey));
    assert!(!d.has(|a| *a == Action::Promote));
}
