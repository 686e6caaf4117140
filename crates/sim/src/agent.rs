//! The simulated agent shell: it builds observations, calls the core's `decide`, and executes
//! the actions the way the real shell must (DCS actions in order, stopping at the first failure;
//! fencing never delayed by a DCS call in flight).

use std::collections::VecDeque;

use pgkeep_core::cluster::{Initialize, MemberData};
use pgkeep_core::ha::{
    Action, DataDir, DcsSession, HaMemory, LeaderLease, LocalObservation, LocalRequests,
    MemberState, Millis, PeerReport, PgObservation, PgProcess, ReplicationRow, WatchdogCmd, decide,
};

use crate::Variant;
use crate::cache::Cache;
use crate::etcd::{Key, Op, OpResult, WatchEvent};
use crate::peers::Fetch;
use crate::pg::Data;
use crate::world::{Ep, Ev, World};

/// One step of a batch.
#[derive(Debug, Clone)]
enum Step {
    Grant,
    Range,
    KeepAlive,
    Dcs(Action),
    Local(Action),
}

#[derive(Debug, Clone, Default)]
struct Batch {
    steps: VecDeque<Step>,
    current: Option<(u64, Step, u64)>,
    keepalive: Option<(Millis, Millis)>,
    kick_after: bool,
}

/// The agent process of one node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Agent {
    pub(crate) alive: bool,
    pub(crate) inc: u64,
    pub(crate) frozen_until: u64,
    pub(crate) memory: HaMemory,
    pub(crate) dcs: DcsSession,
    pub(crate) lease: Option<i64>,
    last_keepalive: Option<u64>,
    pub(crate) cache: Cache,
    batch: Option<Batch>,
    pub(crate) dropped: bool,
    pub(crate) fetch: Option<Fetch>,
    pub(crate) report: Option<PeerReport>,
    pub(crate) report_at: u64,
    pub(crate) wake_gen: u64,
    pub(crate) rewind_failed: bool,
    pub(crate) requests: LocalRequests,
    pub(crate) next_id: u64,
    pub(crate) last: Option<(MemberState, String)>,
}

impl Agent {
    /// A fresh process (memory and session lost).
    pub(crate) fn start(&mut self) {
        let inc = self.inc + 1;
        *self = Agent {
            alive: true,
            inc,
            ..Agent::default()
        };
    }

    /// The process dies.
    pub(crate) fn die(&mut self) {
        self.alive = false;
        self.inc += 1;
        self.frozen_until = 0;
        self.batch = None;
        self.fetch = None;
        self.cache.break_stream();
    }
}

impl World {
    fn observation(&mut self, i: usize) -> LocalObservation {
        let n = &self.nodes[i];
        let pg = &n.pg;
        let replication = if pg.process == PgProcess::Running && !pg.in_recovery {
            self.nodes
                .iter()
                .enumerate()
                .filter(|(j, m)| {
                    *j != i
                        && !m.down
                        && m.pg.process == PgProcess::Running
                        && m.pg.in_recovery
                        && m.pg.upstream == Some(i)
                        && m.pg.streaming
                })
                .map(|(_, m)| ReplicationRow {
                    application_name: m.name.clone(),
                    streaming: true,
                    flush_lsn: m.pg.lsn(),
                    sync: pg.ssn.names.contains(&m.name),
                })
                .collect()
        } else {
            Vec::new()
        };
        let observed = PgObservation {
            process: pg.process,
            in_recovery: pg.in_recovery,
            crashed: pg.crashed,
            timeline: matches!(pg.data, Data::Init(_)).then_some(pg.tl),
            wal_position: pg.lsn(),
            replay_lsn: None,
            upstream: pg.upstream.map(|u| self.nodes[u].name.clone()),
            streaming: pg.streaming,
            started_at: pg.started_at.map(|t| Millis(n.clock.local(t))),
            timeline_history: pg.history.clone(),
            sync_standby_names: pg.ssn.clone(),
            replication,
            slots: pg.slots.clone(),
            logical_slots: Default::default(),
            data_dir: match &pg.data {
                Data::Empty => DataDir::Empty,
                Data::Init(s) => DataDir::Initialised {
                    system_id: s.clone(),
                },
            },
        };
        let a = &mut self.nodes[i].agent;
        let mut dcs = a.dcs.clone();
        dcs.reachable = a.cache.connected;
        dcs.view_revision = a.cache.rev;
        dcs.deleted_leader = a.cache.deleted_leader.clone();
        dcs.initialize_claimed = a.lease.is_some_and(|l| l == a.cache.initialize_lease)
            && a.cache.view.initialize == Some(Initialize::InProgress);
        let mut memory = std::mem::take(&mut a.memory);
        if self.sim.variant == Variant::NoTakeoverGuard {
            memory.promote_not_before = Some(Millis::ZERO);
        }
        // A peer report is used by the next decision whose actions run, if it is still fresh.
        let fresh = self.now.saturating_sub(self.nodes[i].agent.report_at) <= self.ha.loop_wait.0;
        let peers = self.nodes[i].agent.report.take().filter(|_| fresh);
        let n = &self.nodes[i];
        LocalObservation {
            name: n.name.clone(),
            tags: n.tags.clone(),
            member_template: MemberData {
                conn_url: format!("postgres://{}:5432/postgres", n.name),
                api_url: format!("https://{}:8008/patroni", n.name),
                version: "4.1.4".into(),
                ..MemberData::default()
            },
            wall_clock_ms: crate::faults::EPOCH_MS + self.now as i64 + n.wall_offset,
            pg: observed,
            dcs,
            peers,
            busy: n.pg.long_op(),
            rewind_failed: n.agent.rewind_failed,
            ever_joined: n.ever_joined,
            initdb_unconfirmed: n.initdb_unconfirmed,
            bootstrap_allowed: n.bootstrap_allowed,
            watchdog_failed: false,
            // The model has no backup repository.
            backup_repository: false,
            restore_interrupted: false,
            requests: n.agent.requests.clone(),
            memory,
        }
    }

    /// Runs one decision on node `i` and executes it.
    pub(crate) fn decide_now(&mut self, i: usize) {
        let now_local = self.local_now(i);
        let obs = self.observation(i);
        let used_report = obs.peers.clone();
        let d = decide(
            Millis(now_local),
            &self.ha,
            &self.nodes[i].agent.cache.view,
            &obs,
        );
        self.stats.decisions += 1;
        if !self.sim.trace {
            self.nodes[i].agent.last = Some((d.state, d.reason.to_string()));
        } else {
            let key = (d.state, d.reason.to_string());
            let interesting = d.actions.iter().any(|a| {
                !matches!(
                    a,
                    Action::PublishMember(_) | Action::RenewLeaderKey | Action::WriteStatus(_)
                )
            });
            if self.nodes[i].agent.last.as_ref() != Some(&key) || interesting {
                let acts: Vec<String> = d.actions.iter().map(short).collect();
                let name = self.nodes[i].name.clone();
                trace!(
                    self,
                    "{name}: [{}] {} -> {}",
                    d.state,
                    d.reason,
                    acts.join(", ")
                );
                self.nodes[i].agent.last = Some(key);
            }
        }
        self.nodes[i].agent.memory = d.memory;
        if !self.fencing_disabled() && self.sim.variant != Variant::NoWatchdog {
            let n = &mut self.nodes[i];
            match d.watchdog {
                WatchdogCmd::Arm { until } => {
                    let fire = self.now + until.0.saturating_sub(now_local);
                    n.wd_gen += 1;
                    n.watchdog = Some(fire);
                    let generation = n.wd_gen;
                    self.at(
                        fire,
                        Ev::WatchdogFire {
                            node: i,
                            generation,
                        },
                    );
                }
                WatchdogCmd::Disarm => {
                    let n = &mut self.nodes[i];
                    n.watchdog = None;
                    n.wd_gen += 1;
                }
                WatchdogCmd::Hold => {}
            }
        }
        let n = &mut self.nodes[i];
        n.agent.wake_gen += 1;
        let generation = n.agent.wake_gen;
        let inc = n.agent.inc;
        let t = n.clock.real_of(d.wake_at.0).max(self.now + 1);
        self.at(
            t,
            Ev::Wake {
                node: i,
                inc,
                generation,
            },
        );
        if self.nodes[i].agent.batch.is_some() {
            for a in &d.actions {
                if *a == Action::Fence {
                    self.exec_local(i, a.clone());
                } else if !matches!(a, Action::PublishMember(_)) {
                    self.nodes[i].agent.dropped = true;
                }
            }
            // The decision was not carried out: keep its peer report for the next one.
            if used_report.is_some() {
                self.nodes[i].agent.report = used_report;
            }
            return;
        }
        self.start_batch(i, d.actions, now_local);
    }

    fn start_batch(&mut self, i: usize, mut actions: Vec<Action>, now_local: u64) {
        // Fencing never waits for anything, not even the shell's own lease bookkeeping.
        if let Some(pos) = actions.iter().position(|a| *a == Action::Fence) {
            actions.remove(pos);
            self.exec_local(i, Action::Fence);
        }
        let loop_wait = self.ha.loop_wait.0;
        let a = &mut self.nodes[i].agent;
        // The shell's own DCS bookkeeping (re-read, lease grant, keepalive) goes right before
        // the decision's first DCS action, so local actions before it are not held up.
        let mut prelude = Vec::new();
        if !a.cache.connected {
            prelude.push(Step::Range);
        }
        if a.lease.is_none() {
            prelude.push(Step::Grant);
        }
        let leader_op = actions
            .iter()
            .any(|x| matches!(x, Action::RenewLeaderKey | Action::AcquireLeaderKey));
        if !leader_op && a.last_keepalive.is_none_or(|t| now_local >= t + loop_wait) {
            prelude.push(Step::KeepAlive);
        }
        let mut b = Batch::default();
        let mut fetch = None;
        let mut prelude = Some(prelude);
        for act in actions {
            let dcs =
                act.is_dcs() || matches!(act, Action::RenewLeaderKey | Action::AcquireLeaderKey);
            if dcs && let Some(p) = prelude.take() {
                b.steps.extend(p);
            }
            match act {
                Action::FetchPeerStatus { members } => fetch = Some(members),
                Action::RenewLeaderKey | Action::AcquireLeaderKey => {
                    b.steps.push_back(Step::KeepAlive);
                    b.steps.push_back(Step::Dcs(act));
                }
                a if a.is_dcs() => b.steps.push_back(Step::Dcs(a)),
                a => b.steps.push_back(Step::Local(a)),
            }
        }
        if let Some(p) = prelude {
            b.steps.extend(p);
        }
        self.nodes[i].agent.batch = Some(b);
        if let Some(members) = fetch {
            self.start_fetch(i, members);
        }
        self.run_batch(i);
    }

    fn run_batch(&mut self, i: usize) {
        loop {
            let Some(b) = self.nodes[i].agent.batch.as_mut() else {
                return;
            };
            let Some(step) = b.steps.pop_front() else {
                let kick = b.kick_after || self.nodes[i].agent.dropped;
                self.end_batch(i, kick);
                return;
            };
            let a = &self.nodes[i].agent;
            let lease = a.lease.unwrap_or(0);
            let name = self.nodes[i].name.clone();
            let op = match &step {
                Step::Local(act) => {
                    self.exec_local(i, act.clone());
                    continue;
                }
                Step::Grant => Op::Grant { ttl: self.ha.ttl.0 },
                Step::Range => Op::Range,
                Step::KeepAlive => Op::KeepAlive { lease },
                Step::Dcs(act) => match act {
                    Action::AcquireLeaderKey => Op::Acquire { name, lease },
                    Action::RenewLeaderKey => Op::Renew { name, lease },
                    Action::ReleaseLeaderKey => Op::Release { name },
                    Action::ClaimInitialize => Op::ClaimInit { lease },
                    Action::ConfirmInitialize { system_id } => Op::ConfirmInit {
                        sysid: system_id.clone(),
                        lease,
                    },
                    Action::WriteInitialize {
                        system_id,
                        create_only,
                    } => Op::PutInit {
                        sysid: system_id.clone(),
                        create_only: *create_only,
                    },
                    Action::PublishMember(d) => Op::PutMember {
                        name,
                        data: d.clone(),
                        lease,
                    },
                    Action::WriteSync {
                        state,
                        expected_revision,
                    } => Op::CasSync {
                        state: state.clone(),
                        expected: *expected_revision,
                    },
                    Action::DeleteSync { expected_revision } => Op::DeleteSync {
                        expected: *expected_revision,
                    },
                    Action::WriteHistory(h) => Op::PutHistory(h.clone()),
                    Action::WriteStatus(s) => Op::PutStatus(s.clone()),
                    Action::ClearFailover { expected_revision } => Op::ClearFailover {
                        expected: *expected_revision,
                    },
                    other => unreachable!("not a DCS action: {other:?}"),
                },
            };
            let a = &mut self.nodes[i].agent;
            a.next_id += 1;
            let rid = a.next_id;
            let inc = a.inc;
            let sent_local = self.nodes[i].clock.local(self.now);
            self.nodes[i].agent.batch.as_mut().expect("batch").current =
                Some((rid, step, sent_local));
            if let Some(d) = self.delay(Ep::Node(i), Ep::Etcd) {
                self.at(
                    self.now + d,
                    Ev::EtcdReq {
                        node: i,
                        inc,
                        rid,
                        op,
                    },
                );
            }
            let timeout = self.ha.retry_timeout.0;
            self.at(self.now + timeout, Ev::RpcTimeout { node: i, inc, rid });
            return;
        }
    }

    fn end_batch(&mut self, i: usize, kick: bool) {
        let a = &mut self.nodes[i].agent;
        a.batch = None;
        a.dropped = false;
        if kick {
            let inc = a.inc;
            self.at(self.now, Ev::Kick { node: i, inc });
        }
    }

    pub(crate) fn etcd_response(&mut self, i: usize, inc: u64, rid: u64, res: Option<OpResult>) {
        let a = &self.nodes[i].agent;
        if !a.alive || a.inc != inc {
            return;
        }
        let Some(b) = a.batch.as_ref() else { return };
        let Some((cur, step, sent_local)) = b.current.clone() else {
            return;
        };
        if cur != rid {
            return;
        }
        self.nodes[i].agent.batch.as_mut().expect("batch").current = None;
        let Some(res) = res else {
            self.nodes[i].agent.dcs.reachable = false;
            let kick = self.nodes[i].agent.dropped;
            return self.end_batch(i, kick);
        };
        let what = if self.sim.trace {
            format!("{step:?} -> {res:?}")
        } else {
            String::new()
        };
        let ok = self.handle_result(i, step, sent_local, res);
        if !ok {
            let name = &self.nodes[i].name;
            trace!(
                self,
                "{name}: DCS step failed: {}",
                crate::agent::clip(&what)
            );
        }
        if ok {
            self.run_batch(i);
        } else {
            self.end_batch(i, true);
        }
    }

    /// Applies one response; false aborts the batch.
    fn handle_result(&mut self, i: usize, step: Step, sent_local: u64, res: OpResult) -> bool {
        let local_now = self.nodes[i].clock.local(self.now);
        let a = &mut self.nodes[i].agent;
        a.dcs.reachable = true;
        let txn_ok = matches!(res, OpResult::Txn { ok: true, .. });
        let rev = match res {
            OpResult::Txn { rev, .. } => rev,
            _ => 0,
        };
        if res == OpResult::LeaseNotFound {
            a.lease = None;
            return false;
        }
        match step {
            Step::Grant => {
                if let OpResult::Granted { lease, .. } = res {
                    a.lease = Some(lease);
                    a.dcs.lease_revoked = false;
                }
                true
            }
            Step::Range => {
                if let OpResult::Snapshot { rev, kv, watch } = res
                    && self.subs[i].is_some_and(|(w, _)| w == watch)
                {
                    // (A stream that broke while the answer travelled is noticed at once.)
                    let a = &mut self.nodes[i].agent;
                    a.cache.snapshot(rev, &kv, watch, local_now);
                }
                true
            }
            Step::KeepAlive => match res {
                OpResult::KeepAlive { ttl } if ttl > 0 => {
                    a.last_keepalive = Some(sent_local);
                    if let Some(b) = a.batch.as_mut() {
                        b.keepalive = Some((Millis(sent_local), Millis(ttl as u64)));
                    }
                    true
                }
                _ => {
                    a.lease = None;
                    a.dcs.lease_revoked = true;
                    a.dcs.leader_lease = None;
                    false
                }
            },
            Step::Dcs(act) => {
                let ka = a.batch.as_ref().and_then(|b| b.keepalive);
                match act {
                    Action::AcquireLeaderKey | Action::RenewLeaderKey => {
                        if txn_ok && let Some((sent_at, granted_ttl)) = ka {
                            a.dcs.leader_lease = Some(LeaderLease {
                                sent_at,
                                granted_ttl,
                                revision: rev,
                            });
                            if act == Action::AcquireLeaderKey
                                && let Some(b) = a.batch.as_mut()
                            {
                                b.kick_after = true;
                            }
                            true
                        } else {
                            if act == Action::RenewLeaderKey {
                                a.dcs.leader_lease = None;
                            }
                            false
                        }
                    }
                    Action::ReleaseLeaderKey => {
                        if txn_ok {
                            a.dcs.leader_lease = None;
                            if let Some(b) = a.batch.as_mut() {
                                b.kick_after = true;
                            }
                        }
                        txn_ok
                    }
                    Action::ClaimInitialize => {
                        if txn_ok {
                            a.dcs.initialize_claimed = true;
                            if let Some(b) = a.batch.as_mut() {
                                b.kick_after = true;
                            }
                        }
                        txn_ok
                    }
                    Action::WriteInitialize { .. } => true,
                    Action::ConfirmInitialize { .. } => {
                        if let Some(b) = a.batch.as_mut() {
                            b.kick_after = true;
                        }
                        txn_ok
                    }
                    _ => txn_ok,
                }
            }
            Step::Local(_) => true,
        }
    }

    pub(crate) fn watch_event(&mut self, i: usize, epoch: u64, ev: WatchEvent) {
        let a = &mut self.nodes[i].agent;
        if !a.alive || a.cache.epoch != epoch || !a.cache.connected {
            return;
        }
        let before = a.cache.view.leader.as_ref().map(|l| l.name.clone());
        let local = self.nodes[i].clock.local(self.now);
        let a = &mut self.nodes[i].agent;
        a.cache.event(&ev, local);
        let after = a.cache.view.leader.as_ref().map(|l| l.name.clone());
        if ev.key == Key::Failover || (ev.key == Key::Leader && before != after) {
            let inc = a.inc;
            self.at(self.now, Ev::Kick { node: i, inc });
        }
    }
}

/// A compact action name for traces.
pub(crate) fn short(a: &Action) -> String {
    match a {
        Action::PublishMember(_) => "publish".into(),
        Action::WriteStatus(_) => "status".into(),
        Action::WriteHistory(h) => format!("history({})", h.len()),
        Action::FetchPeerStatus { members } => format!("fetch{members:?}"),
        other => format!("{other:?}"),
    }
}

/// The first 160 characters of a trace detail.
pub(crate) fn clip(s: &str) -> &str {
    let mut end = s.len().min(160);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
