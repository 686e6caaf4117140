//! The top of the decision: the order in which rules are tried, lease and fencing rules, and the
//! leader's own cycle. The other rule families live in sibling modules.

use crate::cluster::{ClusterView, Initialize, MemberData};

use super::action::{Action, Decision, MemberState, StartRole, StopMode, WatchdogCmd};
use super::config::HaConfig;
use super::reason::Reason;
use super::types::{
    DataDir, HaMemory, Handover, HandoverKind, LocalObservation, Millis, PgProcess, SeenLeader,
};
use super::{bootstrap, leader_race, member, rejoin, slots, switchover, sync};

/// Decides the node's next steps. Pure: the result depends only on the arguments.
///
/// Rules are tried in this order (first match wins): fencing of a writable PostgreSQL that may
/// not lead; a running background operation; shutdown; empty data directory (bootstrap and
/// clone); system identifier check; the leader's cycle when this node holds the key; following
/// another leader; the leader race when there is none. The member key is published at the end of
/// every decision whose data changed.
pub fn decide(
    now: Millis,
    config: &HaConfig,
    view: &ClusterView,
    obs: &LocalObservation,
) -> Decision {
    let mut cx = Ctx::new(now, config, view, obs);
    cx.track();
    let plan = cx.plan();
    cx.finish(plan)
}

/// Everything a rule needs, plus the memory being built for the next decision.
pub(crate) struct Ctx<'a> {
    pub(crate) now: Millis,
    pub(crate) cfg: &'a HaConfig,
    pub(crate) view: &'a ClusterView,
    pub(crate) obs: &'a LocalObservation,
    pub(crate) mem: HaMemory,
}

/// A decision before the common finishing steps.
pub(crate) struct Plan {
    pub(crate) actions: Vec<Action>,
    pub(crate) reason: Reason,
    pub(crate) state: MemberState,
    pub(crate) wake_at: Option<Millis>,
    pub(crate) watchdog: Option<WatchdogCmd>,
}

impl Plan {
    pub(crate) fn new(state: MemberState, reason: Reason) -> Plan {
        Plan {
            actions: Vec::new(),
            reason,
            state,
            wake_at: None,
            watchdog: None,
        }
    }

    pub(crate) fn with(mut self, action: Action) -> Plan {
        self.actions.push(action);
        self
    }

    pub(crate) fn wake(mut self, at: Millis) -> Plan {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        self
    }

    pub(crate) fn watchdog(mut self, cmd: WatchdogCmd) -> Plan {
        self.watchdog = Some(cmd);
        self
    }
}

impl<'a> Ctx<'a> {
    fn new(
        now: Millis,
        cfg: &'a HaConfig,
        view: &'a ClusterView,
        obs: &'a LocalObservation,
    ) -> Ctx<'a> {
        Ctx {
            now,
            cfg,
            view,
            obs,
            mem: obs.memory.clone(),
        }
    }

    pub(crate) fn me(&self) -> &'a str {
        &self.obs.name
    }

    /// Updates the memory from the view: when each leader revision was first seen, since when the
    /// key is missing, which members exist.
    fn track(&mut self) {
        let now = self.now;
        match &self.view.leader {
            Some(l) => {
                let same = self
                    .mem
                    .last_leader
                    .as_ref()
                    .is_some_and(|s| s.name == l.name && s.revision == l.mod_revision);
                if !same {
                    self.mem.last_leader = Some(SeenLeader {
                        name: l.name.clone(),
                        revision: l.mod_revision,
                        seen_at: now,
                    });
                }
                self.mem.leader_absent_since = None;
            }
            None => {
                if self.mem.leader_absent_since.is_none() {
                    self.mem.leader_absent_since = Some(now);
                }
            }
        }
        for name in self.view.members.keys() {
            self.mem.members_seen.insert(name.clone(), now);
        }
        let ttl = self.cfg.member_slots_ttl;
        self.mem
            .members_seen
            .retain(|_, seen| now.0.saturating_sub(seen.0) <= ttl.0);
        if self.holds_key()
            && self
                .obs
                .dcs
                .leader_lease
                .is_some_and(|l| self.mem.released_revision.is_some_and(|r| l.revision > r))
        {
            // We lead again: the old marker is moot.
            self.mem.released_revision = None;
        }
        let holding = self.holds_key();
        if holding && !self.mem.was_holding {
            self.mem.guard_computed = false;
        }
        self.mem.was_holding = holding;
        if !self.holds_key() {
            self.mem.handover = None;
            self.mem.primary_start_began = None;
            self.mem.sync_change_lsn = None;
        }
    }

    /// The holder of the leader key: our own put wins over an older view.
    pub(crate) fn key_holder(&self) -> Option<&'a str> {
        if let Some(l) = &self.obs.dcs.leader_lease
            && l.revision > self.obs.dcs.view_revision
            && !self.obs.dcs.lease_revoked
        {
            return Some(self.me());
        }
        self.view.leader.as_ref().map(|l| l.name.as_str())
    }

    pub(crate) fn holds_key(&self) -> bool {
        self.key_holder() == Some(self.me())
    }

    /// The lease deadline proven by this agent, if any.
    pub(crate) fn deadline(&self) -> Option<Millis> {
        if self.obs.dcs.lease_revoked {
            return None;
        }
        self.obs
            .dcs
            .leader_lease
            .map(|l| self.cfg.lease_deadline(l.sent_at, l.granted_ttl))
    }

    pub(crate) fn lease_valid(&self) -> bool {
        self.deadline().is_some_and(|d| self.now < d)
    }

    pub(crate) fn sync_active(&self) -> bool {
        self.cfg.sync_mode()
            && self
                .view
                .sync
                .as_ref()
                .is_some_and(|s| s.value.leader.is_some())
    }

    pub(crate) fn member(&self, name: &str) -> Option<&'a MemberData> {
        self.view.members.get(name).map(|m| &m.data)
    }

    /// The default next wake-up.
    pub(crate) fn next_cycle(&self) -> Millis {
        self.now + self.cfg.loop_wait
    }

    fn plan(&mut self) -> Plan {
        if let Some(p) = self.fence_if_needed() {
            return p;
        }
        if self.obs.dcs.view_revision == 0 {
            // Never read the DCS since the agent started: nothing but fencing can be decided.
            let state = if self.obs.pg.is_running_replica() {
                MemberState::Replica
            } else {
                MemberState::Stopped
            };
            return Plan::new(state, Reason::NoDcsView);
        }
        if self.obs.busy.is_some() {
            let state = match self.obs.busy {
                Some(super::types::LongOperation::Initdb) => MemberState::Bootstrapping,
                Some(super::types::LongOperation::Clone) => MemberState::Cloning,
                _ => MemberState::Rewinding,
            };
            let mut p = Plan::new(state, Reason::Busy);
            if self.holds_key() {
                p = p.with(Action::RenewLeaderKey);
            }
            return p;
        }
        if self.obs.requests.shutdown {
            return self.shutdown();
        }
        if !matches!(self.obs.pg.data_dir, DataDir::Initialised { .. }) {
            return bootstrap::plan_empty(self);
        }
        if let Some(p) = bootstrap::after_initdb(self) {
            return p;
        }
        if let Some(p) = self.check_system_id() {
            return p;
        }
        if self.holds_key() {
            return self.leader_cycle();
        }
        if let Some(leader) = self.key_holder() {
            return rejoin::follow(self, leader);
        }
        leader_race::plan(self)
    }

    /// Rule family "lease and fencing": a PostgreSQL that may commit is stopped at once when the
    /// lease is revoked, the key is gone or taken, the deadline passed, or this agent never proved
    /// the lease. Pause suspends none of these but the last.
    fn fence_if_needed(&mut self) -> Option<Plan> {
        let pg = &self.obs.pg;
        if !pg.may_commit() {
            return None;
        }
        let paused = self.cfg.pause;
        let reason = if self.obs.dcs.lease_revoked {
            Reason::LeaseRevoked
        } else {
            match self.key_holder() {
                Some(h) if h != self.me() => Reason::LeaderKeyTaken {
                    holder: h.to_owned(),
                },
                None => {
                    let held_before = self.obs.dcs.leader_lease.is_some()
                        || self
                            .mem
                            .last_leader
                            .as_ref()
                            .is_some_and(|l| l.name == self.me());
                    if paused && !held_before {
                        // Pause: a running primary without a key takes it (Patroni's rule).
                        return None;
                    }
                    Reason::LeaderKeyGone
                }
                Some(_) => match self.deadline() {
                    // Paused and this agent never proved the key (restarted in pause): it
                    // renews and leaves PostgreSQL alone, as Patroni does. A proof whose
                    // deadline passed is never `None` here (the shell reports it as it is):
                    // pause is no automatic failover, not committing without a lease.
                    None if paused => return None,
                    None => Reason::NoLeaseProof,
                    Some(d) if self.now >= d => Reason::LeaseDeadlinePassed { deadline: d },
                    Some(_) => return None,
                },
            }
        };
        // The fence is a kill the shell completes on its own; the watchdog has done its job.
        let mut p = Plan::new(MemberState::Fencing, reason)
            .with(Action::Fence)
            .watchdog(WatchdogCmd::Disarm);
        if self.holds_key() && !self.obs.dcs.lease_revoked {
            p = p.with(Action::RenewLeaderKey);
        }
        self.mem.handover = None;
        Some(p)
    }

    fn check_system_id(&self) -> Option<Plan> {
        let DataDir::Initialised { system_id } = &self.obs.pg.data_dir else {
            return None;
        };
        match &self.view.initialize {
            Some(Initialize::SystemId(cluster)) if cluster != system_id => Some(Plan::new(
                MemberState::Halted,
                Reason::SystemIdMismatch {
                    local: system_id.clone(),
                    cluster: cluster.clone(),
                },
            )),
            _ => None,
        }
    }

    fn shutdown(&mut self) -> Plan {
        let pg = &self.obs.pg;
        if self.holds_key() {
            if self.mem.handover.is_none() {
                self.mem.handover = Some(Handover {
                    kind: HandoverKind::Shutdown,
                    candidate: None,
                    started_at: self.now,
                    confirmed: false,
                });
            }
            return switchover::continue_handover(self);
        }
        let mut p = Plan::new(MemberState::Stopped, Reason::ShuttingDown);
        if matches!(pg.process, PgProcess::Running | PgProcess::Starting) {
            p = p.with(Action::Stop {
                mode: StopMode::Fast,
            });
        }
        p
    }

    /// The cycle of the key holder whose PostgreSQL is not writable without right (that case was
    /// fenced already).
    fn leader_cycle(&mut self) -> Plan {
        if !self.lease_valid() {
            // Holder by the view, but this agent has no valid proof: renew first, change nothing.
            let state = if self.obs.pg.is_running_primary() {
                MemberState::Primary
            } else {
                MemberState::LeaderPending
            };
            return Plan::new(state, Reason::LeaderRenewed)
                .with(Action::RenewLeaderKey)
                .watchdog(WatchdogCmd::Hold);
        }
        if self.mem.handover.is_some() {
            return switchover::continue_handover(self);
        }
        let pg = &self.obs.pg;
        let paused = self.cfg.pause;
        if paused && !pg.may_commit() && pg.process != PgProcess::Promoting {
            // Patroni: a paused lock holder that is not primary releases the key.
            self.mem.handover = Some(Handover {
                kind: HandoverKind::PausedNotPrimary,
                candidate: None,
                started_at: self.now,
                confirmed: false,
            });
            return switchover::continue_handover(self);
        }
        match pg.process {
            PgProcess::Running if !pg.in_recovery => self.primary_cycle(),
            PgProcess::Running => self.promote(),
            PgProcess::Promoting => Plan::new(MemberState::Promoting, Reason::PromotionInProgress)
                .with(Action::RenewLeaderKey),
            PgProcess::Starting if !pg.in_recovery => self.crashed_primary(),
            PgProcess::Starting | PgProcess::Stopping => {
                Plan::new(MemberState::LeaderPending, Reason::WaitingForPostgres)
                    .with(Action::RenewLeaderKey)
            }
            PgProcess::Stopped if pg.in_recovery => {
                Plan::new(MemberState::Starting, Reason::StartingReplica)
                    .with(Action::RenewLeaderKey)
                    .with(Action::Start {
                        role: StartRole::Replica { upstream: None },
                    })
            }
            PgProcess::Stopped => self.crashed_primary(),
        }
    }

    /// Holder with a running replica: promote once the takeover guard and the sync state allow.
    /// The guard is computed by the first decision whose view contains our own create (so the
    /// deletion that preceded it is known); when it cannot be proven shorter, it ends `ttl`
    /// after that decision, which is after our create succeeded, which is after the previous
    /// holder's last renewal.
    fn promote(&mut self) -> Plan {
        if self
            .view
            .leader
            .as_ref()
            .is_none_or(|l| l.name != self.me())
        {
            // Our create is not in the view yet, so neither is every change before it: wait.
            return Plan::new(MemberState::LeaderPending, Reason::WaitingForOwnKey)
                .with(Action::RenewLeaderKey);
        }
        if self.sync_active()
            && !self
                .view
                .sync
                .as_ref()
                .is_some_and(|s| s.value.contains(self.me()))
        {
            // `/sync` changed after we raced (another member took it over while trying to
            // promote): we may not promote; hand the key to a member it names.
            self.mem.handover = Some(Handover {
                kind: HandoverKind::NotSynchronous,
                candidate: None,
                started_at: self.now,
                confirmed: false,
            });
            return switchover::continue_handover(self);
        }
        if !self.mem.guard_computed || self.mem.promote_not_before.is_none() {
            let ttl_from_now = self.now + self.cfg.ttl;
            let guard = match &self.obs.dcs.deleted_leader {
                // We held the key last (and did not promote, or were fenced): the guard of the
                // holder before us still applies. Unknown after an agent restart: a full ttl.
                Some(d) if d.name == self.me() => self
                    .mem
                    .promote_not_before
                    .map_or(ttl_from_now, |g| g.max(self.now)),
                _ => leader_race::takeover_not_before(self).unwrap_or(ttl_from_now),
            };
            self.mem.promote_not_before = Some(guard);
            self.mem.guard_computed = true;
        }
        let not_before = self.mem.promote_not_before.unwrap_or(self.now);
        if self.now < not_before {
            return Plan::new(
                MemberState::LeaderPending,
                Reason::TakeoverGuard { until: not_before },
            )
            .with(Action::RenewLeaderKey)
            .wake(not_before);
        }
        let mut p =
            Plan::new(MemberState::Promoting, Reason::Promoting).with(Action::RenewLeaderKey);
        if self.cfg.sync_mode() {
            for a in sync::before_promote(self) {
                p = p.with(a);
            }
        }
        let deadline = self.deadline().unwrap_or(self.now);
        p.with(Action::Promote)
            .watchdog(WatchdogCmd::Arm { until: deadline })
    }

    /// Holder whose primary is down or starting: crash recovery, or hand over after
    /// `primary_start_timeout` when a failover is possible.
    fn crashed_primary(&mut self) -> Plan {
        let began = *self.mem.primary_start_began.get_or_insert(self.now);
        let timeout = self.cfg.primary_start_timeout;
        let expired = timeout == Millis::ZERO || self.now >= began + timeout;
        if expired && switchover::failover_possible(self, None) {
            self.mem.handover = Some(Handover {
                kind: HandoverKind::StartTimeout,
                candidate: None,
                started_at: self.now,
                confirmed: false,
            });
            let mut p = switchover::continue_handover(self);
            p.reason = if timeout == Millis::ZERO {
                Reason::ImmediateFailoverAfterCrash
            } else {
                Reason::PrimaryStartTimeout
            };
            return p;
        }
        let reason = if expired {
            Reason::NoFailoverPossible
        } else {
            Reason::RestartingCrashedPrimary
        };
        let mut p = Plan::new(MemberState::Recovering, reason).with(Action::RenewLeaderKey);
        if self.obs.pg.process == PgProcess::Stopped {
            p = p.with(Action::Start {
                role: StartRole::Primary,
            });
        }
        if timeout > Millis::ZERO && !expired {
            p = p.wake(began + timeout);
        }
        p
    }

    /// The leader's cycle with a running primary.
    fn primary_cycle(&mut self) -> Plan {
        self.mem.primary_start_began = None;
        // A primary's own term needs no guard if it loses the key and takes it again.
        self.mem.promote_not_before = Some(self.now);
        let mut note = None;
        match switchover::on_leader(self) {
            Some(switchover::LeaderRequest::Act(p)) => return p,
            Some(switchover::LeaderRequest::Note {
                reason,
                actions,
                wake,
            }) => note = Some((reason, actions, wake)),
            None => {}
        }
        if self.obs.requests.restart {
            // `POST /restart` on the leader: restart the primary in place while holding the key
            // (renewed first, so the restart has a whole lease to finish in), as Patroni does.
            return Plan::new(MemberState::Primary, Reason::RestartRequested)
                .with(Action::RenewLeaderKey)
                .with(Action::Restart);
        }
        let mut p =
            Plan::new(MemberState::Primary, Reason::LeaderRenewed).with(Action::RenewLeaderKey);
        if let Some((reason, actions, wake)) = note {
            p.reason = reason;
            p.actions.extend(actions);
            if let Some(w) = wake {
                p = p.wake(w);
            }
        }
        let DataDir::Initialised { system_id } = &self.obs.pg.data_dir else {
            unreachable!("primary_cycle runs with an initialised data directory")
        };
        if !matches!(&self.view.initialize, Some(Initialize::SystemId(s)) if s == system_id) {
            p = p.with(Action::WriteInitialize {
                system_id: system_id.clone(),
                create_only: false,
            });
        }
        for a in member::history_actions(self) {
            p = p.with(a);
        }
        for a in member::status_actions(self) {
            p = p.with(a);
        }
        for a in sync::on_primary(self) {
            p = p.with(a);
        }
        for a in slots::on_primary(self) {
            p = p.with(a);
        }
        p
    }

    fn finish(self, mut plan: Plan) -> Decision {
        let deadline = self.deadline().filter(|d| self.now < *d);
        let writable = self.obs.pg.may_commit()
            || plan.actions.iter().any(|a| {
                matches!(
                    a,
                    Action::Promote
                        | Action::Start {
                            role: StartRole::Primary
                        }
                )
            });
        let fencing = plan.actions.contains(&Action::Fence);
        let watchdog = plan.watchdog.unwrap_or(if fencing {
            WatchdogCmd::Disarm
        } else if writable {
            match deadline {
                Some(d) if self.holds_key() => WatchdogCmd::Arm { until: d },
                _ => WatchdogCmd::Hold,
            }
        } else {
            WatchdogCmd::Disarm
        });
        let mut wake = plan
            .wake_at
            .unwrap_or(self.next_cycle())
            .min(self.next_cycle());
        if let Some(d) = deadline
            && (writable || self.holds_key())
        {
            wake = wake.min(d);
        }
        wake = wake.max(self.now + Millis(1));
        // Persist the "ever joined" marker once the data directory demonstrably belongs here.
        if !self.obs.ever_joined
            && self.obs.pg.process == PgProcess::Running
            && let DataDir::Initialised { system_id } = &self.obs.pg.data_dir
            && matches!(&self.view.initialize, Some(Initialize::SystemId(s)) if s == system_id)
        {
            plan.actions.push(Action::PersistJoined);
        }
        let releasing = plan.actions.contains(&Action::ReleaseLeaderKey);
        if !releasing {
            let data = member::member_data(&self, plan.state);
            let current = self.view.members.get(self.me()).map(|m| &m.data);
            if current != Some(&data) {
                plan.actions.push(Action::PublishMember(Box::new(data)));
            }
        }
        Decision {
            actions: plan.actions,
            reason: plan.reason,
            state: plan.state,
            memory: self.mem,
            wake_at: wake,
            watchdog,
        }
    }
}
