//! Replication slots.

use super::*;

#[test]
fn slot_names_follow_patroni() {
    assert_eq!(slot_name("Node-1.a"), "node_1_a");
    assert_eq!(slot_name("n1"), "n1");
    assert_eq!(slot_name("ü"), "u0252");
    assert_eq!(slot_name(&"x".repeat(70)).len(), 63);
}

#[test]
fn leader_creates_member_slots_and_drops_unknown() {
    let mut fx = Fx::leader();
    fx.obs.pg.slots = ["n2", "old"].iter().map(|s| s.to_string()).collect();
    let d = fx.decide();
    assert!(d.has(|a| *a == Action::CreateSlots(vec!["n3".into()])));
    assert!(d.has(|a| *a == Action::DropSlots(vec!["old".into()])));
}

#[test]
fn nostream_and_cascading_members_get_no_leader_slot() {
    let mut fx = Fx::leader();
    fx.member("n2").tags.nostream = true;
    fx.member("n3").tags.replicatefrom = Some("n2".into());
    let d = fx.decide();
    assert!(d.has(|a| *a == Action::DropSlots(vec!["n2".into(), "n3".into()])));
}

#[test]
fn permanent_slots_kept() {
    let mut fx = Fx::leader();
    fx.cfg.permanent_slots.insert("archiver".into());
    fx.obs.pg.slots.insert("archiver".into());
    let d = fx.decide();
    assert!(!d.has(|a| matches!(a, Action::DropSlots(_) | Action::CreateSlots(_))));
}

#[test]
fn departed_member_slot_kept_for_member_slots_ttl() {
    let mut fx = Fx::leader();
    fx.cfg.member_slots_ttl = Millis::from_secs(30);
    fx.view.members.remove("n3");
    assert!(!fx.decide().has(|a| matches!(a, Action::DropSlots(_))));
    fx.obs
        .memory
        .members_seen
        .insert("n3".into(), fx.now - fx.cfg.member_slots_ttl - Millis(1));
    assert!(
        fx.decide()
            .has(|a| *a == Action::DropSlots(vec!["n3".into()]))
    );
}

#[test]
fn replica_creates_cascade_slots() {
    let mut fx = Fx::replica("n2");
    fx.member("n3").tags.replicatefrom = Some("n2".into());
    assert!(
        fx.decide()
            .has(|a| *a == Action::CreateSlots(vec!["n3".into()]))
    );
}

#[test]
fn no_slots_without_use_slots() {
    let mut fx = Fx::leader();
    fx.cfg.use_slots = false;
    fx.obs.pg.slots.clear();
    assert!(!fx.decide().has(|a| matches!(a, Action::CreateSlots(_))));
}

fn cdc() -> (String, LogicalSlotSpec) {
    (
        "cdc".into(),
        LogicalSlotSpec {
            database: "app".into(),
            plugin: "pgoutput".into(),
        },
    )
}

fn logical(database: &str, plugin: &str, confirmed: u64) -> LogicalSlotState {
    LogicalSlotState {
        database: database.into(),
        plugin: plugin.into(),
        confirmed_flush: Lsn(confirmed),
    }
}

#[test]
fn leader_creates_permanent_logical_slots_and_publishes_their_position() {
    let mut fx = Fx::leader();
    fx.cfg.logical_slots.extend([cdc()]);
    fx.obs
        .pg
        .logical_slots
        .insert("someone_elses".into(), logical("app", "wal2json", 5));
    let d = fx.decide();
    assert!(d.has(|a| *a
        == Action::CreateLogicalSlot {
            name: "cdc".into(),
            database: "app".into(),
            plugin: "pgoutput".into()
        }));
    // A logical slot pgkeep was not told about is never dropped.
    assert!(!d.has(|a| matches!(a, Action::DropSlots(v) if v.contains(&"someone_elses".into()))));
    fx.obs
        .pg
        .logical_slots
        .insert("cdc".into(), logical("app", "pgoutput", 700));
    let d = fx.decide();
    assert!(!d.has(|a| matches!(a, Action::CreateLogicalSlot { .. })));
    assert!(d.has(|a| matches!(a, Action::WriteStatus(s) if s.slots.get("cdc") == Some(&Lsn(700)) && !s.slots.contains_key("someone_elses"))));
}

#[test]
fn leader_recreates_a_logical_slot_whose_plugin_changed() {
    let mut fx = Fx::leader();
    fx.cfg.logical_slots.extend([cdc()]);
    fx.obs
        .pg
        .logical_slots
        .insert("cdc".into(), logical("app", "test_decoding", 700));
    assert!(
        fx.decide()
            .has(|a| *a == Action::DropSlots(vec!["cdc".into()]))
    );
}

#[test]
fn replica_copies_a_missing_logical_slot_then_advances_it_up_to_replay() {
    let mut fx = Fx::replica("n2");
    fx.cfg.logical_slots.extend([cdc()]);
    let d = fx.decide();
    // The leader has not published the slot yet: nothing to copy.
    assert!(!d.has(|a| matches!(a, Action::CopyLogicalSlots { .. })));
    fx.view.status.slots.insert("cdc".into(), Lsn(900));
    assert!(fx.decide().has(|a| *a
        == Action::CopyLogicalSlots {
            from: "n1".into(),
            names: vec!["cdc".into()]
        }));
    fx.obs
        .pg
        .logical_slots
        .insert("cdc".into(), logical("app", "pgoutput", 400));
    fx.obs.pg.replay_lsn = Some(Lsn(800));
    let d = fx.decide();
    assert!(!d.has(|a| matches!(a, Action::CopyLogicalSlots { .. })));
    assert!(d.has(|a| *a
        == Action::AdvanceSlots(vec![SlotAdvance {
            name: "cdc".into(),
            database: "app".into(),
            lsn: Lsn(800)
        }])));
    // A copy already at (or past) the target is left alone.
    fx.obs.pg.replay_lsn = Some(Lsn(2000));
    fx.obs
        .pg
        .logical_slots
        .insert("cdc".into(), logical("app", "pgoutput", 950));
    assert!(!fx.decide().has(|a| matches!(a, Action::AdvanceSlots(_))));
}

#[test]
fn no_logical_copies_on_nofailover_paused_or_diverged_replicas() {
    let mut fx = Fx::replica("n2");
    fx.cfg.logical_slots.extend([cdc()]);
    fx.view.status.slots.insert("cdc".into(), Lsn(900));
    fx.obs.tags.nofailover = true;
    assert!(
        !fx.decide()
            .has(|a| matches!(a, Action::CopyLogicalSlots { .. }))
    );
    fx.obs.tags.nofailover = false;
    fx.cfg.pause = true;
    assert!(
        !fx.decide()
            .has(|a| matches!(a, Action::CopyLogicalSlots { .. }))
    );
    fx.cfg.pause = false;
    // Not streaming and on another timeline than the leader: the history decides first.
    fx.obs.pg.streaming = false;
    fx.obs.pg.timeline = Some(3);
    fx.obs.pg.wal_position = Lsn(5000);
    assert!(
        !fx.decide()
            .has(|a| matches!(a, Action::CopyLogicalSlots { .. }))
    );
}
