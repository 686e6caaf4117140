//! `GET /metrics`: Prometheus text format 0.0.4, written by hand so Patroni's metric names and
//! types stay exactly as dashboards expect them (a metrics crate would add suffixes).
//!
//! Patroni's metrics (`patroni_*`) keep their names, types and meaning, with the labels of
//! Patroni 4 (`scope` and `name`). pgkeep's own (`pgkeep_*`) follow OpenMetrics naming
//! (`_total`, `_seconds`, `_bytes`). Every metric is listed in README ("Metrics").
//!
//! The answer is rendered from the published [`ApiSnapshot`] and the server's own request
//! statistics only: a scrape reads no file, runs no SQL and asks etcd nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::handlers::AppState;
use super::{ApiSnapshot, Xlog};

/// Upper bounds of the request latency histogram, in seconds.
const BUCKETS: [f64; 11] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Paths that get their own label; any other path is counted as `other`, so a scanner cannot
/// grow the label set.
const ROUTES: &[&str] = &[
    "/",
    "/primary",
    "/master",
    "/leader",
    "/replica",
    "/read-only",
    "/read-write",
    "/standby-leader",
    "/standby_leader",
    "/sync",
    "/synchronous",
    "/async",
    "/asynchronous",
    "/quorum",
    "/read-only-sync",
    "/read-only-quorum",
    "/health",
    "/liveness",
    "/readiness",
    "/patroni",
    "/cluster",
    "/history",
    "/config",
    "/metrics",
    "/switchover",
    "/failover",
    "/restart",
    "/reinitialize",
    "/reload",
];

/// What the agent adds to its snapshot for `/metrics` beyond the status JSON.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentMetrics {
    /// Promotions of this node asked for through `/failover` (switchover or manual failover).
    pub promotions_manual: u64,
    /// Promotions of this node after the leader was lost.
    pub promotions_automatic: u64,
    /// Times this node stopped its primary because its right to lead ended.
    pub fences: u64,
    /// The latest HA decision: member state, reason, and when (seconds since the epoch).
    pub last_decision: Option<(String, String, f64)>,
    /// `notAfter` of the certificates this agent uses (seconds since the epoch), by role.
    pub cert_not_after: BTreeMap<String, i64>,
    /// `pg_stat_archiver` on a primary.
    pub archiver: Option<ArchiverStats>,
    /// WAL segments pgBackRest dropped from the archive queue since the agent started (nodes
    /// with a repository).
    pub archive_dropped: Option<u64>,
    /// When the postmaster started (seconds since the epoch).
    pub postmaster_start_time: Option<i64>,
    /// The granted TTL of the leader lease, when held.
    pub lease_ttl: Option<Duration>,
}

/// `pg_stat_archiver`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiverStats {
    /// WAL files archived.
    pub archived_count: i64,
    /// Failed archive attempts.
    pub failed_count: i64,
    /// Last success (milliseconds since the epoch).
    pub last_archived_ms: Option<i64>,
    /// Last failure (milliseconds since the epoch).
    pub last_failed_ms: Option<i64>,
    /// The last WAL file archived.
    pub last_archived_wal: Option<String>,
    /// The WAL file of the last failure.
    pub last_failed_wal: Option<String>,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request counts and latencies of this REST API server.
#[derive(Debug, Default)]
pub struct RequestStats {
    counts: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl RequestStats {
    fn record(&self, route: &'static str, code: u16, took: Duration) {
        let secs = took.as_secs_f64();
        if let Ok(mut c) = self.counts.lock() {
            *c.entry((route, code)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry(route).or_default();
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
    }
}

fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
}

/// Middleware: counts and times every request (its route, method-independent, and status).
pub(super) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .stats
        .record(route, resp.status().as_u16(), start.elapsed());
    resp
}

/// `GET /metrics` (behind the access check).
pub(super) async fn get_metrics(State(state): State<AppState>) -> Response {
    let now_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let text = render(&state.snapshot(), &state.stats, Instant::now(), now_epoch);
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
    labels: String,
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A metric with the scope/name labels and one sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.text, "{name}{{{}}} {value}", self.labels);
    }

    /// A sample with extra labels (`k="v"` pairs already escaped).
    fn sample(&mut self, name: &str, extra: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.text, "{name}{{{},{extra}}} {value}", self.labels);
    }
}

/// Patroni's `patroni_version` value: each part of `x.y.z` zero-padded to two digits.
fn padded_version(v: &str) -> String {
    v.split('.').map(|p| format!("{p:0>2}")).collect()
}

/// The metrics text for `snapshot` and `stats` at `now` (monotonic, for deadlines) and
/// `now_epoch` (seconds since the epoch, for certificate expiry).
pub fn render(
    snapshot: &ApiSnapshot,
    stats: &RequestStats,
    now: Instant,
    now_epoch: f64,
) -> String {
    let s = &snapshot.status;
    let m = &snapshot.metrics;
    let mut o = Out {
        text: String::with_capacity(8 * 1024),
        labels: format!(
            "scope=\"{}\",name=\"{}\"",
            esc(snapshot.scope()),
            esc(snapshot.name())
        ),
    };
    let primary = matches!(s.role.as_str(), "primary" | "master");
    let (location, received, replayed, replayed_ts, paused) = match &s.xlog {
        Some(Xlog::Primary { location }) => (location.0, 0, 0, None, false),
        Some(Xlog::Replica {
            received_location,
            replayed_location,
            replayed_timestamp,
            paused,
        }) => (
            0,
            received_location.0,
            replayed_location.0,
            replayed_timestamp.as_deref(),
            *paused,
        ),
        None => (0, 0, 0, None, false),
    };
    let running = s.state == "running";
    o.one(
        "patroni_version",
        "gauge",
        "Patroni semver without periods (the Patroni version pgkeep is compatible with).",
        padded_version(&s.patroni.version),
    );
    o.one(
        "patroni_postgres_running",
        "gauge",
        "Value is 1 if Postgres is running, 0 otherwise.",
        u8::from(running),
    );
    o.one(
        "patroni_postmaster_start_time",
        "gauge",
        "Epoch seconds since Postgres started.",
        m.postmaster_start_time.filter(|_| running).unwrap_or(0),
    );
    for name in ["patroni_master", "patroni_primary"] {
        o.one(
            name,
            "gauge",
            "Value is 1 if this node is the leader, 0 otherwise.",
            u8::from(primary),
        );
    }
    o.one(
        "patroni_xlog_location",
        "counter",
        "Current location of the Postgres transaction log, 0 if this node is not the leader.",
        location,
    );
    o.one(
        "patroni_standby_leader",
        "gauge",
        "Value is 1 if this node is the standby_leader, 0 otherwise.",
        u8::from(s.role == "standby_leader"),
    );
    o.one(
        "patroni_replica",
        "gauge",
        "Value is 1 if this node is a replica, 0 otherwise.",
        u8::from(s.role == "replica"),
    );
    o.one(
        "patroni_sync_standby",
        "gauge",
        "Value is 1 if this node is a sync standby replica, 0 otherwise.",
        u8::from(s.sync_standby),
    );
    o.one(
        "patroni_quorum_standby",
        "gauge",
        "Value is 1 if this node is a quorum standby replica, 0 otherwise.",
        u8::from(s.quorum_standby),
    );
    o.one(
        "patroni_xlog_received_location",
        "counter",
        "Current location of the received Postgres transaction log, 0 if this node is not a replica.",
        received,
    );
    o.one(
        "patroni_xlog_replayed_location",
        "counter",
        "Current location of the replayed Postgres transaction log, 0 if this node is not a replica.",
        replayed,
    );
    o.one(
        "patroni_xlog_replayed_timestamp",
        "gauge",
        "Current timestamp of the replayed Postgres transaction log, 0 if null.",
        replayed_ts.and_then(parse_pg_timestamp).unwrap_or(0.0),
    );
    o.one(
        "patroni_xlog_paused",
        "gauge",
        "Value is 1 if the Postgres xlog is paused, 0 otherwise.",
        u8::from(paused),
    );
    let streaming = s.replication_state.as_deref() == Some("streaming");
    o.one(
        "patroni_postgres_streaming",
        "gauge",
        "Value is 1 if Postgres is streaming, 0 otherwise.",
        u8::from(streaming),
    );
    o.one(
        "patroni_postgres_in_archive_recovery",
        "gauge",
        "Value is 1 if Postgres is replicating from archive, 0 otherwise.",
        u8::from(s.replication_state.as_deref() == Some("in archive recovery")),
    );
    o.one(
        "patroni_postgres_server_version",
        "gauge",
        "Version of Postgres (if running), 0 otherwise.",
        s.server_version.unwrap_or(0),
    );
    o.one(
        "patroni_cluster_unlocked",
        "gauge",
        "Value is 1 if the cluster is unlocked, 0 if locked.",
        u8::from(s.cluster_unlocked),
    );
    o.one(
        "patroni_failsafe_mode_is_active",
        "gauge",
        "Value is 1 if failsafe mode is active, 0 if inactive.",
        u8::from(s.failsafe_mode_is_active),
    );
    o.one(
        "patroni_postgres_timeline",
        "counter",
        "Postgres timeline of this node (if running), 0 otherwise.",
        s.timeline.filter(|_| running).unwrap_or(0),
    );
    o.one(
        "patroni_dcs_last_seen",
        "gauge",
        "Epoch timestamp when DCS was last contacted successfully.",
        s.dcs_last_seen.unwrap_or(0),
    );
    o.one(
        "patroni_pending_restart",
        "gauge",
        "Value is 1 if the node needs a restart, 0 otherwise.",
        u8::from(s.pending_restart),
    );
    o.one(
        "patroni_is_paused",
        "gauge",
        "Value is 1 if auto failover is disabled, 0 otherwise.",
        u8::from(s.pause),
    );
    o.one(
        "patroni_failover_priority",
        "gauge",
        "Value is used by failover: the member with the highest priority is preferred.",
        pgkeep_core::ha::failover_priority(&s.tags),
    );
    pgkeep_metrics(&mut o, snapshot, stats, now, now_epoch);
    o.text
}

fn pgkeep_metrics(
    o: &mut Out,
    snapshot: &ApiSnapshot,
    stats: &RequestStats,
    now: Instant,
    now_epoch: f64,
) {
    let m = &snapshot.metrics;
    o.text.push_str(&format!(
        "# HELP pgkeep_info pgkeep's version.\n# TYPE pgkeep_info gauge\npgkeep_info{{{},version=\"{}\"}} 1\n",
        o.labels,
        super::PGKEEP_VERSION
    ));
    let remaining = snapshot
        .lease_deadline
        .map_or(0.0, |d| d.saturating_duration_since(now).as_secs_f64());
    o.one(
        "pgkeep_leader_lease_remaining_seconds",
        "gauge",
        "Time until this node must have renewed the leader lease (lease deadline minus now, safety margin included); 0 when it does not hold the lease.",
        remaining,
    );
    o.one(
        "pgkeep_leader_lease_ttl_seconds",
        "gauge",
        "TTL etcd granted to the leader lease; 0 when this node does not hold it.",
        m.lease_ttl.map_or(0, |t| t.as_secs()),
    );
    o.head(
        "pgkeep_promotions_total",
        "counter",
        "Promotions of this node since the agent started, by trigger: manual (switchover or failover request) or automatic (leader lost).",
    );
    o.sample(
        "pgkeep_promotions_total",
        "trigger=\"manual\"",
        m.promotions_manual,
    );
    o.sample(
        "pgkeep_promotions_total",
        "trigger=\"automatic\"",
        m.promotions_automatic,
    );
    o.one(
        "pgkeep_fences_total",
        "counter",
        "Times this node stopped its PostgreSQL because its right to lead ended.",
        m.fences,
    );
    if let Some((state, reason, at)) = &m.last_decision {
        o.head(
            "pgkeep_ha_decision_info",
            "gauge",
            "The latest HA decision: the member state and its reason.",
        );
        o.sample(
            "pgkeep_ha_decision_info",
            &format!("state=\"{}\",reason=\"{}\"", esc(state), esc(reason)),
            1,
        );
        o.one(
            "pgkeep_ha_decision_timestamp_seconds",
            "gauge",
            "When the latest HA decision was taken (seconds since the epoch).",
            at,
        );
    }
    if !m.cert_not_after.is_empty() {
        o.head(
            "pgkeep_certificate_expiry_seconds",
            "gauge",
            "Seconds until each certificate this agent uses expires (negative once expired).",
        );
        for (cert, not_after) in &m.cert_not_after {
            o.sample(
                "pgkeep_certificate_expiry_seconds",
                &format!("certificate=\"{}\"", esc(cert)),
                format!("{:.0}", *not_after as f64 - now_epoch),
            );
        }
    }
    if let Some(a) = &m.archiver {
        o.one(
            "pgkeep_archiver_archived_total",
            "counter",
            "WAL files archived (pg_stat_archiver, primary only).",
            a.archived_count,
        );
        o.one(
            "pgkeep_archiver_failed_total",
            "counter",
            "Failed WAL archive attempts (pg_stat_archiver, primary only).",
            a.failed_count,
        );
        o.one(
            "pgkeep_archiver_last_archived_timestamp_seconds",
            "gauge",
            "Last successful archive (seconds since the epoch; 0 if none).",
            a.last_archived_ms.map_or(0.0, |t| t as f64 / 1000.0),
        );
        o.one(
            "pgkeep_archiver_last_failed_timestamp_seconds",
            "gauge",
            "Last failed archive attempt (seconds since the epoch; 0 if none).",
            a.last_failed_ms.map_or(0.0, |t| t as f64 / 1000.0),
        );
    }
    if let Some(n) = m.archive_dropped {
        o.one(
            "pgkeep_archive_dropped_segments_total",
            "counter",
            "WAL segments pgBackRest dropped from a full archive queue since the agent started: \
             counted as archived by PostgreSQL, missing from the archive.",
            n,
        );
    }
    member_metrics(o, snapshot);
    request_metrics(o, stats);
}

/// Per member, from the watched DCS view: WAL position and lag behind the leader's optime.
fn member_metrics(o: &mut Out, snapshot: &ApiSnapshot) {
    let Some(view) = &snapshot.cluster else {
        return;
    };
    let optime = view.status.optime.map(|l| l.0);
    let leader = view.leader.as_ref().map(|l| l.name.as_str());
    o.head(
        "pgkeep_member_wal_position_bytes",
        "gauge",
        "Each member's WAL position as its member key publishes it.",
    );
    let mut lags = Vec::new();
    for (name, member) in &view.members {
        let Some(pos) = member.data.xlog_location else {
            continue;
        };
        let label = format!("member=\"{}\"", esc(name));
        o.sample("pgkeep_member_wal_position_bytes", &label, pos.0);
        if Some(name.as_str()) != leader
            && let Some(opt) = optime
        {
            lags.push((label, opt.saturating_sub(pos.0)));
        }
    }
    o.head(
        "pgkeep_member_lag_bytes",
        "gauge",
        "How far each replica's published WAL position is behind the leader's optime.",
    );
    for (label, lag) in lags {
        o.sample("pgkeep_member_lag_bytes", &label, lag);
    }
}

fn request_metrics(o: &mut Out, stats: &RequestStats) {
    o.head(
        "pgkeep_rest_requests_total",
        "counter",
        "REST API requests answered, by route and status code.",
    );
    if let Ok(counts) = stats.counts.lock() {
        for ((route, code), n) in counts.iter() {
            o.sample(
                "pgkeep_rest_requests_total",
                &format!("route=\"{route}\",code=\"{code}\""),
                n,
            );
        }
    }
    o.head(
        "pgkeep_rest_request_duration_seconds",
        "histogram",
        "REST API request handling time (after the TLS handshake), by route.",
    );
    if let Ok(latency) = stats.latency.lock() {
        for (route, h) in latency.iter() {
            for (le, n) in BUCKETS.iter().zip(h.buckets) {
                o.sample(
                    "pgkeep_rest_request_duration_seconds_bucket",
                    &format!("route=\"{route}\",le=\"{le}\""),
                    n,
                );
            }
            o.sample(
                "pgkeep_rest_request_duration_seconds_bucket",
                &format!("route=\"{route}\",le=\"+Inf\""),
                h.count,
            );
            o.sample(
                "pgkeep_rest_request_duration_seconds_sum",
                &format!("route=\"{route}\""),
                h.sum,
            );
            o.sample(
                "pgkeep_rest_request_duration_seconds_count",
                &format!("route=\"{route}\""),
                h.count,
            );
        }
    }
}

/// `2026-11-29 17:01:02.123456+00` (PostgreSQL's text form of a timestamptz) as epoch seconds,
/// to the millisecond.
fn parse_pg_timestamp(text: &str) -> Option<f64> {
    pgkeep_core::ha::parse_rfc3339(text).map(|ms| ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_padded_like_patroni() {
        assert_eq!(padded_version("4.1.4"), "040104");
        assert_eq!(padded_version("3.0.12"), "030012");
    }

    #[test]
    fn postgres_timestamps_become_epoch_seconds() {
        assert_eq!(parse_pg_timestamp("1970-01-01 00:00:00+00"), Some(0.0));
        assert_eq!(
            parse_pg_timestamp("2026-11-29 17:01:02.5+00"),
            Some(1_795_971_662.5)
        );
        assert_eq!(
            parse_pg_timestamp("2026-11-29 18:01:02.5+01"),
            Some(1_795_971_662.5)
        );
        assert_eq!(
            parse_pg_timestamp("2026-11-29 12:31:02.5-04:30"),
            Some(1_795_971_662.5)
        );
        assert_eq!(parse_pg_timestamp("yesterday"), None);
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(route_label("/primary"), "/primary");
        assert_eq!(route_label("/../../etc/passwd"), "other");
        assert_eq!(route_label("/replica?lag=1"), "other");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let s = RequestStats::default();
        s.record("/primary", 200, Duration::from_micros(700));
        s.record("/primary", 503, Duration::from_millis(30));
        let l = s.latency.lock().unwrap();
        let h = &l["/primary"];
        assert_eq!(h.count, 2);
        assert_eq!(h.buckets[0], 0);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[6], 2);
        assert_eq!(s.counts.lock().unwrap()[&("/primary", 503)], 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
