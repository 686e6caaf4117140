//! `POST /switchover`, `POST /failover` and `DELETE /switchover`: the validation of
//! [`pgkeep_core::ha::manual`], a compare-and-swap write of the `/failover` key through the
//! [`Control`](super::control::Control) handle, and for an immediate request a wait for its
//! outcome on the agent's published snapshots.
//!
//! Answers are plain text in Patroni's words (what `patronictl` prints); a body that is not a
//! request at all (not JSON, not an object, unknown keys, too large) gets a JSON error like the
//! rest of the API. Every request that reaches a handler has passed the access check; each one
//! that changes or tries to change the cluster is logged at `info` with the caller's principal
//! and address (never credentials).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use axum::response::Response;
use futures_util::StreamExt;
use pgkeep_core::cluster::FailoverRequest;
use pgkeep_core::ha::manual::{self, Accepted, ManualKind, RequestBody};

use super::auth::Identity;
use super::handlers::{AppState, NO_VIEW, error_response, text_response};
use crate::dcs::{Cas, Expect};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a client may take to send the body once the headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer of a server started without a [`Control`](super::control::Control) handle.
pub(super) const NO_CONTROL: &str = "this server cannot change the cluster";
const WRITE_FAILED: &str = "failed to write failover key into DCS";
const CONFLICT: &str = "the failover key changed concurrently; try again";

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The body, bounded in size and time: 413 over [`MAX_BODY`] (announced by `Content-Length`
/// or counted while reading), 408 when it does not arrive within ten seconds. A request without
/// `Content-Length` and without a chunked body has an empty one.
pub(super) async fn read_body(req: Request) -> Result<Vec<u8>, Response> {
    let too_large = || error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|l| l.trim().parse::<u64>().ok()) {
            None => {
                return Err(error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid Content-Length",
                ));
            }
            Some(n) if n > MAX_BODY as u64 => return Err(too_large()),
            Some(_) => {}
        }
    }
    let mut stream = req.into_body().into_data_stream();
    let read = async {
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                error_response(StatusCode::BAD_REQUEST, "cannot read the request body")
            })?;
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What every state-changing handler starts from: who asks (for the audit line), the handle
/// that may change the cluster, and the bounded request body.
pub(super) struct Mutation {
    pub(super) who: String,
    pub(super) control: std::sync::Arc<dyn super::control::Control>,
    pub(super) body: Vec<u8>,
}

/// The common start of a state-changing request: 503 without a control handle, the body
/// read within its size and time limits.
pub(super) async fn begin(state: &AppState, req: Request) -> Result<Mutation, Response> {
    let who = principal(&req);
    let Some(control) = state.control.clone() else {
        return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, NO_CONTROL));
    };
    let body = read_body(req).await?;
    Ok(Mutation { who, control, body })
}

/// Who the caller is, for audit logs (never a credential).
pub(super) fn principal(req: &Request) -> String {
    req.extensions()
        .get::<Identity>()
        .map_or_else(|| "unidentified".to_owned(), Identity::principal)
}

/// `POST /switchover`.
pub(super) async fn post_switchover(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    post_manual(state, peer, ManualKind::Switchover, req).await
}

/// `POST /failover`.
pub(super) async fn post_failover(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    post_manual(state, peer, ManualKind::Failover, req).await
}

async fn post_manual(
    state: AppState,
    peer: SocketAddr,
    kind: ManualKind,
    req: Request,
) -> Response {
    let Mutation {
        who,
        control,
        body: bytes,
    } = match begin(&state, req).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let body = match RequestBody::from_json(&bytes) {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let snapshot = state.snapshot();
    // Validated against etcd itself: the published view may be a cycle behind (a request
    // cleared a moment ago would otherwise make this write conflict).
    let view = match control.fresh_view().await {
        Some(v) => Arc::new(v),
        None => match snapshot.cluster.clone() {
            Some(v) => v,
            None => return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW),
        },
    };
    let paused = snapshot.status.pause || view.is_paused();
    let accepted = match manual::check_request(kind, &body, &view, now_unix_ms(), paused) {
        Ok(a) => a,
        Err(refusal) => {
            tracing::info!(
                principal = %who,
                peer = %peer.ip(),
                action = kind.noun(),
                leader = ?body.leader,
                candidate = ?body.candidate,
                scheduled_at = ?body.scheduled_at,
                status = refusal.status,
                reason = %refusal.message,
                "REST API: {} request refused", kind.noun()
            );
            return text_response(status(refusal.status), refusal.message);
        }
    };
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        action = accepted.kind.noun(),
        leader = ?accepted.request.leader,
        candidate = ?accepted.request.member,
        scheduled_at = ?accepted.request.scheduled_at,
        "REST API: {} requested", accepted.kind.noun()
    );
    let expect = Expect::unchanged(view.failover.as_ref());
    let revision = match control.put_failover(&accepted.request, expect).await {
        Ok(Cas::Written { revision }) => revision,
        Ok(Cas::Conflict) => return text_response(StatusCode::CONFLICT, CONFLICT),
        Err(e) => {
            tracing::warn!(error = %e, "writing the failover key failed");
            return text_response(StatusCode::SERVICE_UNAVAILABLE, WRITE_FAILED);
        }
    };
    if accepted.is_scheduled() {
        return text_response(StatusCode::ACCEPTED, accepted.scheduled_message());
    }
    let budget = control.wait_budget(manual::wait_secs(&view));
    let (code, text) = wait_for_outcome(&state, &accepted, revision, budget).await;
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        action = accepted.kind.noun(),
        status = code,
        outcome = %text,
        "REST API: {} finished", accepted.kind.noun()
    );
    text_response(status(code), text)
}

/// Follows the published snapshots until [`manual::outcome`] decides or `budget` runs out.
async fn wait_for_outcome(
    state: &AppState,
    accepted: &Accepted,
    revision: i64,
    budget: Duration,
) -> (u16, String) {
    let start = Instant::now();
    let deadline = start + budget;
    let mut rx = state.subscribe();
    loop {
        let snapshot = rx.borrow_and_update().clone();
        if let Some(view) = &snapshot.cluster
            && let Some(done) = manual::outcome(accepted, view, revision)
        {
            return done;
        }
        match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
            Ok(Ok(())) => {}
            // The agent stopped publishing, or time ran out.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let secs = (start.elapsed() + Duration::from_millis(500)).as_secs();
    manual::timed_out(accepted.kind, secs)
}

/// `DELETE /switchover`: clears a scheduled switchover (writes `{}` under compare-and-swap on
/// the key's revision): 200, 404 when none is scheduled, 409 when the key changed meanwhile.
pub(super) async fn delete_switchover(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let who = principal(&req);
    let Some(control) = state.control.clone() else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_CONTROL);
    };
    // From etcd itself: the published view may not show a request written a moment ago.
    let view = match control.fresh_view().await {
        Some(v) => Arc::new(v),
        None => match state.snapshot().cluster.clone() {
            Some(v) => v,
            None => return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW),
        },
    };
    let Some(fo) = view
        .failover
        .as_ref()
        .filter(|f| !f.value.is_empty() && f.value.scheduled_at.is_some())
    else {
        return text_response(StatusCode::NOT_FOUND, "no switchover is scheduled");
    };
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        leader = ?fo.value.leader,
        candidate = ?fo.value.member,
        scheduled_at = ?fo.value.scheduled_at,
        "REST API: deleting the scheduled switchover"
    );
    match control
        .put_failover(
            &FailoverRequest::default(),
            Expect::ModRevision(fo.mod_revision),
        )
        .await
    {
        Ok(Cas::Written { .. }) => text_response(StatusCode::OK, "scheduled switchover deleted"),
        Ok(Cas::Conflict) => text_response(StatusCode::CONFLICT, CONFLICT),
        Err(e) => {
            tracing::warn!(error = %e, "clearing the failover key failed");
            text_response(StatusCode::SERVICE_UNAVAILABLE, WRITE_FAILED)
        }
    }
}
