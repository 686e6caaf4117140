//! `pgkeep ctl history` and `topology`: read-only views of what etcd holds.
//!
//! `history` prints the `/history` key (every timeline switch: the timeline that ended, the
//! LSN where it ended as a byte position, PostgreSQL's reason, when, and the member that was
//! promoted) as a table, or with `--format json` as an array of objects with patronictl's column
//! names (`TL`, `LSN`, `Reason`, `Timestamp`, `New Leader`).
//!
//! `topology` prints the members as `ctl list` does, as a tree: the leader first, under it the
//! members that stream from it, under each replica those whose `replicatefrom` tag names it (a
//! `replicatefrom` member that does not exist or runs nothing puts the member under the leader,
//! as the agents then stream from the leader).

use std::collections::BTreeMap;

use anyhow::Result;
use pgkeep_core::cluster::{ClusterView, HistoryEntry};
use serde_json::{Value, json};

use super::{Format, MemberRow};

/// The rows of `ctl history`.
fn history_rows(history: &[HistoryEntry]) -> Vec<[String; 5]> {
    history
        .iter()
        .map(|e| {
            [
                e.parent_timeline.to_string(),
                e.switch_lsn.0.to_string(),
                e.reason.clone(),
                e.timestamp.clone().unwrap_or_default(),
                e.new_leader.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// `ctl history` in `format`.
pub(super) fn history(view: &ClusterView, format: Format) -> Result<String> {
    let history = view.history.as_deref().unwrap_or(&[]);
    Ok(match format {
        Format::Json => {
            let rows: Vec<Value> = history
                .iter()
                .map(|e| {
                    json!({
                        "TL": e.parent_timeline,
                        "LSN": e.switch_lsn.0,
                        "Reason": e.reason,
                        "Timestamp": e.timestamp,
                        "New Leader": e.new_leader,
                    })
                })
                .collect();
            serde_json::to_string_pretty(&rows)? + "\n"
        }
        Format::Table => {
            let mut cells =
                vec![["TL", "LSN", "Reason", "Timestamp", "New Leader"].map(String::from)];
            cells.extend(history_rows(history));
            let mut out = align(&cells, &[true, true, false, false, false]);
            if history.is_empty() {
                out.push_str("(no timeline switches: the cluster is on timeline 1)\n");
            }
            out
        }
    })
}

/// Left-aligned columns (right-aligned where `right`), two spaces apart.
fn align<const N: usize>(cells: &[[String; N]], right: &[bool; N]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for c in cells {
        let line: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let w = widths[i];
                if right[i] {
                    format!("{v:>w$}")
                } else {
                    format!("{v:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Who each member streams from in the tree: its running `replicatefrom` member, else the
/// leader. `None` for the leader (and for everyone when there is no leader).
fn parent_of(view: &ClusterView, name: &str) -> Option<String> {
    let leader = view.leader.as_ref().map(|l| l.name.as_str())?;
    if name == leader {
        return None;
    }
    let m = view.members.get(name)?;
    if let Some(rf) = m.data.tags.replicatefrom.as_deref()
        && rf != name
        && view
            .members
            .get(rf)
            .is_some_and(|u| u.data.state == "running")
    {
        return Some(rf.to_owned());
    }
    Some(leader.to_owned())
}

/// The rows of `ctl list`, in tree order, with member names indented by depth (`+ name`).
pub(super) fn topology_rows(view: &ClusterView, rows: &[MemberRow]) -> Vec<MemberRow> {
    let by_name: BTreeMap<&str, &MemberRow> = rows.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut children: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for r in rows {
        children
            .entry(parent_of(view, &r.name))
            .or_default()
            .push(r.name.clone());
    }
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    fn walk(
        name: &str,
        depth: usize,
        children: &BTreeMap<Option<String>, Vec<String>>,
        by_name: &BTreeMap<&str, &MemberRow>,
        seen: &mut std::collections::BTreeSet<String>,
        out: &mut Vec<MemberRow>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some(r) = by_name.get(name) {
            let mut row = (*r).clone();
            if depth > 0 {
                row.name = format!("{}+ {}", "  ".repeat(depth - 1), r.name);
            }
            out.push(row);
        }
        for c in children.get(&Some(name.to_owned())).into_iter().flatten() {
            walk(c, depth + 1, children, by_name, seen, out);
        }
    }
    for root in children.get(&None).cloned().unwrap_or_default() {
        walk(&root, 0, &children, &by_name, &mut seen, &mut out);
    }
    // Members in a replicatefrom cycle that does not reach the leader.
    for r in rows {
        walk(&r.name, 0, &children, &by_name, &mut seen, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_core::cluster::RawEntry;

    fn entry(suffix: &str, value: &str) -> RawEntry {
        RawEntry {
            suffix: suffix.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 3,
            lease: 0,
        }
    }

    fn member(name: &str, extra: &str) -> RawEntry {
        entry(
            &format!("members/{name}"),
            &format!(
                r#"{{"conn_url":"postgres://{name}:5432/postgres","api_url":"https://{name}:8008/patroni","state":"running","role":"replica"{extra}}}"#
            ),
        )
    }

    #[test]
    fn history_table_and_json() {
        let (view, _) = ClusterView::from_entries(&[entry(
            "history",
            r#"[[1,25623960,"no recovery target specified","2026-01-01T00:00:00+00:00","n2"],[2,33554432,"no recovery target specified"]]"#,
        )]);
        let t = history(&view, Format::Table).unwrap();
        assert_eq!(
            t.lines().next().unwrap(),
            "TL       LSN  Reason                        Timestamp                  New Leader"
        );
        assert!(
            t.contains(" 1  25623960  no recovery target specified  2026-01-01T00:00:00+00:00  n2"),
            "{t}"
        );
        let j: Value = serde_json::from_str(&history(&view, Format::Json).unwrap()).unwrap();
        assert_eq!(j[0]["TL"], 1);
        assert_eq!(j[0]["New Leader"], "n2");
        assert_eq!(j[1]["Timestamp"], Value::Null);
        let (empty, _) = ClusterView::from_entries(&[]);
        assert!(
            history(&empty, Format::Table)
                .unwrap()
                .contains("timeline 1")
        );
        assert_eq!(history(&empty, Format::Json).unwrap(), "[]\n");
    }

    #[test]
    fn topology_follows_replicatefrom() {
        let (view, rejected) = ClusterView::from_entries(&[
            entry("leader", "n1"),
            member("n1", r#","role":"primary""#),
            member("n2", ""),
            member("n3", r#","tags":{"replicatefrom":"n2"}"#),
            member("n4", r#","tags":{"replicatefrom":"gone"}"#),
        ]);
        assert!(rejected.is_empty(), "{rejected:?}");
        let rows = super::super::rows(&view);
        let names: Vec<String> = topology_rows(&view, &rows)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["n1", "+ n2", "  + n3", "+ n4"]);
    }
}
