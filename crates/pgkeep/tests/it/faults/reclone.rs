//! Item 4 with `use_pg_rewind: false`: a former primary whose WAL passed the new timeline's
//! switch point is re-cloned (its data directory replaced by a fresh base backup of the
//! leader) instead of rewound, and follows the new leader with none of its lost commits.

use std::time::Duration;

use pgkeep_testkit::DcsOptions;

use super::writer::{self, Writers};
use super::{Bed, assert_safe, bed, print_figures};

#[test]
fn diverged_former_primary_is_recloned_without_pg_rewind() {
    let name = "freclone";
    let b = bed(
        name,
        1,
        DcsOptions {
            extra_yaml: "    postgresql: {use_pg_rewind: false}\n".into(),
            ..DcsOptions::default()
        },
    );
    let p = b.c.primary().unwrap();
    let w = Writers::start(&b.target);
    std::thread::sleep(Duration::from_secs(2));
    // Writes the replicas never get: the old primary's WAL passes the switch point.
    b.stall_replication(p);
    std::thread::sleep(Duration::from_secs(1));
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
    let rows = b.rows(np);
    let r = writer::check(&records, &rows);
    let first = writer::first_ack_after(&records, t_kill);
    print_figures(
        name,
        &r,
        &[(
            "kill -> first acknowledged write",
            first.map(|f| f - t_kill),
        )],
    );
    assert_safe(&r, false);
    assert!(
        !r.lost.is_empty(),
        "the stalled replication should have lost commits (otherwise nothing diverged)"
    );
    let log = b.agent_log(p);
    let restart = log.rfind("agent started").unwrap_or(0);
    let after = &log[restart..];
    if !after.contains("background operation finished op=Clone") {
        b.save_logs(name);
    }
    assert!(
        after.contains("background operation finished op=Clone"),
        "the diverged node must be re-cloned"
    );
    assert!(
        !after.contains("rewinding with pg_rewind"),
        "no rewind when it is off"
    );
    // The re-cloned node holds the new primary's rows and none of the lost ones.
    let mirrored = b.rows(p);
    assert!(r.lost.iter().all(|k| !mirrored.contains(k)));
    drop(b.env);
}
