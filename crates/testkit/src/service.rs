//! Starting processes inside the environment's cgroup as a service user, and handles to them.
//!
//! Every process goes through `/bin/sh -c` with a tiny script that writes its own pid (`$$`) into
//! the cgroup's `cgroup.procs` and then `exec`s `setpriv` (switch uid, gid and supplementary
//! groups, set no_new_privs), which `exec`s the program. No fork happens on the way, so the pid
//! std reports for the child is the service's own pid, and the process is in the cgroup before
//! the program starts. The environment is cleared; only the variables given are set.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env::ServiceUser;

/// Joins the cgroup, then drops to the service user (or stays root for uid 0) and execs.
const SPAWN_SCRIPT: &str = r#"p=$1; u=$2; g=$3; shift 3
echo $$ > "$p" || { echo "pgkeep-testkit: cannot join cgroup $p" >&2; exit 125; }
[ "$u" = 0 ] && exec "$@"
exec /usr/bin/setpriv --reuid="$u" --regid="$g" --init-groups --no-new-privs -- "$@""#;

/// PATH given to every process the harness starts.
pub(crate) const SERVICE_PATH: &str = "/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the command that runs `program args` in the cgroup `cgroup` as `user`, with a cleared
/// environment (HOME=`home`, USER, LOGNAME, PATH, LANG=C.UTF-8, plus `envs`) and `home` as the
/// working directory.
pub(crate) fn command(
    cgroup: &Path,
    user: &ServiceUser,
    home: &Path,
    program: impl AsRef<OsStr>,
    args: &[&OsStr],
    envs: &[(&str, &OsStr)],
) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(SPAWN_SCRIPT)
        .arg("pgkeep-spawn")
        .arg(cgroup.join("cgroup.procs"))
        .arg(user.uid.to_string())
        .arg(user.gid.to_string())
        .arg(program)
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("PATH", SERVICE_PATH)
        .env("LANG", "C.UTF-8")
        .current_dir(home)
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

struct State {
    child: Child,
    status: Option<ExitStatus>,
}

impl State {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }
}

/// A long-running process started by the harness (an etcd member, a postmaster).
///
/// Dropping the handle kills the process (SIGKILL) and reaps it; the environment's teardown
/// kills whatever else is left in its cgroup.
pub struct Service {
    name: String,
    pid: u32,
    log: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("log", &self.log)
            .finish()
    }
}

impl Service {
    /// Spawns `cmd` (built by [`command`]) with stdout and stderr appended to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Service> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Service {
            name: name.to_string(),
            pid: child.id(),
            log: log.to_path_buf(),
            state: Mutex::new(State {
                child,
                status: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service's name within the environment (e.g. `etcd2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service's own pid (no wrapper process in between).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file receiving the service's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the service's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Sends `signal` to the service. Does nothing if it has already exited (the pid is never
    /// signalled after the process was reaped, so a reused pid cannot be hit).
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let mut st = self.state();
        if st.poll().is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("kill -{signal} {} ({})", self.pid, self.name))
    }

    /// Waits until the service exits, at most `timeout`; returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.state().poll() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}",
                    self.name,
                    self.pid
                );
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// The exit status, if the service has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.state().poll()
    }

    /// True while the service has not exited.
    pub fn is_running(&self) -> bool {
        self.state().poll().is_none()
    }

    /// SIGKILL, then wait (bounded) for the exit.
    pub(crate) fn kill_and_reap(&self) {
        if self.is_running() {
            let _ = self.kill(Signal::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let s = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Output of a short command the harness ran to completion.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl CommandOutput {
    /// True if the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Fails with the status, stdout and stderr unless the command succeeded.
    pub fn ensure_success(self, what: &str) -> Result<CommandOutput> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "{what} failed ({}):\nstdout: {}\nstderr: {}",
                self.status,
                self.stdout.trim_end(),
                self.stderr.trim_end()
            )
        }
    }
}

/// Runs `cmd` to completion with output captured in anonymous temp files under `tmp_dir`,
/// killing it after `timeout`.
pub(crate) fn run(mut cmd: Command, tmp_dir: &Path, timeout: Duration) -> Result<CommandOutput> {
    let mut out = tempfile::tempfile_in(tmp_dir).context("temp file for stdout")?;
    let mut err = tempfile::tempfile_in(tmp_dir).context("temp file for stderr")?;
    let mut child = cmd
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut so = String::new();
            let _ = out
                .seek(SeekFrom::Start(0))
                .map(|_| out.read_to_string(&mut so));
            let mut se = String::new();
            let _ = err
                .seek(SeekFrom::Start(0))
                .map(|_| err.read_to_string(&mut se));
            bail!("timed out after {timeout:?}: {cmd:?}\nstdout: {so}\nstderr: {se}");
        }
        sleep(Duration::from_millis(10));
    };
    let read = |f: &mut File| -> Result<String> {
        f.seek(SeekFrom::Start(0))?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    };
    Ok(CommandOutput {
        status,
        stdout: read(&mut out)?,
        stderr: read(&mut err)?,
    })
}
