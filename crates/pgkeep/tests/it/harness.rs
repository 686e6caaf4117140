//! harness integration tests: the test kit itself, against real etcd and PostgreSQL.
//!
//! These need root (cgroups, `/etc/hosts`, the `etcd` and `postgres` users) and run one at a
//! time (nextest test group `real-cluster`).

use std::fs;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgkeep_testkit::{
    Env, EtcdCluster, PgInstance, ServiceUser, hosts_blocks, pid_is_alive, sweep,
};

/// Set (to the marker file path) only when `killed_test_leaves_nothing_behind` runs the victim.
const VICTIM_VAR: &str = "PGKEEP_TESTKIT_VICTIM_MARKER";

/// What an environment leaves on the machine, recorded to check it is gone later.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Footprint {
    env_id: String,
    cgroup: PathBuf,
    root: PathBuf,
    hosts_tag: String,
    /// Long-running processes, which must be alive until teardown.
    services: Vec<u32>,
    /// Everything in the cgroup when recorded (backends and helpers come and go).
    pids: Vec<u32>,
}

impl Footprint {
    fn of(env: &Env, services: Vec<u32>) -> Result<Footprint> {
        let pids = env.cgroup_pids()?;
        for s in &services {
            ensure!(
                pids.contains(s),
                "service pid {s} is not in the cgroup ({pids:?})"
            );
        }
        Ok(Footprint {
            env_id: env.id().to_string(),
            cgroup: env.cgroup_path().to_path_buf(),
            root: env.root().to_path_buf(),
            hosts_tag: env.hosts_tag().to_string(),
            services,
            pids,
        })
    }

    /// Everything is still there: processes alive, cgroup, hosts block, temp root.
    fn assert_present(&self) -> Result<()> {
        ensure!(!self.services.is_empty(), "no processes recorded");
        for pid in &self.services {
            ensure!(pid_is_alive(*pid), "pid {pid} is not running");
        }
        ensure!(
            self.cgroup.is_dir(),
            "cgroup {} missing",
            self.cgroup.display()
        );
        ensure!(
            hosts_blocks()?.contains(&self.hosts_tag),
            "hosts block {} missing",
            self.hosts_tag
        );
        ensure!(
            self.root.is_dir(),
            "temp root {} missing",
            self.root.display()
        );
        Ok(())
    }

    /// Nothing is left: no process (a zombie awaiting its reaper counts as gone), no cgroup, no
    /// hosts block, no temp root.
    fn assert_gone(&self) -> Result<()> {
        let alive: Vec<u32> = (self.services.iter().chain(&self.pids))
            .copied()
            .filter(|p| pid_is_alive(*p))
            .collect();
        ensure!(
            alive.is_empty(),
            "processes {alive:?} of {} still running",
            self.env_id
        );
        ensure!(
            !self.cgroup.exists(),
            "cgroup {} still exists",
            self.cgroup.display()
        );
        let blocks = hosts_blocks()?;
        ensure!(
            !blocks.contains(&self.hosts_tag),
            "hosts block {} still present",
            self.hosts_tag
        );
        let hosts = fs::read_to_string("/etc/hosts")?;
        ensure!(
            !hosts.contains(&self.env_id),
            "/etc/hosts still mentions {}",
            self.env_id
        );
        ensure!(
            !self.root.exists(),
            "temp root {} still exists",
            self.root.display()
        );
        Ok(())
    }
}

fn proc_status_uid(pid: u32) -> Result<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line")?;
    line.split_whitespace()
        .nth(1)
        .context("no uid")?
        .parse()
        .context("uid")
}

fn proc_comm(pid: u32) -> Result<String> {
    Ok(fs::read_to_string(format!("/proc/{pid}/comm"))?
        .trim()
        .to_string())
}

/// The process runs as `user`, is the program itself (no wrapper) and is in the env's cgroup.
fn assert_service_process(env: &Env, pid: u32, user: &ServiceUser, comm: &str) -> Result<()> {
    ensure!(
        proc_comm(pid)? == comm,
        "pid {pid} is {:?}, not {comm}",
        proc_comm(pid)?
    );
    ensure!(
        proc_status_uid(pid)? == user.uid,
        "pid {pid} does not run as {}",
        user.name
    );
    ensure!(
        env.cgroup_pids()?.contains(&pid),
        "pid {pid} is not in the env's cgroup"
    );
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    ensure!(
        cg.contains(&format!("/{}", env.id())),
        "pid {pid} cgroup: {cg}"
    );
    Ok(())
}

#[test]
fn etcd_cluster_with_client_cert_auth_survives_member_restart() -> Result<()> {
    let t0 = Instant::now();
    let env = Env::new("etcd3")?;
    let etcd = EtcdCluster::start(&env, 3)?;
    eprintln!("3-member etcd healthy after {:?}", t0.elapsed());
    ensure!(etcd.member_count() == 3);

    let etcd_user = ServiceUser::etcd()?;
    for i in 0..3 {
        let pid = etcd.member_pid(i).context("member not running")?;
        assert_service_process(&env, pid, &etcd_user, "etcd")?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        for flag in [
            "--client-cert-auth=true",
            "--peer-client-cert-auth=true",
            "--pre-vote=true",
        ] {
            ensure!(cmdline.contains(flag), "member {i} lacks {flag}");
        }
        // Each member has its own address and DNS name, resolved through /etc/hosts.
        let node = etcd.member_node(i)?;
        let resolved: Vec<IpAddr> = (node.dns_name.as_str(), 1)
            .to_socket_addrs()?
            .map(|a| a.ip())
            .collect();
        ensure!(
            resolved == [IpAddr::V4(node.addr)],
            "{} resolves to {resolved:?}",
            node.dns_name
        );
    }

    etcd.etcdctl(&["put", "/pgkeep-test/k", "v1"])?
        .ensure_success("put")?;
    let got = etcd
        .etcdctl(&["get", "--print-value-only", "/pgkeep-test/k"])?
        .ensure_success("get")?;
    ensure!(got.stdout.trim() == "v1", "got {:?}", got.stdout);

    // Without a client certificate: refused.
    let endpoints = format!("--endpoints={}", etcd.endpoints().join(","));
    let cacert = format!("--cacert={}", etcd.ca_path().display());
    let no_cert = etcd.etcdctl_raw(&[
        endpoints.as_ref(),
        cacert.as_ref(),
        "--dial-timeout=2s".as_ref(),
        "--command-timeout=3s".as_ref(),
        "get".as_ref(),
        "/pgkeep-test/k".as_ref(),
    ])?;
    ensure!(
        !no_cert.success(),
        "etcd served a client without a certificate: {no_cert:?}"
    );
    ensure!(
        !no_cert.stdout.contains("v1"),
        "value leaked without a certificate"
    );

    // Kill one member: the other two keep a quorum; restart it on its data.
    etcd.kill_member(1)?;
    ensure!(!etcd.is_member_running(1));
    // The other two elect a leader (if member 1 led) and stay healthy.
    etcd.wait_healthy(Duration::from_secs(30))?;
    etcd.etcdctl_member(0, &["put", "/pgkeep-test/k", "v2"])?
        .ensure_success("put with 2/3")?;
    etcd.start_member(1)?;
    etcd.wait_healthy(Duration::from_secs(30))?;
    let pid = etcd.member_pid(1).context("restarted member not running")?;
    assert_service_process(&env, pid, &etcd_user, "etcd")?;
    // The restarted member caught up with the write it missed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = etcd.etcdctl_member(1, &["get", "--print-value-only", "/pgkeep-test/k"])?;
        if out.success() && out.stdout.trim() == "v2" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "restarted member does not serve v2: {out:?}"
        );
        sleep(Duration::from_millis(100));
    }
    // A graceful stop and start works too.
    etcd.stop_member(2)?;
    etcd.start_member(2)?;
    etcd.wait_healthy(Duration::from_secs(30))?;
    eprintln!("etcd test done after {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn postgres_tls_only_with_verifiable_identity() -> Result<()> {
    let t0 = Instant::now();
    let env = Env::new("pg")?;
    let pg = PgInstance::init_and_start(&env, "pg1")?;
    eprintln!("PostgreSQL ready after {:?}", t0.elapsed());

    let pid = pg.pid().context("postmaster not running")?;
    assert_service_process(&env, pid, &ServiceUser::postgres()?, "postgres")?;
    let pidfile = fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
    ensure!(
        pidfile.lines().next() == Some(pid.to_string().as_str()),
        "recorded pid is not the postmaster's"
    );

    ensure!(pg.psql("select 1")?.trim() == "1");
    ensure!(pg.psql("show ssl")?.trim() == "on");
    ensure!(pg.psql("show ssl_min_protocol_version")?.trim() == "TLSv1.2");
    ensure!(pg.psql("show data_checksums")?.trim() == "on");
    let config_file = pg.psql("show config_file")?;
    ensure!(
        Path::new(config_file.trim()).starts_with(pg.conf_dir()),
        "config_file {config_file}"
    );
    let hba_file = pg.psql("show hba_file")?;
    ensure!(
        Path::new(hba_file.trim()).starts_with(pg.conf_dir()),
        "hba_file {hba_file}"
    );
    let rules = pg.psql("select distinct auth_method from pg_hba_file_rules")?;
    for bad in ["trust", "md5", "password"] {
        ensure!(
            !rules.lines().any(|r| r == bad),
            "pg_hba has {bad}: {rules}"
        );
    }
    pg.psql("create role replicator with login replication")?;

    // Plain TCP is refused by pg_hba (hostssl only).
    let plain = pg.psql_tcp(&pg.conninfo("postgres", "disable", ""), "select 1")?;
    ensure!(!plain.success(), "plaintext connection accepted: {plain:?}");
    ensure!(
        plain.stderr.contains("no pg_hba.conf entry") && plain.stderr.contains("no encryption"),
        "unexpected error for sslmode=disable: {}",
        plain.stderr
    );

    // The server certificate verifies for the node's DNS name; replication logs in by cert.
    let ca = env.ca_cert_path().display().to_string();
    let client = env.client_cert("replicator")?;
    let tls = format!(
        "sslrootcert={ca} sslcert={} sslkey={} replication=true",
        client.cert.display(),
        client.key.display()
    );
    let ok = pg.psql_tcp(
        &pg.conninfo("replicator", "verify-full", &tls),
        "IDENTIFY_SYSTEM",
    )?;
    let ok = ok.ensure_success("cert-auth replication connection with verify-full")?;
    ensure!(
        ok.stdout.contains('|'),
        "IDENTIFY_SYSTEM returned {:?}",
        ok.stdout
    );

    // A password role over verified TLS gets an authentication error, not a TLS one.
    let scram = pg.psql_tcp(
        &pg.conninfo("postgres", "verify-full", &format!("sslrootcert={ca}")),
        "select 1",
    )?;
    ensure!(!scram.success());
    ensure!(
        scram.stderr.contains("no password supplied"),
        "unexpected: {}",
        scram.stderr
    );

    // Identity checks can fail: the same address under another name is rejected.
    let node = pg.node();
    let wrong = format!(
        "host=wrong.{}.pgkeep.test hostaddr={} port={} dbname=postgres user=replicator \
         sslmode=verify-full {tls}",
        env.id(),
        node.addr,
        pg.port()
    );
    let wrong = pg.psql_tcp(&wrong, "IDENTIFY_SYSTEM")?;
    ensure!(
        !wrong.success(),
        "certificate accepted for a name it does not carry"
    );
    ensure!(
        wrong.stderr.contains("does not match host name"),
        "unexpected: {}",
        wrong.stderr
    );

    // Stop and start again on the same data.
    pg.stop()?;
    ensure!(!pg.is_running() && !pid_is_alive(pid));
    pg.start()?;
    ensure!(pg.psql("select 2")?.trim() == "2");
    pg.kill()?;
    ensure!(!pg.is_running());
    eprintln!("PostgreSQL test done after {:?}", t0.elapsed());
    Ok(())
}

/// Not a test on its own: `killed_test_leaves_nothing_behind` runs it in a child process and
/// kills that process with SIGKILL. Without the marker variable it returns at once.
#[test]
#[ignore = "run (and killed) by harness::killed_test_leaves_nothing_behind"]
fn victim_env() {
    let Some(marker) = std::env::var_os(VICTIM_VAR) else {
        return;
    };
    let env = Env::new("victim").expect("env");
    let etcd = EtcdCluster::start(&env, 1).expect("etcd");
    let pg = PgInstance::init_and_start(&env, "pg1").expect("postgres");
    let services = vec![
        etcd.member_pid(0).expect("etcd pid"),
        pg.pid().expect("pg pid"),
    ];
    let fp = Footprint::of(&env, services).expect("footprint");
    let marker = PathBuf::from(marker);
    let tmp = marker.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(&fp).expect("json")).expect("write marker");
    fs::rename(&tmp, &marker).expect("rename marker");
    // Wait to be killed; bounded so a broken parent cannot leave this running forever.
    sleep(Duration::from_secs(120));
}

/// Kills (and reaps) the child process when dropped, then sweeps what it left.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = sweep();
        }
    }
}

#[test]
fn killed_test_leaves_nothing_behind() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("victim.json");
    let log = dir.path().join("victim.log");
    let child = Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "harness::victim_env",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(VICTIM_VAR, &marker)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    // Whatever happens below, the victim does not outlive this test.
    let mut child = KillOnDrop(child);
    let victim_pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !marker.exists() {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "victim exited early ({status}):\n{}",
                fs::read_to_string(&log)?
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "victim not ready after 90 s:\n{}",
                fs::read_to_string(&log)?
            );
        }
        sleep(Duration::from_millis(50));
    }
    let fp: Footprint = serde_json::from_slice(&fs::read(&marker)?)?;
    eprintln!("victim {victim_pid} up after {:?}: {fp:?}", t0.elapsed());
    ensure!(
        fp.env_id.contains(&format!("-{victim_pid}-")),
        "env id {} lacks the victim pid",
        fp.env_id
    );
    fp.assert_present()?;

    kill(Pid::from_raw(i32::try_from(victim_pid)?), Signal::SIGKILL)?;
    let status = child.0.wait()?;
    ensure!(status.code().is_none(), "victim was not killed: {status}");
    // The victim's destructors did not run: everything it started is still there.
    fp.assert_present()
        .context("leftovers vanished without a sweep")?;

    let report = sweep()?;
    eprintln!("sweep: {report:?}");
    ensure!(
        report.errors.is_empty(),
        "sweep errors: {:?}",
        report.errors
    );
    ensure!(
        report.cgroups_removed.contains(&fp.env_id),
        "sweep did not remove the cgroup: {report:?}"
    );
    ensure!(report.hosts_blocks_removed.contains(&fp.hosts_tag));
    ensure!(report.roots_removed.contains(&fp.root));
    fp.assert_gone()?;
    eprintln!("killed-test check done after {:?}", t0.elapsed());
    Ok(())
}

/// Starts a 1-member etcd and an untracked grandchild process (a service's own child, which
/// no handle knows), so teardown must use the cgroup to get it.
fn populate(env: &Env) -> Result<(EtcdCluster, pgkeep_testkit::Service, Vec<u32>)> {
    let etcd = EtcdCluster::start(env, 1)?;
    let pg_user = ServiceUser::postgres()?;
    let node = env.add_node("sleeper", &pg_user)?;
    let sleeper = env.spawn(
        "sleeper",
        &pg_user,
        &node.dir,
        "/bin/sh",
        &["-c".as_ref(), "sleep 300 & exec sleep 301".as_ref()],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    // etcd, the sleeper and its own child (which no handle knows about).
    let pids = loop {
        let pids = env.cgroup_pids()?;
        if pids.len() >= 3 {
            break pids;
        }
        ensure!(
            Instant::now() < deadline,
            "sleeper processes did not appear"
        );
        sleep(Duration::from_millis(20));
    };
    ensure!(pids.contains(&sleeper.pid()), "sleeper not in the cgroup");
    Ok((etcd, sleeper, pids))
}

#[test]
fn teardown_on_drop_leaves_nothing() -> Result<()> {
    let env = Env::new("teardown")?;
    let (etcd, sleeper, pids) = populate(&env)?;
    let fp = Footprint::of(&env, pids)?;
    fp.assert_present()?;
    drop(sleeper);
    drop(etcd);
    drop(env);
    fp.assert_gone()?;

    // The same when the test panics while holding the environment.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let env = Env::new("panicking").expect("env");
        let (_etcd, _sleeper, pids) = populate(&env).expect("populate");
        let fp = Footprint::of(&env, pids).expect("footprint");
        fp.assert_present().expect("present");
        tx.send(fp).expect("send");
        panic!("deliberate panic with a live environment");
    })
    .join();
    ensure!(panicked.is_err(), "the thread did not panic");
    let fp = rx.recv()?;
    ensure!(fp.services.len() >= 3);
    fp.assert_gone()?;
    Ok(())
}
