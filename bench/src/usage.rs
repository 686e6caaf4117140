//! Resource use of processes and cgroups from `/proc` and cgroup v2: resident memory
//! (`VmRSS`, `RssAnon` of `/proc/<pid>/status`), CPU time (`utime` + `stime` of
//! `/proc/<pid>/stat`) and a cgroup's `cpu.stat` `usage_usec`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::sys::Cmd;

/// Memory of a process (kB), from `/proc/<pid>/status` and `/proc/<pid>/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: everything resident (anonymous + file-backed, e.g. the binary's text + shared).
    pub rss_kb: u64,
    /// `RssAnon`: the anonymous part (heap, stacks).
    pub anon_kb: u64,
    /// `RssFile`: the file-backed part (the executable's and libraries' pages), shared by
    /// every process that maps the same file.
    pub file_kb: u64,
    /// `Pss` of `smaps_rollup`: shared pages divided among the processes mapping them.
    pub pss_kb: Option<u64>,
}

/// A `kB` field of a `/proc/<pid>/status` text.
pub fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `VmRSS`, `RssAnon`, `RssFile` and `Pss` of `pid` (None when it is gone).
pub fn memory(pid: u32) -> Option<Memory> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss_kb: status_field(&s, "VmRSS")?,
        anon_kb: status_field(&s, "RssAnon").unwrap_or(0),
        file_kb: status_field(&s, "RssFile").unwrap_or(0),
        pss_kb: status_field(&rollup, "Pss"),
    })
}

/// Busy time of all CPUs (`user + nice + system + irq + softirq + steal` of the `cpu` line of
/// a `/proc/stat` text), in clock ticks.
pub fn stat_busy_ticks(stat: &str) -> Option<u64> {
    let l = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// Busy time of the whole machine so far, in clock ticks.
pub fn busy_ticks() -> Option<u64> {
    stat_busy_ticks(&fs::read_to_string("/proc/stat").ok()?)
}

/// The fields after the `(comm)` of a `/proc/<pid>/stat` text: index 0 is field 3 (state).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let i = stat.rfind(')')?;
    Some(stat[i + 1..].split_whitespace().collect())
}

/// `utime + stime` (clock ticks) of a `/proc/<pid>/stat` text.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let f = stat_fields(stat)?;
    // Fields 14 (utime) and 15 (stime), 1-based; f[0] is field 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The parent PID in a `/proc/<pid>/stat` text.
pub fn stat_ppid(stat: &str) -> Option<u32> {
    stat_fields(stat)?.get(1)?.parse().ok()
}

/// `utime + stime` of `pid` in clock ticks (None when it is gone).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
pub async fn clk_tck() -> f64 {
    Cmd::new("getconf")
        .args(["CLK_TCK"])
        .timeout(Duration::from_secs(10))
        .output()
        .await
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The direct children of `pid` whose command line contains `needle`.
pub fn children(pid: u32, needle: &str) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| stat_ppid(&s))
                == Some(pid)
        })
        .filter(|c| {
            fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|a| String::from_utf8_lossy(&a).contains(needle))
        })
        .collect();
    v.sort_unstable();
    v
}

/// `usage_usec` of a cgroup `cpu.stat` text.
pub fn cpu_stat_usec(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU time of everything that ran in cgroup `dir` (and below) so far, in µs.
pub fn cgroup_cpu_usec(dir: &Path) -> Option<u64> {
    cpu_stat_usec(&fs::read_to_string(dir.join("cpu.stat")).ok()?)
}

/// `cutime + cstime` of this process (its reaped children, e.g. `ab`), in clock ticks.
pub fn own_children_ticks() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/stat").ok()?;
    let f = stat_fields(&s)?;
    let cutime: u64 = f.get(13)?.parse().ok()?;
    let cstime: u64 = f.get(14)?.parse().ok()?;
    Some(cutime + cstime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status =
            "Name:\tpgkeep\nVmHWM:\t   20000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    4321 kB\n";
        assert_eq!(status_field(status, "VmRSS"), Some(12345));
        assert_eq!(status_field(status, "RssAnon"), Some(4321));
        assert_eq!(status_field(status, "VmSwap"), None);
        assert_eq!(
            stat_busy_ticks("cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n"),
            Some(25)
        );
        // comm with spaces and parentheses; utime 7, stime 5, cutime 3, cstime 2.
        let stat =
            "42 (tokio (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 3 2 20 0 9 0 100 1000 300";
        assert_eq!(stat_cpu_ticks(stat), Some(12));
        assert_eq!(stat_ppid(stat), Some(1));
        assert_eq!(
            cpu_stat_usec("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
            Some(1500)
        );
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(me).is_some_and(|m| m.rss_kb > 0 && m.pss_kb.is_some()));
        assert!(busy_ticks().is_some());
        assert!(cpu_ticks(me).is_some());
        assert!(own_children_ticks().is_some());
    }
}
