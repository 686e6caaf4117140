//! What the agent tells others: the REST API's snapshot, and asking peers for theirs.

use std::sync::Arc;
use std::time::Instant;

use pgkeep_core::cluster::Lsn;
use pgkeep_core::ha::{LocalObservation, MemberState, PeerReport, PeerStatus, PgProcess};

use super::Shell;
use crate::api::{ApiSnapshot, MemberStatus, ReplicationInfo, Xlog};
use crate::dcs::Snapshot;

impl Shell {
    /// Publishes the REST API's snapshot for this cycle.
    pub(super) fn publish(&self, obs: &LocalObservation, snap: &Snapshot, state: MemberState) {
        let mut s = MemberStatus::new(&self.cfg.scope, &self.cfg.name);
        s.watchdog_failed = obs.watchdog_failed;
        let pg = &obs.pg;
        s.state = match pg.process {
            PgProcess::Running | PgProcess::Promoting => "running",
            PgProcess::Starting => "starting",
            PgProcess::Stopping => "stopping",
            PgProcess::Stopped => match state {
                MemberState::Cloning => "creating replica",
                MemberState::Bootstrapping => "initializing new cluster",
                _ => "stopped",
            },
        }
        .into();
        let sql = self.last_sql().filter(|_| pg.process == PgProcess::Running);
        s.role = match (sql, pg.process) {
            (Some(q), _) if !q.in_recovery => "primary".into(),
            (Some(_), _) => "replica".into(),
            (None, PgProcess::Stopped)
                if matches!(obs.pg.data_dir, pgkeep_core::ha::DataDir::Empty) =>
            {
                "uninitialized".into()
            }
            _ => "demoted".into(),
        };
        if let Some(q) = sql {
            s.server_version = u32::try_from(q.server_version).ok();
            s.timeline = Some(q.timeline);
            s.xlog = Some(if q.in_recovery {
                Xlog::Replica {
                    received_location: q.receive_lsn.unwrap_or_default(),
                    replayed_location: q.replay_lsn.unwrap_or_default(),
                    replayed_timestamp: q.last_replay_timestamp.clone(),
                    paused: q.replay_paused,
                }
            } else {
                Xlog::Primary {
                    location: q.flush_lsn.unwrap_or_default(),
                }
            });
            if q.in_recovery {
                s.replication_state = Some(
                    if q.wal_receiver
                        .as_ref()
                        .is_some_and(|r| r.status == "streaming")
                    {
                        "streaming"
                    } else {
                        "in archive recovery"
                    }
                    .into(),
                );
            }
            s.replication = q
                .replication
                .iter()
                .map(|w| ReplicationInfo {
                    usename: w.usename.clone(),
                    application_name: w.application_name.clone(),
                    client_addr: w.client_addr.clone(),
                    state: w.state.clone(),
                    sync_state: w.sync_state.clone(),
                    sync_priority: i64::from(w.sync_priority),
                })
                .collect();
            s.pending_restart = q.pending_restart;
        }
        s.database_system_identifier = self.controldata().map(|c| c.system_identifier.clone());
        s.tags = self.cfg.tags.clone();
        s.other.extend(self.published_fields());
        s.pause = self.ha.pause;
        s.cluster_unlocked = snap.view.leader.is_none();
        let sync = snap.view.sync.as_ref().map(|v| &v.value);
        s.sync_standby = sync.is_some_and(|v| {
            v.leader.as_deref() != Some(self.cfg.name.as_str()) && v.contains(&self.cfg.name)
        });
        let now = Instant::now();
        let ttl = std::time::Duration::from_millis(self.ha.ttl.0);
        let lease_deadline = self
            .leader_lease
            .filter(|_| {
                snap.view
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.name == self.cfg.name)
            })
            .map(|l| self.instant(self.ha.lease_deadline(l.sent_at, l.granted_ttl)))
            // A proof whose deadline passed is still reported to the core, but holds nothing.
            .filter(|d| *d > now);
        let lease_ttl = self
            .leader_lease
            .filter(|_| lease_deadline.is_some())
            .map(|l| std::time::Duration::from_millis(l.granted_ttl.0));
        if self.watch.is_live() {
            s.dcs_last_seen = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        } else {
            s.dcs_last_seen = self.api_tx.borrow().status.dcs_last_seen;
        }
        let loop_margin = if s.role == "primary" { ttl } else { ttl * 2 };
        let snapshot = ApiSnapshot {
            status: s,
            lease_deadline,
            handing_over: state == MemberState::Demoting,
            dcs_fresh_until: self.watch.is_live().then_some(now + ttl),
            loop_deadline: Some(
                now + std::time::Duration::from_millis(self.ha.loop_wait.0) + loop_margin,
            ),
            latest_end_lsn: sql
                .and_then(|q| q.wal_receiver.as_ref())
                .and_then(|r| r.latest_end_lsn),
            standby_cluster: false,
            maximum_lag_on_failover: self.ha.maximum_lag_on_failover,
            cluster: Some(Arc::new(snap.view.clone())),
            member_addrs: Vec::new(),
            metrics: self.api_metrics(sql, lease_ttl),
        };
        self.api_tx.send_replace(Arc::new(snapshot));
    }

    fn api_metrics(
        &self,
        sql: Option<&crate::postgres::observe::LocalPg>,
        lease_ttl: Option<std::time::Duration>,
    ) -> crate::api::metrics::AgentMetrics {
        let mut m = self.metrics.clone();
        m.lease_ttl = lease_ttl;
        m.archiver = sql.and_then(|q| q.archiver.clone());
        m.archive_dropped = self.wal_drops.as_ref().map(|d| d.count);
        m
    }

    /// Replaces the DCS view in the published REST snapshot with the latest one.
    pub(super) fn publish_view(&self) {
        let Some(snap) = self.watch.snapshot() else {
            return;
        };
        let mut next = ApiSnapshot::clone(&self.api_tx.borrow());
        next.cluster = Some(Arc::new(snap.view.clone()));
        if self.watch.is_live() {
            next.dcs_fresh_until =
                Some(Instant::now() + std::time::Duration::from_millis(self.ha.ttl.0));
        }
        self.api_tx.send_replace(Arc::new(next));
    }

    /// Asks the named members for their status, in parallel, each within the client's timeout.
    /// A member that does not answer is left out (the core treats it as unreachable).
    pub(super) async fn fetch_peers(&self, members: &[String]) -> PeerReport {
        let mut report = PeerReport {
            asked: members.iter().cloned().collect(),
            ..Default::default()
        };
        let (Some(client), Some(snap)) = (self.peer_client.clone(), self.watch.snapshot()) else {
            tracing::warn!(
                "cannot ask peers: no REST client (set ctl.cacert or restapi.cafile) or no DCS view"
            );
            return report;
        };
        let mut tasks = Vec::new();
        for m in members {
            let Some(url) = snap.view.members.get(m).map(|k| k.data.api_url.clone()) else {
                continue;
            };
            let client = client.clone();
            let name = m.clone();
            tasks.push(tokio::spawn(async move {
                let base = url.trim_end_matches("/patroni").to_owned();
                (name, client.status(&base).await)
            }));
        }
        for t in tasks {
            match t.await {
                Ok((name, Ok(st))) => {
                    let ps = peer_status(&st);
                    tracing::debug!(member = %name, wal_position = %ps.wal_position, primary = ps.primary, "peer status");
                    report.answers.insert(name, ps);
                }
                Ok((name, Err(e))) => {
                    tracing::info!(member = %name, error = %e, "peer did not answer")
                }
                Err(e) => tracing::warn!(error = %e, "peer query task failed"),
            }
        }
        report
    }
}

/// The leader race's view of a peer's status JSON.
fn peer_status(st: &MemberStatus) -> PeerStatus {
    let (primary, wal_position) = match &st.xlog {
        Some(Xlog::Primary { location }) => (true, *location),
        Some(Xlog::Replica {
            received_location,
            replayed_location,
            ..
        }) => (false, (*received_location).max(*replayed_location)),
        None => (st.role == "primary", Lsn(0)),
    };
    PeerStatus {
        running: st.state == "running",
        primary,
        wal_position,
        timeline: st.timeline,
        tags: st.tags.clone(),
        watchdog_failed: st.watchdog_failed,
    }
}
