//! Editing the dynamic configuration (the DCS `config` key) and checking an edit before it is
//! written.
//!
//! Patroni writes whatever `PATCH /config` or `patronictl edit-config` produces and lets each
//! node silently drop what it does not use. pgkeep checks the proposed configuration with the
//! same interpretation the agents use ([`dynamic::read`] and [`dynamic::interpret`]) and
//! **refuses** the write when the edit adds or changes a key the agents would drop: a key that
//! could run code, name files or weaken security (a security event), a key pgkeep does not know,
//! a malformed or unsafe parameter value, or timing settings that break a safety rule. Keys that
//! were already in the configuration and that the edit leaves untouched do not block it (they
//! are reported as warnings), so an old Patroni configuration can still be edited.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

use crate::dynamic::{self, DroppedKey, DynamicConfig, DynamicError};
use crate::ha::{ConfigError, HaConfig};
use crate::policy::GucName;

/// One reason a proposed configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The dotted key, e.g. `postgresql.parameters.archive_command` or `loop_wait`.
    pub key: String,
    /// Why.
    pub reason: String,
    /// The key could run code, name files or weaken security.
    pub security: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A proposed configuration that passed the check.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// How the agents will read it.
    pub dynamic: DynamicConfig,
    /// Keys the agents ignore that were already present and are left unchanged by the edit.
    pub warnings: Vec<DroppedKey>,
}

/// Applies a JSON merge patch (RFC 7386, which is what Patroni's `PATCH /config` does): objects
/// are merged key by key, recursively; `null` deletes a key; any other value replaces the old
/// one (an object replacing a non-object starts from an empty object).
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge_patch(t, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The merge patch of one `ctl edit-config` option: `-s key.path=value` (`pg_param` false) or
/// `-p name=value` (`pg_param` true, the key is `postgresql.parameters.<name>`). `None` deletes
/// the key. As in patronictl, a `-s` path below `postgresql.parameters` keeps the rest of the
/// path as one parameter name, so `-s postgresql.parameters.pgaudit.log=ddl` sets `pgaudit.log`.
pub fn edit_patch(key: &str, value: Option<Value>, pg_param: bool) -> Map<String, Value> {
    let mut path: Vec<String> = if pg_param {
        vec!["postgresql".into(), "parameters".into(), key.to_owned()]
    } else {
        key.split('.').map(str::to_owned).collect()
    };
    if !pg_param && path.len() > 3 && path[0] == "postgresql" && path[1] == "parameters" {
        let name = path[2..].join(".");
        path.truncate(2);
        path.push(name);
    }
    let mut leaf = value.unwrap_or(Value::Null);
    for segment in path.iter().skip(1).rev() {
        let mut m = Map::new();
        m.insert(segment.clone(), leaf);
        leaf = Value::Object(m);
    }
    let mut patch = Map::new();
    patch.insert(path[0].clone(), leaf);
    patch
}

/// The value at a dotted `path`, where names may themselves contain dots (extension
/// parameters such as `pgaudit.log`): every split is tried.
fn get_path<'a>(map: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = map.get(path) {
        return Some(v);
    }
    path.match_indices('.')
        .find_map(|(i, _)| match map.get(&path[..i]) {
            Some(Value::Object(inner)) => get_path(inner, &path[i + 1..]),
            _ => None,
        })
}

/// The dotted paths of the leaves that differ between `old` and `new` (added, removed or
/// changed), in order. For audit logs and `ctl edit-config` summaries.
pub fn changed_paths(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(old, new, "", &mut out);
    out
}

fn diff_into(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    prefix: &str,
    out: &mut Vec<String>,
) {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (old.get(k), new.get(k)) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => diff_into(a, b, &path, out),
            (a, b) if a != b => out.push(path),
            _ => {}
        }
    }
}

/// The key a timing error is about.
fn timing_key(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::TtlTooSmall(_) | ConfigError::TtlNotWholeSeconds(_) => "ttl",
        ConfigError::IntervalTooSmall { name, .. } => name,
        ConfigError::LoopTooSlow(..) => "loop_wait",
        ConfigError::BadMargin { .. } => "lease_safety_margin",
        ConfigError::SyncCountZero => "synchronous_node_count",
    }
}

/// Checks `proposed` (the whole configuration about to be written) against `current` (what
/// the key holds now, `None` when absent) with the node's extra dynamic-parameter allowlist.
///
/// Refused, with every offending key named: a value of the wrong type or range; timing that
/// breaks a safety rule; and every key the agents would drop (security-relevant, unknown, a
/// malformed or unsafe parameter) whose value the edit adds or changes. Dropped keys the edit
/// leaves as they were come back as [`Checked::warnings`].
pub fn check_config(
    current: Option<&Map<String, Value>>,
    proposed: &Map<String, Value>,
    local_allowlist: &BTreeSet<GucName>,
) -> Result<Checked, Vec<Refusal>> {
    let read = dynamic::read(proposed, &HaConfig::default(), local_allowlist).map_err(|e| {
        let DynamicError::BadValue { key, reason } = &e else {
            return vec![Refusal {
                key: "config".into(),
                reason: e.to_string(),
                security: false,
            }];
        };
        vec![Refusal {
            key: key.clone(),
            reason: reason.clone(),
            security: false,
        }]
    })?;
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    for d in &read.dropped {
        let new = get_path(proposed, &d.path);
        let old = current.and_then(|c| get_path(c, &d.path));
        // A path that cannot be found again (a truncated, malformed name) counts as changed.
        if new.is_none() || old != new {
            refusals.push(Refusal {
                key: d.path.clone(),
                reason: d.reason.clone(),
                security: d.security,
            });
        } else {
            warnings.push(d.clone());
        }
    }
    let dynamic = match dynamic::interpret(proposed, &HaConfig::default(), local_allowlist) {
        Ok(d) => Some(d),
        Err(DynamicError::Unsafe(e)) => {
            refusals.push(Refusal {
                key: timing_key(&e).to_owned(),
                reason: e.to_string(),
                security: false,
            });
            None
        }
        Err(DynamicError::BadValue { key, reason }) => {
            refusals.push(Refusal {
                key,
                reason,
                security: false,
            });
            None
        }
    };
    match dynamic {
        Some(dynamic) if refusals.is_empty() => Ok(Checked { dynamic, warnings }),
        _ => Err(refusals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn check(current: Value, proposed: Value) -> Result<Checked, Vec<Refusal>> {
        check_config(Some(&obj(current)), &obj(proposed), &BTreeSet::new())
    }

    fn refused_keys(r: Result<Checked, Vec<Refusal>>) -> Vec<(String, bool)> {
        r.unwrap_err()
            .into_iter()
            .map(|r| (r.key, r.security))
            .collect()
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut c = obj(json!({
            "ttl": 30, "pause": true,
            "postgresql": {"use_pg_rewind": true, "parameters": {"work_mem": "4MB", "max_connections": 100}},
            "tags": "x"
        }));
        merge_patch(
            &mut c,
            &obj(json!({
                "pause": null,
                "loop_wait": 5,
                "postgresql": {"parameters": {"work_mem": null, "max_connections": 150}},
                "tags": {"a": 1, "b": null},
                "absent": null
            })),
        );
        assert_eq!(
            Value::Object(c),
            json!({
                "ttl": 30, "loop_wait": 5,
                "postgresql": {"use_pg_rewind": true, "parameters": {"max_connections": 150}},
                "tags": {"a": 1}
            })
        );
    }

    #[test]
    fn edit_patches_like_patronictl() {
        assert_eq!(
            Value::Object(edit_patch("loop_wait", Some(json!(2)), false)),
            json!({"loop_wait": 2})
        );
        assert_eq!(
            Value::Object(edit_patch("max_connections", Some(json!(150)), true)),
            json!({"postgresql": {"parameters": {"max_connections": 150}}})
        );
        assert_eq!(
            Value::Object(edit_patch("pgaudit.log", None, true)),
            json!({"postgresql": {"parameters": {"pgaudit.log": null}}})
        );
        assert_eq!(
            Value::Object(edit_patch(
                "postgresql.parameters.pgaudit.log",
                Some(json!("ddl")),
                false
            )),
            json!({"postgresql": {"parameters": {"pgaudit.log": "ddl"}}})
        );
        assert_eq!(
            Value::Object(edit_patch(
                "postgresql.use_slots",
                Some(json!(false)),
                false
            )),
            json!({"postgresql": {"use_slots": false}})
        );
    }

    #[test]
    fn changed_paths_lists_leaves() {
        let old = obj(json!({"ttl": 30, "postgresql": {"parameters": {"a": 1, "b": 2}}, "x": 1}));
        let new = obj(json!({"ttl": 30, "postgresql": {"parameters": {"a": 1, "b": 3, "c": 4}}}));
        assert_eq!(
            changed_paths(&old, &new),
            ["postgresql.parameters.b", "postgresql.parameters.c", "x"]
        );
        assert!(changed_paths(&old, &old).is_empty());
    }

    /// Table: (what the edit adds, refused key, security event).
    #[test]
    fn edits_the_agents_would_drop_are_refused() {
        let base = json!({"ttl": 30, "loop_wait": 10, "retry_timeout": 10});
        let cases: &[(Value, &str, bool)] = &[
            (
                json!({"postgresql": {"parameters": {"archive_command": "sh -c evil"}}}),
                "postgresql.parameters.archive_command",
                true,
            ),
            (
                json!({"postgresql": {"parameters": {"shared_preload_libraries": "evil"}}}),
                "postgresql.parameters.shared_preload_libraries",
                true,
            ),
            (
                json!({"postgresql": {"callbacks": {"on_start": "/tmp/x"}}}),
                "postgresql.callbacks",
                true,
            ),
            (
                json!({"postgresql": {"pg_hba": ["host all all 0.0.0.0/0 trust"]}}),
                "postgresql.pg_hba",
                true,
            ),
            (
                json!({"standby_cluster": {"host": "evil"}}),
                "standby_cluster",
                true,
            ),
            (
                json!({"slots": {"leak": {"type": "logical", "database": "x", "plugin": "../evil"}}}),
                "slots.leak",
                true,
            ),
            (json!({"some_future_key": 1}), "some_future_key", false),
            (
                json!({"postgresql": {"parameters": {"not_a_guc": 1}}}),
                "postgresql.parameters.not_a_guc",
                false,
            ),
            (
                json!({"postgresql": {"parameters": {"max_wal_senders": 1}}}),
                "postgresql.parameters.max_wal_senders",
                false,
            ),
            (
                json!({"postgresql": {"bogus": 1}}),
                "postgresql.bogus",
                false,
            ),
            (
                json!({"synchronous_mode": "quorum"}),
                "synchronous_mode",
                false,
            ),
            (json!({"pause": "maybe"}), "pause", false),
            (json!({"loop_wait": 25}), "loop_wait", false),
            (json!({"ttl": 1}), "ttl", false),
        ];
        for (patch, key, security) in cases {
            let mut proposed = obj(base.clone());
            merge_patch(&mut proposed, patch.as_object().unwrap());
            let r = check(base.clone(), Value::Object(proposed));
            assert_eq!(
                refused_keys(r),
                [(key.to_string(), *security)],
                "patch {patch}"
            );
        }
    }

    #[test]
    fn ordinary_edits_pass() {
        let base = json!({"ttl": 30, "loop_wait": 10, "retry_timeout": 10});
        for patch in [
            json!({"loop_wait": 2}),
            json!({"pause": true}),
            json!({"postgresql": {"parameters": {"max_connections": 150, "work_mem": "16MB"}}}),
            json!({"postgresql": {"use_pg_rewind": false}}),
            json!({"maximum_lag_on_failover": 0, "synchronous_mode": true}),
        ] {
            let mut proposed = obj(base.clone());
            merge_patch(&mut proposed, patch.as_object().unwrap());
            let c = check(base.clone(), Value::Object(proposed)).unwrap();
            assert!(c.warnings.is_empty());
        }
        let c = check(
            base.clone(),
            json!({"ttl": 30, "loop_wait": 2, "retry_timeout": 10}),
        )
        .unwrap();
        assert_eq!(c.dynamic.ha.loop_wait, crate::ha::Millis::from_secs(2));
    }

    #[test]
    fn untouched_dropped_keys_are_warnings_and_deleting_them_is_allowed() {
        let current = json!({"ttl": 30, "postgresql": {"parameters": {"archive_command": "x"}}, "max_timelines_history": 5});
        let mut proposed = obj(current.clone());
        merge_patch(&mut proposed, &obj(json!({"loop_wait": 5})));
        let c = check(current.clone(), Value::Object(proposed)).unwrap();
        let w: Vec<&str> = c.warnings.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            w,
            [
                "max_timelines_history",
                "postgresql.parameters.archive_command"
            ]
        );
        // Changing the dropped value is refused; deleting it is not.
        let mut changed = obj(current.clone());
        merge_patch(
            &mut changed,
            &obj(json!({"postgresql": {"parameters": {"archive_command": "y"}}})),
        );
        assert_eq!(
            refused_keys(check(current.clone(), Value::Object(changed))),
            [("postgresql.parameters.archive_command".to_owned(), true)]
        );
        let mut deleted = obj(current.clone());
        merge_patch(
            &mut deleted,
            &obj(json!({"postgresql": {"parameters": {"archive_command": null}}})),
        );
        assert!(
            check(current, Value::Object(deleted))
                .unwrap()
                .warnings
                .len()
                == 1
        );
    }

    #[test]
    fn every_offending_key_is_named_and_absent_config_counts_as_empty() {
        let proposed = obj(json!({
            "ttl": 30,
            "postgresql": {"parameters": {"archive_command": "a", "restore_command": "b", "work_mem": "1MB"}},
            "unknown": true
        }));
        let keys = refused_keys(check_config(None, &proposed, &BTreeSet::new()));
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.contains(&("unknown".to_owned(), false)));
        assert!(keys.contains(&("postgresql.parameters.restore_command".to_owned(), true)));
    }

    #[test]
    fn extension_parameters_need_the_local_allowlist() {
        let current = obj(json!({}));
        let proposed = obj(json!({"postgresql": {"parameters": {"pgaudit.log": "ddl"}}}));
        assert_eq!(
            refused_keys(check_config(Some(&current), &proposed, &BTreeSet::new())),
            [("postgresql.parameters.pgaudit.log".to_owned(), false)]
        );
        let allow: BTreeSet<GucName> = [GucName::parse("pgaudit.log").unwrap()].into();
        assert!(check_config(Some(&current), &proposed, &allow).is_ok());
    }
}
