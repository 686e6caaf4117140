//! Tests of the cluster module.
use super::*;

fn entry(suffix: &str, value: &str) -> RawEntry {
    RawEntry {
        suffix: suffix.into(),
        value: value.as_bytes().to_vec(),
        mod_revision: 7,
        lease: 42,
    }
}

#[test]
fn base_path_collapses_slashes() {
    assert_eq!(base_path("service", "demo"), "/service/demo");
    assert_eq!(base_path("/service/", "demo"), "/service/demo");
    assert_eq!(base_path("//a//", "/b/"), "/a/b");
}

#[test]
fn key_suffixes_round_trip_and_unknown_keys_are_ignored() {
    for k in [
        DcsKey::Leader,
        DcsKey::Member("n1".into()),
        DcsKey::Sync,
        DcsKey::LegacyOptime,
    ] {
        assert_eq!(DcsKey::from_suffix(&k.suffix()), Some(k));
    }
    assert_eq!(DcsKey::from_suffix("members/a/b"), None);
    assert_eq!(DcsKey::from_suffix("members/"), None);
    assert_eq!(DcsKey::from_suffix("something"), None);
}

#[test]
fn lsn_text_round_trip() {
    let l: Lsn = "16/B374D848".parse().unwrap();
    assert_eq!(l.0, 0x16_B374_D848);
    assert_eq!(l.to_string(), "16/B374D848");
    assert!("nope".parse::<Lsn>().is_err());
}

#[test]
fn patroni_member_json_parses_and_keeps_unknown_fields() {
    let json = r#"{"conn_url":"postgres://10.0.0.2:5432/postgres","api_url":"http://10.0.0.2:8008/patroni","state":"running","role":"replica","version":"4.1.4","xlog_location":67420024,"replay_lsn":67420024,"receive_lsn":67420024,"replication_state":"streaming","timeline":3,"tags":{"clonefrom":true,"nofailover":"true","dc":"east"},"proxy_url":"postgres://x:6432/postgres"}"#;
    let (view, rejected) = ClusterView::from_entries(&[entry("members/n2", json)]);
    assert!(rejected.is_empty());
    let m = &view.members["n2"].data;
    assert_eq!(m.role, "replica");
    assert_eq!(m.timeline, Some(3));
    assert!(m.tags.clonefrom && m.tags.nofailover);
    assert_eq!(m.tags.value_for_filter("dc").as_deref(), Some("east"));
    assert_eq!(m.other["proxy_url"], "postgres://x:6432/postgres");
    assert_eq!(m.conn_host_port(), Some(("10.0.0.2".into(), 5432)));
    let back: Value = serde_json::to_value(m).unwrap();
    assert_eq!(back["proxy_url"], "postgres://x:6432/postgres");
    assert_eq!(back["xlog_location"], 67420024);
}

#[test]
fn garbage_values_are_rejected_not_fatal() {
    let entries = [
        entry("members/bad", "{not json"),
        entry("members/arr", "[1,2]"),
        entry("members/good", r#"{"role":"primary","state":"running"}"#),
        entry("initialize", "abc"),
        entry("history", r#"[[1,"x"]]"#),
        entry("config", "42"),
        entry("leader", ""),
    ];
    let (view, rejected) = ClusterView::from_entries(&entries);
    assert_eq!(view.members.len(), 1);
    assert!(view.members["good"].data.is_primary_role());
    let keys: Vec<_> = rejected.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "members/bad",
            "members/arr",
            "initialize",
            "history",
            "config",
            "leader"
        ]
    );
    assert!(view.initialize.is_none() && view.config.is_none() && view.leader.is_none());
}

#[test]
fn initialize_in_progress_and_sysid() {
    let (v, _) = ClusterView::from_entries(&[entry("initialize", "")]);
    assert_eq!(v.initialize, Some(Initialize::InProgress));
    let (v, _) = ClusterView::from_entries(&[entry("initialize", "7301234567890123456")]);
    assert_eq!(
        v.initialize,
        Some(Initialize::SystemId("7301234567890123456".into()))
    );
}

#[test]
fn history_and_status_formats() {
    let h = r#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57.123+02:00","node2"],[2,30000000,"x"]]"#;
    let (v, r) = ClusterView::from_entries(&[
        entry("history", h),
        entry("status", r#"{"optime":99,"slots":"{\"n1\":5}"}"#),
    ]);
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(v.history_timeline(), Some(3));
    assert_eq!(
        v.history.as_ref().unwrap()[0].new_leader.as_deref(),
        Some("node2")
    );
    assert_eq!(history_to_json(v.history.as_ref().unwrap()), h);
    assert_eq!(v.status.optime, Some(Lsn(99)));
    assert_eq!(v.status.slots["n1"], Lsn(5));
    let (v, _) = ClusterView::from_entries(&[entry("history", "[]")]);
    assert_eq!(v.history_timeline(), Some(1));
}

#[test]
fn legacy_optime_only_when_status_absent() {
    let (v, _) = ClusterView::from_entries(&[entry("optime/leader", "123")]);
    assert_eq!(v.status.optime, Some(Lsn(123)));
    let (v, _) = ClusterView::from_entries(&[
        entry("optime/leader", "123"),
        entry("status", "{\"optime\":5}"),
    ]);
    assert_eq!(v.status.optime, Some(Lsn(5)));
}

#[test]
fn failover_forms() {
    let (v, _) = ClusterView::from_entries(&[entry("failover", "{}")]);
    assert!(v.pending_failover().is_none());
    let (v, _) = ClusterView::from_entries(&[entry("failover", r#"{"leader":"a","member":"b"}"#)]);
    assert_eq!(v.pending_failover().unwrap().member.as_deref(), Some("b"));
    let (v, _) = ClusterView::from_entries(&[entry("failover", "a:b")]);
    assert_eq!(v.pending_failover().unwrap().leader.as_deref(), Some("a"));
}

#[test]
fn sync_state_membership_is_case_insensitive_and_sorted() {
    let s = SyncState::new("n0", vec!["n2".into(), "n1".into()], 0);
    assert_eq!(s.sync_standby.as_deref(), Some("n1,n2"));
    assert!(s.contains("N1") && s.contains("n0") && !s.contains("n3"));
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(json, r#"{"leader":"n0","sync_standby":"n1,n2","quorum":0}"#);
}
