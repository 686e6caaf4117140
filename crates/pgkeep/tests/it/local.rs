//! `pgkeep up` / `pgkeep down` / `pgkeep ctl list` against real etcd, PostgreSQL and agents.
//!
//! Each scenario uses its own directory under /var/tmp and its own cluster name; a guard runs
//! `pgkeep down --purge` (and kills whatever its PID files still name) even when a check fails.
//! These need root and run one at a time.

use std::fs;
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail, ensure};
use pgkeep::inventory::Inventory;
use serde_json::Value;

/// Ports never handed out (defaults and the reference lab's).
const AVOID_PORTS: &[u16] = &[
    2379, 2380, 5432, 8008, 8432, 15432, 15433, 15434, 18008, 18009, 18010, 18432, 18433, 23791,
    23792, 23793, 23801, 23802, 23803, 25000, 25001,
];

pub(crate) fn pgkeep(args: &[&str]) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .args(args)
        .output()
        .expect("running pgkeep");
    eprintln!(
        "$ pgkeep {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn ok(args: &[&str]) -> Result<String> {
    let out = pgkeep(args);
    ensure!(
        out.status.success(),
        "pgkeep {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A unique environment directory and cluster name; dropping it purges the environment.
pub(crate) struct Scenario {
    pub(crate) dir: PathBuf,
    pub(crate) cluster: String,
}

impl Scenario {
    pub(crate) fn new(name: &str) -> Scenario {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}", std::process::id(), n);
        Scenario {
            dir: PathBuf::from(format!("/var/tmp/pgkeep-it-{name}-{id}")),
            cluster: format!("{name}{n}x{}", std::process::id() % 100_000),
        }
    }

    pub(crate) fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub(crate) fn up(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec!["up", "--dir", self.d(), "--cluster", &self.cluster];
        args.extend_from_slice(extra);
        ok(&args)
    }

    pub(crate) fn inventory(&self) -> Result<Inventory> {
        Ok(Inventory::load(&self.dir.join("inventory.yml"))?)
    }

    pub(crate) fn pid(&self, name: &str) -> Result<u32> {
        let f = self.dir.join("run").join(format!("{name}.pid"));
        fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .parse()
            .context("pid file content")
    }

    pub(crate) fn hosts_block(&self) -> bool {
        let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
        hosts.contains(&format!("# dir {}\n", self.d()))
    }

    pub(crate) fn ctl_list(&self) -> Result<Vec<Value>> {
        let ctl = self.dir.join("ctl.yml");
        let out = ok(&[
            "ctl",
            "-c",
            ctl.to_str().unwrap(),
            "list",
            "--format",
            "json",
        ])?;
        match serde_json::from_str(&out)? {
            Value::Array(v) => Ok(v),
            other => bail!("ctl list --format json printed {other}"),
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // The logs outlive the environment, for the failure's post-mortem.
        if let Some(name) = self.dir.file_name() {
            let keep = Path::new("/tmp/pgkeep-it-logs").join(name);
            let _ = fs::create_dir_all(&keep);
            if let Ok(rd) = fs::read_dir(self.dir.join("logs")) {
                for e in rd.flatten() {
                    let _ = fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
        }
        let _ = pgkeep(&["down", "--dir", self.d(), "--purge", "--timeout", "30"]);
        // Whatever is still recorded and still ours dies now.
        if let Ok(rd) = fs::read_dir(self.dir.join("run")) {
            for e in rd.flatten() {
                let Ok(pid) = fs::read_to_string(e.path()).map(|s| s.trim().to_owned()) else {
                    continue;
                };
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains(self.d())
                    && let Ok(p) = pid.parse::<i32>()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if self.dir.exists() {
            let _ = pgkeep(&["down", "--dir", self.d(), "--purge", "--timeout", "5"]);
        }
    }
}

pub(crate) fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn local_up_refuses_a_directory_services_cannot_traverse() -> Result<()> {
    let parent = PathBuf::from(format!("/var/tmp/pgkeep-it-private-{}", std::process::id()));
    fs::create_dir_all(&parent)?;
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o700))?;
    let dir = parent.join("env");
    let out = pgkeep(&["up", "--dir", dir.to_str().unwrap(), "--no-agents"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let exists = dir.exists();
    fs::remove_dir_all(&parent)?;
    ensure!(
        !out.status.success(),
        "up accepted a directory under a 0700 parent"
    );
    ensure!(
        stderr.contains(parent.to_str().unwrap()),
        "the error does not name {}: {stderr}",
        parent.display()
    );
    ensure!(stderr.contains("not traversable"), "{stderr}");
    ensure!(!exists, "up created {} anyway", dir.display());
    Ok(())
}

#[test]
fn local_up_without_agents_prepares_everything_and_down_purge_removes_it() -> Result<()> {
    let sc = Scenario::new("files");
    let out = sc.up(&["--no-agents"])?;
    ensure!(
        out.contains("[1/6]")
            && out.contains("etcd members")
            && out.contains("enabled authentication"),
        "no progress lines: {out}"
    );

    // Inventory: three nodes, three etcd members, backup and load balancer, own /24, own ports.
    let inv = sc.inventory()?;
    ensure!(inv.cluster == sc.cluster && inv.domain == format!("{}.internal", sc.cluster));
    ensure!(inv.database_hosts.len() == 3 && inv.etcd_hosts.len() == 3);
    ensure!(inv.backup_host.is_some() && inv.load_balancer.is_some());
    let net = match inv.database_hosts[0].address {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => bail!("IPv6 address"),
    };
    ensure!(net[0] == 127 && net[1] == 42, "network {net:?}");
    let mut ports = Vec::new();
    for h in &inv.database_hosts {
        ports.extend([h.pg_port, h.api_port]);
    }
    for m in &inv.etcd_hosts {
        ports.extend([m.client_port, m.peer_port]);
    }
    for p in &ports {
        ensure!(
            !AVOID_PORTS.contains(p) && (20000..32000).contains(p),
            "port {p}"
        );
    }

    // Names resolve through the marked hosts block.
    ensure!(sc.hosts_block(), "no hosts block for {}", sc.d());
    for (ip, name) in inv.host_entries() {
        let got: Vec<IpAddr> = (name.as_str(), 1)
            .to_socket_addrs()?
            .map(|a| a.ip())
            .collect();
        ensure!(got.contains(&ip), "{name} resolves to {got:?}, not {ip}");
    }

    // PKI, node configurations (valid for `config check`), the bootstrap marker on node1 only.
    let pg_uid = nix::unistd::User::from_name("postgres")?
        .context("postgres")?
        .uid
        .as_raw();
    ensure!(mode(&sc.dir.join("pki/ca.key")) == 0o600);
    for (i, h) in inv.database_hosts.iter().enumerate() {
        let node = sc.dir.join("nodes").join(&h.name);
        ensure!(mode(&node) == 0o700 && fs::metadata(&node)?.uid() == pg_uid);
        let key = node.join(format!("tls/postgres-{}.key", h.name));
        ensure!(
            mode(&key) == 0o600 && fs::metadata(&key)?.uid() == pg_uid,
            "{}",
            key.display()
        );
        let yml = node.join("node.yml");
        ok(&["config", "check", "-q", "-c", yml.to_str().unwrap()])?;
        let marker = node.join("conf/pgkeep-bootstrap-allowed").exists();
        ensure!(
            marker == (i == 0),
            "bootstrap marker on {}: {marker}",
            h.name
        );
    }
    ensure!(mode(&sc.dir.join("patronictl.yml")) == 0o600);
    ensure!(mode(&sc.dir.join("secrets/pgpass")) == 0o600);
    let cluster: Value = serde_json::from_str(&fs::read_to_string(sc.dir.join("cluster.json"))?)?;
    let m0 = &cluster["members"][0];
    for k in [
        "name",
        "host",
        "port",
        "socket_dir",
        "api_url",
        "pid_file",
        "data_dir",
    ] {
        ensure!(
            !m0[k].is_null(),
            "cluster.json members[0].{k} missing: {m0}"
        );
    }
    let app = cluster["libpq"]["app"].as_str().context("libpq.app")?;
    ensure!(
        app.contains("sslmode=verify-full")
            && app.contains("passfile=")
            && !app.contains("password=")
    );
    ensure!(
        cluster["etcd"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 3)
    );

    // etcd answers over mutual TLS (nothing registered yet).
    ensure!(sc.ctl_list()?.is_empty());
    let pids: Vec<u32> = (1..=3)
        .map(|i| sc.pid(&format!("etcd{i}")))
        .collect::<Result<_>>()?;
    ensure!(pids.iter().all(|p| alive(*p)));

    // A second up starts nothing new and never re-allows a bootstrap.
    fs::remove_file(sc.dir.join("nodes/node1/conf/pgkeep-bootstrap-allowed"))?;
    let out = sc.up(&["--no-agents"])?;
    ensure!(out.matches("already running").count() == 3, "{out}");
    let again: Vec<u32> = (1..=3)
        .map(|i| sc.pid(&format!("etcd{i}")))
        .collect::<Result<_>>()?;
    ensure!(again == pids, "etcd pids changed: {pids:?} -> {again:?}");
    ensure!(
        !sc.dir
            .join("nodes/node1/conf/pgkeep-bootstrap-allowed")
            .exists()
    );

    // down keeps the data and the names; up brings etcd back.
    ok(&["down", "--dir", sc.d()])?;
    ensure!(
        pids.iter().all(|p| !alive(*p)),
        "etcd still running after down"
    );
    ensure!(sc.dir.join("etcd/etcd1/data").is_dir() && sc.hosts_block());
    sc.up(&["--no-agents"])?;
    ensure!(sc.ctl_list()?.is_empty());
    let restarted: Vec<u32> = (1..=3)
        .map(|i| sc.pid(&format!("etcd{i}")))
        .collect::<Result<_>>()?;

    // down --purge removes processes, the hosts block and the directory.
    ok(&["down", "--dir", sc.d(), "--purge"])?;
    ensure!(restarted.iter().all(|p| !alive(*p)));
    ensure!(!sc.dir.exists(), "{} still exists", sc.d());
    ensure!(!sc.hosts_block(), "hosts block left behind");
    Ok(())
}

/// The system identifier `up` printed in its summary.
pub(crate) fn sysid(up_out: &str) -> Result<String> {
    up_out
        .lines()
        .find_map(|l| l.split("system identifier ").nth(1))
        .map(|s| s.trim().to_owned())
        .context("no system identifier in up's output")
}

pub(crate) fn check_members(rows: &[Value]) -> Result<()> {
    ensure!(rows.len() == 3, "{rows:?}");
    let leaders = rows.iter().filter(|r| r["role"] == "leader").count();
    let replicas: Vec<&Value> = rows.iter().filter(|r| r["role"] == "replica").collect();
    ensure!(leaders == 1 && replicas.len() == 2, "{rows:?}");
    for r in &replicas {
        ensure!(r["state"] == "streaming", "{r}");
        ensure!(r["lag"].is_u64() && r["timeline"].is_u64(), "{r}");
    }
    for r in rows {
        ensure!(
            r["host"].is_string() && r["port"].is_u64() && r["name"].is_string(),
            "{r}"
        );
    }
    Ok(())
}

/// The members as `ctl list` shows them settle within a few HA loops of `up` reporting
/// healthy (each agent publishes its member key once per loop).
pub(crate) fn wait_members(sc: &Scenario) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match check_members(&sc.ctl_list()?) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

#[test]
fn local_up_brings_a_healthy_cluster_and_down_up_keeps_it() -> Result<()> {
    let sc = Scenario::new("ha");
    let out = sc.up(&[])?;
    ensure!(out.contains("is healthy"), "{out}");
    ensure!(
        out.contains("sslmode=verify-full"),
        "no psql strings: {out}"
    );
    let id = sysid(&out)?;
    wait_members(&sc)?;
    let table = ok(&["ctl", "--dir", sc.d(), "list"])?;
    ensure!(
        table.contains("leader") && table.contains("streaming"),
        "{table}"
    );

    // The application and admin roles log in over TLS with the passfile.
    let cluster: Value = serde_json::from_str(&fs::read_to_string(sc.dir.join("cluster.json"))?)?;
    for (role, want) in [("app", "app|app|f"), ("admin", "admin|postgres|f")] {
        let conn = cluster["libpq"][role].as_str().context("libpq string")?;
        let out = std::process::Command::new("/usr/lib/postgresql/15/bin/psql")
            .args([conn, "-XAtq", "-c", "SELECT current_user, current_database(), usesuper FROM pg_user WHERE usename = current_user"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()?;
        let got = String::from_utf8_lossy(&out.stdout);
        ensure!(
            got.trim() == want,
            "{role}: {got} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Patroni's own patronictl reads the cluster.
    let pctl = std::process::Command::new("patronictl")
        .args([
            "-c",
            sc.dir.join("patronictl.yml").to_str().unwrap(),
            "list",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&pctl.stdout);
    ensure!(
        pctl.status.success() && text.contains("node1") && text.contains("Leader"),
        "patronictl: {text} {}",
        String::from_utf8_lossy(&pctl.stderr)
    );
    // Its etcd user reads (show-config) and cannot write (edit-config writes etcd directly).
    let patronictl = |args: &[&str]| {
        std::process::Command::new("patronictl")
            .args(["-c", sc.dir.join("patronictl.yml").to_str().unwrap()])
            .args(args)
            .output()
    };
    let show = patronictl(&["show-config"])?;
    ensure!(
        show.status.success() && String::from_utf8_lossy(&show.stdout).contains("loop_wait"),
        "patronictl show-config: {}",
        String::from_utf8_lossy(&show.stderr)
    );
    let edit = patronictl(&["edit-config", "--force", "-s", "loop_wait=3"])?;
    let config = ok(&["ctl", "--dir", sc.d(), "show-config"])?;
    ensure!(
        !edit.status.success() && config.contains("loop_wait: 2"),
        "patronictl edit-config as the read-only user: {} {}\n{config}",
        String::from_utf8_lossy(&edit.stdout),
        String::from_utf8_lossy(&edit.stderr)
    );

    // The security assessment of a fresh environment finds nothing high or critical; a
    // private key made readable by others is a critical failure, and fixing it passes again.
    let audit = |extra: &[&str]| {
        let mut args = vec!["audit", "--dir", sc.d()];
        args.extend_from_slice(extra);
        pgkeep(&args)
    };
    let out = audit(&["--format", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let findings = report["findings"].as_array().context("findings")?;
    ensure!(findings.len() > 150, "{} findings", findings.len());
    let serious: Vec<&Value> = findings
        .iter()
        .filter(|f| {
            f["status"] == "fail" && matches!(f["severity"].as_str(), Some("high" | "critical"))
        })
        .collect();
    ensure!(out.status.success() && serious.is_empty(), "{serious:?}");
    let key = sc.dir.join("nodes/node2/tls/postgres-node2.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
    let weak = audit(&["--format", "json"]);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    let report: Value = serde_json::from_slice(&weak.stdout)?;
    let fs02: Vec<&Value> = report["findings"]
        .as_array()
        .context("findings")?
        .iter()
        .filter(|f| f["id"] == "FS-02" && f["status"] == "fail")
        .collect();
    ensure!(
        !weak.status.success()
            && fs02.len() == 1
            && fs02[0]["node"] == "node2"
            && fs02[0]["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("postgres-node2.key 0644")),
        "{fs02:?}"
    );
    ensure!(
        audit(&[]).status.success(),
        "the fixed key still fails the audit"
    );

    // A second up starts no second agent.
    let agents: Vec<u32> = (1..=3)
        .map(|i| sc.pid(&format!("node{i}-agent")))
        .collect::<Result<_>>()?;
    let out = sc.up(&[])?;
    ensure!(out.matches("already running").count() == 11, "{out}");
    let again: Vec<u32> = (1..=3)
        .map(|i| sc.pid(&format!("node{i}-agent")))
        .collect::<Result<_>>()?;
    ensure!(again == agents);

    // down stops everything, keeps the data; up brings back the same cluster.
    ok(&["down", "--dir", sc.d()])?;
    ensure!(agents.iter().all(|p| !alive(*p)), "agents still running");
    for i in 1..=3 {
        ensure!(
            !sc.dir
                .join(format!("nodes/node{i}/data/postmaster.pid"))
                .exists(),
            "postgres of node{i} still running"
        );
    }
    let out = sc.up(&[])?;
    ensure!(
        sysid(&out)? == id,
        "system identifier changed: {id} -> {}",
        sysid(&out)?
    );
    wait_members(&sc)?;
    Ok(())
}
