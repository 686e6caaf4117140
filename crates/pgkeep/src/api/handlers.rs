//! The router and the request handlers. Handlers read the latest [`ApiSnapshot`] and nothing
//! else: no SQL, no etcd read, no file access per request. The state-changing endpoints
//! ([`super::switchover`], [`super::dynconf`], [`super::local`]) go through the [`Control`]
//! handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use axum_server::tls::TlsInfo;
use pgkeep_core::cluster::history_to_json;
use pgkeep_core::health::{self, HealthQuery, QueryError, Verdict};
use tokio::sync::watch;

use super::ApiSnapshot;
use super::auth::{self, AccessPolicy};
use super::control::Control;
use super::json::{cluster_json, error_body};
use super::metrics::{self, RequestStats};
use super::{dynconf, local, switchover};

/// What every handler shares: the access policy, the agent's published state and the handle
/// that may change the cluster.
#[derive(Clone)]
pub(super) struct AppState {
    pub(super) policy: Arc<AccessPolicy>,
    snapshot: watch::Receiver<Arc<ApiSnapshot>>,
    pub(super) control: Option<Arc<dyn Control>>,
    /// Request counts and latencies for `/metrics`.
    pub(super) stats: Arc<RequestStats>,
}

impl AppState {
    pub(super) fn new(
        policy: AccessPolicy,
        snapshot: watch::Receiver<Arc<ApiSnapshot>>,
        control: Option<Arc<dyn Control>>,
    ) -> Self {
        AppState {
            policy: Arc::new(policy),
            snapshot,
            control,
            stats: Arc::new(RequestStats::default()),
        }
    }

    /// The latest published snapshot (an `Arc` clone; the channel's lock is held only for it).
    pub(super) fn snapshot(&self) -> Arc<ApiSnapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver of its own, to wait for the next snapshots.
    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<ApiSnapshot>> {
        self.snapshot.clone()
    }
}

/// The whole application. Protected routes are in their own router whose every route passes
/// [`auth::guard`] (a `route_layer`); everything else is a health check.
pub(super) fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/patroni", get(patroni))
        .route("/cluster", get(cluster))
        .route("/history", get(history))
        .route("/metrics", get(metrics::get_metrics))
        .route(
            "/config",
            get(config)
                .patch(dynconf::patch_config)
                .put(dynconf::put_config),
        )
        .route(
            "/switchover",
            post(switchover::post_switchover).delete(switchover::delete_switchover),
        )
        .route("/failover", post(switchover::post_failover))
        .route(
            "/restart",
            post(local::post_restart).delete(local::delete_restart),
        )
        .route("/reinitialize", post(local::post_reinitialize))
        .route("/reload", post(local::post_reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::guard));
    Router::new()
        .merge(protected)
        .route("/liveness", get(liveness).options(liveness))
        .route("/readiness", get(readiness).options(readiness))
        .fallback(health_check)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// A JSON answer.
pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A plain-text answer (Patroni's state-changing endpoints answer text).
pub(super) fn text_response(status: StatusCode, text: impl Into<String>) -> Response {
    let mut resp = Response::new(Body::from(text.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `{"error": message}` with `status`.
pub(super) fn error_response(status: StatusCode, message: &str) -> Response {
    json_response(status, error_body(message))
}

/// A status code and nothing else (`HEAD`, `OPTIONS`).
fn status_only(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// The minimal body of anonymous health answers: describes nothing.
fn empty_object(status: StatusCode) -> Response {
    json_response(status, b"{}".to_vec())
}

fn verdict_status(v: Verdict) -> StatusCode {
    match v {
        Verdict::Up => StatusCode::OK,
        Verdict::Down => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Whether the method gets a body: `Some(true)` for `GET`, `Some(false)` for `HEAD`/`OPTIONS`,
/// `None` for anything else.
fn wants_body(method: &Method) -> Option<bool> {
    match *method {
        Method::GET => Some(true),
        Method::HEAD | Method::OPTIONS => Some(false),
        _ => None,
    }
}

/// The answer to a query string the health rules refuse: 400, with a JSON error for `GET`.
fn bad_query(e: &QueryError, body: bool) -> Response {
    if body {
        error_response(StatusCode::BAD_REQUEST, &e.to_string())
    } else {
        status_only(StatusCode::BAD_REQUEST)
    }
}

/// Every path without a route: Patroni's generic health check. `GET` answers `{}`, or the full
/// status JSON to a caller that passes the access check; `HEAD`/`OPTIONS` answer the status only.
async fn health_check(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let Some(body) = wants_body(req.method()) else {
        return error_response(StatusCode::NOT_IMPLEMENTED, "unsupported method");
    };
    let query = match HealthQuery::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return bad_query(&e, body),
    };
    let snapshot = state.snapshot();
    let node = snapshot.node_health(Instant::now());
    let status = verdict_status(health::check(req.uri().path(), &node, &query));
    if !body {
        return status_only(status);
    }
    let tls = req.extensions().get::<Arc<TlsInfo>>();
    let presented = req
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION)
        || tls.is_some_and(|t| !t.peer_certificates.is_empty());
    // Credentials are checked only when some were presented. A failure is logged like one on
    // a protected endpoint (the body would otherwise be a silent password oracle).
    let identified = presented
        && match auth::check_request(&state, peer.ip(), req.headers(), tls) {
            Ok(_) => true,
            Err(denied) => {
                // A wrong password is worth a line (guessing through health checks); a load
                // balancer presenting only its client certificate is not, once per check.
                if req
                    .headers()
                    .contains_key(axum::http::header::AUTHORIZATION)
                {
                    tracing::info!(
                        peer = %peer.ip(),
                        path = %req.uri().path(),
                        reason = denied.message(),
                        "REST API credentials refused on a health check; answering anonymously"
                    );
                } else {
                    tracing::debug!(
                        peer = %peer.ip(),
                        path = %req.uri().path(),
                        reason = denied.message(),
                        "REST API client certificate not accepted on a health check; answering anonymously"
                    );
                }
                false
            }
        };
    if identified {
        status_json(status, &snapshot)
    } else {
        empty_object(status)
    }
}

fn status_json(status: StatusCode, snapshot: &ApiSnapshot) -> Response {
    match serde_json::to_vec(&snapshot.status) {
        Ok(body) => json_response(status, body),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise the status JSON");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// `/liveness`: the HA loop runs (or the cluster is paused).
async fn liveness(State(state): State<AppState>, method: Method) -> Response {
    let node = state.snapshot().node_health(Instant::now());
    let status = verdict_status(health::liveness(&node));
    if method == Method::GET {
        empty_object(status)
    } else {
        status_only(status)
    }
}

/// `/readiness`: the lock holder, or a streaming replica within `lag`.
async fn readiness(State(state): State<AppState>, req: Request) -> Response {
    let body = req.method() == Method::GET;
    let query = match HealthQuery::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return bad_query(&e, body),
    };
    let node = state.snapshot().node_health(Instant::now());
    let status = match health::readiness(&node, &query) {
        Ok(()) => StatusCode::OK,
        Err(reason) => {
            tracing::debug!(%reason, "readiness check failed");
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    if body {
        empty_object(status)
    } else {
        status_only(status)
    }
}

/// `GET /patroni`: the status JSON, always 200. A standby's WAL positions are read live (see
/// [`Control::live_positions`]), and when a restart is pending, which parameters wait for it
/// (`pending_restart_reason`, see [`Control::pending_restart`]).
async fn patroni(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot();
    let Some(control) = &state.control else {
        return status_json(StatusCode::OK, &snapshot);
    };
    let live = async {
        match &snapshot.status.xlog {
            Some(super::Xlog::Replica { .. }) => control.live_positions().await,
            _ => None,
        }
    };
    let pending = async {
        if snapshot.status.pending_restart {
            control.pending_restart().await
        } else {
            None
        }
    };
    let (live, pending) = tokio::join!(live, pending);
    if live.is_none() && pending.is_none() {
        return status_json(StatusCode::OK, &snapshot);
    }
    let mut fresh = ApiSnapshot::clone(&snapshot);
    if let Some(live) = live
        && let Some(super::Xlog::Replica {
            received_location,
            replayed_location,
            ..
        }) = &mut fresh.status.xlog
    {
        *received_location = (*received_location).max(live.received);
        *replayed_location = (*replayed_location).max(live.replayed);
    }
    if let Some(reasons) = pending
        && !reasons.is_empty()
    {
        fresh.status.pending_restart_reason = serde_json::to_value(&reasons).ok();
    }
    status_json(StatusCode::OK, &fresh)
}

pub(super) const NO_VIEW: &str = "no view of the DCS yet";

/// `GET /cluster`: members, roles and lags from the cached DCS view.
async fn cluster(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot();
    match &snapshot.cluster {
        Some(view) => match serde_json::to_vec(&cluster_json(view, snapshot.scope())) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        },
        None => error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW),
    }
}

/// `GET /history`: the timeline history (`[]` on timeline 1).
async fn history(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot();
    match &snapshot.cluster {
        Some(view) => {
            let body = view
                .history
                .as_deref()
                .map_or_else(|| "[]".to_owned(), history_to_json);
            json_response(StatusCode::OK, body.into_bytes())
        }
        None => error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW),
    }
}

/// `GET /config`: the dynamic configuration; 502 when the key is missing or invalid.
async fn config(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot();
    match snapshot.cluster.as_ref().and_then(|v| v.config.as_ref()) {
        Some(cfg) => dynconf::config_response(&cfg.value, Some(cfg.mod_revision)),
        None => error_response(
            StatusCode::BAD_GATEWAY,
            "the DCS holds no valid configuration",
        ),
    }
}

/// A known path with a method it does not support.
async fn method_not_allowed(req: Request) -> Response {
    let allow = match req.uri().path() {
        "/liveness" | "/readiness" => "GET, HEAD, OPTIONS",
        "/switchover" | "/restart" => "POST, DELETE",
        "/failover" | "/reinitialize" | "/reload" => "POST",
        "/config" => "GET, HEAD, PATCH, PUT",
        _ => "GET, HEAD",
    };
    let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}
