//! Unit tests of the PKI module as a whole: create, write, load, issue, inspect.

use std::os::unix::fs::PermissionsExt;

use secrecy::ExposeSecret;

use super::*;

fn server_request(days: u32) -> CertRequest {
    CertRequest {
        common_name: "node1.example".to_owned(),
        usage: Usage::Server,
        dns_names: vec!["node1.example".to_owned(), "lb.example".to_owned()],
        ip_addresses: vec!["127.0.0.11".parse().unwrap(), "::1".parse().unwrap()],
        validity_days: days,
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_write_load_issue_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create("test CA", 30).unwrap();
    let files = ca.write(dir.path()).unwrap();
    assert_eq!(files.cert, dir.path().join("ca.crt"));
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.cert), 0o644);

    let loaded = Ca::load(&files.cert, &files.key).unwrap();
    assert_eq!(loaded.common_name(), "test CA");
    assert_eq!(loaded.cert_pem(), ca.cert_pem());

    let issued = loaded.issue(&server_request(7)).unwrap();
    assert!(
        issued
            .key_pem
            .expose_secret()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    let out = issued
        .write(&dir.path().join("certs"), "postgres-n1")
        .unwrap();
    assert_eq!(mode(&out.key), 0o600);
    assert_eq!(mode(&out.cert), 0o644);

    let info = inspect(&out.cert).unwrap();
    assert_eq!(info.subject_cn, "node1.example");
    assert_eq!(info.issuer_cn, "test CA");
    assert!(!info.is_ca && !info.self_issued);
    assert_eq!(info.ekus, vec!["serverAuth"]);
    assert_eq!(info.key_usage, vec!["digitalSignature"]);
    assert_eq!(info.dns_names, vec!["node1.example", "lb.example"]);
    assert_eq!(info.ip_addresses.len(), 2);
    assert_eq!(info.public_key, "EC 256");
    assert_eq!(info.days_left(), 6, "seconds_left = {}", info.seconds_left);

    let ca_info = inspect(&files.cert).unwrap();
    assert!(ca_info.is_ca && ca_info.self_issued);
    assert_eq!(ca_info.key_usage, vec!["keyCertSign", "cRLSign"]);
    assert!(ca_info.ekus.is_empty());
}

#[test]
fn ca_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = Ca::create("CA", 30).unwrap().write(dir.path()).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Ca::load(&files.cert, &files.key).unwrap_err();
    assert!(
        matches!(err, PkiError::KeyPermissions { mode: 0o640, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[test]
fn key_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Ca::create("A", 30)
        .unwrap()
        .write(&dir.path().join("a"))
        .unwrap();
    let b = Ca::create("B", 30)
        .unwrap()
        .write(&dir.path().join("b"))
        .unwrap();
    let err = Ca::load(&a.cert, &b.key).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
}

#[test]
fn leaf_certificate_is_not_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create("CA", 30).unwrap();
    let leaf = ca
        .issue(&server_request(5))
        .unwrap()
        .write(dir.path(), "leaf")
        .unwrap();
    let err = Ca::load(&leaf.cert, &leaf.key).unwrap_err();
    assert!(matches!(err, PkiError::NotCa { .. }), "{err}");
    assert!(err.to_string().contains("leaf.crt"), "{err}");
}

#[test]
fn bad_basenames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create("CA", 30).unwrap();
    let issued = ca.issue(&server_request(5)).unwrap();
    for name in ["", "../x", ".hidden", "a/b"] {
        assert!(issued.write(dir.path(), name).is_err(), "{name:?} accepted");
    }
}

#[test]
fn json_has_rfc3339_times() {
    let ca = Ca::create("CA", 30).unwrap();
    let info = inspect_pem(
        ca.cert_pem().as_bytes(),
        Path::new("mem"),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let json = serde_json::to_value(&info).unwrap();
    let not_after = json["not_after"].as_str().unwrap();
    assert_eq!(not_after.len(), "2026-01-01T00:00:00Z".len(), "{not_after}");
    assert!(not_after.ends_with('Z'));
    assert_eq!(json["is_ca"], true);
}
