//! Faults on a running [`AgentCluster`]: the loss of a whole node, of its PostgreSQL alone, or
//! of its agent alone (killed or frozen), and [`Frozen`] processes that are resumed whatever
//! happens. Every process is addressed by PID, found from the agent's process and
//! `postmaster.pid`, never by name.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agents::AgentCluster;

/// `(pid, parent pid)` of every process.
fn process_table() -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `root` and all its descendants.
pub fn process_tree(root: i32) -> BTreeSet<i32> {
    let table = process_table();
    let mut tree = BTreeSet::from([root]);
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid) in &table {
            if *ppid == p && tree.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    tree
}

/// Processes stopped with `SIGSTOP`, each identified by PID and start time; they get `SIGCONT`
/// when this is dropped (also while a test panics), so a failing test never leaves a frozen
/// process behind. A process that exited (or whose PID was reused) is left alone.
#[derive(Debug)]
pub struct Frozen {
    procs: Vec<(i32, Option<u64>)>,
}

impl Frozen {
    /// Sends `SIGSTOP` to every process of `pids`, in order.
    pub fn stop(pids: impl IntoIterator<Item = i32>) -> Result<Frozen> {
        let mut frozen = Frozen { procs: Vec::new() };
        for pid in pids {
            let start = u32::try_from(pid).ok().and_then(crate::proc::start_time);
            kill(Pid::from_raw(pid), Signal::SIGSTOP).with_context(|| format!("SIGSTOP {pid}"))?;
            frozen.procs.push((pid, start));
        }
        Ok(frozen)
    }

    /// The frozen PIDs.
    pub fn pids(&self) -> Vec<i32> {
        self.procs.iter().map(|(p, _)| *p).collect()
    }

    /// Resumes every process now (the same as dropping it).
    pub fn resume(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (pid, start) in &self.procs {
            let same = u32::try_from(*pid).is_ok_and(|p| crate::proc::owner_alive(p, *start));
            if same {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGCONT);
            }
        }
    }
}

fn signal_all(pids: &BTreeSet<i32>, sig: Signal) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), sig);
    }
}

impl AgentCluster {
    /// The PID of agent `i`'s process.
    pub fn agent_pid(&self, i: usize) -> Result<i32> {
        let svc = self.agents[i]
            .service
            .as_ref()
            .ok_or_else(|| anyhow!("agent {i} is not started"))?;
        i32::try_from(svc.pid()).context("pid")
    }

    /// The PID in agent `i`'s `postmaster.pid`, if the file exists and the process lives.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.agents[i].data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        crate::pid_is_alive(u32::try_from(pid).ok()?).then_some(pid)
    }

    /// Host loss: every process of node `i` (agent, fence guard, postmaster, backends) is
    /// stopped at the same instant and then killed, as if the machine vanished.
    pub fn kill_host(&self, i: usize) -> Result<()> {
        let mut pids = process_tree(self.agent_pid(i)?);
        if let Some(pm) = self.postmaster_pid(i) {
            pids.extend(process_tree(pm));
        }
        signal_all(&pids, Signal::SIGSTOP);
        signal_all(&pids, Signal::SIGKILL);
        if let Some(s) = &self.agents[i].service {
            let _ = s.wait_exit(Duration::from_secs(10));
        }
        Ok(())
    }

    /// PostgreSQL alone crashes: the postmaster and its children are killed; the agent lives.
    pub fn kill_postgres(&self, i: usize) -> Result<()> {
        let pm = self
            .postmaster_pid(i)
            .ok_or_else(|| anyhow!("node {i} has no running postmaster"))?;
        let pids = process_tree(pm);
        signal_all(&pids, Signal::SIGSTOP);
        signal_all(&pids, Signal::SIGKILL);
        Ok(())
    }

    /// The agent process alone is killed (its PostgreSQL and fence guard keep running).
    pub fn kill_agent(&self, i: usize) -> Result<()> {
        kill(Pid::from_raw(self.agent_pid(i)?), Signal::SIGKILL).context("kill")?;
        if let Some(s) = &self.agents[i].service {
            s.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the agent process alone.
    pub fn freeze_agent(&self, i: usize, frozen: bool) -> Result<()> {
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(self.agent_pid(i)?), sig).context("signal")
    }
}
