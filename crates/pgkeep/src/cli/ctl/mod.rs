//! `pgkeep ctl`: the operator CLI.
//!
//! ```text
//! pgkeep ctl (-c FILE | --dir D) list [--format table|json]
//! pgkeep ctl (-c FILE | --dir D) switchover [--leader A] [--candidate B] [--scheduled T] [--force]
//! pgkeep ctl (-c FILE | --dir D) failover --candidate B [--force]
//! pgkeep ctl (-c FILE | --dir D) flush switchover
//! pgkeep ctl (-c FILE | --dir D) pause [--wait] | resume [--wait]
//! pgkeep ctl (-c FILE | --dir D) restart [MEMBER...] [--pending] [--force]
//! pgkeep ctl (-c FILE | --dir D) reload [MEMBER...] [--force]
//! pgkeep ctl (-c FILE | --dir D) reinit MEMBER... [--from-leader] [--wait] [--force]
//! pgkeep ctl (-c FILE | --dir D) history [--format table|json]
//! pgkeep ctl (-c FILE | --dir D) topology
//! pgkeep ctl (-c FILE | --dir D) show-config
//! pgkeep ctl (-c FILE | --dir D) edit-config [-s KEY=VALUE]... [-p NAME=VALUE]... [--apply FILE] [--replace FILE] [--force]
//! ```
//!
//! The file is `D/ctl.yml` as `pgkeep up` writes it (`--dir D` means exactly that), or any
//! node's `node.yml`: both have Patroni's `scope`, `namespace`, `etcd3` and `ctl` sections, and
//! other top-level sections are ignored (see [`file`]). `list` reads the cluster from etcd, like
//! `patronictl list`: member, host:port, role (`leader`, `sync_standby`, `replica`), state
//! (`running`, `streaming`, `stopped`, ...), timeline and lag in bytes behind the leader.
//! `switchover`, `failover` and `flush switchover` go through the leader's REST API with the
//! `ctl` section's CA, client certificate and basic auth (see [`manual`]); they exit non-zero
//! when the server does not answer 2xx. So do `pause`, `resume`, `restart`, `reload` and
//! `reinit` ([`ops`]) and `edit-config` ([`config`], which checks the change with the parameter
//! policy before anything is sent). `history`, `topology` and `show-config` read etcd
//! ([`views`], [`config`]). Like patronictl, pgkeep ctl never writes the DCS itself: every change
//! goes through a member's REST API, its access check, validation and audit log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use pgkeep_core::cluster::{ClusterView, Initialize, Lsn};
use serde::Serialize;

use crate::dcs::{Dcs, EtcdDcs, EtcdSettings};

pub mod config;
pub mod file;
pub mod manual;
pub mod ops;
pub mod views;
mod watch;

pub use config::EditConfigArgs;
pub use manual::{FailoverArgs, FlushArgs, FlushTarget, SwitchoverArgs};
pub use ops::{PauseArgs, ReinitArgs, ReloadArgs, RestartArgs};

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
    /// Hand the leader role over to a replica (planned, no data loss), now or at a given time.
    Switchover(SwitchoverArgs),
    /// Promote a named member, with or without a running leader (manual failover).
    Failover(FailoverArgs),
    /// Cancel a scheduled switchover.
    Flush(FlushArgs),
    /// Put the cluster in maintenance mode: no automatic failover, start or stop.
    Pause(PauseArgs),
    /// Leave maintenance mode.
    Resume(PauseArgs),
    /// Restart PostgreSQL on members, one at a time, in a safe order.
    Restart(RestartArgs),
    /// Make members re-read their local configuration file (as SIGHUP does).
    Reload(ReloadArgs),
    /// Wipe replicas' data directories and clone them again.
    Reinit(ReinitArgs),
    /// Show the timeline history.
    History(ListArgs),
    /// Show the members as a tree of who streams from whom.
    Topology,
    /// Show the dynamic configuration (YAML).
    ShowConfig,
    /// Change the dynamic configuration (checked by the parameter policy before it is written).
    EditConfig(EditConfigArgs),
}

/// `ctl list` and `ctl history`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Keep the output up to date: redraw on every change in etcd (in place on a terminal).
    #[arg(short = 'W', long)]
    pub watch: bool,
    /// With `--watch`: redraw at least this often (seconds), for lag figures.
    #[arg(long, default_value_t = 2.0, value_parser = positive_secs)]
    pub interval: f64,
    /// With `--watch`: stop after this many frames.
    #[arg(long)]
    pub count: Option<u64>,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0.1 and 3600"
        )),
    }
}

/// Output formats of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// A JSON array.
    Json,
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
    /// The member's `insecure:` overrides in force (`pgkeep_insecure` in its key).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub insecure: Vec<String>,
    /// The primary's archiving health (`pgkeep_archive` in its key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<crate::api::archive::ArchiveHealth>,
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
                insecure: d
                    .other
                    .get("pgkeep_insecure")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                archive: d
                    .other
                    .get(crate::api::archive::ARCHIVE_FIELD)
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
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
    // The leader's archiving; a former primary's stale field is not news.
    for r in rows.iter().filter(|r| r.role == "leader") {
        if let Some(a) = &r.archive {
            out.push_str(&format!("Archive {}: {}\n", r.name, a.summary()));
        }
    }
    for r in rows.iter().filter(|r| !r.insecure.is_empty()) {
        out.push_str(&format!("INSECURE {}: {}\n", r.name, r.insecure.join(", ")));
    }
    out
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
pub(super) fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// Reads the cluster from etcd.
pub(super) fn read_view(
    rt: &tokio::runtime::Runtime,
    settings: &EtcdSettings,
) -> Result<ClusterView> {
    let snap = rt
        .block_on(async {
            let dcs = EtcdDcs::connect(settings).await?;
            dcs.load().await
        })
        .with_context(|| {
            format!(
                "reading the cluster from etcd ({})",
                settings.endpoints.join(", ")
            )
        })?;
    Ok(snap.view)
}

/// Runs `pgkeep ctl`.
pub fn run(args: CtlArgs) -> Result<()> {
    let path = config_path(&args)?;
    let loaded = file::load(&path)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.command {
        CtlCommand::List(l) => {
            let render = |view: &ClusterView| -> Result<String> {
                let rows = rows(view);
                Ok(match l.format {
                    Format::Json => serde_json::to_string(&rows)? + "\n",
                    Format::Table => table(&loaded.etcd.scope, view, &rows),
                })
            };
            if l.watch {
                let every = Duration::from_secs_f64(l.interval);
                return watch::run(&rt, &loaded.etcd, l.format, every, l.count, render);
            }
            let view = read_view(&rt, &loaded.etcd)?;
            let text = match l.format {
                Format::Json => serde_json::to_string_pretty(&rows(&view))? + "\n",
                Format::Table => render(&view)?,
            };
            print_out(&text)
        }
        CtlCommand::Switchover(a) => manual::run_manual(&rt, &loaded, a.force, |view, now| {
            manual::plan_switchover(view, &a, now)
        }),
        CtlCommand::Failover(a) => manual::run_manual(&rt, &loaded, a.force, |view, now| {
            manual::plan_failover(view, &a.candidate, now)
        }),
        CtlCommand::Flush(a) => manual::run_flush(&rt, &loaded, &a),
        CtlCommand::Pause(a) => ops::run_pause(&rt, &loaded, true, &a),
        CtlCommand::Resume(a) => ops::run_pause(&rt, &loaded, false, &a),
        CtlCommand::Restart(a) => ops::run_restart(&rt, &loaded, &a),
        CtlCommand::Reload(a) => ops::run_reload(&rt, &loaded, &a),
        CtlCommand::Reinit(a) => ops::run_reinit(&rt, &loaded, &a),
        CtlCommand::History(h) => {
            if h.watch {
                let every = Duration::from_secs_f64(h.interval);
                return watch::run(&rt, &loaded.etcd, h.format, every, h.count, |v| {
                    views::history(v, h.format)
                });
            }
            let view = read_view(&rt, &loaded.etcd)?;
            print_out(&views::history(&view, h.format)?)
        }
        CtlCommand::Topology => {
            let view = read_view(&rt, &loaded.etcd)?;
            let rows = views::topology_rows(&view, &rows(&view));
            print_out(&table(&loaded.etcd.scope, &view, &rows))
        }
        CtlCommand::ShowConfig => config::run_show(&rt, &loaded),
        CtlCommand::EditConfig(a) => config::run_edit(&rt, &loaded, &a),
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
        assert!(!t.contains("INSECURE"), "{t}");
    }

    #[test]
    fn insecure_overrides_are_shown_under_the_table() {
        let mut view = ClusterView::default();
        let mut m = member("replica", "running", 900, Some("streaming"));
        m.data.other.insert(
            "pgkeep_insecure".into(),
            serde_json::json!(["pgkeep.insecure.plaintext_restapi"]),
        );
        view.members.insert("node2".into(), m);
        let r = rows(&view);
        assert_eq!(r[0].insecure, ["pgkeep.insecure.plaintext_restapi"]);
        let t = table("demo", &view, &r);
        assert!(
            t.ends_with("INSECURE node2: pgkeep.insecure.plaintext_restapi\n"),
            "{t}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json[0]["insecure"][0], "pgkeep.insecure.plaintext_restapi");
    }

    #[test]
    fn the_leaders_archiving_is_shown_under_the_table() {
        let mut view = ClusterView {
            leader: Some(LeaderKey {
                name: "node1".into(),
                lease: 1,
                mod_revision: 1,
            }),
            ..ClusterView::default()
        };
        let health = serde_json::json!({"archived_count": 7, "failed_count": 2,
            "last_archived_wal": "000000010000000000000007", "failing": true,
            "last_failed_wal": "000000010000000000000008",
            "last_failed_time": "2026-11-29T23:40:00Z"});
        let mut m = member("primary", "running", 900, None);
        m.data.other.insert("pgkeep_archive".into(), health.clone());
        view.members.insert("node1".into(), m);
        // A former primary's field is stale: not shown.
        let mut old = member("replica", "running", 800, Some("streaming"));
        old.data.other.insert("pgkeep_archive".into(), health);
        view.members.insert("node2".into(), old);
        let r = rows(&view);
        assert!(r[0].archive.as_ref().is_some_and(|a| a.failing));
        let t = table("demo", &view, &r);
        assert!(
            t.contains("Archive node1: FAILING: 000000010000000000000008 at 2026-11-29T23:40:00Z"),
            "{t}"
        );
        assert!(!t.contains("Archive node2"), "{t}");
    }
}
