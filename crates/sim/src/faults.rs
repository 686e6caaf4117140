//! Schedules: the cluster each seed builds, the faults it injects, healing, and the liveness
//! check after healing.

use pgkeep_core::cluster::{FailoverRequest, Tags};
use pgkeep_core::ha::{HaConfig, Millis, PgProcess, SyncMode, format_rfc3339};

use crate::agent::Agent;
use crate::etcd::{Key, Op, Val};
use crate::pg::{Data, Pg};
use crate::rng::Rng;
use crate::world::{Clock, Ep, Ev, Node, World};
use crate::{SimConfig, Variant, ViolationKind};

/// Wall-clock origin of every schedule (2026-07-24T12:00:00Z).
pub(crate) const EPOCH_MS: i64 = 1_784_894_400_000;

/// When faults may start (the cluster has bootstrapped by then).
const FAULTS_FROM: u64 = 15_000;

/// What a schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Several random faults, random message loss and delays.
    Chaos,
    /// One fault on the primary in a clean network (measures failover time).
    Single(FaultKind),
}

/// Fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Host crash (agent and PostgreSQL), back after a while.
    CrashNode,
    /// The agent process is killed (PostgreSQL keeps running), restarted later.
    KillAgent,
    /// The postmaster is killed.
    KillPg,
    /// The agent is frozen (SIGSTOP, stall); PostgreSQL keeps running.
    FreezeAgent,
    /// The host is cut from everything.
    Isolate,
    /// The host is cut from etcd only.
    CutEtcd,
    /// The host is cut from the other hosts only.
    CutPeers,
    /// A random bipartition of hosts, etcd on one side.
    Split,
    /// etcd is unavailable.
    EtcdDown,
    /// etcd revokes the host's lease early and keeps acknowledging keepalives (etcd#15247).
    RevokeLease,
    /// The host's monotonic clock changes its rate (within ±1 %). In the `monotonic-steps`
    /// variant it jumps forward instead, without time passing — impossible with
    /// `CLOCK_BOOTTIME`, and outside the bounded-rate model every lease relies on.
    ClockStep,
    /// The host's wall clock steps.
    WallStep,
    /// A planned switchover.
    Switchover,
    /// A scheduled switchover.
    ScheduledSwitchover,
    /// A manual failover request (no leader named).
    ManualFailover,
    /// Host crash with its data directory (and maybe its markers) lost.
    Wipe,
    /// Message delays spike.
    SlowNet,
}

const CHAOS_KINDS: &[FaultKind] = &[
    FaultKind::CrashNode,
    FaultKind::KillAgent,
    FaultKind::KillPg,
    FaultKind::FreezeAgent,
    FaultKind::Isolate,
    FaultKind::CutEtcd,
    FaultKind::CutPeers,
    FaultKind::Split,
    FaultKind::EtcdDown,
    FaultKind::RevokeLease,
    FaultKind::ClockStep,
    FaultKind::WallStep,
    FaultKind::Switchover,
    FaultKind::ScheduledSwitchover,
    FaultKind::ManualFailover,
    FaultKind::Wipe,
    FaultKind::SlowNet,
];

/// Faults that, on the primary, force a failover or switchover (single-fault profile).
pub const FAILOVER_KINDS: &[FaultKind] = &[
    FaultKind::CrashNode,
    FaultKind::KillPg,
    FaultKind::FreezeAgent,
    FaultKind::Isolate,
    FaultKind::CutEtcd,
    FaultKind::RevokeLease,
    FaultKind::Switchover,
    FaultKind::KillAgent,
];

/// A fault event.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// Inject a fault.
    Start {
        /// Kind.
        kind: FaultKind,
        /// Aim at the current primary (else a random host).
        at_primary: bool,
        /// Duration or restart delay, ms.
        dur: u64,
        /// Kind-specific parameter.
        param: u64,
    },
    /// End of a partition.
    Uncut(Vec<(EpPair, EpPair)>),
}

/// A serialisable endpoint for fault ends.
pub(crate) type EpPair = (u8, usize);

fn ep_pack(e: Ep) -> EpPair {
    match e {
        Ep::Etcd => (0, 0),
        Ep::Node(i) => (1, i),
    }
}

fn ep_unpack(p: EpPair) -> Ep {
    if p.0 == 0 { Ep::Etcd } else { Ep::Node(p.1) }
}

/// Builds the cluster of one schedule.
pub(crate) fn setup(rng: &mut Rng, sim: &SimConfig) -> (HaConfig, Profile, Vec<Node>, f64, f64) {
    let n = [3, 3, 3, 2, 4, 5][rng.index(6)];
    let sync = rng.chance(0.3);
    let mut ha = HaConfig {
        ttl: Millis::from_secs(10),
        loop_wait: Millis(if rng.chance(0.5) { 1_000 } else { 2_000 }),
        retry_timeout: Millis(3_000),
        lease_safety_margin: Millis(if sim.variant == Variant::TinyMargin {
            1
        } else {
            2_000
        }),
        maximum_lag_on_failover: 5_000,
        check_timeline: true,
        primary_start_timeout: Millis([0, 10_000, 30_000][rng.index(3)]),
        switchover_timeout: Millis(10_000),
        synchronous_mode: if sync { SyncMode::On } else { SyncMode::Off },
        synchronous_mode_strict: sync && rng.chance(0.5),
        synchronous_node_count: if n >= 4 && rng.chance(0.3) { 2 } else { 1 },
        pause: false,
        use_pg_rewind: rng.chance(0.8),
        use_slots: true,
        permanent_slots: Default::default(),
        logical_slots: Default::default(),
        member_slots_ttl: Millis(30_000),
    };
    if sim.variant == Variant::TinyMargin {
        ha.lease_safety_margin = Millis(1);
    }
    // The tiny-margin variant is deliberately below the allowed margin: it shows the checker
    // catches the two primaries such a margin allows.
    if sim.variant != Variant::TinyMargin {
        ha.validate().expect("simulation config is valid");
    }
    let profile = match sim.profile {
        Some(p) => p,
        None if rng.chance(0.25) => {
            Profile::Single(FAILOVER_KINDS[rng.index(FAILOVER_KINDS.len())])
        }
        None => Profile::Chaos,
    };
    let (loss, slow) = match profile {
        Profile::Chaos => (
            if rng.chance(0.5) {
                rng.float(0.0, 0.03)
            } else {
                0.0
            },
            if rng.chance(0.5) {
                rng.float(0.0, 0.05)
            } else {
                0.0
            },
        ),
        Profile::Single(_) => (0.0, 0.0),
    };
    let nodes = (0..n)
        .map(|i| {
            let mut tags = Tags::default();
            if i > 0 && n > 2 && rng.chance(0.1) {
                tags.nofailover = true;
            }
            if rng.chance(0.2) {
                tags.failover_priority = Some(rng.range(1, 3) as i64);
            }
            if i > 0 && rng.chance(0.1) {
                tags.nosync = true;
            }
            Node {
                name: format!("n{i}"),
                tags,
                pg: Pg::default(),
                agent: Agent::default(),
                clock: Clock::new(1.0 + rng.float(-0.01, 0.01), rng.range(0, 1_000_000)),
                wall_offset: rng.range(0, 4_000) as i64 - 2_000,
                ever_joined: false,
                initdb_unconfirmed: false,
                bootstrap_allowed: i == 0 || (i == 1 && rng.chance(0.3)),
                watchdog: None,
                wd_gen: 0,
                down: false,
            }
        })
        .collect();
    (ha, profile, nodes, loss, slow)
}

/// Schedules the start of every node, the client and the faults.
pub(crate) fn schedule(w: &mut World) {
    for i in 0..w.nodes.len() {
        w.nodes[i].agent.start();
        let inc = w.nodes[i].agent.inc;
        let t = w.rng.range(0, 2_000);
        w.at(t, Ev::Kick { node: i, inc });
    }
    w.at(1_000, Ev::ClientWrite);
    let heal_at = match w.profile {
        Profile::Chaos => {
            let k = w.rng.range(1, 8);
            for _ in 0..k {
                let kind = CHAOS_KINDS[w.rng.index(CHAOS_KINDS.len())];
                let t = FAULTS_FROM + w.rng.range(0, w.sim.chaos_ms);
                let dur = w.rng.range(500, 30_000);
                let param = w.rng.next_u64();
                let at_primary = w.rng.chance(0.5);
                w.at(
                    t,
                    Ev::Fault(Fault::Start {
                        kind,
                        at_primary,
                        dur,
                        param,
                    }),
                );
            }
            FAULTS_FROM + w.sim.chaos_ms
        }
        Profile::Single(kind) => {
            let t = FAULTS_FROM + w.rng.range(0, 5_000);
            let dur = w.rng.range(12_000, 30_000);
            let param = w.rng.next_u64();
            w.at(
                t,
                Ev::Fault(Fault::Start {
                    kind,
                    at_primary: true,
                    dur,
                    param,
                }),
            );
            t + 35_000
        }
    };
    w.at(heal_at, Ev::Heal);
}

impl World {
    fn primary(&self) -> Option<usize> {
        (0..self.nodes.len())
            .find(|&i| !self.nodes[i].down && self.nodes[i].pg.can_commit())
            .or_else(|| match self.etcd.kv.get(&Key::Leader).map(|e| &e.val) {
                Some(Val::Name(n)) => self.node_by_name(n),
                _ => None,
            })
    }

    fn cut_pairs(&mut self, pairs: Vec<(Ep, Ep)>, dur: u64) {
        for &(a, b) in &pairs {
            self.cut(a, b);
            for e in [a, b] {
                if let Ep::Node(i) = e
                    && (a == Ep::Etcd || b == Ep::Etcd)
                {
                    self.break_watch(i);
                }
            }
        }
        let packed = pairs
            .into_iter()
            .map(|(a, b)| (ep_pack(a), ep_pack(b)))
            .collect();
        self.at(self.now + dur, Ev::FaultEnd(Fault::Uncut(packed)));
    }

    fn operator_failover(&mut self, req: FailoverRequest) {
        if !self.etcd.up(self.now) {
            return;
        }
        trace!(self, "operator: /failover = {req:?}");
        let mut events = Vec::new();
        self.etcd.apply(self.now, Op::PutFailover(req), &mut events);
        self.broadcast(events);
    }

    pub(crate) fn fault(&mut self, f: Fault) {
        let Fault::Start {
            kind,
            at_primary,
            dur,
            param,
        } = f
        else {
            return;
        };
        if self.healed_at.is_some() {
            return;
        }
        let n = self.nodes.len();
        let primary = self.primary();
        let t = match primary {
            Some(p) if at_primary && kind != FaultKind::Wipe => p,
            _ => self.rng.index(n),
        };
        if kind == FaultKind::Wipe && !self.wipe_recoverable(t, primary) {
            // Losing the disk of the primary, of a `/sync` member, or of the node with the most
            // WAL can leave no member allowed to promote (synchronous mode, or everybody beyond
            // maximum_lag_on_failover): that needs an operator, not the HA loop. CrashNode covers
            // the failover of a lost primary.
            return;
        }
        if matches!(self.profile, Profile::Single(_)) {
            self.fault_at = Some(self.now);
        }
        let name = self.nodes[t].name.clone();
        self.stats.faults += 1;
        trace!(self, "FAULT {kind:?} on {name} (dur {dur} ms)");
        let others: Vec<usize> = (0..n).filter(|&j| j != t).collect();
        match kind {
            FaultKind::CrashNode => self.crash_host(t, 1_000 + param % 20_000),
            FaultKind::Wipe => {
                self.crash_host(t, 1_000 + param % 20_000);
                let node = &mut self.nodes[t];
                node.pg.data = Data::Empty;
                node.pg.wal.clear();
                node.pg.history.clear();
                node.pg.slots.clear();
                node.pg.tl = 1;
                node.initdb_unconfirmed = false;
                if param % 2 == 0 {
                    node.ever_joined = false;
                }
            }
            FaultKind::KillAgent => {
                if self.nodes[t].agent.alive {
                    self.nodes[t].agent.die();
                    self.subs[t] = None;
                    self.at(
                        self.now + 500 + param % 15_000,
                        Ev::Restart {
                            node: t,
                            whole: false,
                        },
                    );
                }
            }
            FaultKind::KillPg => {
                self.nodes[t].pg.kill();
                let inc = self.nodes[t].agent.inc;
                self.at(self.now, Ev::Kick { node: t, inc });
            }
            FaultKind::FreezeAgent => {
                let a = &mut self.nodes[t].agent;
                if a.alive {
                    a.frozen_until = a.frozen_until.max(self.now + dur.min(25_000));
                }
            }
            FaultKind::Isolate => {
                let mut pairs = vec![(Ep::Node(t), Ep::Etcd)];
                pairs.extend(others.iter().map(|&j| (Ep::Node(t), Ep::Node(j))));
                self.cut_pairs(pairs, dur);
            }
            FaultKind::CutEtcd => self.cut_pairs(vec![(Ep::Node(t), Ep::Etcd)], dur),
            FaultKind::CutPeers => {
                let pairs = others.iter().map(|&j| (Ep::Node(t), Ep::Node(j))).collect();
                self.cut_pairs(pairs, dur);
            }
            FaultKind::Split => {
                let side: Vec<bool> = (0..n).map(|j| j == t || self.rng.chance(0.5)).collect();
                let etcd_side = self.rng.chance(0.5);
                let mut pairs = Vec::new();
                for a in 0..n {
                    if side[a] != etcd_side {
                        pairs.push((Ep::Node(a), Ep::Etcd));
                    }
                    for b in a + 1..n {
                        if side[a] != side[b] {
                            pairs.push((Ep::Node(a), Ep::Node(b)));
                        }
                    }
                }
                self.cut_pairs(pairs, dur);
            }
            FaultKind::EtcdDown => self.etcd.outage(self.now, dur.min(20_000)),
            FaultKind::RevokeLease => {
                if let Some(lease) = self.nodes[t].agent.lease {
                    let stale = if param % 3 == 0 {
                        0
                    } else {
                        param % (2 * self.ha.ttl.0)
                    };
                    let mut events = Vec::new();
                    self.etcd.revoke_early(lease, self.now + stale, &mut events);
                    self.broadcast(events);
                }
            }
            FaultKind::ClockStep => {
                if self.sim.variant == Variant::MonotonicSteps {
                    let jump = 100 + param % 5_000;
                    self.nodes[t].clock.step(self.now, jump);
                } else {
                    let rate = 0.99 + (param % 20_001) as f64 / 1_000_000.0;
                    self.nodes[t].clock.set_rate(self.now, rate);
                }
                let inc = self.nodes[t].agent.inc;
                self.at(self.now, Ev::Kick { node: t, inc });
            }
            FaultKind::WallStep => {
                self.nodes[t].wall_offset += (param % 1_200_000) as i64 - 600_000;
            }
            FaultKind::Switchover | FaultKind::ScheduledSwitchover => {
                let leader = match self.etcd.kv.get(&Key::Leader).map(|e| &e.val) {
                    Some(Val::Name(l)) => l.clone(),
                    _ => return,
                };
                let member = (!others.is_empty() && param % 3 != 0)
                    .then(|| {
                        self.nodes[others[(param as usize / 3) % others.len()]]
                            .name
                            .clone()
                    })
                    .filter(|m| *m != leader);
                let scheduled_at = (kind == FaultKind::ScheduledSwitchover).then(|| {
                    let delta = (param % 35_000) as i64 - 5_000;
                    format_rfc3339(EPOCH_MS + self.now as i64 + delta)
                });
                self.operator_failover(FailoverRequest {
                    leader: Some(leader),
                    member,
                    scheduled_at,
                });
            }
            FaultKind::ManualFailover => {
                let member = Some(self.nodes[(param as usize) % n].name.clone());
                self.operator_failover(FailoverRequest {
                    leader: None,
                    member,
                    scheduled_at: None,
                });
            }
            FaultKind::SlowNet => self.slow_until = self.now + dur,
        }
    }

    fn wipe_recoverable(&self, t: usize, primary: Option<usize>) -> bool {
        if Some(t) == primary {
            return false;
        }
        if let Some(crate::etcd::Entry {
            val: Val::Sync(s), ..
        }) = self.etcd.kv.get(&Key::Sync)
            && s.contains(&self.nodes[t].name)
        {
            return false;
        }
        let (len, tl) = (self.nodes[t].pg.wal.len(), self.nodes[t].pg.tl);
        self.nodes.iter().enumerate().any(|(j, n)| {
            j != t
                && n.pg.data != Data::Empty
                && n.pg.wal.len() >= len
                && n.pg.tl >= tl
                && pgkeep_core::ha::failover_priority(&n.tags) > 0
        })
    }

    pub(crate) fn fault_end(&mut self, f: Fault) {
        if let Fault::Uncut(pairs) = f {
            for (a, b) in pairs {
                self.uncut(ep_unpack(a), ep_unpack(b));
            }
        }
    }

    /// The cluster is healthy: one key holder running a primary, everybody else a streaming
    /// replica of it on its timeline with a prefix of its WAL.
    fn healthy(&self) -> bool {
        let Some(Val::Name(l)) = self.etcd.kv.get(&Key::Leader).map(|e| &e.val) else {
            return false;
        };
        let Some(h) = self.node_by_name(l) else {
            return false;
        };
        let lp = &self.nodes[h].pg;
        if !lp.can_commit() || lp.process != PgProcess::Running {
            return false;
        }
        self.nodes.iter().enumerate().all(|(i, n)| {
            n.agent.alive
                && !n.down
                && n.agent.frozen_until <= self.now
                && (i == h
                    || (n.pg.process == PgProcess::Running
                        && n.pg.in_recovery
                        && n.pg.upstream == Some(h)
                        && n.pg.streaming
                        && n.pg.tl == lp.tl
                        && n.pg.is_prefix_of(lp)))
        })
    }

    pub(crate) fn health_check(&mut self) {
        let healed = self.healed_at.unwrap_or(self.now);
        if let Some(c) = self.converged_at {
            if self.now >= c + 5_000 {
                self.end = self.now;
            } else {
                self.at(self.now + 500, Ev::Check);
            }
            return;
        }
        if self.healthy() {
            self.converged_at = Some(self.now);
            self.stats.converge_ms = Some(self.now - healed);
            trace!(self, "healthy");
            self.at(self.now + 500, Ev::Check);
        } else if self.now >= healed + self.converge_bound() {
            let dump = self.dump();
            self.violate(ViolationKind::NotConverged, dump);
            self.end = self.now;
        } else {
            self.at(self.now + 500, Ev::Check);
        }
    }

    /// A one-line-per-node state summary.
    pub(crate) fn dump(&self) -> String {
        let leader = match self.etcd.kv.get(&Key::Leader).map(|e| &e.val) {
            Some(Val::Name(l)) => l.clone(),
            _ => "-".into(),
        };
        let mut s = format!("leader key: {leader}; ");
        for (i, n) in self.nodes.iter().enumerate() {
            s.push_str(&format!(
                "{}: [{}] cache(rev {} conn {} sub {:?} leader {:?}) pg {:?} rec={} tl={} wal={} up={:?} stream={} alive={} down={}; ",
                n.name,
                n.agent.last.as_ref().map_or("?".to_owned(), |l| format!("{} {}", l.0, l.1)),
                n.agent.cache.rev,
                n.agent.cache.connected,
                self.subs[i],
                n.agent.cache.view.leader.as_ref().map(|l| l.name.as_str()),
                n.pg.process,
                n.pg.in_recovery,
                n.pg.tl,
                n.pg.wal.len(),
                n.pg.upstream,
                n.pg.streaming,
                n.agent.alive,
                n.down
            ));
        }
        s
    }
}
