//! Unplanned faults: host loss, PostgreSQL crash, the agent killed or frozen, etcd frozen.

use std::time::{Duration, Instant};

use pgkeep_testkit::DcsOptions;

use super::writer::{self, Outcome, Record, Writers};
use super::{Bed, assert_safe, bed, port_of, print_figures};

/// (a) + (g) + (f): replication stalls for a second, then the primary's host is lost. The
/// cluster fails over within a bound; in synchronous mode no acknowledged write is lost (the
/// stalled commits were never acknowledged); in asynchronous mode the unreplicated ones are,
/// and the old primary, whose WAL went past the switch point, rejoins with pg_rewind.
fn host_loss(name: &str, sync: bool) {
    let b = bed(
        name,
        1,
        DcsOptions {
            synchronous_mode: sync,
            ..DcsOptions::default()
        },
    );
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(3));
    b.stall_replication(p);
    std::thread::sleep(Duration::from_secs(1));
    b.c.kill_host(p).unwrap();
    let t_kill = w.now();
    let np = b.primary_except(p, Duration::from_secs(45));
    let t_promoted = w.now();
    std::thread::sleep(Duration::from_secs(2));
    let mut c = b.c;
    c.start(p).unwrap();
    let b = Bed { c, ..b };
    let np2 = b.healthy_again(Duration::from_secs(120));
    assert_eq!(np, np2, "the restarted node must not take over");
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let rows = b.rows(np);
    let r = writer::check(&records, &rows);
    let first = writer::first_ack_after(&records, t_kill);
    let last_old = records
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Acked { port, .. } if port == port_of(&b, p))
                && r.end <= t_kill
        })
        .map(|r| r.end)
        .max();
    print_figures(
        name,
        &r,
        &[
            (
                "kill -> first acknowledged write",
                first.map(|f| f - t_kill),
            ),
            ("kill -> new primary seen", Some(t_promoted - t_kill)),
            ("last old-primary ack before kill", last_old),
        ],
    );
    assert_safe(&r, sync);
    // The restarted old primary decides on a rewind before it starts PostgreSQL: started as a
    // standby on WAL past the switch point it would serve reads from the abandoned timeline.
    let log = b.agent_log(p);
    let restart = log.rfind("agent started").unwrap_or(0);
    let after = &log[restart..];
    if let Some(rewind) = after.find("rewinding with pg_rewind") {
        assert!(
            !after[..rewind].contains("PostgreSQL started"),
            "the old primary started PostgreSQL before its rewind:\n{}",
            &after[..rewind.min(6000)]
        );
    }
    let first = first.expect("no write acknowledged after the failover");
    let bound = Duration::from_secs(u64::from(b.dcs.ttl + b.dcs.loop_wait) + 15);
    assert!(first - t_kill < bound, "failover took {:?}", first - t_kill);
    assert!(b.history_len() >= 1, "the history key records the switch");
    if !sync {
        assert!(
            !r.lost.is_empty(),
            "with replication stalled, asynchronous mode should lose the unreplicated commits \
             (otherwise this test does not exercise divergence)"
        );
        let log = b.agent_log(p);
        if !log.contains("background operation finished op=Rewind")
            || std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_some()
        {
            b.save_logs(name);
        }
        assert!(
            log.contains("crash recovery in single-user mode before starting as a standby"),
            "the crashed old primary must learn the end of its WAL before it starts as a standby"
        );
        assert!(
            log.contains("background operation finished op=Rewind"),
            "the rewind must have succeeded"
        );
        assert!(
            log.contains("rewinding with pg_rewind"),
            "the diverged old primary must rejoin with pg_rewind:\n{}",
            &log[log.len().saturating_sub(4000)..]
        );
        // The lost writes stay lost: the rewound node does not bring them back.
        let back = b.rows(np);
        assert!(r.lost.iter().all(|k| !back.contains(k)));
    }
    drop(b.env);
}

#[test]
fn host_loss_in_synchronous_mode_loses_no_acknowledged_write() {
    host_loss("fsync", true);
}

#[test]
fn host_loss_in_asynchronous_mode_loses_unreplicated_writes_and_rewinds_the_old_primary() {
    host_loss("fasync", false);
}

/// (b): PostgreSQL alone is killed on the primary. The agent (which still holds the lease)
/// starts it again as primary after crash recovery; nothing acknowledged is lost (synchronous
/// mode) and no other node is promoted meanwhile.
#[test]
fn postgres_crash_on_the_primary_is_recovered_in_place() {
    let b = bed(
        "fpgkill",
        1,
        DcsOptions {
            synchronous_mode: true,
            ..DcsOptions::default()
        },
    );
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    b.c.kill_postgres(p).unwrap();
    let t_kill = w.now();
    std::thread::sleep(Duration::from_secs(1));
    let np = b.healthy_again(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let first = writer::first_ack_after(&records, t_kill);
    print_figures(
        "fpgkill",
        &r,
        &[(
            "kill -> first acknowledged write",
            first.map(|f| f - t_kill),
        )],
    );
    assert_safe(&r, true);
    assert_eq!(np, p, "the lease holder recovers its own PostgreSQL");
    assert_eq!(b.history_len(), 0, "no timeline switch");
    assert!(first.is_some());
}

/// (h): the agent on the primary is killed, or frozen for 2 × ttl, while PostgreSQL runs. The
/// fence guard stops PostgreSQL at the lease deadline, before any replica can be promoted: the
/// old primary's last acknowledged write precedes the new primary's first.
fn agent_lost(name: &str, freeze: bool) {
    let b = bed(name, 1, DcsOptions::default());
    let p = b.c.primary().unwrap();
    let old_port = port_of(&b, p);
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let t_fault = w.now();
    let frozen_at = Instant::now();
    if freeze {
        b.c.freeze_agent(p, true).unwrap();
    } else {
        b.c.kill_agent(p).unwrap();
    }
    let np = b.primary_except(p, Duration::from_secs(45));
    let t_promoted = w.now();
    assert!(
        b.c.postmaster_pid(p).is_none(),
        "the old primary's PostgreSQL must be stopped once another node is promoted"
    );
    let mut c = b.c;
    if freeze {
        let ttl = Duration::from_secs(u64::from(b.dcs.ttl));
        std::thread::sleep((ttl * 2).saturating_sub(frozen_at.elapsed()));
        c.freeze_agent(p, false).unwrap();
    } else {
        c.start(p).unwrap();
    }
    let b = Bed { c, ..b };
    let np2 = b.healthy_again(Duration::from_secs(120));
    assert_eq!(np, np2);
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let old_tl = r.first_timeline_on(old_port).unwrap();
    let last_old = writer::last_ack_on(&records, old_port, old_tl);
    let new_port = port_of(&b, np);
    let first_new = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Acked { port, .. } if port == new_port))
        .map(|r: &Record| r.end)
        .min();
    print_figures(
        name,
        &r,
        &[
            (
                "fault -> old primary's last ack",
                last_old.map(|t| t.saturating_sub(t_fault)),
            ),
            (
                "fault -> new primary's first ack",
                first_new.map(|t| t - t_fault),
            ),
            ("fault -> new primary seen", Some(t_promoted - t_fault)),
        ],
    );
    assert_safe(&r, false);
    assert!(
        last_old.unwrap() < first_new.unwrap(),
        "the old primary acknowledged a write after the new one did"
    );
    let guard_log = b.agent_log(p);
    assert!(
        guard_log.contains("fence guard: the agent did not renew the lease"),
        "the fence guard, not the agent, must have stopped PostgreSQL"
    );
    drop(b.env);
}

#[test]
fn agent_killed_on_the_primary_is_fenced_by_the_guard() {
    agent_lost("fagkill", false);
}

#[test]
fn agent_frozen_on_the_primary_is_fenced_by_the_guard() {
    agent_lost("fagstop", true);
}

/// (c″): every etcd member is frozen (accepts TCP, never answers) for ttl + 5 s. The primary
/// stops PostgreSQL before its lease can expire; after etcd resumes there is one leader again.
#[test]
fn frozen_etcd_makes_the_primary_fence_before_its_lease_expires() {
    let b = bed("fetcdstop", 3, DcsOptions::default());
    let p = b.c.primary().unwrap();
    let old_port = port_of(&b, p);
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let t_freeze = w.now();
    let pids: Vec<i32> = (0..3)
        .map(|i| i32::try_from(b.etcd.member_pid(i).unwrap()).unwrap())
        .collect();
    let signal = |s| {
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), s).unwrap();
        }
    };
    signal(nix::sys::signal::Signal::SIGSTOP);
    let ttl = Duration::from_secs(u64::from(b.dcs.ttl));
    std::thread::sleep(ttl + Duration::from_secs(5));
    let pg_up_at_expiry = b.c.postmaster_pid(p).is_some();
    signal(nix::sys::signal::Signal::SIGCONT);
    let np = b.healthy_again(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let records = w.stop();
    let r = writer::check(&records, &b.rows(np));
    let old_tl = r.first_timeline_on(old_port).unwrap();
    let last_old = writer::last_ack_on(&records, old_port, old_tl)
        .filter(|t| *t >= t_freeze)
        .map(|t| t - t_freeze);
    print_figures(
        "fetcdstop",
        &r,
        &[("freeze -> old primary's last ack", last_old)],
    );
    assert!(
        !pg_up_at_expiry,
        "PostgreSQL still ran after the lease could have expired"
    );
    if let Some(t) = last_old {
        assert!(
            t < ttl,
            "the old primary acknowledged a write {t:?} into the freeze"
        );
    }
    assert_safe(&r, false);
    drop(b.env);
}

/// In pause the guard stands down: the leader's agent can be killed (to be restarted or
/// handed back) without PostgreSQL being stopped when the lease runs out.
#[test]
fn paused_cluster_agent_killed_leaves_postgres_running() {
    let b = bed("fpause", 1, DcsOptions::default());
    let p = b.c.primary().unwrap();
    b.set_dynamic("pause", serde_json::json!(true));
    let state = b.c.agents[p].node.dir.join("conf/pgkeep-fence.state");
    b.c.wait(
        "the guard disarmed in pause",
        Duration::from_secs(15),
        |_| std::fs::read_to_string(&state).is_ok_and(|s| s.starts_with("disarmed")),
    )
    .unwrap();
    let pm = b.c.postmaster_pid(p).unwrap();
    b.c.kill_agent(p).unwrap();
    std::thread::sleep(Duration::from_secs(u64::from(b.dcs.ttl) + 3));
    assert_eq!(
        b.c.postmaster_pid(p),
        Some(pm),
        "in pause, PostgreSQL must outlive its agent and the lease"
    );
    // Negative control of the same bed: the guard did not exit early for lack of work and the
    // primary still accepts writes.
    let out = b.c.psql(p, "SELECT pg_is_in_recovery()").unwrap();
    assert_eq!(out.stdout.trim(), "f");
    drop(b.env);
}
