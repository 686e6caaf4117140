use super::*;
use crate::inventory::test_inventory as inv;

fn files(crt: bool) -> Files {
    Files {
        ca_file: "/d/pki/ca.crt".into(),
        client_cert: crt.then(|| "/d/haproxy/haproxy-lb.pem".into()),
        stats_socket: "/d/run/haproxy/admin.sock".into(),
        state_file: "/d/run/haproxy/server-state".into(),
    }
}

fn plan(crt: bool) -> Plan {
    Plan::from_inventory(&inv(), files(crt), DEFAULT_REPLICA_LAG).unwrap()
}

/// The non-comment lines, trimmed.
fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The lines of section `name` (e.g. `backend pg_write`), up to the next section.
fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let all = lines(text);
    let start = all.iter().position(|l| *l == name).unwrap_or_else(|| {
        panic!("no section {name} in:\n{text}");
    });
    all[start + 1..]
        .iter()
        .take_while(|l| {
            !["global", "defaults", "frontend ", "backend ", "listen "]
                .iter()
                .any(|s| l.starts_with(s))
        })
        .copied()
        .collect()
}

#[test]
fn global_and_defaults() {
    let text = render(&plan(true)).unwrap();
    let g = section(&text, "global");
    assert!(g.contains(&"log stderr format raw local0 info"), "{g:?}");
    assert!(g.contains(&"stats socket /d/run/haproxy/admin.sock mode 600 level admin"));
    assert!(g.contains(&"server-state-file /d/run/haproxy/server-state"));
    assert!(g.contains(&"ssl-server-verify required"));
    // No HTTP stats page, no user switch (HAProxy is started as its user).
    assert!(!text.contains("stats enable") && !text.contains("stats uri"));
    let d = section(&text, "defaults");
    for want in [
        "mode tcp",
        "load-server-state-from-file global",
        "timeout connect 1s",
        "timeout check 1s",
    ] {
        assert!(d.contains(&want), "{want} missing from {d:?}");
    }
}

#[test]
fn write_frontend_reaches_the_primary_through_verified_checks() {
    let text = render(&plan(true)).unwrap();
    assert_eq!(
        section(&text, "frontend pg_write"),
        ["bind 127.42.5.41:25100", "default_backend pg_write"]
    );
    let b = section(&text, "backend pg_write");
    assert_eq!(
        b,
        [
            "retries 0",
            "option httpchk GET /primary",
            "http-check expect status 200",
            "default-server inter 1s fastinter 250ms downinter 100ms rise 1 fall 2 \
             on-marked-down shutdown-sessions observe layer4 error-limit 1 on-error sudden-death",
            "server node1 127.42.5.11:25431 check port 28441 check-ssl verify required \
             ca-file /d/pki/ca.crt verifyhost node1.demo.internal check-sni node1.demo.internal \
             crt /d/haproxy/haproxy-lb.pem",
            "server node2 127.42.5.12:25432 check port 28442 check-ssl verify required \
             ca-file /d/pki/ca.crt verifyhost node2.demo.internal check-sni node2.demo.internal \
             crt /d/haproxy/haproxy-lb.pem",
            "server node3 127.42.5.13:25433 check port 28443 check-ssl verify required \
             ca-file /d/pki/ca.crt verifyhost node3.demo.internal check-sni node3.demo.internal \
             crt /d/haproxy/haproxy-lb.pem",
        ]
    );
}

#[test]
fn read_frontend_reaches_replicas_within_the_lag_limit() {
    let mut p = plan(false);
    p.replica_lag = 1_048_576;
    let text = render(&p).unwrap();
    assert_eq!(
        section(&text, "frontend pg_read"),
        ["bind 127.42.5.41:25101", "default_backend pg_read"]
    );
    let b = section(&text, "backend pg_read");
    assert!(
        b.contains(&"option httpchk GET /replica?lag=1048576"),
        "{b:?}"
    );
    assert!(b.contains(&"http-check expect status 200"));
    assert!(b.contains(&"balance leastconn"));
    assert!(b.contains(
        &"default-server inter 1s fastinter 250ms downinter 1s rise 2 fall 2 \
          on-marked-down shutdown-sessions"
    ));
    let servers: Vec<&&str> = b.iter().filter(|l| l.starts_with("server ")).collect();
    assert_eq!(servers.len(), 3);
    // Without a client certificate no `crt`.
    assert!(servers.iter().all(|l| !l.contains(" crt ")));
    assert!(servers[1].contains("verifyhost node2.demo.internal check-sni node2.demo.internal"));
}

#[test]
fn every_server_check_verifies_and_nothing_disables_it() {
    for crt in [true, false] {
        let text = render(&plan(crt)).unwrap();
        assert!(!text.contains("verify none"), "{text}");
        assert!(!text.contains("ssl-server-verify none"));
        let servers: Vec<&str> = lines(&text)
            .into_iter()
            .filter(|l| l.starts_with("server "))
            .collect();
        assert_eq!(servers.len(), 6);
        for s in servers {
            assert!(s.contains(" check port "), "{s}");
            assert!(
                s.contains(" check-ssl verify required ca-file /d/pki/ca.crt "),
                "{s}"
            );
            assert!(
                s.contains(" verifyhost ") && s.contains(" check-sni "),
                "{s}"
            );
            // Client traffic is plain TCP to PostgreSQL (which does TLS itself).
            assert!(!s.contains(" ssl "), "{s}");
        }
    }
    // The timing rationale is in the file.
    let text = render(&plan(true)).unwrap();
    assert!(text.contains("# Check timings and why:"));
}

#[test]
fn ipv6_and_durations() {
    assert_eq!(hdur(Duration::from_millis(250)), "250ms");
    assert_eq!(hdur(Duration::from_secs(2)), "2s");
    assert_eq!(hdur(Duration::from_millis(1500)), "1500ms");
    assert_eq!(haddr("[::1]:5432".parse().unwrap()), "ipv6@::1:5432");
    assert_eq!(haddr("10.0.0.1:5432".parse().unwrap()), "10.0.0.1:5432");
}

#[test]
fn bad_plans_are_refused() {
    let mut i = inv();
    i.load_balancer = None;
    assert!(Plan::from_inventory(&i, files(true), 1).is_err());

    let mut p = plan(true);
    p.files.ca_file = "relative/ca.crt".into();
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.files.client_cert = Some("/d/my cert.pem".into());
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.files.stats_socket = "/d/x#y".into();
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.read_bind = p.write_bind;
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.servers[1].name = "node1".into();
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.servers[0].api_name = "node1 ca-file /tmp/x".into();
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.checks.fall = 0;
    assert!(render(&p).is_err());
    let mut p = plan(true);
    p.servers.clear();
    assert!(render(&p).is_err());
}
