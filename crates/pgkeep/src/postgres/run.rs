//! The one way pgkeep runs a PostgreSQL tool: a cleared environment, stdout and stderr read
//! concurrently, a deadline, and a typed error that carries the tool's own words.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Why a tool run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("{program} did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The deadline.
        timeout: Duration,
    },
    /// It exited unsuccessfully.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
}

/// Which OS identity tools run as. The agent runs as `postgres` and uses [`RunAs::Current`];
/// root-only callers (`pgkeep up`, tests) switch to the service user for each command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// The current user.
    Current,
    /// Another user (requires root). Supplementary groups are dropped.
    User {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
}

/// Runs programs from one directory (PostgreSQL's `bin_dir`) with a fixed environment.
#[derive(Debug, Clone)]
pub struct Runner {
    bin_dir: Option<PathBuf>,
    run_as: RunAs,
    home: PathBuf,
    /// Set for the postmaster only (see [`Runner::server_command`]).
    server_env: Vec<(&'static str, OsString)>,
}

/// What a successful run printed.
#[derive(Debug)]
pub struct RunOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Runner {
    /// A runner for programs in `bin_dir` (or on `PATH` when `None`). `home` becomes `HOME` and
    /// the working directory.
    pub fn new(bin_dir: Option<PathBuf>, run_as: RunAs, home: PathBuf) -> Runner {
        Runner {
            bin_dir,
            run_as,
            home,
            server_env: Vec::new(),
        }
    }

    /// The CA file the server's LDAP client trusts: pg_hba `ldap` authentication over TLS
    /// (`ldapscheme=ldaps`, `ldaptls=1`) verifies the LDAP server's certificate against it, and
    /// against nothing else (`LDAPTLS_CACERT` overrides `/etc/ldap/ldap.conf`; libldap reads it
    /// in each backend, so a renewed file is used without a restart). `LDAPTLS_REQCERT=demand`
    /// refuses a server whose certificate does not verify or does not name it, whatever
    /// `ldap.conf` says.
    pub fn with_ldap_ca_file(mut self, ca: Option<PathBuf>) -> Runner {
        self.server_env.retain(|(k, _)| !k.starts_with("LDAPTLS_"));
        if let Some(ca) = ca {
            self.server_env
                .push(("LDAPTLS_CACERT", ca.into_os_string()));
            self.server_env.push(("LDAPTLS_REQCERT", "demand".into()));
        }
        self
    }

    /// The full path of a PostgreSQL program.
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// A command with pgkeep's environment: nothing inherited but a fixed `PATH`, `HOME`, and
    /// `LC_ALL=C` so tool output parses the same everywhere.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("LC_ALL", "C")
            .env("PGSYSCONFDIR", &self.home)
            .current_dir(&self.home)
            .stdin(Stdio::null());
        if let RunAs::User { uid, gid } = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// [`Runner::command`] plus the server's own environment (the LDAP client's trust, see
    /// [`Runner::with_ldap_ca_file`]): for the postmaster, the one program that authenticates
    /// clients. Other tools (initdb, pg_basebackup, pg_rewind, single-user recovery) accept no
    /// connections and do without it.
    pub fn server_command(&self, name: &str) -> Command {
        let mut cmd = self.command(name);
        for (k, v) in &self.server_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `name args...` to completion within `timeout`.
    pub async fn run(
        &self,
        name: &str,
        args: &[OsString],
        extra_env: &[(&str, &Path)],
        timeout: Duration,
    ) -> Result<RunOutput, RunError> {
        let mut cmd = self.command(name);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let program = self.program(name).display().to_string();
        let child = cmd.spawn().map_err(|source| RunError::Spawn {
            program: program.clone(),
            source,
        })?;
        // wait_with_output reads both pipes concurrently, so a chatty stderr cannot block it.
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|source| RunError::Spawn {
                program: program.clone(),
                source,
            })?,
            // Dropping the future drops the child, and kill_on_drop kills it.
            Err(_) => return Err(RunError::Timeout { program, timeout }),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(RunError::Failed {
                program,
                status: output.status,
                stderr: tail(&stderr, 2000),
            });
        }
        Ok(RunOutput { stdout, stderr })
    }
}

/// The last `max` bytes of `s`, on a character boundary.
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim_end();
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> Runner {
        Runner::new(Some("/bin".into()), RunAs::Current, std::env::temp_dir())
    }

    #[tokio::test]
    async fn failure_carries_stderr_and_environment_is_cleared() {
        let r = runner();
        // cargo and nextest set CARGO_PKG_NAME for the test process; the child must not see it.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let script = [
            "-c".into(),
            "echo $LC_ALL; echo ${CARGO_PKG_NAME:-none}".into(),
        ];
        let out = r
            .run("sh", &script, &[], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out.stdout, "C\nnone\n");
        let failing = ["-c".into(), "echo boom >&2; exit 3".into()];
        let err = r
            .run("sh", &failing, &[], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("boom") && err.to_string().contains("exit status: 3"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn only_the_server_command_gets_the_ldap_trust() {
        let r = runner().with_ldap_ca_file(Some("/etc/pgkeep/ca.crt".into()));
        let script = "echo ${LDAPTLS_CACERT:-none} ${LDAPTLS_REQCERT:-none}";
        let out = r
            .server_command("sh")
            .args(["-c", script])
            .output()
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/etc/pgkeep/ca.crt demand\n"
        );
        let out = r
            .run(
                "sh",
                &["-c".into(), script.into()],
                &[],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(out.stdout, "none none\n");
        let cleared = r.with_ldap_ca_file(None);
        let out = cleared
            .server_command("sh")
            .args(["-c", script])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "none none\n");
    }

    #[tokio::test]
    async fn deadline_kills_the_child() {
        let r = runner();
        let started = std::time::Instant::now();
        let err = r
            .run("sleep", &["30".into()], &[], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("short\n", 10), "short");
        assert_eq!(tail("ééééé", 3), "...é");
    }
}
