//! Names in a bed (namespaces, switch ports, DNS), and the sweep of beds whose test process died.
//!
//! Every namespace of a bed is called `pgkt-<checkout-id>.<env-id>.b<n>.<role>`, where `<role>`
//! is a host name or `sw` (the switch). The env id ties the namespace to its [`crate::Env`], so
//! the sweep decides whether a bed is abandoned exactly as it decides it for the environment
//! itself (the env id carries the pid; the environment's owner file, while it exists, carries the
//! start time). Env ids and host names are `[a-z0-9-]`, so the dots split a name unambiguously.
//! Namespace names are files (`/run/netns/<name>`), not interfaces, so IFNAMSIZ does not apply
//! to them; it applies to the interface names, which are short and live only inside the bed's
//! own namespaces (`eth0` in each host, `br0` and one port per host in the switch).

use std::collections::BTreeSet;

use anyhow::{Result, bail};

use super::sys;
use crate::paths;

/// First characters of every bed namespace name, before the checkout id.
const NS_PREFIX: &str = "pgkt-";

/// Role of the switch namespace (so no host may be called this).
pub(super) const SWITCH_ROLE: &str = "sw";

/// Longest host name accepted (a DNS label, kept short like [`crate::Env::add_node`]'s names).
const MAX_HOST_NAME: usize = 20;

/// `pgkt-<checkout-id>.`: the prefix of this checkout's bed namespaces.
pub(super) fn checkout_prefix() -> String {
    format!("{NS_PREFIX}{}.", paths::checkout_id())
}

/// `pgkt-<checkout-id>.<env-id>.b<n>`: the common part of one bed's namespace names.
pub(super) fn bed_prefix(env_id: &str, n: u32) -> String {
    format!("{}{env_id}.b{n}", checkout_prefix())
}

/// The namespace of `role` (a host name or [`SWITCH_ROLE`]) in the bed `bed_prefix`.
pub(super) fn ns_name(bed_prefix: &str, role: &str) -> String {
    format!("{bed_prefix}.{role}")
}

/// The switch-side interface of host number `index` (0-based) called `host`: `p<index+1>-<host>`
/// cut to IFNAMSIZ - 1 = 15 characters (the index keeps it unique).
pub(super) fn switch_port(index: usize, host: &str) -> String {
    let mut s = format!("p{}-{host}", index + 1);
    s.truncate(15);
    s.trim_end_matches('-').to_string()
}

/// The env id in one of this checkout's bed namespace names; `None` for any other name.
pub(super) fn env_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(&checkout_prefix())?;
    let mut parts = rest.split('.');
    let (env, bed, role) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !env.is_empty()
        && !role.is_empty()
        && bed
            .strip_prefix('b')
            .is_some_and(|n| n.parse::<u32>().is_ok());
    well_formed.then_some(env)
}

/// Checks the host names of a new bed: 1-253 distinct DNS labels of at most 20 characters of
/// `[a-z0-9-]`, none called `sw`.
pub(super) fn check_hosts(hosts: &[&str]) -> Result<()> {
    if hosts.is_empty() || hosts.len() > 253 {
        bail!("a bed has 1 to 253 hosts, not {}", hosts.len());
    }
    let mut seen = BTreeSet::new();
    for h in hosts {
        let label_ok = !h.is_empty()
            && h.len() <= MAX_HOST_NAME
            && h.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !h.starts_with('-')
            && !h.ends_with('-');
        if !label_ok {
            bail!(
                "host name {h:?} must be 1-{MAX_HOST_NAME} characters of [a-z0-9-], not starting or ending with '-'"
            );
        }
        if *h == SWITCH_ROLE {
            bail!("host name {SWITCH_ROLE:?} is reserved for the bed's switch");
        }
        if !seen.insert(*h) {
            bail!("host {h} listed twice");
        }
    }
    Ok(())
}

/// What [`sweep`] removed and what failed.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    /// Namespace names whose namespace or `/etc/netns` directory (or both) were removed.
    pub(crate) removed: Vec<String>,
    /// Failures (the sweep carries on past them).
    pub(crate) errors: Vec<String>,
}

/// Removes the namespaces (`/run/netns/<name>`) and `/etc/netns/<name>` directories of this
/// checkout's beds whose environment `env_alive` reports dead. Deleting a namespace removes its
/// interfaces (the veth pairs and the bridge); processes still in it keep it alive anonymously,
/// which is why the sweep kills the dead environments' cgroups first.
pub(crate) fn sweep(env_alive: &dyn Fn(&str) -> bool) -> Swept {
    let mut removed = BTreeSet::new();
    let mut errors = Vec::new();
    for name in sys::list_dir(sys::NETNS_RUN_DIR) {
        if env_of(&name).is_some_and(|env| !env_alive(env)) {
            match sys::delete_ns(&name) {
                Ok(()) => {
                    removed.insert(name);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    for name in sys::list_dir(sys::ETC_NETNS_DIR) {
        if env_of(&name).is_some_and(|env| !env_alive(env)) {
            match sys::remove_etc_dir(&name) {
                Ok(()) => {
                    removed.insert(name);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if !removed.is_empty() {
        sys::remove_etc_netns_if_empty();
    }
    Swept {
        removed: removed.into_iter().collect(),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_to_the_env_id() {
        let bed = bed_prefix("netbed-reach-1234-0", 3);
        let ns = ns_name(&bed, "pg-1");
        assert_eq!(env_of(&ns), Some("netbed-reach-1234-0"));
        assert_eq!(
            env_of(&ns_name(&bed, SWITCH_ROLE)),
            Some("netbed-reach-1234-0")
        );
        // Other checkouts, other tools, malformed names: not ours.
        assert_eq!(env_of("pgkt-zzzzzzzz.x-1-0.b0.a"), None);
        assert_eq!(env_of("blue"), None);
        assert_eq!(env_of(&format!("{}e-1-0.bx.a", checkout_prefix())), None);
        assert_eq!(env_of(&format!("{}e-1-0.b0", checkout_prefix())), None);
        assert_eq!(env_of(&format!("{}e-1-0.b0.a.b", checkout_prefix())), None);
    }

    #[test]
    fn switch_ports_fit_ifnamsiz_and_stay_unique() {
        assert_eq!(switch_port(0, "a"), "p1-a");
        let long = switch_port(252, "abcdefghijklmnopqrst");
        assert_eq!(long, "p253-abcdefghij");
        assert!(long.len() <= 15);
        assert_eq!(switch_port(9, "abcdefghij-klm"), "p10-abcdefghij");
    }

    #[test]
    fn host_names_are_checked() {
        assert!(check_hosts(&["a", "b-2", "pg1"]).is_ok());
        assert!(check_hosts(&[]).is_err());
        assert!(check_hosts(&["a", "a"]).is_err());
        assert!(check_hosts(&["sw"]).is_err());
        assert!(check_hosts(&["A"]).is_err());
        assert!(check_hosts(&["a.b"]).is_err());
        assert!(check_hosts(&["-a"]).is_err());
        assert!(check_hosts(&["abcdefghijklmnopqrstu"]).is_err());
    }
}
