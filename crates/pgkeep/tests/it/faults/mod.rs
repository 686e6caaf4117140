//! Faults on a real three-node cluster (real PostgreSQL, real etcd, real agents), each under
//! writers that never cancel a commit, with a checker afterwards: no acknowledged write lost in
//! synchronous mode, never two primaries committing at once, a healthy cluster again within a
//! bound. Each test prints its figures (`cargo nextest ... --no-capture` shows them).

mod etcd;
mod manual;
mod partition;
mod planned;
mod reclone;
mod slots;
mod stuck;
mod unplanned;
mod writer;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use pgkeep_testkit::{AgentCluster, DcsOptions, Env, EtcdCluster, process_tree};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use writer::{Report, Target};

const WRITER: &str = "fault_writer";

/// A running cluster with the writers' table and role.
struct Bed {
    env: Env,
    etcd: EtcdCluster,
    c: AgentCluster,
    target: Target,
    dcs: DcsOptions,
}

fn bed(name: &str, etcd_members: usize, dcs: DcsOptions) -> Bed {
    bed_with(name, etcd_members, dcs, |_| {})
}

/// [`bed`], with `tweak` run on the prepared nodes before any agent starts.
fn bed_with(
    name: &str,
    etcd_members: usize,
    dcs: DcsOptions,
    tweak: impl FnOnce(&AgentCluster),
) -> Bed {
    let env = Env::new(name).unwrap();
    let etcd = EtcdCluster::start(&env, etcd_members).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare_with(&env, &etcd, name, 3, &bin, &dcs).unwrap();
    tweak(&c);
    c.start_all().unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary().is_some()
    })
    .unwrap();
    let p = c.primary().unwrap();
    c.wait("two streaming replicas", Duration::from_secs(90), |c| {
        c.replicas_streaming(p)
    })
    .unwrap();
    let password = format!("w-{}", std::process::id());
    let out = c.psql(p, &writer::schema_sql(WRITER, &password)).unwrap();
    assert!(out.success(), "{}", out.stderr);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env.ca_cert_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let target = Target {
        nodes: c
            .agents
            .iter()
            .map(|a| (a.node.dns_name.clone(), a.pg_port))
            .collect(),
        user: WRITER.into(),
        password,
        tls,
    };
    Bed {
        env,
        etcd,
        c,
        target,
        dcs,
    }
}

impl Bed {
    fn primary_except(&self, old: usize, timeout: Duration) -> usize {
        self.c
            .wait("a new primary", timeout, |c| {
                c.primary().is_some_and(|p| p != old)
            })
            .unwrap();
        self.c.primary().unwrap()
    }

    /// The rows the primary `p` holds.
    fn rows(&self, p: usize) -> BTreeSet<(String, i64)> {
        let out = self
            .c
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

    fn healthy_again(&self, timeout: Duration) -> usize {
        if let Err(e) = self
            .c
            .wait("one primary and two streaming replicas", timeout, |c| {
                c.primary().is_some_and(|p| c.replicas_streaming(p))
            })
        {
            self.save_logs(&self.c.scope);
            panic!("{e:#}");
        }
        self.c.primary().unwrap()
    }

    fn agent_log(&self, i: usize) -> String {
        let svc = self.c.agents[i].service.as_ref().unwrap();
        std::fs::read_to_string(svc.log_path()).unwrap_or_default()
    }

    /// An operator's REST client (client certificate and basic auth) and a runtime for it.
    fn api_client(&self) -> (pgkeep::api::ApiClient, tokio::runtime::Runtime) {
        let ca = std::fs::read(self.env.ca_cert_path()).unwrap();
        let client = pgkeep::api::ApiClient::builder(&ca)
            .unwrap()
            .identity_files(&self.c.operator_cert, &self.c.operator_key)
            .unwrap()
            .basic_auth(
                pgkeep_testkit::API_USER,
                secrecy::SecretString::from(self.c.api_password.clone()),
            )
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (client, rt)
    }

    /// `POST /switchover` from `leader` to `candidate`; the answer's status and text.
    fn switchover(&self, leader: usize, candidate: usize) -> (u16, String) {
        let (client, rt) = self.api_client();
        let name = |i: usize| self.c.agents[i].node.name.clone();
        let body = serde_json::json!({"leader": name(leader), "candidate": name(candidate)});
        let url = format!("{}/switchover", self.c.agents[leader].api_base());
        let resp = rt
            .block_on(client.post_json(&url, &body.to_string()))
            .unwrap();
        (resp.status, resp.text())
    }

    /// Sets `key` in the cluster's dynamic configuration (written to etcd directly, as an
    /// operator with etcd access could).
    fn set_dynamic(&self, key: &str, value: serde_json::Value) {
        let path = format!("/service/{}/config", self.c.scope);
        let out = self
            .etcd
            .etcdctl(&["get", &path, "--print-value-only"])
            .unwrap();
        let mut config: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        config[key] = value;
        let put = self
            .etcd
            .etcdctl(&["put", &path, &config.to_string()])
            .unwrap();
        assert!(put.success(), "{}", put.stderr);
    }

    /// Copies every agent's log to `/tmp/pgkeep-fault-logs/<test>/` for a failing test.
    fn save_logs(&self, test: &str) {
        let dir = std::path::Path::new("/tmp/pgkeep-fault-logs").join(test);
        let _ = std::fs::create_dir_all(&dir);
        for (i, a) in self.c.agents.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("{}.log", a.node.name)), self.agent_log(i));
            // PostgreSQL's own log says why a replica does not stream.
            let pg_log = a.node.dir.join("conf/postgresql.log");
            if let Ok(text) = std::fs::read(&pg_log) {
                let _ = std::fs::write(dir.join(format!("{}-postgresql.log", a.node.name)), text);
            }
        }
        eprintln!("agent logs saved in {}", dir.display());
    }

    fn history_len(&self) -> usize {
        let out = self
            .etcd
            .etcdctl(&[
                "get",
                &format!("/service/{}/history", self.c.scope),
                "--print-value-only",
            ])
            .unwrap();
        serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Stops the primary's walsenders (SIGSTOP), so what it commits from now on stays local.
    fn stall_replication(&self, p: usize) {
        let pm = self.c.postmaster_pid(p).unwrap();
        let mut stalled = 0;
        for pid in process_tree(pm) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains("walsender") {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGSTOP,
                );
                stalled += 1;
            }
        }
        assert_eq!(stalled, 2, "the primary should have two walsenders");
    }
}

/// The leader key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaderKey {
    holder: String,
    lease: i64,
    /// Changes only when the key is deleted (released, expired, revoked) and created again.
    create_revision: i64,
}

/// Copies the environment's logs (etcd members, agents, fence guards) to
/// `/tmp/pgkeep-fault-logs/<name>/` when dropped during a panic, or always with
/// `PGKEEP_TEST_SAVE_LOGS` set. It holds the environment, so the logs are still there.
struct KeepLogs {
    env: Env,
    name: String,
}

impl Drop for KeepLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_none() {
            return;
        }
        let dir = std::path::Path::new("/tmp/pgkeep-fault-logs").join(&self.name);
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(rd) = std::fs::read_dir(self.env.root().join("logs")) {
            for e in rd.flatten() {
                let _ = std::fs::copy(e.path(), dir.join(e.file_name()));
            }
        }
        eprintln!("logs saved in {}", dir.display());
    }
}

impl Bed {
    fn name(&self, i: usize) -> String {
        self.c.agents[i].node.name.clone()
    }

    fn keep_logs(&self, name: &str) -> KeepLogs {
        KeepLogs {
            env: self.env.clone(),
            name: name.to_owned(),
        }
    }

    /// The leader key, read through etcd member `via` only (or any member). `Err` when etcd
    /// did not answer.
    fn leader_key(&self, via: Option<usize>) -> Result<Option<LeaderKey>, String> {
        use base64::Engine;
        let key = format!("/service/{}/leader", self.c.scope);
        let args = ["get", key.as_str(), "-w", "json"];
        let out = match via {
            Some(m) => self.etcd.etcdctl_member(m, &args),
            None => self.etcd.etcdctl(&args),
        }
        .map_err(|e| format!("{e:#}"))?;
        if !out.success() {
            return Err(out.stderr);
        }
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).map_err(|e| e.to_string())?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let value = base64::engine::general_purpose::STANDARD
            .decode(kv["value"].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        Ok(Some(LeaderKey {
            holder: String::from_utf8_lossy(&value).into_owned(),
            lease: kv["lease"].as_i64().unwrap_or(0),
            create_revision: kv["create_revision"].as_i64().unwrap_or(0),
        }))
    }

    /// `/sync`: the leader it names and its synchronous standbys.
    fn sync_key(&self) -> Option<(String, Vec<String>)> {
        let out = self
            .etcd
            .etcdctl(&[
                "get",
                &format!("/service/{}/sync", self.c.scope),
                "--print-value-only",
            ])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).ok()?;
        let mut standbys: Vec<String> = v["sync_standby"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        standbys.sort();
        Some((v["leader"].as_str()?.to_owned(), standbys))
    }
}

fn port_of(b: &Bed, i: usize) -> u16 {
    b.c.agents[i].pg_port
}

fn print_figures(name: &str, r: &Report, figures: &[(&str, Option<Duration>)]) {
    eprintln!(
        "[{name}] acked {} lost {} split-brain {} primaries {:?}",
        r.acked,
        r.lost.len(),
        r.split_brain.len(),
        r.primaries
    );
    for (k, v) in figures {
        eprintln!("[{name}] {k}: {v:?}");
    }
}

fn assert_safe(r: &Report, sync: bool) {
    assert!(
        r.split_brain.is_empty(),
        "two primaries: {:#?}",
        r.split_brain
    );
    assert!(
        r.failed_but_present.is_empty(),
        "writes recorded as failed are present: {:?}",
        r.failed_but_present
    );
    if sync {
        assert!(r.lost.is_empty(), "acknowledged writes lost: {:?}", r.lost);
    }
    assert!(r.acked > 20, "too few acknowledged writes to mean anything");
}
