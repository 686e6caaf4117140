//! Faults on a real three-node cluster (real PostgreSQL, real etcd, real agents), each under
//! writers that never cancel a commit, with a checker afterwards: no acknowledged write lost in
//! synchronous mode, never two primaries committing at once, a healthy cluster again within a
//! bound. Each test prints its figures (`cargo nextest ... --no-capture` shows them).

mod writer;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_testkit::{AgentCluster, DcsOptions, Env, EtcdCluster, process_tree};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use writer::{Outcome, Record, Report, Target, Writers};

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
        replicas_streaming(c, p)
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
        self.c
            .wait("one primary and two streaming replicas", timeout, |c| {
                c.primary().is_some_and(|p| replicas_streaming(c, p))
            })
            .unwrap();
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

    /// Copies every agent's log to `/tmp/pgkeep-fault-logs/<test>/` for a failing test.
    fn save_logs(&self, test: &str) {
        let dir = std::path::Path::new("/tmp/pgkeep-fault-logs").join(test);
        let _ = std::fs::create_dir_all(&dir);
        for (i, a) in self.c.agents.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("{}.log", a.node.name)), self.agent_log(i));
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

/// Both other members stream from `p` (by application name: a clone's `pg_basebackup` streams
/// too, under its own name).
fn replicas_streaming(c: &AgentCluster, p: usize) -> bool {
    let mut others: Vec<String> = (0..c.agents.len())
        .filter(|i| *i != p)
        .map(|i| c.agents[i].node.name.clone())
        .collect();
    others.sort();
    c.streaming_to(p) == others
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

/// (a) + (g) + (f): replication stalls for a second, then the primary's host is lost. The
/// cluster fails over within a bound; in synchronous mode no acknowledged write is lost (the
/// stalled commits were never acknowledged); in asynchronous mode the unreplicated ones are,
/// and the old primary, whose WAL went past the switch point, rejoins with pg_rewind.
fn host_loss(name: &str, sync: bool) {
    let b = bed(
        name,
        1,
        DcsOptions {
            synchronous_mode: sync,
            ..DcsOptions::default()
        },
    );
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(3));
    b.stall_replication(p);
    std::thread::sleep(Duration::from_secs(1));
    b.c.kill_host(p).unwrap();
    let t_kill = w.now();
    let np = b.primary_except(p, Duration::from_secs(45));
    let t_promoted = w.now();
    std::thread::sleep(Duration::from_secs(2));
    let mut c = b.c;
    c.start(p).unwrap();
    let b = Bed { c, ..b };
    let np2 = b.healthy_again(Duration::from_secs(120));
    assert_eq!(np, np2, "the restarted node must not take over");
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let rows = b.rows(np);
    let r = writer::check(&records, &rows);
    let first = writer::first_ack_after(&records, t_kill);
    let last_old = records
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Acked { port, .. } if port == port_of(&b, p))
                && r.end <= t_kill
        })
        .map(|r| r.end)
        .max();
    print_figures(
        name,
        &r,
        &[
            (
                "kill -> first acknowledged write",
                first.map(|f| f - t_kill),
            ),
            ("kill -> new primary seen", Some(t_promoted - t_kill)),
            ("last old-primary ack before kill", last_old),
        ],
    );
    assert_safe(&r, sync);
    let first = first.expect("no write acknowledged after the failover");
    let bound = Duration::from_secs(u64::from(b.dcs.ttl + b.dcs.loop_wait) + 15);
    assert!(first - t_kill < bound, "failover took {:?}", first - t_kill);
    assert!(b.history_len() >= 1, "the history key records the switch");
    if !sync {
        assert!(
            !r.lost.is_empty(),
            "with replication stalled, asynchronous mode should lose the unreplicated commits \
             (otherwise this test does not exercise divergence)"
        );
        let log = b.agent_log(p);
        assert!(
            log.contains("rewinding with pg_rewind"),
            "the diverged old primary must rejoin with pg_rewind:\n{}",
            &log[log.len().saturating_sub(4000)..]
        );
        // The lost writes stay lost: the rewound node does not bring them back.
        let back = b.rows(np);
        assert!(r.lost.iter().all(|k| !back.contains(k)));
    }
    drop(b.env);
}

#[test]
fn host_loss_in_synchronous_mode_loses_no_acknowledged_write() {
    host_loss("fsync", true);
}

#[test]
fn host_loss_in_asynchronous_mode_loses_unreplicated_writes_and_rewinds_the_old_primary() {
    host_loss("fasync", false);
}

/// (b): PostgreSQL alone is killed on the primary. The agent (which still holds the lease)
/// starts it again as primary after crash recovery; nothing acknowledged is lost (synchronous
/// mode) and no other node is promoted meanwhile.
#[test]
fn postgres_crash_on_the_primary_is_recovered_in_place() {
    let b = bed(
        "fpgkill",
        1,
        DcsOptions {
            synchronous_mode: true,
            ..DcsOptions::default()
        },
    );
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    b.c.kill_postgres(p).unwrap();
    let t_kill = w.now();
    std::thread::sleep(Duration::from_secs(1));
    let np = b.healthy_again(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let first = writer::first_ack_after(&records, t_kill);
    print_figures(
        "fpgkill",
        &r,
        &[(
            "kill -> first acknowledged write",
            first.map(|f| f - t_kill),
        )],
    );
    assert_safe(&r, true);
    assert_eq!(np, p, "the lease holder recovers its own PostgreSQL");
    assert_eq!(b.history_len(), 0, "no timeline switch");
    assert!(first.is_some());
}

/// (h): the agent on the primary is killed, or frozen for 2 × ttl, while PostgreSQL runs. The
/// fence guard stops PostgreSQL at the lease deadline, before any replica can be promoted: the
/// old primary's last acknowledged write precedes the new primary's first.
fn agent_lost(name: &str, freeze: bool) {
    let b = bed(name, 1, DcsOptions::default());
    let p = b.c.primary().unwrap();
    let old_port = port_of(&b, p);
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let t_fault = w.now();
    let frozen_at = Instant::now();
    if freeze {
        b.c.freeze_agent(p, true).unwrap();
    } else {
        b.c.kill_agent(p).unwrap();
    }
    let np = b.primary_except(p, Duration::from_secs(45));
    let t_promoted = w.now();
    assert!(
        b.c.postmaster_pid(p).is_none(),
        "the old primary's PostgreSQL must be stopped once another node is promoted"
    );
    let mut c = b.c;
    if freeze {
        let ttl = Duration::from_secs(u64::from(b.dcs.ttl));
        std::thread::sleep((ttl * 2).saturating_sub(frozen_at.elapsed()));
        c.freeze_agent(p, false).unwrap();
    } else {
        c.start(p).unwrap();
    }
    let b = Bed { c, ..b };
    let np2 = b.healthy_again(Duration::from_secs(120));
    assert_eq!(np, np2);
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let old_tl = r
        .primaries
        .iter()
        .find(|(port, _)| *port == old_port)
        .map(|(_, tl)| *tl)
        .unwrap();
    let last_old = writer::last_ack_on(&records, old_port, old_tl);
    let new_port = port_of(&b, np);
    let first_new = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Acked { port, .. } if port == new_port))
        .map(|r: &Record| r.end)
        .min();
    print_figures(
        name,
        &r,
        &[
            (
                "fault -> old primary's last ack",
                last_old.map(|t| t.saturating_sub(t_fault)),
            ),
            (
                "fault -> new primary's first ack",
                first_new.map(|t| t - t_fault),
            ),
            ("fault -> new primary seen", Some(t_promoted - t_fault)),
        ],
    );
    assert_safe(&r, false);
    assert!(
        last_old.unwrap() < first_new.unwrap(),
        "the old primary acknowledged a write after the new one did"
    );
    let guard_log = b.agent_log(p);
    assert!(
        guard_log.contains("fence guard: the agent did not renew the lease"),
        "the fence guard, not the agent, must have stopped PostgreSQL"
    );
    drop(b.env);
}

#[test]
fn agent_killed_on_the_primary_is_fenced_by_the_guard() {
    agent_lost("fagkill", false);
}

#[test]
fn agent_frozen_on_the_primary_is_fenced_by_the_guard() {
    agent_lost("fagstop", true);
}

/// (c″): every etcd member is frozen (accepts TCP, never answers) for ttl + 5 s. The primary
/// stops PostgreSQL before its lease can expire; after etcd resumes there is one leader again.
#[test]
fn frozen_etcd_makes_the_primary_fence_before_its_lease_expires() {
    let b = bed("fetcdstop", 3, DcsOptions::default());
    let p = b.c.primary().unwrap();
    let old_port = port_of(&b, p);
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let t_freeze = w.now();
    let pids: Vec<i32> = (0..3)
        .map(|i| i32::try_from(b.etcd.member_pid(i).unwrap()).unwrap())
        .collect();
    let signal = |s| {
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), s).unwrap();
        }
    };
    signal(nix::sys::signal::Signal::SIGSTOP);
    let ttl = Duration::from_secs(u64::from(b.dcs.ttl));
    std::thread::sleep(ttl + Duration::from_secs(5));
    let pg_up_at_expiry = b.c.postmaster_pid(p).is_some();
    signal(nix::sys::signal::Signal::SIGCONT);
    let np = b.healthy_again(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let old_tl = r
        .primaries
        .iter()
        .filter(|(port, _)| *port == old_port)
        .map(|(_, tl)| *tl)
        .min()
        .unwrap();
    let last_old = writer::last_ack_on(&records, old_port, old_tl)
        .filter(|t| *t >= t_freeze)
        .map(|t| t - t_freeze);
    print_figures(
        "fetcdstop",
        &r,
        &[("freeze -> old primary's last ack", last_old)],
    );
    assert!(
        !pg_up_at_expiry,
        "PostgreSQL still ran after the lease could have expired"
    );
    if let Some(t) = last_old {
        assert!(
            t < ttl,
            "the old primary acknowledged a write {t:?} into the freeze"
        );
    }
    assert_safe(&r, false);
    drop(b.env);
}

/// The longest time between two consecutive acknowledgements of writer `any` within
/// `[from, to]`: the write gap clients see.
fn write_gap(records: &[Record], from: Duration, to: Duration) -> Duration {
    let mut acks: Vec<Duration> = records
        .iter()
        .filter(|r| r.writer == "any" && matches!(r.outcome, Outcome::Acked { .. }))
        .map(|r| r.end)
        .collect();
    acks.sort();
    acks.windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// (e): switchover to a named candidate and back, through the authenticated REST API, under
/// writers. No acknowledged write is lost, never two primaries, and each switchover answers
/// 200 naming the new leader.
#[test]
fn switchover_there_and_back_through_the_rest_api() {
    let b = bed("fswitch", 1, DcsOptions::default());
    let (client, rt) = b.api_client();
    let first = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let mut gaps = Vec::new();
    let mut leader = first;
    for candidate in [(first + 1) % 3, first] {
        let name = |i: usize| b.c.agents[i].node.name.clone();
        let body = serde_json::json!({"leader": name(leader), "candidate": name(candidate)});
        let url = format!("{}/switchover", b.c.agents[leader].api_base());
        let t_post = w.now();
        let resp = rt
            .block_on(client.post_json(&url, &body.to_string()))
            .unwrap();
        let t_done = w.now();
        if resp.status != 200 {
            let keys = b
                .etcd
                .etcdctl(&["get", "--prefix", &format!("/service/{}/", b.c.scope)])
                .map(|o| o.stdout)
                .unwrap_or_default();
            let log = b.agent_log(leader);
            panic!(
                "switchover answered {}: {}\n{keys}\n{}",
                resp.status,
                resp.text(),
                &log[log.len().saturating_sub(3000)..]
            );
        }
        assert!(resp.text().contains(&name(candidate)), "{}", resp.text());
        let np = b.healthy_again(Duration::from_secs(60));
        if np != candidate {
            b.save_logs("fswitch");
        }
        assert_eq!(np, candidate, "{}", resp.text());
        std::thread::sleep(Duration::from_secs(2));
        gaps.push((t_post, t_done));
        leader = candidate;
    }
    let records = w.stop();
    let r = writer::check(&records, &b.rows(leader));
    let figures: Vec<(String, Option<Duration>)> = gaps
        .iter()
        .enumerate()
        .map(|(i, (from, to))| {
            (
                format!("switchover {} write gap", i + 1),
                Some(write_gap(&records, *from, *to)),
            )
        })
        .collect();
    let figures: Vec<(&str, Option<Duration>)> =
        figures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    print_figures("fswitch", &r, &figures);
    if std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_some() {
        b.save_logs("fswitch");
    }
    assert_safe(&r, true);
    assert_eq!(r.primaries.len(), 3, "three timelines: {:?}", r.primaries);
    assert_eq!(b.history_len(), 2);
    drop(b.env);
}

/// Appends a `watchdog` section to node `i`'s configuration.
fn set_watchdog(c: &AgentCluster, i: usize, mode: &str, device: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&c.agents[i].config)
        .unwrap();
    writeln!(
        f,
        "watchdog: {{mode: {mode}, device: {}, safety_margin: 5}}",
        device.display()
    )
    .unwrap();
}

/// Watchdog devices (a fake one: a file; never a real device in tests). The leader keeps its
/// device alive every cycle and closes it with the magic `V` when it hands over; a node whose
/// watchdog is `required` but missing never becomes leader, even when it is the only choice
/// besides nothing.
#[test]
fn watchdog_is_kept_alive_by_the_leader_and_required_means_required() {
    let pg = pgkeep_testkit::ServiceUser::postgres().unwrap();
    let fake = std::cell::RefCell::new(None);
    let b = bed_with("fwatchdog", 1, DcsOptions::default(), |c| {
        let dev = c.agents[0].node.dir.join("fake-watchdog");
        std::fs::write(&dev, b"").unwrap();
        pg.chown(&dev).unwrap();
        set_watchdog(c, 0, "automatic", &dev);
        set_watchdog(
            c,
            1,
            "required",
            &c.agents[1].node.dir.join("no-such-watchdog"),
        );
        *fake.borrow_mut() = Some(dev);
    });
    let dev = fake.into_inner().unwrap();
    assert_eq!(b.c.primary(), Some(0));
    let len = || std::fs::metadata(&dev).map(|m| m.len()).unwrap_or(0);
    let before = len();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        len() >= before + 2,
        "the leader keeps its watchdog alive every cycle"
    );
    let status: serde_json::Value = {
        let out = b
            .etcd
            .etcdctl(&[
                "get",
                "/service/fwatchdog/members/fwatchdog2",
                "--print-value-only",
            ])
            .unwrap();
        serde_json::from_str(out.stdout.trim()).unwrap()
    };
    assert_eq!(status["state"], "running", "{status}");
    // The leader's host is lost: node 2 (required, no device) must not take over; node 3 does.
    b.c.kill_host(0).unwrap();
    let np = b.primary_except(0, Duration::from_secs(45));
    assert_eq!(
        np, 2,
        "the node without its required watchdog must not lead"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.c.primary(), Some(2));
    let log = b.agent_log(1);
    assert!(
        log.contains("watchdog.mode is required but the device is not writable"),
        "{log}"
    );
    // Handing over closes the device with the magic character: bring node 1 back, switch over
    // to it (it arms its device again), then away from it.
    let mut c = b.c;
    c.start(0).unwrap();
    let b = Bed { c, ..b };
    b.healthy_again(Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(2));
    let (code, text) = b.switchover(2, 0);
    assert_eq!(code, 200, "{text}");
    b.healthy_again(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let (code, text) = b.switchover(0, 2);
    assert_eq!(code, 200, "{text}");
    b.healthy_again(Duration::from_secs(60));
    let bytes = std::fs::read(&dev).unwrap();
    assert_eq!(bytes.last(), Some(&b'V'), "magic close after handing over");
    drop(b.env);
}
