//! `pgkeep ctl`: the operator CLI.
//!
//! ```text
//! pgkeep ctl (-c FILE | --dir D) list [--format table|json]
//! ```
//!
//! The file is `D/ctl.yml` as `pgkeep up` writes it (`--dir D` means exactly that), or any
//! node's `node.yml`: both have Patroni's `scope`, `namespace`, `etcd3` and `ctl` sections, and
//! other top-level sections are ignored. `list` reads the cluster from etcd, like `patronictl
//! list`: member, host:port, role (`leader`, `sync_standby`, `replica`), state (`running`,
//! `streaming`, `stopped`, ...), timeline and lag in bytes behind the leader.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use pgkeep_core::cluster::{ClusterView, Initialize, Lsn};
use serde::{Deserialize, Serialize};

use crate::dcs::{Dcs, EtcdDcs, EtcdSettings, TlsFiles};

/// `pgkeep ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The ctl configuration (D/ctl.yml) or a node's configuration file.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        global = true,
        conflicts_with = "dir"
    )]
    pub config: Option<PathBuf>,
    /// A local environment's directory: uses D/ctl.yml.
    #[arg(long, value_name = "DIR", global = true)]
    pub dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The `ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List the members: host, role, state, timeline and lag.
    List(ListArgs),
}

/// `ctl list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Output formats of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// A JSON array.
    Json,
}

/// A list Patroni also accepts as one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Hosts {
    List(Vec<String>),
    Text(String),
}

/// The `etcd3` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdSection {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    hosts: Option<Hosts>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    cacert: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
}

/// What `ctl` reads from its file (other top-level keys are ignored, so a node.yml works).
#[derive(Debug, Deserialize)]
struct CtlFile {
    scope: String,
    #[serde(default)]
    namespace: Option<String>,
    etcd3: EtcdSection,
}

/// Where the configuration file is: `-c FILE`, `--dir D`, or the default environment.
fn config_path(args: &CtlArgs) -> Result<PathBuf> {
    if let Some(c) = &args.config {
        return Ok(c.clone());
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(super::up::DEFAULT_DIR));
    let p = dir.join("ctl.yml");
    if args.dir.is_none() && !p.exists() {
        bail!("give the configuration with -c FILE (or --dir D for a local environment)");
    }
    Ok(p)
}

fn load(path: &Path) -> Result<EtcdSettings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid YAML: {e}", path.display()))?;
    let f: CtlFile = serde_path_to_error::deserialize(&doc)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    let e = f.etcd3;
    let mut hosts: Vec<String> = match e.hosts {
        None => Vec::new(),
        Some(Hosts::List(v)) => v,
        Some(Hosts::Text(t)) => t.split(',').map(|s| s.trim().to_owned()).collect(),
    };
    hosts.extend(e.host);
    hosts.retain(|h| !h.is_empty());
    if hosts.is_empty() {
        bail!(
            "{}: etcd3.hosts: list at least one host:port",
            path.display()
        );
    }
    let protocol = e.protocol.unwrap_or_else(|| "https".into());
    if protocol != "https" {
        bail!(
            "{}: etcd3.protocol: pgkeep ctl talks to etcd over https only",
            path.display()
        );
    }
    let (Some(ca), Some(cert), Some(key)) = (e.cacert, e.cert, e.key) else {
        bail!(
            "{}: etcd3: set cacert, cert and key (mutual TLS)",
            path.display()
        );
    };
    Ok(EtcdSettings {
        endpoints: hosts.into_iter().map(|h| format!("https://{h}")).collect(),
        tls: Some(TlsFiles { ca, cert, key }),
        namespace: f.namespace.unwrap_or_else(|| "/service/".into()),
        scope: f.scope,
        request_timeout: Duration::from_secs(5),
        insecure: false,
    })
}

/// One member in `ctl list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberRow {
    /// Member name.
    pub name: String,
    /// PostgreSQL host (from the member's `conn_url`).
    pub host: String,
    /// PostgreSQL port.
    pub port: Option<u16>,
    /// `leader`, `sync_standby` or `replica`.
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, ...
    pub state: String,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Bytes behind the leader (0 for the leader; null when unknown).
    pub lag: Option<u64>,
    /// REST API URL.
    pub api_url: String,
}

/// The rows of `ctl list` for a view of the cluster, sorted by name.
pub fn rows(view: &ClusterView) -> Vec<MemberRow> {
    let leader = view.leader.as_ref().map(|l| l.name.as_str());
    let leader_lsn = leader
        .and_then(|l| view.members.get(l))
        .and_then(|m| m.data.xlog_location)
        .max(view.status.optime);
    view.members
        .iter()
        .map(|(name, m)| {
            let d = &m.data;
            let is_leader = Some(name.as_str()) == leader;
            let sync = view.sync.as_ref().is_some_and(|s| s.value.contains(name));
            let role = if is_leader {
                "leader"
            } else if sync {
                "sync_standby"
            } else {
                "replica"
            };
            let state = if !is_leader && d.replication_state.as_deref() == Some("streaming") {
                "streaming".to_owned()
            } else {
                d.state.clone()
            };
            let own = d.xlog_location.or(d.receive_lsn.max(d.replay_lsn));
            let lag = if is_leader {
                Some(0)
            } else {
                match (leader_lsn, own) {
                    (Some(Lsn(l)), Some(Lsn(o))) => Some(l.saturating_sub(o)),
                    _ => None,
                }
            };
            let (host, port) = d
                .conn_host_port()
                .map_or((String::new(), None), |(h, p)| (h, Some(p)));
            MemberRow {
                name: name.clone(),
                host,
                port,
                role: role.to_owned(),
                state,
                timeline: d.timeline,
                lag,
                api_url: d.api_url.clone(),
            }
        })
        .collect()
}

fn table(scope: &str, view: &ClusterView, rows: &[MemberRow]) -> String {
    let sysid = match &view.initialize {
        Some(Initialize::SystemId(id)) => format!(" ({id})"),
        _ => String::new(),
    };
    let paused = if view.is_paused() { "  [paused]" } else { "" };
    let mut cells = vec![["Member", "Host", "Role", "State", "TL", "Lag"].map(String::from)];
    for r in rows {
        cells.push([
            r.name.clone(),
            match r.port {
                Some(p) => format!("{}:{p}", r.host),
                None => r.host.clone(),
            },
            r.role.clone(),
            r.state.clone(),
            r.timeline.map(|t| t.to_string()).unwrap_or_default(),
            match (r.role.as_str(), r.lag) {
                ("leader", _) => String::new(),
                (_, Some(l)) => l.to_string(),
                (_, None) => "unknown".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!("Cluster: {scope}{sysid}{paused}\n");
    for c in &cells {
        let line: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no members registered)\n");
    }
    out
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// Runs `pgkeep ctl`.
pub fn run(args: CtlArgs) -> Result<()> {
    let path = config_path(&args)?;
    let settings = load(&path)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.command {
        CtlCommand::List(l) => {
            let snap = rt
                .block_on(async {
                    let dcs = EtcdDcs::connect(&settings).await?;
                    dcs.load().await
                })
                .with_context(|| {
                    format!(
                        "reading the cluster from etcd ({})",
                        settings.endpoints.join(", ")
                    )
                })?;
            let rows = rows(&snap.view);
            let text = match l.format {
                Format::Json => serde_json::to_string_pretty(&rows)? + "\n",
                Format::Table => table(&settings.scope, &snap.view, &rows),
            };
            print_out(&text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_core::cluster::{LeaderKey, MemberData, MemberKey};

    fn member(role: &str, state: &str, lsn: u64, repl: Option<&str>) -> MemberKey {
        MemberKey {
            data: MemberData {
                conn_url: "postgres://node1.demo.internal:25433/postgres".into(),
                api_url: "https://node1.demo.internal:28443/patroni".into(),
                state: state.into(),
                role: role.into(),
                xlog_location: Some(Lsn(lsn)),
                replication_state: repl.map(String::from),
                timeline: Some(1),
                ..MemberData::default()
            },
            mod_revision: 1,
            lease: 1,
        }
    }

    #[test]
    fn rows_roles_states_and_lag() {
        let mut view = ClusterView {
            leader: Some(LeaderKey {
                name: "node1".into(),
                lease: 1,
                mod_revision: 1,
            }),
            ..ClusterView::default()
        };
        view.members
            .insert("node1".into(), member("primary", "running", 1000, None));
        view.members.insert(
            "node2".into(),
            member("replica", "running", 900, Some("streaming")),
        );
        view.members
            .insert("node3".into(), member("replica", "stopped", 0, None));
        let r = rows(&view);
        assert_eq!(r[0].role, "leader");
        assert_eq!(r[0].lag, Some(0));
        assert_eq!(
            (r[0].host.as_str(), r[0].port),
            ("node1.demo.internal", Some(25433))
        );
        assert_eq!(
            (r[1].role.as_str(), r[1].state.as_str(), r[1].lag),
            ("replica", "streaming", Some(100))
        );
        assert_eq!(r[2].state, "stopped");
        let t = table("demo", &view, &r);
        assert!(t.starts_with("Cluster: demo\nMember"), "{t}");
        assert!(
            t.contains("node2   node1.demo.internal:25433  replica  streaming  1   100"),
            "{t}"
        );
    }

    #[test]
    fn a_node_config_is_a_ctl_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.yml");
        std::fs::write(
            &f,
            "scope: demo\nname: node1\nrestapi: {listen: '127.0.0.1:1'}\netcd3:\n  hosts: a:1,b:2\n  cacert: /ca\n  cert: /c\n  key: /k\n",
        )
        .unwrap();
        let s = load(&f).unwrap();
        assert_eq!(s.endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(s.namespace, "/service/");
        std::fs::write(&f, "scope: demo\netcd3: {hosts: [a:1], protocol: http}\n").unwrap();
        assert!(load(&f).unwrap_err().to_string().contains("https only"));
    }
}
