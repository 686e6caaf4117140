//! What [`decide`](super::decide) returns: typed actions, a typed reason, the member state and
//! the memory for the next decision.

use std::fmt;

use crate::cluster::{ClusterStatus, HistoryEntry, Lsn, MemberData, SyncState};

use super::reason::Reason;
use super::types::{HaMemory, Millis};

/// Name Patroni puts in `synchronous_standby_names` when strict mode has no standby, so commits
/// block instead of silently turning asynchronous. A member may not use it.
pub const STRICT_PLACEHOLDER: &str = "__patroni_strict_sync_replica_placeholder__";

/// `synchronous_standby_names` as pgkeep manages it: `FIRST num (names)`, names sorted.
/// Empty means asynchronous.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncStandbyNames {
    /// How many of `names` must confirm a commit.
    pub num: u32,
    /// Standby names, sorted.
    pub names: Vec<String>,
}

impl SyncStandbyNames {
    /// Every listed standby must confirm (what pgkeep always writes).
    pub fn all_of(mut names: Vec<String>) -> SyncStandbyNames {
        names.sort();
        names.dedup();
        SyncStandbyNames {
            num: u32::try_from(names.len()).unwrap_or(u32::MAX),
            names,
        }
    }

    /// Strict mode without a standby: commits wait.
    pub fn placeholder() -> SyncStandbyNames {
        SyncStandbyNames::all_of(vec![STRICT_PLACEHOLDER.to_owned()])
    }

    /// True when commits do not wait for any standby.
    pub fn is_async(&self) -> bool {
        self.names.is_empty() || self.num == 0
    }

    /// The value for `postgresql.conf`, formatted the way Patroni writes it: one name bare,
    /// several as `N (a,b)`; a name is double-quoted unless it is a plain identifier other than
    /// `first` and `any`.
    pub fn to_guc(&self) -> String {
        fn quote(n: &str) -> String {
            let mut chars = n.chars();
            let plain = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                && !n.eq_ignore_ascii_case("first")
                && !n.eq_ignore_ascii_case("any");
            if plain {
                n.to_owned()
            } else {
                format!("\"{}\"", n.replace('"', "\"\""))
            }
        }
        match self.names.as_slice() {
            [] => String::new(),
            [one] => quote(one),
            many => format!(
                "{} ({})",
                self.num,
                many.iter().map(|n| quote(n)).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

/// How to stop PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl stop -m fast`: shutdown checkpoint, walsenders send it first.
    Fast,
    /// `pg_ctl stop -m immediate`.
    Immediate,
}

/// How to start PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRole {
    /// Without `standby.signal`: crash recovery, then a primary on the same timeline.
    Primary,
    /// With `standby.signal`, streaming from `upstream` (none: archive or no source yet).
    Replica {
        /// Member to stream from.
        upstream: Option<String>,
    },
}

/// What the shell must ensure about the watchdog after this decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogCmd {
    /// PostgreSQL must be killed if the agent has not decided again before this instant.
    Arm {
        /// Local monotonic time.
        until: Millis,
    },
    /// Leave the watchdog as it is (do not extend it).
    Hold,
    /// No writable PostgreSQL here: the watchdog may be disarmed.
    Disarm,
}

/// One step for the shell. Actions of a decision run in order; the shell stops at the first DCS
/// action that fails or times out (the next decision re-plans). [`Action::Fence`] comes first
/// when present and is never skipped or delayed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stop PostgreSQL now because this node may not lead: fast shutdown, escalated to
    /// immediate shutdown and SIGKILL of every process of the instance. Read-only is not
    /// enough.
    Fence,
    /// Refresh the lease, then `create_revision(leader) == 0 → put(leader, me, lease)`.
    AcquireLeaderKey,
    /// Lease keepalive, then `value(leader) == me → put(leader, me, lease)`. The put gives every
    /// watcher a revision per renewal (the takeover guard relies on it). Never re-creates a
    /// vanished key.
    RenewLeaderKey,
    /// `value(leader) == me → delete(leader)`.
    ReleaseLeaderKey,
    /// `pg_ctl promote`.
    Promote,
    /// `CHECKPOINT` while still primary, just before a switchover's fast shutdown: the
    /// shutdown checkpoint then has little left to write, which shortens the write outage.
    Checkpoint,
    /// Stop PostgreSQL.
    Stop {
        /// Shutdown mode.
        mode: StopMode,
    },
    /// Start PostgreSQL.
    Start {
        /// As primary or replica.
        role: StartRole,
    },
    /// Restart PostgreSQL in its current role.
    Restart,
    /// Point `primary_conninfo` at another upstream (reload, or restart where needed).
    Follow {
        /// Member to stream from (none: archive only).
        upstream: Option<String>,
    },
    /// `pg_rewind` from `source` (PostgreSQL is stopped).
    Rewind {
        /// Member to rewind from.
        source: String,
    },
    /// `pg_basebackup` from `source`, wiping the data directory first when `wipe`.
    Clone {
        /// Member to copy.
        source: String,
        /// Remove the existing data directory first.
        wipe: bool,
    },
    /// Make a replica from the backup repository's newest backup that lies on the cluster's
    /// history (no running member to copy), wiping an invalid data directory first when `wipe`.
    RestoreReplica {
        /// The data directory is invalid.
        wipe: bool,
    },
    /// `initdb` of a new cluster (only after winning the `initialize` race).
    Initdb,
    /// `create_revision(initialize) == 0 → put(initialize, "", lease)`: the bootstrap race. The
    /// key is bound to the claimant's lease until `WriteInitialize` replaces it with the system
    /// id (without a lease), so a claimant that dies mid-bootstrap does not block the cluster.
    ClaimInitialize,
    /// After `initdb`: `value(initialize) == "" and lease(initialize) == my lease →
    /// put(initialize, system id)` without a lease. Only then does the new cluster exist; a
    /// claimant whose claim expired meanwhile loses and re-clones.
    ConfirmInitialize {
        /// The new cluster's system identifier.
        system_id: String,
    },
    /// Put `initialize` = system identifier (`create_only`: only if absent).
    WriteInitialize {
        /// The value.
        system_id: String,
        /// Compare `create_revision == 0` first.
        create_only: bool,
    },
    /// Persist the "ever joined" marker.
    PersistJoined,
    /// Put `members/<me>` with the lease.
    PublishMember(Box<MemberData>),
    /// Set `synchronous_standby_names` and reload.
    SetSyncStandbyNames(SyncStandbyNames),
    /// Write `/sync` with compare-and-swap on its revision (`None`: only if absent).
    WriteSync {
        /// The new state.
        state: SyncState,
        /// Revision to compare.
        expected_revision: Option<i64>,
    },
    /// Delete `/sync` with compare-and-swap (synchronous mode turned off).
    DeleteSync {
        /// Revision to compare.
        expected_revision: i64,
    },
    /// Put `/history`.
    WriteHistory(Vec<HistoryEntry>),
    /// Put `/status`.
    WriteStatus(ClusterStatus),
    /// Overwrite `/failover` with `{}` (compare-and-swap).
    ClearFailover {
        /// Revision to compare.
        expected_revision: i64,
    },
    /// Create physical replication slots.
    CreateSlots(Vec<String>),
    /// Drop replication slots.
    DropSlots(Vec<String>),
    /// Create a logical slot on the primary (connected to its database).
    CreateLogicalSlot {
        /// Slot name.
        name: String,
        /// Its database.
        database: String,
        /// Its output plugin.
        plugin: String,
    },
    /// Replica: copy these logical slots' state files from the leader and restart PostgreSQL
    /// so it loads them (PostgreSQL 15 cannot create a logical slot on a standby).
    CopyLogicalSlots {
        /// The member to copy from.
        from: String,
        /// Slot names.
        names: Vec<String>,
    },
    /// Replica: move logical slot copies forward (`pg_replication_slot_advance`).
    AdvanceSlots(Vec<SlotAdvance>),
    /// `GET /patroni` on these members (2 s timeout each), then decide again with the answers.
    FetchPeerStatus {
        /// Members to ask.
        members: Vec<String>,
    },
}

/// One `pg_replication_slot_advance` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAdvance {
    /// Slot name.
    pub name: String,
    /// The slot's database (the call must run there).
    pub database: String,
    /// The target position.
    pub lsn: Lsn,
}

impl Action {
    /// True for actions that talk to the DCS.
    pub fn is_dcs(&self) -> bool {
        matches!(
            self,
            Action::AcquireLeaderKey
                | Action::RenewLeaderKey
                | Action::ReleaseLeaderKey
                | Action::ClaimInitialize
                | Action::ConfirmInitialize { .. }
                | Action::WriteInitialize { .. }
                | Action::PublishMember(_)
                | Action::WriteSync { .. }
                | Action::DeleteSync { .. }
                | Action::WriteHistory(_)
                | Action::WriteStatus(_)
                | Action::ClearFailover { .. }
        )
    }
}

macro_rules! member_states {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Where a member is in its life cycle, as `decide` classifies it. The list and the
        /// diagram in `docs/ha-rules.md` are kept in step by a test.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum MemberState { $($(#[$doc])* $name,)* }

        impl MemberState {
            /// Every state, in declaration order.
            pub const ALL: &'static [MemberState] = &[$(MemberState::$name,)*];

            /// The state's name as the docs spell it.
            pub fn name(self) -> &'static str {
                match self { $(MemberState::$name => stringify!($name),)* }
            }
        }
    };
}

member_states! {
    /// Empty data directory, nothing to do yet (no bootstrap allowed, no source to clone).
    Uninitialized,
    /// Racing for `initialize` or running `initdb`.
    Bootstrapping,
    /// Copying the data directory from another member.
    Cloning,
    /// PostgreSQL stopped, not leader, waiting.
    Stopped,
    /// Starting PostgreSQL.
    Starting,
    /// A replica following the leader (or its `replicatefrom` member).
    Replica,
    /// No leader: evaluating or running the leader race.
    Candidate,
    /// Holds the leader key, still a replica: waiting for the takeover guard or sync state.
    LeaderPending,
    /// Holds the key, promotion requested.
    Promoting,
    /// Holds the key and runs the primary.
    Primary,
    /// Holds the key, restarting a crashed primary.
    Recovering,
    /// Leader handing over on purpose (switchover, start timeout, shutdown, pause).
    Demoting,
    /// Stopping a primary that lost the right to lead.
    Fencing,
    /// Running `pg_rewind`, or about to.
    Rewinding,
    /// Refusing to act (system identifier mismatch).
    Halted,
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of one decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Steps, in order.
    pub actions: Vec<Action>,
    /// Why.
    pub reason: Reason,
    /// The member's state.
    pub state: MemberState,
    /// Memory for the next decision.
    pub memory: HaMemory,
    /// Decide again no later than this (local monotonic time).
    pub wake_at: Millis,
    /// Watchdog handling.
    pub watchdog: WatchdogCmd,
}

impl Decision {
    /// The actions of one kind, for tests and logs.
    pub fn has(&self, pred: impl Fn(&Action) -> bool) -> bool {
        self.actions.iter().any(pred)
    }
}
