//! Table tests of the health rules, one per rule.
use super::*;
use serde_json::Value;

const MB: u64 = 1 << 20;

fn leader() -> NodeHealth {
    NodeHealth {
        holds_lease: true,
        pg_running: true,
        pg_role: PgRole::Primary,
        dcs_view_fresh: true,
        loop_healthy: true,
        cluster_optime: Some(Lsn(100 * MB)),
        maximum_lag_on_failover: MB,
        ..Default::default()
    }
}

fn replica() -> NodeHealth {
    NodeHealth {
        holds_lease: false,
        pg_running: true,
        pg_role: PgRole::Replica,
        replication_state: Some("streaming".into()),
        received_lsn: Some(Lsn(100 * MB)),
        replayed_lsn: Some(Lsn(100 * MB)),
        latest_end_lsn: Some(Lsn(100 * MB)),
        cluster_optime: Some(Lsn(100 * MB)),
        dcs_view_fresh: true,
        loop_healthy: true,
        maximum_lag_on_failover: MB,
        ..Default::default()
    }
}

fn q(raw: &str) -> HealthQuery {
    HealthQuery::parse(Some(raw)).expect("valid query")
}

fn code(path: &str, node: &NodeHealth, query: &str) -> u16 {
    check(path, node, &q(query)).status_code()
}

/// Runs a table of (path, query, expected code) against one node.
fn table(node: &NodeHealth, rows: &[(&str, &str, u16)]) {
    for (path, query, want) in rows {
        assert_eq!(
            code(path, node, query),
            *want,
            "{path}?{query} on {node:#?}"
        );
    }
}

#[test]
fn health_leader_paths_follow_the_lock() {
    table(
        &leader(),
        &[
            ("/", "", 200),
            ("/primary", "", 200),
            ("/master", "", 200),
            ("/read-write", "", 200),
            ("/leader", "", 200),
            ("/standby-leader", "", 503),
            ("/standby_leader", "", 503),
            ("/replica", "", 503),
            ("/read-only", "", 200),
            ("/health", "", 200),
            ("/async", "", 503),
            ("/read-only-sync", "", 200),
            ("/read-only-quorum", "", 200),
            ("/unknown", "", 503),
        ],
    );
}

#[test]
fn health_primary_needs_the_lease_not_the_role() {
    // Lease passed: PostgreSQL still runs as primary, but the lock is not ours any more.
    let mut n = leader();
    n.holds_lease = false;
    table(
        &n,
        &[
            ("/primary", "", 503),
            ("/leader", "", 503),
            ("/", "", 503),
            ("/read-only", "", 503),
            ("/health", "", 200),
        ],
    );
    // Just won the race, still in recovery while promoting: the lock decides.
    let mut n = replica();
    n.holds_lease = true;
    table(&n, &[("/primary", "", 200), ("/leader", "", 200)]);
}

#[test]
fn health_replica_paths() {
    table(
        &replica(),
        &[
            ("/", "", 503),
            ("/primary", "", 503),
            ("/leader", "", 503),
            ("/replica", "", 200),
            ("/read-only", "", 200),
            ("/health", "", 200),
            ("/async", "", 200),
            ("/asynchronous", "", 200),
            ("/sync", "", 503),
            ("/quorum", "", 503),
            ("/read-only-sync", "", 503),
        ],
    );
}

#[test]
fn health_paths_match_by_substring_in_patroni_order() {
    let r = replica();
    // "replica" anywhere in the path; "leader" wins over "replica".
    table(
        &r,
        &[
            ("/replica-dc1", "", 200),
            ("/x/replica", "", 200),
            ("/replica-leader", "", 503),
            ("/healthz", "", 200),
            ("/read-only-whatever", "", 200),
        ],
    );
    let l = leader();
    table(
        &l,
        &[
            ("/primary-or-replica", "", 200),
            ("/standby-leader-x", "", 503),
            ("/my-leader", "", 200),
        ],
    );
}

#[test]
fn health_replica_not_ok_when_stopped_noloadbalance_or_wrong_role() {
    let mut n = replica();
    n.pg_running = false;
    table(&n, &[("/replica", "", 503), ("/health", "", 503)]);
    let mut n = replica();
    n.tags.noloadbalance = true;
    table(&n, &[("/replica", "", 503), ("/read-only", "", 503)]);
    let mut n = replica();
    n.pg_role = PgRole::Other;
    table(&n, &[("/replica", "", 503)]);
}

#[test]
fn health_lag_filter_against_cluster_optime_and_latest_end_lsn() {
    let mut n = replica();
    n.replayed_lsn = Some(Lsn(100 * MB - 2 * MB));
    table(
        &n,
        &[
            ("/replica", "", 200),
            ("/replica", "lag=1MB", 503),
            ("/replica", "lag=2MB", 200),
            ("/replica", "lag=3145728", 200),
            ("/replica", "lag=1048576", 503),
            ("/read-only", "lag=1MB", 503),
            ("/async", "lag=1MB", 503),
        ],
    );
    // A stale DCS view: only latest_end_lsn counts.
    let mut n = replica();
    n.dcs_view_fresh = false;
    n.cluster_optime = Some(Lsn(500 * MB));
    n.latest_end_lsn = Some(Lsn(100 * MB));
    assert_eq!(code("/replica", &n, "lag=1MB"), 200);
    // latest_end_lsn ahead of the DCS optime wins.
    let mut n = replica();
    n.latest_end_lsn = Some(Lsn(110 * MB));
    assert_eq!(code("/replica", &n, "lag=1MB"), 503);
    // Nothing known about the leader's position: never lagging.
    let mut n = replica();
    n.cluster_optime = None;
    n.latest_end_lsn = None;
    n.replayed_lsn = None;
    assert_eq!(code("/replica", &n, "lag=0"), 200);
}

#[test]
fn health_replication_state_filter() {
    let mut n = replica();
    table(
        &n,
        &[
            ("/replica", "replication_state=streaming", 200),
            ("/replica", "replication_state=in%20archive%20recovery", 503),
        ],
    );
    n.replication_state = Some("in archive recovery".into());
    table(
        &n,
        &[
            ("/replica", "replication_state=streaming", 503),
            ("/replica", "replication_state=in+archive+recovery", 200),
            ("/replica", "", 200),
        ],
    );
}

#[test]
fn health_tag_filters_only_on_non_leader_200() {
    let mut n = replica();
    n.tags.other.insert("dc".into(), Value::from("east"));
    n.tags.other.insert("rack".into(), Value::from(7));
    n.tags.other.insert("ssd".into(), Value::from(true));
    table(
        &n,
        &[
            ("/replica", "tag_dc=east", 200),
            ("/replica", "tag_dc=west", 503),
            ("/replica", "tag_zone=a", 503),
            ("/replica", "tag_rack=7", 200),
            ("/replica", "tag_ssd=true", 200),
            ("/replica", "tag_ssd=True", 503),
            ("/replica", "tag_dc=east&tag_rack=8", 503),
            ("/health", "tag_dc=west", 503),
            ("/primary", "tag_dc=east", 503),
        ],
    );
    let mut l = leader();
    l.tags.other.insert("dc".into(), Value::from("east"));
    // Leader paths ignore tags; read-only does not.
    table(
        &l,
        &[
            ("/primary", "tag_dc=west", 200),
            ("/leader", "tag_dc=west", 200),
            ("/read-only", "tag_dc=west", 503),
            ("/read-only", "tag_dc=east", 200),
        ],
    );
}

#[test]
fn health_sync_quorum_async_paths_need_a_fresh_view() {
    let mut n = replica();
    n.sync = SyncMembership::Sync;
    table(
        &n,
        &[
            ("/sync", "", 200),
            ("/synchronous", "", 200),
            ("/read-only-sync", "", 200),
            ("/read-only-synchronous", "", 200),
            ("/quorum", "", 503),
            ("/read-only-quorum", "", 503),
            ("/async", "", 503),
            // Exact paths only.
            ("/sync/x", "", 503),
        ],
    );
    n.sync = SyncMembership::Quorum;
    table(
        &n,
        &[
            ("/quorum", "", 200),
            ("/read-only-quorum", "", 200),
            ("/sync", "", 503),
            ("/async", "", 503),
        ],
    );
    n.dcs_view_fresh = false;
    table(
        &n,
        &[
            ("/quorum", "", 503),
            ("/read-only-quorum", "", 503),
            ("/replica", "", 200),
        ],
    );
}

#[test]
fn health_standby_cluster_leader() {
    let mut n = replica();
    n.holds_lease = true;
    n.standby_cluster = true;
    n.pg_role = PgRole::StandbyLeader;
    table(
        &n,
        &[
            ("/standby-leader", "", 200),
            ("/standby_leader", "", 200),
            ("/leader", "", 200),
            ("/primary", "", 503),
            ("/", "", 503),
            ("/replica", "", 503),
            ("/read-only", "", 200),
        ],
    );
}

#[test]
fn health_paused_with_stale_view_uses_the_role() {
    let mut n = leader();
    n.holds_lease = false;
    n.dcs_view_fresh = false;
    n.paused = true;
    table(&n, &[("/primary", "", 200), ("/leader", "", 200)]);
    // Not paused: the lock (lost) decides.
    n.paused = false;
    table(&n, &[("/primary", "", 503)]);
}

#[test]
fn health_liveness() {
    let mut n = replica();
    assert_eq!(liveness(&n), Verdict::Up);
    n.loop_healthy = false;
    assert_eq!(liveness(&n), Verdict::Down);
    n.paused = true;
    assert_eq!(liveness(&n), Verdict::Up);
}

#[test]
fn health_readiness() {
    assert_eq!(readiness(&leader(), &q("")), Ok(()));
    let r = replica();
    assert_eq!(readiness(&r, &q("")), Ok(()));

    let mut n = replica();
    n.pg_running = false;
    assert!(readiness(&n, &q("")).unwrap_err().contains("not running"));

    let mut n = replica();
    n.replication_state = Some("in archive recovery".into());
    assert!(readiness(&n, &q("")).unwrap_err().contains("streaming"));

    let mut n = replica();
    n.dcs_view_fresh = false;
    n.latest_end_lsn = None;
    assert!(readiness(&n, &q("")).unwrap_err().contains("DCS"));
    n.failsafe_active = true;
    assert_eq!(readiness(&n, &q("")), Ok(()));

    // Lag: default maximum_lag_on_failover (1 MB), overridable, apply or write.
    let mut n = replica();
    n.replayed_lsn = Some(Lsn(100 * MB - 2 * MB));
    n.received_lsn = Some(Lsn(100 * MB));
    assert!(readiness(&n, &q("")).unwrap_err().contains("apply lag"));
    assert_eq!(readiness(&n, &q("lag=4MB")), Ok(()));
    assert_eq!(readiness(&n, &q("mode=write")), Ok(()));
    assert_eq!(readiness_verdict(&n, &q("")), Verdict::Down);
}

#[test]
fn health_query_parsing() {
    let parsed = q("lag=16kB&replication_state=streaming&tag_dc=east&tag_dc=west&x=1&lag=9");
    assert_eq!(parsed.lag, Some(16 * 1024));
    assert_eq!(parsed.replication_state.as_deref(), Some("streaming"));
    assert_eq!(parsed.tags, vec![("dc".to_owned(), "east".to_owned())]);
    assert_eq!(parsed.mode, LagMode::Apply);
    // Empty values are absent, as with parse_qs.
    assert_eq!(q("lag=&tag_dc="), HealthQuery::default());
    assert_eq!(q("mode=write").mode, LagMode::Write);
    assert!(matches!(
        HealthQuery::parse(Some("lag=abc")),
        Err(QueryError::Lag { .. })
    ));
    assert!(matches!(
        HealthQuery::parse(Some("lag=10mb")),
        Err(QueryError::Lag { .. })
    ));
    assert!(matches!(
        HealthQuery::parse(Some("mode=fast")),
        Err(QueryError::Mode(_))
    ));
    assert_eq!(
        HealthQuery::parse(Some("tag_dc=%ff")),
        Err(QueryError::Encoding)
    );
    assert_eq!(
        HealthQuery::parse(Some("tag_dc=%4")),
        Err(QueryError::Encoding)
    );
    assert_eq!(HealthQuery::parse(None), Ok(HealthQuery::default()));
    // Echoed values are clipped.
    let long = format!("lag={}", "x".repeat(10_000));
    let err = HealthQuery::parse(Some(&long)).unwrap_err().to_string();
    assert!(err.len() < 300, "{err}");
}

#[test]
fn health_lag_units() {
    for (text, want) in [
        ("0", 0),
        ("1048576", MB),
        ("16kB", 16 * 1024),
        ("64MB", 64 * MB),
        ("1GB", 1 << 30),
        ("2TB", 2 << 40),
        ("100B", 100),
        (" 1 MB ", MB),
        ("+5", 5),
        ("1.5MB", MB + MB / 2),
        ("0.5kB", 512),
        (".5kB", 512),
    ] {
        assert_eq!(parse_size(text), Ok(want), "{text}");
    }
    for bad in [
        "",
        "abc",
        "1mb",
        "1KB",
        "-1",
        "-1MB",
        "1.2.3",
        ".",
        "99999999999TB",
        "1 M B",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn health_role_strings() {
    assert_eq!(PgRole::from_patroni("master"), PgRole::Primary);
    assert_eq!(PgRole::from_patroni("primary"), PgRole::Primary);
    assert_eq!(PgRole::from_patroni("replica"), PgRole::Replica);
    assert_eq!(
        PgRole::from_patroni("standby_leader"),
        PgRole::StandbyLeader
    );
    assert_eq!(PgRole::from_patroni("demoted"), PgRole::Other);
}
