//! An etcd cluster whose members run in the hosts of a [`NetBed`], one member per host.

use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use pgkeep::pki::Usage;

use crate::env::{ClientCert, Node, ServiceUser};
use crate::service::{CommandOutput, Service};
use crate::{ETCD_CLIENT_CN, NetBed, paths};

/// Client port of every member (each host has its own network stack, so the default is free).
pub(crate) const CLIENT_PORT: u16 = 2379;

/// Peer port of every member.
pub(crate) const PEER_PORT: u16 = 2380;

/// Backend quota: 256 MiB, as the loopback clusters have.
const QUOTA_BACKEND_BYTES: u64 = 256 * 1024 * 1024;

/// Bound on starting the cluster until healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one `etcdctl` run.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(20);

struct Member {
    /// The bed host the member runs in.
    host: String,
    /// Name `etcd-<host>`, the host's address and DNS name, directory `<root>/etcd-<host>`.
    node: Node,
    cert: ClientCert,
    ca: PathBuf,
    service: Mutex<Option<Service>>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.node.dns_name)
    }

    fn peer_url(&self) -> String {
        format!("https://{}:{PEER_PORT}", self.node.dns_name)
    }

    fn service(&self) -> MutexGuard<'_, Option<Service>> {
        self.service.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running etcd 3.4 cluster inside a [`NetBed`]: member `i` runs as the `etcd` user in host
/// `hosts[i]`'s network namespace (started through [`NetBed::spawn`], so it is in the
/// environment's cgroup, with the bed's names pinned), listens for clients and peers on the
/// host's bed address (ports 2379 and 2380) and advertises the host's bed DNS name. TLS
/// everywhere with client certificates (clients and peers); a member's certificate names the
/// host's DNS name and bed address, and unlike the loopback [`crate::EtcdCluster`] peers' client
/// certificates are checked against their source address (each host has its own). Same raft
/// timings as the loopback clusters (heartbeat 50 ms, election 500 ms, pre-vote).
///
/// `etcdctl` runs in one host of the bed, the "control host" (normally a client host that no
/// fault cuts off), as root.
pub struct BedEtcdCluster<'b> {
    bed: &'b NetBed,
    members: Vec<Member>,
    ctl_host: String,
    client: ClientCert,
    initial_cluster: String,
    token: String,
}

impl std::fmt::Debug for BedEtcdCluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BedEtcdCluster")
            .field("bed", &self.bed.id())
            .field("endpoints", &self.endpoints())
            .field("ctl_host", &self.ctl_host)
            .finish()
    }
}

impl<'b> BedEtcdCluster<'b> {
    /// Starts one member in each of `hosts` (1 to 7 distinct hosts of `bed`) and waits
    /// (bounded) until every member is healthy, as seen from `ctl_host`, the host `etcdctl`
    /// runs in.
    pub fn start(bed: &'b NetBed, hosts: &[&str], ctl_host: &str) -> Result<BedEtcdCluster<'b>> {
        if !(1..=7).contains(&hosts.len()) {
            bail!("an etcd cluster has 1 to 7 members, not {}", hosts.len());
        }
        let known = bed.hosts();
        for h in hosts.iter().chain([&ctl_host]) {
            if !known.contains(h) {
                bail!("bed {} has no host {h:?}", bed.id());
            }
        }
        let env = bed.env();
        let user = ServiceUser::etcd()?;
        let mut members = Vec::with_capacity(hosts.len());
        for host in hosts {
            let name = format!("etcd-{host}");
            let dir = env.root().join(&name);
            if dir.exists() {
                bail!("{} exists: host {host} already runs etcd", dir.display());
            }
            paths::ensure_dir(&dir, 0o700)?;
            user.chown(&dir)?;
            let node = Node {
                name,
                addr: bed.addr(host),
                dns_name: bed.dns_name(host),
                dir,
                user: user.clone(),
            };
            let cert = env.issue_cert(
                &node.dir,
                "etcd",
                &node.dns_name,
                Usage::ServerAndClient,
                vec![node.dns_name.clone(), (*host).to_owned()],
                vec![IpAddr::V4(node.addr)],
                &user,
            )?;
            let ca = env.install_ca(&node.dir, &user)?;
            members.push(Member {
                host: (*host).to_owned(),
                node,
                cert,
                ca,
                service: Mutex::new(None),
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.node.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = BedEtcdCluster {
            bed,
            members,
            ctl_host: ctl_host.to_owned(),
            client: env.client_cert(ETCD_CLIENT_CN)?,
            initial_cluster,
            token: format!("pgkeep-test-{}", bed.id()),
        };
        for i in 0..cluster.members.len() {
            cluster.spawn_member(i, "new")?;
        }
        cluster
            .wait_healthy(START_TIMEOUT)
            .with_context(|| format!("starting etcd in bed {}", bed.id()))?;
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
        let addr = m.node.addr;
        let args: Vec<OsString> = [
            format!("--name={}", m.node.name),
            format!("--data-dir={}", m.node.dir.join("data").display()),
            format!("--listen-client-urls=https://{addr}:{CLIENT_PORT}"),
            format!("--advertise-client-urls={}", m.client_url()),
            format!("--listen-peer-urls=https://{addr}:{PEER_PORT}"),
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
        let svc = self.bed.spawn(
            &m.host,
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

    /// The bed the cluster runs in.
    pub fn bed(&self) -> &'b NetBed {
        self.bed
    }

    /// The host `etcdctl` runs in.
    pub fn ctl_host(&self) -> &str {
        &self.ctl_host
    }

    /// The client endpoints, `https://<bed-dns-name>:2379`, one per member (stopped ones too).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The host member `i` runs in.
    pub fn member_host(&self, i: usize) -> Result<&str> {
        Ok(&self.member(i)?.host)
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
            .bed
            .env()
            .root()
            .join("logs")
            .join(format!("{}.log", m.node.name)))
    }

    /// The CA certificate clients must trust.
    pub fn ca_path(&self) -> &Path {
        self.bed.env().ca_cert_path()
    }

    /// Stops member `i` gracefully (SIGTERM), SIGKILL after 15 s. It then counts as stopped
    /// for [`BedEtcdCluster::wait_healthy`] until [`BedEtcdCluster::start_member`].
    pub fn stop_member(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let Some(svc) = m.service().take() else {
            return Ok(());
        };
        svc.kill(Signal::SIGTERM)?;
        if svc.wait_exit(Duration::from_secs(15)).is_err() {
            svc.kill_and_reap();
            bail!("etcd member {} ignored SIGTERM for 15 s", m.node.name);
        }
        Ok(())
    }

    /// Restarts stopped member `i` on its data (`--initial-cluster-state existing`); does not
    /// wait (use [`BedEtcdCluster::wait_healthy`]).
    pub fn start_member(&self, i: usize) -> Result<()> {
        self.spawn_member(i, "existing")
    }

    /// Runs `etcdctl` (API v3) as root in the control host against `endpoints`, with the CA,
    /// the test client certificate and short timeouts, followed by `args`; bounded by 20 s.
    pub fn etcdctl_on(&self, endpoints: &[String], args: &[&str]) -> Result<CommandOutput> {
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
        let env = self.bed.env();
        self.bed.run(
            &self.ctl_host,
            &ServiceUser::root(),
            env.root(),
            crate::ETCDCTL_BIN,
            &refs,
            &[("ETCDCTL_API", OsStr::new("3"))],
            ETCDCTL_TIMEOUT,
        )
    }

    /// [`BedEtcdCluster::etcdctl_on`] every member's endpoint.
    pub fn etcdctl(&self, args: &[&str]) -> Result<CommandOutput> {
        self.etcdctl_on(&self.endpoints(), args)
    }

    /// Waits until every running member answers `endpoint health` (a quorum read) from the
    /// control host, at most `timeout`. Members stopped through this handle are left out; a
    /// member that exited by itself fails the wait at once, with its log.
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
                    "etcd not healthy after {timeout:?}; last check:\n{}\n{}",
                    last.trim_end(),
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for BedEtcdCluster<'_> {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(svc) = m.service().take() {
                svc.kill_and_reap();
            }
        }
    }
}
