//! `pgkeep restore --dir D`: the whole cluster back to a point in time, as a new timeline,
//! from the pgBackRest repository.
//!
//! The procedure (what a DBA would do by hand, in this order):
//!
//! 1. When a primary still runs: commit one transaction (recovery to a time stops at the first
//!    commit after it, so there must be one) and make sure the WAL up to now is in the archive
//!    (`pgbackrest check` forces a WAL switch and waits for it). Without a primary, a target
//!    after the last archived commit cannot be reached (`--latest` can).
//! 2. Stop every agent (replicas first; each stops its PostgreSQL). Nothing may fail over or
//!    restart PostgreSQL while the data is replaced; this is stronger than a pause. A primary
//!    that stops cleanly switches to a new WAL segment and archives the last one first, so
//!    every transaction committed until then is in the archive; WAL still waiting to be
//!    archived afterwards (`.ready`) would be lost, and stops `--latest` here.
//! 3. Forget the old cluster's state in etcd that would stop the restored node from leading:
//!    the member keys, the last leader position (`status`), any failover request and the
//!    `sync` key. The dynamic configuration, the system identifier (`initialize`) and the
//!    timeline `history` stay: the restored cluster is the same database.
//! 4. `pgbackrest restore --delta` on one node (the last leader unless `--node`), with the
//!    recovery target and `--target-action=promote`.
//! 5. Start that PostgreSQL alone and watch its recovery (progress every few seconds) until it
//!    promotes onto a new timeline; reset the recovery settings pgBackRest put into
//!    `postgresql.auto.conf` (`ALTER SYSTEM RESET`); stop it cleanly.
//! 6. Empty the other nodes' data directories: their data has transactions the restored
//!    timeline does not have. Their agents clone them again from the new primary.
//! 7. `pgkeep up`: servers and agents start; the restored node takes the leader key, the
//!    others clone and stream; the stanza check confirms archiving on the new timeline.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::backup::{self, PGBACKREST_BIN};
use super::down::{current_leader, stop_agents};
use super::up::{Steps, UpOptions, up};
use super::{Layout, ServiceUser, etcd, files, health, s, spawn};
use crate::dcs::{Dcs, EtcdDcs, Expect};
use crate::inventory::{DbHost, Inventory};
use crate::pgbackrest::{RecoveryTarget, restore_target_options};

/// What `pgkeep restore` was asked to do.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The environment directory.
    pub dir: PathBuf,
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The node restored first (default: the current or last leader).
    pub node: Option<String>,
    /// The backup to restore from (default: the newest one before the target).
    pub backup: Option<String>,
    /// How long recovery may take.
    pub timeout: Duration,
}

/// The WAL segments the stopped PostgreSQL of `dir` still has waiting for the archive
/// (`.ready` status files), sorted. A directory that cannot be read is an error: "nothing
/// waiting" must be known, not assumed.
fn unarchived_wal(dir: &std::path::Path) -> Result<Vec<String>> {
    let status = dir.join("pg_wal/archive_status");
    if !dir.join("PG_VERSION").exists() {
        return Ok(Vec::new());
    }
    let mut ready = Vec::new();
    for e in std::fs::read_dir(&status).with_context(|| format!("reading {}", status.display()))? {
        let e = e.with_context(|| format!("reading {}", status.display()))?;
        if let Some(n) = e.file_name().to_string_lossy().strip_suffix(".ready") {
            ready.push(n.to_owned());
        }
    }
    ready.sort();
    Ok(ready)
}

/// `Database cluster state` of the data directory of `h`, from `pg_controldata`.
fn cluster_state(layout: &Layout, h: &DbHost, pg: &ServiceUser) -> Result<String> {
    let mut cmd = Command::new(format!("{}/pg_controldata", super::PG_BIN_DIR));
    as_postgres(&mut cmd, layout, h, pg)
        .env("LC_ALL", "C")
        .arg(layout.data_dir(&h.name));
    let out = cmd.output().context("running pg_controldata")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Database cluster state:"))
        .map(|s| s.trim().to_owned())
        .with_context(|| format!("pg_controldata: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The recovery settings pgBackRest writes into `postgresql.auto.conf`; reset once the node
/// is promoted, so a later start as a standby does not stop at the old target.
const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_xid",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_timeline",
];

/// Runs `pgkeep restore`.
pub fn restore(opts: &RestoreOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pgkeep restore must run as root (it runs pgBackRest and PostgreSQL as their users)");
    }
    let target_options = restore_target_options(&opts.target)?;
    let layout = Layout::new(&opts.dir)?;
    let inv = Inventory::load(&layout.inventory())
        .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
    if inv.backup_host.is_none() {
        bail!("this environment has no backup host: there is nothing to restore from");
    }
    let pg = ServiceUser::postgres()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    println!(
        "pgkeep restore: {} to {:?}",
        layout.dir.display(),
        opts.target
    );
    let mut steps = Steps::new(7);

    let journal = layout.path("restore-in-progress.json");
    let (node, leader) = steps.run("backups and the node to restore", || {
        if matches!(opts.target, RecoveryTarget::Name(_)) && opts.backup.is_none() {
            bail!(
                "--target-name needs --set LABEL: pgBackRest chooses the backup by itself only for \
                 a time or a WAL position; give the newest backup taken before the restore point \
                 (see `pgkeep backup list`)"
            );
        }
        // A restore that stopped half way is resumed on the same node, never on another one
        // whose data may be the last intact copy.
        let resumed = match std::fs::read_to_string(&journal) {
            Ok(text) => Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["node"].as_str().map(str::to_owned))
                    .with_context(|| {
                        format!(
                            "{} is damaged; remove it and give --node",
                            journal.display()
                        )
                    })?,
            ),
            Err(_) => None,
        };
        if let (Some(r), Some(n)) = (&resumed, &opts.node)
            && r != n
        {
            bail!(
                "a restore of {r} did not finish ({}); finish it (pgkeep restore --node {r}) or \
                 remove that file if {r}'s data must be given up",
                journal.display()
            );
        }
        let s = crate::cli::backup::stanza(&layout, &inv)?;
        if s.backups.is_empty() {
            bail!(
                "the repository has no backup of {}; take one with `pgkeep backup run`",
                inv.cluster
            );
        }
        if let Some(b) = &opts.backup
            && !s.backups.iter().any(|x| &x.label == b)
        {
            bail!("the repository has no backup {b}; see `pgkeep backup list`");
        }
        if rt.block_on(paused(&layout, &inv))? {
            bail!(
                "the cluster is paused: a restored node would not start PostgreSQL nor take the \
                 leader key; resume it first (pgkeep ctl resume)"
            );
        }
        let leader = current_leader(&layout, &inv);
        let name = opts
            .node
            .clone()
            .or(resumed)
            .or_else(|| leader.clone())
            .unwrap_or_else(|| inv.database_hosts[0].name.clone());
        let node = inv
            .database_hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("there is no node {name} in the inventory"))?
            .clone();
        println!(
            "      {} backups, archive {}; restoring on {}",
            s.backups.len(),
            s.archive
                .as_ref()
                .map_or("empty".to_owned(), |(a, b)| format!("{a}..{b}")),
            node.name
        );
        Ok((node, leader))
    })?;
    steps.run("archiving the newest WAL", || {
        let Some(lh) = leader
            .as_ref()
            .and_then(|l| inv.database_hosts.iter().find(|h| &h.name == l))
        else {
            println!("      no leader: the archive holds what was archived before it stopped");
            return Ok(());
        };
        // A recovery to a time stops at the first commit after it; one made now guarantees
        // there is one for any target up to now.
        if let Err(e) = rt.block_on(health::psql(&layout, lh, &pg, "SELECT txid_current()")) {
            println!(
                "      WARNING: no transaction could be committed on {}: {e:#}",
                lh.name
            );
        }
        match backup::repo_command(&layout, &inv, &["check"]) {
            Ok(_) => println!("      the primary's current WAL is in the archive"),
            Err(e) => println!(
                "      WARNING: {e:#}\n      the newest transactions may not be in the archive; \
                 a target after them cannot be reached"
            ),
        }
        Ok(())
    })?;
    let scheduler_was_running = !spawn::scan(&backup::scheduler_identity(&layout)).is_empty();
    steps.run("stopping the backup scheduler and the agents", || {
        // No backup may start while the data is replaced; one under way is waited for.
        backup::stop_scheduler(&layout, Duration::from_secs(30))?;
        backup::wait_backup_done(&layout, &inv, Duration::from_secs(1800))?;
        stop_agents(&layout, &inv, leader.as_deref(), Duration::from_secs(60))?;
        // The last primary is the node whose WAL the archive must hold (a replica's leftover
        // status files are not the cluster's). With a leader that is it; without one, every
        // node whose control file says it was not a standby.
        let latest = opts.target == RecoveryTarget::Latest;
        let mut primaries = Vec::new();
        for h in &inv.database_hosts {
            if !layout.data_dir(&h.name).join("PG_VERSION").exists() {
                continue;
            }
            if let Some(l) = &leader {
                if &h.name == l {
                    primaries.push((h, cluster_state(&layout, h, &pg)));
                }
                continue;
            }
            let state = cluster_state(&layout, h, &pg);
            if !state.as_ref().is_ok_and(|s| s.contains("recovery")) {
                primaries.push((h, state));
            }
        }
        for (h, state) in primaries {
            let waiting = unarchived_wal(&layout.data_dir(&h.name)).with_context(|| {
                format!("cannot tell whether {} has WAL waiting for the archive", h.name)
            })?;
            if let Some(newest) = waiting.last() {
                let list = format!("{}: {} segments, newest {newest}", h.name, waiting.len());
                if latest {
                    bail!(
                        "WAL not yet in the archive ({list}): a restore to the latest point would \
                         lose the transactions in it. Nothing was changed; `pgkeep up --dir {}` \
                         starts the cluster again; fix archiving (pgkeep backup check), then \
                         restore",
                        layout.dir.display()
                    );
                }
                println!("      WARNING: WAL not yet in the archive ({list}); a target in it cannot be reached");
            }
            // A primary that crashed never switched to a new segment at shutdown: its last,
            // partial one is in no archive (but still in its pg_wal, which the restore empties).
            match state {
                Ok(s) if s == "shut down" => {}
                Ok(s) if latest => bail!(
                    "{} did not shut down cleanly ({s}): the transactions in its last, partial WAL \
                     segment are in no archive, and the restore would delete its pg_wal. Nothing \
                     was changed; start it once (`pgkeep up --dir {}`) so that it shuts down \
                     cleanly and archives, or copy its pg_wal aside and restore to a time or LSN",
                    h.name,
                    layout.dir.display()
                ),
                Ok(_) => {}
                Err(e) if latest => {
                    return Err(e.context(format!(
                        "cannot tell whether {} shut down cleanly; nothing was changed",
                        h.name
                    )));
                }
                Err(e) => println!("      WARNING: the state of {}'s data directory is unknown: {e:#}", h.name),
            }
        }
        Ok(())
    })?;
    files::write(
        &journal,
        &format!(
            "{}\n",
            serde_json::json!({"node": node.name, "target": format!("{:?}", opts.target)})
        ),
        0o600,
        None,
    )?;
    steps.run("forgetting the old cluster state in etcd", || {
        rt.block_on(reset_dcs(&layout, &inv))
    })?;
    steps.run(&format!("pgbackrest restore on {}", node.name), || {
        pgbackrest_restore(
            &layout,
            &inv,
            &node,
            &pg,
            &target_options,
            opts.backup.as_deref(),
        )
    })?;
    steps.run(&format!("recovery and promotion of {}", node.name), || {
        rt.block_on(recover(&layout, &node, &pg, opts.timeout))
    })?;
    steps.run(
        "emptying the other nodes (they clone from the restored node)",
        || {
            for h in inv.database_hosts.iter().filter(|h| h.name != node.name) {
                empty_dir(&layout.data_dir(&h.name))?;
                println!("      {}: data directory emptied", h.name);
            }
            Ok(())
        },
    )?;
    let _ = std::fs::remove_file(&journal);
    println!();
    println!("Starting the restored cluster:");
    up(&UpOptions {
        dir: layout.dir.clone(),
        cluster: None,
        organisation_ca: None,
        timeout: opts.timeout,
        agents: true,
        haproxy: layout.haproxy_config().exists(),
        backup: true,
        backup_scheduler: scheduler_was_running,
    })
}

/// True when the dynamic configuration says `pause`.
async fn paused(layout: &Layout, inv: &Inventory) -> Result<bool> {
    let settings = etcd::operator_settings(layout, inv, inv.etcd_endpoints());
    let dcs = EtcdDcs::connect(&settings).await?;
    let snap = dcs.load().await.context("reading the cluster from etcd")?;
    Ok(snap.view.is_paused())
}

/// Deletes the member keys, the leader's last position, any failover request and `sync`;
/// waits (up to a TTL) for a leader key the stopped leader could not release to expire.
async fn reset_dcs(layout: &Layout, inv: &Inventory) -> Result<()> {
    let settings = etcd::operator_settings(layout, inv, inv.etcd_endpoints());
    let dcs = EtcdDcs::connect(&settings).await?;
    let t0 = Instant::now();
    loop {
        let snap = dcs.load().await.context("reading the cluster from etcd")?;
        let Some(l) = &snap.view.leader else { break };
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the leader key of {} did not expire within 60 s", l.name);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let snap = dcs.load().await.context("reading the cluster from etcd")?;
    for name in snap.view.members.keys() {
        dcs.delete_member(name).await?;
    }
    dcs.put_status(&Default::default()).await?;
    // Unconditional writes (Expect::Any): the outcome cannot be a lost race.
    let _ = dcs.put_failover(&Default::default(), Expect::Any).await?;
    let _ = dcs.delete_sync(Expect::Any).await?;
    println!(
        "      removed {} member keys, the last leader position, failover and sync",
        snap.view.members.len()
    );
    Ok(())
}

/// `cmd` as the PostgreSQL user, in the node's directory, with a cleared environment.
fn as_postgres<'a>(
    cmd: &'a mut Command,
    layout: &Layout,
    node: &DbHost,
    pg: &ServiceUser,
) -> &'a mut Command {
    use std::os::unix::process::CommandExt;
    cmd.env_clear()
        .env("PATH", spawn::SERVICE_PATH)
        .env("HOME", layout.node_dir(&node.name))
        .current_dir(layout.node_dir(&node.name))
        .uid(pg.uid)
        .gid(pg.gid)
}

fn pgbackrest_restore(
    layout: &Layout,
    inv: &Inventory,
    node: &DbHost,
    pg: &ServiceUser,
    target: &[String],
    set: Option<&str>,
) -> Result<()> {
    let data = layout.data_dir(&node.name);
    super::files::dir(&data, 0o700, Some(pg))?;
    let (_, restore_command) = backup::wal_commands(layout, inv, &node.name)?;
    let mut cmd = Command::new(PGBACKREST_BIN);
    cmd.arg(format!(
        "--config-path={}",
        s(&backup::node_config_path(layout, &node.name))
    ))
    .arg(format!("--stanza={}", inv.cluster))
    .args(["--delta", "--log-level-console=info"])
    // The command recovery runs: the node's own, with its --config-path.
    .arg(format!(
        "--recovery-option=restore_command={restore_command}"
    ))
    .args(target);
    if let Some(label) = set {
        cmd.arg(format!("--set={label}"));
    }
    cmd.arg("restore");
    let status = as_postgres(&mut cmd, layout, node, pg)
        .status()
        .context("running pgbackrest restore")?;
    if !status.success() {
        bail!("pgbackrest restore failed ({status}); see its output above");
    }
    Ok(())
}

/// Starts the restored node's PostgreSQL alone, reports recovery progress until it promotes,
/// resets the recovery settings and stops it.
async fn recover(
    layout: &Layout,
    node: &DbHost,
    pg: &ServiceUser,
    timeout: Duration,
) -> Result<()> {
    // In the node's own directory: the logs directory is root's.
    let log = layout.node_dir(&node.name).join("restore.log");
    let pg_ctl = format!("{}/pg_ctl", super::PG_BIN_DIR);
    let run = |args: &[&str]| -> Result<std::process::ExitStatus> {
        let mut cmd = Command::new(&pg_ctl);
        cmd.args(args).stdout(std::process::Stdio::null());
        as_postgres(&mut cmd, layout, node, pg)
            .status()
            .context("running pg_ctl")
    };
    let conf = s(&layout.conf_dir(&node.name));
    let data = s(&layout.data_dir(&node.name));
    let logs = s(&log);
    let st = run(&["-D", &conf, "-l", &logs, "-w", "-t", "600", "start"])?;
    if !st.success() {
        bail!(
            "PostgreSQL of {} did not start ({st}):\n{}",
            node.name,
            recovery_log_tail(&log)
        );
    }
    let t0 = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let outcome = loop {
        let q = health::psql(
            layout,
            node,
            pg,
            "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn()::text, ''), \
             coalesce(pg_last_xact_replay_timestamp()::text, ''), timeline_id \
             FROM pg_control_checkpoint()",
        )
        .await;
        match q {
            Ok(row) => {
                let f: Vec<&str> = row.trim().split('|').collect();
                if f.first() == Some(&"f") {
                    break Ok(());
                }
                if last_print.elapsed() >= Duration::from_secs(5) {
                    println!(
                        "      {:>5.0}s  replaying: WAL {}, last transaction {}",
                        t0.elapsed().as_secs_f64(),
                        f.get(1).unwrap_or(&"?"),
                        f.get(2).filter(|t| !t.is_empty()).unwrap_or(&"-")
                    );
                    last_print = Instant::now();
                }
            }
            // Not consistent yet (no connections), or gone: the log tells.
            Err(e) => {
                let pid_file = layout.data_dir(&node.name).join("postmaster.pid");
                if !pid_file.exists() {
                    break Err(anyhow::anyhow!(
                        "PostgreSQL of {} stopped during recovery ({e:#}); the target may lie \
                         after the end of the archive:\n{}",
                        node.name,
                        recovery_log_tail(&log)
                    ));
                }
            }
        }
        if t0.elapsed() > timeout {
            break Err(anyhow::anyhow!(
                "recovery did not finish within {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if let Err(e) = outcome {
        let _ = run(&["-D", &data, "-m", "fast", "-w", "stop"]);
        return Err(e);
    }
    let reset: String = RECOVERY_SETTINGS
        .iter()
        .map(|g| format!("ALTER SYSTEM RESET {g};\n"))
        .collect();
    health::psql(layout, node, pg, &reset).await?;
    let tl = health::psql(
        layout,
        node,
        pg,
        "SELECT timeline_id FROM pg_control_checkpoint()",
    )
    .await
    .unwrap_or_default();
    let _ = health::psql(layout, node, pg, "CHECKPOINT").await;
    println!(
        "      promoted after {:.1}s (checkpoint timeline {}); recovery settings reset",
        t0.elapsed().as_secs_f64(),
        tl.trim()
    );
    let st = run(&["-D", &data, "-m", "fast", "-w", "stop"])?;
    if !st.success() {
        bail!("PostgreSQL of {} did not stop ({st})", node.name);
    }
    Ok(())
}

/// The last lines of PostgreSQL's log that are about recovery (not our own connections).
fn recovery_log_tail(log: &std::path::Path) -> String {
    let text = spawn::log_tail(log, 400);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.contains(" connection ") && !l.contains("disconnection") && !l.contains("AUDIT")
        })
        .collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Removes everything inside `dir` (the directory itself, its owner and mode stay).
fn empty_dir(dir: &std::path::Path) -> Result<()> {
    crate::fsutil::empty_dir(dir).with_context(|| format!("emptying {}", dir.display()))
}
