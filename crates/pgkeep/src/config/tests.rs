//! Loading a whole file: how the pg_hba policy and `postgresql.ldap_ca_file` reach the checked
//! configuration.

use super::{Config, ConfigError, effective_yaml};
use std::path::{Path, PathBuf};

const BASE: &str = "scope: s
name: node1
restapi: {listen: 127.0.0.1:18443, certfile: /x/rest.crt, keyfile: /x/rest.key}
etcd3: {hosts: [127.0.0.1:12379], cacert: /x/ca.crt, cert: /x/e.crt, key: /x/e.key}
postgresql:
  listen: 127.0.0.1:15433
  connect_address: node1:15433
  data_dir: /var/lib/pg/data
";

fn parse(extra: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("node.yml"), &format!("{BASE}{extra}"))
}

#[test]
fn ldap_ca_file_defaults_to_ssl_ca_file_and_is_checked_when_set() {
    assert_eq!(parse("").unwrap().postgresql.ldap_ca_file, None);
    let abs = parse("  parameters: {ssl_ca_file: /etc/pgkeep/ca.crt}\n").unwrap();
    assert_eq!(
        abs.postgresql.ldap_ca_file,
        Some(PathBuf::from("/etc/pgkeep/ca.crt"))
    );
    // PostgreSQL reads a relative ssl_ca_file from the data directory, and so does libldap
    // in a backend (whose working directory it is).
    let rel = parse("  parameters: {ssl_ca_file: ca.crt}\n").unwrap();
    assert_eq!(
        rel.postgresql.ldap_ca_file,
        Some(PathBuf::from("/var/lib/pg/data/ca.crt"))
    );

    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ldap-ca.crt");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let set = parse(&format!(
        "  ldap_ca_file: {}\n  parameters: {{ssl_ca_file: /etc/pgkeep/ca.crt}}\n",
        pem.display()
    ))
    .unwrap();
    assert_eq!(set.postgresql.ldap_ca_file, Some(pem.clone()));

    let missing = dir.path().join("missing.crt");
    let junk = dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate").unwrap();
    for (path, why) in [
        (missing.display().to_string(), "No such file"),
        (junk.display().to_string(), "no PEM certificate"),
        ("ca.crt".to_owned(), "absolute"),
    ] {
        let e = parse(&format!("  ldap_ca_file: {path}\n")).unwrap_err();
        assert_eq!(e.key, "postgresql.ldap_ca_file");
        assert!(e.reason.contains(&path) && e.reason.contains(why), "{e}");
    }
}

#[test]
fn hba_lines_are_checked_and_bind_passwords_count_as_inline_secrets() {
    let e = parse("  pg_hba: ['hostssl all all 10.0.0.0/8 ldap ldapserver=l']\n").unwrap_err();
    assert_eq!(e.key, "postgresql.pg_hba[0]");
    assert!(e.reason.contains("ldapscheme=ldaps"), "{e}");
    let c = parse(
        "  pg_hba:\n    - hostssl all all 10.0.0.0/8 scram-sha-256\n    - 'hostssl all all 10.0.0.0/8 ldap ldapserver=l ldapscheme=ldaps ldapbasedn=\"dc=x\" ldapbinddn=\"cn=pg,dc=x\" ldapbindpasswd=Secr3t'\n",
    )
    .unwrap();
    assert_eq!(c.inline_secret_keys, ["postgresql.pg_hba[1]"]);
    let shown = effective_yaml(&c);
    assert!(
        !shown.contains("Secr3t") && shown.contains("ldapbindpasswd=<redacted>"),
        "{shown}"
    );
    let weak = parse(
        "  pg_hba: ['hostssl all all 10.0.0.0/8 ldap ldapserver=l']\npgkeep: {insecure: {weak_pg_hba: true}}\n",
    );
    assert!(weak.is_ok(), "{weak:?}");
}

#[test]
fn pgbackrest_section_defaults_the_stanza_to_the_scope_and_names_bad_values() {
    assert_eq!(parse("").unwrap().pgbackrest, None);
    let c = parse("pgkeep: {pgbackrest: {config_path: /etc/pgkeep/pgbackrest}}\n").unwrap();
    let p = c.pgbackrest.unwrap();
    assert_eq!(p.config_path, PathBuf::from("/etc/pgkeep/pgbackrest"));
    assert_eq!(p.stanza, "s");
    for (extra, key) in [
        (
            "pgkeep: {pgbackrest: {config_path: etc/pgbackrest}}\n",
            "pgkeep.pgbackrest.config_path",
        ),
        (
            "pgkeep: {pgbackrest: {stanza: main}}\n",
            "pgkeep.pgbackrest.config_path",
        ),
        (
            "pgkeep: {pgbackrest: {config_path: /p, stanza: 'a b'}}\n",
            "pgkeep.pgbackrest.stanza",
        ),
    ] {
        assert_eq!(parse(extra).unwrap_err().key, key, "{extra}");
    }
}
