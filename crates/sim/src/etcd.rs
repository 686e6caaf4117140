//! A simulated etcd: one keyspace with revisions, leases with TTL expiry, compare-and-swap
//! transactions, watch events with `prev_kv`, outages, and early lease revocation as in
//! etcd#15247 (a stuck former etcd leader revokes a lease that is being kept alive, and keeps
//! answering keepalives for it).

use std::collections::BTreeMap;

use pgkeep_core::cluster::{ClusterStatus, FailoverRequest, HistoryEntry, MemberData, SyncState};

/// A key under the cluster prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// `leader`.
    Leader,
    /// `members/<name>`.
    Member(String),
    /// `initialize`.
    Initialize,
    /// `history`.
    History,
    /// `status`.
    Status,
    /// `sync`.
    Sync,
    /// `failover`.
    Failover,
}

/// A typed value (the wire format is tested in the core; the simulator skips JSON for speed).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// Leader name.
    Name(String),
    /// Member data.
    Member(Box<MemberData>),
    /// `initialize` text (`""` while bootstrapping).
    Initialize(String),
    /// Timeline history.
    History(Vec<HistoryEntry>),
    /// Leader status.
    Status(ClusterStatus),
    /// Sync state.
    Sync(SyncState),
    /// Failover request.
    Failover(FailoverRequest),
}

/// A stored key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Value.
    pub val: Val,
    /// Revision that created it.
    pub create_rev: i64,
    /// Revision of the last change.
    pub mod_rev: i64,
    /// Attached lease, 0 for none.
    pub lease: i64,
}

/// One change, as a watch delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// Revision of the change.
    pub rev: i64,
    /// Key.
    pub key: Key,
    /// New entry, `None` for a delete.
    pub entry: Option<Entry>,
    /// The previous entry (`prev_kv`).
    pub prev: Option<Entry>,
}

/// A request.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Grant a lease.
    Grant {
        /// TTL ms.
        ttl: u64,
    },
    /// Keep a lease alive.
    KeepAlive {
        /// Lease.
        lease: i64,
    },
    /// `create_revision(leader)==0 → put`.
    Acquire {
        /// Name.
        name: String,
        /// Lease.
        lease: i64,
    },
    /// `value(leader)==name → put`.
    Renew {
        /// Name.
        name: String,
        /// Lease.
        lease: i64,
    },
    /// `value(leader)==name → delete`.
    Release {
        /// Name.
        name: String,
    },
    /// `create_revision(initialize)==0 → put "" with lease`.
    ClaimInit {
        /// Lease.
        lease: i64,
    },
    /// `value(initialize)=="" and lease(initialize)==lease → put sysid` (no lease).
    ConfirmInit {
        /// System id.
        sysid: String,
        /// The claimant's lease.
        lease: i64,
    },
    /// Put `initialize`.
    PutInit {
        /// System id.
        sysid: String,
        /// Only when absent.
        create_only: bool,
    },
    /// Put a member key with a lease.
    PutMember {
        /// Name.
        name: String,
        /// Data.
        data: Box<MemberData>,
        /// Lease.
        lease: i64,
    },
    /// CAS put of `/sync`.
    CasSync {
        /// State.
        state: SyncState,
        /// Expected `mod_revision` (`None`: must be absent).
        expected: Option<i64>,
    },
    /// CAS delete of `/sync`.
    DeleteSync {
        /// Expected revision.
        expected: i64,
    },
    /// Put `/history`.
    PutHistory(Vec<HistoryEntry>),
    /// Put `/status`.
    PutStatus(ClusterStatus),
    /// CAS put of `/failover` = `{}`.
    ClearFailover {
        /// Expected revision.
        expected: i64,
    },
    /// Plain put of `/failover` (operator).
    PutFailover(FailoverRequest),
    /// Range over the prefix.
    Range,
}

/// A response.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    /// Lease granted.
    Granted {
        /// Id.
        lease: i64,
        /// TTL ms.
        ttl: u64,
    },
    /// Keepalive answer; TTL ≤ 0 means the lease is gone.
    KeepAlive {
        /// Remaining TTL in ms.
        ttl: i64,
    },
    /// Transaction or put result.
    Txn {
        /// Compare succeeded (always true for plain puts).
        ok: bool,
        /// Header revision.
        rev: i64,
    },
    /// The lease named in a put does not exist.
    LeaseNotFound,
    /// Snapshot.
    Snapshot {
        /// Revision.
        rev: i64,
        /// Every key.
        kv: BTreeMap<Key, Entry>,
        /// Id of the watch stream that starts at `rev` (set by the network layer).
        watch: u64,
    },
}

#[derive(Debug, Clone)]
struct Lease {
    ttl: u64,
    expires_at: u64,
}

/// The simulated etcd.
#[derive(Debug, Clone, Default)]
pub struct Etcd {
    /// Current revision.
    pub rev: i64,
    /// Keys.
    pub kv: BTreeMap<Key, Entry>,
    leases: BTreeMap<i64, Lease>,
    /// Revoked leases a stuck member still acknowledges, until the given time.
    stale_acks: BTreeMap<i64, (u64, u64)>,
    next_lease: i64,
    /// Unavailable until this time (requests time out, leases do not expire).
    pub down_until: u64,
}

impl Etcd {
    /// Whether etcd answers at `now`.
    pub fn up(&self, now: u64) -> bool {
        now >= self.down_until
    }

    /// The earliest lease expiry, to schedule the next check.
    pub fn next_expiry(&self) -> Option<u64> {
        self.leases.values().map(|l| l.expires_at).min()
    }

    /// The lease id currently attached to `key`.
    pub fn lease_of(&self, key: &Key) -> Option<i64> {
        self.kv.get(key).map(|e| e.lease)
    }

    fn put(&mut self, key: Key, val: Val, lease: i64, events: &mut Vec<WatchEvent>) -> i64 {
        self.rev += 1;
        let prev = self.kv.get(&key).cloned();
        let entry = Entry {
            val,
            create_rev: prev.as_ref().map_or(self.rev, |p| p.create_rev),
            mod_rev: self.rev,
            lease,
        };
        self.kv.insert(key.clone(), entry.clone());
        events.push(WatchEvent {
            rev: self.rev,
            key,
            entry: Some(entry),
            prev,
        });
        self.rev
    }

    fn delete(&mut self, key: &Key, events: &mut Vec<WatchEvent>) -> i64 {
        if let Some(prev) = self.kv.remove(key) {
            self.rev += 1;
            events.push(WatchEvent {
                rev: self.rev,
                key: key.clone(),
                entry: None,
                prev: Some(prev),
            });
        }
        self.rev
    }

    /// Revokes a lease and deletes its keys.
    pub fn revoke(&mut self, lease: i64, events: &mut Vec<WatchEvent>) {
        if self.leases.remove(&lease).is_none() {
            return;
        }
        let keys: Vec<Key> = self
            .kv
            .iter()
            .filter(|(_, e)| e.lease == lease)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.delete(&k, events);
        }
    }

    /// etcd#15247: revoke `lease` now although it is kept alive; keepalives keep being answered
    /// positively until `stale_until` (by the stuck former leader).
    pub fn revoke_early(&mut self, lease: i64, stale_until: u64, events: &mut Vec<WatchEvent>) {
        if let Some(l) = self.leases.get(&lease) {
            self.stale_acks.insert(lease, (stale_until, l.ttl));
        }
        self.revoke(lease, events);
    }

    /// Expires due leases.
    pub fn expire(&mut self, now: u64, events: &mut Vec<WatchEvent>) {
        if !self.up(now) {
            return;
        }
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.revoke(id, events);
        }
    }

    /// An outage from `now` for `dur`; when it ends, leases are extended by their TTL (what a
    /// newly elected etcd leader does).
    pub fn outage(&mut self, now: u64, dur: u64) {
        self.down_until = self.down_until.max(now + dur);
        let end = self.down_until;
        for l in self.leases.values_mut() {
            l.expires_at = l.expires_at.max(end + l.ttl);
        }
    }

    /// Ends an outage now.
    pub fn recover(&mut self, now: u64) {
        if self.down_until > now {
            self.down_until = now;
            for l in self.leases.values_mut() {
                l.expires_at = l.expires_at.min(now + l.ttl);
            }
        }
    }

    fn lease_ok(&self, lease: i64) -> bool {
        lease == 0 || self.leases.contains_key(&lease)
    }

    /// Applies one request at `now`.
    pub fn apply(&mut self, now: u64, op: Op, events: &mut Vec<WatchEvent>) -> OpResult {
        let txn = |ok: bool, rev: i64| OpResult::Txn { ok, rev };
        match op {
            Op::Grant { ttl } => {
                self.next_lease += 1;
                let id = self.next_lease;
                self.leases.insert(
                    id,
                    Lease {
                        ttl,
                        expires_at: now + ttl,
                    },
                );
                OpResult::Granted { lease: id, ttl }
            }
            Op::KeepAlive { lease } => match self.leases.get_mut(&lease) {
                Some(l) => {
                    l.expires_at = now + l.ttl;
                    OpResult::KeepAlive { ttl: l.ttl as i64 }
                }
                None => match self.stale_acks.get(&lease) {
                    Some(&(until, ttl)) if now < until => OpResult::KeepAlive { ttl: ttl as i64 },
                    _ => OpResult::KeepAlive { ttl: 0 },
                },
            },
            Op::Acquire { name, lease } => {
                if !self.lease_ok(lease) {
                    return OpResult::LeaseNotFound;
                }
                if self.kv.contains_key(&Key::Leader) {
                    return txn(false, self.rev);
                }
                let rev = self.put(Key::Leader, Val::Name(name), lease, events);
                txn(true, rev)
            }
            Op::Renew { name, lease } => {
                if !self.lease_ok(lease) {
                    return OpResult::LeaseNotFound;
                }
                match self.kv.get(&Key::Leader) {
                    Some(Entry {
                        val: Val::Name(n), ..
                    }) if *n == name => {
                        let rev = self.put(Key::Leader, Val::Name(name), lease, events);
                        txn(true, rev)
                    }
                    _ => txn(false, self.rev),
                }
            }
            Op::Release { name } => match self.kv.get(&Key::Leader) {
                Some(Entry {
                    val: Val::Name(n), ..
                }) if *n == name => {
                    let rev = self.delete(&Key::Leader, events);
                    txn(true, rev)
                }
                _ => txn(false, self.rev),
            },
            Op::ClaimInit { lease } => {
                if !self.lease_ok(lease) {
                    return OpResult::LeaseNotFound;
                }
                if self.kv.contains_key(&Key::Initialize) {
                    return txn(false, self.rev);
                }
                let rev = self.put(
                    Key::Initialize,
                    Val::Initialize(String::new()),
                    lease,
                    events,
                );
                txn(true, rev)
            }
            Op::ConfirmInit { sysid, lease } => match self.kv.get(&Key::Initialize) {
                Some(Entry {
                    val: Val::Initialize(v),
                    lease: l,
                    ..
                }) if v.is_empty() && *l == lease && lease != 0 => {
                    let rev = self.put(Key::Initialize, Val::Initialize(sysid), 0, events);
                    txn(true, rev)
                }
                _ => txn(false, self.rev),
            },
            Op::PutInit { sysid, create_only } => {
                if create_only && self.kv.contains_key(&Key::Initialize) {
                    return txn(false, self.rev);
                }
                let rev = self.put(Key::Initialize, Val::Initialize(sysid), 0, events);
                txn(true, rev)
            }
            Op::PutMember { name, data, lease } => {
                if !self.lease_ok(lease) {
                    return OpResult::LeaseNotFound;
                }
                let rev = self.put(Key::Member(name), Val::Member(data), lease, events);
                txn(true, rev)
            }
            Op::CasSync { state, expected } => {
                let cur = self.kv.get(&Key::Sync).map(|e| e.mod_rev);
                if cur != expected {
                    return txn(false, self.rev);
                }
                let rev = self.put(Key::Sync, Val::Sync(state), 0, events);
                txn(true, rev)
            }
            Op::DeleteSync { expected } => {
                if self.kv.get(&Key::Sync).map(|e| e.mod_rev) != Some(expected) {
                    return txn(false, self.rev);
                }
                let rev = self.delete(&Key::Sync, events);
                txn(true, rev)
            }
            Op::PutHistory(h) => {
                let rev = self.put(Key::History, Val::History(h), 0, events);
                txn(true, rev)
            }
            Op::PutStatus(s) => {
                let rev = self.put(Key::Status, Val::Status(s), 0, events);
                txn(true, rev)
            }
            Op::ClearFailover { expected } => {
                if self.kv.get(&Key::Failover).map(|e| e.mod_rev) != Some(expected) {
                    return txn(false, self.rev);
                }
                let rev = self.put(
                    Key::Failover,
                    Val::Failover(FailoverRequest::default()),
                    0,
                    events,
                );
                txn(true, rev)
            }
            Op::PutFailover(f) => {
                let rev = self.put(Key::Failover, Val::Failover(f), 0, events);
                txn(true, rev)
            }
            Op::Range => OpResult::Snapshot {
                rev: self.rev,
                kv: self.kv.clone(),
                watch: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_and_delete_their_keys() {
        let mut e = Etcd::default();
        let mut ev = Vec::new();
        let OpResult::Granted { lease, .. } = e.apply(0, Op::Grant { ttl: 1000 }, &mut ev) else {
            panic!()
        };
        let r = e.apply(
            1,
            Op::Acquire {
                name: "a".into(),
                lease,
            },
            &mut ev,
        );
        assert_eq!(r, OpResult::Txn { ok: true, rev: 1 });
        let r = e.apply(
            2,
            Op::Acquire {
                name: "b".into(),
                lease,
            },
            &mut ev,
        );
        assert!(matches!(r, OpResult::Txn { ok: false, .. }));
        e.expire(999, &mut ev);
        assert!(e.kv.contains_key(&Key::Leader));
        e.expire(1000, &mut ev);
        assert!(!e.kv.contains_key(&Key::Leader));
        let last = ev.last().unwrap();
        assert!(last.entry.is_none() && last.prev.as_ref().unwrap().mod_rev == 1);
        assert_eq!(
            e.apply(1001, Op::KeepAlive { lease }, &mut ev),
            OpResult::KeepAlive { ttl: 0 }
        );
    }

    #[test]
    fn early_revocation_keeps_acking_keepalives() {
        let mut e = Etcd::default();
        let mut ev = Vec::new();
        let OpResult::Granted { lease, .. } = e.apply(0, Op::Grant { ttl: 1000 }, &mut ev) else {
            panic!()
        };
        e.revoke_early(lease, 500, &mut ev);
        assert_eq!(
            e.apply(100, Op::KeepAlive { lease }, &mut ev),
            OpResult::KeepAlive { ttl: 1000 }
        );
        assert!(matches!(
            e.apply(
                100,
                Op::Renew {
                    name: "a".into(),
                    lease: 0
                },
                &mut ev
            ),
            OpResult::Txn { ok: false, .. }
        ));
        assert_eq!(
            e.apply(600, Op::KeepAlive { lease }, &mut ev),
            OpResult::KeepAlive { ttl: 0 }
        );
    }
}
