//! `GET /metrics` on a real three-node cluster, parsed with a Prometheus text-format parser:
//! Patroni's metric names with their meaning per role, pgkeep's own metrics, and the access
//! check.

use std::collections::BTreeMap;
use std::time::Duration;

use pgkeep_testkit::{AgentCluster, Env, EtcdCluster};
use prometheus_parse::{Scrape, Value};

use crate::clients::Clients;

/// Sample name → (labels, value) of one scrape.
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

fn samples(text: &str) -> Samples {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = Scrape::parse(lines).expect("the metrics parse as Prometheus text format");
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for s in scrape.samples {
        let v = match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            Value::Histogram(_) | Value::Summary(_) => continue,
        };
        let labels = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.entry(s.metric).or_default().push((labels, v));
    }
    out
}

fn one(m: &Samples, name: &str) -> f64 {
    let v = m.get(name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(v.len(), 1, "{name}: {v:?}");
    v[0].1
}

fn with(m: &Samples, name: &str, label: (&str, &str)) -> Option<f64> {
    m.get(name)?
        .iter()
        .find(|(l, _)| l.get(label.0).map(String::as_str) == Some(label.1))
        .map(|(_, v)| *v)
}

#[test]
fn metrics_follow_patroni_names_and_need_authentication() {
    let env = Env::new("metrics").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "mx", 3, &bin).unwrap();
    c.start_all().unwrap();
    c.wait(
        "one primary and two streaming replicas",
        Duration::from_secs(90),
        |c| c.primary().is_some_and(|p| c.replicas_streaming(p)),
    )
    .unwrap();
    let p = c.primary().unwrap();
    let r = (p + 1) % 3;
    let Clients {
        operator: client,
        anonymous,
        rt,
    } = Clients::new(&env, &c);
    let scrape = |i: usize| {
        let resp = rt
            .block_on(client.get(&format!("{}/metrics", c.agents[i].api_base())))
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let ct = resp
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        resp.text()
    };

    let anon = rt
        .block_on(anonymous.get(&format!("{}/metrics", c.agents[p].api_base())))
        .unwrap();
    assert!(
        anon.status == 401 || anon.status == 403,
        "anonymous scrape answered {}",
        anon.status
    );
    assert!(!anon.text().contains("patroni_"));

    let text = scrape(p);
    let m = samples(&text);
    // Patroni 4's labels on every Patroni metric.
    for (labels, _) in &m["patroni_primary"] {
        assert_eq!(labels.get("scope").map(String::as_str), Some("mx"));
        assert_eq!(
            labels.get("name").map(String::as_str),
            Some(c.agents[p].node.name.as_str())
        );
    }
    assert_eq!(one(&m, "patroni_primary"), 1.0);
    assert_eq!(one(&m, "patroni_master"), 1.0);
    assert_eq!(one(&m, "patroni_replica"), 0.0);
    assert_eq!(one(&m, "patroni_postgres_running"), 1.0);
    assert_eq!(one(&m, "patroni_cluster_unlocked"), 0.0);
    assert!(one(&m, "patroni_xlog_location") > 0.0);
    assert_eq!(one(&m, "patroni_postgres_timeline"), 1.0);
    assert!(one(&m, "patroni_postgres_server_version") >= 150_000.0);
    assert!(one(&m, "patroni_postmaster_start_time") > 1.7e9);
    assert!(one(&m, "patroni_dcs_last_seen") > 1.7e9);
    assert!(one(&m, "pgkeep_leader_lease_remaining_seconds") > 0.0);
    assert_eq!(one(&m, "pgkeep_leader_lease_ttl_seconds"), 10.0);
    // Every certificate the agent uses, with its time to expiry.
    for cert in ["restapi", "postgresql", "etcd_client", "replication_client"] {
        let left = with(
            &m,
            "pgkeep_certificate_expiry_seconds",
            ("certificate", cert),
        )
        .unwrap_or_else(|| panic!("no expiry for {cert}:\n{text}"));
        // The harness issues certificates for two days.
        assert!(left > 86_400.0 && left <= 2.0 * 86_400.0, "{cert}: {left}");
    }
    // The primary's archiver (no archive_command here: nothing archived, nothing failed).
    assert_eq!(one(&m, "pgkeep_archiver_failed_total"), 0.0);
    // Lag of both replicas from the DCS view.
    let lags = &m["pgkeep_member_lag_bytes"];
    assert_eq!(lags.len(), 2, "{lags:?}");
    assert!(text.contains("pgkeep_rest_request_duration_seconds_bucket{"));
    // The scrapes so far counted themselves.
    assert!(
        with(&m, "pgkeep_rest_requests_total", ("route", "/metrics")).is_some_and(|n| n >= 1.0)
    );

    let rm = samples(&scrape(r));
    assert_eq!(one(&rm, "patroni_primary"), 0.0);
    assert_eq!(one(&rm, "patroni_replica"), 1.0);
    assert_eq!(one(&rm, "patroni_postgres_streaming"), 1.0);
    assert!(one(&rm, "patroni_xlog_received_location") > 0.0);
    assert_eq!(one(&rm, "patroni_xlog_location"), 0.0);
    assert_eq!(one(&rm, "pgkeep_leader_lease_remaining_seconds"), 0.0);
    assert_eq!(
        with(&rm, "pgkeep_promotions_total", ("trigger", "manual")),
        Some(0.0)
    );

    // A switchover counts as a manual promotion on the candidate.
    let body = serde_json::json!({
        "leader": c.agents[p].node.name,
        "candidate": c.agents[r].node.name,
    });
    let resp = rt
        .block_on(client.post_json(
            &format!("{}/switchover", c.agents[p].api_base()),
            &body.to_string(),
        ))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    c.wait("the candidate leads", Duration::from_secs(30), |c| {
        c.primary() == Some(r)
    })
    .unwrap();
    // The metrics show the agent's last observation: PostgreSQL may answer as a primary a
    // cycle before its agent has published it.
    c.wait(
        "the candidate's metrics say primary",
        Duration::from_secs(10),
        |_| one(&samples(&scrape(r)), "patroni_primary") == 1.0,
    )
    .unwrap();
    let rm = samples(&scrape(r));
    assert_eq!(one(&rm, "patroni_primary"), 1.0);
    assert_eq!(
        with(&rm, "pgkeep_promotions_total", ("trigger", "manual")),
        Some(1.0)
    );
    assert_eq!(
        with(&rm, "pgkeep_promotions_total", ("trigger", "automatic")),
        Some(0.0)
    );
    assert_eq!(one(&rm, "patroni_postgres_timeline"), 2.0);
    drop(env);
}
