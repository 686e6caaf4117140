//! PKI round trips: issue certificates, then check them the way TLS peers will, with rustls's
//! WebPKI verifiers (chain, names, extended key usage, validity), plus expiry, file modes,
//! organisation CAs and the `pgkeep pki` command line.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use assert_cmd::Command;
use pgkeep::pki::{self, Ca, CertRequest, PkiError, Service, ServiceCert, Usage};
use predicates::prelude::*;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers: read what was written, and verify it as a TLS client or server would.

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The first certificate of a PEM file, as a TLS peer would load it.
fn der_from_file(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn roots(ca_cert: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(der_from_file(ca_cert))
        .expect("CA certificate is a usable trust anchor");
    Arc::new(roots)
}

fn at(offset_secs: i64) -> UnixTime {
    let now = SystemTime::now();
    let t = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs.unsigned_abs())
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

/// Verifies `cert` as a TLS server certificate for `name`, as a client trusting `ca` would.
fn verify_server_at(ca: &Path, cert: &Path, name: &str, when: UnixTime) -> Result<(), String> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .expect("server verifier");
    let server_name = ServerName::try_from(name.to_owned()).expect("valid server name");
    verifier
        .verify_server_cert(&der_from_file(cert), &[], &server_name, &[], when)
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn verify_server(ca: &Path, cert: &Path, name: &str) -> Result<(), String> {
    verify_server_at(ca, cert, name, UnixTime::now())
}

/// Verifies `cert` as a TLS client certificate, as a server requiring client certificates
/// issued by `ca` would.
fn verify_client(ca: &Path, cert: &Path) -> Result<(), String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .expect("client verifier");
    verifier
        .verify_client_cert(&der_from_file(cert), &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A temporary PKI directory with a fresh CA written into it.
struct Pki {
    _tmp: TempDir,
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki::with_ca("pgkeep test CA")
    }

    fn with_ca(common_name: &str) -> Pki {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let ca = Ca::create(common_name, 31).unwrap();
        ca.write(&dir).unwrap();
        Pki { _tmp: tmp, dir, ca }
    }

    fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn issue(&self, basename: &str, req: &CertRequest) -> pki::IssuedFiles {
        self.ca
            .issue(req)
            .unwrap()
            .write(&self.dir, basename)
            .unwrap()
    }
}

fn request(cn: &str, usage: Usage, dns: &[&str], ips: &[&str], days: u32) -> CertRequest {
    CertRequest {
        common_name: cn.to_owned(),
        usage,
        dns_names: dns.iter().map(|s| (*s).to_owned()).collect(),
        ip_addresses: ips.iter().map(|s| ip(s)).collect(),
        validity_days: days,
    }
}

// ---------------------------------------------------------------------------------------------
// Server and client certificates through rustls.

#[test]
fn server_certificate_verifies_for_its_names_and_addresses_only() {
    let pki = Pki::new();
    let req = request(
        "node1.pgkeep.test",
        Usage::Server,
        &["node1.pgkeep.test", "lb.pgkeep.test"],
        &["127.0.0.11", "::1"],
        30,
    );
    let files = pki.issue("postgres-node1", &req);
    let ca = pki.ca_cert();

    for good in ["node1.pgkeep.test", "lb.pgkeep.test", "127.0.0.11", "::1"] {
        verify_server(&ca, &files.cert, good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for wrong in [
        "node2.pgkeep.test",
        "pgkeep.test",
        "127.0.0.12",
        "localhost",
    ] {
        let err = verify_server(&ca, &files.cert, wrong).expect_err(wrong);
        assert!(err.contains("NotValidForName"), "{wrong}: {err}");
    }

    // Another CA's trust store does not accept it (a CA of the same name: bad signature).
    let other = Pki::with_ca("another CA");
    let err = verify_server(&other.ca_cert(), &files.cert, "node1.pgkeep.test").unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let same_name = Pki::new();
    let err = verify_server(&same_name.ca_cert(), &files.cert, "node1.pgkeep.test").unwrap_err();
    assert!(err.contains("BadSignature"), "{err}");
}

#[test]
fn client_certificate_verifies_and_server_only_certificate_is_refused_as_client() {
    let pki = Pki::new();
    let ca = pki.ca_cert();
    let client = pki.issue(
        "client",
        &request("pgkeep-node1", Usage::Client, &[], &[], 30),
    );
    let server = pki.issue(
        "server",
        &request("node1", Usage::Server, &["node1.pgkeep.test"], &[], 30),
    );
    let both = pki.issue(
        "both",
        &request(
            "etcd-server-e1",
            Usage::ServerAndClient,
            &["e1.pgkeep.test"],
            &[],
            30,
        ),
    );

    verify_client(&ca, &client.cert).unwrap();
    let err = verify_client(&ca, &server.cert).unwrap_err();
    assert!(
        err.contains("InvalidPurpose"),
        "server-only certificate as client: {err}"
    );
    let err = verify_server(&ca, &client.cert, "node1.pgkeep.test").unwrap_err();
    assert!(
        err.contains("InvalidPurpose") || err.contains("NotValidForName"),
        "{err}"
    );

    // etcd members: serverAuth and clientAuth.
    verify_client(&ca, &both.cert).unwrap();
    verify_server(&ca, &both.cert, "e1.pgkeep.test").unwrap();
}

#[test]
fn service_rules_give_distinct_identities_that_verify() {
    let pki = Pki::new();
    let ca = pki.ca_cert();
    let issue = |service: Service, hosts: &[&str]| {
        let spec = ServiceCert {
            service,
            name: "n1".to_owned(),
            role: None,
            dns_names: hosts.iter().map(|s| (*s).to_owned()).collect(),
            ip_addresses: if hosts.is_empty() {
                Vec::new()
            } else {
                vec![ip("127.0.0.11")]
            },
            validity_days: 30,
        };
        let files = pki.issue(&spec.basename().unwrap(), &spec.request().unwrap());
        (
            files,
            pki::inspect(&pki.dir.join(format!("{}.crt", spec.basename().unwrap()))).unwrap(),
        )
    };

    let (pg, pg_info) = issue(Service::Postgres, &["n1.pgkeep.test", "lb.pgkeep.test"]);
    assert_eq!(pg_info.subject_cn, "n1.pgkeep.test");
    verify_server(&ca, &pg.cert, "lb.pgkeep.test").unwrap();
    verify_server(&ca, &pg.cert, "127.0.0.11").unwrap();
    assert!(
        verify_client(&ca, &pg.cert).is_err(),
        "a PostgreSQL server certificate is no client"
    );

    let (etcd, etcd_info) = issue(Service::EtcdServer, &["n1.pgkeep.test"]);
    assert_eq!(etcd_info.subject_cn, "etcd-server-n1");
    assert_eq!(etcd_info.ekus, vec!["serverAuth", "clientAuth"]);
    verify_server(&ca, &etcd.cert, "127.0.0.11").unwrap();
    verify_client(&ca, &etcd.cert).unwrap();

    let (agent, agent_info) = issue(Service::EtcdClient, &[]);
    assert_eq!(agent_info.subject_cn, "pgkeep-n1");
    assert!(agent_info.dns_names.is_empty() && agent_info.ip_addresses.is_empty());
    verify_client(&ca, &agent.cert).unwrap();

    let (repl, repl_info) = issue(Service::Replication, &[]);
    assert_eq!(repl_info.subject_cn, "replicator");
    verify_client(&ca, &repl.cert).unwrap();

    let (rest, rest_info) = issue(Service::RestApi, &["n1.pgkeep.test"]);
    assert_eq!(rest_info.subject_cn, "restapi-n1");
    assert!(verify_client(&ca, &rest.cert).is_err());
}

// ---------------------------------------------------------------------------------------------
// Validity.

#[test]
fn one_day_certificate_expires_in_a_day_and_is_backdated_an_hour() {
    let pki = Pki::new();
    let files = pki.issue(
        "short",
        &request("short", Usage::Server, &["s.pgkeep.test"], &[], 1),
    );
    let info = pki::inspect(&files.cert).unwrap();

    assert!(
        (86_400 - 120..=86_400).contains(&info.seconds_left),
        "seconds_left = {}",
        info.seconds_left
    );
    assert_eq!(info.days_left(), 0, "less than one whole day remains");
    let now = time::OffsetDateTime::now_utc();
    let backdated = (now - info.not_before).whole_seconds();
    assert!(
        (3_600 - 5..=3_600 + 120).contains(&backdated),
        "not_before is {backdated}s ago"
    );
    assert_eq!(
        (info.not_after - info.not_before).whole_seconds(),
        86_400 + 3_600
    );

    let ca = pki.ca_cert();
    let name = "s.pgkeep.test";
    verify_server_at(&ca, &files.cert, name, at(0)).unwrap();
    // A peer whose clock is 30 minutes behind still accepts it...
    verify_server_at(&ca, &files.cert, name, at(-30 * 60)).unwrap();
    // ...one two hours behind does not, and after a day and a bit it has expired.
    let err = verify_server_at(&ca, &files.cert, name, at(-2 * 3_600)).unwrap_err();
    assert!(err.contains("NotValidYet"), "{err}");
    let err = verify_server_at(&ca, &files.cert, name, at(86_400 + 600)).unwrap_err();
    assert!(err.contains("Expired"), "{err}");
}

#[test]
fn validity_is_explicit_not_the_library_default() {
    let pki = Pki::new();
    let ca_info = pki::inspect(&pki.ca_cert()).unwrap();
    assert_eq!(
        ca_info.days_left(),
        30,
        "a 31-day CA; seconds_left = {}",
        ca_info.seconds_left
    );
    let files = pki.issue(
        "c",
        &request("c", Usage::Client, &[], &[], pki::DEFAULT_LEAF_DAYS.min(20)),
    );
    let info = pki::inspect(&files.cert).unwrap();
    assert_eq!(info.days_left(), 19);
    // A leaf may not outlive its CA.
    let err = pki
        .ca
        .issue(&request("c", Usage::Client, &[], &[], 32))
        .unwrap_err();
    assert!(matches!(err, PkiError::CaValidity { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Files.

#[test]
fn keys_are_written_0600_and_certificates_0644() {
    let pki = Pki::new();
    assert_eq!(mode(&pki.dir.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.dir.join("ca.crt")), 0o644);
    let files = pki.issue("leaf", &request("leaf", Usage::Client, &[], &[], 5));
    assert_eq!(files.key, pki.dir.join("leaf.key"));
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.cert), 0o644);
    let key = std::fs::read_to_string(&files.key).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 key");
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(&pki.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

// ---------------------------------------------------------------------------------------------
// Organisation CAs.

/// Writes an organisation CA's files (key 0600) into a fresh directory.
fn org_files(cert: &str, key: &str) -> (TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cert_path = tmp.path().join("org-ca.pem");
    let key_path = tmp.path().join("org-ca.key");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (tmp, cert_path, key_path)
}

fn sign_with_organisation_ca(cert: &str, key: &str, expected_cn: &str) {
    let (tmp, cert_path, key_path) = org_files(cert, key);
    let ca = Ca::load(&cert_path, &key_path).unwrap();
    assert_eq!(ca.common_name(), expected_cn);
    let out = tmp.path().join("issued");
    let server = ca
        .issue(&request(
            "db1.org.test",
            Usage::Server,
            &["db1.org.test"],
            &["10.1.2.3"],
            30,
        ))
        .unwrap()
        .write(&out, "postgres-db1")
        .unwrap();
    let client = ca
        .issue(&request("replicator", Usage::Client, &[], &[], 30))
        .unwrap()
        .write(&out, "r")
        .unwrap();

    verify_server(&cert_path, &server.cert, "db1.org.test").unwrap();
    verify_server(&cert_path, &server.cert, "10.1.2.3").unwrap();
    verify_client(&cert_path, &client.cert).unwrap();
    let info = pki::inspect(&server.cert).unwrap();
    assert_eq!(info.issuer_cn, expected_cn);
    assert_eq!(
        info.public_key, "EC 256",
        "leaf keys are P-256 whatever the CA's key"
    );
}

#[test]
fn organisation_ca_with_sec1_ec_key_signs_verifiable_certificates() {
    sign_with_organisation_ca(ORG_EC_CERT, ORG_EC_KEY, "Example Org Root CA");
}

#[test]
fn organisation_ca_with_pkcs1_rsa_key_signs_verifiable_certificates() {
    sign_with_organisation_ca(ORG_RSA_CERT, ORG_RSA_KEY, "Example Org RSA CA");
}

#[test]
fn organisation_ca_with_repeated_name_attributes_is_refused_up_front() {
    let (_tmp, cert_path, key_path) = org_files(ORG_DC_CERT, ORG_EC_KEY);
    let err = Ca::load(&cert_path, &key_path).unwrap_err();
    assert!(matches!(err, PkiError::NotCa { .. }), "{err}");
    assert!(err.to_string().contains("org-ca.pem"), "{err}");
}

#[test]
fn organisation_ca_with_wrong_key_is_refused() {
    let (_tmp, cert_path, key_path) = org_files(ORG_RSA_CERT, ORG_EC_KEY);
    let err = Ca::load(&cert_path, &key_path).unwrap_err().to_string();
    assert!(
        err.contains("org-ca.key") && err.contains("org-ca.pem"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed input: the error names the file.

#[test]
fn malformed_pem_gives_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let good = Pki::new();
    let good_cert = std::fs::read_to_string(good.ca_cert()).unwrap();
    let cases = [
        write("not-pem.crt", "this is not a certificate\n"),
        write("truncated.crt", &good_cert[..good_cert.len() / 2]),
        write(
            "bad-base64.crt",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        ),
        write(
            "not-x509.crt",
            "-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n",
        ),
    ];
    for path in &cases {
        let err = pki::inspect(path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let err = Ca::load(path, &good.dir.join("ca.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    let bad_key = write(
        "bad.key",
        "-----BEGIN PRIVATE KEY-----\nAAECAw==\n-----END PRIVATE KEY-----\n",
    );
    let err = Ca::load(&good.ca_cert(), &bad_key).unwrap_err().to_string();
    assert!(err.contains("bad.key"), "{err}");
    assert!(!err.contains("AAECAw"), "no key material in errors: {err}");

    let missing = tmp.path().join("missing.crt");
    let err = pki::inspect(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.crt"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The command line.

/// `pgkeep pki <sub> --dir DIR <words...>`; `words` is split on white space.
fn pki_cmd(sub: &str, dir: &Path, words: &str) -> Command {
    let mut cmd = Command::cargo_bin("pgkeep").expect("the pgkeep binary");
    cmd.args(["pki", sub, "--dir"])
        .arg(dir)
        .args(words.split_whitespace());
    cmd
}

fn show_cmd(file: &Path) -> Command {
    let mut cmd = Command::cargo_bin("pgkeep").expect("the pgkeep binary");
    cmd.args(["pki", "show"]).arg(file);
    cmd
}

#[test]
fn cli_init_issue_show() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let ca = dir.join("ca.crt");

    pki_cmd("init", &dir, "--cn cli-CA --days 100")
        .assert()
        .success()
        .stdout(predicate::str::contains("created CA \"cli-CA\""));
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca), 0o644);
    pki_cmd("init", &dir, "").assert().failure().stderr(
        predicate::str::contains("ca.key already exists").and(predicate::str::contains("--force")),
    );

    let words = "--service postgres --name n1 --host n1.pgkeep.test,lb.pgkeep.test --ip 127.0.0.11 --days 10";
    pki_cmd("issue", &dir, words)
        .assert()
        .success()
        .stdout(predicate::str::contains("CN=n1.pgkeep.test (server)"));
    let cert = dir.join("postgres-n1.crt");
    assert_eq!(mode(&dir.join("postgres-n1.key")), 0o600);
    assert_eq!(mode(&cert), 0o644);
    verify_server(&ca, &cert, "lb.pgkeep.test").unwrap();
    verify_server(&ca, &cert, "127.0.0.11").unwrap();
    assert!(verify_server(&ca, &cert, "n2.pgkeep.test").is_err());

    // Without --days the default (397) is shortened to what the 100-day CA has left.
    pki_cmd("issue", &dir, "--service replication --name n1")
        .assert()
        .success()
        .stdout(
            predicate::str::contains("CN=replicator (client)")
                .and(predicate::str::contains("shortened")),
        );
    verify_client(&ca, &dir.join("replication-n1.crt")).unwrap();
    // An explicit --days past the CA's end is an error.
    pki_cmd("issue", &dir, "--service rewind --name n1 --days 200")
        .assert()
        .failure()
        .stderr(predicate::str::contains("at most"));

    show_cmd(&cert).assert().success().stdout(
        predicate::str::contains("subject CN:         n1.pgkeep.test")
            .and(predicate::str::contains("issuer CN:          cli-CA"))
            .and(predicate::str::contains("serial:"))
            .and(predicate::str::contains("not before:"))
            .and(predicate::str::contains("not after:"))
            .and(predicate::str::contains("days left:          10.0"))
            .and(predicate::str::contains(
                "key usage:          digitalSignature",
            ))
            .and(predicate::str::contains("extended key usage: serverAuth"))
            .and(predicate::str::contains(
                "DNS names:          n1.pgkeep.test, lb.pgkeep.test",
            ))
            .and(predicate::str::contains("IP addresses:       127.0.0.11")),
    );

    let out = show_cmd(&cert)
        .args(["--format", "json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["subject_cn"], "n1.pgkeep.test");
    assert_eq!(v["issuer_cn"], "cli-CA");
    assert_eq!(v["ekus"], serde_json::json!(["serverAuth"]));
    assert_eq!(v["ip_addresses"], serde_json::json!(["127.0.0.11"]));
    assert!(v["seconds_left"].as_i64().unwrap() > 9 * 86_400);
}

#[test]
fn cli_refuses_bad_requests_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki_cmd("issue", dir, "--service operator --name alice")
        .assert()
        .failure()
        .stderr(predicate::str::contains("pgkeep pki init"));
    pki_cmd("init", dir, "").assert().success();

    // A server certificate without any name.
    pki_cmd("issue", dir, "--service restapi --name n1")
        .assert()
        .failure()
        .stderr(predicate::str::contains("host name or address"));
    // A client certificate with host names.
    pki_cmd(
        "issue",
        dir,
        "--service etcd-client --name n1 --host n1.pgkeep.test",
    )
    .assert()
    .failure()
    .stderr(predicate::str::contains("client identities"));
    // A certificate for the superuser role.
    pki_cmd("issue", dir, "--service rewind --name n1 --role postgres")
        .assert()
        .failure()
        .stderr(predicate::str::contains("peer authentication"));
    // An unknown service is a usage error (exit 2) listing the valid ones.
    pki_cmd("issue", dir, "--service etcd --name n1")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("etcd-server"));
    // Re-issuing needs --force.
    let words = "--service operator --name alice";
    pki_cmd("issue", dir, words).assert().success();
    pki_cmd("issue", dir, words)
        .assert()
        .failure()
        .stderr(predicate::str::contains("--force"));
    pki_cmd("issue", dir, &format!("{words} --force"))
        .assert()
        .success();

    // A malformed file is named.
    let bad = dir.join("bad.pem");
    std::fs::write(&bad, "garbage").unwrap();
    show_cmd(&bad)
        .assert()
        .failure()
        .stderr(predicate::str::contains(bad.to_str().unwrap()));
}

#[test]
fn cli_adopts_and_signs_with_an_organisation_ca() {
    let (tmp, org_cert, org_key) = org_files(ORG_EC_CERT, ORG_EC_KEY);
    let dir = tmp.path().join("pki");
    let org = format!(
        "--ca-cert {} --ca-key {}",
        org_cert.display(),
        org_key.display()
    );

    pki_cmd("init", &dir, &org)
        .assert()
        .success()
        .stdout(predicate::str::contains("Example Org Root CA"));
    assert!(dir.join("ca.crt").exists());
    assert!(
        !dir.join("ca.key").exists(),
        "the organisation's key is not copied"
    );

    let words = format!("{org} --service etcd-server --name e1 --host e1.org.test --ip 10.0.0.5");
    pki_cmd("issue", &dir, &words)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "CN=etcd-server-e1 (server+client)",
        ));
    let cert = dir.join("etcd-server-e1.crt");
    verify_server(&dir.join("ca.crt"), &cert, "10.0.0.5").unwrap();
    verify_server(&dir.join("ca.crt"), &cert, "e1.org.test").unwrap();
    verify_client(&dir.join("ca.crt"), &cert).unwrap();

    // A key readable by others is refused, naming the file.
    std::fs::set_permissions(&org_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    pki_cmd(
        "issue",
        &dir,
        &format!("{org} --service operator --name bob"),
    )
    .assert()
    .failure()
    .stderr(predicate::str::contains("org-ca.key").and(predicate::str::contains("chmod 600")));
}

// ---------------------------------------------------------------------------------------------

// Organisation CA fixtures, made once with OpenSSL 3.0 (as an organisation would; pgkeep itself
// never runs openssl):
//   openssl ecparam -name prime256v1 -genkey -noout -out ec.key            (SEC1 "EC PRIVATE KEY")
//   openssl req -x509 -new -key ec.key -sha256 -days 36500 \
//     -subj "/C=DE/O=Example Org/OU=Platform/CN=Example Org Root CA" \
//     -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
//   the same key with -subj "/DC=com/DC=example/CN=Example DC CA"          (repeated attribute)
//   openssl genrsa -traditional -out rsa.key 2048                           (PKCS#1 "RSA PRIVATE KEY")
//   openssl req -x509 -new -key rsa.key ... -subj "/O=Example Org/CN=Example Org RSA CA"
// They are test keys with no value outside this file.

const ORG_EC_KEY: &str = "\
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFJbC07jOPQFva+Zmj1jAskTZOSb4kCnVn4nbOn8AqwYoAoGCCqGSM49
AwEHoUQDQgAExkSBEJJfALt2h0DIHDepptXuahhWeHp/M4uE9uJ76s4OLlPrO9D4
+OUL2f8V2oe4fOWxiDHlmgEseb0ZUqeBHg==
-----END EC PRIVATE KEY-----
";

const ORG_EC_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIICDzCCAbWgAwIBAgIUbXVh+Dp8UQaBKuuvp0qhJKp7zb8wCgYIKoZIzj0EAwIw
VDELMAkGA1UEBhMCREUxFDASBgNVBAoMC0V4YW1wbGUgT3JnMREwDwYDVQQLDAhQ
bGF0Zm9ybTEcMBoGA1UEAwwTRXhhbXBsZSBPcmcgUm9vdCBDQTAgFw0yNjExMjkx
MjMxMTdaGA8yMTI2MTEwNTEyMzExN1owVDELMAkGA1UEBhMCREUxFDASBgNVBAoM
C0V4YW1wbGUgT3JnMREwDwYDVQQLDAhQbGF0Zm9ybTEcMBoGA1UEAwwTRXhhbXBs
ZSBPcmcgUm9vdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMZEgRCSXwC7
dodAyBw3qabV7moYVnh6fzOLhPbie+rODi5T6zvQ+PjlC9n/FdqHuHzlsYgx5ZoB
LHm9GVKngR6jYzBhMB0GA1UdDgQWBBSJAW01T5YvjSj8QvZg9KKH9xjMODAfBgNV
HSMEGDAWgBSJAW01T5YvjSj8QvZg9KKH9xjMODAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAKBggqhkjOPQQDAgNIADBFAiBbLie4cbOyt1Lo1fyPiJau
mBrF56/hQR3mNwdfBXYqeAIhAKhovKOuIS9M9Yo9bWCJBwRh3vGS3dcJ/3oo+c3n
Kn0R
-----END CERTIFICATE-----
";

const ORG_DC_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIB8jCCAZmgAwIBAgIUYqxcfHUvnUIZ6hvasuI6Lc0gQNEwCgYIKoZIzj0EAwIw
RjETMBEGCgmSJomT8ixkARkWA2NvbTEXMBUGCgmSJomT8ixkARkWB2V4YW1wbGUx
FjAUBgNVBAMMDUV4YW1wbGUgREMgQ0EwIBcNMjYxMTI5MTIzMTE3WhgPMjEyNjEx
MDUxMjMxMTdaMEYxEzARBgoJkiaJk/IsZAEZFgNjb20xFzAVBgoJkiaJk/IsZAEZ
FgdleGFtcGxlMRYwFAYDVQQDDA1FeGFtcGxlIERDIENBMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAExkSBEJJfALt2h0DIHDepptXuahhWeHp/M4uE9uJ76s4OLlPr
O9D4+OUL2f8V2oe4fOWxiDHlmgEseb0ZUqeBHqNjMGEwHQYDVR0OBBYEFIkBbTVP
li+NKPxC9mD0oof3GMw4MB8GA1UdIwQYMBaAFIkBbTVPli+NKPxC9mD0oof3GMw4
MA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoGCCqGSM49BAMCA0cA
MEQCIBr73Qjle7e1ggRJTRP3YSahIlq7I2W4LqiKyg+sJkHWAiA8do23Dy5+abie
7GQtW+1dabd/pgN3GDJhzgFuu5SF/w==
-----END CERTIFICATE-----
";

const ORG_RSA_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----
MIIEpAIBAAKCAQEAuXEOQNQPGIXR9M1PIYHJdK2l+vwb70IF6xGjRuMJY1gzSmie
v+H7AdOei8zuJ+04GrSPx3FkZGq928uOPEq8vgqcuR3yUfN/2SMy7dp9n8grIHgq
t/9B12et4Vk2kPNnL551Pa7suXC/pal9fy1Sl+K3j2rpFC0vN/rEWdXT1nWSJyq2
2LhgF1OSfTWOz73C4tF1mGCIJZDxYozY2RGqvCqNtwhIDZ9k27SFFJ17KDzPKboz
vpo2C/K9txDvJ+8JiNKobi+wNuSOmo2qTXg0/VQDeshlInSPClB1Mmwu+EU4qbLB
FPlWPxqTojVFZKLbHdyyMyws2UilZOVzae0EPQIDAQABAoIBAAjuSzGvlM+JSFiK
F7zFH6LlJwh8okrGSvssdQjZr87PRV8YxUZ392r52lmgw7p8B/bvSbpg+WUFqAGh
HsdEES103OHkcZJlT/uw4IfIfULX9M3CQ8prOmxJk7v13DUkZ8yJDNvs4/01UyGD
FWZt1Bu5AT6gtztvxqWjR9gMvoBGQcDFRoGq1W5RQDwRM7xiuvQBQjwpbiNz7c8b
ak7ZDqZKVr9wcB71y9HbsbkStUzGL4X4DJODT88NhLAMasEGN6TszdoG+GAgRSTI
qHd+DzoEx7cw/fJrVdSiuZqrAqw2rDlTnpIQmhOipBJwUJLT2PjboUD0ob8iCXO9
m6srwHkCgYEA5b7V2Dkklluf1nrmG7ke6TphFlHT0Ul/Hkp/R6ST1Wm/EN78QohU
zhSXqUWOHh9ZYWOxSVAwvjuQPhTa0xt/Kp7MfFS2aMRZd+J3AfwMhzXzwIzmR8FV
PJSTmjG4gGpcErJzUvO7OB46tRZxnlAtXCdteSR60FtyGS0UMe0HCzkCgYEAzqIe
i3Nn+zKIPEwqRvAOU8TE8wWby+WIm408t/lakkcLl/PKmjOZ5AqyEnmOeKyMDOWP
XtFK9xrq53z5UG3upo1cgrJrRoHCfAo/ZPcVXHX2YAJTfmnCAZ3xZQSqu3PoV5/y
XWLdtVED58kxc+3gt8h1LOJV5QRVjrCLCwqKjSUCgYEAq4OiZb+TPuS8GQS7EOtM
1lUM8fq4pT+3NMfs6XFGJEbDqzatIIZiuU7KQkZ46KgCtCAW1GKXYQ1ai95J1txq
PUk7433ih6g+Gq/opISkXbS7en411E/S8F0DLFP+J3A/uH2cdssac7Sto09UFxpI
IsoUgiHnxfDe50iuEO+hGJECgYEAn78B8jlUSAU3Aba4cIMh8G0M/fx2B9n6FJfK
O0jRVokKU30sQq5l6MDEDjhfhreOxmGqx1jypbrvo+sgK6fxel2LCZe6C5ZBrveV
Lw8+Om8P/AWQWwiT7gAXIUvMWoMvOp7zFnNah9SMOmN2kfNzaWHWBM8uLJF/O4MM
24pYtukCgYBArqV1IFPPMuNCzqfDZaVctPQpxLLbsYti1kDMz5gk+YoBoJJ1Dgl6
8LlQm7m1WxnK/F3aktNEyZ8sULBE12B/eaYvOtez5kds3ec8TZ7tyu2upzMn6iK8
vyEmDjok4i/9vUD0YQI2vNBwoQKh/EgE2VHfijabEAdKhVnJQzKdvw==
-----END RSA PRIVATE KEY-----
";

const ORG_RSA_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIDWTCCAkGgAwIBAgIUNwmZcAUsqnwTq36vrPt/rie0BCIwDQYJKoZIhvcNAQEL
BQAwMzEUMBIGA1UECgwLRXhhbXBsZSBPcmcxGzAZBgNVBAMMEkV4YW1wbGUgT3Jn
IFJTQSBDQTAgFw0yNjExMjkxMjMxMTdaGA8yMTI2MTEwNTEyMzExN1owMzEUMBIG
A1UECgwLRXhhbXBsZSBPcmcxGzAZBgNVBAMMEkV4YW1wbGUgT3JnIFJTQSBDQTCC
ASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBALlxDkDUDxiF0fTNTyGByXSt
pfr8G+9CBesRo0bjCWNYM0ponr/h+wHTnovM7iftOBq0j8dxZGRqvdvLjjxKvL4K
nLkd8lHzf9kjMu3afZ/IKyB4Krf/QddnreFZNpDzZy+edT2u7Llwv6WpfX8tUpfi
t49q6RQtLzf6xFnV09Z1kicqtti4YBdTkn01js+9wuLRdZhgiCWQ8WKM2NkRqrwq
jbcISA2fZNu0hRSdeyg8zym6M76aNgvyvbcQ7yfvCYjSqG4vsDbkjpqNqk14NP1U
A3rIZSJ0jwpQdTJsLvhFOKmywRT5Vj8ak6I1RWSi2x3csjMsLNlIpWTlc2ntBD0C
AwEAAaNjMGEwHQYDVR0OBBYEFPdQ5mMc7RfcsnKl7cB/Tn+NWm6tMB8GA1UdIwQY
MBaAFPdQ5mMc7RfcsnKl7cB/Tn+NWm6tMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P
AQH/BAQDAgEGMA0GCSqGSIb3DQEBCwUAA4IBAQC42y6Y1weDUecB8sd5QpvNVKBY
TRJYB6xzqpnMwNO51JhTvzBF12qNvEnEHfD8lqt6ImOIAVmc+NApn2MyDXJbXb0r
yk4SQajNaLKiNGe+QoQplFUCt/rhtEBOgupGOsaY1XNUeLg542iyZKVyLt5/OwKI
VPsaA7ZGSdzu6yS8q0Fhg/pDKatO4rStcQGWgP6f0Wzf0vEpyQPgr5AdobPxdX6j
aanqkiHz0dGxP3cLTSn8aGTPFoHt3bvFamJM4l00GIcGAwKBTzb3OCnmU9qgfjfZ
mFRixPxr3o86oahPYj+7IZmBOMsgn30ZAMySkQhNjkkmPHQaiWGWKboVKlkR
-----END CERTIFICATE-----
";
