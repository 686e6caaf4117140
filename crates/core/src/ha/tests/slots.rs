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
