//! `PATCH /config` and `PUT /config`: changing the dynamic configuration.
//!
//! `PATCH` merges the body into the current configuration (a JSON merge patch as in Patroni:
//! `null` deletes a key), `PUT` replaces it. Either way the resulting configuration must pass
//! [`pgkeep_core::ops::check_config`] with this node's dynamic-parameter allowlist **before**
//! anything is written: an edit that adds or changes a key the agents would drop (one that could
//! run code, name files or weaken security, an unknown key, a malformed or unsafe value, unsafe
//! timing) is refused with **422** and a JSON body naming every offending key:
//!
//! ```json
//! {"error": "configuration refused: postgresql.parameters.archive_command: ...",
//!  "refused": [{"key": "postgresql.parameters.archive_command", "reason": "...", "security": true}]}
//! ```
//!
//! Patroni writes such a configuration and lets every node ignore what it cannot use; pgkeep
//! refuses instead, so what the DCS holds is what the cluster runs with.
//!
//! The write is a compare-and-swap on the `mod_revision` of the configuration that was merged
//! into (or replaced): **409** when the key changed meanwhile. A client may pin the revision it
//! saw with `If-Match: "<mod_revision>"` (the `ETag` of `GET /config` and of these answers; a
//! pgkeep extension, what `pgkeep ctl edit-config` uses): 409 when the key is at another revision.
//! Answers: **200** with the configuration as written (`PUT` of an identical configuration
//! writes nothing), **503** `PATCH` without a configuration to patch, **503**/**502** when the
//! write failed (`PATCH`/`PUT`, as in Patroni). Every attempt is logged at `info` with the
//! caller's principal, address and the changed key paths (never values).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{ETAG, HeaderValue, IF_MATCH};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use pgkeep_core::ops::{self, Refusal};
use serde_json::{Map, Value, json};

use super::handlers::{AppState, NO_VIEW, error_response, json_response};
use super::switchover::{Mutation, begin};
use crate::dcs::{Cas, Expect};

/// Which method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Patch,
    Put,
}

impl Mode {
    fn method(self) -> &'static str {
        match self {
            Mode::Patch => "PATCH",
            Mode::Put => "PUT",
        }
    }
}

const NO_CONFIG: &str = "the DCS holds no valid configuration";
const CONFLICT: &str = "the configuration changed concurrently; read it again and retry";

/// `PATCH /config`.
pub(super) async fn patch_config(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    write_config(state, peer, req, Mode::Patch).await
}

/// `PUT /config`.
pub(super) async fn put_config(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    write_config(state, peer, req, Mode::Put).await
}

/// The revision an `If-Match` header pins: `"<n>"`, `W/"<n>"` or a bare number; `*` pins
/// nothing.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, &'static str> {
    let Some(v) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<i64>()
        .map(Some)
        .map_err(|_| "If-Match must name a configuration revision, e.g. \"42\"")
}

/// A JSON answer with the configuration and its revision as `ETag`.
pub(super) fn config_response(config: &Map<String, Value>, revision: Option<i64>) -> Response {
    let body = serde_json::to_vec(config).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = json_response(StatusCode::OK, body);
    if let Some(rev) = revision
        && let Ok(v) = HeaderValue::from_str(&format!("\"{rev}\""))
    {
        resp.headers_mut().insert(ETAG, v);
    }
    resp
}

/// The 422 answer naming every refused key.
fn refused_response(refusals: &[Refusal]) -> Response {
    let text: Vec<String> = refusals.iter().map(ToString::to_string).collect();
    let body = json!({
        "error": format!("configuration refused: {}", text.join("; ")),
        "refused": refusals
            .iter()
            .map(|r| json!({"key": r.key, "reason": r.reason, "security": r.security}))
            .collect::<Vec<_>>(),
    });
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

async fn write_config(state: AppState, peer: SocketAddr, req: Request, mode: Mode) -> Response {
    let pinned = match if_match(req.headers()) {
        Ok(p) => p,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e),
    };
    let Mutation {
        who,
        control,
        body: bytes,
    } = match begin(&state, req).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let body: Map<String, Value> = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object",
            );
        }
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    let snapshot = state.snapshot();
    let Some(view) = snapshot.cluster.clone() else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW);
    };
    let current = view.config.as_ref();
    if let Some(rev) = pinned
        && current.map(|c| c.mod_revision) != Some(rev)
    {
        return error_response(StatusCode::CONFLICT, CONFLICT);
    }
    let proposed = match (mode, current) {
        (Mode::Patch, None) => return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_CONFIG),
        (Mode::Patch, Some(c)) => {
            let mut merged = c.value.clone();
            ops::merge_patch(&mut merged, &body);
            merged
        }
        (Mode::Put, _) => body,
    };
    let empty = Map::new();
    let changed = ops::changed_paths(current.map_or(&empty, |c| &c.value), &proposed);
    if changed.is_empty()
        && let Some(c) = current
    {
        return config_response(&c.value, Some(c.mod_revision));
    }
    if let Err(refusals) = ops::check_config(
        current.map(|c| &c.value),
        &proposed,
        &control.dynamic_allowlist(),
    ) {
        let keys: Vec<&str> = refusals.iter().map(|r| r.key.as_str()).collect();
        let security = refusals.iter().any(|r| r.security);
        if security {
            tracing::warn!(
                security = true,
                principal = %who,
                peer = %peer.ip(),
                method = mode.method(),
                refused = ?keys,
                "REST API: configuration change refused: it sets keys that could run code or weaken security"
            );
        } else {
            tracing::info!(
                principal = %who,
                peer = %peer.ip(),
                method = mode.method(),
                refused = ?keys,
                "REST API: configuration change refused"
            );
        }
        return refused_response(&refusals);
    }
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        method = mode.method(),
        changed = ?changed,
        "REST API: configuration change requested"
    );
    match control
        .put_config(&proposed, Expect::unchanged(current))
        .await
    {
        Ok(Cas::Written { revision }) => {
            tracing::info!(principal = %who, revision, "REST API: configuration written");
            config_response(&proposed, Some(revision))
        }
        Ok(Cas::Conflict) => error_response(StatusCode::CONFLICT, CONFLICT),
        Err(e) => {
            tracing::warn!(error = %e, "writing the configuration failed");
            let code = match mode {
                Mode::Patch => StatusCode::SERVICE_UNAVAILABLE,
                Mode::Put => StatusCode::BAD_GATEWAY,
            };
            error_response(code, "failed to write the configuration into DCS")
        }
    }
}
