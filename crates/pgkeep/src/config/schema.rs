//! The shape of the configuration file, used to tell a typo from a Patroni option pgkeep does not
//! implement before the typed parse runs. Both are errors; the messages differ so the operator
//! knows whether to fix a spelling or to drop a feature.

use serde_json::Value;

/// What a key holds.
pub(super) enum Node {
    /// A scalar or list; its type is checked by the typed parse.
    Leaf,
    /// A map whose keys are free (parameters, tags, dynamic configuration).
    Free,
    /// A section with known keys.
    Section(&'static [Entry]),
}

/// One key of a section.
pub(super) struct Entry {
    pub(super) key: &'static str,
    pub(super) node: Node,
}

const fn leaf(key: &'static str) -> Entry {
    Entry {
        key,
        node: Node::Leaf,
    }
}
const fn free(key: &'static str) -> Entry {
    Entry {
        key,
        node: Node::Free,
    }
}
const fn section(key: &'static str, entries: &'static [Entry]) -> Entry {
    Entry {
        key,
        node: Node::Section(entries),
    }
}

/// libpq options of `postgresql.authentication.*` that pgkeep does not implement.
const UNIMPLEMENTED_AUTH_OPTIONS: &[&str] = &[
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "gssencmode",
    "channel_binding",
    "sslnegotiation",
];

const AUTH_USER: &[Entry] = &[
    leaf("username"),
    leaf("password"),
    leaf("password_file"),
    leaf("sslmode"),
    leaf("sslcert"),
    leaf("sslkey"),
    leaf("sslrootcert"),
];

/// The file's top level. Keys not listed anywhere are typos; keys listed in [`UNIMPLEMENTED`]
/// are Patroni options pgkeep refuses to half-support.
pub(super) const ROOT: &[Entry] = &[
    leaf("scope"),
    leaf("namespace"),
    leaf("name"),
    section(
        "restapi",
        &[
            leaf("listen"),
            leaf("connect_address"),
            leaf("certfile"),
            leaf("keyfile"),
            leaf("cafile"),
            leaf("verify_client"),
            section(
                "authentication",
                &[leaf("username"), leaf("password"), leaf("password_file")],
            ),
            leaf("allowlist"),
            leaf("allowlist_include_members"),
            leaf("allowed_client_names"),
        ],
    ),
    section(
        "ctl",
        &[
            leaf("certfile"),
            leaf("keyfile"),
            leaf("cacert"),
            section(
                "authentication",
                &[leaf("username"), leaf("password"), leaf("password_file")],
            ),
        ],
    ),
    section(
        "etcd3",
        &[
            leaf("host"),
            leaf("hosts"),
            leaf("protocol"),
            leaf("cacert"),
            leaf("cert"),
            leaf("key"),
        ],
    ),
    section(
        "bootstrap",
        &[free("dcs"), leaf("initdb"), leaf("applications")],
    ),
    section(
        "postgresql",
        &[
            leaf("listen"),
            leaf("connect_address"),
            leaf("data_dir"),
            leaf("bin_dir"),
            leaf("config_dir"),
            leaf("pgpass"),
            section(
                "authentication",
                &[
                    section("superuser", AUTH_USER),
                    section("replication", AUTH_USER),
                    section("rewind", AUTH_USER),
                ],
            ),
            free("parameters"),
            leaf("pg_hba"),
            leaf("pg_ident"),
            leaf("ldap_ca_file"),
            leaf("use_pg_rewind"),
            leaf("pg_ctl_timeout"),
            section(
                "callbacks",
                &[
                    leaf("on_start"),
                    leaf("on_stop"),
                    leaf("on_restart"),
                    leaf("on_reload"),
                    leaf("on_role_change"),
                ],
            ),
            leaf("pre_promote"),
            leaf("before_stop"),
        ],
    ),
    free("tags"),
    section(
        "watchdog",
        &[leaf("mode"), leaf("device"), leaf("safety_margin")],
    ),
    section("log", &[leaf("level"), leaf("format")]),
    section(
        "pgkeep",
        &[
            leaf("dynamic_parameter_allowlist"),
            leaf("cluster_networks"),
            leaf("callback_timeout"),
            leaf("callback_primary_role"),
            leaf("certificate_expiry_warning_days"),
            section(
                "pgbackrest",
                &[
                    leaf("config_path"),
                    leaf("stanza"),
                    leaf("replica_without_leader"),
                ],
            ),
            section(
                "insecure",
                &[
                    leaf("plaintext_restapi"),
                    leaf("plaintext_etcd"),
                    leaf("weak_pg_hba"),
                ],
            ),
        ],
    ),
];

/// Patroni options (by dotted path) that pgkeep does not implement. Several of them are
/// exactly the command-execution hooks pgkeep closes by design.
pub(super) const UNIMPLEMENTED: &[(&str, &str)] = &[
    ("etcd", "etcd v2 is not supported; use the etcd3 section"),
    ("consul", "Consul is not supported as a DCS; use etcd3"),
    (
        "zookeeper",
        "ZooKeeper is not supported as a DCS; use etcd3",
    ),
    (
        "exhibitor",
        "Exhibitor is not supported as a DCS; use etcd3",
    ),
    (
        "kubernetes",
        "Kubernetes is not supported as a DCS; use etcd3",
    ),
    (
        "raft",
        "Patroni's built-in Raft is not supported; use etcd3",
    ),
    ("citus", "Citus is not supported yet"),
    ("standby_cluster", "standby clusters are not supported yet"),
    (
        "restapi.keyfile_password",
        "encrypted REST API keys are not supported; protect the key file with mode 0600",
    ),
    (
        "restapi.ciphers",
        "cipher selection is fixed to rustls' safe defaults",
    ),
    (
        "restapi.http_extra_headers",
        "extra response headers are not implemented",
    ),
    (
        "restapi.https_extra_headers",
        "extra response headers are not implemented",
    ),
    (
        "restapi.request_queue_size",
        "not needed: the API server is asynchronous",
    ),
    (
        "restapi.thread_pool_size",
        "not needed: the API server is asynchronous",
    ),
    ("restapi.server_tokens", "pgkeep sends no server token"),
    (
        "ctl.insecure",
        "skipping certificate verification is not offered",
    ),
    ("ctl.keyfile_password", "encrypted keys are not supported"),
    ("etcd3.url", "use etcd3.hosts"),
    (
        "etcd3.proxy",
        "etcd proxies are not supported; list the members in etcd3.hosts",
    ),
    (
        "etcd3.srv",
        "DNS SRV discovery is not supported; list the members in etcd3.hosts",
    ),
    ("etcd3.srv_suffix", "DNS SRV discovery is not supported"),
    ("etcd3.use_proxies", "etcd proxies are not supported"),
    (
        "etcd3.key_password",
        "encrypted keys are not supported; protect the key file with mode 0600",
    ),
    (
        "watchdog.driver",
        "only the Linux watchdog device is supported",
    ),
    (
        "postgresql.database",
        "pgkeep connects to the postgres database",
    ),
    (
        "etcd3.username",
        "etcd password authentication is not used; pgkeep authenticates to etcd with its client certificate",
    ),
    (
        "etcd3.password",
        "etcd password authentication is not used; pgkeep authenticates to etcd with its client certificate",
    ),
    (
        "bootstrap.method",
        "custom bootstrap methods run arbitrary commands and are not supported",
    ),
    (
        "bootstrap.post_bootstrap",
        "post-bootstrap scripts are not supported",
    ),
    ("bootstrap.post_init", "post-init scripts are not supported"),
    ("bootstrap.pg_hba", "set pg_hba in the postgresql section"),
    (
        "bootstrap.users",
        "removed in Patroni 3; create roles with pgkeep's role management",
    ),
    (
        "postgresql.create_replica_methods",
        "replicas are created with pg_basebackup or pgBackRest by pgkeep",
    ),
    (
        "postgresql.custom_conf",
        "an included configuration file is not supported; use postgresql.parameters",
    ),
    (
        "postgresql.config_base_name",
        "the configuration file name is fixed",
    ),
    (
        "postgresql.recovery_conf",
        "recovery settings are managed by pgkeep",
    ),
    (
        "postgresql.basebackup",
        "pg_basebackup options are managed by pgkeep",
    ),
    (
        "postgresql.rewind",
        "pg_rewind options are managed by pgkeep",
    ),
    (
        "postgresql.remove_data_directory_on_rewind_failure",
        "pgkeep re-clones after a failed rewind by its own rule",
    ),
    (
        "postgresql.remove_data_directory_on_diverged_timelines",
        "pgkeep re-clones after diverged timelines by its own rule",
    ),
    (
        "postgresql.proxy_address",
        "connection poolers are not supported yet",
    ),
    (
        "postgresql.bin_name",
        "binary names are fixed; set postgresql.bin_dir",
    ),
    (
        "postgresql.use_unix_socket",
        "the superuser always connects over the Unix socket",
    ),
    (
        "postgresql.use_unix_socket_repl",
        "replication always uses TLS with client certificates",
    ),
    (
        "postgresql.parameters_primary",
        "role-specific parameters are not supported yet",
    ),
    (
        "postgresql.parameters_replica",
        "role-specific parameters are not supported yet",
    ),
    ("watchdog.nowayout", "not supported"),
    (
        "log.dir",
        "pgkeep logs to stderr; let the service manager store it",
    ),
    (
        "log.file_size",
        "pgkeep logs to stderr; let the service manager store it",
    ),
    (
        "log.file_num",
        "pgkeep logs to stderr; let the service manager store it",
    ),
    (
        "log.loggers",
        "per-logger levels are not supported; use log.level",
    ),
    ("log.traceback_level", "not supported"),
    ("log.dateformat", "not supported"),
    ("log.type", "use log.format (text or json)"),
];

/// A key that fails the shape check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ShapeError {
    pub(super) path: String,
    pub(super) reason: String,
}

/// Walks the parsed document and reports the first unknown or unimplemented key, in document
/// order.
pub(super) fn check(doc: &Value) -> Result<(), ShapeError> {
    let Value::Object(map) = doc else {
        return Err(ShapeError {
            path: "(top level)".into(),
            reason: "the configuration must be a YAML mapping".into(),
        });
    };
    check_section(map, ROOT, "")
}

fn check_section(
    map: &serde_json::Map<String, Value>,
    entries: &'static [Entry],
    prefix: &str,
) -> Result<(), ShapeError> {
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if prefix.starts_with("postgresql.authentication.")
            && UNIMPLEMENTED_AUTH_OPTIONS.contains(&key.as_str())
        {
            return Err(ShapeError {
                path,
                reason: "this Patroni option is not implemented by pgkeep: use sslmode, sslcert, sslkey and sslrootcert".into(),
            });
        }
        if let Some((_, why)) = UNIMPLEMENTED.iter().find(|(p, _)| *p == path) {
            return Err(ShapeError {
                path,
                reason: format!("this Patroni option is not implemented by pgkeep: {why}"),
            });
        }
        let Some(entry) = entries.iter().find(|e| e.key == key) else {
            let hint = closest(key, entries)
                .map(|k| format!(" (did you mean '{k}'?)"))
                .unwrap_or_default();
            return Err(ShapeError {
                path,
                reason: format!("unknown key{hint}"),
            });
        };
        match (&entry.node, value) {
            (Node::Section(children), Value::Object(m)) => check_section(m, children, &path)?,
            (Node::Section(_), Value::Null) => {}
            (Node::Section(_), _) => {
                return Err(ShapeError {
                    path,
                    reason: "expected a mapping".into(),
                });
            }
            (Node::Free, Value::Object(_) | Value::Null) => {}
            (Node::Free, _) => {
                return Err(ShapeError {
                    path,
                    reason: "expected a mapping".into(),
                });
            }
            (Node::Leaf, _) => {}
        }
    }
    Ok(())
}

/// The known key closest to a misspelt one, if any is close enough to be a likely typo.
fn closest(key: &str, entries: &[Entry]) -> Option<&'static str> {
    entries
        .iter()
        .map(|e| (edit_distance(key, e.key), e.key))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typo_gets_a_suggestion() {
        let e = check(&json!({"restapi": {"lisen": "x"}})).unwrap_err();
        assert_eq!(e.path, "restapi.lisen");
        assert!(e.reason.contains("did you mean 'listen'"), "{}", e.reason);
    }

    #[test]
    fn unimplemented_patroni_option_says_so() {
        let e = check(&json!({"postgresql": {"custom_conf": "/etc/x.conf"}})).unwrap_err();
        assert_eq!(e.path, "postgresql.custom_conf");
        assert!(
            e.reason.contains("not implemented by pgkeep"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn callback_names_are_checked() {
        assert!(
            check(&json!({"postgresql": {"callbacks": {"on_role_change": "/x"}, "pre_promote": "/y", "before_stop": "/z"}}))
                .is_ok()
        );
        let e = check(&json!({"postgresql": {"callbacks": {"on_promote": "/x"}}})).unwrap_err();
        assert_eq!(e.path, "postgresql.callbacks.on_promote");
        assert!(e.reason.starts_with("unknown key"), "{}", e.reason);
        let e = check(&json!({"postgresql": {"callbacks": {"on_strat": "/x"}}})).unwrap_err();
        assert!(e.reason.contains("did you mean 'on_start'"), "{}", e.reason);
    }

    #[test]
    fn free_sections_accept_any_key_and_sections_need_mappings() {
        assert!(
            check(&json!({"tags": {"anything": 1}, "postgresql": {"parameters": {"x.y": 1}}}))
                .is_ok()
        );
        let e = check(&json!({"restapi": "x"})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.reason.as_str()),
            ("restapi", "expected a mapping")
        );
    }
}
