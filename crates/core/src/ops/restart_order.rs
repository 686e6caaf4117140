//! The order of a rolling restart when hot-standby-critical parameters change.
//!
//! A hot standby must run with values of `max_connections`, `max_prepared_transactions`,
//! `max_locks_per_transaction`, `max_wal_senders` and `max_worker_processes` at least as high as
//! the primary's: the primary writes its values into the WAL, and a standby that sees a higher
//! value than its own stops replaying (PostgreSQL 14 and later pause recovery, older versions
//! shut the standby down). So when such a value is **raised** the replicas are restarted first,
//! and when it is **lowered** the primary is restarted first.
//!
//! [`restart_order`] decides this by simulation: for each candidate order (replicas first, then
//! primary first) it checks, after every single restart, that every replica's value is at least
//! the primary's value for every parameter, where a member runs with its `running` value until
//! it is restarted and with its `after_restart` value afterwards. The first order that keeps the
//! rule at every step wins; replicas first is preferred (the primary's downtime comes last, when
//! the replicas are known to come back). Comparisons with an unknown value are assumed to hold
//! and are reported in [`RestartPlan::assumed`]: when nothing is known the result is the
//! fallback **replicas first, then the primary**. When no order is safe (one parameter raised
//! and another lowered, or a replica left out of the restart would fall behind the primary), the
//! answer is an [`OrderError`] naming the parameter, so the operator can split the change.

use std::collections::BTreeMap;
use std::fmt;

/// The parameters whose standby values must be at least the primary's.
pub const HOT_STANDBY_PARAMETERS: [&str; 5] = [
    "max_connections",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "max_wal_senders",
    "max_worker_processes",
];

/// One parameter of one member: the value it runs with and the value it will run with after a
/// restart (`None`: unknown; an unknown `after_restart` means the running value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setting {
    /// The value PostgreSQL runs with now.
    pub running: Option<i64>,
    /// The value it will run with after a restart (its configuration files).
    pub after_restart: Option<i64>,
}

/// A member as the ordering sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestartMember {
    /// Its name.
    pub name: String,
    /// It holds the leader key (its PostgreSQL is the primary).
    pub leader: bool,
    /// It is to be restarted (members left out keep their running values throughout).
    pub restart: bool,
    /// Hot-standby-critical parameters by name (missing: unknown).
    pub settings: BTreeMap<String, Setting>,
}

/// The order to restart in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPlan {
    /// Member names, in restart order.
    pub order: Vec<String>,
    /// The primary comes first (a value is lowered).
    pub primary_first: bool,
    /// Parameters whose value changes with the restart, `(name, from, to)`, as the primary (or
    /// else the first member that changes it) sees it.
    pub changes: Vec<(String, i64, i64)>,
    /// `member.parameter` comparisons that could not be checked for lack of a value.
    pub assumed: Vec<String>,
}

impl RestartPlan {
    /// One line for the operator: which order and why.
    pub fn explanation(&self) -> String {
        let changes: Vec<String> = self
            .changes
            .iter()
            .map(|(p, from, to)| format!("{p} {from} -> {to}"))
            .collect();
        let why = if changes.is_empty() {
            "no hot-standby-critical parameter changes".to_owned()
        } else {
            changes.join(", ")
        };
        let order = if self.primary_first {
            "primary first, then replicas (a value is lowered)"
        } else if self.changes.is_empty() && !self.assumed.is_empty() {
            "replicas first, then the primary (the running values are not known)"
        } else {
            "replicas first, then the primary"
        };
        format!("{order}: {why}")
    }
}

/// No order keeps every replica's value at least the primary's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// At some step a replica would run with a lower value than the primary.
    #[error(
        "no safe restart order: {parameter} on {replica} would be {replica_value} while the primary \
         {primary} runs with {primary_value} (a hot standby needs at least the primary's value); \
         raise and lower hot-standby-critical parameters in separate changes, and restart every \
         member that has the change pending"
    )]
    Unsafe {
        /// The parameter.
        parameter: String,
        /// The replica that would fall short.
        replica: String,
        /// Its value at that step.
        replica_value: i64,
        /// The primary.
        primary: String,
        /// The primary's value at that step.
        primary_value: i64,
    },
}

/// A member's value of `param` once the members in `restarted` are restarted.
fn value(m: &RestartMember, param: &str, restarted: bool) -> Option<i64> {
    let s = m.settings.get(param)?;
    if restarted {
        s.after_restart.or(s.running)
    } else {
        s.running
    }
}

/// Checks every step of `order`; the first violation, and the comparisons assumed.
fn simulate(
    members: &[RestartMember],
    leader: &RestartMember,
    order: &[&str],
    assumed: &mut Vec<String>,
) -> Result<(), OrderError> {
    for step in 1..=order.len() {
        let done = &order[..step];
        let restarted = |m: &RestartMember| done.contains(&m.name.as_str());
        for r in members.iter().filter(|m| !m.leader) {
            for p in HOT_STANDBY_PARAMETERS {
                match (
                    value(r, p, restarted(r)),
                    value(leader, p, restarted(leader)),
                ) {
                    (Some(rv), Some(lv)) if rv < lv => {
                        return Err(OrderError::Unsafe {
                            parameter: p.to_owned(),
                            replica: r.name.clone(),
                            replica_value: rv,
                            primary: leader.name.clone(),
                            primary_value: lv,
                        });
                    }
                    (Some(_), Some(_)) => {}
                    (rv, _) => {
                        let who = if rv.is_none() { &r.name } else { &leader.name };
                        let a = format!("{who}.{p}");
                        if !assumed.contains(&a) {
                            assumed.push(a);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The parameters that change, as the leader (or else the first member changing it) sees it.
fn changes(members: &[RestartMember]) -> Vec<(String, i64, i64)> {
    let mut sorted: Vec<&RestartMember> = members.iter().filter(|m| m.restart).collect();
    sorted.sort_by_key(|m| !m.leader);
    let mut out = Vec::new();
    for p in HOT_STANDBY_PARAMETERS {
        let change = sorted.iter().find_map(|m| {
            let s = m.settings.get(p)?;
            match (s.running, s.after_restart) {
                (Some(a), Some(b)) if a != b => Some((p.to_owned(), a, b)),
                _ => None,
            }
        });
        out.extend(change);
    }
    out
}

/// The order to restart the members marked `restart` in (see the module documentation).
/// Without a leader among `members`, the members are restarted in the given order.
pub fn restart_order(members: &[RestartMember]) -> Result<RestartPlan, OrderError> {
    let selected = |leader_wanted: bool| -> Vec<&str> {
        members
            .iter()
            .filter(|m| m.restart && m.leader == leader_wanted)
            .map(|m| m.name.as_str())
            .collect()
    };
    let changes = changes(members);
    let Some(leader) = members.iter().find(|m| m.leader) else {
        return Ok(RestartPlan {
            order: selected(false).into_iter().map(str::to_owned).collect(),
            primary_first: false,
            changes,
            assumed: Vec::new(),
        });
    };
    let replicas = selected(false);
    let primary = selected(true);
    let replicas_first: Vec<&str> = replicas.iter().chain(&primary).copied().collect();
    let primary_first: Vec<&str> = primary.iter().chain(&replicas).copied().collect();
    let mut assumed = Vec::new();
    let first = simulate(members, leader, &replicas_first, &mut assumed);
    let (order, is_primary_first) = match first {
        Ok(()) => (replicas_first, false),
        Err(e) => {
            let mut ignored = Vec::new();
            if primary.is_empty()
                || simulate(members, leader, &primary_first, &mut ignored).is_err()
            {
                return Err(e);
            }
            assumed = ignored;
            (primary_first, !primary.is_empty())
        }
    };
    Ok(RestartPlan {
        order: order.into_iter().map(str::to_owned).collect(),
        primary_first: is_primary_first,
        changes,
        assumed,
    })
}

impl fmt::Display for RestartPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.order.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member whose `max_connections` goes `running -> after` (`None`: unknown), and whose
    /// other critical parameters are unchanged at known values.
    fn m(name: &str, leader: bool, running: Option<i64>, after: Option<i64>) -> RestartMember {
        let mut settings: BTreeMap<String, Setting> = HOT_STANDBY_PARAMETERS
            .iter()
            .map(|p| {
                (
                    p.to_string(),
                    Setting {
                        running: Some(10),
                        after_restart: Some(10),
                    },
                )
            })
            .collect();
        settings.insert(
            "max_connections".into(),
            Setting {
                running,
                after_restart: after,
            },
        );
        RestartMember {
            name: name.into(),
            leader,
            restart: true,
            settings,
        }
    }

    fn cluster(running: i64, after: i64) -> Vec<RestartMember> {
        vec![
            m("n1", true, Some(running), Some(after)),
            m("n2", false, Some(running), Some(after)),
            m("n3", false, Some(running), Some(after)),
        ]
    }

    /// Table: (running, after) → (order, primary first).
    #[test]
    fn raising_restarts_replicas_first_lowering_the_primary_first() {
        let cases: &[(i64, i64, &[&str], bool)] = &[
            (100, 150, &["n2", "n3", "n1"], false),
            (150, 100, &["n1", "n2", "n3"], true),
            (100, 100, &["n2", "n3", "n1"], false),
        ];
        for &(running, after, order, primary_first) in cases {
            let plan = restart_order(&cluster(running, after)).unwrap();
            assert_eq!(plan.order, order, "{running} -> {after}");
            assert_eq!(plan.primary_first, primary_first, "{running} -> {after}");
            assert!(plan.assumed.is_empty());
        }
        let plan = restart_order(&cluster(100, 150)).unwrap();
        assert_eq!(plan.changes, [("max_connections".to_owned(), 100, 150)]);
        assert!(
            plan.explanation().starts_with("replicas first"),
            "{}",
            plan.explanation()
        );
        let plan = restart_order(&cluster(150, 100)).unwrap();
        assert!(
            plan.explanation().starts_with("primary first"),
            "{}",
            plan.explanation()
        );
    }

    #[test]
    fn raising_one_and_lowering_another_has_no_safe_order() {
        let mut c = cluster(100, 150);
        for member in &mut c {
            member.settings.insert(
                "max_wal_senders".into(),
                Setting {
                    running: Some(10),
                    after_restart: Some(5),
                },
            );
        }
        let e = restart_order(&c).unwrap_err();
        assert!(e.to_string().contains("separate changes"), "{e}");
    }

    #[test]
    fn unknown_values_fall_back_to_replicas_first() {
        let c = vec![
            RestartMember {
                name: "n1".into(),
                leader: true,
                restart: true,
                settings: BTreeMap::new(),
            },
            RestartMember {
                name: "n2".into(),
                leader: false,
                restart: true,
                settings: BTreeMap::new(),
            },
        ];
        let plan = restart_order(&c).unwrap();
        assert_eq!(plan.order, ["n2", "n1"]);
        assert!(!plan.primary_first);
        assert_eq!(plan.assumed.len(), HOT_STANDBY_PARAMETERS.len());
        assert!(
            plan.explanation().contains("not known"),
            "{}",
            plan.explanation()
        );
    }

    #[test]
    fn only_some_members_pending() {
        // The primary alone has a raise pending: restarting it first would put it above the
        // replicas; they must be restarted too (and first).
        let c = vec![
            m("n1", true, Some(100), Some(150)),
            RestartMember {
                restart: false,
                ..m("n2", false, Some(100), Some(100))
            },
        ];
        assert!(restart_order(&c).is_err());
        // A replica alone lowering below the primary: unsafe until the primary comes first.
        let c = vec![
            RestartMember {
                restart: false,
                ..m("n1", true, Some(150), Some(150))
            },
            m("n2", false, Some(150), Some(100)),
        ];
        assert!(restart_order(&c).is_err());
        // A replica alone raising: fine on its own.
        let c = vec![
            RestartMember {
                restart: false,
                ..m("n1", true, Some(100), Some(100))
            },
            m("n2", false, Some(100), Some(150)),
        ];
        assert_eq!(restart_order(&c).unwrap().order, ["n2"]);
    }

    #[test]
    fn unknown_after_means_unchanged_and_no_leader_keeps_the_given_order() {
        let c = vec![
            m("n1", true, Some(150), None),
            m("n2", false, Some(100), Some(150)),
        ];
        assert_eq!(restart_order(&c).unwrap().order, ["n2", "n1"]);
        let c = vec![
            m("n3", false, Some(100), Some(150)),
            m("n2", false, Some(100), Some(150)),
        ];
        assert_eq!(restart_order(&c).unwrap().order, ["n3", "n2"]);
    }
}
