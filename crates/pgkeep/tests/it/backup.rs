//! pgBackRest in `pgkeep up`: a repository host over TLS, archiving from the nodes, backups,
//! across a switchover; against real pgBackRest, PostgreSQL and etcd.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::local::{Scenario, ok};

pub(crate) fn psql(conn: &str, sql: &str) -> Result<String> {
    let out = Command::new("/usr/lib/postgresql/15/bin/psql")
        .args([conn, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()?;
    ensure!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Stops the repository host's `pgbackrest server` (the repository becomes unreachable).
pub(crate) fn stop_repository_server(d: &Path) -> Result<()> {
    let pid: i32 = fs::read_to_string(d.join("run/backup-pgbackrest.pid"))?
        .trim()
        .parse()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    Ok(())
}

/// Node `name`'s superuser connection string (Unix socket, peer) from `cluster.json`, for `db`.
pub(crate) fn superuser_conn(cluster: &Value, name: &str, db: &str) -> Result<String> {
    Ok(cluster["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .and_then(|m| m["superuser_libpq"].as_str())
        .with_context(|| format!("no superuser libpq string for {name}"))?
        .replace("dbname=postgres", &format!("dbname={db}")))
}

/// Runs each of `sqls` with psql as the `postgres` OS user on `conn`; the last one's rows.
pub(crate) fn su_psql(conn: &str, sqls: &[&str]) -> Result<String> {
    let mut cmd = Command::new("runuser");
    cmd.args([
        "-u",
        "postgres",
        "--",
        "/usr/lib/postgresql/15/bin/psql",
        conn,
    ])
    .args(["-XAtq", "-v", "ON_ERROR_STOP=1"]);
    for s in sqls {
        cmd.args(["-c", s]);
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "psql {sqls:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs pgBackRest as `user` with `config_path`, returns (success, stdout + stderr).
fn pgbackrest(user: &str, config_path: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "/usr/bin/pgbackrest"])
        .arg(format!("--config-path={}", config_path.display()))
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(p.display().to_string());
            }
        }
    }
    Ok(found)
}

/// Polls `f` every second for up to 90 s.
pub(crate) fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(90) {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("timed out waiting for {what} {last}")
}

/// The environment's `cluster.json`.
pub(crate) fn cluster_json(sc: &Scenario) -> Result<Value> {
    Ok(serde_json::from_str(&fs::read_to_string(
        sc.dir.join("cluster.json"),
    )?)?)
}

/// The member that holds the leader key, from `ctl list`.
pub(crate) fn leader_name(sc: &Scenario) -> Result<String> {
    sc.ctl_list()?
        .into_iter()
        .find(|r| r["role"] == "leader")
        .and_then(|r| r["name"].as_str().map(str::to_owned))
        .context("no leader")
}

fn stanza_json(sc: &Scenario) -> Result<Value> {
    let out = ok(&["backup", "list", "--dir", sc.d(), "--format", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn up_archives_to_an_encrypted_tls_repository_and_backs_up_across_a_switchover() -> Result<()> {
    let sc = Scenario::new("bk");
    let out = sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    ensure!(out.contains("pgBackRest stanza, archive check"), "{out}");
    let d = &sc.dir;
    let inv = sc.inventory()?;
    let cluster: Value = cluster_json(&sc)?;
    let app = cluster["libpq"]["app"].as_str().context("app libpq")?;

    // The passphrase: 0600, owned by the repository's user, on the repository host only.
    let cipher = d.join("backup/conf/conf.d/cipher.conf");
    let m = fs::metadata(&cipher)?;
    ensure!(m.permissions().mode() & 0o777 == 0o600, "cipher.conf mode");
    let pgbr_uid = nix::unistd::User::from_name("pgbackrest")?
        .context("pgbackrest user")?
        .uid
        .as_raw();
    ensure!(m.uid() == pgbr_uid, "cipher.conf owner {}", m.uid());
    let pass = fs::read_to_string(d.join("secrets/pgbackrest-cipher.pw"))?;
    for n in ["node1", "node2", "node3"] {
        let conf = fs::read_to_string(d.join(format!("nodes/{n}/pgbackrest/pgbackrest.conf")))?;
        ensure!(
            !conf.contains("cipher") && !conf.contains(pass.trim()),
            "{n} holds the passphrase"
        );
        ensure!(
            conf.contains("tls-server-auth=pgbackrest-client-backup=") && !conf.contains("=*"),
            "{n}: {conf}"
        );
    }

    // A marker row reaches the data files and the WAL in plain text, the repository never.
    let marker = format!("pgkeep-marker-{}", std::process::id());
    psql(
        app,
        &format!(
            "CREATE TABLE secret_rows(t text); \
             INSERT INTO secret_rows SELECT '{marker}-' || g FROM generate_series(1, 2000) g"
        ),
    )?;
    ok(&["backup", "run", "--dir", sc.d(), "--type", "full"])?;
    ok(&["backup", "check", "--dir", sc.d()])?;
    let leader = leader_name(&sc)?;
    let plain = files_containing(&d.join(format!("nodes/{leader}/data")), marker.as_bytes())?;
    ensure!(!plain.is_empty(), "the marker is not in {leader}'s files");
    let leaked = files_containing(&d.join("backup/repo"), marker.as_bytes())?;
    ensure!(
        leaked.is_empty(),
        "plain text in the repository: {leaked:?}"
    );
    let s = stanza_json(&sc)?;
    ensure!(s["cipher"] == "aes-256-cbc", "{s}");
    ensure!(s["backups"].as_array().map(Vec::len) == Some(1), "{s}");
    let verify = ok(&["backup", "verify", "--dir", sc.d()])?;
    ensure!(
        verify.contains("status: ok") && verify.contains("status: valid"),
        "{verify}"
    );

    // A replica re-created (reinit) comes from the repository, then streams.
    let replica = if leader == "node3" { "node2" } else { "node3" };
    ok(&[
        "ctl",
        "--dir",
        sc.d(),
        "reinit",
        replica,
        "--force",
        "--wait",
    ])?;
    let since_reinit = || -> Result<String> {
        let log = fs::read_to_string(d.join(format!("logs/{replica}-agent.log")))?;
        Ok(log
            .rsplit("reason=reinitialize requested")
            .next()
            .unwrap_or_default()
            .to_owned())
    };
    wait_for("the re-created replica", || {
        let after = since_reinit()?;
        Ok(
            after.contains("replica restored from the pgBackRest repository")
                || after.contains("cloning with pg_basebackup"),
        )
    })?;
    let after = since_reinit()?;
    ensure!(
        after.contains("replica restored from the pgBackRest repository")
            && !after.contains("cloning with pg_basebackup"),
        "{replica} was not restored from the repository:\n{after}"
    );
    crate::local::wait_members(&sc)?;

    // Archiving health: the leader publishes it; a dead repository shows as failing in
    // `ctl list` and the agent's log, and as working again once the repository is back.
    let archive_of_leader = |sc: &Scenario| -> Result<Value> {
        let rows = sc.ctl_list()?;
        Ok(rows
            .into_iter()
            .find(|r| r["role"] == "leader")
            .map(|r| r["archive"].clone())
            .unwrap_or(Value::Null))
    };
    wait_for("the leader to publish its archiving", || {
        let a = archive_of_leader(&sc)?;
        Ok(a["failing"] == false && a["last_archived_wal"].is_string())
    })?;
    stop_repository_server(d)?;
    let su = superuser_conn(&cluster, &leader, "postgres")?;
    let switch_wal = || -> Result<()> {
        psql(app, "INSERT INTO secret_rows VALUES ('switch')")?;
        su_psql(&su, &["SELECT pg_switch_wal()"])?;
        Ok(())
    };
    switch_wal()?;
    wait_for("archiving to fail with the repository down", || {
        Ok(archive_of_leader(&sc)?["failing"] == true)
    })?;
    let log_of = |n: &str| fs::read_to_string(d.join(format!("logs/{n}-agent.log")));
    ensure!(
        log_of(&leader)?.contains("WAL archiving is failing"),
        "no warning in {leader}'s log"
    );
    let table = ok(&["ctl", "--dir", sc.d(), "list"])?;
    ensure!(
        table.contains(&format!("Archive {leader}: FAILING")),
        "{table}"
    );
    // `up` again starts what is missing: the repository's server.
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    wait_for("archiving to work again", || {
        switch_wal()?;
        Ok(archive_of_leader(&sc)?["failing"] == false)
    })?;
    ensure!(
        log_of(&leader)?.contains("WAL archiving works again"),
        "no recovery line in {leader}'s log"
    );

    // The repository's server: a client certificate from the cluster CA that is not on its
    // list is refused; the node's own certificate is let in.
    let node_cfg = d.join("nodes/node1/pgbackrest");
    let tls = d.join("nodes/node1/tls");
    let wrong = [
        format!(
            "--repo1-host-cert-file={}",
            tls.join("restapi-client-node1.crt").display()
        ),
        format!(
            "--repo1-host-key-file={}",
            tls.join("restapi-client-node1.key").display()
        ),
    ];
    let stanza = format!("--stanza={}", inv.cluster);
    let (_, refused) = pgbackrest(
        "postgres",
        &node_cfg,
        &[&stanza, &wrong[0], &wrong[1], "info", "--output=json"],
    )?;
    ensure!(
        refused.contains("access denied"),
        "wrong certificate: {refused}"
    );
    let (_, allowed) = pgbackrest("postgres", &node_cfg, &[&stanza, "info", "--output=json"])?;
    ensure!(
        allowed.contains("\"message\":\"ok\"") && !allowed.contains("access denied"),
        "node1's own certificate: {allowed}"
    );
    // Plain text gets no pgBackRest greeting, only the end of the connection.
    let b = inv.backup_host.as_ref().context("no backup host")?;
    let mut tcp = TcpStream::connect((b.address, b.port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(b"{\"cmd\":\"noop\"}\n")?;
    let mut answer = Vec::new();
    let closed = tcp.read_to_end(&mut answer);
    // Closed (end of stream or reset), not left waiting for more.
    let timed_out = closed.as_ref().is_err_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    });
    ensure!(
        !timed_out,
        "the server kept a plaintext connection open: {closed:?}"
    );
    ensure!(
        !String::from_utf8_lossy(&answer).contains("pgBackRest") && answer.len() < 64,
        "plain text answered: {answer:?}"
    );

    // After a switchover the new primary archives on its new timeline, and a backup works.
    let before = s["archive"][1].as_str().unwrap_or_default().to_owned();
    let candidate = if leader == "node1" { "node2" } else { "node1" };
    // Right after a WAL switch: the primary is a segment ahead of the candidate's member key,
    // and the leader asks the candidate for its current position before judging its lag.
    switch_wal()?;
    ok(&[
        "ctl",
        "--dir",
        sc.d(),
        "switchover",
        "--candidate",
        candidate,
        "--force",
    ])?;
    let t0 = Instant::now();
    loop {
        let rows = sc.ctl_list()?;
        let switched = rows
            .iter()
            .any(|r| r["name"] == candidate && r["role"] == "leader");
        if switched && psql(app, "SELECT pg_is_in_recovery()").ok().as_deref() == Some("f") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no switchover to {candidate}: {rows:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    psql(
        app,
        &format!("INSERT INTO secret_rows VALUES ('{marker}-after')"),
    )?;
    ok(&["backup", "check", "--dir", sc.d()])?;
    ok(&["backup", "run", "--dir", sc.d(), "--type", "incr"])?;
    let s = stanza_json(&sc)?;
    let after = s["archive"][1].as_str().unwrap_or_default().to_owned();
    ensure!(
        after.get(..8) > before.get(..8),
        "the archive did not reach a new timeline: {before} -> {after}"
    );
    let kinds: Vec<&str> = s["backups"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["type"].as_str()).collect())
        .unwrap_or_default();
    ensure!(kinds == ["full", "incr"], "{s}");

    // down stops every pgBackRest process the environment started.
    ok(&["down", "--dir", sc.d()])?;
    let left: Vec<String> = fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("pgbackrest") && c.contains(sc.d()))
        .collect();
    ensure!(left.is_empty(), "still running after down: {left:?}");
    Ok(())
}

#[test]
fn restore_to_a_time_brings_a_dropped_table_back_on_a_new_timeline() -> Result<()> {
    let sc = Scenario::new("pitr");
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    let cluster: Value = cluster_json(&sc)?;
    let app = cluster["libpq"]["app"].as_str().context("app libpq")?;
    psql(
        app,
        "CREATE TABLE keep(x int); INSERT INTO keep SELECT generate_series(1, 1000)",
    )?;
    ok(&["backup", "run", "--dir", sc.d(), "--type", "full"])?;
    // Rows after the backup exist only in the archived WAL. (pgBackRest picks a backup that
    // stopped before the target, compared in whole seconds.)
    std::thread::sleep(Duration::from_secs(2));
    psql(app, "INSERT INTO keep SELECT generate_series(1001, 1500)")?;
    let target = psql(app, "SELECT clock_timestamp()")?;
    std::thread::sleep(Duration::from_millis(200));
    psql(app, "DROP TABLE keep")?;
    let timeline = |rows: &[Value]| -> u64 {
        rows.iter()
            .find(|r| r["role"] == "leader")
            .and_then(|r| r["timeline"].as_u64())
            .unwrap_or(0)
    };
    let tl_before = timeline(&sc.ctl_list()?);

    let out = ok(&["restore", "--dir", sc.d(), "--target-time", &target])?;
    ensure!(out.contains("promoted after"), "{out}");
    ensure!(
        psql(app, "SELECT count(*), max(x) FROM keep")? == "1500|1500",
        "the table is not back as it was at {target}"
    );
    crate::local::wait_members(&sc)?;
    let rows = sc.ctl_list()?;
    ensure!(
        rows.iter()
            .all(|r| r["timeline"].as_u64().is_some_and(|t| t > tl_before)),
        "not every member is on a timeline after {tl_before}: {rows:?}"
    );
    // Every member has the table: the replicas were cloned again from the restored primary.
    for r in &rows {
        let name = r["name"].as_str().unwrap_or_default();
        let su = superuser_conn(&cluster, name, "app")?;
        // The app role's tables live in its own schema when it has one.
        let count = su_psql(
            &su,
            &["SET search_path = app, public", "SELECT count(*) FROM keep"],
        )?;
        ensure!(count == "1500", "{name}: {count}");
    }
    // The restored node's recovery settings are gone; archiving continues on the new timeline.
    let auto = fs::read_to_string(sc.dir.join(format!(
            "nodes/{}/data/postgresql.auto.conf",
            rows.iter()
                .find(|r| r["role"] == "leader")
                .and_then(|r| r["name"].as_str())
                .unwrap_or("node1")
        )))?;
    ensure!(!auto.contains("recovery_target"), "{auto}");
    ok(&["backup", "check", "--dir", sc.d()])?;

    // `--latest` while a writer runs: every transaction the writer saw commit is restored (the
    // primary, stopped cleanly, archives its last segment; the restore checks that it did).
    psql(app, "CREATE TABLE w(id int)")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, app) = (stop.clone(), app.to_owned());
        std::thread::spawn(move || {
            let mut committed = Vec::new();
            for id in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let out = Command::new("/usr/lib/postgresql/15/bin/psql")
                    .args([&app, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c"])
                    .arg(format!("INSERT INTO w VALUES ({id})"))
                    .env_clear()
                    .env("PATH", "/usr/bin:/bin")
                    .env("PGCONNECT_TIMEOUT", "2")
                    // A commit that blocks must not hang the test.
                    .env("PGOPTIONS", "-c statement_timeout=5000")
                    .output();
                match out {
                    Ok(o) if o.status.success() => committed.push(id),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            committed
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let restored = ok(&["restore", "--dir", sc.d(), "--latest"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let committed = writer.join().expect("writer thread");
    restored?;
    ensure!(
        committed.len() > 10,
        "the writer hardly wrote: {committed:?}"
    );
    let have = psql(app, "SELECT count(*) FROM w")?;
    ensure!(
        have == committed.len().to_string(),
        "{} transactions committed, {have} restored (the last committed: {:?})",
        committed.len(),
        committed.last()
    );
    Ok(())
}

#[test]
fn the_backup_scheduler_runs_a_missed_slot_once_and_reports_it() -> Result<()> {
    use std::os::unix::fs::chown;
    let sc = Scenario::new("sched");
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    let d = &sc.dir;
    // The environment's scheduler configuration, with a yearly full backup (1 January: always
    // past, so missed on a new cluster), an incremental one every minute and a 1 s interval.
    let conf = fs::read_to_string(d.join("backup/scheduler.yml"))?;
    let mut doc: Value = serde_saphyr::from_str(&conf)?;
    doc["schedule"] = serde_json::json!({"full": "0 0 1 1 *", "incr": "* * * * *"});
    doc["interval"] = serde_json::json!(1);
    doc["grace"] = serde_json::json!(60);
    let status = d.join("backup/test-status.json");
    doc["status_file"] = serde_json::json!(status.display().to_string());
    let test_conf = d.join("backup/test-scheduler.yml");
    fs::write(&test_conf, serde_saphyr::to_string(&doc)?)?;
    let pgbr = nix::unistd::User::from_name("pgbackrest")?.context("pgbackrest user")?;
    chown(&test_conf, Some(0), Some(pgbr.gid.as_raw()))?;
    fs::set_permissions(&test_conf, fs::Permissions::from_mode(0o640))?;
    // The binary as `up` gave it to the service users.
    let exe = if d.join("bin/pgkeep").exists() {
        d.join("bin/pgkeep")
    } else {
        env!("CARGO_BIN_EXE_pgkeep").into()
    };
    let log_path = d.join("logs/test-scheduler.log");
    let log = fs::File::create(&log_path)?;
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={}", pgbr.uid))
        .arg(format!("--regid={}", pgbr.gid))
        .args(["--init-groups", "--"])
        .arg(&exe)
        .args(["backup-scheduler", "-c"])
        .arg(&test_conf)
        .current_dir("/")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let result = (|| -> Result<()> {
        wait_for("the missed full backup", || {
            let s = stanza_json(&sc)?;
            Ok(s["backups"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["type"] == "full")))
        })?;
        // Several more checks pass: the slot is covered, no second full backup starts.
        std::thread::sleep(Duration::from_secs(5));
        let text = fs::read_to_string(&log_path)?;
        ensure!(
            text.matches("MISSED scheduled backup").count() == 1,
            "the missed slot was not reported exactly once:\n{text}"
        );
        let fulls = stanza_json(&sc)?["backups"]
            .as_array()
            .map(|b| b.iter().filter(|b| b["type"] == "full").count())
            .unwrap_or(0);
        ensure!(fulls == 1, "{fulls} full backups:\n{text}");
        let st: Value = serde_json::from_str(&fs::read_to_string(&status)?)?;
        ensure!(
            st["primary_known"] == true && st["last_result"]["ok"] == true,
            "{st}"
        );
        ensure!(
            st["last_result"]["missed_by_seconds"].is_u64() || st["last_result"]["type"] == "incr",
            "{st}"
        );
        Ok(())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    result
}

/// SIGKILLs every process of node `n` of the environment: its agent, its fence guard and its
/// postmaster (a host that dies at once).
fn kill_node(d: &Path, n: &str) -> Result<()> {
    let mut pids = Vec::new();
    let node_dir = d.join(format!("nodes/{n}"));
    for e in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let ours = cmd.contains(&format!("{}/", node_dir.display()))
            || cmd.contains(&format!("{}.", node_dir.join("data").display()));
        if ours
            && (cmd.contains("pgkeep") || cmd.contains("postgres"))
            && !cmd.contains("pgbackrest")
        {
            pids.push(pid);
        }
    }
    ensure!(!pids.is_empty(), "no process of {n} found");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(())
}

#[test]
fn wal_the_dead_primary_never_archived_reaches_the_archive_and_pitr_crosses_it() -> Result<()> {
    let sc = Scenario::new("gap");
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    let d = sc.dir.clone();
    let cluster: Value = cluster_json(&sc)?;
    let app = cluster["libpq"]["app"]
        .as_str()
        .context("app libpq")?
        .to_owned();
    psql(&app, "CREATE TABLE t(batch int, x int)")?;
    ok(&["backup", "run", "--dir", sc.d(), "--type", "full"])?;
    std::thread::sleep(Duration::from_secs(2));
    let leader = leader_name(&sc)?;
    let su = superuser_conn(&cluster, &leader, "postgres")?;

    // The repository goes away: archiving lags while three segments fill and are streamed.
    stop_repository_server(&d)?;
    for batch in 1..=3 {
        psql(
            &app,
            &format!("INSERT INTO t SELECT {batch}, g FROM generate_series(1, 1000) g"),
        )?;
        su_psql(&su, &["SELECT pg_switch_wal()"])?;
    }
    let target = psql(&app, "SELECT clock_timestamp()")?;
    std::thread::sleep(Duration::from_secs(1));
    // Replicas have everything; the primary has not archived it.
    wait_for("the replicas to catch up", || {
        Ok(sc
            .ctl_list()?
            .iter()
            .filter(|r| r["role"] != "leader")
            .all(|r| r["lag"] == 0))
    })?;
    let ready: Vec<String> =
        fs::read_dir(d.join(format!("nodes/{leader}/data/pg_wal/archive_status")))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".ready") && n.len() == 30)
            .collect();
    ensure!(
        ready.len() >= 3,
        "the primary should lag in archiving: {ready:?}"
    );

    // The primary's host dies; the repository comes back.
    kill_node(&d, &leader)?;
    let pgbr = nix::unistd::User::from_name("pgbackrest")?.context("pgbackrest user")?;
    let log = fs::OpenOptions::new()
        .append(true)
        .open(d.join("logs/backup-pgbackrest.log"))?;
    Command::new("setsid")
        .args(["setpriv"])
        .arg(format!("--reuid={}", pgbr.uid))
        .arg(format!("--regid={}", pgbr.gid))
        .args(["--init-groups", "--", "/usr/bin/pgbackrest"])
        // As `up` starts it, so that `up` (in the restore below) recognises it.
        .arg(format!(
            "--config={}",
            d.join("backup/conf/pgbackrest.conf").display()
        ))
        .arg(format!(
            "--config-include-path={}",
            d.join("backup/conf/conf.d").display()
        ))
        .arg("server")
        .current_dir("/")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut new_leader = String::new();
    wait_for("a new leader to push the old timeline's WAL", || {
        for r in sc.ctl_list()? {
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            if r["role"] == "leader" && name != leader {
                let text = fs::read_to_string(d.join(format!("logs/{name}-agent.log")))?;
                if text.contains("previous timeline's WAL queued for the archive") {
                    new_leader = name;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    })?;
    let text = fs::read_to_string(d.join(format!("logs/{new_leader}-agent.log")))?;
    let line = text
        .lines()
        .rfind(|l| l.contains("previous timeline's WAL queued for the archive"))
        .unwrap_or_default();
    ensure!(!line.contains("segments=0"), "{line}");
    ok(&["backup", "check", "--dir", sc.d()])?;

    // A point-in-time recovery to just before the kill crosses those segments.
    let out = ok(&["restore", "--dir", sc.d(), "--target-time", &target])?;
    ensure!(out.contains("promoted after"), "{out}");
    ensure!(
        psql(&app, "SELECT count(*), count(DISTINCT batch) FROM t")? == "3000|3",
        "not every batch written before {target} is back"
    );
    Ok(())
}
