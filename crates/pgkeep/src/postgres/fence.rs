//! Fencing: making sure a PostgreSQL that may no longer lead stops committing, whatever state it
//! is in. Blocking code on purpose: it runs on the fence guard's own thread (and in a blocking
//! task of the agent), never on the async runtime that may be the thing that is stuck.
//!
//! The postmaster gets a fast shutdown (SIGINT: backends are terminated at once, so no further
//! commit is acknowledged, and the shutdown checkpoint still reaches the replicas). If it is
//! still there after a grace period it gets SIGQUIT (immediate shutdown), and after another one
//! every process of the instance gets SIGKILL. `killpg` would not be enough: backends are not in
//! the postmaster's process group once they set their own, and a postmaster killed first leaves
//! its children re-parented where no process-group signal finds them. So the instance's
//! processes are found by walking `/proc` for descendants of the postmaster, remembered with
//! their start times before anything is signalled, and only those exact processes are killed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::{Instance, PgError, PostmasterPid};

/// How long each step of the escalation waits for the postmaster to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceGrace {
    /// After SIGINT (fast shutdown), before SIGQUIT.
    pub fast: Duration,
    /// After SIGQUIT (immediate shutdown), before SIGKILL of every process.
    pub immediate: Duration,
}

impl Default for FenceGrace {
    fn default() -> Self {
        // Together well inside the smallest lease safety margin (1 s): a fence starts at the
        // deadline and must be complete before another node can be promoted. A fast shutdown
        // stops commits at once (backends are terminated first); the grace only matters for a
        // postmaster that does not react.
        FenceGrace {
            fast: Duration::from_millis(500),
            immediate: Duration::from_millis(300),
        }
    }
}

/// How a fence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// No postmaster of this instance was running.
    NotRunning,
    /// The postmaster finished a fast shutdown.
    StoppedFast,
    /// The postmaster finished an immediate shutdown.
    StoppedImmediate,
    /// Every process of the instance had to be killed.
    Killed,
}

/// A process, identified by PID and start time (clock ticks since boot), so a recycled PID is
/// never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Proc {
    pid: i32,
    start_ticks: u64,
}

/// The running postmaster of the instance, reading the pid file again when it is caught
/// mid-write (while the postmaster starts or exits).
fn read_postmaster(instance: &Instance) -> Result<Option<PostmasterPid>, PgError> {
    let mut attempt = 0;
    loop {
        match instance.running_postmaster() {
            Ok(pm) => return Ok(pm),
            Err(_) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The instance's postmaster if one runs that is not a standby: no `standby.signal` in the data
/// directory, so it is a primary, or becomes one (a promotion removes the file before the server
/// takes writes; an archive recovery ends writable). A standby cannot commit: the fence guard
/// never stops one, so a replica the agent starts while an old deadline is still in the state
/// file is left alone.
pub fn writable_postmaster(instance: &Instance) -> Result<Option<PostmasterPid>, PgError> {
    let Some(pm) = read_postmaster(instance)? else {
        return Ok(None);
    };
    Ok((!is_standby(&instance.data_dir)).then_some(pm))
}

/// `standby.signal` is in the data directory.
pub fn is_standby(data_dir: &Path) -> bool {
    data_dir.join("standby.signal").exists()
}

/// Stops the instance's postmaster, escalating as described in the module documentation.
/// Blocks for at most `grace.fast + grace.immediate` plus a moment.
pub fn fence_blocking(instance: &Instance, grace: FenceGrace) -> Result<FenceOutcome, PgError> {
    let Some(pm) = read_postmaster(instance)? else {
        return Ok(FenceOutcome::NotRunning);
    };
    let Some(pm_start) = start_ticks(pm.pid) else {
        return Ok(FenceOutcome::NotRunning);
    };
    let postmaster = Proc {
        pid: pm.pid,
        start_ticks: pm_start,
    };
    let mut family = BTreeMap::new();
    collect_descendants(postmaster, &mut family);
    let _ = signal::kill(Pid::from_raw(pm.pid), Signal::SIGINT);
    if wait_gone(postmaster, &mut family, grace.fast) {
        return Ok(FenceOutcome::StoppedFast);
    }
    tracing::error!(
        pid = pm.pid,
        "fast shutdown did not finish in {:?}; immediate shutdown",
        grace.fast
    );
    let _ = signal::kill(Pid::from_raw(pm.pid), Signal::SIGQUIT);
    if wait_gone(postmaster, &mut family, grace.immediate) {
        return Ok(FenceOutcome::StoppedImmediate);
    }
    tracing::error!(
        pid = pm.pid,
        processes = family.len() + 1,
        "immediate shutdown did not finish; killing every process of the instance"
    );
    kill_exact(postmaster);
    for p in family.keys() {
        kill_exact(*p);
    }
    Ok(FenceOutcome::Killed)
}

/// Waits until `postmaster` is gone, adding new descendants to `family` while waiting. Returns
/// whether it went away within `limit`.
fn wait_gone(postmaster: Proc, family: &mut BTreeMap<Proc, ()>, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if !alive(postmaster) {
            // Backends notice the postmaster's death and exit on their own; any straggler would
            // be unable to commit anyway (no postmaster, no new WAL flush coordination), but is
            // killed so the next start finds no process attached to the shared memory.
            for p in family.keys() {
                if alive(*p) {
                    kill_exact(*p);
                }
            }
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        collect_descendants(postmaster, family);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill_exact(p: Proc) {
    if alive(p) {
        let _ = signal::kill(Pid::from_raw(p.pid), Signal::SIGKILL);
    }
}

/// Whether the exact process (same PID and start time) still runs (zombies count as gone).
fn alive(p: Proc) -> bool {
    stat_fields(p.pid).is_some_and(|s| s.start_ticks == p.start_ticks && s.state != 'Z')
}

fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid).map(|s| s.start_ticks)
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    ppid: i32,
    start_ticks: u64,
}

fn stat_fields(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let mut rest = text.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // After state (3) and ppid (4), starttime is field 22: 17 more fields on.
    let start_ticks = rest.nth(17)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        start_ticks,
    })
}

/// Adds every live descendant of `root` to `family` (one pass over `/proc`).
fn collect_descendants(root: Proc, family: &mut BTreeMap<Proc, ()>) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut parent_of: Vec<(Proc, i32)> = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(s) = stat_fields(pid) {
            parent_of.push((
                Proc {
                    pid,
                    start_ticks: s.start_ticks,
                },
                s.ppid,
            ));
        }
    }
    let mut frontier = vec![root.pid];
    while let Some(parent) = frontier.pop() {
        for (p, ppid) in &parent_of {
            if *ppid == parent && p.pid != root.pid && family.insert(*p, ()).is_none() {
                frontier.push(p.pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        let line = "4242 (postgres: a (b) c) S 4000 4242 4242 0 -1 4194560 137 0 0 0 0 0 0 0 20 \
                    0 1 0 987654 224034816 3072 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                ppid: 4000,
                start_ticks: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn finds_children_of_this_process_and_not_others() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let root = Proc {
            pid: me,
            start_ticks: start_ticks(me).unwrap(),
        };
        let mut family = BTreeMap::new();
        collect_descendants(root, &mut family);
        let cpid = i32::try_from(child.id()).unwrap();
        assert!(family.keys().any(|p| p.pid == cpid));
        assert!(!family.keys().any(|p| p.pid == 1 || p.pid == me));
        let c = *family.keys().find(|p| p.pid == cpid).unwrap();
        kill_exact(c);
        child.wait().unwrap();
        assert!(!alive(c));
        // A recycled PID with another start time is not "alive" as the remembered process.
        assert!(!alive(Proc {
            pid: me,
            start_ticks: root.start_ticks + 1
        }));
    }
}
