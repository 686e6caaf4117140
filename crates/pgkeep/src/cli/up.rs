//! `pgkeep up` and `pgkeep down`: the local secure environment (see [`crate::local`]).
//!
//! ```text
//! pgkeep up   [--dir D] [--cluster NAME] [--ca-cert FILE --ca-key FILE] [--timeout SECS]
//!             [--no-agents] [--no-haproxy] [--no-backup] [--no-backup-scheduler]
//! pgkeep down [--dir D] [--purge] [--timeout SECS]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::local::down::{DownOptions, down};
use crate::local::up::{UpOptions, up};

/// Default environment directory (also the Makefile's `DIR`).
pub const DEFAULT_DIR: &str = "/var/lib/pgkeep-demo";

/// `pgkeep up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Environment directory (created if missing; every directory above it must be
    /// traversable by the postgres and etcd users).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Cluster name of a new environment (host names are <host>.<cluster>.internal)
    /// [default: demo].
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// An organisation CA certificate to issue every certificate from (new environment only).
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The organisation CA's key (0600).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Seconds to wait for the cluster to become healthy.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Write the files, the /etc/hosts block and start etcd, but no agents.
    #[arg(long)]
    pub no_agents: bool,
    /// Do not start HAProxy (the write and read ports in front of the agents).
    #[arg(long)]
    pub no_haproxy: bool,
    /// A new environment without a pgBackRest repository host (no archiving, no backups).
    #[arg(long)]
    pub no_backup: bool,
    /// Do not start the backup scheduler (backups only with `pgkeep backup run`).
    #[arg(long)]
    pub no_backup_scheduler: bool,
}

/// `pgkeep down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Environment directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Also delete the directory (all data, certificates and secrets) and the /etc/hosts block.
    #[arg(long)]
    pub purge: bool,
    /// Seconds each agent may take to stop its PostgreSQL and exit.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

/// Runs `pgkeep up`.
pub fn run_up(a: UpArgs) -> Result<()> {
    up(&UpOptions {
        dir: a.dir,
        cluster: a.cluster,
        organisation_ca: a.ca_cert.zip(a.ca_key),
        timeout: Duration::from_secs(a.timeout),
        agents: !a.no_agents,
        haproxy: !a.no_haproxy,
        backup: !a.no_backup,
        backup_scheduler: !a.no_backup_scheduler,
    })
}

/// Runs `pgkeep down`.
pub fn run_down(a: DownArgs) -> Result<()> {
    down(&DownOptions {
        dir: a.dir,
        purge: a.purge,
        timeout: Duration::from_secs(a.timeout),
    })
}
