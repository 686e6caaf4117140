//! The agent's REST API: Patroni's endpoints over HTTPS, with authentication.
//!
//! HAProxy, F5, vip-manager, Kubernetes probes and `patronictl` talk to this server as they
//! would to Patroni's. The status-code rules of the health checks are the pure function
//! [`pgkeep_core::health`]; this module is the network around it.
//!
//! # Where the answers come from
//!
//! The agent publishes an [`ApiSnapshot`] through a `tokio::sync::watch` channel after every HA
//! cycle (and whenever the DCS view changes). Handlers only read the latest snapshot: no SQL
//! query and no etcd read happens per request, so a flood of health checks cannot slow the HA
//! loop or PostgreSQL down (the authenticated state-changing endpoints write one key, validated
//! against the snapshot's view, and then follow the snapshots). Time-dependent answers are computed at request time from deadlines
//! in the snapshot, not from booleans that could go stale if the HA loop hangs:
//!
//! - `/primary` (and `/`, `/leader`, `/read-write`...) answers 200 only while `now <`
//!   [`ApiSnapshot::lease_deadline`]; a snapshot published while the lock was held stops
//!   counting the moment the lease deadline passes, whether or not a new snapshot arrives.
//! - The DCS view counts as fresh only until [`ApiSnapshot::dcs_fresh_until`].
//! - `/liveness` answers 200 only until [`ApiSnapshot::loop_deadline`] (or while paused).
//!
//! # Endpoints
//!
//! | request | auth | answer |
//! |---|---|---|
//! | `GET`/`HEAD`/`OPTIONS` on any other path (`/`, `/primary`, `/replica?lag=..`, `/read-only`, `/health`, `/sync`, ...) | none | 200/503 by [`pgkeep_core::health::check`]; body `{}` |
//! | `GET /liveness`, `GET /readiness` (also `HEAD`/`OPTIONS`) | none | 200/503; body `{}` |
//! | `GET /patroni` | required | 200 + status JSON |
//! | `GET /cluster` | required | 200 + cluster JSON (from the cached DCS view) |
//! | `GET /history` | required | 200 + timeline history array |
//! | `GET /config` | required | 200 + dynamic configuration, 502 when missing or invalid |
//! | `GET /metrics` | required | 200 + Prometheus text format 0.0.4 (see [`metrics`]) |
//! | `POST /switchover` `{"leader", "candidate"?, "scheduled_at"?}` | required | text: 200 `Successfully switched over to "X"` / `Switched over to "X" instead of "Y"`, 202 `Switchover scheduled`, 400/422 invalid request, 412 not possible now, 409 key changed concurrently, 503 `Switchover failed` / `... status unknown after N seconds; operation may still be in progress` / DCS write failed |
//! | `POST /failover` `{"candidate", "leader"?}` | required | as `POST /switchover` (`Successfully failed over to "X"`); never scheduled; with `leader` it is a switchover |
//! | `DELETE /switchover` | required | text: 200 `scheduled switchover deleted`, 404 `no switchover is scheduled`, 409 key changed concurrently |
//! | `PATCH /config` (JSON merge patch), `PUT /config` (replace) | required | 200 + the configuration written (`ETag: "<mod_revision>"`), 422 + `{"error", "refused": [{"key", "reason", "security"}]}` when the result would hold a key the agents drop, 409 changed concurrently (or `If-Match` revision differs), 503/502 write failed; see [`dynconf`] |
//! | `POST /restart` `{"restart_pending"?, "role"?, "postgres_version"?, "timeout"?}` | required | text: 200 `restarted successfully`, 503 `restart conditions are not satisfied...`, 400 `schedule` (not supported) or unknown keys; see [`local`] |
//! | `DELETE /restart` | required | text: 404 `no restarts are scheduled` |
//! | `POST /reinitialize` `{"force"?, "from_leader"?}` | required | text: 200 `reinitialize started`, 503 `I am the leader, can not reinitialize` / `Cluster has no leader, can not reinitialize` / `... already in progress` |
//! | `POST /reload` | required | text: 202 `reload scheduled` |
//!
//! `HEAD` and `OPTIONS` answers carry no body. Errors are JSON `{"error": "..."}`, except the
//! answers of the state-changing endpoints, which are plain text in Patroni's words (see
//! [`switchover`]'s documentation and [`pgkeep_core::ha::manual`] for the validation order).
//! Those endpoints write the DCS through the [`Control`] handle given to [`serve`]; a server
//! without one answers them 503 `this server cannot change the cluster`. Their request bodies
//! may have at most 64 KiB (413) and must arrive within 10 s (408).
//!
//! # Where pgkeep deliberately differs from Patroni
//!
//! - **Anonymous health answers describe nothing.** Patroni returns the full status JSON (member
//!   name, scope, LSNs, replication peers, tags...) with every health check; pgkeep returns `{}`.
//!   A caller that passes the access check of the protected endpoints (see [`auth`]) gets the
//!   full status JSON on `GET` health checks too, so tools written for Patroni keep working
//!   when given credentials.
//! - **Descriptive endpoints need authentication.** `/patroni`, `/cluster`, `/history`,
//!   `/config` and `/metrics` are behind the same access check as the state-changing endpoints (Patroni leaves
//!   every `GET` open). With nothing configured to authenticate callers, they answer 403
//!   `no authentication configured` instead of being open. `HEAD /patroni` therefore is 401/403
//!   without credentials (Patroni: 503, treating it as a health check of an unknown path).
//! - **Malformed queries are refused.** `lag=abc` or `mode=fast` answer 400 with a JSON error
//!   (Patroni ignores an unparseable `lag`, which silently turns a lag-limited check into an
//!   unlimited one). Empty values (`lag=`) are still treated as absent.
//! - **HTTP/1.1 with keep-alive** instead of HTTP/1.0 with one connection per request. Responses
//!   have a `Content-Length`, are written in one piece (`writev` off, TCP_NODELAY on).
//! - `HEAD`/`OPTIONS` answers carry the usual HTTP headers (Patroni sends a bare status line);
//!   `HEAD`/`OPTIONS /liveness` and `/readiness` answer like their `GET` (Patroni: 503).
//! - Unknown `GET` paths answer 503 like Patroni's generic health check (not 404); other
//!   methods on unknown paths answer 501 and unsupported methods on known paths 405, with a
//!   JSON error.
//! - `/cluster`, `/history` and `/config` come from the agent's cached, watched DCS view, not
//!   from a fresh etcd read per request; with no view yet they answer 503.
//! - The basic-auth realm is `pgkeep`.
//! - Text answers are `text/plain; charset=utf-8` (Patroni labels them `text/html`).
//! - `POST /switchover` and `/failover` refuse unknown body keys and non-string values (400;
//!   Patroni ignores them), write the `/failover` key with compare-and-swap against the version
//!   they validated (409 on a concurrent change; Patroni overwrites), judge the candidates from
//!   their member keys instead of calling each one's REST API, and follow the agent's watched
//!   view while they wait instead of reading etcd once a second.
//! - `GET /switchover` and `GET /failover` answer 405 (Patroni: a 503 health check).
//! - A state-changing request without `Content-Length` has an empty (or chunked) body, bounded
//!   like any other (Patroni answers 411).
//! - `PATCH`/`PUT /config` **refuse** (422, naming each key) a configuration holding a key the
//!   agents would drop — a key that could run code, name files or weaken security, an unknown
//!   key, a malformed or unsafe value, unsafe timing — where Patroni writes it and every node
//!   silently ignores what it cannot use. Keys already present and left untouched do not block
//!   an edit. `PUT` is a compare-and-swap too (Patroni overwrites), and both honour `If-Match`.
//! - `POST /restart` does not schedule restarts (`schedule` → 400) and takes `timeout` as the
//!   bound of its wait; `DELETE /restart` therefore always answers 404.

pub mod archive;
pub mod auth;
pub mod client;
pub mod control;
mod dynconf;
mod handlers;
pub mod json;
pub mod local;
pub mod metrics;
mod server;
pub mod switchover;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use pgkeep_core::cluster::{ClusterView, Lsn};
use pgkeep_core::health::{NodeHealth, PgRole, SyncMembership};

pub use client::{ApiClient, ApiClientBuilder, ApiResponse};
pub use control::{
    BoxFuture, Control, ControlError, LivePositions, LocalRequest, PendingChange, RequestOutcome,
};
pub use json::{MemberStatus, PatroniInfo, ReplicationInfo, Xlog};
pub use server::{ApiError, BoundServer, TlsReloader, serve};

/// The Patroni version pgkeep reports in `patroni.version` and member keys: new enough that
/// Patroni tools take their modern code paths.
pub const PATRONI_COMPAT_VERSION: &str = "4.1.4";

/// pgkeep's own version, reported as `pgkeep_version`.
pub const PGKEEP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the REST API answers from, published by the agent. Cheap to clone behind an
/// [`Arc`]; handlers never modify it.
#[derive(Debug, Clone)]
pub struct ApiSnapshot {
    /// The status JSON of `GET /patroni` (including `patroni.{version, scope, name}`). Its
    /// `state`, `role`, `replication_state`, `xlog`, `tags`, `pause`, `sync_standby`,
    /// `quorum_standby` and `failsafe_mode_is_active` are also the health rules' inputs.
    pub status: MemberStatus,
    /// While this node holds the leader lock: when the hold ends (last acknowledged keepalive +
    /// granted TTL − safety margin, on the monotonic clock). `None` when it does not hold it.
    pub lease_deadline: Option<Instant>,
    /// The node decided to hand the leader key over (a switchover, a shutdown) and is stopping
    /// PostgreSQL: it still holds the lock, but `/primary` and `/leader` answer 503 so load
    /// balancers take it out while it stops rather than after the key is released.
    pub handing_over: bool,
    /// Until when the cached DCS view counts as fresh (last successful read + `ttl`).
    pub dcs_fresh_until: Option<Instant>,
    /// Until when the HA loop counts as alive: its next scheduled run + `ttl` on a running
    /// primary, + `2 × ttl` otherwise. `None`: not started yet (liveness fails unless paused).
    pub loop_deadline: Option<Instant>,
    /// `pg_stat_wal_receiver.latest_end_lsn` (replicas).
    pub latest_end_lsn: Option<Lsn>,
    /// The cluster is a standby cluster.
    pub standby_cluster: bool,
    /// `maximum_lag_on_failover` in bytes (default `lag` of `/readiness`).
    pub maximum_lag_on_failover: u64,
    /// The latest DCS view, for `/cluster`, `/history`, `/config` and the cluster optime.
    pub cluster: Option<Arc<ClusterView>>,
    /// Addresses of the cluster's members (resolved by the agent from their `api_url` hosts),
    /// for `restapi.allowlist_include_members`. IP literals in `api_url` are taken from the
    /// view directly and need not be listed.
    pub member_addrs: Vec<IpAddr>,
    /// What `/metrics` shows beyond the status JSON.
    pub metrics: metrics::AgentMetrics,
}

impl ApiSnapshot {
    /// A snapshot of a node that knows nothing yet: PostgreSQL state `unknown`, no lock, no
    /// view. Every health check answers 503.
    pub fn new(scope: &str, name: &str) -> ApiSnapshot {
        ApiSnapshot {
            status: MemberStatus::new(scope, name),
            lease_deadline: None,
            handing_over: false,
            dcs_fresh_until: None,
            loop_deadline: None,
            latest_end_lsn: None,
            standby_cluster: false,
            maximum_lag_on_failover: 1 << 20,
            cluster: None,
            member_addrs: Vec::new(),
            metrics: metrics::AgentMetrics::default(),
        }
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.status.patroni.name
    }

    /// The cluster's name.
    pub fn scope(&self) -> &str {
        &self.status.patroni.scope
    }

    /// The health rules' inputs as of `now`.
    pub fn node_health(&self, now: Instant) -> NodeHealth {
        let s = &self.status;
        let dcs_view_fresh = self.dcs_fresh_until.is_some_and(|t| now < t);
        let (received_lsn, replayed_lsn) = match &s.xlog {
            Some(Xlog::Replica {
                received_location,
                replayed_location,
                ..
            }) => (Some(*received_location), Some(*replayed_location)),
            _ => (None, None),
        };
        NodeHealth {
            holds_lease: !self.handing_over && self.lease_deadline.is_some_and(|t| now < t),
            standby_cluster: self.standby_cluster,
            pg_running: s.state == "running",
            pg_role: PgRole::from_patroni(&s.role),
            replication_state: s.replication_state.clone(),
            received_lsn,
            replayed_lsn,
            latest_end_lsn: self.latest_end_lsn,
            cluster_optime: self.cluster.as_ref().and_then(|c| c.status.optime),
            tags: s.tags.clone(),
            sync: if s.quorum_standby {
                SyncMembership::Quorum
            } else if s.sync_standby {
                SyncMembership::Sync
            } else {
                SyncMembership::None
            },
            dcs_view_fresh,
            paused: s.pause,
            failsafe_active: s.failsafe_mode_is_active,
            loop_healthy: self.loop_deadline.is_some_and(|t| now < t),
            maximum_lag_on_failover: self.maximum_lag_on_failover,
        }
    }
}
