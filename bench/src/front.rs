//! The HAProxy processes of `--via-haproxy`: one per product, each with the configuration of
//! [`crate::haproxy::config`] (the same template and check settings for both), started as the
//! `haproxy` user (`haproxy -db -f <dir>/haproxy.cfg`, no master process) in its own cgroup,
//! with every file in `<work>/haproxy/<product>/`, and stopped by its PID. The writer then has
//! one host: the product's HAProxy write port on 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Host, Target};
use crate::cluster::Cluster;
use crate::haproxy::{self, Checks, Event, Plan, Server};
use crate::pgkeep::Shared;
use crate::sys::{self, Cgroups, Cmd, User};

/// Debian's HAProxy.
pub const BIN: &str = "/usr/sbin/haproxy";

/// The write port of product `i` (0 = pgkeep, 1 = Patroni): `--port-base` + 201 + i.
pub fn write_port(base: u16, i: u16) -> u16 {
    base + 201 + i
}

/// Patroni's REST certificate (bench/src/patroni.rs `issue`) carries `DNS:localhost` and
/// `IP:127.0.0.1`; HAProxy's `verifyhost` matches DNS names only.
pub const PATRONI_REST_NAME: &str = "localhost";

/// One running HAProxy.
pub struct Haproxy {
    /// "pgkeep" or "Patroni".
    pub label: &'static str,
    /// Its directory (configuration, CA, client certificate, socket, state file, log).
    pub dir: PathBuf,
    /// The process (None once stopped).
    pub pid: Option<u32>,
    /// Its cgroup.
    pub cgroup: PathBuf,
    /// The write frontend.
    pub bind: SocketAddr,
    /// The configuration it runs.
    pub config: String,
}

/// A product's HAProxy and the writer's connection through it.
pub struct Front {
    /// The process.
    pub proxy: Haproxy,
    /// The application's connection: one host, HAProxy's write port, with the name the
    /// product's PostgreSQL certificates carry for the load balancer.
    pub target: Target,
}

/// What the run's HAProxy setup found.
pub struct Setup {
    /// The check settings both products got.
    pub checks: Checks,
    /// Where they came from (`pgkeep render haproxy`, or the documented defaults and why).
    pub source: String,
    /// Differences between the bench's pgkeep-side `defaults` + write backend and pgkeep's own
    /// rendering (empty: identical).
    pub diffs: Vec<String>,
    /// `haproxy -v`.
    pub version: String,
}

impl Setup {
    /// The report's "health checks / HAProxy" setting.
    pub fn text(&self, fronts: &[Front]) -> String {
        let c = &self.checks;
        let binds: Vec<String> = fronts
            .iter()
            .map(|f| {
                let tls = f.target.hosts.first().map_or("?", |h| h.name.as_str());
                format!("{} {} (TLS name `{tls}`)", f.proxy.label, f.proxy.bind)
            })
            .collect();
        let same = if self.diffs.is_empty() {
            "byte-identical to `pgkeep render haproxy`'s (checked in this run)".to_owned()
        } else {
            format!(
                "**differs** from `pgkeep render haproxy`'s: {}",
                self.diffs.join("; ")
            )
        };
        format!(
            "**the writer goes through HAProxy**: {version}, one process per product (user \
             haproxy, `haproxy -db`, files in `<work>/haproxy/<product>/`, stopped by PID), the same \
             template for both; write frontend on {binds}: the client's one host, PostgreSQL's TLS \
             passed through and verified end to end (verify-full). Backend `pg_write`: `retries 0`, \
             `option httpchk GET /primary`, `http-check expect status 200`, `default-server {words} \
             on-marked-down shutdown-sessions {observe}`, each server `check port <REST port> check-ssl \
             verify required ca-file <run CA> verifyhost <name> check-sni <name> crt <client \
             certificate from the run CA>` (pgkeep: the node's FQDN; Patroni: `localhost`, the DNS \
             name its REST certificate carries); defaults `timeout connect {tconn}`, `timeout check \
             {tcheck}`, `retries 2` (the write backend: 0), `option tcpka`, `timeout client/server 30m`. Settings from \
             {source}; the pgkeep side's `defaults` and write backend are {same}. Log `format iso` \
             (µs timestamps of every UP/DOWN). Each trial starts once HAProxy routes to the leader \
             only (`show stat`); the harness's own health check (REST `/primary` + `/patroni`) runs \
             as before. The floor is not run (it has no REST API to check)",
            version = self.version,
            binds = binds.join(", "),
            words = c.server_words(),
            observe = crate::haproxy::OBSERVE,
            tconn = c.timeout_connect,
            tcheck = c.timeout_check,
            source = self.source,
        )
    }
}

impl Haproxy {
    fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// Its log (stderr: state changes and one line per client connection).
    pub fn log(&self) -> PathBuf {
        self.dir.join("haproxy.log")
    }

    /// The log's current length (where a trial's events start).
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(self.log()).map_or(0, |m| m.len())
    }

    /// The write backend's state changes logged from byte `from` on.
    pub fn events_from(&self, from: u64) -> Vec<Event> {
        let text = std::fs::read(self.log()).unwrap_or_default();
        let from = usize::try_from(from).unwrap_or(0).min(text.len());
        haproxy::events(&String::from_utf8_lossy(&text[from..]))
    }

    /// The write backend's servers and states (`show stat` on the stats socket).
    pub async fn states(&self) -> Result<Vec<(String, String)>> {
        let ask = async {
            let mut s = tokio::net::UnixStream::connect(self.socket()).await?;
            s.write_all(b"show stat\n").await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let csv = tokio::time::timeout(Duration::from_secs(3), ask)
            .await
            .context("the stats socket did not answer within 3 s")?
            .with_context(|| format!("show stat on {}", self.socket().display()))?;
        Ok(haproxy::parse_stat(&csv))
    }

    /// Waits until HAProxy routes writes to `leader` only, at most `timeout`.
    pub async fn wait_routing(&self, leader: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let st = self.states().await;
            if let Ok(s) = &st
                && haproxy::routes_to(s, leader)
            {
                return Ok(());
            }
            if self.pid.is_none_or(|p| !sys::alive(p)) {
                bail!(
                    "{}'s HAProxy is not running; see {}",
                    self.label,
                    self.log().display()
                );
            }
            if t0.elapsed() >= timeout {
                bail!(
                    "{}'s HAProxy does not route to {leader} only after {timeout:?}: {st:?}",
                    self.label
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM by PID (SIGKILL after 5 s), then whatever is left in its cgroup.
    pub async fn stop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        if !sys::terminate(pid, Duration::from_secs(5)).await {
            eprintln!("warning: {}'s HAProxy {pid} did not stop", self.label);
        }
        if !sys::cgroup_wait_empty(&self.cgroup, Duration::from_secs(5)).await {
            let _ = sys::cgroup_kill(&self.cgroup);
        }
    }
}

/// The write backend's servers of cluster `c`: each member's PostgreSQL address and port (from
/// the application's host list), its REST port (from its API URL) and `api_name`, or the API
/// URL's host name when None.
pub fn servers(c: &Cluster, api_name: Option<&str>) -> Result<Vec<Server>> {
    c.members
        .iter()
        .map(|m| {
            let h = c
                .app
                .hosts
                .iter()
                .find(|h| h.member == m.name)
                .with_context(|| format!("{}: no PostgreSQL host for {}", c.label, m.name))?;
            let authority = m
                .api
                .strip_prefix("https://")
                .and_then(|r| r.split('/').next())
                .with_context(|| format!("{}: API URL {}", c.label, m.api))?;
            let (host, port) = authority
                .rsplit_once(':')
                .with_context(|| format!("{}: API URL {} has no port", c.label, m.api))?;
            let s = Server {
                name: m.name.clone(),
                addr: h.addr,
                pg_port: h.port,
                api_port: port.parse().context("API port")?,
                api_name: api_name.unwrap_or(host).to_owned(),
            };
            haproxy::check_word("server name", &s.name)?;
            haproxy::check_word("REST API name", &s.api_name)?;
            Ok(s)
        })
        .collect()
}

/// The plan of the HAProxy whose files live in `dir`.
fn plan(label: &str, dir: &Path, bind: SocketAddr, servers: Vec<Server>, checks: Checks) -> Plan {
    Plan {
        label: label.to_owned(),
        bind,
        servers,
        ca_file: dir.join("ca.crt"),
        client_pem: dir.join("client.pem"),
        socket: dir.join("admin.sock"),
        state_file: dir.join("server-state"),
        checks,
    }
}

/// The check settings from `pgkeep render haproxy --dir <pgkeep_dir>` (with the pgkeep-side
/// files), and where the bench's pgkeep-side configuration differs from that rendering.
async fn from_pgkeep(bin: &Path, pgkeep_dir: &Path, p: &Plan) -> Result<(Checks, Vec<String>)> {
    let s = |x: &Path| x.to_string_lossy().into_owned();
    let rendered = Cmd::new(s(bin))
        .args(["render", "haproxy", "--dir", &s(pgkeep_dir), "--ca-file"])
        .args([s(&p.ca_file), "--client-cert".into(), s(&p.client_pem)])
        .args(["--stats-socket".into(), s(&p.socket), "--state-file".into()])
        .args([s(&p.state_file)])
        .timeout(Duration::from_secs(30))
        .output()
        .await?;
    let checks = Checks::from_rendered(&rendered)?;
    let mut ours = p.clone();
    ours.checks = checks.clone();
    Ok((
        checks,
        haproxy::compare_rendered(&rendered, &haproxy::config(&ours)),
    ))
}

/// Starts the two HAProxies (pgkeep's `k`, Patroni's `p`) under `work`/haproxy, pushing each
/// into `fronts` as soon as it runs (so cleanup finds it). The settings come from pgkeep's
/// renderer (`bin`, environment `pgkeep_dir`), else from [`Checks::default`].
#[allow(clippy::too_many_arguments)]
pub async fn start_all(
    work: &Path,
    port_base: u16,
    bin: &Path,
    pgkeep_dir: &Path,
    (k, p): (&Cluster, &Cluster),
    shared: &Shared,
    cg: &Cgroups,
    fronts: &mut Vec<Front>,
) -> Result<Setup> {
    if !Path::new(BIN).exists() {
        bail!("{BIN} is missing (make deps installs the Debian package haproxy)");
    }
    let user = User::lookup("haproxy")?;
    let base = work.join("haproxy");
    sys::mkdir(&base, 0o755, None)?;
    let root = User::lookup("root")?;
    crate::patroni::issue(&base, "client", "haproxy-bench", shared, &root).await?;
    {
        use std::os::unix::fs::PermissionsExt;
        let key = base.join("client.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    let pem = std::fs::read_to_string(base.join("client.crt"))?
        + &std::fs::read_to_string(base.join("client.key"))?;
    let lb_name = shared.doc["load_balancer"]["host"]
        .as_str()
        .context(
            "cluster.json: load_balancer.host (the name pgkeep's PostgreSQL certificates carry)",
        )?
        .to_owned();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let sides = [
        ("pgkeep", k, None, lb_name),
        (
            "Patroni",
            p,
            Some(PATRONI_REST_NAME),
            "127.0.0.1".to_owned(),
        ),
    ];
    let mut plans = Vec::new();
    for (i, (label, c, api_name, _)) in (0u16..).zip(&sides) {
        let dir = base.join(label.to_lowercase());
        let bind = SocketAddr::new(loopback, write_port(port_base, i));
        sys::check_port_free(bind.port())?;
        let default = Checks::default();
        plans.push(plan(label, &dir, bind, servers(c, *api_name)?, default));
    }
    let (checks, source, diffs) = match from_pgkeep(bin, pgkeep_dir, &plans[0]).await {
        Ok((c, d)) => (
            c,
            "`pgkeep render haproxy --dir` of the run's pgkeep environment".to_owned(),
            d,
        ),
        Err(e) => (
            Checks::default(),
            format!(
                "the numbers documented in crates/pgkeep/src/haproxy (`pgkeep render haproxy` failed: {e:#})"
            ),
            Vec::new(),
        ),
    };
    let version = Cmd::new(BIN)
        .args(["-v"])
        .timeout(Duration::from_secs(10))
        .output()
        .await
        .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e:#})"));
    for ((label, c, _, tls_name), mut plan) in sides.into_iter().zip(plans) {
        plan.checks = checks.clone();
        let dir = plan
            .ca_file
            .parent()
            .context("HAProxy directory")?
            .to_owned();
        sys::mkdir(&dir, 0o700, Some(&user))?;
        std::fs::copy(&shared.ca, &plan.ca_file)?;
        user.chown(&plan.ca_file)?;
        sys::write_file(&plan.client_pem, &pem, 0o600, Some(&user))?;
        // Nothing to load: pgkeep's `defaults` read the file, a fresh start has no states.
        sys::write_file(&plan.state_file, "1\n", 0o600, Some(&user))?;
        let config = haproxy::config(&plan);
        let cfg = dir.join("haproxy.cfg");
        sys::write_file(&cfg, &config, 0o600, Some(&user))?;
        let cfg_s = cfg.to_string_lossy().into_owned();
        Cmd::new(BIN)
            .args(["-c", "-q", "-f", &cfg_s])
            .user(&user)
            .timeout(Duration::from_secs(20))
            .output()
            .await
            .with_context(|| format!("haproxy -c {cfg_s}"))?;
        let cgroup = cg.group(&format!("haproxy-{}", label.to_lowercase()))?;
        let log = dir.join("haproxy.log");
        let pid = Cmd::new(BIN)
            .args(["-db", "-f", &cfg_s])
            .user(&user)
            .cwd(&dir)
            .cgroup(&cgroup)
            .spawn(&log)
            .await?;
        let target = Target {
            hosts: vec![Host {
                member: "haproxy".into(),
                name: tls_name,
                addr: loopback,
                port: plan.bind.port(),
            }],
            ..c.app.clone()
        };
        fronts.push(Front {
            proxy: Haproxy {
                label,
                dir,
                pid: Some(pid),
                cgroup,
                bind: plan.bind,
                config,
            },
            target,
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(plan.bind).await.is_err() {
            if !sys::alive(pid) || Instant::now() >= deadline {
                bail!(
                    "{label}'s HAProxy does not listen on {}; see {}",
                    plan.bind,
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Setup {
        checks,
        source,
        diffs,
        version,
    })
}
