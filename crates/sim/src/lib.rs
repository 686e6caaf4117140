//! Deterministic simulation of pgkeep's HA core under faults.
//!
//! N simulated hosts run the real [`pgkeep_core::ha::decide`] against a simulated etcd (leases,
//! TTL expiry, compare-and-swap, watches, outages, early lease revocation as in etcd#15247), a
//! simulated PostgreSQL (stop, start and promote take random non-zero time; a primary keeps
//! committing until its stop completes), a simulated network (delays, loss, partitions), frozen
//! and killed agents, a watchdog, and clocks that drift and step. The only randomness is a
//! seeded PRNG and every collection is ordered, so a seed replays bit for bit.
//!
//! Invariants checked:
//! * never two hosts able to commit at the same simulated instant;
//! * in synchronous mode, no acknowledged write missing on a newly promoted primary, and only a
//!   member named in `/sync` takes `/sync` over;
//! * no `initdb` on an initialised cluster;
//! * after the faults heal, one leader and every other host streaming from it within a bound.
//!
//! Replay a seed: `cargo run -p pgkeep-sim --bin pgkeep-sim -- --seed N --trace`.

#[macro_use]
mod world;
mod agent;
mod cache;
mod dcs;
pub mod etcd;
mod faults;
mod peers;
pub mod pg;
mod pgops;
pub mod rng;

#[cfg(test)]
mod tests;

use std::fmt;

pub use faults::{FAILOVER_KINDS, FaultKind, Profile};

/// Deliberately weakened variants, used to show that the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// pgkeep as designed.
    #[default]
    Normal,
    /// The shell ignores `Fence` and the watchdog.
    NoFencing,
    /// `lease_safety_margin` of 1 ms while an immediate stop takes up to 1.5 s: nothing covers
    /// the fencing time any more.
    TinyMargin,
    /// No watchdog (a frozen or dead agent leaves its primary running).
    NoWatchdog,
    /// The takeover guard is bypassed (promote right after taking the key).
    NoTakeoverGuard,
    /// Monotonic clocks jump forward without time passing (outside the model: impossible with
    /// `CLOCK_BOOTTIME`; shows that the guard relies on a bounded clock rate).
    MonotonicSteps,
}

impl Variant {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Normal => "normal",
            Variant::NoFencing => "no-fencing",
            Variant::TinyMargin => "tiny-margin",
            Variant::NoWatchdog => "no-watchdog",
            Variant::NoTakeoverGuard => "no-takeover-guard",
            Variant::MonotonicSteps => "monotonic-steps",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<Variant> {
        [
            Variant::Normal,
            Variant::NoFencing,
            Variant::TinyMargin,
            Variant::NoWatchdog,
            Variant::NoTakeoverGuard,
            Variant::MonotonicSteps,
        ]
        .into_iter()
        .find(|v| v.name() == s)
    }
}

/// Simulation knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Weakening, for negative controls.
    pub variant: Variant,
    /// Record a human-readable trace.
    pub trace: bool,
    /// Length of the fault window in chaos schedules, ms.
    pub chaos_ms: u64,
    /// Force a profile (otherwise the seed picks one).
    pub profile: Option<Profile>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            variant: Variant::Normal,
            trace: false,
            chaos_ms: 40_000,
            profile: None,
        }
    }
}

/// An invariant that broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// Two hosts able to commit at once.
    DualPrimary,
    /// Synchronous mode: an acknowledged write is missing on a new primary.
    LostAckedWrite,
    /// Synchronous mode: a host outside `/sync` took it over.
    NonSyncPromotion,
    /// `initdb` ran although the cluster was initialised.
    InitdbOnInitialisedCluster,
    /// Not healthy within the bound after the faults healed.
    NotConverged,
}

/// One violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Simulated time, ms.
    pub at: u64,
    /// What.
    pub kind: ViolationKind,
    /// Details.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {} ms: {:?}: {}", self.at, self.kind, self.detail)
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// `decide` calls.
    pub decisions: u64,
    /// Simulated time, ms.
    pub sim_ms: u64,
    /// Faults injected.
    pub faults: u64,
    /// Promotions.
    pub promotions: u64,
    /// Client writes committed.
    pub writes: u64,
    /// Writes acknowledged.
    pub acked_writes: u64,
    /// Watchdog resets.
    pub watchdog_fires: u64,
    /// Single-fault schedules: the unavailability window after the fault, ms.
    pub failover_ms: Option<u64>,
    /// Longest unavailability before healing, ms.
    pub max_unavailable_ms: u64,
    /// Time from healing to a healthy cluster, ms.
    pub converge_ms: Option<u64>,
    /// The schedule ran in synchronous mode.
    pub sync_mode: bool,
}

/// The result of one schedule.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Seed.
    pub seed: u64,
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Counters.
    pub stats: Stats,
    /// Trace lines (when asked for).
    pub trace: Vec<String>,
}

/// Runs one schedule.
pub fn run(seed: u64, config: &SimConfig) -> Outcome {
    world::World::new(seed, config).run()
}

/// The profile a seed picks (for reports).
pub fn profile_of(seed: u64, config: &SimConfig) -> Profile {
    world::World::new(seed, config).profile
}

/// The one-line command that replays a seed with a trace.
pub fn replay_command(seed: u64, variant: Variant) -> String {
    let v = if variant == Variant::Normal {
        String::new()
    } else {
        format!(" --variant {}", variant.name())
    };
    format!("cargo run -p pgkeep-sim --bin pgkeep-sim -- --seed {seed}{v} --trace")
}

/// Aggregate of many schedules.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Schedules run.
    pub runs: u64,
    /// Failing seeds with their first violation.
    pub failures: Vec<(u64, Violation)>,
    /// Longest single-fault failover, ms, with its seed and fault.
    pub longest_failover: Option<(u64, u64, FaultKind)>,
    /// Longest convergence after healing, ms, with its seed.
    pub longest_converge: Option<(u64, u64)>,
    /// Decisions made.
    pub decisions: u64,
    /// Simulated time, ms.
    pub sim_ms: u64,
    /// Promotions.
    pub promotions: u64,
}

/// Runs seeds `from..to`, collecting failures and metrics.
pub fn run_range(from: u64, to: u64, config: &SimConfig) -> Summary {
    let mut s = Summary::default();
    for seed in from..to {
        let w = world::World::new(seed, config);
        let profile = w.profile;
        let o = w.run();
        s.runs += 1;
        s.decisions += o.stats.decisions;
        s.sim_ms += o.stats.sim_ms;
        s.promotions += o.stats.promotions;
        if let Some(v) = o.violations.first() {
            s.failures.push((seed, v.clone()));
        }
        if let (Some(ms), Profile::Single(kind)) = (o.stats.failover_ms, profile)
            && s.longest_failover.is_none_or(|(m, _, _)| ms > m)
        {
            s.longest_failover = Some((ms, seed, kind));
        }
        if let Some(ms) = o.stats.converge_ms
            && s.longest_converge.is_none_or(|(m, _)| ms > m)
        {
            s.longest_converge = Some((ms, seed));
        }
    }
    s
}
