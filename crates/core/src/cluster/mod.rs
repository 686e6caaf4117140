//! The cluster as the DCS describes it, in Patroni's wire format.
//!
//! Keys live under `/<namespace>/<scope>/` (see [`base_path`]); their values are Patroni's JSON
//! (or a bare string for `leader` and `initialize`). Parsing is tolerant the way Patroni readers
//! are: a value that does not parse is reported as a [`Rejected`] entry and left out of the view,
//! never a panic and never a guess. Writing produces compact JSON that `patronictl` reads.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A WAL position as an absolute byte offset (`pg_wal_lsn_diff(x, '0/0')`), the form Patroni
/// stores in the DCS. Displayed in PostgreSQL's `X/Y` notation.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    /// Parses PostgreSQL's `X/Y` notation.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("LSN {s:?} is not of the form X/Y"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// The DCS prefix of a cluster: `'/' + namespace + '/' + scope`, runs of `/` collapsed, no
/// trailing slash. Keys are `<base>/<suffix>`.
pub fn base_path(namespace: &str, scope: &str) -> String {
    let joined = format!("/{namespace}/{scope}");
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    while out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// A key under the cluster prefix, by its suffix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DcsKey {
    /// `leader`: the bare name of the lock holder, attached to its lease.
    Leader,
    /// `members/<name>`: a member's JSON, attached to its lease.
    Member(String),
    /// `config`: the dynamic configuration.
    Config,
    /// `initialize`: the system identifier, or `""` while bootstrap runs.
    Initialize,
    /// `history`: the timeline history.
    History,
    /// `status`: the leader's optime and slot positions.
    Status,
    /// `optime/leader`: the legacy optime (read only).
    LegacyOptime,
    /// `sync`: the synchronous replication state.
    Sync,
    /// `failover`: a switchover or manual failover request.
    Failover,
    /// `failsafe`: members known to the leader in failsafe mode.
    Failsafe,
}

impl DcsKey {
    /// Classifies a key suffix (the part after `<base>/`). Unknown keys give `None`: readers
    /// ignore them.
    pub fn from_suffix(suffix: &str) -> Option<DcsKey> {
        Some(match suffix {
            "leader" => DcsKey::Leader,
            "config" => DcsKey::Config,
            "initialize" => DcsKey::Initialize,
            "history" => DcsKey::History,
            "status" => DcsKey::Status,
            "optime/leader" => DcsKey::LegacyOptime,
            "sync" => DcsKey::Sync,
            "failover" => DcsKey::Failover,
            "failsafe" => DcsKey::Failsafe,
            _ => {
                let name = suffix.strip_prefix("members/")?;
                if name.is_empty() || name.contains('/') {
                    return None;
                }
                DcsKey::Member(name.to_owned())
            }
        })
    }

    /// The key's suffix under `<base>/`.
    pub fn suffix(&self) -> String {
        match self {
            DcsKey::Leader => "leader".into(),
            DcsKey::Member(name) => format!("members/{name}"),
            DcsKey::Config => "config".into(),
            DcsKey::Initialize => "initialize".into(),
            DcsKey::History => "history".into(),
            DcsKey::Status => "status".into(),
            DcsKey::LegacyOptime => "optime/leader".into(),
            DcsKey::Sync => "sync".into(),
            DcsKey::Failover => "failover".into(),
            DcsKey::Failsafe => "failsafe".into(),
        }
    }

    /// The full key for a cluster prefix made by [`base_path`].
    pub fn full(&self, base: &str) -> String {
        format!("{base}/{}", self.suffix())
    }
}

/// A member's tags. Patroni accepts booleans written as strings, so parsing is lenient.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tags {
    /// Never becomes leader.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub nofailover: bool,
    /// Excluded from read load balancing (`/replica` answers 503).
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub noloadbalance: bool,
    /// Never chosen as synchronous standby.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub nosync: bool,
    /// Preferred source for cloning new replicas.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub clonefrom: bool,
    /// Does not stream; replays from the archive only.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub nostream: bool,
    /// Stream from this member instead of the leader (cascading replication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicatefrom: Option<String>,
    /// Higher wins ties in the leader race; 0 behaves like `nofailover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_priority: Option<i64>,
    /// Order of preference for synchronous standbys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_priority: Option<i64>,
    /// Any other tag, kept verbatim (used by `tag_<key>=<value>` health-check filters).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Tags {
    /// True when no tag is set, so the member JSON may omit `tags`.
    pub fn is_empty(&self) -> bool {
        *self == Tags::default()
    }

    /// The value of tag `key` as the health-check filter compares it: lower-cased text.
    pub fn value_for_filter(&self, key: &str) -> Option<String> {
        let b = |v: bool| Some(v.to_string());
        match key {
            "nofailover" => b(self.nofailover),
            "noloadbalance" => b(self.noloadbalance),
            "nosync" => b(self.nosync),
            "clonefrom" => b(self.clonefrom),
            "nostream" => b(self.nostream),
            "replicatefrom" => self.replicatefrom.clone(),
            "failover_priority" => self.failover_priority.map(|v| v.to_string()),
            "sync_priority" => self.sync_priority.map(|v| v.to_string()),
            other => self.other.get(other).map(|v| match v {
                Value::String(s) => s.clone(),
                v => v.to_string().to_lowercase(),
            }),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => b,
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1"),
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => false,
    })
}

/// The JSON value of `members/<name>`, with Patroni's field names. Unknown fields are kept so a
/// round trip through pgkeep loses nothing another tool wrote.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MemberData {
    /// `postgres://host:port/dbname`, no credentials.
    #[serde(default)]
    pub conn_url: String,
    /// `https://host:port/patroni`.
    #[serde(default)]
    pub api_url: String,
    /// PostgreSQL state (`running`, `starting`, `stopped`, ...).
    #[serde(default)]
    pub state: String,
    /// `primary`, `replica`, `demoted`, `uninitialized`, ... (`master` is read as `primary`).
    #[serde(default)]
    pub role: String,
    /// Patroni-compatible version, dotted integers (≥ 4.0.0 so Patroni tools take the modern
    /// code paths).
    #[serde(default)]
    pub version: String,
    /// pgkeep's own version; absent on Patroni members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgkeep_version: Option<String>,
    /// Flush LSN on a primary; max(receive, replay) on a replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlog_location: Option<Lsn>,
    /// Replica replay position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<Lsn>,
    /// Replica receive position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<Lsn>,
    /// `streaming` or `in archive recovery` (replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    /// Current timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Effective tags.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// PostgreSQL needs a restart for a changed parameter.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub pending_restart: bool,
    /// Which parameters need the restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    /// Set on the new leader until the checkpoint after promotion completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_after_promote: Option<bool>,
    /// The member saw the cluster paused.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "lenient_bool"
    )]
    pub pause: bool,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl MemberData {
    /// True when the member says its PostgreSQL runs as a primary.
    pub fn is_primary_role(&self) -> bool {
        matches!(self.role.as_str(), "primary" | "master" | "promoted")
    }

    /// Host and port from `conn_url`, when it is a `postgres://host:port/...` URL.
    pub fn conn_host_port(&self) -> Option<(String, u16)> {
        let rest = self
            .conn_url
            .strip_prefix("postgres://")
            .or_else(|| self.conn_url.strip_prefix("postgresql://"))?;
        let authority = rest.split('/').next()?;
        let authority = authority.rsplit('@').next()?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
            _ => (authority, 5432),
        };
        Some((host.trim_matches(['[', ']']).to_owned(), port))
    }
}

/// `sync`: who may be promoted in synchronous mode.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncState {
    /// The primary that owns this state; empty means synchronous mode is not active yet.
    #[serde(default)]
    pub leader: Option<String>,
    /// Comma-separated, sorted member names.
    #[serde(default)]
    pub sync_standby: Option<String>,
    /// Quorum size (0 outside quorum mode).
    #[serde(default)]
    pub quorum: u32,
}

impl SyncState {
    /// The synchronous standbys by name.
    pub fn standbys(&self) -> Vec<String> {
        self.sync_standby
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// True when `name` is the owning leader or one of the standbys (case-insensitive, as Patroni
    /// compares).
    pub fn contains(&self, name: &str) -> bool {
        self.leader
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case(name))
            || self.standbys().iter().any(|s| s.eq_ignore_ascii_case(name))
    }

    /// Builds a state with the standbys sorted, the way Patroni writes it.
    pub fn new(leader: &str, mut standbys: Vec<String>, quorum: u32) -> SyncState {
        standbys.sort();
        standbys.dedup();
        SyncState {
            leader: Some(leader.to_owned()),
            sync_standby: if standbys.is_empty() {
                None
            } else {
                Some(standbys.join(","))
            },
            quorum,
        }
    }
}

/// `failover`: a requested switchover (with `leader`) or manual failover (without).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FailoverRequest {
    /// Switchover from this leader; absent for a manual failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The candidate (`member` on the wire; the REST body calls it `candidate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// ISO-8601 time with zone for a scheduled switchover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

impl FailoverRequest {
    /// `{}` or an object with neither field means "nothing requested".
    pub fn is_empty(&self) -> bool {
        self.leader.is_none() && self.member.is_none()
    }
}

/// One timeline switch: the record PostgreSQL keeps in `<TL>.history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The timeline that ended.
    pub parent_timeline: u32,
    /// Where it ended.
    pub switch_lsn: Lsn,
    /// PostgreSQL's reason text.
    pub reason: String,
    /// When the new timeline was created (ISO-8601), if known.
    pub timestamp: Option<String>,
    /// The member that promoted, if known.
    pub new_leader: Option<String>,
}

impl HistoryEntry {
    fn to_json(&self) -> Value {
        let mut v = vec![
            Value::from(self.parent_timeline),
            Value::from(self.switch_lsn.0),
            Value::from(self.reason.clone()),
        ];
        if let Some(ts) = &self.timestamp {
            v.push(Value::from(ts.clone()));
            if let Some(l) = &self.new_leader {
                v.push(Value::from(l.clone()));
            }
        }
        Value::Array(v)
    }

    fn from_json(v: &Value) -> Option<HistoryEntry> {
        let a = v.as_array()?;
        Some(HistoryEntry {
            parent_timeline: u32::try_from(a.first()?.as_u64()?).ok()?,
            switch_lsn: Lsn(a.get(1)?.as_u64()?),
            reason: a.get(2).and_then(Value::as_str).unwrap_or("").to_owned(),
            timestamp: a.get(3).and_then(Value::as_str).map(str::to_owned),
            new_leader: a.get(4).and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// `status`: the leader's last WAL position and slot positions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterStatus {
    /// Last known leader WAL position.
    pub optime: Option<Lsn>,
    /// Slot name → LSN on the leader.
    pub slots: BTreeMap<String, Lsn>,
    /// Member slots to keep although their member key expired.
    pub retain_slots: Vec<String>,
}

impl ClusterStatus {
    /// Compact JSON in Patroni's layout; empty parts are omitted.
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        if let Some(o) = self.optime {
            m.insert("optime".into(), Value::from(o.0));
        }
        if !self.slots.is_empty() {
            let slots = self
                .slots
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.0)))
                .collect();
            m.insert("slots".into(), Value::Object(slots));
        }
        if !self.retain_slots.is_empty() {
            m.insert(
                "retain_slots".into(),
                Value::from(self.retain_slots.clone()),
            );
        }
        Value::Object(m).to_string()
    }
}

/// Why a value under the cluster prefix was left out of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The key's suffix.
    pub key: String,
    /// What was wrong with it.
    pub reason: String,
}

/// A raw key-value pair as the DCS returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// The suffix under the cluster prefix.
    pub suffix: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// etcd `mod_revision` (Patroni's "version" of a key).
    pub mod_revision: i64,
    /// etcd lease id, 0 when none.
    pub lease: i64,
}

/// A versioned value: the value and the `mod_revision` to compare-and-swap against.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The parsed value.
    pub value: T,
    /// etcd `mod_revision`.
    pub mod_revision: i64,
}

/// The leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The holder's member name.
    pub name: String,
    /// The lease the key is attached to.
    pub lease: i64,
    /// etcd `mod_revision`.
    pub mod_revision: i64,
}

/// The `initialize` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initialize {
    /// `""`: a node won the bootstrap race and is running initdb.
    InProgress,
    /// The cluster's PostgreSQL system identifier.
    SystemId(String),
}

/// A member key.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberKey {
    /// The parsed member JSON.
    pub data: MemberData,
    /// etcd `mod_revision`.
    pub mod_revision: i64,
    /// The member's lease id.
    pub lease: i64,
}

/// Everything the DCS says about one cluster, as one immutable snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterView {
    /// `initialize`: absent means never bootstrapped.
    pub initialize: Option<Initialize>,
    /// `config` (the raw JSON object; the parameter policy filters it before use).
    pub config: Option<Versioned<serde_json::Map<String, Value>>>,
    /// `leader`.
    pub leader: Option<LeaderKey>,
    /// `members/*` by name.
    pub members: BTreeMap<String, MemberKey>,
    /// `history` (empty on timeline 1).
    pub history: Option<Vec<HistoryEntry>>,
    /// `status`, or the legacy `optime/leader` when `status` is absent.
    pub status: ClusterStatus,
    /// `sync`.
    pub sync: Option<Versioned<SyncState>>,
    /// `failover` (absent or empty means none requested).
    pub failover: Option<Versioned<FailoverRequest>>,
    /// `failsafe`: member name → API URL.
    pub failsafe: Option<BTreeMap<String, String>>,
}

impl ClusterView {
    /// Builds a view from every entry under the prefix. Values that do not parse are left out
    /// and returned as [`Rejected`], so the caller can log them; they never abort the build.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = &'a RawEntry>,
    ) -> (ClusterView, Vec<Rejected>) {
        let mut view = ClusterView::default();
        let mut rejected = Vec::new();
        let mut legacy_optime = None;
        for e in entries {
            let Some(key) = DcsKey::from_suffix(&e.suffix) else {
                continue;
            };
            if let Err(reason) = view.apply(&key, e, &mut legacy_optime) {
                rejected.push(Rejected {
                    key: e.suffix.clone(),
                    reason,
                });
            }
        }
        if view.status.optime.is_none() {
            view.status.optime = legacy_optime;
        }
        (view, rejected)
    }

    fn apply(
        &mut self,
        key: &DcsKey,
        e: &RawEntry,
        legacy: &mut Option<Lsn>,
    ) -> Result<(), String> {
        let text = std::str::from_utf8(&e.value).map_err(|_| "value is not UTF-8".to_owned())?;
        match key {
            DcsKey::Leader => {
                let name = text.trim();
                if name.is_empty() {
                    return Err("leader key is empty".into());
                }
                self.leader = Some(LeaderKey {
                    name: name.to_owned(),
                    lease: e.lease,
                    mod_revision: e.mod_revision,
                });
            }
            DcsKey::Member(name) => {
                let data: MemberData = parse_object(text)?;
                self.members.insert(
                    name.clone(),
                    MemberKey {
                        data,
                        mod_revision: e.mod_revision,
                        lease: e.lease,
                    },
                );
            }
            DcsKey::Config => {
                let value: Value =
                    serde_json::from_str(text).map_err(|err| format!("invalid JSON: {err}"))?;
                let Value::Object(map) = value else {
                    return Err("config is not a JSON object".into());
                };
                self.config = Some(Versioned {
                    value: map,
                    mod_revision: e.mod_revision,
                });
            }
            DcsKey::Initialize => {
                let t = text.trim();
                self.initialize = Some(if t.is_empty() {
                    Initialize::InProgress
                } else if t.len() >= 10 && t.bytes().all(|b| b.is_ascii_digit()) {
                    Initialize::SystemId(t.to_owned())
                } else {
                    return Err(format!("initialize holds {t:?}, not a system identifier"));
                });
            }
            DcsKey::History => {
                let value: Value =
                    serde_json::from_str(text).map_err(|err| format!("invalid JSON: {err}"))?;
                let arr = value.as_array().ok_or("history is not a JSON array")?;
                let entries: Option<Vec<_>> = arr.iter().map(HistoryEntry::from_json).collect();
                self.history = Some(entries.ok_or("history has a malformed entry")?);
            }
            DcsKey::Status => self.status = parse_status(text)?,
            DcsKey::LegacyOptime => {
                *legacy = Some(Lsn(text
                    .trim()
                    .parse()
                    .map_err(|_| format!("optime {text:?} is not a number"))?));
            }
            DcsKey::Sync => {
                let sync: SyncState = parse_object(text)?;
                self.sync = Some(Versioned {
                    value: sync,
                    mod_revision: e.mod_revision,
                });
            }
            DcsKey::Failover => {
                let req = if let Some((l, m)) = text
                    .split_once(':')
                    .filter(|_| !text.trim_start().starts_with('{'))
                {
                    // Legacy text form `leader:candidate`.
                    FailoverRequest {
                        leader: Some(l.to_owned()).filter(|s| !s.is_empty()),
                        member: Some(m.to_owned()).filter(|s| !s.is_empty()),
                        scheduled_at: None,
                    }
                } else {
                    parse_object(text)?
                };
                self.failover = Some(Versioned {
                    value: req,
                    mod_revision: e.mod_revision,
                });
            }
            DcsKey::Failsafe => {
                let map: BTreeMap<String, String> = parse_object(text)?;
                self.failsafe = Some(map);
            }
        }
        Ok(())
    }

    /// The cluster timeline implied by `history`: last parent + 1, 1 for `[]`, `None` if unknown.
    pub fn history_timeline(&self) -> Option<u32> {
        let h = self.history.as_ref()?;
        Some(h.last().map_or(1, |e| e.parent_timeline + 1))
    }

    /// The requested switchover or failover, if one is pending.
    pub fn pending_failover(&self) -> Option<&FailoverRequest> {
        self.failover
            .as_ref()
            .map(|v| &v.value)
            .filter(|f| !f.is_empty())
    }

    /// Whether the dynamic configuration says the cluster is paused.
    pub fn is_paused(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|c| c.value.get("pause"))
            .is_some_and(|v| v.as_bool().unwrap_or(false))
    }
}

fn parse_object<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    if !value.is_object() {
        return Err("value is not a JSON object".into());
    }
    serde_json::from_value(value).map_err(|e| format!("unexpected shape: {e}"))
}

fn parse_status(text: &str) -> Result<ClusterStatus, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    // A bare integer is the legacy form.
    if let Some(n) = value.as_u64() {
        return Ok(ClusterStatus {
            optime: Some(Lsn(n)),
            ..Default::default()
        });
    }
    let obj = value.as_object().ok_or("status is not a JSON object")?;
    // `slots` and `retain_slots` may be JSON-encoded strings in older writers.
    let decode = |v: Option<&Value>| -> Option<Value> {
        match v? {
            Value::String(s) => serde_json::from_str(s).ok(),
            v => Some(v.clone()),
        }
    };
    let optime = obj.get("optime").and_then(Value::as_u64).map(Lsn);
    let slots = decode(obj.get("slots"))
        .and_then(|v| v.as_object().cloned())
        .map(|m| {
            m.into_iter()
                .filter_map(|(k, v)| Some((k, Lsn(v.as_u64()?))))
                .collect()
        })
        .unwrap_or_default();
    let retain_slots = decode(obj.get("retain_slots"))
        .and_then(|v| v.as_array().cloned())
        .map(|a| {
            a.into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(ClusterStatus {
        optime,
        slots,
        retain_slots,
    })
}

/// Serialises the timeline history in Patroni's array-of-arrays form.
pub fn history_to_json(history: &[HistoryEntry]) -> String {
    Value::Array(history.iter().map(HistoryEntry::to_json).collect()).to_string()
}

#[cfg(test)]
mod tests;
