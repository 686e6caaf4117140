//! The distributed configuration store: the [`Dcs`] trait and its etcd v3 implementation.
//!
//! Keys and values follow Patroni's layout (`/<namespace>/<scope>/leader`, `members/<name>`,
//! `config`, `initialize`, `history`, `status`, `sync`, `failover`), so `patronictl` and other
//! tools read a pgkeep cluster as if it were Patroni's. The wire model itself (parsing and
//! serialising the values) lives in [`pgkeep_core::cluster`]; this module only moves bytes.
//!
//! - [`etcd`]: [`EtcdDcs`], the etcd v3 client over mutual TLS.
//! - [`access`]: etcd users and roles (least privilege per cluster) and turning authentication on.
//! - [`watch`]: [`ClusterWatch`], a continuously updated [`Snapshot`] of the cluster prefix.

use std::future::Future;
use std::time::{Duration, Instant};

use pgkeep_core::cluster::{
    ClusterStatus, ClusterView, FailoverRequest, HistoryEntry, LeaderKey, MemberData, Rejected,
    SyncState, Versioned,
};

pub mod access;
pub mod etcd;
mod rpc;
pub mod settings;
pub mod watch;

pub use etcd::{EtcdDcs, TlsReload};
pub use settings::{EtcdSettings, TlsFiles};
pub use watch::{ClusterWatch, WatchState};

/// Why a DCS operation failed.
///
/// Transport-level detail from etcd is usually generic ("transport error"), so every variant that
/// wraps an etcd error carries `detail`: the whole source chain, rendered once, for the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DcsError {
    /// etcd could not be reached, has no leader, or kept failing until the time budget ran out.
    /// The outcome of a write that failed this way is unknown.
    #[error("etcd unavailable during {op}: {detail}")]
    Unavailable {
        /// The operation, e.g. `acquire_leader`.
        op: &'static str,
        /// The error chain of the last attempt.
        detail: String,
        /// The last etcd error, if any.
        #[source]
        source: Option<etcd_client::Error>,
    },
    /// No answer within the request budget.
    #[error("etcd did not answer {op} within {budget:?}{}", last_error_suffix(.last_error))]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The whole time budget of the call.
        budget: Duration,
        /// The error chain of the last failed attempt, if an attempt failed before time ran out.
        last_error: Option<String>,
    },
    /// etcd does not know the lease (it expired or was revoked): grant a new one.
    #[error("etcd lease {lease:x} not found (expired or revoked)")]
    LeaseNotFound {
        /// The lease id.
        lease: i64,
    },
    /// etcd refused the request for a reason retrying will not fix (permissions, bad argument).
    #[error("etcd refused {op}: {detail}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// The error chain.
        detail: String,
        /// The etcd error.
        #[source]
        source: etcd_client::Error,
    },
    /// The connection settings are unusable (missing file, plaintext endpoint, bad URL...).
    #[error("etcd settings: {0}")]
    Config(String),
    /// A value could not be serialised (never expected with the core's types).
    #[error("could not encode {what}: {source}")]
    Encode {
        /// Which value.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The background watch task ended (only when the runtime shuts down).
    #[error("the cluster watch task has stopped")]
    WatchStopped,
}

fn last_error_suffix(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

impl DcsError {
    /// True when the failure is about reaching etcd (the caller should treat the DCS as
    /// unavailable), as opposed to a refusal, a lost lease or a local mistake.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            DcsError::Unavailable { .. } | DcsError::Timeout { .. } | DcsError::WatchStopped
        )
    }
}

/// A lease etcd granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease id (the `lease` field of the keys attached to it).
    pub id: i64,
    /// The TTL etcd granted in seconds; it may be larger than asked (etcd's minimum TTL).
    pub granted_ttl: i64,
}

/// The answer to one lease keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveReply {
    /// The TTL etcd granted in seconds, counted from when etcd handled the keepalive. Zero or
    /// less means the lease is gone (expired or revoked) and its keys with it.
    pub granted_ttl: i64,
    /// Monotonic time taken just before the keepalive was sent. The lease is certainly alive
    /// until `sent_at + granted_ttl`: etcd cannot have renewed it before it was sent.
    pub sent_at: Instant,
}

impl KeepaliveReply {
    /// True when etcd renewed the lease.
    pub fn is_alive(&self) -> bool {
        self.granted_ttl > 0
    }

    /// The lease deadline: `sent_at + granted_ttl - margin`, or `None` when the lease is gone.
    pub fn deadline(&self, margin: Duration) -> Option<Instant> {
        let ttl = u64::try_from(self.granted_ttl).ok().filter(|t| *t > 0)?;
        Some(self.sent_at + Duration::from_secs(ttl).saturating_sub(margin))
    }
}

/// The precondition of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No precondition: a plain write.
    Any,
    /// The key must not exist (`create_revision == 0`).
    Absent,
    /// The key must exist with this `mod_revision` (the version a reader saw).
    ModRevision(i64),
}

impl Expect {
    /// The precondition that the key is still as `seen` in a view: unchanged when present,
    /// still absent when absent.
    pub fn unchanged<T>(seen: Option<&Versioned<T>>) -> Expect {
        seen.map_or(Expect::Absent, |v| Expect::ModRevision(v.mod_revision))
    }
}

/// The outcome of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Cas {
    /// The write happened; `revision` is the etcd revision it created (the key's new
    /// `mod_revision` after a put).
    Written {
        /// The revision of the write.
        revision: i64,
    },
    /// The precondition did not hold: someone else changed the key. Nothing was written.
    Conflict,
}

impl Cas {
    /// True when the write happened.
    pub fn is_written(&self) -> bool {
        matches!(self, Cas::Written { .. })
    }
}

/// The cluster prefix as of one etcd revision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// What the DCS says about the cluster. Values that did not parse are left out.
    pub view: ClusterView,
    /// The etcd revision this view reflects (0 when unknown).
    pub revision: i64,
    /// The values left out of `view` because they did not parse (already logged).
    pub rejected: Vec<Rejected>,
    /// The leader key as it was just before the last deletion the watch delivered without a
    /// gap (its holder and last `mod_revision`). `None` from a plain read, and after the watch
    /// had to start over, because then a renewal may have been missed.
    pub deleted_leader: Option<DeletedLeader>,
}

/// The last deletion of the leader key, as the watch saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedLeader {
    /// The key before deletion (holder, lease, last `mod_revision`).
    pub key: LeaderKey,
    /// When the watch delivered the put that created that last revision, if it did. The
    /// holder's lease cannot outlive this by more than `ttl`: every renewal puts the key.
    pub put_seen_at: Option<Instant>,
}

/// A distributed configuration store holding one cluster's keys in Patroni's layout.
///
/// Every method has a bounded duration (the implementation's request budget); a method that
/// fails with [`DcsError::is_unavailable`] may or may not have written. Methods returning `bool`
/// or [`Cas`] answer whether their precondition held; `Err` is reserved for failures.
///
/// `EtcdDcs` is the real implementation; the HA simulator has its own.
pub trait Dcs: Send + Sync {
    /// Reads the whole cluster prefix with a linearizable read. Values that do not parse are
    /// logged (`warn`) and left out of the view.
    fn load(&self) -> impl Future<Output = Result<Snapshot, DcsError>> + Send;

    /// Grants a lease of `ttl_secs` seconds.
    fn grant_lease(&self, ttl_secs: i64) -> impl Future<Output = Result<Lease, DcsError>> + Send;

    /// Sends one keepalive for `lease`. A lease that is gone gives `granted_ttl <= 0`, not an
    /// error.
    fn keepalive(
        &self,
        lease: i64,
    ) -> impl Future<Output = Result<KeepaliveReply, DcsError>> + Send;

    /// Revokes `lease`, deleting every key attached to it. Revoking an unknown lease succeeds.
    fn revoke(&self, lease: i64) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// Takes the leader key if nobody holds it: creates `leader = name` attached to `lease`.
    /// Returns the key's `mod_revision` when it says `name` on `lease` afterwards (created now,
    /// by an earlier unanswered attempt of this call, or already held); `None` when someone else
    /// holds it.
    fn acquire_leader(
        &self,
        name: &str,
        lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, DcsError>> + Send;

    /// One renewal of a held leader key: `value(leader) == name → put(leader, name, lease)`.
    /// Every renewal writes, so every watcher sees a new revision per renewal (the HA core's
    /// takeover guard counts from the last revision it saw). Returns the new `mod_revision`, or
    /// `None` when the key no longer says `name`. A vanished key is never re-created here: a
    /// holder that lost its key must race again like everyone else.
    fn renew_leader(
        &self,
        name: &str,
        lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, DcsError>> + Send;

    /// Deletes the leader key if it says `name`. True when it was deleted.
    fn release_leader(&self, name: &str) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// Writes `members/<name>` (compact JSON) attached to `lease`.
    fn put_member(
        &self,
        name: &str,
        data: &MemberData,
        lease: i64,
    ) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// Deletes `members/<name>` (operator tooling). True when it existed.
    fn delete_member(&self, name: &str) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// The bootstrap race: writes `initialize = ""` attached to `lease` if the key is absent, so
    /// a claimant that dies mid-bootstrap releases the claim. True for the winner (also when the
    /// key already holds `""` on this lease).
    fn race_initialize(&self, lease: i64) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// Turns a won bootstrap claim into the cluster's identity: `value(initialize) == "" and
    /// lease(initialize) == lease → put(initialize, sysid)` without a lease. False when the claim
    /// is no longer ours (it expired, and someone else may have claimed it).
    fn confirm_initialize(
        &self,
        sysid: &str,
        lease: i64,
    ) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// Writes the system identifier to `initialize`, without a lease (it outlives every node).
    /// With `create_only` the write happens only if the key is absent; the result says whether
    /// it was written.
    fn set_initialize(
        &self,
        sysid: &str,
        create_only: bool,
    ) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// Deletes `initialize` (a failed bootstrap gives up its win).
    fn cancel_initialize(&self) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// Writes `config` under `expect`.
    fn put_config(
        &self,
        config: &serde_json::Map<String, serde_json::Value>,
        expect: Expect,
    ) -> impl Future<Output = Result<Cas, DcsError>> + Send;

    /// Writes `history` (plain put).
    fn put_history(
        &self,
        history: &[HistoryEntry],
    ) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// Writes `status` (plain put).
    fn put_status(
        &self,
        status: &ClusterStatus,
    ) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// Writes `sync` under `expect`.
    fn put_sync(
        &self,
        state: &SyncState,
        expect: Expect,
    ) -> impl Future<Output = Result<Cas, DcsError>> + Send;

    /// Deletes `sync` under `expect` ([`Expect::Absent`] is a no-op that succeeds when absent).
    fn delete_sync(&self, expect: Expect) -> impl Future<Output = Result<Cas, DcsError>> + Send;

    /// Writes `failover` under `expect` (`{}` clears a request the way Patroni does).
    fn put_failover(
        &self,
        request: &FailoverRequest,
        expect: Expect,
    ) -> impl Future<Output = Result<Cas, DcsError>> + Send;

    /// Deletes every key of the cluster. Only for operator tooling behind a typed confirmation.
    /// Returns how many keys were deleted.
    fn delete_cluster(&self) -> impl Future<Output = Result<i64, DcsError>> + Send;

    /// Starts watching the cluster prefix in the background (needs a Tokio runtime). The watch
    /// stops when every clone of the returned handle is dropped.
    fn watch(&self) -> ClusterWatch;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_deadline_counts_from_the_send_time() {
        let sent_at = Instant::now();
        let r = KeepaliveReply {
            granted_ttl: 10,
            sent_at,
        };
        assert!(r.is_alive());
        assert_eq!(
            r.deadline(Duration::from_secs(2)),
            Some(sent_at + Duration::from_secs(8))
        );
        assert_eq!(
            r.deadline(Duration::from_secs(60)),
            Some(sent_at),
            "a margin above the TTL leaves no time, never negative time"
        );
        let gone = KeepaliveReply {
            granted_ttl: 0,
            sent_at,
        };
        assert!(!gone.is_alive());
        assert_eq!(gone.deadline(Duration::ZERO), None);
        let negative = KeepaliveReply {
            granted_ttl: -1,
            sent_at,
        };
        assert_eq!(negative.deadline(Duration::ZERO), None);
    }

    #[test]
    fn expect_unchanged_follows_what_the_reader_saw() {
        let seen = Versioned {
            value: (),
            mod_revision: 17,
        };
        assert_eq!(Expect::unchanged(Some(&seen)), Expect::ModRevision(17));
        assert_eq!(Expect::unchanged::<()>(None), Expect::Absent);
    }

    #[test]
    fn errors_cross_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<DcsError>();
        assert_send_sync::<Snapshot>();
    }

    #[test]
    fn error_classes_and_messages() {
        let t = DcsError::Timeout {
            op: "load",
            budget: Duration::from_secs(3),
            last_error: Some("transport error: connection refused".into()),
        };
        assert!(t.is_unavailable());
        assert_eq!(
            t.to_string(),
            "etcd did not answer load within 3s (last error: transport error: connection refused)"
        );
        let l = DcsError::LeaseNotFound { lease: 0x1f };
        assert!(!l.is_unavailable());
        assert_eq!(
            l.to_string(),
            "etcd lease 1f not found (expired or revoked)"
        );
        assert!(!DcsError::Config("x".into()).is_unavailable());
    }
}
