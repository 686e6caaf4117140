//! Health codes, transport security, robustness and keep-alive of the REST API.

use super::*;

#[tokio::test]
async fn health_codes_follow_the_published_snapshot() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;
    let c = pki.client_for(None);

    for (path, want) in [
        ("/", 200),
        ("/primary", 200),
        ("/leader", 200),
        ("/read-write", 200),
        ("/read-only", 200),
        ("/health", 200),
        ("/replica", 503),
        ("/async", 503),
        ("/no-such-check", 503),
        ("/liveness", 200),
        ("/readiness", 200),
    ] {
        assert_eq!(code(&c, &srv.url(path)).await, want, "leader {path}");
    }

    srv.set(replica_snapshot(0));
    for (path, want) in [
        ("/", 503),
        ("/primary", 503),
        ("/leader", 503),
        ("/replica", 200),
        ("/read-only", 200),
        ("/health", 200),
        ("/async", 200),
        ("/replica?replication_state=streaming", 200),
        ("/replica?replication_state=in%20archive%20recovery", 503),
        ("/replica?tag_dc=east", 200),
        ("/replica?tag_dc=west", 503),
        ("/replica?tag_rack=1", 503),
        ("/readiness", 200),
    ] {
        assert_eq!(code(&c, &srv.url(path)).await, want, "replica {path}");
    }

    // 2 MB behind the leader's optime.
    srv.set(replica_snapshot(2));
    for (path, want) in [
        ("/replica", 200),
        ("/replica?lag=1MB", 503),
        ("/replica?lag=1048576", 503),
        ("/replica?lag=4MB", 200),
        ("/replica?lag=64MB&tag_dc=east", 200),
        ("/read-only?lag=16kB", 503),
        ("/readiness", 503),
        ("/readiness?lag=4MB", 200),
        ("/readiness?mode=write", 200),
    ] {
        assert_eq!(
            code(&c, &srv.url(path)).await,
            want,
            "lagging replica {path}"
        );
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn primary_answers_200_only_until_the_lease_deadline() {
    let pki = Pki::new();
    let mut snap = leader_snapshot();
    snap.lease_deadline = Some(Instant::now() + Duration::from_millis(700));
    let srv = Running::start(&pki.restapi(), snap).await;
    let c = pki.client_for(None);
    assert_eq!(code(&c, &srv.url("/primary")).await, 200);
    // No new snapshot is published: the deadline alone ends the answer.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(code(&c, &srv.url("/primary")).await, 503);
    assert_eq!(code(&c, &srv.url("/leader")).await, 503);
    assert_eq!(code(&c, &srv.url("/")).await, 503);
    // PostgreSQL still runs.
    assert_eq!(code(&c, &srv.url("/health")).await, 200);

    // A stuck HA loop fails liveness the same way.
    let mut snap = leader_snapshot();
    snap.loop_deadline = Some(Instant::now());
    srv.set(snap);
    assert_eq!(code(&c, &srv.url("/liveness")).await, 503);
    srv.shutdown().await;
}

/// A leader stopping PostgreSQL to hand the key over still holds the lock, but load balancers
/// must stop sending it writes at once.
#[tokio::test]
async fn a_leader_handing_over_is_not_the_primary_any_more() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;
    let c = pki.client_for(None);
    assert_eq!(code(&c, &srv.url("/primary")).await, 200);
    let mut snap = leader_snapshot();
    snap.handing_over = true;
    srv.set(snap);
    for path in ["/primary", "/leader", "/", "/read-write", "/replica"] {
        assert_eq!(code(&c, &srv.url(path)).await, 503, "{path}");
    }
    assert_eq!(code(&c, &srv.url("/health")).await, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn head_and_options_carry_no_body_and_anonymous_get_describes_nothing() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;
    let c = pki.client_for(None);

    let head = c.head(&srv.url("/primary")).await.unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let head = c.head(&srv.url("/replica")).await.unwrap();
    assert_eq!(head.status, 503);
    assert!(head.body.is_empty());
    let options = c
        .request(reqwest::Method::OPTIONS, &srv.url("/"))
        .await
        .unwrap();
    assert_eq!(options.status, 200);
    assert!(options.body.is_empty());

    for path in [
        "/primary",
        "/replica",
        "/health",
        "/liveness",
        "/readiness",
        "/x",
    ] {
        let get = c.get(&srv.url(path)).await.unwrap();
        assert_eq!(
            get.headers["content-type"], "application/json",
            "GET {path}"
        );
        assert_eq!(get.text(), "{}", "GET {path} must describe nothing");
    }
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Transport security

#[tokio::test]
async fn plaintext_http_and_untrusted_clients_are_refused() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(srv.server.local_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /primary HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext request was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // Our client refuses http:// URLs outright.
    let c = pki.client_for(None);
    let plain_url = format!(
        "http://127.0.0.1:{}/primary",
        srv.server.local_addr().port()
    );
    assert!(c.get(&plain_url).await.is_err());

    // A client that trusts another CA fails the handshake.
    let other = Ca::create("some other CA", 30).unwrap();
    let stranger = ApiClient::builder(other.cert_pem().as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let err = stranger.get(&srv.url("/primary")).await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // The server is still fine.
    assert_eq!(code(&c, &srv.url("/primary")).await, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn plaintext_only_without_a_certificate() {
    // Only reachable with pgkeep.insecure.plaintext_restapi (the config loader refuses it
    // otherwise); the server then speaks plain HTTP/1.1 and still guards protected endpoints.
    let pki = Pki::new();
    let mut cfg = pki.with_basic_auth();
    cfg.tls = None;
    let srv = Running::start(&cfg, leader_snapshot()).await;
    assert!(!srv.server.is_tls());
    let mut tcp = tokio::net::TcpStream::connect(srv.server.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /primary HTTP/1.1\r\nHost: x\r\n\r\nGET /patroni HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("HTTP/1.1 401 Unauthorized\r\n"), "{answer}");
    assert!(!answer.contains("node1"), "{answer}");
    srv.stop.cancel();
}

#[tokio::test]
async fn required_client_certificates_are_enforced_in_the_handshake() {
    let pki = Pki::new();
    let mut cfg = pki.restapi();
    cfg.cafile = Some(pki.ca_cert.clone());
    cfg.verify_client = VerifyClient::Required;
    let srv = Running::start(&cfg, leader_snapshot()).await;
    let anonymous = pki.client_for(None);
    assert!(anonymous.get(&srv.url("/primary")).await.is_err());
    let (cert, key) = pki.client("haproxy-lb1");
    let with_cert = pki.client_for(Some((&cert, &key)));
    assert_eq!(code(&with_cert, &srv.url("/primary")).await, 200);
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Access check of protected endpoints

#[tokio::test]
async fn malformed_requests_get_json_errors_and_the_server_keeps_serving() {
    let pki = Pki::new();
    let srv = Running::start(&pki.with_basic_auth(), replica_snapshot(0)).await;
    let c = pki.client_for(None);

    for path in [
        "/replica?lag=abc",
        "/replica?lag=10mb",
        "/replica?lag=-1",
        "/readiness?mode=fast",
        "/readiness?lag=1XB",
        "/replica?tag_dc=%zz",
    ] {
        let r = c.get(&srv.url(path)).await.unwrap();
        assert_eq!(r.status, 400, "{path}");
        assert!(!error_of(&r).is_empty());
    }
    let r = c.head(&srv.url("/replica?lag=abc")).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
    // Empty values are absent, as in Patroni.
    assert_eq!(code(&c, &srv.url("/replica?lag=&tag_dc=")).await, 200);

    // Unknown methods.
    for (method, path, want) in [
        ("POST", "/primary", 501),
        ("DELETE", "/", 501),
        ("PUT", "/whatever", 501),
        ("POST", "/liveness", 405),
        ("PATCH", "/readiness", 405),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c.request(m, &srv.url(path)).await.unwrap();
        assert_eq!(r.status, want, "{method} {path}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(!error_of(&r).is_empty());
    }
    // An unsupported method on a protected path reaches no handler (405 before the access
    // check, which is harmless: the answer describes nothing).
    let r = c
        .request(reqwest::Method::DELETE, &srv.url("/patroni"))
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, HEAD");
    assert!(!r.text().contains("node2"));

    assert_eq!(code(&c, &srv.url("/replica")).await, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn requests_share_one_kept_alive_connection() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;

    // reqwest keeps its connection: the server sees one.
    let c = pki.client_for(None);
    for _ in 0..3 {
        assert_eq!(code(&c, &srv.url("/primary")).await, 200);
    }
    assert_eq!(srv.server.connection_count(), 1);

    // On a raw TLS stream: two requests, two answers, one connection.
    let addr = srv.server.local_addr();
    let ca_der = pki.ca.cert_der().clone();
    let answers = tokio::task::spawn_blocking(move || raw_keep_alive(addr, ca_der))
        .await
        .unwrap();
    assert_eq!(answers.len(), 2);
    for (status_line, headers, body) in &answers {
        assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
        assert!(!headers.contains("connection: close"), "{headers}");
        assert_eq!(body, "{}");
    }
    srv.shutdown().await;
}

/// Sends two `GET /primary` on one TLS connection; returns (status line, headers, body) of each.
fn raw_keep_alive(
    addr: SocketAddr,
    ca: rustls_pki_types::CertificateDer<'static>,
) -> Vec<(String, String, String)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut out = Vec::new();
    for _ in 0..2 {
        tls.write_all(b"GET /primary HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        tls.flush().unwrap();
        let mut reader = BufReader::new(&mut tls);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let mut headers = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            headers.push_str(&lower);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        out.push((
            status_line.trim_end().to_owned(),
            headers,
            String::from_utf8(body).unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn certificates_reload_without_restart_and_shutdown_is_clean() {
    let pki = Pki::new();
    let cfg = pki.restapi();
    let srv = Running::start(&cfg, leader_snapshot()).await;
    assert!(srv.server.is_tls());
    // Reissue the server certificate in place and reload it.
    let reissued = pki
        .ca
        .issue(&CertRequest {
            common_name: "restapi-node1".into(),
            usage: Usage::Server,
            dns_names: vec!["localhost".into()],
            ip_addresses: vec![LOCALHOST],
            validity_days: 10,
        })
        .unwrap();
    reissued.write(pki.dir.path(), "restapi-node1").unwrap();
    srv.server.reload_tls(&cfg).unwrap();
    let fresh = pki.client_for(None);
    assert_eq!(code(&fresh, &srv.url("/primary")).await, 200);
    srv.shutdown().await;
}
