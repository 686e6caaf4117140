//! `pgkeep ctl pause|resume|reload|reinit|restart`: operations through the members' REST APIs.
//!
//! * `pause [--wait]` / `resume [--wait]`: `PATCH /config {"pause": true}` (resume:
//!   `{"pause": null}`, which removes the key, as patronictl does) to the leader, else to the
//!   other members until one accepts; `--wait` waits until every member key reports the new state.
//! * `reload [MEMBER...]`: `POST /reload` to each member (default: all).
//! * `reinit MEMBER... [--from-leader] [--wait]`: `POST /reinitialize` to each named replica
//!   (never the leader); `--wait` waits until each runs again.
//! * `restart [MEMBER...] [--pending]`: `POST /restart` to each member (default: all; with
//!   `--pending` only those with a change waiting for a restart, asked with
//!   `{"restart_pending": true}` so a member re-checks), one at a time, in the order
//!   [`pgkeep_core::ops::restart_order`] decides from the members' running and pending values
//!   of the hot-standby-critical parameters (replicas first when raising, the primary first when
//!   lowering; replicas first when the values cannot be read). It stops at the first failure.
//!
//! Every command but `pause`/`resume` asks for confirmation on a terminal unless `--force`,
//! and refuses without a terminal and without `--force`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use pgkeep_core::cluster::ClusterView;
use pgkeep_core::ops::{HOT_STANDBY_PARAMETERS, RestartMember, Setting, restart_order};
use reqwest::Method;
use serde_json::Value;

use super::config::server_error;
use super::file::Loaded;
use super::manual::{api_base, confirm};
use crate::api::{ApiClient, MemberStatus};

/// `ctl pause` and `ctl resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Wait until every member reports the new state.
    #[arg(long)]
    pub wait: bool,
}

/// `ctl reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Members (default: all).
    pub members: Vec<String>,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub force: bool,
}

/// `ctl reinit`.
#[derive(Debug, Args)]
pub struct ReinitArgs {
    /// The replicas to re-create.
    #[arg(required = true)]
    pub members: Vec<String>,
    /// Clone from the leader even when a `clonefrom` member runs.
    #[arg(long)]
    pub from_leader: bool,
    /// Wait until each member runs again.
    #[arg(long)]
    pub wait: bool,
    /// Do not ask for confirmation (needed without a terminal); also replaces a restart or
    /// reinitialize the member accepted and has not started yet.
    #[arg(long)]
    pub force: bool,
}

/// `ctl restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Members (default: all).
    pub members: Vec<String>,
    /// Only members with a configuration change waiting for a restart.
    #[arg(long)]
    pub pending: bool,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub force: bool,
}

/// The named members (checked to exist), or every member, sorted.
fn select(view: &ClusterView, named: &[String]) -> Result<Vec<String>> {
    if named.is_empty() {
        return Ok(view.members.keys().cloned().collect());
    }
    for n in named {
        if !view.members.contains_key(n) {
            bail!("{n} is not a member of the cluster (no member key in etcd)");
        }
    }
    let mut out = named.to_vec();
    out.dedup();
    Ok(out)
}

/// The leader first, then the other members.
fn leader_first(view: &ClusterView) -> Vec<String> {
    let leader = view.leader.as_ref().map(|l| l.name.clone());
    leader
        .iter()
        .cloned()
        .chain(
            view.members
                .keys()
                .filter(|n| Some(*n) != leader.as_ref())
                .cloned(),
        )
        .collect()
}

/// Runs `ctl pause` (`paused` true) or `ctl resume`.
pub(super) fn run_pause(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    paused: bool,
    args: &PauseArgs,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    if view.config.is_none() {
        bail!("the cluster has no (valid) dynamic configuration to change");
    }
    if view.is_paused() == paused {
        bail!(
            "Cluster is {} paused",
            if paused { "already" } else { "not" }
        );
    }
    let body = if paused {
        r#"{"pause":true}"#
    } else {
        r#"{"pause":null}"#
    };
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let mut last = String::from("no member to ask");
    let mut done = false;
    for name in leader_first(&view) {
        let Ok(base) = api_base(&view, &name) else {
            continue;
        };
        let url = format!("{base}/config");
        match rt.block_on(client.send_json(Method::PATCH, &url, body, None)) {
            Ok(r) if r.status == 200 => {
                done = true;
                break;
            }
            // The request itself is wrong: another member would answer the same.
            Ok(r) if (400..500).contains(&r.status) => {
                bail!(
                    "PATCH {url}: HTTP {}: {}",
                    r.status,
                    server_error(&r.text())
                )
            }
            Ok(r) => {
                last = format!(
                    "PATCH {url}: HTTP {}: {}",
                    r.status,
                    server_error(&r.text())
                )
            }
            Err(e) => last = format!("PATCH {url}: {e}"),
        }
    }
    if !done {
        bail!("{last}");
    }
    let what = if paused { "paused" } else { "resumed" };
    super::print_out(&format!("Success: cluster management is {what}\n"))?;
    if !args.wait {
        return Ok(());
    }
    super::print_out(&format!(
        "'{}' request sent, waiting until it is recognized by all nodes\n",
        if paused { "pause" } else { "resume" }
    ))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = super::read_view(rt, &loaded.etcd)?;
        let behind: Vec<&String> = view
            .members
            .iter()
            .filter(|(_, m)| m.data.pause != paused)
            .map(|(n, _)| n)
            .collect();
        if behind.is_empty() {
            return super::print_out("Success: all members report it\n");
        }
        if Instant::now() > deadline {
            bail!("after 120 s these members still do not report it: {behind:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `ctl reload`.
pub(super) fn run_reload(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    args: &ReloadArgs,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let members = select(&view, &args.members)?;
    confirm(
        &format!("reload the configuration of {}", members.join(", ")),
        args.force,
    )?;
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let mut failed = Vec::new();
    for name in &members {
        let url = format!("{}/reload", api_base(&view, name)?);
        match rt.block_on(client.post_json(&url, "{}")) {
            Ok(r) if r.status == 202 || r.status == 200 => super::print_out(&format!(
                "Reload request received for member {name} and will be processed within a few seconds\n"
            ))?,
            Ok(r) => {
                eprintln!("{name}: HTTP {}: {}", r.status, server_error(&r.text()));
                failed.push(name.clone());
            }
            Err(e) => {
                eprintln!("{name}: POST {url}: {e}");
                failed.push(name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("reload failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Runs `ctl reinit`.
pub(super) fn run_reinit(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    args: &ReinitArgs,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let members = select(&view, &args.members)?;
    let Some(leader) = view.leader.as_ref().map(|l| l.name.clone()) else {
        bail!("the cluster has no leader to clone from; nothing was changed");
    };
    if members.contains(&leader) {
        bail!("{leader} is the leader: it cannot be reinitialized (switch over first)");
    }
    confirm(
        &format!(
            "reinitialize {} (their data directories are wiped and cloned again)",
            members.join(", ")
        ),
        args.force,
    )?;
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let body =
        serde_json::json!({"force": args.force, "from_leader": args.from_leader}).to_string();
    for name in &members {
        let base = api_base(&view, name)?;
        let url = format!("{base}/reinitialize");
        let r = rt
            .block_on(client.post_json(&url, &body))
            .with_context(|| format!("POST {url}"))?;
        if r.status != 200 {
            bail!("{name}: HTTP {}: {}", r.status, server_error(&r.text()));
        }
        super::print_out(&format!("Success: reinitialize for member {name}\n"))?;
    }
    if args.wait {
        for name in &members {
            wait_running_again(rt, &client, &api_base(&view, name)?, name)?;
        }
    }
    Ok(())
}

/// Waits until the member left `running` (up to 30 s) and runs again (up to an hour).
fn wait_running_again(
    rt: &tokio::runtime::Runtime,
    client: &ApiClient,
    base: &str,
    name: &str,
) -> Result<()> {
    let state = || {
        rt.block_on(client.status(base))
            .map(|s| s.state)
            .unwrap_or_else(|_| "unknown".into())
    };
    let left = Instant::now() + Duration::from_secs(30);
    while state() == "running" && Instant::now() < left {
        std::thread::sleep(Duration::from_millis(300));
    }
    super::print_out(&format!("Waiting for {name} to run again...\n"))?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let s = state();
        if s == "running" {
            return super::print_out(&format!("{name} is running again\n"));
        }
        if Instant::now() > deadline {
            bail!("{name} is still {s} after an hour");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A parameter value as an integer (the critical ones are plain integers).
fn int(v: &str) -> Option<i64> {
    v.trim().trim_matches('\'').parse().ok()
}

/// What the ordering knows about one member: from its `pending_restart_reason` (running and
/// configured value), else the dynamic configuration's value for both, else nothing.
pub(super) fn restart_member(
    name: &str,
    leader: bool,
    restart: bool,
    status: Option<&MemberStatus>,
    dynamic: &serde_json::Map<String, Value>,
) -> RestartMember {
    let reasons = status
        .and_then(|s| s.pending_restart_reason.as_ref())
        .and_then(Value::as_object);
    let configured = |p: &str| -> Option<i64> {
        match dynamic.get("postgresql")?.get("parameters")?.get(p)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => int(s),
            _ => None,
        }
    };
    let settings = HOT_STANDBY_PARAMETERS
        .iter()
        .filter_map(|p| {
            let pending = reasons.and_then(|r| r.get(*p));
            let setting = match pending {
                Some(change) => Setting {
                    running: change
                        .get("old_value")
                        .and_then(Value::as_str)
                        .and_then(int),
                    after_restart: change
                        .get("new_value")
                        .and_then(Value::as_str)
                        .and_then(int),
                },
                None => {
                    let v = configured(p)?;
                    Setting {
                        running: Some(v),
                        after_restart: Some(v),
                    }
                }
            };
            Some(((*p).to_owned(), setting))
        })
        .collect();
    RestartMember {
        name: name.to_owned(),
        leader,
        restart,
        settings,
    }
}

/// Runs `ctl restart`.
pub(super) fn run_restart(
    rt: &tokio::runtime::Runtime,
    loaded: &Loaded,
    args: &RestartArgs,
) -> Result<()> {
    let view = super::read_view(rt, &loaded.etcd)?;
    let mut selected = select(&view, &args.members)?;
    let client = loaded.rest.client(crate::api::client::DEFAULT_TIMEOUT)?;
    let mut statuses: BTreeMap<String, MemberStatus> = BTreeMap::new();
    for name in view.members.keys() {
        let base = api_base(&view, name)?;
        match rt.block_on(client.status(&base)) {
            Ok(s) => {
                statuses.insert(name.clone(), s);
            }
            Err(e) if selected.contains(name) => bail!("{name}: {e}"),
            Err(e) => eprintln!("note: {name} did not answer ({e}); its values are unknown"),
        }
    }
    if args.pending {
        selected.retain(|n| statuses.get(n).is_some_and(|s| s.pending_restart));
        if selected.is_empty() {
            return super::print_out("No member has a restart pending.\n");
        }
    }
    let leader = view.leader.as_ref().map(|l| l.name.as_str());
    let empty = serde_json::Map::new();
    let dynamic = view.config.as_ref().map_or(&empty, |c| &c.value);
    let members: Vec<RestartMember> = view
        .members
        .keys()
        .map(|n| {
            restart_member(
                n,
                Some(n.as_str()) == leader,
                selected.contains(n),
                statuses.get(n),
                dynamic,
            )
        })
        .collect();
    let plan =
        restart_order(&members).map_err(|e| anyhow::anyhow!("nothing was restarted: {e}"))?;
    let mut text = format!(
        "Restart order: {} ({})\n",
        plan.order.join(", "),
        plan.explanation()
    );
    // Unknown values matter for the parameters that change; the others are unchanged.
    let unknown: Vec<&String> = plan
        .assumed
        .iter()
        .filter(|a| {
            plan.changes
                .iter()
                .any(|(p, ..)| a.ends_with(&format!(".{p}")))
        })
        .collect();
    if !unknown.is_empty() {
        text.push_str(&format!(
            "note: values not known for {}; assumed safe\n",
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    super::print_out(&text)?;
    confirm(&format!("restart {}", plan.order.join(", ")), args.force)?;
    let wait = crate::api::control::DEFAULT_RESTART_WAIT;
    let slow = loaded.rest.client(wait + Duration::from_secs(15))?;
    let body = if args.pending {
        r#"{"restart_pending":true}"#
    } else {
        "{}"
    };
    for (i, name) in plan.order.iter().enumerate() {
        let url = format!("{}/restart", api_base(&view, name)?);
        let r = rt
            .block_on(slow.post_json(&url, body))
            .with_context(|| format!("POST {url}"))?;
        if r.status != 200 {
            let rest = &plan.order[i + 1..];
            bail!(
                "{name}: HTTP {}: {}{}",
                r.status,
                r.text().trim(),
                if rest.is_empty() {
                    String::new()
                } else {
                    format!("; not restarted: {}", rest.join(", "))
                }
            );
        }
        super::print_out(&format!("Success: restart on member {name}\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn restart_members_from_pending_reasons_or_the_dynamic_configuration() {
        let mut st = MemberStatus::new("demo", "n2");
        st.pending_restart = true;
        st.pending_restart_reason = Some(
            json!({"max_connections": {"old_value": "100", "new_value": "150"}, "shared_buffers": {"old_value": "16384", "new_value": "256MB"}}),
        );
        let dynamic = json!({"postgresql": {"parameters": {"max_connections": 150, "max_wal_senders": "10"}}});
        let m = restart_member("n2", false, true, Some(&st), dynamic.as_object().unwrap());
        assert_eq!(
            m.settings["max_connections"],
            Setting {
                running: Some(100),
                after_restart: Some(150)
            }
        );
        assert_eq!(
            m.settings["max_wal_senders"],
            Setting {
                running: Some(10),
                after_restart: Some(10)
            }
        );
        assert!(!m.settings.contains_key("max_worker_processes"));
        // Nothing known: no settings (the ordering falls back to replicas first).
        let m = restart_member("n1", true, true, None, &serde_json::Map::new());
        assert!(m.settings.is_empty());
    }
}
