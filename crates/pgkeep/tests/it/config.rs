//! `pgkeep config check`: every bad input names the file, the key and the reason, and exits
//! non-zero; a good file prints the effective configuration with secrets redacted.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use tempfile::TempDir;

const VALID: &str = r#"
scope: demo
name: node1
restapi:
  listen: 127.0.0.1:18443
  certfile: /etc/pgkeep/rest.crt
  keyfile: /etc/pgkeep/rest.key
  cafile: /etc/pgkeep/ca.crt
  authentication:
    username: admin
    password: s3cret-Pa55
  allowlist: [127.0.0.0/8, "::1"]
etcd3:
  hosts: 127.0.0.1:12379,127.0.0.2:12379
  cacert: /etc/pgkeep/ca.crt
  cert: /etc/pgkeep/etcd-client.crt
  key: /etc/pgkeep/etcd-client.key
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    postgresql:
      parameters:
        work_mem: 16MB
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
postgresql:
  listen: 127.0.0.1:15433
  connect_address: node1.demo.test:15433
  data_dir: /var/lib/pgkeep/demo/node1/data
  parameters:
    archive_mode: on
    archive_command: "pgbackrest --stanza=demo archive-push %p"
    pgaudit.log: ddl,role
  pg_hba:
    - hostssl all all 127.0.0.0/8 scram-sha-256
tags:
  nofailover: false
  dc: east
"#;

fn write(dir: &TempDir, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.path().join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn check(path: &Path) -> assert_cmd::assert::Assert {
    Command::cargo_bin("pgkeep")
        .unwrap()
        .args(["config", "check", "-c"])
        .arg(path)
        .assert()
}

/// Replaces the first line that starts with `from` (after indentation) by `to`.
fn edit(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "fixture has no {from:?}");
    VALID.replacen(from, to, 1)
}

#[test]
fn valid_config_prints_effective_config_with_secrets_redacted() {
    let dir = TempDir::new().unwrap();
    let p = write(&dir, "node.yml", VALID, 0o600);
    check(&p)
        .success()
        .stdout(predicate::str::contains("<redacted>"))
        .stdout(predicate::str::contains("s3cret-Pa55").not())
        .stdout(predicate::str::contains("/service/demo"))
        .stdout(predicate::str::contains("https://127.0.0.2:12379"))
        // YAML 1.1 `on` is PostgreSQL's `on`, as Patroni reads it.
        .stdout(
            predicate::str::contains("archive_mode: 'on'")
                .or(predicate::str::contains("archive_mode: \"on\"")),
        )
        .stdout(predicate::str::contains("--encoding=UTF8"))
        .stdout(predicate::str::contains(
            "/var/lib/pgkeep/demo/node1/data.conf",
        ));
}

#[test]
fn local_callbacks_are_accepted_and_shown() {
    let dir = TempDir::new().unwrap();
    let text = edit(
        "\npostgresql:\n",
        "\npostgresql:\n  callbacks:\n    on_role_change: [/bin/true, vip-move]\n    on_start: /bin/true\n  pre_promote: /bin/true\n",
    )
    .replacen("tags:\n", "pgkeep:\n  callback_timeout: 12\ntags:\n", 1);
    let p = write(&dir, "node.yml", &text, 0o600);
    check(&p)
        .success()
        .stdout(predicate::str::contains("vip-move"))
        .stdout(predicate::str::contains("on_role_change"))
        .stdout(predicate::str::contains("callback_timeout: 12"))
        .stdout(predicate::str::contains("callback_primary_role: master"));
}

#[test]
fn secrets_in_a_group_readable_file_are_refused() {
    let dir = TempDir::new().unwrap();
    let p = write(&dir, "node.yml", VALID, 0o640);
    check(&p)
        .failure()
        .stderr(predicate::str::contains("node.yml"))
        .stderr(predicate::str::contains("restapi.authentication.password"))
        .stderr(predicate::str::contains("chmod 600"));
}

#[test]
fn password_file_must_be_private_and_keeps_the_config_shareable() {
    let dir = TempDir::new().unwrap();
    let pw = write(&dir, "rest.pw", "from-file\n", 0o644);
    let text = edit(
        "    password: s3cret-Pa55",
        &format!("    password_file: {}", pw.display()),
    );
    let p = write(&dir, "node.yml", &text, 0o644);
    check(&p).failure().stderr(predicate::str::contains(
        "restapi.authentication.password_file",
    ));
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    check(&p)
        .success()
        .stdout(predicate::str::contains("from-file").not());
}

#[test]
fn each_bad_input_names_file_key_and_reason() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "  listen: 127.0.0.1:18443",
            "  lisen: 127.0.0.1:18443",
            "restapi.lisen",
            "did you mean 'listen'",
        ),
        (
            "  listen: 127.0.0.1:18443",
            "  listen: nowhere",
            "restapi.listen",
            "not an address:port",
        ),
        (
            "\npostgresql:\n",
            "\npostgresql:\n  callbacks:\n    on_start: /no/such/script\n",
            "postgresql.callbacks.on_start",
            "does not exist",
        ),
        (
            "\npostgresql:\n",
            "\npostgresql:\n  callbacks:\n    on_promote: /bin/true\n",
            "postgresql.callbacks.on_promote",
            "unknown key",
        ),
        (
            "\npostgresql:\n",
            "\npostgresql:\n  pre_promote: \"/bin/true;reboot\"\n",
            "postgresql.pre_promote",
            "shell syntax",
        ),
        (
            "\npostgresql:\n",
            "\npostgresql:\n  before_stop: /bin/sh -c 'touch /tmp/x'\n",
            "postgresql.before_stop",
            "without a shell",
        ),
        (
            "\npostgresql:\n",
            "\npostgresql:\n  custom_conf: /etc/extra.conf\n",
            "postgresql.custom_conf",
            "not implemented by pgkeep",
        ),
        (
            "  certfile: /etc/pgkeep/rest.crt\n",
            "",
            "restapi.certfile",
            "must be set too",
        ),
        (
            "    ttl: 10",
            "    ttl: 5",
            "bootstrap.dcs.ttl",
            "exceeds ttl",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - host all all 0.0.0.0/0 trust",
            "postgresql.pg_hba[0]",
            "weak method trust",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - host all all 0.0.0.0/0 scram-sha-256",
            "postgresql.pg_hba[0]",
            "without TLS",
        ),
        (
            "        work_mem: 16MB",
            "        archive_command: /bin/true",
            "bootstrap.dcs.postgresql.parameters.archive_command",
            "local configuration",
        ),
        (
            "    pgaudit.log: ddl,role",
            "    \"bad name\": x",
            "postgresql.parameters",
            "not a valid parameter name",
        ),
        (
            "etcd3:\n",
            "etcd3:\n  protocol: http\n",
            "etcd3.protocol",
            "plaintext etcd is refused",
        ),
        (
            "  allowlist: [127.0.0.0/8, \"::1\"]",
            "  allowlist: [intranet]",
            "restapi.allowlist[0]",
            "not an IP address",
        ),
        (
            "    - encoding: UTF8",
            "    - auth: trust",
            "bootstrap.initdb[0]",
            "authentication, paths and checksums are pgkeep",
        ),
        (
            "  data_dir: /var/lib/pgkeep/demo/node1/data",
            "  data_dir: relative/data",
            "postgresql.data_dir",
            "absolute",
        ),
        (
            "  nofailover: false",
            "  nofailover: [1]",
            "tags.nofailover",
            "not a valid value",
        ),
        (
            "  nofailover: false",
            "  nofailover: maybe",
            "tags.nofailover",
            "not a valid value",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - hostssl all all 10.0.0.0 255.255.255.0 trust",
            "postgresql.pg_hba[0]",
            "weak method trust",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - 'hostssl all all 10.1.0.0/24 \"trust\"'",
            "postgresql.pg_hba[0]",
            "weak method trust",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - \"# ok\\nhostssl all all 0.0.0.0/0 trust\"",
            "postgresql.pg_hba[0]",
            "control character",
        ),
        (
            "    - hostssl all all 127.0.0.0/8 scram-sha-256",
            "    - hostssl all all 127.0.0.0/8 ident",
            "postgresql.pg_hba[0]",
            "weak method ident",
        ),
        (
            "tags:\n",
            "log:\n  level: LOUD\ntags:\n",
            "log.level",
            "not a log level",
        ),
        (
            "    loop_wait: 2",
            "    loop_wiat: 2",
            "bootstrap.dcs.loop_wiat",
            "not used by pgkeep",
        ),
        (
            "    - encoding: UTF8",
            "    - pwf: /etc/shadow",
            "bootstrap.initdb[0]",
            "not an initdb option pgkeep passes on",
        ),
        (
            "  key: /etc/pgkeep/etcd-client.key",
            "  key: /etc/pgkeep/etcd-client.key\n  key_password: x",
            "etcd3.key_password",
            "not implemented",
        ),
        (
            "    pgaudit.log: ddl,role",
            "    primary_conninfo: host=evil password=x",
            "postgresql.parameters.primary_conninfo",
            "pgkeep sets this itself",
        ),
        (
            "scope: demo",
            "scope: \"de/mo\"",
            "scope",
            "letters, digits",
        ),
        (
            "  key: /etc/pgkeep/etcd-client.key\n",
            "",
            "etcd3.key",
            "must be set too",
        ),
    ];
    let dir = TempDir::new().unwrap();
    for (i, (from, to, key, reason)) in cases.iter().enumerate() {
        let name = format!("case{i}.yml");
        let p = write(&dir, &name, &edit(from, to), 0o600);
        check(&p)
            .failure()
            .stderr(predicate::str::contains(name.as_str()))
            .stderr(predicate::str::contains(format!("{key}:")))
            .stderr(predicate::str::contains(*reason));
    }
}

#[test]
fn yaml_syntax_errors_carry_a_position() {
    let dir = TempDir::new().unwrap();
    let p = write(&dir, "broken.yml", "scope: [demo\nname: x\n", 0o600);
    check(&p)
        .failure()
        .stderr(predicate::str::contains("broken.yml"))
        .stderr(predicate::str::contains("line"));
    let missing = dir.path().join("absent.yml");
    check(&missing)
        .failure()
        .stderr(predicate::str::contains("absent.yml"))
        .stderr(predicate::str::contains("cannot read"));
}

#[test]
fn the_local_allowlist_cannot_open_a_command_parameter() {
    let dir = TempDir::new().unwrap();
    let text =
        format!("{VALID}pgkeep:\n  dynamic_parameter_allowlist: [pgaudit.log, archive_command]\n");
    let p = write(&dir, "node.yml", &text, 0o600);
    check(&p)
        .failure()
        .stderr(predicate::str::contains(
            "pgkeep.dynamic_parameter_allowlist[1]",
        ))
        .stderr(predicate::str::contains("operating-system command"));
}

#[test]
fn a_config_others_can_write_is_refused_even_without_secrets() {
    let dir = TempDir::new().unwrap();
    let text = edit(
        "    password: s3cret-Pa55",
        "    password_file: /nonexistent",
    );
    let p = write(&dir, "node.yml", &text, 0o666);
    check(&p)
        .failure()
        .stderr(predicate::str::contains("writable by group or others"));
}

#[test]
fn insecure_overrides_are_explicit_and_announced() {
    let dir = TempDir::new().unwrap();
    let text = edit(
        "    - hostssl all all 127.0.0.0/8 scram-sha-256",
        "    - host all all 127.0.0.0/8 md5",
    );
    let text = format!("{text}pgkeep:\n  insecure:\n    weak_pg_hba: true\n");
    let p = write(&dir, "node.yml", &text, 0o600);
    check(&p)
        .success()
        .stderr(predicate::str::contains("pgkeep.insecure.weak_pg_hba"));
}
