//! Per-environment cgroups (cgroup v2): creation, kill and removal.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long teardown waits for a cgroup's processes to die.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(15);

/// Creates the cgroup directory `dir` (its parent is created if missing; a concurrent teardown
/// may remove an empty parent, hence the retries).
pub(crate) fn create(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("cgroup path has no parent")?;
    let mut last = None;
    for _ in 0..5 {
        match fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", parent.display())),
        }
        match fs::create_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", dir.display())),
        }
    }
    Err(last.expect("loop ran")).with_context(|| format!("mkdir {}", dir.display()))
}

/// The pids in `dir`'s own `cgroup.procs` (not its descendants').
pub(crate) fn procs(dir: &Path) -> Result<Vec<u32>> {
    let file = dir.join("cgroup.procs");
    let s = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// `dir` and every cgroup below it, deepest first.
fn subtree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree_deepest_first(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// True while `dir` or a descendant still holds a live process (`populated 1`).
fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        // Without cgroup.events fall back to the procs files.
        Err(_) => subtree_deepest_first(dir)
            .iter()
            .any(|d| procs(d).is_ok_and(|p| !p.is_empty())),
    }
}

/// Sends SIGKILL to everything in the subtree: `cgroup.kill` where the kernel has it (5.14+),
/// otherwise one signal per listed pid.
fn kill_all(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() && fs::write(&kill_file, "1").is_ok() {
        return;
    }
    for d in subtree_deepest_first(dir) {
        for pid in procs(&d).unwrap_or_default() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Kills every process in the cgroup `dir` and below, waits until none is left, and removes the
/// cgroups (deepest first). A missing `dir` is fine. Bounded by `timeout`.
pub(crate) fn kill_and_remove(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut last_kill: Option<Instant> = None;
    while populated(dir) {
        if Instant::now() >= deadline {
            let left: Vec<u32> = subtree_deepest_first(dir)
                .iter()
                .flat_map(|d| procs(d).unwrap_or_default())
                .collect();
            bail!(
                "processes {left:?} still in cgroup {} after {timeout:?}",
                dir.display()
            );
        }
        if last_kill.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
            kill_all(dir);
            last_kill = Some(Instant::now());
        }
        sleep(Duration::from_millis(10));
    }
    for d in subtree_deepest_first(dir) {
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                // EBUSY: a process that was just killed may not have left the cgroup yet.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    kill_all(&d);
                    sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", d.display())),
            }
        }
    }
    Ok(())
}

/// Removes `dir` if it is an empty cgroup (no child cgroups, no processes); errors are ignored,
/// since another test process may be using it.
pub(crate) fn remove_if_empty(dir: &Path) {
    let _ = fs::remove_dir(dir);
}
