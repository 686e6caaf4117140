//! Planned operations and replication settings under writers: switchover, the watchdog,
//! slots across failover, strict synchronous mode.

use std::time::Duration;

use pgkeep_testkit::{AgentCluster, DcsOptions};

use super::writer::{self, Outcome, Record, Writers};
use super::{Bed, assert_safe, bed, bed_with, print_figures};

/// (e): switchover to a named candidate and back, through the authenticated REST API, under
/// writers. No acknowledged write is lost, never two primaries, and each switchover answers
/// 200 naming the new leader.
#[test]
fn switchover_there_and_back_through_the_rest_api() {
    let b = bed("fswitch", 1, DcsOptions::default());
    let (client, rt) = b.api_client();
    let first = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let mut gaps = Vec::new();
    let mut leader = first;
    for candidate in [(first + 1) % 3, first] {
        let name = |i: usize| b.c.agents[i].node.name.clone();
        let body = serde_json::json!({"leader": name(leader), "candidate": name(candidate)});
        let url = format!("{}/switchover", b.c.agents[leader].api_base());
        let t_post = w.now();
        let resp = rt
            .block_on(client.post_json(&url, &body.to_string()))
            .unwrap();
        let t_done = w.now();
        if resp.status != 200 {
            let keys = b
                .etcd
                .etcdctl(&["get", "--prefix", &format!("/service/{}/", b.c.scope)])
                .map(|o| o.stdout)
                .unwrap_or_default();
            let log = b.agent_log(leader);
            panic!(
                "switchover answered {}: {}\n{keys}\n{}",
                resp.status,
                resp.text(),
                &log[log.len().saturating_sub(3000)..]
            );
        }
        assert!(resp.text().contains(&name(candidate)), "{}", resp.text());
        let np = b.healthy_again(Duration::from_secs(60));
        if np != candidate {
            b.save_logs("fswitch");
        }
        assert_eq!(np, candidate, "{}", resp.text());
        std::thread::sleep(Duration::from_secs(2));
        gaps.push((t_post, t_done));
        leader = candidate;
    }
    let records = w.stop();
    let r = writer::check(&records, &b.rows(leader));
    let figures: Vec<(String, Option<Duration>)> = gaps
        .iter()
        .enumerate()
        .map(|(i, (from, to))| {
            (
                format!("switchover {} write gap", i + 1),
                Some(writer::ack_gap(&records, *from, *to).unwrap_or_default()),
            )
        })
        .collect();
    let figures: Vec<(&str, Option<Duration>)> =
        figures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    print_figures("fswitch", &r, &figures);
    if std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_some() {
        b.save_logs("fswitch");
    }
    assert_safe(&r, true);
    assert_eq!(r.primaries.len(), 3, "three timelines: {:?}", r.primaries);
    assert_eq!(b.history_len(), 2);
    drop(b.env);
}

/// Appends a `watchdog` section to node `i`'s configuration.
fn set_watchdog(c: &AgentCluster, i: usize, mode: &str, device: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&c.agents[i].config)
        .unwrap();
    writeln!(
        f,
        "watchdog: {{mode: {mode}, device: {}, safety_margin: 5}}",
        device.display()
    )
    .unwrap();
}

/// Watchdog devices (a fake one: a file; never a real device in tests). The leader keeps its
/// device alive every cycle and closes it with the magic `V` when it hands over; a node whose
/// watchdog is `required` but missing never becomes leader, even when it is the only choice
/// besides nothing.
#[test]
fn watchdog_is_kept_alive_by_the_leader_and_required_means_required() {
    let pg = pgkeep_testkit::ServiceUser::postgres().unwrap();
    let fake = std::cell::RefCell::new(None);
    let b = bed_with("fwatchdog", 1, DcsOptions::default(), |c| {
        let dev = c.agents[0].node.dir.join("fake-watchdog");
        std::fs::write(&dev, b"").unwrap();
        pg.chown(&dev).unwrap();
        set_watchdog(c, 0, "automatic", &dev);
        set_watchdog(
            c,
            1,
            "required",
            &c.agents[1].node.dir.join("no-such-watchdog"),
        );
        // The node without its watchdog would otherwise win every tie: if `required` were
        // ignored, the host-loss failover below would go to it, not by chance.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&c.agents[1].config)
            .unwrap();
        writeln!(f, "tags: {{failover_priority: 9}}").unwrap();
        *fake.borrow_mut() = Some(dev);
    });
    let dev = fake.into_inner().unwrap();
    assert_eq!(b.c.primary(), Some(0));
    let len = || std::fs::metadata(&dev).map(|m| m.len()).unwrap_or(0);
    let before = len();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        len() >= before + 2,
        "the leader keeps its watchdog alive every cycle"
    );
    let status: serde_json::Value = {
        let out = b
            .etcd
            .etcdctl(&[
                "get",
                "/service/fwatchdog/members/fwatchdog2",
                "--print-value-only",
            ])
            .unwrap();
        serde_json::from_str(out.stdout.trim()).unwrap()
    };
    assert_eq!(status["state"], "running", "{status}");
    // The leader's host is lost: node 2 (required, no device) must not take over; node 3 does.
    b.c.kill_host(0).unwrap();
    let np = b.primary_except(0, Duration::from_secs(45));
    assert_eq!(
        np, 2,
        "the node without its required watchdog must not lead"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.c.primary(), Some(2));
    let log = b.agent_log(1);
    assert!(
        log.contains("watchdog.mode is required but the device is not writable"),
        "{log}"
    );
    // Handing over closes the device with the magic character: bring node 1 back, switch over
    // to it (it arms its device again), then away from it.
    let mut c = b.c;
    c.start(0).unwrap();
    let b = Bed { c, ..b };
    b.healthy_again(Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(2));
    let (code, text) = b.switchover(2, 0);
    assert_eq!(code, 200, "{text}");
    b.healthy_again(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let (code, text) = b.switchover(0, 2);
    assert_eq!(code, 200, "{text}");
    b.healthy_again(Duration::from_secs(60));
    let bytes = std::fs::read(&dev).unwrap();
    assert_eq!(bytes.last(), Some(&b'V'), "magic close after handing over");
    drop(b.env);
}

/// Slots across failover: the new primary has a slot for every other member as soon as it
/// leads (so they can reconnect without losing WAL) and the permanent physical slot from
/// `/config.slots`.
#[test]
fn member_and_permanent_slots_exist_on_the_new_primary_after_host_loss() {
    let b = bed("fslots", 1, DcsOptions::default());
    b.set_dynamic(
        "slots",
        serde_json::json!({"keep_me": {"type": "physical"}}),
    );
    let p = b.c.primary().unwrap();
    let slots = |i: usize| -> Vec<String> {
        b.c.psql(i, "SELECT slot_name FROM pg_replication_slots ORDER BY 1")
            .map(|o| o.stdout.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let names: Vec<String> = b.c.agents.iter().map(|a| a.node.name.clone()).collect();
    let expect = |leader: usize| -> Vec<String> {
        let mut v: Vec<String> = (0..3)
            .filter(|i| *i != leader)
            .map(|i| names[i].clone())
            .chain(["keep_me".to_owned()])
            .collect();
        v.sort();
        v
    };
    b.c.wait(
        "the permanent slot on the primary",
        Duration::from_secs(15),
        |_| slots(p) == expect(p),
    )
    .unwrap();
    b.c.kill_host(p).unwrap();
    let np = b.primary_except(p, Duration::from_secs(45));
    // Checked at once: the slots are created in the promotion's own cycle.
    b.c.wait(
        "member and permanent slots on the new primary",
        Duration::from_secs(3),
        |_| slots(np) == expect(np),
    )
    .unwrap();
    drop(b.env);
}

/// `synchronous_mode_strict`: with every replica gone the primary accepts no commit at all
/// (nothing is acknowledged without a synchronous standby), and commits resume once a replica
/// is back; nothing acknowledged is lost.
#[test]
fn strict_synchronous_mode_blocks_commits_without_a_standby() {
    let b = bed(
        "fstrict",
        1,
        DcsOptions {
            synchronous_mode: true,
            ..DcsOptions::default()
        },
    );
    b.set_dynamic("synchronous_mode_strict", serde_json::json!(true));
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(3));
    let replicas: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    for r in &replicas {
        b.c.kill_host(*r).unwrap();
    }
    let t_kill = w.now();
    std::thread::sleep(Duration::from_secs(8));
    let t_back = w.now();
    let mut c = b.c;
    c.start(replicas[0]).unwrap();
    let b = Bed { c, ..b };
    b.c.wait("writes resume", Duration::from_secs(60), |_| {
        b.c.psql(p, "SELECT count(*) FROM fault_log")
            .is_ok_and(|o| o.success())
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(p));
    // A commit that started a moment after the kill may already have been waiting for the
    // standby's answer; none that started later than a second after it may be acknowledged
    // before the replica came back.
    let acked_while_alone: Vec<&Record> = records
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Acked { .. })
                && r.start > t_kill + Duration::from_secs(1)
                && r.end < t_back
        })
        .collect();
    // The blocked commits complete once a standby confirms them.
    let resumed = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Acked { .. }) && r.end > t_back)
        .map(|r| r.end)
        .min();
    print_figures(
        "fstrict",
        &r,
        &[(
            "replica started -> first acknowledgement",
            resumed.map(|t| t - t_back),
        )],
    );
    assert!(
        acked_while_alone.is_empty(),
        "strict mode acknowledged {} commits without a standby",
        acked_while_alone.len()
    );
    assert!(resumed.is_some(), "commits never resumed");
    assert_safe(&r, true);
    drop(b.env);
}
