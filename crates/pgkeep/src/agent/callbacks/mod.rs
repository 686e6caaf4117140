//! Local callbacks: the commands of `postgresql.callbacks`, `pre_promote` and `before_stop`
//! (local configuration only; the DCS can never set them).
//!
//! * `on_start`, `on_stop`, `on_restart`, `on_reload`, `on_role_change` run asynchronously,
//!   as `<command...> <action> <role> <scope>` (Patroni's convention; the role is `master` or
//!   `primary` for a primary, see `pgkeep.callback_primary_role`, and `replica`). A new one
//!   kills the process group of the previous one if it still runs (`on_reload` has its own
//!   slot, as in Patroni), and each is killed when `pgkeep.callback_timeout` passes.
//! * `pre_promote` runs synchronously after this node took the leader key and before it
//!   promotes; a non-zero exit, a timeout or a lease deadline reached meanwhile aborts the
//!   promotion: the node gives the key back (with the release marker, so the next leader need
//!   not wait out a `ttl`), drops a switchover or failover request naming it, stays a replica,
//!   and takes no part in leader races for `ttl` (Patroni's backoff; published as
//!   `nofailover` meanwhile).
//! * `before_stop` runs synchronously before the agent stops PostgreSQL (not before fencing,
//!   which never waits); its failure is logged and the stop goes on.
//!
//! Every command runs directly (never through a shell), as the agent's user, in its own
//! process group, with stdin from `/dev/null`, a minimal environment (`PATH`, `LANG`, `HOME`,
//! `USER`, `LOGNAME` and `PGKEEP_CALLBACK`, `PGKEEP_ROLE`, `PGKEEP_SCOPE`, `PGKEEP_MEMBER`), and
//! its output logged line by line. Its program is checked again before every run.

mod runner;

use std::time::{Duration, Instant};

use pgkeep_core::ha::{LocalObservation, PgProcess};
use tokio::sync::oneshot;

use super::Shell;
use crate::config::{CallbackCommand, CallbackEvent};
use crate::dcs::{Cas, Dcs, Expect};
use crate::postgres::StopMode;
use runner::{Ending, Invocation, Runner, run};

/// The `PATH` callbacks get.
const CALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The node's role as callbacks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Primary,
    Replica,
}

/// What the agent keeps for its callbacks.
#[derive(Default)]
pub(super) struct CallbackState {
    runner: Runner,
    /// The role PostgreSQL last had under this agent; `None` before the first start or
    /// observation (then `on_start` is still due).
    role: Option<Role>,
    /// After a failed `pre_promote`: no leader race until then.
    backoff_until: Option<Instant>,
    /// A restart is in progress: its stop and start fire no callbacks of their own.
    restarting: bool,
}

impl Shell {
    fn role_word(&self, role: Option<Role>) -> &'static str {
        match role {
            Some(Role::Primary) => self.cfg.callbacks.primary_role.as_str(),
            Some(Role::Replica) => "replica",
            None => "uninitialized",
        }
    }

    fn invocation(
        &self,
        label: &'static str,
        cmd: &CallbackCommand,
        role: Option<Role>,
        patroni_args: bool,
        timeout: Duration,
    ) -> Invocation {
        let role = self.role_word(role);
        let mut argv = cmd.argv.clone();
        if patroni_args {
            argv.extend([label.to_owned(), role.to_owned(), self.cfg.scope.clone()]);
        }
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), CALLBACK_PATH.into()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        for k in ["HOME", "USER", "LOGNAME"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.into(), v));
            }
        }
        env.extend([
            ("PGKEEP_CALLBACK".into(), label.into()),
            ("PGKEEP_ROLE".into(), role.into()),
            ("PGKEEP_SCOPE".into(), self.cfg.scope.clone()),
            ("PGKEEP_MEMBER".into(), self.cfg.name.clone()),
        ]);
        Invocation {
            label,
            argv,
            env,
            timeout,
        }
    }

    /// Fires the asynchronous callback of `event`, if one is configured.
    fn cb_fire(&self, event: CallbackEvent, role: Option<Role>) {
        if let Some(cmd) = self.cfg.callbacks.events.get(&event) {
            let inv = self.invocation(event.name(), cmd, role, true, self.cfg.callbacks.timeout);
            self.callbacks.runner.fire(inv);
        }
    }

    /// The time left before the lease deadline while this node holds the leader lease:
    /// a synchronous callback must not keep the loop from renewing past it.
    fn lease_left(&self) -> Option<Duration> {
        self.leader_lease.map(|l| {
            self.instant(self.ha.lease_deadline(l.sent_at, l.granted_ttl))
                .saturating_duration_since(Instant::now())
        })
    }

    /// After the agent started PostgreSQL: `on_role_change` when the role differs from the one
    /// it last had, `on_start` otherwise.
    pub(super) fn cb_started(&mut self, standby: bool) {
        if self.callbacks.restarting {
            return;
        }
        let role = if standby {
            Role::Replica
        } else {
            Role::Primary
        };
        let event = match self.callbacks.role {
            Some(r) if r != role => CallbackEvent::OnRoleChange,
            _ => CallbackEvent::OnStart,
        };
        self.callbacks.role = Some(role);
        self.cb_fire(event, Some(role));
    }

    /// After the agent stopped (or fenced) a running PostgreSQL.
    pub(super) fn cb_stopped(&self) {
        if !self.callbacks.restarting {
            self.cb_fire(CallbackEvent::OnStop, self.callbacks.role);
        }
    }

    /// After PostgreSQL was told to reload.
    pub(super) fn cb_reloaded(&self) {
        self.cb_fire(CallbackEvent::OnReload, self.callbacks.role);
    }

    /// After the promotion was requested.
    pub(super) fn cb_promoted(&mut self) {
        self.callbacks.role = Some(Role::Primary);
        self.cb_fire(CallbackEvent::OnRoleChange, Some(Role::Primary));
    }

    /// `before_stop`, before the agent stops a running PostgreSQL: bounded by the callback
    /// timeout and, on the leader, by the lease deadline; a failure is logged, never blocking.
    pub(super) async fn before_stop(&mut self) {
        let Some(cmd) = self.cfg.callbacks.before_stop.clone() else {
            return;
        };
        if self.callbacks.restarting || self.instance.running_postmaster().ok().flatten().is_none()
        {
            return;
        }
        let mut timeout = self.cfg.callbacks.timeout;
        if let Some(left) = self.lease_left() {
            timeout = timeout.min(left);
        }
        let inv = self.invocation("before_stop", &cmd, self.callbacks.role, false, timeout);
        let t = Instant::now();
        let (_keep, rx) = oneshot::channel();
        match run(inv, rx).await {
            e if e.success() => tracing::info!(
                callback = "before_stop",
                elapsed_ms = t.elapsed().as_millis(),
                "before_stop finished; stopping PostgreSQL"
            ),
            e => tracing::warn!(
                callback = "before_stop",
                outcome = %e,
                "before_stop failed; stopping PostgreSQL anyway"
            ),
        }
    }

    /// Restarts PostgreSQL in `role` with `before_stop` first and `on_restart` after, but no
    /// `on_stop`/`on_start` of its own.
    pub(super) async fn restart_pg(
        &mut self,
        role: &pgkeep_core::ha::StartRole,
    ) -> anyhow::Result<()> {
        self.restart_pg_with(role, || Ok(())).await
    }

    /// [`Shell::restart_pg`], running `between` while PostgreSQL is stopped (files that must be
    /// in place when it starts); its error leaves PostgreSQL stopped.
    pub(super) async fn restart_pg_with(
        &mut self,
        role: &pgkeep_core::ha::StartRole,
        between: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.before_stop().await;
        self.callbacks.restarting = true;
        let result = async {
            self.stop_pg(StopMode::Fast).await?;
            between()?;
            self.start_pg(role).await
        }
        .await;
        self.callbacks.restarting = false;
        result?;
        let role = match role {
            pgkeep_core::ha::StartRole::Primary => Role::Primary,
            pgkeep_core::ha::StartRole::Replica { .. } => Role::Replica,
        };
        self.callbacks.role = Some(role);
        self.cb_fire(CallbackEvent::OnRestart, Some(role));
        Ok(())
    }

    /// `pre_promote`, after the leader key was taken and before promoting. True: promote.
    /// False: the promotion is abandoned (see the module documentation); the caller must not
    /// promote.
    pub(super) async fn pre_promote(&mut self) -> bool {
        let Some(cmd) = self.cfg.callbacks.pre_promote.clone() else {
            return true;
        };
        let left = self.lease_left().unwrap_or(Duration::ZERO);
        let timeout = self.cfg.callbacks.timeout.min(left);
        let inv = self.invocation("pre_promote", &cmd, Some(Role::Replica), false, timeout);
        let t = Instant::now();
        let (_keep, rx) = oneshot::channel();
        let ending = if timeout.is_zero() {
            Ending::NotRun("no time left before the lease deadline".into())
        } else {
            run(inv, rx).await
        };
        // The lease may have run out while the command ran: then another node may already
        // lead, and promoting would make two primaries.
        let lease_ok = self.lease_left().is_some_and(|l| !l.is_zero());
        if ending.success() && lease_ok {
            tracing::info!(
                callback = "pre_promote",
                elapsed_ms = t.elapsed().as_millis(),
                "pre_promote succeeded; promoting"
            );
            return true;
        }
        tracing::error!(
            callback = "pre_promote",
            outcome = %ending,
            lease_ok,
            "PRE_PROMOTE FAILED: NOT PROMOTING; giving the leader key back and staying a replica"
        );
        self.abandon_promotion().await;
        false
    }

    /// Gives the leader key back without having promoted, in an order that lets the next
    /// leader act at once: the release marker for the key's last revision (this PostgreSQL
    /// never left recovery, so nobody need wait out a `ttl`) with `nofailover`, `/sync` back to
    /// the old leader after a switchover, the switchover or failover request naming this node
    /// cleared, and last the key. Whatever fails here, the key expires with the lease and
    /// nothing was promoted.
    async fn abandon_promotion(&mut self) {
        let ttl = Duration::from_millis(self.ha.ttl.0);
        self.callbacks.backoff_until = Some(Instant::now() + ttl);
        let Some(lease) = self.leader_lease.take() else {
            return;
        };
        let me = self.cfg.name.clone();
        let bound = Duration::from_millis(self.ha.retry_timeout.0.max(1000));
        let snap = self.watch.snapshot();
        if let Some(mut data) = snap
            .as_ref()
            .and_then(|s| s.view.members.get(&me))
            .map(|m| m.data.clone())
        {
            data.other.insert(
                pgkeep_core::ha::RELEASED_FIELD.to_owned(),
                serde_json::Value::from(lease.revision),
            );
            data.tags.nofailover = true;
            match tokio::time::timeout(bound, self.dcs.put_member(&me, &data, self.lease.id)).await
            {
                Ok(Ok(())) => self.memory.released_revision = Some(lease.revision),
                Ok(Err(e)) => tracing::warn!(error = %e, "publishing the release marker failed"),
                Err(_) => tracing::warn!("publishing the release marker timed out"),
            }
        }
        // Synchronous mode: before promoting, `/sync` was rewritten to name this node alone
        // (as Patroni does), which would let no one else lead. In a switchover the old leader
        // stopped cleanly and this node confirmed its last record, so both hold every
        // acknowledged commit: hand `/sync` back to it (with this node as its standby). After
        // an unplanned failover it stays: only this node is known to hold everything.
        if let Some(snap) = snap.as_ref()
            && let Some(sync) = &snap.view.sync
            && sync.value.leader.as_deref() == Some(me.as_str())
            && let Some(fo) = &snap.view.failover
            && fo.value.member.as_deref() == Some(me.as_str())
            && let Some(old) = fo.value.leader.as_deref().filter(|o| *o != me)
        {
            let back = pgkeep_core::cluster::SyncState::new(old, vec![me.clone()], 0);
            match tokio::time::timeout(
                bound,
                self.dcs
                    .put_sync(&back, Expect::ModRevision(sync.mod_revision)),
            )
            .await
            {
                Ok(Ok(Cas::Written { .. })) => {
                    tracing::warn!(leader = old, "/sync handed back to the old leader")
                }
                Ok(Ok(Cas::Conflict)) => tracing::warn!("/sync changed meanwhile; left as it is"),
                Ok(Err(e)) => tracing::warn!(error = %e, "handing /sync back failed"),
                Err(_) => tracing::warn!("handing /sync back timed out"),
            }
        }
        if let Some(fo) = snap.as_ref().and_then(|s| s.view.failover.as_ref())
            && fo.value.member.as_deref() == Some(me.as_str())
        {
            let empty = pgkeep_core::cluster::FailoverRequest::default();
            match tokio::time::timeout(
                bound,
                self.dcs
                    .put_failover(&empty, Expect::ModRevision(fo.mod_revision)),
            )
            .await
            {
                Ok(Ok(Cas::Written { .. })) => {
                    tracing::warn!("the switchover or failover to this node was cancelled")
                }
                Ok(Ok(Cas::Conflict)) => tracing::info!("the failover request changed meanwhile"),
                Ok(Err(e)) => tracing::warn!(error = %e, "clearing the failover request failed"),
                Err(_) => tracing::warn!("clearing the failover request timed out"),
            }
        }
        match tokio::time::timeout(bound, self.dcs.release_leader(&me)).await {
            Ok(Ok(_)) => tracing::warn!("released the leader key after the failed pre_promote"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the leader key failed; it expires with the lease")
            }
            Err(_) => {
                tracing::warn!("releasing the leader key timed out; it expires with the lease")
            }
        }
    }

    /// Adjusts a fresh observation: fires the first `on_start` when PostgreSQL was already
    /// running when the agent started (Patroni does the same), and, during the backoff after a
    /// failed `pre_promote`, keeps this node out of leader races and switchover candidates.
    pub(super) fn cb_observed(&mut self, obs: &mut LocalObservation) {
        if self.callbacks.role.is_none() && obs.pg.process == PgProcess::Running {
            let role = if obs.pg.in_recovery {
                Role::Replica
            } else {
                Role::Primary
            };
            self.callbacks.role = Some(role);
            self.cb_fire(CallbackEvent::OnStart, Some(role));
        }
        match self.callbacks.backoff_until {
            Some(t) if Instant::now() < t => {
                obs.tags.nofailover = true;
                obs.member_template.tags.nofailover = true;
            }
            Some(_) => {
                self.callbacks.backoff_until = None;
                tracing::info!("the backoff after the failed pre_promote is over");
            }
            None => {}
        }
    }

    /// At shutdown: lets running callbacks finish, briefly.
    pub(super) async fn cb_settle(&self) {
        self.callbacks.runner.settle(Duration::from_secs(5)).await;
    }
}
