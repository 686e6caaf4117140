//! The marked blocks of `/etc/hosts` that give each environment's nodes their DNS names.
//!
//! A block looks like this (one per environment):
//!
//! ```text
//! # BEGIN pgkeep-test <checkout-id> <env-id>
//! # net 127.77.1.0/24
//! 127.77.1.1 etcd1.<env-id>.pgkeep.test
//! # END pgkeep-test <checkout-id> <env-id>
//! ```
//!
//! `/etc/hosts` doubles as the registry of loopback networks: a `/24` is free when no line of the
//! file (any block's `# net` line or any address) uses it. Every read-modify-write holds an
//! exclusive `flock` on a lock file, so concurrent test processes allocate distinct networks.
//! Everything outside our blocks is preserved byte for byte. The file is replaced by rename; if
//! that fails (a bind-mounted `/etc/hosts`), it is rewritten in place.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

/// The hosts file the harness edits.
pub(crate) const HOSTS_FILE: &str = "/etc/hosts";

/// First word of every block tag.
pub(crate) const TAG_PREFIX: &str = "pgkeep-test";

/// Second octets tried for environment networks (`127.<a>.<b>.0/24`).
const NET_A: std::ops::RangeInclusive<u8> = 77..=99;

// The lock and the file primitives are pgkeep's own, so `pgkeep up` and the harness never
// corrupt each other's edits.
pub(crate) use pgkeep::local::hosts::{lock, read_hosts, write_hosts};

/// One of our blocks, as line indexes into the file (`end` inclusive).
#[derive(Debug, PartialEq)]
struct Block {
    tag: String,
    start: usize,
    end: usize,
}

fn begin_line(tag: &str) -> String {
    format!("# BEGIN {tag}")
}

fn end_line(tag: &str) -> String {
    format!("# END {tag}")
}

/// Finds every `pgkeep-test` block. A block whose END line is missing (a torn write) extends
/// over the following lines that look like ours (`# net` lines and `*.pgkeep.test` entries).
fn blocks(lines: &[&str]) -> Vec<Block> {
    let begin_prefix = format!("# BEGIN {TAG_PREFIX} ");
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        if let Some(rest) = line.strip_prefix(&begin_prefix) {
            let tag = format!("{TAG_PREFIX} {rest}");
            let end = end_line(&tag);
            let mut j = i + 1;
            let mut found = None;
            while j < lines.len() {
                let l = lines[j].trim_end();
                if l == end {
                    found = Some(j);
                    break;
                }
                if l.starts_with("# BEGIN ") {
                    break;
                }
                j += 1;
            }
            let last = found.unwrap_or_else(|| {
                let mut k = i;
                while k + 1 < lines.len() && looks_like_ours(lines[k + 1]) {
                    k += 1;
                }
                k
            });
            out.push(Block {
                tag,
                start: i,
                end: last,
            });
            i = last + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn looks_like_ours(line: &str) -> bool {
    let l = line.trim();
    l.starts_with("# net 127.")
        || l.split_whitespace()
            .nth(1)
            .is_some_and(|name| name.ends_with(&format!(".{}", crate::DNS_SUFFIX)))
}

use pgkeep::local::hosts::loopback_nets as used_nets;

fn split(content: &str) -> Vec<&str> {
    content.split_inclusive('\n').collect()
}

fn join_without(lines: &[&str], skip: &[&Block]) -> String {
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if !skip.iter().any(|b| (b.start..=b.end).contains(&i)) {
            out.push_str(l);
        }
    }
    out
}

/// Adds a block `tag` for a newly chosen free network; returns `(a, b)` of `127.a.b.0/24`.
fn add_block_with_net(content: &str, tag: &str) -> Result<(String, (u8, u8))> {
    let lines = split(content);
    if blocks(&lines).iter().any(|b| b.tag == tag) {
        bail!("/etc/hosts already has a block {tag}");
    }
    let used = used_nets(&lines);
    let net = NET_A
        .flat_map(|a| (1..=254u8).map(move |b| (a, b)))
        .find(|n| !used.contains(n))
        .context("no free 127.a.b.0/24 network left")?;
    let mut out = content.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "{}\n# net 127.{}.{}.0/24\n{}\n",
        begin_line(tag),
        net.0,
        net.1,
        end_line(tag)
    ));
    Ok((out, net))
}

/// Adds `ip name` as the last line of block `tag`.
fn add_entry_to(content: &str, tag: &str, ip: Ipv4Addr, name: &str) -> Result<String> {
    let lines = split(content);
    let block = blocks(&lines)
        .into_iter()
        .find(|b| b.tag == tag)
        .with_context(|| format!("/etc/hosts has no block {tag}"))?;
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if i == block.end && l.trim_end() == end_line(tag) {
            out.push_str(&format!("{ip} {name}\n"));
        }
        out.push_str(l);
        if i == block.end && l.trim_end() != end_line(tag) {
            if !l.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("{ip} {name}\n"));
        }
    }
    Ok(out)
}

/// Removes every block whose tag satisfies `pred`; returns the new content and removed tags.
fn remove_blocks_from(content: &str, pred: &dyn Fn(&str) -> bool) -> (String, Vec<String>) {
    let lines = split(content);
    let all = blocks(&lines);
    let doomed: Vec<&Block> = all.iter().filter(|b| pred(&b.tag)).collect();
    let tags = doomed.iter().map(|b| b.tag.clone()).collect();
    (join_without(&lines, &doomed), tags)
}

/// Adds an (empty) block `tag` with a free `/24`, chosen and recorded under the lock.
pub(crate) fn allocate_block(tag: &str) -> Result<(u8, u8)> {
    let _l = lock()?;
    let (content, net) = add_block_with_net(&read_hosts()?, tag)?;
    write_hosts(&content)?;
    Ok(net)
}

/// Adds `ip name` to block `tag`.
pub(crate) fn add_entry(tag: &str, ip: Ipv4Addr, name: &str) -> Result<()> {
    let _l = lock()?;
    let content = add_entry_to(&read_hosts()?, tag, ip, name)?;
    write_hosts(&content)
}

/// Removes every block whose tag satisfies `pred`; returns the tags removed.
pub(crate) fn remove_blocks(pred: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
    let _l = lock()?;
    let (content, tags) = remove_blocks_from(&read_hosts()?, pred);
    if !tags.is_empty() {
        write_hosts(&content)?;
    }
    Ok(tags)
}

/// Tags of the blocks now in the hosts file.
pub(crate) fn block_tags() -> Result<Vec<String>> {
    let content = read_hosts()?;
    Ok(blocks(&split(&content))
        .into_iter()
        .map(|b| b.tag)
        .collect())
}

/// Whether the hosts file can be read at all (used to give a clear error early).
pub(crate) fn check_writable() -> Result<()> {
    match OpenOptions::new().append(true).open(HOSTS_FILE) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            bail!("{HOSTS_FILE} is not writable: the test harness must run as root")
        }
        Err(e) => Err(e).with_context(|| format!("opening {HOSTS_FILE}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "127.0.0.1 localhost\n127.0.0.1 vm\n# comment\n::1 ip6-localhost";

    #[test]
    fn add_entry_remove_roundtrip_preserves_the_rest() {
        let (c, net) = add_block_with_net(BASE, "pgkeep-test abc e1-1-0").unwrap();
        assert_eq!(net, (77, 1));
        assert!(c.starts_with(BASE));
        let c = add_entry_to(
            &c,
            "pgkeep-test abc e1-1-0",
            "127.77.1.1".parse().unwrap(),
            "n1.e1-1-0.pgkeep.test",
        )
        .unwrap();
        let (c2, net2) = add_block_with_net(&c, "pgkeep-test abc e2-1-1").unwrap();
        assert_eq!(net2, (77, 2));
        let tags: Vec<String> = blocks(&split(&c2)).into_iter().map(|b| b.tag).collect();
        assert_eq!(tags, ["pgkeep-test abc e1-1-0", "pgkeep-test abc e2-1-1"]);
        assert!(c2.contains("127.77.1.1 n1.e1-1-0.pgkeep.test\n# END pgkeep-test abc e1-1-0\n"));
        let (c3, removed) = remove_blocks_from(&c2, &|t| t.starts_with("pgkeep-test abc "));
        assert_eq!(removed.len(), 2);
        assert_eq!(c3, format!("{BASE}\n"));
    }

    #[test]
    fn used_networks_include_foreign_lines() {
        let c = "127.77.1.5 other\n127.0.0.1 localhost\n";
        let (_, net) = add_block_with_net(c, "pgkeep-test x y").unwrap();
        assert_eq!(net, (77, 2));
    }

    #[test]
    fn torn_block_is_removed_without_eating_foreign_lines() {
        let c = "a\n# BEGIN pgkeep-test x y\n# net 127.77.1.0/24\n127.77.1.1 n.y.pgkeep.test\n10.0.0.1 keep\n";
        let (out, removed) = remove_blocks_from(c, &|_| true);
        assert_eq!(removed, ["pgkeep-test x y"]);
        assert_eq!(out, "a\n10.0.0.1 keep\n");
    }
}
