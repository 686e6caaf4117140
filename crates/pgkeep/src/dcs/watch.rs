//! [`ClusterWatch`]: an always-current [`Snapshot`] of the cluster prefix.
//!
//! The etcd task lists the prefix (linearizable), then watches it from the list's revision + 1,
//! applying events to its copy. When the watch ends for any reason (compaction of the start
//! revision, cancellation, a stream error, an etcd member that lost its leader under
//! `require_leader`, or a stream that stops answering progress requests) it marks the state not
//! live, logs why, waits a bounded backoff and starts over with a fresh list.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, WatchOptions};
use pgkeep_core::cluster::{ClusterView, LeaderKey, RawEntry};

use super::DeletedLeader;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::etcd::raw_entry;
use super::rpc::{self, Budget};
use super::{DcsError, Snapshot};

/// What a [`ClusterWatch`] currently knows.
#[derive(Debug, Clone, Default)]
pub struct WatchState {
    /// The latest snapshot; `None` until the first list succeeded.
    pub snapshot: Option<Arc<Snapshot>>,
    /// True while the watch stream is established; false while it restarts (the snapshot may
    /// then be stale).
    pub live: bool,
    /// Counts changes of the `leader` key (holder, lease, revision or presence) seen so far.
    pub leader_generation: u64,
    /// How often the watch had to start over (each restart is logged with its reason).
    pub restarts: u64,
}

/// A handle on a background watch of the cluster prefix. Clones share the watch; the
/// background task ends when the last handle (and every [`ClusterWatch::subscribe`]d receiver)
/// is dropped.
#[derive(Debug, Clone)]
pub struct ClusterWatch {
    rx: watch::Receiver<WatchState>,
    seen_leader_generation: u64,
}

impl ClusterWatch {
    /// Wraps a state channel; [`Dcs`](super::Dcs) implementations other than etcd (the
    /// simulator) feed one themselves.
    pub fn new(rx: watch::Receiver<WatchState>) -> ClusterWatch {
        ClusterWatch {
            rx,
            seen_leader_generation: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> WatchState {
        self.rx.borrow().clone()
    }

    /// The latest snapshot, if any list has succeeded yet.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.rx.borrow().snapshot.clone()
    }

    /// True while the watch stream is established.
    pub fn is_live(&self) -> bool {
        self.rx.borrow().live
    }

    /// A receiver of every state change, for another task.
    pub fn subscribe(&self) -> watch::Receiver<WatchState> {
        self.rx.clone()
    }

    /// Waits for any change of the state (snapshot content or liveness).
    pub async fn changed(&mut self) -> Result<(), DcsError> {
        self.rx.changed().await.map_err(|_| DcsError::WatchStopped)
    }

    /// Waits until the `leader` key's holder (or presence) or the `failover` request changed
    /// since the last call on this handle (for the first call: since the first snapshot): what
    /// wakes the HA loop early.
    pub async fn leader_changed(&mut self) -> Result<(), DcsError> {
        let seen = self.seen_leader_generation;
        let state = self
            .rx
            .wait_for(|s| s.leader_generation != seen)
            .await
            .map_err(|_| DcsError::WatchStopped)?;
        self.seen_leader_generation = state.leader_generation;
        Ok(())
    }

    /// Waits up to `timeout` for a live snapshot for which `pred` holds, and returns it.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>, DcsError> {
        let wait = self
            .rx
            .wait_for(|s| s.live && s.snapshot.as_deref().is_some_and(&mut pred));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(state)) => state.snapshot.clone().ok_or(DcsError::WatchStopped),
            Ok(Err(_)) => Err(DcsError::WatchStopped),
            Err(_) => Err(DcsError::Timeout {
                op: "watch",
                budget: timeout,
                last_error: None,
            }),
        }
    }

    /// Waits up to `timeout` for the first live snapshot.
    pub async fn ready(&mut self, timeout: Duration) -> Result<Arc<Snapshot>, DcsError> {
        self.wait_for(timeout, |_| true).await
    }
}

/// Builds a snapshot from the raw entries of the prefix.
pub(crate) fn snapshot(entries: &BTreeMap<String, RawEntry>, revision: i64) -> Snapshot {
    let (view, rejected) = ClusterView::from_entries(entries.values());
    Snapshot {
        view,
        revision,
        rejected,
        deleted_leader: None,
    }
}

/// One change to the prefix: the new entry, or `None` for a deletion.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    suffix: String,
    entry: Option<RawEntry>,
}

/// The task's copy of the prefix, and which bad values it already logged.
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<String, RawEntry>,
    revision: i64,
    /// (key suffix, mod_revision) of values already reported as not parsing.
    logged: HashSet<(String, i64)>,
    /// The leader key before its last deletion seen in this watch session.
    deleted_leader: Option<DeletedLeader>,
    /// The leader key's latest put seen in this session: its revision and when it arrived.
    leader_put_seen: Option<(i64, std::time::Instant)>,
}

impl Cache {
    fn reset(&mut self, entries: BTreeMap<String, RawEntry>, revision: i64) {
        self.entries = entries;
        self.revision = revision;
        // Events between the old watch and this list are unknown.
        self.deleted_leader = None;
        self.leader_put_seen = None;
    }

    fn apply(&mut self, changes: Vec<Change>, revision: i64) {
        for c in changes {
            match c.entry {
                Some(e) => {
                    if c.suffix == "leader" {
                        self.leader_put_seen = Some((e.mod_revision, std::time::Instant::now()));
                    }
                    self.entries.insert(c.suffix, e);
                }
                None => {
                    if let Some(gone) = self.entries.remove(&c.suffix)
                        && c.suffix == "leader"
                    {
                        let put_seen_at = self
                            .leader_put_seen
                            .filter(|(rev, _)| *rev == gone.mod_revision)
                            .map(|(_, at)| at);
                        self.deleted_leader = Some(DeletedLeader {
                            key: LeaderKey {
                                name: String::from_utf8_lossy(&gone.value).trim().to_owned(),
                                lease: gone.lease,
                                mod_revision: gone.mod_revision,
                            },
                            put_seen_at,
                        });
                    }
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// The current snapshot; values that do not parse are logged once per (key, mod_revision).
    fn snapshot(&mut self, base: &str) -> Snapshot {
        let mut snap = snapshot(&self.entries, self.revision);
        snap.deleted_leader = self.deleted_leader.clone();
        let entries = &self.entries;
        self.logged
            .retain(|(k, rev)| entries.get(k).is_some_and(|e| e.mod_revision == *rev));
        for r in &snap.rejected {
            let rev = entries.get(&r.key).map_or(0, |e| e.mod_revision);
            if self.logged.insert((r.key.clone(), rev)) {
                tracing::warn!(%base, key = %r.key, mod_revision = rev, reason = %r.reason, "ignoring DCS value that does not parse");
            }
        }
        snap
    }
}

/// Publishes `snap`: notifies receivers when the view, the rejected values or liveness changed;
/// a new revision alone is stored silently.
fn publish(tx: &watch::Sender<WatchState>, snap: Snapshot, live: bool) {
    tx.send_if_modified(|s| {
        let old = s.snapshot.as_deref();
        let content_changed =
            old.is_none_or(|o| o.view != snap.view || o.rejected != snap.rejected);
        // The first snapshot is where knowledge starts, not a change.
        // Who holds the key, not its revision: the holder writes it on every renewal, and waking
        // every member for each renewal would only burn cycles.
        // A new switchover or failover request wakes the loop too: the leader acts on it at once
        // instead of a loop_wait later.
        let holder = |v: &ClusterView| v.leader.as_ref().map(|l| l.name.clone());
        let request = |v: &ClusterView| v.failover.as_ref().map(|f| f.value.clone());
        if old.is_some_and(|o| {
            holder(&o.view) != holder(&snap.view) || request(&o.view) != request(&snap.view)
        }) {
            s.leader_generation += 1;
        }
        let notify = content_changed || s.live != live;
        s.snapshot = Some(Arc::new(snap));
        s.live = live;
        notify
    });
}

/// Why a watch session ended.
#[derive(Debug)]
enum End {
    ListFailed(DcsError),
    Compacted(i64),
    Canceled(String),
    Closed,
    Stream(etcd_client::Error),
    Stalled(Duration),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ListFailed(e) => write!(f, "listing the prefix failed: {e}"),
            End::Compacted(r) => write!(f, "start revision compacted (compact revision {r})"),
            End::Canceled(reason) if reason.is_empty() => write!(f, "etcd canceled the watch"),
            End::Canceled(reason) => write!(f, "etcd canceled the watch: {reason}"),
            End::Closed => write!(f, "etcd closed the watch stream"),
            End::Stream(e) => write!(f, "watch stream error: {}", rpc::describe(e)),
            End::Stalled(d) => write!(f, "no answer to a progress request within {d:?}"),
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Starts the etcd watch task for `prefix`.
pub(crate) fn spawn_etcd(client: Client, prefix: String, budget: Budget) -> ClusterWatch {
    let (tx, rx) = watch::channel(WatchState::default());
    tokio::spawn(run(client, prefix, budget, tx));
    ClusterWatch::new(rx)
}

async fn run(client: Client, prefix: String, budget: Budget, tx: watch::Sender<WatchState>) {
    let base = prefix.trim_end_matches('/').to_owned();
    let mut cache = Cache::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        let end = tokio::select! {
            _ = tx.closed() => return,
            end = session(&client, &prefix, &base, budget, &mut cache, &tx, &mut backoff) => end,
        };
        tx.send_modify(|s| {
            s.live = false;
            s.restarts += 1;
        });
        // A compacted start revision needs only a fresh list, not a pause.
        let delay = match end {
            End::Compacted(_) => MIN_BACKOFF,
            _ => backoff,
        };
        tracing::warn!(%base, reason = %end, retry_in = ?delay, "cluster watch restarting: re-listing and re-watching");
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One list + watch. Returns why the watch ended.
async fn session(
    client: &Client,
    prefix: &str,
    base: &str,
    budget: Budget,
    cache: &mut Cache,
    tx: &watch::Sender<WatchState>,
    backoff: &mut Duration,
) -> End {
    let listed = rpc::call("watch list", budget, None, |_| {
        let mut c = client.clone();
        async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })
    .await;
    let resp = match listed {
        Ok(r) => r,
        Err(e) => return End::ListFailed(e),
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    let entries = resp
        .kvs()
        .iter()
        .filter_map(|kv| raw_entry(prefix, kv))
        .map(|e| (e.suffix.clone(), e))
        .collect();
    cache.reset(entries, revision);

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut watch_client = client.clone();
    let opened = watch_client.watch(prefix, Some(options));
    let mut stream = match tokio::time::timeout(budget.attempt, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return End::Stream(e),
        Err(_) => return End::Stalled(budget.attempt),
    };
    publish(tx, cache.snapshot(base), true);
    tracing::debug!(%base, revision, "cluster watch established");

    // Liveness: ask for a progress notification periodically; a stream that stays silent
    // longer than one attempt's timeout is dead (a hung member, a black-holed connection).
    let probe_every = (budget.total / 2).clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut probe = tokio::time::interval_at(Instant::now() + probe_every, probe_every);
    probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut awaiting_since: Option<Instant> = None;
    loop {
        tokio::select! {
            msg = stream.message() => {
                awaiting_since = None;
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return End::Closed,
                    Err(e) => return End::Stream(e),
                };
                if let Some(end) = cancellation(resp.canceled(), resp.compact_revision(), resp.cancel_reason()) {
                    return end;
                }
                if resp.created() {
                    *backoff = MIN_BACKOFF;
                }
                if resp.events().is_empty() {
                    continue;
                }
                let changes = resp.events().iter().filter_map(|ev| change(prefix, ev)).collect();
                cache.apply(changes, resp.header().map_or(0, |h| h.revision()));
                publish(tx, cache.snapshot(base), true);
            }
            _ = probe.tick() => {
                if let Some(since) = awaiting_since {
                    if since.elapsed() > budget.attempt {
                        return End::Stalled(budget.attempt);
                    }
                } else {
                    if let Err(e) = stream.request_progress().await {
                        return End::Stream(e);
                    }
                    awaiting_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Whether a watch response ends the watch. etcd cancels a watcher whose start revision was
/// compacted (or that fell behind a compaction) with `compact_revision` set; the fix is a fresh
/// list, whose revision is past the compaction.
fn cancellation(canceled: bool, compact_revision: i64, reason: &str) -> Option<End> {
    if compact_revision > 0 {
        Some(End::Compacted(compact_revision))
    } else if canceled {
        Some(End::Canceled(reason.to_owned()))
    } else {
        None
    }
}

/// The change an event makes. Deletions are recognised by `version == 0` (etcd sends the
/// tombstone with only key and revision), which avoids etcd-client's panicking
/// `Event::event_type` on an unknown type number.
fn change(prefix: &str, ev: &etcd_client::Event) -> Option<Change> {
    let kv = ev.kv()?;
    let entry = raw_entry(prefix, kv)?;
    Some(if kv.version() == 0 {
        Change {
            suffix: entry.suffix,
            entry: None,
        }
    } else {
        Change {
            suffix: entry.suffix.clone(),
            entry: Some(entry),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(suffix: &str, value: &str, rev: i64) -> Change {
        Change {
            suffix: suffix.into(),
            entry: Some(RawEntry {
                suffix: suffix.into(),
                value: value.as_bytes().to_vec(),
                mod_revision: rev,
                lease: 0,
            }),
        }
    }

    fn del(suffix: &str) -> Change {
        Change {
            suffix: suffix.into(),
            entry: None,
        }
    }

    #[test]
    fn cache_applies_puts_and_deletes_and_skips_garbage() {
        let mut c = Cache::default();
        c.reset(BTreeMap::new(), 10);
        c.apply(
            vec![
                put("leader", "n1", 11),
                put("members/n1", r#"{"role":"primary"}"#, 11),
                put("members/x", "{not json", 12),
            ],
            12,
        );
        let s = c.snapshot("/service/t");
        assert_eq!(s.revision, 12);
        assert_eq!(s.view.leader.as_ref().map(|l| l.name.as_str()), Some("n1"));
        assert_eq!(s.view.members.len(), 1);
        assert_eq!(s.rejected.len(), 1);
        assert!(c.logged.contains(&("members/x".to_owned(), 12)));
        c.apply(vec![del("leader"), put("members/x", "{}", 13)], 13);
        let s = c.snapshot("/service/t");
        assert!(s.view.leader.is_none());
        assert_eq!(s.view.members.len(), 2);
        assert!(s.rejected.is_empty());
        assert!(c.logged.is_empty(), "fixed values are forgotten");
    }

    #[test]
    fn compaction_and_cancellation_end_the_watch() {
        assert!(cancellation(false, 0, "").is_none());
        assert!(matches!(
            cancellation(true, 42, ""),
            Some(End::Compacted(42))
        ));
        // etcd 3.4 sets compact_revision on the canceling response; be safe if it does not
        // set canceled with it.
        assert!(matches!(
            cancellation(false, 42, ""),
            Some(End::Compacted(42))
        ));
        let end = cancellation(true, 0, "etcdserver: no leader").unwrap();
        assert_eq!(
            end.to_string(),
            "etcd canceled the watch: etcdserver: no leader"
        );
    }

    #[tokio::test]
    async fn publish_notifies_on_content_and_liveness_and_counts_leader_changes() {
        let (tx, rx) = watch::channel(WatchState::default());
        let mut w = ClusterWatch::new(rx);
        let mut c = Cache::default();
        c.reset(BTreeMap::new(), 1);
        publish(&tx, c.snapshot("/b"), true);
        w.ready(Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            w.state().leader_generation,
            0,
            "the first snapshot is no change"
        );

        c.apply(vec![put("status", r#"{"optime":5}"#, 2)], 2);
        publish(&tx, c.snapshot("/b"), true);
        assert!(w.rx.has_changed().unwrap());
        w.changed().await.unwrap();
        assert_eq!(w.state().leader_generation, 0, "status is not the leader");

        let mut other = w.clone();
        c.apply(vec![put("leader", "n2", 3)], 3);
        publish(&tx, c.snapshot("/b"), true);
        w.leader_changed().await.unwrap();
        assert_eq!(w.state().leader_generation, 1);
        other.leader_changed().await.unwrap();
        c.apply(vec![del("leader")], 4);
        publish(&tx, c.snapshot("/b"), true);
        w.leader_changed().await.unwrap();
        assert_eq!(w.state().leader_generation, 2);
        c.apply(
            vec![put("failover", r#"{"leader":"n2","member":"n1"}"#, 5)],
            5,
        );
        publish(&tx, c.snapshot("/b"), true);
        w.leader_changed().await.unwrap();
        assert_eq!(
            w.state().leader_generation,
            3,
            "a switchover request wakes the loop"
        );

        // Same content, new revision: stored, not notified.
        w.rx.mark_unchanged();
        c.revision = 9;
        publish(&tx, c.snapshot("/b"), true);
        assert!(!w.rx.has_changed().unwrap());
        assert_eq!(w.snapshot().unwrap().revision, 9);

        tx.send_if_modified(|s| std::mem::replace(&mut s.live, false));
        assert!(!w.is_live());
        let err = w.wait_for(Duration::from_millis(50), |_| true).await;
        assert!(matches!(err, Err(DcsError::Timeout { .. })));
        drop(tx);
        assert!(matches!(w.changed().await, Err(DcsError::WatchStopped)));
    }

    #[test]
    fn a_deleted_leader_is_remembered_until_the_watch_starts_over() {
        let mut c = Cache::default();
        c.apply(vec![put("leader", "n1", 5), put("leader", "n1", 7)], 7);
        assert_eq!(c.snapshot("/b").deleted_leader, None);
        c.apply(vec![del("leader")], 8);
        let gone = c.snapshot("/b").deleted_leader.expect("deletion seen");
        assert_eq!((gone.key.name.as_str(), gone.key.mod_revision), ("n1", 7));
        assert!(gone.put_seen_at.is_some(), "the put of revision 7 was seen");
        c.apply(vec![put("leader", "n2", 9)], 9);
        assert!(
            c.snapshot("/b").deleted_leader.is_some(),
            "kept after a new leader"
        );
        c.reset(BTreeMap::new(), 10);
        assert_eq!(c.snapshot("/b").deleted_leader, None, "a gap forgets it");
    }
}
