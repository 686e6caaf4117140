//! HAProxy in front of each product (`--via-haproxy`): the ONE configuration template both
//! products get, the check settings taken from pgkeep's own renderer (`pgkeep render haproxy`),
//! and HAProxy's log read back (when it marked which server UP or DOWN). The processes
//! themselves are in [`crate::front`].
//!
//! The template reproduces the write half of what `pgkeep render haproxy` writes
//! (`crates/pgkeep/src/haproxy`): the same `defaults` and the same `backend pg_write` lines,
//! byte for byte when given the same servers and files ([`compare_rendered`] checks that in
//! every run). Differences, all outside the checks: only the write frontend (the writer needs no
//! read port), and the log goes to stderr in `iso` format (microsecond timestamps) instead of
//! `raw`, so the server state changes can be placed on the trial's time line.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The write frontend and backend (the name pgkeep's renderer gives them).
pub const BACKEND: &str = "pg_write";

/// How the write backend reacts to a connection its server refuses (pgkeep's rendering).
pub const OBSERVE: &str = "observe layer4 error-limit 1 on-error sudden-death";

/// The check settings (identical for both products).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checks {
    /// Interval between checks of an UP server.
    pub inter: String,
    /// Interval after a failed check of an UP server.
    pub fastinter: String,
    /// Interval between checks of a DOWN server.
    pub downinter: String,
    /// Consecutive passed checks before a server is UP.
    pub rise: u32,
    /// Consecutive failed checks before a server is DOWN.
    pub fall: u32,
    /// `timeout check`.
    pub timeout_check: String,
    /// `timeout connect`.
    pub timeout_connect: String,
}

impl Default for Checks {
    /// The numbers documented in `crates/pgkeep/src/haproxy/mod.rs` for the write backend.
    fn default() -> Self {
        Checks {
            inter: "1s".into(),
            fastinter: "250ms".into(),
            downinter: "100ms".into(),
            rise: 1,
            fall: 2,
            timeout_check: "1s".into(),
            timeout_connect: "1s".into(),
        }
    }
}

impl Checks {
    /// The `pg_write` backend's `default-server` line and the `defaults` timeouts of a
    /// configuration `pgkeep render haproxy` printed.
    pub fn from_rendered(text: &str) -> Result<Checks> {
        let backend = section(text, &format!("backend {BACKEND}"))
            .with_context(|| format!("no `backend {BACKEND}` in pgkeep's rendering"))?;
        let line = backend
            .iter()
            .find(|l| l.trim_start().starts_with("default-server "))
            .context("no default-server line in the write backend")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| -> Result<String> {
            let i = words
                .iter()
                .position(|w| *w == key)
                .with_context(|| format!("default-server has no {key}"))?;
            words
                .get(i + 1)
                .map(|s| (*s).to_owned())
                .with_context(|| format!("default-server: {key} without a value"))
        };
        let defaults = section(text, "defaults").context("no defaults section")?;
        let timeout = |what: &str| -> Result<String> {
            defaults
                .iter()
                .find_map(|l| l.trim().strip_prefix(&format!("timeout {what} ")))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("defaults: no timeout {what}"))
        };
        Ok(Checks {
            inter: after("inter")?,
            fastinter: after("fastinter")?,
            downinter: after("downinter")?,
            rise: after("rise")?.parse().context("rise")?,
            fall: after("fall")?.parse().context("fall")?,
            timeout_check: timeout("check")?,
            timeout_connect: timeout("connect")?,
        })
    }

    /// `inter 1s fastinter 250ms downinter 100ms rise 1 fall 2`.
    pub fn server_words(&self) -> String {
        format!(
            "inter {} fastinter {} downinter {} rise {} fall {}",
            self.inter, self.fastinter, self.downinter, self.rise, self.fall
        )
    }
}

/// One database server as the write backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Member name (the server's name in HAProxy).
    pub name: String,
    /// Address of PostgreSQL and the REST API.
    pub addr: IpAddr,
    /// PostgreSQL port (the client's traffic, passed through).
    pub pg_port: u16,
    /// REST API port (the checks).
    pub api_port: u16,
    /// The DNS name the REST certificate carries (`verifyhost`, `check-sni`).
    pub api_name: String,
}

/// Everything one product's configuration depends on.
#[derive(Debug, Clone)]
pub struct Plan {
    /// "pgkeep" or "Patroni" (for the header).
    pub label: String,
    /// Where the write frontend listens.
    pub bind: SocketAddr,
    /// The product's members.
    pub servers: Vec<Server>,
    /// The run's CA (the REST certificates must chain to it).
    pub ca_file: PathBuf,
    /// HAProxy's client certificate and key in one PEM (`crt`), presented on every check.
    pub client_pem: PathBuf,
    /// The stats socket (mode 0600).
    pub socket: PathBuf,
    /// The server-state file (pgkeep's `defaults` load it; empty here).
    pub state_file: PathBuf,
    /// The check settings.
    pub checks: Checks,
}

/// `address:port` as HAProxy writes it (IPv6 with the `ipv6@` prefix, as pgkeep's renderer).
fn haddr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("ipv6@{}:{}", v6.ip(), v6.port()),
    }
}

/// The configuration for `p`: pgkeep's `global` (logging in `iso` format to stderr),
/// `defaults` and write frontend and backend.
pub fn config(p: &Plan) -> String {
    let c = &p.checks;
    let (ca, crt) = (p.ca_file.display(), p.client_pem.display());
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HAProxy of pgkeep-bench for {label} (--via-haproxy): the same template for both\n\
         # products; defaults and backend {BACKEND} as `pgkeep render haproxy` writes them.\n\
         \n\
         global\n    \
         log stderr format iso local0 info\n    \
         maxconn 2000\n    \
         stats socket {socket} mode 600 level admin\n    \
         stats timeout 30s\n    \
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
         retries 2\n\
         \n\
         frontend {BACKEND}\n    \
         bind {bind}\n    \
         default_backend {BACKEND}\n\
         \n\
         backend {BACKEND}\n    \
         retries 0\n    \
         option httpchk GET /primary\n    \
         http-check expect status 200\n    \
         default-server {words} on-marked-down shutdown-sessions {OBSERVE}",
        label = p.label,
        socket = p.socket.display(),
        state = p.state_file.display(),
        tconn = c.timeout_connect,
        tcheck = c.timeout_check,
        bind = haddr(p.bind),
        words = c.server_words(),
    );
    for s in &p.servers {
        let _ = writeln!(
            o,
            "    server {name} {addr} check port {api} check-ssl verify required ca-file {ca} \
             verifyhost {n} check-sni {n} crt {crt}",
            name = s.name,
            addr = haddr(SocketAddr::new(s.addr, s.pg_port)),
            api = s.api_port,
            n = s.api_name,
        );
    }
    o
}

/// The lines of the section that starts with line `header` (itself excluded), up to the next
/// blank or unindented line.
pub fn section(text: &str, header: &str) -> Option<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| l.trim_end() != header);
    lines.next()?;
    Some(
        lines
            .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.starts_with('#'))
            .collect(),
    )
}

/// Where `ours` differs from `rendered` (pgkeep's) in `defaults` and the write backend; empty
/// when both sections are identical.
pub fn compare_rendered(rendered: &str, ours: &str) -> Vec<String> {
    let mut diffs = Vec::new();
    for name in ["defaults".to_owned(), format!("backend {BACKEND}")] {
        match (section(rendered, &name), section(ours, &name)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => {
                for l in a.iter().filter(|l| !b.contains(l)) {
                    diffs.push(format!("{name}: pgkeep renders `{l}`"));
                }
                for l in b.iter().filter(|l| !a.contains(l)) {
                    diffs.push(format!("{name}: the bench writes `{l}`"));
                }
            }
            (None, _) => diffs.push(format!("pgkeep's rendering has no `{name}`")),
            (_, None) => diffs.push(format!("the bench's template has no `{name}`")),
        }
    }
    diffs
}

/// A server state change in HAProxy's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When (epoch seconds, from the log's ISO timestamp).
    pub t: f64,
    /// The server (member name).
    pub server: String,
    /// Marked UP (true) or DOWN (false).
    pub up: bool,
    /// The reason HAProxy gives (`Layer7 check passed, code: 200, check duration: 2ms`).
    pub reason: String,
}

/// Epoch seconds of an ISO 8601 time as HAProxy's `iso` log format writes it
/// (`2026-11-29T20:04:45.174725+00:00`), to the millisecond.
pub fn parse_iso(s: &str) -> Option<f64> {
    pgkeep_core::ha::parse_rfc3339(s).map(|ms| ms as f64 / 1000.0)
}

/// The server state changes of the write backend in a log text (`iso` format).
pub fn events(log: &str) -> Vec<Event> {
    let prefix = format!("Server {BACKEND}/");
    log.lines()
        .filter_map(|l| {
            let (stamp, msg) = l.split_once(' ')?;
            let t = parse_iso(stamp)?;
            let rest = msg.strip_prefix(&prefix)?;
            let (server, rest) = rest.split_once(' ')?;
            let up = if rest.starts_with("is UP") {
                true
            } else if rest.starts_with("is DOWN") {
                false
            } else {
                return None;
            };
            let reason = rest
                .split_once("reason: ")
                .map(|(_, r)| r.split(". ").next().unwrap_or(r).to_owned())
                .unwrap_or_default();
            Some(Event {
                t,
                server: server.to_owned(),
                up,
                reason,
            })
        })
        .collect()
}

/// What HAProxy did around one trial, relative to the trial's event (kill or POST).
#[derive(Debug, Clone, Default)]
pub struct ProxyView {
    /// Event → the old primary marked DOWN (s).
    pub old_down: Option<f64>,
    /// Event → the new primary marked UP (s).
    pub new_up: Option<f64>,
    /// Event → the new leader key (s).
    pub new_key: Option<f64>,
    /// The new leader key → the new primary marked UP (s): promotion, `/primary` turning 200
    /// and HAProxy's next check of the DOWN server.
    pub key_to_up: Option<f64>,
    /// The new primary marked UP → the first acknowledged write (s): the client's reconnect.
    pub up_to_ack: Option<f64>,
    /// The reason HAProxy logged with the new primary's UP.
    pub up_reason: String,
}

/// The view of a trial from the log's `events`: event at `t0`, the old and new primary, the new
/// leader key's time and the first acknowledged write's end (epoch seconds).
pub fn view(
    events: &[Event],
    t0: f64,
    old: &str,
    new: &str,
    key: Option<f64>,
    ack: Option<f64>,
) -> ProxyView {
    let first = |name: &str, up: bool| {
        events
            .iter()
            .find(|e| e.t >= t0 && e.server == name && e.up == up)
    };
    let down = first(old, false).map(|e| e.t);
    let up = first(new, true);
    let up_t = up.map(|e| e.t);
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    ProxyView {
        old_down: down.map(|t| t - t0),
        new_up: up_t.map(|t| t - t0),
        new_key: key.map(|t| t - t0),
        key_to_up: diff(key, up_t),
        up_to_ack: diff(up_t, ack),
        up_reason: up.map(|e| e.reason.clone()).unwrap_or_default(),
    }
}

/// The write backend's servers and their status (`UP`, `DOWN`, `UP 1/2` = going down, ...)
/// from the CSV of `show stat` on the stats socket.
pub fn parse_stat(csv: &str) -> Vec<(String, String)> {
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let at = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st)) = (at("pxname"), at("svname"), at("status")) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&BACKEND))
        .filter(|f| {
            f.get(sv)
                .is_some_and(|s| !matches!(*s, "FRONTEND" | "BACKEND"))
        })
        .filter_map(|f| Some(((*f.get(sv)?).to_owned(), (*f.get(st)?).to_owned())))
        .collect()
}

/// True when HAProxy routes writes to `leader` only: it is UP (or UP and going down) and every
/// other server is DOWN or in maintenance.
pub fn routes_to(states: &[(String, String)], leader: &str) -> bool {
    states
        .iter()
        .any(|(n, s)| n == leader && s.starts_with("UP"))
        && states
            .iter()
            .filter(|(n, _)| n != leader)
            .all(|(_, s)| s.starts_with("DOWN") || s.starts_with("MAINT"))
}

/// Fails unless `s` is a name HAProxy's tokenizer reads as one word.
pub fn check_word(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || "#\"'\\$".contains(c))
    {
        bail!("{what} {s:?} cannot go into an HAProxy configuration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            label: "pgkeep".into(),
            bind: "127.0.0.1:17201".parse().unwrap(),
            servers: vec![Server {
                name: "node1".into(),
                addr: "127.42.1.11".parse().unwrap(),
                pg_port: 20001,
                api_port: 20002,
                api_name: "node1.pgkbench.internal".into(),
            }],
            ca_file: "/w/ca.crt".into(),
            client_pem: "/w/client.pem".into(),
            socket: "/w/admin.sock".into(),
            state_file: "/w/server-state".into(),
            checks: Checks::default(),
        }
    }

    /// What `pgkeep render haproxy` printed for such a plan (crates/pgkeep/src/haproxy).
    const RENDERED: &str = "# comment\n\nglobal\n    log stderr format raw local0 info\n\n\
        defaults\n    mode tcp\n    log global\n    option tcplog\n    option dontlognull\n    \
        option tcpka\n    load-server-state-from-file global\n    timeout connect 1s\n    \
        timeout client 30m\n    timeout server 30m\n    timeout check 1s\n    retries 2\n\n\
        frontend pg_write\n    bind 127.42.1.41:30000\n    default_backend pg_write\n\n\
        backend pg_write\n    retries 0\n    option httpchk GET /primary\n    \
        http-check expect status 200\n    \
        default-server inter 1s fastinter 250ms downinter 100ms rise 1 fall 2 \
        on-marked-down shutdown-sessions observe layer4 error-limit 1 on-error sudden-death\n    \
        server node1 127.42.1.11:20001 check port 20002 check-ssl verify required ca-file \
        /w/ca.crt verifyhost node1.pgkbench.internal check-sni node1.pgkbench.internal crt \
        /w/client.pem\n\nfrontend pg_read\n    bind 127.42.1.41:30001\n";

    #[test]
    fn template_matches_pgkeeps_rendering() {
        let ours = config(&plan());
        assert_eq!(compare_rendered(RENDERED, &ours), Vec::<String>::new());
        assert!(ours.contains("log stderr format iso"));
        assert!(ours.contains("bind 127.0.0.1:17201"));
        assert!(!ours.contains("pg_read"));
        let mut other = plan();
        other.checks.inter = "2s".into();
        let d = compare_rendered(RENDERED, &config(&other));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[1].contains("inter 2s"), "{d:?}");
    }

    #[test]
    fn checks_from_the_rendering() {
        assert_eq!(Checks::from_rendered(RENDERED).unwrap(), Checks::default());
        assert!(Checks::from_rendered("defaults\n    mode tcp\n").is_err());
        assert_eq!(
            Checks::default().server_words(),
            "inter 1s fastinter 250ms downinter 100ms rise 1 fall 2"
        );
    }

    #[test]
    fn iso_times() {
        let t = parse_iso("2026-11-29T14:22:33.400000+00:00").unwrap();
        assert!((t - 1_795_962_153.4).abs() < 1e-6);
        let t2 = parse_iso("2026-11-29T15:22:33.400000+01:00").unwrap();
        assert!((t2 - t).abs() < 1e-6);
        assert!(parse_iso("[WARNING]").is_none());
        assert_eq!(crate::sys::utc_stamp(t), "20261129T142233Z");
    }

    #[test]
    fn events_and_view() {
        let log = "[WARNING]  (1) : Server pg_write/node1 is DOWN, reason: x\n\
            2026-11-29T14:22:33.000000+00:00 Server pg_write/node1 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms. 1 active and 0 backup servers left.\n\
            2026-11-29T14:22:34.000000+00:00 backend pg_write has no server available!\n\
            2026-11-29T14:22:43.500000+00:00 Server pg_write/node2 is UP, reason: Layer7 check passed, code: 200, check duration: 3ms. 1 active and 0 backup servers online.\n\
            2026-11-29T14:22:43.600000+00:00 127.0.0.1:5000 [29/Nov/2026:14:22:43.600] pg_write pg_write/node2 1/0/5 0 -- 1/1/0/0/0 0/0\n";
        let ev = events(log);
        assert_eq!(ev.len(), 2);
        assert!(!ev[0].up && ev[1].up && ev[1].server == "node2");
        assert_eq!(
            ev[1].reason,
            "Layer7 check passed, code: 200, check duration: 3ms"
        );
        let t0 = parse_iso("2026-11-29T14:22:32.500000+00:00").unwrap();
        let v = view(&ev, t0, "node1", "node2", Some(t0 + 10.8), Some(t0 + 11.1));
        assert!((v.old_down.unwrap() - 0.5).abs() < 1e-6);
        assert!((v.new_up.unwrap() - 11.0).abs() < 1e-6);
        assert!((v.key_to_up.unwrap() - 0.2).abs() < 1e-6);
        assert!((v.up_to_ack.unwrap() - 0.1).abs() < 1e-6);
        assert!(check_word("name", "node1.x").is_ok() && check_word("p", "a b").is_err());
    }

    #[test]
    fn stat_csv() {
        let csv = "# pxname,svname,qcur,status,weight\npg_write,FRONTEND,,OPEN,\n\
            pg_write,node1,0,UP,1\npg_write,node2,0,DOWN,1\npg_write,node3,0,DOWN 1/1,1\n\
            pg_write,BACKEND,0,UP,1\n";
        let st = parse_stat(csv);
        assert_eq!(st.len(), 3);
        assert_eq!(st[0], ("node1".into(), "UP".into()));
        assert!(routes_to(&st, "node1"));
        assert!(!routes_to(&st, "node2"));
        let both = parse_stat("# pxname,svname,status\npg_write,node1,UP 1/2\npg_write,node2,UP\n");
        assert!(!routes_to(&both, "node2"));
    }
}
