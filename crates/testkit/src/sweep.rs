//! Removing what dead test processes of this checkout left behind.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{cgroup, hosts, paths, proc};

/// What [`sweep`] removed, and what it could not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Env ids whose cgroups were killed and removed.
    pub cgroups_removed: Vec<String>,
    /// Tags of the `/etc/hosts` blocks removed.
    pub hosts_blocks_removed: Vec<String>,
    /// Temp roots removed.
    pub roots_removed: Vec<PathBuf>,
    /// Network namespaces of [`crate::NetBed`]s whose namespace or `/etc/netns` directory was
    /// removed.
    pub netns_removed: Vec<String>,
    /// Failures (the sweep carries on past them).
    pub errors: Vec<String>,
}

impl SweepReport {
    /// True if nothing was found to remove and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.cgroups_removed.is_empty()
            && self.hosts_blocks_removed.is_empty()
            && self.roots_removed.is_empty()
            && self.netns_removed.is_empty()
            && self.errors.is_empty()
    }
}

/// The pid in an env id `<name>-<pid>-<n>`.
fn env_pid(env_id: &str) -> Option<u32> {
    let mut parts = env_id.rsplit('-');
    let _n: u32 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// True if the test process that created `env_id` is still running. The owner file in the
/// temp root (pid and start time) tells it from a later process that got the same pid.
fn owner_alive(base: &Path, env_id: &str) -> bool {
    let Some(pid) = env_pid(env_id) else {
        // Not one of ours by name, but in this checkout's namespace: treat as abandoned.
        return false;
    };
    let start = fs::read_to_string(base.join(env_id).join("owner"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|t| t.parse().ok()));
    proc::owner_alive(pid, start)
}

/// Removes the leftovers of test processes of this checkout that are dead (killed, or
/// crashed before their environments' teardown ran):
///
/// 1. cgroups `<cgroup2>/pgkeep-test-<checkout-id>/<env-id>`: every process in them is killed
///    (`cgroup.kill`), then the cgroup is removed;
/// 2. `/etc/hosts` blocks tagged `pgkeep-test <checkout-id> <env-id>`, and temp files a torn
///    hosts write left in `/etc`;
/// 3. network namespaces `pgkt-<checkout-id>.<env-id>.*` of [`crate::NetBed`]s (with their
///    interfaces) and their `/etc/netns` directories;
/// 4. temp roots `/var/tmp/pgkeep-test/<checkout-id>/<env-id>`.
///
/// Environments of live test processes (this one included) and of other checkouts are never
/// touched. [`crate::Env::new`] calls this once per process.
pub fn sweep() -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let base = paths::test_base_dir();

    // 1. Cgroups first, so no leftover process keeps writing into the files removed below.
    if let Ok(cg_parent) = paths::checkout_cgroup_dir()
        && let Ok(rd) = fs::read_dir(&cg_parent)
    {
        for e in rd.flatten() {
            let Ok(id) = e.file_name().into_string() else {
                continue;
            };
            if !e.file_type().is_ok_and(|t| t.is_dir()) || owner_alive(&base, &id) {
                continue;
            }
            match cgroup::kill_and_remove(&e.path(), cgroup::KILL_TIMEOUT) {
                Ok(()) => report.cgroups_removed.push(id),
                Err(err) => report.errors.push(format!("{err:#}")),
            }
        }
        cgroup::remove_if_empty(&cg_parent);
    }

    // 2. Hosts blocks.
    let prefix = format!("{} {} ", hosts::TAG_PREFIX, paths::checkout_id());
    match hosts::remove_blocks(&|tag| {
        tag.strip_prefix(&prefix)
            .is_some_and(|id| !owner_alive(&base, id.trim()))
    }) {
        Ok(tags) => report.hosts_blocks_removed = tags,
        Err(err) => report.errors.push(format!("hosts: {err:#}")),
    }
    if let Ok(rd) = fs::read_dir("/etc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix(".hosts.pgkeep.")
                .and_then(|r| r.strip_suffix(".tmp"))
                .and_then(|p| p.parse::<u32>().ok())
                && !proc::pid_is_alive(pid)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    // 3. Network beds, after the cgroups (a namespace lives on while a process is in it) and
    // before the temp roots (whose owner files tell a reused pid from the owner).
    let beds = crate::netns::sweep(&|id| owner_alive(&base, id));
    report.netns_removed = beds.removed;
    report.errors.extend(beds.errors);

    // 4. Temp roots.
    if let Ok(rd) = fs::read_dir(&base) {
        for e in rd.flatten() {
            let Ok(id) = e.file_name().into_string() else {
                continue;
            };
            if !e.file_type().is_ok_and(|t| t.is_dir()) || owner_alive(&base, &id) {
                continue;
            }
            match fs::remove_dir_all(e.path()) {
                Ok(()) => report.roots_removed.push(e.path()),
                Err(err) => report
                    .errors
                    .push(format!("removing {}: {err}", e.path().display())),
            }
        }
        let _ = fs::remove_dir(&base);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_from_env_id() {
        assert_eq!(env_pid("harness-etcd-1234-0"), Some(1234));
        assert_eq!(env_pid("x-77-12"), Some(77));
        assert_eq!(env_pid("nothing"), None);
    }
}
