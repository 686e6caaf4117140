//! What the agent tells [`decide`](super::decide) about its own node: time, PostgreSQL, the
//! DCS session, peers' answers and the memory carried from the previous decision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::{Add, Sub};

use crate::cluster::{HistoryEntry, Lsn, MemberData, Tags};

use super::action::SyncStandbyNames;

/// A point on the agent's monotonic clock, or a duration, in milliseconds.
///
/// The shell maps its monotonic clock to this (it should use a clock that keeps counting while the
/// machine is suspended, `CLOCK_BOOTTIME` on Linux). Arithmetic saturates, so no decision can
/// panic on an overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// Zero.
    pub const ZERO: Millis = Millis(0);

    /// Whole seconds.
    pub const fn from_secs(s: u64) -> Millis {
        Millis(s * 1000)
    }

    /// The later of two instants.
    pub fn max(self, other: Millis) -> Millis {
        if self >= other { self } else { other }
    }

    /// The earlier of two instants.
    pub fn min(self, other: Millis) -> Millis {
        if self <= other { self } else { other }
    }
}

impl Add for Millis {
    type Output = Millis;
    fn add(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Millis {
    type Output = Millis;
    fn sub(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_sub(rhs.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// The state of the local PostgreSQL process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgProcess {
    /// Not running.
    #[default]
    Stopped,
    /// The postmaster runs but does not accept connections yet (crash recovery, start-up).
    Starting,
    /// Accepting connections.
    Running,
    /// A promotion was requested and has not finished; the server may start accepting writes at
    /// any moment.
    Promoting,
    /// A stop was requested and has not finished; a primary keeps committing until it has.
    Stopping,
}

/// The data directory as the shell found it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DataDir {
    /// Missing or empty.
    #[default]
    Empty,
    /// Holds a cluster with this system identifier (from `pg_controldata`).
    Initialised {
        /// `Database system identifier`.
        system_id: String,
    },
    /// Not empty but not a usable cluster (no control file, unreadable).
    Invalid,
}

/// One row of `pg_stat_replication` on this node (when it is a primary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRow {
    /// `application_name`: the member name of the standby.
    pub application_name: String,
    /// True when `state = 'streaming'`.
    pub streaming: bool,
    /// Flush LSN the standby reported.
    pub flush_lsn: Lsn,
    /// `sync_state` is `sync` (or `quorum`).
    pub sync: bool,
}

/// What the shell knows about the local PostgreSQL.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PgObservation {
    /// Process state.
    pub process: PgProcess,
    /// Running: `pg_is_in_recovery()`. Otherwise: the control file says the cluster was shut
    /// down in recovery (a replica), so a start brings it up as a replica.
    pub in_recovery: bool,
    /// The last stop was not clean (crash, kill, power loss).
    pub crashed: bool,
    /// Current timeline, when known.
    pub timeline: Option<u32>,
    /// Primary: flush LSN. Replica: max(receive, replay). Stopped: end of WAL from the control
    /// file (for a cleanly stopped primary, a position inside its shutdown checkpoint record:
    /// the record's start + 1).
    pub wal_position: Lsn,
    /// Replica replay LSN, when running in recovery.
    pub replay_lsn: Option<Lsn>,
    /// The member the replica streams from (`primary_conninfo`), if any.
    pub upstream: Option<String>,
    /// The WAL receiver is streaming.
    pub streaming: bool,
    /// When the postmaster started (agent's monotonic clock).
    pub started_at: Option<Millis>,
    /// The current timeline's history file, oldest first.
    pub timeline_history: Vec<HistoryEntry>,
    /// `synchronous_standby_names` as pgkeep last set it.
    pub sync_standby_names: SyncStandbyNames,
    /// `pg_stat_replication` (primary only).
    pub replication: Vec<ReplicationRow>,
    /// Physical replication slots that exist.
    pub slots: BTreeSet<String>,
    /// Logical replication slots that exist, by name.
    pub logical_slots: BTreeMap<String, LogicalSlotState>,
    /// The data directory.
    pub data_dir: DataDir,
}

/// A logical replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalSlotState {
    /// Its database.
    pub database: String,
    /// Its output plugin.
    pub plugin: String,
    /// `confirmed_flush_lsn` (0 when unset).
    pub confirmed_flush: Lsn,
}

impl PgObservation {
    /// True while this server is, or may at any moment become, able to commit: a running,
    /// starting or stopping primary, or a promotion in progress. Such a server must be fenced when
    /// the node's right to lead ends.
    pub fn may_commit(&self) -> bool {
        match self.process {
            PgProcess::Promoting => true,
            PgProcess::Running | PgProcess::Starting | PgProcess::Stopping => !self.in_recovery,
            PgProcess::Stopped => false,
        }
    }

    /// A running primary.
    pub fn is_running_primary(&self) -> bool {
        self.process == PgProcess::Running && !self.in_recovery
    }

    /// A running replica.
    pub fn is_running_replica(&self) -> bool {
        self.process == PgProcess::Running && self.in_recovery
    }
}

/// A deletion of the leader key, as the watch delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedLeader {
    /// The holder of the deleted key.
    pub name: String,
    /// The deleted key's last `mod_revision` (etcd's `prev_kv`).
    pub mod_revision: i64,
    /// When (local monotonic time) the watch delivered the put that created that last
    /// revision, if it did. Every renewal puts the key, so the holder's lease deadline is at most
    /// `ttl` after this.
    pub put_seen_at: Option<Millis>,
}

/// Proof of leadership: the last renewal round (lease keepalive, then a put of the leader key
/// that compared its value with this node's name) that fully succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderLease {
    /// When the round's keepalive was sent (local monotonic clock).
    pub sent_at: Millis,
    /// The TTL etcd granted in the keepalive's answer.
    pub granted_ttl: Millis,
    /// The `mod_revision` the round's put gave the leader key.
    pub revision: i64,
}

/// The agent's DCS session: things the watch and the agent's own requests showed, which a
/// snapshot view cannot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DcsSession {
    /// The last read or watch event succeeded within `retry_timeout`.
    pub reachable: bool,
    /// The etcd revision the view reflects.
    pub view_revision: i64,
    /// The most recent deletion of the leader key the watch delivered (kept when the key is
    /// created again, so while this node holds the key it is the deletion that preceded its
    /// create). `None` when unknown (for example after a re-read instead of a watch event),
    /// which makes a takeover wait a full `ttl`.
    pub deleted_leader: Option<DeletedLeader>,
    /// The last keepalive was answered with TTL ≤ 0: the lease is gone.
    pub lease_revoked: bool,
    /// Proof of leadership from this agent process: its last fully successful renewal round,
    /// reported as it is *also after its deadline has passed* (the core judges it against
    /// `now`: a PostgreSQL that may commit past it is fenced, paused or not). `None` only when
    /// this process never proved the key, a renewal's compare said the key is not ours, the
    /// key was released, or the lease was lost (then `lease_revoked`).
    pub leader_lease: Option<LeaderLease>,
    /// This agent won the bootstrap race: `initialize` is `""` and attached to this agent's
    /// lease. (The claim is a lease-bound create, so a claim whose answer was lost is recognised
    /// by reading the key, and a claimant that dies releases it.)
    pub initialize_claimed: bool,
}

/// A peer's answer to `GET /patroni`, as far as the leader race needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    /// PostgreSQL runs and accepts connections.
    pub running: bool,
    /// PostgreSQL runs as a primary (not in recovery).
    pub primary: bool,
    /// Primary: flush LSN; replica: max(receive, replay).
    pub wal_position: Lsn,
    /// Its timeline.
    pub timeline: Option<u32>,
    /// Its tags.
    pub tags: Tags,
    /// It needs a watchdog and has none that works.
    pub watchdog_failed: bool,
}

/// Peers' answers the shell collected after a [`FetchPeerStatus`](super::Action::FetchPeerStatus).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerReport {
    /// Who was asked.
    pub asked: BTreeSet<String>,
    /// Who answered in time (the others are treated as unreachable).
    pub answers: BTreeMap<String, PeerStatus>,
}

/// A long operation the shell runs in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongOperation {
    /// `initdb` of a new cluster.
    Initdb,
    /// `pg_basebackup` (or a backup restore) into an empty data directory.
    Clone,
    /// `pg_rewind`.
    Rewind,
}

/// Operator requests that arrived through the local REST API or signals.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalRequests {
    /// The agent is shutting down (SIGTERM): stop PostgreSQL and, if leader, hand over.
    pub shutdown: bool,
    /// `POST /reinitialize`: wipe and clone again (refused on the leader).
    pub reinitialize: bool,
    /// With `reinitialize`: clone from the leader even when a `clonefrom` member runs
    /// (`POST /reinitialize {"from_leader": true}`).
    pub reinitialize_from_leader: bool,
    /// `POST /restart`: restart PostgreSQL in its current role (a replica, or the leader's
    /// primary while it holds the key). The shell clears it once the restart was carried out.
    pub restart: bool,
}

/// Everything the agent observed about its own node for one decision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalObservation {
    /// This member's name.
    pub name: String,
    /// Effective tags from the local configuration.
    pub tags: Tags,
    /// Static member fields (`conn_url`, `api_url`, `version`) the published member data starts
    /// from.
    pub member_template: MemberData,
    /// Wall-clock time in Unix milliseconds (for scheduled switchovers only; never for leases).
    pub wall_clock_ms: i64,
    /// PostgreSQL.
    pub pg: PgObservation,
    /// The DCS session.
    pub dcs: DcsSession,
    /// Peers' answers, present only right after the shell fetched them.
    pub peers: Option<PeerReport>,
    /// A long operation in progress.
    pub busy: Option<LongOperation>,
    /// The last `pg_rewind` failed; the next step is a re-clone.
    pub rewind_failed: bool,
    /// Persisted marker: this node's data directory once belonged to the cluster (bootstrap or
    /// clone completed). A node with this marker never runs `initdb` again.
    pub ever_joined: bool,
    /// Persisted marker the shell sets when it starts `initdb` and clears on `PersistJoined` or
    /// when the data directory is wiped: the data directory is this node's own new cluster,
    /// whose system id has not been confirmed as the cluster's. Such a directory may be
    /// replaced by a clone if another node's bootstrap won.
    pub initdb_unconfirmed: bool,
    /// Persisted first-start marker the operator creates on the one node allowed to run `initdb`
    /// for a new cluster. Without it a node only ever clones.
    pub bootstrap_allowed: bool,
    /// The watchdog is required but does not work.
    pub watchdog_failed: bool,
    /// A backup repository (pgBackRest) is configured and may make a replica when no leader
    /// runs (`pgkeep.pgbackrest.replica_without_leader`).
    pub backup_repository: bool,
    /// Persisted marker: a restore from the backup repository began and did not finish; the
    /// data directory it left may be restored over.
    pub restore_interrupted: bool,
    /// Operator requests.
    pub requests: LocalRequests,
    /// Memory returned by the previous decision ([`Decision::memory`](super::Decision)); the
    /// default after an agent restart.
    pub memory: HaMemory,
}

/// State a decision hands to the next one. The shell stores it in RAM only: losing it (agent
/// restart) makes the next decisions more conservative, never less safe.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HaMemory {
    /// The leader key as last seen, and when it was first seen with that revision.
    pub last_leader: Option<SeenLeader>,
    /// When the leader key was first seen missing, since it was last present.
    pub leader_absent_since: Option<Millis>,
    /// The takeover guard of the current (or last) leadership term: this node must not promote
    /// before this instant. Computed by the first decision of a term whose view shows this
    /// node's own leader key, and kept after the term ends: if the key is lost before promoting
    /// and taken again, the guard of the holder before carries over.
    pub promote_not_before: Option<Millis>,
    /// This node held the key at the previous decision.
    pub was_holding: bool,
    /// The guard of the current term has been computed.
    pub guard_computed: bool,
    /// When this agent started PostgreSQL as primary while holding the key (crash recovery).
    pub primary_start_began: Option<Millis>,
    /// A switchover or release in progress on this (leader) node.
    pub handover: Option<Handover>,
    /// `synchronous_standby_names` was changed to add standbys at this primary flush LSN; they
    /// count as synchronous only once they flushed it.
    pub sync_change_lsn: Option<Lsn>,
    /// This node released the leader key at this revision on purpose; its member key carries the
    /// release marker until this node leads again. (A stale marker is harmless: it only matters
    /// for the deletion of exactly that revision.)
    pub released_revision: Option<i64>,
    /// Member names last seen in the view, with when they were last seen (for slot retention).
    pub members_seen: BTreeMap<String, Millis>,
}

/// The leader key as a decision saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenLeader {
    /// Holder.
    pub name: String,
    /// Its `mod_revision` (every renewal puts the key, so this changes on every renewal).
    pub revision: i64,
    /// Local time this revision was first seen.
    pub seen_at: Millis,
}

/// A leader giving up the key on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// Why.
    pub kind: HandoverKind,
    /// The candidate, if one was named.
    pub candidate: Option<String>,
    /// When the handover began.
    pub started_at: Millis,
    /// A candidate confirmed it received the shutdown checkpoint.
    pub confirmed: bool,
}

/// Why a leader hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverKind {
    /// A planned switchover or manual failover with a leader.
    Switchover,
    /// PostgreSQL did not come back within `primary_start_timeout`.
    StartTimeout,
    /// The agent shuts down.
    Shutdown,
    /// Paused and PostgreSQL is not running as primary any more.
    PausedNotPrimary,
    /// Synchronous mode: `/sync` no longer names this holder, so it may not promote; another
    /// member named there must take over.
    NotSynchronous,
}
