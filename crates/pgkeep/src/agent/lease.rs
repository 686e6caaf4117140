//! The agent's lease bookkeeping: keepalives of its etcd lease, the proof of leadership handed
//! to the core, and the fence guard's deadline around the actions that make PostgreSQL writable.
//!
//! The contract with the core (`docs/ha-rules.md` §7): the proof of the last fully successful
//! renewal round is reported as it is, *also once its deadline has passed*. The core, not the
//! shell, judges it against `now`, and fences a PostgreSQL that may commit past it, paused or
//! not. The proof is forgotten only when a renewal's compare says the key is not ours, when the
//! key was released, or when the lease itself is lost (then `lease_revoked` is reported).

use anyhow::{Context, Result, bail};
use pgkeep_core::ha::{HaConfig, LeaderLease, Millis};

use super::{Shell, ttl_secs};
use crate::dcs::{Dcs, DcsError, KeepaliveReply};

/// The deadline of a proof while it lies ahead of `now`: `None` without a proof or once the
/// deadline has passed.
pub(super) fn live_deadline(
    ha: &HaConfig,
    now: Millis,
    proof: Option<LeaderLease>,
) -> Option<Millis> {
    proof
        .map(|l| ha.lease_deadline(l.sent_at, l.granted_ttl))
        .filter(|d| now < *d)
}

/// When a cycle's own keepalive of the agent's lease runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeepaliveAt {
    /// A live proof: the decision's renewal keeps the lease alive.
    Renewal,
    /// No live proof and PostgreSQL cannot commit: before the decision, so that it sees a lease
    /// etcd no longer has.
    BeforeDecision,
    /// No live proof and PostgreSQL may commit: the decision (a fence, unless a paused primary
    /// without any proof only renews) comes first, etcd after. A keepalive can take
    /// `retry_timeout`; the fence must not wait for it.
    AfterDecision,
}

pub(super) fn keepalive_at(proof_live: bool, pg_may_commit: bool) -> KeepaliveAt {
    match (proof_live, pg_may_commit) {
        (true, _) => KeepaliveAt::Renewal,
        (false, false) => KeepaliveAt::BeforeDecision,
        (false, true) => KeepaliveAt::AfterDecision,
    }
}

/// How long an action may run: a DCS action (or a checkpoint) never past a live proof's
/// deadline, so the next decision can fence in time whatever etcd does. Without a live proof
/// nothing bounds it but the call's own timeout: the decision that saw the deadline pass fenced
/// first, and the renewal after it must be able to succeed, or the node could never recover.
pub(super) fn action_budget(
    ha: &HaConfig,
    now: Millis,
    proof: Option<LeaderLease>,
    bounded: bool,
) -> Option<Millis> {
    live_deadline(ha, now, proof)
        .filter(|_| bounded)
        .map(|d| d - now)
}

/// The action failed because etcd does not know the agent's lease any more (expired or
/// revoked): the keys on it, the leader key included, are gone.
pub(super) fn lease_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<DcsError>(),
            Some(DcsError::LeaseNotFound { .. })
        )
    })
}

/// The deadline the guard is armed with right after a successful renewal or acquisition (none
/// in pause: the guard stays disarmed).
pub(super) fn guard_after_renewal(ha: &HaConfig, proof: Option<LeaderLease>) -> Option<Millis> {
    proof
        .filter(|_| !ha.pause)
        .map(|l| ha.lease_deadline(l.sent_at, l.granted_ttl))
}

/// The gate before PostgreSQL is made writable (a promotion, a start as primary): refused once
/// the lease deadline has passed or the lease is gone; otherwise the deadline the guard must be
/// armed with first (none in pause).
pub(super) fn writable_until(
    ha: &HaConfig,
    now: Millis,
    proof: Option<LeaderLease>,
    lease_revoked: bool,
) -> Result<Option<Millis>> {
    let Some(deadline) = live_deadline(ha, now, proof).filter(|_| !lease_revoked) else {
        bail!("the lease deadline passed, or the lease is gone");
    };
    Ok((!ha.pause).then_some(deadline))
}

impl Shell {
    /// The deadline of this agent's proof while it lies ahead.
    pub(super) fn live_deadline(&self) -> Option<Millis> {
        live_deadline(&self.ha, self.now(), self.leader_lease)
    }

    /// One keepalive of the agent's lease (on a new lease first if the old one was lost). A
    /// lease etcd no longer knows is lost: see [`Shell::lease_lost`].
    pub(super) async fn keepalive(&mut self) -> Result<KeepaliveReply> {
        self.regrant_lost_lease().await?;
        self.keepalives += 1;
        match self.dcs.keepalive(self.lease.id).await {
            Ok(reply) if reply.granted_ttl > 0 => {
                self.lease_revoked = false;
                Ok(reply)
            }
            Ok(_) | Err(DcsError::LeaseNotFound { .. }) => {
                self.lease_lost();
                bail!("lease expired")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// etcd no longer knows the agent's lease (a keepalive answered TTL ≤ 0, or any call "lease
    /// not found"): every key on it is gone, the leader key included. The proof goes with it
    /// (its deadline is never reused) and the core is told (`lease_revoked`: a PostgreSQL that
    /// may commit is fenced at once). A new lease is granted before the next DCS call, not
    /// here: the decision that fences comes first.
    pub(super) fn lease_lost(&mut self) {
        tracing::warn!(
            lease = format_args!("{:x}", self.lease.id),
            "the lease is gone; a new one is granted before the next etcd call"
        );
        self.lease_revoked = true;
        self.leader_lease = None;
        self.lease_gone = true;
    }

    /// Grants the new lease after [`Shell::lease_lost`], instead of retrying the dead one until
    /// the deadline.
    pub(super) async fn regrant_lost_lease(&mut self) -> Result<()> {
        if !self.lease_gone {
            return Ok(());
        }
        let lease = self
            .dcs
            .grant_lease(ttl_secs(&self.ha))
            .await
            .context("granting a new lease for the lost one")?;
        tracing::info!(lease = format_args!("{:x}", lease.id), "new lease granted");
        self.lease = lease;
        self.lease_gone = false;
        Ok(())
    }

    /// A new `ttl` needs a lease granted with it (etcd cannot change a lease's TTL). The keys
    /// move to the new lease with their next write (the leader key at the next renewal, within
    /// this cycle); the old lease is no longer kept alive and expires with nothing attached.
    pub(super) async fn regrant_lease(&mut self) {
        match self.dcs.grant_lease(ttl_secs(&self.ha)).await {
            Ok(lease) => {
                tracing::info!(ttl = ttl_secs(&self.ha), "ttl changed: new lease granted");
                self.lease = lease;
            }
            Err(e) => tracing::error!(
                error = %e,
                "ttl changed but no new lease could be granted; keeping the old one"
            ),
        }
    }

    /// Right after each successful renewal or acquisition: the guard learns the new deadline at
    /// once, not at the end of the decision, so the actions that follow (a promotion, a start)
    /// run under it. In pause the guard stays disarmed.
    pub(super) fn arm_guard_for_proof(&mut self) {
        if let Some(d) = guard_after_renewal(&self.ha, self.leader_lease) {
            self.arm_guard(d);
        }
    }

    /// Writes `armed <deadline>`, starting the guard first if it does not run yet (the first
    /// cycle of an agent may promote before the end-of-cycle upkeep ever started it).
    fn arm_guard(&mut self, deadline: Millis) {
        if let Err(e) = self.guard.ensure_running() {
            tracing::error!(
                error = format!("{e:#}"),
                "NO FENCE GUARD: a frozen or killed agent would leave PostgreSQL running past the lease"
            );
        }
        self.guard.arm(self.instant(deadline));
    }

    /// Immediately before PostgreSQL is made writable (a promotion, a start as primary): the
    /// lease deadline must still lie ahead, and the guard is armed with it first, so a primary
    /// never runs while the state file says `disarmed`. Refused once the deadline passed.
    pub(super) fn before_writable(&mut self, what: &str) -> Result<()> {
        let arm = writable_until(&self.ha, self.now(), self.leader_lease, self.lease_revoked)
            .with_context(|| format!("not {what}"))?;
        if let Some(deadline) = arm {
            self.arm_guard(deadline);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pgkeep_core::cluster::{ClusterView, Initialize, LeaderKey, MemberKey};
    use pgkeep_core::ha::{
        Action, DataDir, DcsSession, LocalObservation, PgObservation, PgProcess, Reason, decide,
    };

    use super::*;

    const SYSID: &str = "7300000000000000001";

    /// ttl 10 s, margin 2 s: a proof sent at `sent` is good until `sent + 8 s`.
    fn ha(pause: bool) -> HaConfig {
        HaConfig {
            ttl: Millis::from_secs(10),
            loop_wait: Millis::from_secs(2),
            retry_timeout: Millis::from_secs(3),
            lease_safety_margin: Millis::from_secs(2),
            pause,
            ..HaConfig::default()
        }
    }

    fn proof(sent: u64) -> LeaderLease {
        LeaderLease {
            sent_at: Millis(sent),
            granted_ttl: Millis::from_secs(10),
            revision: 10,
        }
    }

    /// n1 holds the key in the view and runs a primary; the shell reports `session`.
    fn primary_n1(session: DcsSession) -> (ClusterView, LocalObservation) {
        let view = ClusterView {
            initialize: Some(Initialize::SystemId(SYSID.into())),
            leader: Some(LeaderKey {
                name: "n1".into(),
                lease: 1,
                mod_revision: 10,
            }),
            members: BTreeMap::from([(
                "n1".to_owned(),
                MemberKey {
                    data: Default::default(),
                    mod_revision: 5,
                    lease: 1,
                },
            )]),
            history: Some(Vec::new()),
            ..ClusterView::default()
        };
        let obs = LocalObservation {
            name: "n1".into(),
            pg: PgObservation {
                process: PgProcess::Running,
                in_recovery: false,
                timeline: Some(1),
                data_dir: DataDir::Initialised {
                    system_id: SYSID.into(),
                },
                ..PgObservation::default()
            },
            dcs: DcsSession {
                reachable: false,
                view_revision: 100,
                ..session
            },
            ever_joined: true,
            ..LocalObservation::default()
        };
        (view, obs)
    }

    /// Bug A: a paused leader cut off from etcd. The shell used to drop its proof once the
    /// deadline passed, so the core (paused, no proof) kept the primary running without a lease
    /// while `ctl failover` could promote another node. The proof now reaches the core as it
    /// is, and the fence comes before any etcd call.
    #[test]
    fn an_expired_proof_reaches_the_core_and_fences_a_paused_primary_before_any_etcd_call() {
        let cfg = ha(true);
        let held = Some(proof(1_000));
        let now = Millis(9_000);
        assert_eq!(
            live_deadline(&cfg, Millis(8_999), held),
            Some(Millis(9_000))
        );
        assert_eq!(live_deadline(&cfg, now, held), None);
        // PostgreSQL may commit: no keepalive before the decision.
        assert_eq!(keepalive_at(false, true), KeepaliveAt::AfterDecision);
        let (view, obs) = primary_n1(DcsSession {
            leader_lease: held,
            ..DcsSession::default()
        });
        let d = decide(now, &cfg, &view, &obs);
        assert_eq!(d.actions[0], Action::Fence, "{d:?}");
        assert_eq!(d.reason, Reason::LeaseDeadlinePassed { deadline: now });
        // The same primary without any proof from this agent (an agent restarted in pause)
        // is left running: that is what pause allows.
        let (view, obs) = primary_n1(DcsSession::default());
        assert!(
            !decide(now, &cfg, &view, &obs)
                .actions
                .contains(&Action::Fence)
        );
    }

    /// Why the old shell dropped the proof: an expired one must not give every DCS action a
    /// zero budget (the node could never renew again). It bounds nothing now.
    #[test]
    fn only_a_live_proof_bounds_dcs_actions() {
        let cfg = ha(false);
        let held = Some(proof(1_000));
        assert_eq!(
            action_budget(&cfg, Millis(6_000), held, true),
            Some(Millis(3_000))
        );
        assert_eq!(action_budget(&cfg, Millis(6_000), held, false), None);
        assert_eq!(action_budget(&cfg, Millis(9_000), held, true), None);
        assert_eq!(action_budget(&cfg, Millis(6_000), None, true), None);
    }

    /// Bugs B and C: the guard's state file says `armed <deadline>` right after a renewal and
    /// before PostgreSQL is made writable (it said `disarmed` until the end of the decision,
    /// while a promotion, a `pg_ctl promote` of up to 30 s or a member put ran); a promotion or
    /// start as primary is refused once the deadline passed. Pause keeps the guard disarmed.
    #[test]
    fn the_guard_is_armed_before_postgres_is_made_writable() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(crate::guard::STATE_FILE);
        let mut guard = crate::guard::GuardHandle::new(crate::guard::GuardArgs {
            state: state.clone(),
            config_dir: dir.path().to_owned(),
            data_dir: dir.path().join("data"),
        });
        guard.disarm();
        let origin = std::time::Instant::now();
        let at = |m: Millis| origin + std::time::Duration::from_millis(m.0);
        let read = || crate::guard::GuardState::parse(&std::fs::read_to_string(&state).unwrap());
        let cfg = ha(false);
        // A renewal sent at 1 s: armed until 9 s at once.
        let renewed = Some(proof(1_000));
        let d = guard_after_renewal(&cfg, renewed).unwrap();
        assert_eq!(d, Millis(9_000));
        guard.arm(at(d));
        assert!(matches!(
            read(),
            Some(crate::guard::GuardState::Armed { .. })
        ));
        // Before promoting at 5 s: armed with the live deadline; at 9 s: refused.
        assert_eq!(
            writable_until(&cfg, Millis(5_000), renewed, false).unwrap(),
            Some(d)
        );
        assert!(writable_until(&cfg, Millis(9_000), renewed, false).is_err());
        assert!(writable_until(&cfg, Millis(5_000), renewed, true).is_err());
        assert!(writable_until(&cfg, Millis(5_000), None, false).is_err());
        // Paused: still refused past the deadline, but the guard is left disarmed.
        let paused = ha(true);
        assert_eq!(guard_after_renewal(&paused, renewed), None);
        assert_eq!(
            writable_until(&paused, Millis(5_000), renewed, false).unwrap(),
            None
        );
        assert!(writable_until(&paused, Millis(9_000), renewed, false).is_err());
    }

    /// Bug D: without a live proof the cycle's keepalive (up to `retry_timeout`) runs before
    /// the decision only when PostgreSQL cannot commit.
    #[test]
    fn the_fence_never_waits_behind_the_cycles_keepalive() {
        assert_eq!(keepalive_at(true, true), KeepaliveAt::Renewal);
        assert_eq!(keepalive_at(true, false), KeepaliveAt::Renewal);
        assert_eq!(keepalive_at(false, false), KeepaliveAt::BeforeDecision);
        assert_eq!(keepalive_at(false, true), KeepaliveAt::AfterDecision);
    }

    /// Bug G: a put answered "lease not found" (a member put, with keepalives still acknowledged
    /// as in etcd#15247) means the lease and the leader key are gone; the agent kept retrying
    /// the dead lease until its deadline. The error is recognised through the action's context;
    /// the shell then drops the proof and reports the lease revoked (`Shell::lease_lost`), and
    /// the core fences at once; a new lease is granted before the next etcd call.
    #[test]
    fn lease_not_found_from_any_put_is_a_lost_lease() {
        let e =
            anyhow::Error::from(DcsError::LeaseNotFound { lease: 0x1f }).context("publish member");
        assert!(lease_not_found(&e));
        let other = anyhow::Error::from(DcsError::Timeout {
            op: "put_member",
            budget: std::time::Duration::from_secs(3),
            last_error: None,
        });
        assert!(!lease_not_found(&other));
        assert!(!lease_not_found(&anyhow::anyhow!("lease not found")));
        // What the shell reports after `lease_lost`: no proof, lease revoked.
        let (view, obs) = primary_n1(DcsSession {
            lease_revoked: true,
            ..DcsSession::default()
        });
        let d = decide(Millis(2_000), &ha(false), &view, &obs);
        assert_eq!(
            (d.actions[0].clone(), d.reason),
            (Action::Fence, Reason::LeaseRevoked)
        );
    }
}
