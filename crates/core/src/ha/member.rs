//! What the node publishes: its member key, and as leader `/history` and `/status`.

use crate::cluster::{ClusterStatus, HistoryEntry, Lsn, MemberData};

use super::action::{Action, MemberState};
use super::decide::Ctx;
use super::slots;
use super::switchover::format_rfc3339;
use super::types::{DataDir, PgProcess};

/// Member field (pgkeep extension, ignored by Patroni tools) a leader publishes after it stopped
/// PostgreSQL and before it deletes the leader key on purpose: the leader key revision it
/// releases. A node that sees the key deleted at exactly that revision knows the old primary is
/// stopped and skips the takeover guard.
pub const RELEASED_FIELD: &str = "pgkeep_released";

/// Member field (pgkeep extension) the leader publishes once `/history` holds the history of its
/// current timeline: that timeline. Readers trust `/history` for rejoin decisions only when it
/// equals the leader's `timeline` (timelines can skip numbers, so `/history` alone cannot say
/// whether it is current).
pub const HISTORY_TL_FIELD: &str = "pgkeep_history_tl";

/// True when `/history` in the view is the history of the timeline the primary runs on.
pub(crate) fn history_is_current(cx: &Ctx<'_>) -> bool {
    let pg = &cx.obs.pg;
    let published: Vec<(u32, Lsn)> = cx
        .view
        .history
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|e| (e.parent_timeline, e.switch_lsn))
        .collect();
    let local: Vec<(u32, Lsn)> = pg
        .timeline_history
        .iter()
        .map(|e| (e.parent_timeline, e.switch_lsn))
        .collect();
    (cx.view.history.is_some() || local.is_empty()) && published == local
}

/// True when the leader's member data says `/history` is the history of its timeline.
pub(crate) fn leader_history_authoritative(leader: &MemberData) -> bool {
    leader.timeline.is_some_and(|t| {
        leader
            .other
            .get(HISTORY_TL_FIELD)
            .and_then(serde_json::Value::as_u64)
            == Some(u64::from(t))
    })
}

/// The member key value for this node.
pub(crate) fn member_data(cx: &Ctx<'_>, state: MemberState) -> MemberData {
    let obs = cx.obs;
    let pg = &obs.pg;
    let mut m = obs.member_template.clone();
    m.tags = obs.tags.clone();
    m.pause = cx.cfg.pause;
    let empty = !matches!(pg.data_dir, DataDir::Initialised { .. });
    m.state = match (state, pg.process) {
        (MemberState::Cloning, _) => "creating replica",
        (MemberState::Bootstrapping, _) => "initializing new cluster",
        (_, PgProcess::Running | PgProcess::Promoting) => "running",
        (_, PgProcess::Starting) => "starting",
        (_, PgProcess::Stopping) => "stopping",
        (_, PgProcess::Stopped) if pg.crashed => "crashed",
        (_, PgProcess::Stopped) => "stopped",
    }
    .to_owned();
    m.role = if empty && state != MemberState::Bootstrapping {
        "uninitialized"
    } else if pg.may_commit() {
        "primary"
    } else if state == MemberState::Fencing || state == MemberState::Demoting {
        "demoted"
    } else {
        "replica"
    }
    .to_owned();
    let running = matches!(
        pg.process,
        PgProcess::Running | PgProcess::Promoting | PgProcess::Starting
    );
    m.xlog_location = running.then_some(pg.wal_position);
    if running && pg.in_recovery {
        m.receive_lsn = Some(pg.wal_position);
        m.replay_lsn = Some(pg.replay_lsn.unwrap_or(pg.wal_position));
        m.replication_state = pg.streaming.then(|| "streaming".to_owned());
    } else {
        m.receive_lsn = None;
        m.replay_lsn = None;
        m.replication_state = None;
    }
    m.timeline = pg.timeline;
    m.other.remove(RELEASED_FIELD);
    if let Some(r) = cx.mem.released_revision {
        m.other
            .insert(RELEASED_FIELD.to_owned(), serde_json::Value::from(r));
    }
    m.other.remove(HISTORY_TL_FIELD);
    if let Some(tl) = pg.timeline
        && pg.is_running_primary()
        && cx.holds_key()
        && history_is_current(cx)
    {
        m.other
            .insert(HISTORY_TL_FIELD.to_owned(), serde_json::Value::from(tl));
    }
    m
}

/// True when `member` announced releasing exactly leader key revision `revision`.
pub(crate) fn released_at(member: &MemberData, revision: i64) -> bool {
    member
        .other
        .get(RELEASED_FIELD)
        .and_then(serde_json::Value::as_i64)
        == Some(revision)
}

/// Leader rule "timeline history": `/history` mirrors the current timeline's history file; on
/// timeline 1 a non-empty `/history` is reset to `[]`.
pub(crate) fn history_actions(cx: &Ctx<'_>) -> Vec<Action> {
    let pg = &cx.obs.pg;
    let Some(tl) = pg.timeline else {
        return Vec::new();
    };
    if tl <= 1 {
        return match &cx.view.history {
            Some(h) if !h.is_empty() => vec![Action::WriteHistory(Vec::new())],
            _ => Vec::new(),
        };
    }
    if history_is_current(cx) || pg.timeline_history.is_empty() {
        return Vec::new();
    }
    let known = cx.view.history.as_deref().unwrap_or(&[]);
    let last = pg.timeline_history.len() - 1;
    let entries: Vec<HistoryEntry> =
        pg.timeline_history
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut e = e.clone();
                if let Some(k) = known.iter().find(|k| {
                    k.parent_timeline == e.parent_timeline && k.switch_lsn == e.switch_lsn
                }) {
                    e.timestamp = e.timestamp.or_else(|| k.timestamp.clone());
                    e.new_leader = e.new_leader.or_else(|| k.new_leader.clone());
                }
                if i == last {
                    e.timestamp = e
                        .timestamp
                        .or_else(|| Some(format_rfc3339(cx.obs.wall_clock_ms)));
                    e.new_leader = e.new_leader.or_else(|| Some(cx.me().to_owned()));
                }
                e
            })
            .collect();
    vec![Action::WriteHistory(entries)]
}

/// Leader rule "status": `/status` carries the leader's flush LSN and the member slots to retain.
pub(crate) fn status_actions(cx: &Ctx<'_>) -> Vec<Action> {
    let optime: Lsn = cx.obs.pg.wal_position;
    let mut status = ClusterStatus {
        optime: Some(optime),
        ..ClusterStatus::default()
    };
    status.slots.extend(slots::logical_positions(cx));
    if cx.cfg.use_slots {
        status.retain_slots = cx
            .mem
            .members_seen
            .keys()
            .map(|n| slots::slot_name(n))
            .collect();
    }
    if cx.view.status == status {
        Vec::new()
    } else {
        vec![Action::WriteStatus(status)]
    }
}
