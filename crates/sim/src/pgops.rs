//! Executing local actions against the simulated PostgreSQL, their completion, streaming
//! replication, and the client that writes to whoever accepts writes.

use pgkeep_core::cluster::HistoryEntry;
use pgkeep_core::ha::{Action, LongOperation, PgProcess, StartRole, StopMode};

use crate::ViolationKind;
use crate::pg::{Data, PgOp, Rec};
use crate::world::{Ep, Ev, World};

/// Longest immediate stop (fencing) in the simulation, ms.
pub(crate) const FENCE_MAX_MS: u64 = 400;

/// Longest immediate stop in the `tiny-margin` variant: with the margin gone, nothing covers it.
const SLOW_FENCE_MAX_MS: u64 = 1_500;

impl World {
    fn pg_begin(&mut self, i: usize, op: PgOp, dur: u64) {
        let pg = &mut self.nodes[i].pg;
        pg.epoch += 1;
        pg.op = Some(op);
        let epoch = pg.epoch;
        self.at(self.now + dur.max(1), Ev::PgDone { node: i, epoch });
    }

    /// Executes one local action.
    pub(crate) fn exec_local(&mut self, i: usize, act: Action) {
        let name = self.nodes[i].name.clone();
        match act {
            Action::Fence => {
                if self.fencing_disabled() {
                    return;
                }
                let pg = &self.nodes[i].pg;
                let already = matches!(pg.op, Some(PgOp::Stop { fence: true, .. }));
                if matches!(pg.process, PgProcess::Stopped) || already {
                    return;
                }
                self.nodes[i].pg.process = PgProcess::Stopping;
                let max = if self.sim.variant == crate::Variant::TinyMargin {
                    SLOW_FENCE_MAX_MS
                } else {
                    FENCE_MAX_MS
                };
                let d = self.rng.range(1, max);
                trace!(self, "{name}: pg fence (immediate stop, {d} ms)");
                self.pg_begin(
                    i,
                    PgOp::Stop {
                        fence: true,
                        restart: false,
                    },
                    d,
                );
            }
            Action::Stop { mode } => {
                let pg = &self.nodes[i].pg;
                if pg.process == PgProcess::Stopped
                    || pg
                        .op
                        .as_ref()
                        .is_some_and(|o| matches!(o, PgOp::Stop { .. }) && mode == StopMode::Fast)
                {
                    return;
                }
                self.nodes[i].pg.process = PgProcess::Stopping;
                let fence = mode == StopMode::Immediate;
                let d = if fence {
                    self.rng.range(1, FENCE_MAX_MS)
                } else {
                    self.rng.range(100, 2_500)
                };
                trace!(self, "{name}: pg stop {mode:?} ({d} ms)");
                self.pg_begin(
                    i,
                    PgOp::Stop {
                        fence,
                        restart: false,
                    },
                    d,
                );
            }
            Action::Restart => {
                if self.nodes[i].pg.process == PgProcess::Running {
                    self.nodes[i].pg.process = PgProcess::Stopping;
                    let d = self.rng.range(100, 2_000);
                    self.pg_begin(
                        i,
                        PgOp::Stop {
                            fence: false,
                            restart: true,
                        },
                        d,
                    );
                }
            }
            Action::Start { role } => {
                let pg = &self.nodes[i].pg;
                if pg.process != PgProcess::Stopped || pg.op.is_some() || pg.data == Data::Empty {
                    return;
                }
                let primary = role == StartRole::Primary;
                let upstream = match &role {
                    StartRole::Replica { upstream } => {
                        upstream.as_deref().and_then(|u| self.node_by_name(u))
                    }
                    StartRole::Primary => None,
                };
                let long = primary && self.nodes[i].pg.crashed && self.rng.chance(0.25);
                let d = if long {
                    self.rng.range(5_000, 60_000)
                } else {
                    self.rng.range(200, 2_000)
                };
                let pg = &mut self.nodes[i].pg;
                pg.process = PgProcess::Starting;
                pg.in_recovery = !primary;
                pg.upstream = upstream;
                pg.started_at = Some(self.now);
                trace!(self, "{name}: pg start {role:?} ({d} ms)");
                self.pg_begin(i, PgOp::Start { primary }, d);
            }
            Action::Promote => {
                let pg = &self.nodes[i].pg;
                if pg.process != PgProcess::Running || !pg.in_recovery {
                    return;
                }
                self.nodes[i].pg.process = PgProcess::Promoting;
                let d = self.rng.range(100, 2_000);
                trace!(self, "{name}: pg promote ({d} ms)");
                self.pg_begin(i, PgOp::Promote, d);
            }
            Action::Follow { upstream } => {
                let up = upstream.as_deref().and_then(|u| self.node_by_name(u));
                let pg = &mut self.nodes[i].pg;
                if pg.upstream != up {
                    pg.upstream = up;
                    pg.streaming = false;
                }
                self.schedule_repl(i);
            }
            Action::Rewind { source } => self.long(i, LongOperation::Rewind, Some(source)),
            Action::Clone { source, wipe } => {
                if self.nodes[i].pg.process != PgProcess::Stopped || self.nodes[i].pg.op.is_some() {
                    return;
                }
                if wipe {
                    self.nodes[i].initdb_unconfirmed = false;
                    let pg = &mut self.nodes[i].pg;
                    pg.data = Data::Empty;
                    pg.wal.clear();
                    pg.slots.clear();
                }
                self.long(i, LongOperation::Clone, Some(source));
            }
            Action::Initdb => {
                if self.nodes[i].pg.data != Data::Empty {
                    return;
                }
                if self.initdb_done {
                    self.violate(
                        ViolationKind::InitdbOnInitialisedCluster,
                        format!("{name} ran initdb although `initialize` holds a system id"),
                    );
                }
                self.nodes[i].initdb_unconfirmed = true;
                self.long(i, LongOperation::Initdb, None);
            }
            Action::PersistJoined => {
                self.nodes[i].ever_joined = true;
                self.nodes[i].initdb_unconfirmed = false;
            }
            Action::SetSyncStandbyNames(s) => {
                trace!(self, "{name}: synchronous_standby_names = '{}'", s.to_guc());
                self.nodes[i].pg.ssn = s;
                self.check_acks(i);
            }
            // Speeds up the real shutdown; changes nothing the model tracks.
            Action::Checkpoint => {}
            Action::CreateSlots(s) => self.nodes[i].pg.slots.extend(s),
            Action::DropSlots(s) => {
                for x in s {
                    self.nodes[i].pg.slots.remove(&x);
                }
            }
            other => unreachable!("not a local action: {other:?}"),
        }
    }

    fn long(&mut self, i: usize, op: LongOperation, source: Option<String>) {
        let pg = &self.nodes[i].pg;
        if pg.process != PgProcess::Stopped || pg.op.is_some() {
            return;
        }
        let d = match op {
            LongOperation::Initdb => self.rng.range(500, 2_000),
            LongOperation::Clone => self.rng.range(1_000, 8_000),
            LongOperation::Rewind => self.rng.range(500, 4_000),
        };
        let source = source.and_then(|s| self.node_by_name(&s));
        let name = self.nodes[i].name.clone();
        trace!(self, "{name}: {op:?} from {source:?} ({d} ms)");
        self.pg_begin(i, PgOp::Long { op, source }, d);
    }

    /// A source can serve a clone or rewind: host up, PostgreSQL running, link up.
    fn serves(&self, src: usize, to: usize) -> bool {
        let s = &self.nodes[src];
        !s.down && s.pg.process == PgProcess::Running && self.link_up(Ep::Node(src), Ep::Node(to))
    }

    pub(crate) fn pg_done(&mut self, i: usize, epoch: u64) {
        if self.nodes[i].pg.epoch != epoch || self.nodes[i].down {
            return;
        }
        let Some(op) = self.nodes[i].pg.op.take() else {
            return;
        };
        let name = self.nodes[i].name.clone();
        match op {
            PgOp::Stop { fence, restart } => {
                let primary = !self.nodes[i].pg.in_recovery;
                if primary && !fence {
                    // Shutdown checkpoint; walsenders send it before they exit.
                    let id = self.new_id();
                    let pg = &mut self.nodes[i].pg;
                    let tl = pg.tl;
                    pg.wal.push(Rec { id, tl });
                    for j in 0..self.nodes.len() {
                        let m = &self.nodes[j].pg;
                        if j != i
                            && m.upstream == Some(i)
                            && m.process == PgProcess::Running
                            && m.in_recovery
                            && m.is_prefix_of(&self.nodes[i].pg)
                            && self.link_up(Ep::Node(i), Ep::Node(j))
                        {
                            self.nodes[j].pg.wal = self.nodes[i].pg.wal.clone();
                        }
                    }
                }
                let pg = &mut self.nodes[i].pg;
                pg.process = PgProcess::Stopped;
                pg.crashed = fence;
                pg.stopped();
                trace!(self, "{name}: pg stopped");
                if restart {
                    let pg = &mut self.nodes[i].pg;
                    pg.process = PgProcess::Starting;
                    pg.started_at = Some(self.now);
                    let primary = !pg.in_recovery;
                    let d = self.rng.range(200, 2_000);
                    self.pg_begin(i, PgOp::Start { primary }, d);
                }
            }
            PgOp::Start { primary } => {
                let pg = &mut self.nodes[i].pg;
                pg.process = PgProcess::Running;
                pg.in_recovery = !primary;
                pg.crashed = false;
                trace!(
                    self,
                    "{name}: pg running ({})",
                    if primary { "primary" } else { "replica" }
                );
                self.schedule_repl(i);
            }
            PgOp::Promote => {
                self.max_tl += 1;
                let new_tl = self.max_tl;
                let pg = &mut self.nodes[i].pg;
                let switch = pg.lsn();
                pg.history.push(HistoryEntry {
                    parent_timeline: pg.tl,
                    switch_lsn: switch,
                    reason: "no recovery target specified".into(),
                    timestamp: None,
                    new_leader: None,
                });
                pg.tl = new_tl;
                pg.process = PgProcess::Running;
                pg.in_recovery = false;
                pg.upstream = None;
                pg.streaming = false;
                pg.pending.clear();
                self.stats.promotions += 1;
                trace!(self, "{name}: PROMOTED to timeline {new_tl} at {switch}");
                self.check_promoted(i);
                self.kick_followers(i);
            }
            PgOp::Long { op, source } => {
                let ok = source.is_none_or(|s| self.serves(s, i));
                match op {
                    LongOperation::Initdb => {
                        self.initdbs += 1;
                        let sysid = format!(
                            "7{:015}{:03}",
                            self.seed % 1_000_000_000_000_000,
                            self.initdbs % 1000
                        );
                        let id = self.new_id();
                        let pg = &mut self.nodes[i].pg;
                        pg.data = Data::Init(sysid);
                        pg.wal = vec![Rec { id, tl: 1 }];
                        pg.tl = 1;
                        pg.history.clear();
                        pg.in_recovery = false;
                        pg.crashed = false;
                    }
                    LongOperation::Clone if ok => {
                        let s = source.expect("clone source");
                        let src = self.nodes[s].pg.clone();
                        let pg = &mut self.nodes[i].pg;
                        pg.wal = src.wal;
                        pg.tl = src.tl;
                        pg.history = src.history;
                        pg.data = src.data;
                        pg.in_recovery = true;
                        pg.crashed = false;
                        pg.ssn = Default::default();
                        self.nodes[i].agent.rewind_failed = false;
                    }
                    LongOperation::Rewind if ok => {
                        let s = source.expect("rewind source");
                        let src = self.nodes[s].pg.clone();
                        let pg = &mut self.nodes[i].pg;
                        let k = pg.common_prefix(&src);
                        pg.wal.truncate(k);
                        pg.tl = src.tl;
                        pg.history = src.history;
                        pg.in_recovery = true;
                        pg.crashed = false;
                        self.nodes[i].agent.rewind_failed = false;
                    }
                    LongOperation::Rewind => self.nodes[i].agent.rewind_failed = true,
                    LongOperation::Clone => {}
                }
                trace!(self, "{name}: {op:?} finished (source ok: {ok})");
            }
        }
        let inc = self.nodes[i].agent.inc;
        self.at(self.now, Ev::Kick { node: i, inc });
    }

    pub(crate) fn new_id(&mut self) -> u64 {
        self.next_write += 1;
        self.next_write
    }

    /// Invariant at promotion: every acknowledged write is in the new primary's WAL (only in
    /// synchronous mode, where that is promised).
    fn check_promoted(&mut self, i: usize) {
        if !self.ha.sync_mode() {
            return;
        }
        let pg = &self.nodes[i].pg;
        let lost = self
            .acked
            .iter()
            .filter(|&&(idx, id)| pg.wal.get(idx).map(|r| r.id) != Some(id))
            .count();
        if lost > 0 {
            let detail = format!(
                "{} promoted without {lost} of {} acknowledged writes",
                self.nodes[i].name,
                self.acked.len()
            );
            self.violate(ViolationKind::LostAckedWrite, detail);
        }
    }

    pub(crate) fn schedule_repl(&mut self, j: usize) {
        let pg = &self.nodes[j].pg;
        if pg.repl_scheduled
            || pg.process != PgProcess::Running
            || !pg.in_recovery
            || pg.upstream.is_none()
        {
            return;
        }
        let d = self.rng.range(5, 60) + if self.rng.chance(self.slow) { 500 } else { 0 };
        self.nodes[j].pg.repl_scheduled = true;
        self.at(self.now + d, Ev::ReplTick { node: j });
    }

    fn kick_followers(&mut self, u: usize) {
        for j in 0..self.nodes.len() {
            if j != u && self.nodes[j].pg.upstream == Some(u) {
                self.schedule_repl(j);
            }
        }
    }

    /// A replica pulls WAL from its upstream.
    pub(crate) fn repl_tick(&mut self, j: usize) {
        self.nodes[j].pg.repl_scheduled = false;
        let pg = &self.nodes[j].pg;
        if self.nodes[j].down || pg.process != PgProcess::Running || !pg.in_recovery {
            return;
        }
        let Some(u) = pg.upstream.filter(|&u| u != j) else {
            return;
        };
        let up = &self.nodes[u];
        let serving = !up.down
            && matches!(
                up.pg.process,
                PgProcess::Running | PgProcess::Stopping | PgProcess::Promoting
            )
            && self.link_up(Ep::Node(u), Ep::Node(j));
        if serving && pg.is_prefix_of(&up.pg) {
            let grew = up.pg.wal.len() > pg.wal.len();
            let (tl, hist) = (up.pg.tl, up.pg.history.clone());
            let tail: Vec<Rec> = up.pg.wal[pg.wal.len()..].to_vec();
            let pg = &mut self.nodes[j].pg;
            pg.wal.extend(tail);
            pg.streaming = true;
            if pg.tl != tl {
                pg.tl = tl;
                pg.history = hist;
            }
            if grew {
                self.check_acks(u);
                self.kick_followers(j);
            }
        } else {
            self.nodes[j].pg.streaming = false;
            self.nodes[j].pg.repl_scheduled = true;
            self.at(self.now + 1_000, Ev::ReplTick { node: j });
        }
    }

    /// Acknowledges pending synchronous commits of primary `u` that enough standbys flushed.
    pub(crate) fn check_acks(&mut self, u: usize) {
        if self.nodes[u].pg.pending.is_empty() {
            return;
        }
        let ssn = self.nodes[u].pg.ssn.clone();
        let standbys: Vec<usize> = ssn
            .names
            .iter()
            .filter_map(|n| self.node_by_name(n))
            .collect();
        let pending = std::mem::take(&mut self.nodes[u].pg.pending);
        let mut still = Vec::new();
        for (idx, id) in pending {
            let confirmed = standbys
                .iter()
                .filter(|&&s| self.nodes[s].pg.wal.get(idx).map(|r| r.id) == Some(id))
                .count();
            if ssn.is_async() || confirmed >= ssn.num as usize {
                self.acked.push((idx, id));
                self.stats.acked_writes += 1;
            } else {
                still.push((idx, id));
            }
        }
        self.nodes[u].pg.pending = still;
    }

    /// A client commits one write on every server that accepts writes.
    pub(crate) fn client_write(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].down || !self.nodes[i].pg.can_commit() {
                continue;
            }
            let id = self.new_id();
            let pg = &mut self.nodes[i].pg;
            let tl = pg.tl;
            pg.wal.push(Rec { id, tl });
            let idx = pg.wal.len() - 1;
            pg.pending.push((idx, id));
            self.stats.writes += 1;
            self.check_acks(i);
            self.kick_followers(i);
        }
        let next = self.rng.range(80, 300);
        self.at(self.now + next, Ev::ClientWrite);
    }
}
