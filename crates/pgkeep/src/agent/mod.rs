//! The agent: one per database host, running as the PostgreSQL OS user. Each cycle it observes
//! (DCS view + local PostgreSQL), asks [`pgkeep_core::ha::decide`] what to do, and does it.
//! Nothing here decides; everything here talks to the world.

mod apps;
mod archive_gap;
mod callbacks;
mod clone;
mod control;
mod exec;
mod lease;
mod metrics;
mod observe;
mod ops;
mod render;
mod slots;
mod status;
mod watchdog;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgkeep_core::dynamic;
use pgkeep_core::ha::{
    self, HaConfig, HaMemory, LeaderLease, LocalRequests, LongOperation, Millis, PeerReport,
    SyncStandbyNames,
};
use pgkeep_core::policy::Parameters;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiClient, ApiSnapshot};
use crate::config::Config;
use crate::dcs::{ClusterWatch, Dcs, EtcdDcs, EtcdSettings, Lease, TlsFiles, TlsReload};
use crate::postgres::observe::LocalPg;
use crate::postgres::{ControlData, Instance, RunAs, Runner};
use render::Layout;

/// A long operation running in the background.
struct Busy {
    op: LongOperation,
    handle: tokio::task::JoinHandle<Result<()>>,
}

/// The agent's state between cycles. The HA core's own memory is [`HaMemory`]; the rest is what
/// only the shell can know (handles, last replies, what it configured).
struct Shell {
    cfg: Config,
    layout: Layout,
    ha: HaConfig,
    dynamic_params: Parameters,
    dcs: EtcdDcs,
    watch: ClusterWatch,
    lease: Lease,
    lease_revoked: bool,
    leader_lease: Option<LeaderLease>,
    initialize_claimed: bool,
    instance: Instance,
    pg_client: Option<tokio_postgres::Client>,
    last_sql: Option<LocalPg>,
    controldata: Option<ControlData>,
    origin: Instant,
    memory: HaMemory,
    busy: Option<Busy>,
    rewind_failed: bool,
    /// When the last clone or restore failed: the next waits a `loop_wait`.
    clone_failed_at: Option<Instant>,
    /// WAL pgBackRest dropped from the archive queue since the agent started (nodes with a
    /// repository).
    wal_drops: Option<observe::WalDrops>,
    upstream: Option<String>,
    /// The upstream's member key had no address when PostgreSQL was configured to follow it
    /// (its lease had expired with etcd, say): the configuration is rendered again once it has.
    upstream_unrendered: bool,
    sync_names: SyncStandbyNames,
    postmaster_seen: Option<(i32, Millis)>,
    /// The highest timeline the running standby (by postmaster PID) was seen on.
    standby_tli_seen: Option<(i32, u32)>,
    promote_requested: bool,
    fresh_bootstrap: bool,
    peers: Option<PeerReport>,
    requests: LocalRequests,
    config_revision: i64,
    peer_client: Option<ApiClient>,
    api_tx: watch::Sender<Arc<ApiSnapshot>>,
    /// Signalled when a background operation ends, so the next decision need not wait.
    busy_done: Arc<tokio::sync::Notify>,
    /// The state and reason of the previous decision, to log only changes at info level.
    last_logged: String,
    /// The fence guard beside this agent.
    guard: crate::guard::GuardHandle,
    /// The hardware watchdog.
    watchdog: watchdog::Watchdog,
    /// Operator requests from the REST API (restart, reinitialize, reload).
    ops: ops::Ops,
    /// The leader key was acquired or renewed since the watchdog was last patted.
    renewed: bool,
    /// The last fence of this cycle failed (PostgreSQL may still run).
    fence_failed: bool,
    /// The control data with the pg_control file's (mtime, inode, size) it was read at.
    controldata_stamp: Option<((std::time::SystemTime, u64, u64), ControlData)>,
    /// Set when this node promoted: whether the checkpoint after the promotion is done.
    promote_checkpoint: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Local callbacks: the running ones, the role they last saw, the pre_promote backoff.
    callbacks: callbacks::CallbackState,
    /// No logical slot copy before this instant (the last attempt failed).
    slot_copy_after: Option<std::time::Instant>,
    /// Counters and facts for `GET /metrics`.
    metrics: crate::api::metrics::AgentMetrics,
    /// Reloads the REST API's certificate (on SIGHUP and `POST /reload`).
    api_tls: crate::api::TlsReloader,
    /// When the certificates' expiry was last read (it is read again once a day).
    certs_checked: Instant,
    /// Keepalives of the agent's lease sent so far (a cycle without one sends its own).
    keepalives: u64,
    /// etcd lost the agent's lease; a new one is granted before the next etcd call.
    lease_gone: bool,
    /// The expired proof last warned about (one warning per expiry).
    expiry_warned: Option<LeaderLease>,
}

impl Shell {
    /// Milliseconds on the agent's monotonic clock.
    fn now(&self) -> Millis {
        self.millis(Instant::now())
    }

    fn millis(&self, t: Instant) -> Millis {
        Millis(
            u64::try_from(t.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX),
        )
    }

    fn instant(&self, m: Millis) -> Instant {
        self.origin + Duration::from_millis(m.0)
    }

    /// Re-reads the dynamic configuration when its revision changed. A refused configuration
    /// keeps the previous one in force.
    fn refresh_dynamic(&mut self) {
        let Some(snap) = self.watch.snapshot() else {
            return;
        };
        let Some(cfg) = &snap.view.config else { return };
        if cfg.mod_revision == self.config_revision {
            return;
        }
        self.config_revision = cfg.mod_revision;
        match dynamic::interpret(
            &cfg.value,
            &HaConfig::default(),
            &self.cfg.dynamic_parameter_allowlist,
        ) {
            Ok(d) => {
                for k in &d.dropped {
                    if k.security {
                        tracing::warn!(security = true, key = %k.path, "{k}");
                    } else {
                        tracing::info!(key = %k.path, "{k}");
                    }
                }
                self.ha = d.ha;
                self.dynamic_params = d.parameters;
            }
            Err(e) => tracing::error!(error = %e, "keeping the previous dynamic configuration"),
        }
        self.apply_dynamic_parameters();
    }

    /// Collects the finished background operation, if any.
    async fn reap_busy(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.handle.is_finished())
            && let Some(b) = self.busy.take()
        {
            let result = b.handle.await.map_err(anyhow::Error::from).and_then(|r| r);
            match (&result, b.op) {
                (Ok(()), op) => {
                    tracing::info!(?op, "background operation finished");
                    if op == LongOperation::Rewind {
                        self.rewind_failed = false;
                    }
                    if op == LongOperation::Clone {
                        self.clone_failed_at = None;
                    }
                }
                (Err(e), op) => {
                    tracing::error!(?op, error = format!("{e:#}"), "background operation failed");
                    if op == LongOperation::Rewind {
                        self.rewind_failed = true;
                    }
                    if op == LongOperation::Clone {
                        self.clone_failed_at = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Keeps the fence guard running and tells it the lease deadline: the one proven by the
    /// latest renewal (actions of this cycle included), never later than the core's.
    fn drive_guard(&mut self, cmd: ha::WatchdogCmd) {
        if let Err(e) = self.guard.ensure_running() {
            tracing::error!(
                error = format!("{e:#}"),
                "NO FENCE GUARD: a frozen or killed agent would leave PostgreSQL running past the lease"
            );
        }
        // Paused: neither the guard nor the watchdog acts, so agents can be restarted or
        // handed back without touching PostgreSQL (Patroni disables its watchdog in pause too).
        // A fence that failed keeps the guard armed: it retries on its own.
        let cmd = if self.ha.pause {
            ha::WatchdogCmd::Disarm
        } else if matches!(cmd, ha::WatchdogCmd::Disarm) && std::mem::take(&mut self.fence_failed) {
            ha::WatchdogCmd::Hold
        } else {
            cmd
        };
        match cmd {
            // Patted only after a renewal that succeeded: a leader that cannot renew must let
            // its device fire.
            ha::WatchdogCmd::Arm { .. } if std::mem::take(&mut self.renewed) => {
                self.watchdog.keepalive(self.ha.ttl.0 / 1000)
            }
            ha::WatchdogCmd::Arm { .. } => {}
            ha::WatchdogCmd::Disarm => self.watchdog.disarm(),
            ha::WatchdogCmd::Hold => {}
        }
        match cmd {
            ha::WatchdogCmd::Arm { until } => {
                let proven = self
                    .leader_lease
                    .map(|l| self.ha.lease_deadline(l.sent_at, l.granted_ttl))
                    .filter(|d| *d >= until)
                    .unwrap_or(until);
                self.guard.arm(self.instant(proven));
            }
            ha::WatchdogCmd::Disarm => self.guard.disarm(),
            ha::WatchdogCmd::Hold => {}
        }
    }

    /// A decision that disarms and fences nothing (PostgreSQL cannot commit, nothing makes it
    /// writable) disarms the guard before its actions, not after: a guard still armed with a
    /// deadline that passed stops any postmaster that is not a standby, and these actions may
    /// start one that may not be stopped (single-user crash recovery before a start as a
    /// replica, `pg_rewind`'s own).
    fn disarm_guard_early(&mut self, decision: &ha::Decision) {
        if decision.watchdog == ha::WatchdogCmd::Disarm
            && !decision.actions.contains(&ha::Action::Fence)
            && !self.fence_failed
        {
            self.guard.disarm();
        }
    }

    /// One cycle. Returns when the next one may start.
    async fn cycle(&mut self) -> Millis {
        self.daily_cert_check();
        self.reap_busy().await;
        self.expire_requests();
        let ttl_before = self.ha.ttl;
        self.refresh_dynamic();
        if self.ha.ttl != ttl_before {
            self.regrant_lease().await;
        }
        // The proof of the last renewal goes to the core as it is, also once its deadline has
        // passed: the core fences a PostgreSQL that may commit past it, paused or not (dropping
        // it made a paused primary outlive its lease). Without a live proof the lease needs this
        // cycle's keepalive, but never ahead of a fence (see `lease::keepalive_at`).
        let keepalives_before = self.keepalives;
        let proof_live = self.live_deadline().is_some();
        if let Some(l) = self.leader_lease
            && !proof_live
            && self.expiry_warned != Some(l)
        {
            tracing::warn!("the lease deadline passed without a renewal");
            self.expiry_warned = Some(l);
        }
        self.render_pending_upstream();
        let mut rounds = 0;
        loop {
            let pg = self.observe_pg().await;
            if rounds == 0
                && lease::keepalive_at(proof_live, pg.may_commit())
                    == lease::KeepaliveAt::BeforeDecision
                && let Err(e) = self.keepalive().await
            {
                tracing::warn!(error = format!("{e:#}"), "lease keepalive failed");
            }
            let mut obs = self.observation(pg);
            self.cb_observed(&mut obs);
            let Some(snap) = self.watch.snapshot() else {
                tracing::warn!("no DCS view yet");
                return self.now() + Millis(500);
            };
            let now = self.now();
            let decision = ha::decide(now, &self.ha, &snap.view, &obs);
            tracing::debug!(state = %decision.state, reason = %decision.reason, actions = ?decision.actions, wal_position = %obs.pg.wal_position, "decision");
            let summary = format!("{} {}", decision.state, decision.reason);
            if summary != self.last_logged {
                tracing::info!(state = %decision.state, reason = %decision.reason, "decision");
                self.last_logged = summary;
            }
            self.memory = decision.memory.clone();
            self.disarm_guard_early(&decision);
            let mut replan = false;
            for action in &decision.actions {
                if decision.state == ha::MemberState::Demoting
                    && matches!(action, ha::Action::Stop { .. })
                {
                    // After the checkpoint, before the stop: health checks see the hand-over
                    // (`ApiSnapshot::handing_over`) while PostgreSQL stops.
                    self.publish(&obs, &snap, decision.state);
                }
                let outcome = self.execute(action).await;
                self.request_acted(action);
                if let exec::Outcome::Replan = outcome {
                    replan = true;
                    break;
                }
            }
            let promoted =
                self.promote_requested && decision.actions.contains(&ha::Action::Promote);
            self.count_decision(&decision, promoted);
            self.drive_guard(decision.watchdog);
            self.publish(&obs, &snap, decision.state);
            rounds += 1;
            // A decision that changed something (started, stopped, promoted, took or gave up a
            // key) is followed at once by the next one instead of a whole loop_wait later.
            let progressed = decision.actions.iter().any(|a| {
                !matches!(
                    a,
                    ha::Action::RenewLeaderKey
                        | ha::Action::PublishMember(_)
                        | ha::Action::WriteStatus(_)
                        | ha::Action::FetchPeerStatus { .. }
                        // Slot upkeep changes no role; a failing one must not spin the loop.
                        | ha::Action::CreateSlots(_)
                        | ha::Action::DropSlots(_)
                        | ha::Action::CreateLogicalSlot { .. }
                        | ha::Action::CopyLogicalSlots { .. }
                        | ha::Action::AdvanceSlots(_)
                )
            });
            if !replan || rounds >= 4 {
                // The keepalive a fence did not wait for (and one no renewal sent).
                if !proof_live
                    && self.keepalives == keepalives_before
                    && let Err(e) = self.keepalive().await
                {
                    tracing::warn!(error = format!("{e:#}"), "lease keepalive failed");
                }
                let next = decision.wake_at.min(self.now() + self.ha.loop_wait);
                return if progressed && self.busy.is_none() {
                    next.min(self.now() + Millis(20))
                } else {
                    next
                };
            }
        }
    }
}

/// Logs to stderr (the service manager keeps it), as text or JSON lines. `RUST_LOG` overrides
/// the configured level.
fn init_logging(log: &crate::config::Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

fn ttl_secs(ha: &HaConfig) -> i64 {
    i64::try_from(ha.ttl.0 / 1000).unwrap_or(30)
}

fn etcd_settings(cfg: &Config, ha: &HaConfig) -> Result<EtcdSettings> {
    let tls = match (&cfg.etcd.cacert, &cfg.etcd.client) {
        (Some(ca), Some(client)) => Some(TlsFiles {
            ca: ca.clone(),
            cert: client.cert.clone(),
            key: client.key.clone(),
        }),
        _ => None,
    };
    Ok(EtcdSettings {
        endpoints: cfg.etcd.endpoints.clone(),
        tls,
        namespace: cfg.namespace.clone(),
        scope: cfg.scope.clone(),
        request_timeout: Duration::from_millis(ha.retry_timeout.0),
        insecure: cfg.insecure.plaintext_etcd,
    })
}

fn peer_client(cfg: &Config) -> Result<Option<ApiClient>> {
    let Some(ca) = cfg.ctl.cacert.as_ref().or(cfg.restapi.cafile.as_ref()) else {
        return Ok(None);
    };
    let mut b = ApiClient::builder(
        &std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
    )?
    .timeout(Duration::from_secs(2));
    if let Some(c) = &cfg.ctl.client {
        b = b.identity_files(&c.cert, &c.key)?;
    }
    if let Some(a) = cfg
        .ctl
        .authentication
        .as_ref()
        .or(cfg.restapi.authentication.as_ref())
    {
        b = b.basic_auth(&a.username, a.password.clone());
    }
    Ok(Some(b.build()?))
}

/// Runs the agent until SIGTERM (or SIGINT): then PostgreSQL is stopped cleanly and, on the
/// leader, the key is released, so a replica takes over without waiting for the lease to expire.
/// `log_format` (the command line's `--log-format`) overrides the file's `log.format`.
pub async fn run(config_path: &Path, log_format: Option<crate::config::LogFormat>) -> Result<()> {
    if nix::unistd::Uid::effective().is_root() {
        bail!("pgkeep agent must not run as root; run it as the PostgreSQL OS user (postgres)");
    }
    let mut cfg = Config::load(config_path)?;
    if let Some(f) = log_format {
        cfg.log.format = f;
    }
    init_logging(&cfg.log);
    for flag in cfg.insecure.active() {
        tracing::warn!(override = flag, "insecure override in force");
    }
    let base = dynamic::interpret(
        &cfg.bootstrap.dcs,
        &HaConfig::default(),
        &cfg.dynamic_parameter_allowlist,
    )
    .context("bootstrap.dcs")?;
    let layout = Layout::from_config(&cfg)?;
    let dcs = EtcdDcs::connect(&etcd_settings(&cfg, &base.ha)?).await?;
    let watch = dcs.watch();
    let lease = dcs
        .grant_lease(ttl_secs(&base.ha))
        .await
        .context("granting the agent's lease")?;
    let home = cfg
        .postgresql
        .config_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .to_owned();
    let instance = Instance {
        runner: Runner::new(cfg.postgresql.bin_dir.clone(), RunAs::Current, home)
            .with_ldap_ca_file(cfg.postgresql.ldap_ca_file.clone()),
        data_dir: cfg.postgresql.data_dir.clone(),
        config_dir: cfg.postgresql.config_dir.clone(),
        log_file: cfg.postgresql.config_dir.join("postgresql.log"),
    };
    std::fs::create_dir_all(&cfg.postgresql.config_dir)
        .with_context(|| format!("creating {}", cfg.postgresql.config_dir.display()))?;
    let (api_tx, api_rx) = watch::channel(Arc::new(ApiSnapshot::new(&cfg.scope, &cfg.name)));
    let cancel = CancellationToken::new();
    let (ops_tx, mut ops_rx) = tokio::sync::mpsc::channel(8);
    let allowlist = Arc::new(std::sync::RwLock::new(
        cfg.dynamic_parameter_allowlist.clone(),
    ));
    let ops = ops::Ops::new(allowlist.clone(), base.parameters.clone());
    let server = api::serve(
        &cfg.restapi,
        api_rx,
        Some(Arc::new(control::AgentControl {
            dcs: dcs.clone(),
            socket_dir: layout.socket_dir().to_owned(),
            port: layout.node.port,
            user: cfg.postgresql.authentication.superuser.username.clone(),
            client: tokio::sync::Mutex::new(None),
            requests: ops_tx,
            allowlist,
        })),
        cancel.clone(),
    )
    .await
    .context("starting the REST API")?;
    tracing::info!(member = %cfg.name, scope = %cfg.scope, api = %server.local_addr(), "agent started");
    let peer_client = peer_client(&cfg)?;
    let mut guard = crate::guard::GuardHandle::new(crate::guard::GuardArgs {
        state: cfg.postgresql.config_dir.join(crate::guard::STATE_FILE),
        config_dir: cfg.postgresql.config_dir.clone(),
        data_dir: cfg.postgresql.data_dir.clone(),
    })
    .with_json_logs(cfg.log.format == crate::config::LogFormat::Json);
    guard.settle_stale(&instance);
    let mut shell = Shell {
        layout,
        ha: base.ha,
        dynamic_params: base.parameters,
        dcs,
        watch,
        lease,
        lease_revoked: false,
        leader_lease: None,
        initialize_claimed: false,
        instance,
        pg_client: None,
        last_sql: None,
        controldata: None,
        origin: Instant::now(),
        memory: HaMemory::default(),
        busy: None,
        rewind_failed: false,
        clone_failed_at: None,
        wal_drops: cfg.pgbackrest.as_ref().map(observe::WalDrops::start),
        upstream: None,
        upstream_unrendered: false,
        sync_names: SyncStandbyNames::default(),
        postmaster_seen: None,
        standby_tli_seen: None,
        promote_requested: false,
        fresh_bootstrap: false,
        peers: None,
        requests: LocalRequests::default(),
        config_revision: 0,
        peer_client,
        api_tx,
        busy_done: Arc::new(tokio::sync::Notify::new()),
        last_logged: String::new(),
        guard,
        renewed: false,
        promote_checkpoint: None,
        callbacks: callbacks::CallbackState::default(),
        slot_copy_after: None,
        metrics: Default::default(),
        api_tls: server.tls_reloader(),
        certs_checked: Instant::now(),
        keepalives: 0,
        lease_gone: false,
        expiry_warned: None,
        fence_failed: false,
        controldata_stamp: None,
        watchdog: watchdog::Watchdog::new(crate::config::Watchdog {
            mode: cfg.watchdog.mode,
            device: cfg.watchdog.device.clone(),
            safety_margin: cfg.watchdog.safety_margin,
        }),
        ops,
        cfg,
    };
    shell.read_cert_expiry();
    if shell.watch.ready(Duration::from_secs(30)).await.is_err() {
        tracing::warn!("no DCS view after 30 s; continuing, the loop waits for it");
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut shutdown_started: Option<Instant> = None;
    // One watch handle for the whole run: it remembers which leader change it last woke for.
    let mut leader_watch = shell.watch.clone();
    let mut view_watch = shell.watch.clone();
    loop {
        let wake = shell.cycle().await;
        if let Some(started) = shutdown_started {
            let stopped = shell.instance.running_postmaster().ok().flatten().is_none();
            if (stopped && shell.live_deadline().is_none())
                || started.elapsed() > Duration::from_secs(120)
            {
                break;
            }
        }
        let sleep = tokio::time::sleep_until(shell.instant(wake).into());
        tokio::pin!(sleep);
        let busy_done = shell.busy_done.clone();
        loop {
            tokio::select! {
                _ = &mut sleep => {}
                _ = leader_watch.leader_changed() => {}
                _ = busy_done.notified() => {}
                // Other DCS changes only refresh what the REST API answers from (a switchover
                // request is checked against the members' latest keys); no cycle for them.
                Ok(()) = view_watch.changed() => {
                    shell.publish_view();
                    continue;
                }
                _ = term.recv() => shutdown_started = shutdown_started.or(Some(Instant::now())),
                _ = int.recv() => shutdown_started = shutdown_started.or(Some(Instant::now())),
                _ = hup.recv() => shell.reload(config_path),
                // A restart, reinitialize or reload request from the REST API: act at once.
                Some(env) = ops_rx.recv() => shell.accept_request(env, config_path),
            }
            break;
        }
        if shutdown_started.is_some() && !shell.requests.shutdown {
            tracing::info!("shutting down: stopping PostgreSQL and handing over");
            shell.requests.shutdown = true;
        }
    }
    // Revoking the lease deletes the leader key at once: if the shutdown timed out with
    // PostgreSQL still running, stop it first, or a replica could be promoted next to it.
    if shell.instance.running_postmaster().ok().flatten().is_some() {
        let instance = shell.instance.clone();
        let fenced = tokio::task::spawn_blocking(move || {
            crate::postgres::fence::fence_blocking(
                &instance,
                crate::postgres::fence::FenceGrace::default(),
            )
        })
        .await;
        tracing::warn!(outcome = ?fenced, "PostgreSQL still ran at the end of the shutdown; fenced");
    }
    shell.guard.disarm();
    shell.watchdog.disarm();
    let _ = shell.dcs.revoke(shell.lease.id).await;
    shell.cb_settle().await;
    cancel.cancel();
    if let Err(e) = server.stopped().await {
        tracing::warn!(error = %e, "REST API did not stop cleanly");
    }
    tracing::info!("agent stopped");
    Ok(())
}

impl Shell {
    /// SIGHUP: validate the whole new configuration, then swap it in; on any error keep the old
    /// one. Settings that need a restart of the agent (listen addresses, etcd endpoints) are
    /// reported, not applied.
    ///
    /// Certificates are picked up here (`pgkeep pki rotate` sends SIGHUP): PostgreSQL reloads
    /// its `ssl_*_file`s with the configuration, the REST API serves new connections with its
    /// new certificate, the client of the other members' REST APIs is rebuilt, and the etcd
    /// client switches to new TLS files in the background once a client with them has read
    /// from etcd (see [`EtcdDcs::reload_tls`]); each one that fails keeps what it had.
    fn reload(&mut self, path: &Path) {
        match Config::load(path).and_then(|c| {
            Ok((
                Layout::from_config(&c)
                    .map_err(|e| crate::config::ConfigError::new(path, "", format!("{e:#}")))?,
                c,
            ))
        }) {
            Ok((layout, c)) => {
                let endpoints_changed = c.etcd.endpoints != self.cfg.etcd.endpoints;
                if c.restapi.listen != self.cfg.restapi.listen || endpoints_changed {
                    tracing::warn!(
                        "restapi.listen and etcd3 hosts changes take effect after an agent restart"
                    );
                }
                if let Err(e) = self.api_tls.reload(&c.restapi) {
                    tracing::error!(
                        error = %e,
                        "REST API certificate not reloaded; new connections keep the previous one"
                    );
                }
                match peer_client(&c) {
                    Ok(client) => self.peer_client = client,
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "client of the members' REST APIs not rebuilt; keeping the previous one"
                    ),
                }
                if !endpoints_changed {
                    self.reload_etcd_tls(&c);
                }
                self.cfg = c;
                self.layout = layout;
                self.read_cert_expiry();
                let standby = self.last_sql.as_ref().is_some_and(|s| s.in_recovery);
                if let Err(e) = self.render(standby).and_then(|()| self.reload_pg()) {
                    tracing::error!(error = format!("{e:#}"), "re-rendering after reload failed");
                }
                self.share_allowlist();
                tracing::info!("configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded; keeping the previous one")
            }
        }
    }

    /// Switches the etcd client to the TLS files of `cfg` in the background when they changed.
    /// The HA loop goes on meanwhile with the connections it has; a failure keeps them.
    fn reload_etcd_tls(&self, cfg: &Config) {
        let settings = match etcd_settings(cfg, &self.ha) {
            Ok(s) if s.tls.is_some() => s,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "etcd client certificate not reloaded"
                );
                return;
            }
        };
        let dcs = self.dcs.clone();
        tokio::spawn(async move {
            let cert = settings.tls.as_ref().map(|t| t.cert.clone());
            match dcs.reload_tls(&settings).await {
                Ok(TlsReload::Reloaded) => {
                    let serial = cert
                        .and_then(|c| crate::pki::inspect(&c).ok())
                        .map(|i| i.serial)
                        .unwrap_or_default();
                    tracing::info!(
                        serial = %serial,
                        "etcd client certificate reloaded: new etcd connections use it"
                    );
                }
                Ok(TlsReload::Unchanged) => {
                    tracing::debug!("etcd client certificate files unchanged")
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "etcd client certificate NOT reloaded: the agent keeps using the previous \
                     one; reload again (SIGHUP) once etcd accepts the new one"
                ),
            }
        });
    }
}
