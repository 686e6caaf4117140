//! What the agent lets its REST API do: write the `/failover` and `/config` keys, hand
//! restart/reinitialize/reload requests to the agent's loop, and read this node's PostgreSQL
//! live for an authenticated `GET /patroni` (a standby's WAL positions, the parameters waiting
//! for a restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pgkeep_core::cluster::{FailoverRequest, Lsn};
use pgkeep_core::policy::GucName;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::ops::Envelope;
use crate::api::{
    BoxFuture, Control, ControlError, LivePositions, LocalRequest, PendingChange, RequestOutcome,
};
use crate::dcs::{Cas, EtcdDcs, Expect};

/// How long a live read of the WAL positions may take before the snapshot's are used.
const LIVE_BUDGET: Duration = Duration::from_millis(300);

/// The agent's [`Control`].
pub(super) struct AgentControl {
    pub(super) dcs: EtcdDcs,
    pub(super) socket_dir: PathBuf,
    pub(super) port: u16,
    pub(super) user: String,
    /// One connection of its own (never the HA loop's), opened on first use.
    pub(super) client: Mutex<Option<tokio_postgres::Client>>,
    /// The agent loop's inbox for operator requests.
    pub(super) requests: mpsc::Sender<Envelope>,
    /// The node's dynamic-parameter allowlist (the loop updates it on reload).
    pub(super) allowlist: Arc<RwLock<BTreeSet<GucName>>>,
}

impl AgentControl {
    /// The own connection, (re)opened when needed. The lock is held while it is used.
    async fn connection(&self) -> tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *guard = crate::postgres::observe::connect_local(
                &self.socket_dir,
                self.port,
                &self.user,
                LIVE_BUDGET,
            )
            .await
            .ok();
        }
        guard
    }

    /// `pg_settings` rows with `pending_restart`, with the value of the configuration files
    /// (the last `pg_file_settings` row of the name, which is the one in force).
    async fn read_pending(&self) -> Option<BTreeMap<String, PendingChange>> {
        let guard = self.connection().await;
        let rows = guard
            .as_ref()?
            .query(
                "SELECT s.name, s.setting, coalesce(f.setting, '') \
                 FROM pg_settings s \
                 LEFT JOIN LATERAL (SELECT fs.setting FROM pg_file_settings fs \
                                    WHERE fs.name = s.name ORDER BY fs.seqno DESC LIMIT 1) f ON true \
                 WHERE s.pending_restart",
                &[],
            )
            .await
            .ok()?;
        Some(
            rows.iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        PendingChange {
                            old_value: r.get(1),
                            new_value: r.get(2),
                        },
                    )
                })
                .collect(),
        )
    }

    async fn read_positions(&self) -> Option<LivePositions> {
        let guard = self.connection().await;
        let row = guard
            .as_ref()?
            .query_one(
                "SELECT pg_is_in_recovery(), \
                        (pg_last_wal_receive_lsn() - '0/0')::bigint, \
                        (pg_last_wal_replay_lsn() - '0/0')::bigint",
                &[],
            )
            .await
            .ok()?;
        let lsn = |i: usize| {
            row.get::<_, Option<i64>>(i)
                .and_then(|v| u64::try_from(v).ok())
                .map_or(Lsn(0), Lsn)
        };
        row.get::<_, bool>(0).then(|| LivePositions {
            received: lsn(1),
            replayed: lsn(2),
        })
    }
}

impl Control for AgentControl {
    fn put_failover<'a>(
        &'a self,
        request: &'a FailoverRequest,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        Control::put_failover(&self.dcs, request, expect)
    }

    fn fresh_view(&self) -> BoxFuture<'_, Option<pgkeep_core::cluster::ClusterView>> {
        Control::fresh_view(&self.dcs)
    }

    fn live_positions(&self) -> BoxFuture<'_, Option<LivePositions>> {
        Box::pin(async {
            tokio::time::timeout(LIVE_BUDGET, self.read_positions())
                .await
                .ok()
                .flatten()
        })
    }

    fn put_config<'a>(
        &'a self,
        config: &'a Map<String, Value>,
        expect: Expect,
    ) -> BoxFuture<'a, Result<Cas, ControlError>> {
        Control::put_config(&self.dcs, config, expect)
    }

    fn request(
        &self,
        request: LocalRequest,
    ) -> BoxFuture<'_, Result<RequestOutcome, ControlError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.requests
                .try_send(Envelope { request, reply })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        ControlError("the agent is busy with other requests; try again".into())
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        ControlError("the agent is not running".into())
                    }
                })?;
            if let LocalRequest::Reload = request {
                // Scheduled: the loop re-reads the file when it takes the request.
                return Ok(RequestOutcome::Accepted);
            }
            answer
                .await
                .map_err(|_| ControlError("the agent dropped the request".into()))
        })
    }

    fn dynamic_allowlist(&self) -> BTreeSet<GucName> {
        self.allowlist.read().map(|a| a.clone()).unwrap_or_default()
    }

    fn pending_restart(&self) -> BoxFuture<'_, Option<BTreeMap<String, PendingChange>>> {
        Box::pin(async {
            tokio::time::timeout(LIVE_BUDGET, self.read_pending())
                .await
                .ok()
                .flatten()
        })
    }
}
