//! A private OpenLDAP server (Debian's slapd 2.5) for tests of PostgreSQL's `ldap`
//! authentication: LDAPS only, on its own node (`ldap`: loopback address, DNS name, directory
//! owned by `openldap`), with a certificate from the environment's CA, an mdb database in the
//! node's directory, and test users under `ou=people`. It runs as the `openldap` user in the
//! environment's cgroup; dropping the handle kills it by PID, and the environment's teardown
//! removes everything else.
//!
//! Passwords never appear in a process argument: they reach `slappasswd -T` and `ldapwhoami -y`
//! in 0600 files, and the directory stores only salted SHA-1 hashes (`{SSHA}`).

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use pgkeep::pki::Usage;

use crate::env::{Env, Node, ServiceUser};
use crate::service::{CommandOutput, Service};

/// The directory's suffix.
pub const LDAP_SUFFIX: &str = "dc=pgkeep,dc=test";

/// Where the test users live.
pub const LDAP_PEOPLE: &str = "ou=people,dc=pgkeep,dc=test";

const SLAPD_BIN: &str = "/usr/sbin/slapd";
const SLAPADD_BIN: &str = "/usr/sbin/slapadd";
const SLAPPASSWD_BIN: &str = "/usr/sbin/slappasswd";
const LDAPWHOAMI_BIN: &str = "/usr/bin/ldapwhoami";
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private slapd serving `ldaps://<node DNS name>:<port>/`.
pub struct Slapd {
    env: Env,
    /// The server's node (address, DNS name; directory 0700, owned by `openldap`).
    pub node: Node,
    /// The LDAPS port.
    pub port: u16,
    /// The CA certificate clients verify the server with (the environment's CA).
    pub ca_file: PathBuf,
    config: PathBuf,
    service: Option<Service>,
}

/// Writes `content` to a new file of mode 0600 (never readable by others, not even briefly),
/// owned by `owner`.
fn write_secret(path: &Path, content: &[u8], owner: &ServiceUser) -> Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content)?;
    owner.chown(path)
}

fn check_uid(uid: &str) -> Result<()> {
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("LDAP test user {uid:?} must be letters, digits and '_'");
    }
    Ok(())
}

impl Slapd {
    /// Prepares the server: node `ldap`, its certificate, `slapd.conf` (core, cosine and
    /// inetOrgPerson schemas; anonymous binds refused; passwords usable only to authenticate)
    /// and a database holding `users` (`(uid, password)`) as `uid=<uid>,ou=people,...`
    /// entries. Nothing runs yet: see [`Slapd::start`].
    pub fn prepare(env: &Env, users: &[(&str, &str)]) -> Result<Slapd> {
        let user = ServiceUser::lookup("openldap")?;
        let node = env.add_node("ldap", &user)?;
        let port = env.alloc_port(node.addr)?;
        let dir = &node.dir;
        let cert = env.node_cert(&node, "slapd", Usage::Server)?;
        let ca_file = env.install_ca(dir, &user)?;
        let db = dir.join("db");
        fs::create_dir(&db).with_context(|| format!("mkdir {}", db.display()))?;
        user.chown(&db)?;
        let config = dir.join("slapd.conf");
        let text = format!(
            "include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
TLSProtocolMin 3.3
disallow bind_anon
database mdb
maxsize 16777216
suffix \"{LDAP_SUFFIX}\"
rootdn \"cn=admin,{LDAP_SUFFIX}\"
directory {db}
access to attrs=userPassword by anonymous auth by * none
access to * by self read by * none
",
            dir = dir.display(),
            ca = ca_file.display(),
            cert = cert.cert.display(),
            key = cert.key.display(),
            db = db.display(),
        );
        write_secret(&config, text.as_bytes(), &user)?;
        let mut ldif = format!(
            "dn: {LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: pgkeep\no: pgkeep test\n\n\
             dn: {LDAP_PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"
        );
        let pw_file = dir.join("password.tmp");
        for (uid, password) in users {
            check_uid(uid)?;
            write_secret(&pw_file, password.as_bytes(), &ServiceUser::root())?;
            let out = env.run(
                &ServiceUser::root(),
                &env.tmp_dir(),
                SLAPPASSWD_BIN,
                &["-T".as_ref(), pw_file.as_os_str()],
                &[],
                Duration::from_secs(10),
            );
            let _ = fs::remove_file(&pw_file);
            let hash = out?.ensure_success("slappasswd")?.stdout.trim().to_owned();
            if !hash.starts_with("{SSHA}") {
                bail!("slappasswd printed no {{SSHA}} hash");
            }
            ldif.push_str(&format!(
                "\ndn: uid={uid},{LDAP_PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {hash}\n"
            ));
        }
        let ldif_file = dir.join("users.ldif");
        write_secret(&ldif_file, ldif.as_bytes(), &user)?;
        env.run(
            &user,
            dir,
            SLAPADD_BIN,
            &[
                "-f".as_ref(),
                config.as_os_str(),
                "-l".as_ref(),
                ldif_file.as_os_str(),
            ],
            &[],
            Duration::from_secs(30),
        )?
        .ensure_success("slapadd")?;
        Ok(Slapd {
            env: env.clone(),
            node,
            port,
            ca_file,
            config,
            service: None,
        })
    }

    /// Starts slapd in the foreground (`-d stats`: connections, binds and their results go to
    /// its log) and waits until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let url = format!("ldaps://{}:{}/", self.node.addr, self.port);
        let args: [&OsStr; 6] = [
            "-d".as_ref(),
            "stats".as_ref(),
            "-f".as_ref(),
            self.config.as_os_str(),
            "-h".as_ref(),
            url.as_ref(),
        ];
        let svc = self.env.spawn(
            "slapd",
            &self.node.user,
            &self.node.dir,
            SLAPD_BIN,
            &args,
            &[],
        )?;
        let addr = SocketAddr::from((self.node.addr, self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !svc.is_running() {
                bail!("slapd exited during start:\n{}", svc.log_tail(30));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "slapd does not listen on {addr} after {START_TIMEOUT:?}:\n{}",
                    svc.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.service = Some(svc);
        Ok(())
    }

    /// Stops slapd (SIGTERM to its PID, then waits for the exit; SIGKILL if it lingers).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(svc) = self.service.take() {
            svc.kill(Signal::SIGTERM)?;
            if svc.wait_exit(Duration::from_secs(10)).is_err() {
                svc.kill(Signal::SIGKILL)?;
                svc.wait_exit(Duration::from_secs(10))?;
            }
        }
        Ok(())
    }

    /// True while the server runs.
    pub fn is_running(&self) -> bool {
        self.service.as_ref().is_some_and(Service::is_running)
    }

    /// The server's DNS name (its certificate names it).
    pub fn host(&self) -> &str {
        &self.node.dns_name
    }

    /// `ldaps://<DNS name>:<port>`.
    pub fn url(&self) -> String {
        format!("ldaps://{}:{}", self.node.dns_name, self.port)
    }

    /// The DN of test user `uid`.
    pub fn user_dn(uid: &str) -> String {
        format!("uid={uid},{LDAP_PEOPLE}")
    }

    /// A simple bind as `uid` with `password` (from a 0600 file), by `ldapwhoami` over LDAPS
    /// verifying the server against the environment's CA: checks the server without PostgreSQL.
    pub fn bind_as(&self, uid: &str, password: &str) -> Result<CommandOutput> {
        let pw_file = self.env.tmp_dir().join(format!("ldap-{uid}.pw"));
        write_secret(&pw_file, password.as_bytes(), &ServiceUser::root())?;
        let url = self.url();
        let dn = Self::user_dn(uid);
        let out = self.env.run(
            &ServiceUser::root(),
            &self.env.tmp_dir(),
            LDAPWHOAMI_BIN,
            &[
                "-x".as_ref(),
                "-H".as_ref(),
                url.as_ref(),
                "-D".as_ref(),
                dn.as_ref(),
                "-y".as_ref(),
                pw_file.as_os_str(),
            ],
            &[
                ("LDAPTLS_CACERT", self.ca_file.as_os_str()),
                ("LDAPTLS_REQCERT", "demand".as_ref()),
            ],
            Duration::from_secs(10),
        );
        let _ = fs::remove_file(&pw_file);
        out
    }

    /// The end of slapd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::service::log_tail(&self.env.root().join("logs").join("slapd.log"), lines)
    }
}
