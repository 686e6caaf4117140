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
//! The guard reads the file every 100 ms at most (sooner when the deadline is nearer) and fences
//! ([`crate::postgres::fence`]) once `deadline` has passed. It exits when the file says
//! `disarmed` and the agent named there is gone. One guard serves a node: it holds an exclusive
//! `flock` on `<state>.lock`; a second one waits for the lock, so an agent restarted while an
//! armed guard still runs is served by the old guard (the new agent's state lines name it as
//! the owner) and by its own once the old one exits.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::time::{ClockId, clock_gettime};

use crate::postgres::fence::{FenceGrace, FenceOutcome, fence_blocking};
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

/// The longest the guard sleeps between two reads of the state file.
const POLL_MS: u64 = 100;

/// The guard's decision: pure, so every case is tested without processes. `fenced_for` is the
/// deadline the guard already fenced for (a fence is not repeated for the same deadline).
pub fn step(state: GuardState, now_ms: u64, owner_alive: bool, fenced_for: Option<u64>) -> Step {
    match state {
        GuardState::Armed { deadline_ms, .. } => {
            if now_ms < deadline_ms {
                Step::Wait((deadline_ms - now_ms).min(POLL_MS))
            } else if fenced_for != Some(deadline_ms) {
                Step::Fence
            } else if owner_alive {
                Step::Wait(POLL_MS)
            } else {
                Step::Exit
            }
        }
        GuardState::Disarmed { .. } if owner_alive => Step::Wait(POLL_MS),
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
    let mut fenced_for = None;
    let mut idle_polls = 0u32;
    loop {
        if let Some(s) = read_state(&args.state) {
            state = s;
        }
        let owner_alive = state.owner().is_some_and(process_alive);
        match step(state, boottime_ms(), owner_alive, fenced_for) {
            Step::Wait(ms) => std::thread::sleep(Duration::from_millis(ms.max(1))),
            Step::Exit => break,
            Step::Fence => {
                let GuardState::Armed { deadline_ms, owner } = state else {
                    unreachable!("step fences only when armed")
                };
                let late = boottime_ms().saturating_sub(deadline_ms);
                match fence_blocking(&instance, FenceGrace::default()) {
                    // Nothing to stop: look a few more times (a start may be under way, its
                    // pid file not written yet), then consider this deadline done. Never for
                    // ever: an agent that lives on starts PostgreSQL again only once it decided
                    // it may, and the guard must not stop that.
                    Ok(FenceOutcome::NotRunning) => {
                        idle_polls += 1;
                        if idle_polls >= 5 || !owner_alive {
                            fenced_for = Some(deadline_ms);
                            idle_polls = 0;
                        } else {
                            std::thread::sleep(Duration::from_millis(POLL_MS));
                        }
                    }
                    Ok(outcome) => {
                        fenced_for = Some(deadline_ms);
                        tracing::error!(
                            agent = owner,
                            agent_alive = owner_alive,
                            late_ms = late,
                            ?outcome,
                            "fence guard: the agent did not renew the lease before its deadline; \
                             PostgreSQL stopped"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "fence guard: fencing failed"),
                }
            }
        }
    }
    tracing::debug!("fence guard exiting: nothing to guard");
    Ok(())
}

/// The agent's side: starts the guard, restarts it if it dies, and writes the state file.
#[derive(Debug)]
pub struct GuardHandle {
    args: GuardArgs,
    child: Option<Child>,
    last: Option<GuardState>,
}

impl GuardHandle {
    /// A handle; the guard process starts with the first [`GuardHandle::ensure_running`].
    pub fn new(args: GuardArgs) -> GuardHandle {
        GuardHandle {
            args,
            child: None,
            last: None,
        }
    }

    /// At agent start: a state file left armed with a deadline that has passed means the last
    /// agent died holding a lease that is gone. Whatever PostgreSQL runs from that time may not
    /// commit: fence it now, then disarm, so neither a new guard nor the old one acts on the
    /// stale line later (for example against a replica this agent is about to start). A
    /// deadline still ahead is left to the guard that holds it.
    pub fn settle_stale(&mut self, instance: &Instance) {
        let Some(GuardState::Armed { deadline_ms, .. }) = read_state(&self.args.state) else {
            return;
        };
        if boottime_ms() < deadline_ms {
            return;
        }
        match fence_blocking(instance, FenceGrace::default()) {
            Ok(FenceOutcome::NotRunning) => {}
            Ok(outcome) => tracing::warn!(
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
    fn fences_once_when_the_deadline_passes_whether_or_not_the_agent_lives() {
        let armed = GuardState::Armed {
            deadline_ms: 1000,
            owner: 1,
        };
        assert_eq!(step(armed, 950, true, None), Step::Wait(50));
        assert_eq!(step(armed, 100, false, None), Step::Wait(POLL_MS));
        assert_eq!(step(armed, 1000, true, None), Step::Fence);
        assert_eq!(step(armed, 5000, false, None), Step::Fence);
        // Already fenced for this deadline: wait for a new one, or leave with the agent.
        assert_eq!(step(armed, 1200, true, Some(1000)), Step::Wait(POLL_MS));
        assert_eq!(step(armed, 1200, false, Some(1000)), Step::Exit);
        // A renewed deadline after a fence is guarded again.
        let renewed = GuardState::Armed {
            deadline_ms: 3000,
            owner: 1,
        };
        assert_eq!(step(renewed, 3000, true, Some(1000)), Step::Fence);
    }

    #[test]
    fn disarmed_never_fences_and_ends_with_its_agent() {
        let d = GuardState::Disarmed { owner: Some(1) };
        assert_eq!(step(d, u64::MAX, true, None), Step::Wait(POLL_MS));
        assert_eq!(step(d, 0, false, None), Step::Exit);
    }

    #[test]
    fn boottime_conversion_is_monotonic() {
        let now = Instant::now();
        let a = instant_to_boottime_ms(now);
        let b = instant_to_boottime_ms(now + Duration::from_secs(5));
        assert!((4990..=5010).contains(&(b - a)), "{a} {b}");
    }
}
