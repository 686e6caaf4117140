//! Replication slots: names and the set the leader (or a cascading replica) keeps.

use std::collections::BTreeSet;

use super::action::Action;
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

/// Leader rule "member slots": create the missing slots, drop the unexpected ones.
pub(crate) fn on_primary(cx: &Ctx<'_>) -> Vec<Action> {
    if !cx.cfg.use_slots {
        return Vec::new();
    }
    diff(&leader_slots(cx), &cx.obs.pg.slots, true)
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
