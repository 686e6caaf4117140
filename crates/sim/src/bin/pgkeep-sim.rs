//! Runs simulation schedules: one seed with a trace, or a soak over many seeds.
//!
//! ```text
//! pgkeep-sim --seed N [--variant V] [--trace]     replay one schedule
//! pgkeep-sim [--from N] [--seeds N] [--variant V] soak (SEEDS env var also sets the count)
//! pgkeep-sim [--seeds N] --failover-report         unavailability after one fault on the primary
//! ```

use std::process::ExitCode;
use std::time::Instant;

use pgkeep_sim::{FAILOVER_KINDS, Profile, SimConfig, Variant, replay_command, run, run_range};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut seed = None;
    let mut from = 0u64;
    let mut count: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut cfg = SimConfig::default();
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--seed" => seed = Some(val().parse().expect("seed")),
            "--from" => from = val().parse().expect("from"),
            "--seeds" => count = val().parse().expect("seeds"),
            "--variant" => cfg.variant = Variant::parse(&val()).expect("variant"),
            "--trace" => cfg.trace = true,
            "--single" => {
                let kind = val();
                let k = FAILOVER_KINDS
                    .iter()
                    .find(|k| format!("{k:?}") == kind)
                    .expect("fault kind");
                cfg.profile = Some(Profile::Single(*k));
            }
            "--failover-report" => {
                failover_report(from, count);
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = seed {
        let o = run(seed, &cfg);
        for line in &o.trace {
            println!("{line}");
        }
        println!("{:?}", o.stats);
        for v in &o.violations {
            println!("VIOLATION {v}");
        }
        return if o.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let start = Instant::now();
    let s = run_range(from, from + count, &cfg);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} schedules in {secs:.1} s ({:.0}/s), {} decisions, {:.1} simulated hours, {} promotions",
        s.runs,
        s.runs as f64 / secs,
        s.decisions,
        s.sim_ms as f64 / 3.6e6,
        s.promotions
    );
    if let Some((ms, seed, kind)) = s.longest_failover {
        println!("longest single-fault failover: {ms} ms ({kind:?}, seed {seed})");
    }
    if let Some((ms, seed)) = s.longest_converge {
        println!("longest convergence after healing: {ms} ms (seed {seed})");
    }
    for (seed, v) in &s.failures {
        println!(
            "FAIL seed {seed}: {v}\n  replay: {}",
            replay_command(*seed, cfg.variant)
        );
    }
    if s.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Unavailability (no host able to commit) after one fault on the primary, per fault kind and
/// replication mode: median and maximum over `count` seeds each.
fn failover_report(from: u64, count: u64) {
    println!("fault on primary      mode   runs  median_ms     max_ms  (seed)");
    for &kind in FAILOVER_KINDS {
        let cfg = SimConfig {
            profile: Some(Profile::Single(kind)),
            ..SimConfig::default()
        };
        let mut by_mode: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
        for seed in from..from + count {
            let o = run(seed, &cfg);
            assert!(o.violations.is_empty(), "seed {seed}: {:?}", o.violations);
            if let Some(ms) = o.stats.failover_ms {
                by_mode[usize::from(o.stats.sync_mode)].push((ms, seed));
            }
        }
        for (mode, mut v) in ["async", "sync"].into_iter().zip(by_mode) {
            if v.is_empty() {
                continue;
            }
            v.sort();
            let (max, seed) = v[v.len() - 1];
            println!(
                "{:<20} {mode:<6} {:>5} {:>10} {:>10}  ({seed})",
                format!("{kind:?}"),
                v.len(),
                v[v.len() / 2].0,
                max
            );
        }
    }
}
