//! Bootstrap, cloning, system identifier.

use super::*;

fn empty(me: &str) -> Fx {
    let mut fx = Fx::replica(me);
    fx.obs.pg = PgObservation::default();
    fx.obs.ever_joined = false;
    fx
}

fn fresh_cluster(me: &str) -> Fx {
    let mut fx = empty(me);
    fx.view = ClusterView::default();
    fx.obs.bootstrap_allowed = true;
    fx
}

#[test]
fn bootstrap_claims_initialize_first() {
    let d = fresh_cluster("n1").decide();
    assert_eq!(d.reason, Reason::ClaimingInitialize);
    assert_eq!(acts(&d), vec![Action::ClaimInitialize]);
    assert_eq!(d.state, MemberState::Bootstrapping);
}

#[test]
fn initdb_only_after_winning_initialize() {
    let mut fx = fresh_cluster("n1");
    fx.view.initialize = Some(Initialize::InProgress);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::BootstrapInProgressElsewhere);
    assert!(!d.has(|a| *a == Action::Initdb));
    fx.obs.dcs.initialize_claimed = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::RunningInitdb);
    assert_eq!(acts(&d), vec![Action::Initdb]);
}

#[test]
fn bootstrap_needs_first_start_marker() {
    let mut fx = fresh_cluster("n1");
    fx.obs.bootstrap_allowed = false;
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::WaitingForData(WaitingForData::NoBootstrapMarker)
    );
    assert!(acts(&d).is_empty());
}

#[test]
fn node_that_ever_joined_never_runs_initdb() {
    let mut fx = fresh_cluster("n1");
    fx.obs.ever_joined = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::WaitingForData(WaitingForData::EverJoined));
    assert!(!d.has(|a| matches!(a, Action::ClaimInitialize | Action::Initdb)));
}

#[test]
fn nofailover_node_does_not_bootstrap() {
    let mut fx = fresh_cluster("n1");
    fx.obs.tags.nofailover = true;
    assert_eq!(
        fx.decide().reason,
        Reason::WaitingForData(WaitingForData::NoFailoverTag)
    );
}

#[test]
fn initialised_cluster_is_never_initdb_even_with_the_marker() {
    let mut fx = empty("n2");
    fx.obs.bootstrap_allowed = true;
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::CloningReplica {
            source: "n1".into()
        }
    );
    assert_eq!(
        acts(&d),
        vec![Action::Clone {
            source: "n1".into(),
            wipe: false
        }]
    );
    // Even with no leader: wait, never initdb.
    fx.view.leader = None;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::WaitingForData(WaitingForData::NoSource));
}

#[test]
fn empty_node_restores_from_the_repository_when_nobody_leads_for_a_ttl() {
    let mut fx = empty("n2");
    fx.obs.backup_repository = true;
    // A running leader is still the source: the shell tries the repository first itself.
    assert!(fx.decide().has(|a| matches!(a, Action::Clone { .. })));
    // No leader: first a TTL of grace, then the restore.
    fx.view.leader = None;
    fx.obs.memory.leader_absent_since = Some(fx.now);
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::WaitingForData(WaitingForData::LeaderAbsentGrace)
    );
    assert!(acts(&d).is_empty());
    fx.now = fx.now + fx.cfg.ttl;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::RestoringFromRepository);
    assert_eq!(d.state, MemberState::Cloning);
    assert_eq!(acts(&d), vec![Action::RestoreReplica { wipe: false }]);
    // Without the option the node waits for a member to copy.
    fx.obs.backup_repository = false;
    assert_eq!(
        fx.decide().reason,
        Reason::WaitingForData(WaitingForData::NoSource)
    );
    fx.obs.backup_repository = true;
    // Never without the DCS.
    fx.obs.dcs.reachable = false;
    assert!(
        !fx.decide()
            .has(|a| matches!(a, Action::RestoreReplica { .. }))
    );
    fx.obs.dcs.reachable = true;
    // Never over a data directory it does not recognise, unless its own restore stopped half
    // way.
    fx.obs.pg.data_dir = DataDir::Invalid;
    assert_eq!(
        fx.decide().reason,
        Reason::WaitingForData(WaitingForData::UnrecognisedData)
    );
    fx.obs.restore_interrupted = true;
    assert_eq!(
        acts(&fx.decide()),
        vec![Action::RestoreReplica { wipe: true }]
    );
    // Never in synchronous mode.
    fx.sync("n1", &["n2"]);
    fx.view.leader = None;
    assert_eq!(
        fx.decide().reason,
        Reason::WaitingForData(WaitingForData::SynchronousMode)
    );
    // A leader key whose member is not running yet (starting) is waited for.
    let mut fx = empty("n2");
    fx.obs.backup_repository = true;
    fx.member("n1").state = "starting".into();
    assert_eq!(
        fx.decide().reason,
        Reason::WaitingForData(WaitingForData::NoSource)
    );
    // Never before the cluster exists: a repository is no reason to skip the bootstrap race.
    let mut fx = fresh_cluster("n1");
    fx.obs.backup_repository = true;
    assert!(
        !fx.decide()
            .has(|a| matches!(a, Action::RestoreReplica { .. }))
    );
}

#[test]
fn empty_node_clones_from_clonefrom_member_first() {
    let mut fx = empty("n2");
    fx.member("n3").tags.clonefrom = true;
    assert!(fx.decide().has(|a| *a
        == Action::Clone {
            source: "n3".into(),
            wipe: false
        }));
}

#[test]
fn invalid_data_directory_is_wiped_by_the_clone() {
    let mut fx = empty("n2");
    fx.obs.pg.data_dir = DataDir::Invalid;
    assert!(fx.decide().has(|a| *a
        == Action::Clone {
            source: "n1".into(),
            wipe: true
        }));
}

#[test]
fn bootstrap_winner_confirms_initialize_then_takes_key_and_starts_primary() {
    let mut fx = fresh_cluster("n1");
    fx.view.initialize = Some(Initialize::InProgress);
    fx.obs.dcs.initialize_claimed = true;
    let d = fx.decide();
    assert!(d.has(|a| *a == Action::Initdb));
    fx.obs.memory = d.memory;
    fx.obs.initdb_unconfirmed = true;
    fx.obs.pg.data_dir = DataDir::Initialised {
        system_id: SYSID.into(),
    };
    // initdb done: the system id becomes the cluster's (CAS on our own claim) first.
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ConfirmingInitialize);
    assert_eq!(
        acts(&d),
        vec![Action::ConfirmInitialize {
            system_id: SYSID.into()
        }]
    );
    fx.view.initialize = Some(Initialize::SystemId(SYSID.into()));
    fx.obs.dcs.initialize_claimed = false;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::BootstrapTakingLeadership);
    assert_eq!(acts(&d), vec![Action::AcquireLeaderKey]);
    // With the key: start as primary.
    fx.obs.memory = d.memory;
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 3,
    });
    fx.obs.dcs.view_revision = 2;
    let d = fx.decide();
    assert!(d.has(|a| *a
        == Action::Start {
            role: StartRole::Primary
        }));
}

#[test]
fn bootstrap_lost_to_another_cluster_reclones() {
    let mut fx = Fx::replica("n2");
    fx.obs.ever_joined = false;
    fx.obs.pg = PgObservation {
        data_dir: DataDir::Initialised {
            system_id: "7311111111111111111".into(),
        },
        ..PgObservation::default()
    };
    fx.obs.initdb_unconfirmed = true;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::BootstrapLost);
    assert_eq!(
        acts(&d),
        vec![Action::Clone {
            source: "n1".into(),
            wipe: true
        }]
    );
    // Without the marker of our own initdb, a foreign data directory is never wiped.
    fx.obs.initdb_unconfirmed = false;
    assert_eq!(fx.decide().state, MemberState::Halted);
}

#[test]
fn system_id_mismatch_halts() {
    let mut fx = Fx::replica("n2");
    fx.obs.pg.data_dir = DataDir::Initialised {
        system_id: "7399999999999999999".into(),
    };
    let d = fx.decide();
    assert_eq!(d.state, MemberState::Halted);
    assert!(matches!(d.reason, Reason::SystemIdMismatch { .. }));
    assert!(acts(&d).is_empty());
}

#[test]
fn persist_joined_once_running_in_cluster() {
    let mut fx = Fx::replica("n2");
    fx.obs.ever_joined = false;
    assert!(fx.decide().has(|a| *a == Action::PersistJoined));
    fx.obs.ever_joined = true;
    assert!(!fx.decide().has(|a| *a == Action::PersistJoined));
}

#[test]
fn node_with_data_publishes_missing_initialize() {
    let mut fx = Fx::leaderless("n2");
    fx.view.initialize = None;
    assert_eq!(
        acts(&fx.decide())[0],
        Action::WriteInitialize {
            system_id: SYSID.into(),
            create_only: true
        }
    );
}

#[test]
fn expired_bootstrap_claim_is_made_again() {
    let mut fx = fresh_cluster("n1");
    fx.obs.initdb_unconfirmed = true;
    fx.obs.pg.data_dir = DataDir::Initialised {
        system_id: SYSID.into(),
    };
    let d = fx.decide();
    assert_eq!(d.reason, Reason::ClaimingInitialize);
    assert_eq!(acts(&d), vec![Action::ClaimInitialize]);
}
