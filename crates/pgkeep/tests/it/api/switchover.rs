//! `POST /switchover`, `POST /failover`, `DELETE /switchover` against a fake DCS handle that
//! records every write: the access check, body errors, Patroni's validation answers, scheduled
//! requests, and the wait for the outcome driven by published snapshots.

use std::sync::Mutex;

use api::control::BoxFuture;
use api::{Control, ControlError};
use pgkeep::dcs::{Cas, Expect};
use pgkeep_core::cluster::FailoverRequest;

use super::*;

/// The revision the fake reports for every write.
const WRITTEN: i64 = 10;

/// Records writes; answers `Written { revision: WRITTEN }` unless told otherwise.
struct FakeControl {
    writes: Mutex<Vec<(FailoverRequest, Expect)>>,
    answer: Mutex<Result<Cas, ControlError>>,
    budget: Duration,
}

impl FakeControl {
    fn new(budget: Duration) -> Arc<FakeControl> {
        Arc::new(FakeControl {
            writes: Mutex::new(Vec::new()),
            answer: Mutex::new(Ok(Cas::Written { revision: WRITTEN })),
            budget,
        })
    }

    fn writes(&self) -> Vec<(FailoverRequest, Expect)> {
        self.writes.lock().unwrap().clone()
    }

    fn answer(&self, a: Result<Cas, ControlError>) {
        *self.answer.lock().unwrap() = a;
    }

    /// Waits until `n` writes were made.
    async fn await_writes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.writes.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "no write within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Control for FakeControl {
    fn put_failover<'a>(
        &'a self,
        request: &'a FailoverRequest,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        self.writes.lock().unwrap().push((request.clone(), expect));
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move { answer })
    }

    fn wait_budget(&self, patroni_secs: u64) -> Duration {
        assert_eq!(patroni_secs, 20, "2 × max(10, loop_wait) with loop_wait 10");
        self.budget
    }
}

fn rev_entry(suffix: &str, value: &str, rev: i64) -> RawEntry {
    RawEntry {
        suffix: suffix.into(),
        value: value.as_bytes().to_vec(),
        mod_revision: rev,
        lease: 0,
    }
}

/// The test view (node1 leads, node2 streams) changed by `extra` entries.
fn view_with(extra: &[RawEntry]) -> Arc<ClusterView> {
    let base = view();
    let mut entries: Vec<RawEntry> = vec![
        entry(
            "config",
            r#"{"ttl":30,"loop_wait":10,"maximum_lag_on_failover":1048576}"#,
        ),
        entry("leader", "node1"),
    ];
    for name in base.members.keys() {
        let json = serde_json::to_string(&base.members[name].data).unwrap();
        entries.push(entry(&format!("members/{name}"), &json));
    }
    entries.extend_from_slice(extra);
    let (v, rejected) = ClusterView::from_entries(&entries);
    assert!(rejected.is_empty(), "{rejected:?}");
    Arc::new(v)
}

fn leader_with(extra: &[RawEntry]) -> ApiSnapshot {
    let mut s = leader_snapshot();
    s.cluster = Some(view_with(extra));
    s
}

async fn start(control: &Arc<FakeControl>) -> (Pki, Running, ApiClient) {
    let pki = Pki::new();
    let c: Arc<dyn Control> = control.clone();
    let srv = Running::start_with(&pki.with_basic_auth(), leader_snapshot(), Some(c)).await;
    let admin = pki.basic_client("correct horse");
    (pki, srv, admin)
}

async fn post(client: &ApiClient, url: &str, body: &str) -> (u16, String, String) {
    let r = client.post_json(url, body).await.unwrap();
    let ct = r
        .headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status, r.text(), ct)
}

#[tokio::test]
async fn callers_must_pass_the_access_check() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (pki, srv, _) = start(&control).await;
    let anonymous = pki.client_for(None);
    for (path, method) in [
        ("/switchover", "POST"),
        ("/failover", "POST"),
        ("/switchover", "DELETE"),
    ] {
        let r = if method == "POST" {
            anonymous
                .post_json(&srv.url(path), r#"{"leader":"node1","candidate":"node2"}"#)
                .await
                .unwrap()
        } else {
            anonymous.delete(&srv.url(path)).await.unwrap()
        };
        assert_eq!(r.status, 401, "{method} {path}");
        assert_eq!(error_of(&r), "no auth header received");
    }
    let wrong = pki.basic_client("Correct horse");
    let r = wrong
        .post_json(&srv.url("/switchover"), r#"{"leader":"node1"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        control.writes().is_empty(),
        "nothing written for refused callers"
    );
    srv.shutdown().await;

    // Nothing configured to authenticate callers: refused for everyone.
    let c: Arc<dyn Control> = control.clone();
    let srv = Running::start_with(&pki.restapi(), leader_snapshot(), Some(c)).await;
    let r = pki
        .basic_client("x")
        .post_json(&srv.url("/switchover"), r#"{"leader":"node1"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert!(control.writes().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn without_a_control_handle_nothing_changes() {
    let pki = Pki::new();
    let srv = Running::start(&pki.with_basic_auth(), leader_snapshot()).await;
    let admin = pki.basic_client("correct horse");
    let r = admin
        .post_json(&srv.url("/switchover"), r#"{"leader":"node1"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(error_of(&r), "this server cannot change the cluster");
    let r = admin.delete(&srv.url("/switchover")).await.unwrap();
    assert_eq!(r.status, 503);
    srv.shutdown().await;
}

#[tokio::test]
async fn bodies_that_are_not_requests_get_json_errors() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (_pki, srv, admin) = start(&control).await;
    let url = srv.url("/switchover");
    for (body, want) in [
        ("{nope", "invalid JSON"),
        ("", "invalid JSON"),
        ("   ", "invalid JSON"),
        ("[\"node1\"]", "must be a JSON object"),
        (
            r#"{"leader":"node1","force":true}"#,
            "unknown key \"force\"",
        ),
        (r#"{"leader":["node1"]}"#, "leader must be a string"),
        (
            r#"{"candidate":"node2","member":"node3"}"#,
            "candidate and member name different members",
        ),
    ] {
        let r = admin.post_json(&url, body).await.unwrap();
        assert_eq!(r.status, 400, "{body}");
        assert!(error_of(&r).contains(want), "{body}: {}", r.text());
    }
    let big = format!(r#"{{"leader":"{}"}}"#, "x".repeat(70 * 1024));
    let r = admin.post_json(&url, &big).await.unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(error_of(&r), "request body too large");
    // Not a health check, not a safe method.
    let r = admin.get(&url).await.unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST, DELETE");
    let r = admin.get(&srv.url("/failover")).await.unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    assert!(control.writes().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn validation_answers_follow_patroni() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (_pki, srv, admin) = start(&control).await;
    let sw = srv.url("/switchover");
    let fo = srv.url("/failover");
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            &fo,
            r#"{"leader":"node1"}"#,
            400,
            "Failover could be performed only to a specific candidate",
        ),
        (
            &sw,
            r#"{"candidate":"node2"}"#,
            400,
            "Switchover could be performed only from a specific leader",
        ),
        (
            &fo,
            r#"{"candidate":"node2","scheduled_at":"2099-01-01T00:00:00Z"}"#,
            400,
            "Failover can't be scheduled",
        ),
        (
            &sw,
            r#"{"leader":"node1","scheduled_at":"2020-01-01T00:00:00+00:00"}"#,
            422,
            "Cannot schedule switchover in the past",
        ),
        (
            &sw,
            r#"{"leader":"node1","scheduled_at":"2099-01-01T00:00:00"}"#,
            400,
            "Timezone information is mandatory for the scheduled switchover",
        ),
        (
            &sw,
            r#"{"leader":"node1","scheduled_at":"soon"}"#,
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
        ),
        (
            &sw,
            r#"{"leader":"node1","candidate":"node1"}"#,
            400,
            "Switchover target and source are the same",
        ),
        (
            &sw,
            r#"{"leader":"node2"}"#,
            412,
            "leader name does not match",
        ),
        (
            &sw,
            r#"{"leader":"node1","candidate":"node7"}"#,
            412,
            "candidate does not exists",
        ),
        (
            &fo,
            r#"{"candidate":"node1"}"#,
            412,
            "failover is not possible: no good candidates have been found",
        ),
    ];
    for (url, body, status, text) in cases {
        let (s, t, ct) = post(&admin, url, body).await;
        assert_eq!((s, t.as_str()), (*status, *text), "{body}");
        assert_eq!(ct, "text/plain; charset=utf-8");
    }

    // Only the leader exists: nobody to hand over to.
    let mut snap = leader_snapshot();
    let mut v = (*view()).clone();
    v.members.remove("node2");
    snap.cluster = Some(Arc::new(v));
    srv.set(snap);
    let (s, t, _) = post(&admin, &sw, r#"{"leader":"node1"}"#).await;
    assert_eq!(
        (s, t.as_str()),
        (
            412,
            "switchover is not possible: cluster does not have members except leader"
        )
    );

    // Paused: a candidate is required, and nothing may be scheduled.
    let mut snap = leader_snapshot();
    snap.status.pause = true;
    srv.set(snap);
    let (s, t, _) = post(&admin, &sw, r#"{"leader":"node1"}"#).await;
    assert_eq!(
        (s, t.as_str()),
        (
            400,
            "Switchover is possible only to a specific candidate in a paused state"
        )
    );
    let (s, t, _) = post(
        &admin,
        &sw,
        r#"{"leader":"node1","candidate":"node2","scheduled_at":"2099-01-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(
        (s, t.as_str()),
        (400, "Can't schedule switchover in the paused state")
    );

    // No view of the DCS yet.
    let mut snap = leader_snapshot();
    snap.cluster = None;
    srv.set(snap);
    let r = admin.post_json(&sw, r#"{"leader":"node1"}"#).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(error_of(&r), "no view of the DCS yet");
    assert!(control.writes().is_empty(), "{:?}", control.writes());
    srv.shutdown().await;
}

#[tokio::test]
async fn scheduled_switchover_writes_the_key_and_answers_202() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (_pki, srv, admin) = start(&control).await;
    let (s, t, _) = post(
        &admin,
        &srv.url("/switchover"),
        r#"{"leader":"node1","member":"node2","scheduled_at":"2099-01-01T02:00:00+02:00"}"#,
    )
    .await;
    assert_eq!((s, t.as_str()), (202, "Switchover scheduled"));
    assert_eq!(
        control.writes(),
        [(
            FailoverRequest {
                leader: Some("node1".into()),
                member: Some("node2".into()),
                scheduled_at: Some("2099-01-01T00:00:00.000+00:00".into()),
            },
            Expect::Absent
        )]
    );
    // A pending request is replaced only if unchanged since it was validated.
    srv.set(leader_with(&[rev_entry(
        "failover",
        r#"{"leader":"node1","scheduled_at":"2099-01-01T00:00:00+00:00"}"#,
        7,
    )]));
    control.answer(Ok(Cas::Conflict));
    let (s, _, _) = post(
        &admin,
        &srv.url("/switchover"),
        r#"{"leader":"node1","scheduled_at":"2099-01-02T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(s, 409);
    assert_eq!(control.writes()[1].1, Expect::ModRevision(7));
    // A failed write.
    control.answer(Err(ControlError("etcd unavailable".into())));
    let (s, t, _) = post(
        &admin,
        &srv.url("/switchover"),
        r#"{"leader":"node1","scheduled_at":"2099-01-02T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(
        (s, t.as_str()),
        (503, "failed to write failover key into DCS")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn delete_switchover_clears_only_a_scheduled_one() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (_pki, srv, admin) = start(&control).await;
    let url = srv.url("/switchover");
    let r = admin.delete(&url).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "no switchover is scheduled")
    );
    // An immediate request in progress is not "scheduled".
    srv.set(leader_with(&[rev_entry(
        "failover",
        r#"{"leader":"node1","member":"node2"}"#,
        8,
    )]));
    assert_eq!(admin.delete(&url).await.unwrap().status, 404);
    assert!(control.writes().is_empty());

    srv.set(leader_with(&[rev_entry(
        "failover",
        r#"{"leader":"node1","scheduled_at":"2099-01-01T00:00:00+00:00"}"#,
        9,
    )]));
    let r = admin.delete(&url).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "scheduled switchover deleted")
    );
    assert_eq!(
        control.writes(),
        [(FailoverRequest::default(), Expect::ModRevision(9))]
    );
    control.answer(Ok(Cas::Conflict));
    assert_eq!(admin.delete(&url).await.unwrap().status, 409);
    srv.shutdown().await;
}

/// Starts a request in the background and returns its answer once the test drove the outcome.
fn spawn_post(
    admin: &ApiClient,
    url: String,
    body: &'static str,
) -> tokio::task::JoinHandle<(u16, String)> {
    let admin = admin.clone();
    tokio::spawn(async move {
        let r = admin.post_json(&url, body).await.unwrap();
        (r.status, r.text())
    })
}

/// A member key of a node that runs as a primary.
const PROMOTED: &str =
    r#"{"api_url":"https://127.0.0.3:8008/patroni","state":"running","role":"primary"}"#;

#[tokio::test]
async fn immediate_requests_wait_for_the_leader_to_change() {
    let control = FakeControl::new(Duration::from_secs(4));
    let (_pki, srv, admin) = start(&control).await;

    // Success: node2 takes the lock.
    let answer = spawn_post(
        &admin,
        srv.url("/switchover"),
        r#"{"leader":"node1","candidate":"node2"}"#,
    );
    control.await_writes(1).await;
    assert_eq!(
        control.writes()[0],
        (
            FailoverRequest {
                leader: Some("node1".into()),
                member: Some("node2".into()),
                scheduled_at: None
            },
            Expect::Absent
        )
    );
    // The key seen, the old leader gone: still waiting.
    srv.set(leader_with(&[rev_entry(
        "failover",
        r#"{"leader":"node1","member":"node2"}"#,
        WRITTEN,
    )]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!answer.is_finished());
    let mut s = leader_snapshot();
    let mut v = (*view_with(&[rev_entry(
        "failover",
        r#"{"leader":"node1","member":"node2"}"#,
        WRITTEN,
    )]))
    .clone();
    v.leader = None;
    s.cluster = Some(Arc::new(v));
    srv.set(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!answer.is_finished());
    // node2 holds the key but has not promoted yet (it could still give the key back).
    srv.set(leader_with(&[
        rev_entry(
            "failover",
            r#"{"leader":"node1","member":"node2"}"#,
            WRITTEN,
        ),
        rev_entry("leader", "node2", WRITTEN + 3),
    ]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!answer.is_finished());
    srv.set(leader_with(&[
        rev_entry("leader", "node2", WRITTEN + 3),
        rev_entry("members/node2", PROMOTED, WRITTEN + 4),
    ]));
    assert_eq!(
        answer.await.unwrap(),
        (200, "Successfully switched over to \"node2\"".into())
    );

    // A manual failover that ended elsewhere.
    srv.set(leader_snapshot());
    let answer = spawn_post(&admin, srv.url("/failover"), r#"{"candidate":"node2"}"#);
    control.await_writes(2).await;
    assert_eq!(control.writes()[1].0.leader, None);
    srv.set(leader_with(&[
        rev_entry("leader", "node3", WRITTEN + 3),
        rev_entry("members/node3", PROMOTED, WRITTEN + 4),
    ]));
    assert_eq!(
        answer.await.unwrap(),
        (200, "Failed over to \"node3\" instead of \"node2\"".into())
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn immediate_requests_report_failure_and_unknown_outcomes() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (_pki, srv, admin) = start(&control).await;

    // The leader cleared the key without handing over.
    let answer = spawn_post(&admin, srv.url("/switchover"), r#"{"leader":"node1"}"#);
    control.await_writes(1).await;
    srv.set(leader_with(&[rev_entry("failover", "{}", WRITTEN + 1)]));
    assert_eq!(answer.await.unwrap(), (503, "Switchover failed".into()));
    assert_eq!(control.writes()[0].1, Expect::Absent);

    // An old cleared key (before our write) does not count; nothing happens: unknown.
    srv.set(leader_with(&[rev_entry("failover", "{}", 5)]));
    let started = Instant::now();
    let (s, t, _) = post(&admin, &srv.url("/switchover"), r#"{"leader":"node1"}"#).await;
    assert_eq!(control.writes()[1].1, Expect::ModRevision(5));
    assert_eq!(
        (s, t.as_str()),
        (
            503,
            "Switchover status unknown after 1 seconds; operation may still be in progress"
        )
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    srv.shutdown().await;
}

/// Sends one `POST path` with a chunked body of `chunks` × 16 KiB of spaces around `{}` on a
/// raw TLS connection; returns the status line.
fn raw_chunked_post(
    addr: SocketAddr,
    ca: rustls_pki_types::CertificateDer<'static>,
    chunks: usize,
) -> String {
    use base64::Engine;
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
    let auth = base64::engine::general_purpose::STANDARD.encode("admin:correct horse");
    let mut req = format!(
        "POST /switchover HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let mut chunk = vec![b' '; 16 * 1024];
    chunk[0] = b'{';
    for i in 0..chunks {
        if i + 1 == chunks {
            *chunk.last_mut().unwrap() = b'}';
        }
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
        chunk[0] = b' ';
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may answer before it read everything; a failed write is fine then.
    let _ = tls.write_all(&req).and_then(|()| tls.flush());
    let mut status_line = String::new();
    BufReader::new(&mut tls)
        .read_line(&mut status_line)
        .unwrap();
    status_line.trim_end().to_owned()
}

#[tokio::test]
async fn chunked_bodies_are_counted_too() {
    let control = FakeControl::new(Duration::from_secs(1));
    let (pki, srv, _) = start(&control).await;
    let addr = srv.server.local_addr();
    let ca = pki.ca.cert_der().clone();
    let small = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || raw_chunked_post(addr, ca, 2)
    });
    // `{ ... }` with no leader: a request, refused by validation, not by size.
    assert!(small.await.unwrap().starts_with("HTTP/1.1 400"));
    let large = tokio::task::spawn_blocking(move || raw_chunked_post(addr, ca, 5));
    assert!(large.await.unwrap().starts_with("HTTP/1.1 413"));
    assert!(control.writes().is_empty());
    srv.shutdown().await;
}
