//! `pgkeep audit --dir D`: the security assessment of a local environment, as a grouped table
//! with a score, JSON, or SARIF for CI systems; `--fail-on` sets which failures make the exit
//! code non-zero.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use pgkeep_core::audit::{self, Finding, Severity, Status};

use crate::cli::up::DEFAULT_DIR;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// Every finding as JSON.
    Json,
    /// SARIF 2.1.0, for code-scanning tools.
    Sarif,
}

/// The lowest severity whose failures fail the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    /// Critical failures only.
    Critical,
    /// High and critical.
    High,
    /// Medium and above.
    Medium,
    /// Every failure.
    Low,
    /// Never (report only).
    Never,
}

/// `pgkeep audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Environment directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// An HAProxy configuration to check instead of the environment's own.
    #[arg(long, value_name = "FILE")]
    pub haproxy_config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Exit non-zero when a check of this severity or above fails.
    #[arg(long, value_enum, default_value = "high")]
    pub fail_on: FailOn,
}

/// Runs `pgkeep audit`.
pub fn run(a: AuditArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pgkeep audit --dir must run as root (it reads every service's files)");
    }
    let facts = crate::local::audit::collect(&a.dir, a.haproxy_config.as_deref())?;
    let findings = audit::run(&facts);
    let out = match a.format {
        Format::Table => table(&findings, std::io::stdout().is_terminal()),
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "score": audit::score(&findings),
                "findings": findings,
            }))? + "\n"
        }
        Format::Sarif => serde_json::to_string_pretty(&sarif(&findings))? + "\n",
    };
    print!("{out}");
    let threshold = match a.fail_on {
        FailOn::Critical => Some(Severity::Critical),
        FailOn::High => Some(Severity::High),
        FailOn::Medium => Some(Severity::Medium),
        FailOn::Low => Some(Severity::Low),
        FailOn::Never => None,
    };
    let failed: Vec<&str> = threshold
        .map(|t| {
            findings
                .iter()
                .filter(|f| audit::fails_at(f, t))
                .map(|f| f.id)
                .collect()
        })
        .unwrap_or_default();
    if !failed.is_empty() {
        bail!(
            "{} checks failed at or above the threshold: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Pass => "PASS",
        Status::Fail => "FAIL",
        Status::Warn => "WARN",
        Status::NotApplicable => "N/A",
        Status::Manual => "MANUAL",
    }
}

/// Findings grouped, one line each with its evidence, remedies under failures; the score last.
pub fn table(findings: &[Finding], colour: bool) -> String {
    let paint = |s: Status| {
        let w = status_word(s);
        if !colour {
            return format!("{w:<6}");
        }
        let code = match s {
            Status::Pass => "32",
            Status::Fail => "31",
            Status::Warn => "33",
            _ => "2",
        };
        format!("\x1b[{code}m{w:<6}\x1b[0m")
    };
    let mut groups: Vec<_> = findings.iter().map(|f| f.group).collect();
    groups.sort();
    groups.dedup();
    let mut out = String::new();
    for g in groups {
        let _ = writeln!(
            out,
            "\n{}",
            serde_json::to_value(g)
                .ok()
                .and_then(|v| v.as_str().map(str::to_uppercase))
                .unwrap_or_default()
        );
        for f in findings.iter().filter(|f| f.group == g) {
            let node = f
                .node
                .as_deref()
                .map(|n| format!(" [{n}]"))
                .unwrap_or_default();
            let sev = serde_json::to_value(f.severity)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} {:<11} {:<8} {}{node}: {}",
                paint(f.status),
                f.id,
                sev,
                f.title,
                f.evidence
            );
            if matches!(f.status, Status::Fail | Status::Warn) {
                let _ = writeln!(
                    out,
                    "         fix: {} ({})",
                    f.remedy,
                    f.references.join("; ")
                );
            }
        }
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    let _ = writeln!(
        out,
        "\nscore {}/100: {} pass, {} fail, {} warn, {} manual, {} not applicable ({} checks)",
        audit::score(findings),
        count(Status::Pass),
        count(Status::Fail),
        count(Status::Warn),
        count(Status::Manual),
        count(Status::NotApplicable),
        audit::check_ids().len()
    );
    out
}

/// SARIF 2.1.0: every check a rule; every failure or warning a result.
pub fn sarif(findings: &[Finding]) -> serde_json::Value {
    let mut rules = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in findings {
        if seen.insert(f.id) {
            rules.push(serde_json::json!({
                "id": f.id,
                "name": f.title,
                "shortDescription": {"text": f.title},
                "help": {"text": f.remedy},
                "properties": {"severity": f.severity, "references": f.references},
            }));
        }
    }
    let results: Vec<serde_json::Value> = findings
        .iter()
        .filter(|f| matches!(f.status, Status::Fail | Status::Warn))
        .map(|f| {
            let level = match (f.status, f.severity) {
                (Status::Warn, _) | (_, Severity::Low) => "note",
                (_, Severity::Medium) => "warning",
                _ => "error",
            };
            serde_json::json!({
                "ruleId": f.id,
                "level": level,
                "message": {"text": format!("{}{}: {}", f.title, f.node.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default(), f.evidence)},
            })
        })
        .collect();
    serde_json::json!({
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [{
            "tool": {"driver": {"name": "pgkeep audit", "version": env!("CARGO_PKG_VERSION"), "rules": rules}},
            "results": results,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &'static str, status: Status, severity: Severity) -> Finding {
        Finding {
            id,
            node: Some("node1".into()),
            group: audit::Group::Tls,
            title: "TLS is on",
            severity,
            status,
            evidence: "ssl = off".into(),
            remedy: "ssl = on",
            references: &["CIS 6.8"],
        }
    }

    #[test]
    fn the_table_groups_findings_and_shows_the_fix_of_failures_only() {
        let t = table(
            &[
                finding("PG-TLS-01", Status::Fail, Severity::Critical),
                finding("PG-TLS-02", Status::Pass, Severity::High),
            ],
            false,
        );
        assert!(t.contains("TLS\n"), "{t}");
        assert!(
            t.contains("FAIL   PG-TLS-01   critical TLS is on [node1]: ssl = off"),
            "{t}"
        );
        assert_eq!(t.matches("fix:").count(), 1, "{t}");
        assert!(t.contains("1 pass, 1 fail"), "{t}");
        assert!(!t.contains('\x1b'));
        assert!(table(&[finding("X", Status::Pass, Severity::Low)], true).contains("\x1b[32m"));
    }

    #[test]
    fn sarif_lists_rules_once_and_results_for_failures_and_warnings() {
        let s = sarif(&[
            finding("PG-TLS-01", Status::Fail, Severity::Critical),
            finding("PG-TLS-01", Status::Pass, Severity::Critical),
            finding("PG-LOG-02", Status::Warn, Severity::Low),
        ]);
        let run = &s["runs"][0];
        assert_eq!(run["tool"]["driver"]["rules"].as_array().unwrap().len(), 2);
        let results = run["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["level"], "error");
        assert_eq!(results[1]["level"], "note");
        assert_eq!(s["version"], "2.1.0");
    }
}
