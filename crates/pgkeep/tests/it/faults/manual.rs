//! Manual failover and scheduled switchovers through `pgkeep ctl`, and `synchronous_node_count`
//! 2, on a real cluster under writers.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use pgkeep_testkit::DcsOptions;

use super::writer::{self, Outcome, Record, Writers};
use super::{Bed, assert_safe, bed, print_figures};

fn sync_mode() -> DcsOptions {
    DcsOptions {
        synchronous_mode: true,
        ..DcsOptions::default()
    }
}

/// `pgkeep ctl -c <node 1's node.yml> <args>` without a terminal: success and output.
fn ctl(b: &Bed, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .arg("ctl")
        .arg("-c")
        .arg(&b.c.agents[0].config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("pgkeep ctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ pgkeep ctl {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

fn ctl_ok(b: &Bed, args: &[&str]) -> String {
    let (ok, text) = ctl(b, args);
    if !ok {
        b.save_logs(&b.c.scope);
    }
    assert!(ok, "pgkeep ctl {args:?} failed:\n{text}");
    text
}

/// `t` as RFC 3339 in UTC, whole seconds.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let d = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap()).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

/// A wall-clock time `ahead` from now, rounded up to a whole second, and its RFC 3339 form.
fn scheduled_in(ahead: Duration) -> (SystemTime, String) {
    let t = SystemTime::now() + ahead;
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 1;
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    (t, rfc3339(t))
}

/// The synchronous standbys `/sync` names for leader `leader`, once it names some.
fn sync_standbys_of(b: &Bed, leader: usize) -> Vec<String> {
    let name = b.name(leader);
    let mut found = Vec::new();
    b.c.wait(
        "the /sync key for the new leader",
        Duration::from_secs(20),
        |_| match b.sync_key() {
            Some((l, s)) if l == name && !s.is_empty() => {
                found = s;
                true
            }
            _ => false,
        },
    )
    .unwrap();
    found
}

fn index_of(b: &Bed, name: &str) -> usize {
    (0..b.c.agents.len()).find(|i| b.name(*i) == name).unwrap()
}

/// The leader key's holder, polled until `until` (wall clock): the first other holder seen
/// and how long before `until` that was.
fn leader_moves_before(b: &Bed, holder: &str, until: SystemTime) -> Option<(String, Duration)> {
    let mut samples = 0;
    while SystemTime::now() < until {
        if let Ok(Some(k)) = b.leader_key(None) {
            samples += 1;
            if k.holder != holder {
                let early = until.duration_since(SystemTime::now()).unwrap_or_default();
                return Some((k.holder, early));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(samples > 3, "the leader key could not be read");
    None
}

/// Panics if the leader key names anyone but `holder` before `until`.
fn leader_stays_until(b: &Bed, holder: &str, until: SystemTime, what: &str) {
    if let Some((other, early)) = leader_moves_before(b, holder, until) {
        panic!("{what}: the leader key moved from {holder} to {other} {early:?} too early");
    }
}

/// Waits until leader `i`'s REST API (`GET /cluster`) shows a scheduled switchover, or no
/// longer shows one (`shown` false); returns how long that took.
fn scheduled_shown(b: &Bed, i: usize, shown: bool) -> Duration {
    let (client, rt) = b.api_client();
    let url = format!("{}/cluster", b.c.agents[i].api_base());
    let t = Instant::now();
    b.c.wait(
        "GET /cluster to show the scheduled switchover, or not",
        Duration::from_secs(10),
        |_| {
            rt.block_on(client.get(&url))
                .ok()
                .and_then(|r| r.json::<serde_json::Value>().ok())
                .is_some_and(|v| v.get("scheduled_switchover").is_some() == shown)
        },
    )
    .unwrap();
    t.elapsed()
}

/// Item 3 through `pgkeep ctl`, under writers in synchronous mode: a manual failover to the
/// asynchronous replica is refused and changes nothing (as in Patroni: in synchronous mode
/// only a synchronous standby may be promoted); one to the synchronous standby promotes it and
/// loses nothing; then a scheduled switchover waits for its time, and another one cancelled
/// with `ctl flush switchover` never happens.
#[test]
fn ctl_failover_and_scheduled_switchover_under_writers() {
    let name = "fctlsw";
    let b = bed(name, 1, sync_mode());
    let _logs = b.keep_logs(name);
    let p = b.c.primary().unwrap();
    let sync = sync_standbys_of(&b, p);
    assert_eq!(sync.len(), 1, "{sync:?}");
    let s = index_of(&b, &sync[0]);
    let a = (0..3).find(|i| *i != p && *i != s).unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));

    // To the asynchronous replica: refused, nothing changes.
    let (ok, text) = ctl(&b, &["failover", "--candidate", &b.name(a), "--force"]);
    assert!(
        !ok,
        "a failover to an asynchronous member in synchronous mode: {text}"
    );
    assert_eq!(b.c.primary(), Some(p));
    assert_eq!(b.leader_key(None).unwrap().unwrap().holder, b.name(p));

    // To the synchronous standby.
    let t_failover = w.now();
    let out = ctl_ok(&b, &["failover", "--candidate", &b.name(s), "--force"]);
    let t_failover_done = w.now();
    assert!(out.contains(&b.name(s)), "{out}");
    let np = b.healthy_again(Duration::from_secs(60));
    assert_eq!(np, s, "the candidate leads");
    assert_eq!(b.leader_key(None).unwrap().unwrap().holder, b.name(s));

    // A scheduled switchover: nothing before its time, the switch after it.
    let next = index_of(&b, &sync_standbys_of(&b, s)[0]);
    let (at, at_text) = scheduled_in(Duration::from_secs(4));
    let out = ctl_ok(
        &b,
        &[
            "switchover",
            "--candidate",
            &b.name(next),
            "--scheduled",
            &at_text,
            "--force",
        ],
    );
    assert!(out.to_lowercase().contains("scheduled"), "{out}");
    leader_stays_until(
        &b,
        &b.name(s),
        at - Duration::from_millis(300),
        "a switchover before its scheduled time",
    );
    assert_eq!(b.c.primary(), Some(s), "no switchover before the time");
    let waited = Instant::now();
    let mut switched_at = None;
    while waited.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(k)) = b.leader_key(None)
            && k.holder == b.name(next)
        {
            switched_at = Some(SystemTime::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let switched_at = switched_at.expect("the scheduled switchover did not happen");
    assert!(
        switched_at >= at,
        "the leader key moved before the scheduled time"
    );
    let late = switched_at.duration_since(at).unwrap();
    let np = b.healthy_again(Duration::from_secs(60));
    assert_eq!(np, next);

    // Another scheduled switchover, cancelled: it never happens.
    let other = (0..3)
        .find(|i| b.name(*i) == sync_standbys_of(&b, next)[0])
        .unwrap();
    let (at, at_text) = scheduled_in(Duration::from_secs(5));
    ctl_ok(
        &b,
        &[
            "switchover",
            "--candidate",
            &b.name(other),
            "--scheduled",
            &at_text,
            "--force",
        ],
    );
    let failover_key = || {
        b.etcd
            .etcdctl(&[
                "get",
                &format!("/service/{}/failover", b.c.scope),
                "--print-value-only",
            ])
            .unwrap()
            .stdout
    };
    assert!(
        failover_key().contains("scheduled_at"),
        "{}",
        failover_key()
    );
    // The leader's REST API answers from the snapshot its HA loop publishes each cycle, and
    // until that shows the schedule, DELETE /switchover answers 404 although etcd holds it
    // (see `flush_right_after_scheduling_cancels_the_switchover`): wait for it here.
    let lag = scheduled_shown(&b, next, true);
    let out = ctl_ok(&b, &["flush", "switchover"]);
    assert!(out.contains("deleted"), "{out}");
    assert!(
        !failover_key().contains("scheduled_at"),
        "{}",
        failover_key()
    );
    // The same snapshot lag answers a second DELETE at once with 409 (a CAS on the revision
    // the snapshot still shows): wait for it before checking that nothing is left to cancel.
    scheduled_shown(&b, next, false);
    let (again, text) = ctl(&b, &["flush", "switchover"]);
    assert!(
        !again && text.contains("no switchover is scheduled"),
        "{text}"
    );
    leader_stays_until(
        &b,
        &b.name(next),
        at + Duration::from_secs(3),
        "a cancelled switchover",
    );
    assert_eq!(
        b.c.primary(),
        Some(next),
        "the cancelled switchover did not happen"
    );

    let records = w.stop();
    let r = writer::check(&records, &b.rows(next));
    let gap = |from: Duration, to: Duration| -> Option<Duration> {
        let mut acks: Vec<Duration> = records
            .iter()
            .filter(|r: &&Record| r.writer == "any" && matches!(r.outcome, Outcome::Acked { .. }))
            .map(|r| r.end)
            .collect();
        acks.sort();
        acks.windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
    };
    print_figures(
        name,
        &r,
        &[
            ("ctl failover write gap", gap(t_failover, t_failover_done)),
            ("ctl failover command", Some(t_failover_done - t_failover)),
            ("scheduled switchover: time -> leader key moved", Some(late)),
            (
                "schedule written -> visible in the leader's REST API",
                Some(lag),
            ),
        ],
    );
    assert_safe(&r, true);
    assert_eq!(r.primaries.len(), 3, "three timelines: {:?}", r.primaries);
    assert_eq!(b.history_len(), 2);
}

/// Item 5: `synchronous_node_count: 2` on three nodes. `/sync` and the primary's
/// `synchronous_standby_names` name both replicas; with the walsender to one of them stopped,
/// no commit is acknowledged (one standby is not enough); then the primary's host is lost
/// and a member of `/sync` takes over without losing an acknowledged write.
#[test]
fn synchronous_node_count_two_waits_for_both_and_loses_nothing() {
    let name = "fsync2";
    let b = bed(name, 1, sync_mode());
    let _logs = b.keep_logs(name);
    b.set_dynamic("synchronous_node_count", serde_json::json!(2));
    let p = b.c.primary().unwrap();
    let mut replicas: Vec<String> = (0..3).filter(|i| *i != p).map(|i| b.name(i)).collect();
    replicas.sort();
    let leader = b.name(p);
    b.c.wait(
        "/sync naming both replicas",
        Duration::from_secs(20),
        |_| b.sync_key() == Some((leader.clone(), replicas.clone())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n/sync: {:?}", b.sync_key()));
    let ssn = || {
        b.c.psql(p, "SHOW synchronous_standby_names")
            .unwrap()
            .stdout
            .trim()
            .to_owned()
    };
    b.c.wait(
        "synchronous_standby_names naming both replicas",
        Duration::from_secs(10),
        |_| {
            let s = ssn();
            s.starts_with('2') && replicas.iter().all(|r| s.contains(r.as_str()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nsynchronous_standby_names = {}", ssn()));
    eprintln!("[{name}] synchronous_standby_names = {}", ssn());
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(3));
    // Stop the walsender to one replica only: with two synchronous standbys required, no
    // commit may be acknowledged until the primary dies.
    let stalled = &replicas[0];
    let out =
        b.c.psql(
            p,
            &format!("SELECT pid FROM pg_stat_replication WHERE application_name = '{stalled}'"),
        )
        .unwrap();
    let walsender: i32 = out.stdout.trim().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(walsender),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t_stall = w.now();
    std::thread::sleep(Duration::from_millis(1500));
    b.c.kill_host(p).unwrap();
    let t_kill = w.now();
    let np = b.primary_except(p, Duration::from_secs(45));
    let mut c = b.c;
    c.start(p).unwrap();
    let b = Bed { c, ..b };
    let np2 = b.healthy_again(Duration::from_secs(120));
    assert_eq!(np, np2);
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let acked_with_one: Vec<&Record> = records
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Acked { .. })
                && r.start > t_stall + Duration::from_millis(300)
                && r.end <= t_kill
        })
        .collect();
    let first = writer::first_ack_after(&records, t_kill);
    print_figures(
        name,
        &r,
        &[
            (
                "kill -> first acknowledged write",
                first.map(|f| f - t_kill),
            ),
            ("replication to one standby stalled", Some(t_kill - t_stall)),
        ],
    );
    eprintln!(
        "[{name}] stalled {stalled}, promoted {}, /sync now {:?}",
        b.name(np),
        b.sync_key()
    );
    assert!(
        replicas.contains(&b.name(np)),
        "a member of /sync took over"
    );
    assert!(
        acked_with_one.is_empty(),
        "{} commits were acknowledged with one of two synchronous standbys stalled: {:?}",
        acked_with_one.len(),
        acked_with_one.first()
    );
    assert_safe(&r, true);
    assert!(first.is_some(), "no write acknowledged after the failover");
}

/// `DELETE /switchover` right after `POST /switchover` scheduled one must cancel it: the
/// operator who schedules by mistake and cancels at once must not be told "no switchover is
/// scheduled" while etcd holds it and the switchover then happens.
#[test]
fn flush_right_after_scheduling_cancels_the_switchover() {
    let name = "fflushnow";
    let b = bed(name, 1, DcsOptions::default());
    let _logs = b.keep_logs(name);
    let p = b.c.primary().unwrap();
    let candidate = (p + 1) % 3;
    let (client, rt) = b.api_client();
    let url = format!("{}/switchover", b.c.agents[p].api_base());
    let mut answers = Vec::new();
    for _ in 0..8 {
        let (_, at_text) = scheduled_in(Duration::from_secs(30));
        let body = serde_json::json!({
            "leader": b.name(p),
            "candidate": b.name(candidate),
            "scheduled_at": at_text,
        });
        let posted = rt
            .block_on(client.post_json(&url, &body.to_string()))
            .unwrap();
        assert_eq!(posted.status, 202, "{}", posted.text());
        let deleted = rt.block_on(client.delete(&url)).unwrap();
        answers.push((deleted.status, deleted.text()));
        if deleted.status != 200 {
            // Still scheduled: cancel it once the API sees it, before the next round.
            scheduled_shown(&b, p, true);
            let again = rt.block_on(client.delete(&url)).unwrap();
            assert_eq!(again.status, 200, "{}", again.text());
        }
        // The same lag refuses a POST right after the DELETE (409): let the snapshot catch up.
        scheduled_shown(&b, p, false);
    }
    eprintln!("[{name}] DELETE /switchover right after scheduling: {answers:?}");
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "DELETE /switchover right after POST did not cancel: {answers:?} (the switchover then \
         happens at its time)"
    );
    assert_eq!(b.c.primary(), Some(p));
}

/// The state in which the REST API answered 503 "Failover failed" for a failover that had
/// completed (`ctl_failover_and_scheduled_switchover_under_writers` caught it in 2 runs of 4
/// against 4f840e2; fixed in 2a6bbc6), as a regression test of the pure decision the API
/// takes. The new leader clears `/failover` in the cycle that first publishes its member key
/// with role `primary`, the clear first; an old leader whose snapshot falls between the two
/// writes sees the leader key held by the candidate, `/failover` cleared, the candidate's
/// member key still `replica`. That is not a failure: keep waiting (or answer success).
#[test]
fn completed_failover_is_not_reported_as_failed() {
    use pgkeep_core::cluster::{ClusterView, RawEntry};
    use pgkeep_core::ha::manual::{self, ManualKind, RequestBody};

    let entry = |suffix: &str, value: &str, mod_revision: i64| RawEntry {
        suffix: suffix.into(),
        value: value.as_bytes().to_vec(),
        mod_revision,
        lease: 0,
    };
    let member = |name: &str, role: &str, rev: i64| {
        entry(
            &format!("members/{name}"),
            &serde_json::json!({
                "api_url": format!("https://{name}.test:8008/patroni"),
                "conn_url": format!("postgres://{name}.test:5432/postgres"),
                "state": "running",
                "role": role,
                "xlog_location": 100,
                "timeline": 1,
            })
            .to_string(),
            rev,
        )
    };
    let now_ms = i64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let (before, rejected) = ClusterView::from_entries(&[
        entry("leader", "node1", 5),
        member("node1", "primary", 3),
        member("node2", "replica", 4),
        member("node3", "replica", 4),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let body = RequestBody {
        leader: None,
        candidate: Some("node2".into()),
        scheduled_at: None,
    };
    let accepted = manual::check_request(ManualKind::Failover, &body, &before, now_ms, false)
        .unwrap_or_else(|r| panic!("refused: {r:?}"));
    // `/failover` written at revision 6; node2 took the key (8) and cleared `/failover` (9);
    // its member key, with role primary, is the next write.
    let (between, rejected) = ClusterView::from_entries(&[
        entry("leader", "node2", 8),
        entry("failover", "{}", 9),
        member("node1", "replica", 7),
        member("node2", "replica", 4),
        member("node3", "replica", 4),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let answer = manual::outcome(&accepted, &between, 6);
    assert_ne!(
        answer.as_ref().map(|(code, _)| *code),
        Some(503),
        "the failover to node2 completed (node2 holds the leader key), yet: {answer:?}"
    );
}
