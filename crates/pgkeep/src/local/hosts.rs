//! The marked block of `/etc/hosts` that gives a local environment's hosts their names.
//!
//! ```text
//! # BEGIN pgkeep <hash>
//! # net 127.42.7.0/24
//! # dir /var/lib/pgkeep-demo
//! 127.42.7.11 node1.demo.internal
//! # END pgkeep <hash>
//! ```
//!
//! `/etc/hosts` is also the registry of loopback networks: a `127.42.X.0/24` that any line
//! mentions is taken. Every read-modify-write holds an exclusive `flock` on the lock file the
//! test harness uses too, so `up` and concurrent tests never pick the same network or lose each
//! other's edits. Everything outside the block is preserved byte for byte; the file is replaced
//! by rename, or rewritten in place when it is a bind mount that cannot be renamed over.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::NET_OCTET;

/// The hosts file.
pub const HOSTS_FILE: &str = "/etc/hosts";
/// The lock every editor of marked blocks takes (shared with the test harness).
pub const LOCK_FILE: &str = "/var/tmp/pgkeep-test/.hosts.lock";

/// The tag of a directory's block: `pgkeep <hash>`.
pub fn tag(hash: &str) -> String {
    format!("pgkeep {hash}")
}

/// Holds the hosts lock while alive.
pub struct HostsLock {
    _lock: Flock<File>,
}

/// Takes the exclusive lock every editor of pgkeep's `/etc/hosts` blocks (`pgkeep up`, the test
/// harness) holds while it reads, changes and writes the file. Waits at most 30 s.
pub fn lock() -> Result<HostsLock> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the lock file {LOCK_FILE}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(HostsLock { _lock: l }),
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                sleep(Duration::from_millis(20));
            }
            Err((_, e)) => bail!("cannot lock {LOCK_FILE}: {e}"),
        }
    }
}

/// Line range (`end` inclusive) of the block `tag`, if present. A block without its END line
/// (a torn write) ends before the next blank line or `# BEGIN`, or at the end of the file.
fn find(lines: &[&str], tag: &str) -> Option<(usize, usize)> {
    let begin = format!("# BEGIN {tag}");
    let end = format!("# END {tag}");
    let start = lines.iter().position(|l| l.trim_end() == begin)?;
    let mut last = start;
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        let l = l.trim_end();
        if l == end {
            return Some((start, i));
        }
        if l.is_empty() || l.starts_with("# BEGIN ") {
            break;
        }
        last = i;
    }
    Some((start, last))
}

/// The `(a, b)` of every `127.a.b.0/24` the hosts file mentions (addresses and `# net` lines),
/// apart from `127.0.0.0/24`. `pgkeep up` and the test harness both choose free networks from it.
pub fn loopback_nets(lines: &[&str]) -> Vec<(u8, u8)> {
    let mut used = Vec::new();
    for l in lines {
        let l = l.trim();
        let word = if let Some(net) = l.strip_prefix("# net ") {
            net.split('/').next().unwrap_or("")
        } else if l.starts_with('#') {
            continue;
        } else {
            l.split_whitespace().next().unwrap_or("")
        };
        if let Ok(ip) = word.parse::<Ipv4Addr>() {
            let o = ip.octets();
            if o[0] == 127 && (o[1], o[2]) != (0, 0) {
                used.push((o[1], o[2]));
            }
        }
    }
    used
}

/// The `X` of every `127.42.X.*` the file mentions.
fn used_nets(lines: &[&str]) -> BTreeSet<u8> {
    loopback_nets(lines)
        .into_iter()
        .filter(|(a, _)| *a == NET_OCTET)
        .map(|(_, b)| b)
        .collect()
}

/// The network of an existing block (`# net 127.42.X.0/24`).
fn block_net(lines: &[&str], range: (usize, usize)) -> Option<u8> {
    lines[range.0..=range.1].iter().find_map(|l| {
        let net = l.trim().strip_prefix("# net ")?;
        let ip: Ipv4Addr = net.split('/').next()?.parse().ok()?;
        let o = ip.octets();
        (o[0] == 127 && o[1] == NET_OCTET).then_some(o[2])
    })
}

fn render_block(tag: &str, net: u8, dir: &Path, entries: &[(IpAddr, String)]) -> String {
    let mut b = format!(
        "# BEGIN {tag}\n# net 127.{NET_OCTET}.{net}.0/24\n# dir {}\n",
        dir.display()
    );
    for (ip, name) in entries {
        b.push_str(&format!("{ip} {name}\n"));
    }
    b.push_str(&format!("# END {tag}\n"));
    b
}

/// `content` with the block `tag` replaced by `block` (appended when absent; removed when
/// `block` is empty).
fn replace_block(content: &str, tag: &str, block: &str) -> String {
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    let mut out = String::with_capacity(content.len() + block.len());
    match find(&lines, tag) {
        Some((start, end)) => {
            for l in &lines[..start] {
                out.push_str(l);
            }
            out.push_str(block);
            for l in &lines[end + 1..] {
                out.push_str(l);
            }
        }
        None => {
            out.push_str(content);
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(block);
        }
    }
    out
}

/// Picks the network for block `tag`: the one it already has, else a free `X`.
fn choose_net(content: &str, tag: &str) -> Result<u8> {
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    if let Some(range) = find(&lines, tag)
        && let Some(net) = block_net(&lines, range)
    {
        return Ok(net);
    }
    let used = used_nets(&lines);
    (1..=254u8)
        .find(|x| !used.contains(x))
        .with_context(|| format!("no free 127.{NET_OCTET}.X.0/24 network left in {HOSTS_FILE}"))
}

/// Names of `entries` that some line outside block `tag` already maps.
fn foreign_names(content: &str, tag: &str, entries: &[(IpAddr, String)]) -> Vec<String> {
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    let ours = find(&lines, tag);
    let mut clash = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if ours.is_some_and(|(s, e)| (s..=e).contains(&i)) {
            continue;
        }
        let l = l.split('#').next().unwrap_or("");
        for word in l.split_whitespace().skip(1) {
            if entries.iter().any(|(_, n)| n == word) && !clash.iter().any(|c| c == word) {
                clash.push(word.to_owned());
            }
        }
    }
    clash
}

/// The hosts file's content.
pub fn read_hosts() -> Result<String> {
    fs::read_to_string(HOSTS_FILE).with_context(|| format!("reading {HOSTS_FILE}"))
}

/// Replaces the file's content: a temp file (`/etc/.hosts.pgkeep.<pid>.tmp`) renamed over it,
/// or an in-place rewrite when the rename fails (a bind-mounted `/etc/hosts`). Call it holding
/// [`lock`].
pub fn write_hosts(content: &str) -> Result<()> {
    let path = Path::new(HOSTS_FILE);
    let meta = fs::metadata(path).with_context(|| format!("stat {HOSTS_FILE}"))?;
    let tmp = path.with_file_name(format!(".hosts.pgkeep.{}.tmp", std::process::id()));
    let renamed = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if renamed.is_ok() {
        return Ok(());
    }
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {HOSTS_FILE} for writing (run as root)"))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.set_len(content.len() as u64))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("rewriting {HOSTS_FILE} in place"))
}

/// Reserves the network of the directory whose hash is `hash`: the block's existing network,
/// or a free one recorded at once in an (entry-less) block. Returns `X` of `127.42.X.0/24`.
pub fn reserve(hash: &str, dir: &Path) -> Result<u8> {
    let tag = tag(hash);
    let _l = lock()?;
    let content = read_hosts()?;
    let net = choose_net(&content, &tag)?;
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    if find(&lines, &tag).is_none() {
        write_hosts(&replace_block(
            &content,
            &tag,
            &render_block(&tag, net, dir, &[]),
        ))?;
    }
    Ok(net)
}

/// Writes the block with `entries` (idempotent). Fails when another line of the file already
/// maps one of the names, or when the network is mentioned outside the block.
pub fn install(hash: &str, net: u8, dir: &Path, entries: &[(IpAddr, String)]) -> Result<()> {
    let tag = tag(hash);
    let _l = lock()?;
    let content = read_hosts()?;
    let clash = foreign_names(&content, &tag, entries);
    if !clash.is_empty() {
        bail!(
            "{HOSTS_FILE} already maps {} outside this environment's block; another environment \
             uses the same cluster name (pass a different --cluster on the first `up`)",
            clash.join(", ")
        );
    }
    let without = replace_block(&content, &tag, "");
    let lines: Vec<&str> = without.split_inclusive('\n').collect();
    if used_nets(&lines).contains(&net) {
        bail!(
            "127.{NET_OCTET}.{net}.0/24 is now used by another line of {HOSTS_FILE}; \
             remove that line or the environment (`pgkeep down --purge`)"
        );
    }
    let block = render_block(&tag, net, dir, entries);
    let new = replace_block(&content, &tag, &block);
    if new != content {
        write_hosts(&new)?;
    }
    Ok(())
}

/// Removes the block (nothing to do when it is absent). True when a block was removed.
pub fn remove(hash: &str) -> Result<bool> {
    let tag = tag(hash);
    let _l = lock()?;
    let content = read_hosts()?;
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    if find(&lines, &tag).is_none() {
        return Ok(false);
    }
    write_hosts(&replace_block(&content, &tag, ""))?;
    Ok(true)
}

/// True when the file has the block.
pub fn present(hash: &str) -> Result<bool> {
    let content = read_hosts()?;
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    Ok(find(&lines, &tag(hash)).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "127.0.0.1 localhost\n# BEGIN pgkeep-test abc e1\n# net 127.77.1.0/24\n127.77.1.1 x.pgkeep.test\n# END pgkeep-test abc e1\n::1 ip6";

    fn entries() -> Vec<(IpAddr, String)> {
        vec![("127.42.1.11".parse().unwrap(), "node1.demo.internal".into())]
    }

    #[test]
    fn block_round_trip_preserves_everything_else() {
        let tag = tag("deadbeef");
        assert_eq!(choose_net(BASE, &tag).unwrap(), 1);
        let block = render_block(&tag, 1, Path::new("/d"), &entries());
        let with = replace_block(BASE, &tag, &block);
        assert!(with.starts_with(BASE));
        assert!(with.contains("127.42.1.11 node1.demo.internal\n# END pgkeep deadbeef\n"));
        assert_eq!(
            choose_net(&with, &tag).unwrap(),
            1,
            "a block keeps its network"
        );
        assert_eq!(choose_net(&with, "pgkeep other").unwrap(), 2);
        // Replacing is idempotent and removal restores the original (plus the final newline).
        assert_eq!(replace_block(&with, &tag, &block), with);
        assert_eq!(replace_block(&with, &tag, ""), format!("{BASE}\n"));
        // The test harness's blocks are not ours.
        assert!(
            find(
                &BASE.split_inclusive('\n').collect::<Vec<_>>(),
                "pgkeep abc"
            )
            .is_none()
        );
    }

    #[test]
    fn foreign_names_and_networks_are_detected() {
        let tag = tag("deadbeef");
        let other = "127.42.1.11 node1.demo.internal\n";
        assert_eq!(
            foreign_names(other, &tag, &entries()),
            ["node1.demo.internal"]
        );
        let ours = replace_block(
            "",
            &tag,
            &render_block(&tag, 3, Path::new("/d"), &entries()),
        );
        assert!(foreign_names(&ours, &tag, &entries()).is_empty());
        let lines: Vec<&str> = "127.42.9.1 a\n# net 127.42.4.0/24\n"
            .split_inclusive('\n')
            .collect();
        assert_eq!(used_nets(&lines), BTreeSet::from([4, 9]));
    }

    #[test]
    fn a_torn_block_stops_at_a_blank_line() {
        let c = "a\n# BEGIN pgkeep h\n# net 127.42.1.0/24\n127.42.1.11 n\n\n10.0.0.1 keep\n";
        let out = replace_block(c, "pgkeep h", "");
        assert_eq!(out, "a\n\n10.0.0.1 keep\n");
    }
}
