//! `pgkeep etcd`: etcd access control of a local environment.
//!
//! ```text
//! pgkeep etcd grant [--dir D] --scope NAME [--namespace /service/] --user NAME
//!                   [--password-file FILE] [--read-only]
//! ```
//!
//! `grant` gives one etcd user access to every key of a scope (`<namespace><scope>/`), as etcd's
//! root user (`D/pki/etcd-root-admin.*`): the role `pgkeep-<scope>` (or `.readonly`) is created
//! where missing, and the user too. A certificate user is the common name of an `etcd-client`
//! certificate (`pgkeep-<name>`, gRPC clients); a password user (`--password-file`, a name with
//! `@`) is for clients of etcd's JSON gateway such as Patroni 3.0.2 and `patronictl`, which
//! present an `etcd-gateway` certificate (no common name) for TLS. The password is read from
//! the file (0600; created with a random password if missing), never from the command line.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use crate::cli::up::DEFAULT_DIR;
use crate::local::etcd_access::{GrantOptions, grant};

/// `pgkeep etcd ...`
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: EtcdCommand,
}

/// The `pgkeep etcd` commands.
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Give an etcd user read-write (or read-only) access to a scope's keys, as etcd's root.
    Grant(GrantArgs),
}

/// `pgkeep etcd grant`.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Environment directory (its etcd members and root certificate).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The scope (cluster name) whose keys the user gets: `<namespace><scope>/`.
    #[arg(long, value_name = "NAME")]
    pub scope: String,
    /// The scope's namespace.
    #[arg(long, value_name = "PREFIX", default_value = "/service/")]
    pub namespace: String,
    /// The etcd user: `pgkeep-<name>` (an etcd-client certificate's common name), or with
    /// --password-file a password user whose name contains '@' (e.g. patroni@patroni).
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// The password user's password (first line; 0600). Created with a random password if it
    /// does not exist.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Read only (role `pgkeep-<scope>.readonly`) instead of read and write.
    #[arg(long)]
    pub read_only: bool,
}

/// Runs `pgkeep etcd`.
pub fn run(args: EtcdArgs) -> Result<()> {
    match args.command {
        EtcdCommand::Grant(a) => {
            if !nix::unistd::geteuid().is_root() {
                bail!(
                    "pgkeep etcd grant must run as root: it uses etcd's root certificate in {}/pki",
                    a.dir.display()
                );
            }
            grant(&GrantOptions {
                dir: a.dir,
                scope: a.scope,
                namespace: a.namespace,
                user: a.user,
                password_file: a.password_file,
                read_only: a.read_only,
            })
        }
    }
}
