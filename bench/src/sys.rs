//! OS plumbing: wall-clock time, service users, cgroup v2 groups, commands run as a service
//! user inside a cgroup, and stopping what the harness started by PID.
//!
//! Every process the harness starts goes into a cgroup below one group per run
//! (`/sys/fs/cgroup/unified/pgkeep-bench/run-<pid>/<host>`), so a "host" (agent + PostgreSQL)
//! can be killed at once with `cgroup.kill`, and cleanup finds whatever is left.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where cgroup v2 is mounted on this machine (hybrid hierarchy).
pub const CGROUP2: &str = "/sys/fs/cgroup/unified";
/// `PATH` of every service and command run as a service user.
pub const SERVICE_PATH: &str = "/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// PostgreSQL 15 binaries (Debian layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Services started in the background; reaped so they do not linger as zombies.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Wall-clock time in seconds since the epoch (every timestamp of the harness).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `(year, month, day, hour, minute, second)` in UTC of epoch seconds `t`.
fn civil(t: f64) -> (i64, i64, i64, i64, i64, i64) {
    let secs = t.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = pgkeep_core::ops::backup_schedule::civil_from_days(days);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `20261129T142233Z`: file-name friendly UTC time.
pub fn utc_stamp(t: f64) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `2026-11-29 14:22:33 UTC`.
pub fn utc_text(t: f64) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// An OS user a service runs as.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

impl User {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<User> {
        let u = nix::unistd::User::from_name(name)
            .with_context(|| format!("looking up the OS user {name}"))?
            .with_context(|| format!("there is no OS user {name}"))?;
        Ok(User {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
        })
    }

    /// Makes `path` owned by this user and its primary group.
    pub fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} {}", self.name, path.display()))
    }
}

/// Creates `path` (and parents) with `mode`, owned by `owner` if given.
pub fn mkdir(path: &Path, mode: u32, owner: Option<&User>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    if let Some(u) = owner {
        u.chown(path)?;
    }
    Ok(())
}

/// Writes `text` to a new or truncated `path` with `mode`, owned by `owner` if given.
pub fn write_file(path: &Path, text: &str, mode: u32, owner: Option<&User>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(u) = owner {
        u.chown(path)?;
    }
    Ok(())
}

/// A random lower-case hex string of `bytes` random bytes (passwords, serial numbers).
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting at most `wait`.
pub fn lock(path: &Path, wait: Duration) -> Result<Flock<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, e)) => bail!(
                "cannot lock {}: {e} (another run holds it?)",
                path.display()
            ),
        }
    }
}

/// True when `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    reap();
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Collects the exit status of finished background services.
pub fn reap() {
    if let Ok(mut v) = CHILDREN.lock() {
        v.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
    }
}

/// Sends `sig` to `pid` if it is alive.
pub fn signal(pid: u32, sig: Signal) {
    if alive(pid)
        && let Ok(raw) = i32::try_from(pid)
    {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// SIGTERM, then SIGKILL after `grace`: stops a process the harness started. True when gone.
pub async fn terminate(pid: u32, grace: Duration) -> bool {
    signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(pid, Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(200)).await;
    !alive(pid)
}

/// The PIDs in cgroup `dir` (its own `cgroup.procs`).
pub fn cgroup_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The WAL senders among the processes of cgroup `dir` (process title
/// `postgres: [cluster: ]walsender ...`).
pub fn walsenders(dir: &Path) -> Vec<u32> {
    cgroup_procs(dir)
        .into_iter()
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let title = String::from_utf8_lossy(&c);
                title.starts_with("postgres: ") && title.contains("walsender ")
            })
        })
        .collect()
}

/// SIGKILLs every process of cgroup `dir` at once (`cgroup.kill`).
pub fn cgroup_kill(dir: &Path) -> Result<()> {
    fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", dir.display()))
}

/// Waits until cgroup `dir` holds no process, at most `timeout`.
pub async fn cgroup_wait_empty(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        reap();
        if cgroup_procs(dir).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The run's cgroups: `<CGROUP2>/pgkeep-bench/<run>/<group>`.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// The run's parent group.
    pub root: PathBuf,
}

impl Cgroups {
    /// The parent of every run's group.
    pub fn base() -> PathBuf {
        Path::new(CGROUP2).join("pgkeep-bench")
    }

    /// Creates the run's parent group; fails when cgroup v2 is not writable.
    pub fn create(run: &str) -> Result<Cgroups> {
        if !Path::new(CGROUP2).join("cgroup.procs").exists() {
            bail!("cgroup v2 is not mounted at {CGROUP2}; it is needed to kill a host at once");
        }
        let root = Cgroups::base().join(run);
        fs::create_dir_all(&root).with_context(|| format!("creating cgroup {}", root.display()))?;
        Ok(Cgroups { root })
    }

    /// The group `name` (created if missing).
    pub fn group(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        Ok(dir)
    }

    /// Kills everything in every group of the run and removes the groups (bounded).
    pub async fn remove(&self) {
        remove_tree(&self.root).await;
    }
}

/// Kills every process in cgroup `dir` and below and removes the groups, deepest first.
pub async fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let children: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    for c in &children {
        Box::pin(remove_tree(c)).await;
    }
    if !cgroup_procs(dir).is_empty() {
        let _ = cgroup_kill(dir);
        cgroup_wait_empty(dir, Duration::from_secs(10)).await;
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

/// A command: run as `user` (cleared environment) and inside `cgroup` when given.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    user: Option<User>,
    cgroup: Option<PathBuf>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    timeout: Duration,
}

impl Cmd {
    /// `program` with no arguments, as root, 120 s budget.
    pub fn new(program: impl AsRef<str>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            user: None,
            cgroup: None,
            env: Vec::new(),
            cwd: None,
            timeout: Duration::from_secs(120),
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Runs as `user` through `setsid setpriv` (own session, cleared environment).
    pub fn user(mut self, user: &User) -> Cmd {
        self.user = Some(user.clone());
        self
    }

    /// Starts inside cgroup `dir` (descendants stay there).
    pub fn cgroup(mut self, dir: &Path) -> Cmd {
        self.cgroup = Some(dir.to_owned());
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, k: &str, v: impl AsRef<str>) -> Cmd {
        self.env.push((k.to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Working directory (default: the user's home, or the current one for root).
    pub fn cwd(mut self, dir: &Path) -> Cmd {
        self.cwd = Some(dir.to_owned());
        self
    }

    /// Budget of [`Cmd::output`].
    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }

    /// The command line for logs.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The wrapped command: `sh -c 'echo $$ > CG/cgroup.procs && exec "$@"'` puts the shell
    /// (and so everything it execs) in the cgroup; `setsid` does not fork (the child is no
    /// group leader) and `setpriv` execs, so the PID stays the service's own.
    fn command(&self) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if let Some(u) = &self.user {
            argv.extend([
                "/usr/bin/setsid".into(),
                "/usr/bin/setpriv".into(),
                format!("--reuid={}", u.uid),
                format!("--regid={}", u.gid),
                "--init-groups".into(),
                "--no-new-privs".into(),
                "--".into(),
            ]);
        }
        argv.push(self.program.clone());
        argv.extend(self.args.iter().cloned());
        let mut c = match &self.cgroup {
            Some(cg) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(cg)
                    .args(&argv);
                c
            }
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        if let Some(u) = &self.user {
            c.env_clear()
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .env("PATH", SERVICE_PATH)
                .env("LANG", "C.UTF-8");
            c.current_dir(self.cwd.as_deref().unwrap_or(Path::new("/")));
        } else if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.stdin(Stdio::null());
        c
    }

    /// Runs to completion within the budget; stdout + stderr, or an error with both.
    pub async fn output(&self) -> Result<String> {
        let mut c = tokio::process::Command::from(self.command());
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = tokio::time::timeout(self.timeout, c.output())
            .await
            .with_context(|| format!("{} took longer than {:?}", self.display(), self.timeout))?
            .with_context(|| format!("running {}", self.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "{} failed ({}):\n{}",
                self.display(),
                out.status,
                tail(&text, 25)
            );
        }
        Ok(text)
    }

    /// Starts a long-running service with its output appended to `log`; returns its PID once
    /// the program itself runs (the wrappers have exec'd).
    pub async fn spawn(&self, log: &Path) -> Result<u32> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut c = self.command();
        c.stdout(out).stderr(err);
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", self.display()))?;
        let pid = child.id();
        if let Ok(mut v) = CHILDREN.lock() {
            v.push(child);
        }
        let name = Path::new(&self.program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let argv = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // A program that rewrote its process title (`nginx: master process …`) counts too.
            let titled = argv.starts_with(format!("{name}: ").as_bytes());
            let runs = titled
                || argv.split(|b| *b == 0).any(|a| {
                    Path::new(&*String::from_utf8_lossy(a)).file_name() == Some(name.as_ref())
                });
            let wrapped = argv.starts_with(b"/bin/sh\0") || argv.starts_with(b"/usr/bin/set");
            if runs && !wrapped {
                return Ok(pid);
            }
            if !alive(pid) {
                bail!("{} exited at once; see {}", self.display(), log.display());
            }
            if Instant::now() >= deadline {
                bail!("{} did not start within 5 s", self.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails unless `127.0.0.1:port` can be bound now.
pub fn check_port_free(port: u16) -> Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .with_context(|| format!("127.0.0.1:{port} is in use; pass another --port-base"))
}

/// The lock every editor of pgkeep's `/etc/hosts` blocks holds (`pgkeep up`, the harness).
pub const HOSTS_LOCK: &str = "/var/tmp/pgkeep-test/.hosts.lock";

/// Removes the marked `/etc/hosts` block of the pgkeep environment in `dir` if one is left
/// (`pgkeep down --purge` normally removes it). True when a block was removed.
pub fn remove_hosts_block(dir: &Path) -> Result<bool> {
    if let Some(parent) = Path::new(HOSTS_LOCK).parent() {
        fs::create_dir_all(parent)?;
    }
    let _lock = lock(Path::new(HOSTS_LOCK), Duration::from_secs(30))?;
    let text = fs::read_to_string("/etc/hosts")?;
    let Some(kept) = without_block(&text, dir) else {
        return Ok(false);
    };
    // In place: /etc/hosts may be a bind mount that cannot be renamed over.
    fs::write("/etc/hosts", kept)?;
    Ok(true)
}

/// `text` without the `# BEGIN pgkeep …` … `# END pgkeep …` block whose `# dir` line names
/// `dir`; None when there is no such block.
pub fn without_block(text: &str, dir: &Path) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let want = format!("# dir {}", dir.display());
    let at = lines.iter().position(|l| l.trim_end() == want)?;
    let begin = (0..at)
        .rev()
        .find(|&i| lines[i].starts_with("# BEGIN pgkeep "))?;
    let tag = lines[begin].trim_start_matches("# BEGIN ").trim_end();
    let end = (at..lines.len())
        .find(|&i| lines[i].trim_end() == format!("# END {tag}"))
        .unwrap_or(at);
    let mut out: Vec<&str> = lines[..begin].to_vec();
    out.extend_from_slice(&lines[end + 1..]);
    Some(out.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time() {
        assert_eq!(utc_text(0.0), "1970-01-01 00:00:00 UTC");
        // 2026-11-29 14:22:33 UTC
        assert_eq!(utc_stamp(1_795_962_153.4), "20261129T142233Z");
        assert_eq!(utc_text(951_782_400.0), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn hosts_block_removal() {
        let text = "127.0.0.1 localhost\n# BEGIN pgkeep ab12\n# net 127.42.1.0/24\n# dir /w/pgkeep\n127.42.1.11 node1.x\n# END pgkeep ab12\n10.0.0.1 other\n";
        assert_eq!(
            without_block(text, Path::new("/w/pgkeep")).unwrap(),
            "127.0.0.1 localhost\n10.0.0.1 other\n"
        );
        assert!(without_block(text, Path::new("/w/other")).is_none());
    }

    #[test]
    fn command_wrapping() {
        let u = User {
            name: "postgres".into(),
            uid: 100,
            gid: 101,
            home: "/var/lib/postgresql".into(),
        };
        let c = Cmd::new("/usr/bin/patroni")
            .args(["x.yml"])
            .user(&u)
            .cgroup(Path::new("/cg/n1"));
        let cmd = c.command();
        let argv: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "/bin/sh");
        assert_eq!(argv[2], "/cg/n1");
        assert_eq!(argv[3], "/usr/bin/setsid");
        assert!(argv.contains(&"--reuid=100".to_string()));
        assert_eq!(argv.last().unwrap(), "x.yml");
    }
}
