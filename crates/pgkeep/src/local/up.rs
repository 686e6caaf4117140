//! `pgkeep up`: builds (or resumes) the environment in `D` step by step and waits until the
//! cluster is healthy.
//!
//! Idempotent per member: a member whose process runs (checked in `/proc`, see
//! [`super::spawn`]) is left alone; only what is missing is started. The first `up` of a
//! directory allocates the network and ports, writes the inventory last (so a failed first run
//! is simply redone) and allows the first node to bootstrap; later runs reuse the inventory
//! and never allow a bootstrap again.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::health::{self, Healthy};
use super::spawn::{self, Identity, Spec};
use super::{
    BOOTSTRAP_MARKER, Layout, ServiceUser, address, backup, certs, etcd, etcd_access, files,
    haproxy, hosts, s,
};
use crate::inventory::{BackupHost, DbHost, EtcdHost, Inventory, LoadBalancer, OrganisationCa};

/// Ports are drawn from here: below the ephemeral range, so no outgoing connection takes one
/// between allocation and bind.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// Never handed out: the defaults of PostgreSQL, etcd and Patroni, and every port of the
/// reference lab (`patroni-lab/lib.sh`).
const AVOID_PORTS: &[u16] = &[
    1800, 1830, 2379, 2380, 5432, 8008, 8432, 15432, 15433, 15434, 18008, 18009, 18010, 18432,
    18433, 23791, 23792, 23793, 23801, 23802, 23803, 25000, 25001, 27000, 27090,
];

/// The file that marks a directory as a pgkeep environment before its inventory exists.
const STAMP: &str = ".pgkeep-local";

/// What `pgkeep up` was asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The environment directory.
    pub dir: PathBuf,
    /// Cluster name for a new environment (default `demo`; ignored when the inventory exists).
    pub cluster: Option<String>,
    /// An organisation CA (certificate, key) for a new environment.
    pub organisation_ca: Option<(PathBuf, PathBuf)>,
    /// How long to wait for the cluster to become healthy.
    pub timeout: Duration,
    /// Start the agents (false: files, hosts block and etcd only).
    pub agents: bool,
    /// Start HAProxy in front of the agents (needs `agents`).
    pub haproxy: bool,
    /// A new environment gets a pgBackRest repository host (an existing one keeps what its
    /// inventory says).
    pub backup: bool,
    /// Start `pgkeep backup-scheduler` on the repository host.
    pub backup_scheduler: bool,
}

/// Numbered progress lines; a failing step's error names the step.
pub(crate) struct Steps {
    n: usize,
    total: usize,
}

impl Steps {
    /// Progress over `total` steps.
    pub(crate) fn new(total: usize) -> Steps {
        Steps { n: 0, total }
    }

    /// Runs one step: prints `[n/total] title`, then `ok (secs)`; an error names the step.
    pub(crate) fn run<T>(&mut self, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.n += 1;
        println!("[{}/{}] {title}", self.n, self.total);
        let t0 = Instant::now();
        let r = f().with_context(|| format!("step {}/{} ({title}) failed", self.n, self.total));
        if r.is_ok() {
            println!("      ok ({:.1}s)", t0.elapsed().as_secs_f64());
        }
        r
    }
}

/// Runs `pgkeep up`.
pub fn up(opts: &UpOptions) -> Result<()> {
    let layout = Layout::new(&opts.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    println!("pgkeep up: {}", layout.dir.display());
    let with_haproxy = opts.agents && opts.haproxy;
    let first = !layout.inventory().exists();
    let with_backup = opts.agents
        && if first {
            opts.backup
        } else {
            Inventory::load(&layout.inventory())?.backup_host.is_some()
        };
    let total = 6
        + if opts.agents { 3 } else { 0 }
        + usize::from(with_haproxy)
        + 2 * usize::from(with_backup);
    let mut steps = Steps::new(total);

    let (pg, etcd_user, haproxy_user, pgbr_user) = steps
        .run("checking prerequisites and service users", || {
            prerequisites(with_haproxy)
        })?;
    let inv = steps.run("preparing the directory and the inventory", || {
        let mut users = vec![&pg, &etcd_user, &pgbr_user];
        users.extend(haproxy_user.as_ref());
        check_traversable(&layout, &users)?;
        if first {
            new_inventory(&layout, opts)
        } else {
            let mut inv = Inventory::load(&layout.inventory())?;
            println!("      existing environment: cluster {}", inv.cluster);
            if opts.cluster.as_ref().is_some_and(|c| *c != inv.cluster)
                || opts.organisation_ca.is_some()
            {
                println!("      (--cluster and --ca-cert apply to a new environment only)");
            }
            add_pgbackrest_ports(&layout, &mut inv)?;
            Ok(inv)
        }
    })?;
    steps.run("certificates and configuration files", || {
        files::skeleton(&layout, &inv, &pg, &etcd_user)?;
        certs::issue_all(
            &layout,
            &inv,
            &pg,
            &etcd_user,
            haproxy_user.as_ref(),
            Some(&pgbr_user),
        )?;
        backup::write_files(&layout, &inv, &pg, &pgbr_user)?;
        files::node_files(&layout, &inv, &pg)?;
        files::operator_files(&layout, &inv)?;
        for h in &inv.database_hosts {
            crate::config::Config::load(&layout.node_config(&h.name))?;
        }
        if first {
            let marker = layout
                .conf_dir(&inv.database_hosts[0].name)
                .join(BOOTSTRAP_MARKER);
            files::write(&marker, "", 0o600, Some(&pg))?;
            inv.save(&layout.inventory())
                .with_context(|| format!("writing {}", layout.inventory().display()))?;
            let _ = std::fs::remove_file(layout.path(STAMP));
        }
        println!("      {}", layout.inventory().display());
        Ok(())
    })?;
    steps.run("names in /etc/hosts", || {
        let net = super::inventory_net(&inv)?;
        hosts::install(&layout.hash(), net, &layout.dir, &inv.host_entries())?;
        for (ip, name) in inv.host_entries() {
            println!("      {ip:<15} {name}");
        }
        Ok(())
    })?;
    steps.run("etcd members", || {
        for m in &inv.etcd_hosts {
            ensure_running(&etcd::spec(&layout, &inv, m, &etcd_user))?;
        }
        rt.block_on(etcd::wait_healthy(&layout, &inv, Duration::from_secs(30)))
    })?;
    steps.run("etcd users, roles and authentication", || {
        let report = rt.block_on(etcd_access::ensure(&layout, &inv))?;
        etcd_access::print_report(&report);
        Ok(())
    })?;
    if !opts.agents {
        println!("etcd is healthy; no agents were started (--no-agents).");
        println!(
            "Operator:    pgkeep ctl -c {} list",
            s(&layout.path("ctl.yml"))
        );
        return Ok(());
    }
    if with_backup {
        steps.run("pgBackRest servers (repository host and nodes)", || {
            for spec in &backup::server_specs(&layout, &inv, &pg, &pgbr_user) {
                ensure_running(spec)?;
            }
            Ok(())
        })?;
    }
    steps.run("agents", || {
        let exe = agent_binary(&layout, &pg)?;
        for h in &inv.database_hosts {
            let spec = agent_spec(&layout, h, &pg, &exe);
            if spawn::running(&spec.pid_file, &spec.identity).is_none() {
                check_pg_port(&layout, h)?;
            }
            ensure_running(&spec)?;
        }
        Ok(())
    })?;
    let healthy = steps.run("waiting for a healthy cluster", || {
        rt.block_on(wait_healthy(&layout, &inv, &pg, opts.timeout))
    })?;
    steps.run("application and admin roles", || {
        let leader = inv
            .database_hosts
            .iter()
            .find(|h| h.name == healthy.leader)
            .context("the leader is not in the inventory")?;
        rt.block_on(health::ensure_roles(&layout, leader, &pg))
    })?;
    if with_backup {
        steps.run(
            "pgBackRest stanza, archive check and backup scheduler",
            || {
                backup::ensure_stanza(&layout, &inv)?;
                println!(
                    "      stanza {} in place; WAL from the primary reaches the repository",
                    inv.cluster
                );
                if !opts.backup_scheduler {
                    println!("      backup scheduler not started (--no-backup-scheduler)");
                    return Ok(());
                }
                let exe = agent_binary(&layout, &pgbr_user)?;
                ensure_running(&backup::scheduler_spec(&layout, &pgbr_user, &exe))?;
                let sched: Vec<String> = backup::DEFAULT_SCHEDULE
                    .iter()
                    .map(|(k, v)| format!("{k} \"{v}\""))
                    .collect();
                println!("      schedule (UTC): {}", sched.join(", "));
                Ok(())
            },
        )?;
    }
    if let Some(user) = &haproxy_user {
        steps.run("HAProxy (write and read ports)", || {
            let changed = haproxy::write_files(&layout, &inv, user)?;
            haproxy::start_or_reload(&layout, &inv, user, changed)?;
            let replicas: Vec<String> = inv
                .database_hosts
                .iter()
                .map(|h| h.name.clone())
                .filter(|n| *n != healthy.leader)
                .collect();
            haproxy::wait_routing(&layout, &healthy.leader, &replicas, opts.timeout)?;
            haproxy::probe(&layout, &inv)
        })?;
    }
    summary(&layout, &inv, &healthy, with_haproxy);
    Ok(())
}

/// An environment written before pgBackRest was part of `up` has a backup host but no
/// node-side pgBackRest ports: they are allocated and the inventory saved.
fn add_pgbackrest_ports(layout: &Layout, inv: &mut Inventory) -> Result<()> {
    if inv.backup_host.is_none()
        || inv
            .database_hosts
            .iter()
            .all(|h| h.pgbackrest_port.is_some())
    {
        return Ok(());
    }
    let mut taken: BTreeSet<u16> = inv
        .database_hosts
        .iter()
        .flat_map(|h| [h.pg_port, h.api_port])
        .collect();
    for h in &mut inv.database_hosts {
        if h.pgbackrest_port.is_none() {
            h.pgbackrest_port = Some(alloc_port(h.address, &mut taken)?);
        }
    }
    inv.check(&layout.inventory())?;
    inv.save(&layout.inventory())
        .with_context(|| format!("writing {}", layout.inventory().display()))?;
    println!("      added pgBackRest ports to the inventory");
    Ok(())
}

type Users = (ServiceUser, ServiceUser, Option<ServiceUser>, ServiceUser);

fn prerequisites(with_haproxy: bool) -> Result<Users> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "pgkeep up must run as root (it edits /etc/hosts and starts services as their users)"
        );
    }
    if with_haproxy && !Path::new(haproxy::HAPROXY_BIN).exists() {
        bail!(
            "{} is missing; install the haproxy package (make deps) or pass --no-haproxy",
            haproxy::HAPROXY_BIN
        );
    }
    for p in [
        super::ETCD_BIN,
        backup::PGBACKREST_BIN,
        "/usr/bin/setpriv",
        "/usr/bin/setsid",
        &format!("{}/postgres", super::PG_BIN_DIR),
        &format!("{}/psql", super::PG_BIN_DIR),
    ] {
        if !Path::new(p).exists() {
            bail!("{p} is missing; install the Debian packages first (make deps)");
        }
    }
    let pg = ServiceUser::lookup("postgres")?;
    let etcd = ServiceUser::lookup("etcd")?;
    let haproxy = with_haproxy.then(ServiceUser::haproxy).transpose()?;
    if nix::unistd::User::from_name("pgbackrest")?.is_none() {
        let st = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args([
                "--home-dir",
                "/var/lib/pgbackrest",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg("pgbackrest")
            .status()
            .context("running useradd")?;
        if !st.success() {
            bail!("useradd pgbackrest failed ({st})");
        }
        println!("      created the system user pgbackrest");
    }
    let pgbr = ServiceUser::lookup(backup::PGBACKREST_USER)?;
    Ok((pg, etcd, haproxy, pgbr))
}

/// Every directory from `/` down to `D` (those that exist) must be searchable by each service
/// user; `D` itself must be empty, ours, or absent.
fn check_traversable(layout: &Layout, users: &[&ServiceUser]) -> Result<()> {
    let mut chain: Vec<&Path> = layout.dir.ancestors().filter(|p| p.is_dir()).collect();
    chain.reverse();
    for dir in chain {
        for u in users {
            if !spawn::probe_as(
                u,
                Path::new("/"),
                "/usr/bin/test",
                &[OsStr::new("-x"), dir.as_os_str()],
            )? {
                bail!(
                    "{} is not traversable by the {} user, so services could not reach {}; \
                     choose a directory elsewhere (such as /var/lib/pgkeep-demo) or give others \
                     search permission on {} (chmod o+x)",
                    dir.display(),
                    u.name,
                    layout.dir.display(),
                    dir.display()
                );
            }
        }
    }
    if !layout.inventory().exists() && layout.dir.is_dir() {
        let foreign = std::fs::read_dir(&layout.dir)
            .with_context(|| format!("reading {}", layout.dir.display()))?
            .next()
            .is_some()
            && !layout.path(STAMP).exists();
        if foreign {
            bail!(
                "{} is not empty and holds no pgkeep environment (no inventory.yml); \
                 choose an empty or new directory",
                layout.dir.display()
            );
        }
    }
    Ok(())
}

/// A new inventory: a free network, fresh ports. Nothing is written but the stamp and the
/// (entry-less) hosts block that reserves the network.
fn new_inventory(layout: &Layout, opts: &UpOptions) -> Result<Inventory> {
    let cluster = opts.cluster.clone().unwrap_or_else(|| "demo".into());
    let label_ok = !cluster.is_empty()
        && cluster.len() <= 40
        && !cluster.starts_with('-')
        && cluster
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label_ok {
        bail!("cluster name {cluster:?}: use 1-40 lower-case letters, digits and '-'");
    }
    files::dir(&layout.dir, 0o755, None)?;
    files::write(
        &layout.path(STAMP),
        "pgkeep local environment\n",
        0o644,
        None,
    )?;
    let net = hosts::reserve(&layout.hash(), &layout.dir)?;
    let mut taken = BTreeSet::new();
    let mut port = |ip: IpAddr| alloc_port(ip, &mut taken);
    let database_hosts = (1..=3u8)
        .map(|i| {
            let a = address(net, 10 + i);
            Ok(DbHost {
                name: format!("node{i}"),
                address: a,
                pg_port: port(a)?,
                api_port: port(a)?,
                pgbackrest_port: if opts.backup { Some(port(a)?) } else { None },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let etcd_hosts = (1..=3u8)
        .map(|i| {
            let a = address(net, 20 + i);
            Ok(EtcdHost {
                name: format!("etcd{i}"),
                address: a,
                client_port: port(a)?,
                peer_port: port(a)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let b = address(net, 31);
    let backup_host = if opts.backup {
        Some(BackupHost {
            name: "backup".into(),
            address: b,
            port: port(b)?,
        })
    } else {
        None
    };
    let l = address(net, 41);
    let load_balancer = Some(LoadBalancer {
        name: "lb".into(),
        address: l,
        write_port: port(l)?,
        read_port: port(l)?,
    });
    let inv = Inventory {
        domain: format!("{cluster}.internal"),
        cluster,
        namespace: "/service/".into(),
        organisation_ca: opts
            .organisation_ca
            .as_ref()
            .map(|(cert, key)| OrganisationCa {
                cert: cert.clone(),
                key: key.clone(),
            }),
        database_hosts,
        etcd_hosts,
        backup_host,
        load_balancer,
    };
    inv.check(&layout.inventory())?;
    println!(
        "      new environment: cluster {}, network 127.{}.{net}.0/24",
        inv.cluster,
        super::NET_OCTET
    );
    Ok(inv)
}

/// A port free on `ip` now, outside [`AVOID_PORTS`] and not yet in `taken`.
fn alloc_port(ip: IpAddr, taken: &mut BTreeSet<u16>) -> Result<u16> {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    for chunk in super::random_bytes(1024)?.chunks_exact(2) {
        let port = PORT_RANGE.start + u16::from_le_bytes([chunk[0], chunk[1]]) % span;
        if AVOID_PORTS.contains(&port) || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind((ip, port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found on {ip}")
}

/// Starts `spec` unless its process already runs.
fn ensure_running(spec: &Spec) -> Result<()> {
    if let Some(pid) = spawn::running(&spec.pid_file, &spec.identity) {
        println!("      {:<6} already running (pid {pid})", spec.name);
        return Ok(());
    }
    let pid = spawn::start(spec)?;
    println!(
        "      {:<6} started (pid {pid}), log {}",
        spec.name,
        spec.log.display()
    );
    Ok(())
}

/// The node's PostgreSQL port is free, or held by the node's own postmaster.
fn check_pg_port(layout: &Layout, h: &DbHost) -> Result<()> {
    if TcpListener::bind((h.address, h.pg_port)).is_ok() {
        return Ok(());
    }
    let pid_file = layout.data_dir(&h.name).join("postmaster.pid");
    match spawn::read_pid_first_line(&pid_file) {
        Some(pid) if spawn::is_postmaster_of(pid, &layout.node_dir(&h.name)) => Ok(()),
        _ => bail!(
            "{}: cannot listen on {}:{}: another program uses it",
            h.name,
            h.address,
            h.pg_port
        ),
    }
}

/// How `up` and `down` recognise node `n`'s agent.
pub fn agent_identity(layout: &Layout, n: &str) -> Identity {
    Identity {
        program: "pgkeep".into(),
        marker: s(&layout.node_config(n)),
    }
}

fn agent_spec(layout: &Layout, h: &DbHost, pg: &ServiceUser, exe: &Path) -> Spec {
    let config = layout.node_config(&h.name);
    Spec {
        name: h.name.clone(),
        user: pg.clone(),
        program: exe.to_owned(),
        args: vec!["agent".into(), "-c".into(), config.into_os_string()],
        home: layout.node_dir(&h.name),
        log: layout.agent_log(&h.name),
        pid_file: layout.agent_pid(&h.name),
        identity: agent_identity(layout, &h.name),
        // The PostgreSQL port may be held by this node's own postmaster, which the agent
        // adopts; see `check_pg_port`.
        listens: vec![(h.address, h.api_port).into()],
    }
}

/// The pgkeep binary the agents run: this one when `postgres` can execute it, else a copy in
/// `D/bin` (a checkout under `/root` is not reachable by other users).
pub(super) fn agent_binary(layout: &Layout, pg: &ServiceUser) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the pgkeep binary")?;
    if spawn::probe_as(
        pg,
        Path::new("/"),
        "/usr/bin/test",
        &[OsStr::new("-x"), exe.as_os_str()],
    )? {
        return Ok(exe);
    }
    let bin = layout.path("bin");
    files::dir(&bin, 0o755, None)?;
    let copy = bin.join("pgkeep");
    // /proc/self/exe still reads when a rebuild replaced the file on disk meanwhile.
    let bytes = std::fs::read("/proc/self/exe")
        .or_else(|_| std::fs::read(&exe))
        .with_context(|| format!("reading {}", exe.display()))?;
    if std::fs::read(&copy).ok() != Some(bytes.clone()) {
        crate::fsutil::write_atomic(&copy, &bytes, 0o755)
            .with_context(|| format!("copying pgkeep to {}", copy.display()))?;
    }
    println!(
        "      postgres cannot execute {}; agents run {}",
        exe.display(),
        copy.display()
    );
    Ok(copy)
}

/// Waits for [`health::check`] to pass, printing each newly unmet condition; fails at once
/// when an agent exits.
async fn wait_healthy(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
    timeout: Duration,
) -> Result<Healthy> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        for h in &inv.database_hosts {
            if spawn::running(&layout.agent_pid(&h.name), &agent_identity(layout, &h.name))
                .is_none()
            {
                let log = layout.agent_log(&h.name);
                bail!(
                    "the agent of {} exited; see {}:\n{}",
                    h.name,
                    log.display(),
                    spawn::log_tail(&log, 20)
                );
            }
        }
        match health::check(layout, inv, pg).await {
            Ok(h) => return Ok(h),
            Err(unmet) => {
                if unmet != last {
                    println!(
                        "      {:>5.1}s  waiting: {unmet}",
                        t0.elapsed().as_secs_f64()
                    );
                    last = unmet;
                }
            }
        }
        if t0.elapsed() >= timeout {
            bail!(
                "the cluster is not healthy after {timeout:?}: {last}; the agents' logs are \
                 {}/<node>-agent.log",
                layout.logs().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn summary(layout: &Layout, inv: &Inventory, healthy: &Healthy, with_haproxy: bool) {
    println!();
    println!(
        "Cluster {} is healthy: leader {}, timeline {}, system identifier {}",
        inv.cluster, healthy.leader, healthy.timeline, healthy.system_identifier
    );
    for h in &inv.database_hosts {
        let role = if h.name == healthy.leader {
            "leader"
        } else {
            "replica"
        };
        println!(
            "  {:<6} {:<8} {}:{}  (log {})",
            h.name,
            role,
            inv.fqdn(&h.name),
            h.pg_port,
            layout.agent_log(&h.name).display()
        );
    }
    let leader = inv.database_hosts.iter().find(|h| h.name == healthy.leader);
    let all: Vec<&DbHost> = inv.database_hosts.iter().collect();
    println!();
    println!(
        "Connect (as root; the passfile {} is 0600):",
        files::pgpass_file(layout).display()
    );
    if let Some(l) = leader {
        println!(
            "  psql \"{}\"",
            files::libpq_tcp(layout, inv, &[l], super::APP_ROLE, super::APP_ROLE)
        );
        println!(
            "  psql \"{}\"",
            files::libpq_tcp(layout, inv, &[l], "postgres", super::ADMIN_ROLE)
        );
        println!("Superuser (peer authentication over the Unix socket):");
        println!(
            "  runuser -u postgres -- psql \"{}\"",
            files::libpq_socket(layout, l)
        );
    }
    println!("Any primary (follows switchovers):");
    println!(
        "  psql \"{}\"",
        files::libpq_tcp(layout, inv, &all, super::APP_ROLE, super::APP_ROLE)
    );
    if with_haproxy && let Some(lb) = &inv.load_balancer {
        let lb_name = inv.fqdn(&lb.name);
        let conn = |write| haproxy::libpq(layout, inv, write, super::APP_ROLE, super::APP_ROLE);
        if let (Ok(w), Ok(r)) = (conn(true), conn(false)) {
            println!();
            println!(
                "Through HAProxy ({lb_name}; stats socket {}):",
                s(&layout.haproxy_socket())
            );
            println!("  read-write (the primary, follows failovers):");
            println!("  psql \"{w}\"");
            println!("  read-only (healthy replicas):");
            println!("  psql \"{r}\"");
        }
    }
    println!();
    println!(
        "Operator:    pgkeep ctl -c {} list",
        s(&layout.path("ctl.yml"))
    );
    println!(
        "Patroni:     patronictl -c {} list",
        s(&layout.path("patronictl.yml"))
    );
    println!("Scripts:     {}", s(&layout.path("cluster.json")));
    println!(
        "Stop:        pgkeep down --dir {}   (--purge also removes the data)",
        s(&layout.dir)
    );
}
