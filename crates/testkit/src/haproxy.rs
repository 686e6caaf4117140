//! Real HAProxy (Debian's 2.6) in front of an [`AgentCluster`], configured by pgkeep's own
//! renderer (`pgkeep::haproxy::render`), running as the `haproxy` user in the environment's
//! cgroup on its own node (`lb`, with its own address and DNS name).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use pgkeep::haproxy::stats::{self, ServerStat};
use pgkeep::haproxy::{self, DEFAULT_REPLICA_LAG, Files, Plan, READ_BACKEND, WRITE_BACKEND};
use pgkeep::pki::Usage;

use crate::agents::AgentCluster;
use crate::env::{Env, Node, ServiceUser};
use crate::service::Service;

/// Debian's HAProxy.
pub(crate) const HAPROXY_BIN: &str = "/usr/sbin/haproxy";

/// A load balancer for one [`AgentCluster`].
pub struct Haproxy {
    env: Env,
    /// The load balancer's node (address, DNS name, directory owned by `haproxy`).
    pub node: Node,
    /// The write frontend's port (the primary).
    pub write_port: u16,
    /// The read frontend's port (healthy replicas).
    pub read_port: u16,
    /// The configuration file.
    pub config: PathBuf,
    /// The stats socket (mode 0600, owned by `haproxy`; the test runs as root).
    pub socket: PathBuf,
    /// The configuration's inputs.
    pub plan: Plan,
    service: Option<Service>,
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

impl Haproxy {
    /// Prepares HAProxy for `cluster`, before its agents start: a node `lb`, HAProxy's client
    /// certificate (CN `haproxy-lb`), a PostgreSQL server certificate for every node that also
    /// carries the load balancer's name (clients verify it through HAProxy), and the
    /// configuration pgkeep renders. Nothing runs yet.
    pub fn prepare(env: &Env, cluster: &AgentCluster) -> Result<Haproxy> {
        let user = ServiceUser::lookup("haproxy")?;
        let node = env.add_node("lb", &user)?;
        let write_port = env.alloc_port(node.addr)?;
        let read_port = env.alloc_port(node.addr)?;
        for a in &cluster.agents {
            env.issue_cert(
                &a.node.dir.join("pki"),
                "postgres",
                &a.node.dns_name,
                Usage::Server,
                vec![a.node.dns_name.clone(), node.dns_name.clone()],
                vec![IpAddr::V4(a.node.addr)],
                &a.node.user,
            )?;
        }
        let ca_file = env.install_ca(&node.dir, &user)?;
        let client = env.issue_cert(
            &node.dir,
            "haproxy-lb",
            "haproxy-lb",
            Usage::Client,
            Vec::new(),
            Vec::new(),
            &user,
        )?;
        let pem = node.dir.join("haproxy-lb.pem");
        fs::write(
            &pem,
            fs::read_to_string(&client.cert)? + &fs::read_to_string(&client.key)?,
        )?;
        chmod(&pem, 0o600)?;
        user.chown(&pem)?;
        let files = Files {
            ca_file,
            client_cert: Some(pem),
            stats_socket: node.dir.join("admin.sock"),
            state_file: node.dir.join("server-state"),
        };
        let plan = Plan {
            cluster: cluster.scope.clone(),
            write_bind: SocketAddr::new(IpAddr::V4(node.addr), write_port),
            read_bind: SocketAddr::new(IpAddr::V4(node.addr), read_port),
            servers: cluster
                .agents
                .iter()
                .map(|a| haproxy::Server {
                    name: a.node.name.clone(),
                    address: IpAddr::V4(a.node.addr),
                    pg_port: a.pg_port,
                    api_port: a.api_port,
                    api_name: a.node.dns_name.clone(),
                })
                .collect(),
            files,
            checks: haproxy::CheckTimings::default(),
            replica_lag: DEFAULT_REPLICA_LAG,
        };
        let config = node.dir.join("haproxy.cfg");
        fs::write(&config, haproxy::render(&plan)?)?;
        chmod(&config, 0o640)?;
        user.chown(&config)?;
        fs::write(&plan.files.state_file, "1\n")?;
        user.chown(&plan.files.state_file)?;
        Ok(Haproxy {
            env: env.clone(),
            socket: plan.files.stats_socket.clone(),
            node,
            write_port,
            read_port,
            config,
            plan,
            service: None,
        })
    }

    /// Starts HAProxy (`haproxy -W -db -f CONFIG`, master-worker in the foreground) and waits
    /// until its stats socket answers.
    pub fn start(&mut self) -> Result<()> {
        let args = [
            std::ffi::OsStr::new("-W"),
            "-db".as_ref(),
            "-f".as_ref(),
            self.config.as_os_str(),
        ];
        let svc = self.env.spawn(
            "haproxy",
            &self.node.user,
            &self.node.dir,
            HAPROXY_BIN,
            &args,
            &[],
        )?;
        self.service = Some(svc);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stats().is_err() {
            if let Some(s) = &self.service
                && !s.is_running()
            {
                bail!("haproxy exited:\n{}", s.log_tail(30));
            }
            if Instant::now() >= deadline {
                bail!(
                    "haproxy's stats socket does not answer:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The load balancer's DNS name (every PostgreSQL server certificate carries it).
    pub fn dns_name(&self) -> &str {
        &self.node.dns_name
    }

    /// The master process's PID.
    pub fn pid(&self) -> Option<u32> {
        self.service.as_ref().map(Service::pid)
    }

    /// Every server's state (`show stat`).
    pub fn stats(&self) -> Result<Vec<ServerStat>> {
        Ok(stats::show_stat(&self.socket)?)
    }

    /// The servers of `backend` that take new connections, sorted.
    pub fn routable(&self, backend: &str) -> Result<Vec<String>> {
        Ok(stats::routable(&self.stats()?, backend))
    }

    /// One server's state.
    pub fn server(&self, backend: &str, server: &str) -> Result<ServerStat> {
        self.stats()?
            .into_iter()
            .find(|s| s.backend == backend && s.server == server)
            .with_context(|| format!("no server {backend}/{server}"))
    }

    /// Waits until exactly `write` take writes and exactly `read` take reads.
    pub fn wait_routing(&self, write: &[&str], read: &[&str], timeout: Duration) -> Result<()> {
        let sorted = |v: &[&str]| {
            let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
            v.sort();
            v
        };
        let (want_w, want_r) = (sorted(write), sorted(read));
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match (self.routable(WRITE_BACKEND), self.routable(READ_BACKEND)) {
                (Ok(w), Ok(r)) if w == want_w && r == want_r => return Ok(()),
                (w, r) => last = format!("write {w:?}, read {r:?}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "HAProxy does not route writes to {want_w:?} and reads to {want_r:?} after \
             {timeout:?} (last: {last}):\n{}",
            self.log_tail(30)
        )
    }

    /// Reloads as an operator would: saves the servers' states to the server-state file, then
    /// SIGUSR2 to the master (which re-executes itself with the configuration file).
    pub fn reload(&self) -> Result<()> {
        stats::save_state(&self.socket, &self.plan.files.state_file)?;
        self.node.user.chown(&self.plan.files.state_file)?;
        self.service
            .as_ref()
            .context("haproxy is not started")?
            .kill(Signal::SIGUSR2)
    }

    /// The end of HAProxy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.service
            .as_ref()
            .map(|s| s.log_tail(lines))
            .unwrap_or_default()
    }
}
