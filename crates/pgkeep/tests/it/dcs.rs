//! The etcd layer against a real 3-member etcd 3.4 cluster with mutual TLS (testkit): leases,
//! the leader race, compare-and-swap, Patroni's wire format, garbage values, and a watch that
//! survives member restarts and refuses a member without a raft leader.
//!
//! Two scenarios, each one cluster with many named checks; each check uses its own scope.

use std::future::Future;
use std::time::{Duration, Instant};

use pgkeep::dcs::{
    Cas, ClusterWatch, Dcs, DcsError, EtcdDcs, EtcdSettings, Expect, Snapshot, TlsFiles,
};
use pgkeep_core::cluster::{
    ClusterStatus, FailoverRequest, HistoryEntry, Initialize, Lsn, MemberData, SyncState,
};
use pgkeep_testkit::{Env, EtcdCluster};

const NAMESPACE: &str = "/service";
const WAIT: Duration = Duration::from_secs(10);
/// The request budget of clients whose etcd member goes away (Patroni's minimum retry_timeout).
const FAULT_BUDGET: Duration = Duration::from_secs(2);

fn tls(etcd: &EtcdCluster) -> TlsFiles {
    TlsFiles {
        ca: etcd.ca_path().to_owned(),
        cert: etcd.client_cert_path().to_owned(),
        key: etcd.client_key_path().to_owned(),
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgkeep=info".into()),
        )
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A client on every member with a 5 s request budget.
async fn connect(etcd: &EtcdCluster, scope: &str) -> EtcdDcs {
    connect_on(etcd, scope, etcd.endpoints(), Duration::from_secs(5)).await
}

fn settings(
    etcd: &EtcdCluster,
    scope: &str,
    endpoints: Vec<String>,
    request_timeout: Duration,
) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        tls: Some(tls(etcd)),
        namespace: NAMESPACE.into(),
        scope: scope.into(),
        request_timeout,
        insecure: false,
    }
}

async fn connect_on(
    etcd: &EtcdCluster,
    scope: &str,
    endpoints: Vec<String>,
    request_timeout: Duration,
) -> EtcdDcs {
    let settings = settings(etcd, scope, endpoints, request_timeout);
    EtcdDcs::connect(&settings).await.expect("connect to etcd")
}

/// Runs a blocking testkit call from inside the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn check<F: Future<Output = ()>>(name: &str, f: F) {
    let start = Instant::now();
    f.await;
    eprintln!("check {name}: ok in {:.1?}", start.elapsed());
}

/// Runs named checks one after the other against one cluster.
macro_rules! checks {
    ($etcd:expr; $($name:literal => $f:ident),+ $(,)?) => {
        $( check($name, $f($etcd)).await; )+
    };
}

fn member(role: &str) -> MemberData {
    MemberData {
        conn_url: "postgres://127.0.0.1:5432/postgres".into(),
        api_url: "https://127.0.0.1:8008/patroni".into(),
        state: "running".into(),
        role: role.into(),
        version: "4.1.4".into(),
        timeline: Some(1),
        ..Default::default()
    }
}

async fn raw_get(dcs: &EtcdDcs, key: &str) -> Option<(Vec<u8>, i64)> {
    let resp = dcs.client().get(key, None).await.expect("raw get");
    resp.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.lease()))
}

async fn wait_view(watch: &mut ClusterWatch, what: &str, pred: impl FnMut(&Snapshot) -> bool) {
    if let Err(e) = watch.wait_for(WAIT, pred).await {
        panic!(
            "watch never showed {what}: {e}; last state: {:?}",
            watch.state()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: operations on a healthy cluster.

#[test]
fn dcs_operations_on_real_etcd() {
    init_logging();
    let env = Env::new("dcs-ops").expect("test env");
    let etcd = EtcdCluster::start(&env, 3).expect("etcd cluster");
    runtime().block_on(async {
        let etcd: &EtcdCluster = &etcd;
        checks!(etcd;
            "TLS checks addresses and refuses an unknown CA" => tls_is_verified,
            "keepalive reports granted TTL and send time" => keepalive_reports_ttl,
            "lease expiry deletes the leader key" => lease_expiry_deletes_leader,
            "an idle watch stays live" => idle_watch_stays_live,
            "a compacted start revision is signalled" => compacted_start_revision_is_signalled,
            "second acquirer loses the race" => second_acquirer_loses,
            "renew writes every time and never re-creates" => renew_writes_every_time_and_never_recreates,
            "config CAS detects a concurrent change" => config_cas,
            "sync and failover CAS" => sync_and_failover_cas,
            "values are Patroni's wire format" => wire_format,
            "a garbage member value is ignored" => garbage_member_ignored,
            "delete_cluster removes one scope only" => delete_cluster,
        );
    });
}

async fn tls_is_verified(etcd: &EtcdCluster) {
    // Server names are checked per endpoint: the members' certificates carry their addresses.
    let by_ip = connect_on(etcd, "tls", etcd.endpoints_by_ip(), FAULT_BUDGET).await;
    by_ip.load().await.expect("load over IP endpoints");
    // A client that does not trust the members' CA gets nowhere, and says why.
    let mut settings = settings(etcd, "tls", etcd.endpoints(), FAULT_BUDGET);
    if let Some(tls) = settings.tls.as_mut() {
        tls.ca = etcd.client_cert_path().to_owned(); // not the CA that signed the members
    }
    let untrusting = EtcdDcs::connect(&settings).await.unwrap();
    let err = untrusting.load().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains("certificate"),
        "the chain says why: {err}"
    );
    eprintln!("a client with the wrong CA: {err}");
}

async fn keepalive_reports_ttl(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "ka").await;
    let lease = dcs.grant_lease(5).await.unwrap();
    assert_eq!(lease.granted_ttl, 5);
    for _ in 0..3 {
        let before = Instant::now();
        let reply = dcs.keepalive(lease.id).await.unwrap();
        let after = Instant::now();
        assert_eq!(reply.granted_ttl, 5, "{reply:?}");
        assert!(
            before <= reply.sent_at && reply.sent_at <= after,
            "{reply:?}"
        );
        let deadline = reply.deadline(Duration::from_secs(1)).unwrap();
        assert_eq!(deadline, reply.sent_at + Duration::from_secs(4));
    }
    dcs.revoke(lease.id).await.unwrap();
    let reply = dcs.keepalive(lease.id).await.unwrap();
    assert!(reply.granted_ttl <= 0, "revoked lease renewed: {reply:?}");
    dcs.revoke(lease.id).await.expect("revoking twice is fine");
    let err = dcs.acquire_leader("n1", lease.id).await.unwrap_err();
    assert!(
        matches!(err, DcsError::LeaseNotFound { lease: l } if l == lease.id),
        "{err}"
    );
    let err = dcs
        .put_member("n1", &member("replica"), lease.id)
        .await
        .unwrap_err();
    assert!(matches!(err, DcsError::LeaseNotFound { .. }), "{err}");
}

async fn lease_expiry_deletes_leader(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "expiry").await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    let lease = dcs.grant_lease(2).await.unwrap();
    assert!(dcs.acquire_leader("n1", lease.id).await.unwrap().is_some());
    dcs.put_member("n1", &member("primary"), lease.id)
        .await
        .unwrap();
    let reply = dcs.keepalive(lease.id).await.unwrap();
    wait_view(&mut watch, "the leader", |s| {
        s.view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == "n1" && l.lease == lease.id)
    })
    .await;
    // No more keepalives: etcd deletes both keys once the TTL has passed.
    let mut leader_watch = watch.clone();
    wait_view(&mut watch, "the leader key expire", |s| {
        s.view.leader.is_none() && s.view.members.is_empty()
    })
    .await;
    let gone_after = reply.sent_at.elapsed();
    assert!(
        gone_after >= Duration::from_secs(2),
        "leader key vanished {gone_after:?} after the keepalive, before the TTL"
    );
    tokio::time::timeout(Duration::from_millis(100), leader_watch.leader_changed())
        .await
        .expect("the leader change wakes a waiter")
        .unwrap();
    let snap = dcs.load().await.unwrap();
    assert!(snap.view.leader.is_none());
    assert!(!dcs.keepalive(lease.id).await.unwrap().is_alive());
}

async fn idle_watch_stays_live(etcd: &EtcdCluster) {
    // A 2 s budget probes the stream every second and gives up on it after one silent second:
    // etcd must answer the progress requests, or the watch would restart all the time.
    let dcs = connect_on(etcd, "idle", etcd.endpoints(), FAULT_BUDGET).await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let state = watch.state();
    assert!(state.live && state.restarts == 0, "{state:?}");
    assert!(
        dcs.set_initialize("7301234567890123456", false)
            .await
            .unwrap()
    );
    wait_view(&mut watch, "a write after idling", |s| {
        s.view.initialize.is_some()
    })
    .await;
}

async fn compacted_start_revision_is_signalled(etcd: &EtcdCluster) {
    // What the watch relies on to re-list after a compaction: etcd cancels a watch whose start
    // revision is compacted and says up to where.
    let dcs = connect(etcd, "compact").await;
    let mut raw = dcs.client();
    let key = format!("{}/status", dcs.base());
    let revision = |r: etcd_client::PutResponse| r.header().map_or(0, |h| h.revision());
    let first = revision(raw.put(key.clone(), "1", None).await.unwrap());
    let last = revision(raw.put(key.clone(), "2", None).await.unwrap());
    raw.compact(last, None).await.unwrap();
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(first);
    let mut stream = raw.watch(dcs.base(), Some(options)).await.unwrap();
    let canceled = tokio::time::timeout(WAIT, async {
        loop {
            let resp = stream.message().await.unwrap().expect("watch response");
            if resp.canceled() {
                return resp;
            }
        }
    })
    .await
    .expect("a canceling response");
    assert_eq!(canceled.compact_revision(), last);
    // A watch started now lists past the compaction and works.
    let mut watch = dcs.watch();
    let snap = watch.ready(WAIT).await.unwrap();
    assert!(snap.revision >= last);
    assert_eq!(
        snap.view.status.optime,
        Some(Lsn(2)),
        "legacy bare-integer status"
    );
    raw.put(key.clone(), r#"{"optime":7}"#, None).await.unwrap();
    wait_view(&mut watch, "the status after compaction", has_optime(7)).await;
    assert_eq!(watch.state().restarts, 0);
}

async fn second_acquirer_loses(etcd: &EtcdCluster) {
    // Two agents: separate clients, separate leases, the same scope.
    let a = connect(etcd, "race").await;
    let b = connect(etcd, "race").await;
    let la = a.grant_lease(10).await.unwrap();
    let lb = b.grant_lease(10).await.unwrap();
    let (ra, rb) = tokio::join!(a.acquire_leader("a", la.id), b.acquire_leader("b", lb.id));
    let (ra, rb) = (ra.unwrap().is_some(), rb.unwrap().is_some());
    assert!(ra ^ rb, "exactly one acquirer wins: a={ra} b={rb}");
    let (winner, wl, loser, ll, wname, lname) = if ra {
        (&a, la, &b, lb, "a", "b")
    } else {
        (&b, lb, &a, la, "b", "a")
    };
    assert!(loser.acquire_leader(lname, ll.id).await.unwrap().is_none());
    assert!(
        winner.acquire_leader(wname, wl.id).await.unwrap().is_some(),
        "holder re-acquiring"
    );
    assert!(loser.renew_leader(lname, ll.id).await.unwrap().is_none());
    assert!(winner.renew_leader(wname, wl.id).await.unwrap().is_some());
    assert!(!loser.release_leader(lname).await.unwrap());
    let snap = loser.load().await.unwrap();
    let leader = snap.view.leader.expect("leader key");
    assert_eq!((leader.name.as_str(), leader.lease), (wname, wl.id));
    assert!(winner.release_leader(wname).await.unwrap());
    assert!(loser.acquire_leader(lname, ll.id).await.unwrap().is_some());
    a.revoke(la.id).await.unwrap();
    b.revoke(lb.id).await.unwrap();
}

async fn renew_writes_every_time_and_never_recreates(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "renew").await;
    let old = dcs.grant_lease(10).await.unwrap();
    let acquired = dcs.acquire_leader("n1", old.id).await.unwrap().unwrap();
    assert_eq!(
        dcs.load().await.unwrap().view.leader.unwrap().mod_revision,
        acquired
    );
    // Every renewal is a write: watchers see a new revision each time.
    let r1 = dcs.renew_leader("n1", old.id).await.unwrap().unwrap();
    let r2 = dcs.renew_leader("n1", old.id).await.unwrap().unwrap();
    assert!(acquired < r1 && r1 < r2, "{acquired} {r1} {r2}");
    assert_eq!(
        dcs.load().await.unwrap().view.leader.unwrap().mod_revision,
        r2
    );
    // A new lease (TTL changed): the renewal moves the key to it.
    let new = dcs.grant_lease(10).await.unwrap();
    assert!(dcs.renew_leader("n1", new.id).await.unwrap().is_some());
    assert_eq!(dcs.load().await.unwrap().view.leader.unwrap().lease, new.id);
    // The key expired (here: its lease revoked): renewal does not bring it back.
    dcs.revoke(new.id).await.unwrap();
    let third = dcs.grant_lease(10).await.unwrap();
    assert!(dcs.renew_leader("n1", third.id).await.unwrap().is_none());
    assert!(dcs.load().await.unwrap().view.leader.is_none());
    dcs.revoke(old.id).await.unwrap();
    dcs.revoke(third.id).await.unwrap();
    assert!(dcs.load().await.unwrap().view.pending_failover().is_none());
}

fn config(ttl: i64) -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(m) = serde_json::json!({"ttl": ttl, "loop_wait": 10}) else {
        unreachable!()
    };
    m
}

async fn config_cas(etcd: &EtcdCluster) {
    let a = connect(etcd, "cas").await;
    let b = connect(etcd, "cas").await;
    assert!(
        a.put_config(&config(30), Expect::Absent)
            .await
            .unwrap()
            .is_written()
    );
    assert_eq!(
        b.put_config(&config(31), Expect::Absent).await.unwrap(),
        Cas::Conflict,
        "config already exists"
    );
    // Both read the same version; b writes first, a's write must be refused.
    let seen = a.load().await.unwrap().view.config.expect("config");
    assert_eq!(seen.value["ttl"], 30);
    let expect = Expect::unchanged(Some(&seen));
    let Cas::Written { revision } = b.put_config(&config(40), expect).await.unwrap() else {
        panic!("b's CAS on an unchanged config failed");
    };
    assert_eq!(
        a.put_config(&config(50), expect).await.unwrap(),
        Cas::Conflict
    );
    let now = a.load().await.unwrap().view.config.unwrap();
    assert_eq!(
        (now.value["ttl"].as_i64(), now.mod_revision),
        (Some(40), revision)
    );
    assert!(
        a.put_config(&config(60), Expect::Any)
            .await
            .unwrap()
            .is_written(),
        "unconditional put"
    );
}

async fn sync_and_failover_cas(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "synccas").await;
    let state = SyncState::new("n0", vec!["n1".into()], 0);
    let Cas::Written { revision } = dcs.put_sync(&state, Expect::Absent).await.unwrap() else {
        panic!("creating sync failed");
    };
    let view = dcs.load().await.unwrap().view;
    let seen = view.sync.expect("sync");
    assert_eq!(
        (seen.value.clone(), seen.mod_revision),
        (state.clone(), revision)
    );
    assert_eq!(
        dcs.put_sync(&state, Expect::ModRevision(revision - 1))
            .await
            .unwrap(),
        Cas::Conflict
    );
    assert_eq!(
        dcs.delete_sync(Expect::ModRevision(revision - 1))
            .await
            .unwrap(),
        Cas::Conflict
    );
    assert!(
        dcs.delete_sync(Expect::ModRevision(revision))
            .await
            .unwrap()
            .is_written()
    );
    assert!(dcs.load().await.unwrap().view.sync.is_none());

    let req = FailoverRequest {
        leader: Some("n0".into()),
        member: Some("n1".into()),
        scheduled_at: None,
    };
    assert!(
        dcs.put_failover(&req, Expect::Any)
            .await
            .unwrap()
            .is_written()
    );
    let seen = dcs.load().await.unwrap().view.failover.expect("failover");
    assert_eq!(
        dcs.load().await.unwrap().view.pending_failover(),
        Some(&req)
    );
    let cleared = dcs
        .put_failover(&FailoverRequest::default(), Expect::unchanged(Some(&seen)))
        .await
        .unwrap();
    assert!(cleared.is_written());
    assert!(dcs.load().await.unwrap().view.pending_failover().is_none());
}

async fn wire_format(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "wire").await;
    let base = dcs.base().to_owned();
    assert_eq!(base, "/service/wire");
    let lease = dcs.grant_lease(10).await.unwrap();
    let other = dcs.grant_lease(10).await.unwrap();
    assert!(dcs.race_initialize(lease.id).await.unwrap());
    assert!(
        !dcs.race_initialize(other.id).await.unwrap(),
        "the second racer loses"
    );
    assert_eq!(
        raw_get(&dcs, &format!("{base}/initialize"))
            .await
            .unwrap()
            .0,
        b""
    );
    assert_eq!(
        dcs.load().await.unwrap().view.initialize,
        Some(Initialize::InProgress)
    );
    assert!(
        dcs.set_initialize("7301234567890123456", false)
            .await
            .unwrap()
    );
    assert_eq!(
        raw_get(&dcs, &format!("{base}/initialize"))
            .await
            .unwrap()
            .0,
        b"7301234567890123456"
    );
    assert!(
        dcs.acquire_leader("node1", lease.id)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        raw_get(&dcs, &format!("{base}/leader")).await.unwrap(),
        (b"node1".to_vec(), lease.id)
    );
    let m = member("primary");
    dcs.put_member("node1", &m, lease.id).await.unwrap();
    let (raw, l) = raw_get(&dcs, &format!("{base}/members/node1"))
        .await
        .unwrap();
    assert_eq!(l, lease.id);
    assert_eq!(raw, serde_json::to_vec(&m).unwrap());
    assert!(
        !raw.contains(&b' '),
        "compact JSON: {}",
        String::from_utf8_lossy(&raw)
    );
    let history = vec![HistoryEntry {
        parent_timeline: 1,
        switch_lsn: Lsn(25623960),
        reason: "no recovery target specified".into(),
        timestamp: Some("2019-09-23T16:57:57.123+02:00".into()),
        new_leader: Some("node2".into()),
    }];
    dcs.put_history(&history).await.unwrap();
    assert_eq!(
        raw_get(&dcs, &format!("{base}/history")).await.unwrap().0,
        br#"[[1,25623960,"no recovery target specified","2019-09-23T16:57:57.123+02:00","node2"]]"#
    );
    let status = ClusterStatus {
        optime: Some(Lsn(67395656)),
        ..Default::default()
    };
    dcs.put_status(&status).await.unwrap();
    assert_eq!(
        raw_get(&dcs, &format!("{base}/status")).await.unwrap().0,
        br#"{"optime":67395656}"#
    );
    let view = dcs.load().await.unwrap().view;
    assert_eq!(view.history_timeline(), Some(2));
    assert_eq!(view.status.optime, Some(Lsn(67395656)));
    assert_eq!(view.members["node1"].data, m);
    dcs.cancel_initialize().await.unwrap();
    assert!(dcs.load().await.unwrap().view.initialize.is_none());
    assert!(dcs.delete_member("node1").await.unwrap());
    assert!(!dcs.delete_member("node1").await.unwrap());
    dcs.revoke(lease.id).await.unwrap();
}

async fn garbage_member_ignored(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "garbage").await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    let lease = dcs.grant_lease(10).await.unwrap();
    // Another writer (a raw etcd client) puts garbage where a member should be.
    let mut raw = dcs.client();
    raw.put(format!("{}/members/x", dcs.base()), "{not json", None)
        .await
        .unwrap();
    dcs.put_member("n1", &member("primary"), lease.id)
        .await
        .unwrap();
    dcs.put_member("n2", &member("replica"), lease.id)
        .await
        .unwrap();
    let snap = dcs.load().await.unwrap();
    let names: Vec<_> = snap.view.members.keys().cloned().collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(snap.rejected.len(), 1, "{:?}", snap.rejected);
    assert_eq!(snap.rejected[0].key, "members/x");
    wait_view(&mut watch, "both good members and the rejected one", |s| {
        s.view.members.len() == 2 && s.rejected.iter().any(|r| r.key == "members/x")
    })
    .await;
    // Garbage that becomes valid shows up; valid members stay.
    raw.put(
        format!("{}/members/x", dcs.base()),
        r#"{"role":"replica"}"#,
        None,
    )
    .await
    .unwrap();
    wait_view(&mut watch, "the repaired member", |s| {
        s.view.members.len() == 3 && s.rejected.is_empty()
    })
    .await;
    dcs.revoke(lease.id).await.unwrap();
}

async fn delete_cluster(etcd: &EtcdCluster) {
    let doomed = connect(etcd, "doomed").await;
    let kept = connect(etcd, "doomed2").await; // a scope sharing the name's prefix
    doomed
        .set_initialize("7301234567890123456", false)
        .await
        .unwrap();
    assert!(
        doomed
            .put_config(&config(30), Expect::Any)
            .await
            .unwrap()
            .is_written()
    );
    kept.set_initialize("7301234567890123457", false)
        .await
        .unwrap();
    assert_eq!(doomed.delete_cluster().await.unwrap(), 2);
    assert_eq!(doomed.load().await.unwrap().view, Default::default());
    assert!(kept.load().await.unwrap().view.initialize.is_some());
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: etcd member faults.

#[test]
fn dcs_watch_survives_etcd_member_faults() {
    init_logging();
    let env = Env::new("dcs-faults").expect("test env");
    let etcd = EtcdCluster::start(&env, 3).expect("etcd cluster");
    runtime().block_on(async {
        let etcd: &EtcdCluster = &etcd;
        checks!(etcd;
            "watch survives each member's restart" => watch_survives_restarts,
            "watch reconnects to its only endpoint" => watch_single_endpoint,
            "a member without leader is refused" => leaderless_member,
        );
    });
}

async fn bump_status(dcs: &EtcdDcs, optime: u64) {
    let status = ClusterStatus {
        optime: Some(Lsn(optime)),
        ..Default::default()
    };
    dcs.put_status(&status).await.expect("put status");
}

fn has_optime(optime: u64) -> impl FnMut(&Snapshot) -> bool {
    move |s| s.view.status.optime == Some(Lsn(optime))
}

async fn watch_survives_restarts(etcd: &EtcdCluster) {
    let dcs = connect(etcd, "restarts").await;
    let writer = connect(etcd, "restarts").await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    let lease = writer.grant_lease(10).await.unwrap();
    // Whichever member the watch (or the kept keepalive stream) is on, one restart hits it.
    for i in 0..etcd.member_count() {
        let optime = 100 + i as u64;
        if i % 2 == 0 {
            blocking(|| etcd.kill_member(i)).unwrap();
        } else {
            blocking(|| etcd.stop_member(i)).unwrap();
        }
        bump_status(&writer, optime).await;
        let ka = writer.keepalive(lease.id).await.unwrap();
        assert_eq!(ka.granted_ttl, 10, "keepalive with member {i} down");
        wait_view(
            &mut watch,
            "a write made while a member was down",
            has_optime(optime),
        )
        .await;
        blocking(|| etcd.start_member(i)).unwrap();
        blocking(|| etcd.wait_healthy(WAIT)).unwrap();
    }
    bump_status(&writer, 200).await;
    wait_view(&mut watch, "a write after all restarts", has_optime(200)).await;
}

async fn watch_single_endpoint(etcd: &EtcdCluster) {
    let only = etcd.endpoint(0).expect("member 0");
    let dcs = connect_on(etcd, "single", vec![only], FAULT_BUDGET).await;
    let writer = connect(etcd, "single").await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    blocking(|| etcd.stop_member(0)).unwrap();
    let t = Instant::now();
    while watch.is_live() {
        assert!(
            t.elapsed() < WAIT,
            "the watch did not notice its member stopping"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = dcs.load().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    bump_status(&writer, 300).await;
    blocking(|| etcd.start_member(0)).unwrap();
    wait_view(
        &mut watch,
        "a write made while its member was down",
        has_optime(300),
    )
    .await;
    bump_status(&writer, 301).await;
    wait_view(&mut watch, "a write after the restart", has_optime(301)).await;
    blocking(|| etcd.wait_healthy(WAIT)).unwrap();
}

async fn leaderless_member(etcd: &EtcdCluster) {
    let only = etcd.endpoint(0).expect("member 0");
    let dcs = connect_on(etcd, "leaderless", vec![only], FAULT_BUDGET).await;
    let mut watch = dcs.watch();
    watch.ready(WAIT).await.unwrap();
    blocking(|| {
        etcd.stop_member(1)?;
        etcd.stop_member(2)
    })
    .unwrap();
    // require_leader: the member cancels the watch once it has no leader...
    let t = Instant::now();
    while watch.is_live() {
        assert!(
            t.elapsed() < WAIT,
            "the watch stayed live on a member without leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "watch on the leaderless member ended after {:.1?}",
        t.elapsed()
    );
    // ...and refuses requests at once instead of hanging until the timeout.
    let t = Instant::now();
    let err = dcs.load().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("no leader"), "{err}");
    eprintln!(
        "load on the leaderless member failed after {:.1?}: {err}",
        t.elapsed()
    );
    blocking(|| {
        etcd.start_member(1)?;
        etcd.start_member(2)?;
        etcd.wait_healthy(WAIT)
    })
    .unwrap();
    bump_status(&dcs, 400).await;
    wait_view(
        &mut watch,
        "a write once the leader is back",
        has_optime(400),
    )
    .await;
}
