//! HA settings: Patroni's dynamic keys that drive decisions, plus pgkeep's lease safety margin.

use std::collections::{BTreeMap, BTreeSet};

use super::types::Millis;

/// The smallest `ttl` pgkeep accepts: etcd's minimum lease TTL with its default election timeout
/// (1000 ms): `ceil(1.5 × election timeout)` = 2 s. etcd silently raises a smaller requested TTL
/// to its minimum, which is why pgkeep computes its deadline from the TTL etcd *granted*.
pub const MIN_TTL: Millis = Millis(2_000);

/// The smallest `lease_safety_margin`: fencing (fast shutdown 0.5 s, SIGQUIT 0.3 s, SIGKILL)
/// and the guard's polling must fit between the lease deadline and the lease's real expiry.
pub const MIN_MARGIN: Millis = Millis(1_000);

/// The smallest `loop_wait` and `retry_timeout`.
pub const MIN_INTERVAL: Millis = Millis(100);

/// pgkeep's default `primary_start_timeout`: 30 s instead of Patroni's 300 s.
pub const DEFAULT_PRIMARY_START_TIMEOUT: Millis = Millis::from_secs(30);

/// A permanent logical slot from `/config.slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalSlotSpec {
    /// The database the slot decodes.
    pub database: String,
    /// The output plugin (a library name in PostgreSQL's `$libdir`, never a path).
    pub plugin: String,
}

/// `synchronous_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Asynchronous replication.
    #[default]
    Off,
    /// Synchronous replication with `FIRST n` semantics (`synchronous_mode: on`).
    On,
}

/// The settings `decide` reads. Durations are in milliseconds; `ttl` must be whole seconds
/// because etcd leases are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    /// Lease TTL of the leader and member keys.
    pub ttl: Millis,
    /// Time between HA cycles.
    pub loop_wait: Millis,
    /// Deadline for one DCS or PostgreSQL operation with retries.
    pub retry_timeout: Millis,
    /// Subtracted from the granted TTL to get the lease deadline. Must cover the clock rate error
    /// of two nodes over one `ttl`, the time to fence PostgreSQL (immediate stop, escalated to
    /// SIGKILL) and the agent's wake-up latency.
    pub lease_safety_margin: Millis,
    /// A replica further than this many bytes behind the leader's last optime does not race.
    pub maximum_lag_on_failover: u64,
    /// A replica whose timeline is behind the cluster's does not race (Patroni: off by default;
    /// pgkeep: on).
    pub check_timeline: bool,
    /// How long the leader lets a crashed primary recover before it hands over (0: at once).
    pub primary_start_timeout: Millis,
    /// How long a stopped leader waits for a switchover candidate to confirm it received the
    /// shutdown checkpoint before it gives up and starts again as primary.
    pub switchover_timeout: Millis,
    /// Synchronous replication.
    pub synchronous_mode: SyncMode,
    /// Never fall back to asynchronous replication.
    pub synchronous_mode_strict: bool,
    /// Number of synchronous standbys.
    pub synchronous_node_count: u32,
    /// Maintenance mode: no automatic promotion, demotion, start or stop.
    pub pause: bool,
    /// Rejoin a diverged node with `pg_rewind` (otherwise re-clone it).
    pub use_pg_rewind: bool,
    /// Manage physical slots for members.
    pub use_slots: bool,
    /// Permanent physical slots the leader keeps.
    pub permanent_slots: BTreeSet<String>,
    /// Permanent logical slots (by name): the leader creates them, failover-capable replicas
    /// keep copies advanced to the leader's position so a consumer resumes after a failover.
    pub logical_slots: BTreeMap<String, LogicalSlotSpec>,
    /// How long the leader keeps the slot of a member whose key disappeared.
    pub member_slots_ttl: Millis,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            ttl: Millis::from_secs(30),
            loop_wait: Millis::from_secs(10),
            retry_timeout: Millis::from_secs(10),
            lease_safety_margin: Millis::from_secs(5),
            maximum_lag_on_failover: 1 << 20,
            check_timeline: true,
            primary_start_timeout: DEFAULT_PRIMARY_START_TIMEOUT,
            switchover_timeout: Millis::from_secs(30),
            synchronous_mode: SyncMode::Off,
            synchronous_mode_strict: false,
            synchronous_node_count: 1,
            pause: false,
            use_pg_rewind: true,
            use_slots: true,
            permanent_slots: BTreeSet::new(),
            logical_slots: BTreeMap::new(),
            member_slots_ttl: Millis::from_secs(1800),
        }
    }
}

/// A setting combination pgkeep refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `ttl` below etcd's minimum lease.
    #[error("ttl {0} is below etcd's minimum lease TTL of {MIN_TTL}")]
    TtlTooSmall(Millis),
    /// etcd leases are whole seconds.
    #[error("ttl {0} is not a whole number of seconds (etcd lease TTLs are)")]
    TtlNotWholeSeconds(Millis),
    /// `loop_wait` or `retry_timeout` below the minimum.
    #[error("{name} {value} is below the minimum of {MIN_INTERVAL}")]
    IntervalTooSmall {
        /// Setting.
        name: &'static str,
        /// Value.
        value: Millis,
    },
    /// Patroni's rule: a primary cut off from the DCS must notice before its key expires.
    #[error("loop_wait + 2*retry_timeout = {0} exceeds ttl {1}")]
    LoopTooSlow(Millis, Millis),
    /// The margin must cover fencing and leave time for a renewal before the deadline.
    #[error(
        "lease_safety_margin {margin} must be at least {MIN_MARGIN} (stopping PostgreSQL takes up to a second) and loop_wait + retry_timeout + margin <= ttl {ttl}"
    )]
    BadMargin {
        /// Margin.
        margin: Millis,
        /// TTL.
        ttl: Millis,
    },
    /// At least one synchronous standby.
    #[error("synchronous_node_count must be at least 1")]
    SyncCountZero,
}

impl HaConfig {
    /// Checks the timing rules. pgkeep refuses a bad combination instead of silently rewriting it
    /// the way Patroni does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < MIN_TTL {
            return Err(ConfigError::TtlTooSmall(self.ttl));
        }
        if !self.ttl.0.is_multiple_of(1000) {
            return Err(ConfigError::TtlNotWholeSeconds(self.ttl));
        }
        for (name, value) in [
            ("loop_wait", self.loop_wait),
            ("retry_timeout", self.retry_timeout),
        ] {
            if value < MIN_INTERVAL {
                return Err(ConfigError::IntervalTooSmall { name, value });
            }
        }
        let cycle = self.loop_wait + self.retry_timeout + self.retry_timeout;
        if cycle > self.ttl {
            return Err(ConfigError::LoopTooSlow(cycle, self.ttl));
        }
        if self.lease_safety_margin < MIN_MARGIN
            || self.loop_wait + self.retry_timeout + self.lease_safety_margin > self.ttl
        {
            return Err(ConfigError::BadMargin {
                margin: self.lease_safety_margin,
                ttl: self.ttl,
            });
        }
        if self.synchronous_node_count == 0 {
            return Err(ConfigError::SyncCountZero);
        }
        Ok(())
    }

    /// The lease deadline of a renewal round: keepalive send time + the TTL etcd granted (never
    /// more than `ttl`, which is what other nodes assume) − the safety margin.
    pub fn lease_deadline(&self, sent_at: Millis, granted_ttl: Millis) -> Millis {
        sent_at + granted_ttl.min(self.ttl) - self.lease_safety_margin
    }

    /// Synchronous mode is on.
    pub fn sync_mode(&self) -> bool {
        self.synchronous_mode != SyncMode::Off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ttl: u64, lw: u64, rt: u64, margin: u64) -> HaConfig {
        HaConfig {
            ttl: Millis(ttl),
            loop_wait: Millis(lw),
            retry_timeout: Millis(rt),
            lease_safety_margin: Millis(margin),
            ..HaConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        HaConfig::default().validate().unwrap();
    }

    #[test]
    fn loop_wait_plus_two_retry_timeouts_must_fit_in_ttl() {
        assert_eq!(
            cfg(10_000, 4_000, 4_000, 1_000).validate(),
            Err(ConfigError::LoopTooSlow(Millis(12_000), Millis(10_000)))
        );
        cfg(10_000, 2_000, 4_000, 2_000).validate().unwrap();
    }

    #[test]
    fn ttl_below_ten_seconds_is_allowed_down_to_etcds_minimum() {
        cfg(5_000, 1_000, 2_000, 1_000).validate().unwrap();
        cfg(2_000, 500, 500, 1_000).validate().unwrap();
        assert_eq!(
            cfg(1_000, 100, 100, 100).validate(),
            Err(ConfigError::TtlTooSmall(Millis(1_000)))
        );
        assert_eq!(
            cfg(2_500, 500, 500, 500).validate(),
            Err(ConfigError::TtlNotWholeSeconds(Millis(2_500)))
        );
    }

    #[test]
    fn margin_must_cover_fencing_and_leave_room_for_a_renewal() {
        for tiny in [0, 100, 999] {
            assert!(matches!(
                cfg(10_000, 2_000, 4_000, tiny).validate(),
                Err(ConfigError::BadMargin { .. })
            ));
        }
        cfg(10_000, 2_000, 4_000, 1_000).validate().unwrap();
        assert!(matches!(
            cfg(10_000, 2_000, 4_000, 4_001).validate(),
            Err(ConfigError::BadMargin { .. })
        ));
    }

    #[test]
    fn deadline_uses_the_smaller_of_granted_and_configured_ttl() {
        let c = cfg(10_000, 2_000, 4_000, 2_000);
        assert_eq!(c.lease_deadline(Millis(100), Millis(10_000)), Millis(8_100));
        // etcd granted more than asked (its minimum, or a stale lease): others assume `ttl`.
        assert_eq!(c.lease_deadline(Millis(100), Millis(30_000)), Millis(8_100));
        assert_eq!(c.lease_deadline(Millis(100), Millis(5_000)), Millis(3_100));
    }
}
