//! PostgreSQL's `ldap` and `cert` authentication from `postgresql.pg_hba`, end to end.
//!
//! LDAP: a private slapd
//! over LDAPS (certificate from the test CA), a one-node agent cluster whose postmaster trusts
//! that CA through `postgresql.ldap_ca_file`, and a role without a password in PostgreSQL that
//! logs in over verify-full TLS with its LDAP password. A wrong password is refused, and so is
//! the right one while slapd is down (LDAP is really consulted). An `ldap` line without TLS to
//! the LDAP server is refused by the configuration check.
//!
//! cert: an application role logs in with a client certificate of the cluster's CA whose name
//! is the role's, and with no password; another name's certificate and no certificate are
//! refused.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use pgkeep_testkit::{
    AgentCluster, ClientCert, CommandOutput, EtcdCluster, LDAP_PEOPLE, PG_BIN_DIR, ServiceUser,
    Slapd,
};

/// A new 0600 file holding `text` (a password never goes into an argument or the environment).
fn secret_file(path: &Path, text: &str) {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn random_password() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("Ld-{:016x}", h.finish())
}

/// `psql` as `user` over TLS (verify-full against the test CA, by the node's DNS name), the
/// password from a 0600 passfile.
fn login(
    env: &pgkeep_testkit::Env,
    c: &AgentCluster,
    user: &str,
    password: &str,
    sql: &str,
) -> CommandOutput {
    let a = &c.agents[0];
    let passfile = env.tmp_dir().join("ldap.pgpass");
    secret_file(
        &passfile,
        &format!(
            "*:*:*:{user}:{}\n",
            password.replace('\\', "\\\\").replace(':', "\\:")
        ),
    );
    let conninfo = format!(
        "host={} port={} dbname=postgres user={user} sslmode=verify-full sslrootcert={} \
         passfile={} connect_timeout=10",
        a.node.dns_name,
        a.pg_port,
        env.ca_cert_path().display(),
        passfile.display()
    );
    let out = env
        .run(
            &ServiceUser::root(),
            &env.tmp_dir(),
            Path::new(PG_BIN_DIR).join("psql"),
            &[
                "-XAtq".as_ref(),
                "-d".as_ref(),
                conninfo.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
            &[],
            Duration::from_secs(30),
        )
        .unwrap();
    let _ = std::fs::remove_file(&passfile);
    out
}

fn pg_log(c: &AgentCluster) -> String {
    std::fs::read_to_string(c.agents[0].node.dir.join("conf/postgresql.log")).unwrap_or_default()
}

/// Inserts `lines` (2-space indented YAML) at the top of the `postgresql:` section.
fn add_postgresql_keys(text: &str, lines: &str) -> String {
    assert!(text.contains("\npostgresql:\n"));
    text.replacen("\npostgresql:\n", &format!("\npostgresql:\n{lines}"), 1)
}

/// `pgkeep config check` on `text`, written as a root-owned 0600 file.
fn config_check(path: &Path, text: &str) -> std::process::Output {
    secret_file(path, text);
    std::process::Command::new(assert_cmd::cargo::cargo_bin("pgkeep"))
        .args(["config", "check", "-c"])
        .arg(path)
        .output()
        .unwrap()
}

/// Checks the agent's configuration `text` (through `probe`), installs it, starts the one-node
/// cluster and creates the login role `role` without a password.
fn start_with(c: &mut AgentCluster, probe: &Path, text: String, role: &str) {
    let out = config_check(probe, &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&c.agents[0].config, text).unwrap();
    c.start_all().unwrap();
    c.wait("a running primary", Duration::from_secs(90), |c| {
        c.primary() == Some(0)
    })
    .unwrap();
    let created = c.psql(0, &format!("CREATE ROLE {role} LOGIN")).unwrap();
    assert!(created.success(), "{}", created.stderr);
}

#[test]
fn ldap_login_over_tls_is_checked_by_slapd() {
    let env = pgkeep_testkit::Env::new("ldap").unwrap();
    let password = random_password();
    let mut slapd = Slapd::prepare(&env, &[("alice", &password)]).unwrap();
    slapd.start().unwrap();
    let who = slapd.bind_as("alice", &password).unwrap();
    assert!(who.success(), "slapd refuses alice: {}", who.stderr);
    assert!(
        !slapd
            .bind_as("alice", "not-her-password")
            .unwrap()
            .success(),
        "slapd accepts a wrong password"
    );

    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "ldap", 1, &bin).unwrap();
    let a = &c.agents[0];
    // The trust anchor for the LDAP server: explicitly, a copy of the environment's CA (the
    // default would be the node's ssl_ca_file, the same CA here).
    let ldap_ca = env
        .install_ca(&a.node.dir.join("conf"), &a.node.user)
        .unwrap();
    let hba = |tls: &str| {
        format!(
            "hostssl all alice 127.0.0.0/8 ldap ldapserver={} ldapport={}{tls} \
             ldapprefix=\"uid=\" ldapsuffix=\",{LDAP_PEOPLE}\"",
            slapd.host(),
            slapd.port
        )
    };
    let original = std::fs::read_to_string(&a.config).unwrap();
    let keys = |line: &str| {
        format!(
            "  ldap_ca_file: {}\n  pg_hba:\n    - '{line}'\n",
            ldap_ca.display()
        )
    };

    // Without TLS to the LDAP server the line is refused, naming the key, the line and the fix.
    let probe = env.tmp_dir().join("ldap-probe.yml");
    let out = config_check(&probe, &add_postgresql_keys(&original, &keys(&hba(""))));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an ldap line without TLS was accepted"
    );
    assert!(
        err.contains("postgresql.pg_hba[0]")
            && err.contains("ldapserver=")
            && err.contains("ldapscheme=ldaps"),
        "{err}"
    );
    // A CA file that does not exist is refused at load too.
    let missing = add_postgresql_keys(&original, &keys(&hba(" ldapscheme=ldaps")))
        .replace("ldap_ca_file: /", "ldap_ca_file: /nonexistent/");
    let out = config_check(&probe, &missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("postgresql.ldap_ca_file"),
        "{err}"
    );

    let text = add_postgresql_keys(&original, &keys(&hba(" ldapscheme=ldaps")));
    start_with(&mut c, &probe, text, "alice");
    let rule = c
        .psql(
            0,
            "SELECT auth_method FROM pg_hba_file_rules WHERE user_name = '{alice}'",
        )
        .unwrap();
    assert_eq!(rule.stdout.trim(), "ldap", "{}", rule.stderr);

    // The right LDAP password: logged in over TLS, and slapd saw alice's bind.
    let ok = login(
        &env,
        &c,
        "alice",
        &password,
        "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(
        ok.success(),
        "alice cannot log in: {}\nslapd:\n{}\npostgres:\n{}",
        ok.stderr,
        slapd.log_tail(30),
        pg_log(&c)
    );
    assert_eq!(ok.stdout.trim(), "alice true");
    let bind = format!("BIND dn=\"{}\"", Slapd::user_dn("alice"));
    assert!(
        slapd.log_tail(200).contains(&bind),
        "slapd did not see alice's bind:\n{}",
        slapd.log_tail(30)
    );

    // A wrong password: refused, and slapd said why.
    let seen = pg_log(&c).len();
    let bad = login(&env, &c, "alice", "not-her-password", "SELECT 1");
    assert!(!bad.success(), "a wrong LDAP password logged in");
    assert!(
        bad.stderr
            .contains("LDAP authentication failed for user \"alice\""),
        "{}",
        bad.stderr
    );
    let since = |from: usize| pg_log(&c).get(from..).unwrap_or_default().to_owned();
    assert!(
        since(seen).contains("Invalid credentials"),
        "{}",
        since(seen)
    );

    // slapd down: the right password no longer logs in.
    slapd.stop().unwrap();
    let seen = pg_log(&c).len();
    let down = login(&env, &c, "alice", &password, "SELECT 1");
    assert!(!down.success(), "alice logged in without the LDAP server");
    assert!(
        down.stderr
            .contains("LDAP authentication failed for user \"alice\""),
        "{}",
        down.stderr
    );
    assert!(
        since(seen).contains("Can't contact LDAP server"),
        "{}",
        since(seen)
    );
    // And back up: it does again (the failure above was slapd's absence, nothing else).
    slapd.start().unwrap();
    let again = login(&env, &c, "alice", &password, "SELECT 1");
    assert!(again.success(), "{}", again.stderr);
}

/// `psql` as `user` over verify-full TLS, presenting `cert` (if any) and no password.
fn cert_login(
    env: &pgkeep_testkit::Env,
    c: &AgentCluster,
    user: &str,
    cert: Option<&ClientCert>,
    sql: &str,
) -> CommandOutput {
    let a = &c.agents[0];
    let mut conninfo = format!(
        "host={} port={} dbname=postgres user={user} sslmode=verify-full sslrootcert={} \
         connect_timeout=10",
        a.node.dns_name,
        a.pg_port,
        env.ca_cert_path().display(),
    );
    if let Some(cc) = cert {
        conninfo.push_str(&format!(
            " sslcert={} sslkey={}",
            cc.cert.display(),
            cc.key.display()
        ));
    }
    env.run(
        &ServiceUser::root(),
        &env.tmp_dir(),
        Path::new(PG_BIN_DIR).join("psql"),
        &[
            "-XAtqw".as_ref(),
            "-d".as_ref(),
            conninfo.as_ref(),
            "-c".as_ref(),
            sql.as_ref(),
        ],
        &[],
        Duration::from_secs(30),
    )
    .unwrap()
}

#[test]
fn cert_login_needs_a_certificate_named_after_the_role() {
    let env = pgkeep_testkit::Env::new("certauth").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "certauth", 1, &bin).unwrap();
    let a = &c.agents[0];
    let original = std::fs::read_to_string(&a.config).unwrap();
    let text = add_postgresql_keys(
        &original,
        "  pg_hba:\n    - 'hostssl all carol 127.0.0.0/8 cert'\n",
    );
    let probe = env.tmp_dir().join("cert-probe.yml");
    start_with(&mut c, &probe, text, "carol");

    let carol = env.client_cert("carol").unwrap();
    let ok = cert_login(
        &env,
        &c,
        "carol",
        Some(&carol),
        "SELECT current_user || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(ok.success(), "carol cannot log in: {}", ok.stderr);
    assert_eq!(ok.stdout.trim(), "carol /CN=carol");

    let mallory = env.client_cert("mallory").unwrap();
    let wrong = cert_login(&env, &c, "carol", Some(&mallory), "SELECT 1");
    assert!(
        !wrong.success(),
        "another name's certificate logged in as carol"
    );
    assert!(
        wrong
            .stderr
            .contains("certificate authentication failed for user \"carol\""),
        "{}",
        wrong.stderr
    );
    let none = cert_login(&env, &c, "carol", None, "SELECT 1");
    assert!(!none.success(), "carol logged in without a certificate");
}
