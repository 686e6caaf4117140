//! What the agent lets its REST API do: write the `/failover` key, and read this standby's WAL
//! positions live for an authenticated `GET /patroni`.

use std::path::PathBuf;
use std::time::Duration;

use pgkeep_core::cluster::{FailoverRequest, Lsn};
use tokio::sync::Mutex;

use crate::api::{BoxFuture, Control, ControlError, LivePositions};
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
}

impl AgentControl {
    async fn read_positions(&self) -> Option<LivePositions> {
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

    fn live_positions(&self) -> BoxFuture<'_, Option<LivePositions>> {
        Box::pin(async {
            tokio::time::timeout(LIVE_BUDGET, self.read_positions())
                .await
                .ok()
                .flatten()
        })
    }
}
