//! `pgkeep up` / `pgkeep down`: a complete, secure local environment in one directory `D`.
//!
//! Three etcd members and three agents (each with its PostgreSQL) run on their own loopback
//! addresses and names (one `127.42.X.0/24` per environment, resolved through a marked block of
//! `/etc/hosts`), on allocated non-default ports, with a CA and one certificate per service.
//!
//! ```text
//! D/                      0755 root
//!   inventory.yml         the hosts of the environment (crate::inventory)
//!   ctl.yml               `pgkeep ctl -c D/ctl.yml ...`
//!   patronictl.yml        0600, `patronictl -c D/patronictl.yml ...` (inline REST API and
//!                         etcd passwords)
//!   cluster.json          members, endpoints, certificates and libpq strings for scripts
//!   pki/                  ca.crt, ca.key (0600), the operator's client certificates, etcd's
//!                         root certificate (etcd-root-admin) and patronictl's (etcd-gateway-*)
//!   secrets/              0700 root: REST API password, app/admin passwords, pgpass, the
//!                         etcd password of patronictl (etcd-patronictl.pw)
//!   logs/                 <etcd member>.log, <node>-agent.log, haproxy.log
//!   run/                  <member>.pid files; run/<node>/ is the node's Unix socket directory;
//!                         run/haproxy/ (0700 haproxy) HAProxy's stats socket and state file
//!   haproxy/              0750 root:haproxy: haproxy.cfg (0640), its client certificate
//!   etcd/<m>/             0700 etcd: data/ and the member's certificates
//!   nodes/<n>/            0700 postgres: node.yml, tls/, secrets/, conf/, data/,
//!                         pgbackrest/ (the node's pgBackRest files)
//!   backup/               the pgBackRest repository host (see [`backup`])
//! ```
//!
//! Processes run as their service users (`etcd`, `postgres`, `haproxy`, `pgbackrest`) through `setsid` and `setpriv`,
//! which exec without forking, so the recorded PID is the service's own. A PID is trusted only
//! when `/proc/<pid>/cmdline` names the expected program and this directory.

pub mod audit;
pub mod backup;
pub mod certs;
pub mod down;
pub mod etcd;
pub mod etcd_access;
pub mod files;
pub mod haproxy;
pub mod health;
pub mod hosts;
pub mod restore;
pub mod rotate;
pub mod rotate_ca;
pub mod spawn;
pub mod up;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::inventory::Inventory;

/// Second octet of every local environment's network (`127.42.X.0/24`).
pub const NET_OCTET: u8 = 42;
/// PostgreSQL binaries (Debian layout).
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The etcd server binary.
pub use crate::etcdconf::ETCD_BIN;
/// REST API user name of every agent and of the operator.
pub const REST_USER: &str = "pgkeep";
/// Name of the operator's certificates (`operator-<name>`, `pgkeep-<name>` on etcd).
pub const OPERATOR_NAME: &str = "admin";
/// Application role (owns the database of the same name).
pub const APP_ROLE: &str = "app";
/// Non-superuser administration role.
pub const ADMIN_ROLE: &str = "admin";
/// The file the agent of the first node looks for before it bootstraps a new cluster.
pub const BOOTSTRAP_MARKER: &str = "pgkeep-bootstrap-allowed";

/// Every path of an environment directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The environment directory (absolute).
    pub dir: PathBuf,
}

impl Layout {
    /// The layout of `dir`, made absolute (the directory need not exist yet).
    pub fn new(dir: &Path) -> Result<Layout> {
        let abs = std::path::absolute(dir)
            .with_context(|| format!("cannot make {} absolute", dir.display()))?;
        // Resolve symbolic links where the path exists, so one directory has one hash.
        let dir = match (abs.canonicalize(), abs.parent(), abs.file_name()) {
            (Ok(c), _, _) => c,
            (Err(_), Some(p), Some(name)) => p.canonicalize().map_or(abs.clone(), |p| p.join(name)),
            _ => abs,
        };
        if dir == Path::new("/") {
            bail!("refusing to use / as the environment directory");
        }
        let text = dir.to_str().context("the directory path must be UTF-8")?;
        if text
            .chars()
            .any(|c| c.is_control() || c == ',' || c == '\'')
        {
            bail!("the directory path {text:?} must not contain control characters, ',' or quotes");
        }
        Ok(Layout { dir })
    }

    /// Short stable id of the directory (FNV-1a of its path, 8 hex digits): the hosts block tag.
    pub fn hash(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.dir.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{:08x}", (h ^ (h >> 32)) as u32)
    }

    /// `D/<rel>`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
    /// `D/inventory.yml`.
    pub fn inventory(&self) -> PathBuf {
        self.path("inventory.yml")
    }
    /// `D/pki`.
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }
    /// `D/pki/ca.crt`.
    pub fn ca_cert(&self) -> PathBuf {
        self.pki().join(crate::pki::CA_CERT_FILE)
    }
    /// `D/secrets`.
    pub fn secrets(&self) -> PathBuf {
        self.path("secrets")
    }
    /// `D/logs`.
    pub fn logs(&self) -> PathBuf {
        self.path("logs")
    }
    /// `D/run`.
    pub fn run(&self) -> PathBuf {
        self.path("run")
    }
    /// `D/nodes/<n>`.
    pub fn node_dir(&self, n: &str) -> PathBuf {
        self.path("nodes").join(n)
    }
    /// `D/nodes/<n>/node.yml`.
    pub fn node_config(&self, n: &str) -> PathBuf {
        self.node_dir(n).join("node.yml")
    }
    /// `D/nodes/<n>/data`.
    pub fn data_dir(&self, n: &str) -> PathBuf {
        self.node_dir(n).join("data")
    }
    /// `D/nodes/<n>/conf`.
    pub fn conf_dir(&self, n: &str) -> PathBuf {
        self.node_dir(n).join("conf")
    }
    /// `D/logs/<n>-agent.log`.
    pub fn agent_log(&self, n: &str) -> PathBuf {
        self.logs().join(format!("{n}-agent.log"))
    }
    /// `D/run/<n>-agent.pid`.
    pub fn agent_pid(&self, n: &str) -> PathBuf {
        self.run().join(format!("{n}-agent.pid"))
    }
    /// `D/etcd/<m>`.
    pub fn etcd_dir(&self, m: &str) -> PathBuf {
        self.path("etcd").join(m)
    }
    /// `D/etcd/<m>/data`.
    pub fn etcd_data(&self, m: &str) -> PathBuf {
        self.etcd_dir(m).join("data")
    }
    /// `D/logs/<m>.log`.
    pub fn etcd_log(&self, m: &str) -> PathBuf {
        self.logs().join(format!("{m}.log"))
    }
    /// `D/run/<m>.pid`.
    pub fn etcd_pid(&self, m: &str) -> PathBuf {
        self.run().join(format!("{m}.pid"))
    }

    /// `D/haproxy`: HAProxy's configuration and client certificate (0750 root:haproxy).
    pub fn haproxy_dir(&self) -> PathBuf {
        self.path("haproxy")
    }
    /// `D/haproxy/haproxy.cfg`.
    pub fn haproxy_config(&self) -> PathBuf {
        self.haproxy_dir().join("haproxy.cfg")
    }
    /// `D/logs/haproxy.log`.
    pub fn haproxy_log(&self) -> PathBuf {
        self.logs().join("haproxy.log")
    }
    /// `D/run/haproxy.pid`: the master process.
    pub fn haproxy_pid(&self) -> PathBuf {
        self.run().join("haproxy.pid")
    }
    /// HAProxy's runtime directory (0700 haproxy): its stats socket and server-state file.
    /// `D/run/haproxy` when the socket path fits the kernel's limit (108 bytes, with HAProxy's
    /// temporary suffix), else `/run/pgkeep/<hash>/haproxy`.
    pub fn haproxy_run(&self) -> PathBuf {
        let local = self.run().join("haproxy");
        if local.join("admin.sock.4194304.tmp").as_os_str().len() < 100 {
            local
        } else {
            self.socket_base_fallback().join("haproxy")
        }
    }
    /// HAProxy's stats socket.
    pub fn haproxy_socket(&self) -> PathBuf {
        self.haproxy_run().join("admin.sock")
    }

    /// The node's Unix socket directory: `D/run/<n>` when short enough for PostgreSQL's limit
    /// (107 bytes, kept under 90 with the socket file name), else `/run/pgkeep/<hash>/<n>`.
    pub fn socket_dir(&self, n: &str) -> PathBuf {
        let local = self.run().join(n);
        if local.join(".s.PGSQL.65535").as_os_str().len() < 90 {
            local
        } else {
            self.socket_base_fallback().join(n)
        }
    }

    /// `/run/pgkeep/<hash>`, used for sockets when `D` is long.
    pub fn socket_base_fallback(&self) -> PathBuf {
        Path::new("/run/pgkeep").join(self.hash())
    }
}

/// An OS user a service runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl ServiceUser {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<ServiceUser> {
        let u = nix::unistd::User::from_name(name)
            .with_context(|| format!("looking up the OS user {name}"))?
            .with_context(|| format!("there is no OS user {name}; install its package first"))?;
        Ok(ServiceUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }

    /// `root` (uid 0): a process started as root keeps its identity.
    pub fn root() -> ServiceUser {
        ServiceUser {
            name: "root".into(),
            uid: 0,
            gid: 0,
        }
    }

    /// The `etcd` user (created by the etcd-server package).
    pub fn etcd() -> Result<ServiceUser> {
        ServiceUser::lookup("etcd")
    }

    /// The `postgres` user (created by the postgresql package).
    pub fn postgres() -> Result<ServiceUser> {
        ServiceUser::lookup("postgres")
    }

    /// The `haproxy` user (created by the haproxy package).
    pub fn haproxy() -> Result<ServiceUser> {
        ServiceUser::lookup("haproxy")
    }

    /// Makes `path` owned by this user and its primary group.
    pub fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} {}", self.name, path.display()))
    }
}

/// The address of host number `host` in network `X` (`127.42.X.host`).
pub fn address(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, NET_OCTET, net, host))
}

/// The `X` of an inventory's `127.42.X.0/24`, from its first database host.
pub fn inventory_net(inv: &Inventory) -> Result<u8> {
    match inv.database_hosts.first().map(|h| h.address) {
        Some(IpAddr::V4(a)) if a.octets()[0] == 127 && a.octets()[1] == NET_OCTET => {
            Ok(a.octets()[2])
        }
        other => {
            bail!("the inventory's first database host {other:?} is not in 127.{NET_OCTET}.X.0/24")
        }
    }
}

/// `n` random bytes from the kernel.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

/// A random password of `len` letters and digits (no character needs quoting anywhere).
pub fn random_password(len: usize) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes(len * 2)? {
            // 248 = 4 * 62: rejection keeps the distribution uniform.
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

/// `path` as a `&str` (every path of an environment is UTF-8, checked by [`Layout::new`]).
pub fn s(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths_and_hash() {
        let l = Layout::new(Path::new("/var/lib/pgkeep-demo")).unwrap();
        assert_eq!(l.hash().len(), 8);
        assert_eq!(
            l.hash(),
            Layout::new(Path::new("/var/lib/pgkeep-demo"))
                .unwrap()
                .hash()
        );
        assert_ne!(
            l.hash(),
            Layout::new(Path::new("/var/lib/other")).unwrap().hash()
        );
        assert_eq!(
            l.socket_dir("node1"),
            Path::new("/var/lib/pgkeep-demo/run/node1")
        );
        let long = Layout::new(&Path::new("/var/tmp").join("x".repeat(80))).unwrap();
        assert!(long.socket_dir("node1").starts_with("/run/pgkeep/"));
        assert!(Layout::new(Path::new("/")).is_err());
        assert!(Layout::new(Path::new("/tmp/a,b")).is_err());
    }

    #[test]
    fn passwords_are_alphanumeric() {
        let p = random_password(32).unwrap();
        assert_eq!(p.len(), 32);
        assert!(p.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(p, random_password(32).unwrap());
    }
}
