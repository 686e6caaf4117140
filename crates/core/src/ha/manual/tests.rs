//! Tests of the manual switchover/failover validation.
use super::*;
use crate::cluster::RawEntry;
use ManualKind::{Failover as FO, Switchover as SW};

const NOW: i64 = 1_784_894_400_000; // 2026-07-24T12:00:00Z

fn entry(suffix: &str, value: &str, rev: i64) -> RawEntry {
    let value = value.as_bytes().to_vec();
    let suffix = suffix.into();
    RawEntry {
        suffix,
        value,
        mod_revision: rev,
        lease: 0,
    }
}

fn member(name: &str, role: &str, state: &str, extra: &str) -> RawEntry {
    let json = format!(
        r#"{{"api_url":"https://{name}:8008/patroni","state":"{state}","role":"{role}"{extra}}}"#
    );
    entry(&format!("members/{name}"), &json, 5)
}

/// node1 leads, node2 and node3 are running replicas; `extra` entries added (or replacing).
fn view_with(extra: Vec<RawEntry>) -> ClusterView {
    let mut e = vec![
        entry("leader", "node1", 10),
        entry("config", r#"{"loop_wait":10}"#, 2),
        member("node1", "primary", "running", ""),
        member("node2", "replica", "running", ""),
        member("node3", "replica", "running", ""),
    ];
    e.extend(extra);
    let (v, rejected) = ClusterView::from_entries(&e);
    assert!(rejected.is_empty(), "{rejected:?}");
    v
}

fn view() -> ClusterView {
    view_with(Vec::new())
}

/// A request body from JSON.
fn b(json: &str) -> RequestBody {
    RequestBody::from_json(json.as_bytes()).unwrap()
}

fn check(kind: ManualKind, json: &str, v: &ClusterView) -> Result<Accepted, Refusal> {
    check_request(kind, &b(json), v, NOW, false)
}

/// Asserts every refusal of a table against `v`. One case a line:
/// `kind paused? | status | body | text` (`kind` is `SW` or `FO`, `paused?` is `P` or `-`).
fn refusals(v: &ClusterView, table: &str) {
    for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split(" | ").collect();
        let [head, status, json, text] = cols[..] else {
            panic!("bad case {line:?}");
        };
        let (kind, paused) = match head {
            "SW -" => (SW, false),
            "SW P" => (SW, true),
            "FO -" => (FO, false),
            _ => panic!("bad case {line:?}"),
        };
        let r = check_request(kind, &b(json), v, NOW, paused).expect_err(line);
        assert_eq!(r.status.to_string(), status, "{line}");
        assert_eq!(r.message, text, "{line}");
    }
}

#[test]
fn bodies() {
    let body = |l: Option<&str>, c: Option<&str>, at: Option<&str>| RequestBody {
        leader: l.map(String::from),
        candidate: c.map(String::from),
        scheduled_at: at.map(String::from),
    };
    assert_eq!(
        b(r#"{"leader":"a","member":"b"}"#),
        body(Some("a"), Some("b"), None)
    );
    let same = r#"{"candidate":"b","member":"b","scheduled_at":null}"#;
    assert_eq!(b(same), body(None, Some("b"), None));
    assert_eq!(
        b(r#"{"leader":"","candidate":"c"}"#),
        body(None, Some("c"), None)
    );
    assert_eq!(b("{}"), RequestBody::default());
    let full = body(Some("a"), Some("b"), Some("2026-07-24T12:00:00Z"));
    assert_eq!(b(&full.to_json()), full);
    let long = format!(r#"{{"candidate":"{}"}}"#, "x".repeat(MAX_NAME_LEN + 1));
    let err = |json: &str| RequestBody::from_json(json.as_bytes()).unwrap_err();
    assert!(matches!(err("{nope"), BodyError::InvalidJson(_)));
    assert!(matches!(err(""), BodyError::InvalidJson(_)));
    assert_eq!(err("[1]"), BodyError::NotAnObject);
    let unknown = BodyError::UnknownKey("force".into());
    assert_eq!(err(r#"{"leader":"a","force":true}"#), unknown);
    assert_eq!(
        err(r#"{"leader":1}"#),
        BodyError::NotAString("leader".into())
    );
    assert_eq!(
        err(r#"{"candidate":"a","member":"b"}"#),
        BodyError::Conflicting
    );
    assert_eq!(
        err(r#"{"leader":"a\nb"}"#),
        BodyError::BadName("leader".into())
    );
    assert_eq!(err(&long), BodyError::BadName("candidate".into()));
}

#[test]
fn refusals_in_patronis_order() {
    // A failover naming a leader is still refused for its schedule (line 4), as in Patroni;
    // a manual failover to the lock holder itself is pointless (last line).
    refusals(
        &view(),
        r#"
        FO - | 400 | {"leader":"node1"} | Failover could be performed only to a specific candidate
        SW - | 400 | {"candidate":"node2"} | Switchover could be performed only from a specific leader
        FO - | 400 | {"candidate":"node2","scheduled_at":"2026-07-24T13:00:00Z"} | Failover can't be scheduled
        FO - | 400 | {"leader":"node1","candidate":"node2","scheduled_at":"2026-07-24T13:00:00Z"} | Failover can't be scheduled
        SW P | 400 | {"leader":"node1","candidate":"node2","scheduled_at":"2026-07-24T13:00:00Z"} | Can't schedule switchover in the paused state
        SW - | 422 | {"leader":"node1","scheduled_at":"tomorrow"} | Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601
        SW - | 400 | {"leader":"node1","scheduled_at":"2026-07-24T13:00:00"} | Timezone information is mandatory for the scheduled switchover
        SW - | 422 | {"leader":"node1","scheduled_at":"2026-07-24T11:59:59Z"} | Cannot schedule switchover in the past
        SW P | 400 | {"leader":"node1"} | Switchover is possible only to a specific candidate in a paused state
        SW - | 400 | {"leader":"node1","candidate":"node1"} | Switchover target and source are the same
        FO - | 400 | {"leader":"node1","candidate":"node1"} | Switchover target and source are the same
        SW - | 412 | {"leader":"node2"} | leader name does not match
        SW - | 412 | {"leader":"node1","candidate":"node9"} | candidate does not exists
        FO - | 412 | {"candidate":"node1"} | failover is not possible: no good candidates have been found
        "#,
    );
    let paused = b(r#"{"leader":"node1","candidate":"node2"}"#);
    assert!(check_request(SW, &paused, &view(), NOW, true).is_ok());
    let mut no_leader = view();
    no_leader.leader = None;
    refusals(
        &no_leader,
        r#"SW - | 412 | {"leader":"node1"} | leader name does not match"#,
    );
}

#[test]
fn scheduled_requests_skip_feasibility() {
    // The leader checks when it is due; here "ghost" is not even a member.
    let json = r#"{"leader":"ghost","scheduled_at":"2026-07-24T14:00:00+02:00"}"#;
    let a = check(SW, json, &view()).unwrap();
    assert!(a.is_scheduled());
    assert_eq!(a.scheduled_at_unix_ms, Some(NOW));
    let want = FailoverRequest {
        leader: Some("ghost".into()),
        member: None,
        scheduled_at: Some("2026-07-24T12:00:00.000+00:00".into()),
    };
    assert_eq!(a.request, want);
    assert_eq!(a.scheduled_message(), "Switchover scheduled");
    assert!(has_zone("2026-07-24 13:00-0100"));
    assert!(has_zone("2026-07-24T13:00:00.5z"));
    assert!(!has_zone("2026-07-24T13:00:00.5"));
}

#[test]
fn failover_with_a_leader_is_a_switchover() {
    let a = check(FO, r#"{"leader":"node1","candidate":"node2"}"#, &view()).unwrap();
    assert_eq!(a.kind, SW);
    assert_eq!(a.request.leader.as_deref(), Some("node1"));
    let a = check(FO, r#"{"candidate":"node2"}"#, &view()).unwrap();
    assert_eq!(a.kind, FO);
    let want = FailoverRequest {
        member: Some("node2".into()),
        ..FailoverRequest::default()
    };
    assert_eq!(a.request, want);
    assert_eq!(a.current_leader.as_deref(), Some("node1"));
    assert!(!a.is_scheduled());
}

#[test]
fn candidates_must_be_fit() {
    let v = view_with(vec![
        member("node4", "replica", "stopped", ""),
        member(
            "node5",
            "replica",
            "running",
            r#","tags":{"nofailover":true}"#,
        ),
        member(
            "node6",
            "replica",
            "running",
            r#","tags":{"failover_priority":0}"#,
        ),
    ]);
    refusals(
        &v,
        r#"
        SW - | 412 | {"leader":"node1","candidate":"node4"} | switchover is not possible: no good candidates have been found
        SW - | 412 | {"leader":"node1","candidate":"node5"} | switchover is not possible: no good candidates have been found
        FO - | 412 | {"candidate":"node6"} | failover is not possible: no good candidates have been found
        "#,
    );
    let mut only_leader = view();
    only_leader.members.retain(|n, _| n == "node1");
    refusals(
        &only_leader,
        r#"SW - | 412 | {"leader":"node1"} | switchover is not possible: cluster does not have members except leader"#,
    );
    let unfit = view_with(vec![
        member("node2", "replica", "starting", ""),
        member(
            "node3",
            "replica",
            "running",
            r#","tags":{"nofailover":"true"}"#,
        ),
    ]);
    refusals(
        &unfit,
        r#"SW - | 412 | {"leader":"node1"} | switchover is not possible: no good candidates have been found"#,
    );
    let a = check(SW, r#"{"leader":"node1"}"#, &view()).unwrap();
    let want = FailoverRequest {
        leader: Some("node1".into()),
        ..FailoverRequest::default()
    };
    assert_eq!(a.request, want);
}

#[test]
fn synchronous_mode() {
    let sync = |value: &str| {
        view_with(vec![
            entry("config", r#"{"synchronous_mode":"on"}"#, 2),
            entry("sync", value, 4),
        ])
    };
    let v = sync(r#"{"leader":"node1","sync_standby":"node2"}"#);
    assert!(sync_active(&v));
    refusals(
        &v,
        r#"SW - | 412 | {"leader":"node1","candidate":"node3"} | candidate name does not match with sync_standby"#,
    );
    assert!(check(SW, r#"{"leader":"node1","candidate":"node2"}"#, &v).is_ok());
    assert!(check(SW, r#"{"leader":"node1"}"#, &v).is_ok());
    // A manual failover may go to an asynchronous member.
    assert!(check(FO, r#"{"candidate":"node3"}"#, &v).is_ok());
    refusals(
        &sync(r#"{"leader":"node1"}"#),
        r#"SW - | 412 | {"leader":"node1"} | switchover is not possible: can not find sync_standby"#,
    );
    // Configured but not active yet (no owner of /sync): no restriction.
    let inactive = sync(r#"{"leader":null}"#);
    assert!(!sync_active(&inactive));
    assert!(check(SW, r#"{"leader":"node1","candidate":"node3"}"#, &inactive).is_ok());
    // Quorum mode is not supported: asynchronous.
    let quorum = view_with(vec![
        entry("config", r#"{"synchronous_mode":"quorum"}"#, 2),
        entry("sync", r#"{"leader":"node1","sync_standby":"node2"}"#, 4),
    ]);
    assert!(!sync_active(&quorum));
}

#[test]
fn outcomes() {
    let v = view();
    let sw = check(SW, r#"{"leader":"node1","candidate":"node2"}"#, &v).unwrap();
    let fo = check(FO, r#"{"candidate":"node2"}"#, &v).unwrap();
    let any = check(SW, r#"{"leader":"node1"}"#, &v).unwrap();
    let written = 20;
    let pending = || entry("failover", r#"{"leader":"node1","member":"node2"}"#, 20);
    let says = |code: u16, text: &str| Some((code, text.to_owned()));
    // Our write not seen yet, or seen and pending: keep waiting.
    assert_eq!(outcome(&sw, &v, written), None);
    assert_eq!(outcome(&sw, &view_with(vec![pending()]), written), None);
    // Cleared without a leader change.
    let cleared = view_with(vec![entry("failover", "{}", 21)]);
    assert_eq!(
        outcome(&sw, &cleared, written),
        says(503, "Switchover failed")
    );
    assert_eq!(
        outcome(&fo, &cleared, written),
        says(503, "Failover failed")
    );
    // Leader key gone, nobody took it yet: keep waiting.
    let mut gone = view_with(vec![pending(), entry("members/node2", "{}", 22)]);
    gone.leader = None;
    assert_eq!(outcome(&sw, &gone, written), None);
    // The candidate holds the key but has not promoted (it may still give the key back, as
    // after a failed pre_promote): keep waiting.
    let holding = view_with(vec![pending(), entry("leader", "node2", 30)]);
    assert_eq!(outcome(&sw, &holding, written), None);
    // The request cleared, the key still with node2 but no primary shown yet: still waiting
    // (a new leader clears the request in the cycle that first publishes it as primary).
    let cleared_by_2 = view_with(vec![
        entry("failover", "{}", 31),
        entry("leader", "node2", 30),
    ]);
    assert_eq!(outcome(&sw, &cleared_by_2, written), None);
    // node2 gave the key back without promoting: the switchover failed.
    let mut gave_up = view_with(vec![entry("failover", "{}", 32)]);
    gave_up.leader = None;
    assert_eq!(
        outcome(&sw, &gave_up, written),
        says(503, "Switchover failed")
    );
    // A new leader running as primary.
    let node2 = view_with(vec![
        entry("leader", "node2", 30),
        member("node2", "primary", "running", ""),
    ]);
    let to2 = "Successfully switched over to \"node2\"";
    assert_eq!(outcome(&sw, &node2, written), says(200, to2));
    assert_eq!(outcome(&any, &node2, written), says(200, to2));
    let fo2 = "Successfully failed over to \"node2\"";
    assert_eq!(outcome(&fo, &node2, written), says(200, fo2));
    let node3 = view_with(vec![
        entry("leader", "node3", 30),
        member("node3", "master", "running", ""),
    ]);
    let sw3 = "Switched over to \"node3\" instead of \"node2\"";
    assert_eq!(outcome(&sw, &node3, written), says(200, sw3));
    let fo3 = "Failed over to \"node3\" instead of \"node2\"";
    assert_eq!(outcome(&fo, &node3, written), says(200, fo3));
    let unknown = "Switchover status unknown after 20 seconds; operation may still be in progress";
    assert_eq!(timed_out(SW, 20), (503, unknown.to_owned()));
}

#[test]
fn wait_budget_and_revisions() {
    assert_eq!(wait_secs(&view()), 20);
    assert_eq!(wait_secs(&ClusterView::default()), 20);
    let lw = |v: &str| wait_secs(&view_with(vec![entry("config", v, 2)]));
    assert_eq!(lw(r#"{"loop_wait":"30"}"#), 60);
    assert_eq!(lw(r#"{"loop_wait":2}"#), 20);
    assert_eq!(view_revision(&view()), 10);
    assert_eq!(view_revision(&ClusterView::default()), 0);
}
