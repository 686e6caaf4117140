//! Carrying out the core's actions. Each action either completes, fails (logged; the next
//! decision re-plans), or starts a long operation in the background (initdb, clone, rewind) that
//! the next observations report as busy.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use pgkeep_core::ha::{Action, LeaderLease, Millis, StartRole};
use pgkeep_core::pgconf::conninfo_quote;

use super::Shell;
use super::render::{self, StandbyOf};
use crate::dcs::{Cas, Dcs, Expect};
use crate::postgres::StopMode;
use crate::postgres::fence::{FenceGrace, fence_blocking};

/// What an action did to the decision loop.
pub(super) enum Outcome {
    /// Go on with the next action.
    Continue,
    /// Stop executing this decision (a DCS action failed, or peers were fetched and the core
    /// must decide again).
    Replan,
}

impl Shell {
    pub(super) async fn execute(&mut self, action: &Action) -> Outcome {
        let name = action_name(action);
        // A lost lease is replaced before the next etcd call, never before a fence.
        if action.is_dcs()
            && let Err(e) = self.regrant_lost_lease().await
        {
            tracing::warn!(action = name, error = format!("{e:#}"), "action failed");
            return Outcome::Replan;
        }
        // While this node may hold the lease, no DCS call may run past the lease deadline: the
        // next decision must be able to fence in time, whatever etcd does.
        let bounded = action.is_dcs() || matches!(action, Action::Checkpoint);
        let budget = super::lease::action_budget(&self.ha, self.now(), self.leader_lease, bounded)
            .map(|b| Duration::from_millis(b.0));
        let result = match budget {
            Some(b) => tokio::time::timeout(b, self.execute_inner(action))
                .await
                .unwrap_or_else(|_| Err(anyhow!("the lease deadline arrived during {name}"))),
            None => self.execute_inner(action).await,
        };
        match result {
            Ok(o) => o,
            Err(e) => {
                if matches!(action, Action::Fence) {
                    self.fence_failed = true;
                }
                if super::lease::lease_not_found(&e) {
                    // The lease is gone and the leader key with it: the core is told (it fences
                    // at once) and a new lease comes before the next etcd call, instead of the
                    // dead lease being retried until the deadline.
                    tracing::warn!(action = name, error = format!("{e:#}"), "action failed");
                    self.lease_lost();
                    return Outcome::Replan;
                }
                tracing::warn!(action = name, error = format!("{e:#}"), "action failed");
                if action.is_dcs() {
                    Outcome::Replan
                } else {
                    Outcome::Continue
                }
            }
        }
    }

    async fn execute_inner(&mut self, action: &Action) -> Result<Outcome> {
        let me = self.cfg.name.clone();
        match action {
            Action::Fence => self.fence().await?,
            Action::AcquireLeaderKey => {
                let reply = self.keepalive().await?;
                let rev = self.dcs.acquire_leader(&me, self.lease.id).await?;
                self.leader_lease = rev.map(|revision| LeaderLease {
                    sent_at: self.millis(reply.sent_at),
                    granted_ttl: Millis::from_secs(u64::try_from(reply.granted_ttl).unwrap_or(0)),
                    revision,
                });
                if rev.is_none() {
                    return Ok(Outcome::Replan);
                }
                self.renewed = true;
                self.arm_guard_for_proof();
                tracing::info!("acquired the leader key");
                // Decide again as soon as the watch shows our key (usually a few ms): the core
                // promotes only from a view containing our create, and waiting for the next
                // cycle would add its pause to a switchover's write outage.
                if let Some(rev) = rev {
                    let shown = self
                        .watch
                        .wait_for(Duration::from_millis(250), |s| s.revision >= rev)
                        .await;
                    if shown.is_ok() {
                        return Ok(Outcome::Replan);
                    }
                }
            }
            Action::RenewLeaderKey => {
                let reply = self.keepalive().await?;
                match self.dcs.renew_leader(&me, self.lease.id).await? {
                    Some(revision) => {
                        self.renewed = true;
                        self.leader_lease = Some(LeaderLease {
                            sent_at: self.millis(reply.sent_at),
                            granted_ttl: Millis::from_secs(
                                u64::try_from(reply.granted_ttl).unwrap_or(0),
                            ),
                            revision,
                        });
                        self.arm_guard_for_proof();
                    }
                    None => {
                        self.leader_lease = None;
                        tracing::warn!("the leader key no longer names this member");
                        return Ok(Outcome::Replan);
                    }
                }
            }
            Action::ReleaseLeaderKey => {
                self.dcs.release_leader(&me).await?;
                self.leader_lease = None;
                tracing::info!("released the leader key");
            }
            Action::Promote => {
                // A failed pre_promote gave the key back: nothing is promoted.
                if !self.pre_promote().await {
                    return Ok(Outcome::Replan);
                }
                self.before_writable("promoting")?;
                // Over the open connection when there is one: no process to spawn, so the
                // write outage of a switchover is shorter. pg_ctl otherwise.
                if let Some(c) = self.pg_client.as_ref()
                    && c.query_one("SELECT pg_promote(wait => false)", &[])
                        .await
                        .is_ok_and(|r| r.get::<_, bool>(0))
                {
                    self.promote_requested = true;
                    tracing::info!("promotion requested");
                    self.cb_promoted();
                    return Ok(Outcome::Continue);
                }
                let args: Vec<OsString> = vec![
                    "promote".into(),
                    "-D".into(),
                    self.layout.data_dir.clone().into(),
                    "-W".into(),
                ];
                self.instance
                    .runner
                    .run("pg_ctl", &args, &[], Duration::from_secs(30))
                    .await?;
                self.promote_requested = true;
                tracing::info!("promotion requested");
                self.cb_promoted();
            }
            Action::Checkpoint => {
                let client = self
                    .pg_client
                    .as_ref()
                    .ok_or_else(|| anyhow!("no connection to the local postgres"))?;
                // Bounded: a slow checkpoint only delays the hand-over, the stop still comes.
                let t = std::time::Instant::now();
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    client.batch_execute("CHECKPOINT"),
                )
                .await
                {
                    Ok(r) => r.context("CHECKPOINT")?,
                    Err(_) => tracing::warn!(
                        "CHECKPOINT before the switchover took over 30 s; stopping anyway"
                    ),
                }
                tracing::info!(
                    elapsed_ms = t.elapsed().as_millis(),
                    "checkpoint before the switchover"
                );
            }
            Action::Stop { mode } => {
                let mode = match mode {
                    pgkeep_core::ha::StopMode::Fast => StopMode::Fast,
                    pgkeep_core::ha::StopMode::Immediate => StopMode::Immediate,
                };
                self.stop_pg(mode).await?;
                // A stop ends its plan; deciding again at once (a switchover's confirmation and
                // release) instead of after the next pause keeps the write outage short.
                return Ok(Outcome::Replan);
            }
            Action::Start { role } => {
                if matches!(role, StartRole::Replica { .. }) && self.crashed_primary() {
                    self.crash_recovery().await?;
                    // Decide again on the true end of the local WAL.
                    return Ok(Outcome::Replan);
                }
                self.start_pg(role).await?
            }
            Action::Restart => {
                let role = if self.last_sql().is_some_and(|s| !s.in_recovery) {
                    StartRole::Primary
                } else {
                    StartRole::Replica {
                        upstream: self.upstream.clone(),
                    }
                };
                // before_stop, stop, start, on_restart.
                self.restart_pg(&role).await?;
            }
            Action::Follow { upstream } => {
                self.set_upstream(upstream);
                self.render(true)?;
                self.reload_pg()?;
                tracing::info!(upstream = ?upstream, "following");
            }
            Action::Rewind { source } => self.start_rewind(source)?,
            Action::Clone { source, wipe } => self.start_clone(Some(source), *wipe)?,
            Action::RestoreReplica { wipe } => self.start_clone(None, *wipe)?,
            Action::Initdb => self.start_initdb()?,
            Action::ClaimInitialize => {
                self.initialize_claimed = self.dcs.race_initialize(self.lease.id).await?;
                if !self.initialize_claimed {
                    return Ok(Outcome::Replan);
                }
                tracing::info!("won the bootstrap race");
            }
            Action::ConfirmInitialize { system_id } => {
                let confirmed = self
                    .dcs
                    .confirm_initialize(system_id, self.lease.id)
                    .await?;
                self.initialize_claimed = false;
                if !confirmed {
                    tracing::error!(
                        "the bootstrap claim expired before initdb finished; this data directory is not the cluster's"
                    );
                    return Ok(Outcome::Replan);
                }
                tracing::info!(%system_id, "new cluster initialised");
                // The cluster's dynamic configuration starts as this node's bootstrap.dcs (already
                // checked by the policy when the file was loaded), as with Patroni.
                if let Cas::Conflict = self
                    .dcs
                    .put_config(&self.cfg.bootstrap.dcs, Expect::Absent)
                    .await?
                {
                    tracing::info!("the dynamic configuration already exists; keeping it");
                }
            }
            Action::WriteInitialize {
                system_id,
                create_only,
            } => {
                self.dcs.set_initialize(system_id, *create_only).await?;
                self.initialize_claimed = false;
            }
            Action::PersistJoined => {
                let path = self.layout.config_dir.join(super::observe::JOINED_MARKER);
                crate::fsutil::write_atomic(&path, b"", 0o600)
                    .with_context(|| format!("writing {}", path.display()))?;
                let _ = std::fs::remove_file(
                    self.layout
                        .config_dir
                        .join(super::observe::BOOTSTRAP_MARKER),
                );
                let _ = std::fs::remove_file(
                    self.layout.config_dir.join(super::observe::INITDB_MARKER),
                );
            }
            Action::PublishMember(data) => self.dcs.put_member(&me, data, self.lease.id).await?,
            Action::SetSyncStandbyNames(names) => {
                self.sync_names = names.clone();
                self.render(self.last_sql().is_some_and(|s| s.in_recovery))?;
                self.reload_pg()?;
            }
            Action::WriteSync {
                state,
                expected_revision,
            } => {
                let expect = expected_revision.map_or(Expect::Absent, Expect::ModRevision);
                if let Cas::Conflict = self.dcs.put_sync(state, expect).await? {
                    return Ok(Outcome::Replan);
                }
            }
            Action::DeleteSync { expected_revision } => {
                if let Cas::Conflict = self
                    .dcs
                    .delete_sync(Expect::ModRevision(*expected_revision))
                    .await?
                {
                    return Ok(Outcome::Replan);
                }
            }
            Action::WriteHistory(h) => self.dcs.put_history(h).await?,
            Action::WriteStatus(s) => self.dcs.put_status(s).await?,
            Action::ClearFailover { expected_revision } => {
                let empty = pgkeep_core::cluster::FailoverRequest::default();
                if let Cas::Conflict = self
                    .dcs
                    .put_failover(&empty, Expect::ModRevision(*expected_revision))
                    .await?
                {
                    return Ok(Outcome::Replan);
                }
            }
            Action::CreateSlots(names) => self.slots(names, true).await?,
            Action::DropSlots(names) => self.slots(names, false).await?,
            Action::CreateLogicalSlot {
                name,
                database,
                plugin,
            } => self.create_logical_slot(name, database, plugin).await?,
            Action::CopyLogicalSlots { from, names } => {
                self.copy_logical_slots(from, names).await?
            }
            Action::AdvanceSlots(advances) => self.advance_slots(advances).await?,
            Action::FetchPeerStatus { members } => {
                self.peers = Some(self.fetch_peers(members).await);
                return Ok(Outcome::Replan);
            }
        }
        Ok(Outcome::Continue)
    }

    /// Stops a PostgreSQL that may not lead: fast shutdown, escalating to immediate shutdown
    /// and SIGKILL of every process of the instance ([`crate::postgres::fence`]). Read-only is
    /// not enough.
    async fn fence(&mut self) -> Result<()> {
        tracing::warn!("fencing: stopping PostgreSQL");
        let instance = self.instance.clone();
        let outcome =
            tokio::task::spawn_blocking(move || fence_blocking(&instance, FenceGrace::default()))
                .await
                .context("the fencing task")??;
        tracing::warn!(?outcome, "fenced");
        self.pg_client = None;
        self.promote_requested = false;
        if outcome != crate::postgres::fence::FenceOutcome::NotRunning {
            self.cb_stopped();
        }
        Ok(())
    }

    pub(super) async fn stop_pg(&mut self, mode: StopMode) -> Result<()> {
        let timeout = Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout);
        self.before_stop().await;
        let stopped = self.instance.stop(mode, timeout).await?;
        self.pg_client = None;
        if stopped {
            self.cb_stopped();
        }
        Ok(())
    }

    /// The data directory is a primary's that stopped without a shutdown checkpoint. A fresh
    /// base backup (or a rewound directory) also says "in production" in its control file, but
    /// carries a `backup_label` that makes PostgreSQL recover from the backup's start: those
    /// are not crashed primaries.
    fn crashed_primary(&self) -> bool {
        self.controldata
            .as_ref()
            .is_some_and(|cd| cd.state == crate::postgres::ClusterState::InProduction)
            && !self.layout.data_dir.join("backup_label").exists()
            && self.instance.running_postmaster().ok().flatten().is_none()
    }

    /// Crash recovery in single-user mode, ending with a shutdown checkpoint. A crashed former
    /// primary must not start as a standby before the end of its WAL is known: standby
    /// recovery would first replay its local WAL, including records past the new timeline's
    /// switch point (for example a commit the new primary never received), and pg_rewind,
    /// which only looks at the control file, could then find nothing to rewind. After this the
    /// last checkpoint is at the end of the local WAL, so the divergence check and pg_rewind see
    /// every local record.
    async fn crash_recovery(&mut self) -> Result<()> {
        tracing::info!("crash recovery in single-user mode before starting as a standby");
        render::set_standby_signal(&self.layout, false)?;
        self.render(false)?;
        let args: Vec<OsString> = vec![
            "--single".into(),
            "-D".into(),
            self.layout.config_dir.clone().into(),
            // Nothing may leave this node while its history is unknown.
            "-c".into(),
            "archive_mode=off".into(),
            "postgres".into(),
        ];
        self.instance
            .runner
            .run("postgres", &args, &[], Duration::from_secs(3600))
            .await
            .context("single-user crash recovery")?;
        tracing::info!("crash recovery finished");
        Ok(())
    }

    pub(super) async fn start_pg(&mut self, role: &StartRole) -> Result<()> {
        let standby = match role {
            StartRole::Primary => false,
            StartRole::Replica { upstream } => {
                self.set_upstream(upstream);
                true
            }
        };
        self.render(standby)?;
        render::set_standby_signal(&self.layout, standby)?;
        std::fs::create_dir_all(self.layout.socket_dir())
            .with_context(|| format!("creating {}", self.layout.socket_dir().display()))?;
        let timeout = Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout);
        if !standby {
            self.before_writable("starting a primary")?;
        }
        let pm = self.instance.start(timeout).await?;
        tracing::info!(pid = pm.pid, standby, "PostgreSQL started");
        self.cb_started(standby);
        if !standby && self.fresh_bootstrap {
            self.create_roles().await?;
            self.fresh_bootstrap = false;
        }
        Ok(())
    }

    /// Renders the configuration files for the given role and the current upstream.
    pub(super) fn render(&self, standby: bool) -> Result<()> {
        let standby_of = if standby {
            self.upstream.as_deref().and_then(|u| self.standby_of(u))
        } else {
            None
        };
        render::write_files(
            &self.cfg,
            &self.layout,
            &self.dynamic_params,
            standby_of.as_ref(),
            &self.sync_names,
        )
    }

    /// Records the upstream PostgreSQL is about to be configured for, and whether its member key
    /// lacks the address to render (then `render_pending_upstream` tries again every cycle).
    fn set_upstream(&mut self, upstream: &Option<String>) {
        self.upstream = upstream.clone();
        self.upstream_unrendered = upstream.as_deref().is_some_and(|m| {
            let missing = self.standby_of(m).is_none();
            if missing {
                tracing::warn!(
                    upstream = m,
                    "the upstream's member key has no address yet; following it once it has"
                );
            }
            missing
        });
    }

    /// Renders and reloads the standby configuration once the upstream that had no address
    /// when PostgreSQL was configured has one (else the replica would wait for WAL forever
    /// without a `primary_conninfo`, while the core believes it follows).
    pub(super) fn render_pending_upstream(&mut self) {
        if !self.upstream_unrendered {
            return;
        }
        // Never a primary: a node promoted meanwhile keeps its configuration.
        let primary = self.last_sql().is_some_and(|s| !s.in_recovery);
        let Some(m) = self.upstream.clone().filter(|_| !primary) else {
            self.upstream_unrendered = false;
            return;
        };
        if self.standby_of(&m).is_none() {
            return;
        }
        self.upstream_unrendered = false;
        match self.render(true).and_then(|()| self.reload_pg()) {
            Ok(()) => tracing::info!(upstream = %m, "following, now that its address is known"),
            Err(e) => {
                self.upstream_unrendered = true;
                tracing::warn!(
                    error = format!("{e:#}"),
                    "rendering the standby configuration failed"
                );
            }
        }
    }

    fn standby_of(&self, member: &str) -> Option<StandbyOf> {
        let snap = self.watch.snapshot()?;
        let (host, port) = snap.view.members.get(member)?.data.conn_host_port()?;
        let slot = self
            .ha
            .use_slots
            .then(|| pgkeep_core::ha::slot_name(&self.cfg.name));
        Some(StandbyOf { host, port, slot })
    }

    pub(super) fn reload_pg(&self) -> Result<()> {
        if let Some(pm) = self.instance.running_postmaster()? {
            signal::kill(Pid::from_raw(pm.pid), Signal::SIGHUP)
                .context("signalling the postmaster to reload")?;
            self.cb_reloaded();
        }
        Ok(())
    }

    /// The conninfo a tool uses to reach `member` as `role` (replication or rewind), by name and
    /// with this node's client certificate. The application name is `pgkeep-<tool>-<member>`:
    /// never the member's own name, which `synchronous_standby_names` and operators reserve for
    /// the member's streaming replication.
    pub(super) fn tool_conninfo(&self, member: &str, rewind: bool) -> Result<String> {
        let snap = self
            .watch
            .snapshot()
            .ok_or_else(|| anyhow!("no DCS view"))?;
        let m = snap
            .view
            .members
            .get(member)
            .ok_or_else(|| anyhow!("member {member} is not in the DCS"))?;
        let (host, port) = m
            .data
            .conn_host_port()
            .ok_or_else(|| anyhow!("member {member} has no usable conn_url"))?;
        let auth = &self.cfg.postgresql.authentication;
        let role = if rewind {
            &auth.rewind
        } else {
            &auth.replication
        };
        let files = role
            .client
            .as_ref()
            .ok_or_else(|| anyhow!("{} needs sslcert and sslkey", role.username))?;
        let root = role
            .sslrootcert
            .as_ref()
            .ok_or_else(|| anyhow!("{} needs sslrootcert", role.username))?;
        let mut parts = vec![
            ("host", host),
            ("port", port.to_string()),
            ("user", role.username.clone()),
            ("dbname", "postgres".to_owned()),
            (
                "application_name",
                format!(
                    "pgkeep-{}-{}",
                    if rewind { "rewind" } else { "clone" },
                    self.cfg.name
                ),
            ),
            ("sslmode", role.sslmode.clone()),
            ("sslcert", files.cert.display().to_string()),
            ("sslkey", files.key.display().to_string()),
            ("sslrootcert", root.display().to_string()),
            ("connect_timeout", "5".to_owned()),
        ];
        if !rewind {
            parts.retain(|(k, _)| *k != "dbname");
        }
        Ok(parts
            .iter()
            .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Creates the replication and rewind roles on a freshly bootstrapped primary.
    async fn create_roles(&mut self) -> Result<()> {
        let auth = &self.cfg.postgresql.authentication;
        let roles = pgkeep_core::pgconf::HbaRoles {
            superuser: auth.superuser.username.clone(),
            replication: auth.replication.username.clone(),
            rewind: auth.rewind.username.clone(),
        };
        let client = crate::postgres::observe::connect_local(
            self.layout.socket_dir(),
            self.layout.node.port,
            &roles.superuser,
            Duration::from_secs(10),
        )
        .await?;
        for sql in pgkeep_core::pgconf::role_sql(&roles) {
            client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("creating roles: {sql}"))?;
        }
        tracing::info!(replication = %roles.replication, rewind = %roles.rewind, "created the replication and rewind roles");
        self.create_applications(&client).await
    }

    async fn slots(&mut self, names: &[String], create: bool) -> Result<()> {
        let client = self
            .pg_client
            .as_ref()
            .ok_or_else(|| anyhow!("no connection to the local postgres"))?;
        for n in names {
            let sql = if create {
                "SELECT pg_create_physical_replication_slot($1, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)"
            } else {
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active"
            };
            client
                .execute(sql, &[n])
                .await
                .with_context(|| format!("slot {n}"))?;
            tracing::info!(slot = %n, create, "replication slot");
        }
        Ok(())
    }
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::Fence => "fence",
        Action::AcquireLeaderKey => "acquire leader key",
        Action::RenewLeaderKey => "renew leader key",
        Action::ReleaseLeaderKey => "release leader key",
        Action::Promote => "promote",
        Action::Checkpoint => "checkpoint",
        Action::Stop { .. } => "stop",
        Action::Start { .. } => "start",
        Action::Restart => "restart",
        Action::Follow { .. } => "follow",
        Action::Rewind { .. } => "rewind",
        Action::Clone { .. } => "clone",
        Action::RestoreReplica { .. } => "restore replica",
        Action::Initdb => "initdb",
        Action::ClaimInitialize => "claim initialize",
        Action::ConfirmInitialize { .. } => "confirm initialize",
        Action::WriteInitialize { .. } => "write initialize",
        Action::PersistJoined => "persist joined marker",
        Action::PublishMember(_) => "publish member",
        Action::SetSyncStandbyNames(_) => "set synchronous_standby_names",
        Action::WriteSync { .. } => "write sync",
        Action::DeleteSync { .. } => "delete sync",
        Action::WriteHistory(_) => "write history",
        Action::WriteStatus(_) => "write status",
        Action::ClearFailover { .. } => "clear failover",
        Action::CreateSlots(_) => "create slots",
        Action::DropSlots(_) => "drop slots",
        Action::CreateLogicalSlot { .. } => "create logical slot",
        Action::CopyLogicalSlots { .. } => "copy logical slots",
        Action::AdvanceSlots(_) => "advance slots",
        Action::FetchPeerStatus { .. } => "fetch peer status",
    }
}
