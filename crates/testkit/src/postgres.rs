//! Real PostgreSQL 15 instances run as `postgres`, TLS only over TCP.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use pgkeep::pki::Usage;

use crate::env::{Env, Node, ServiceUser};
use crate::service::{CommandOutput, Service};
use crate::{PG_BIN_DIR, paths};

/// Bound for initdb.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for a start until `pg_isready` succeeds.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for one psql call.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL instance on its own node of an environment.
///
/// Layout under the node directory (0700, `postgres`): `data/` (the data directory, made by
/// `initdb` with checksums), `conf/` (`postgresql.conf`, `pg_hba.conf`, `pg_ident.conf`, the
/// server certificate and key, `ca.crt`: all outside the data directory) and `run/` (the Unix
/// socket). The postmaster is started directly (`postgres -D ... -c config_file=...`), so the
/// recorded pid is the postmaster's.
///
/// Authentication: `local all postgres peer`, `hostssl replication replicator <subnet> cert`,
/// `hostssl all all <subnet> scram-sha-256`; nothing else (no trust, no md5, no plain `host`).
/// TLS 1.2 minimum; the server certificate names the node's DNS name and address.
/// Test-only: `fsync=off`.
pub struct PgInstance {
    node: Node,
    port: u16,
    data_dir: PathBuf,
    conf_dir: PathBuf,
    socket_dir: PathBuf,
    service: Mutex<Option<Service>>,
    env: Env,
}

impl std::fmt::Debug for PgInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInstance")
            .field("node", &self.node.name)
            .field("addr", &self.node.addr)
            .field("port", &self.port)
            .finish()
    }
}

fn pg_bin(name: &str) -> PathBuf {
    Path::new(PG_BIN_DIR).join(name)
}

/// Writes `contents` to a new file `path`, mode 0600, owned by `owner`.
fn write_owned(path: &Path, contents: &str, owner: &ServiceUser) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    owner.chown(path)
}

impl PgInstance {
    /// Adds node `node_name` to `env`, runs `initdb` as `postgres`, writes the configuration
    /// outside the data directory, starts the postmaster and waits until it accepts
    /// connections (bounded).
    pub fn init_and_start(env: &Env, node_name: &str) -> Result<PgInstance> {
        let user = ServiceUser::postgres()?;
        let node = env.add_node(node_name, &user)?;
        let port = env.alloc_port(node.addr)?;
        let data_dir = node.dir.join("data");
        let conf_dir = node.dir.join("conf");
        let socket_dir = node.dir.join("run");
        for d in [&conf_dir, &socket_dir] {
            paths::ensure_dir(d, 0o700)?;
            user.chown(d)?;
        }
        // PostgreSQL refuses socket paths over 107 bytes.
        let socket_len = socket_dir
            .join(format!(".s.PGSQL.{port}"))
            .as_os_str()
            .len();
        if socket_len >= 100 {
            bail!(
                "socket path under {} is too long ({socket_len} bytes)",
                socket_dir.display()
            );
        }
        let cert = env.node_cert(&node, "server", Usage::Server)?;
        let ca = env.install_ca(&conf_dir, &user)?;

        let pg = PgInstance {
            node,
            port,
            data_dir,
            conf_dir,
            socket_dir,
            service: Mutex::new(None),
            env: env.clone(),
        };
        let initdb = pg_bin("initdb");
        let out = env.run(
            &user,
            &pg.node.dir,
            &initdb,
            &[
                OsStr::new("-D"),
                pg.data_dir.as_os_str(),
                OsStr::new("--data-checksums"),
                OsStr::new("--auth-local=peer"),
                OsStr::new("--auth-host=scram-sha-256"),
                OsStr::new("--username=postgres"),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--locale=C"),
                OsStr::new("--no-sync"),
            ],
            &[],
            INITDB_TIMEOUT,
        )?;
        out.ensure_success(&format!("initdb for {node_name}"))?;
        // Nothing inside the data directory configures the server.
        for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
            let _ = fs::remove_file(pg.data_dir.join(f));
        }
        let subnet = env.subnet();
        let conf = format!(
            "# Written by pgkeep-testkit for {node}. Test only: fsync=off.
data_directory = '{data}'
hba_file = '{conf}/pg_hba.conf'
ident_file = '{conf}/pg_ident.conf'
listen_addresses = '{addr}'
port = {port}
unix_socket_directories = '{sock}'
unix_socket_permissions = 0700
max_connections = 40
shared_buffers = 32MB
dynamic_shared_memory_type = posix
ssl = on
ssl_cert_file = '{cert}'
ssl_key_file = '{key}'
ssl_ca_file = '{ca}'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
fsync = off
log_destination = 'stderr'
logging_collector = off
log_connections = on
log_disconnections = on
log_line_prefix = '%m [%p] %q%u@%d '
lc_messages = 'C'
timezone = 'UTC'
cluster_name = '{node}'
",
            node = pg.node.name,
            data = pg.data_dir.display(),
            conf = pg.conf_dir.display(),
            addr = pg.node.addr,
            sock = pg.socket_dir.display(),
            cert = cert.cert.display(),
            key = cert.key.display(),
            ca = ca.display(),
        );
        // On loopback, connections to any 127.x address come from 127.0.0.1 (the kernel's
        // source address for 127.0.0.0/8), so clients of the env are 127.0.0.1 or the subnet.
        let hba = format!(
            "# TYPE  DATABASE     USER        ADDRESS         METHOD
local   all          postgres                    peer
hostssl replication  replicator  {subnet}  cert
hostssl replication  replicator  127.0.0.1/32    cert
hostssl all          all         {subnet}  scram-sha-256
hostssl all          all         127.0.0.1/32    scram-sha-256
"
        );
        write_owned(&pg.conf_dir.join("postgresql.conf"), &conf, &user)?;
        write_owned(&pg.conf_dir.join("pg_hba.conf"), &hba, &user)?;
        write_owned(&pg.conf_dir.join("pg_ident.conf"), "", &user)?;
        pg.start()?;
        Ok(pg)
    }

    fn service(&self) -> MutexGuard<'_, Option<Service>> {
        self.service.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the postmaster (it must not be running) and waits until it is ready.
    pub fn start(&self) -> Result<()> {
        {
            let mut slot = self.service();
            if slot.as_ref().is_some_and(Service::is_running) {
                bail!("PostgreSQL on {} is already running", self.node.name);
            }
            let config = OsString::from(format!(
                "config_file={}",
                self.conf_dir.join("postgresql.conf").display()
            ));
            let svc = self.env.spawn(
                &self.node.name,
                &self.node.user,
                &self.node.dir,
                pg_bin("postgres"),
                &[
                    OsStr::new("-D"),
                    self.data_dir.as_os_str(),
                    OsStr::new("-c"),
                    &config,
                ],
                &[],
            )?;
            *slot = Some(svc);
        }
        self.wait_ready(START_TIMEOUT)
    }

    /// Waits until `pg_isready` over the Unix socket succeeds, at most `timeout`; fails early,
    /// with the log tail, if the postmaster exits.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let port = self.port.to_string();
        loop {
            if let Some(svc) = self.service().as_ref()
                && let Some(status) = svc.exit_status()
            {
                bail!(
                    "PostgreSQL on {} exited during start ({status}):\n{}",
                    self.node.name,
                    svc.log_tail(30)
                );
            }
            let out = self.env.run(
                &self.node.user,
                &self.node.dir,
                pg_bin("pg_isready"),
                &[
                    OsStr::new("-q"),
                    OsStr::new("-h"),
                    self.socket_dir.as_os_str(),
                    OsStr::new("-p"),
                    OsStr::new(&port),
                    OsStr::new("-d"),
                    OsStr::new("postgres"),
                    OsStr::new("-U"),
                    OsStr::new("postgres"),
                    OsStr::new("-t"),
                    OsStr::new("2"),
                ],
                &[],
                Duration::from_secs(10),
            )?;
            if out.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self
                    .service()
                    .as_ref()
                    .map(|s| s.log_tail(30))
                    .unwrap_or_default();
                bail!(
                    "PostgreSQL on {} not ready after {timeout:?}:\n{tail}",
                    self.node.name
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Runs `sql` with `psql -XAtq -v ON_ERROR_STOP=1` as `postgres` over the Unix socket (peer
    /// authentication) and returns its stdout. The SQL is passed in argv: never put a secret
    /// in it.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = self
            .psql_output(sql)?
            .ensure_success(&format!("psql on {}", self.node.name))?;
        Ok(out.stdout)
    }

    /// Like [`PgInstance::psql`], but returns the output whatever the exit status.
    pub fn psql_output(&self, sql: &str) -> Result<CommandOutput> {
        let port = self.port.to_string();
        self.env.run(
            &self.node.user,
            &self.node.dir,
            pg_bin("psql"),
            &[
                OsStr::new("-XAtq"),
                OsStr::new("-v"),
                OsStr::new("ON_ERROR_STOP=1"),
                OsStr::new("-h"),
                self.socket_dir.as_os_str(),
                OsStr::new("-p"),
                OsStr::new(&port),
                OsStr::new("-U"),
                OsStr::new("postgres"),
                OsStr::new("-d"),
                OsStr::new("postgres"),
                OsStr::new("-c"),
                OsStr::new(sql),
            ],
            &[("PGPASSFILE", self.no_passfile().as_os_str())],
            PSQL_TIMEOUT,
        )
    }

    /// A password file path that does not exist, so libpq reads none (and does not warn, as
    /// it does for `/dev/null`).
    fn no_passfile(&self) -> PathBuf {
        self.env.tmp_dir().join("no-such-pgpass")
    }

    /// Runs `sql` with `psql -XAtq -v ON_ERROR_STOP=1 -d <conninfo>` as root (a TCP client;
    /// key files must then be root's, as [`Env::client_cert`] writes them) and returns the
    /// output whatever the exit status. No password file is read.
    pub fn psql_tcp(&self, conninfo: &str, sql: &str) -> Result<CommandOutput> {
        self.env.run(
            &ServiceUser::root(),
            &self.env.tmp_dir(),
            pg_bin("psql"),
            &[
                OsStr::new("-XAtq"),
                OsStr::new("-v"),
                OsStr::new("ON_ERROR_STOP=1"),
                OsStr::new("-d"),
                OsStr::new(conninfo),
                OsStr::new("-c"),
                OsStr::new(sql),
            ],
            &[
                ("PGPASSFILE", self.no_passfile().as_os_str()),
                ("PGCONNECT_TIMEOUT", OsStr::new("5")),
            ],
            PSQL_TIMEOUT,
        )
    }

    /// A libpq connection string for TCP: `host=<dns-name> hostaddr=<ip> port=<port>
    /// dbname=postgres user=<user> sslmode=<sslmode>`, plus `extra` when non-empty.
    pub fn conninfo(&self, user: &str, sslmode: &str, extra: &str) -> String {
        let mut s = format!(
            "host={} hostaddr={} port={} dbname=postgres user={user} sslmode={sslmode}",
            self.node.dns_name, self.node.addr, self.port
        );
        if !extra.is_empty() {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }

    /// Stops the server with a fast shutdown (SIGINT), waiting up to 30 s before SIGKILL.
    pub fn stop(&self) -> Result<()> {
        let slot = self.service();
        let Some(svc) = slot.as_ref() else {
            return Ok(());
        };
        svc.kill(Signal::SIGINT)?;
        if svc.wait_exit(Duration::from_secs(30)).is_err() {
            svc.kill(Signal::SIGKILL)?;
            svc.wait_exit(Duration::from_secs(10))?;
            bail!(
                "PostgreSQL on {} ignored a fast shutdown for 30 s and was killed",
                self.node.name
            );
        }
        Ok(())
    }

    /// Kills the postmaster (SIGKILL) and waits for it. Its backends notice and exit on their
    /// own; the environment's teardown kills anything left.
    pub fn kill(&self) -> Result<()> {
        let slot = self.service();
        if let Some(svc) = slot.as_ref() {
            svc.kill(Signal::SIGKILL)?;
            svc.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.service()
            .as_ref()
            .filter(|s| s.is_running())
            .map(Service::pid)
    }

    /// Whether the postmaster is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The node the instance runs on (address, DNS name, directory).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Unix socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The configuration directory (postgresql.conf, pg_hba.conf, certificates).
    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// The server log (stderr of the postmaster).
    pub fn log_path(&self) -> PathBuf {
        self.env
            .root()
            .join("logs")
            .join(format!("{}.log", self.node.name))
    }

    /// The environment the instance lives in.
    pub fn env(&self) -> &Env {
        &self.env
    }
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        if let Some(svc) = self.service().take() {
            // Immediate shutdown lets the postmaster take its backends down with it.
            if svc.is_running() {
                let _ = svc.kill(Signal::SIGQUIT);
                if svc.wait_exit(Duration::from_secs(5)).is_err() {
                    svc.kill_and_reap();
                }
            }
        }
    }
}
