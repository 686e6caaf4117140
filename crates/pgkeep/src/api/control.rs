//! What the state-changing endpoints may do to the cluster: the [`Control`] handle.
//!
//! The REST API reads only the agent's published snapshot; the few endpoints that change the
//! cluster (`POST /switchover`, `POST /failover`, `DELETE /switchover`) write through this
//! handle, so a server started without one (tests, tools) cannot change anything and says so.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pgkeep_core::cluster::FailoverRequest;

use crate::dcs::{Cas, Dcs, EtcdDcs, Expect};

/// A boxed future, as the object-safe [`Control`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A write to the DCS failed (its outcome may be unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ControlError(pub String);

/// The REST API's handle on the cluster: the DCS writes its state-changing endpoints make.
pub trait Control: Send + Sync {
    /// Writes the `/failover` key under `expect` (`{}` clears a request, as Patroni does).
    fn put_failover<'a>(
        &'a self,
        request: &'a FailoverRequest,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>>;

    /// How long `POST /switchover` and `POST /failover` wait for the outcome of an immediate
    /// request, given Patroni's budget (`2 × max(10, loop_wait)` seconds). The default is that
    /// budget; tests shorten it.
    fn wait_budget(&self, patroni_secs: u64) -> Duration {
        Duration::from_secs(patroni_secs)
    }

    /// A standby's received and replayed WAL positions, read from PostgreSQL now (bounded to a
    /// few hundred milliseconds), for an authenticated `GET /patroni`: a primary handing over
    /// waits for a candidate to confirm its shutdown checkpoint, and a position one HA cycle old
    /// would hold the switchover up for that cycle. `None`: not a standby, or no answer in time
    /// (the snapshot's positions are used).
    fn live_positions(&self) -> BoxFuture<'_, Option<LivePositions>> {
        Box::pin(async { None })
    }
}

/// A standby's WAL positions, as of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivePositions {
    /// `pg_last_wal_receive_lsn()`.
    pub received: pgkeep_core::cluster::Lsn,
    /// `pg_last_wal_replay_lsn()`.
    pub replayed: pgkeep_core::cluster::Lsn,
}

impl Control for EtcdDcs {
    fn put_failover<'a>(
        &'a self,
        request: &'a FailoverRequest,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        Box::pin(async move {
            Dcs::put_failover(self, request, expect)
                .await
                .map_err(|e| ControlError(e.to_string()))
        })
    }
}
