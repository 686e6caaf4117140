//! HA decisions: every choice an agent makes, as one pure function.
//!
//! [`decide`] takes the time on the agent's monotonic clock, the [`HaConfig`], the DCS view
//! ([`ClusterView`](crate::cluster::ClusterView)) and the agent's [`LocalObservation`] and
//! returns a [`Decision`]: ordered [`Action`]s, one typed [`Reason`], the [`MemberState`], the
//! [`HaMemory`] for the next call, when to call again and what the watchdog must do. It has no
//! IO and no clock; the shell executes the actions and feeds the results back.
//!
//! The rules follow Patroni's HA loop (see `docs/ha-rules.md` for each rule, its Patroni
//! equivalent and where pgkeep deliberately differs). The safety core:
//!
//! * **Lease deadline.** A leader may run a writable PostgreSQL only until
//!   `keepalive send time + granted TTL − lease_safety_margin` of its last fully successful
//!   renewal round, on its own monotonic clock. At that instant, or at once when the keepalive
//!   answers TTL ≤ 0 or the watch shows the key gone or taken, it is fenced: the postmaster is
//!   stopped, not just made read-only.
//! * **Takeover guard.** Every renewal puts the leader key, so every watcher sees a revision per
//!   renewal. A node that takes a key that vanished promotes no earlier than `ttl` after it first
//!   saw the key's last revision (or after it saw the key missing, when it cannot prove which
//!   revision was last), unless the old leader announced a deliberate release of exactly that
//!   revision. Early lease revocation by etcd (etcd#15247) therefore cannot produce two primaries.
//! * **Watchdog.** While PostgreSQL may commit, the decision arms the watchdog until the lease
//!   deadline, so a frozen or dead agent cannot leave a primary running past it.

mod action;
mod bootstrap;
mod config;
mod decide;
mod leader_race;
pub mod manual;
mod member;
mod reason;
mod rejoin;
mod slots;
mod switchover;
mod sync;
mod types;

#[cfg(test)]
mod tests;

pub use action::{
    Action, Decision, MemberState, STRICT_PLACEHOLDER, SlotAdvance, StartRole, StopMode,
    SyncStandbyNames, WatchdogCmd,
};
pub use config::{
    ConfigError, DEFAULT_PRIMARY_START_TIMEOUT, HaConfig, LogicalSlotSpec, MIN_INTERVAL,
    MIN_MARGIN, MIN_TTL, SyncMode,
};
pub use decide::decide;
pub use leader_race::failover_priority;
pub use member::{HISTORY_TL_FIELD, RELEASED_FIELD};
pub use reason::{RaceLoss, Reason, RejectedFailover, WaitingForData};
pub use rejoin::{Divergence, backup_fits_cluster, backup_fits_timeline, divergence};
pub use slots::slot_name;
pub use switchover::{format_rfc3339, parse_rfc3339};
pub use types::{
    DataDir, DcsSession, DeletedLeader, HaMemory, Handover, HandoverKind, LeaderLease,
    LocalObservation, LocalRequests, LogicalSlotState, LongOperation, Millis, PeerReport,
    PeerStatus, PgObservation, PgProcess, ReplicationRow, SeenLeader,
};
