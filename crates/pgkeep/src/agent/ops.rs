//! Requests from the REST API for this node (`POST /restart`, `/reinitialize`, `/reload`), as
//! the agent's loop takes them, and applying dynamic parameter changes to PostgreSQL.
//!
//! A request arrives through a channel ([`Envelope`]) in the loop's sleep. Restart and
//! reinitialize set the core's [`LocalRequests`](pgkeep_core::ha::LocalRequests) flag and wake the
//! loop at once; the core decides whether and when to act (a running replica restarts, the leader
//! restarts its primary in place, a replica re-clones). The flag is cleared once the action was
//! carried out ([`Shell::request_acted`]): after `Restart`, or once the clone of a reinitialize
//! runs in the background. A request the core does not act on within [`REQUEST_EXPIRY`] (or a
//! restart whose caller stopped waiting) is dropped, so a stale flag never fires later by
//! surprise. Only one restart or reinitialize request is open at a time.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pgkeep_core::ha::{Action, LongOperation};
use pgkeep_core::policy::{GucName, Parameters};
use tokio::sync::oneshot;

use super::Shell;
use crate::api::{LocalRequest, RequestOutcome};

/// How long a restart or reinitialize request may wait for the core to act on it.
pub(super) const REQUEST_EXPIRY: Duration = Duration::from_secs(120);

/// A request from the REST API and where its answer goes.
#[derive(Debug)]
pub(super) struct Envelope {
    /// What is asked.
    pub(super) request: LocalRequest,
    /// The answer.
    pub(super) reply: oneshot::Sender<RequestOutcome>,
}

/// An accepted request the core has not acted on yet.
#[derive(Debug)]
struct Open {
    request: LocalRequest,
    since: Instant,
    /// The postmaster's PID when the request was accepted: a restart must change it.
    postmaster: Option<i32>,
    /// Restart: the caller waits for the outcome.
    reply: Option<oneshot::Sender<RequestOutcome>>,
}

/// The agent's side of the operator requests.
#[derive(Debug)]
pub(super) struct Ops {
    open: Option<Open>,
    /// The dynamic-parameter allowlist, shared with the REST API's `PATCH /config` check.
    allowlist: Arc<RwLock<BTreeSet<GucName>>>,
    /// The dynamic parameters last written to the configuration files.
    applied: Parameters,
}

impl Ops {
    /// `allowlist` is shared with the [`AgentControl`](super::control::AgentControl);
    /// `applied` are the dynamic parameters the files are rendered with at start.
    pub(super) fn new(allowlist: Arc<RwLock<BTreeSet<GucName>>>, applied: Parameters) -> Ops {
        Ops {
            open: None,
            allowlist,
            applied,
        }
    }
}

fn busy_noun(op: LongOperation) -> &'static str {
    match op {
        LongOperation::Initdb => "bootstrap",
        LongOperation::Clone => "reinitialize",
        LongOperation::Rewind => "rewind",
    }
}

impl Shell {
    /// A request from the REST API arrived (the loop then runs a cycle at once).
    pub(super) fn accept_request(&mut self, env: Envelope, config_path: &Path) {
        let Envelope { request, reply } = env;
        tracing::info!(request = request.noun(), "operator request");
        if let LocalRequest::Reload = request {
            self.reload(config_path);
            let _ = reply.send(RequestOutcome::Done);
            return;
        }
        let refuse = |reply: oneshot::Sender<RequestOutcome>, why: String| {
            tracing::info!(request = request.noun(), reason = %why, "operator request refused");
            let _ = reply.send(RequestOutcome::Refused(why));
        };
        if self.requests.shutdown {
            return refuse(reply, "the agent is shutting down".into());
        }
        if let Some(b) = &self.busy {
            return refuse(reply, format!("{} already in progress", busy_noun(b.op)));
        }
        let force = matches!(request, LocalRequest::Reinitialize { force: true, .. });
        if let Some(open) = &self.ops.open {
            if !force {
                return refuse(
                    reply,
                    format!("{} already in progress", open.request.noun()),
                );
            }
            self.drop_open("replaced by a forced reinitialize");
        }
        let reply = match request {
            LocalRequest::Restart => {
                self.requests.restart = true;
                Some(reply)
            }
            LocalRequest::Reinitialize { from_leader, .. } => {
                self.requests.reinitialize = true;
                self.requests.reinitialize_from_leader = from_leader;
                let _ = reply.send(RequestOutcome::Accepted);
                None
            }
            LocalRequest::Reload => None,
        };
        self.ops.open = Some(Open {
            request,
            since: Instant::now(),
            postmaster: self.postmaster_pid(),
            reply,
        });
    }

    /// Clears the flags of the open request and tells its caller why, if it still waits.
    fn drop_open(&mut self, why: &str) {
        let Some(open) = self.ops.open.take() else {
            return;
        };
        self.clear_flags(open.request);
        tracing::info!(
            request = open.request.noun(),
            reason = why,
            "operator request dropped"
        );
        if let Some(reply) = open.reply {
            let _ = reply.send(RequestOutcome::Failed(why.to_owned()));
        }
    }

    fn clear_flags(&mut self, request: LocalRequest) {
        match request {
            LocalRequest::Restart => self.requests.restart = false,
            LocalRequest::Reinitialize { .. } => {
                self.requests.reinitialize = false;
                self.requests.reinitialize_from_leader = false;
            }
            LocalRequest::Reload => {}
        }
    }

    /// After an action of a decision was executed: a restart or reinitialize request it carried
    /// out is closed (its flag cleared, its caller answered).
    pub(super) fn request_acted(&mut self, action: &Action) {
        let Some(open) = &self.ops.open else { return };
        match (open.request, action) {
            (LocalRequest::Restart, Action::Restart) => {
                let outcome = match self.postmaster_pid() {
                    Some(pid) if Some(pid) != open.postmaster => RequestOutcome::Done,
                    Some(_) => RequestOutcome::Failed(
                        "PostgreSQL could not be stopped; see the agent's log".into(),
                    ),
                    None => RequestOutcome::Failed(
                        "PostgreSQL did not start again; see the agent's log".into(),
                    ),
                };
                tracing::info!(?outcome, "restart request carried out");
                if let Some(open) = self.ops.open.take() {
                    self.clear_flags(open.request);
                    if let Some(reply) = open.reply {
                        let _ = reply.send(outcome);
                    }
                }
            }
            (LocalRequest::Reinitialize { .. }, Action::Clone { wipe: true, .. })
                if self
                    .busy
                    .as_ref()
                    .is_some_and(|b| b.op == LongOperation::Clone) =>
            {
                tracing::info!("reinitialize request carried out: cloning");
                if let Some(open) = self.ops.open.take() {
                    self.clear_flags(open.request);
                }
            }
            _ => {}
        }
    }

    /// At the start of each cycle: drops an open request the core did not act on in time, or
    /// a restart whose caller stopped waiting.
    pub(super) fn expire_requests(&mut self) {
        let Some(open) = &self.ops.open else { return };
        if open.reply.as_ref().is_some_and(oneshot::Sender::is_closed) {
            self.drop_open("the caller stopped waiting");
        } else if open.since.elapsed() > REQUEST_EXPIRY {
            self.drop_open("not acted on in time (PostgreSQL not running, or no leader)");
        }
    }

    fn postmaster_pid(&self) -> Option<i32> {
        self.instance
            .running_postmaster()
            .ok()
            .flatten()
            .map(|p| p.pid)
    }

    /// Shares the local dynamic-parameter allowlist with the REST API (after a reload).
    pub(super) fn share_allowlist(&self) {
        if let Ok(mut a) = self.ops.allowlist.write() {
            a.clone_from(&self.cfg.dynamic_parameter_allowlist);
        }
    }

    /// After the dynamic configuration was read: when its PostgreSQL parameters changed, writes
    /// the configuration files again and makes a running PostgreSQL reload them (parameters that
    /// need a restart then show as `pending_restart`). A stopped PostgreSQL gets them at start.
    pub(super) fn apply_dynamic_parameters(&mut self) {
        if self.dynamic_params == self.ops.applied {
            return;
        }
        let running = self.instance.running_postmaster().ok().flatten().is_some();
        if running && self.busy.is_none() {
            // The role decides what is rendered; without a recent observation, next cycle.
            let Some(standby) = self.last_sql().map(|s| s.in_recovery) else {
                return;
            };
            if let Err(e) = self.render(standby).and_then(|()| self.reload_pg()) {
                tracing::error!(
                    error = format!("{e:#}"),
                    "applying the changed dynamic parameters failed; retrying next cycle"
                );
                return;
            }
            tracing::info!("dynamic parameters changed: configuration rendered and reloaded");
        }
        self.ops.applied.clone_from(&self.dynamic_params);
    }
}
