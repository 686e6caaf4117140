//! PostgreSQL's configuration as data: the hardened baseline, the settings pgkeep controls,
//! `pg_hba.conf`, and the SQL that creates pgkeep's roles. Rendering only; the agent writes
//! the files.
//!
//! Layers, later winning (see [`crate::policy::merge`]): [`baseline`] < dynamic configuration
//! (filtered by the policy) < the node's local parameters < [`managed`]. The baseline is what
//! the guide asks for; the managed layer is what pgkeep must control for the cluster to work
//! and stay safe (addresses, files, TLS material), so nothing can override it.

use std::net::IpAddr;

use crate::policy::{GucName, GucValue, Parameters};

fn set(p: &mut Parameters, name: &str, value: &str) {
    // Names and values here are constants or checked inputs; a failure is a programming error
    // caught by the tests below.
    let n = GucName::parse(name).unwrap_or_else(|e| panic!("baseline name {name}: {e}"));
    let v = GucValue::new(&n, value.to_owned())
        .unwrap_or_else(|e| panic!("baseline value {name}: {e}"));
    p.insert(n, v);
}

/// The hardened baseline every node starts from.
pub fn baseline() -> Parameters {
    let mut p = Parameters::new();
    for (n, v) in [
        ("ssl", "on"),
        ("ssl_min_protocol_version", "TLSv1.2"),
        // PostgreSQL's default adds MEDIUM and 3DES (Sweet32) for TLS 1.2 clients.
        ("ssl_ciphers", "HIGH:!aNULL:!MD5:!3DES"),
        ("password_encryption", "scram-sha-256"),
        ("shared_preload_libraries", "pgaudit"),
        ("pgaudit.log", "ddl,role"),
        // Statement parameters can carry secrets; keep them out of the audit log.
        ("pgaudit.log_parameter", "off"),
        ("pgaudit.log_catalog", "off"),
        ("log_connections", "on"),
        ("log_disconnections", "on"),
        ("log_line_prefix", "%m [%p] %q%u@%d from %h app=%a "),
        ("log_destination", "stderr"),
        ("logging_collector", "off"),
        ("log_checkpoints", "on"),
        ("log_lock_waits", "on"),
        ("log_replication_commands", "on"),
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("wal_log_hints", "on"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        // A finite cap: a lost replica's slot cannot fill the primary's disk.
        ("max_slot_wal_keep_size", "4GB"),
        ("wal_keep_size", "128MB"),
        ("hot_standby_feedback", "on"),
        ("wal_sender_timeout", "10s"),
        ("wal_receiver_timeout", "10s"),
        ("wal_receiver_status_interval", "1s"),
        ("wal_retrieve_retry_interval", "1s"),
        ("listen_addresses", "localhost"),
    ] {
        set(&mut p, n, v);
    }
    p
}

/// Where a node's PostgreSQL listens and finds its files. Everything here lives outside the data
/// directory, so a clone or rewind never carries another node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// The address PostgreSQL listens on.
    pub listen_address: IpAddr,
    /// The port (pgkeep never uses 5432 by default).
    pub port: u16,
    /// Directory of the Unix socket (short path: PostgreSQL refuses over 107 bytes).
    pub socket_dir: String,
    /// Server certificate.
    pub ssl_cert_file: String,
    /// Server key (0600, owned by postgres).
    pub ssl_key_file: String,
    /// CA that client certificates (replication, rewind) must chain to.
    pub ssl_ca_file: String,
    /// Rendered pg_hba.conf.
    pub hba_file: String,
    /// Rendered pg_ident.conf.
    pub ident_file: String,
    /// The member name, written as `cluster_name` so it shows in `ps` and logs.
    pub member_name: String,
}

/// The settings pgkeep controls; applied last.
pub fn managed(layout: &NodeLayout) -> Parameters {
    let mut p = Parameters::new();
    let port = layout.port.to_string();
    let addr = layout.listen_address.to_string();
    for (n, v) in [
        ("listen_addresses", addr.as_str()),
        ("port", port.as_str()),
        ("unix_socket_directories", layout.socket_dir.as_str()),
        ("unix_socket_permissions", "0700"),
        ("ssl_cert_file", layout.ssl_cert_file.as_str()),
        ("ssl_key_file", layout.ssl_key_file.as_str()),
        ("ssl_ca_file", layout.ssl_ca_file.as_str()),
        ("hba_file", layout.hba_file.as_str()),
        ("ident_file", layout.ident_file.as_str()),
        ("cluster_name", layout.member_name.as_str()),
    ] {
        set(&mut p, n, v);
    }
    p
}

/// The roles pgkeep's pg_hba and role SQL refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRoles {
    /// Local superuser (peer over the Unix socket only).
    pub superuser: String,
    /// Replication role (TLS client certificate, CN = role).
    pub replication: String,
    /// pg_rewind role (TLS client certificate, CN = role).
    pub rewind: String,
}

/// Renders pg_hba.conf: peer for the local superuser, certificates for replication and rewind,
/// scram-sha-256 over TLS for everyone else from `networks`, and an explicit reject for any
/// connection without TLS. `extra` lines (already checked by the configuration loader) follow
/// pgkeep's own lines and precede the final rejects; extra `hostgssenc` lines come first, after
/// a reject of the superuser over GSSAPI encryption, since a GSS-encrypted connection is not SSL
/// and the plaintext reject would refuse it before any of them.
pub fn render_hba(roles: &HbaRoles, networks: &[String], extra: &[String]) -> String {
    let mut out = String::from(
        "# pg_hba.conf rendered by pgkeep; edits are overwritten. Add lines with postgresql.pg_hba.\n",
    );
    out.push_str("# TYPE    DATABASE     USER  ADDRESS  METHOD\n");
    let is_gss = |l: &&String| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case("hostgssenc"))
    };
    let (gss, extra): (Vec<&String>, Vec<&String>) = extra.iter().partition(is_gss);
    if !gss.is_empty() {
        out.push_str(&format!(
            "hostgssenc all,replication {}  all  reject\n",
            roles.superuser
        ));
        for line in gss {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out.push_str("hostnossl all          all   all      reject\n");
    // `all` does not match a replication connection: both are named, from every address, ahead
    // of any extra line (no superuser over the network, not even for a base backup).
    out.push_str(&format!(
        "hostssl   all,replication  {}  all  reject\n",
        roles.superuser
    ));
    out.push_str(&format!(
        "local     all          {}    peer\n",
        roles.superuser
    ));
    out.push_str(&format!(
        "local     replication  {}    peer\n",
        roles.superuser
    ));
    out.push_str("local     all          all   scram-sha-256\n");
    for net in networks {
        out.push_str(&format!(
            "hostssl   all          {}  {net}  reject\n",
            roles.superuser
        ));
        out.push_str(&format!(
            "hostssl   replication  {}  {net}  cert\n",
            roles.replication
        ));
        out.push_str(&format!(
            "hostssl   postgres     {}  {net}  cert\n",
            roles.rewind
        ));
    }
    for line in extra {
        out.push_str(line.trim());
        out.push('\n');
    }
    for net in networks {
        out.push_str(&format!(
            "hostssl   all          all   {net}  scram-sha-256\n"
        ));
    }
    out
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on in PostgreSQL ≥ 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL that creates (or corrects) the replication and rewind roles. The rewind role gets exactly
/// the grants pg_rewind documents for a non-superuser; the replication role only `REPLICATION`.
/// Both log in only with their client certificate (pg_hba `cert`), so they have no password.
pub fn role_sql(roles: &HbaRoles) -> Vec<String> {
    let repl = quote_ident(&roles.replication);
    let rewind = quote_ident(&roles.rewind);
    let ensure = |name: &str, quoted: &str, attrs: &str| {
        format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN \
             CREATE ROLE {quoted} {attrs}; END IF; END$$",
            lit = quote_literal(name)
        )
    };
    vec![
        ensure(&roles.replication, &repl, "LOGIN REPLICATION"),
        format!(
            "ALTER ROLE {repl} WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD NULL"
        ),
        ensure(&roles.rewind, &rewind, "LOGIN"),
        format!(
            "ALTER ROLE {rewind} WITH LOGIN NOREPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD NULL"
        ),
        format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {rewind}"
        ),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {rewind}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {rewind}"),
        format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {rewind}"
        ),
        // Replicas checkpoint the leader before copying a logical slot's state file.
        format!("GRANT pg_checkpoint TO {rewind}"),
    ]
}

/// SQL that creates or updates a login role from a SCRAM verifier, so the plain password never
/// reaches the server or its logs. `verifier` must be a `SCRAM-SHA-256$...` string.
pub fn login_role_sql(name: &str, verifier: &str, attrs: &str) -> Option<Vec<String>> {
    if !verifier.starts_with("SCRAM-SHA-256$")
        || verifier.chars().any(|c| c.is_control() || c == '\'')
    {
        return None;
    }
    let q = quote_ident(name);
    Some(vec![
        format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN CREATE ROLE {q} LOGIN; END IF; END$$",
            quote_literal(name)
        ),
        format!(
            "ALTER ROLE {q} WITH LOGIN {attrs} PASSWORD {}",
            quote_literal(verifier)
        ),
    ])
}

/// Quotes one libpq connection-string value: single quotes, with `\` and `'` escaped.
pub fn conninfo_quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// How a standby reaches its upstream: by name (checked against the server certificate with
/// `verify-full`), authenticating with its client certificate. No password is involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's host name (as in its `conn_url`).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// This member's name (`application_name`, so the primary's walsender carries it).
    pub application_name: String,
    /// The replication role.
    pub user: String,
    /// Client certificate.
    pub sslcert: String,
    /// Client key.
    pub sslkey: String,
    /// CA.
    pub sslrootcert: String,
}

impl Upstream {
    /// The libpq connection string.
    pub fn conninfo(&self) -> String {
        [
            ("host", self.host.as_str()),
            ("port", &self.port.to_string()),
            ("user", self.user.as_str()),
            ("application_name", self.application_name.as_str()),
            ("sslmode", "verify-full"),
            ("sslcert", self.sslcert.as_str()),
            ("sslkey", self.sslkey.as_str()),
            ("sslrootcert", self.sslrootcert.as_str()),
            ("target_session_attrs", "any"),
            ("connect_timeout", "5"),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// The settings that make a node a standby of `upstream`, streaming through its own slot.
pub fn standby_settings(upstream: &Upstream, slot: Option<&str>) -> Parameters {
    let mut p = Parameters::new();
    set(&mut p, "primary_conninfo", &upstream.conninfo());
    if let Some(slot) = slot {
        set(&mut p, "primary_slot_name", slot);
    }
    set(&mut p, "recovery_target_timeline", "latest");
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{merge, render_conf};

    fn layout() -> NodeLayout {
        NodeLayout {
            listen_address: "127.0.0.5".parse().unwrap(),
            port: 15433,
            socket_dir: "/run/pgk/n1".into(),
            ssl_cert_file: "/etc/pgk/n1/server.crt".into(),
            ssl_key_file: "/etc/pgk/n1/server.key".into(),
            ssl_ca_file: "/etc/pgk/ca.crt".into(),
            hba_file: "/etc/pgk/n1/pg_hba.conf".into(),
            ident_file: "/etc/pgk/n1/pg_ident.conf".into(),
            member_name: "n1".into(),
        }
    }

    fn roles() -> HbaRoles {
        HbaRoles {
            superuser: "postgres".into(),
            replication: "replicator".into(),
            rewind: "rewind_user".into(),
        }
    }

    #[test]
    fn baseline_is_hardened() {
        let text = render_conf("", &baseline());
        for expected in [
            "ssl = 'on'",
            "ssl_min_protocol_version = 'TLSv1.2'",
            "password_encryption = 'scram-sha-256'",
            "shared_preload_libraries = 'pgaudit'",
            "pgaudit.log = 'ddl,role'",
            "pgaudit.log_parameter = 'off'",
            "log_connections = 'on'",
            "max_slot_wal_keep_size = '4GB'",
        ] {
            assert!(text.contains(expected), "missing {expected}");
        }
    }

    #[test]
    fn managed_settings_win_over_every_other_layer() {
        let mut local = Parameters::new();
        set(&mut local, "port", "5432");
        set(&mut local, "hba_file", "/tmp/evil");
        let merged = merge(&[&baseline(), &local, &managed(&layout())]);
        let text = render_conf("", &merged);
        assert!(
            text.contains("port = '15433'")
                && text.contains("hba_file = '/etc/pgk/n1/pg_hba.conf'")
        );
        assert!(text.contains("listen_addresses = '127.0.0.5'"));
    }

    #[test]
    fn hba_has_no_weak_method_and_rejects_plaintext_first() {
        let text = render_hba(
            &roles(),
            &["127.0.0.0/8".into()],
            &["hostssl app app 10.0.0.0/8 scram-sha-256".into()],
        );
        let lines: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(lines[0].starts_with("hostnossl") && lines[0].ends_with("reject"));
        for l in &lines {
            let method = l.split_whitespace().last().unwrap();
            assert!(
                matches!(method, "reject" | "peer" | "cert" | "scram-sha-256"),
                "{l}"
            );
        }
        assert!(text.contains("hostssl   replication  replicator  127.0.0.0/8  cert"));
        assert!(text.contains("hostssl   all          postgres  127.0.0.0/8  reject"));
        // Before any extra line, replication connections (which `all` does not match) included.
        assert!(lines[1].starts_with("hostssl   all,replication  postgres  all  reject"));
        let extra = lines
            .iter()
            .position(|l| l.starts_with("hostssl app"))
            .unwrap();
        let general = lines
            .iter()
            .position(|l| l.contains("all   127.0.0.0/8  scram"))
            .unwrap();
        assert!(extra < general, "extra lines come before the general rule");
    }

    #[test]
    fn gss_encrypted_lines_precede_the_plaintext_reject_but_never_admit_the_superuser() {
        let text = render_hba(
            &roles(),
            &["127.0.0.0/8".into()],
            &[
                "hostssl app app 10.0.0.0/8 scram-sha-256".into(),
                "hostgssenc all all 10.0.0.0/8 gss include_realm=0".into(),
            ],
        );
        let lines: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            lines[0].starts_with("hostgssenc all,replication postgres"),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with("reject"));
        assert_eq!(
            lines[1],
            "hostgssenc all all 10.0.0.0/8 gss include_realm=0"
        );
        assert!(lines[2].starts_with("hostnossl") && lines[2].ends_with("reject"));
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("hostgssenc")).count(),
            2
        );
        assert!(lines.contains(&"hostssl app app 10.0.0.0/8 scram-sha-256"));
    }

    #[test]
    fn role_sql_quotes_names_and_grants_exactly_the_rewind_functions() {
        let sql = role_sql(&HbaRoles {
            rewind: "re\"wind".into(),
            ..roles()
        });
        assert!(sql.iter().any(|s| s.contains("\"re\"\"wind\"")));
        assert_eq!(
            sql.iter()
                .filter(|s| s.starts_with("GRANT EXECUTE"))
                .count(),
            4
        );
        assert!(
            sql.iter()
                .all(|s| !s.contains("SUPERUSER ") || s.contains("NOSUPERUSER"))
        );
    }

    #[test]
    fn login_roles_take_only_scram_verifiers() {
        assert!(login_role_sql("app", "plaintext", "").is_none());
        assert!(login_role_sql("app", "SCRAM-SHA-256$4096:x'y", "").is_none());
        let sql = login_role_sql("app", "SCRAM-SHA-256$4096:abc$def:ghi", "NOSUPERUSER").unwrap();
        assert!(sql[1].ends_with("PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'"));
    }
    #[test]
    fn conninfo_is_quoted_and_passwordless() {
        let u = Upstream {
            host: "n1.demo.internal".into(),
            port: 25433,
            application_name: "n2".into(),
            user: "replicator".into(),
            sslcert: "/etc/pg k/it's.crt".into(),
            sslkey: "/k".into(),
            sslrootcert: "/ca".into(),
        };
        let c = u.conninfo();
        assert!(c.starts_with(
            "host='n1.demo.internal' port='25433' user='replicator' application_name='n2'"
        ));
        assert!(c.contains("sslcert='/etc/pg k/it\\'s.crt'"), "{c}");
        assert!(c.contains("sslmode='verify-full'") && !c.contains("password"));
        let text = render_conf("", &standby_settings(&u, Some("n2")));
        assert!(text.contains("primary_slot_name = 'n2'"));
        // The conninfo's own quotes are doubled inside the postgresql.conf literal.
        assert!(
            text.contains("primary_conninfo = 'host=''n1.demo.internal''"),
            "{text}"
        );
    }
}
