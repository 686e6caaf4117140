//! The fence guard: a small process beside each agent that stops the lease holder's PostgreSQL
//! when the lease deadline passes and the agent has not renewed it — because the agent was
//! killed, frozen (SIGSTOP, a stuck SQL call, swapped out), or its runtime hangs.
//!
//! Why a process and not only a thread of the agent: a thread shares the agent's fate. A
//! `SIGSTOP`ped or `SIGKILL`ed agent takes every thread with it, and that is exactly when
//! PostgreSQL must stop committing before a replica is promoted. Patroni needs a hardware
//! watchdog for this case; the guard closes it without one (a watchdog still covers a frozen
//! *kernel*, see [`crate::config`]'s `watchdog`).
//!
//! # Protocol
//!
//! The agent writes one line to a state file in the node's configuration directory after every
//! decision that changes it (replaced by rename, so a reader never sees half a line):
//!
//! - `armed <deadline> <agent-pid>`: this node holds the lease until `<deadline>`, milliseconds
//!   on `CLOCK_BOOTTIME` (monotonic, counts suspend, the same for every process of the host; no
//!   wall clock is involved);
//! - `disarmed <agent-pid>`: this node does not lead, or the cluster is paused (the guard never
//!   acts in pause mode, so agents can be restarted without touching PostgreSQL).
//!
//! The guard reads the file every 100 ms at most (sooner when the deadline is nearer). Once
//! `deadline` has passed it fences ([`crate::postgres::fence`]) any postmaster of this data
//! directory that is not a standby (no `standby.signal`), at every look: also one started later
//! under the same deadline (an agent thawed in the middle of a start), and whether the agent
//! lives or not. Only a newer line stops that: `armed` with a later deadline (the agent renewed,
//! and writes it before it promotes or starts a primary) or `disarmed`. A standby is never
//! stopped: it cannot commit, and the agent may start one (as a replica) before its next line.
//! The guard exits when the file says `disarmed` and the agent named there is gone (a guard whose
//! agent died past its deadline stays until a new agent settles the line at its start). One
//! guard serves a node: it holds an exclusive `flock` on `<state>.lock`; a second one waits for
//! the lock, so an agent restarted while an armed guard still runs is served by the old guard
//! (the new agent's state lines name it as the owner) and by its own once the old one exits.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::time::{ClockId, clock_gettime};

use crate::postgres::fence::{FenceGrace, FenceOutcome, fence_blocking, writable_postmaster};
use crate::postgres::{Instance, RunAs, Runner};

/// The state file's name in the node's configuration directory.
pub const STATE_FILE: &str = "pgkeep-fence.state";

/// What the state file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardState {
    /// Fence once `deadline_ms` (on `CLOCK_BOOTTIME`) has passed.
    Armed {
        /// The lease deadline.
        deadline_ms: u64,
        /// The agent that wrote it.
        owner: i32,
    },
    /// Do nothing.
    Disarmed {
        /// The agent that wrote it, if known.
        owner: Option<i32>,
    },
}

impl GuardState {
    /// The state file line.
    pub fn to_line(self) -> String {
        match self {
            GuardState::Armed { deadline_ms, owner } => format!("armed {deadline_ms} {owner}\n"),
            GuardState::Disarmed { owner: Some(o) } => format!("disarmed {o}\n"),
            GuardState::Disarmed { owner: None } => "disarmed\n".to_owned(),
        }
    }

    /// Parses a state file line. Anything unreadable is `None`; the guard then keeps what it
    /// last read, so a damaged file can delay a disarm but never cancel a fence.
    pub fn parse(text: &str) -> Option<GuardState> {
        let mut words = text.split_whitespace();
        let state = match words.next()? {
            "armed" => GuardState::Armed {
                deadline_ms: words.next()?.parse().ok()?,
                owner: words.next()?.parse().ok()?,
            },
            "disarmed" => GuardState::Disarmed {
                owner: match words.next() {
                    Some(w) => Some(w.parse().ok()?),
                    None => None,
                },
            },
            _ => return None,
        };
        words.next().is_none().then_some(state)
    }

    fn owner(self) -> Option<i32> {
        match self {
            GuardState::Armed { owner, .. } => Some(owner),
            GuardState::Disarmed { owner } => owner,
        }
    }
}

/// What the guard does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Look again after this many milliseconds.
    Wait(u64),
    /// Stop PostgreSQL now.
    Fence,
    /// Nothing left to guard.
    Exit,
}

/// How often a guard that fenced looks again for a postmaster started under the same deadline.
const POLL_MS: u64 = 100;

/// The longest the guard sleeps between two reads of the state file before any deadline has
/// passed. An armed wait ends at the deadline itself; a disarmed guard notices a new line at
/// most this late, and that lateness comes out of the lease's safety margin (at least 1 s,
/// which must also cover the fence itself), so it stays short. (250 ms was tried: it saved
/// a few hundredths of a CPU second a minute and cost a quarter of the margin.)
const IDLE_POLL_MS: u64 = 100;

/// The guard's decision: pure, so every case is tested without processes. `Fence` means: stop
/// any postmaster of the data directory that is not a standby, and look again.
///
/// Past the deadline the guard never stands down on its own: not after a fence, not when it
/// found nothing to stop, not when the agent died. (It used to, after five empty looks, and a
/// primary an agent thawed mid-restart started under the same expired deadline ran on.) A new
/// agent settles a stale line at its start ([`GuardHandle::settle_stale`]).
pub fn step(state: GuardState, now_ms: u64, owner_alive: bool) -> Step {
    match state {
        GuardState::Armed { deadline_ms, .. } if now_ms < deadline_ms => {
            Step::Wait((deadline_ms - now_ms).min(IDLE_POLL_MS))
        }
        GuardState::Armed { .. } => Step::Fence,
        GuardState::Disarmed { .. } if owner_alive => Step::Wait(IDLE_POLL_MS),
        GuardState::Disarmed { .. } => Step::Exit,
    }
}

/// Milliseconds on `CLOCK_BOOTTIME`.
pub fn boottime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
            + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
    })
}

/// `CLOCK_BOOTTIME` milliseconds of a monotonic instant (of this process).
pub fn instant_to_boottime_ms(t: Instant) -> u64 {
    let now = Instant::now();
    let base = boottime_ms();
    if t >= now {
        base + u64::try_from((t - now).as_millis()).unwrap_or(u64::MAX / 2)
    } else {
        base.saturating_sub(u64::try_from((now - t).as_millis()).unwrap_or(0))
    }
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Writes the state file (replaced by rename; not fsynced: it means nothing after a reboot).
pub fn write_state(path: &Path, state: GuardState) -> std::io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, state.to_line().as_bytes())?;
    }
    std::fs::rename(&tmp, path)
}

fn read_state(path: &Path) -> Option<GuardState> {
    match std::fs::read_to_string(path) {
        Ok(text) => GuardState::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(GuardState::Disarmed { owner: None })
        }
        Err(_) => None,
    }
}

/// What the guard needs to know.
#[derive(Debug, Clone)]
pub struct GuardArgs {
    /// The state file.
    pub state: PathBuf,
    /// PostgreSQL's configuration directory (`-D` of the postmaster).
    pub config_dir: PathBuf,
    /// PostgreSQL's data directory.
    pub data_dir: PathBuf,
}

impl GuardArgs {
    /// The arguments the agent starts the guard with (`fence-guard --state S --config-dir C
    /// --data-dir D`, each flag once, in any order), read without the full command-line parser:
    /// the guard runs beside every agent for as long as it lives, and building the whole CLI
    /// maps megabytes of the executable's code into it. `None` for anything else (the full
    /// parser then explains the error).
    pub fn from_argv(args: &[std::ffi::OsString]) -> Option<GuardArgs> {
        let (first, rest) = args.split_first()?;
        if first.as_os_str() != "fence-guard" || rest.len() != 6 {
            return None;
        }
        let (mut state, mut config_dir, mut data_dir) = (None, None, None);
        for pair in rest.chunks(2) {
            let slot = match pair[0].to_str()? {
                "--state" => &mut state,
                "--config-dir" => &mut config_dir,
                "--data-dir" => &mut data_dir,
                _ => return None,
            };
            if slot.replace(PathBuf::from(&pair[1])).is_some() {
                return None;
            }
        }
        Some(GuardArgs {
            state: state?,
            config_dir: config_dir?,
            data_dir: data_dir?,
        })
    }
}

/// The guard process's main loop (`pgkeep fence-guard`). Returns when there is nothing left to
/// guard.
pub fn run(args: &GuardArgs) -> Result<()> {
    let lock_path = args.state.with_extension("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // Blocks while another guard serves this node.
    let _lock: Flock<File> = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    let instance = Instance {
        runner: Runner::new(None, RunAs::Current, PathBuf::from("/")),
        data_dir: args.data_dir.clone(),
        config_dir: args.config_dir.clone(),
        log_file: args.config_dir.join("postgresql.log"),
    };
    tracing::info!(state = %args.state.display(), "fence guard running");
    let mut state = GuardState::Disarmed { owner: None };
    let mut last_error = None;
    loop {
        if let Some(s) = read_state(&args.state) {
            state = s;
        }
        let owner_alive = state.owner().is_some_and(process_alive);
        match step(state, boottime_ms(), owner_alive) {
            Step::Wait(ms) => std::thread::sleep(Duration::from_millis(ms.max(1))),
            Step::Exit => break,
            Step::Fence => {
                let GuardState::Armed { deadline_ms, owner } = state else {
                    unreachable!("step fences only when armed")
                };
                match fence_if_writable(&instance, &args.state, state) {
                    Ok(None) => std::thread::sleep(Duration::from_millis(POLL_MS)),
                    Ok(Some(outcome)) => tracing::error!(
                        agent = owner,
                        agent_alive = owner_alive,
                        late_ms = boottime_ms().saturating_sub(deadline_ms),
                        ?outcome,
                        "fence guard: the agent did not renew the lease before its deadline; \
                         PostgreSQL stopped"
                    ),
                    Err(e) => {
                        // Said once per distinct error: it repeats at every look (a pid file
                        // that does not parse, such as a single-user backend's).
                        let text = e.to_string();
                        if last_error.as_ref() != Some(&text) {
                            tracing::error!(error = %text, "fence guard: fencing failed");
                            last_error = Some(text);
                        }
                        std::thread::sleep(Duration::from_millis(POLL_MS));
                    }
                }
            }
        }
    }
    tracing::debug!("fence guard exiting: nothing to guard");
    Ok(())
}

/// Fences the instance if a postmaster that is not a standby runs and the state file still says
/// `seen` (the agent may have written a newer line since it was read: a fence is for that
/// deadline only). `None`: nothing was stopped.
fn fence_if_writable(
    instance: &Instance,
    state_file: &Path,
    seen: GuardState,
) -> Result<Option<FenceOutcome>, crate::postgres::PgError> {
    if writable_postmaster(instance)?.is_none() {
        return Ok(None);
    }
    if read_state(state_file).is_some_and(|s| s != seen) {
        return Ok(None);
    }
    match fence_blocking(instance, FenceGrace::default())? {
        FenceOutcome::NotRunning => Ok(None),
        outcome => Ok(Some(outcome)),
    }
}

/// The agent's side: starts the guard, restarts it if it dies, and writes the state file.
#[derive(Debug)]
pub struct GuardHandle {
    args: GuardArgs,
    child: Option<Child>,
    last: Option<GuardState>,
    json_logs: bool,
}

/// Environment variable telling the guard to log JSON lines like its agent (its stderr is the
/// agent's).
pub const LOG_FORMAT_ENV: &str = "PGKEEP_LOG_FORMAT";

impl GuardHandle {
    /// The guard logs JSON lines, as the agent does.
    pub fn with_json_logs(mut self, json: bool) -> GuardHandle {
        self.json_logs = json;
        self
    }

    /// A handle; the guard process starts with the first [`GuardHandle::ensure_running`].
    pub fn new(args: GuardArgs) -> GuardHandle {
        GuardHandle {
            args,
            child: None,
            last: None,
            json_logs: false,
        }
    }

    /// At agent start: a state file left armed with a deadline that has passed means the last
    /// agent died holding a lease that is gone. Whatever PostgreSQL runs from that time as a
    /// primary may not commit: fence it now (a standby is left alone, as the guard leaves it),
    /// then disarm, so neither a new guard nor the old one acts on the stale line later. A
    /// deadline still ahead is left to the guard that holds it.
    pub fn settle_stale(&mut self, instance: &Instance) {
        let Some(seen @ GuardState::Armed { deadline_ms, .. }) = read_state(&self.args.state)
        else {
            return;
        };
        if boottime_ms() < deadline_ms {
            return;
        }
        match fence_if_writable(instance, &self.args.state, seen) {
            Ok(None) => {}
            Ok(Some(outcome)) => tracing::warn!(
                ?outcome,
                "the previous agent's lease deadline passed while PostgreSQL ran; stopped it"
            ),
            Err(e) => tracing::error!(error = %e, "fencing after the previous agent failed"),
        }
        self.disarm();
    }

    /// Starts the guard if it is not running (first call, or it died). Errors are returned for
    /// the caller to log loudly: without a guard a frozen agent is not fenced.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child {
            match c.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => {
                    tracing::error!(%status, "the fence guard exited; starting it again")
                }
                Err(e) => tracing::error!(error = %e, "cannot check the fence guard"),
            }
            self.child = None;
        }
        let exe = std::env::current_exe().context("locating the pgkeep binary")?;
        let child = Command::new(exe)
            .arg("fence-guard")
            .arg("--state")
            .arg(&self.args.state)
            .arg("--config-dir")
            .arg(&self.args.config_dir)
            .arg("--data-dir")
            .arg(&self.args.data_dir)
            .env(LOG_FORMAT_ENV, if self.json_logs { "json" } else { "text" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the fence guard")?;
        tracing::info!(pid = child.id(), "fence guard started");
        self.child = Some(child);
        Ok(())
    }

    /// Arms the guard until `deadline` (an instant of the agent's monotonic clock).
    pub fn arm(&mut self, deadline: Instant) {
        let owner = i32::try_from(std::process::id()).unwrap_or(0);
        self.set(GuardState::Armed {
            deadline_ms: instant_to_boottime_ms(deadline),
            owner,
        });
    }

    /// Disarms the guard.
    pub fn disarm(&mut self) {
        let owner = i32::try_from(std::process::id()).ok();
        self.set(GuardState::Disarmed { owner });
    }

    fn set(&mut self, state: GuardState) {
        if self.last == Some(state) {
            return;
        }
        match write_state(&self.args.state, state) {
            Ok(()) => self.last = Some(state),
            Err(e) => tracing::error!(
                file = %self.args.state.display(),
                error = %e,
                "cannot update the fence guard's state"
            ),
        }
    }
}

impl Drop for GuardHandle {
    fn drop(&mut self) {
        // The guard is not killed: it exits by itself once disarmed and this agent is gone.
        if let Some(mut c) = self.child.take() {
            let _ = c.try_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_lines_round_trip_and_garbage_is_refused() {
        for s in [
            GuardState::Armed {
                deadline_ms: 123_456,
                owner: 42,
            },
            GuardState::Disarmed { owner: Some(7) },
            GuardState::Disarmed { owner: None },
        ] {
            assert_eq!(GuardState::parse(&s.to_line()), Some(s));
        }
        for bad in [
            "",
            "armed",
            "armed 12",
            "armed x 1",
            "armed 1 2 3",
            "disarmed x",
            "fence",
        ] {
            assert_eq!(GuardState::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fences_when_the_deadline_passes_whether_or_not_the_agent_lives() {
        let armed = GuardState::Armed {
            deadline_ms: 1000,
            owner: 1,
        };
        assert_eq!(step(armed, 950, true), Step::Wait(50));
        assert_eq!(step(armed, 100, false), Step::Wait(IDLE_POLL_MS));
        assert_eq!(step(armed, 1000, true), Step::Fence);
        assert_eq!(step(armed, 5000, false), Step::Fence);
    }

    /// Bug E: after a fence (or after finding nothing to fence) under a deadline that passed,
    /// the guard stood down for that deadline, so a postmaster started later under it (an agent
    /// thawed in the middle of a restart) ran on. It keeps looking until the agent writes a
    /// newer line; what it stops is decided by `standby.signal` (see the process test below).
    #[test]
    fn past_the_deadline_it_keeps_fencing_until_a_newer_line() {
        let armed = GuardState::Armed {
            deadline_ms: 1000,
            owner: 1,
        };
        for now in [1000, 1100, 1600, 60_000] {
            assert_eq!(step(armed, now, true), Step::Fence, "{now}");
            assert_eq!(step(armed, now, false), Step::Fence, "{now}");
        }
        let renewed = GuardState::Armed {
            deadline_ms: 3000,
            owner: 1,
        };
        assert_eq!(step(renewed, 1200, true), Step::Wait(IDLE_POLL_MS));
        assert_eq!(step(renewed, 3000, true), Step::Fence);
        let disarmed = GuardState::Disarmed { owner: Some(1) };
        assert_eq!(step(disarmed, 1200, true), Step::Wait(IDLE_POLL_MS));
        assert_eq!(step(disarmed, 1200, false), Step::Exit);
    }

    #[test]
    fn the_agents_command_line_is_read_without_clap_and_nothing_else_is() {
        let argv = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let a = GuardArgs::from_argv(&argv(&[
            "fence-guard",
            "--data-dir",
            "/d",
            "--state",
            "/s",
            "--config-dir",
            "/c",
        ]))
        .unwrap();
        assert_eq!(
            (a.state, a.config_dir, a.data_dir),
            ("/s".into(), "/c".into(), "/d".into())
        );
        for bad in [
            &[
                "fence-guard",
                "--state",
                "/s",
                "--state",
                "/s",
                "--data-dir",
                "/d",
            ][..],
            &["fence-guard", "--state", "/s", "--config-dir", "/c"],
            &[
                "fence-guard",
                "--state",
                "/s",
                "--config-dir",
                "/c",
                "--data-dir",
            ],
            &[
                "fence-guard",
                "--state",
                "/s",
                "--config-dir",
                "/c",
                "--bogus",
                "/d",
            ],
            &[
                "agent",
                "--state",
                "/s",
                "--config-dir",
                "/c",
                "--data-dir",
                "/d",
            ],
            &["fence-guard", "--help"],
        ] {
            assert!(GuardArgs::from_argv(&argv(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn disarmed_never_fences_and_ends_with_its_agent() {
        let d = GuardState::Disarmed { owner: Some(1) };
        assert_eq!(step(d, u64::MAX, true), Step::Wait(IDLE_POLL_MS));
        assert_eq!(step(d, 0, false), Step::Exit);
    }

    /// A stand-in postmaster of `data_dir`: a shell whose command line looks like
    /// `.../postgres ... -D <data_dir>`, named in the pid file.
    fn fake_postmaster(data_dir: &Path) -> Child {
        let child = Command::new("/bin/sh")
            .arg0(data_dir.join("postgres"))
            .args(["-c", "sleep 30; :", "sh", "-D"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(
            data_dir.join("postmaster.pid"),
            format!("{}\n{}\n1\n5432\n", child.id(), data_dir.display()),
        )
        .unwrap();
        child
    }

    fn gone_within(child: &mut Child, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Bug E, with processes: past the deadline the guard leaves a standby alone, stops it once
    /// it is promoted, and also stops a primary started a while later under the same deadline
    /// (it used to stand down after its first fence); a renewed deadline, then `disarmed`, end
    /// it.
    #[test]
    fn the_guard_keeps_stopping_primaries_but_never_a_standby_until_a_newer_line() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let args = GuardArgs {
            state: dir.path().join(STATE_FILE),
            config_dir: dir.path().join("conf"),
            data_dir: data.clone(),
        };
        let me = i32::try_from(std::process::id()).unwrap();
        let past = GuardState::Armed {
            deadline_ms: boottime_ms() - 1,
            owner: me,
        };
        write_state(&args.state, past).unwrap();
        std::fs::write(data.join("standby.signal"), "").unwrap();
        let mut standby = fake_postmaster(&data);
        let guard = std::thread::spawn({
            let args = args.clone();
            move || run(&args)
        });
        assert!(
            !gone_within(&mut standby, Duration::from_millis(700)),
            "a standby was stopped"
        );
        // Promoted: PostgreSQL removes standby.signal before it takes writes.
        std::fs::remove_file(data.join("standby.signal")).unwrap();
        assert!(gone_within(&mut standby, Duration::from_secs(5)));
        // Later, under the same deadline: a primary (an agent thawed mid-restart).
        std::thread::sleep(Duration::from_millis(800));
        let mut primary = fake_postmaster(&data);
        assert!(
            gone_within(&mut primary, Duration::from_secs(5)),
            "a primary started after the first fence ran on"
        );
        // The agent renewed: its new primary is left alone.
        write_state(
            &args.state,
            GuardState::Armed {
                deadline_ms: boottime_ms() + 60_000,
                owner: me,
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut renewed = fake_postmaster(&data);
        assert!(!gone_within(&mut renewed, Duration::from_millis(700)));
        // Disarmed by an agent that is gone: the guard exits.
        write_state(
            &args.state,
            GuardState::Disarmed {
                owner: Some(i32::MAX),
            },
        )
        .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while !guard.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(guard.is_finished(), "the guard did not exit");
        guard.join().unwrap().unwrap();
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(renewed.id()).unwrap());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = renewed.wait();
    }

    #[test]
    fn boottime_conversion_is_monotonic() {
        let now = Instant::now();
        let a = instant_to_boottime_ms(now);
        let b = instant_to_boottime_ms(now + Duration::from_secs(5));
        assert!((4990..=5010).contains(&(b - a)), "{a} {b}");
    }
}
