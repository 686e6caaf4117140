//! Issue 6's security suite against a real two-node cluster: the remote-code-execution class
//! (Patroni #1734) closed both through the REST API and through etcd directly, plaintext
//! refused on every listener, and idle TLS clients that cannot starve health checks.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use pgkeep_testkit::{AgentCluster, Env, EtcdCluster};
use reqwest::Method;

use crate::clients::Clients;

const SCOPE: &str = "sec";

fn sql(c: &AgentCluster, i: usize, q: &str) -> String {
    let out = c.psql(i, q).unwrap();
    assert!(out.success(), "{q}: {}", out.stderr);
    out.stdout.trim().to_owned()
}

/// Archiving on with a harmless local command: the test then shows that archiving runs, and
/// that it runs the local command, never one from the DCS.
fn with_local_archiving(c: &AgentCluster) {
    for a in &c.agents {
        let text = std::fs::read_to_string(&a.config).unwrap();
        let text = text.replacen(
            "    fsync: \"off\"\n",
            "    fsync: \"off\"\n    archive_mode: \"on\"\n    archive_command: /bin/true\n",
            1,
        );
        std::fs::write(&a.config, text).unwrap();
    }
}

fn put_config(etcd: &EtcdCluster, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = format!("/service/{SCOPE}/config");
    let out = etcd.etcdctl(&["get", &path, "--print-value-only"]).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    edit(&mut config);
    let put = etcd.etcdctl(&["put", &path, &config.to_string()]).unwrap();
    assert!(put.success(), "{}", put.stderr);
}

fn agent_log(c: &AgentCluster, i: usize) -> String {
    let svc = c.agents[i].service.as_ref().unwrap();
    std::fs::read_to_string(svc.log_path()).unwrap_or_default()
}

#[test]
fn remote_configuration_runs_nothing_and_plaintext_is_refused() {
    let env = Env::new("security").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, SCOPE, 2, &bin).unwrap();
    with_local_archiving(&c);
    c.start_all().unwrap();
    c.wait(
        "a primary and a streaming replica",
        Duration::from_secs(90),
        |c| c.primary().is_some_and(|p| c.replicas_streaming(p)),
    )
    .unwrap();
    let p = c.primary().unwrap();
    let r = 1 - p;
    let marker = env.root().join("pwned");
    let touch = format!("/usr/bin/touch {}", marker.display());
    let Clients {
        operator: admin,
        anonymous,
        rt,
    } = Clients::new(&env, &c);
    let base = |i: usize| c.agents[i].api_base();

    // Unauthenticated state-changing calls are refused.
    let resp = rt
        .block_on(anonymous.post_json(&format!("{}/restart", base(p)), "{}"))
        .unwrap();
    // 403 here: this cluster also requires a client certificate on the operator list.
    assert!(matches!(resp.status, 401 | 403), "{}", resp.text());

    // PATCH /config with a command, a file or a callback: 422 naming the key, nothing written.
    let before = etcd
        .etcdctl(&[
            "get",
            &format!("/service/{SCOPE}/config"),
            "--print-value-only",
        ])
        .unwrap()
        .stdout;
    for (patch, key) in [
        (
            serde_json::json!({"postgresql": {"parameters": {"archive_command": touch}}}),
            "archive_command",
        ),
        (
            serde_json::json!({"postgresql": {"recovery_conf": {"restore_command": touch}}}),
            "recovery_conf",
        ),
        (
            serde_json::json!({"postgresql": {"callbacks": {"on_start": touch}}}),
            "callbacks",
        ),
        (
            serde_json::json!({"postgresql": {"parameters": {"shared_preload_libraries": "/tmp/evil"}}}),
            "shared_preload_libraries",
        ),
    ] {
        let resp = rt
            .block_on(admin.send_json(
                Method::PATCH,
                &format!("{}/config", base(p)),
                &patch.to_string(),
                None,
            ))
            .unwrap();
        assert_eq!(resp.status, 422, "{patch}: {}", resp.text());
        assert!(resp.text().contains(key), "{}", resp.text());
    }
    let after = etcd
        .etcdctl(&[
            "get",
            &format!("/service/{SCOPE}/config"),
            "--print-value-only",
        ])
        .unwrap()
        .stdout;
    assert_eq!(before, after, "a refused PATCH wrote nothing");

    // The same values written straight into etcd (as `patronictl edit-config` could): logged as
    // security events and never applied.
    put_config(&etcd, |cfg| {
        cfg["postgresql"] = serde_json::json!({
            "parameters": {"archive_command": touch, "restore_command": touch},
            "recovery_conf": {"restore_command": touch},
        });
    });
    c.wait(
        "both agents report the injected keys as security events",
        Duration::from_secs(30),
        |c| (0..2).all(|i| agent_log(c, i).contains("archive_command")),
    )
    .unwrap();
    let archived = |c: &AgentCluster| -> i64 {
        sql(c, p, "SELECT archived_count FROM pg_stat_archiver")
            .parse()
            .unwrap()
    };
    let before = archived(&c);
    sql(&c, p, "CREATE TABLE IF NOT EXISTS sec_t (x int)");
    sql(&c, p, "INSERT INTO sec_t VALUES (1)");
    sql(&c, p, "SELECT pg_switch_wal()");
    c.wait("the segment archived", Duration::from_secs(30), |c| {
        archived(c) > before
    })
    .unwrap();
    assert_eq!(sql(&c, p, "SHOW archive_command"), "/bin/true");
    // A replica restart: recovery settings come from the local file only.
    let resp = rt
        .block_on(admin.post_json(&format!("{}/restart", base(r)), "{}"))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    c.wait("the replica streams again", Duration::from_secs(60), |c| {
        c.replicas_streaming(p)
    })
    .unwrap();
    assert_eq!(sql(&c, r, "SHOW restore_command"), "");
    assert!(!marker.exists(), "an injected command ran");

    // Plaintext on every listener.
    let pg = &c.agents[p];
    let out = std::process::Command::new(Path::new(pgkeep_testkit::PG_BIN_DIR).join("psql"))
        .arg(format!(
            "host={} port={} dbname=postgres user=app sslmode=disable connect_timeout=5",
            pg.node.addr, pg.pg_port
        ))
        .args(["-Xc", "SELECT 1"])
        .env("PGPASSWORD", "wrong-anyway")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no encryption"),
        "a plaintext PostgreSQL connection: {err}"
    );
    let mut raw = TcpStream::connect((pg.node.addr, pg.api_port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET /primary HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1 200"),
        "plaintext HTTP answered"
    );
    let plain_etcd: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| e.replacen("https://", "http://", 1))
        .collect();
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", plain_etcd.join(",")))
        .args([
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "get",
            "/service/",
            "--prefix",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "plaintext etcd answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Fifty idle connections (TCP open, no TLS handshake) do not starve health checks.
    let timed = || {
        let t = Instant::now();
        let resp = rt
            .block_on(anonymous.get(&format!("{}/primary", base(p))))
            .unwrap();
        assert_eq!(resp.status, 200);
        t.elapsed()
    };
    let quiet = (0..5).map(|_| timed()).max().unwrap();
    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect((pg.node.addr, pg.api_port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let busy = (0..5).map(|_| timed()).max().unwrap();
    println!("[security] /primary slowest of 5: {quiet:?} quiet, {busy:?} with 50 idle clients");
    // A server serialised behind the idle handshakes would take its handshake timeout.
    assert!(busy < Duration::from_secs(2), "{busy:?}");
    drop(idle);
    drop(env);
}

/// `psql` over TCP and TLS with a password, as an application connects.
fn tcp_psql(
    a: &pgkeep_testkit::Agent,
    user: &str,
    pass: &str,
    db: &str,
    q: &str,
) -> std::process::Output {
    std::process::Command::new(Path::new(pgkeep_testkit::PG_BIN_DIR).join("psql"))
        .arg(format!(
            "host={} port={} dbname={db} user={user} sslmode=require connect_timeout=5",
            a.node.addr, a.pg_port
        ))
        .args(["-XAtqc", q])
        .env("PGPASSWORD", pass)
        .output()
        .unwrap()
}

/// Item 5: `bootstrap.applications` gives an application its own database and schema owned by
/// a NOLOGIN role, a login role with data rights only and a read-only login role; PUBLIC can
/// neither connect nor create.
#[test]
fn bootstrap_creates_least_privilege_application_roles() {
    let env = Env::new("apps").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "apps", 1, &bin).unwrap();
    let a = &c.agents[0];
    let secrets = a.node.dir.join("pki");
    let (pw, ro_pw) = ("shop-Login-Pa55-word", "shop-Read-Only-Pa55");
    let (pw_file, ro_file) = (secrets.join("shop.pw"), secrets.join("shop_ro.pw"));
    for (f, p) in [(&pw_file, pw), (&ro_file, ro_pw)] {
        std::fs::write(f, p).unwrap();
        a.node.user.chown(f).unwrap();
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let text = std::fs::read_to_string(&a.config).unwrap();
    let text = text.replacen(
        "  initdb:",
        &format!(
            "  applications:\n    - {{name: shop, password_file: {}, readonly_password_file: {}}}\n  initdb:",
            pw_file.display(),
            ro_file.display()
        ),
        1,
    );
    std::fs::write(&a.config, text).unwrap();
    c.start_all().unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary() == Some(0)
    })
    .unwrap();
    c.wait("the application's schema", Duration::from_secs(30), |c| {
        c.psql_db(
            0,
            "shop",
            "SELECT 1 FROM pg_namespace WHERE nspname = 'shop'",
        )
        .is_ok_and(|o| o.stdout.trim() == "1")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent_log(&c, 0)));
    let a = &c.agents[0];
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let denied = |out: std::process::Output| {
        assert!(
            !out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Migrations run as the owner (here through the local superuser with SET ROLE).
    let out = c
        .psql_db(
            0,
            "shop",
            "SET ROLE shop_owner; CREATE TABLE shop.orders (id int PRIMARY KEY, item text);",
        )
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    let app = |q: &str| tcp_psql(a, "shop", pw, "shop", q);
    assert_eq!(ok(app("SHOW search_path")), "shop");
    ok(app("INSERT INTO orders VALUES (1, 'book')"));
    ok(app("UPDATE orders SET item = 'pen' WHERE id = 1"));
    assert!(denied(app("CREATE TABLE mine (x int)")).contains("permission denied"));
    assert!(denied(app("CREATE TABLE public.mine (x int)")).contains("permission denied"));
    assert!(denied(app("DROP TABLE orders")).contains("must be owner"));
    let ro = |q: &str| tcp_psql(a, "shop_ro", ro_pw, "shop", q);
    assert_eq!(ok(ro("SELECT item FROM orders")), "pen");
    assert!(denied(ro("DELETE FROM orders")).contains("permission denied"));
    // Nobody logs in as the owner; PUBLIC cannot connect to the application's database.
    let owner = denied(tcp_psql(a, "shop_owner", pw, "shop", "SELECT 1"));
    assert!(
        owner.contains("not permitted to log in")
            || owner.contains("password authentication failed"),
        "{owner}"
    );
    let roles = ok(tcp_psql(a, "shop", pw, "postgres", "SELECT 1"));
    assert_eq!(
        roles, "1",
        "the login role may still reach postgres (PUBLIC there)"
    );
    let out = c
        .psql(
            0,
            "CREATE ROLE outsider LOGIN PASSWORD 'Outsider-Pa55-word'",
        )
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    let outsider = tcp_psql(a, "outsider", "Outsider-Pa55-word", "shop", "SELECT 1");
    assert!(denied(outsider).contains("permission denied for database"));
    drop(env);
}
