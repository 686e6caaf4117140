//! Synchronous replication: choosing standbys, and ordering `synchronous_standby_names` against
//! `/sync` so that every member `/sync` names has every acknowledged commit.
//!
//! Invariant (Patroni's): a standby is in `/sync` only while it is in
//! `synchronous_standby_names` and has flushed everything committed before it was listed. So a
//! standby is added to PostgreSQL first and to `/sync` once it caught up; it is removed from
//! `/sync` first and from PostgreSQL afterwards, and a removal from PostgreSQL always follows a
//! successful compare-and-swap of `/sync` in the same decision, so a stale view of `/sync` can
//! never shrink `synchronous_standby_names` below what `/sync` lists. pgkeep always lists exactly the standbys it wants
//! and requires all of them (`FIRST n` with n = number of names), so every `/sync` member
//! confirmed every acknowledged commit.

use std::collections::BTreeSet;

use crate::cluster::SyncState;

use super::action::{Action, STRICT_PLACEHOLDER, SyncStandbyNames};
use super::decide::Ctx;

/// The effective sync priority: `nosync` wins; unset means 1.
fn sync_priority(tags: &crate::cluster::Tags) -> i64 {
    if tags.nosync {
        0
    } else {
        tags.sync_priority.unwrap_or(1)
    }
}

/// The standbys the primary wants, best first, at most `synchronous_node_count`.
///
/// Candidates are streaming rows of `pg_stat_replication` naming a member without `nosync`
/// (`sync_priority > 0`) that streams from this node. Order: higher `sync_priority`, current
/// `/sync` members, more WAL flushed, name; then members that may fail over before `nofailover`
/// ones.
pub(crate) fn desired(cx: &Ctx<'_>, current: &BTreeSet<String>) -> Vec<String> {
    let me = cx.me();
    let mut rows: Vec<(&str, i64, bool, u64, bool)> = cx
        .obs
        .pg
        .replication
        .iter()
        .filter(|r| r.streaming && r.application_name != STRICT_PLACEHOLDER)
        .filter_map(|r| {
            let m = cx.member(&r.application_name)?;
            let prio = sync_priority(&m.tags);
            let cascades = m.tags.replicatefrom.as_deref().is_some_and(|f| f != me);
            (prio > 0 && !cascades && !m.tags.nostream && r.application_name != me).then_some((
                r.application_name.as_str(),
                prio,
                current.contains(&r.application_name),
                r.flush_lsn.0,
                m.tags.nofailover,
            ))
        })
        .collect();
    rows.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(b.2.cmp(&a.2))
            .then(b.3.cmp(&a.3))
            .then(a.0.cmp(b.0))
    });
    rows.sort_by_key(|r| r.4);
    let n = usize::try_from(cx.cfg.synchronous_node_count).unwrap_or(usize::MAX);
    rows.into_iter().take(n).map(|r| r.0.to_owned()).collect()
}

/// Before promoting in synchronous mode: `/sync` names this node as leader with no standby (CAS;
/// if it fails the shell stops and promotion waits), and `synchronous_standby_names` is emptied
/// (strict mode: the placeholder, so commits wait for a standby).
pub(crate) fn before_promote(cx: &Ctx<'_>) -> Vec<Action> {
    let me = cx.me();
    let mut out = Vec::new();
    let want = SyncState::new(me, Vec::new(), 0);
    let current = cx.view.sync.as_ref();
    if current.map(|s| &s.value) != Some(&want) {
        out.push(Action::WriteSync {
            state: want,
            expected_revision: current.map(|s| s.mod_revision),
        });
    }
    let ssn = if cx.cfg.synchronous_mode_strict {
        SyncStandbyNames::placeholder()
    } else {
        SyncStandbyNames::default()
    };
    if cx.obs.pg.sync_standby_names != ssn {
        out.push(Action::SetSyncStandbyNames(ssn));
    }
    out
}

/// Leader rule "synchronous replication", once per cycle on a running primary.
pub(crate) fn on_primary(cx: &mut Ctx<'_>) -> Vec<Action> {
    let pg = &cx.obs.pg;
    let me = cx.me();
    if !cx.cfg.sync_mode() {
        let mut out = Vec::new();
        if let Some(s) = &cx.view.sync {
            out.push(Action::DeleteSync {
                expected_revision: s.mod_revision,
            });
        }
        if !pg.sync_standby_names.is_async() {
            out.push(Action::SetSyncStandbyNames(SyncStandbyNames::default()));
        }
        return out;
    }
    let current = cx.view.sync.as_ref();
    let owned = current.is_some_and(|s| {
        s.value
            .leader
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case(me))
    });
    if !owned {
        return vec![Action::WriteSync {
            state: SyncState::new(me, Vec::new(), 0),
            expected_revision: current.map(|s| s.mod_revision),
        }];
    }
    let current = current.expect("owned");
    let revision = current.mod_revision;
    let in_sync: BTreeSet<String> = current.value.standbys().into_iter().collect();
    let mut want: BTreeSet<String> = desired(cx, &in_sync).into_iter().collect();
    if cx.cfg.synchronous_mode_strict && want.is_empty() {
        // Strict: keep the last synchronous standbys rather than turning asynchronous.
        want = in_sync.clone();
    }
    // 1. Remove from /sync first.
    if !in_sync.is_subset(&want) {
        let keep: Vec<String> = in_sync.intersection(&want).cloned().collect();
        return vec![Action::WriteSync {
            state: SyncState::new(me, keep, 0),
            expected_revision: Some(revision),
        }];
    }
    // 2. Then make PostgreSQL wait for exactly the wanted standbys.
    let target = if want.is_empty() {
        if cx.cfg.synchronous_mode_strict {
            SyncStandbyNames::placeholder()
        } else {
            SyncStandbyNames::default()
        }
    } else {
        SyncStandbyNames::all_of(want.iter().cloned().collect())
    };
    if pg.sync_standby_names != target {
        let added = want
            .iter()
            .any(|w| !pg.sync_standby_names.names.contains(w));
        if added {
            // The threshold is taken once PostgreSQL shows the new standby as synchronous (step
            // 3), not now: until the reload takes effect, commits are acknowledged by the old
            // standbys only, and the new one must have them too before it enters `/sync`.
            cx.mem.sync_change_lsn = None;
        }
        let removes = pg
            .sync_standby_names
            .names
            .iter()
            .any(|n| !target.names.contains(n));
        if removes {
            // Dropping a name from PostgreSQL is safe only if `/sync` does not list it, and our
            // view of `/sync` may be stale (our own last write may not be in it yet): rewrite
            // `/sync` as we see it with compare-and-swap first; if the view is stale the CAS
            // fails, the shell stops, and the names stay.
            return vec![
                Action::WriteSync {
                    state: SyncState::new(me, in_sync.into_iter().collect(), 0),
                    expected_revision: Some(revision),
                },
                Action::SetSyncStandbyNames(target),
            ];
        }
        return vec![Action::SetSyncStandbyNames(target)];
    }
    // 3. Add to /sync the listed standbys that flushed everything acknowledged before
    // PostgreSQL started waiting for them: the threshold is our flush position in the first
    // observation that shows one of them as synchronous (every later commit waits for it).
    let newly_sync = want.difference(&in_sync).any(|w| {
        pg.replication
            .iter()
            .any(|r| &r.application_name == w && r.streaming && r.sync)
    });
    let threshold = match cx.mem.sync_change_lsn {
        Some(t) => t,
        None if newly_sync => *cx.mem.sync_change_lsn.insert(pg.wal_position),
        None => return Vec::new(),
    };
    let confirmed: Vec<String> = want
        .difference(&in_sync)
        .filter(|w| {
            pg.replication.iter().any(|r| {
                &r.application_name == *w && r.streaming && r.sync && r.flush_lsn >= threshold
            })
        })
        .cloned()
        .collect();
    if confirmed.is_empty() {
        return Vec::new();
    }
    let mut all: Vec<String> = in_sync.into_iter().collect();
    all.extend(confirmed);
    vec![Action::WriteSync {
        state: SyncState::new(me, all, 0),
        expected_revision: Some(revision),
    }]
}
