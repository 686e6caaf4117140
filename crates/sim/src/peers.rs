//! `GET /patroni` between simulated agents: the two-phase leader race.

use std::collections::{BTreeMap, BTreeSet};

use pgkeep_core::ha::{PeerReport, PeerStatus, PgProcess};

use crate::pg::Data;
use crate::world::{Ep, Ev, World};

#[derive(Debug, Clone)]
pub(crate) struct Fetch {
    pub(crate) id: u64,
    pub(crate) asked: BTreeSet<String>,
    pub(crate) answers: BTreeMap<String, PeerStatus>,
    pub(crate) waiting: usize,
}

impl World {
    pub(crate) fn start_fetch(&mut self, i: usize, members: Vec<String>) {
        if self.nodes[i].agent.fetch.is_some() {
            return;
        }
        let a = &mut self.nodes[i].agent;
        a.next_id += 1;
        let fid = a.next_id;
        let inc = a.inc;
        let mut f = Fetch {
            id: fid,
            asked: members.iter().cloned().collect(),
            answers: BTreeMap::new(),
            waiting: 0,
        };
        for m in &members {
            let Some(j) = self.node_by_name(m) else {
                continue;
            };
            f.waiting += 1;
            if let Some(d) = self.delay(Ep::Node(i), Ep::Node(j)) {
                self.at(
                    self.now + d,
                    Ev::PeerReq {
                        from: i,
                        from_inc: inc,
                        to: j,
                        fid,
                    },
                );
            }
        }
        let done = f.waiting == 0;
        self.nodes[i].agent.fetch = Some(f);
        if done {
            self.finish_fetch(i);
        } else {
            self.at(self.now + 2_000, Ev::PeerDeadline { node: i, inc, fid });
        }
    }

    pub(crate) fn peer_request(&mut self, from: usize, from_inc: u64, to: usize, fid: u64) {
        let n = &self.nodes[to];
        if !n.agent.alive || n.down {
            return;
        }
        let st = PeerStatus {
            running: n.pg.process == PgProcess::Running,
            primary: n.pg.process == PgProcess::Running && !n.pg.in_recovery,
            wal_position: n.pg.lsn(),
            timeline: matches!(n.pg.data, Data::Init(_)).then_some(n.pg.tl),
            tags: n.tags.clone(),
            watchdog_failed: false,
        };
        if let Some(d) = self.delay(Ep::Node(to), Ep::Node(from)) {
            self.at(
                self.now + d,
                Ev::PeerResp {
                    node: from,
                    inc: from_inc,
                    fid,
                    from: to,
                    st: Box::new(st),
                },
            );
        }
    }

    pub(crate) fn peer_response(
        &mut self,
        i: usize,
        inc: u64,
        fid: u64,
        from: usize,
        st: PeerStatus,
    ) {
        let name = self.nodes[from].name.clone();
        let a = &mut self.nodes[i].agent;
        if !a.alive || a.inc != inc {
            return;
        }
        let Some(f) = a.fetch.as_mut().filter(|f| f.id == fid) else {
            return;
        };
        if f.answers.insert(name, st).is_none() {
            f.waiting = f.waiting.saturating_sub(1);
        }
        if f.waiting == 0 {
            self.finish_fetch(i);
        }
    }

    pub(crate) fn peer_deadline(&mut self, i: usize, inc: u64, fid: u64) {
        let a = &self.nodes[i].agent;
        if a.alive && a.inc == inc && a.fetch.as_ref().is_some_and(|f| f.id == fid) {
            self.finish_fetch(i);
        }
    }

    pub(crate) fn finish_fetch(&mut self, i: usize) {
        let a = &mut self.nodes[i].agent;
        let Some(f) = a.fetch.take() else { return };
        a.report_at = self.now;
        a.report = Some(PeerReport {
            asked: f.asked,
            answers: f.answers,
        });
        let inc = a.inc;
        self.at(self.now, Ev::Kick { node: i, inc });
    }
}
