//! Manual switchover and failover requests, as the REST API receives them (`POST /switchover`,
//! `POST /failover`): the body, Patroni's validation in Patroni's order with its status codes
//! and texts, the `/failover` value to write, and the outcome of the wait that follows.
//!
//! Everything here is pure: the caller supplies the DCS view, the wall-clock time and whether
//! the cluster is paused. The leader's side of the `/failover` key (acting on it, clearing it)
//! is [`super::switchover`]'s.
//!
//! Validation order (Patroni's `do_POST_failover`, first refusal wins):
//!
//! 1. a failover needs a candidate, a switchover a leader (400);
//! 2. with `scheduled_at`: a failover cannot be scheduled, nothing can be scheduled in pause
//!    (400); the time must parse (422), carry a zone (400) and not be in the past (422);
//! 3. in pause a candidate is required (400);
//! 4. a failover naming a leader is handled as a switchover;
//! 5. leader and candidate must differ (400);
//! 6. unscheduled requests only, against the DCS view (412): the leader must hold the lock, the
//!    candidate must exist and (switchover, synchronous mode) be a synchronous standby, and some
//!    member fit to take over must exist.
//!
//! Where pgkeep checks differently from Patroni: the fitness of the candidates comes from their
//! member keys (state `running`, role `replica`, failover allowed by tags, an `api_url`), not
//! from asking each one's REST API, so the REST handler does no network IO before writing; the
//! leader's HA loop checks fitness again, with fresh peer answers, before it hands over.

use serde_json::Value;

use crate::cluster::{ClusterView, FailoverRequest, MemberData};

use super::switchover::{format_rfc3339, parse_rfc3339};

/// Which endpoint was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManualKind {
    /// `POST /switchover`: hand over from a named, running leader.
    Switchover,
    /// `POST /failover`: promote a named candidate, with or without a running leader.
    Failover,
}

impl ManualKind {
    /// `switchover` or `failover`.
    pub fn noun(self) -> &'static str {
        match self {
            ManualKind::Switchover => "switchover",
            ManualKind::Failover => "failover",
        }
    }

    /// `Switchover` or `Failover`.
    pub fn title(self) -> &'static str {
        match self {
            ManualKind::Switchover => "Switchover",
            ManualKind::Failover => "Failover",
        }
    }

    /// `switched` or `failed` (as in "switched over").
    fn past(self) -> &'static str {
        match self {
            ManualKind::Switchover => "switched",
            ManualKind::Failover => "failed",
        }
    }

    /// `Switched` or `Failed`.
    fn past_title(self) -> &'static str {
        match self {
            ManualKind::Switchover => "Switched",
            ManualKind::Failover => "Failed",
        }
    }
}

/// The longest member name a request may carry.
pub const MAX_NAME_LEN: usize = 256;

/// The JSON body of `POST /switchover` and `POST /failover`: an object with optional `leader`,
/// `candidate` (alias `member`) and `scheduled_at`. Empty strings and `null` count as absent,
/// as in Patroni.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestBody {
    /// The leader to switch over from.
    pub leader: Option<String>,
    /// The member to promote.
    pub candidate: Option<String>,
    /// When (ISO 8601 / RFC 3339 with a zone), for a scheduled switchover.
    pub scheduled_at: Option<String>,
}

/// Why a body is not a request at all (the REST API answers 400 with a JSON error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// JSON, but not an object.
    #[error("the request body must be a JSON object")]
    NotAnObject,
    /// A key pgkeep does not know (Patroni ignores them; a typo would silently change the
    /// request's meaning).
    #[error("unknown key {0:?}; expected leader, candidate (or member) and scheduled_at")]
    UnknownKey(String),
    /// A value that is not a string (or `null`).
    #[error("{0} must be a string")]
    NotAString(String),
    /// `candidate` and `member` both given, naming different members.
    #[error("candidate and member name different members")]
    Conflicting,
    /// A name with control characters or longer than [`MAX_NAME_LEN`].
    #[error("{0} is not a valid member name")]
    BadName(String),
}

impl RequestBody {
    /// Parses a request body.
    pub fn from_json(bytes: &[u8]) -> Result<RequestBody, BodyError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| BodyError::InvalidJson(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(BodyError::NotAnObject);
        };
        let mut body = RequestBody::default();
        let mut member = None;
        for (key, v) in &map {
            let slot = match key.as_str() {
                "leader" => &mut body.leader,
                "candidate" => &mut body.candidate,
                "member" => &mut member,
                "scheduled_at" => &mut body.scheduled_at,
                _ => return Err(BodyError::UnknownKey(key.clone())),
            };
            let text = match v {
                Value::Null => None,
                Value::String(s) if s.is_empty() => None,
                Value::String(s) => Some(s.clone()),
                _ => return Err(BodyError::NotAString(key.clone())),
            };
            if key != "scheduled_at"
                && let Some(name) = &text
                && (name.len() > MAX_NAME_LEN || name.chars().any(char::is_control))
            {
                return Err(BodyError::BadName(key.clone()));
            }
            *slot = text;
        }
        match (&body.candidate, member) {
            (Some(c), Some(m)) if *c != m => return Err(BodyError::Conflicting),
            (None, m) => body.candidate = m,
            _ => {}
        }
        Ok(body)
    }

    /// The body as JSON (what `pgkeep ctl` sends).
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("leader", &self.leader),
            ("candidate", &self.candidate),
            ("scheduled_at", &self.scheduled_at),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        }
        Value::Object(m).to_string()
    }
}

/// A refused request: the HTTP status and Patroni's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Refusal {
    /// 400, 412 or 422.
    pub status: u16,
    /// The answer's text.
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// An accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// What is done: a failover naming a leader becomes a switchover, as in Patroni.
    pub kind: ManualKind,
    /// The value to write to `/failover` (`scheduled_at` normalised to UTC).
    pub request: FailoverRequest,
    /// When a scheduled switchover is due (Unix milliseconds); `None` for an immediate one.
    pub scheduled_at_unix_ms: Option<i64>,
    /// The lock holder when the request was checked: the wait that follows an immediate request
    /// succeeds when someone else holds the lock.
    pub current_leader: Option<String>,
}

impl Accepted {
    /// True for a scheduled switchover (the REST API answers 202 at once).
    pub fn is_scheduled(&self) -> bool {
        self.scheduled_at_unix_ms.is_some()
    }

    /// The answer to a scheduled request: `Switchover scheduled`.
    pub fn scheduled_message(&self) -> String {
        format!("{} scheduled", self.kind.title())
    }
}

/// True when `synchronous_mode` in the dynamic configuration switches synchronous replication
/// on (quorum mode is not supported and counts as off, as in [`crate::dynamic`]) and the `/sync`
/// key is owned by a leader: the same test the HA loop applies.
pub fn sync_active(view: &ClusterView) -> bool {
    let configured = view
        .config
        .as_ref()
        .and_then(|c| c.value.get("synchronous_mode"))
        .is_some_and(|v| match v {
            Value::Bool(b) => *b,
            Value::String(s) => {
                matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1")
            }
            Value::Number(n) => n.as_u64() == Some(1),
            _ => false,
        });
    configured && view.sync.as_ref().is_some_and(|s| s.value.leader.is_some())
}

fn in_sync(view: &ClusterView, name: &str) -> bool {
    view.sync.as_ref().is_some_and(|s| {
        s.value
            .standbys()
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    })
}

/// A member whose key shows it fit to take over: a running replica, failover allowed by its
/// tags, reachable (`api_url` set), not the lock holder.
fn promotable(view: &ClusterView, name: &str, m: &MemberData) -> bool {
    let holder = view.leader.as_ref().map(|l| l.name.as_str());
    Some(name) != holder
        && m.state == "running"
        && m.role == "replica"
        && !m.tags.nofailover
        && m.tags.failover_priority.is_none_or(|p| p > 0)
        && !m.api_url.is_empty()
}

/// Patroni's `is_failover_possible` against the DCS view: `Err` with the 412 text.
fn feasible(
    view: &ClusterView,
    kind: ManualKind,
    leader: Option<&str>,
    candidate: Option<&str>,
) -> Result<(), String> {
    let holder = view.leader.as_ref().map(|l| l.name.as_str());
    if let Some(l) = leader
        && holder != Some(l)
    {
        return Err("leader name does not match".into());
    }
    let sync = sync_active(view);
    let pool: Vec<(&String, &MemberData)> = if let Some(c) = candidate {
        if kind == ManualKind::Switchover && sync && !in_sync(view, c) {
            return Err("candidate name does not match with sync_standby".into());
        }
        let pool: Vec<_> = view
            .members
            .iter()
            .filter(|(n, _)| n.as_str() == c)
            .map(|(n, m)| (n, &m.data))
            .collect();
        if pool.is_empty() {
            return Err("candidate does not exists".into());
        }
        pool
    } else if sync {
        let pool: Vec<_> = view
            .members
            .iter()
            .filter(|(n, _)| in_sync(view, n))
            .map(|(n, m)| (n, &m.data))
            .collect();
        if pool.is_empty() {
            return Err(format!(
                "{} is not possible: can not find sync_standby",
                kind.noun()
            ));
        }
        pool
    } else {
        let pool: Vec<_> = view
            .members
            .iter()
            .filter(|(n, m)| Some(n.as_str()) != holder && !m.data.api_url.is_empty())
            .map(|(n, m)| (n, &m.data))
            .collect();
        if pool.is_empty() {
            return Err(format!(
                "{} is not possible: cluster does not have members except leader",
                kind.noun()
            ));
        }
        pool
    };
    if pool.iter().any(|(n, m)| promotable(view, n, m)) {
        Ok(())
    } else {
        Err(format!(
            "{} is not possible: no good candidates have been found",
            kind.noun()
        ))
    }
}

/// True when `s` ends in a zone designator (`Z` or `±HH[[:]MM]` after the time of day).
fn has_zone(s: &str) -> bool {
    let s = s.trim();
    s.get(16..)
        .is_some_and(|tail| tail.ends_with(['Z', 'z']) || tail.contains(['+', '-']))
}

/// Validates a manual switchover or failover request in Patroni's order (see the module
/// documentation). `now_unix_ms` is the wall-clock time (for "in the past"), `paused` whether
/// the cluster is in maintenance mode.
pub fn check_request(
    kind: ManualKind,
    body: &RequestBody,
    view: &ClusterView,
    now_unix_ms: i64,
    paused: bool,
) -> Result<Accepted, Refusal> {
    let leader = body.leader.as_deref();
    let candidate = body.candidate.as_deref();
    match kind {
        ManualKind::Failover if candidate.is_none() => {
            return Err(refuse(
                400,
                "Failover could be performed only to a specific candidate",
            ));
        }
        ManualKind::Switchover if leader.is_none() => {
            return Err(refuse(
                400,
                "Switchover could be performed only from a specific leader",
            ));
        }
        _ => {}
    }
    let mut scheduled = None;
    if let Some(at) = body.scheduled_at.as_deref() {
        if kind == ManualKind::Failover {
            return Err(refuse(400, "Failover can't be scheduled"));
        }
        if paused {
            return Err(refuse(400, "Can't schedule switchover in the paused state"));
        }
        let Some(ms) = parse_rfc3339(at) else {
            return Err(refuse(
                422,
                "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
            ));
        };
        if !has_zone(at) {
            return Err(refuse(
                400,
                "Timezone information is mandatory for the scheduled switchover",
            ));
        }
        if ms < now_unix_ms {
            return Err(refuse(422, "Cannot schedule switchover in the past"));
        }
        scheduled = Some(ms);
    }
    if paused && candidate.is_none() {
        return Err(refuse(
            400,
            "Switchover is possible only to a specific candidate in a paused state",
        ));
    }
    let kind = if leader.is_some() {
        ManualKind::Switchover
    } else {
        kind
    };
    if leader == candidate {
        return Err(refuse(400, "Switchover target and source are the same"));
    }
    if scheduled.is_none() {
        feasible(view, kind, leader, candidate).map_err(|m| refuse(412, m))?;
    }
    Ok(Accepted {
        kind,
        request: FailoverRequest {
            leader: body.leader.clone(),
            member: body.candidate.clone(),
            scheduled_at: scheduled.map(format_rfc3339),
        },
        scheduled_at_unix_ms: scheduled,
        current_leader: view.leader.as_ref().map(|l| l.name.clone()),
    })
}

/// The highest `mod_revision` the view shows: a lower bound of the etcd revision it reflects.
/// The leader key is rewritten on every renewal, so this keeps moving while a leader lives.
pub fn view_revision(view: &ClusterView) -> i64 {
    let keys = [
        view.leader.as_ref().map(|l| l.mod_revision),
        view.config.as_ref().map(|c| c.mod_revision),
        view.sync.as_ref().map(|s| s.mod_revision),
        view.failover.as_ref().map(|f| f.mod_revision),
    ];
    keys.into_iter()
        .flatten()
        .chain(view.members.values().map(|m| m.mod_revision))
        .max()
        .unwrap_or(0)
}

/// How an immediate request ended, as far as a view of the DCS shows: `Some((status, text))`
/// once decided, `None` while it is still going. `written_revision` is the etcd revision of the
/// `/failover` write, so that a view older than the write is not read as "request cleared".
///
/// - Another member holds the lock and its member key says it runs as a primary: 200
///   `Successfully switched over to "X"` (`failed over` for
///   a failover), or 200 `Switched over to "X" instead of "Y"` when it is not the candidate.
/// - The view includes the write and no request is pending any more, with the lock unchanged:
///   503 `Switchover failed` (the leader refused or gave up).
pub fn outcome(
    accepted: &Accepted,
    view: &ClusterView,
    written_revision: i64,
) -> Option<(u16, String)> {
    let kind = accepted.kind;
    if let Some(l) = &view.leader
        && Some(&l.name) != accepted.current_leader.as_ref()
    {
        // The new holder must also say it runs as a primary: a candidate can hold the key for
        // a moment and give it back (a failed pre_promote) without ever promoting. Until one or
        // the other shows, keep waiting (the new leader clears the request in the same cycle
        // that first publishes it as primary, so the clearing alone decides nothing).
        let promoted = view.members.get(&l.name).is_some_and(|m| {
            matches!(
                m.data.role.as_str(),
                "primary" | "master" | "standby_leader"
            )
        });
        if !promoted {
            return None;
        }
        let text = match &accepted.request.member {
            Some(c) if *c != l.name => format!(
                "{} over to \"{}\" instead of \"{c}\"",
                kind.past_title(),
                l.name
            ),
            _ => format!("Successfully {} over to \"{}\"", kind.past(), l.name),
        };
        return Some((200, text));
    }
    if view_revision(view) >= written_revision && view.pending_failover().is_none() {
        return Some((503, format!("{} failed", kind.title())));
    }
    None
}

/// The answer when the wait ran out: 503 `Switchover status unknown after N seconds; operation
/// may still be in progress`.
pub fn timed_out(kind: ManualKind, secs: u64) -> (u16, String) {
    (
        503,
        format!(
            "{} status unknown after {secs} seconds; operation may still be in progress",
            kind.title()
        ),
    )
}

/// How long the REST API waits for an immediate request: `2 × max(10, loop_wait)` seconds, with
/// `loop_wait` from the dynamic configuration (10 when absent or unreadable).
pub fn wait_secs(view: &ClusterView) -> u64 {
    let loop_wait = view
        .config
        .as_ref()
        .and_then(|c| c.value.get("loop_wait"))
        .and_then(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .unwrap_or(10);
    2 * loop_wait.max(10)
}

#[cfg(test)]
mod tests;
