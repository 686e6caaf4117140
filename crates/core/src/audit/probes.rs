//! Checks of what connecting showed: every TLS listener, each REST API as an anonymous caller
//! sees it, etcd's flags, and synchronous commit overrides under synchronous mode.

use super::{Check, Facts, Group, ListenerProbe, Severity, Verdict, fail, manual, pass, warn};

fn listeners(f: &Facts) -> Result<&[ListenerProbe], Verdict> {
    if f.listeners.is_empty() {
        Err(manual("no listener was probed"))
    } else {
        Ok(&f.listeners)
    }
}

fn label(l: &ListenerProbe) -> String {
    format!("{} {} ({})", l.host, l.service, l.address)
}

fn old_tls(f: &Facts) -> Verdict {
    let ls = match listeners(f) {
        Ok(l) => l,
        Err(v) => return v,
    };
    let bad: Vec<String> = ls
        .iter()
        .filter(|l| !l.old_tls_accepted.is_empty())
        .map(|l| format!("{} accepts {}", label(l), l.old_tls_accepted.join(", ")))
        .collect();
    if bad.is_empty() {
        pass(format!("{} listeners refuse TLS 1.0 and 1.1", ls.len()))
    } else {
        fail(bad.join("; "))
    }
}

fn verified(f: &Facts) -> Verdict {
    let ls = match listeners(f) {
        Ok(l) => l,
        Err(v) => return v,
    };
    let bad: Vec<String> = ls
        .iter()
        .filter_map(|l| Some(format!("{}: {}", label(l), l.verify_error.as_ref()?)))
        .collect();
    if bad.is_empty() {
        pass(format!(
            "{} listeners present certificates of the cluster CA for their names",
            ls.len()
        ))
    } else {
        fail(bad.join("; "))
    }
}

/// Listener certificates closer to expiry than this warn.
const EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;

fn expiry(f: &Facts) -> Verdict {
    let ls = match listeners(f) {
        Ok(l) => l,
        Err(v) => return v,
    };
    let expired: Vec<String> = ls
        .iter()
        .filter(|l| l.seconds_left.is_some_and(|s| s < 0))
        .map(label)
        .collect();
    let soon: Vec<String> = ls
        .iter()
        .filter(|l| {
            l.seconds_left
                .is_some_and(|s| (0..EXPIRY_WARNING_SECONDS).contains(&s))
        })
        .map(label)
        .collect();
    if !expired.is_empty() {
        fail(format!("expired: {}", expired.join(", ")))
    } else if !soon.is_empty() {
        warn(format!("expiring within 30 days: {}", soon.join(", ")))
    } else {
        pass("every presented certificate is valid for 30 days or more")
    }
}

fn plaintext(f: &Facts) -> Verdict {
    let ls = match listeners(f) {
        Ok(l) => l,
        Err(v) => return v,
    };
    let probed: Vec<&ListenerProbe> = ls
        .iter()
        .filter(|l| l.plaintext_accepted.is_some())
        .collect();
    if probed.is_empty() {
        return manual("no listener was probed with plaintext");
    }
    let bad: Vec<String> = probed
        .iter()
        .filter(|l| l.plaintext_accepted == Some(true))
        .map(|l| label(l))
        .collect();
    if bad.is_empty() {
        pass(format!("{} HTTP listeners refuse plaintext", probed.len()))
    } else {
        fail(format!("plaintext answered: {}", bad.join(", ")))
    }
}

/// Runs `judge` on every REST probe that has the fact `has`.
fn rest<T>(
    f: &Facts,
    fact: impl Fn(&super::RestProbe) -> Option<T>,
    bad: impl Fn(&T) -> bool,
    what: &str,
) -> Verdict {
    let probed: Vec<(&str, T)> = f
        .rest
        .iter()
        .filter_map(|r| Some((r.node.as_str(), fact(r)?)))
        .collect();
    if probed.is_empty() {
        return manual("no REST API was probed");
    }
    let failing: Vec<&str> = probed
        .iter()
        .filter(|(_, t)| bad(t))
        .map(|(n, _)| *n)
        .collect();
    if failing.is_empty() {
        pass(format!("{} REST APIs: none {what}", probed.len()))
    } else {
        fail(format!("{what}: {}", failing.join(", ")))
    }
}

fn unauthenticated_restart(f: &Facts) -> Verdict {
    rest(
        f,
        |r| r.restart_status,
        |s| !matches!(s, 401 | 403),
        "accepts POST /restart without credentials",
    )
}

fn anonymous_status(f: &Facts) -> Verdict {
    rest(
        f,
        |r| r.patroni_describes_cluster,
        |d| *d,
        "describes the cluster to an anonymous GET /patroni",
    )
}

fn foreign_cert(f: &Facts) -> Verdict {
    rest(
        f,
        |r| r.foreign_cert_accepted,
        |a| *a,
        "accepts a client certificate of another CA",
    )
}

/// Every member's flags contain one that `ok` accepts.
fn etcd_flag(f: &Facts, ok: fn(&str) -> bool, what: &str) -> Verdict {
    let Some(e) = &f.etcd else {
        return manual("etcd was not examined");
    };
    if e.flags.is_empty() {
        return manual("etcd's flags were not read");
    }
    let missing = e.flags.iter().filter(|m| !m.iter().any(|x| ok(x))).count();
    if missing == 0 {
        pass(format!("{} members: {what}", e.flags.len()))
    } else {
        fail(format!(
            "{missing} of {} members without {what}",
            e.flags.len()
        ))
    }
}

fn etcd_pre_vote(f: &Facts) -> Verdict {
    etcd_flag(
        f,
        |x| x == "--pre-vote=true" || x == "--pre-vote",
        "--pre-vote",
    )
}

fn etcd_compaction(f: &Facts) -> Verdict {
    etcd_flag(
        f,
        |x| {
            x.strip_prefix("--auto-compaction-retention=")
                .is_some_and(|v| !matches!(v, "0" | "" | "0h" | "0s"))
        },
        "automatic compaction",
    )
}

fn etcd_quota(f: &Facts) -> Verdict {
    etcd_flag(
        f,
        |x| x.starts_with("--quota-backend-bytes="),
        "an explicit backend quota",
    )
}

fn sync_mode_on(f: &Facts) -> Option<bool> {
    let v = f.dcs_config.as_ref()?.get("synchronous_mode")?;
    Some(match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::String(s) => matches!(s.as_str(), "on" | "true" | "quorum"),
        _ => false,
    })
}

fn synchronous_commit(f: &Facts) -> Verdict {
    match sync_mode_on(f) {
        None if f.dcs_config.is_none() => return manual("the dynamic configuration was not read"),
        None | Some(false) => return pass("synchronous mode is off"),
        Some(true) => {}
    }
    if f.nodes.iter().all(|n| n.settings.is_empty()) {
        return manual("no node's settings were collected");
    }
    let weak: Vec<String> = f
        .nodes
        .iter()
        .flat_map(|n| n.synchronous_commit_overrides.iter())
        .filter(|o| o.ends_with("=off") || o.ends_with("=local"))
        .cloned()
        .collect();
    if weak.is_empty() {
        pass("synchronous mode is on and no role or database turns synchronous commit off")
    } else {
        fail(format!(
            "synchronous mode is on, but commits do not wait for: {}",
            weak.join(", ")
        ))
    }
}

pub(super) fn checks() -> Vec<Check> {
    use Group::*;
    use Severity::*;
    let c = super::env_check;
    vec![
        c(
            "NET-01",
            Tls,
            "No listener accepts TLS 1.0 or 1.1",
            High,
            "TLS 1.2 as the minimum on every service (ssl_min_protocol_version, --tls-min-version)",
            &["CIS 6.8", "guide: SSL"],
            old_tls,
        ),
        c(
            "NET-02",
            Tls,
            "Every listener presents a verifiable certificate for its name",
            High,
            "issue the service's certificate from the cluster CA with the host's name (pgkeep pki)",
            &["guide: certificates"],
            verified,
        ),
        c(
            "NET-03",
            Tls,
            "Presented certificates valid for 30 days or more",
            Medium,
            "pgkeep pki rotate",
            &["guide: certificates"],
            expiry,
        ),
        c(
            "NET-04",
            Tls,
            "No plaintext on the HTTP listeners",
            Critical,
            "serve the REST API and etcd over TLS only",
            &["guide: TLS everywhere"],
            plaintext,
        ),
        c(
            "REST-01",
            Pgkeep,
            "Unauthenticated state changes are refused",
            Critical,
            "basic auth or client certificates on every POST/PUT/PATCH/DELETE (no insecure override)",
            &["Patroni #1734", "guide: REST API"],
            unauthenticated_restart,
        ),
        c(
            "REST-02",
            Pgkeep,
            "Anonymous callers learn nothing about the cluster",
            Medium,
            "keep /patroni, /cluster, /config behind authentication",
            &["guide: REST API"],
            anonymous_status,
        ),
        c(
            "REST-03",
            Pgkeep,
            "A client certificate of another CA is refused",
            High,
            "restapi.cafile = the cluster CA only",
            &["guide: REST API"],
            foreign_cert,
        ),
        c(
            "ETCD-05",
            Etcd,
            "etcd pre-vote on",
            Medium,
            "--pre-vote=true (a returning member cannot disrupt the leader)",
            &["etcd docs: pre-vote"],
            etcd_pre_vote,
        ),
        c(
            "ETCD-06",
            Etcd,
            "etcd compacts its history",
            Medium,
            "--auto-compaction-mode=periodic --auto-compaction-retention=1h",
            &["etcd docs: maintenance"],
            etcd_compaction,
        ),
        c(
            "ETCD-07",
            Etcd,
            "etcd has an explicit backend quota",
            Low,
            "--quota-backend-bytes sized to the disk",
            &["etcd docs: maintenance"],
            etcd_quota,
        ),
        c(
            "PG-SYNC-01",
            Parameters,
            "Synchronous mode is not undone per role or database",
            High,
            "ALTER ROLE/DATABASE ... RESET synchronous_commit",
            &["Patroni docs: synchronous mode"],
            synchronous_commit,
        ),
    ]
}
