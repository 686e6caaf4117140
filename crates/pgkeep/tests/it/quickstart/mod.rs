//! The quick start end to end on one real local cluster: a single `pgkeep up`, then the
//! acceptance checks of the quick-start issue that `local.rs` does not cover yet:
//!
//! - health endpoints by role, for the operator (CA, client certificate, basic auth) and for an
//!   anonymous caller, whose answers name nothing;
//! - an application row written on the primary over verified TLS is read on both replicas, and
//!   every node presents its own server certificate;
//! - no plaintext anywhere (PostgreSQL, REST API, etcd) and no superuser over TCP;
//! - garbage in the DCS is ignored and logged while the agents keep serving;
//! - a killed agent is the only one `up` restarts, and it adopts the running PostgreSQL;
//! - an emptied data directory of an initialised cluster is cloned, never initialised;
//! - `up` after an agent was stopped succeeds every time (repeated: a regression check).
//!
//! One cluster for all of it keeps CI time low. Each named check runs even when an earlier one
//! failed (as long as the cluster is up) and the test fails at the end with the list of failed
//! checks. The `Scenario` guard purges the environment however the test ends.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::local::{Scenario, alive, check_members, wait_members};

use support::*;

#[test]
fn quickstart_cluster_is_secure_replicates_and_survives_bad_input_and_restarts() -> Result<()> {
    let t0 = Instant::now();
    let sc = Scenario::new("quick");
    let mut checks = Checks::default();

    // `up` must succeed; when it does not, this check fails and a second `up` (every agent then
    // running) lets the remaining checks run.
    let up_ok = checks.run("up brings a healthy cluster", || {
        let out = sc.up(&[])?;
        ensure!(out.contains("is healthy"), "{out}");
        Ok(())
    });
    if !up_ok {
        sc.up(&[])
            .context("a second up did not bring a healthy cluster")?;
    }
    wait_members(&sc)?;
    let q = Quick::new(&sc)?;
    let rows = sc.ctl_list()?;
    let leader = rows
        .iter()
        .find(|r| r["role"] == "leader")
        .and_then(|r| r["name"].as_str())
        .context("no leader in ctl list")?
        .to_owned();
    let mut replicas: Vec<String> = rows
        .iter()
        .filter(|r| r["role"] == "replica")
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    replicas.sort();
    ensure!(replicas.len() == 2, "{rows:?}");
    eprintln!(
        "leader {leader}, replicas {replicas:?} ({:.1}s after start)",
        t0.elapsed().as_secs_f64()
    );
    let leader_addr = q.host(&leader).address.to_string();

    // ---- 1. Health endpoints, replication, per-node certificates --------------------------

    checks.run(
        "GET /primary is 200 on the leader and 503 on replicas, /replica the reverse \
         (operator and anonymous); anonymous answers name nothing",
        || {
            let mut secret_names = q.names();
            secret_names.push(sc.cluster.clone());
            for n in q.names() {
                let lead = n == leader;
                for (path, want) in [
                    ("/primary", if lead { 200 } else { 503 }),
                    ("/replica", if lead { 503 } else { 200 }),
                ] {
                    let r = q.get(&q.operator, &n, path)?;
                    ensure!(
                        r.status == want,
                        "operator GET {path} on {n}: {} (want {want}): {}",
                        r.status,
                        r.text()
                    );
                    // The operator is authenticated: the answer is the member's full status.
                    let v: Value = r.json().with_context(|| format!("{path} on {n}"))?;
                    ensure!(
                        v["patroni"]["name"] == n.as_str()
                            && v["patroni"]["scope"] == sc.cluster.as_str(),
                        "operator GET {path} on {n} is not {n}'s status: {v}"
                    );
                    let a = q.get(&q.anonymous, &n, path)?;
                    ensure!(
                        a.status == want,
                        "anonymous GET {path} on {n}: {} (want {want}): {}",
                        a.status,
                        a.text()
                    );
                    let body = a.text();
                    for s in &secret_names {
                        ensure!(
                            !body.contains(s.as_str()),
                            "anonymous GET {path} on {n} reveals {s:?}: {body}"
                        );
                    }
                }
            }
            Ok(())
        },
    );

    let token = format!(
        "quick-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos()
    );
    let row_written = checks.run(
        "a row written on the primary as app (TCP, verify-full, passfile) is read on both replicas",
        || {
            let app = q.cluster["libpq"]["app"].as_str().context("libpq.app")?;
            ensure!(app.contains("sslmode=verify-full") && app.contains("passfile="));
            let insert = format!("INSERT INTO quickstart VALUES ('{token}')");
            let got = psql_ok(
                app,
                &[
                    "CREATE TABLE IF NOT EXISTS quickstart (token text PRIMARY KEY)",
                    &insert,
                    "SELECT host(inet_server_addr()), pg_is_in_recovery(), current_user, s.ssl \
                     FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
                ],
            )?;
            ensure!(
                got == format!("{leader_addr}|f|app|t"),
                "the write went to {got:?}, not the leader {leader} ({leader_addr}) over TLS as app"
            );
            let read = format!(
                "SELECT host(inet_server_addr()), pg_is_in_recovery(), count(*) \
                 FROM quickstart WHERE token = '{token}'"
            );
            for r in &replicas {
                let want = format!("{}|t|1", q.host(r).address);
                wait_for(&format!("the row on {r}"), Duration::from_secs(15), || {
                    let got = psql_ok(&q.app_on(r), &[&read])?;
                    ensure!(got == want, "{r}: {got:?}, want {want:?}");
                    Ok(())
                })?;
            }
            Ok(())
        },
    );

    checks.run(
        "pgaudit logs the DDL; no log under the environment holds a role's plain-text \
         password; PostgreSQL's log is outside the data directory and owner-only, no log is world-readable",
        || {
            let log = sc.dir.join(format!("nodes/{leader}/conf/postgresql.log"));
            wait_for("an AUDIT line for the DDL", Duration::from_secs(10), || {
                let text = std::fs::read_to_string(&log)
                    .with_context(|| format!("reading {}", log.display()))?;
                ensure!(
                    text.lines().any(|l| l.contains("AUDIT: SESSION")
                        && l.contains("DDL")
                        && l.contains("CREATE TABLE")),
                    "no AUDIT line for CREATE TABLE in {}",
                    log.display()
                );
                Ok(())
            })?;
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log)?.permissions());
            ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", log.display());
            ensure!(
                !log.starts_with(q.data_dir(&leader)?),
                "the log is in the data directory"
            );
            let mut secrets = Vec::new();
            for role in ["app", "admin"] {
                let pw = std::fs::read_to_string(sc.dir.join(format!("secrets/{role}.pw")))?;
                ensure!(
                    pw.trim().len() >= 16,
                    "{role}'s password is too short to search for"
                );
                secrets.push(pw.trim().to_owned());
            }
            let mut stack = vec![sc.dir.join("logs"), sc.dir.join("nodes")];
            let mut scanned = 0;
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d)? {
                    let p = e?.path();
                    if p.is_dir() {
                        if !p.ends_with("data") {
                            stack.push(p);
                        }
                    } else if p.extension().is_some_and(|x| x == "log") {
                        let text = String::from_utf8_lossy(&std::fs::read(&p)?).into_owned();
                        scanned += 1;
                        let mode = std::os::unix::fs::PermissionsExt::mode(
                            &std::fs::metadata(&p)?.permissions(),
                        );
                        ensure!(
                            mode & 0o007 == 0,
                            "{} is readable by others (mode {mode:o})",
                            p.display()
                        );
                        for s in &secrets {
                            ensure!(
                                !text.contains(s.as_str()),
                                "{} holds a password",
                                p.display()
                            );
                        }
                    }
                }
            }
            ensure!(scanned >= 4, "only {scanned} log files found");
            Ok(())
        },
    );

    checks.run(
        "each replica presents its own server certificate: verify-full with the leader's name \
         fails with a host-name mismatch, its own name succeeds",
        || {
            let wrong_name = q.inv.fqdn(&leader);
            for r in &replicas {
                let err = psql_refused(&q.libpq(r, &wrong_name, "app", "verify-full"))?;
                ensure!(
                    err.contains("does not match host name")
                        && err.contains(&format!("\"{wrong_name}\"")),
                    "{r} with the name {wrong_name}: not a host-name mismatch: {err}"
                );
                let got = psql_ok(
                    &q.app_on(r),
                    &["SELECT host(inet_server_addr()), pg_is_in_recovery()"],
                )?;
                ensure!(
                    got == format!("{}|t", q.host(r).address),
                    "{r} under its own name: {got:?}"
                );
            }
            Ok(())
        },
    );

    // ---- 2. No plaintext anywhere -----------------------------------------------------------

    checks.run("sslmode=disable is refused on every node (pg_hba)", || {
        for n in q.names() {
            let err = psql_refused(&q.libpq(&n, &q.inv.fqdn(&n), "app", "disable"))?;
            ensure!(
                err.contains("pg_hba.conf rejects connection") && err.contains("no encryption"),
                "{n}: a plaintext connection was not refused by pg_hba: {err}"
            );
        }
        Ok(())
    });

    checks.run(
        "plaintext http:// to every REST API port gets no HTTP response",
        || {
            for n in q.names() {
                let h = q.host(&n);
                let addr = SocketAddr::new(h.address, h.api_port);
                let got = plaintext_http(addr, &format!("{}:{}", q.inv.fqdn(&n), h.api_port))?;
                eprintln!(
                    "plaintext GET to {n} ({addr}) got {} bytes: {:?}",
                    got.len(),
                    String::from_utf8_lossy(&got[..got.len().min(80)])
                );
                ensure!(
                    !got.starts_with(b"HTTP/")
                        && !String::from_utf8_lossy(&got).contains("HTTP/1."),
                    "{n}: plaintext HTTP got an HTTP answer: {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            Ok(())
        },
    );

    checks.run(
        "etcd refuses a client without a certificate and serves the operator's",
        || {
            let prefix = format!("{}{}/", q.inv.namespace, sc.cluster);
            let before = q.etcd_no_cert_refusals();
            let out = q.etcdctl(false, &["get", "--prefix", "--keys-only", &prefix])?;
            ensure!(
                !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(&prefix),
                "etcdctl without a client certificate read the cluster"
            );
            wait_for(
                "etcd logging the refused handshake",
                Duration::from_secs(5),
                || {
                    ensure!(
                        q.etcd_no_cert_refusals() > before,
                        "no etcd member logged {ETCD_NO_CERT:?}"
                    );
                    Ok(())
                },
            )?;
            let out = q.etcdctl(true, &["get", "--prefix", "--keys-only", &prefix])?;
            let keys = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "etcdctl with the operator certificate failed"
            );
            let mut want = vec![format!("{prefix}leader")];
            want.extend(q.names().iter().map(|n| format!("{prefix}members/{n}")));
            for k in want {
                ensure!(keys.lines().any(|l| l == k), "no key {k} in: {keys}");
            }
            Ok(())
        },
    );

    checks.run(
        "the superuser postgres cannot log in over TCP, even with verify-full TLS",
        || {
            for n in q.names() {
                let err = psql_refused(&q.libpq(&n, &q.inv.fqdn(&n), "postgres", "verify-full"))?;
                ensure!(
                    err.contains("pg_hba.conf rejects connection")
                        && err.contains("user \"postgres\"")
                        && err.contains("SSL encryption"),
                    "{n}: postgres over TLS was not rejected by pg_hba: {err}"
                );
            }
            Ok(())
        },
    );

    // ---- 3. Bad input -------------------------------------------------------------------------

    checks.run(
        "garbage in a member key: the leader logs that it ignores it, the agents keep serving",
        || {
            let pids = q.agent_pids()?;
            let offset = q.log_len(&leader);
            let key = format!("{}{}/members/garbage", q.inv.namespace, sc.cluster);
            let out = q.etcdctl(true, &["put", &key, "{not json"])?;
            ensure!(out.status.success(), "etcdctl put {key} failed");
            wait_for(
                "the leader logging the unparsable value",
                Duration::from_secs(10),
                || {
                    let log = q.log_since(&leader, offset);
                    ensure!(
                        log.lines()
                            .any(|l| l.contains(DCS_GARBAGE) && l.contains("members/garbage")),
                        "{leader}'s log has no {DCS_GARBAGE:?} for members/garbage:\n{log}"
                    );
                    Ok(())
                },
            )?;
            // Two HA loops (loop_wait 2 s) with the garbage in place.
            std::thread::sleep(Duration::from_secs(4));
            let r = q.get(&q.operator, &leader, "/primary")?;
            ensure!(r.status == 200, "/primary on {leader}: {}", r.status);
            ensure!(
                q.agent_pids()? == pids,
                "an agent died or was replaced after the garbage"
            );
            let rows = sc.ctl_list()?;
            check_members(&rows)?;
            let mut names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
            names.sort_unstable();
            ensure!(names == q.names(), "ctl list shows {names:?}");
            Ok(())
        },
    );

    // ---- 4. A killed agent: up restarts only it, and it adopts PostgreSQL -------------------

    let killed = replicas[0].clone();
    // (agents' pids before the kill, the victim's postmaster)
    let mut kill_state: Option<(BTreeMap<String, u32>, u32)> = None;
    checks.run(
        &format!("SIGKILL of {killed}'s agent leaves its PostgreSQL running"),
        || {
            let before = q.agent_pids()?;
            let postmaster = q.postmaster(&killed)?;
            let pid = before[&killed];
            signal(pid, Signal::SIGKILL)?;
            wait_for("the killed agent gone", Duration::from_secs(10), || {
                ensure!(!alive(pid), "agent {pid} still alive");
                Ok(())
            })?;
            ensure!(
                alive(postmaster),
                "{killed}'s PostgreSQL died with its agent"
            );
            kill_state = Some((before, postmaster));
            Ok(())
        },
    );
    checks.run(
        &format!("up after the SIGKILL succeeds and starts {killed}'s agent only"),
        || {
            kill_state.as_ref().context("the SIGKILL step failed")?;
            q.up_starts_only(&killed)
        },
    );
    checks.run(
        &format!("{killed}'s agent has a new pid, the other agents' pids are unchanged"),
        || {
            let (before, _) = kill_state.as_ref().context("the SIGKILL step failed")?;
            q.only_restarted(&killed, before)
        },
    );
    checks.run(
        &format!(
            "{killed}'s new agent adopted its running PostgreSQL (same postmaster pid) and \
             serves it as a streaming replica"
        ),
        || {
            let (_, postmaster) = kill_state.as_ref().context("the SIGKILL step failed")?;
            wait_for(
                &format!("{killed} serving as a streaming replica"),
                Duration::from_secs(20),
                || {
                    let r = q.get(&q.operator, &killed, "/replica")?;
                    let v: Value = r.json()?;
                    ensure!(
                        r.status == 200 && v["replication_state"] == "streaming",
                        "/replica on {killed}: {} {v}",
                        r.status
                    );
                    Ok(())
                },
            )?;
            let now = q.postmaster(&killed)?;
            ensure!(
                now == *postmaster,
                "{killed}'s PostgreSQL was restarted, not adopted: postmaster {postmaster} -> {now}"
            );
            Ok(())
        },
    );

    // ---- 3b. An emptied data directory of an initialised cluster: clone, never initdb --------

    let wiped = replicas[1].clone();
    // (agents' pids before the stop, the agent log's length after it)
    let mut wipe_state: Option<(BTreeMap<String, u32>, u64)> = None;
    checks.run(
        &format!(
            "{wiped}'s agent stops gracefully on SIGTERM, its PostgreSQL with it, and its data \
             directory is emptied"
        ),
        || {
            let before = q.agent_pids()?;
            let postmaster = q.postmaster(&wiped)?;
            q.stop_agent(&wiped, Some(postmaster))?;
            let log = q.log_since(&wiped, 0);
            ensure!(
                log.trim_end().ends_with("agent stopped"),
                "{wiped}'s agent did not log a clean stop:\n{log}"
            );
            let data = q.data_dir(&wiped)?;
            ensure!(
                data.join("PG_VERSION").exists(),
                "{} holds no cluster",
                data.display()
            );
            for e in fs::read_dir(&data)? {
                let p = e?.path();
                if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p)?;
                } else {
                    fs::remove_file(&p)?;
                }
            }
            ensure!(fs::read_dir(&data)?.next().is_none());
            wipe_state = Some((before, q.log_len(&wiped)));
            Ok(())
        },
    );
    checks.run(
        &format!("up after emptying {wiped}'s data directory succeeds and starts its agent only"),
        || {
            wipe_state
                .as_ref()
                .context("the stop and wipe step failed")?;
            q.up_starts_only(&wiped)
        },
    );
    checks.run(
        &format!("{wiped}'s agent has a new pid, the other agents' pids are unchanged"),
        || {
            let (before, _) = wipe_state
                .as_ref()
                .context("the stop and wipe step failed")?;
            q.only_restarted(&wiped, before)
        },
    );
    checks.run(
        &format!(
            "{wiped} with an empty data directory is cloned from the leader and streams again; \
             its agent never runs initdb"
        ),
        || {
            let (_, offset) = wipe_state
                .as_ref()
                .context("the stop and wipe step failed")?;
            wait_members(&sc)?;
            wait_for(
                &format!("the leader streaming to {wiped}"),
                Duration::from_secs(20),
                || {
                    let v = q.status(&leader)?;
                    let streams = v["replication"].as_array().is_some_and(|rs| {
                        rs.iter().any(|r| {
                            r["application_name"] == wiped.as_str() && r["state"] == "streaming"
                        })
                    });
                    ensure!(streams, "{leader} does not stream to {wiped}: {v}");
                    Ok(())
                },
            )?;
            let log = q.log_since(&wiped, *offset);
            ensure!(
                log.contains("cloning"),
                "{wiped}'s agent log since the restart does not mention cloning:\n{log}"
            );
            ensure!(
                !log.to_lowercase().contains("initdb"),
                "{wiped}'s agent ran (or considered) initdb:\n{log}"
            );
            let id = &q.status(&leader)?["database_system_identifier"];
            let mine = &q.status(&wiped)?["database_system_identifier"];
            ensure!(
                id.is_string() && id == mine,
                "{wiped} has system identifier {mine}, the leader {id}"
            );
            if row_written {
                let got = psql_ok(
                    &q.app_on(&wiped),
                    &[&format!(
                        "SELECT count(*) FROM quickstart WHERE token = '{token}'"
                    )],
                )?;
                ensure!(
                    got == "1",
                    "the row written earlier is not on {wiped}: {got:?}"
                );
            }
            Ok(())
        },
    );

    // ---- up after an agent restart, repeated --------------------------------------------------

    // Regression: `up` used to judge an agent it had just started while the PID still showed
    // the launcher (setsid, setpriv), and reported it as exited. `spawn::start` now waits for
    // the exec. Repeating the restart makes a relapse show.
    checks.run(
        &format!(
            "up_after_stop_is_reliable: up after {wiped}'s agent was stopped succeeds every time \
             ({UP_ROUNDS} rounds)"
        ),
        || {
            for round in 1..=UP_ROUNDS {
                q.stop_agent(&wiped, None)?;
                if let Err(e) = q.up_starts_only(&wiped) {
                    // Tell a spurious "exited" from a real one.
                    std::thread::sleep(Duration::from_secs(1));
                    let agent = q
                        .agent_pids()
                        .map(|p| format!("{wiped}'s agent runs as pid {}", p[&wiped]))
                        .unwrap_or_else(|e| format!("{e:#}"));
                    bail!("round {round}: up failed ({agent}): {e:#}");
                }
            }
            Ok(())
        },
    );

    eprintln!(
        "quickstart: {} checks failed, {:.1}s in all",
        checks.failed.len(),
        t0.elapsed().as_secs_f64()
    );
    if !checks.failed.is_empty() {
        bail!("failed checks:\n- {}", checks.failed.join("\n- "));
    }
    Ok(())
}
