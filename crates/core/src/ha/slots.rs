//! Replication slots: names and the set the leader (or a cascading replica) keeps.

use std::collections::BTreeSet;

use crate::cluster::Lsn;

use super::action::{Action, SlotAdvance};
use super::decide::Ctx;

/// Patroni's slot name for a member: lower case, `-` and `.` become `_`, any other character
/// outside `[a-z0-9_]` becomes `u` followed by its code point in 4 decimal digits, cut to 63
/// bytes.
pub fn slot_name(member: &str) -> String {
    let mut out = String::with_capacity(member.len());
    for c in member.chars().flat_map(char::to_lowercase) {
        match c {
            'a'..='z' | '0'..='9' | '_' => out.push(c),
            '-' | '.' => out.push('_'),
            other => out.push_str(&format!("u{:04}", u32::from(other))),
        }
    }
    out.truncate(63);
    out
}

/// The physical slots the leader must have: one per other member that streams from it (not
/// `nostream`, not cascading from another member), the permanent slots, and slots of members
/// that left less than `member_slots_ttl` ago.
pub(crate) fn leader_slots(cx: &Ctx<'_>) -> BTreeSet<String> {
    let me = cx.me();
    let mut want: BTreeSet<String> = cx.cfg.permanent_slots.clone();
    for name in cx.mem.members_seen.keys() {
        if name == me {
            continue;
        }
        let streams_from_me = match cx.member(name) {
            Some(m) => {
                !m.tags.nostream
                    && m.tags
                        .replicatefrom
                        .as_deref()
                        .is_none_or(|r| r == me || !cx.view.members.contains_key(r))
            }
            // Absent member kept for member_slots_ttl.
            None => true,
        };
        if streams_from_me {
            want.insert(slot_name(name));
        }
    }
    want
}

/// Leader rule "member slots": create the missing physical slots, drop the unexpected physical
/// ones; create the permanent logical slots, and recreate one whose database or plugin differs
/// from the configuration. Logical slots pgkeep was not told about are left alone: they belong to
/// someone (a CDC consumer, a subscriber) and dropping one loses that consumer's position.
pub(crate) fn on_primary(cx: &Ctx<'_>) -> Vec<Action> {
    let mut out = Vec::new();
    if cx.cfg.use_slots {
        out = diff(&leader_slots(cx), &cx.obs.pg.slots, true);
    }
    let mut stale = Vec::new();
    for (name, spec) in &cx.cfg.logical_slots {
        match cx.obs.pg.logical_slots.get(name) {
            Some(have) if have.database == spec.database && have.plugin == spec.plugin => {}
            Some(_) => stale.push(name.clone()),
            None => out.push(Action::CreateLogicalSlot {
                name: name.clone(),
                database: spec.database.clone(),
                plugin: spec.plugin.clone(),
            }),
        }
    }
    if !stale.is_empty() {
        out.push(Action::DropSlots(stale));
    }
    out
}

/// The positions of the permanent logical slots on the leader, for `/status.slots`: replicas
/// advance their copies to them.
pub(crate) fn logical_positions<'c>(cx: &'c Ctx<'_>) -> impl Iterator<Item = (String, Lsn)> + 'c {
    cx.cfg.logical_slots.keys().filter_map(|name| {
        let s = cx.obs.pg.logical_slots.get(name)?;
        (s.confirmed_flush.0 > 0).then(|| (name.clone(), s.confirmed_flush))
    })
}

/// Replica rule "logical slot copies", on a failover-capable replica that follows `leader` on
/// its history: copy a permanent logical slot the leader has and this node lacks (PostgreSQL 15
/// cannot create one on a standby, so the state file is copied and PostgreSQL restarted), move
/// copies forward to the leader's published position (never past local replay), and drop a copy
/// whose database or plugin differs so it is copied again.
pub(crate) fn logical_on_replica(cx: &Ctx<'_>, leader: &str) -> Vec<Action> {
    if cx.obs.tags.nofailover || cx.cfg.logical_slots.is_empty() {
        return Vec::new();
    }
    let pg = &cx.obs.pg;
    let replay = pg.replay_lsn.unwrap_or_default();
    let (mut copy, mut advance, mut stale) = (Vec::new(), Vec::new(), Vec::new());
    for (name, spec) in &cx.cfg.logical_slots {
        let Some(target) = cx.view.status.slots.get(name) else {
            continue;
        };
        match pg.logical_slots.get(name) {
            None => copy.push(name.clone()),
            Some(have) if have.database != spec.database || have.plugin != spec.plugin => {
                stale.push(name.clone())
            }
            Some(have) => {
                let to = (*target).min(replay);
                if to > have.confirmed_flush {
                    advance.push(SlotAdvance {
                        name: name.clone(),
                        database: spec.database.clone(),
                        lsn: to,
                    });
                }
            }
        }
    }
    let mut out = Vec::new();
    if !stale.is_empty() {
        out.push(Action::DropSlots(stale));
    }
    if !advance.is_empty() {
        out.push(Action::AdvanceSlots(advance));
    }
    // Copying restarts PostgreSQL: never in maintenance mode.
    if !copy.is_empty() && !cx.cfg.pause {
        out.push(Action::CopyLogicalSlots {
            from: leader.to_owned(),
            names: copy,
        });
    }
    out
}

/// Replica rule "cascading slots": a replica keeps slots for members that stream from it. It
/// drops nothing (slots it has may be copies the leader still advances).
pub(crate) fn on_replica(cx: &Ctx<'_>) -> Vec<Action> {
    if !cx.cfg.use_slots {
        return Vec::new();
    }
    let me = cx.me();
    let want: BTreeSet<String> = cx
        .view
        .members
        .iter()
        .filter(|(n, m)| {
            n.as_str() != me
                && !m.data.tags.nostream
                && m.data.tags.replicatefrom.as_deref() == Some(me)
        })
        .map(|(n, _)| slot_name(n))
        .collect();
    diff(&want, &cx.obs.pg.slots, false)
}

fn diff(want: &BTreeSet<String>, have: &BTreeSet<String>, drop: bool) -> Vec<Action> {
    let mut out = Vec::new();
    let create: Vec<String> = want.difference(have).cloned().collect();
    if !create.is_empty() {
        out.push(Action::CreateSlots(create));
    }
    if drop {
        let remove: Vec<String> = have.difference(want).cloned().collect();
        if !remove.is_empty() {
            out.push(Action::DropSlots(remove));
        }
    }
    out
}
