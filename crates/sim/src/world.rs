//! The simulated world: nodes, network, clocks and the event queue.

/// Appends a trace line when tracing is on (arguments are only evaluated then).
macro_rules! trace {
    ($w:expr, $($arg:tt)*) => {
        if $w.sim.trace {
            let line = format!($($arg)*);
            $w.push_trace(line);
        }
    };
}

use std::collections::BTreeMap;

use pgkeep_core::cluster::Tags;
use pgkeep_core::ha::{HaConfig, Millis, PeerStatus};

use crate::agent::Agent;
use crate::etcd::{Etcd, Op, OpResult, WatchEvent};
use crate::faults::{Fault, Profile};
use crate::pg::Pg;
use crate::rng::Rng;
use crate::{Outcome, SimConfig, Stats, Variant, Violation, ViolationKind};

/// A network endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Ep {
    Etcd,
    Node(usize),
}

/// A node's monotonic clock: `local = base_local + (real − base_real) × rate`, plus forward steps.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    rate: f64,
    base_real: u64,
    base_local: u64,
}

impl Clock {
    pub(crate) fn new(rate: f64, offset: u64) -> Clock {
        Clock {
            rate,
            base_real: 0,
            base_local: offset,
        }
    }

    pub(crate) fn local(&self, real: u64) -> u64 {
        self.base_local + ((real.saturating_sub(self.base_real)) as f64 * self.rate) as u64
    }

    /// The first real instant at which the local clock reads at least `local`.
    pub(crate) fn real_of(&self, local: u64) -> u64 {
        if local <= self.base_local {
            return self.base_real;
        }
        self.base_real + ((local - self.base_local) as f64 / self.rate).ceil() as u64 + 1
    }

    /// A forward jump without time passing (only in the `monotonic-steps` variant).
    pub(crate) fn step(&mut self, real: u64, jump: u64) {
        self.base_local = self.local(real) + jump;
        self.base_real = real;
    }

    /// A new rate from now on (NTP frequency correction, temperature).
    pub(crate) fn set_rate(&mut self, real: u64, rate: f64) {
        self.base_local = self.local(real);
        self.base_real = real;
        self.rate = rate;
    }
}

/// One simulated host.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) tags: Tags,
    pub(crate) pg: Pg,
    pub(crate) agent: Agent,
    pub(crate) clock: Clock,
    pub(crate) wall_offset: i64,
    pub(crate) ever_joined: bool,
    pub(crate) bootstrap_allowed: bool,
    /// Persisted: the data directory is our own unconfirmed `initdb`.
    pub(crate) initdb_unconfirmed: bool,
    /// Real time the watchdog fires, if armed.
    pub(crate) watchdog: Option<u64>,
    pub(crate) wd_gen: u64,
    /// The whole host is down (rebooting).
    pub(crate) down: bool,
}

/// Events.
#[derive(Debug, Clone)]
pub(crate) enum Ev {
    Wake {
        node: usize,
        inc: u64,
        generation: u64,
    },
    Kick {
        node: usize,
        inc: u64,
    },
    EtcdReq {
        node: usize,
        inc: u64,
        rid: u64,
        op: Op,
    },
    EtcdResp {
        node: usize,
        inc: u64,
        rid: u64,
        res: OpResult,
    },
    RpcTimeout {
        node: usize,
        inc: u64,
        rid: u64,
    },
    Watch {
        node: usize,
        epoch: u64,
        ev: Box<WatchEvent>,
    },
    LeaseCheck,
    PeerReq {
        from: usize,
        from_inc: u64,
        to: usize,
        fid: u64,
    },
    PeerResp {
        node: usize,
        inc: u64,
        fid: u64,
        from: usize,
        st: Box<PeerStatus>,
    },
    PeerDeadline {
        node: usize,
        inc: u64,
        fid: u64,
    },
    PgDone {
        node: usize,
        epoch: u64,
    },
    ReplTick {
        node: usize,
    },
    ClientWrite,
    Fault(Fault),
    FaultEnd(Fault),
    WatchdogFire {
        node: usize,
        generation: u64,
    },
    Restart {
        node: usize,
        whole: bool,
    },
    Heal,
    Check,
}

impl Ev {
    /// The node whose agent handles this event (deferred while it is frozen).
    fn agent_target(&self) -> Option<usize> {
        match self {
            Ev::Wake { node, .. }
            | Ev::Kick { node, .. }
            | Ev::EtcdResp { node, .. }
            | Ev::RpcTimeout { node, .. }
            | Ev::Watch { node, .. }
            | Ev::PeerResp { node, .. }
            | Ev::PeerDeadline { node, .. } => Some(*node),
            Ev::PeerReq { to, .. } => Some(*to),
            _ => None,
        }
    }
}

/// The whole simulation state.
pub(crate) struct World {
    pub(crate) now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    pub(crate) rng: Rng,
    pub(crate) ha: HaConfig,
    pub(crate) sim: SimConfig,
    pub(crate) seed: u64,
    pub(crate) profile: Profile,
    pub(crate) etcd: Etcd,
    pub(crate) nodes: Vec<Node>,
    /// Cut links (unordered pairs) with a count, so overlapping partitions compose.
    pub(crate) cuts: BTreeMap<(Ep, Ep), u32>,
    pub(crate) loss: f64,
    pub(crate) slow: f64,
    pub(crate) slow_until: u64,
    pub(crate) max_tl: u32,
    pub(crate) next_write: u64,
    pub(crate) acked: Vec<(usize, u64)>,
    pub(crate) initdb_done: bool,
    pub(crate) initdbs: u64,
    pub(crate) healed_at: Option<u64>,
    pub(crate) converged_at: Option<u64>,
    pub(crate) end: u64,
    pub(crate) violations: Vec<Violation>,
    pub(crate) trace: Vec<String>,
    pub(crate) stats: Stats,
    /// Able-to-commit bookkeeping for availability metrics.
    pub(crate) unavailable_since: Option<u64>,
    pub(crate) ever_available: bool,
    pub(crate) fault_at: Option<u64>,
    lease_check_at: Option<u64>,
    /// etcd side of each host's watch stream: (stream id, time of its last delivery).
    pub(crate) subs: Vec<Option<(u64, u64)>>,
    pub(crate) watch_seq: u64,
}

impl World {
    pub(crate) fn new(seed: u64, sim: &SimConfig) -> World {
        let mut rng = Rng::new(seed);
        let (ha, profile, nodes, loss, slow) = crate::faults::setup(&mut rng, sim);
        let n = nodes.len();
        World {
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            rng,
            ha,
            sim: sim.clone(),
            seed,
            profile,
            etcd: Etcd::default(),
            nodes,
            cuts: BTreeMap::new(),
            loss,
            slow,
            slow_until: 0,
            max_tl: 1,
            next_write: 1,
            acked: Vec::new(),
            initdb_done: false,
            initdbs: 0,
            healed_at: None,
            converged_at: None,
            end: u64::MAX,
            violations: Vec::new(),
            trace: Vec::new(),
            stats: Stats::default(),
            unavailable_since: None,
            ever_available: false,
            fault_at: None,
            lease_check_at: None,
            subs: vec![None; n],
            watch_seq: 0,
        }
    }

    pub(crate) fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t.max(self.now), self.seq), ev);
    }

    pub(crate) fn push_trace(&mut self, msg: String) {
        let line = format!("{:>9} {}", Millis(self.now).to_string(), msg);
        self.trace.push(line);
    }

    pub(crate) fn violate(&mut self, kind: ViolationKind, detail: String) {
        trace!(self, "VIOLATION {kind:?}: {detail}");
        self.violations.push(Violation {
            at: self.now,
            kind,
            detail,
        });
    }

    pub(crate) fn local_now(&self, i: usize) -> u64 {
        self.nodes[i].clock.local(self.now)
    }

    pub(crate) fn node_by_name(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn pair(a: Ep, b: Ep) -> (Ep, Ep) {
        if a <= b { (a, b) } else { (b, a) }
    }

    pub(crate) fn cut(&mut self, a: Ep, b: Ep) {
        *self.cuts.entry(Self::pair(a, b)).or_insert(0) += 1;
    }

    pub(crate) fn uncut(&mut self, a: Ep, b: Ep) {
        let k = Self::pair(a, b);
        if let Some(c) = self.cuts.get_mut(&k) {
            *c -= 1;
            if *c == 0 {
                self.cuts.remove(&k);
            }
        }
    }

    pub(crate) fn link_up(&self, a: Ep, b: Ep) -> bool {
        let down = |e: Ep| matches!(e, Ep::Node(i) if self.nodes[i].down);
        !down(a) && !down(b) && !self.cuts.contains_key(&Self::pair(a, b))
    }

    /// One-way delay of a message, or `None` when it is lost or the link is cut.
    pub(crate) fn delay(&mut self, a: Ep, b: Ep) -> Option<u64> {
        if !self.link_up(a, b) || self.rng.chance(self.loss) {
            return None;
        }
        let slow = self.now < self.slow_until || self.rng.chance(self.slow);
        Some(if slow {
            self.rng.range(50, 1500)
        } else {
            self.rng.range(1, 10)
        })
    }

    pub(crate) fn schedule_lease_check(&mut self) {
        if let Some(t) = self.etcd.next_expiry()
            && self.lease_check_at.is_none_or(|c| t < c || c < self.now)
        {
            self.lease_check_at = Some(t);
            self.at(t, Ev::LeaseCheck);
        }
    }

    /// Delivers etcd's changes to every connected watcher.
    pub(crate) fn broadcast(&mut self, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        for ev in events {
            if ev.key == crate::etcd::Key::Sync
                && let Some(e) = &ev.entry
            {
                trace!(self, "etcd /sync = {:?} rev {}", e.val, e.mod_rev);
            }
            for i in 0..self.nodes.len() {
                let Some((epoch, last)) = self.subs[i] else {
                    continue;
                };
                if !self.nodes[i].agent.alive {
                    self.subs[i] = None;
                    continue;
                }
                match self.delay(Ep::Etcd, Ep::Node(i)) {
                    Some(d) => {
                        let t = (self.now + d).max(last);
                        self.subs[i] = Some((epoch, t));
                        self.at(
                            t,
                            Ev::Watch {
                                node: i,
                                epoch,
                                ev: Box::new(ev.clone()),
                            },
                        );
                    }
                    None => self.break_watch(i),
                }
            }
        }
        self.schedule_lease_check();
    }

    /// The watch stream of host `i` breaks; the agent notices and re-reads.
    pub(crate) fn break_watch(&mut self, i: usize) {
        self.subs[i] = None;
        self.nodes[i].agent.cache.break_stream();
    }

    /// Runs the simulation to its end.
    pub(crate) fn run(mut self) -> Outcome {
        crate::faults::schedule(&mut self);
        while let Some(((t, seq), ev)) = self.queue.pop_first() {
            if t > self.end {
                break;
            }
            if t != self.now {
                self.boundary();
                self.now = t;
            }
            self.stats.events += 1;
            self.handle(ev, seq);
        }
        self.boundary();
        self.stats.sim_ms = self.now;
        self.stats.sync_mode = self.ha.sync_mode();
        Outcome {
            seed: self.seed,
            violations: self.violations,
            stats: self.stats,
            trace: self.trace,
        }
    }

    fn handle(&mut self, ev: Ev, seq: u64) {
        if let Some(i) = ev.agent_target() {
            let a = &self.nodes[i].agent;
            if a.alive && a.frozen_until > self.now {
                // Deferred until the thaw, keeping its original sequence number so that events
                // to a frozen agent (a watch stream, say) stay in order however often the freeze
                // is extended.
                let t = a.frozen_until;
                self.queue.insert((t, seq), ev);
                return;
            }
        }
        match ev {
            Ev::Wake {
                node,
                inc,
                generation,
            } => {
                let a = &self.nodes[node].agent;
                if a.alive && a.inc == inc && a.wake_gen == generation {
                    self.decide_now(node);
                }
            }
            Ev::Kick { node, inc } => {
                let a = &self.nodes[node].agent;
                if a.alive && a.inc == inc {
                    self.decide_now(node);
                }
            }
            Ev::EtcdReq { node, inc, rid, op } => self.etcd_request(node, inc, rid, op),
            Ev::EtcdResp {
                node,
                inc,
                rid,
                res,
            } => self.etcd_response(node, inc, rid, Some(res)),
            Ev::RpcTimeout { node, inc, rid } => self.etcd_response(node, inc, rid, None),
            Ev::Watch { node, epoch, ev } => self.watch_event(node, epoch, *ev),
            Ev::LeaseCheck => {
                self.lease_check_at = None;
                let mut events = Vec::new();
                self.etcd.expire(self.now, &mut events);
                if !events.is_empty() {
                    trace!(self, "etcd: lease expired");
                }
                self.broadcast(events);
                self.schedule_lease_check();
            }
            Ev::PeerReq {
                from,
                from_inc,
                to,
                fid,
            } => self.peer_request(from, from_inc, to, fid),
            Ev::PeerResp {
                node,
                inc,
                fid,
                from,
                st,
            } => self.peer_response(node, inc, fid, from, *st),
            Ev::PeerDeadline { node, inc, fid } => self.peer_deadline(node, inc, fid),
            Ev::PgDone { node, epoch } => self.pg_done(node, epoch),
            Ev::ReplTick { node } => self.repl_tick(node),
            Ev::ClientWrite => self.client_write(),
            Ev::Fault(f) => self.fault(f),
            Ev::FaultEnd(f) => self.fault_end(f),
            Ev::WatchdogFire { node, generation } => {
                let n = &self.nodes[node];
                if n.wd_gen == generation && n.watchdog.is_some() && !n.down {
                    trace!(
                        self,
                        "{}: WATCHDOG fired, host reset", self.nodes[node].name
                    );
                    self.stats.watchdog_fires += 1;
                    self.crash_host(node, 2_000);
                }
            }
            Ev::Restart { node, whole } => self.restart(node, whole),
            Ev::Heal => self.heal(),
            Ev::Check => self.health_check(),
        }
    }

    /// Called after all events of one instant: invariants that hold at every instant.
    fn boundary(&mut self) {
        let able: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].down && self.nodes[i].pg.can_commit())
            .collect();
        if able.len() > 1 {
            let names: Vec<&str> = able.iter().map(|&i| self.nodes[i].name.as_str()).collect();
            let detail = format!("nodes able to commit at once: {names:?}");
            if !self
                .violations
                .iter()
                .any(|v| v.kind == ViolationKind::DualPrimary && v.at + 1000 > self.now)
            {
                self.violate(ViolationKind::DualPrimary, detail);
            }
        }
        if able.is_empty() {
            if self.ever_available && self.unavailable_since.is_none() {
                self.unavailable_since = Some(self.now);
            }
        } else {
            self.ever_available = true;
            if let Some(since) = self.unavailable_since.take() {
                let d = self.now - since;
                if self.healed_at.is_none() {
                    self.stats.max_unavailable_ms = self.stats.max_unavailable_ms.max(d);
                }
                if let Some(f) = self.fault_at.take()
                    && since >= f
                {
                    let ms = self.now - since;
                    self.stats.failover_ms = Some(self.stats.failover_ms.unwrap_or(0).max(ms));
                }
            }
        }
    }

    /// Crashes a whole host: agent and PostgreSQL die; it comes back after `after` ms.
    pub(crate) fn crash_host(&mut self, i: usize, after: u64) {
        let n = &mut self.nodes[i];
        n.down = true;
        n.pg.kill();
        n.agent.die();
        self.subs[i] = None;
        let n = &mut self.nodes[i];
        n.watchdog = None;
        n.wd_gen += 1;
        self.at(
            self.now + after,
            Ev::Restart {
                node: i,
                whole: true,
            },
        );
    }

    fn restart(&mut self, i: usize, whole: bool) {
        let n = &mut self.nodes[i];
        if whole {
            if !n.down {
                return;
            }
            n.down = false;
        } else if n.agent.alive || n.down {
            return;
        }
        n.agent.start();
        let inc = n.agent.inc;
        trace!(self, "{}: agent started", self.nodes[i].name);
        self.at(self.now, Ev::Kick { node: i, inc });
    }

    pub(crate) fn heal(&mut self) {
        trace!(self, "HEAL: partitions and etcd restored, no more faults");
        self.healed_at = Some(self.now);
        self.cuts.clear();
        self.slow_until = 0;
        self.loss = 0.0;
        self.slow = 0.0;
        self.etcd.recover(self.now);
        self.schedule_lease_check();
        for i in 0..self.nodes.len() {
            let inc = self.nodes[i].agent.inc;
            self.at(self.now, Ev::Kick { node: i, inc });
        }
        let bound = self.converge_bound();
        self.end = self.now + bound + 1;
        self.at(self.now + 500, Ev::Check);
    }

    /// How long after healing the cluster must be healthy again.
    pub(crate) fn converge_bound(&self) -> u64 {
        // Frozen agents thaw, restarts happen (≤ 25 s), the old lease expires (ttl), the takeover
        // guard (ttl), a crashed primary may get primary_start_timeout, then rewinds and clones.
        25_000 + 3 * self.ha.ttl.0 + self.ha.primary_start_timeout.0 + 60_000
    }

    /// Whether the variant disables fencing.
    pub(crate) fn fencing_disabled(&self) -> bool {
        self.sim.variant == Variant::NoFencing
    }
}
