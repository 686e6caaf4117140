//! Health-check verdicts of the REST API: Patroni's status-code rules as a pure function.
//!
//! HAProxy, F5 and Kubernetes probes decide where traffic goes from nothing but the status code
//! of `GET`/`HEAD`/`OPTIONS /primary`, `/replica`, `/read-only`, `/health`, `/liveness`,
//! `/readiness`, ... This module computes that code from a [`NodeHealth`] (what the agent knows
//! about itself, gathered once per HA cycle, never by a query per request) and the request's
//! path and [`HealthQuery`].
//!
//! The rules follow Patroni 4.x (`do_GET` of `patroni/api.py`):
//!
//! - `/` is `/primary`. Paths are matched by **substring**, first match wins, in this order:
//!   `standby_leader`/`standby-leader`, `leader`, `master`/`primary`/`read-write`, `replica`,
//!   `read-only` (without `sync`/`quorum`), `health`; then, only while the DCS view is fresh,
//!   the exact paths `/sync`, `/synchronous`, `/quorum`, `/async`, `/asynchronous`,
//!   `/read-only-quorum`, `/read-only-sync`, `/read-only-synchronous`. Anything else is 503.
//! - The leader rules depend on the **lock** only (`holds_lease`), not on PostgreSQL's role: a
//!   node that just won the race answers 200 on `/primary` while it is still promoting, and a
//!   node whose lease deadline passed answers 503 even if PostgreSQL still runs as a primary.
//!   Exception: with the DCS view stale and the cluster paused, the role alone decides.
//! - A replica is "ok" when it runs, reports role `replica`, lacks the `noloadbalance` tag, is
//!   not lagging more than `lag=` behind `max(cluster optime, latest_end_lsn)`, and matches
//!   `replication_state=`.
//! - `tag_<key>=<value>` filters apply only to a 200 of a non-leader path.
//!
//! Where pgkeep differs: an unparseable `lag=` (or `mode=`) is an error the caller turns into a
//! 400 answer, whereas Patroni silently ignores it (a typo such as `lag=10mb` would otherwise
//! turn a lag-limited check into an unlimited one without anybody noticing).

use std::fmt;

use crate::cluster::{Lsn, Tags};

/// PostgreSQL's role as the health rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgRole {
    /// Running, not in recovery.
    Primary,
    /// Running in recovery.
    Replica,
    /// The leader of a standby cluster (in recovery, following a remote primary).
    StandbyLeader,
    /// Anything else: stopped, demoted, uninitialized, unknown.
    #[default]
    Other,
}

impl PgRole {
    /// Maps Patroni's role strings (`primary`, `master`, `replica`, `standby_leader`, ...).
    pub fn from_patroni(role: &str) -> PgRole {
        match role {
            "primary" | "master" => PgRole::Primary,
            "replica" => PgRole::Replica,
            "standby_leader" => PgRole::StandbyLeader,
            _ => PgRole::Other,
        }
    }
}

/// Whether this node is listed in the DCS `sync` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMembership {
    /// Not a synchronous standby (or synchronous mode is off).
    #[default]
    None,
    /// A synchronous standby in `synchronous_mode: on`.
    Sync,
    /// A quorum standby in `synchronous_mode: quorum`.
    Quorum,
}

/// Everything the health rules need to know about this node. The caller computes each field
/// from the agent's state; in particular the time-dependent ones (`holds_lease`,
/// `dcs_view_fresh`, `loop_healthy`) must be evaluated at request time against their deadlines.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeHealth {
    /// This node holds the leader lock and the lease deadline has not passed.
    pub holds_lease: bool,
    /// The cluster is a standby cluster (its leader follows a remote primary).
    pub standby_cluster: bool,
    /// PostgreSQL's state is `running`.
    pub pg_running: bool,
    /// PostgreSQL's role.
    pub pg_role: PgRole,
    /// `streaming` or `in archive recovery` (replicas).
    pub replication_state: Option<String>,
    /// Last WAL position received (replicas).
    pub received_lsn: Option<Lsn>,
    /// Last WAL position replayed (replicas).
    pub replayed_lsn: Option<Lsn>,
    /// `pg_stat_wal_receiver.latest_end_lsn`: the upstream's position as last reported to us.
    pub latest_end_lsn: Option<Lsn>,
    /// The leader's optime from the DCS `status` key.
    pub cluster_optime: Option<Lsn>,
    /// This node's configured tags.
    pub tags: Tags,
    /// Membership in the DCS `sync` key.
    pub sync: SyncMembership,
    /// The cached DCS view is younger than `ttl` (Patroni's "cluster is not None").
    pub dcs_view_fresh: bool,
    /// The cluster is paused (maintenance mode).
    pub paused: bool,
    /// Failsafe mode is active (the DCS is unreachable but all members answered).
    pub failsafe_active: bool,
    /// The HA loop ran recently enough (`ttl` on a running primary, `2 × ttl` otherwise).
    pub loop_healthy: bool,
    /// `maximum_lag_on_failover` in bytes: the default `lag` of `/readiness`.
    pub maximum_lag_on_failover: u64,
}

/// Which WAL position `/readiness` measures lag from (`mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LagMode {
    /// The replayed position (default).
    #[default]
    Apply,
    /// The received (written) position.
    Write,
}

/// The query parameters the health rules understand. Unknown parameters are ignored, as in
/// Patroni; empty values count as absent (Python's `parse_qs` drops them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthQuery {
    /// `lag=`: maximum replay lag in bytes.
    pub lag: Option<u64>,
    /// `replication_state=`: required replication state (e.g. `streaming`).
    pub replication_state: Option<String>,
    /// `tag_<key>=<value>` filters, in request order.
    pub tags: Vec<(String, String)>,
    /// `mode=` of `/readiness`.
    pub mode: LagMode,
}

/// A query string the health rules refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `lag=` is not a size.
    #[error("invalid lag {value:?}: {reason}")]
    Lag {
        /// The value as sent.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// `mode=` is neither `apply` nor `write`.
    #[error("invalid mode {0:?}: expected apply or write")]
    Mode(String),
    /// A key or value is not valid percent-encoded UTF-8.
    #[error("query string is not valid percent-encoded UTF-8")]
    Encoding,
}

impl HealthQuery {
    /// Parses a raw query string (the part after `?`, still percent-encoded). The first value
    /// of a repeated key wins, as in Patroni.
    pub fn parse(raw: Option<&str>) -> Result<HealthQuery, QueryError> {
        let mut q = HealthQuery::default();
        let mut seen_lag = false;
        let mut seen_state = false;
        let mut seen_mode = false;
        let mut seen_tags: Vec<String> = Vec::new();
        for pair in raw.unwrap_or("").split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let key = percent_decode(k).ok_or(QueryError::Encoding)?;
            let value = percent_decode(v).ok_or(QueryError::Encoding)?;
            if value.is_empty() {
                continue;
            }
            match key.as_str() {
                "lag" if !seen_lag => {
                    seen_lag = true;
                    q.lag = Some(parse_size(&value).map_err(|reason| QueryError::Lag {
                        value: clip(&value),
                        reason,
                    })?);
                }
                "replication_state" if !seen_state => {
                    seen_state = true;
                    q.replication_state = Some(value);
                }
                "mode" if !seen_mode => {
                    seen_mode = true;
                    q.mode = match value.as_str() {
                        "apply" => LagMode::Apply,
                        "write" => LagMode::Write,
                        _ => return Err(QueryError::Mode(clip(&value))),
                    };
                }
                k => {
                    if let Some(tag) = k.strip_prefix("tag_")
                        && !seen_tags.iter().any(|t| t == tag)
                    {
                        seen_tags.push(tag.to_owned());
                        q.tags.push((tag.to_owned(), value));
                    }
                }
            }
        }
        Ok(q)
    }
}

/// At most 64 characters of a value echoed in an error message.
fn clip(value: &str) -> String {
    match value.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &value[..i]),
        None => value.to_owned(),
    }
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte. `None` when
/// an escape is malformed or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Parses a size the way Patroni parses `lag=`: a non-negative number (integer or decimal),
/// optionally followed by one of the units `B`, `kB`, `MB`, `GB`, `TB` (powers of 1024,
/// case-sensitive as in PostgreSQL). A fractional value is rounded to a multiple of the next
/// smaller unit, as Patroni does (`1.5MB` is 1536 kB).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let unit = unit.trim();
    let (factor, round_to): (u64, u64) = match unit {
        "" | "B" => (1, 1),
        "kB" => (1 << 10, 1),
        "MB" => (1 << 20, 1 << 10),
        "GB" => (1 << 30, 1 << 20),
        "TB" => (1 << 40, 1 << 30),
        _ if t.starts_with('-') => return Err("must not be negative".into()),
        other => {
            return Err(format!(
                "unknown unit {:?} (expected a number of bytes, optionally with B, kB, MB, GB or TB)",
                clip(other)
            ));
        }
    };
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int_part.is_empty() && frac_part.is_none_or(str::is_empty) {
        return Err("expected a number".into());
    }
    if frac_part.is_some_and(|f| f.contains('.')) {
        return Err("expected a number".into());
    }
    let too_big = || "too large".to_owned();
    let whole: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_big())?
    };
    let mut bytes = whole.checked_mul(factor).ok_or_else(too_big)?;
    if let Some(frac) = frac_part.filter(|f| !f.is_empty()) {
        // Fractions are rare and small; f64 keeps 53 bits, plenty for "1.5GB".
        let f: f64 = format!("0.{frac}")
            .parse()
            .map_err(|_| "expected a number")?;
        let extra = (f * factor as f64 / round_to as f64).round() as u64 * round_to;
        bytes = bytes.checked_add(extra).ok_or_else(too_big)?;
    }
    Ok(bytes)
}

/// The answer of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 200 OK.
    Up,
    /// 503 Service Unavailable.
    Down,
}

impl Verdict {
    /// The HTTP status code.
    pub fn status_code(self) -> u16 {
        match self {
            Verdict::Up => 200,
            Verdict::Down => 503,
        }
    }

    fn from_bool(up: bool) -> Verdict {
        if up { Verdict::Up } else { Verdict::Down }
    }

    fn is_up(self) -> bool {
        self == Verdict::Up
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Up => "up",
            Verdict::Down => "down",
        })
    }
}

/// The leader's WAL position as far as this node knows: the DCS optime (only while the view is
/// fresh) or what the WAL receiver last heard from upstream, whichever is further.
fn leader_optime(node: &NodeHealth) -> Option<Lsn> {
    let dcs = node.cluster_optime.filter(|_| node.dcs_view_fresh);
    dcs.max(node.latest_end_lsn)
}

/// The verdict of a generic health check (`GET`/`HEAD`/`OPTIONS` on any path other than the
/// descriptive endpoints, `/liveness` and `/readiness`). `path` is the request path without
/// the query string, as sent (not percent-decoded).
pub fn check(path: &str, node: &NodeHealth, q: &HealthQuery) -> Verdict {
    let path = if path == "/" { "/primary" } else { path };

    let replayed = node.replayed_lsn.map_or(0, |l| l.0);
    let is_lagging = match (q.lag, leader_optime(node)) {
        (Some(max), Some(optime)) if optime.0 > 0 => optime.0 > replayed.saturating_add(max),
        _ => false,
    };
    let state_matches = q
        .replication_state
        .as_deref()
        .is_none_or(|want| node.replication_state.as_deref() == Some(want));
    let replica_ok = !node.tags.noloadbalance
        && !is_lagging
        && node.pg_role == PgRole::Replica
        && node.pg_running
        && state_matches;

    let role = node.pg_role;
    let (leader, primary, standby_leader, replica) = if !node.dcs_view_fresh && node.paused {
        (
            matches!(role, PgRole::Primary | PgRole::StandbyLeader),
            role == PgRole::Primary,
            role == PgRole::StandbyLeader,
            replica_ok,
        )
    } else if node.holds_lease {
        if node.standby_cluster {
            (
                true,
                false,
                matches!(role, PgRole::Replica | PgRole::StandbyLeader),
                false,
            )
        } else {
            (true, true, false, replica_ok)
        }
    } else {
        (false, false, false, replica_ok)
    };

    let mut ignore_tags = false;
    let up = if path.contains("standby_leader") || path.contains("standby-leader") {
        ignore_tags = true;
        standby_leader
    } else if path.contains("leader") {
        ignore_tags = true;
        leader
    } else if path.contains("master") || path.contains("primary") || path.contains("read-write") {
        ignore_tags = true;
        primary
    } else if path.contains("replica") {
        replica
    } else if path.contains("read-only") && !path.contains("sync") && !path.contains("quorum") {
        primary || standby_leader || replica
    } else if path.contains("health") {
        node.pg_running
    } else if node.dcs_view_fresh {
        let is_sync = node.sync == SyncMembership::Sync;
        let is_quorum = node.sync == SyncMembership::Quorum;
        match path {
            "/sync" | "/synchronous" => is_sync && replica,
            "/quorum" => is_quorum && replica,
            "/async" | "/asynchronous" => !is_sync && !is_quorum && replica,
            "/read-only-quorum" => primary || standby_leader || (is_quorum && replica),
            "/read-only-sync" | "/read-only-synchronous" => {
                primary || standby_leader || (is_sync && replica)
            }
            _ => false,
        }
    } else {
        false
    };

    let verdict = Verdict::from_bool(up);
    if ignore_tags || !verdict.is_up() {
        return verdict;
    }
    let tags_match = q
        .tags
        .iter()
        .all(|(k, v)| node.tags.value_for_filter(k).as_deref() == Some(v.as_str()));
    Verdict::from_bool(tags_match)
}

/// `/liveness`: up while the cluster is paused or the HA loop keeps running.
pub fn liveness(node: &NodeHealth) -> Verdict {
    Verdict::from_bool(node.paused || node.loop_healthy)
}

/// `/readiness`: up on the lock holder; otherwise `Err` with the reason a replica is not ready
/// (not running, not streaming, no idea of the leader's position, or lagging more than `lag=`,
/// default `maximum_lag_on_failover`, measured from the replayed or, with `mode=write`, the
/// received position).
pub fn readiness(node: &NodeHealth, q: &HealthQuery) -> Result<(), String> {
    if node.holds_lease {
        return Ok(());
    }
    if !node.pg_running {
        return Err("PostgreSQL is not running".into());
    }
    if node.replication_state.as_deref() != Some("streaming") {
        return Err("PostgreSQL replication state is not streaming".into());
    }
    let latest_end = node.latest_end_lsn.map_or(0, |l| l.0);
    if !node.dcs_view_fresh && latest_end == 0 {
        return if node.failsafe_active {
            Ok(())
        } else {
            Err("DCS is not accessible".into())
        };
    }
    let optime = leader_optime(node).map_or(0, |l| l.0);
    let (mode, location) = match q.mode {
        LagMode::Apply => ("apply", node.replayed_lsn),
        LagMode::Write => ("write", node.received_lsn),
    };
    let lag = optime.saturating_sub(location.map_or(0, |l| l.0));
    let max = q.lag.unwrap_or(node.maximum_lag_on_failover);
    if lag > max {
        return Err(format!(
            "replication {mode} lag {lag} exceeds maximum allowable {max}"
        ));
    }
    Ok(())
}

/// [`readiness`] as a verdict.
pub fn readiness_verdict(node: &NodeHealth, q: &HealthQuery) -> Verdict {
    Verdict::from_bool(readiness(node, q).is_ok())
}

#[cfg(test)]
mod tests;
