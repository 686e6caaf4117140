//! `pgkeep config check`: validate a node's configuration and print it with secrets redacted.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::{Config, effective_yaml};

/// `pgkeep config ...`
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration (secrets redacted).
    Check {
        /// The node's configuration file.
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Only validate; print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
}

/// Runs `pgkeep config`.
pub fn run(args: ConfigArgs) -> Result<()> {
    match args.command {
        ConfigCommand::Check { config, quiet } => {
            let c = Config::load(&config)?;
            for flag in c.insecure.active() {
                eprintln!("warning: insecure override in force: {flag}");
            }
            if !quiet {
                print!("{}", effective_yaml(&c));
            }
            Ok(())
        }
    }
}
