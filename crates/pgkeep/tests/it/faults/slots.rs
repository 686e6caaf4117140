//! Item 6: a permanent logical slot from `/config.slots` survives a switchover and a host loss.
//! The replicas keep copies (state file copied from the leader, then advanced to the leader's
//! published position), so a consumer resumes on the new primary without missing a change.

use std::collections::BTreeSet;
use std::time::Duration;

use pgkeep_testkit::DcsOptions;

use super::bed;

const LOGICAL: &str = "    postgresql: {parameters: {wal_level: logical}}
    slots: {cdc: {type: logical, database: postgres, plugin: test_decoding}}
";

fn sql(b: &super::Bed, i: usize, q: &str) -> String {
    let out = b.c.psql(i, q).unwrap();
    assert!(out.success(), "node {i}: {q}: {}", out.stderr);
    out.stdout
}

/// Consumes every pending change of `cdc` on node `i`: the ids inserted into `lslot`.
fn consume(b: &super::Bed, i: usize) -> Vec<i64> {
    sql(
        b,
        i,
        "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, NULL)",
    )
    .lines()
    .filter(|l| l.starts_with("table public.lslot: INSERT:"))
    .filter_map(|l| l.rsplit(':').next()?.parse().ok())
    .collect()
}

fn has_slot(b: &super::Bed, i: usize) -> bool {
    b.c.psql(
        i,
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc' AND slot_type = 'logical'",
    )
    .is_ok_and(|o| o.stdout.trim() == "1")
}

fn postmaster_start(b: &super::Bed, i: usize) -> String {
    sql(b, i, "SELECT pg_postmaster_start_time()")
        .trim()
        .to_owned()
}

#[test]
fn logical_slot_consumer_resumes_after_a_switchover_and_a_host_loss() {
    let dcs = DcsOptions {
        extra_yaml: LOGICAL.into(),
        ..DcsOptions::default()
    };
    let b = bed("flogical", 1, dcs);
    let p = b.c.primary().unwrap();
    sql(&b, p, "CREATE TABLE lslot (id int PRIMARY KEY)");
    b.c.wait(
        "the logical slot on every node",
        Duration::from_secs(60),
        |_| (0..3).all(|i| has_slot(&b, i)),
    )
    .unwrap();
    b.healthy_again(Duration::from_secs(60));
    // One copy per replica, not a restart loop.
    let starts: Vec<String> = (0..3).map(|i| postmaster_start(&b, i)).collect();

    sql(&b, p, "INSERT INTO lslot SELECT generate_series(1, 50)");
    let before: Vec<i64> = consume(&b, p);
    assert_eq!(before, (1..=50).collect::<Vec<_>>());
    let confirmed = sql(
        &b,
        p,
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'cdc'",
    );
    let confirmed = confirmed.trim();
    b.c.wait(
        "the replicas' copies advanced to the consumer's position",
        Duration::from_secs(30),
        |_| {
            (0..3).filter(|i| *i != p).all(|i| {
                b.c.psql(
                    i,
                    &format!(
                        "SELECT confirmed_flush_lsn >= '{confirmed}' FROM pg_replication_slots \
                         WHERE slot_name = 'cdc'"
                    ),
                )
                .is_ok_and(|o| o.stdout.trim() == "t")
            })
        },
    )
    .unwrap_or_else(|e| {
        b.save_logs("flogical");
        panic!("{e:#}")
    });
    sql(&b, p, "INSERT INTO lslot SELECT generate_series(51, 100)");
    let after_starts: Vec<String> = (0..3).map(|i| postmaster_start(&b, i)).collect();
    assert_eq!(starts, after_starts, "a node restarted again");

    let candidate = (p + 1) % 3;
    let (code, text) = b.switchover(p, candidate);
    assert_eq!(code, 200, "{text}");
    let np = b.healthy_again(Duration::from_secs(60));
    assert_eq!(np, candidate);
    sql(&b, np, "INSERT INTO lslot SELECT generate_series(101, 150)");
    let resumed = consume(&b, np);
    let got: BTreeSet<i64> = resumed.iter().copied().collect();
    let missing: Vec<i64> = (51..=150).filter(|i| !got.contains(i)).collect();
    let repeated = resumed.iter().filter(|i| **i <= 50).count();
    println!(
        "flogical: resumed with {} changes, {repeated} of them already consumed before the switchover",
        resumed.len()
    );
    assert!(
        missing.is_empty(),
        "changes lost across the switchover: {missing:?}"
    );
    // The new primary's slot moves on: a second read returns only what came after.
    sql(&b, np, "INSERT INTO lslot SELECT generate_series(151, 160)");
    assert_eq!(consume(&b, np), (151..=160).collect::<Vec<_>>());
    // The old primary rejoined as a replica and still has a copy.
    b.c.wait(
        "the old primary keeps a copy",
        Duration::from_secs(30),
        |_| has_slot(&b, p),
    )
    .unwrap();
    // Host loss: the slot survives an unplanned failover too.
    b.c.wait(
        "the replicas' copies caught up",
        Duration::from_secs(30),
        |_| {
            let pos = sql(
                &b,
                np,
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'cdc'",
            );
            (0..3).filter(|i| *i != np).all(|i| {
                b.c.psql(
                    i,
                    &format!(
                        "SELECT confirmed_flush_lsn >= '{}' FROM pg_replication_slots \
                         WHERE slot_name = 'cdc'",
                        pos.trim()
                    ),
                )
                .is_ok_and(|o| o.stdout.trim() == "t")
            })
        },
    )
    .unwrap();
    b.c.kill_host(np).unwrap();
    let np2 = b.primary_except(np, Duration::from_secs(45));
    sql(
        &b,
        np2,
        "INSERT INTO lslot SELECT generate_series(161, 170)",
    );
    let after_failover = consume(&b, np2);
    let got: BTreeSet<i64> = after_failover.iter().copied().collect();
    assert!(
        (161..=170).all(|i| got.contains(&i)),
        "changes lost across the failover: {after_failover:?}"
    );
    assert!(
        after_failover.iter().all(|i| *i > 150),
        "the copy was advanced to the consumer's position: {after_failover:?}"
    );
    if std::env::var_os("PGKEEP_TEST_SAVE_LOGS").is_some() {
        b.save_logs("flogical");
    }
    drop(b.env);
}
