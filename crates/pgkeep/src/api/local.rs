//! `POST /restart`, `DELETE /restart`, `POST /reinitialize` and `POST /reload`: requests for the
//! local node, handed to the agent's loop through the [`Control`](super::Control) handle.
//!
//! | request | answers (plain text, Patroni's words) |
//! |---|---|
//! | `POST /restart` `{"restart_pending"?, "role"?, "postgres_version"?, "timeout"?}` | 200 `restarted successfully` once PostgreSQL runs again; 503 `restart conditions are not satisfied` (a filter does not match, or PostgreSQL is not running), `postgres is still starting`, `restart already in progress`, `restart failed...`; 400 for `schedule` (scheduled restarts are not supported) and unknown keys |
//! | `DELETE /restart` | 404 `no restarts are scheduled` (pgkeep schedules none) |
//! | `POST /reinitialize` `{"force"?, "from_leader"?}` | 200 `reinitialize started`; 503 `Cluster has no leader, can not reinitialize`, `I am the leader, can not reinitialize`, `... already in progress` |
//! | `POST /reload` | 202 `reload scheduled` (the local configuration file is re-read, as on SIGHUP) |
//!
//! Filters of `POST /restart`, as in Patroni: `role` (`primary`, `master`, `replica`,
//! `standby_leader`) must be this node's role; `postgres_version` (`15.4`, `9.6.3`) restarts only
//! a server running an older version; `restart_pending: true` only a server with a change that
//! waits for a restart. `timeout` (seconds, > 0) bounds how long the request waits for PostgreSQL
//! to come back (Patroni uses it as the primary's start timeout for this restart); the default is
//! two minutes. Bodies with unknown keys or values of the wrong type are refused (400; Patroni
//! ignores unknown keys). Every request is logged at `info` with the caller's principal and
//! address.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value};

use super::control::{LocalRequest, RequestOutcome};
use super::handlers::{AppState, NO_VIEW, error_response, text_response};
use super::switchover::{Mutation, begin};

/// How long a reinitialize or reload request waits for the agent to take it.
const ACCEPT_WAIT: Duration = Duration::from_secs(30);

/// The body of `POST /restart`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestartBody {
    /// Restart only when a changed parameter waits for a restart.
    pub restart_pending: bool,
    /// Restart only in this role (`primary` or `replica`).
    pub role: Option<String>,
    /// Restart only when the server runs an older version than this (`server_version_num`).
    pub postgres_version: Option<u32>,
    /// How long to wait for PostgreSQL to come back.
    pub timeout: Option<Duration>,
}

/// `15.4` → 150004, `9.6.3` → 90603, `16` → 160000 (Patroni's `postgres_version_to_int`).
pub fn version_number(text: &str) -> Option<u32> {
    let parts: Vec<u32> = text
        .trim()
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [major] if *major >= 10 => Some(major * 10_000),
        [major, minor] if *major >= 10 => Some(major * 10_000 + minor),
        [9, minor, patch] => Some(90_000 + minor * 100 + patch),
        [9, minor] => Some(90_000 + minor * 100),
        _ => None,
    }
}

impl RestartBody {
    /// Parses a body (empty means no filter). Errors are the 400 answer's text.
    pub fn parse(bytes: &[u8]) -> Result<RestartBody, String> {
        let mut b = RestartBody::default();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(b);
        }
        let map: Map<String, Value> = match serde_json::from_slice(bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err("the request body must be a JSON object".into()),
            Err(e) => return Err(format!("invalid JSON: {e}")),
        };
        for (key, v) in &map {
            match (key.as_str(), v) {
                (_, Value::Null) => {}
                ("schedule", _) => {
                    return Err(
                        "schedule: scheduled restarts are not supported by pgkeep; restart now \
                         (schedule it with cron or a systemd timer calling `pgkeep ctl restart`)"
                            .into(),
                    );
                }
                ("restart_pending", Value::Bool(p)) => b.restart_pending = *p,
                ("role", Value::String(r)) => {
                    b.role = Some(match r.as_str() {
                        "primary" | "master" => "primary".to_owned(),
                        "replica" => "replica".to_owned(),
                        "standby_leader" => "standby_leader".to_owned(),
                        _ => {
                            return Err(format!(
                                "PostgreSQL role should be primary or replica, not {r:?}"
                            ));
                        }
                    })
                }
                ("postgres_version", Value::String(s)) => {
                    b.postgres_version = Some(version_number(s).ok_or_else(|| {
                        format!("postgres_version: {s:?} is not a PostgreSQL version")
                    })?)
                }
                ("timeout", t) => {
                    let secs = match t {
                        Value::Number(n) => n.as_f64(),
                        Value::String(s) => s.trim().trim_end_matches('s').parse().ok(),
                        _ => None,
                    }
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                    .ok_or("timeout: expected a number of seconds between 0 and 3600")?;
                    b.timeout = Some(Duration::from_secs_f64(secs));
                }
                ("restart_pending" | "role" | "postgres_version", _) => {
                    return Err(format!("{key}: wrong type"));
                }
                _ => {
                    return Err(format!(
                        "unknown key {key:?}; expected restart_pending, role, postgres_version and timeout"
                    ));
                }
            }
        }
        Ok(b)
    }
}

/// The body of `POST /reinitialize`.
fn reinit_body(bytes: &[u8]) -> Result<(bool, bool), String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((false, false));
    }
    let map: Map<String, Value> = match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("the request body must be a JSON object".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let (mut force, mut from_leader) = (false, false);
    for (key, v) in &map {
        let flag = match v {
            Value::Bool(b) => *b,
            Value::Null => false,
            _ => return Err(format!("{key} must be true or false")),
        };
        match key.as_str() {
            "force" => force = flag,
            "from_leader" | "from-leader" => from_leader = flag,
            _ => {
                return Err(format!(
                    "unknown key {key:?}; expected force and from_leader"
                ));
            }
        }
    }
    Ok((force, from_leader))
}

/// The answer to the agent's outcome of `request`: `ok` with `ok_text` when done or accepted,
/// 503 otherwise.
fn outcome_response(
    request: LocalRequest,
    outcome: RequestOutcome,
    ok: StatusCode,
    ok_text: &str,
) -> Response {
    match outcome {
        RequestOutcome::Done | RequestOutcome::Accepted => text_response(ok, ok_text),
        RequestOutcome::Refused(m) => text_response(StatusCode::SERVICE_UNAVAILABLE, m),
        RequestOutcome::Failed(m) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} failed: {m}", request.noun()),
        ),
    }
}

/// `POST /restart`.
pub(super) async fn post_restart(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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
    let body = match RestartBody::parse(&bytes) {
        Ok(b) => b,
        Err(e) => return text_response(StatusCode::BAD_REQUEST, e),
    };
    let snapshot = state.snapshot();
    let status = &snapshot.status;
    let refuse = |why: &str| {
        tracing::info!(
            principal = %who,
            peer = %peer.ip(),
            reason = why,
            "REST API: restart refused",
        );
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("restart conditions are not satisfied: {why}"),
        )
    };
    if status.state == "starting" {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres is still starting",
        );
    }
    if status.state != "running" {
        return refuse(&format!("PostgreSQL is {}", status.state));
    }
    if let Some(role) = &body.role
        && *role != status.role
    {
        return refuse(&format!("the role is {}, not {role}", status.role));
    }
    if let Some(v) = body.postgres_version
        && status.server_version.is_none_or(|running| running >= v)
    {
        return refuse("the server does not run an older version");
    }
    if body.restart_pending {
        let pending = match control.pending_restart().await {
            Some(reasons) => !reasons.is_empty(),
            None => status.pending_restart,
        };
        if !pending {
            return refuse("no restart is pending");
        }
    }
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        role = %status.role,
        "REST API: restart requested",
    );
    let wait = control.restart_wait(body.timeout);
    let resp = match tokio::time::timeout(wait, control.request(LocalRequest::Restart)).await {
        Ok(Ok(outcome)) => outcome_response(
            LocalRequest::Restart,
            outcome,
            StatusCode::OK,
            "restarted successfully",
        ),
        Ok(Err(e)) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("restart failed: {e}"),
        ),
        Err(_) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "restart failed: PostgreSQL was not back within {} s; it may still be in progress",
                wait.as_secs()
            ),
        ),
    };
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        status = resp.status().as_u16(),
        "REST API: restart finished",
    );
    resp
}

/// `DELETE /restart`: pgkeep schedules no restarts.
pub(super) async fn delete_restart() -> Response {
    text_response(StatusCode::NOT_FOUND, "no restarts are scheduled")
}

/// `POST /reinitialize`.
pub(super) async fn post_reinitialize(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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
    let (force, from_leader) = match reinit_body(&bytes) {
        Ok(f) => f,
        Err(e) => return text_response(StatusCode::BAD_REQUEST, e),
    };
    let snapshot = state.snapshot();
    let Some(view) = snapshot.cluster.clone() else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, NO_VIEW);
    };
    let refusal = match &view.leader {
        None => Some("Cluster has no leader, can not reinitialize"),
        Some(l) if l.name == snapshot.name() => Some("I am the leader, can not reinitialize"),
        Some(_) => None,
    };
    if let Some(r) = refusal {
        tracing::info!(
            principal = %who,
            peer = %peer.ip(),
            reason = r,
            "REST API: reinitialize refused",
        );
        return text_response(StatusCode::SERVICE_UNAVAILABLE, r);
    }
    tracing::info!(
        principal = %who,
        peer = %peer.ip(),
        force,
        from_leader,
        "REST API: reinitialize requested",
    );
    let request = LocalRequest::Reinitialize { force, from_leader };
    match tokio::time::timeout(ACCEPT_WAIT, control.request(request)).await {
        Ok(Ok(outcome)) => {
            outcome_response(request, outcome, StatusCode::OK, "reinitialize started")
        }
        Ok(Err(e)) => text_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not take the request in time",
        ),
    }
}

/// `POST /reload`.
pub(super) async fn post_reload(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let Mutation { who, control, .. } = match begin(&state, req).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    tracing::info!(principal = %who, peer = %peer.ip(), "REST API: reload requested");
    match tokio::time::timeout(ACCEPT_WAIT, control.request(LocalRequest::Reload)).await {
        Ok(Ok(outcome)) => outcome_response(
            LocalRequest::Reload,
            outcome,
            StatusCode::ACCEPTED,
            "reload scheduled",
        ),
        Ok(Err(e)) => text_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not take the request in time",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_like_patroni() {
        assert_eq!(version_number("15.4"), Some(150004));
        assert_eq!(version_number("16"), Some(160000));
        assert_eq!(version_number("9.6.3"), Some(90603));
        assert_eq!(version_number("9.6"), Some(90600));
        assert_eq!(version_number("x"), None);
        assert_eq!(version_number("8"), None);
    }

    #[test]
    fn restart_bodies() {
        assert_eq!(RestartBody::parse(b"").unwrap(), RestartBody::default());
        let b = RestartBody::parse(
            br#"{"restart_pending": true, "role": "master", "postgres_version": "16.1", "timeout": 30}"#,
        )
        .unwrap();
        assert!(b.restart_pending);
        assert_eq!(b.role.as_deref(), Some("primary"));
        assert_eq!(b.postgres_version, Some(160001));
        assert_eq!(b.timeout, Some(Duration::from_secs(30)));
        for (body, needle) in [
            (
                &br#"{"schedule": "2026-01-01T00:00:00Z"}"#[..],
                "not supported",
            ),
            (br#"{"bogus": 1}"#, "unknown key"),
            (br#"{"role": "boss"}"#, "role"),
            (br#"{"timeout": -1}"#, "timeout"),
            (br#"{"restart_pending": "yes"}"#, "wrong type"),
            (br#"[1]"#, "JSON object"),
        ] {
            let e = RestartBody::parse(body).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn reinitialize_bodies() {
        assert_eq!(reinit_body(b"").unwrap(), (false, false));
        assert_eq!(
            reinit_body(br#"{"force": true, "from_leader": true}"#).unwrap(),
            (true, true)
        );
        assert!(reinit_body(br#"{"force": "yes"}"#).is_err());
        assert!(reinit_body(br#"{"other": true}"#).is_err());
    }
}
