//! (d): the primary cut off from etcd and from the other nodes, on real separate network
//! stacks (a [`NetBed`]): three hosts each run an etcd member and a node (agent + PostgreSQL),
//! a fourth host, `client`, runs the writers. The primary's host is partitioned from the other
//! two but not from the client, so the application still reaches the old primary: if it kept
//! committing after another node was promoted, the writers would catch two primaries.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_testkit::{BedAgentCluster, BedEtcdCluster, DcsOptions, Env, NetBed};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::writer::{self, Outcome, Route, Target, Writers};
use super::{WRITER, assert_safe, print_figures};

const NAME: &str = "fpartition";

/// The hosts running etcd and a node each.
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// The application's host: runs nothing, reaches every node unless the test cuts it.
const CLIENT: &str = "client";

/// Copies the environment's logs (etcd members, agents) to `/tmp/pgkeep-fault-logs/<test>/`
/// when the test panics, or always with `PGKEEP_TEST_SAVE_LOGS` set.
struct SaveLogs(PathBuf);

impl Drop for SaveLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_none() {
            return;
        }
        let dir = Path::new("/tmp/pgkeep-fault-logs").join(NAME);
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                let _ = std::fs::copy(e.path(), dir.join(e.file_name()));
            }
        }
        eprintln!("logs saved in {}", dir.display());
    }
}

fn tls(env: &Env) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env.ca_cert_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Both other members stream from `p`, by application name.
fn replicas_streaming(c: &BedAgentCluster<'_>, p: usize) -> bool {
    let mut others: Vec<String> = (0..c.agents.len())
        .filter(|i| *i != p)
        .map(|i| c.agents[i].node.name.clone())
        .collect();
    others.sort();
    c.streaming_to(p) == others
}

/// The rows the primary `p` holds.
fn rows(c: &BedAgentCluster<'_>, p: usize) -> BTreeSet<(String, i64)> {
    let out = c
        .psql(p, "SELECT writer || ' ' || seq FROM fault_log")
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    out.stdout
        .lines()
        .filter_map(|l| {
            let (w, s) = l.split_once(' ')?;
            Some((w.to_owned(), s.parse().ok()?))
        })
        .collect()
}

fn history_len(etcd: &BedEtcdCluster<'_>, scope: &str) -> usize {
    let out = etcd
        .etcdctl(&[
            "get",
            &format!("/service/{scope}/history"),
            "--print-value-only",
        ])
        .unwrap();
    serde_json::from_str::<serde_json::Value>(out.stdout.trim())
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// (d): the primary's host is cut off from the other two hosts (its etcd member is then in
/// the minority; the other two keep quorum) but not from the client. The old primary stops
/// committing before another node is promoted (its last acknowledged write precedes the new
/// primary's first, and no write on the old timeline starts after the new one acknowledged
/// one), a new primary takes over within ttl + loop_wait + 15 s, and after the partition heals
/// the old primary rejoins (pg_rewind or plain follow): one primary, two streaming replicas.
#[test]
fn partitioned_primary_stops_committing_before_another_node_is_promoted() {
    let t_test = Instant::now();
    let env = Env::new(NAME).unwrap();
    let logs = SaveLogs(env.root().join("logs"));
    let mut hosts = NODES.to_vec();
    hosts.push(CLIENT);
    let bed = NetBed::new(&env, &hosts).unwrap();
    let etcd = BedEtcdCluster::start(&bed, &NODES, CLIENT).unwrap();
    let dcs = DcsOptions::default();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = BedAgentCluster::prepare(&etcd, &NODES, NAME, &bin, &dcs).unwrap();
    c.start_all().unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary().is_some()
    })
    .unwrap();
    let p = c.primary().unwrap();
    c.wait("two streaming replicas", Duration::from_secs(90), |c| {
        replicas_streaming(c, p)
    })
    .unwrap();
    let t_ready = t_test.elapsed();

    let password = format!("w-{}", std::process::id());
    let out = c.psql(p, &writer::schema_sql(WRITER, &password)).unwrap();
    assert!(out.success(), "{}", out.stderr);
    let target = Target {
        nodes: c
            .agents
            .iter()
            .map(|a| (a.node.dns_name.clone(), a.pg_port))
            .collect(),
        user: WRITER.into(),
        password,
        tls: tls(&env),
    };
    let route = Route {
        netns: Path::new("/run/netns").join(bed.ns_name(CLIENT)),
        addrs: c.agents.iter().map(|a| IpAddr::V4(a.node.addr)).collect(),
    };
    let old_port = c.agents[p].pg_port;
    let others: Vec<usize> = (0..c.agents.len()).filter(|i| *i != p).collect();
    let other_hosts: Vec<&str> = others.iter().map(|i| c.host(*i)).collect();

    let w = Writers::start_routed(&target, Some(&route));
    std::thread::sleep(Duration::from_secs(3));
    let t_cut = w.now();
    bed.partition(&[c.host(p)], &other_hosts).unwrap();
    let ttl = Duration::from_secs(u64::from(dcs.ttl));
    let bound = Duration::from_secs(u64::from(dcs.ttl + dcs.loop_wait) + 15);
    c.wait("a new primary among the others", bound + ttl, |c| {
        others.iter().any(|i| c.is_primary(*i))
    })
    .unwrap();
    let t_promoted = w.now();
    let np = *others.iter().find(|i| c.is_primary(**i)).unwrap();
    let old_still_primary = c.is_primary(p);
    let old_pg_running = c.postmaster_pid(p).is_some();
    std::thread::sleep(Duration::from_secs(2));

    let t_heal = w.now();
    bed.heal().unwrap();
    c.wait(
        "one primary and two streaming replicas after the heal",
        Duration::from_secs(120),
        |c| c.primary() == Some(np) && replicas_streaming(c, np),
    )
    .unwrap();
    let t_healthy = w.now();
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &rows(&c, np));

    let old_tl = r
        .first_timeline_on(old_port)
        .expect("the old primary acknowledged writes");
    let last_old = writer::last_ack_on(&records, old_port, old_tl);
    let new_port = c.agents[np].pg_port;
    let first_new = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Acked { port, .. } if port == new_port))
        .map(|r| r.end)
        .min();
    let old_log = c.agent_log(p);
    let rejoin = if old_log.contains("rewinding with pg_rewind") {
        "pg_rewind"
    } else {
        "follow (no rewind)"
    };
    let since_cut = |t: Option<Duration>| t.map(|t| t.saturating_sub(t_cut));
    print_figures(
        NAME,
        &r,
        &[
            ("setup (start -> healthy cluster)", Some(t_ready)),
            ("partition -> old primary's last ack", since_cut(last_old)),
            ("partition -> new primary's first ack", since_cut(first_new)),
            ("partition -> new primary seen", Some(t_promoted - t_cut)),
            ("heal -> healthy cluster", Some(t_healthy - t_heal)),
            ("test wall time", Some(t_test.elapsed())),
        ],
    );
    eprintln!(
        "[{NAME}] old primary {} (port {old_port}) -> new primary {} (port {new_port}); at \
         promotion the old one was primary: {old_still_primary}, its postmaster running: \
         {old_pg_running}; rejoined by {rejoin}; lost (async, unreplicated) {}",
        c.host(p),
        c.host(np),
        r.lost.len()
    );

    assert_safe(&r, false);
    assert!(
        !old_still_primary,
        "the old primary still ran as primary when the new one was promoted"
    );
    let last_old = last_old.expect("the old primary acknowledged writes");
    let first_new = first_new.expect("no write acknowledged by the new primary");
    assert!(
        last_old < first_new,
        "the old primary acknowledged a write at {last_old:?}, after the new one's first at \
         {first_new:?}"
    );
    assert!(
        last_old.saturating_sub(t_cut) < ttl,
        "the old primary acknowledged a write {:?} after the partition: its lease could have \
         expired",
        last_old.saturating_sub(t_cut)
    );
    assert!(
        first_new - t_cut < bound,
        "failover took {:?} (bound {bound:?})",
        first_new - t_cut
    );
    // Only the old primary's unreplicated writes may be lost, never the new primary's.
    for (w, seq) in &r.lost {
        let rec = records
            .iter()
            .find(|x| &x.writer == w && x.seq == *seq)
            .unwrap();
        assert!(
            matches!(rec.outcome, Outcome::Acked { port, .. } if port == old_port),
            "lost a write of the new primary: {rec:?}"
        );
    }
    assert!(
        history_len(&etcd, &c.scope) >= 1,
        "the history key records the switch"
    );
    drop(logs);
    drop(c);
    drop(etcd);
    bed.teardown().unwrap();
    drop(env);
}
