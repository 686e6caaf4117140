//! The system side of a bed: `ip` and `nft` invocations (each bounded), `/etc/netns` files, the
//! subnet registry and its lock, and the processes in a namespace.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{paths, proc, service};

/// iproute2's `ip`.
pub(super) const IP_BIN: &str = "/usr/sbin/ip";

/// nftables' `nft`.
pub(super) const NFT_BIN: &str = "/usr/sbin/nft";

/// The shell that runs the pin script (module `pin`).
pub(super) const SH_BIN: &str = "/bin/sh";

/// Where `ip netns` keeps its named namespaces (one bind-mounted file each).
pub(super) const NETNS_RUN_DIR: &str = "/run/netns";

/// Where `ip netns exec` finds per-namespace files to bind-mount over `/etc`.
pub(super) const ETC_NETNS_DIR: &str = "/etc/netns";

/// First two octets of every bed network (`10.231.<k>.0/24`).
pub(super) const NET_PREFIX: [u8; 2] = [10, 231];

/// Name of the bridge-family nftables table in a bed's switch namespace.
const NFT_TABLE: &str = "pgkeep_bed";

/// Bound on every `ip`/`nft` invocation.
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound on waiting for the subnet lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `program args` as root in the current namespace, at most [`TOOL_TIMEOUT`]; returns its
/// stdout, or fails with its status and output.
pub(super) fn tool(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", service::SERVICE_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    let what = format!("{program} {}", args.join(" "));
    let out = service::run(cmd, &std::env::temp_dir(), TOOL_TIMEOUT)
        .with_context(|| format!("running {what}"))?;
    Ok(out.ensure_success(&what)?.stdout)
}

/// `ip args`.
pub(super) fn ip(args: &[&str]) -> Result<String> {
    tool(IP_BIN, args)
}

/// True if the named namespace `name` exists.
pub(super) fn ns_exists(name: &str) -> bool {
    Path::new(NETNS_RUN_DIR).join(name).exists()
}

/// `ip netns del name`; a namespace that does not exist is fine.
pub(super) fn delete_ns(name: &str) -> Result<()> {
    if !ns_exists(name) {
        return Ok(());
    }
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !ns_exists(name) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting network namespace {name}")),
    }
}

/// The names in `dir` (empty if it cannot be read).
pub(super) fn list_dir(dir: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `/etc/netns/<ns>`.
pub(super) fn etc_dir(ns: &str) -> PathBuf {
    Path::new(ETC_NETNS_DIR).join(ns)
}

/// Creates `/etc/netns/<ns>` (0755) and `/etc/netns` if missing. Another bed's teardown may
/// remove an empty `/etc/netns` at any moment, hence the retries.
pub(super) fn create_etc_dir(ns: &str) -> Result<PathBuf> {
    let dir = etc_dir(ns);
    for _ in 0..10 {
        match fs::DirBuilder::new().mode(0o755).create(ETC_NETNS_DIR) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("mkdir {ETC_NETNS_DIR}")),
        }
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod 755 {}", dir.display()))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", dir.display())),
        }
    }
    bail!("could not create {}", dir.display())
}

/// Removes `/etc/netns/<ns>` and what it holds; a missing directory is fine.
pub(super) fn remove_etc_dir(ns: &str) -> Result<()> {
    let dir = etc_dir(ns);
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Removes `/etc/netns` if it is empty (errors ignored: another bed may be using it).
pub(super) fn remove_etc_netns_if_empty() {
    let _ = fs::remove_dir(ETC_NETNS_DIR);
}

/// Writes `content` to `path`, mode 0644 (every service user must read the hosts file).
pub(super) fn write_public(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod 644 {}", path.display()))
}

/// The exclusive lock under which a bed picks its subnet and registers it (by writing its
/// `/etc/netns/<ns>/hosts` files). Released on drop.
pub(super) struct SubnetLock {
    _file: File,
}

/// Takes the subnet lock (`/var/tmp/pgkeep-test/.netbed.lock`, shared by every checkout), waiting
/// at most [`LOCK_TIMEOUT`].
pub(super) fn lock_subnets() -> Result<SubnetLock> {
    paths::ensure_base_dirs()?;
    let path = paths::shared_base_dir().join(".netbed.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(SubnetLock { _file: file }),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                bail!("{} still locked after {LOCK_TIMEOUT:?}", path.display())
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
}

/// The third octet of `addr` if it is in `10.231.0.0/16`.
fn bed_octet(addr: Ipv4Addr) -> Option<u8> {
    let o = addr.octets();
    (o[..2] == NET_PREFIX).then_some(o[2])
}

/// Third octets `k` of the `10.231.<k>.0/24` networks in use: by any bed of any checkout (the
/// addresses in every `/etc/netns/*/hosts`) and by the root namespace's own addresses (read
/// only). Call with the subnet lock held.
pub(super) fn used_octets() -> Result<BTreeSet<u8>> {
    let mut used = BTreeSet::new();
    for name in list_dir(ETC_NETNS_DIR) {
        let Ok(hosts) = fs::read_to_string(etc_dir(&name).join("hosts")) else {
            continue;
        };
        for line in hosts.lines() {
            if let Some(k) = line
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .and_then(bed_octet)
            {
                used.insert(k);
            }
        }
    }
    let root =
        ip(&["-4", "-o", "addr", "show"]).context("listing the root namespace's addresses")?;
    for line in root.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "inet"
                && let Some(k) = words
                    .next()
                    .and_then(|cidr| cidr.split('/').next())
                    .and_then(|a| a.parse().ok())
                    .and_then(bed_octet)
            {
                used.insert(k);
            }
        }
    }
    Ok(used)
}

/// The first `k` in 1..=254, starting at `start` and wrapping, that is not in `used`.
pub(super) fn pick_octet(used: &BTreeSet<u8>, start: u32) -> Option<u8> {
    (0..254u32)
        .map(|i| u8::try_from((start + i) % 254 + 1).expect("1..=254"))
        .find(|k| !used.contains(k))
}

/// The nftables script that makes the bridge of a switch namespace drop every non-ARP frame
/// between the ports of each pair in `cuts` (both directions). With no cuts it only removes the
/// table. The script replaces the whole table in one transaction.
///
/// ARP passes, so every host keeps resolving its peers' MAC addresses and a cut looks like
/// silence to both ends (no "no route to host"); IP packets simply vanish at the bridge.
pub(super) fn ruleset(cuts: &[(&str, &str)]) -> String {
    let mut s = format!("table bridge {NFT_TABLE} {{}}\ndelete table bridge {NFT_TABLE}\n");
    if cuts.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "table bridge {NFT_TABLE} {{\n\tchain forward {{\n\t\t\
         type filter hook forward priority 0; policy accept;\n"
    ));
    for (a, b) in cuts {
        for (from, to) in [(a, b), (b, a)] {
            s.push_str(&format!(
                "\t\tiifname \"{from}\" oifname \"{to}\" ether type != arp drop\n"
            ));
        }
    }
    s.push_str("\t}\n}\n");
    s
}

/// Loads the nftables `script` in the namespace `ns` (`ip netns exec <ns> nft -f <file>`).
pub(super) fn nft_apply(ns: &str, script: &str) -> Result<()> {
    let mut file = tempfile::NamedTempFile::new().context("temp file for the nft script")?;
    std::io::Write::write_all(&mut file, script.as_bytes())?;
    let path = file.path().to_str().context("temp path is not UTF-8")?;
    tool(IP_BIN, &["netns", "exec", ns, NFT_BIN, "-f", path])
        .with_context(|| format!("loading nft rules in {ns}:\n{script}"))?;
    Ok(())
}

/// The pids of the processes in the namespace `ns` (`ip netns pids`); empty if it is gone.
pub(super) fn ns_pids(ns: &str) -> Vec<u32> {
    if !ns_exists(ns) {
        return Vec::new();
    }
    ip(&["netns", "pids", ns])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process that is both in the namespace `ns` and in `ours` (the pids the
/// caller started, i.e. its environment's cgroup, read afresh each round), until none is left;
/// bounded by `timeout`. Processes that are not ours are never signalled.
pub(super) fn kill_ours_in(ns: &str, ours: &dyn Fn() -> Vec<u32>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mine = ours();
        let doomed: Vec<u32> = ns_pids(ns)
            .into_iter()
            .filter(|p| mine.contains(p) && proc::pid_is_alive(*p))
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes {doomed:?} still running in namespace {ns} after {timeout:?}");
        }
        for pid in doomed {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octets_are_picked_around_the_used_ones() {
        let used: BTreeSet<u8> = [1, 2, 5].into_iter().collect();
        assert_eq!(pick_octet(&used, 0), Some(3));
        assert_eq!(pick_octet(&used, 3), Some(4));
        assert_eq!(pick_octet(&used, 253), Some(254));
        assert_eq!(pick_octet(&used, 254), Some(3));
        let all: BTreeSet<u8> = (1..=254).collect();
        assert_eq!(pick_octet(&all, 7), None);
        assert_eq!(bed_octet(Ipv4Addr::new(10, 231, 9, 1)), Some(9));
        assert_eq!(bed_octet(Ipv4Addr::new(10, 230, 9, 1)), None);
    }

    #[test]
    fn ruleset_replaces_the_table_and_keeps_arp() {
        let heal = ruleset(&[]);
        assert_eq!(
            heal,
            "table bridge pgkeep_bed {}\ndelete table bridge pgkeep_bed\n"
        );
        let cut = ruleset(&[("p1-a", "p2-b")]);
        assert!(cut.starts_with(&heal));
        assert!(cut.contains("type filter hook forward priority 0; policy accept;"));
        assert!(cut.contains("iifname \"p1-a\" oifname \"p2-b\" ether type != arp drop\n"));
        assert!(cut.contains("iifname \"p2-b\" oifname \"p1-a\" ether type != arp drop\n"));
        assert_eq!(cut.matches(" drop\n").count(), 2);
    }
}
