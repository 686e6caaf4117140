//! A stuck postmaster under a frozen agent: the fence guard's last resort.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgkeep_testkit::{DcsOptions, Frozen, process_tree};

use super::writer::{self, Outcome, Writers};
use super::{assert_safe, bed, port_of, print_figures};

/// Start time (clock ticks since boot) of `pid`, if it exists and is not a zombie: with the
/// PID it identifies the process, so a recycled PID never counts as the old process.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// (h″): the primary's agent is frozen (SIGSTOP) and so is its postmaster, so neither the
/// agent nor a fast or immediate shutdown can stop PostgreSQL, while its backends and
/// walsenders keep committing. The fence guard must escalate to SIGKILL of every process of
/// the instance at its lease deadline: all of them are gone before the leader key passes to
/// another member, and before the new primary acknowledges its first write.
#[test]
fn stuck_postmaster_under_a_frozen_agent_is_killed_by_the_guard() {
    let name = "fstuckpm";
    let b = bed(name, 1, DcsOptions::default());
    let _logs = b.keep_logs(name);
    let p = b.c.primary().unwrap();
    let old_port = port_of(&b, p);
    let old_name = b.name(p);
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    let pm = b.c.postmaster_pid(p).unwrap();
    // Every process of the instance, identified by PID and start time, captured before the
    // fault (backends of the writers included).
    let family: BTreeMap<i32, u64> = process_tree(pm)
        .into_iter()
        .filter_map(|pid| Some((pid, start_ticks(pid)?)))
        .collect();
    assert!(
        family.len() >= 5,
        "postmaster, auxiliaries, walsenders, backends: {family:?}"
    );
    let t_fault = w.now();
    let agent = Frozen::stop([b.c.agent_pid(p).unwrap()]).unwrap();
    let postmaster = Frozen::stop([pm]).unwrap();
    // Poll the instance's processes every few milliseconds on a thread of its own.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let family = family.clone();
        let t0 = w.t0;
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let alive = family
                    .iter()
                    .filter(|(pid, start)| start_ticks(**pid) == Some(**start))
                    .count();
                if alive == 0 {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    };
    // The leader key, polled: the last time it still named the old primary or nobody, and
    // the first time it named another member.
    let mut last_not_new = w.now();
    let mut t_new_key = None;
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        let before = w.now();
        match b.leader_key(None) {
            Ok(Some(k)) if k.holder != old_name => {
                t_new_key = Some((before, w.now(), k.holder));
                break;
            }
            Ok(_) => last_not_new = before,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::SeqCst);
    let t_dead = watcher.join().unwrap();
    let survivors: Vec<i32> = family
        .iter()
        .filter(|(pid, start)| start_ticks(**pid) == Some(**start))
        .map(|(pid, _)| *pid)
        .collect();
    drop(postmaster);
    drop(agent);
    let (t_key_seen, t_key_read, new_leader) = t_new_key.unwrap_or_else(|| {
        b.save_logs(name);
        panic!("no other member took the leader key within 45 s")
    });
    let np = b.primary_except(p, Duration::from_secs(30));
    assert_eq!(b.name(np), new_leader);
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
        .map(|r| r.end)
        .min();
    let since = |t: Duration| t.saturating_sub(t_fault);
    print_figures(
        name,
        &r,
        &[
            ("fault -> old primary's last ack", last_old.map(since)),
            (
                "fault -> every process of the instance gone",
                t_dead.map(since),
            ),
            (
                "fault -> leader key last seen not taken",
                Some(since(last_not_new)),
            ),
            ("fault -> leader key seen taken", Some(since(t_key_read))),
            ("fault -> new primary's first ack", first_new.map(since)),
        ],
    );
    let log = b.agent_log(p);
    let t_dead = t_dead.unwrap_or_else(|| {
        b.save_logs(name);
        panic!(
            "{} of {} processes of the stuck instance survived until another member led: \
             {survivors:?}\n{}",
            survivors.len(),
            family.len(),
            &log[log.len().saturating_sub(3000)..]
        )
    });
    assert!(
        t_dead <= last_not_new,
        "the stuck instance's last process died at {:?}, after the leader key was taken \
         (seen taken at {:?}, free or old at {:?})",
        since(t_dead),
        since(t_key_seen),
        since(last_not_new)
    );
    let first_new = first_new.expect("the new primary acknowledged nothing");
    assert!(t_dead < first_new);
    assert!(last_old.is_some_and(|l| l < first_new));
    assert_safe(&r, false);
    assert!(
        log.contains("killing every process of the instance"),
        "the guard must have escalated to SIGKILL:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
}
