//! The JSON bodies of the REST API, in Patroni's shapes: the status of `GET /patroni` and the
//! cluster description of `GET /cluster`.

use std::collections::BTreeMap;

use pgkeep_core::cluster::{ClusterView, Lsn, Tags};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{PATRONI_COMPAT_VERSION, PGKEEP_VERSION};

fn is_false(b: &bool) -> bool {
    !*b
}

/// `patroni` in the status JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PatroniInfo {
    /// Patroni-compatible version ([`PATRONI_COMPAT_VERSION`]).
    #[serde(default)]
    pub version: String,
    /// Cluster name.
    #[serde(default)]
    pub scope: String,
    /// Member name.
    #[serde(default)]
    pub name: String,
}

/// `xlog` in the status JSON: WAL positions as absolute byte offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Xlog {
    /// A running primary: its flush position. Patroni peers take the presence of `location`
    /// as "this node runs as a primary".
    Primary {
        /// `pg_current_wal_flush_lsn()`.
        location: Lsn,
    },
    /// A replica.
    Replica {
        /// `pg_last_wal_receive_lsn()`.
        #[serde(default)]
        received_location: Lsn,
        /// `pg_last_wal_replay_lsn()`.
        #[serde(default)]
        replayed_location: Lsn,
        /// `pg_last_xact_replay_timestamp()` as text, or null.
        #[serde(default)]
        replayed_timestamp: Option<String>,
        /// `pg_is_wal_replay_paused()`.
        #[serde(default)]
        paused: bool,
    },
}

/// One WAL sender, as in `replication` of the status JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplicationInfo {
    /// Replication role.
    #[serde(default)]
    pub usename: String,
    /// The standby's `application_name` (its member name).
    #[serde(default)]
    pub application_name: String,
    /// The standby's address.
    #[serde(default)]
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, ...
    #[serde(default)]
    pub state: String,
    /// `async`, `sync`, `quorum`, `potential`.
    #[serde(default)]
    pub sync_state: String,
    /// `sync_priority`.
    #[serde(default)]
    pub sync_priority: i64,
}

/// The status JSON of `GET /patroni` (Patroni's `get_postgresql_status` plus the fields
/// `_write_status_response` adds). Optional fields are left out when absent or false, as Patroni
/// does; unknown fields of a peer's answer are kept in `other`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MemberStatus {
    /// PostgreSQL state (`running`, `starting`, `stopped`, ..., `unknown`).
    #[serde(default)]
    pub state: String,
    /// Postmaster start time as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postmaster_start_time: Option<String>,
    /// `primary`, `replica`, `standby_leader`, or the agent's role while PostgreSQL is down
    /// (`demoted`, `uninitialized`, ...).
    #[serde(default)]
    pub role: String,
    /// `server_version_num`, e.g. 150018.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<u32>,
    /// WAL positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlog: Option<Xlog>,
    /// Current timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// `streaming` or `in archive recovery` (replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    /// Listed as synchronous standby in the DCS `sync` key (`synchronous_mode: on`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync_standby: bool,
    /// Listed as quorum standby (`synchronous_mode: quorum`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quorum_standby: bool,
    /// The primary's WAL senders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replication: Vec<ReplicationInfo>,
    /// The cluster is paused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pause: bool,
    /// No leader, or the DCS view is unavailable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cluster_unlocked: bool,
    /// Failsafe mode is active.
    #[serde(default, skip_serializing_if = "is_false")]
    pub failsafe_mode_is_active: bool,
    /// Unix time of the last successful DCS read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dcs_last_seen: Option<u64>,
    /// Effective tags.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// `Database system identifier` of the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_system_identifier: Option<String>,
    /// A changed parameter needs a restart.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pending_restart: bool,
    /// Which parameters need the restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    /// A scheduled restart (`{"schedule": iso, ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    /// The watchdog device is unhealthy.
    #[serde(default, skip_serializing_if = "is_false")]
    pub watchdog_failed: bool,
    /// Version, scope and name.
    #[serde(default)]
    pub patroni: PatroniInfo,
    /// pgkeep's own version; absent on Patroni members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgkeep_version: Option<String>,
    /// Fields this version does not model (from a peer's answer).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl MemberStatus {
    /// The status of a member that knows nothing yet: state `unknown`, role `uninitialized`.
    pub fn new(scope: &str, name: &str) -> MemberStatus {
        MemberStatus {
            state: "unknown".into(),
            role: "uninitialized".into(),
            patroni: PatroniInfo {
                version: PATRONI_COMPAT_VERSION.into(),
                scope: scope.into(),
                name: name.into(),
            },
            pgkeep_version: Some(PGKEEP_VERSION.into()),
            ..Default::default()
        }
    }
}

/// `synchronous_mode` of the dynamic configuration: (synchronous, quorum).
fn synchronous_mode(config: Option<&Map<String, Value>>) -> (bool, bool) {
    match config.and_then(|c| c.get("synchronous_mode")) {
        Some(Value::Bool(b)) => (*b, false),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "quorum" => (true, true),
            "on" | "true" | "yes" | "1" => (true, false),
            _ => (false, false),
        },
        Some(Value::Number(n)) => (n.as_f64().is_some_and(|f| f != 0.0), false),
        _ => (false, false),
    }
}

/// True when the dynamic configuration has a non-empty `standby_cluster` section.
pub fn is_standby_cluster(view: &ClusterView) -> bool {
    view.config
        .as_ref()
        .and_then(|c| c.value.get("standby_cluster"))
        .and_then(Value::as_object)
        .is_some_and(|o| !o.is_empty())
}

/// The body of `GET /cluster` (Patroni's `cluster_as_json` plus `scope`): members sorted by
/// name with role, state, addresses and, for non-leaders, LSNs as `X/Y` text and lag in bytes
/// behind the leader's optime (`"unknown"` when the member reported none).
pub fn cluster_json(view: &ClusterView, scope: &str) -> Value {
    let leader = view.leader.as_ref().map(|l| l.name.as_str());
    let config = view.config.as_ref().map(|c| &c.value);
    let standby = is_standby_cluster(view);
    let (sync_on, quorum) = synchronous_mode(config);
    let sync_on = sync_on && !standby;
    let sync_role = if quorum {
        "quorum_standby"
    } else {
        "sync_standby"
    };
    let optime = view.status.optime.map_or(0, |l| l.0);
    let in_sync = |name: &str| {
        view.sync.as_ref().is_some_and(|s| {
            s.value
                .standbys()
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
        })
    };

    let mut members = Vec::with_capacity(view.members.len());
    // `members` is a BTreeMap: already sorted by name.
    for (name, key) in &view.members {
        let d = &key.data;
        let is_leader = leader == Some(name.as_str());
        let role = if is_leader {
            if standby {
                "standby_leader"
            } else if d.role == "promoted" {
                "promoted"
            } else {
                "leader"
            }
        } else if sync_on && in_sync(name) {
            sync_role
        } else {
            "replica"
        };
        let state = match (&d.replication_state, role) {
            (Some(rs), r) if r != "leader" && !rs.is_empty() => rs.clone(),
            _ => d.state.clone(),
        };
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        m.insert("role".into(), json!(role));
        m.insert("state".into(), json!(state));
        m.insert("api_url".into(), json!(d.api_url));
        if let Some((host, port)) = d.conn_host_port() {
            m.insert("host".into(), json!(host));
            m.insert("port".into(), json!(port));
        }
        if let Some(tl) = d.timeline {
            m.insert("timeline".into(), json!(tl));
        }
        if d.pending_restart {
            m.insert("pending_restart".into(), json!(true));
        }
        if let Some(r) = &d.pending_restart_reason {
            m.insert("pending_restart_reason".into(), r.clone());
        }
        for extra in ["scheduled_restart", "site"] {
            if let Some(v) = d.other.get(extra) {
                m.insert(extra.into(), v.clone());
            }
        }
        if !d.tags.is_empty() {
            m.insert("tags".into(), json!(d.tags));
        }
        if !is_leader {
            for (prefix, lsn) in [
                ("receive_", d.receive_lsn),
                ("replay_", d.replay_lsn),
                ("", d.xlog_location),
            ] {
                let (lsn_key, lag_key) = (format!("{prefix}lsn"), format!("{prefix}lag"));
                match lsn.filter(|l| l.0 != 0) {
                    None => {
                        m.insert(lsn_key, json!("unknown"));
                        m.insert(lag_key, json!("unknown"));
                    }
                    Some(l) => {
                        m.insert(lsn_key, json!(l.to_string()));
                        m.insert(lag_key, json!(optime.saturating_sub(l.0)));
                    }
                }
            }
        }
        members.push(Value::Object(m));
    }

    let mut out = Map::new();
    out.insert("members".into(), Value::Array(members));
    out.insert("scope".into(), json!(scope));
    if view.is_paused() {
        out.insert("pause".into(), json!(true));
    }
    if let Some(f) = view.failover.as_ref().map(|f| &f.value)
        && let Some(at) = &f.scheduled_at
    {
        let mut s = Map::new();
        s.insert("at".into(), json!(at));
        if let Some(l) = &f.leader {
            s.insert("from".into(), json!(l));
        }
        if let Some(c) = &f.member {
            s.insert("to".into(), json!(c));
        }
        out.insert("scheduled_switchover".into(), Value::Object(s));
    }
    Value::Object(out)
}

/// `{"error": message}`.
pub fn error_body(message: &str) -> Vec<u8> {
    // Serialising a map of one string cannot fail.
    serde_json::to_vec(&json!({ "error": message })).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_core::cluster::RawEntry;

    fn entry(suffix: &str, value: &str) -> RawEntry {
        RawEntry {
            suffix: suffix.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn cluster_json_roles_lags_and_sorting() {
        let (view, rejected) = ClusterView::from_entries(&[
            entry("leader", "b"),
            entry("config", r#"{"synchronous_mode":true,"pause":true}"#),
            entry("sync", r#"{"leader":"b","sync_standby":"c","quorum":0}"#),
            entry("status", r#"{"optime":5000}"#),
            entry(
                "members/c",
                r#"{"conn_url":"postgres://10.0.0.3:5433/postgres","api_url":"https://10.0.0.3:8008/patroni","state":"running","role":"replica","replication_state":"streaming","xlog_location":4000,"receive_lsn":4500,"replay_lsn":4000,"timeline":2,"tags":{"dc":"east"}}"#,
            ),
            entry(
                "members/b",
                r#"{"conn_url":"postgres://10.0.0.2:5432/postgres","api_url":"https://10.0.0.2:8008/patroni","state":"running","role":"primary","xlog_location":5000,"timeline":2}"#,
            ),
            entry(
                "members/a",
                r#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"https://10.0.0.1:8008/patroni","state":"stopped","role":"replica","xlog_location":6000}"#,
            ),
            entry(
                "failover",
                r#"{"leader":"b","member":"c","scheduled_at":"2030-01-01T00:00:00+00:00"}"#,
            ),
        ]);
        assert!(rejected.is_empty(), "{rejected:?}");
        let j = cluster_json(&view, "demo");
        assert_eq!(j["scope"], "demo");
        assert_eq!(j["pause"], true);
        assert_eq!(j["scheduled_switchover"]["from"], "b");
        assert_eq!(j["scheduled_switchover"]["to"], "c");
        let m = j["members"].as_array().unwrap();
        let names: Vec<_> = m.iter().map(|m| m["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // a: replica, stopped, ahead of the optime (lag 0), no receive/replay LSN.
        assert_eq!(m[0]["role"], "replica");
        assert_eq!(m[0]["state"], "stopped");
        assert_eq!(m[0]["lag"], 0);
        assert_eq!(m[0]["receive_lsn"], "unknown");
        assert_eq!(m[0]["replay_lag"], "unknown");
        // b: the leader, no LSN fields.
        assert_eq!(m[1]["role"], "leader");
        assert_eq!(m[1]["port"], 5432);
        assert!(m[1].get("lsn").is_none());
        // c: sync standby, state from replication_state, lags against the optime.
        assert_eq!(m[2]["role"], "sync_standby");
        assert_eq!(m[2]["state"], "streaming");
        assert_eq!(m[2]["host"], "10.0.0.3");
        assert_eq!(m[2]["port"], 5433);
        assert_eq!(m[2]["lsn"], "0/FA0");
        assert_eq!(m[2]["lag"], 1000);
        assert_eq!(m[2]["receive_lag"], 500);
        assert_eq!(m[2]["tags"]["dc"], "east");
        assert_eq!(m[2]["timeline"], 2);
    }

    #[test]
    fn status_json_skips_absent_fields_and_round_trips() {
        let mut s = MemberStatus::new("demo", "n1");
        s.state = "running".into();
        s.role = "replica".into();
        s.xlog = Some(Xlog::Replica {
            received_location: Lsn(10),
            replayed_location: Lsn(9),
            replayed_timestamp: None,
            paused: false,
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["patroni"]["version"], PATRONI_COMPAT_VERSION);
        assert_eq!(v["patroni"]["name"], "n1");
        assert_eq!(v["xlog"]["received_location"], 10);
        assert!(v.get("pause").is_none() && v.get("tags").is_none());
        let back: MemberStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        let primary: MemberStatus =
            serde_json::from_str(r#"{"state":"running","role":"primary","xlog":{"location":7}}"#)
                .unwrap();
        assert_eq!(primary.xlog, Some(Xlog::Primary { location: Lsn(7) }));
    }
}
