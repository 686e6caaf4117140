//! Checks of who gets in and what they may touch on one node: pg_hba as PostgreSQL parsed it,
//! roles and verifiers, privileges, extensions, file modes, and pgkeep's own relaxations and
//! certificates.

use super::super::{Check, Group, HbaRule, NodeFacts, Severity, Verdict, fail, manual, pass, warn};

fn lines(rules: &[&HbaRule]) -> String {
    rules
        .iter()
        .map(|r| {
            format!(
                "line {} ({} {} {})",
                r.line,
                r.kind,
                r.users.join(","),
                r.method
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn hba_collected(n: &NodeFacts) -> Result<(), Verdict> {
    if n.hba.is_empty() {
        Err(manual("pg_hba_file_rules was not collected"))
    } else {
        Ok(())
    }
}

/// Fails when any rule matches `bad`, naming the lines.
fn no_rule(n: &NodeFacts, bad: fn(&HbaRule) -> bool, what: &str) -> Verdict {
    if let Err(v) = hba_collected(n) {
        return v;
    }
    let found: Vec<&HbaRule> = n.hba.iter().filter(|r| bad(r)).collect();
    if found.is_empty() {
        pass(format!("no pg_hba rule {what} ({} rules)", n.hba.len()))
    } else {
        fail(format!("{what}: {}", lines(&found)))
    }
}

fn no_trust(n: &NodeFacts) -> Verdict {
    no_rule(
        n,
        |r| matches!(r.method.as_str(), "trust" | "password"),
        "accepts trust or password",
    )
}

fn no_md5(n: &NodeFacts) -> Verdict {
    no_rule(n, |r| r.method == "md5", "uses md5")
}

fn no_plaintext(n: &NodeFacts) -> Verdict {
    no_rule(
        n,
        |r| {
            matches!(r.kind.as_str(), "host" | "hostnossl" | "hostnogssenc") && r.method != "reject"
        },
        "admits connections without TLS",
    )
}

fn no_errors(n: &NodeFacts) -> Verdict {
    no_rule(n, |r| r.error.is_some(), "has an error PostgreSQL reported")
}

fn open_to_everyone(r: &HbaRule) -> bool {
    r.kind.starts_with("host")
        && r.method != "reject"
        && (r.address.as_deref() == Some("all")
            || matches!(r.netmask.as_deref(), Some("0.0.0.0" | "::")))
}

fn no_world(n: &NodeFacts) -> Verdict {
    no_rule(n, open_to_everyone, "admits every address")
}

/// Prefix length of a netmask (`255.255.0.0` → 16).
fn prefix_len(mask: &str) -> Option<u32> {
    match mask.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(a) => Some(u32::from(a).leading_ones()),
        std::net::IpAddr::V6(a) => Some(u128::from(a).leading_ones()),
    }
}

fn narrow_ranges(n: &NodeFacts) -> Verdict {
    if let Err(v) = hba_collected(n) {
        return v;
    }
    let wide: Vec<&HbaRule> = n
        .hba
        .iter()
        .filter(|r| r.method != "reject" && !open_to_everyone(r))
        // The loopback network is this host itself.
        .filter(|r| {
            !r.address
                .as_deref()
                .is_some_and(|a| a.starts_with("127.") || a == "::1")
        })
        .filter(|r| {
            let v6 = r.address.as_deref().is_some_and(|a| a.contains(':'));
            r.netmask
                .as_deref()
                .and_then(prefix_len)
                .is_some_and(|p| p < if v6 { 48 } else { 16 })
        })
        .collect();
    if wide.is_empty() {
        pass("no address range wider than /16 (IPv6 /48)")
    } else {
        warn(format!("wide address ranges: {}", lines(&wide)))
    }
}

/// The connection types each transport can match, for first-match evaluation.
const TRANSPORTS: [(&str, &[&str]); 3] = [
    ("TLS", &["host", "hostssl", "hostnogssenc"]),
    ("no encryption", &["host", "hostnossl", "hostnogssenc"]),
    ("GSSAPI encryption", &["host", "hostgssenc", "hostnossl"]),
];

fn no_remote_superuser(n: &NodeFacts) -> Verdict {
    if let Err(v) = hba_collected(n) {
        return v;
    }
    let supers: Vec<&str> = n
        .roles
        .iter()
        .filter(|r| r.superuser && r.login)
        .map(|r| r.name.as_str())
        .collect();
    if n.roles.is_empty() {
        return manual("roles were not collected");
    }
    let mut open = Vec::new();
    for s in &supers {
        for (transport, kinds) in TRANSPORTS {
            // PostgreSQL uses the first line that matches; a superuser is matched by its name or
            // by `all`.
            let first = n.hba.iter().find(|r| {
                kinds.contains(&r.kind.as_str()) && r.users.iter().any(|u| u == s || u == "all")
            });
            if let Some(r) = first
                && r.method != "reject"
            {
                open.push(format!(
                    "{s} over {transport} by line {} ({})",
                    r.line, r.method
                ));
            }
        }
    }
    if open.is_empty() {
        pass(format!(
            "superusers {} reach the server over the network nowhere",
            supers.join(", ")
        ))
    } else {
        fail(format!(
            "superuser admitted over the network: {}",
            open.join("; ")
        ))
    }
}

fn roles_collected(n: &NodeFacts) -> Result<(), Verdict> {
    if n.roles.is_empty() {
        Err(manual("roles were not collected"))
    } else {
        Ok(())
    }
}

fn scram_verifiers(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    let weak: Vec<String> = n
        .roles
        .iter()
        .filter(|r| matches!(r.password.as_deref(), Some("md5" | "plain")))
        .map(|r| format!("{} ({})", r.name, r.password.as_deref().unwrap_or_default()))
        .collect();
    if weak.is_empty() {
        pass("every stored password is a SCRAM verifier")
    } else {
        fail(format!("weak password verifiers: {}", weak.join(", ")))
    }
}

fn one_superuser(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    let supers: Vec<&str> = n
        .roles
        .iter()
        .filter(|r| r.superuser)
        .map(|r| r.name.as_str())
        .collect();
    match supers.len() {
        1 => pass(format!("one superuser: {}", supers[0])),
        0 => fail("no superuser role found"),
        _ => fail(format!(
            "{} superusers: {}",
            supers.len(),
            supers.join(", ")
        )),
    }
}

fn replication_role(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    let dedicated: Vec<&str> = n
        .roles
        .iter()
        .filter(|r| r.replication && r.login && !r.superuser)
        .map(|r| r.name.as_str())
        .collect();
    if dedicated.is_empty() {
        fail("no login role with REPLICATION that is not a superuser")
    } else {
        pass(format!("replication roles: {}", dedicated.join(", ")))
    }
}

fn bypass_rls(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    let found: Vec<&str> = n
        .roles
        .iter()
        .filter(|r| r.bypass_rls && !r.superuser)
        .map(|r| r.name.as_str())
        .collect();
    if found.is_empty() {
        pass("no ordinary role bypasses row-level security")
    } else {
        warn(format!("BYPASSRLS: {}", found.join(", ")))
    }
}

fn public_create(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    if n.public_create_schemas.is_empty() {
        pass("PUBLIC may create in no schema")
    } else {
        fail(format!(
            "PUBLIC may create in: {}",
            n.public_create_schemas.join(", ")
        ))
    }
}

fn untrusted_languages(n: &NodeFacts) -> Verdict {
    if let Err(v) = roles_collected(n) {
        return v;
    }
    let found: Vec<&str> = ["plperlu", "plpython3u", "plpythonu", "plpython2u", "pltclu"]
        .into_iter()
        .filter(|l| n.extensions.contains_key(*l))
        .collect();
    if found.is_empty() {
        pass("no untrusted procedural language installed")
    } else {
        fail(format!(
            "untrusted languages (run code as the server's OS user): {}",
            found.join(", ")
        ))
    }
}

/// Fails for every collected file of `kind` whose mode has any of `forbidden`.
fn modes(n: &NodeFacts, kind: &str, forbidden: u32, need: &str) -> Verdict {
    let files: Vec<_> = n.files.iter().filter(|f| f.kind == kind).collect();
    if files.is_empty() {
        return manual(format!("no {kind} file was examined"));
    }
    let bad: Vec<String> = files
        .iter()
        .filter(|f| f.mode & forbidden != 0)
        .map(|f| format!("{} {:04o} {}", f.path, f.mode & 0o7777, f.owner))
        .collect();
    if bad.is_empty() {
        pass(format!("{} {kind} file(s) {need}", files.len()))
    } else {
        fail(format!("not {need}: {}", bad.join(", ")))
    }
}

fn data_dir_mode(n: &NodeFacts) -> Verdict {
    modes(n, "data_directory", 0o077, "0700")
}

fn private_key_modes(n: &NodeFacts) -> Verdict {
    modes(n, "private_key", 0o077, "readable by their owner only")
}

fn config_modes(n: &NodeFacts) -> Verdict {
    modes(n, "config", 0o007, "hidden from other users")
}

fn log_dir_mode(n: &NodeFacts) -> Verdict {
    match modes(n, "log_directory", 0o007, "hidden from other users") {
        (super::super::Status::Manual, _) => {
            modes(n, "server_log", 0o077, "readable by their owner only")
        }
        v => v,
    }
}

fn no_ca_key(n: &NodeFacts) -> Verdict {
    if n.files.is_empty() {
        return manual("no file was examined");
    }
    match n.files.iter().find(|f| f.kind == "ca_key") {
        Some(f) => fail(format!("the CA private key is on this node: {}", f.path)),
        None => pass("no CA private key on this node"),
    }
}

fn no_insecure(n: &NodeFacts) -> Verdict {
    match &n.insecure {
        None => manual("the agent's relaxations were not collected"),
        Some(v) if v.is_empty() => pass("no insecure: relaxation in force"),
        Some(v) => fail(format!("in force: {}", v.join(", "))),
    }
}

/// Certificates closer to expiry than this warn.
const EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;

fn cert_expiry(n: &NodeFacts) -> Verdict {
    if n.cert_seconds_left.is_empty() {
        return manual("the node's certificates were not examined");
    }
    let expired: Vec<&str> = n
        .cert_seconds_left
        .iter()
        .filter(|(_, s)| **s < 0)
        .map(|(c, _)| c.as_str())
        .collect();
    let soon: Vec<String> = n
        .cert_seconds_left
        .iter()
        .filter(|(_, s)| (0..EXPIRY_WARNING_SECONDS).contains(*s))
        .map(|(c, s)| format!("{c} in {} days", s / 86_400))
        .collect();
    if !expired.is_empty() {
        fail(format!("expired: {}", expired.join(", ")))
    } else if !soon.is_empty() {
        warn(format!("expiring: {}", soon.join(", ")))
    } else {
        let min = n.cert_seconds_left.values().min().copied().unwrap_or(0);
        pass(format!(
            "{} certificates, the first expires in {} days",
            n.cert_seconds_left.len(),
            min / 86_400
        ))
    }
}

pub(super) fn checks() -> Vec<Check> {
    use Group::*;
    use Severity::*;
    let c = super::super::node_check;
    vec![
        c(
            "PG-AUTH-02",
            Authentication,
            "No trust or password authentication",
            Critical,
            "remove trust/password lines; pgkeep refuses them unless insecure.weak_pg_hba",
            &["CIS 5.4"],
            no_trust,
        ),
        c(
            "PG-AUTH-03",
            Authentication,
            "No md5 authentication",
            High,
            "use scram-sha-256 (and reset the role's password)",
            &["CIS 5.4", "guide: scram-sha-256"],
            no_md5,
        ),
        c(
            "PG-AUTH-04",
            Authentication,
            "TCP connections need TLS",
            High,
            "hostssl lines only; end the file's TCP part with hostnossl all all all reject",
            &["CIS 5.8"],
            no_plaintext,
        ),
        c(
            "PG-AUTH-05",
            Authentication,
            "pg_hba has no errors",
            Medium,
            "fix the lines pg_hba_file_rules reports",
            &["PostgreSQL docs: pg_hba_file_rules"],
            no_errors,
        ),
        c(
            "PG-AUTH-06",
            Authentication,
            "No rule for every address",
            Medium,
            "name the clients' networks instead of all / 0.0.0.0/0",
            &["CIS 5.9"],
            no_world,
        ),
        c(
            "PG-AUTH-07",
            Authentication,
            "No address range wider than /16",
            Low,
            "narrow the networks in pg_hba",
            &["CIS 5.9"],
            narrow_ranges,
        ),
        c(
            "PG-AUTH-08",
            Authentication,
            "No superuser over the network",
            Critical,
            "a reject line for the superuser before any line that would match it",
            &["CIS 5.11", "guide: pg_hba"],
            no_remote_superuser,
        ),
        c(
            "PG-AUTH-09",
            Authentication,
            "Every stored password is SCRAM",
            High,
            "set each listed role's password again with password_encryption = scram-sha-256",
            &["CIS 5.12"],
            scram_verifiers,
        ),
        c(
            "PG-ROLE-01",
            Roles,
            "Exactly one superuser",
            Medium,
            "ALTER ROLE ... NOSUPERUSER for every other role",
            &["CIS 4.3"],
            one_superuser,
        ),
        c(
            "PG-ROLE-02",
            Roles,
            "A dedicated replication role",
            Medium,
            "a LOGIN REPLICATION role that is not a superuser (pgkeep creates one)",
            &["CIS 7.1"],
            replication_role,
        ),
        c(
            "PG-ROLE-03",
            Roles,
            "Row-level security not bypassed",
            Low,
            "ALTER ROLE ... NOBYPASSRLS",
            &["CIS 4.7"],
            bypass_rls,
        ),
        c(
            "PG-ROLE-04",
            Roles,
            "PUBLIC cannot create objects",
            Medium,
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            &["CIS 4.10", "guide: schemas"],
            public_create,
        ),
        c(
            "PG-EXT-01",
            Extensions,
            "No untrusted procedural language",
            High,
            "DROP EXTENSION plperlu / plpython3u / pltclu",
            &["DevSec postgres-04"],
            untrusted_languages,
        ),
        c(
            "FS-01",
            Files,
            "Data directory 0700",
            High,
            "chmod 700 the data directory",
            &["CIS 2.7"],
            data_dir_mode,
        ),
        c(
            "FS-02",
            Files,
            "Private keys 0600",
            Critical,
            "chmod 600 every private key",
            &["guide: certificates"],
            private_key_modes,
        ),
        c(
            "FS-03",
            Files,
            "Configuration files not readable by others",
            High,
            "chmod o-rwx the configuration files (they may hold secrets)",
            &["CIS 2.5", "Patroni #3445"],
            config_modes,
        ),
        c(
            "FS-04",
            Files,
            "No CA private key on a database node",
            High,
            "keep the CA key on the operator's host only",
            &["guide: PKI"],
            no_ca_key,
        ),
        c(
            "FS-05",
            Files,
            "Server logs not readable by others",
            Medium,
            "chmod 700 the log directory, chmod 600 the server's output file",
            &["CIS 3.1.6"],
            log_dir_mode,
        ),
        c(
            "PK-01",
            Pgkeep,
            "No insecure relaxation",
            High,
            "remove the pgkeep.insecure settings",
            &["pgkeep: security model"],
            no_insecure,
        ),
        c(
            "PK-02",
            Pgkeep,
            "Certificates valid for 30 days or more",
            Medium,
            "pgkeep pki rotate",
            &["guide: certificates"],
            cert_expiry,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_prefix_lengths() {
        assert_eq!(prefix_len("255.255.0.0"), Some(16));
        assert_eq!(prefix_len("255.255.255.255"), Some(32));
        assert_eq!(prefix_len("0.0.0.0"), Some(0));
        assert_eq!(prefix_len("ffff:ffff:ffff::"), Some(48));
        assert_eq!(prefix_len("x"), None);
    }
}
