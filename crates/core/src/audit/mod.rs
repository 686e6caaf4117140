//! `pgkeep audit`: a security assessment of an environment, as pure checks over collected
//! [`Facts`].
//!
//! Every check has a stable id, a title, a group, a severity, a remedy and references (CIS
//! PostgreSQL Benchmark sections, steps of the guide this project started from), and decides a
//! [`Status`] with the evidence that decided it. Node checks run once per database node. The
//! collectors (IO) live in the `pgkeep` crate; nothing here reads a file or opens a socket.

mod env;
pub mod facts;
mod node;
mod probes;
#[cfg(test)]
mod tests;

use serde::Serialize;

pub use facts::{
    BackupFacts, EtcdFacts, Facts, FileFacts, HbaRule, ListenerProbe, NodeFacts, RestProbe, Role,
};

/// How much a failed check matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Low,
    /// Fix it soon.
    Medium,
    /// Fix it now.
    High,
    /// The environment can be taken over or lose data.
    Critical,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Meets the requirement.
    Pass,
    /// Does not.
    Fail,
    /// Meets it with a reservation the evidence names.
    Warn,
    /// Does not apply here (for instance no HAProxy configuration was given).
    NotApplicable,
    /// Needs a person: the facts to decide were not collected.
    Manual,
}

/// The groups checks are shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// TLS on PostgreSQL.
    Tls,
    /// Authentication and pg_hba.
    Authentication,
    /// Roles and privileges.
    Roles,
    /// Logging and auditing.
    Logging,
    /// Server parameters.
    Parameters,
    /// Extensions.
    Extensions,
    /// Owners and modes of files.
    Files,
    /// pgkeep's own settings and certificates.
    Pgkeep,
    /// The dynamic configuration in the DCS.
    Dcs,
    /// etcd.
    Etcd,
    /// HAProxy.
    Haproxy,
    /// Backups.
    Backup,
}

/// One result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable check id.
    pub id: &'static str,
    /// The node it is about (node checks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Group.
    pub group: Group,
    /// Title.
    pub title: &'static str,
    /// Severity when it fails.
    pub severity: Severity,
    /// Status.
    pub status: Status,
    /// What decided it.
    pub evidence: String,
    /// What to do when it does not pass.
    pub remedy: &'static str,
    /// CIS sections, guide steps.
    pub references: &'static [&'static str],
}

/// A check's verdict.
type Verdict = (Status, String);

/// How a check runs.
#[derive(Clone, Copy)]
enum Run {
    /// Once per database node.
    Node(fn(&NodeFacts) -> Verdict),
    /// Once per environment.
    Env(fn(&Facts) -> Verdict),
}

/// A check.
#[derive(Clone, Copy)]
struct Check {
    id: &'static str,
    group: Group,
    title: &'static str,
    severity: Severity,
    remedy: &'static str,
    references: &'static [&'static str],
    run: Run,
}

/// A check run once per database node.
fn node_check(
    id: &'static str,
    group: Group,
    title: &'static str,
    severity: Severity,
    remedy: &'static str,
    references: &'static [&'static str],
    f: fn(&NodeFacts) -> Verdict,
) -> Check {
    let base = (id, group, title, severity, remedy, references);
    check(base, Run::Node(f))
}

/// A check run once per environment.
fn env_check(
    id: &'static str,
    group: Group,
    title: &'static str,
    severity: Severity,
    remedy: &'static str,
    references: &'static [&'static str],
    f: fn(&Facts) -> Verdict,
) -> Check {
    let base = (id, group, title, severity, remedy, references);
    check(base, Run::Env(f))
}

type Described = (
    &'static str,
    Group,
    &'static str,
    Severity,
    &'static str,
    &'static [&'static str],
);

fn check((id, group, title, severity, remedy, references): Described, run: Run) -> Check {
    Check {
        id,
        group,
        title,
        severity,
        remedy,
        references,
        run,
    }
}

fn all_checks() -> Vec<Check> {
    let mut v = node::checks();
    v.extend(env::checks());
    v.extend(probes::checks());
    v
}

/// The ids of every check, in order.
pub fn check_ids() -> Vec<&'static str> {
    all_checks().iter().map(|c| c.id).collect()
}

/// Runs every check over `facts`.
pub fn run(facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in all_checks() {
        let finding = |node: Option<String>, (status, evidence): Verdict| Finding {
            id: c.id,
            node,
            group: c.group,
            title: c.title,
            severity: c.severity,
            status,
            evidence,
            remedy: c.remedy,
            references: c.references,
        };
        match c.run {
            Run::Node(_) if facts.nodes.is_empty() => out.push(finding(
                None,
                (Status::Manual, "no database node was examined".into()),
            )),
            Run::Node(f) => {
                for n in &facts.nodes {
                    out.push(finding(Some(n.name.clone()), f(n)));
                }
            }
            Run::Env(f) => out.push(finding(None, f(facts))),
        }
    }
    out
}

/// A score from 0 to 100: the share of decided checks that pass, failures weighted by
/// severity (a warning counts half).
pub fn score(findings: &[Finding]) -> u32 {
    let weight = |s: Severity| match s {
        Severity::Low => 1,
        Severity::Medium => 2,
        Severity::High => 4,
        Severity::Critical => 8,
    };
    let (mut total, mut lost) = (0u32, 0u32);
    for f in findings {
        let w = weight(f.severity);
        match f.status {
            Status::Pass => total += 2 * w,
            Status::Warn => {
                total += 2 * w;
                lost += w;
            }
            Status::Fail => {
                total += 2 * w;
                lost += 2 * w;
            }
            Status::NotApplicable | Status::Manual => {}
        }
    }
    if total == 0 {
        return 100;
    }
    // Any loss costs at least a point: 100 means nothing failed or warned.
    100 - (lost * 100).div_ceil(total)
}

/// Whether a finding should fail the run at `threshold` (`--fail-on`).
pub fn fails_at(f: &Finding, threshold: Severity) -> bool {
    f.status == Status::Fail && f.severity >= threshold
}

fn pass(evidence: impl Into<String>) -> Verdict {
    (Status::Pass, evidence.into())
}

fn fail(evidence: impl Into<String>) -> Verdict {
    (Status::Fail, evidence.into())
}

fn warn(evidence: impl Into<String>) -> Verdict {
    (Status::Warn, evidence.into())
}

fn not_applicable(evidence: impl Into<String>) -> Verdict {
    (Status::NotApplicable, evidence.into())
}

fn manual(evidence: impl Into<String>) -> Verdict {
    (Status::Manual, evidence.into())
}
