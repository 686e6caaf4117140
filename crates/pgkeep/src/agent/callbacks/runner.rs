//! Running one callback command: spawn it directly (no shell) in its own process group with a
//! given environment, log its output line by line, kill the group at the timeout, when a newer
//! callback of the same slot starts, and after the program exits.

use std::fmt;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{CallbackEvent, check_callback_program};

/// Longest output line logged (longer ones are cut).
const MAX_LINE: usize = 2000;
/// Output lines logged per run and stream; the rest is counted, not logged.
const MAX_LINES: usize = 200;

/// One run of a command.
#[derive(Debug, Clone)]
pub(super) struct Invocation {
    /// What runs (`on_start`, `pre_promote`, ...), for the log.
    pub(super) label: &'static str,
    /// Program and arguments.
    pub(super) argv: Vec<String>,
    /// The whole environment.
    pub(super) env: Vec<(String, String)>,
    /// When it is killed.
    pub(super) timeout: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    /// Exited with this code.
    Exited(i32),
    /// Killed by a signal it did not get from us.
    Signalled(i32),
    /// Killed at its timeout.
    TimedOut,
    /// Killed because a newer callback of its slot started.
    Superseded,
    /// Not run: the program failed its check or could not be started.
    NotRun(String),
}

impl Ending {
    pub(super) fn success(&self) -> bool {
        *self == Ending::Exited(0)
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Exited(c) => write!(f, "exited with {c}"),
            Ending::Signalled(s) => write!(f, "killed by signal {s}"),
            Ending::TimedOut => f.write_str("killed at its timeout"),
            Ending::Superseded => f.write_str("killed: a newer callback started"),
            Ending::NotRun(why) => write!(f, "not run: {why}"),
        }
    }
}

/// SIGKILL to the whole process group `pgid` (the callback and whatever it started).
fn kill_group(pgid: i32) {
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

/// Runs `inv` to its end: its process group is killed at the timeout, when `cancel` fires, and
/// after the program exits (whatever it left running in its group would otherwise outlive it
/// and hold the output pipes open; Patroni kills those children too).
pub(super) async fn run(inv: Invocation, mut cancel: oneshot::Receiver<()>) -> Ending {
    let Some(program) = inv.argv.first() else {
        return Ending::NotRun("no program".into());
    };
    if let Err(why) = check_callback_program(std::path::Path::new(program)) {
        return Ending::NotRun(why);
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&inv.argv[1..])
        .env_clear()
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ending::NotRun(format!("{program}: {e}")),
    };
    let Some(pgid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Ending::NotRun("the process vanished at once".into());
    };
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    if let Some(s) = child.stdout.take() {
        readers.push(tokio::spawn(forward(s, inv.label, "stdout")));
    }
    if let Some(s) = child.stderr.take() {
        readers.push(tokio::spawn(forward(s, inv.label, "stderr")));
    }
    // In the two kill branches the child has not been reaped (its wait did not complete), so
    // its PID, which is the group's id, cannot have been reused.
    let ending = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Ending::Exited(c),
                    (None, Some(sig)) => Ending::Signalled(sig),
                    (None, None) => Ending::Exited(-1),
                }
            }
            Err(e) => Ending::NotRun(format!("waiting for it: {e}")),
        },
        () = tokio::time::sleep(inv.timeout) => {
            kill_group(pgid);
            let _ = child.wait().await;
            Ending::TimedOut
        }
        Ok(()) = &mut cancel => {
            kill_group(pgid);
            let _ = child.wait().await;
            Ending::Superseded
        }
    };
    // The leader was reaped just now; the group's id stays allocated while any member lives,
    // so this reaches only leftovers of this callback (or, with nobody left, nothing).
    kill_group(pgid);
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), r)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    ending
}

/// Logs a stream line by line, bounded in line length and count.
async fn forward(mut r: impl AsyncRead + Unpin, label: &'static str, stream: &'static str) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    let mut lines = 0usize;
    let emit = |line: &[u8], lines: &mut usize| {
        *lines += 1;
        if *lines <= MAX_LINES {
            tracing::info!(
                callback = label,
                stream,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    };
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                emit(&line, &mut lines);
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        emit(&line, &mut lines);
    }
    if lines > MAX_LINES {
        tracing::info!(
            callback = label,
            stream,
            suppressed = lines - MAX_LINES,
            "further output lines not logged"
        );
    }
}

/// A slot holds at most one running asynchronous callback.
#[derive(Default)]
struct Slot {
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// Runs asynchronous callbacks, one per slot.
#[derive(Default)]
pub(super) struct Runner {
    general: Mutex<Slot>,
    reload: Mutex<Slot>,
}

impl Runner {
    /// Starts `inv` in the background, killing the previous run of the same slot if it still
    /// runs. `on_reload` has a slot of its own.
    pub(super) fn fire(&self, inv: Invocation) {
        let slot = if inv.label == CallbackEvent::OnReload.name() {
            &self.reload
        } else {
            &self.general
        };
        let (tx, rx) = oneshot::channel();
        let label = inv.label;
        let handle = tokio::spawn(async move {
            tracing::info!(callback = label, "callback started");
            match run(inv, rx).await {
                e if e.success() => tracing::info!(callback = label, "callback finished"),
                e @ Ending::NotRun(_) => {
                    tracing::error!(callback = label, outcome = %e, "callback failed")
                }
                e => tracing::warn!(callback = label, outcome = %e, "callback failed"),
            }
        });
        let mut slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cancel, _)) = slot.running.replace((tx, handle)) {
            // Already finished: nobody listens, nothing happens.
            let _ = cancel.send(());
        }
    }

    /// Waits up to `within` for the running callbacks (at shutdown: an `on_stop` that moves a
    /// virtual IP should get to finish).
    pub(super) async fn settle(&self, within: Duration) {
        let handles: Vec<JoinHandle<()>> = [&self.general, &self.reload]
            .into_iter()
            .filter_map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .running
                    .take()
                    .map(|(_, h)| h)
            })
            .collect();
        let _ = tokio::time::timeout(within, futures_util::future::join_all(handles)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn inv(label: &'static str, argv: Vec<String>, timeout: Duration) -> Invocation {
        Invocation {
            label,
            argv,
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("PGKEEP_CALLBACK".into(), label.into()),
            ],
            timeout,
        }
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    async fn run_now(i: Invocation) -> Ending {
        let (_keep, rx) = oneshot::channel();
        run(i, rx).await
    }

    #[tokio::test]
    async fn exit_codes_arguments_and_environment() {
        let d = dir();
        let out = d.path().join("out");
        let p = script(
            d.path(),
            "cb",
            &format!(
                "printf '%s|' \"$@\" > {o}; echo \"$PGKEEP_CALLBACK:${{HOME:-none}}\" >> {o}; exit 3",
                o = out.display()
            ),
        );
        let e = run_now(inv(
            "on_start",
            vec![s(&p), "a b".into(), "$(id)".into(), ";".into()],
            Duration::from_secs(10),
        ))
        .await;
        assert_eq!(e, Ending::Exited(3));
        // Arguments arrive verbatim: no shell split or expanded them. The environment is the
        // given one only.
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "a b|$(id)|;|on_start:none\n"
        );
        let ok = script(d.path(), "ok", "exit 0");
        assert!(
            run_now(inv("x", vec![s(&ok)], Duration::from_secs(10)))
                .await
                .success()
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let d = dir();
        let pidfile = d.path().join("child.pid");
        // The child outlives its parent's shell unless its group is killed.
        let p = script(
            d.path(),
            "slow",
            &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
        );
        let t = Instant::now();
        let e = run_now(inv("on_stop", vec![s(&p)], Duration::from_millis(500))).await;
        assert_eq!(e, Ending::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid).await, "the background child {pid} was killed too");
    }

    /// True once `pid` no longer runs (zombies count as gone).
    async fn gone(pid: i32) -> bool {
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn leftovers_are_killed_when_the_program_exits() {
        let d = dir();
        let pidfile = d.path().join("child.pid");
        let p = script(
            d.path(),
            "bg",
            &format!("sleep 60 & echo $! > {}; exit 0", pidfile.display()),
        );
        let t = Instant::now();
        let e = run_now(inv("on_start", vec![s(&p)], Duration::from_secs(30))).await;
        assert_eq!(e, Ending::Exited(0));
        // The background child held stdout: the run did not wait for it.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid).await);
    }

    #[tokio::test]
    async fn a_new_callback_kills_the_previous_one() {
        let d = dir();
        let log = d.path().join("log");
        let slow = script(
            d.path(),
            "slow",
            &format!(
                "echo start >> {l}; sleep 30; echo end >> {l}",
                l = log.display()
            ),
        );
        let fast = script(d.path(), "fast", &format!("echo fast >> {}", log.display()));
        let runner = Runner::default();
        runner.fire(inv("on_stop", vec![s(&slow)], Duration::from_secs(60)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("start")
        {
            assert!(
                Instant::now() < deadline,
                "the first callback never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // on_reload has its own slot: it does not kill on_stop.
        runner.fire(inv("on_reload", vec![s(&fast)], Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let general = runner
            .general
            .lock()
            .unwrap()
            .running
            .as_ref()
            .map(|r| r.1.is_finished());
        assert_eq!(general, Some(false), "on_reload left on_stop running");
        let t = Instant::now();
        runner.fire(inv(
            "on_role_change",
            vec![s(&fast)],
            Duration::from_secs(60),
        ));
        runner.settle(Duration::from_secs(10)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("fast").count(), 2, "{text}");
        assert!(
            !text.contains("end"),
            "the superseded callback was killed: {text}"
        );
    }

    #[tokio::test]
    async fn an_unsafe_program_is_not_run() {
        let d = dir();
        let marker = d.path().join("ran");
        let p = script(d.path(), "cb", &format!("touch {}", marker.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = run_now(inv("pre_promote", vec![s(&p)], Duration::from_secs(10))).await;
        assert!(
            matches!(&e, Ending::NotRun(w) if w.contains("writable")),
            "{e:?}"
        );
        assert!(!e.success());
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn long_output_is_bounded() {
        let d = dir();
        let p = script(
            d.path(),
            "loud",
            "i=0; while [ $i -lt 1000 ]; do echo line $i; i=$((i+1)); done; head -c 100000 /dev/zero | tr '\\0' x",
        );
        let e = run_now(inv("on_start", vec![s(&p)], Duration::from_secs(30))).await;
        assert_eq!(e, Ending::Exited(0));
    }
}
