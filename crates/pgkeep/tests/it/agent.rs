//! Real agents on a real etcd: bootstrap, clone, streaming replication, health checks.

use std::time::Duration;

use pgkeep::api::ApiClient;
use pgkeep_testkit::{API_USER, AgentCluster, Env, EtcdCluster};
use secrecy::SecretString;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_agents_bootstrap_clone_replicate_and_answer_health_checks() {
    let env = Env::new("agents").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "ag", 3, &bin).unwrap();
    c.start_all().unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary().is_some()
    })
    .unwrap();
    let p = c.primary().unwrap();
    assert_eq!(
        p, 0,
        "only the node with the bootstrap marker may run initdb"
    );
    // By name: a clone's pg_basebackup streams too, as pgkeep-clone-<member>.
    c.wait("two streaming replicas", Duration::from_secs(90), |c| {
        c.streaming_to(p) == ["ag2", "ag3"]
    })
    .unwrap();
    assert_eq!(c.streaming_to(p), ["ag2", "ag3"]);
    // The bootstrap node wrote its bootstrap.dcs as the cluster's dynamic configuration.
    let config = etcd
        .etcdctl(&["get", "/service/ag/config", "--print-value-only"])
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(config.stdout.trim()).unwrap();
    assert_eq!(config["ttl"], 10, "{config}");

    let out = c
        .psql(p, "CREATE TABLE t(v text); INSERT INTO t VALUES ('hello')")
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    for r in [1, 2] {
        c.wait("the row on a replica", Duration::from_secs(10), |c| {
            c.psql(r, "SELECT v FROM t")
                .is_ok_and(|o| o.stdout.trim() == "hello")
        })
        .unwrap();
    }

    let ca = std::fs::read(c.agents[0].node.dir.join("pki/ca.crt")).unwrap();
    let client = ApiClient::builder(&ca)
        .unwrap()
        .identity_files(&c.operator_cert, &c.operator_key)
        .unwrap()
        .basic_auth(API_USER, SecretString::from(c.api_password.clone()))
        .build()
        .unwrap();
    let rt = runtime();
    let code = |i: usize, path: &str| {
        let url = format!("{}{path}", c.agents[i].api_base());
        rt.block_on(client.get(&url)).map(|r| r.status).unwrap_or(0)
    };
    // The leader's lease is renewed every cycle; give the replicas' snapshots a cycle too.
    c.wait("health codes", Duration::from_secs(10), |_| {
        code(0, "/primary") == 200 && code(1, "/replica") == 200 && code(2, "/replica") == 200
    })
    .unwrap();
    assert_eq!(code(0, "/replica"), 503);
    assert_eq!(code(1, "/primary"), 503);
    assert_eq!(code(2, "/leader"), 503);
}

/// `--log-format json`: every line the agent writes is one JSON object, HA decisions included
/// with their reason.
#[test]
fn json_logs_on_request() {
    let env = Env::new("jsonlog").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "jl", 1, &bin).unwrap();
    c.start_with(0, &["--log-format", "json"]).unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary().is_some()
    })
    .unwrap();
    let log = std::fs::read_to_string(c.agents[0].service.as_ref().unwrap().log_path()).unwrap();
    let mut decisions = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "decision" {
            assert!(v["fields"]["reason"].is_string(), "{line}");
            decisions += 1;
        }
    }
    assert!(decisions > 0, "no decision logged:\n{log}");
}
