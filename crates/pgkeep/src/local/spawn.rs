//! Starting, finding and stopping the environment's long-running processes.
//!
//! A process is started as `setsid setpriv --reuid=U --regid=G --init-groups --no-new-privs --
//! PROGRAM ARGS`: `setsid` (not a process-group leader, so it does not fork) gives the service
//! its own session, away from the terminal's signals; `setpriv` switches to the service user
//! and execs. The PID std reports is therefore the service's own, and it goes to the PID file.
//!
//! A PID is trusted only after `/proc/<pid>/cmdline` shows the expected program with the
//! expected marker argument (a path inside the environment directory): a stale PID file whose
//! number now belongs to another process is never signalled.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::ServiceUser;

/// `PATH` of every service.
pub const SERVICE_PATH: &str = "/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to recognise a process in `/proc`: the file name of `argv[0]` and one argument that must
/// appear exactly (or as the value of an `--opt=` argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// File name of the program, e.g. `etcd` or `pgkeep`.
    pub program: String,
    /// An argument unique to this member, e.g. its config file or data directory.
    pub marker: String,
}

impl Identity {
    /// True when `argv` (from `/proc/<pid>/cmdline`) is this process.
    pub fn matches(&self, argv: &[String]) -> bool {
        let Some(first) = argv.first() else {
            return false;
        };
        let name = Path::new(first).file_name().and_then(|n| n.to_str());
        name == Some(self.program.as_str())
            && argv.iter().skip(1).any(|a| {
                a == &self.marker
                    || a.split_once('=')
                        .is_some_and(|(k, v)| k.starts_with("--") && v == self.marker)
            })
    }
}

/// One long-running service of the environment.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Display name, e.g. `etcd2` or `agent node1`.
    pub name: String,
    /// The user it runs as.
    pub user: ServiceUser,
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments (never secrets).
    pub args: Vec<OsString>,
    /// `HOME` and working directory.
    pub home: PathBuf,
    /// stdout and stderr are appended here.
    pub log: PathBuf,
    /// Where the PID is recorded.
    pub pid_file: PathBuf,
    /// How to recognise it later.
    pub identity: Identity,
    /// Addresses it listens on, checked free before the start.
    pub listens: Vec<SocketAddr>,
}

/// `argv` of a live (non-zombie) process, `None` when it is gone or unreadable.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// True when `pid` is alive and is the process `id` describes.
pub fn is(pid: u32, id: &Identity) -> bool {
    cmdline(pid).is_some_and(|argv| id.matches(&argv))
}

/// Every live process `id` describes, by scanning `/proc`.
pub fn scan(id: &Identity) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is(*pid, id))
        .collect();
    pids.sort_unstable();
    pids
}

/// The PID recorded in `pid_file`, if the file exists and holds a number.
pub fn read_pid(pid_file: &Path) -> Option<u32> {
    fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// The running process of `spec`: the recorded PID if it really is that process, else one found
/// in `/proc` (the PID file is then rewritten). `None` when it does not run.
pub fn running(pid_file: &Path, id: &Identity) -> Option<u32> {
    if let Some(pid) = read_pid(pid_file)
        && is(pid, id)
    {
        return Some(pid);
    }
    let pid = scan(id).into_iter().next()?;
    let _ = write_pid(pid_file, pid);
    Some(pid)
}

/// The PID on the first line of a file such as `postmaster.pid`.
pub fn read_pid_first_line(file: &Path) -> Option<u32> {
    fs::read_to_string(file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// True when `pid` is a live `postgres` process whose command line names a path under
/// `node_dir` (a postmaster of that node, however it was started).
pub fn is_postmaster_of(pid: u32, node_dir: &Path) -> bool {
    let Some(argv) = cmdline(pid) else {
        return false;
    };
    let joined = argv.join(" ");
    let program = joined.split_whitespace().next().unwrap_or("");
    let name = Path::new(program).file_name().and_then(|n| n.to_str());
    matches!(name, Some("postgres" | "postmaster"))
        && joined.contains(&format!("{}/", node_dir.display()))
}

fn write_pid(pid_file: &Path, pid: u32) -> Result<()> {
    crate::fsutil::write_atomic(pid_file, format!("{pid}\n").as_bytes(), 0o644)
        .with_context(|| format!("writing {}", pid_file.display()))
}

/// Opens `log` for appending (0640, created if missing).
fn open_log(log: &Path) -> Result<fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(log)
        .with_context(|| format!("opening the log {}", log.display()))
}

/// Waits until every address `spec` listens on can be bound again (a stopped server's forked
/// workers may hold its socket until their last request ends), at most `timeout`.
pub fn wait_listen_free(spec: &Spec, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for addr in &spec.listens {
        while let Err(e) = TcpListener::bind(addr) {
            if Instant::now() >= deadline {
                bail!(
                    "{}: {addr} is still in use after {timeout:?} ({e})",
                    spec.name
                );
            }
            sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Starts `spec` and records its PID. The process gets a cleared environment (`HOME`, `USER`,
/// `LOGNAME`, `PATH`, `LANG=C.UTF-8`), stdin from /dev/null and its output appended to the log.
pub fn start(spec: &Spec) -> Result<u32> {
    use std::io::Write;
    for addr in &spec.listens {
        if let Err(e) = TcpListener::bind(addr) {
            bail!(
                "{}: cannot listen on {addr} ({e}); another program uses it",
                spec.name
            );
        }
    }
    let mut out = open_log(&spec.log)?;
    let _ = writeln!(
        out,
        "---- pgkeep: starting {} at {} ----",
        spec.name,
        crate::pki::format_time(time::OffsetDateTime::now_utc())
    );
    let err = out.try_clone().context("duplicating the log descriptor")?;
    let mut cmd = Command::new("/usr/bin/setsid");
    cmd.arg("/usr/bin/setpriv")
        .arg(format!("--reuid={}", spec.user.uid))
        .arg(format!("--regid={}", spec.user.gid))
        .arg("--init-groups")
        .arg("--no-new-privs")
        .arg("--")
        .arg(&spec.program)
        .args(&spec.args)
        .env_clear()
        .env("HOME", &spec.home)
        .env("USER", &spec.user.name)
        .env("LOGNAME", &spec.user.name)
        .env("PATH", SERVICE_PATH)
        .env("LANG", "C.UTF-8")
        .current_dir(&spec.home)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
    let pid = child.id();
    // setsid and setpriv exec in place, so the PID stays; wait (bounded) until the program
    // itself runs, so a check right after this call does not see the launcher and conclude
    // the service exited.
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if is(pid, &spec.identity) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "{} exited at once ({status}); see {}",
                spec.name,
                spec.log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not start within 5 s; see {}",
                spec.name,
                spec.log.display()
            );
        }
        sleep(Duration::from_millis(10));
    }
    // The child is not waited for: it outlives this process (init adopts it).
    drop(child);
    write_pid(&spec.pid_file, pid)?;
    Ok(pid)
}

/// Waits until `pid` has exited (or become another process), at most `timeout`.
pub fn wait_gone(pid: u32, id: &Identity, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is(pid, id) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to `pid` after checking it is the process `id` describes, then waits for its
/// exit (bounded). Ok(true) when it exited, Ok(false) when it still runs after `timeout`.
pub fn stop(pid: u32, id: &Identity, signal: Signal, timeout: Duration) -> Result<bool> {
    if !is(pid, id) {
        return Ok(true);
    }
    let raw = i32::try_from(pid).context("pid out of range")?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => return Ok(true),
        Err(e) => bail!("cannot signal pid {pid}: {e}"),
    }
    Ok(wait_gone(pid, id, timeout))
}

/// Runs `program args` as `user` (cleared environment, `HOME`=`home`) and returns whether it
/// succeeded; for quick permission probes such as `test -x`.
pub fn probe_as(
    user: &ServiceUser,
    home: &Path,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<bool> {
    use std::os::unix::process::CommandExt;
    let status = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .env("HOME", home)
        .current_dir("/")
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {program} as {}", user.name))?;
    Ok(status.success())
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(32 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn identity_matching() {
        let id = Identity {
            program: "etcd".into(),
            marker: "/d/etcd/etcd1/data".into(),
        };
        assert!(id.matches(&argv(&["/usr/bin/etcd", "--data-dir=/d/etcd/etcd1/data"])));
        assert!(!id.matches(&argv(&["/usr/bin/etcd", "--data-dir=/d/etcd/etcd2/data"])));
        assert!(!id.matches(&argv(&[
            "/usr/bin/setpriv",
            "--",
            "/usr/bin/etcd",
            "--data-dir=/d/etcd/etcd1/data"
        ])));
        assert!(!id.matches(&[]));
        let agent = Identity {
            program: "pgkeep".into(),
            marker: "/d/nodes/node1/node.yml".into(),
        };
        assert!(agent.matches(&argv(&[
            "/x/pgkeep",
            "agent",
            "-c",
            "/d/nodes/node1/node.yml"
        ])));
        assert!(!agent.matches(&argv(&[
            "/x/pgkeep",
            "agent",
            "-c",
            "/d/nodes/node11/node.yml"
        ])));
    }

    #[test]
    fn self_is_found_and_foreign_pids_are_not() {
        let me = std::process::id();
        let argv = cmdline(me).unwrap();
        let id = Identity {
            program: Path::new(&argv[0])
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            marker: "--no-such-marker-xyz".into(),
        };
        assert!(!is(me, &id));
    }
}
