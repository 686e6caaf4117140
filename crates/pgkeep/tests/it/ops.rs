//! Operations through `pgkeep ctl` on a real three-node cluster (real PostgreSQL, etcd and
//! agents): pause and resume (a paused cluster neither fails over nor restarts a killed
//! primary), `edit-config` applied or refused by the parameter policy before anything is
//! written, `restart --pending` in the hot-standby-safe order, `reinit` of a replica, and the
//! timeline history after a switchover.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgkeep::api::{ApiClient, MemberStatus};
use pgkeep_testkit::{API_USER, AgentCluster, Env, EtcdCluster};
use secrecy::SecretString;
use serde_json::Value;

/// `pgkeep ctl -c <node.yml>` without a terminal.
struct Ctl {
    config: PathBuf,
}

/// Exit status, stdout, stderr.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Out {
        let out = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
            .arg("ctl")
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("pgkeep ctl runs");
        let o = Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("$ pgkeep ctl {}\n{}{}", args.join(" "), o.stdout, o.stderr);
        o
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.ok,
            "pgkeep ctl {args:?} failed:\n{}{}",
            o.stdout, o.stderr
        );
        o.stdout
    }
}

fn wait_healthy(c: &AgentCluster, timeout: Duration) -> usize {
    c.wait("one primary and two streaming replicas", timeout, |c| {
        c.primary().is_some_and(|p| c.replicas_streaming(p))
    })
    .unwrap();
    c.primary().unwrap()
}

#[test]
fn operations_through_ctl_on_a_real_cluster() {
    let started = Instant::now();
    let env = Env::new("ops").unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, "op", 3, &bin).unwrap();
    c.start_all().unwrap();
    let p = wait_healthy(&c, Duration::from_secs(90));
    let name = |i: usize| c.agents[i].node.name.clone();
    let ctl = Ctl {
        config: c.agents[0].config.clone(),
    };
    let ca = std::fs::read(c.agents[0].node.dir.join("pki/ca.crt")).unwrap();
    let client = ApiClient::builder(&ca)
        .unwrap()
        .identity_files(&c.operator_cert, &c.operator_key)
        .unwrap()
        .basic_auth(API_USER, SecretString::from(c.api_password.clone()))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = |i: usize| -> Option<MemberStatus> {
        rt.block_on(client.status(&c.agents[i].api_base())).ok()
    };
    let api_config = |i: usize| -> Value {
        rt.block_on(client.get(&format!("{}/config", c.agents[i].api_base())))
            .ok()
            .and_then(|r| r.json().ok())
            .unwrap_or(Value::Null)
    };
    let dcs_config = || {
        etcd.etcdctl(&["get", "/service/op/config", "-w", "json"])
            .unwrap()
            .stdout
    };
    eprintln!("[ops] cluster up after {:?}", started.elapsed());

    // Read-only views.
    assert!(
        ctl.ok(&["topology"])
            .contains(&format!("+ {}", name((p + 1) % 3)))
    );
    assert!(ctl.ok(&["show-config"]).contains("ttl: 10"));
    // `list --watch` (not a terminal: one timestamped table per frame), bounded by --count.
    let t = Instant::now();
    let frames = ctl.ok(&["list", "--watch", "--interval", "0.3", "--count", "3"]);
    assert_eq!(frames.matches(" UTC\n").count(), 3, "{frames}");
    let leader_rows = frames
        .lines()
        .filter(|l| l.starts_with(&format!("{} ", name(p))) && l.contains("leader"))
        .count();
    assert_eq!(leader_rows, 3, "{frames}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // Pause: every member reports it, and a killed primary is neither restarted nor replaced.
    ctl.ok(&["pause", "--wait"]);
    for i in 0..3 {
        assert!(
            status(i).is_some_and(|s| s.pause),
            "{} reports pause",
            name(i)
        );
    }
    let again = ctl.run(&["pause"]);
    assert!(
        !again.ok && again.stderr.contains("already paused"),
        "{}",
        again.stderr
    );
    c.kill_postgres(p).unwrap();
    c.wait("the killed postmaster gone", Duration::from_secs(5), |c| {
        c.postmaster_pid(p).is_none()
    })
    .unwrap();
    let t_kill = Instant::now();
    while t_kill.elapsed() < Duration::from_secs(5) {
        assert!(
            c.postmaster_pid(p).is_none(),
            "paused: the agent must not restart PostgreSQL"
        );
        assert!(c.primary().is_none(), "paused: no replica may be promoted");
        std::thread::sleep(Duration::from_millis(500));
    }
    ctl.ok(&["resume", "--wait"]);
    let p = wait_healthy(&c, Duration::from_secs(60));
    eprintln!("[ops] pause/resume done after {:?}", started.elapsed());

    // edit-config: an ordinary change is applied; a command-running parameter is refused before
    // anything is written.
    let out = ctl.ok(&["edit-config", "-s", "loop_wait=2", "--force"]);
    assert!(out.contains("+loop_wait: 2"), "{out}");
    c.wait(
        "every agent's /config shows loop_wait 2",
        Duration::from_secs(10),
        |_| (0..3).all(|i| api_config(i)["loop_wait"] == 2),
    )
    .unwrap();
    let before = dcs_config();
    let refused = ctl.run(&["edit-config", "-p", "archive_command=/bin/true", "--force"]);
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("postgresql.parameters.archive_command")
            && refused.stderr.contains("refused"),
        "{}",
        refused.stderr
    );
    assert_eq!(dcs_config(), before, "the DCS is unchanged");

    // A restart-requiring raise: restart --pending restarts the replicas first.
    ctl.ok(&["edit-config", "-p", "max_connections=150", "--force"]);
    c.wait(
        "every member reports pending_restart",
        Duration::from_secs(20),
        |_| (0..3).all(|i| status(i).is_some_and(|s| s.pending_restart)),
    )
    .unwrap();
    let out = ctl.ok(&["restart", "--pending", "--force"]);
    let order: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("Restart order: "))
        .and_then(|l| l.split(" (").next())
        .expect("the order is printed")
        .split(", ")
        .collect();
    assert_eq!(order.len(), 3, "{out}");
    assert_eq!(
        order[2],
        name(p),
        "the primary restarts last when raising: {out}"
    );
    assert!(out.contains("max_connections 100 -> 150"), "{out}");
    c.wait(
        "pending_restart cleared everywhere",
        Duration::from_secs(20),
        |c| {
            (0..3).all(|i| {
                status(i).is_some_and(|s| !s.pending_restart)
                    && c.psql(i, "SHOW max_connections")
                        .is_ok_and(|o| o.stdout.trim() == "150")
            })
        },
    )
    .unwrap();
    let p = wait_healthy(&c, Duration::from_secs(30));
    eprintln!("[ops] restart done after {:?}", started.elapsed());

    // reinit re-clones a replica, which streams again.
    let r = (p + 1) % 3;
    let clones_before = c.agents[r]
        .service
        .as_ref()
        .map(|s| std::fs::read_to_string(s.log_path()).unwrap_or_default())
        .unwrap_or_default()
        .matches("cloning with pg_basebackup")
        .count();
    ctl.ok(&["reinit", &name(r), "--force", "--wait"]);
    assert_eq!(wait_healthy(&c, Duration::from_secs(60)), p);
    let log = std::fs::read_to_string(c.agents[r].service.as_ref().unwrap().log_path()).unwrap();
    assert_eq!(
        log.matches("cloning with pg_basebackup").count(),
        clones_before + 1,
        "reinit cloned once more"
    );
    let leader_refused = ctl.run(&["reinit", &name(p), "--force"]);
    assert!(!leader_refused.ok && leader_refused.stderr.contains("leader"));
    eprintln!("[ops] reinit done after {:?}", started.elapsed());

    // history shows the switch to the candidate.
    ctl.ok(&["switchover", "--candidate", &name(r), "--force"]);
    assert_eq!(wait_healthy(&c, Duration::from_secs(30)), r);
    c.wait(
        "the history names the new leader",
        Duration::from_secs(10),
        |_| {
            let h: Value =
                serde_json::from_str(&ctl.ok(&["history", "--format", "json"])).unwrap_or_default();
            h.as_array()
                .and_then(|a| a.last())
                .is_some_and(|e| e["New Leader"] == name(r).as_str())
        },
    )
    .unwrap();
    let table = ctl.ok(&["history"]);
    assert!(
        table.starts_with("TL") && table.contains(&name(r)),
        "{table}"
    );
    eprintln!("[ops] all done after {:?}", started.elapsed());
}
