//! `pgkeep backup`: backups of a local environment, run on its repository host.
//!
//! ```text
//! pgkeep backup run    [--dir D] [--type full|diff|incr]
//! pgkeep backup list   [--dir D] [--format table|json]
//! pgkeep backup check  [--dir D]
//! pgkeep backup verify [--dir D]
//! pgkeep restore [--dir D] (--target-time T | --target-lsn L | --target-name N | --latest)
//!                [--node NAME] [--set LABEL] [--timeout SECS]
//! ```
//!
//! With a repository host, pgBackRest starts backups there only (it refuses elsewhere), so
//! every command runs `pgbackrest` as the `pgbackrest` OS user with the repository host's
//! configuration (`D/backup/conf`); it finds the primary itself among `pg1`…`pgN` and, with
//! `backup-standby`, copies the files from a replica.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::cli::up::DEFAULT_DIR;
use crate::inventory::Inventory;
use crate::local::{Layout, backup};
use crate::pgbackrest::info::{self, Stanza};

/// `pgkeep backup ...`
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: BackupCommand,
}

/// The `pgkeep backup` commands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup now.
    Run {
        /// Environment directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Backup type: full copies everything, diff what changed since the last full, incr
        /// what changed since the last backup of any type.
        #[arg(long = "type", value_enum, default_value_t = Kind::Full)]
        kind: Kind,
    },
    /// The backups in the repository and the archive's WAL range.
    List {
        /// Environment directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check that the primary's WAL reaches the repository (forces a WAL switch).
    Check {
        /// Environment directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Verify the repository: every backup file and WAL segment is readable and matches its
    /// checksum.
    Verify {
        /// Environment directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

/// A backup type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Everything.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup.
    Incr,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Diff => "diff",
            Kind::Incr => "incr",
        }
    }
}

/// Output format of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

fn environment(dir: &std::path::Path) -> Result<(Layout, Inventory)> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pgkeep backup --dir must run as root (it runs pgBackRest as the pgbackrest user)");
    }
    let layout = Layout::new(dir)?;
    let inv = Inventory::load(&layout.inventory())
        .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
    if inv.backup_host.is_none() {
        bail!(
            "the environment in {} has no backup host (it was created with --no-backup)",
            layout.dir.display()
        );
    }
    Ok((layout, inv))
}

/// The stanza as pgBackRest reports it.
pub fn stanza(layout: &Layout, inv: &Inventory) -> Result<Stanza> {
    let json = backup::repo_command(layout, inv, &["info", "--output=json"])?;
    Ok(info::parse(&json, &inv.cluster)?)
}

/// Runs `pgkeep backup`.
pub fn run(a: BackupArgs) -> Result<()> {
    match a.command {
        BackupCommand::Run { dir, kind } => {
            let (layout, inv) = environment(&dir)?;
            let t0 = std::time::Instant::now();
            println!("{} backup of {} ...", kind.as_str(), inv.cluster);
            backup::repo_command(
                &layout,
                &inv,
                &["backup", &format!("--type={}", kind.as_str())],
            )?;
            let s = stanza(&layout, &inv)?;
            let b = s.backups.last().context("the repository lists no backup")?;
            println!(
                "backup {} ({}) done in {:.1}s: {} restored size, {} in the repository, WAL {}..{}",
                b.label,
                b.kind,
                t0.elapsed().as_secs_f64(),
                info::human_size(b.size),
                info::human_size(b.repo_size),
                b.wal_start,
                b.wal_stop
            );
            Ok(())
        }
        BackupCommand::List { dir, format } => {
            let (layout, inv) = environment(&dir)?;
            let s = stanza(&layout, &inv)?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Format::Table => print!("{}", table(&s)),
            }
            Ok(())
        }
        BackupCommand::Check { dir } => {
            let (layout, inv) = environment(&dir)?;
            backup::repo_command(&layout, &inv, &["check"])?;
            println!(
                "ok: the primary's WAL reaches the repository of {}",
                inv.cluster
            );
            Ok(())
        }
        BackupCommand::Verify { dir } => {
            let (layout, inv) = environment(&dir)?;
            // pgBackRest 2.45's verify exits 0 whatever it finds: its report decides.
            let out =
                backup::repo_command(&layout, &inv, &["verify", "--output=text", "--verbose"])?;
            print!("{out}");
            verify_report_ok(&out)?;
            println!("ok: the repository of {} verified", inv.cluster);
            Ok(())
        }
    }
}

/// Checks `pgbackrest verify --output=text --verbose`: status ok, and every count of missing or
/// invalid files zero.
fn verify_report_ok(out: &str) -> Result<()> {
    if !out.lines().any(|l| l.trim() == "status: ok") {
        bail!("the repository did not verify (see the report above)");
    }
    for l in out.lines() {
        for field in ["missing", "checksum invalid", "size invalid", "other"] {
            let bad = l
                .split(',')
                .filter_map(|kv| kv.trim().strip_prefix(&format!("{field}: ")))
                .any(|v| v.trim() != "0");
            if bad {
                bail!("the repository did not verify: {}", l.trim());
            }
        }
    }
    Ok(())
}

/// The `list` table.
fn table(s: &Stanza) -> String {
    let mut out = format!(
        "stanza {}: {} (status {}), cipher {}\n",
        s.name, s.status.1, s.status.0, s.cipher
    );
    match &s.archive {
        Some((min, max)) => out.push_str(&format!("archive: {min} .. {max}\n")),
        None => out.push_str("archive: empty\n"),
    }
    if s.backups.is_empty() {
        out.push_str("no backups\n");
        return out;
    }
    out.push_str(&format!(
        "{:<34} {:<5} {:<20} {:>8} {:>10} {:>10}  {}\n",
        "LABEL", "TYPE", "START (UTC)", "SECONDS", "SIZE", "REPO", "WAL"
    ));
    for b in &s.backups {
        let start = time::OffsetDateTime::from_unix_timestamp(b.start)
            .map(crate::pki::format_time)
            .unwrap_or_else(|_| b.start.to_string());
        out.push_str(&format!(
            "{:<34} {:<5} {:<20} {:>8} {:>10} {:>10}  {}..{}{}\n",
            b.label,
            b.kind,
            start,
            b.stop - b.start,
            info::human_size(b.size),
            info::human_size(b.repo_size),
            b.wal_start,
            b.wal_stop,
            if b.error { "  (page errors)" } else { "" }
        ));
    }
    out
}

/// `pgkeep restore`: the cluster back to a point in time (see [`crate::local::restore`]).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true)))]
pub struct RestoreArgs {
    /// Environment directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Recover up to this time, e.g. "2026-11-29 23:40:00+00" (give the time zone).
    #[arg(long, value_name = "TIME", group = "target")]
    pub target_time: Option<String>,
    /// Recover up to this WAL position, e.g. 0/5000060.
    #[arg(long, value_name = "LSN", group = "target")]
    pub target_lsn: Option<String>,
    /// Recover up to this restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME", group = "target")]
    pub target_name: Option<String>,
    /// Recover everything the archive holds.
    #[arg(long, group = "target")]
    pub latest: bool,
    /// The node to restore (default: the current or last leader); the others clone from it.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// The backup to start from (required with --target-name; default: the newest backup that
    /// ended before the time or position).
    #[arg(long = "set", value_name = "LABEL")]
    pub backup: Option<String>,
    /// Seconds recovery (and the cluster's start afterwards) may take.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
}

/// Runs `pgkeep restore`.
pub fn run_restore(a: RestoreArgs) -> Result<()> {
    use crate::pgbackrest::RecoveryTarget;
    let target = match (a.target_time, a.target_lsn, a.target_name) {
        (Some(t), _, _) => RecoveryTarget::Time(t),
        (_, Some(l), _) => RecoveryTarget::Lsn(l),
        (_, _, Some(n)) => RecoveryTarget::Name(n),
        _ => RecoveryTarget::Latest,
    };
    crate::local::restore::restore(&crate::local::restore::RestoreOptions {
        dir: a.dir,
        target,
        node: a.node,
        backup: a.backup,
        timeout: std::time::Duration::from_secs(a.timeout),
    })
}

#[cfg(test)]
mod tests {
    use super::verify_report_ok;

    #[test]
    fn a_verify_report_passes_only_when_ok_and_complete() {
        let ok = "stanza: bk\nstatus: ok\n  archiveId: 15-1, total WAL checked: 10, total valid WAL: 10\n    missing: 0, checksum invalid: 0, size invalid: 0, other: 0\n";
        assert!(verify_report_ok(ok).is_ok());
        assert!(
            verify_report_ok("stanza: bk\nstatus: error\n  No usable backup.info file\n").is_err()
        );
        assert!(verify_report_ok("").is_err());
        let bad = ok.replace("checksum invalid: 0", "checksum invalid: 2");
        assert!(
            verify_report_ok(&bad)
                .unwrap_err()
                .to_string()
                .contains("checksum invalid: 2")
        );
    }
}
