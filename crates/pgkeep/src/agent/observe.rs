//! Turning what the node sees into the core's [`LocalObservation`]: PostgreSQL (process, SQL,
//! control file, timeline history), the DCS session, markers on disk.

use std::collections::BTreeSet;
use std::time::Duration;

use pgkeep_core::cluster::{HistoryEntry, Lsn, MemberData};
use pgkeep_core::ha::{
    DataDir, DcsSession, LocalObservation, PgObservation, PgProcess, ReplicationRow,
};

use super::Shell;
use crate::api::{PATRONI_COMPAT_VERSION, PGKEEP_VERSION};
use crate::postgres::observe::{self, LocalPg};
use crate::postgres::{ClusterState, ControlData};

/// File in the configuration directory: this node's data once belonged to the cluster.
pub(super) const JOINED_MARKER: &str = "pgkeep-joined";
/// File in the configuration directory, created by `pgkeep up`/`init` on the one node allowed to
/// run initdb for a new cluster.
pub(super) const BOOTSTRAP_MARKER: &str = "pgkeep-bootstrap-allowed";
/// File in the configuration directory while the data directory holds this node's own initdb
/// whose system identifier the cluster has not confirmed yet.
pub(super) const INITDB_MARKER: &str = "pgkeep-initdb-unconfirmed";
/// File in the configuration directory while a restore from the backup repository runs: a
/// data directory it leaves behind may be restored over.
pub(super) const RESTORE_MARKER: &str = "pgkeep-restore-in-progress";

impl Shell {
    /// One observation of PostgreSQL. SQL is used only while the postmaster says it accepts
    /// connections; otherwise the control file speaks.
    pub(super) async fn observe_pg(&mut self) -> PgObservation {
        let mut obs = PgObservation {
            sync_standby_names: self.sync_names.clone(),
            ..Default::default()
        };
        obs.data_dir = self.data_dir_state().await;
        let postmaster = self.instance.running_postmaster().ok().flatten();
        self.metrics.postmaster_start_time = postmaster.as_ref().map(|pm| pm.start_time);
        let Some(pm) = postmaster else {
            self.pg_client = None;
            self.postmaster_seen = None;
            self.last_sql = None;
            obs.process = PgProcess::Stopped;
            if let Some(cd) = &self.controldata {
                obs.in_recovery = matches!(
                    cd.state,
                    ClusterState::ShutDownInRecovery | ClusterState::InArchiveRecovery
                );
                obs.crashed = !cd.state.is_clean_shutdown();
                // A standby's checkpoint timeline lags behind a switch it replayed.
                obs.timeline = Some(cd.timeline.max(cd.min_recovery_end_timeline));
                // A cleanly stopped primary's WAL ends with its shutdown checkpoint record: one
                // byte into that record stands for it, so a record that starts exactly at a new
                // timeline's switch point (the end-of-recovery checkpoint of a crashed primary
                // that lost nothing) still counts as past it. pg_rewind must run then: PostgreSQL
                // refuses to follow a timeline that forked before its checkpoint.
                let own_record = u64::from(cd.state == ClusterState::ShutDown);
                obs.wal_position = Lsn(cd.checkpoint.0 + own_record).max(cd.min_recovery_end);
                obs.timeline_history = self.read_history(obs.timeline.unwrap_or(cd.timeline));
            }
            return obs;
        };
        let now = self.now();
        let started_at = match self.postmaster_seen {
            Some((pid, at)) if pid == pm.pid => at,
            _ => {
                self.postmaster_seen = Some((pm.pid, now));
                now
            }
        };
        obs.started_at = Some(started_at);
        obs.process = match pm.status.as_deref() {
            Some("ready" | "standby") => PgProcess::Running,
            Some("stopping") => PgProcess::Stopping,
            _ => PgProcess::Starting,
        };
        if obs.process == PgProcess::Running {
            match self.query_pg().await {
                Some(mut sql) => {
                    if sql.in_recovery {
                        sql.timeline = self.standby_timeline(pm.pid, sql.timeline);
                    }
                    obs.in_recovery = sql.in_recovery;
                    obs.timeline = Some(sql.timeline);
                    obs.wal_position = if sql.in_recovery {
                        sql.receive_lsn
                            .unwrap_or_default()
                            .max(sql.replay_lsn.unwrap_or_default())
                    } else {
                        sql.flush_lsn.unwrap_or_default()
                    };
                    obs.replay_lsn = sql.replay_lsn;
                    obs.streaming = sql
                        .wal_receiver
                        .as_ref()
                        .is_some_and(|r| r.status == "streaming");
                    obs.replication = sql
                        .replication
                        .iter()
                        .map(|w| ReplicationRow {
                            application_name: w.application_name.clone(),
                            streaming: w.state == "streaming",
                            flush_lsn: w.flush_lsn.unwrap_or_default(),
                            sync: matches!(w.sync_state.as_str(), "sync" | "quorum"),
                        })
                        .collect();
                    obs.slots = sql
                        .slots
                        .iter()
                        .map(|s| s.name.clone())
                        .collect::<BTreeSet<_>>();
                    obs.logical_slots = sql
                        .logical_slots
                        .iter()
                        .map(|s| {
                            let state = pgkeep_core::ha::LogicalSlotState {
                                database: s.database.clone(),
                                plugin: s.plugin.clone(),
                                confirmed_flush: s.confirmed_flush.unwrap_or_default(),
                            };
                            (s.name.clone(), state)
                        })
                        .collect();
                    obs.timeline_history = self.read_history(sql.timeline);
                    if self.promote_requested && sql.in_recovery {
                        obs.process = PgProcess::Promoting;
                    } else if !sql.in_recovery {
                        if self.promote_requested {
                            self.checkpoint_after_promote(sql.timeline);
                        }
                        self.promote_requested = false;
                    }
                    self.note_archiver(sql.archiver.as_ref());
                    if let Some(d) = &mut self.wal_drops {
                        d.poll();
                    }
                    self.last_sql = Some(sql);
                }
                // Accepting connections per the pid file but not answering (or too slowly): a
                // server whose role the disk tells, as while it starts.
                None => {
                    obs.process = PgProcess::Starting;
                    obs.in_recovery = in_recovery_on_disk(
                        self.controldata.as_ref(),
                        self.layout.data_dir.join("standby.signal").exists(),
                    );
                }
            }
        } else {
            // Starting or stopping: the role PostgreSQL comes up in is the disk's.
            obs.in_recovery = in_recovery_on_disk(
                self.controldata.as_ref(),
                self.layout.data_dir.join("standby.signal").exists(),
            );
            obs.timeline = self.controldata.as_ref().map(|cd| cd.timeline);
        }
        if self.promote_requested && obs.process != PgProcess::Running {
            obs.process = PgProcess::Promoting;
        }
        obs.upstream = if obs.in_recovery {
            self.upstream.clone()
        } else {
            None
        };
        obs
    }

    async fn query_pg(&mut self) -> Option<LocalPg> {
        let timeout = Duration::from_secs(3);
        if self.pg_client.as_ref().is_none_or(|c| c.is_closed()) {
            let user = self
                .cfg
                .postgresql
                .authentication
                .superuser
                .username
                .clone();
            match observe::connect_local(
                self.layout.socket_dir(),
                self.layout.node.port,
                &user,
                timeout,
            )
            .await
            {
                Ok(c) => self.pg_client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot connect to the local postgres yet");
                    return None;
                }
            }
        }
        let client = self.pg_client.as_ref()?;
        match tokio::time::timeout(timeout, observe::observe(client)).await {
            Ok(Ok(sql)) => Some(sql),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "observing the local postgres failed");
                self.pg_client = None;
                None
            }
            Err(_) => {
                tracing::warn!("observing the local postgres timed out");
                self.pg_client = None;
                None
            }
        }
    }

    async fn data_dir_state(&mut self) -> DataDir {
        match self.instance.data_dir_is_empty() {
            Ok(true) => {
                self.controldata = None;
                return DataDir::Empty;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the data directory");
                return DataDir::Invalid;
            }
        }
        if !self.instance.is_initialised() {
            self.controldata = None;
            return DataDir::Invalid;
        }
        // pg_control is rewritten whenever its content changes; an unchanged file (same
        // modification time and inode) needs no new pg_controldata run. That run costs
        // milliseconds on every observation, which a switchover's hand-over repeats.
        let stamp = std::fs::metadata(self.layout.data_dir.join("global/pg_control"))
            .ok()
            .and_then(|m| {
                use std::os::unix::fs::MetadataExt;
                m.modified().ok().map(|t| (t, m.ino(), m.len()))
            });
        if let (Some(stamp), Some((seen, cd))) = (stamp, &self.controldata_stamp)
            && stamp == *seen
        {
            let cd = cd.clone();
            let system_id = cd.system_identifier.clone();
            self.controldata = Some(cd);
            return DataDir::Initialised { system_id };
        }
        match self.instance.controldata().await {
            Ok(cd) => {
                let system_id = cd.system_identifier.clone();
                // File timestamps are coarse (a few ms): cache only a file that had been stable
                // for a while, so a later rewrite cannot carry the same time.
                let settled = stamp.is_some_and(|(t, _, _)| {
                    t.elapsed()
                        .is_ok_and(|age| age > std::time::Duration::from_millis(50))
                });
                self.controldata_stamp = stamp.filter(|_| settled).map(|s| (s, cd.clone()));
                self.controldata = Some(cd);
                DataDir::Initialised { system_id }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pg_controldata failed");
                self.controldata = None;
                DataDir::Invalid
            }
        }
    }

    /// The highest timeline this standby's postmaster was seen on: the receiver's timeline is
    /// only visible while it streams, and the checkpoint's lags behind a switch.
    fn standby_timeline(&mut self, postmaster: i32, observed: u32) -> u32 {
        let tl = match self.standby_tli_seen {
            Some((pid, seen)) if pid == postmaster => seen.max(observed),
            _ => observed,
        };
        self.standby_tli_seen = Some((postmaster, tl));
        tl
    }

    /// The history file of `timeline`, oldest switch first (empty on timeline 1).
    fn read_history(&self, timeline: u32) -> Vec<HistoryEntry> {
        if timeline <= 1 {
            return Vec::new();
        }
        let path = self
            .layout
            .data_dir
            .join("pg_wal")
            .join(format!("{timeline:08X}.history"));
        std::fs::read_to_string(&path)
            .map(|t| parse_history(&t))
            .unwrap_or_default()
    }

    /// The full observation for one decision, around the observation of PostgreSQL.
    pub(super) fn observation(&mut self, pg: PgObservation) -> LocalObservation {
        let snapshot = self.watch.snapshot();
        let dcs = DcsSession {
            reachable: self.watch.is_live(),
            view_revision: snapshot.as_ref().map_or(0, |s| s.revision),
            deleted_leader: snapshot
                .as_ref()
                .and_then(|s| s.deleted_leader.as_ref())
                .map(|d| pgkeep_core::ha::DeletedLeader {
                    name: d.key.name.clone(),
                    mod_revision: d.key.mod_revision,
                    put_seen_at: d.put_seen_at.map(|t| self.millis(t)),
                }),
            lease_revoked: self.lease_revoked,
            leader_lease: self.leader_lease,
            initialize_claimed: self.initialize_claimed,
        };
        LocalObservation {
            name: self.cfg.name.clone(),
            tags: self.cfg.tags.clone(),
            member_template: self.member_template(),
            wall_clock_ms: wall_clock_ms(),
            pg,
            dcs,
            peers: self.peers.take(),
            busy: self.busy.as_ref().map(|b| b.op),
            rewind_failed: self.rewind_failed,
            ever_joined: self.marker(JOINED_MARKER),
            initdb_unconfirmed: self.marker(INITDB_MARKER),
            bootstrap_allowed: self.marker(BOOTSTRAP_MARKER),
            watchdog_failed: self.watchdog.failed(),
            backup_repository: self
                .cfg
                .pgbackrest
                .as_ref()
                .is_some_and(|p| p.replica_without_leader),
            // Only a directory pgBackRest was restoring into (its manifest is written first).
            restore_interrupted: self.marker(RESTORE_MARKER)
                && self.layout.data_dir.join("backup.manifest").exists(),
            requests: self.requests.clone(),
            memory: self.memory.clone(),
        }
    }

    pub(super) fn marker(&self, name: &str) -> bool {
        self.layout.config_dir.join(name).exists()
    }

    fn member_template(&self) -> MemberData {
        MemberData {
            conn_url: format!(
                "postgres://{}/postgres",
                self.cfg.postgresql.connect_address
            ),
            api_url: format!(
                "{}://{}/patroni",
                if self.cfg.restapi.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                self.cfg.restapi.connect_address
            ),
            version: PATRONI_COMPAT_VERSION.into(),
            pgkeep_version: Some(PGKEEP_VERSION.into()),
            tags: self.cfg.tags.clone(),
            checkpoint_after_promote: self
                .promote_checkpoint
                .as_ref()
                .map(|done| done.load(std::sync::atomic::Ordering::SeqCst)),
            other: self.published_fields(),
            ..Default::default()
        }
    }

    /// pgkeep's own fields of the member key and the status JSON: the insecure overrides in
    /// force and, on a primary, its archiving health.
    pub(super) fn published_fields(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        use crate::api::archive::{ARCHIVE_FIELD, ArchiveHealth};
        let mut out = insecure_field(&self.cfg.insecure);
        let health = self
            .last_sql
            .as_ref()
            .and_then(|q| q.archiver.as_ref())
            .and_then(ArchiveHealth::from_stats)
            .map(|h| match &self.wal_drops {
                Some(d) => h.with_drops(d.count, d.last.as_ref()),
                None => h,
            })
            .and_then(|h| serde_json::to_value(h).ok());
        if let Some(h) = health {
            out.insert(ARCHIVE_FIELD.to_owned(), h);
        }
        out
    }

    /// Logs a change of archiving health (see [`crate::api::archive::event`]).
    fn note_archiver(&self, now: Option<&crate::api::metrics::ArchiverStats>) {
        use crate::api::archive::{ArchiveEvent, event};
        let Some(now) = now else { return };
        let prev = self.last_sql.as_ref().and_then(|q| q.archiver.as_ref());
        match event(prev, now) {
            Some(ArchiveEvent::Failed { wal, failures }) => tracing::warn!(
                wal = %wal,
                failures,
                "WAL archiving is failing: {wal} could not be archived ({failures} failures \
                 since the statistics were reset); WAL accumulates in pg_wal until it succeeds; \
                 see the archive command's log (pgBackRest: its log-path)"
            ),
            Some(ArchiveEvent::Recovered { wal }) => {
                tracing::info!(wal = %wal, "WAL archiving works again: {wal} archived");
            }
            None => {}
        }
    }

    /// After a promotion, a `CHECKPOINT` in the background (Patroni does the same): pg_rewind
    /// reads the source's timeline from its control file, which names the new timeline only
    /// after the first checkpoint on it. Until it is done the member key says
    /// `checkpoint_after_promote: false` and nodes wait before rewinding from this one.
    ///
    /// With pgBackRest, the previous timeline's segments still in `pg_wal` are queued for the
    /// archiver before that checkpoint (see [`super::archive_gap`]).
    fn checkpoint_after_promote(&mut self, timeline: u32) {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gap = self.cfg.pgbackrest.clone().map(|_| self.instance.clone());
        self.promote_checkpoint = Some(done.clone());
        let socket = self.layout.socket_dir().to_owned();
        let port = self.layout.node.port;
        let user = self
            .cfg
            .postgresql
            .authentication
            .superuser
            .username
            .clone();
        tokio::spawn(async move {
            let result = async {
                let c = crate::postgres::observe::connect_local(
                    &socket,
                    port,
                    &user,
                    std::time::Duration::from_secs(10),
                )
                .await?;
                let aside = match &gap {
                    Some(instance) => {
                        let seg: i64 = c
                            .query_one(
                                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
                                &[],
                            )
                            .await
                            .map_err(|e| anyhow::anyhow!("wal_segment_size: {e}"))?
                            .get(0);
                        let seg = u64::try_from(seg).unwrap_or(16 << 20);
                        match super::archive_gap::mark_ready(&instance.data_dir, timeline, seg) {
                            Ok(marked) => Some(marked),
                            Err(e) => {
                                tracing::warn!(error = format!("{e:#}"), "cannot queue the previous timeline's WAL for the archive");
                                None
                            }
                        }
                    }
                    None => None,
                };
                c.batch_execute("CHECKPOINT")
                    .await
                    .map_err(|e| anyhow::anyhow!("CHECKPOINT: {e}"))?;
                Ok::<_, anyhow::Error>(aside)
            }
            .await;
            match result {
                Ok(aside) => {
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!("checkpoint after promotion done");
                    if let Some(marked) = aside {
                        tracing::info!(
                            segments = marked.len(),
                            first = marked.first().map(String::as_str).unwrap_or("-"),
                            last = marked.last().map(String::as_str).unwrap_or("-"),
                            "previous timeline's WAL queued for the archive (segments the old primary may not have pushed)"
                        );
                    }
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "checkpoint after promotion failed"
                ),
            }
        });
    }

    /// The last SQL observation, for the status JSON.
    pub(super) fn last_sql(&self) -> Option<&LocalPg> {
        self.last_sql.as_ref()
    }

    /// The control file as last read.
    pub(super) fn controldata(&self) -> Option<&ControlData> {
        self.controldata.as_ref()
    }
}

/// Whether a running postmaster that SQL cannot tell about (starting, stopping, or not answering
/// within the observation's timeout) is, or comes up as, a standby, from the disk: a standby's
/// control file says "in archive recovery" (or "shut down in recovery"), and `standby.signal`
/// makes any start a standby. Taking "not in recovery" for granted made a slow replica look like
/// a primary that may commit, which is fenced when another node leads (and, in strict
/// synchronous mode, stalls the primary).
pub(super) fn in_recovery_on_disk(cd: Option<&ControlData>, standby_signal: bool) -> bool {
    standby_signal
        || cd.is_some_and(|cd| {
            matches!(
                cd.state,
                ClusterState::ShutDownInRecovery | ClusterState::InArchiveRecovery
            )
        })
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses a PostgreSQL `<TL>.history` file: `parentTLI <tab> switchpoint <tab> reason`.
pub(super) fn parse_history(text: &str) -> Vec<HistoryEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split('\t');
            let tl = f.next()?.trim().parse().ok()?;
            let lsn: Lsn = f.next()?.trim().parse().ok()?;
            let reason = f.next().unwrap_or("").trim().to_owned();
            Some(HistoryEntry {
                parent_timeline: tl,
                switch_lsn: lsn,
                reason,
                timestamp: None,
                new_leader: None,
            })
        })
        .collect()
}

/// `pgkeep_insecure`: the `insecure:` overrides in force, published in the member key and the
/// status JSON so `ctl list` and monitoring show them (empty: nothing published).
pub(super) fn insecure_field(
    insecure: &crate::config::Insecure,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let active = insecure.active();
    let mut out = std::collections::BTreeMap::new();
    if !active.is_empty() {
        out.insert(INSECURE_FIELD.to_owned(), serde_json::Value::from(active));
    }
    out
}

/// The member-key and status field listing the insecure overrides.
pub(super) const INSECURE_FIELD: &str = "pgkeep_insecure";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_overrides_are_published_by_name() {
        assert!(insecure_field(&crate::config::Insecure::default()).is_empty());
        let f = insecure_field(&crate::config::Insecure {
            plaintext_etcd: true,
            ..Default::default()
        });
        assert_eq!(
            f[INSECURE_FIELD],
            serde_json::json!(["pgkeep.insecure.plaintext_etcd"])
        );
    }

    #[test]
    fn history_file_parses() {
        let h = parse_history("1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tx\n");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].parent_timeline, 1);
        assert_eq!(h[1].switch_lsn, Lsn(0x500_0000));
    }

    fn control(state: ClusterState) -> ControlData {
        ControlData {
            system_identifier: "7300000000000000001".into(),
            state,
            checkpoint: Lsn(0x300_0000),
            redo: Lsn(0x300_0000),
            timeline: 3,
            min_recovery_end: Lsn(0),
            min_recovery_end_timeline: 0,
            data_checksum_version: 0,
            wal_log_hints: true,
        }
    }

    /// Bug F: a running replica whose SQL observation failed or timed out counted as a
    /// starting *primary* (`in_recovery` false): `may_commit()`, so it was fenced as soon as
    /// another node held the key. The disk tells the role.
    #[test]
    fn a_replica_that_does_not_answer_sql_is_still_a_replica() {
        let unanswered = |cd: Option<ControlData>, signal: bool| PgObservation {
            process: PgProcess::Starting,
            in_recovery: in_recovery_on_disk(cd.as_ref(), signal),
            ..PgObservation::default()
        };
        for (cd, signal) in [
            (Some(control(ClusterState::InArchiveRecovery)), true),
            (Some(control(ClusterState::InArchiveRecovery)), false),
            (Some(control(ClusterState::ShutDownInRecovery)), false),
            // A crashed primary being started as a standby.
            (Some(control(ClusterState::InProduction)), true),
            (None, true),
        ] {
            let obs = unanswered(cd.clone(), signal);
            assert!(obs.in_recovery && !obs.may_commit(), "{cd:?} {signal}");
        }
        assert!(unanswered(Some(control(ClusterState::InProduction)), false).may_commit());
        assert!(unanswered(None, false).may_commit());
    }
}

/// The segments pgBackRest dropped from the archive queue (see [`crate::pgbackrest::drops`]),
/// counted since the agent started; each new drop is logged.
#[derive(Debug)]
pub(super) struct WalDrops {
    watch: crate::pgbackrest::drops::DropWatch,
    pub(super) count: u64,
    pub(super) last: Option<crate::pgbackrest::drops::Dropped>,
}

impl WalDrops {
    pub(super) fn start(p: &crate::config::PgBackRest) -> WalDrops {
        use crate::pgbackrest::drops::{DropWatch, async_log};
        let (watch, earlier) = DropWatch::start(async_log(&p.config_path, &p.stanza));
        if let Some(last) = earlier.last() {
            tracing::warn!(
                dropped = earlier.len(),
                wal = %last.wal,
                "pgBackRest's log shows {} WAL segments dropped from the archive queue before \
                 this agent started, the last {} at {}: a point-in-time recovery cannot cross \
                 them; unless a full backup was taken since, take one",
                earlier.len(),
                last.wal,
                last.at
            );
        }
        WalDrops {
            watch,
            count: 0,
            last: None,
        }
    }

    fn poll(&mut self) {
        let new = self.watch.poll();
        let (Some(first), Some(last)) = (new.first(), new.last()) else {
            return;
        };
        self.count += new.len() as u64;
        tracing::error!(
            dropped = new.len(),
            first = %first.wal,
            last = %last.wal,
            "pgBackRest dropped WAL from the archive queue (the repository was unreachable and \
             the queue reached archive-push-queue-max): {}..{} are not in the archive although \
             PostgreSQL counts them as archived; a point-in-time recovery cannot cross them; \
             take a full backup once archiving works",
            first.wal,
            last.wal
        );
        self.last = Some(last.clone());
    }
}
