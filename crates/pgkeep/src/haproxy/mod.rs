//! HAProxy in front of the cluster: the configuration `pgkeep render haproxy` prints and
//! `pgkeep up` runs, and a small client of HAProxy's stats socket ([`stats`]).
//!
//! [`render`] is a pure function of a [`Plan`] (no file is read; the paths in the plan are only
//! written into the text). The configuration it produces:
//!
//! - two TCP frontends on non-default ports: **write** (`pg_write`, the primary only: its REST
//!   API answers `GET /primary` with 200) and **read** (`pg_read`, healthy replicas: `GET
//!   /replica?lag=<bytes>` answers 200). PostgreSQL's TLS passes through untouched, so clients
//!   keep verifying the server certificate end to end (`sslmode=verify-full` against the load
//!   balancer's name, which every PostgreSQL server certificate carries);
//! - every check runs over TLS against the node's REST API with `check-ssl verify required
//!   ca-file <cluster CA> verifyhost <node's REST name> check-sni <name>`, so a health answer
//!   from anything but the node's own certificate (another CA, another name) marks the server
//!   DOWN; never `verify none`. With a client certificate (`crt`), the checks also work against
//!   an API with `verify_client: required`;
//! - `on-marked-down shutdown-sessions`: sessions on a server that stops being primary (or a
//!   healthy replica) are cut at once instead of idling on a node that cannot serve them;
//! - a stats socket (mode 0600, never world-accessible) and a server-state file, so a reload
//!   keeps the servers' states instead of starting every server UP again.
//!
//! # Check timings ([`CheckTimings::default`])
//!
//! | setting | write | read | why |
//! |---|---|---|---|
//! | `inter` | 1s | 1s | an UP server is checked every second |
//! | `fastinter` | 250ms | 250ms | after one failed check the next comes 250 ms later, so `fall 2` confirms a loss within 1.25 s of it |
//! | `downinter` | 100ms | 1s | a DOWN server in the write backend (every replica) is asked every 100 ms, so a new primary takes writes at most 100 ms after its `/primary` turns 200 (a switchover's whole outage is a few hundred ms: this wait would otherwise be a large share of it); readers can wait a second |
//! | `rise` | 1 | 2 | `/primary` = 200 is authoritative (the node holds the leader key and runs as primary), one answer is enough; a replica must pass twice in a row before it takes reads, so one hovering around the lag limit does not flap |
//! | `fall` | 2 | 2 | one slow or lost check must not cut every session on a healthy primary (`shutdown-sessions`) |
//! | `timeout check` | 1s | 1s | the agent answers in milliseconds; a node that needs a second is not healthy |
//! | `timeout connect` | 1s | 1s | a server HAProxy believes UP but that does not answer costs a client at most a second per try |
//! | `observe layer4 error-limit 1 on-error sudden-death` | yes | – | a connection the primary refuses (its PostgreSQL stopped for a switchover, or crashed) makes the next check, `fastinter` later, decisive: one more failure and it is DOWN. Not `mark-down`: one refused or timed-out connection during a connection storm must not cut every session of a healthy primary |
//! | `retries` | 0 | 2 (defaults) | the write backend has one server UP: a retry can only go back to the primary that just refused, after HAProxy's one-second turn-around pause. The client's own reconnect is faster and reaches the new primary as soon as it is UP. Readers keep two retries with `redispatch` to another replica |
//!
//! The cost is about twenty-five TLS handshakes a second over three nodes (a replica's agent sees
//! eleven a second, the primary's two), well under a millisecond of CPU each.

pub mod stats;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::inventory::Inventory;

/// Name of the write frontend and backend (the primary).
pub const WRITE_BACKEND: &str = "pg_write";
/// Name of the read frontend and backend (healthy replicas).
pub const READ_BACKEND: &str = "pg_read";
/// Default `lag=` limit of the read backend's check: 16 MiB of WAL. A replica further behind
/// serves noticeably stale reads; one that is a few megabytes behind during a bulk load does
/// not leave the pool for it.
pub const DEFAULT_REPLICA_LAG: u64 = 16 * 1024 * 1024;

/// Errors of [`Plan::from_inventory`] and [`render`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HAProxy configuration: {0}")]
pub struct HaproxyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, HaproxyError> {
    Err(HaproxyError(msg.into()))
}

/// How often and how strictly HAProxy checks the servers (see the module docs for the reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckTimings {
    /// Interval between checks of an UP server.
    pub inter: Duration,
    /// Interval after a failed check of an UP server (while it is going down).
    pub fastinter: Duration,
    /// Interval between checks of a DOWN server in the write backend.
    pub write_downinter: Duration,
    /// Interval between checks of a DOWN server in the read backend.
    pub read_downinter: Duration,
    /// Consecutive successful checks before a server takes writes.
    pub write_rise: u32,
    /// Consecutive successful checks before a server takes reads.
    pub read_rise: u32,
    /// Consecutive failed checks before a server is marked DOWN.
    pub fall: u32,
    /// `timeout check`: how long one check may read.
    pub timeout_check: Duration,
    /// `timeout connect`: how long a client's connection to a server may take.
    pub timeout_connect: Duration,
}

impl Default for CheckTimings {
    fn default() -> Self {
        CheckTimings {
            inter: Duration::from_secs(1),
            fastinter: Duration::from_millis(250),
            write_downinter: Duration::from_millis(100),
            read_downinter: Duration::from_secs(1),
            write_rise: 1,
            read_rise: 2,
            fall: 2,
            timeout_check: Duration::from_secs(1),
            timeout_connect: Duration::from_secs(1),
        }
    }
}

/// One database host as HAProxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Member name (the server's name in HAProxy).
    pub name: String,
    /// Address of PostgreSQL and the REST API.
    pub address: IpAddr,
    /// PostgreSQL port (client traffic).
    pub pg_port: u16,
    /// REST API port (checks).
    pub api_port: u16,
    /// The name the REST API's certificate must carry (`verifyhost`, `check-sni`).
    pub api_name: String,
}

/// The files the configuration names (on the HAProxy host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The cluster CA the REST API certificates must chain to.
    pub ca_file: PathBuf,
    /// HAProxy's client certificate and key in one PEM file (`crt`), presented on every check.
    pub client_cert: Option<PathBuf>,
    /// The stats socket (created by HAProxy, mode 0600).
    pub stats_socket: PathBuf,
    /// The server-state file a reload starts from (written from the socket before a reload).
    pub state_file: PathBuf,
}

/// Everything the configuration depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Cluster name (for the header).
    pub cluster: String,
    /// Where the write frontend listens.
    pub write_bind: SocketAddr,
    /// Where the read frontend listens.
    pub read_bind: SocketAddr,
    /// The database hosts.
    pub servers: Vec<Server>,
    /// Files named in the configuration.
    pub files: Files,
    /// Check timings.
    pub checks: CheckTimings,
    /// `lag=` of the read backend's check, in bytes.
    pub replica_lag: u64,
}

impl Plan {
    /// The plan for an inventory's load balancer and database hosts (REST names are the hosts'
    /// fully qualified names, as in their certificates), with default timings.
    pub fn from_inventory(
        inv: &Inventory,
        files: Files,
        replica_lag: u64,
    ) -> Result<Plan, HaproxyError> {
        let Some(lb) = &inv.load_balancer else {
            return err(
                "the inventory has no load_balancer (name, address, write_port, read_port)",
            );
        };
        Ok(Plan {
            cluster: inv.cluster.clone(),
            write_bind: SocketAddr::new(lb.address, lb.write_port),
            read_bind: SocketAddr::new(lb.address, lb.read_port),
            servers: inv
                .database_hosts
                .iter()
                .map(|h| Server {
                    name: h.name.clone(),
                    address: h.address,
                    pg_port: h.pg_port,
                    api_port: h.api_port,
                    api_name: inv.fqdn(&h.name),
                })
                .collect(),
            files,
            checks: CheckTimings::default(),
            replica_lag,
        })
    }
}

/// A duration as HAProxy writes it: whole seconds as `Ns`, otherwise milliseconds.
fn hdur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `address:port` for a `bind` or `server` line (IPv6 with HAProxy's `ipv6@` prefix).
fn haddr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("ipv6@{}:{}", v6.ip(), v6.port()),
    }
}

/// A path HAProxy's tokenizer reads as one word: absolute, printable, no blanks, quotes, `#`
/// or backslashes.
fn check_path(what: &str, p: &Path) -> Result<String, HaproxyError> {
    let Some(s) = p.to_str() else {
        return err(format!("{what} path {} is not UTF-8", p.display()));
    };
    let ok = p.is_absolute()
        && !s.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '#' | '"' | '\'' | '\\' | '$')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        err(format!(
            "{what} path {s:?} must be absolute, without blanks, quotes, '#', '$' or '\\'"
        ))
    }
}

/// A server name or host name: letters, digits, `-`, `_`, `.`.
fn check_name(what: &str, s: &str) -> Result<(), HaproxyError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        err(format!(
            "{what} {s:?} must be letters, digits, '-', '_' or '.'"
        ))
    }
}

fn check_plan(plan: &Plan) -> Result<(), HaproxyError> {
    if plan.servers.is_empty() {
        return err("no database hosts");
    }
    check_name("cluster name", &plan.cluster)?;
    if plan.write_bind == plan.read_bind {
        return err(format!(
            "write and read frontends both on {}",
            plan.write_bind
        ));
    }
    for b in [plan.write_bind, plan.read_bind] {
        if b.port() == 0 {
            return err(format!("frontend address {b} needs a port"));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &plan.servers {
        check_name("server name", &s.name)?;
        check_name("REST API name", &s.api_name)?;
        if !seen.insert(s.name.as_str()) {
            return err(format!("server {} appears twice", s.name));
        }
        if s.pg_port == 0 || s.api_port == 0 {
            return err(format!("server {} needs both ports", s.name));
        }
    }
    let c = plan.checks;
    for (what, d) in [
        ("inter", c.inter),
        ("fastinter", c.fastinter),
        ("downinter", c.write_downinter),
        ("downinter", c.read_downinter),
        ("timeout check", c.timeout_check),
        ("timeout connect", c.timeout_connect),
    ] {
        if d < Duration::from_millis(10) {
            return err(format!("{what} {d:?} is too short"));
        }
    }
    if c.write_rise == 0 || c.read_rise == 0 || c.fall == 0 {
        return err("rise and fall must be at least 1");
    }
    Ok(())
}

/// The HAProxy configuration for `plan`.
pub fn render(plan: &Plan) -> Result<String, HaproxyError> {
    check_plan(plan)?;
    let f = &plan.files;
    let ca = check_path("ca-file", &f.ca_file)?;
    let crt = f
        .client_cert
        .as_deref()
        .map(|p| check_path("client certificate", p))
        .transpose()?;
    let socket = check_path("stats socket", &f.stats_socket)?;
    let state = check_path("server-state file", &f.state_file)?;
    let c = plan.checks;
    let mut out = String::new();
    let w = &mut out;
    // Writing to a String cannot fail.
    let _ = writeln!(
        w,
        "# HAProxy for the pgkeep cluster {cluster}: rendered by `pgkeep render haproxy`;\n\
         # edits are overwritten (render again instead).\n\
         #\n\
         # {write} (port {wp}): the primary only (REST API GET /primary = 200).\n\
         # {read} (port {rp}): healthy replicas (GET /replica?lag={lag} = 200, at most {lag} bytes of\n\
         #   replay lag).\n\
         # Client TLS passes through: PostgreSQL's certificate (it carries this load balancer's\n\
         # name) is verified by the client, end to end (sslmode=verify-full).\n\
         # Checks go to each node's REST API over TLS: the certificate must chain to the cluster CA\n\
         # (verify required) and carry the node's name (verifyhost); anything else is DOWN.\n\
         #\n\
         # Check timings and why:\n\
         #   inter {inter}: an UP server is checked every {inter}.\n\
         #   fastinter {fast} + fall {fall}: after a failed check the next one follows in {fast}, so a\n\
         #     lost primary is DOWN within inter + fastinter, while one slow check alone never\n\
         #     cuts every session of a healthy primary (on-marked-down shutdown-sessions).\n\
         #   downinter {wdown} (write) / {rdown} (read): a replica is asked every {wdown} whether\n\
         #     it became primary, so after a failover writes reach the new primary at most {wdown}\n\
         #     after its /primary answers 200; readers can wait {rdown}.\n\
         #   rise {wrise} (write): /primary = 200 is authoritative (leader key held, PostgreSQL\n\
         #     promoted), one answer is enough. rise {rrise} (read): a replica must pass twice in a\n\
         #     row, so one hovering around the lag limit does not flap.\n\
         #   timeout check {tcheck}: the agent answers in milliseconds. timeout connect {tconn}.\n\
         #   {write}: observe layer4, on-error sudden-death: a connection the primary refuses (it\n\
         #     stopped for a switchover) makes the next check decisive; retries 0: a retry could\n\
         #     only go back to that primary after a one-second pause, the client's own is faster.\n\
         # HAProxy 2.6 starts every server UP (until its first checks fail): wait until only the\n\
         # primary is UP in {write} (`show stat` on the stats socket) before sending clients.",
        cluster = plan.cluster,
        write = WRITE_BACKEND,
        read = READ_BACKEND,
        wp = plan.write_bind.port(),
        rp = plan.read_bind.port(),
        lag = plan.replica_lag,
        inter = hdur(c.inter),
        fast = hdur(c.fastinter),
        fall = c.fall,
        wdown = hdur(c.write_downinter),
        rdown = hdur(c.read_downinter),
        wrise = c.write_rise,
        rrise = c.read_rise,
        tcheck = hdur(c.timeout_check),
        tconn = hdur(c.timeout_connect),
    );
    let _ = writeln!(
        w,
        "\nglobal\n    \
         log stderr format raw local0 info\n    \
         maxconn 2000\n    \
         # Only root and the haproxy user can reach the socket (state, drain, maintenance).\n    \
         stats socket {socket} mode 600 level admin\n    \
         stats timeout 30s\n    \
         # Written from the socket before a reload, read by the new process: states survive.\n    \
         server-state-file {state}\n    \
         ssl-server-verify required\n    \
         ssl-default-server-options ssl-min-ver TLSv1.2\n\
         \n\
         defaults\n    \
         mode tcp\n    \
         log global\n    \
         option tcplog\n    \
         option dontlognull\n    \
         option tcpka\n    \
         load-server-state-from-file global\n    \
         timeout connect {tconn}\n    \
         timeout client 30m\n    \
         timeout server 30m\n    \
         timeout check {tcheck}\n    \
         retries 2",
        tconn = hdur(c.timeout_connect),
        tcheck = hdur(c.timeout_check),
    );
    let check_tls = |name: &str| {
        let mut s =
            format!("check-ssl verify required ca-file {ca} verifyhost {name} check-sni {name}");
        if let Some(crt) = &crt {
            s.push_str(&format!(" crt {crt}"));
        }
        s
    };
    for (backend, bind, path, rise, down, balance) in [
        (
            WRITE_BACKEND,
            plan.write_bind,
            "/primary".to_owned(),
            c.write_rise,
            c.write_downinter,
            None,
        ),
        (
            READ_BACKEND,
            plan.read_bind,
            format!("/replica?lag={}", plan.replica_lag),
            c.read_rise,
            c.read_downinter,
            Some("leastconn"),
        ),
    ] {
        let _ = writeln!(
            w,
            "\nfrontend {backend}\n    bind {bind}\n    default_backend {backend}\n\
             \nbackend {backend}",
            bind = haddr(bind),
        );
        if let Some(b) = balance {
            let _ = writeln!(w, "    balance {b}\n    option redispatch");
        }
        let write = backend == WRITE_BACKEND;
        if write {
            let _ = writeln!(w, "    retries 0");
        }
        let _ = writeln!(
            w,
            "    option httpchk GET {path}\n    \
             http-check expect status 200\n    \
             default-server inter {inter} fastinter {fast} downinter {down} rise {rise} fall {fall} \
             on-marked-down shutdown-sessions{observe}",
            inter = hdur(c.inter),
            fast = hdur(c.fastinter),
            down = hdur(down),
            fall = c.fall,
            observe = if write {
                " observe layer4 error-limit 1 on-error sudden-death"
            } else {
                ""
            },
        );
        for s in &plan.servers {
            let _ = writeln!(
                w,
                "    server {name} {addr} check port {api} {tls}",
                name = s.name,
                addr = haddr(SocketAddr::new(s.address, s.pg_port)),
                api = s.api_port,
                tls = check_tls(&s.api_name),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
