//! A simulated PostgreSQL: process states with non-zero transition times, a WAL of uniquely
//! numbered records, timelines, `synchronous_standby_names`, slots.
//!
//! Each WAL record carries a globally unique id, so two WALs agree up to position `n` exactly
//! when their records at `n - 1` have the same id (a record's id fixes its whole history).

use std::collections::BTreeSet;

use pgkeep_core::cluster::{HistoryEntry, Lsn};
use pgkeep_core::ha::{LongOperation, PgProcess, SyncStandbyNames};

/// Bytes per simulated WAL record (LSN = records × this).
pub const RECORD_BYTES: u64 = 100;

/// One WAL record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    /// Globally unique id.
    pub id: u64,
    /// Timeline it was written on.
    pub tl: u32,
}

/// A pending PostgreSQL operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOp {
    /// Stopping (immediate when `fence`).
    Stop {
        /// Immediate stop / kill.
        fence: bool,
        /// Start again afterwards (restart).
        restart: bool,
    },
    /// Starting.
    Start {
        /// As primary.
        primary: bool,
    },
    /// Promoting.
    Promote,
    /// Background operation.
    Long {
        /// Which.
        op: LongOperation,
        /// Source node.
        source: Option<usize>,
    },
}

/// The data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Empty.
    Empty,
    /// Initialised with a system id.
    Init(String),
}

/// One node's PostgreSQL.
#[derive(Debug, Clone)]
pub struct Pg {
    /// Process state.
    pub process: PgProcess,
    /// In recovery (replica), or on disk: shut down in recovery.
    pub in_recovery: bool,
    /// Last stop was a crash.
    pub crashed: bool,
    /// The WAL.
    pub wal: Vec<Rec>,
    /// Current timeline.
    pub tl: u32,
    /// Timeline history of `tl`.
    pub history: Vec<HistoryEntry>,
    /// Upstream node.
    pub upstream: Option<usize>,
    /// WAL receiver streaming.
    pub streaming: bool,
    /// `synchronous_standby_names`.
    pub ssn: SyncStandbyNames,
    /// Physical slots.
    pub slots: BTreeSet<String>,
    /// Data directory.
    pub data: Data,
    /// Operation in progress and its epoch.
    pub op: Option<PgOp>,
    /// Bumped on every state change that invalidates scheduled completions.
    pub epoch: u64,
    /// Real time the postmaster started.
    pub started_at: Option<u64>,
    /// A replication tick is scheduled.
    pub repl_scheduled: bool,
    /// Writes committed here, waiting for synchronous confirmation: (index, id).
    pub pending: Vec<(usize, u64)>,
}

impl Default for Pg {
    fn default() -> Self {
        Pg {
            process: PgProcess::Stopped,
            in_recovery: false,
            crashed: false,
            wal: Vec::new(),
            tl: 1,
            history: Vec::new(),
            upstream: None,
            streaming: false,
            ssn: SyncStandbyNames::default(),
            slots: BTreeSet::new(),
            data: Data::Empty,
            op: None,
            epoch: 0,
            started_at: None,
            repl_scheduled: false,
            pending: Vec::new(),
        }
    }
}

impl Pg {
    /// Able to commit right now: a running (or still stopping) primary.
    pub fn can_commit(&self) -> bool {
        matches!(self.process, PgProcess::Running | PgProcess::Stopping) && !self.in_recovery
    }

    /// WAL end as an LSN.
    pub fn lsn(&self) -> Lsn {
        Lsn(self.wal.len() as u64 * RECORD_BYTES)
    }

    /// True when our WAL is a prefix of `other`'s.
    pub fn is_prefix_of(&self, other: &Pg) -> bool {
        let n = self.wal.len();
        n <= other.wal.len() && (n == 0 || other.wal[n - 1].id == self.wal[n - 1].id)
    }

    /// Length of the common prefix with `other` (binary search on record ids).
    pub fn common_prefix(&self, other: &Pg) -> usize {
        let (mut lo, mut hi) = (0usize, self.wal.len().min(other.wal.len()));
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.wal[mid - 1].id == other.wal[mid - 1].id {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Kills the postmaster at once (crash).
    pub fn kill(&mut self) {
        if self.process != PgProcess::Stopped {
            self.crashed = true;
        }
        self.process = PgProcess::Stopped;
        self.stopped();
    }

    /// Common bookkeeping when the server stops.
    pub fn stopped(&mut self) {
        self.op = None;
        self.epoch += 1;
        self.streaming = false;
        self.started_at = None;
        self.pending.clear();
    }

    /// The background operation in progress.
    pub fn long_op(&self) -> Option<LongOperation> {
        match &self.op {
            Some(PgOp::Long { op, .. }) => Some(*op),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(ids: &[u64]) -> Pg {
        Pg {
            wal: ids.iter().map(|&id| Rec { id, tl: 1 }).collect(),
            ..Pg::default()
        }
    }

    #[test]
    fn prefix_and_common_prefix() {
        let a = pg(&[1, 2, 3]);
        let b = pg(&[1, 2, 3, 4]);
        let c = pg(&[1, 2, 5, 6]);
        assert!(a.is_prefix_of(&b) && !b.is_prefix_of(&a) && !a.is_prefix_of(&c));
        assert_eq!(a.common_prefix(&c), 2);
        assert_eq!(b.common_prefix(&a), 3);
        assert_eq!(pg(&[]).common_prefix(&a), 0);
        assert_eq!(pg(&[9]).common_prefix(&a), 0);
    }
}
