//! Why a decision was taken: a typed reason for every decision, with a human-readable form.

use std::fmt;

use crate::cluster::Lsn;

use super::types::Millis;

/// Why a decision was taken. Every [`Decision`](super::Decision) carries exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The last keepalive answered TTL ≤ 0.
    LeaseRevoked,
    /// The lease deadline passed without a successful renewal.
    LeaseDeadlinePassed {
        /// The deadline.
        deadline: Millis,
    },
    /// This agent never proved leadership (e.g. it restarted) while PostgreSQL is writable.
    NoLeaseProof,
    /// The watch shows the leader key gone.
    LeaderKeyGone,
    /// The leader key belongs to someone else.
    LeaderKeyTaken {
        /// The holder.
        holder: String,
    },
    /// Renewing the leader key; all is well.
    LeaderRenewed,
    /// Promoting after winning the race (or bootstrap).
    Promoting,
    /// Promotion requested, waiting for it to finish.
    PromotionInProgress,
    /// Holding the key but waiting for the previous leader's lease to have run out.
    TakeoverGuard {
        /// Earliest promotion.
        until: Millis,
    },
    /// Holding the key by our own write, but the view does not show it yet.
    WaitingForOwnKey,
    /// Synchronous mode: `/sync` must name this node before it promotes.
    WaitingForSyncState,
    /// Started PostgreSQL as primary again after a crash.
    RestartingCrashedPrimary,
    /// The crashed primary did not recover in time and a failover is possible.
    PrimaryStartTimeout,
    /// `primary_start_timeout` is 0 and a failover is possible.
    ImmediateFailoverAfterCrash,
    /// Crashed primary and no healthy replica to fail over to: keep trying locally.
    NoFailoverPossible,
    /// Following the leader.
    FollowingLeader {
        /// Upstream.
        upstream: Option<String>,
    },
    /// Starting as replica.
    StartingReplica,
    /// PostgreSQL is starting or stopping; waiting.
    WaitingForPostgres,
    /// A background operation runs.
    Busy,
    /// Rejoin: this node's WAL passed the switch point of the leader's timeline.
    Diverged {
        /// Our timeline.
        timeline: u32,
        /// Our WAL end.
        position: Lsn,
        /// Where our timeline ended in the leader's history (none: not in it).
        switch_point: Option<Lsn>,
    },
    /// Rejoin: the leader's timeline history is not published yet.
    WaitingForHistory,
    /// Re-cloning because `pg_rewind` is off or failed.
    RecloneAfterDivergence,
    /// Operator asked for a re-initialisation.
    Reinitialize,
    /// Operator asked for a restart.
    RestartRequested,
    /// No leader: asking peers for their state before racing.
    NeedPeerStatus,
    /// Won the race evaluation: taking the key.
    AcquiringLeaderKey,
    /// Not eligible or not the healthiest.
    NotHealthiest(RaceLoss),
    /// No leader and PostgreSQL not running: starting it read-only to take part.
    StartingToRace,
    /// A failover candidate was named and it is not us.
    DeferringToCandidate {
        /// The candidate.
        candidate: String,
    },
    /// Switchover: stopping the primary with a shutdown checkpoint.
    SwitchoverStopping {
        /// Named candidate.
        candidate: Option<String>,
    },
    /// Switchover: waiting for a candidate to confirm the shutdown checkpoint.
    SwitchoverAwaitingCandidate,
    /// Switchover requested: the candidates' member keys lag; asking them for their current
    /// position before judging.
    SwitchoverCheckingCandidates,
    /// Handing the key over (publish "released", delete the key).
    ReleasingLeaderKey,
    /// Switchover abandoned: no candidate confirmed the checkpoint in time.
    SwitchoverTimedOut,
    /// A scheduled switchover is not due yet.
    ScheduledSwitchoverPending {
        /// Wall-clock due time (Unix ms).
        at_unix_ms: i64,
    },
    /// The failover request was cleared without acting.
    FailoverRequestRejected(RejectedFailover),
    /// Bootstrap: racing for `initialize`.
    ClaimingInitialize,
    /// Bootstrap: running initdb.
    RunningInitdb,
    /// Bootstrap: someone else is bootstrapping.
    BootstrapInProgressElsewhere,
    /// Bootstrap: initdb done, making the system identifier the cluster's.
    ConfirmingInitialize,
    /// Bootstrap: our claim expired and another node's cluster won; our fresh data directory
    /// is replaced by a clone.
    BootstrapLost,
    /// New cluster bootstrapped: taking the key to start as first primary.
    BootstrapTakingLeadership,
    /// Empty data directory: cloning.
    CloningReplica {
        /// Source member.
        source: String,
    },
    /// Empty data directory, no running member to copy: restoring from the backup repository.
    RestoringFromRepository,
    /// Empty data directory and no way to get data yet.
    WaitingForData(WaitingForData),
    /// The data directory belongs to another cluster.
    SystemIdMismatch {
        /// Ours.
        local: String,
        /// The cluster's.
        cluster: String,
    },
    /// Paused: no automatic action.
    Paused,
    /// The agent shuts down.
    ShuttingDown,
    /// The agent has not read the DCS yet.
    NoDcsView,
    /// Leaderless and not allowed to race (nofailover, pause).
    NoLeaderNotEligible,
}

/// Why a node does not race or lost the evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaceLoss {
    /// `nofailover` or `failover_priority ≤ 0`.
    NoFailoverTag,
    /// Paused.
    Paused,
    /// PostgreSQL not running as a replica.
    NotRunning,
    /// Synchronous mode and this node is not in `/sync`.
    NotSynchronous,
    /// Further behind the last leader optime than `maximum_lag_on_failover`.
    LagTooHigh {
        /// Bytes behind.
        lag: u64,
    },
    /// Timeline behind the cluster's (`check_timeline`).
    TimelineBehind {
        /// Ours.
        ours: Option<u32>,
        /// Cluster's.
        cluster: u32,
    },
    /// A peer still runs as primary.
    PrimaryStillAlive {
        /// The peer.
        peer: String,
    },
    /// A peer has more WAL.
    PeerAhead {
        /// The peer.
        peer: String,
    },
    /// A peer with the same WAL has a higher `failover_priority`.
    PeerHigherPriority {
        /// The peer.
        peer: String,
    },
    /// The watchdog is required and broken.
    WatchdogFailed,
}

/// Why a `/failover` request was cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectedFailover {
    /// It already happened: this node leads now.
    Completed,
    /// It names another leader.
    LeaderMismatch,
    /// The candidate is this leader.
    CandidateIsLeader,
    /// No member is fit to take over.
    NoHealthyCandidate,
    /// The scheduled time passed long ago.
    Stale,
    /// Scheduled switchovers are refused in pause.
    ScheduledInPause,
    /// The time could not be parsed.
    BadSchedule,
}

/// Why an empty node waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingForData {
    /// No running member to clone from.
    NoSource,
    /// Never-joined node without the first-start marker: it may only clone.
    NoBootstrapMarker,
    /// This node once belonged to the cluster: it never runs initdb again.
    EverJoined,
    /// `nofailover` nodes do not bootstrap.
    NoFailoverTag,
    /// No leader, but not yet for a whole TTL: the leader (or a node with data) may still
    /// come back before this node restores from the backup repository.
    LeaderAbsentGrace,
    /// Synchronous mode: a node rebuilt from the archive could lose transactions the
    /// synchronous standby acknowledged, so it does not restore without a leader.
    SynchronousMode,
    /// The data directory is not empty and not a cluster: it is never overwritten without a
    /// member to copy (it may be a volume not mounted yet, or data worth saving).
    UnrecognisedData,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Reason as R;
        match self {
            R::LeaseRevoked => write!(f, "lease revoked (keepalive TTL <= 0): fencing"),
            R::LeaseDeadlinePassed { deadline } => {
                write!(
                    f,
                    "lease deadline {deadline} passed without renewal: fencing"
                )
            }
            R::NoLeaseProof => write!(
                f,
                "writable PostgreSQL without a lease proven by this agent: fencing"
            ),
            R::LeaderKeyGone => write!(f, "the leader key is gone: fencing"),
            R::LeaderKeyTaken { holder } => write!(f, "the leader key is held by {holder}"),
            R::LeaderRenewed => write!(f, "leader: renewed the lease"),
            R::Promoting => write!(f, "promoting"),
            R::PromotionInProgress => write!(f, "promotion in progress"),
            R::TakeoverGuard { until } => {
                write!(
                    f,
                    "holding the key; previous leader's lease may run until {until}"
                )
            }
            R::WaitingForOwnKey => write!(f, "holding the key; waiting for the view to show it"),
            R::WaitingForSyncState => write!(f, "waiting for /sync to name this node"),
            R::RestartingCrashedPrimary => write!(f, "restarting crashed primary"),
            R::PrimaryStartTimeout => write!(f, "primary_start_timeout exceeded: handing over"),
            R::ImmediateFailoverAfterCrash => {
                write!(
                    f,
                    "primary crashed and primary_start_timeout is 0: handing over"
                )
            }
            R::NoFailoverPossible => {
                write!(f, "primary down, no failover possible: recovering locally")
            }
            R::FollowingLeader { upstream } => match upstream {
                Some(u) => write!(f, "following {u}"),
                None => write!(f, "replica without upstream"),
            },
            R::StartingReplica => write!(f, "starting as replica"),
            R::WaitingForPostgres => write!(f, "waiting for PostgreSQL to start or stop"),
            R::Busy => write!(f, "background operation in progress"),
            R::Diverged {
                timeline,
                position,
                switch_point,
            } => match switch_point {
                Some(s) => write!(
                    f,
                    "timeline {timeline} WAL at {position} passed the switch point {s}: rejoin needs rewind"
                ),
                None => write!(
                    f,
                    "timeline {timeline} is not in the leader's history: rejoin needs rewind"
                ),
            },
            R::WaitingForHistory => {
                write!(f, "waiting for the leader to publish its timeline history")
            }
            R::RecloneAfterDivergence => {
                write!(f, "diverged and pg_rewind unavailable: re-cloning")
            }
            R::Reinitialize => write!(f, "reinitialize requested"),
            R::RestartRequested => write!(f, "restart requested"),
            R::NeedPeerStatus => write!(f, "no leader: asking peers"),
            R::AcquiringLeaderKey => write!(f, "healthiest node: taking the leader key"),
            R::NotHealthiest(l) => write!(f, "not racing: {l}"),
            R::StartingToRace => write!(f, "no leader: starting PostgreSQL read-only"),
            R::DeferringToCandidate { candidate } => {
                write!(f, "deferring to failover candidate {candidate}")
            }
            R::SwitchoverStopping { candidate } => match candidate {
                Some(c) => write!(f, "switchover to {c}: stopping with checkpoint"),
                None => write!(f, "switchover: stopping with checkpoint"),
            },
            R::SwitchoverCheckingCandidates => write!(
                f,
                "switchover requested: asking the candidates for their current WAL position"
            ),
            R::SwitchoverAwaitingCandidate => {
                write!(
                    f,
                    "switchover: waiting for a candidate to confirm the shutdown checkpoint"
                )
            }
            R::ReleasingLeaderKey => write!(f, "releasing the leader key"),
            R::SwitchoverTimedOut => write!(f, "switchover timed out: resuming as primary"),
            R::ScheduledSwitchoverPending { at_unix_ms } => {
                write!(f, "switchover scheduled at unix {at_unix_ms} ms")
            }
            R::FailoverRequestRejected(r) => write!(f, "failover request cleared: {r:?}"),
            R::ClaimingInitialize => write!(f, "bootstrap: claiming initialize"),
            R::RunningInitdb => write!(f, "bootstrap: initdb"),
            R::BootstrapInProgressElsewhere => write!(f, "another node is bootstrapping"),
            R::ConfirmingInitialize => write!(f, "bootstrap: publishing the new system id"),
            R::BootstrapLost => write!(f, "bootstrap lost to another node: re-cloning"),
            R::BootstrapTakingLeadership => write!(f, "bootstrap done: taking the leader key"),
            R::CloningReplica { source } => write!(f, "cloning from {source}"),
            R::RestoringFromRepository => write!(
                f,
                "no running member to copy: restoring a replica from the backup repository"
            ),
            R::WaitingForData(w) => write!(f, "empty data directory: {w:?}"),
            R::SystemIdMismatch { local, cluster } => {
                write!(
                    f,
                    "data directory system id {local} differs from the cluster's {cluster}"
                )
            }
            R::Paused => write!(f, "paused"),
            R::ShuttingDown => write!(f, "shutting down"),
            R::NoDcsView => write!(f, "no DCS view yet"),
            R::NoLeaderNotEligible => write!(f, "no leader; this node may not race"),
        }
    }
}

impl fmt::Display for RaceLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RaceLoss::NoFailoverTag => write!(f, "nofailover"),
            RaceLoss::Paused => write!(f, "paused"),
            RaceLoss::NotRunning => write!(f, "PostgreSQL is not a running replica"),
            RaceLoss::NotSynchronous => write!(f, "not in /sync"),
            RaceLoss::LagTooHigh { lag } => write!(f, "{lag} bytes behind"),
            RaceLoss::TimelineBehind { ours, cluster } => {
                write!(f, "timeline {ours:?} behind cluster timeline {cluster}")
            }
            RaceLoss::PrimaryStillAlive { peer } => write!(f, "{peer} still runs as primary"),
            RaceLoss::PeerAhead { peer } => write!(f, "{peer} has more WAL"),
            RaceLoss::PeerHigherPriority { peer } => write!(f, "{peer} has a higher priority"),
            RaceLoss::WatchdogFailed => write!(f, "watchdog failed"),
        }
    }
}
