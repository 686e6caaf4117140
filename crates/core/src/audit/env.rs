//! Checks of what surrounds the nodes: the dynamic configuration in the DCS, etcd, HAProxy's
//! configuration and the backup repository.

use std::collections::BTreeSet;

use super::{Check, Facts, Group, Severity, Verdict, fail, manual, not_applicable, pass, warn};
use crate::policy::{self, Admission, GucName, LocalOnlyReason};

fn dcs_config(f: &Facts) -> Result<&serde_json::Value, Verdict> {
    f.dcs_config
        .as_ref()
        .ok_or_else(|| manual("the dynamic configuration was not read"))
}

/// Parameters in the DCS that run commands, load code or name files: the remote-code-execution
/// class. pgkeep ignores them, but their presence means someone tried (or a Patroni-era
/// configuration still carries them).
fn dcs_parameters(f: &Facts) -> Verdict {
    let cfg = match dcs_config(f) {
        Ok(c) => c,
        Err(v) => return v,
    };
    let Some(params) = cfg
        .get("postgresql")
        .and_then(|p| p.get("parameters"))
        .and_then(serde_json::Value::as_object)
    else {
        return pass("the dynamic configuration sets no PostgreSQL parameter");
    };
    let mut dangerous = Vec::new();
    let mut ignored = Vec::new();
    for name in params.keys() {
        let Ok(guc) = GucName::parse(name) else {
            dangerous.push(format!("{name:?} (not a parameter name)"));
            continue;
        };
        match policy::admission(&guc, &BTreeSet::new()) {
            Admission::Dynamic => {}
            Admission::LocalOnly(
                r @ (LocalOnlyReason::RunsCommand
                | LocalOnlyReason::LoadsCode
                | LocalOnlyReason::NamesPath),
            ) => dangerous.push(format!("{name} ({r})")),
            Admission::LocalOnly(r) => ignored.push(format!("{name} ({r})")),
        }
    }
    if !dangerous.is_empty() {
        fail(format!(
            "the DCS holds local-only parameters (pgkeep ignores them): {}",
            dangerous.join(", ")
        ))
    } else if !ignored.is_empty() {
        warn(format!(
            "parameters pgkeep ignores from the DCS: {}",
            ignored.join(", ")
        ))
    } else {
        pass(format!("{} dynamic parameters, all allowed", params.len()))
    }
}

/// Patroni's `postgresql` keys that run commands or name files (callbacks, recovery_conf,
/// replica methods, pg_hba, ...).
fn dcs_postgresql_keys(f: &Facts) -> Verdict {
    let cfg = match dcs_config(f) {
        Ok(c) => c,
        Err(v) => return v,
    };
    let found: Vec<&str> = cfg
        .get("postgresql")
        .and_then(serde_json::Value::as_object)
        .map(|o| {
            o.keys()
                .map(String::as_str)
                .filter(|k| crate::dynamic::LOCAL_ONLY_POSTGRESQL_KEYS.contains(k))
                .collect()
        })
        .unwrap_or_default();
    if found.is_empty() {
        pass("no local-only postgresql key in the dynamic configuration")
    } else {
        fail(format!(
            "local-only keys in the DCS (pgkeep ignores them): postgresql.{}",
            found.join(", postgresql.")
        ))
    }
}

fn etcd_members(f: &Facts) -> Verdict {
    match &f.etcd {
        None => manual("etcd was not examined"),
        Some(e) if e.members >= 3 && e.members % 2 == 1 => pass(format!("{} members", e.members)),
        Some(e) => fail(format!(
            "{} members: an etcd cluster needs an odd number, at least 3, to survive a failure",
            e.members
        )),
    }
}

fn etcd_healthy(f: &Facts) -> Verdict {
    match &f.etcd {
        None => manual("etcd was not examined"),
        Some(e) if e.healthy == e.members => {
            pass(format!("{} of {} healthy", e.healthy, e.members))
        }
        Some(e) => fail(format!("{} of {} members healthy", e.healthy, e.members)),
    }
}

fn etcd_auth(f: &Facts) -> Verdict {
    match f.etcd.as_ref().map(|e| e.auth_enabled) {
        None | Some(None) => manual("etcd's authentication state was not read"),
        Some(Some(true)) => pass("authentication and roles are enabled"),
        Some(Some(false)) => fail(
            "authentication is off: any client certificate of the CA reads and writes every key",
        ),
    }
}

fn etcd_tls(f: &Facts) -> Verdict {
    match &f.etcd {
        None => manual("etcd was not examined"),
        Some(e) if e.tls => pass("every client endpoint is https"),
        Some(_) => fail("an etcd client endpoint is plaintext http"),
    }
}

/// The `server` lines of the backends that have health checks.
fn haproxy_servers(cfg: &str) -> Vec<&str> {
    cfg.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server ") && l.split_whitespace().any(|w| w == "check"))
        .collect()
}

fn haproxy(f: &Facts) -> Result<Vec<&str>, Verdict> {
    let cfg = f
        .haproxy_cfg
        .as_deref()
        .ok_or_else(|| not_applicable("no HAProxy configuration was given"))?;
    let servers = haproxy_servers(cfg);
    if servers.is_empty() {
        return Err(manual(
            "no server with health checks in the HAProxy configuration",
        ));
    }
    Ok(servers)
}

fn haproxy_verify(f: &Facts) -> Verdict {
    let servers = match haproxy(f) {
        Ok(s) => s,
        Err(v) => return v,
    };
    let cfg = f.haproxy_cfg.as_deref().unwrap_or_default();
    let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let bad: Vec<&str> = servers
        .iter()
        .copied()
        .filter(|l| {
            let w = words(l);
            let verify = w
                .iter()
                .position(|x| x == "verify")
                .and_then(|i| w.get(i + 1));
            // A `default-server` line may carry the settings instead.
            let defaults = cfg.lines().any(|d| {
                d.trim().starts_with("default-server")
                    && d.contains("check-ssl")
                    && d.contains("verify required")
            });
            let verified = w.iter().any(|x| x == "check-ssl")
                && verify.map(String::as_str) == Some("required");
            !(verified || defaults)
        })
        .collect();
    if cfg.contains("verify none") {
        return fail("`verify none`: a forged health answer could steer writes to any host");
    }
    if bad.is_empty() {
        pass(format!(
            "{} checked servers: check-ssl verify required",
            servers.len()
        ))
    } else {
        fail(format!(
            "health checks without verified TLS: {}",
            bad.join(" | ")
        ))
    }
}

fn haproxy_ca(f: &Facts) -> Verdict {
    let servers = match haproxy(f) {
        Ok(s) => s,
        Err(v) => return v,
    };
    let cfg = f.haproxy_cfg.as_deref().unwrap_or_default();
    let default_ca = cfg
        .lines()
        .any(|d| d.trim().starts_with("default-server") && d.contains("ca-file"));
    let bad: Vec<&str> = servers
        .iter()
        .copied()
        .filter(|l| !l.contains("ca-file") && !default_ca)
        .collect();
    if bad.is_empty() {
        pass("every checked server names the CA it verifies against")
    } else {
        fail(format!("no ca-file: {}", bad.join(" | ")))
    }
}

fn haproxy_shutdown_sessions(f: &Facts) -> Verdict {
    let servers = match haproxy(f) {
        Ok(s) => s,
        Err(v) => return v,
    };
    let cfg = f.haproxy_cfg.as_deref().unwrap_or_default();
    if cfg.contains("on-marked-down shutdown-sessions") {
        pass(format!(
            "{} servers; sessions end when a server is marked down",
            servers.len()
        ))
    } else {
        fail("sessions to a demoted primary stay open (no on-marked-down shutdown-sessions)")
    }
}

fn backup(f: &Facts) -> Result<&super::BackupFacts, Verdict> {
    f.backup
        .as_ref()
        .ok_or_else(|| manual("the backup repository was not examined"))
}

fn backup_stanza(f: &Facts) -> Verdict {
    match backup(f) {
        Ok(b) if b.stanza => pass("the stanza exists"),
        Ok(_) => fail("no stanza: nothing is archived"),
        Err(v) => v,
    }
}

fn backup_cipher(f: &Facts) -> Verdict {
    match backup(f) {
        Ok(b) if b.cipher == "aes-256-cbc" => pass("repo1-cipher-type = aes-256-cbc"),
        Ok(b) => fail(format!(
            "repository cipher {:?}: backups are readable on disk",
            b.cipher
        )),
        Err(v) => v,
    }
}

/// A full week and a day: weekly full backups with daily differentials pass.
const BACKUP_MAX_AGE_SECONDS: i64 = 8 * 86_400;

fn backup_age(f: &Facts) -> Verdict {
    match backup(f) {
        Ok(b) => match b.newest_backup_age_seconds {
            None => fail("no backup"),
            Some(s) if s <= BACKUP_MAX_AGE_SECONDS => {
                pass(format!("newest backup {} hours old", s / 3600))
            }
            Some(s) => fail(format!("newest backup {} days old", s / 86_400)),
        },
        Err(v) => v,
    }
}

fn backup_tls_auth(f: &Facts) -> Verdict {
    match backup(f) {
        Ok(b) if b.tls_server_auth.is_empty() => {
            fail("the repository server admits no named client (or is not a TLS server)")
        }
        Ok(b) => {
            let open: Vec<&String> = b
                .tls_server_auth
                .iter()
                .filter(|a| a.split('=').any(|p| p.trim() == "*"))
                .collect();
            if open.is_empty() {
                pass(format!("tls-server-auth: {}", b.tls_server_auth.join(", ")))
            } else {
                fail(format!(
                    "tls-server-auth admits any certificate or stanza: {open:?}"
                ))
            }
        }
        Err(v) => v,
    }
}

pub(super) fn checks() -> Vec<Check> {
    use Group::*;
    use Severity::*;
    let c = super::env_check;
    vec![
        c(
            "DCS-01",
            Dcs,
            "No command, library or path parameter in the DCS",
            Critical,
            "remove them with pgkeep ctl edit-config; set them in each node's local file",
            &["Patroni #1734", "guide: archive_command"],
            dcs_parameters,
        ),
        c(
            "DCS-02",
            Dcs,
            "No local-only postgresql key in the DCS",
            Critical,
            "remove callbacks, recovery_conf, pg_hba, ... from the dynamic configuration",
            &["Patroni #1734"],
            dcs_postgresql_keys,
        ),
        c(
            "ETCD-01",
            Etcd,
            "An odd number of etcd members, at least 3",
            High,
            "run 3 or 5 members",
            &["etcd docs: FAQ"],
            etcd_members,
        ),
        c(
            "ETCD-02",
            Etcd,
            "Every etcd member healthy",
            High,
            "bring the member back or replace it (etcdctl member)",
            &["etcd docs: runtime reconfiguration"],
            etcd_healthy,
        ),
        c(
            "ETCD-03",
            Etcd,
            "etcd authentication and roles on",
            High,
            "pgkeep up enables them; pgkeep render etcd documents it",
            &["guide: etcd"],
            etcd_auth,
        ),
        c(
            "ETCD-04",
            Etcd,
            "etcd clients use TLS",
            Critical,
            "https client URLs with client certificates",
            &["guide: etcd TLS"],
            etcd_tls,
        ),
        c(
            "HAP-01",
            Haproxy,
            "Health checks verify the node's certificate",
            High,
            "check-ssl verify required ca-file <CA> on every server",
            &["guide: HAProxy"],
            haproxy_verify,
        ),
        c(
            "HAP-02",
            Haproxy,
            "Health checks name the CA",
            High,
            "ca-file <cluster CA> on every checked server",
            &["guide: HAProxy"],
            haproxy_ca,
        ),
        c(
            "HAP-03",
            Haproxy,
            "Sessions end when a server goes down",
            Medium,
            "on-marked-down shutdown-sessions",
            &["Patroni docs: HAProxy"],
            haproxy_shutdown_sessions,
        ),
        c(
            "BK-01",
            Backup,
            "The stanza exists",
            High,
            "pgbackrest stanza-create (pgkeep up does it)",
            &["CIS 8.2", "guide: pgBackRest"],
            backup_stanza,
        ),
        c(
            "BK-02",
            Backup,
            "The repository is encrypted",
            High,
            "repo1-cipher-type = aes-256-cbc with a passphrase in a 0600 file",
            &["guide: pgBackRest"],
            backup_cipher,
        ),
        c(
            "BK-03",
            Backup,
            "A backup within the last 8 days",
            Medium,
            "pgkeep backup run, and the backup scheduler",
            &["CIS 8.2"],
            backup_age,
        ),
        c(
            "BK-04",
            Backup,
            "The repository admits named clients only",
            High,
            "tls-server-auth=<client CN>=<stanza>, never *",
            &["guide: pgBackRest TLS"],
            backup_tls_auth,
        ),
    ]
}
