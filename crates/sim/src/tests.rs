//! Simulation tests: thousands of schedules that must hold every invariant, bit-for-bit replay,
//! and negative controls that prove the checker can fail.

use super::*;

/// Schedules in the normal test run (CI): four shards so they run in parallel.
const SHARD: u64 = 2_500;

fn assert_clean(from: u64, to: u64) {
    let s = run_range(from, to, &SimConfig::default());
    assert_eq!(s.runs, to - from);
    if !s.failures.is_empty() {
        let lines: Vec<String> = s
            .failures
            .iter()
            .take(10)
            .map(|(seed, v)| {
                format!(
                    "seed {seed}: {v}\n  replay: {}",
                    replay_command(*seed, Variant::Normal)
                )
            })
            .collect();
        panic!(
            "{} of {} schedules broke an invariant:\n{}",
            s.failures.len(),
            s.runs,
            lines.join("\n")
        );
    }
}

#[test]
fn schedules_hold_every_invariant_shard_0() {
    assert_clean(0, SHARD);
}

#[test]
fn schedules_hold_every_invariant_shard_1() {
    assert_clean(SHARD, 2 * SHARD);
}

#[test]
fn schedules_hold_every_invariant_shard_2() {
    assert_clean(2 * SHARD, 3 * SHARD);
}

#[test]
fn schedules_hold_every_invariant_shard_3() {
    assert_clean(3 * SHARD, 4 * SHARD);
}

/// Long soak: `SEEDS=N FROM=M cargo test -p pgkeep-sim --lib -- --ignored soak`.
#[test]
#[ignore = "soak; run with SEEDS=N"]
fn soak() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let from = env("FROM", 1_000_000);
    assert_clean(from, from + env("SEEDS", 100_000));
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let cfg = SimConfig {
        trace: true,
        ..SimConfig::default()
    };
    for seed in [1, 42, 4242, 9_999] {
        let a = run(seed, &cfg);
        let b = run(seed, &cfg);
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert_eq!(a.stats, b.stats, "seed {seed}");
        assert!(a.trace.len() > 10);
        // Tracing does not change the schedule.
        let c = run(seed, &SimConfig::default());
        assert_eq!(a.stats, c.stats, "seed {seed}");
    }
}

#[test]
fn replay_command_is_one_line() {
    assert_eq!(
        replay_command(7, Variant::NoFencing),
        "cargo run -p pgkeep-sim --bin pgkeep-sim -- --seed 7 --variant no-fencing --trace"
    );
}

/// The first seed below `max` whose schedule has two hosts able to commit at once.
fn first_dual_primary(variant: Variant, max: u64) -> Option<u64> {
    let cfg = SimConfig {
        variant,
        ..SimConfig::default()
    };
    (0..max).find(|&seed| {
        run(seed, &cfg)
            .violations
            .iter()
            .any(|v| v.kind == ViolationKind::DualPrimary)
    })
}

#[test]
fn checker_finds_dual_primary_without_fencing() {
    assert!(first_dual_primary(Variant::NoFencing, 100).is_some());
}

#[test]
fn checker_finds_dual_primary_without_takeover_guard() {
    assert!(first_dual_primary(Variant::NoTakeoverGuard, 1_000).is_some());
}

#[test]
fn checker_finds_dual_primary_without_watchdog() {
    assert!(first_dual_primary(Variant::NoWatchdog, 200).is_some());
}

#[test]
fn checker_finds_dual_primary_without_safety_margin() {
    assert!(first_dual_primary(Variant::TinyMargin, 2_000).is_some());
}

#[test]
fn single_faults_on_the_primary_fail_over_within_bound() {
    for &kind in FAILOVER_KINDS {
        let cfg = SimConfig {
            profile: Some(Profile::Single(kind)),
            ..SimConfig::default()
        };
        let s = run_range(0, 100, &cfg);
        assert!(s.failures.is_empty(), "{kind:?}: {:?}", s.failures.first());
        if let Some((ms, seed, _)) = s.longest_failover {
            // Worst case: a 30 s partition or freeze, then lease expiry, the takeover guard, a
            // promotion, or a 30 s primary_start_timeout.
            assert!(ms <= 75_000, "{kind:?}: {ms} ms (seed {seed})");
        }
    }
}
