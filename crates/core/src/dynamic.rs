//! The dynamic configuration (the DCS `config` key) read through pgkeep's policy.
//!
//! Whoever can write the `config` key (the REST API's `PATCH /config`, `patronictl
//! edit-config`, anyone with etcd write access) must not be able to run code, touch files or
//! weaken security on the database hosts. So the key is *interpreted*, never merged blindly:
//! known timing and replication settings are read into [`HaConfig`], PostgreSQL parameters go
//! through [`policy::filter_dynamic`], and every other key is dropped with a reason. Patroni's
//! command-running and file-naming keys (callbacks, replica-creation methods, binary paths,
//! recovery commands, pg_hba, ...) are dropped with a security warning: pgkeep takes them from
//! the local file only, by design.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::ha::{HaConfig, LogicalSlotSpec, Millis, SyncMode};
use crate::policy::{self, GucName, Parameters};

/// A key of the dynamic configuration that pgkeep did not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedKey {
    /// Dotted path, e.g. `postgresql.callbacks` or `postgresql.parameters.archive_command`.
    pub path: String,
    /// Why.
    pub reason: String,
    /// The key could run code, touch files or weaken security: log it as a security warning.
    pub security: bool,
}

impl fmt::Display for DroppedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ignored dynamic configuration key {}: {}",
            self.path, self.reason
        )
    }
}

/// The dynamic configuration as pgkeep uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicConfig {
    /// Timing and replication settings.
    pub ha: HaConfig,
    /// PostgreSQL parameters that passed the policy.
    pub parameters: Parameters,
    /// Everything left out, for the log.
    pub dropped: Vec<DroppedKey>,
}

/// A dynamic configuration pgkeep refuses as a whole (the agent keeps the previous one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DynamicError {
    /// A setting has the wrong type or range.
    #[error("dynamic configuration key {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The timing settings break a safety rule.
    #[error("dynamic configuration refused: {0}")]
    Unsafe(#[from] crate::ha::ConfigError),
}

/// Patroni keys under `postgresql` that run commands, name files or rewrite authentication.
/// They are honoured only in the local file.
pub(crate) const LOCAL_ONLY_POSTGRESQL_KEYS: &[&str] = &[
    "callbacks",
    "pre_promote",
    "before_stop",
    "create_replica_methods",
    "bin_dir",
    "bin_name",
    "recovery_conf",
    "custom_conf",
    "config_base_name",
    "pg_hba",
    "pg_ident",
    "basebackup",
    "rewind",
    "remove_data_directory_on_rewind_failure",
    "remove_data_directory_on_diverged_timelines",
    "parameters_primary",
    "parameters_replica",
    "parameters_standby_leader",
    "pg_hba_primary",
    "pg_hba_replica",
    "pg_hba_standby_leader",
    "pg_ident_primary",
    "pg_ident_replica",
    "pg_ident_standby_leader",
    "connect_address",
    "proxy_address",
    "listen",
    "config_dir",
    "data_dir",
    "pgpass",
    "authentication",
];

/// Top-level keys that are security-relevant when they come from the DCS.
const LOCAL_ONLY_TOP_KEYS: &[(&str, &str)] = &[
    (
        "standby_cluster",
        "standby clusters are not supported, and this key can redirect replication and run recovery commands",
    ),
    ("restapi", "REST API settings are local-only"),
    ("ctl", "client settings are local-only"),
    ("etcd3", "DCS settings are local-only"),
    ("bootstrap", "bootstrap settings are local-only"),
    ("watchdog", "watchdog settings are local-only"),
    ("tags", "tags are per member and local-only"),
    ("failsafe_mode", "failsafe mode is not supported"),
];

/// Reads the dynamic configuration. `base` supplies every setting the key leaves out (pgkeep's
/// defaults, or the local file's `bootstrap.dcs`); `local_allowlist` is the node's extra
/// dynamic-parameter allowlist.
pub fn interpret(
    raw: &Map<String, Value>,
    base: &HaConfig,
    local_allowlist: &BTreeSet<GucName>,
) -> Result<DynamicConfig, DynamicError> {
    let mut d = read(raw, base, local_allowlist)?;
    if !raw.contains_key("lease_safety_margin") {
        d.ha.lease_safety_margin = default_margin(d.ha.ttl);
    }
    d.ha.validate()?;
    Ok(d)
}

/// Reads the keys without checking the timing rules; [`interpret`] is this plus the checks.
/// Useful to report every unknown or dropped key before a timing error hides them.
pub fn read(
    raw: &Map<String, Value>,
    base: &HaConfig,
    local_allowlist: &BTreeSet<GucName>,
) -> Result<DynamicConfig, DynamicError> {
    let mut ha = base.clone();
    let mut parameters = Parameters::new();
    let mut dropped = Vec::new();
    for (key, value) in raw {
        match key.as_str() {
            "ttl" => ha.ttl = seconds(key, value)?,
            "loop_wait" => ha.loop_wait = seconds(key, value)?,
            "retry_timeout" => ha.retry_timeout = seconds(key, value)?,
            "lease_safety_margin" => ha.lease_safety_margin = seconds(key, value)?,
            "primary_start_timeout" | "master_start_timeout" => {
                ha.primary_start_timeout = seconds(key, value)?
            }
            "switchover_timeout" => ha.switchover_timeout = seconds(key, value)?,
            "member_slots_ttl" => ha.member_slots_ttl = seconds(key, value)?,
            "maximum_lag_on_failover" => ha.maximum_lag_on_failover = whole(key, value)?,
            "check_timeline" => ha.check_timeline = boolean(key, value)?,
            "pause" => ha.pause = boolean(key, value)?,
            "synchronous_mode_strict" => ha.synchronous_mode_strict = boolean(key, value)?,
            "synchronous_node_count" => {
                ha.synchronous_node_count =
                    u32::try_from(whole(key, value)?).map_err(|_| bad(key, "too large"))?
            }
            "synchronous_mode" => {
                ha.synchronous_mode = match value {
                    Value::String(s) if s.eq_ignore_ascii_case("quorum") => {
                        dropped.push(DroppedKey {
                            path: key.clone(),
                            reason:
                                "quorum mode is not supported yet; replication stays asynchronous"
                                    .into(),
                            security: false,
                        });
                        SyncMode::Off
                    }
                    v if boolean(key, v)? => SyncMode::On,
                    _ => SyncMode::Off,
                }
            }
            "slots" | "permanent_slots" | "permanent_replication_slots" => {
                (ha.permanent_slots, ha.logical_slots) = permanent_slots(key, value, &mut dropped)?;
            }
            "postgresql" => {
                let Value::Object(pg) = value else {
                    return Err(bad(key, "expected a mapping"));
                };
                read_postgresql(pg, &mut ha, &mut parameters, &mut dropped, local_allowlist)?;
            }
            other => {
                let (reason, security) = LOCAL_ONLY_TOP_KEYS
                    .iter()
                    .find(|(k, _)| *k == other)
                    .map_or(("not used by pgkeep".to_owned(), false), |(_, r)| {
                        ((*r).to_owned(), true)
                    });
                dropped.push(DroppedKey {
                    path: other.to_owned(),
                    reason,
                    security,
                });
            }
        }
    }
    let logical_wal = parameters
        .iter()
        .any(|(n, v)| n.as_str() == "wal_level" && v.as_str() == "logical");
    if !logical_wal && !ha.logical_slots.is_empty() {
        for name in std::mem::take(&mut ha.logical_slots).into_keys() {
            dropped.push(DroppedKey {
                path: format!("slots.{name}"),
                reason: "a logical slot needs postgresql.parameters.wal_level: logical".into(),
                security: false,
            });
        }
    }
    Ok(DynamicConfig {
        ha,
        parameters,
        dropped,
    })
}

/// The lease safety margin when the configuration names none: a fifth of the TTL, between 1 s
/// and 5 s. It covers fencing (an immediate stop takes well under a second) and clock-rate error,
/// and leaves `loop_wait + retry_timeout + margin <= ttl` for the usual settings, including the
/// aggressive `ttl 10 / loop_wait 2 / retry_timeout 4`.
pub fn default_margin(ttl: Millis) -> Millis {
    Millis((ttl.0 / 5).clamp(1_000, 5_000))
}

fn read_postgresql(
    pg: &Map<String, Value>,
    ha: &mut HaConfig,
    parameters: &mut Parameters,
    dropped: &mut Vec<DroppedKey>,
    local_allowlist: &BTreeSet<GucName>,
) -> Result<(), DynamicError> {
    for (key, value) in pg {
        let path = format!("postgresql.{key}");
        match key.as_str() {
            "use_pg_rewind" => ha.use_pg_rewind = boolean(&path, value)?,
            "use_slots" => ha.use_slots = boolean(&path, value)?,
            "parameters" => {
                let Value::Object(params) = value else { return Err(bad(&path, "expected a mapping")) };
                let (accepted, refused) = policy::filter_dynamic(params, local_allowlist);
                parameters.extend(accepted);
                dropped.extend(refused.into_iter().map(|d| DroppedKey {
                    path: format!("postgresql.parameters.{}", d.name),
                    security: matches!(d.reason, policy::DropReason::LocalOnly(r) if r != policy::LocalOnlyReason::NotAllowlisted),
                    reason: d.to_string(),
                }));
            }
            k if LOCAL_ONLY_POSTGRESQL_KEYS.contains(&k) => dropped.push(DroppedKey {
                path,
                reason: "it can run commands, name files or change authentication, so pgkeep takes it from the local configuration only".into(),
                security: true,
            }),
            _ => dropped.push(DroppedKey { path, reason: "not used by pgkeep".into(), security: false }),
        }
    }
    Ok(())
}

fn bad(key: &str, reason: &str) -> DynamicError {
    DynamicError::BadValue {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

fn number(key: &str, v: &Value) -> Result<f64, DynamicError> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| bad(key, "expected a non-negative number"))
}

fn whole(key: &str, v: &Value) -> Result<u64, DynamicError> {
    let n = number(key, v)?;
    if n.fract() != 0.0 || n > 9e15 {
        return Err(bad(key, "expected a whole number"));
    }
    Ok(n as u64)
}

/// Seconds as a number, or a string with a unit (`500ms`, `30s`, `30min`, `1h`, `1d`), as
/// Patroni accepts for `member_slots_ttl`.
fn seconds(key: &str, v: &Value) -> Result<Millis, DynamicError> {
    if let Value::String(s) = v {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if !unit.is_empty() {
            let n: f64 = num
                .parse()
                .map_err(|_| bad(key, "expected a duration such as 30s or 30min"))?;
            let scale = match unit.trim() {
                "ms" => 1.0,
                "s" => 1000.0,
                "min" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                _ => return Err(bad(key, "unknown duration unit (use ms, s, min, h or d)")),
            };
            return Ok(Millis((n * scale).round() as u64));
        }
    }
    let n = number(key, v)?;
    if n > 1e9 {
        return Err(bad(key, "too large"));
    }
    Ok(Millis((n * 1000.0).round() as u64))
}

fn boolean(key: &str, v: &Value) -> Result<bool, DynamicError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok(true),
            "false" | "off" | "no" | "0" => Ok(false),
            _ => Err(bad(key, "expected a boolean")),
        },
        Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
            Ok(n.as_u64() == Some(1))
        }
        Value::Null => Ok(false),
        _ => Err(bad(key, "expected a boolean")),
    }
}

/// Physical and logical permanent slots.
type PermanentSlots = (BTreeSet<String>, BTreeMap<String, LogicalSlotSpec>);

/// Permanent slots. A logical slot needs `database` and `plugin`; the plugin must be a bare
/// library name: PostgreSQL loads a plugin given as a path from anywhere on disk.
fn permanent_slots(
    key: &str,
    v: &Value,
    dropped: &mut Vec<DroppedKey>,
) -> Result<PermanentSlots, DynamicError> {
    let Value::Object(slots) = v else {
        return match v {
            Value::Null => Ok(Default::default()),
            _ => Err(bad(key, "expected a mapping of slot names")),
        };
    };
    let mut out: PermanentSlots = Default::default();
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    for (name, spec) in slots {
        let mut drop = |reason: &str, security: bool| {
            dropped.push(DroppedKey {
                path: format!("{key}.{name}"),
                reason: reason.into(),
                security,
            })
        };
        let field = |f: &str| spec.get(f).and_then(Value::as_str).unwrap_or_default();
        if !ident(name) {
            drop("slot names use lower-case letters, digits and '_'", false);
            continue;
        }
        match spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("physical")
        {
            "physical" => {
                out.0.insert(name.clone());
            }
            "logical" => {
                let (database, plugin) = (field("database"), field("plugin"));
                if database.is_empty() || database.len() > 63 {
                    drop(
                        "a logical slot needs its database (at most 63 bytes)",
                        false,
                    );
                } else if !ident(plugin) {
                    drop(
                        "a logical slot needs its plugin, a bare library name (lower-case letters, digits, '_'; never a path)",
                        true,
                    );
                } else {
                    out.1.insert(
                        name.clone(),
                        LogicalSlotSpec {
                            database: database.to_owned(),
                            plugin: plugin.to_owned(),
                        },
                    );
                }
            }
            _ => drop("a slot's type is physical or logical", false),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> Result<DynamicConfig, DynamicError> {
        interpret(
            v.as_object().unwrap(),
            &HaConfig::default(),
            &BTreeSet::new(),
        )
    }

    #[test]
    fn patroni_bootstrap_dcs_is_read() {
        let d = read(json!({
            "ttl": 10, "loop_wait": 2, "retry_timeout": "4", "maximum_lag_on_failover": 1048576,
            "synchronous_mode": "on", "synchronous_node_count": 1, "member_slots_ttl": "30min",
            "postgresql": {"use_pg_rewind": true, "use_slots": true, "parameters": {"work_mem": "16MB"}}
        }))
        .unwrap();
        assert_eq!(d.ha.ttl, Millis(10_000));
        assert_eq!(d.ha.retry_timeout, Millis(4_000));
        assert_eq!(d.ha.synchronous_mode, SyncMode::On);
        assert_eq!(d.ha.member_slots_ttl, Millis(1_800_000));
        assert_eq!(d.parameters.len(), 1);
        assert!(d.dropped.is_empty(), "{:?}", d.dropped);
    }

    #[test]
    fn command_and_file_keys_are_dropped_as_security_events() {
        let d = read(json!({
            "ttl": 10, "loop_wait": 2, "retry_timeout": 4,
            "postgresql": {
                "callbacks": {"on_start": "/tmp/x"},
                "create_replica_methods": ["evil"],
                "bin_dir": "/tmp",
                "pg_hba": ["host all all 0.0.0.0/0 trust"],
                "recovery_conf": {"restore_command": "sh"},
                "parameters": {"archive_command": "sh -c evil", "shared_preload_libraries": "evil", "work_mem": "1MB"}
            },
            "standby_cluster": {"host": "attacker", "restore_command": "sh"},
            "slots": {"leak": {"type": "logical", "database": "x", "plugin": "/tmp/evil"}, "keep": {"type": "physical"}}
        }))
        .unwrap();
        let security: Vec<_> = d
            .dropped
            .iter()
            .filter(|k| k.security)
            .map(|k| k.path.as_str())
            .collect();
        for p in [
            "postgresql.callbacks",
            "postgresql.create_replica_methods",
            "postgresql.bin_dir",
            "postgresql.pg_hba",
            "postgresql.recovery_conf",
            "postgresql.parameters.archive_command",
            "postgresql.parameters.shared_preload_libraries",
            "standby_cluster",
            "slots.leak",
        ] {
            assert!(
                security.contains(&p),
                "{p} not dropped as a security event: {security:?}"
            );
        }
        assert_eq!(d.parameters.len(), 1);
        assert!(d.ha.permanent_slots.contains("keep") && !d.ha.permanent_slots.contains("leak"));
    }

    #[test]
    fn logical_slots_need_database_plugin_and_logical_wal() {
        let slots = json!({
            "cdc": {"type": "logical", "database": "app", "plugin": "pgoutput"},
            "nodb": {"type": "logical", "plugin": "pgoutput"},
            "odd": {"type": "weird"}
        });
        let d = read(json!({"slots": slots.clone()})).unwrap();
        assert!(d.ha.logical_slots.is_empty());
        assert!(
            d.dropped
                .iter()
                .any(|k| k.path == "slots.cdc" && k.reason.contains("wal_level"))
        );
        let d = read(json!({
            "slots": slots,
            "postgresql": {"parameters": {"wal_level": "logical"}}
        }))
        .unwrap();
        let cdc = &d.ha.logical_slots["cdc"];
        assert_eq!(
            (cdc.database.as_str(), cdc.plugin.as_str()),
            ("app", "pgoutput")
        );
        assert_eq!(d.ha.logical_slots.len(), 1);
        let paths: Vec<_> = d.dropped.iter().map(|k| k.path.as_str()).collect();
        assert_eq!(paths, ["slots.nodb", "slots.odd"]);
    }

    #[test]
    fn unsafe_timing_is_refused_as_a_whole() {
        assert!(matches!(
            read(json!({"ttl": 5, "loop_wait": 10})),
            Err(DynamicError::Unsafe(_))
        ));
        assert!(matches!(
            read(json!({"ttl": "soon"})),
            Err(DynamicError::BadValue { .. })
        ));
        assert!(matches!(
            read(json!({"pause": "maybe"})),
            Err(DynamicError::BadValue { .. })
        ));
    }

    #[test]
    fn margin_defaults_to_a_fifth_of_ttl_unless_set() {
        let d = read(json!({"ttl": 10, "loop_wait": 2, "retry_timeout": 4})).unwrap();
        assert_eq!(d.ha.lease_safety_margin, Millis(2_000));
        assert_eq!(
            read(json!({})).unwrap().ha.lease_safety_margin,
            Millis(5_000)
        );
        let d =
            read(json!({"ttl": 10, "loop_wait": 2, "retry_timeout": 4, "lease_safety_margin": 3}))
                .unwrap();
        assert_eq!(d.ha.lease_safety_margin, Millis(3_000));
        assert!(
            read(json!({"ttl": 10, "loop_wait": 2, "retry_timeout": 4, "lease_safety_margin": 5}))
                .is_err()
        );
    }

    #[test]
    fn quorum_mode_is_reported_and_falls_back_to_async() {
        let d = read(json!({"synchronous_mode": "quorum"})).unwrap();
        assert_eq!(d.ha.synchronous_mode, SyncMode::Off);
        assert_eq!(d.dropped[0].path, "synchronous_mode");
    }

    #[test]
    fn unknown_keys_are_ignored_without_alarm() {
        let d = read(json!({"some_future_key": 1})).unwrap();
        assert!(!d.dropped[0].security);
    }
}
