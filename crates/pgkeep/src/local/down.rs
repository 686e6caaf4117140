//! `pgkeep down`: stops the environment without a failover, keeping the data unless `--purge`.
//!
//! Order: HAProxy first (clients lose their way in before the servers go), then the replicas'
//! agents (each stops its PostgreSQL and exits on SIGTERM), then the
//! leader's (nobody is left to promote, so the leader key is released, not taken over), then
//! any postmaster an agent left behind (fast shutdown), then pgBackRest (servers and any
//! asynchronous archiver still running), then the etcd members. Every PID is
//! checked against `/proc/<pid>/cmdline` before it is signalled; nothing is matched by name.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::spawn::{self, Identity};
use super::up::{Steps, agent_identity};
use super::{Layout, backup, etcd, haproxy, hosts};
use crate::dcs::{Dcs, EtcdDcs};
use crate::inventory::Inventory;

/// What `pgkeep down` was asked to do.
#[derive(Debug, Clone)]
pub struct DownOptions {
    /// The environment directory.
    pub dir: std::path::PathBuf,
    /// Also remove the directory (all data) and the `/etc/hosts` block.
    pub purge: bool,
    /// How long each agent may take to stop.
    pub timeout: Duration,
}

/// Runs `pgkeep down`.
pub fn down(opts: &DownOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pgkeep down must run as root");
    }
    let layout = Layout::new(&opts.dir)?;
    println!("pgkeep down: {}", layout.dir.display());
    let inv_file = layout.inventory();
    if !inv_file.exists() {
        return without_inventory(&layout, opts.purge);
    }
    let inv = Inventory::load(&inv_file)?;
    let mut steps = Steps::new(if opts.purge { 6 } else { 5 });
    let leader = steps.run("finding the leader", || {
        let leader = current_leader(&layout, &inv);
        match &leader {
            Some(l) => println!("      leader: {l}; stopping the replicas first"),
            None => println!("      no leader known (etcd down or cluster not bootstrapped)"),
        }
        Ok(leader)
    })?;
    steps.run("stopping HAProxy", || {
        if !haproxy::stop(&layout)? {
            bail!("HAProxy still runs; see {}", layout.haproxy_log().display());
        }
        Ok(())
    })?;
    steps.run("stopping the agents", || {
        stop_agents(&layout, &inv, leader.as_deref(), opts.timeout)
    })?;
    steps.run("stopping pgBackRest", || {
        if !backup::stop_all(&layout, &inv, Duration::from_secs(15))? {
            bail!(
                "a pgBackRest process still runs; see {}",
                layout.logs().display()
            );
        }
        Ok(())
    })?;
    steps.run("stopping etcd", || {
        for m in &inv.etcd_hosts {
            let id = etcd::identity(&layout, &m.name);
            let pid_file = layout.etcd_pid(&m.name);
            if !stop_one(
                &m.name,
                &pid_file,
                &id,
                Signal::SIGTERM,
                Duration::from_secs(30),
            )? {
                println!("      {} ignored SIGTERM; sending SIGKILL", m.name);
                if let Some(pid) = spawn::running(&pid_file, &id) {
                    spawn::stop(pid, &id, Signal::SIGKILL, Duration::from_secs(10))?;
                }
            }
        }
        Ok(())
    })?;
    if opts.purge {
        steps.run("removing the directory and the /etc/hosts block", || {
            purge(&layout, &inv)
        })?;
        println!("Environment {} removed.", layout.dir.display());
    } else {
        println!(
            "Stopped; the data is kept. `pgkeep up --dir {}` brings the same cluster back.",
            layout.dir.display()
        );
    }
    Ok(())
}

/// A directory without inventory: nothing can run; `--purge` still cleans up after a failed
/// first `up` (our stamp) and removes the hosts block.
fn without_inventory(layout: &Layout, purge: bool) -> Result<()> {
    if !purge {
        println!(
            "      no environment in {} (no inventory.yml); nothing to stop",
            layout.dir.display()
        );
        return Ok(());
    }
    if hosts::remove(&layout.hash())? {
        println!("      removed the /etc/hosts block");
    }
    if layout.dir.is_dir() {
        if !layout.path(".pgkeep-local").exists() {
            bail!(
                "{} holds no pgkeep environment; refusing to remove it",
                layout.dir.display()
            );
        }
        std::fs::remove_dir_all(&layout.dir)
            .with_context(|| format!("removing {}", layout.dir.display()))?;
        println!("      removed {}", layout.dir.display());
    }
    Ok(())
}

/// The member holding the leader key, if etcd answers within a few seconds.
pub(crate) fn current_leader(layout: &Layout, inv: &Inventory) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let settings = etcd::operator_settings(layout, inv, inv.etcd_endpoints());
        let dcs = EtcdDcs::connect(&settings).await.ok()?;
        let snap = tokio::time::timeout(Duration::from_secs(5), dcs.load())
            .await
            .ok()?
            .ok()?;
        snap.view.leader.map(|l| l.name)
    })
}

/// Stops every agent, the replicas' first and the leader's last (nobody is left to take over,
/// so the leader key is released), then any postmaster an agent left behind.
pub(crate) fn stop_agents(
    layout: &Layout,
    inv: &Inventory,
    leader: Option<&str>,
    timeout: Duration,
) -> Result<()> {
    let mut order: Vec<&str> = inv
        .database_hosts
        .iter()
        .map(|h| h.name.as_str())
        .filter(|n| Some(*n) != leader)
        .collect();
    order.extend(leader);
    let mut stuck = Vec::new();
    for n in order {
        let id = agent_identity(layout, n);
        if !stop_one(n, &layout.agent_pid(n), &id, Signal::SIGTERM, timeout)? {
            stuck.push(format!("{n} (log {})", layout.agent_log(n).display()));
        }
    }
    if !stuck.is_empty() {
        bail!(
            "agents still running after {timeout:?}: {}; etcd is left running so they can \
             finish; run `pgkeep down` again",
            stuck.join(", ")
        );
    }
    for h in &inv.database_hosts {
        stop_postmaster(layout, &h.name)?;
    }
    Ok(())
}

/// Stops one process found through its PID file (or `/proc`); true when it is gone.
fn stop_one(
    name: &str,
    pid_file: &Path,
    id: &Identity,
    sig: Signal,
    timeout: Duration,
) -> Result<bool> {
    let Some(pid) = spawn::running(pid_file, id) else {
        println!("      {name:<6} not running");
        let _ = std::fs::remove_file(pid_file);
        return Ok(true);
    };
    let t0 = std::time::Instant::now();
    if spawn::stop(pid, id, sig, timeout)? {
        println!(
            "      {name:<6} stopped (pid {pid}, {:.1}s)",
            t0.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_file(pid_file);
        Ok(true)
    } else {
        println!("      {name:<6} still running (pid {pid}) after {timeout:?}");
        Ok(false)
    }
}

/// Stops (fast shutdown) a postmaster of node `n` that outlived its agent.
fn stop_postmaster(layout: &Layout, n: &str) -> Result<()> {
    let pid_file = layout.data_dir(n).join("postmaster.pid");
    let Some(pid) = spawn::read_pid_first_line(&pid_file) else {
        return Ok(());
    };
    if !spawn::is_postmaster_of(pid, &layout.node_dir(n)) {
        return Ok(());
    }
    println!("      postgres of {n} (pid {pid}) outlived its agent; fast shutdown");
    let raw = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGINT)
        .with_context(|| format!("signalling postgres pid {pid}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while spawn::is_postmaster_of(pid, &layout.node_dir(n)) {
        if std::time::Instant::now() >= deadline {
            bail!("postgres of {n} (pid {pid}) did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Removes the hosts block, the socket directories outside `D`, and `D` itself, after checking
/// that nothing of the environment still runs.
fn purge(layout: &Layout, inv: &Inventory) -> Result<()> {
    let mut alive = Vec::new();
    for h in &inv.database_hosts {
        alive.extend(spawn::scan(&agent_identity(layout, &h.name)));
    }
    for m in &inv.etcd_hosts {
        alive.extend(spawn::scan(&etcd::identity(layout, &m.name)));
    }
    alive.extend(spawn::scan(&haproxy::identity(layout)));
    if !alive.is_empty() {
        bail!("processes {alive:?} of this environment still run; not removing anything");
    }
    if hosts::remove(&layout.hash())? {
        println!("      removed the /etc/hosts block");
    }
    let fallback = layout.socket_base_fallback();
    if fallback.exists() {
        std::fs::remove_dir_all(&fallback)
            .with_context(|| format!("removing {}", fallback.display()))?;
        // Shared by every long-named environment; removed only when empty.
        if let Some(parent) = fallback.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    std::fs::remove_dir_all(&layout.dir)
        .with_context(|| format!("removing {}", layout.dir.display()))?;
    println!("      removed {}", layout.dir.display());
    Ok(())
}
