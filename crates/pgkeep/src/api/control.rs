//! What the state-changing endpoints may do to the cluster: the [`Control`] handle.
//!
//! The REST API reads only the agent's published snapshot; the endpoints that change the
//! cluster (`POST /switchover`, `POST /failover`, `DELETE /switchover`, `PATCH`/`PUT /config`)
//! write through this handle, and those that act on the local node (`POST /restart`,
//! `POST /reinitialize`, `POST /reload`) hand a [`LocalRequest`] to the agent's loop through
//! it. A server started without one (tests, tools) cannot change anything and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pgkeep_core::cluster::{ClusterView, FailoverRequest};
use pgkeep_core::policy::GucName;
use serde_json::{Map, Value};

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

    /// The cluster as etcd holds it now (a linearizable read), for decisions that must not rest
    /// on the agent's published view, which can be a cycle behind a write this API just made
    /// (`DELETE /switchover` right after `POST`). `None`: use the published view.
    fn fresh_view(&self) -> BoxFuture<'_, Option<ClusterView>> {
        Box::pin(async { None })
    }

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

    /// Writes the whole dynamic configuration (`/config`) under `expect`. The caller has
    /// checked it with [`pgkeep_core::ops::check_config`].
    fn put_config<'a>(
        &'a self,
        config: &'a Map<String, Value>,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        let _ = (config, expect);
        Box::pin(async { Err(ControlError(NO_CONFIG_WRITES.into())) })
    }

    /// Hands a request to the local agent's loop and waits for its answer: for
    /// [`LocalRequest::Restart`] until PostgreSQL is back (or the restart failed), for the others
    /// until the agent accepted it. The caller bounds the wait.
    fn request(
        &self,
        request: LocalRequest,
    ) -> BoxFuture<'_, Result<RequestOutcome, ControlError>> {
        let _ = request;
        Box::pin(async { Err(ControlError(NO_AGENT.into())) })
    }

    /// The node's `pgkeep.dynamic_parameter_allowlist` (extra parameters the dynamic
    /// configuration may set), for checking `PATCH`/`PUT /config`.
    fn dynamic_allowlist(&self) -> BTreeSet<GucName> {
        BTreeSet::new()
    }

    /// The parameters whose change waits for a restart, read from PostgreSQL now (bounded to a
    /// few hundred milliseconds): Patroni's `pending_restart_reason`. `None`: not known (no
    /// answer in time, PostgreSQL down); the snapshot's `pending_restart` flag is used.
    fn pending_restart(&self) -> BoxFuture<'_, Option<BTreeMap<String, PendingChange>>> {
        Box::pin(async { None })
    }

    /// How long `POST /restart` waits for PostgreSQL to be back: the request's `timeout` when
    /// it names one, else [`DEFAULT_RESTART_WAIT`]. Tests shorten it.
    fn restart_wait(&self, requested: Option<Duration>) -> Duration {
        requested.unwrap_or(DEFAULT_RESTART_WAIT)
    }
}

/// What `POST /restart` waits for PostgreSQL by default.
pub const DEFAULT_RESTART_WAIT: Duration = Duration::from_secs(120);

const NO_CONFIG_WRITES: &str = "this server cannot write the configuration";
const NO_AGENT: &str = "this server has no agent to act on the request";

/// A request for the local agent, from the REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRequest {
    /// `POST /restart`: restart PostgreSQL in its current role.
    Restart,
    /// `POST /reinitialize`: wipe the data directory and clone again.
    Reinitialize {
        /// Replace a restart or reinitialize request that was accepted and not acted on yet.
        force: bool,
        /// Clone from the leader even when a `clonefrom` member runs.
        from_leader: bool,
    },
    /// `POST /reload`: re-read the local configuration file (what SIGHUP does).
    Reload,
}

impl LocalRequest {
    /// `restart`, `reinitialize` or `reload`.
    pub fn noun(self) -> &'static str {
        match self {
            LocalRequest::Restart => "restart",
            LocalRequest::Reinitialize { .. } => "reinitialize",
            LocalRequest::Reload => "reload",
        }
    }
}

/// The agent's answer to a [`LocalRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Carried out (restart: PostgreSQL runs again; reload: configuration re-read).
    Done,
    /// Accepted; the agent acts on it in its next cycles (reinitialize).
    Accepted,
    /// Not accepted, with Patroni's reason (`restart already in progress`, ...).
    Refused(String),
    /// Accepted but it failed or was not carried out, with the reason.
    Failed(String),
}

/// One parameter whose new value waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingChange {
    /// The value PostgreSQL runs with.
    pub old_value: String,
    /// The value of the configuration files.
    pub new_value: String,
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
    fn fresh_view(&self) -> BoxFuture<'_, Option<ClusterView>> {
        Box::pin(async move {
            match Dcs::load(self).await {
                Ok(s) => Some(s.view),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the cluster from etcd failed; using the agent's view");
                    None
                }
            }
        })
    }

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

    fn put_config<'a>(
        &'a self,
        config: &'a Map<String, Value>,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        Box::pin(async move {
            Dcs::put_config(self, config, expect)
                .await
                .map_err(|e| ControlError(e.to_string()))
        })
    }
}
