//! The agent's cache of the DCS: a view kept current by a watch stream.

use std::collections::BTreeMap;

use pgkeep_core::cluster::{ClusterView, Initialize, LeaderKey, MemberKey, Versioned};

use pgkeep_core::ha::{DeletedLeader, Millis};

use crate::etcd::{Entry, Key, Val, WatchEvent};

/// The agent's cached view of etcd, fed by a watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cache {
    pub(crate) view: ClusterView,
    pub(crate) rev: i64,
    pub(crate) connected: bool,
    pub(crate) epoch: u64,
    pub(crate) deleted_leader: Option<DeletedLeader>,
    /// The current leader key's revision and when its put arrived (local time).
    leader_put: Option<(i64, u64)>,
    /// Lease of the `initialize` key.
    pub(crate) initialize_lease: i64,
}

impl Cache {
    pub(crate) fn break_stream(&mut self) {
        self.connected = false;
        self.epoch += 1;
    }

    fn apply(&mut self, key: &Key, entry: Option<&Entry>, prev: Option<&Entry>, local: u64) {
        let v = &mut self.view;
        match (key, entry) {
            (Key::Leader, Some(e)) => {
                if let Val::Name(n) = &e.val {
                    v.leader = Some(LeaderKey {
                        name: n.clone(),
                        lease: e.lease,
                        mod_revision: e.mod_rev,
                    });
                }
                self.leader_put = Some((e.mod_rev, local));
            }
            (Key::Leader, None) => {
                v.leader = None;
                let seen = self.leader_put.take();
                self.deleted_leader = prev.and_then(|p| match &p.val {
                    Val::Name(n) => Some(DeletedLeader {
                        name: n.clone(),
                        mod_revision: p.mod_rev,
                        put_seen_at: seen
                            .filter(|&(rev, _)| rev == p.mod_rev)
                            .map(|(_, t)| Millis(t)),
                    }),
                    _ => None,
                });
            }
            (Key::Member(n), Some(e)) => {
                if let Val::Member(d) = &e.val {
                    v.members.insert(
                        n.clone(),
                        MemberKey {
                            data: (**d).clone(),
                            mod_revision: e.mod_rev,
                            lease: e.lease,
                        },
                    );
                }
            }
            (Key::Member(n), None) => {
                v.members.remove(n);
            }
            (Key::Initialize, e) => {
                self.initialize_lease = e.map_or(0, |e| e.lease);
                v.initialize = e.and_then(|e| match &e.val {
                    Val::Initialize(s) if s.is_empty() => Some(Initialize::InProgress),
                    Val::Initialize(s) => Some(Initialize::SystemId(s.clone())),
                    _ => None,
                });
            }
            (Key::History, e) => {
                v.history = e.and_then(|e| match &e.val {
                    Val::History(h) => Some(h.clone()),
                    _ => None,
                });
            }
            (Key::Status, e) => {
                v.status = e
                    .and_then(|e| match &e.val {
                        Val::Status(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
            }
            (Key::Sync, e) => {
                v.sync = e.and_then(|e| match &e.val {
                    Val::Sync(s) => Some(Versioned {
                        value: s.clone(),
                        mod_revision: e.mod_rev,
                    }),
                    _ => None,
                });
            }
            (Key::Failover, e) => {
                v.failover = e.and_then(|e| match &e.val {
                    Val::Failover(f) => Some(Versioned {
                        value: f.clone(),
                        mod_revision: e.mod_rev,
                    }),
                    _ => None,
                });
            }
        }
    }

    pub(crate) fn event(&mut self, ev: &WatchEvent, local: u64) {
        if ev.rev <= self.rev {
            return;
        }
        self.apply(&ev.key, ev.entry.as_ref(), ev.prev.as_ref(), local);
        self.rev = ev.rev;
    }

    pub(crate) fn snapshot(&mut self, rev: i64, kv: &BTreeMap<Key, Entry>, watch: u64, local: u64) {
        self.view = ClusterView::default();
        self.leader_put = None;
        for (k, e) in kv {
            self.apply(k, Some(e), None, local);
        }
        // Deletions while we were not watching are unknown.
        self.deleted_leader = None;
        self.rev = rev;
        self.connected = true;
        self.epoch = watch;
    }
}
