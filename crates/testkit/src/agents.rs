//! Real `pgkeep agent` processes on top of an [`EtcdCluster`]: one node per member, each with
//! its own address, name, certificates and Patroni-structured configuration, running as the
//! `postgres` user in the environment's cgroup.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pgkeep::pki::Usage;

use crate::env::{Env, Node, ServiceUser};
use crate::etcd::EtcdCluster;
use crate::service::{CommandOutput, Service};

/// The basic-auth user every agent's REST API accepts.
pub const API_USER: &str = "pgkeep";

/// One agent and its node.
pub struct Agent {
    /// The node (address, DNS name, directory).
    pub node: Node,
    /// PostgreSQL port.
    pub pg_port: u16,
    /// REST API port.
    pub api_port: u16,
    /// The node's configuration file.
    pub config: PathBuf,
    /// The running process, if started.
    pub service: Option<Service>,
}

impl Agent {
    /// The Unix socket directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.node.dir.join("run")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.node.dir.join("data")
    }

    /// `https://<name>:<port>`.
    pub fn api_base(&self) -> String {
        format!("https://{}:{}", self.node.dns_name, self.api_port)
    }
}

/// The `bootstrap.dcs` settings of an [`AgentCluster`].
#[derive(Debug, Clone)]
pub struct DcsOptions {
    /// `ttl` (seconds).
    pub ttl: u32,
    /// `loop_wait` (seconds).
    pub loop_wait: u32,
    /// `retry_timeout` (seconds).
    pub retry_timeout: u32,
    /// `synchronous_mode`.
    pub synchronous_mode: bool,
    /// More `bootstrap.dcs` lines, YAML indented by four spaces.
    pub extra_yaml: String,
}

impl Default for DcsOptions {
    fn default() -> Self {
        DcsOptions {
            ttl: 10,
            loop_wait: 1,
            retry_timeout: 3,
            synchronous_mode: false,
            extra_yaml: String::new(),
        }
    }
}

/// Several agents forming one cluster.
pub struct AgentCluster {
    env: Env,
    /// The agents, in creation order.
    pub agents: Vec<Agent>,
    /// The cluster name.
    pub scope: String,
    /// Operator client certificate for the REST API (allowed by every agent).
    pub operator_cert: PathBuf,
    /// Its key.
    pub operator_key: PathBuf,
    /// The REST API password.
    pub api_password: String,
    pgkeep_bin: PathBuf,
}

impl AgentCluster {
    /// Prepares `n` nodes (configuration, certificates); the first may bootstrap. Nothing is
    /// started yet. `pgkeep_bin` is the binary under test.
    pub fn prepare(
        env: &Env,
        etcd: &EtcdCluster,
        scope: &str,
        n: usize,
        pgkeep_bin: &Path,
    ) -> Result<AgentCluster> {
        Self::prepare_with(env, etcd, scope, n, pgkeep_bin, &DcsOptions::default())
    }

    /// [`AgentCluster::prepare`] with other `bootstrap.dcs` settings.
    pub fn prepare_with(
        env: &Env,
        etcd: &EtcdCluster,
        scope: &str,
        n: usize,
        pgkeep_bin: &Path,
        dcs: &DcsOptions,
    ) -> Result<AgentCluster> {
        let pg = ServiceUser::postgres()?;
        let api_password = format!("pw-{:016x}", crate::env::random_u64());
        let operator = env.client_cert("operator")?;
        let names: Vec<String> = (1..=n).map(|i| format!("{scope}{i}")).collect();
        let etcd_hosts: Vec<String> = etcd
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("https://").to_owned())
            .collect();
        let mut agents = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node = env.add_node(name, &pg)?;
            let pg_port = env.alloc_port(node.addr)?;
            let api_port = env.alloc_port(node.addr)?;
            let config = write_node_files(
                env,
                &node,
                &NodeSpec {
                    scope,
                    members: &names,
                    etcd_hosts: &etcd_hosts,
                    pg_port,
                    api_port,
                    cluster_networks: &[],
                    api_password: &api_password,
                    dcs,
                    bootstrap: i == 0,
                },
            )?;
            agents.push(Agent {
                node,
                pg_port,
                api_port,
                config,
                service: None,
            });
        }
        Ok(AgentCluster {
            env: env.clone(),
            agents,
            scope: scope.to_owned(),
            operator_cert: operator.cert,
            operator_key: operator.key,
            api_password,
            pgkeep_bin: pgkeep_bin.to_owned(),
        })
    }

    /// Starts agent `i`'s process.
    pub fn start(&mut self, i: usize) -> Result<()> {
        self.start_with(i, &[])
    }

    /// Starts agent `i`'s process with `extra` command-line arguments after `-c FILE`.
    pub fn start_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let a = &mut self.agents[i];
        let mut args = vec![
            std::ffi::OsStr::new("agent"),
            "-c".as_ref(),
            a.config.as_os_str(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let svc = self.env.spawn(
            &format!("{}-agent", a.node.name),
            &a.node.user,
            &a.node.dir,
            &self.pgkeep_bin,
            &args,
            &[],
        )?;
        a.service = Some(svc);
        Ok(())
    }

    /// Starts every agent.
    pub fn start_all(&mut self) -> Result<()> {
        (0..self.agents.len()).try_for_each(|i| self.start(i))
    }

    /// `psql` on agent `i`'s PostgreSQL over its Unix socket, as the postgres OS user.
    pub fn psql(&self, i: usize, sql: &str) -> Result<CommandOutput> {
        self.psql_db(i, "postgres", sql)
    }

    /// [`AgentCluster::psql`] in database `db`.
    pub fn psql_db(&self, i: usize, db: &str, sql: &str) -> Result<CommandOutput> {
        let a = &self.agents[i];
        let port = a.pg_port.to_string();
        let socket = a.socket_dir();
        let args: Vec<&std::ffi::OsStr> = vec![
            "-XAtq".as_ref(),
            "-h".as_ref(),
            socket.as_os_str(),
            "-p".as_ref(),
            port.as_ref(),
            "-d".as_ref(),
            db.as_ref(),
            "-c".as_ref(),
            sql.as_ref(),
        ];
        let psql = Path::new(crate::PG_BIN_DIR).join("psql");
        self.env.run(
            &a.node.user,
            &a.node.dir,
            psql,
            &args,
            &[],
            Duration::from_secs(10),
        )
    }

    /// Waits until `cond` holds, polling; on timeout the agents' log tails are in the error.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&AgentCluster) -> bool,
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

    /// The index of the agent whose PostgreSQL runs as primary, if exactly one does.
    pub fn primary(&self) -> Option<usize> {
        let primaries: Vec<usize> = (0..self.agents.len())
            .filter(|i| {
                self.psql(*i, "SELECT pg_is_in_recovery()")
                    .is_ok_and(|o| o.success() && o.stdout.trim() == "f")
            })
            .collect();
        (primaries.len() == 1).then(|| primaries[0])
    }

    /// Every other member streams from agent `p` (by application name: a clone's
    /// `pg_basebackup` streams too, under its own name).
    pub fn replicas_streaming(&self, p: usize) -> bool {
        let mut others: Vec<String> = (0..self.agents.len())
            .filter(|i| *i != p)
            .map(|i| self.agents[i].node.name.clone())
            .collect();
        others.sort();
        self.streaming_to(p) == others
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
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// What [`write_node_files`] needs besides the node itself (address, DNS name, directory,
/// user): the cluster around it and where it listens.
pub(crate) struct NodeSpec<'a> {
    /// The cluster name.
    pub(crate) scope: &'a str,
    /// Every member's name (each agent accepts the others' REST client certificates).
    pub(crate) members: &'a [String],
    /// etcd endpoints as `host:port`.
    pub(crate) etcd_hosts: &'a [String],
    /// PostgreSQL port (on the node's address).
    pub(crate) pg_port: u16,
    /// REST API port (on the node's address).
    pub(crate) api_port: u16,
    /// `pgkeep.cluster_networks`; empty leaves the key out (pgkeep then allows the listen
    /// address, and `127.0.0.0/8` on loopback).
    pub(crate) cluster_networks: &'a [String],
    /// The REST API password.
    pub(crate) api_password: &'a str,
    /// `bootstrap.dcs`.
    pub(crate) dcs: &'a DcsOptions,
    /// Whether this node may bootstrap the cluster (gets the bootstrap marker).
    pub(crate) bootstrap: bool,
}

/// Writes one agent's files into `node.dir`: `conf/`, `run/`, `pki/` (0700), the CA, the
/// server, REST and client certificates (naming `node`'s DNS name and address), the REST
/// password file, `node.yml` (0600) and, for the bootstrap node, the bootstrap marker. Every
/// file is owned by `node.user`. Returns the path of `node.yml`.
pub(crate) fn write_node_files(env: &Env, node: &Node, spec: &NodeSpec<'_>) -> Result<PathBuf> {
    let pg = &node.user;
    let name = &node.name;
    let dir = &node.dir;
    for sub in ["conf", "run", "pki"] {
        fs::create_dir_all(dir.join(sub))?;
        pg.chown(&dir.join(sub))?;
        set_mode(&dir.join(sub), 0o700)?;
    }
    let pki = dir.join("pki");
    let ca = env.install_ca(&pki, pg)?;
    let ip = vec![IpAddr::V4(node.addr)];
    let dns = vec![node.dns_name.clone()];
    let server = env.issue_cert(
        &pki,
        "postgres",
        &node.dns_name,
        Usage::Server,
        dns.clone(),
        ip.clone(),
        pg,
    )?;
    let rest = env.issue_cert(
        &pki,
        "restapi",
        &format!("restapi-{name}"),
        Usage::Server,
        dns.clone(),
        ip,
        pg,
    )?;
    let rest_client = env.issue_cert(
        &pki,
        "restapi-client",
        &format!("restapi-client-{name}"),
        Usage::Client,
        vec![],
        vec![],
        pg,
    )?;
    let etcd_client = env.issue_cert(
        &pki,
        "etcd-client",
        &format!("pgkeep-{name}"),
        Usage::Client,
        vec![],
        vec![],
        pg,
    )?;
    let repl = env.issue_cert(
        &pki,
        "replication",
        "replicator",
        Usage::Client,
        vec![],
        vec![],
        pg,
    )?;
    let rewind = env.issue_cert(
        &pki,
        "rewind",
        "rewind_user",
        Usage::Client,
        vec![],
        vec![],
        pg,
    )?;
    let pw_file = pki.join("api.pw");
    fs::write(&pw_file, spec.api_password)?;
    pg.chown(&pw_file)?;
    set_mode(&pw_file, 0o600)?;
    let allowed: Vec<String> = spec
        .members
        .iter()
        .map(|n| format!("restapi-client-{n}"))
        .chain(["operator".to_owned()])
        .collect();
    let dcs = spec.dcs;
    let mut yaml = format!(
        r#"scope: {scope}
name: {name}
restapi:
  listen: {addr}:{api_port}
  connect_address: {dns}:{api_port}
  certfile: {rest_cert}
  keyfile: {rest_key}
  cafile: {ca}
  verify_client: optional
  authentication:
    username: {API_USER}
    password_file: {pw}
  allowed_client_names: [{allowed}]
ctl:
  certfile: {rc_cert}
  keyfile: {rc_key}
  cacert: {ca}
  authentication:
    username: {API_USER}
    password_file: {pw}
etcd3:
  hosts: [{endpoints}]
  cacert: {ca}
  cert: {ec_cert}
  key: {ec_key}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry_timeout}
    maximum_lag_on_failover: 1048576
    synchronous_mode: {sync}
{extra_dcs}  initdb: [{{encoding: UTF8}}, {{locale: C}}]
postgresql:
  listen: {addr}:{pg_port}
  connect_address: {dns}:{pg_port}
  data_dir: {data}
  config_dir: {conf}
  bin_dir: {bin}
  authentication:
    replication: {{username: replicator, sslcert: {repl_cert}, sslkey: {repl_key}, sslrootcert: {ca}}}
    rewind: {{username: rewind_user, sslcert: {rw_cert}, sslkey: {rw_key}, sslrootcert: {ca}}}
  parameters:
    ssl_cert_file: {srv_cert}
    ssl_key_file: {srv_key}
    ssl_ca_file: {ca}
    unix_socket_directories: {run}
    fsync: "off"
log:
  level: {log_level}
"#,
        scope = spec.scope,
        addr = node.addr,
        dns = node.dns_name,
        api_port = spec.api_port,
        pg_port = spec.pg_port,
        rest_cert = rest.cert.display(),
        rest_key = rest.key.display(),
        ca = ca.display(),
        pw = pw_file.display(),
        allowed = allowed.join(", "),
        rc_cert = rest_client.cert.display(),
        rc_key = rest_client.key.display(),
        endpoints = spec.etcd_hosts.join(", "),
        ec_cert = etcd_client.cert.display(),
        ec_key = etcd_client.key.display(),
        data = dir.join("data").display(),
        conf = dir.join("conf").display(),
        bin = crate::PG_BIN_DIR,
        repl_cert = repl.cert.display(),
        repl_key = repl.key.display(),
        rw_cert = rewind.cert.display(),
        rw_key = rewind.key.display(),
        srv_cert = server.cert.display(),
        srv_key = server.key.display(),
        run = dir.join("run").display(),
        ttl = dcs.ttl,
        loop_wait = dcs.loop_wait,
        retry_timeout = dcs.retry_timeout,
        sync = dcs.synchronous_mode,
        extra_dcs = dcs.extra_yaml,
        log_level = std::env::var("PGKEEP_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
    );
    if !spec.cluster_networks.is_empty() {
        yaml.push_str(&format!(
            "pgkeep:\n  cluster_networks: [{}]\n",
            spec.cluster_networks.join(", ")
        ));
    }
    let config = dir.join("node.yml");
    fs::write(&config, yaml)?;
    pg.chown(&config)?;
    set_mode(&config, 0o600)?;
    if spec.bootstrap {
        let marker = dir.join("conf").join("pgkeep-bootstrap-allowed");
        fs::write(&marker, b"")?;
        pg.chown(&marker)?;
    }
    Ok(config)
}
