//! The etcd side of the network: requests arrive, are applied, watchers are told.

use crate::ViolationKind;
use crate::etcd::{Entry, Key, Op, OpResult, Val};
use crate::world::{Ep, Ev, World};

impl World {
    pub(crate) fn etcd_request(&mut self, node: usize, inc: u64, rid: u64, op: Op) {
        if !self.etcd.up(self.now) {
            return;
        }
        if let Op::CasSync { state, expected } = &op {
            self.check_sync_takeover(node, state, *expected);
        }
        let confirm = matches!(op, Op::ConfirmInit { .. });
        let range = op == Op::Range;
        let mut events = Vec::new();
        let mut res = self.etcd.apply(self.now, op, &mut events);
        if confirm && matches!(res, OpResult::Txn { ok: true, .. }) {
            // The cluster exists from now on: no initdb may run any more.
            self.initdb_done = true;
        }
        self.broadcast(events);
        if let Some(d) = self.delay(Ep::Etcd, Ep::Node(node)) {
            if range && let OpResult::Snapshot { watch, .. } = &mut res {
                // The watch starts at the snapshot's revision; its events follow the answer.
                self.watch_seq += 1;
                *watch = self.watch_seq;
                self.subs[node] = Some((self.watch_seq, self.now + d));
            }
            self.at(
                self.now + d,
                Ev::EtcdResp {
                    node,
                    inc,
                    rid,
                    res,
                },
            );
        }
    }

    /// Invariant: in synchronous mode only a member `/sync` names may take `/sync` over.
    fn check_sync_takeover(
        &mut self,
        node: usize,
        state: &pgkeep_core::cluster::SyncState,
        expected: Option<i64>,
    ) {
        let name = self.nodes[node].name.clone();
        let Some(Entry {
            val: Val::Sync(cur),
            mod_rev,
            ..
        }) = self.etcd.kv.get(&Key::Sync)
        else {
            return;
        };
        if Some(*mod_rev) != expected || state.leader.as_deref() != Some(name.as_str()) {
            return;
        }
        if cur.leader.is_some() && !cur.contains(&name) {
            let detail = format!("{name} took over /sync {cur:?} without being in it");
            self.violate(ViolationKind::NonSyncPromotion, detail);
        }
    }
}
