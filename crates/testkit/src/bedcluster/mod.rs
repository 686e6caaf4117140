//! pgkeep clusters on real separate network stacks: an etcd cluster and agents (each with its
//! PostgreSQL) in the hosts of a [`NetBed`], so faults are network partitions rather than
//! signals.
//!
//! Layout: every host named for the cluster runs one etcd member ([`BedEtcdCluster`]) and one
//! agent with its PostgreSQL ([`BedAgentCluster`]), all listening on the host's bed address and
//! known by the host's bed DNS name (`<host>.<bed-id>.pgkeep.test`, resolved inside the bed
//! through `/etc/netns/<ns>/hosts`). Certificates name those DNS names and addresses. Processes
//! start through [`NetBed::spawn`] and [`NetBed::run`]: they join the environment's cgroup,
//! enter the host's namespace, get the bed's `/etc` files pinned for their whole life (so the
//! names keep resolving whatever happens to the root namespace's `/etc/hosts`; see
//! [`NetBed::command`]) and drop to their service user. Hosts of the bed that run nothing (e.g.
//! a `client` host for the test's own connections) stay free for the test.
//!
//! Each host has its own network stack, so ports are fixed rather than allocated: etcd 2379 and
//! 2380, REST API 8008, and PostgreSQL `5433 + i` for the `i`-th agent (distinct, so that a
//! client can tell the nodes apart by `inet_server_port()`, as the fault tests' writers do).
//!
//! Both types borrow the bed: declare the bed first, so it is dropped (torn down) last.

mod etcd;

pub use etcd::BedEtcdCluster;

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::agents::{Agent, DcsOptions, NodeSpec, write_node_files};
use crate::env::{Node, ServiceUser};
use crate::service::CommandOutput;
use crate::{NetBed, paths};

/// REST API port of every agent.
const API_PORT: u16 = 8008;

/// PostgreSQL port of agent 0; agent `i` listens on `PG_PORT_BASE + i`.
const PG_PORT_BASE: u16 = 5433;

/// Bound on one `psql` run.
const PSQL_TIMEOUT: Duration = Duration::from_secs(10);

/// Agents (`pgkeep agent`, each managing its PostgreSQL) in hosts of a [`NetBed`], one per host,
/// on top of a [`BedEtcdCluster`]. The agent in host `h` is called `h` (its member name and
/// PostgreSQL `application_name`), has its directory in `<env root>/pg-<h>` and runs as
/// `postgres`. Its configuration is the one [`crate::AgentCluster`] writes, with bed addresses
/// and names, and `pgkeep.cluster_networks` set to the bed's subnet (PostgreSQL's `pg_hba.conf`
/// then admits the other hosts). The first agent may bootstrap.
pub struct BedAgentCluster<'b> {
    bed: &'b NetBed,
    hosts: Vec<String>,
    /// The agents, in the order of the hosts given to [`BedAgentCluster::prepare`].
    pub agents: Vec<Agent>,
    /// The cluster name.
    pub scope: String,
    /// Operator client certificate for the REST API (allowed by every agent).
    pub operator_cert: std::path::PathBuf,
    /// Its key.
    pub operator_key: std::path::PathBuf,
    /// The REST API password.
    pub api_password: String,
    pgkeep_bin: std::path::PathBuf,
}

impl std::fmt::Debug for BedAgentCluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BedAgentCluster")
            .field("bed", &self.bed.id())
            .field("scope", &self.scope)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl<'b> BedAgentCluster<'b> {
    /// Prepares one agent in each of `hosts` (distinct hosts of `etcd`'s bed): directories,
    /// certificates, configuration. Nothing is started yet. `pgkeep_bin` is the binary under
    /// test.
    pub fn prepare(
        etcd: &BedEtcdCluster<'b>,
        hosts: &[&str],
        scope: &str,
        pgkeep_bin: &Path,
        dcs: &DcsOptions,
    ) -> Result<BedAgentCluster<'b>> {
        let bed = etcd.bed();
        let env = bed.env();
        let known = bed.hosts();
        if hosts.is_empty() {
            bail!("a cluster needs at least one host");
        }
        for (i, h) in hosts.iter().enumerate() {
            if !known.contains(h) {
                bail!("bed {} has no host {h:?}", bed.id());
            }
            if hosts[..i].contains(h) {
                bail!("host {h} given twice");
            }
        }
        let pg = ServiceUser::postgres()?;
        let api_password = format!("pw-{:016x}", crate::env::random_u64());
        let operator = env.client_cert("operator")?;
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let etcd_hosts: Vec<String> = etcd
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("https://").to_owned())
            .collect();
        let networks = [bed.subnet()];
        let mut agents = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let dir = env.root().join(format!("pg-{host}"));
            if dir.exists() {
                bail!(
                    "{} exists: host {host} already runs an agent",
                    dir.display()
                );
            }
            paths::ensure_dir(&dir, 0o700)?;
            pg.chown(&dir)?;
            let node = Node {
                name: (*host).to_owned(),
                addr: bed.addr(host),
                dns_name: bed.dns_name(host),
                dir,
                user: pg.clone(),
            };
            let pg_port = PG_PORT_BASE + u16::try_from(i).context("too many agents")?;
            let config = write_node_files(
                env,
                &node,
                &NodeSpec {
                    scope,
                    members: &names,
                    etcd_hosts: &etcd_hosts,
                    pg_port,
                    api_port: API_PORT,
                    cluster_networks: &networks,
                    api_password: &api_password,
                    dcs,
                    bootstrap: i == 0,
                },
            )?;
            agents.push(Agent {
                node,
                pg_port,
                api_port: API_PORT,
                config,
                service: None,
            });
        }
        Ok(BedAgentCluster {
            bed,
            hosts: names,
            agents,
            scope: scope.to_owned(),
            operator_cert: operator.cert,
            operator_key: operator.key,
            api_password,
            pgkeep_bin: pgkeep_bin.to_owned(),
        })
    }

    /// The bed the cluster runs in.
    pub fn bed(&self) -> &'b NetBed {
        self.bed
    }

    /// The host agent `i` runs in.
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Starts agent `i`'s process in its host.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let a = &self.agents[i];
        let args = [OsStr::new("agent"), "-c".as_ref(), a.config.as_os_str()];
        let svc = self.bed.spawn(
            &self.hosts[i],
            &format!("{}-agent", a.node.name),
            &a.node.user,
            &a.node.dir,
            &self.pgkeep_bin,
            &args,
            &[],
        )?;
        self.agents[i].service = Some(svc);
        Ok(())
    }

    /// Starts every agent.
    pub fn start_all(&mut self) -> Result<()> {
        (0..self.agents.len()).try_for_each(|i| self.start(i))
    }

    /// `psql -XAtq` on agent `i`'s PostgreSQL over its Unix socket, as the `postgres` OS user,
    /// run inside the agent's host (`ip netns exec`); bounded by 10 s.
    pub fn psql(&self, i: usize, sql: &str) -> Result<CommandOutput> {
        let a = &self.agents[i];
        let port = a.pg_port.to_string();
        let socket = a.socket_dir();
        let args: Vec<&OsStr> = vec![
            "-XAtq".as_ref(),
            "-h".as_ref(),
            socket.as_os_str(),
            "-p".as_ref(),
            port.as_ref(),
            "-d".as_ref(),
            "postgres".as_ref(),
            "-c".as_ref(),
            sql.as_ref(),
        ];
        let psql = Path::new(crate::PG_BIN_DIR).join("psql");
        self.bed.run(
            &self.hosts[i],
            &a.node.user,
            &a.node.dir,
            psql,
            &args,
            &[],
            PSQL_TIMEOUT,
        )
    }

    /// Whether agent `i`'s PostgreSQL answers and is not in recovery.
    pub fn is_primary(&self, i: usize) -> bool {
        self.psql(i, "SELECT pg_is_in_recovery()")
            .is_ok_and(|o| o.success() && o.stdout.trim() == "f")
    }

    /// The index of the agent whose PostgreSQL runs as primary, if exactly one does.
    pub fn primary(&self) -> Option<usize> {
        let primaries: Vec<usize> = (0..self.agents.len())
            .filter(|i| self.is_primary(*i))
            .collect();
        (primaries.len() == 1).then(|| primaries[0])
    }

    /// The application names of walsenders streaming from agent `i`.
    pub fn streaming_to(&self, i: usize) -> Vec<String> {
        self.psql(
            i,
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1",
        )
        .map(|o| o.stdout.lines().map(str::to_owned).collect())
        .unwrap_or_default()
    }

    /// The PID in agent `i`'s `postmaster.pid`, if the file exists and the process lives.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.agents[i].data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        crate::pid_is_alive(u32::try_from(pid).ok()?).then_some(pid)
    }

    /// Agent `i`'s log (empty before it started or if unreadable).
    pub fn agent_log(&self, i: usize) -> String {
        self.agents[i]
            .service
            .as_ref()
            .and_then(|s| std::fs::read_to_string(s.log_path()).ok())
            .unwrap_or_default()
    }

    /// Waits until `cond` holds, polling every 200 ms, at most `timeout`; on timeout the
    /// agents' log tails are in the error.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&BedAgentCluster<'b>) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut logs = String::new();
        for a in &self.agents {
            if let Some(s) = &a.service {
                logs.push_str(&format!("\n--- {} ---\n{}", a.node.name, s.log_tail(40)));
            }
        }
        bail!("timed out after {timeout:?} waiting for {what}{logs}")
    }
}
