//! Calling etcd: per-call time budgets, retries of transient failures, error classification, and
//! rendering of etcd-client's error chains (which stop at `etcd_client::Error`).

use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::DcsError;

/// gRPC status codes (numeric, so tonic need not be a direct dependency).
mod code {
    pub(super) const INVALID_ARGUMENT: i32 = 3;
    pub(super) const NOT_FOUND: i32 = 5;
    pub(super) const ALREADY_EXISTS: i32 = 6;
    pub(super) const PERMISSION_DENIED: i32 = 7;
    pub(super) const FAILED_PRECONDITION: i32 = 9;
    pub(super) const OUT_OF_RANGE: i32 = 11;
    pub(super) const UNIMPLEMENTED: i32 = 12;
    pub(super) const UNAUTHENTICATED: i32 = 16;
}

/// What to do about an etcd error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Connection trouble, no leader, overload, timeouts: try again while the budget lasts.
    Transient,
    /// The lease of the request does not exist.
    LeaseNotFound,
    /// etcd refused; retrying will not help.
    Permanent,
}

/// Classifies an etcd error.
pub(crate) fn classify(e: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let c = i32::from(status.code());
            if c == code::NOT_FOUND && status.message().contains("lease not found") {
                Class::LeaseNotFound
            } else if status.message().contains("revision of auth store is old") {
                // The auth store changed (a user or role was added) between the request being
                // stamped and applied: the same request succeeds when sent again.
                Class::Transient
            } else if matches!(
                c,
                code::INVALID_ARGUMENT
                    | code::NOT_FOUND
                    | code::ALREADY_EXISTS
                    | code::PERMISSION_DENIED
                    | code::FAILED_PRECONDITION
                    | code::OUT_OF_RANGE
                    | code::UNIMPLEMENTED
                    | code::UNAUTHENTICATED
            ) {
                Class::Permanent
            } else {
                // Unavailable ("no leader", "leader changed", connection refused), deadline
                // exceeded, cancelled, unknown (h2 resets), resource exhausted, internal.
                Class::Transient
            }
        }
        E::InvalidArgs(_)
        | E::InvalidUri(_)
        | E::InvalidMetadataValue(_)
        | E::Utf8Error(_)
        | E::EndpointsNotManaged => Class::Permanent,
        _ => Class::Transient,
    }
}

/// The whole error chain on one line. etcd-client's error does not expose its source, so the
/// chain below a gRPC status or a transport error is walked by hand; without it a TLS problem
/// shows only as "transport error".
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    let (mut out, mut next) = match e {
        E::GRpcStatus(status) => {
            let mut s = format!("grpc status {:?}", status.code());
            if !status.message().is_empty() {
                s.push_str(": ");
                s.push_str(status.message());
            }
            (s, status.source())
        }
        E::TransportError(t) => (format!("transport error: {t}"), t.source()),
        E::IoError(io) => (format!("io error: {io}"), io.source()),
        other => (other.to_string(), None),
    };
    while let Some(cause) = next {
        let text = cause.to_string();
        // Layers often repeat their cause's message; print each distinct text once.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The time limits of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// The whole call, retries included.
    pub(crate) total: Duration,
    /// One attempt, so that a hung endpoint leaves time to try another.
    pub(crate) attempt: Duration,
}

impl Budget {
    /// Splits `total` over the endpoints the way Patroni does (at least 1 s per attempt, and at
    /// least two attempts' worth of time even with one endpoint).
    pub(crate) fn new(total: Duration, endpoints: usize) -> Budget {
        let share = u32::try_from(endpoints.max(2)).unwrap_or(u32::MAX);
        Budget {
            total,
            attempt: (total / share).max(Duration::from_secs(1)).min(total),
        }
    }
}

/// Runs `attempt` until it succeeds, fails permanently, or the budget is spent. Transient
/// failures are retried with a short backoff (50 ms doubling to 500 ms). `attempt` receives the
/// attempt number, starting at 1, so writes can recognise their own earlier, unanswered attempt.
pub(crate) async fn call<T, F, Fut>(
    op: &'static str,
    budget: Budget,
    lease: Option<i64>,
    attempt: F,
) -> Result<T, DcsError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    call_with(op, budget, lease, &|| {}, attempt).await
}

/// [`call`], running `on_timeout` after an attempt that timed out (before the next attempt):
/// the client's balancer may keep sending to a member that accepts connections but never
/// answers (frozen), so the caller can make it open new connections.
pub(crate) async fn call_with<T, F, Fut>(
    op: &'static str,
    budget: Budget,
    lease: Option<i64>,
    on_timeout: &(dyn Fn() + Sync),
    mut attempt: F,
) -> Result<T, DcsError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + budget.total;
    let mut backoff = Duration::from_millis(50);
    let mut last: Option<etcd_client::Error> = None;
    let mut last_timed_out = false;
    for n in 1u32.. {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        match tokio::time::timeout(remaining.min(budget.attempt), attempt(n)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => match classify(&e) {
                Class::Transient => {
                    tracing::debug!(op, attempt = n, error = %describe(&e), "etcd call failed, retrying");
                    last = Some(e);
                    last_timed_out = false;
                }
                Class::LeaseNotFound => {
                    return Err(DcsError::LeaseNotFound {
                        lease: lease.unwrap_or(0),
                    });
                }
                Class::Permanent => {
                    return Err(DcsError::Refused {
                        op,
                        detail: describe(&e),
                        source: e,
                    });
                }
            },
            Err(_elapsed) => {
                tracing::debug!(op, attempt = n, timeout = ?budget.attempt, "etcd call timed out, retrying");
                last_timed_out = true;
                on_timeout();
            }
        }
        if Instant::now() + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
    Err(match last {
        Some(e) if !last_timed_out => DcsError::Unavailable {
            op,
            detail: describe(&e),
            source: Some(e),
        },
        last => DcsError::Timeout {
            op,
            budget: budget.total,
            last_error: last.as_ref().map(describe),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unavailable() -> etcd_client::Error {
        etcd_client::Error::WatchError("stream closed".into())
    }

    #[test]
    fn budget_is_split_over_endpoints_with_a_floor() {
        let b = Budget::new(Duration::from_secs(9), 3);
        assert_eq!(b.attempt, Duration::from_secs(3));
        let b = Budget::new(Duration::from_secs(10), 1);
        assert_eq!(b.attempt, Duration::from_secs(5));
        let b = Budget::new(Duration::from_secs(2), 5);
        assert_eq!(b.attempt, Duration::from_secs(1));
        let b = Budget::new(Duration::from_millis(300), 3);
        assert_eq!(b.attempt, Duration::from_millis(300));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&unavailable()), Class::Transient);
        assert_eq!(
            classify(&etcd_client::Error::InvalidArgs("x".into())),
            Class::Permanent
        );
        let old_auth = tonic::Status::invalid_argument("etcdserver: revision of auth store is old");
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(old_auth)),
            Class::Transient
        );
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(denied)),
            Class::Permanent
        );
        assert_eq!(
            describe(&etcd_client::Error::LeaseKeepAliveError("x".into())),
            "lease keep alive error: x"
        );
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let n = Arc::new(AtomicU32::new(0));
        let budget = Budget::new(Duration::from_secs(2), 3);
        let got = call("t", budget, None, |attempt| {
            let n = n.clone();
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if attempt < 3 {
                    Err(unavailable())
                } else {
                    Ok(attempt)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let n = Arc::new(AtomicU32::new(0));
        let budget = Budget::new(Duration::from_secs(2), 3);
        let err = call::<(), _, _>("t", budget, None, |_| {
            let n = n.clone();
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                Err(etcd_client::Error::InvalidArgs("bad".into()))
            }
        })
        .await
        .unwrap_err();
        assert!(matches!(err, DcsError::Refused { op: "t", .. }), "{err}");
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_budget_bounds_the_call() {
        let start = Instant::now();
        let budget = Budget::new(Duration::from_millis(400), 3);
        let err = call::<(), _, _>("t", budget, None, |_| async { Err(unavailable()) })
            .await
            .unwrap_err();
        assert!(matches!(err, DcsError::Unavailable { .. }), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let err = call::<(), _, _>("hang", budget, None, |_| std::future::pending())
            .await
            .unwrap_err();
        assert!(matches!(err, DcsError::Timeout { op: "hang", .. }), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
