//! The PostgreSQL edge: running initdb, the postmaster, pg_basebackup and pg_rewind, and
//! reading what PostgreSQL leaves on disk. Decisions about *when* to do any of this are made
//! in `pgkeep_core`; this module only does it, with deadlines, and reports what happened.
//!
//! Configuration lives outside the data directory: the postmaster is started with
//! `-D <config_dir>`, and `config_dir/postgresql.conf` names the data directory, so a clone or
//! rewind never copies another node's configuration or keys.

pub mod fence;
pub mod observe;
pub mod parse;
pub mod run;

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

pub use parse::{ClusterState, ControlData, PostmasterPid};
pub use run::{RunAs, RunError, Runner};

/// Errors of PostgreSQL operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// A tool failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Output or a file did not parse.
    #[error("{0}")]
    Parse(String),
    /// The postmaster exited during start-up.
    #[error("postgres exited during start-up ({status}); log tail:\n{log_tail}")]
    StartFailed {
        /// Exit status.
        status: String,
        /// The end of the server log.
        log_tail: String,
    },
    /// A wait ran out.
    #[error("{what} did not happen within {timeout:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PgError + '_ {
    move |source| PgError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to shut the postmaster down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for sessions to end.
    Smart,
    /// SIGINT: abort sessions, write a shutdown checkpoint.
    Fast,
    /// SIGQUIT: no checkpoint; crash recovery on the next start. Used to fence.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// One node's PostgreSQL: where its binaries, data and configuration are.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Runs PostgreSQL's programs.
    pub runner: Runner,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where postgresql.conf, pg_hba.conf and pg_ident.conf are rendered.
    pub config_dir: PathBuf,
    /// Where the server's stderr goes.
    pub log_file: PathBuf,
}

impl Instance {
    /// True when the data directory holds an initialised cluster.
    pub fn is_initialised(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
            && self.data_dir.join("global/pg_control").is_file()
    }

    /// True when the data directory is missing or empty.
    pub fn data_dir_is_empty(&self) -> Result<bool, PgError> {
        match std::fs::read_dir(&self.data_dir) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io_err(&self.data_dir)(e)),
        }
    }

    /// Runs initdb with data checksums and scram-sha-256; `extra` comes from
    /// `bootstrap.initdb` (already checked). The superuser gets no password: it logs in by peer
    /// authentication over the Unix socket only.
    pub async fn initdb(
        &self,
        superuser: &str,
        extra: &[String],
        timeout: Duration,
    ) -> Result<(), PgError> {
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "--data-checksums".into(),
            "--auth-local=peer".into(),
            "--auth-host=scram-sha-256".into(),
            format!("--username={superuser}").into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        self.runner.run("initdb", &args, &[], timeout).await?;
        Ok(())
    }

    /// Reads pg_control.
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let out = self
            .runner
            .run(
                "pg_controldata",
                &[self.data_dir.clone().into()],
                &[],
                Duration::from_secs(30),
            )
            .await?;
        parse::parse_controldata(&out.stdout).map_err(PgError::Parse)
    }

    /// Reads `postmaster.pid`, if present.
    pub fn postmaster_pid(&self) -> Result<Option<PostmasterPid>, PgError> {
        let path = self.data_dir.join("postmaster.pid");
        match std::fs::read_to_string(&path) {
            Ok(text) => parse::parse_postmaster_pid(&text)
                .map(Some)
                .map_err(PgError::Parse),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The postmaster serving this data directory, if one is running. A stale pid file (the
    /// PID now belongs to another program, or to a postgres serving another directory) gives
    /// `None`, so pgkeep never signals a process that is not its postmaster.
    pub fn running_postmaster(&self) -> Result<Option<PostmasterPid>, PgError> {
        let Some(pm) = self.postmaster_pid()? else {
            return Ok(None);
        };
        // The command line identifies it: a recycled PID belongs to another program or to a
        // postgres of another directory, and one directory has one postmaster (its lock file).
        // Start times are not compared: `/proc/stat`'s btime moves with every wall-clock step,
        // and a step must never hide a running primary from fencing.
        let ours = is_postmaster_of(pm.pid, &self.config_dir, &self.data_dir);
        Ok(ours.then_some(pm))
    }

    /// Starts the postmaster in its own process group (so signals to the agent do not reach it,
    /// and it survives an agent restart), with stderr appended to the log file, and waits until
    /// it accepts connections (`ready`, or `standby` for a hot standby).
    pub async fn start(&self, timeout: Duration) -> Result<PostmasterPid, PgError> {
        // The log holds queries, audit lines and error details: owner-only, also for a file an
        // older version created with the umask's mode.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log_file)
            .map_err(io_err(&self.log_file))?;
        log.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&self.log_file))?;
        let log2 = log.try_clone().map_err(io_err(&self.log_file))?;
        let mut cmd = self.runner.server_command("postgres");
        cmd.arg("-D")
            .arg(&self.config_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| {
            PgError::Run(RunError::Spawn {
                program: self.runner.program("postgres").display().to_string(),
                source,
            })
        })?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io_err(&self.log_file))? {
                return Err(PgError::StartFailed {
                    status: status.to_string(),
                    log_tail: self.log_tail(),
                });
            }
            if let Some(pm) = self.postmaster_pid()?
                && pm.pid == child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(-1)
                && matches!(pm.status.as_deref(), Some("ready" | "standby"))
            {
                // The postmaster is deliberately not awaited: it outlives this handle, and the
                // agent finds it again through postmaster.pid.
                drop(child);
                return Ok(pm);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Timeout {
                    what: "postgres accepting connections".into(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the running postmaster with `mode` and waits until it has exited. Returns false
    /// when none was running. On timeout the caller decides whether to escalate.
    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<bool, PgError> {
        let Some(pm) = self.running_postmaster()? else {
            return Ok(false);
        };
        let pid = Pid::from_raw(pm.pid);
        if signal::kill(pid, mode.signal()).is_err() {
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while process_exists(pm.pid) {
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Timeout {
                    what: format!("postgres (pid {}) stopping", pm.pid),
                    timeout,
                });
            }
            // Short: during a switchover every millisecond of this wait is write outage.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(true)
    }

    /// The end of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        std::fs::read(&self.log_file)
            .map(|b| run::tail(&String::from_utf8_lossy(&b), 3000))
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_file.display()))
    }
}

/// True when `pid` is alive and is a `postgres` started with `-D config_dir` (or `-D data_dir`).
fn is_postmaster_of(pid: i32, config_dir: &Path, data_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_postgres = args.first().is_some_and(|a| a.ends_with(b"postgres"));
    let dir = args
        .windows(2)
        .find(|w| w[0] == b"-D")
        .map(|w| Path::new(OsStr::from_bytes(w[1])));
    is_postgres && dir.is_some_and(|d| d == config_dir || d == data_dir)
}

fn process_exists(pid: i32) -> bool {
    // A zombie child still "exists" for kill(0); /proc shows its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
