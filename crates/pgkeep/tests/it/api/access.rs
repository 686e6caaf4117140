//! Access control of protected endpoints: basic auth, client certificates, allowlists.

use super::*;

#[tokio::test]
async fn protected_endpoints_need_basic_auth() {
    let pki = Pki::new();
    let srv = Running::start(&pki.with_basic_auth(), leader_snapshot()).await;

    let anonymous = pki.client_for(None);
    for path in ["/patroni", "/cluster", "/history", "/config"] {
        let r = anonymous.get(&srv.url(path)).await.unwrap();
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(error_of(&r), "no auth header received");
        assert_eq!(r.headers["www-authenticate"], "Basic realm=\"pgkeep\"");
        assert!(!r.text().contains("node1") && !r.text().contains("demo-scope"));
    }
    let head = anonymous.head(&srv.url("/patroni")).await.unwrap();
    assert_eq!(head.status, 401);
    assert!(head.body.is_empty());

    let wrong = pki.basic_client("Correct horse");
    let r = wrong.get(&srv.url("/patroni")).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(error_of(&r), "not authenticated");

    let admin = pki.basic_client("correct horse");
    let status: MemberStatus = admin.status(&srv.base).await.unwrap();
    assert_eq!(status.patroni.name, "node1");
    assert_eq!(status.patroni.scope, "demo-scope");
    assert_eq!(status.patroni.version, api::PATRONI_COMPAT_VERSION);
    assert_eq!(status.role, "primary");
    assert_eq!(
        status.xlog,
        Some(Xlog::Primary {
            location: Lsn(100 * MB)
        })
    );
    assert_eq!(status.pgkeep_version.as_deref(), Some(api::PGKEEP_VERSION));

    let cluster: Value = admin
        .get(&srv.url("/cluster"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(cluster["scope"], "demo-scope");
    assert_eq!(cluster["members"][0]["name"], "node1");
    assert_eq!(cluster["members"][0]["role"], "leader");
    assert_eq!(cluster["members"][1]["role"], "replica");
    assert_eq!(cluster["members"][1]["lag"], 2 * MB);
    assert_eq!(cluster["members"][1]["lsn"], "0/6200000");

    let history: Value = admin
        .get(&srv.url("/history"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(history[0][0], 1);
    assert_eq!(history[0][4], "node1");

    let config: Value = admin
        .get(&srv.url("/config"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(config["ttl"], 30);

    // An authenticated caller gets the full status on health checks; the code is unchanged.
    let r = admin.get(&srv.url("/primary")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<MemberStatus>().unwrap().patroni.name, "node1");
    let r = admin.get(&srv.url("/replica")).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json::<MemberStatus>().unwrap().role, "primary");
    // Wrong credentials on a health check: the check still answers, anonymously.
    let r = wrong.get(&srv.url("/primary")).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));

    // No DCS view: descriptive endpoints say so; missing config is a 502.
    let mut snap = leader_snapshot();
    snap.cluster = None;
    srv.set(snap);
    assert_eq!(code(&admin, &srv.url("/cluster")).await, 503);
    assert_eq!(code(&admin, &srv.url("/history")).await, 503);
    assert_eq!(code(&admin, &srv.url("/config")).await, 502);
    assert_eq!(code(&admin, &srv.url("/patroni")).await, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn nothing_configured_means_protected_endpoints_refuse_everyone() {
    let pki = Pki::new();
    let srv = Running::start(&pki.restapi(), leader_snapshot()).await;
    let c = pki.basic_client("anything");
    for path in ["/patroni", "/cluster", "/history", "/config"] {
        let r = c.get(&srv.url(path)).await.unwrap();
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(error_of(&r), "no authentication configured");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn allowed_client_names_decide_by_certificate_common_name() {
    let pki = Pki::new();
    let mut cfg = pki.restapi();
    cfg.cafile = Some(pki.ca_cert.clone());
    cfg.verify_client = VerifyClient::Optional;
    cfg.allowed_client_names = vec!["operator-alice".into()];
    let srv = Running::start(&cfg, leader_snapshot()).await;

    let (cert, key) = pki.client("operator-alice");
    let alice = pki.client_for(Some((&cert, &key)));
    let r = alice.get(&srv.url("/patroni")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<MemberStatus>().unwrap().patroni.name, "node1");

    let (cert, key) = pki.client("operator-mallory");
    let mallory = pki.client_for(Some((&cert, &key)));
    let r = mallory.get(&srv.url("/patroni")).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(error_of(&r), "client certificate name not allowed");
    // ... and gets nothing descriptive from health checks either.
    let r = mallory.get(&srv.url("/primary")).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));

    let anonymous = pki.client_for(None);
    let r = anonymous.get(&srv.url("/patroni")).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(error_of(&r), "client certificate required");
    // Health checks need no certificate with verify_client: optional (HAProxy).
    assert_eq!(code(&anonymous, &srv.url("/primary")).await, 200);

    // A server-only certificate is no client identity: the handshake refuses it.
    let server_cert_client = pki.client_for(Some((&pki.server.cert, &pki.server.key)));
    assert!(server_cert_client.get(&srv.url("/patroni")).await.is_err());
    srv.shutdown().await;
}

#[tokio::test]
async fn source_outside_the_allowlist_is_refused_before_credentials() {
    let pki = Pki::new();
    let mut cfg = pki.with_basic_auth();
    cfg.allowlist = vec!["10.0.0.0/8".parse().unwrap()];
    let srv = Running::start(&cfg, leader_snapshot()).await;
    let admin = pki.basic_client("correct horse");
    let r = admin.get(&srv.url("/patroni")).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(error_of(&r), "access is denied");
    srv.shutdown().await;

    // The same credentials from an allowed network pass.
    let mut cfg = pki.with_basic_auth();
    cfg.allowlist = vec![
        "10.0.0.0/8".parse().unwrap(),
        "127.0.0.1/32".parse().unwrap(),
    ];
    let srv = Running::start(&cfg, leader_snapshot()).await;
    assert_eq!(code(&admin, &srv.url("/patroni")).await, 200);
    srv.shutdown().await;

    // Members only: 127.0.0.1 is a member's api_url host in the view.
    let mut cfg = pki.with_basic_auth();
    cfg.allowlist_include_members = true;
    let srv = Running::start(&cfg, leader_snapshot()).await;
    assert_eq!(code(&admin, &srv.url("/patroni")).await, 200);
    let mut snap = leader_snapshot();
    snap.cluster = None;
    srv.set(snap);
    assert_eq!(code(&admin, &srv.url("/patroni")).await, 403);
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed requests and connection handling
