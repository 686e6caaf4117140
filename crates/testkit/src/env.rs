//! One test environment: temp root, loopback network + hosts block, cgroup, PKI, ports.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pgkeep::pki::{Ca, CertRequest, Usage};

use crate::service::{self, CommandOutput, Service};
use crate::{cgroup, hosts, paths, proc};

/// Days the per-environment CA and its certificates are valid.
const CERT_DAYS: u32 = 2;

/// Ports are drawn from this range, below the kernel's ephemeral range (32768-60999), so an
/// outgoing connection cannot take a port between its allocation and the service's bind.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// Ports never handed out: the defaults of etcd, PostgreSQL and Patroni, and every port the
/// reference lab (`patroni-lab/*.sh`) uses.
const AVOID_PORTS: &[u16] = &[
    1800, 1830, 2379, 2380, 5432, 8008, 8432, 15432, 15433, 15434, 18008, 18009, 18010, 18432,
    18433, 23791, 23792, 23793, 23801, 23802, 23803, 25000, 25001, 27000, 27090,
];

pub use pgkeep::local::ServiceUser;

/// A node of an environment: one loopback address, one DNS name, one directory.
#[derive(Debug, Clone)]
pub struct Node {
    /// Short name, unique in the environment (e.g. `etcd1`, `pg2`).
    pub name: String,
    /// The node's own loopback address.
    pub addr: Ipv4Addr,
    /// `<name>.<env-id>.pgkeep.test`, resolved through the environment's hosts block.
    pub dns_name: String,
    /// The node's directory (`<root>/<name>`), mode 0700, owned by `user`.
    pub dir: PathBuf,
    /// The user the node's service runs as.
    pub user: ServiceUser,
}

/// A client certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate file.
    pub cert: PathBuf,
    /// Private key file (mode 0600).
    pub key: PathBuf,
}

/// What teardown has to undo, filled in as `Env::new` makes progress, so a half-built
/// environment is cleaned up too.
#[derive(Default)]
struct Teardown {
    cgroup: Option<PathBuf>,
    hosts_tag: Option<String>,
    root: Option<PathBuf>,
}

impl Teardown {
    /// Kill the cgroup, remove the hosts block, remove the temp root. Idempotent.
    fn run(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(cg) = self.cgroup.take() {
            match cgroup::kill_and_remove(&cg, cgroup::KILL_TIMEOUT) {
                Ok(()) => {
                    if let Some(parent) = cg.parent() {
                        cgroup::remove_if_empty(parent);
                    }
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if let Some(tag) = self.hosts_tag.take()
            && let Err(e) = hosts::remove_blocks(&|t| t == tag)
        {
            errors.push(format!("removing hosts block {tag}: {e:#}"));
        }
        if let Some(root) = self.root.take() {
            match fs::remove_dir_all(&root) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing {}: {e}", root.display())),
            }
            if let Some(parent) = root.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown: {}", errors.join("; "))
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(e) = self.run() {
            eprintln!("pgkeep-testkit: {e:#}");
        }
    }
}

struct Inner {
    id: String,
    root: PathBuf,
    cgroup: PathBuf,
    hosts_tag: String,
    net: (u8, u8),
    ca: Ca,
    ca_cert: PathBuf,
    nodes: Mutex<Vec<Node>>,
    ports: Mutex<HashSet<u16>>,
    teardown: Mutex<Teardown>,
}

/// A test environment. Cloning gives another handle to the same environment; when the last
/// handle is dropped (also during a panic), everything is torn down: the cgroup is killed and
/// removed, the hosts block and the temp root are removed. See the crate docs.
#[derive(Clone)]
pub struct Env {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("id", &self.inner.id)
            .field("root", &self.inner.root)
            .field("cgroup", &self.inner.cgroup)
            .field("subnet", &self.subnet())
            .finish()
    }
}

/// Turns a test name into a DNS label part: `[a-z0-9-]`, at most 16 characters (keeps Unix socket paths short).
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut collapsed = String::with_capacity(s.len());
    for c in s.chars() {
        if !(c == '-' && collapsed.ends_with('-')) {
            collapsed.push(c);
        }
    }
    let s: String = collapsed.trim_matches('-').chars().take(16).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() { "env".into() } else { s }
}

pub(crate) fn random_u64() -> u64 {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl Env {
    /// Creates an environment named after `name` (a test name; it becomes part of the env id
    /// `<name>-<pid>-<n>` and of every DNS name). The first call in a process sweeps leftovers
    /// of dead test processes of this checkout first (see [`crate::sweep`]).
    pub fn new(name: &str) -> Result<Env> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the pgkeep test harness must run as root (cgroups, /etc/hosts, service users)");
        }
        static SWEPT: OnceLock<()> = OnceLock::new();
        if SWEPT.get().is_none() {
            let report = crate::sweep().context("sweeping leftovers of earlier test runs")?;
            if !report.is_empty() {
                eprintln!("pgkeep-testkit: swept leftovers: {report:?}");
            }
            let _ = SWEPT.set(());
        }
        hosts::check_writable()?;
        let cg_parent = paths::checkout_cgroup_dir()?;
        let base = paths::ensure_base_dirs()?;

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let start = proc::start_time(pid).context("reading own start time")?;
        let label = sanitize(name);
        let mut td = Teardown::default();
        let mut created = None;
        for _attempt in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let id = format!("{label}-{pid}-{n}");
            let root = base.join(&id);
            match fs::DirBuilder::new().mode(0o755).create(&root) {
                Ok(()) => {
                    created = Some((id, root));
                    break;
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                // Another process's teardown removed the (then empty) checkout directory.
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    paths::ensure_base_dirs()?;
                }
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", root.display())),
            }
        }
        let (id, root) = created.context("could not create a temp root")?;
        td.root = Some(root.clone());
        paths::ensure_dir(&root, 0o755)?;
        // The owner file lets a sweep tell this process from a later one with the same pid.
        fs::write(root.join("owner"), format!("{pid} {start}\n"))?;
        for sub in ["logs", "tmp", "pki"] {
            paths::ensure_dir(&root.join(sub), 0o755)?;
        }

        let hosts_tag = format!("{} {} {id}", hosts::TAG_PREFIX, paths::checkout_id());
        td.hosts_tag = Some(hosts_tag.clone());
        let net = hosts::allocate_block(&hosts_tag)?;

        let cg = cg_parent.join(&id);
        cgroup::create(&cg)?;
        td.cgroup = Some(cg.clone());

        let ca = Ca::create(&format!("pgkeep-test CA {id}"), CERT_DAYS + 1)
            .context("creating the test CA")?;
        let ca_files = ca.write(&root.join("pki")).context("writing the test CA")?;

        Ok(Env {
            inner: Arc::new(Inner {
                id,
                root,
                cgroup: cg,
                hosts_tag,
                net,
                ca,
                ca_cert: ca_files.cert,
                nodes: Mutex::new(Vec::new()),
                ports: Mutex::new(HashSet::new()),
                teardown: Mutex::new(td),
            }),
        })
    }

    /// The environment id, `<name>-<pid>-<n>`.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The temp root, `/var/tmp/pgkeep-test/<checkout-id>/<env-id>`.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The environment's cgroup directory.
    pub fn cgroup_path(&self) -> &Path {
        &self.inner.cgroup
    }

    /// The tag of the environment's `/etc/hosts` block (`pgkeep-test <checkout-id> <env-id>`;
    /// the block is delimited by `# BEGIN <tag>` and `# END <tag>`).
    pub fn hosts_tag(&self) -> &str {
        &self.inner.hosts_tag
    }

    /// The environment's loopback network, e.g. `127.77.1.0/24`.
    pub fn subnet(&self) -> String {
        let (a, b) = self.inner.net;
        format!("127.{a}.{b}.0/24")
    }

    /// The pids now in the environment's cgroup.
    pub fn cgroup_pids(&self) -> Result<Vec<u32>> {
        cgroup::procs(&self.inner.cgroup)
    }

    /// The CA certificate (PEM) every certificate of this environment is issued by.
    pub fn ca_cert_path(&self) -> &Path {
        &self.inner.ca_cert
    }

    /// The CA itself, to issue further certificates.
    pub fn ca(&self) -> &Ca {
        &self.inner.ca
    }

    /// A directory for scratch files (0755, root-owned).
    pub fn tmp_dir(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    /// Adds a node: the next free address of the network, the DNS name
    /// `<name>.<env-id>.pgkeep.test` (added to the hosts block), and the directory
    /// `<root>/<name>` (0700, owned by `user`).
    pub fn add_node(&self, name: &str, user: &ServiceUser) -> Result<Node> {
        if name.is_empty()
            || name.len() > 20
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("node name {name:?} must be 1-20 characters of [a-z0-9-]");
        }
        let mut nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.iter().any(|n| n.name == name) {
            bail!("node {name} already exists in {}", self.inner.id);
        }
        let host = u8::try_from(nodes.len() + 1)
            .ok()
            .filter(|h| *h < 255)
            .context("network full")?;
        let (a, b) = self.inner.net;
        let addr = Ipv4Addr::new(127, a, b, host);
        let dns_name = format!("{name}.{}.{}", self.inner.id, crate::DNS_SUFFIX);
        let dir = self.inner.root.join(name);
        paths::ensure_dir(&dir, 0o700)?;
        user.chown(&dir)?;
        hosts::add_entry(&self.inner.hosts_tag, addr, &dns_name)?;
        let node = Node {
            name: name.to_string(),
            addr,
            dns_name,
            dir,
            user: user.clone(),
        };
        nodes.push(node.clone());
        Ok(node)
    }

    /// The node called `name`, if added.
    pub fn node(&self, name: &str) -> Option<Node> {
        let nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.iter().find(|n| n.name == name).cloned()
    }

    /// A port free on `addr` now, never handed out before in this environment, outside the
    /// ephemeral range and never a default or reference-lab port.
    pub fn alloc_port(&self, addr: Ipv4Addr) -> Result<u16> {
        let mut ports = self.inner.ports.lock().unwrap_or_else(|p| p.into_inner());
        let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
        for _ in 0..500 {
            let port = PORT_RANGE.start + u16::try_from(random_u64() % span).expect("in range");
            if AVOID_PORTS.contains(&port) || ports.contains(&port) {
                continue;
            }
            if TcpListener::bind((addr, port)).is_ok() {
                ports.insert(port);
                return Ok(port);
            }
        }
        bail!("no free port found on {addr}")
    }

    /// Issues a certificate from the environment's CA and writes `<basename>` cert and key into
    /// `dir`, owned by `owner` (key 0600).
    #[allow(clippy::too_many_arguments)]
    pub fn issue_cert(
        &self,
        dir: &Path,
        basename: &str,
        common_name: &str,
        usage: Usage,
        dns_names: Vec<String>,
        ip_addresses: Vec<IpAddr>,
        owner: &ServiceUser,
    ) -> Result<ClientCert> {
        let issued = self
            .inner
            .ca
            .issue(&CertRequest {
                common_name: common_name.to_string(),
                usage,
                dns_names,
                ip_addresses,
                validity_days: CERT_DAYS,
            })
            .with_context(|| format!("issuing a certificate for {common_name}"))?;
        let files = issued
            .write(dir, basename)
            .with_context(|| format!("writing certificate {basename}"))?;
        owner.chown(&files.cert)?;
        owner.chown(&files.key)?;
        Ok(ClientCert {
            cert: files.cert,
            key: files.key,
        })
    }

    /// A server certificate for `node` (its DNS name and address) in the node's directory,
    /// `usage` either server-only or server-and-client (etcd peers).
    pub fn node_cert(&self, node: &Node, basename: &str, usage: Usage) -> Result<ClientCert> {
        self.issue_cert(
            &node.dir,
            basename,
            &node.dns_name,
            usage,
            vec![node.dns_name.clone()],
            vec![IpAddr::V4(node.addr)],
            &node.user,
        )
    }

    /// A client certificate with common name `cn`, root-owned, in `<root>/pki`.
    pub fn client_cert(&self, cn: &str) -> Result<ClientCert> {
        let base = format!("client-{}", sanitize(cn));
        self.issue_cert(
            &self.inner.root.join("pki"),
            &base,
            cn,
            Usage::Client,
            Vec::new(),
            Vec::new(),
            &ServiceUser::root(),
        )
    }

    /// Copies the CA certificate into `dir` as `ca.crt`, owned by `owner`; returns its path.
    pub fn install_ca(&self, dir: &Path, owner: &ServiceUser) -> Result<PathBuf> {
        let dst = dir.join("ca.crt");
        fs::copy(&self.inner.ca_cert, &dst)
            .with_context(|| format!("copying the CA certificate to {}", dst.display()))?;
        owner.chown(&dst)?;
        Ok(dst)
    }

    /// A command that runs `program args` inside the environment's cgroup as `user`, with a
    /// cleared environment (HOME=`home`, USER, LOGNAME, PATH, LANG, and `envs`) in `home`.
    /// Never put secrets in `args` or `envs`.
    pub fn command(
        &self,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
    ) -> Command {
        service::command(&self.inner.cgroup, user, home, program, args, envs)
    }

    /// Starts a long-running service (see [`Env::command`]); its stdout and stderr go to
    /// `<root>/logs/<name>.log`.
    pub fn spawn(
        &self,
        name: &str,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
    ) -> Result<Service> {
        let cmd = self.command(user, home, program, args, envs);
        let log = self.inner.root.join("logs").join(format!("{name}.log"));
        Service::spawn(name, cmd, &log)
    }

    /// Runs a short command (see [`Env::command`]) to completion, at most `timeout`, and
    /// returns its output whatever the exit status.
    pub fn run(
        &self,
        user: &ServiceUser,
        home: &Path,
        program: impl AsRef<OsStr>,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
        timeout: Duration,
    ) -> Result<CommandOutput> {
        let cmd = self.command(user, home, program, args, envs);
        service::run(cmd, &self.tmp_dir(), timeout)
    }

    /// Tears the environment down now instead of at drop, reporting errors. Services still
    /// held elsewhere are killed with the cgroup. Later calls and the drop do nothing.
    pub fn teardown(&self) -> Result<()> {
        self.inner
            .teardown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_names() {
        assert_eq!(sanitize("harness::etcd_3"), "harness-etcd-3");
        assert_eq!(sanitize("abcdefghijklmno_x"), "abcdefghijklmno");
        assert_eq!(sanitize("::"), "env");
        assert_eq!(sanitize("A-very-long-test-name-indeed-yes").len(), 16);
    }
}
