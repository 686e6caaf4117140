//! `pgkeep ctl switchover`, `failover` and `flush switchover`: like patronictl, they read the
//! cluster from etcd, check the request the way the REST API will (so a refusal comes before
//! the confirmation prompt), ask for confirmation on a terminal unless `--force`, and send the
//! request to the leader's REST API (for a failover without a leader, to the candidate's).
//! Unlike patronictl they never fall back to writing the DCS directly: every change goes
//! through the REST API's access check, validation and audit log.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use pgkeep_core::cluster::ClusterView;
use pgkeep_core::ha::manual::{self, ManualKind, RequestBody};

use super::file::Loaded;
use crate::api::ApiResponse;

/// `ctl switchover`.
#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The current leader (default: the holder of the leader lock).
    #[arg(long, visible_alias = "primary", value_name = "NAME")]
    pub leader: Option<String>,
    /// The member to promote (default: the leader picks the healthiest replica).
    #[arg(long, value_name = "NAME")]
    pub candidate: Option<String>,
    /// When: an RFC 3339 time with a zone (e.g. 2026-07-24T12:00:00+00:00), or `now`.
    #[arg(long, value_name = "TIME")]
    pub scheduled: Option<String>,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub force: bool,
}

/// `ctl failover`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The member to promote.
    #[arg(long, value_name = "NAME")]
    pub candidate: String,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub force: bool,
}

/// What `ctl flush` cancels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlushTarget {
    /// A scheduled switchover.
    Switchover,
}

/// `ctl flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// What to cancel.
    #[arg(value_enum)]
    pub target: FlushTarget,
}

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// What is asked.
    pub(super) kind: ManualKind,
    /// The body of the `POST`.
    pub(super) body: RequestBody,
    /// The REST API it goes to (`https://host:port`).
    pub(super) base: String,
    /// One line for the confirmation prompt.
    pub(super) summary: String,
}

/// `https://host:port` of a member, from its `api_url`.
pub(super) fn api_base(view: &ClusterView, name: &str) -> Result<String> {
    let Some(m) = view.members.get(name) else {
        bail!("member {name} has no member key in etcd (is its agent running?)");
    };
    let url = m.data.api_url.as_str();
    let Some(rest) = url.strip_prefix("https://") else {
        bail!("member {name} publishes api_url {url:?}, not an https:// URL");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("member {name} publishes api_url {url:?} without a host");
    }
    Ok(format!("https://{authority}"))
}

pub(super) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks the request against `view` as the REST API will, so a refusal comes before the
/// confirmation prompt.
fn preflight(kind: ManualKind, body: &RequestBody, view: &ClusterView, now_ms: i64) -> Result<()> {
    manual::check_request(kind, body, view, now_ms, view.is_paused())
        .map(drop)
        .map_err(|r| anyhow::anyhow!("{} refused: {}", kind.noun(), r.message))
}

/// The switchover `args` asks for, in `view` at `now_ms`.
pub(super) fn plan_switchover(
    view: &ClusterView,
    args: &SwitchoverArgs,
    now_ms: i64,
) -> Result<Plan> {
    let Some(current) = view.leader.as_ref().map(|l| l.name.clone()) else {
        bail!(
            "the cluster has no leader: a switchover needs one; use `pgkeep ctl failover --candidate NAME`"
        );
    };
    let leader = args.leader.clone().unwrap_or_else(|| current.clone());
    if leader != current {
        bail!("{leader} is not the leader of the cluster (the leader is {current})");
    }
    let scheduled = args
        .scheduled
        .clone()
        .filter(|s| !s.trim().eq_ignore_ascii_case("now"));
    let body = RequestBody {
        leader: Some(leader.clone()),
        candidate: args.candidate.clone(),
        scheduled_at: scheduled.clone(),
    };
    preflight(ManualKind::Switchover, &body, view, now_ms)?;
    let summary = format!(
        "switch over from {leader} to {} {}",
        args.candidate
            .as_deref()
            .unwrap_or("the healthiest replica"),
        scheduled.map_or_else(|| "now".to_owned(), |t| format!("at {t}")),
    );
    Ok(Plan {
        kind: ManualKind::Switchover,
        body,
        base: api_base(view, &leader)?,
        summary,
    })
}

/// The manual failover to `candidate` in `view` at `now_ms`: sent to the leader, or to the
/// candidate when nobody holds the lock.
pub(super) fn plan_failover(view: &ClusterView, candidate: &str, now_ms: i64) -> Result<Plan> {
    let body = RequestBody {
        leader: None,
        candidate: Some(candidate.to_owned()),
        scheduled_at: None,
    };
    preflight(ManualKind::Failover, &body, view, now_ms)?;
    let (target, summary) = match &view.leader {
        Some(l) => (
            l.name.clone(),
            format!(
                "fail over to {candidate} (the current leader {} steps down)",
                l.name
            ),
        ),
        None => (
            candidate.to_owned(),
            format!("fail over to {candidate} (the cluster has no leader)"),
        ),
    };
    Ok(Plan {
        kind: ManualKind::Failover,
        body,
        base: api_base(view, &target)?,
        summary,
    })
}

/// Asks "Are you sure?" on the terminal; refuses without one.
pub(super) fn confirm(summary: &str, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to {summary} without confirmation: standard input is not a terminal \
             (pass --force to proceed without the question)"
        );
    }
    let mut err = std::io::stderr().lock();
    write!(err, "About to {summary}. Are you sure? [y/N] ")?;
    err.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        bail!("aborted");
    }
    Ok(())
}

/// Prints the server's answer; an error for anything but 2xx.
pub(super) fn report(what: &str, resp: &ApiResponse) -> Result<()> {
    let text = resp.text();
    let text = text.trim();
    if (200..300).contains(&resp.status) {
        super::print_out(&format!("{text}\n"))
    } else {
        bail!("{what}: HTTP {}: {text}", resp.status)
    }
}

/// Runs `ctl switchover` or `ctl failover` (`plan` picks which from the view).
pub(super) fn run_manual(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    force: bool,
    plan: impl FnOnce(&ClusterView, i64) -> Result<Plan>,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let plan = plan(&view, now_unix_ms())?;
    confirm(&plan.summary, force)?;
    // The server waits up to 2 × max(10, loop_wait) s for the outcome.
    let client = loaded
        .rest
        .client(Duration::from_secs(manual::wait_secs(&view) + 15))?;
    let url = format!("{}/{}", plan.base, plan.kind.noun());
    let resp = rt
        .block_on(client.post_json(&url, &plan.body.to_json()))
        .with_context(|| format!("POST {url}"))?;
    report(plan.kind.noun(), &resp)
}

/// Runs `ctl flush switchover`: `DELETE /switchover` on the leader.
pub(super) fn run_flush(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    args: &FlushArgs,
) -> Result<()> {
    let FlushTarget::Switchover = args.target;
    let view = super::read_view(rt, &loaded.etcd)?;
    let Some(leader) = view.leader.as_ref().map(|l| l.name.clone()) else {
        bail!("the cluster has no leader to ask");
    };
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let url = format!("{}/switchover", api_base(&view, &leader)?);
    let resp = rt
        .block_on(client.delete(&url))
        .with_context(|| format!("DELETE {url}"))?;
    report("flush switchover", &resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_core::cluster::RawEntry;

    const NOW: i64 = 1_784_894_400_000; // 2026-07-24T12:00:00Z

    fn entry(suffix: &str, value: &str) -> RawEntry {
        RawEntry {
            suffix: suffix.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 3,
            lease: 0,
        }
    }

    fn member(name: &str, role: &str) -> RawEntry {
        entry(
            &format!("members/{name}"),
            &format!(
                r#"{{"api_url":"https://{name}.demo.internal:28443/patroni","state":"running","role":"{role}"}}"#
            ),
        )
    }

    fn view(leader: Option<&str>) -> ClusterView {
        let mut e = vec![
            member(
                "node1",
                if leader.is_some() {
                    "primary"
                } else {
                    "replica"
                },
            ),
            member("node2", "replica"),
            member("node3", "replica"),
        ];
        if let Some(l) = leader {
            e.push(entry("leader", l));
        }
        ClusterView::from_entries(&e).0
    }

    fn sw(leader: Option<&str>, candidate: Option<&str>, at: Option<&str>) -> SwitchoverArgs {
        SwitchoverArgs {
            leader: leader.map(String::from),
            candidate: candidate.map(String::from),
            scheduled: at.map(String::from),
            force: false,
        }
    }

    #[test]
    fn switchover_defaults_to_the_lock_holder() {
        let v = view(Some("node1"));
        let p = plan_switchover(&v, &sw(None, Some("node2"), Some("now")), NOW).unwrap();
        assert_eq!(p.base, "https://node1.demo.internal:28443");
        assert_eq!(
            p.body.to_json(),
            r#"{"candidate":"node2","leader":"node1"}"#
        );
        assert_eq!(p.summary, "switch over from node1 to node2 now");
        let p = plan_switchover(&v, &sw(None, None, Some("2026-07-24T13:00:00Z")), NOW).unwrap();
        assert_eq!(p.body.scheduled_at.as_deref(), Some("2026-07-24T13:00:00Z"));
        assert!(
            p.summary.ends_with("at 2026-07-24T13:00:00Z"),
            "{}",
            p.summary
        );
    }

    #[test]
    fn switchover_refusals_come_before_the_prompt() {
        let v = view(Some("node1"));
        let err = |a: SwitchoverArgs| plan_switchover(&v, &a, NOW).unwrap_err().to_string();
        assert!(err(sw(Some("node2"), None, None)).contains("not the leader"));
        assert!(err(sw(None, Some("node9"), None)).contains("candidate does not exists"));
        assert!(err(sw(None, Some("node1"), None)).contains("same"));
        assert!(err(sw(None, None, Some("2026-07-24T13:00:00"))).contains("Timezone"));
        assert!(err(sw(None, None, Some("2020-01-01T00:00:00Z"))).contains("past"));
        let e = plan_switchover(&view(None), &sw(None, None, None), NOW).unwrap_err();
        assert!(e.to_string().contains("no leader"), "{e}");
    }

    #[test]
    fn failover_goes_to_the_leader_or_the_candidate() {
        let p = plan_failover(&view(Some("node1")), "node2", NOW).unwrap();
        assert_eq!(p.base, "https://node1.demo.internal:28443");
        assert_eq!(p.body.to_json(), r#"{"candidate":"node2"}"#);
        let p = plan_failover(&view(None), "node3", NOW).unwrap();
        assert_eq!(p.base, "https://node3.demo.internal:28443");
        assert!(plan_failover(&view(None), "node9", NOW).is_err());
    }

    #[test]
    fn api_bases() {
        let mut v = view(Some("node1"));
        assert!(api_base(&v, "node9").is_err());
        v.members.get_mut("node2").unwrap().data.api_url = "http://node2:8008/patroni".into();
        assert!(
            api_base(&v, "node2")
                .unwrap_err()
                .to_string()
                .contains("https")
        );
    }
}
