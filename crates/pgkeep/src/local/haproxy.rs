//! The environment's HAProxy: its files, how it is started, reloaded and stopped, and the wait
//! until it routes as it should.
//!
//! HAProxy runs as the `haproxy` user in master-worker mode in the foreground (`haproxy -W -db
//! -f D/haproxy/haproxy.cfg`); the recorded PID is the master's, which stays the same across
//! reloads (SIGUSR2 re-executes it with the new configuration). Before a reload the servers'
//! states are saved from the stats socket into the server-state file, so the new worker does
//! not start with every server UP.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::certs::{self, Pair};
use super::files::{self, pgpass_file};
use super::spawn::{self, Identity, Spec};
use super::{APP_ROLE, Layout, PG_BIN_DIR, ServiceUser, s};
use crate::haproxy::{self, DEFAULT_REPLICA_LAG, Files, Plan, READ_BACKEND, WRITE_BACKEND, stats};
use crate::inventory::{Inventory, LoadBalancer};

/// Debian's HAProxy.
pub const HAPROXY_BIN: &str = "/usr/sbin/haproxy";

/// The inventory's load balancer (a local environment always has one).
pub fn load_balancer(inv: &Inventory) -> Result<&LoadBalancer> {
    inv.load_balancer
        .as_ref()
        .context("the inventory has no load_balancer")
}

/// `D/haproxy/haproxy-<lb>.pem`: the client certificate and its key in one file (`crt`).
pub fn client_pem(layout: &Layout, lb: &LoadBalancer) -> PathBuf {
    layout
        .haproxy_dir()
        .join(format!("{}-{}.pem", crate::pki::Service::HaProxy, lb.name))
}

/// The files the environment's configuration names.
pub fn files(layout: &Layout, lb: &LoadBalancer) -> Files {
    Files {
        ca_file: layout.ca_cert(),
        client_cert: Some(client_pem(layout, lb)),
        stats_socket: layout.haproxy_socket(),
        state_file: layout.haproxy_run().join("server-state"),
    }
}

/// The plan of the environment's HAProxy.
pub fn plan(layout: &Layout, inv: &Inventory) -> Result<Plan> {
    let lb = load_balancer(inv)?;
    Ok(Plan::from_inventory(
        inv,
        files(layout, lb),
        DEFAULT_REPLICA_LAG,
    )?)
}

/// How `up` and `down` recognise HAProxy (master and workers share the command line).
pub fn identity(layout: &Layout) -> Identity {
    Identity {
        program: "haproxy".into(),
        marker: s(&layout.haproxy_config()),
    }
}

/// The start specification.
pub fn spec(layout: &Layout, inv: &Inventory, user: &ServiceUser) -> Result<Spec> {
    let lb = load_balancer(inv)?;
    let args: Vec<OsString> = ["-W", "-db", "-f"]
        .into_iter()
        .map(OsString::from)
        .chain([layout.haproxy_config().into_os_string()])
        .collect();
    Ok(Spec {
        name: "haproxy".into(),
        user: user.clone(),
        program: HAPROXY_BIN.into(),
        args,
        home: layout.haproxy_run(),
        log: layout.haproxy_log(),
        pid_file: layout.haproxy_pid(),
        identity: identity(layout),
        listens: vec![
            (lb.address, lb.write_port).into(),
            (lb.address, lb.read_port).into(),
        ],
    })
}

/// Writes `contents` unless `path` holds it already (owner and mode are fixed either way);
/// true when the content changed.
fn write_if_changed(path: &Path, contents: &str, mode: u32, owner: &ServiceUser) -> Result<bool> {
    let changed = std::fs::read(path).ok().as_deref() != Some(contents.as_bytes());
    files::write(path, contents, mode, Some(owner))?;
    Ok(changed)
}

/// Writes the client certificate PEM and the configuration (root:haproxy 0640), and checks
/// the configuration with `haproxy -c` as the haproxy user. True when something changed.
pub fn write_files(layout: &Layout, inv: &Inventory, user: &ServiceUser) -> Result<bool> {
    let lb = load_balancer(inv)?;
    let run = layout.haproxy_run();
    if !run.starts_with(&layout.dir) {
        std::fs::create_dir_all(layout.socket_base_fallback())
            .with_context(|| format!("creating {}", layout.socket_base_fallback().display()))?;
    }
    files::dir(&run, 0o700, Some(user))?;
    let Pair { cert, key } = certs::haproxy_client(layout, &lb.name);
    let pem = std::fs::read_to_string(&cert)
        .with_context(|| format!("reading {}", cert.display()))?
        + &std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
    let mut changed = write_if_changed(&client_pem(layout, lb), &pem, 0o600, user)?;
    let text = haproxy::render(&plan(layout, inv)?)?;
    let owner = ServiceUser {
        name: "root".into(),
        uid: 0,
        gid: user.gid,
    };
    changed |= write_if_changed(&layout.haproxy_config(), &text, 0o640, &owner)?;
    check_config(layout, user)?;
    Ok(changed)
}

/// `haproxy -c` as the haproxy user (so unreadable files fail here, not at start).
fn check_config(layout: &Layout, user: &ServiceUser) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let out = Command::new(HAPROXY_BIN)
        .arg("-c")
        .arg("-f")
        .arg(layout.haproxy_config())
        .env_clear()
        .env("PATH", spawn::SERVICE_PATH)
        .current_dir("/")
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .output()
        .context("running haproxy -c")?;
    if !out.status.success() {
        bail!(
            "haproxy -c refused {}:\n{}{}",
            layout.haproxy_config().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts HAProxy, or reloads it when `changed` (saving the servers' states first).
pub fn start_or_reload(
    layout: &Layout,
    inv: &Inventory,
    user: &ServiceUser,
    changed: bool,
) -> Result<()> {
    let spec = spec(layout, inv, user)?;
    match spawn::running(&spec.pid_file, &spec.identity) {
        Some(pid) if changed => {
            reload(layout, pid)?;
            println!("      haproxy reloaded (pid {pid}): configuration or certificate changed");
        }
        // Not "already running": scripts count those lines for etcd members and agents.
        Some(pid) => println!("      haproxy runs (pid {pid}), configuration unchanged"),
        None => {
            // A fresh start forgets the states of an earlier run (the primary may have moved):
            // an empty state file (version line only) loads nothing, without a warning.
            let state = layout.haproxy_run().join("server-state");
            crate::fsutil::write_atomic(&state, b"1\n", 0o644)
                .with_context(|| format!("writing {}", state.display()))?;
            let pid = spawn::start(&spec)?;
            println!(
                "      haproxy started (pid {pid}), log {}",
                spec.log.display()
            );
        }
    }
    Ok(())
}

/// Saves the servers' states and sends SIGUSR2 to the master `pid` (checked in `/proc`).
pub fn reload(layout: &Layout, pid: u32) -> Result<()> {
    let state = layout.haproxy_run().join("server-state");
    if let Err(e) = stats::save_state(&layout.haproxy_socket(), &state) {
        // Without the file the new worker starts every server UP; `up` waits that out.
        println!("      could not save HAProxy's server states ({e}); reloading anyway");
    }
    let id = identity(layout);
    if !spawn::is(pid, &id) {
        bail!("pid {pid} is not this environment's HAProxy");
    }
    let raw = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGUSR2)
        .with_context(|| format!("SIGUSR2 to HAProxy (pid {pid})"))
}

/// Stops HAProxy (SIGTERM to the master, which stops its workers); true when every process of
/// it is gone.
pub fn stop(layout: &Layout) -> Result<bool> {
    let id = identity(layout);
    let pid_file = layout.haproxy_pid();
    let Some(pid) = spawn::running(&pid_file, &id) else {
        println!("      haproxy not running");
        let _ = std::fs::remove_file(&pid_file);
        return Ok(true);
    };
    let mut gone = spawn::stop(pid, &id, Signal::SIGTERM, Duration::from_secs(10))?;
    // Workers (same command line) exit with their master; a lingering one is ours by its
    // command line and gets SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !spawn::scan(&id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in spawn::scan(&id) {
        gone &= spawn::stop(p, &id, Signal::SIGKILL, Duration::from_secs(5))?;
    }
    if gone {
        println!("      haproxy stopped (pid {pid})");
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(gone)
}

/// Waits until HAProxy routes writes to `leader` only and reads to exactly `replicas` (it
/// starts every server UP; see the lab notes), at most `timeout`.
pub fn wait_routing(
    layout: &Layout,
    leader: &str,
    replicas: &[String],
    timeout: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    let mut want_read = replicas.to_vec();
    want_read.sort();
    let mut last = String::new();
    loop {
        let now = match stats::show_stat(&layout.haproxy_socket()) {
            Ok(st) => {
                let (w, r) = (
                    stats::routable(&st, WRITE_BACKEND),
                    stats::routable(&st, READ_BACKEND),
                );
                if w == [leader] && r == want_read {
                    println!(
                        "      {:>5.1}s  {WRITE_BACKEND}: {leader} only; {READ_BACKEND}: {}",
                        t0.elapsed().as_secs_f64(),
                        r.join(", ")
                    );
                    return Ok(());
                }
                format!("{WRITE_BACKEND} UP: {w:?}, {READ_BACKEND} UP: {r:?}")
            }
            // The socket appears once the worker runs.
            Err(_) if t0.elapsed() < Duration::from_secs(2) => last.clone(),
            Err(e) => format!("stats socket: {e}"),
        };
        if now != last {
            println!("      {:>5.1}s  {now}", t0.elapsed().as_secs_f64());
            last = now;
        }
        if t0.elapsed() >= timeout {
            bail!(
                "HAProxy does not route as expected after {timeout:?} ({last}; want {leader} \
                 for writes, {want_read:?} for reads); see {}",
                layout.haproxy_log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A libpq string through the load balancer's `port` (`sslmode=verify-full`: PostgreSQL's
/// certificate carries the load balancer's name). `target_session_attrs` makes libpq refuse a
/// session on the wrong kind of server even if HAProxy sent it there.
pub fn libpq(
    layout: &Layout,
    inv: &Inventory,
    write: bool,
    db: &str,
    user: &str,
) -> Result<String> {
    let lb = load_balancer(inv)?;
    let (port, attrs) = if write {
        (lb.write_port, "read-write")
    } else {
        (lb.read_port, "standby")
    };
    Ok(format!(
        "host={} hostaddr={} port={port} dbname={db} user={user} sslmode=verify-full \
         sslrootcert={} passfile={} target_session_attrs={attrs}",
        inv.fqdn(&lb.name),
        lb.address,
        s(&layout.ca_cert()),
        s(&pgpass_file(layout)),
    ))
}

/// Connects through both ports as the application (as root: the passfile is root's) and checks
/// that the write port reaches a primary and the read port a replica.
pub fn probe(layout: &Layout, inv: &Inventory) -> Result<()> {
    for (write, want) in [(true, "f"), (false, "t")] {
        let conn = libpq(layout, inv, write, APP_ROLE, APP_ROLE)?;
        let out = Command::new(format!("{PG_BIN_DIR}/psql"))
            .arg(&conn)
            .args(["-XAtq", "-c", "SELECT pg_is_in_recovery()"])
            .env_clear()
            .env("PATH", spawn::SERVICE_PATH)
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGAPPNAME", "pgkeep-up")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || got != want {
            bail!(
                "psql through the {} port: pg_is_in_recovery() = {got:?}, want {want:?}: {}",
                if write { "write" } else { "read" },
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}
