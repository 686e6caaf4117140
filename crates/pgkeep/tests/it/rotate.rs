//! `pgkeep pki rotate` on a running local environment (`pgkeep up`): every listener presents
//! its new certificate afterwards (checked with `openssl s_client`, independently of pgkeep's
//! own probe), HAProxy's checks use the new client certificate, the agents keep working with
//! etcd, no failover happens (same leader on the same lease, same timeline, same history) and a
//! client writing through HAProxy with a new TLS session per write never fails.
//!
//! Then the safety of the etcd client reload: a leader whose etcd client files are replaced by
//! an identity etcd does not accept keeps the connections it has (and its lease), says so in its
//! log, and takes a good identity at the next rotation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pgkeep::inventory::Inventory;
use serde_json::Value;

use crate::local::{Scenario, ok, wait_members};

/// Upper-case hex without separators.
fn norm(serial: &str) -> String {
    serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_uppercase()
}

fn file_serial(path: &Path) -> Result<String> {
    Ok(norm(&pgkeep::pki::inspect(path)?.serial))
}

/// The serial of the certificate `addr` presents to `openssl s_client`, which must verify it
/// against `ca` and `name`.
fn openssl_serial(
    addr: &str,
    name: &str,
    ca: &Path,
    postgres: bool,
    client: Option<(&Path, &Path)>,
) -> Result<String> {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "openssl",
        "s_client",
        "-connect",
        addr,
        "-servername",
        name,
    ])
    .args(["-verify_return_error", "-verify_hostname", name, "-CAfile"])
    .arg(ca);
    if postgres {
        cmd.args(["-starttls", "postgres"]);
    }
    if let Some((cert, key)) = client {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let out = cmd.stdin(std::process::Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (Some(b), Some(e)) = (
        text.find("-----BEGIN CERTIFICATE-----"),
        text.find("-----END CERTIFICATE-----"),
    ) else {
        bail!(
            "openssl s_client {addr} ({name}) got no certificate: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let pem = &text[b..e + "-----END CERTIFICATE-----".len()];
    let info = pgkeep::pki::inspect_pem(
        pem.as_bytes(),
        Path::new(addr),
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(norm(&info.serial))
}

/// Every TLS listener of the environment with the certificate file it must present.
struct Listeners {
    /// (label, address, name, postgres, certificate file)
    list: Vec<(String, String, String, bool, PathBuf)>,
}

impl Listeners {
    fn of(dir: &Path, inv: &Inventory) -> Listeners {
        let mut list = Vec::new();
        for h in &inv.database_hosts {
            let tls = dir.join("nodes").join(&h.name).join("tls");
            let fqdn = inv.fqdn(&h.name);
            list.push((
                format!("{} postgres", h.name),
                format!("{}:{}", h.address, h.pg_port),
                fqdn.clone(),
                true,
                tls.join(format!("postgres-{}.crt", h.name)),
            ));
            list.push((
                format!("{} restapi", h.name),
                format!("{}:{}", h.address, h.api_port),
                fqdn,
                false,
                tls.join(format!("restapi-{}.crt", h.name)),
            ));
            if let Some(port) = h.pgbackrest_port {
                list.push((
                    format!("{} pgbackrest", h.name),
                    format!("{}:{port}", h.address),
                    inv.fqdn(&h.name),
                    false,
                    tls.join(format!("pgbackrest-{}.crt", h.name)),
                ));
            }
        }
        if let Some(b) = &inv.backup_host {
            list.push((
                format!("{} pgbackrest", b.name),
                format!("{}:{}", b.address, b.port),
                inv.fqdn(&b.name),
                false,
                dir.join(format!("backup/tls/pgbackrest-{}.crt", b.name)),
            ));
        }
        for m in &inv.etcd_hosts {
            let crt = dir
                .join("etcd")
                .join(&m.name)
                .join("tls")
                .join(format!("etcd-server-{}.crt", m.name));
            for (what, port) in [("client", m.client_port), ("peer", m.peer_port)] {
                list.push((
                    format!("{} {what}", m.name),
                    format!("{}:{port}", m.address),
                    inv.fqdn(&m.name),
                    false,
                    crt.clone(),
                ));
            }
        }
        Listeners { list }
    }

    /// (label, presented serial, file serial) of every listener.
    fn check(&self, dir: &Path) -> Result<Vec<(String, String, String)>> {
        let ca = dir.join("pki/ca.crt");
        let op = (
            dir.join("pki/etcd-client-operator.crt"),
            dir.join("pki/etcd-client-operator.key"),
        );
        self.list
            .iter()
            .map(|(label, addr, name, pg, file)| {
                let got = openssl_serial(addr, name, &ca, *pg, Some((&op.0, &op.1)))
                    .with_context(|| label.clone())?;
                Ok((label.clone(), got, file_serial(file)?))
            })
            .collect()
    }
}

/// HAProxy's view of its client certificate (`show ssl cert`), as a serial.
fn haproxy_serial(dir: &Path, inv: &Inventory) -> Result<String> {
    let layout = pgkeep::local::Layout::new(dir)?;
    let lb = inv.load_balancer.as_ref().context("no load balancer")?;
    let pem = pgkeep::local::haproxy::client_pem(&layout, lb);
    let out = pgkeep::haproxy::stats::command(
        &layout.haproxy_socket(),
        &format!("show ssl cert {}", pem.display()),
        Duration::from_secs(2),
    )?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Serial:"))
        .map(norm)
        .with_context(|| format!("no Serial in {out}"))
}

/// etcd as the operator sees it: leader key, member keys' revisions, history.
struct EtcdView {
    leader: (String, i64),
    members: Vec<(String, i64)>,
    history: String,
}

fn etcd_view(dir: &Path, inv: &Inventory) -> Result<EtcdView> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let layout = pgkeep::local::Layout::new(dir)?;
        let settings = pgkeep::local::etcd::operator_settings(&layout, inv, inv.etcd_endpoints());
        let dcs = pgkeep::dcs::EtcdDcs::connect(&settings).await?;
        let base = dcs.base().to_owned();
        let mut c = dcs.client();
        let resp = c
            .get(
                format!("{base}/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await?;
        let mut leader = None;
        let mut members = Vec::new();
        let mut history = String::new();
        for kv in resp.kvs() {
            let key = kv.key_str()?.strip_prefix(&base).unwrap_or("").to_owned();
            if key == "/leader" {
                leader = Some((kv.value_str()?.to_owned(), kv.lease()));
            } else if let Some(m) = key.strip_prefix("/members/") {
                members.push((m.to_owned(), kv.mod_revision()));
            } else if key == "/history" {
                history = kv.value_str()?.to_owned();
            }
        }
        Ok(EtcdView {
            leader: leader.context("no leader key")?,
            members,
            history,
        })
    })
}

/// The agent's established connections to the etcd client ports (local port numbers).
fn etcd_connections(pid: u32, inv: &Inventory) -> Result<BTreeSet<String>> {
    let out = Command::new("ss").args(["-tnpH"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ports: Vec<String> = inv
        .etcd_hosts
        .iter()
        .map(|m| format!("{}:{}", m.address, m.client_port))
        .collect();
    Ok(text
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter(|l| ports.iter().any(|p| l.contains(p.as_str())))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect())
}

/// Writes through HAProxy's write port, a new TLS session (verify-full) for every write.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, Vec<String>, Duration)>,
}

impl Writer {
    fn start(dir: &Path, inv: &Inventory) -> Result<Writer> {
        let lb = inv.load_balancer.as_ref().context("no load balancer")?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(inv.fqdn(&lb.name))
            .hostaddr(lb.address)
            .port(lb.write_port)
            .user("app")
            .dbname("app")
            .password(std::fs::read_to_string(dir.join("secrets/app.pw"))?.trim())
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(2));
        // The trusted CAs are read for every connection, as libpq reads `sslrootcert`.
        let ca_file = dir.join("pki/ca.crt");
        let tls = move || -> Result<rustls::ClientConfig> {
            let mut roots = rustls::RootCertStore::empty();
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca_file)? {
                roots.add(c?)?;
            }
            Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth())
        };
        tls()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (mut oks, mut errors) = (0u64, Vec::new());
                let mut last_ok = Instant::now();
                let mut longest = Duration::ZERO;
                let mut first = true;
                while !flag.load(Ordering::Relaxed) {
                    let mk = tokio_postgres_rustls::MakeRustlsConnect::new(
                        tls().expect("reading the trusted CAs"),
                    );
                    let r = async {
                        let (c, conn) = cfg.connect(mk).await?;
                        tokio::spawn(conn);
                        if first {
                            c.batch_execute(
                                "CREATE TABLE IF NOT EXISTS rotate_probe (id bigserial, at timestamptz DEFAULT now())",
                            )
                            .await?;
                        }
                        c.execute("INSERT INTO rotate_probe DEFAULT VALUES", &[])
                            .await?;
                        Ok::<_, tokio_postgres::Error>(())
                    }
                    .await;
                    match r {
                        Ok(()) => {
                            first = false;
                            oks += 1;
                            longest = longest.max(last_ok.elapsed());
                            last_ok = Instant::now();
                        }
                        Err(e) => errors.push(format!("{e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (oks, errors, longest)
            })
        });
        Ok(Writer { stop, handle })
    }

    fn finish(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }
}

fn agent_log(dir: &Path, node: &str) -> String {
    std::fs::read_to_string(dir.join(format!("logs/{node}-agent.log"))).unwrap_or_default()
}

/// Waits until every member key was written again after `before`.
fn wait_member_updates(dir: &Path, inv: &Inventory, before: &EtcdView) -> Result<EtcdView> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = etcd_view(dir, inv)?;
        let stale: Vec<&String> = before
            .members
            .iter()
            .filter(|(m, rev)| !now.members.iter().any(|(n, r)| n == m && r > rev))
            .map(|(m, _)| m)
            .collect();
        if stale.is_empty() {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "member keys not written again after the rotation: {stale:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn rotate_renews_every_certificate_without_failover() -> Result<()> {
    let sc = Scenario::new("rot");
    sc.up(&[])?;
    wait_members(&sc)?;
    let inv = sc.inventory()?;
    let dir = sc.dir.clone();
    let listeners = Listeners::of(&dir, &inv);

    let before_certs = listeners.check(&dir)?;
    for (label, got, file) in &before_certs {
        ensure!(got == file, "{label} presents {got}, its file holds {file}");
    }
    let hx_before = haproxy_serial(&dir, &inv)?;
    let before = etcd_view(&dir, &inv)?;
    let leader = before.leader.0.clone();
    let leader_pid = sc.pid(&format!("{leader}-agent"))?;
    let conns_before = etcd_connections(leader_pid, &inv)?;
    let tl_before: Vec<Value> = sc.ctl_list()?;

    let writer = Writer::start(&dir, &inv)?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let out = ok(&["pki", "rotate", "--dir", sc.d()])?;
    let took = t0.elapsed();
    // Member keys are written when their data changes: the writes move every member's WAL
    // position, so each agent must write its key again, with its new etcd identity.
    let after = wait_member_updates(&dir, &inv, &before)?;
    std::thread::sleep(Duration::from_secs(2));
    let (oks, errors, longest) = writer.finish();
    eprintln!(
        "rotate took {took:?}; writer: {oks} writes, errors {errors:?}, longest gap {longest:?}"
    );
    // 8 per node, 3 etcd members, HAProxy's, the repository host's three (pgBackRest server
    // and client, the scheduler's etcd client), the operator's REST and etcd certificates,
    // etcd's root and patronictl's gateway certificates.
    ensure!(out.contains("Rotated 35 certificates"), "{out}");
    ensure!(
        errors.is_empty(),
        "writes failed during the rotation: {errors:?}"
    );
    ensure!(oks >= 20, "too few writes: {oks}");
    ensure!(
        longest < Duration::from_secs(2),
        "a write gap of {longest:?}"
    );

    // Every listener presents a new certificate, the one now in its file.
    let after_certs = listeners.check(&dir)?;
    for ((label, old, _), (_, new, file)) in before_certs.iter().zip(&after_certs) {
        ensure!(new == file, "{label} presents {new}, its file holds {file}");
        ensure!(new != old, "{label} still presents {old}");
    }
    // Archiving goes on through the restarted pgBackRest servers.
    ok(&["backup", "check", "--dir", sc.d()])?;
    let hx_after = haproxy_serial(&dir, &inv)?;
    let hx_file = file_serial(&dir.join("haproxy/haproxy-lb.crt"))?;
    ensure!(
        hx_after == hx_file && hx_after != hx_before,
        "HAProxy uses {hx_after} (before {hx_before}, file {hx_file})"
    );

    // No failover: the same leader on the same lease, the same timeline and history; every
    // agent keeps writing its member key.
    ensure!(
        after.leader == before.leader,
        "leader key {:?} -> {:?}",
        before.leader,
        after.leader
    );
    ensure!(after.history == before.history, "history changed");
    let tl_after = sc.ctl_list()?;
    let tl = |rows: &[Value]| -> Vec<(Value, Value, Value)> {
        rows.iter()
            .map(|r| (r["name"].clone(), r["role"].clone(), r["timeline"].clone()))
            .collect()
    };
    ensure!(
        tl(&tl_after) == tl(&tl_before),
        "{tl_after:?} vs {tl_before:?}"
    );
    crate::local::check_members(&tl_after)?;
    for h in &inv.database_hosts {
        let log = agent_log(&dir, &h.name);
        let serial =
            pgkeep::pki::inspect(&dir.join(format!("nodes/{0}/tls/etcd-client-{0}.crt", h.name)))?
                .serial;
        ensure!(
            log.contains(&format!(
                "etcd client certificate reloaded: new etcd connections use it serial={serial}"
            )),
            "{}: no etcd client reload of {serial} in its log",
            h.name
        );
        ensure!(!log.contains("NOT reloaded"), "{}: {log}", h.name);
    }
    // The leader's agent talks to etcd over connections made after the rotation.
    let conns_after = etcd_connections(leader_pid, &inv)?;
    ensure!(
        conns_after.difference(&conns_before).count() > 0,
        "no new etcd connection: {conns_before:?} -> {conns_after:?}"
    );

    // Safety: an etcd identity etcd refuses (another CA) is not taken; the leader keeps its
    // connections and its lease, and takes a good identity at the next rotation.
    let tls = dir.join(format!("nodes/{leader}/tls"));
    let (cert, key) = (
        tls.join(format!("etcd-client-{leader}.crt")),
        tls.join(format!("etcd-client-{leader}.key")),
    );
    let good_serial = file_serial(&cert)?;
    let rogue_ca = pgkeep::pki::Ca::create("rogue CA", 10)?;
    let rogue = rogue_ca.issue(&pgkeep::pki::CertRequest {
        common_name: format!("pgkeep-{leader}"),
        usage: pgkeep::pki::Usage::Client,
        dns_names: vec![],
        ip_addresses: vec![],
        validity_days: 2,
    })?;
    let pg = pgkeep::local::ServiceUser::postgres()?;
    pgkeep::pki::rotate::replace_pair(
        &rogue,
        &tls,
        &format!("etcd-client-{leader}"),
        Some((pg.uid, pg.gid)),
    )?;
    let writer = Writer::start(&dir, &inv)?;
    let mark = agent_log(&dir, &leader).len();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(leader_pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = agent_log(&dir, &leader);
        if log[mark..].contains("etcd client certificate NOT reloaded") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no refusal in the log: {}",
            &log[mark..]
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Several TTLs' worth of HA loops later the leader still holds the same lease.
    let mid = etcd_view(&dir, &inv)?;
    std::thread::sleep(Duration::from_secs(12));
    let later = wait_member_updates(&dir, &inv, &mid)?;
    ensure!(
        later.leader == before.leader,
        "the leader key moved: {:?}",
        later.leader
    );
    let (oks, errors, _) = writer.finish();
    ensure!(
        errors.is_empty() && oks > 20,
        "{oks} writes, errors {errors:?}"
    );
    ensure!(file_serial(&cert)? != good_serial);
    let _ = key;
    let out = ok(&["pki", "rotate", "--dir", sc.d(), "--service", "etcd-client"])?;
    // The three agents', the backup scheduler's and the operator's.
    ensure!(out.contains("Rotated 5 certificates"), "{out}");
    let last = etcd_view(&dir, &inv)?;
    ensure!(last.leader == before.leader, "{:?}", last.leader);
    Ok(())
}

/// Whether etcd serves the cluster's keys to the client certificate `cert`/`key` (verifying
/// etcd against the environment's trusted CAs).
fn etcd_accepts(dir: &Path, inv: &Inventory, cert: &Path, key: &Path) -> bool {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    rt.block_on(async {
        let Ok(layout) = pgkeep::local::Layout::new(dir) else {
            return false;
        };
        let mut settings =
            pgkeep::local::etcd::operator_settings(&layout, inv, inv.etcd_endpoints());
        if let Some(t) = settings.tls.as_mut() {
            t.cert = cert.to_path_buf();
            t.key = key.to_path_buf();
        }
        match tokio::time::timeout(Duration::from_secs(10), async {
            let dcs = pgkeep::dcs::EtcdDcs::connect(&settings).await?;
            pgkeep::dcs::Dcs::load(&dcs)
                .await
                .map(|s| s.view.leader.is_some())
        })
        .await
        {
            Ok(Ok(has_leader)) => has_leader,
            _ => false,
        }
    })
}

/// Each node's `pg_postmaster_start_time()`, through the superuser's Unix socket.
fn postmaster_starts(dir: &Path) -> Result<Vec<(String, String)>> {
    let cluster: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json"))?)?;
    let mut out = Vec::new();
    for m in cluster["members"].as_array().context("members")? {
        let name = m["name"].as_str().unwrap_or_default().to_owned();
        let conn = m["superuser_libpq"].as_str().context("superuser_libpq")?;
        let o = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "/usr/lib/postgresql/15/bin/psql",
                conn,
            ])
            .args(["-XAtq", "-c", "SELECT pg_postmaster_start_time()"])
            .output()?;
        ensure!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.push((name, String::from_utf8_lossy(&o.stdout).trim().to_owned()));
    }
    Ok(out)
}

#[test]
fn a_ca_rollover_keeps_the_cluster_serving_and_then_refuses_the_old_ca() -> Result<()> {
    let sc = Scenario::new("carot");
    sc.up(&[])?;
    wait_members(&sc)?;
    let inv = sc.inventory()?;
    let dir = sc.dir.clone();
    let listeners = Listeners::of(&dir, &inv);
    let before = etcd_view(&dir, &inv)?;
    let tl_before = sc.ctl_list()?;
    let starts_before = postmaster_starts(&dir)?;
    let old_ca = std::fs::read_to_string(dir.join("pki/ca.crt"))?;
    // A client certificate of the old CA, kept aside.
    let (old_cert, old_key) = (dir.join("old-operator.crt"), dir.join("old-operator.key"));
    std::fs::copy(dir.join("pki/etcd-client-operator.crt"), &old_cert)?;
    std::fs::copy(dir.join("pki/etcd-client-operator.key"), &old_key)?;
    ensure!(
        etcd_accepts(&dir, &inv, &old_cert, &old_key),
        "etcd refuses the operator"
    );

    let writer = Writer::start(&dir, &inv)?;
    std::thread::sleep(Duration::from_secs(2));
    let old_issuer = pgkeep::pki::inspect(&dir.join("pki/ca.crt"))?.subject;
    ok(&["pki", "rotate", "--ca", "--dir", sc.d()])?;
    // Both CAs trusted, the new one first; the certificates are still the old CA's.
    let bundle = std::fs::read_to_string(dir.join("pki/ca.crt"))?;
    ensure!(
        bundle.matches("BEGIN CERTIFICATE").count() == 2 && bundle.ends_with(&old_ca),
        "{bundle}"
    );
    for (label, _, _, _, file) in &listeners.list {
        let issuer = pgkeep::pki::inspect(file)?.issuer;
        ensure!(
            issuer == old_issuer,
            "{label}: issued by {issuer} before the re-issue"
        );
    }
    // Finishing before the certificates were issued again is refused.
    let early = crate::local::pgkeep(&["pki", "rotate", "--ca", "--finish", "--dir", sc.d()]);
    ensure!(
        !early.status.success()
            && String::from_utf8_lossy(&early.stderr).contains("still the old CA's"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let out = ok(&["pki", "rotate", "--dir", sc.d()])?;
    ensure!(out.contains("Rotated 35 certificates"), "{out}");
    // Every listener presents a certificate of the new CA (verified by openssl against the
    // bundle).
    let new_ca = pgkeep::pki::inspect(&dir.join("pki/ca.crt"))?;
    for (label, got, file) in listeners.check(&dir)? {
        ensure!(got == file, "{label} presents {got}, its file holds {file}");
    }
    for (label, _, _, _, file) in &listeners.list {
        let issuer = pgkeep::pki::inspect(file)?.issuer;
        ensure!(issuer == new_ca.subject, "{label}: issued by {issuer}");
    }
    ensure!(
        etcd_accepts(&dir, &inv, &old_cert, &old_key),
        "during the rollover the old CA's certificates must still be accepted"
    );
    ok(&["backup", "check", "--dir", sc.d()])?;

    let sched_log = dir.join("logs/backup-scheduler.log");
    let sched_mark = std::fs::metadata(&sched_log)?.len() as usize;
    let out = ok(&["pki", "rotate", "--ca", "--finish", "--dir", sc.d()])?;
    ensure!(out.contains("rollover is complete"), "{out}");
    let only = std::fs::read_to_string(dir.join("pki/ca.crt"))?;
    ensure!(
        only.matches("BEGIN CERTIFICATE").count() == 1 && bundle.starts_with(&only),
        "{only}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (oks, errors, longest) = writer.finish();
    eprintln!("writer: {oks} writes, errors {errors:?}, longest gap {longest:?}");
    ensure!(
        errors.is_empty(),
        "writes failed during the rollover: {errors:?}"
    );
    ensure!(
        longest < Duration::from_secs(3),
        "a write gap of {longest:?}"
    );

    // The old CA is refused; everything else works with the new one.
    ensure!(
        !etcd_accepts(&dir, &inv, &old_cert, &old_key),
        "etcd still accepts a certificate of the old CA"
    );
    let curl = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(dir.join("pki/ca.crt"))
        .arg("--cert")
        .arg(&old_cert)
        .arg("--key")
        .arg(&old_key)
        .arg(format!(
            "https://{}:{}/patroni",
            inv.fqdn(&inv.database_hosts[0].name),
            inv.database_hosts[0].api_port
        ))
        .output()?;
    let code = String::from_utf8_lossy(&curl.stdout).to_string();
    ensure!(
        !curl.status.success() || code.starts_with('4'),
        "the REST API accepted a certificate of the old CA: {code}"
    );
    for (label, got, file) in listeners.check(&dir)? {
        ensure!(got == file, "{label} presents {got}, its file holds {file}");
    }
    ok(&["backup", "check", "--dir", sc.d()])?;
    let pctl = Command::new("patronictl")
        .args([
            "-c",
            dir.join("patronictl.yml").to_str().unwrap_or_default(),
            "list",
        ])
        .output()?;
    ensure!(
        pctl.status.success(),
        "patronictl: {}",
        String::from_utf8_lossy(&pctl.stderr)
    );

    // The backup scheduler (one etcd connection for its life) was started again with the new
    // files, and its first check reads etcd.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&sched_log)?;
        let since = text.get(sched_mark..).unwrap_or_default().to_owned();
        if since.contains("backup scheduler started") {
            std::thread::sleep(Duration::from_secs(3));
            let text = std::fs::read_to_string(&sched_log)?;
            let since = text.get(sched_mark..).unwrap_or_default();
            ensure!(!since.contains("check failed"), "{since}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the scheduler was not started again: {since}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // No failover, no PostgreSQL restart.
    let after = etcd_view(&dir, &inv)?;
    ensure!(
        after.leader == before.leader,
        "{:?} -> {:?}",
        before.leader,
        after.leader
    );
    ensure!(after.history == before.history, "history changed");
    let tl = |rows: &[Value]| -> Vec<(Value, Value, Value)> {
        rows.iter()
            .map(|r| (r["name"].clone(), r["role"].clone(), r["timeline"].clone()))
            .collect()
    };
    let tl_after = sc.ctl_list()?;
    ensure!(
        tl(&tl_after) == tl(&tl_before),
        "{tl_after:?} vs {tl_before:?}"
    );
    crate::local::check_members(&tl_after)?;
    ensure!(
        postmaster_starts(&dir)? == starts_before,
        "a PostgreSQL restarted"
    );
    Ok(())
}
