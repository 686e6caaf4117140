//! Real etcd clusters: one member per node, mutual TLS for clients and peers.

use std::ffi::{OsStr, OsString};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use pgkeep::pki::Usage;

use crate::env::{ClientCert, Env, Node, ServiceUser};
use crate::service::{CommandOutput, Service};

/// Backend quota: 256 MiB, explicit rather than etcd's default.
const QUOTA_BACKEND_BYTES: u64 = 256 * 1024 * 1024;

/// Timeout for starting a cluster or a member until healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Common name of the client certificate tests use.
pub const ETCD_CLIENT_CN: &str = "pgkeep-test-client";

struct Member {
    node: Node,
    client_port: u16,
    peer_port: u16,
    cert: ClientCert,
    ca: PathBuf,
    service: Mutex<Option<Service>>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("https://{}:{}", self.node.dns_name, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("https://{}:{}", self.node.dns_name, self.peer_port)
    }

    fn service(&self) -> MutexGuard<'_, Option<Service>> {
        self.service.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running etcd cluster (etcd 3.4) of the environment.
///
/// Each member runs as the `etcd` user on its own node (address and DNS name `etcdN`), with
/// client and peer TLS and client-certificate authentication on both, `--pre-vote`, periodic
/// auto-compaction (1h), an explicit backend quota and short raft timings (heartbeat 50 ms,
/// election 500 ms). Endpoints use DNS names, so clients check the member's name.
pub struct EtcdCluster {
    members: Vec<Member>,
    client: ClientCert,
    initial_cluster: String,
    token: String,
    env: Env,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("env", &self.env.id())
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts a new cluster of `members` members (1 to 7) in `env` and waits until every
    /// member is healthy (bounded).
    pub fn start(env: &Env, members: usize) -> Result<EtcdCluster> {
        if !(1..=7).contains(&members) {
            bail!("an etcd cluster has 1 to 7 members, not {members}");
        }
        let user = ServiceUser::etcd()?;
        // The first cluster of an env has members etcd1.., a further one c2-etcd1.., etc.
        let prefix = if env.node("etcd1").is_none() {
            "etcd".to_string()
        } else {
            (2..100)
                .map(|k| format!("c{k}-etcd"))
                .find(|p| env.node(&format!("{p}1")).is_none())
                .context("too many etcd clusters in one environment")?
        };
        let name = |i: usize| format!("{prefix}{i}");
        let mut ms = Vec::with_capacity(members);
        for i in 1..=members {
            let node = env.add_node(&name(i), &user)?;
            let client_port = env.alloc_port(node.addr)?;
            let peer_port = env.alloc_port(node.addr)?;
            let cert = env.node_cert(&node, "etcd", Usage::ServerAndClient)?;
            let ca = env.install_ca(&node.dir, &user)?;
            ms.push(Member {
                node,
                client_port,
                peer_port,
                cert,
                ca,
                service: Mutex::new(None),
            });
        }
        let initial_cluster = ms
            .iter()
            .map(|m| format!("{}={}", m.node.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let client = env.client_cert(ETCD_CLIENT_CN)?;
        let cluster = EtcdCluster {
            members: ms,
            client,
            initial_cluster,
            token: format!("pgkeep-test-{}", env.id()),
            env: env.clone(),
        };
        for i in 0..members {
            cluster.spawn_member(i, "new")?;
        }
        cluster
            .wait_healthy(START_TIMEOUT)
            .context("starting the etcd cluster")?;
        Ok(cluster)
    }

    fn member(&self, i: usize) -> Result<&Member> {
        self.members
            .get(i)
            .with_context(|| format!("no etcd member {i} (cluster has {})", self.members.len()))
    }

    fn spawn_member(&self, i: usize, state: &str) -> Result<()> {
        let m = self.member(i)?;
        let mut slot = m.service();
        if slot.as_ref().is_some_and(Service::is_running) {
            bail!("etcd member {} is already running", m.node.name);
        }
        let listen_client = format!("https://{}:{}", m.node.addr, m.client_port);
        let listen_peer = format!("https://{}:{}", m.node.addr, m.peer_port);
        let data_dir = m.node.dir.join("data");
        let args: Vec<OsString> = [
            format!("--name={}", m.node.name),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={listen_client}"),
            format!("--advertise-client-urls={}", m.client_url()),
            format!("--listen-peer-urls={listen_peer}"),
            format!("--initial-advertise-peer-urls={}", m.peer_url()),
            format!("--initial-cluster={}", self.initial_cluster),
            format!("--initial-cluster-token={}", self.token),
            format!("--initial-cluster-state={state}"),
            "--client-cert-auth=true".into(),
            format!("--trusted-ca-file={}", m.ca.display()),
            format!("--cert-file={}", m.cert.cert.display()),
            format!("--key-file={}", m.cert.key.display()),
            "--peer-client-cert-auth=true".into(),
            format!("--peer-trusted-ca-file={}", m.ca.display()),
            format!("--peer-cert-file={}", m.cert.cert.display()),
            format!("--peer-key-file={}", m.cert.key.display()),
            // On loopback every connection comes from 127.0.0.1, whatever address the dialing
            // member listens on, so etcd's check of a peer certificate's SANs against the
            // connection's source address cannot pass. The chain (this env's CA) is still
            // verified, and servers are still checked against their DNS names.
            "--experimental-peer-skip-client-san-verification=true".into(),
            "--pre-vote=true".into(),
            "--auto-compaction-mode=periodic".into(),
            "--auto-compaction-retention=1h".into(),
            format!("--quota-backend-bytes={QUOTA_BACKEND_BYTES}"),
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--enable-v2=false".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let svc = self.env.spawn(
            &m.node.name,
            &m.node.user,
            &m.node.dir,
            crate::ETCD_BIN,
            &args,
            &[],
        )?;
        *slot = Some(svc);
        Ok(())
    }

    /// The client endpoints, `https://<dns-name>:<port>`, one per member (stopped ones too).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The client endpoints by address, `https://<ip>:<port>`.
    pub fn endpoints_by_ip(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://{}:{}", m.node.addr, m.client_port))
            .collect()
    }

    /// Member `i`'s client endpoint.
    pub fn endpoint(&self, i: usize) -> Result<String> {
        Ok(self.member(i)?.client_url())
    }

    /// The node member `i` runs on.
    pub fn member_node(&self, i: usize) -> Result<&Node> {
        Ok(&self.member(i)?.node)
    }

    /// The CA certificate clients must trust.
    pub fn ca_path(&self) -> &Path {
        self.env.ca_cert_path()
    }

    /// The client certificate (CN `pgkeep-test-client`).
    pub fn client_cert_path(&self) -> &Path {
        &self.client.cert
    }

    /// The client certificate's key.
    pub fn client_key_path(&self) -> &Path {
        &self.client.key
    }

    /// Number of members (running or not).
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s pid, if it is running.
    pub fn member_pid(&self, i: usize) -> Option<u32> {
        let m = self.members.get(i)?;
        m.service()
            .as_ref()
            .filter(|s| s.is_running())
            .map(Service::pid)
    }

    /// Member `i`'s log file.
    pub fn member_log(&self, i: usize) -> Result<PathBuf> {
        let m = self.member(i)?;
        Ok(self
            .env
            .root()
            .join("logs")
            .join(format!("{}.log", m.node.name)))
    }

    /// Whether member `i` is running.
    pub fn is_member_running(&self, i: usize) -> bool {
        self.member_pid(i).is_some()
    }

    /// Stops member `i` gracefully (SIGTERM), waiting up to 15 s before SIGKILL. The member
    /// then counts as stopped: [`EtcdCluster::wait_healthy`] leaves it out until
    /// [`EtcdCluster::start_member`].
    pub fn stop_member(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let mut slot = m.service();
        let Some(svc) = slot.take() else {
            return Ok(());
        };
        svc.kill(Signal::SIGTERM)?;
        if svc.wait_exit(Duration::from_secs(15)).is_err() {
            svc.kill_and_reap();
            bail!(
                "etcd member {} ignored SIGTERM for 15 s and was killed",
                m.node.name
            );
        }
        Ok(())
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub fn kill_member(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let mut slot = m.service();
        if let Some(svc) = slot.take() {
            svc.kill(Signal::SIGKILL)?;
            svc.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Freezes member `i` with `SIGSTOP`: it keeps accepting TCP connections (the kernel
    /// completes the handshakes) but never answers. It resumes when the result is dropped.
    pub fn freeze_member(&self, i: usize) -> Result<crate::faults::Frozen> {
        let m = self.member(i)?;
        let pid = self
            .member_pid(i)
            .with_context(|| format!("etcd member {} is not running", m.node.name))?;
        crate::faults::Frozen::stop([i32::try_from(pid).context("pid")?])
    }

    /// The index of the member that is the raft leader, as `etcdctl endpoint status` reports
    /// it (asked of each running member; the first that answers `IS LEADER = true` wins).
    pub fn raft_leader(&self) -> Result<usize> {
        let mut last = String::new();
        for i in 0..self.members.len() {
            if !self.is_member_running(i) {
                continue;
            }
            let out = self.etcdctl_member(i, &["endpoint", "status", "-w", "simple"])?;
            // ENDPOINT, ID, VERSION, DB SIZE, IS LEADER, IS LEARNER, RAFT TERM, ...
            let fields: Vec<&str> = out.stdout.trim().split(", ").collect();
            if out.success() && fields.get(4) == Some(&"true") {
                return Ok(i);
            }
            last = format!("{}{}", out.stdout, out.stderr);
        }
        bail!("no running etcd member reports itself as leader; last answer: {last}")
    }

    /// Restarts stopped member `i` on its existing data (`--initial-cluster-state existing`)
    /// and waits until it listens for clients (not until it is healthy: with quorum lost it
    /// cannot be; use [`EtcdCluster::wait_healthy`]).
    pub fn start_member(&self, i: usize) -> Result<()> {
        self.spawn_member(i, "existing")?;
        let m = self.member(i)?;
        let addr = SocketAddr::from((m.node.addr, m.client_port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(svc) = m.service().as_ref()
                && !svc.is_running()
            {
                bail!(
                    "etcd member {} exited during start:\n{}",
                    m.node.name,
                    svc.log_tail(30)
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {} does not listen on {addr} after {START_TIMEOUT:?}",
                    m.node.name
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Runs `etcdctl` (API v3) as root in the environment's cgroup with exactly `args` (no
    /// endpoints or certificates added), bounded by 20 s.
    pub fn etcdctl_raw(&self, args: &[&OsStr]) -> Result<CommandOutput> {
        self.env.run(
            &ServiceUser::root(),
            self.env.root(),
            crate::ETCDCTL_BIN,
            args,
            &[("ETCDCTL_API", OsStr::new("3"))],
            Duration::from_secs(20),
        )
    }

    /// Runs `etcdctl` against every member's endpoint with the CA, the test client certificate
    /// and short timeouts, followed by `args`.
    pub fn etcdctl(&self, args: &[&str]) -> Result<CommandOutput> {
        self.etcdctl_on(&self.endpoints(), args)
    }

    /// Like [`EtcdCluster::etcdctl`], against member `i`'s endpoint only.
    pub fn etcdctl_member(&self, i: usize, args: &[&str]) -> Result<CommandOutput> {
        self.etcdctl_on(&[self.endpoint(i)?], args)
    }

    fn etcdctl_on(&self, endpoints: &[String], args: &[&str]) -> Result<CommandOutput> {
        let mut all: Vec<OsString> = vec![
            format!("--endpoints={}", endpoints.join(",")).into(),
            format!("--cacert={}", self.ca_path().display()).into(),
            format!("--cert={}", self.client.cert.display()).into(),
            format!("--key={}", self.client.key.display()).into(),
            "--dial-timeout=2s".into(),
            "--command-timeout=3s".into(),
        ];
        all.extend(args.iter().map(OsString::from));
        let refs: Vec<&OsStr> = all.iter().map(OsString::as_os_str).collect();
        self.etcdctl_raw(&refs)
    }

    /// Waits until every running member answers `endpoint health` (a quorum read) over
    /// mutual TLS, at most `timeout`. Members stopped or killed through this handle are left
    /// out; a member that exited by itself fails the wait at once, with its log.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for m in &self.members {
                if let Some(svc) = m.service().as_ref()
                    && let Some(status) = svc.exit_status()
                {
                    bail!(
                        "etcd member {} exited ({status}):\n{}",
                        m.node.name,
                        svc.log_tail(30)
                    );
                }
            }
            let running: Vec<String> = self
                .members
                .iter()
                .filter(|m| m.service().as_ref().is_some_and(Service::is_running))
                .map(Member::client_url)
                .collect();
            if running.is_empty() {
                bail!("no etcd member is running");
            }
            let last = match self.etcdctl_on(&running, &["endpoint", "health"]) {
                Ok(out) if out.success() => return Ok(()),
                Ok(out) => format!("{}{}", out.stdout, out.stderr),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        let tail = m
                            .service()
                            .as_ref()
                            .map(|s| s.log_tail(15))
                            .unwrap_or_default();
                        format!("--- {} ---\n{tail}", m.node.name)
                    })
                    .collect();
                bail!(
                    "etcd cluster not healthy after {timeout:?}; last check:\n{}\n{}",
                    last.trim_end(),
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// The environment the cluster lives in.
    pub fn env(&self) -> &Env {
        &self.env
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(svc) = m.service().take() {
                svc.kill_and_reap();
            }
        }
    }
}
