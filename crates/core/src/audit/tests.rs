//! Every check passes on a secure fixture and fails (or warns) on a fixture with exactly the
//! weakness it is about: no check that cannot fail.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

fn hba(
    line: u32,
    kind: &str,
    db: &str,
    user: &str,
    addr: Option<(&str, &str)>,
    method: &str,
) -> HbaRule {
    HbaRule {
        line,
        kind: kind.into(),
        databases: vec![db.into()],
        users: user.split(',').map(str::to_owned).collect(),
        address: addr.map(|(a, _)| a.into()),
        netmask: addr.map(|(_, m)| m.into()),
        method: method.into(),
        error: None,
    }
}

fn role(name: &str, superuser: bool, replication: bool, password: Option<&str>) -> Role {
    Role {
        name: name.into(),
        superuser,
        login: true,
        replication,
        bypass_rls: superuser,
        create_role: superuser,
        password: password.map(str::to_owned),
    }
}

fn file(kind: &str, path: &str, mode: u32) -> FileFacts {
    FileFacts {
        kind: kind.into(),
        path: path.into(),
        owner: "postgres".into(),
        mode,
    }
}

/// A node as pgkeep should leave it.
fn secure_node() -> NodeFacts {
    let settings: BTreeMap<String, String> = [
        ("ssl", "on"),
        ("ssl_min_protocol_version", "TLSv1.2"),
        ("ssl_ciphers", "HIGH:!aNULL:!MD5:!3DES"),
        ("password_encryption", "scram-sha-256"),
        ("authentication_timeout", "60"),
        ("listen_addresses", "10.0.0.11"),
        ("port", "25432"),
        ("logging_collector", "on"),
        ("log_connections", "on"),
        ("log_disconnections", "on"),
        ("log_file_mode", "0600"),
        ("log_directory", "/var/log/pgkeep/node1"),
        ("data_directory", "/var/lib/pgkeep/node1/data"),
        ("log_line_prefix", "%m [%p] %q%u@%d from %h app=%a "),
        ("shared_preload_libraries", "pgaudit"),
        ("pgaudit.log", "ddl,role"),
        ("pgaudit.log_parameter", "off"),
        ("log_min_messages", "warning"),
        ("debug_print_parse", "off"),
        ("debug_print_rewritten", "off"),
        ("debug_print_plan", "off"),
        ("log_replication_commands", "on"),
        ("fsync", "on"),
        ("full_page_writes", "on"),
        ("wal_log_hints", "on"),
        ("allow_system_table_mods", "off"),
        ("ignore_system_indexes", "off"),
        ("zero_damaged_pages", "off"),
        ("ignore_checksum_failure", "off"),
        ("dynamic_library_path", "$libdir"),
        ("archive_mode", "on"),
        (
            "archive_command",
            "/usr/bin/pgbackrest --config-path=/etc/pgkeep/pgbackrest --stanza=demo archive-push %p",
        ),
        ("archive_library", ""),
        ("max_slot_wal_keep_size", "4096"),
        ("jit_debugging_support", "off"),
        ("jit_profiling_support", "off"),
        ("post_auth_delay", "0"),
        ("log_timezone", "Etc/UTC"),
        ("superuser_reserved_connections", "3"),
        ("server_version", "15.10 (Debian 15.10-0+deb12u1)"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    NodeFacts {
        name: "node1".into(),
        settings,
        hba: vec![
            hba(1, "hostnossl", "all", "all", Some(("all", "")), "reject"),
            hba(2, "hostssl", "all", "postgres", Some(("all", "")), "reject"),
            hba(
                3,
                "hostgssenc",
                "all",
                "postgres",
                Some(("all", "")),
                "reject",
            ),
            hba(4, "local", "all", "postgres", None, "peer"),
            hba(
                5,
                "hostssl",
                "replication",
                "replicator",
                Some(("10.0.0.0", "255.255.255.0")),
                "cert",
            ),
            hba(
                6,
                "hostssl",
                "all",
                "all",
                Some(("10.0.0.0", "255.255.255.0")),
                "scram-sha-256",
            ),
        ],
        roles: vec![
            role("postgres", true, true, None),
            role("replicator", false, true, None),
            role("app", false, false, Some("scram-sha-256")),
        ],
        extensions: [("plpgsql".to_owned(), "1.0".to_owned())].into(),
        data_checksums: Some(true),
        public_create_schemas: Vec::new(),
        files: vec![
            file("data_directory", "/var/lib/pgkeep/node1/data", 0o700),
            file("private_key", "/etc/pgkeep/tls/postgres-node1.key", 0o600),
            file("config", "/etc/pgkeep/node1.yml", 0o600),
            file("log_directory", "/var/log/pgkeep/node1", 0o700),
        ],
        insecure: Some(Vec::new()),
        cert_seconds_left: [("postgres".to_owned(), 300 * 86_400)].into(),
        installed_version: Some("15.10-0+deb12u1".into()),
        data_encrypted: Some(true),
        synchronous_commit_overrides: vec!["batch@app=local".into()],
    }
}

fn listener(service: &str, address: &str) -> ListenerProbe {
    ListenerProbe {
        service: service.into(),
        host: "node1".into(),
        address: address.into(),
        old_tls_accepted: Vec::new(),
        verify_error: None,
        seconds_left: Some(300 * 86_400),
        plaintext_accepted: (service != "postgres").then_some(false),
    }
}

const HAPROXY: &str = "\
defaults
    mode tcp
backend pg_write
    option httpchk GET /primary
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
    server node1 10.0.0.11:25432 check check-ssl verify required ca-file /etc/pgkeep/ca.crt port 28008
    server node2 10.0.0.12:25432 check check-ssl verify required ca-file /etc/pgkeep/ca.crt port 28008
";

fn secure() -> Facts {
    Facts {
        nodes: vec![secure_node()],
        dcs_config: Some(serde_json::json!({
            "ttl": 30,
            "postgresql": {"parameters": {"work_mem": "16MB"}, "use_pg_rewind": true}
        })),
        etcd: Some(EtcdFacts {
            members: 3,
            healthy: 3,
            auth_enabled: Some(true),
            tls: true,
            flags: vec![
                vec![
                    "--pre-vote=true".into(),
                    "--auto-compaction-retention=1h".into(),
                    "--quota-backend-bytes=2147483648".into(),
                ];
                3
            ],
        }),
        haproxy_cfg: Some(HAPROXY.into()),
        backup: Some(BackupFacts {
            stanza: true,
            cipher: "aes-256-cbc".into(),
            newest_backup_age_seconds: Some(3_600),
            tls_server_auth: vec!["pgbackrest-client-node1=demo".into()],
        }),
        listeners: vec![
            listener("postgres", "10.0.0.11:25432"),
            listener("restapi", "10.0.0.11:28008"),
        ],
        rest: vec![RestProbe {
            node: "node1".into(),
            restart_status: Some(401),
            patroni_status: Some(200),
            patroni_describes_cluster: Some(false),
            foreign_cert_accepted: Some(false),
        }],
    }
}

fn set(f: &mut Facts, k: &str, v: &str) {
    f.nodes[0].settings.insert(k.into(), v.into());
}

/// A change to the secure fixture.
type Breaker = fn(&mut Facts);

/// Each check id with a change to the secure fixture that it must catch.
fn breakers() -> Vec<(&'static str, Breaker)> {
    vec![
        ("PG-TLS-01", |f| set(f, "ssl", "off")),
        ("PG-TLS-02", |f| set(f, "ssl_min_protocol_version", "TLSv1")),
        ("PG-TLS-03", |f| {
            set(f, "ssl_ciphers", "DEFAULT:@SECLEVEL=0")
        }),
        ("PG-AUTH-01", |f| set(f, "password_encryption", "md5")),
        ("PG-AUTH-10", |f| set(f, "authentication_timeout", "600")),
        ("PG-AUTH-11", |f| set(f, "listen_addresses", "*")),
        ("PG-AUTH-12", |f| set(f, "port", "5432")),
        ("PG-LOG-01", |f| set(f, "logging_collector", "off")),
        ("PG-LOG-02", |f| set(f, "log_connections", "off")),
        ("PG-LOG-03", |f| set(f, "log_disconnections", "off")),
        ("PG-LOG-04", |f| set(f, "log_file_mode", "0644")),
        ("PG-LOG-05", |f| set(f, "log_directory", "log")),
        ("PG-LOG-06", |f| set(f, "log_line_prefix", "%m ")),
        ("PG-LOG-07", |f| {
            set(f, "shared_preload_libraries", "pg_stat_statements")
        }),
        ("PG-LOG-08", |f| set(f, "pgaudit.log", "write")),
        ("PG-LOG-09", |f| set(f, "pgaudit.log_parameter", "on")),
        ("PG-LOG-10", |f| set(f, "log_min_messages", "debug1")),
        ("PG-LOG-11", |f| set(f, "debug_print_plan", "on")),
        ("PG-LOG-12", |f| set(f, "log_replication_commands", "off")),
        ("PG-PAR-01", |f| set(f, "fsync", "off")),
        ("PG-PAR-02", |f| set(f, "full_page_writes", "off")),
        ("PG-PAR-03", |f| {
            set(f, "wal_log_hints", "off");
            f.nodes[0].data_checksums = Some(false);
        }),
        ("PG-PAR-04", |f| f.nodes[0].data_checksums = Some(false)),
        ("PG-PAR-05", |f| set(f, "allow_system_table_mods", "on")),
        ("PG-PAR-06", |f| set(f, "ignore_system_indexes", "on")),
        ("PG-PAR-07", |f| set(f, "ignore_checksum_failure", "on")),
        ("PG-PAR-08", |f| {
            set(f, "dynamic_library_path", "/tmp:$libdir")
        }),
        ("PG-PAR-09", |f| set(f, "archive_mode", "off")),
        ("PG-PAR-10", |f| set(f, "archive_command", "cp %p /tmp/%f")),
        ("PG-PAR-11", |f| set(f, "max_slot_wal_keep_size", "-1")),
        ("PG-PAR-12", |f| set(f, "jit_profiling_support", "on")),
        ("PG-PAR-13", |f| set(f, "post_auth_delay", "30")),
        ("PG-AUTH-02", |f| {
            f.nodes[0]
                .hba
                .insert(0, hba(1, "local", "all", "all", None, "trust"));
        }),
        ("PG-AUTH-03", |f| {
            f.nodes[0].hba.push(hba(
                9,
                "hostssl",
                "all",
                "app",
                Some(("10.0.0.0", "255.255.255.0")),
                "md5",
            ));
        }),
        ("PG-AUTH-04", |f| {
            f.nodes[0].hba.push(hba(
                9,
                "host",
                "all",
                "app",
                Some(("10.0.0.0", "255.255.255.0")),
                "scram-sha-256",
            ));
        }),
        ("PG-AUTH-05", |f| {
            f.nodes[0].hba[5].error = Some("invalid authentication method".into());
        }),
        ("PG-AUTH-06", |f| {
            f.nodes[0].hba.push(hba(
                9,
                "hostssl",
                "all",
                "app",
                Some(("0.0.0.0", "0.0.0.0")),
                "scram-sha-256",
            ));
        }),
        ("PG-AUTH-07", |f| {
            f.nodes[0].hba.push(hba(
                9,
                "hostssl",
                "all",
                "app",
                Some(("10.0.0.0", "255.0.0.0")),
                "scram-sha-256",
            ));
        }),
        ("PG-AUTH-08", |f| {
            // The superuser's reject line gone: `all` on line 6 lets it in over TLS.
            f.nodes[0].hba.remove(1);
        }),
        ("PG-AUTH-09", |f| {
            f.nodes[0].roles[2].password = Some("md5".into())
        }),
        ("PG-ROLE-01", |f| f.nodes[0].roles[2].superuser = true),
        ("PG-ROLE-02", |f| f.nodes[0].roles[1].replication = false),
        ("PG-ROLE-03", |f| f.nodes[0].roles[2].bypass_rls = true),
        ("PG-ROLE-04", |f| {
            f.nodes[0].public_create_schemas = vec!["public".into()]
        }),
        ("PG-EXT-01", |f| {
            f.nodes[0]
                .extensions
                .insert("plpython3u".into(), "1.0".into());
        }),
        ("FS-01", |f| f.nodes[0].files[0].mode = 0o750),
        ("FS-02", |f| f.nodes[0].files[1].mode = 0o644),
        ("FS-03", |f| f.nodes[0].files[2].mode = 0o604),
        ("FS-04", |f| {
            f.nodes[0]
                .files
                .push(file("ca_key", "/etc/pgkeep/ca.key", 0o600))
        }),
        ("FS-05", |f| f.nodes[0].files[3].mode = 0o755),
        ("PK-01", |f| {
            f.nodes[0].insecure = Some(vec!["pgkeep.insecure.weak_pg_hba".into()])
        }),
        ("PK-02", |f| {
            f.nodes[0].cert_seconds_left.insert("restapi".into(), -60);
        }),
        ("DCS-01", |f| {
            f.dcs_config = Some(serde_json::json!({
                "postgresql": {"parameters": {"archive_command": "touch /tmp/pwned"}}
            }));
        }),
        ("DCS-02", |f| {
            f.dcs_config = Some(serde_json::json!({
                "postgresql": {"callbacks": {"on_start": "/tmp/x"}}
            }));
        }),
        ("ETCD-01", |f| {
            let e = f.etcd.as_mut().unwrap();
            e.members = 2;
            e.healthy = 2;
        }),
        ("ETCD-02", |f| f.etcd.as_mut().unwrap().healthy = 2),
        ("ETCD-03", |f| {
            f.etcd.as_mut().unwrap().auth_enabled = Some(false)
        }),
        ("ETCD-04", |f| f.etcd.as_mut().unwrap().tls = false),
        ("HAP-01", |f| {
            f.haproxy_cfg = Some(HAPROXY.replace("verify required", "verify none"));
        }),
        ("HAP-02", |f| {
            f.haproxy_cfg = Some(HAPROXY.replace(" ca-file /etc/pgkeep/ca.crt", ""));
        }),
        ("HAP-03", |f| {
            f.haproxy_cfg = Some(HAPROXY.replace(" on-marked-down shutdown-sessions", ""));
        }),
        ("BK-01", |f| f.backup.as_mut().unwrap().stanza = false),
        ("BK-02", |f| {
            f.backup.as_mut().unwrap().cipher = "none".into()
        }),
        ("BK-03", |f| {
            f.backup.as_mut().unwrap().newest_backup_age_seconds = Some(30 * 86_400)
        }),
        ("BK-04", |f| {
            f.backup.as_mut().unwrap().tls_server_auth = vec!["*=demo".into()]
        }),
        ("PG-LOG-13", |f| set(f, "log_timezone", "Europe/Paris")),
        ("PG-PAR-14", |f| {
            set(f, "superuser_reserved_connections", "0")
        }),
        ("SYS-01", |f| f.nodes[0].data_encrypted = Some(false)),
        ("SYS-02", |f| {
            f.nodes[0].installed_version = Some("15.12-0+deb12u2".into())
        }),
        ("NET-01", |f| {
            f.listeners[0].old_tls_accepted = vec!["TLSv1".into()]
        }),
        ("NET-02", |f| {
            f.listeners[1].verify_error = Some("certificate signed by an unknown CA".into());
        }),
        ("NET-03", |f| f.listeners[0].seconds_left = Some(-1)),
        ("NET-04", |f| f.listeners[1].plaintext_accepted = Some(true)),
        ("REST-01", |f| f.rest[0].restart_status = Some(200)),
        ("REST-02", |f| {
            f.rest[0].patroni_describes_cluster = Some(true)
        }),
        ("REST-03", |f| f.rest[0].foreign_cert_accepted = Some(true)),
        ("ETCD-05", |f| {
            f.etcd.as_mut().unwrap().flags[1].retain(|x| !x.starts_with("--pre-vote"));
        }),
        ("ETCD-06", |f| {
            f.etcd.as_mut().unwrap().flags[0][1] = "--auto-compaction-retention=0".into();
        }),
        ("ETCD-07", |f| f.etcd.as_mut().unwrap().flags[2].truncate(2)),
        ("PG-SYNC-01", |f| {
            f.dcs_config.as_mut().unwrap()["synchronous_mode"] = true.into();
            f.nodes[0]
                .synchronous_commit_overrides
                .push("app@all=off".into());
        }),
    ]
}

fn status_of(findings: &[Finding], id: &str) -> Status {
    findings
        .iter()
        .find(|f| f.id == id)
        .unwrap_or_else(|| panic!("no finding {id}"))
        .status
}

#[test]
fn the_secure_fixture_passes_every_check() {
    let findings = run(&secure());
    let not_passing: Vec<String> = findings
        .iter()
        .filter(|f| f.status != Status::Pass)
        .map(|f| format!("{} {:?}: {}", f.id, f.status, f.evidence))
        .collect();
    assert!(not_passing.is_empty(), "{not_passing:#?}");
    assert_eq!(score(&findings), 100);
}

#[test]
fn every_check_catches_its_weakness_and_only_that_one() {
    let ids: BTreeSet<&str> = check_ids().into_iter().collect();
    let table = breakers();
    let broken: BTreeSet<&str> = table.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, broken, "every check needs exactly one breaker");
    assert_eq!(ids.len(), check_ids().len(), "check ids are unique");
    for (id, breaker) in table {
        let mut f = secure();
        breaker(&mut f);
        let findings = run(&f);
        let st = status_of(&findings, id);
        assert!(
            matches!(st, Status::Fail | Status::Warn),
            "{id} did not notice its weakness: {st:?}"
        );
        // The weakness is that check's: no other check turns red for it, except the pairs
        // that look at the same fact from two sides.
        let others: Vec<&str> = findings
            .iter()
            .filter(|x| x.id != id && x.status == Status::Fail)
            .map(|x| x.id)
            .filter(|o| !related(id, o))
            .collect();
        assert!(others.is_empty(), "{id}'s weakness also failed {others:?}");
    }
}

/// Checks that share a fact: breaking one legitimately fails the other.
fn related(a: &str, b: &str) -> bool {
    const PAIRS: &[(&str, &str)] = &[
        ("PG-LOG-07", "PG-LOG-08"),
        ("PG-PAR-03", "PG-PAR-04"),
        ("PG-AUTH-06", "PG-AUTH-08"),
        ("PG-ROLE-01", "PG-AUTH-08"),
        ("PG-AUTH-04", "PG-AUTH-08"),
        ("HAP-01", "HAP-02"),
    ];
    PAIRS
        .iter()
        .any(|(x, y)| (a, b) == (*x, *y) || (a, b) == (*y, *x))
}

#[test]
fn missing_facts_are_never_a_pass() {
    let findings = run(&Facts {
        nodes: vec![NodeFacts {
            name: "n".into(),
            ..NodeFacts::default()
        }],
        ..Facts::default()
    });
    let passing: Vec<&str> = findings
        .iter()
        .filter(|f| f.status == Status::Pass)
        .map(|f| f.id)
        .collect();
    assert!(passing.is_empty(), "passed without facts: {passing:?}");
}

#[test]
fn the_superuser_is_judged_by_the_first_matching_line_per_transport() {
    let mut f = secure();
    // A reject for the superuser after an `all` line that admits it: PostgreSQL uses the first.
    let n = &mut f.nodes[0];
    n.hba.remove(1);
    n.hba.push(hba(
        9,
        "hostssl",
        "all",
        "postgres",
        Some(("all", "")),
        "reject",
    ));
    let findings = run(&f);
    assert_eq!(status_of(&findings, "PG-AUTH-08"), Status::Fail);
    // Only hostnossl lines before a hostssl `all` line: TLS connections still reach line 6.
    let mut f = secure();
    f.nodes[0]
        .hba
        .retain(|r| r.kind != "hostssl" || r.users != ["postgres"]);
    assert_eq!(status_of(&run(&f), "PG-AUTH-08"), Status::Fail);
}

#[test]
fn without_the_logging_collector_the_servers_output_file_is_judged() {
    let mut f = secure();
    set(&mut f, "logging_collector", "off");
    f.nodes[0].files.retain(|x| x.kind != "log_directory");
    f.nodes[0]
        .files
        .push(file("server_log", "/etc/pgkeep/conf/postgresql.log", 0o600));
    let findings = run(&f);
    assert_eq!(status_of(&findings, "PG-LOG-01"), Status::Pass);
    assert_eq!(status_of(&findings, "PG-LOG-04"), Status::NotApplicable);
    assert_eq!(status_of(&findings, "PG-LOG-05"), Status::NotApplicable);
    assert_eq!(status_of(&findings, "FS-05"), Status::Pass);
    f.nodes[0].files.last_mut().unwrap().mode = 0o644;
    assert_eq!(status_of(&run(&f), "FS-05"), Status::Fail);
    // Loopback ranges are the host itself.
    let mut f = secure();
    f.nodes[0].hba.push(hba(
        9,
        "hostssl",
        "all",
        "app",
        Some(("127.0.0.0", "255.0.0.0")),
        "scram-sha-256",
    ));
    assert_eq!(status_of(&run(&f), "PG-AUTH-07"), Status::Pass);
}

#[test]
fn severities_drive_the_score_and_the_exit_threshold() {
    let mut f = secure();
    f.nodes[0].settings.insert("fsync".into(), "off".into());
    let findings = run(&f);
    let fsync = findings.iter().find(|x| x.id == "PG-PAR-01").unwrap();
    assert!(fails_at(fsync, Severity::High));
    assert!(fails_at(fsync, Severity::Critical));
    let mut f2 = secure();
    f2.nodes[0]
        .settings
        .insert("log_connections".into(), "off".into());
    let low = run(&f2);
    let lc = low.iter().find(|x| x.id == "PG-LOG-02").unwrap();
    assert!(!fails_at(lc, Severity::Medium) && fails_at(lc, Severity::Low));
    assert!(
        score(&findings) < score(&low),
        "a critical failure costs more than a low one"
    );
}
