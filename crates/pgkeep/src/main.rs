//! The `pgkeep` binary: argument parsing and dispatch. Exit status: 0 success, 1 failure
//! (the error and its causes are printed to stderr), 2 usage error (from clap).

use clap::{Parser, Subcommand};
use pgkeep::cli;

/// pgkeep: a secure, highly available PostgreSQL cluster manager.
#[derive(Debug, Parser)]
#[command(name = "pgkeep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HA agent for one node (as the PostgreSQL OS user).
    Agent {
        /// The node's configuration file.
        #[arg(short = 'c', long = "config")]
        config: std::path::PathBuf,
        /// Log format, overriding `log.format` of the file: `text` for people, `json` (one
        /// object per line) for log collectors.
        #[arg(long, value_enum)]
        log_format: Option<pgkeep::config::LogFormat>,
    },
    /// Validate configuration files.
    Config(cli::config::ConfigArgs),
    /// Certificate authority and certificates.
    Pki(cli::pki::PkiArgs),
    /// Bring up the local secure environment (3 etcd members, 3 nodes) in a directory.
    Up(cli::up::UpArgs),
    /// Stop the local environment (keeps the data unless --purge).
    Down(cli::up::DownArgs),
    /// Operator CLI: list, switch over, pause, restart, reinitialize, edit the configuration.
    Ctl(cli::ctl::CtlArgs),
    /// Configuration for the components around the cluster (HAProxy, etcd), printed to stdout.
    Render(cli::render::RenderArgs),
    /// etcd access control of a local environment: grant a user a scope's keys.
    Etcd(cli::etcd::EtcdArgs),
    /// Backups with pgBackRest: run, list, check, verify.
    Backup(cli::backup::BackupArgs),
    /// Restore the cluster to a point in time from the pgBackRest repository (new timeline).
    Restore(cli::backup::RestoreArgs),
    /// Security assessment of a local environment: checks with evidence, remedies and a score.
    Audit(cli::audit::AuditArgs),
    /// Run scheduled backups on the pgBackRest repository host (as the pgbackrest user).
    BackupScheduler {
        /// The scheduler's configuration file.
        #[arg(short = 'c', long = "config")]
        config: std::path::PathBuf,
    },
    /// The fence guard the agent starts beside itself (not for direct use).
    #[command(hide = true)]
    FenceGuard {
        /// The state file the agent writes.
        #[arg(long)]
        state: std::path::PathBuf,
        /// PostgreSQL's configuration directory.
        #[arg(long)]
        config_dir: std::path::PathBuf,
        /// PostgreSQL's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // The fence guard's own start, before the CLI parser and the TLS provider: it needs neither,
    // and what it never runs stays out of its memory for the agent's whole life.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(guard) = pgkeep::guard::GuardArgs::from_argv(&argv) {
        return exit(run_guard(&guard));
    }
    // One crypto provider for every TLS user in the process (rustls, tonic, reqwest).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Cli::parse();
    let result = match args.command {
        Command::Agent { config, log_format } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(pgkeep::agent::run(&config, log_format))),
        Command::Config(a) => cli::config::run(a),
        Command::Pki(a) => cli::pki::run(a),
        Command::Up(a) => cli::up::run_up(a),
        Command::Down(a) => cli::up::run_down(a),
        Command::Ctl(a) => cli::ctl::run(a),
        Command::Render(a) => cli::render::run(a),
        Command::Etcd(a) => cli::etcd::run(a),
        Command::Backup(a) => cli::backup::run(a),
        Command::Restore(a) => cli::backup::run_restore(a),
        Command::Audit(a) => cli::audit::run(a),
        Command::BackupScheduler { config } => run_scheduler(&config),
        Command::FenceGuard {
            state,
            config_dir,
            data_dir,
        } => run_guard(&pgkeep::guard::GuardArgs {
            state,
            config_dir,
            data_dir,
        }),
    };
    exit(result)
}

fn run_scheduler(config: &std::path::Path) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let cfg = pgkeep::scheduler::SchedulerConfig::load(config)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(pgkeep::scheduler::run(cfg))
}

fn run_guard(args: &pgkeep::guard::GuardArgs) -> anyhow::Result<()> {
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // Its stderr is the agent's: the same format.
    let _ = if std::env::var_os(pgkeep::guard::LOG_FORMAT_ENV).is_some_and(|f| f == "json") {
        log.json().try_init()
    } else {
        log.try_init()
    };
    pgkeep::guard::run(args)
}

fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
