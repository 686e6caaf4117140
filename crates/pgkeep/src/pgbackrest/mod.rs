//! pgBackRest on a dedicated repository host, reached over TLS: the configuration files of the
//! repository host and of every database node, and the `archive_command`/`restore_command`
//! pgkeep puts into PostgreSQL's local configuration.
//!
//! [`render_repo`] and [`render_node`] are pure functions of a plan (no file is read; the paths
//! are only written into the text). What they encode:
//!
//! - **TLS both ways, named peers only.** The repository host runs `pgbackrest server` and lets
//!   in only the database nodes' client certificates, for this cluster's stanza
//!   (one `tls-server-auth=<CN>=<stanza>` per node, never `*`); every node runs its own `pgbackrest
//!   server` that lets in only the repository host's client certificate (backups start on the
//!   repository host and reach PostgreSQL through it). pgBackRest 2.45 ignores IP addresses in
//!   certificates, so every peer is addressed by host name.
//! - **Encrypted repository.** `repo1-cipher-type=aes-256-cbc`; the passphrase lives in its own
//!   file ([`render_cipher`], mode 0600, in the include directory) on the repository host only:
//!   nodes never hold it, since with a repository host the encryption happens there.
//! - **Short timeouts.** Debian's defaults (`io-timeout` 60 s, `db-timeout` 1800 s,
//!   `protocol-timeout` 1830 s) let an `archive-push` to a dead repository hang for many minutes,
//!   and the archiver keeps the postmaster alive through a shutdown (a switchover's stop) while
//!   it waits. pgkeep sets [`Timeouts::default`].
//! - **Asynchronous archiving** with a spool directory and a queue limit: a slow repository
//!   never blocks commits, and a dead one never fills `pg_wal` beyond the limit (WAL past it is
//!   dropped from the archive queue and reported; the cluster keeps running, the next backup
//!   restores the archive's continuity).
//! - **Fast compression and parallelism**: `compress-type=zst` (gzip, the default, is an order of
//!   magnitude slower) and `process-max` sized to the machine; `start-fast` so a backup does not
//!   wait for the next checkpoint; small files bundled (`repo1-bundle`).
//!
//! pgBackRest's configuration files do not allow a comment after a value, so comments are only
//! ever whole lines, and values are refused when they contain a line break or a `#`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub mod deploy;
pub mod drops;
pub mod info;
#[cfg(test)]
mod tests;

/// Errors of the renderers: which value is unusable and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgBackRest configuration: {what}: {reason}")]
pub struct PgBackRestError {
    /// The value (option or plan field).
    pub what: String,
    /// Why it cannot be written.
    pub reason: String,
}

fn err<T>(what: &str, reason: impl Into<String>) -> Result<T, PgBackRestError> {
    Err(PgBackRestError {
        what: what.to_owned(),
        reason: reason.into(),
    })
}

/// The timeouts written into every configuration, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `io-timeout`: the longest a network or file operation may make no progress.
    pub io: u32,
    /// `db-timeout`: the longest a query may run (a backup's start and stop).
    pub db: u32,
    /// `protocol-timeout`: the longest a remote may be silent; must exceed `db`.
    pub protocol: u32,
    /// `archive-timeout`: the longest `archive-push` waits for the asynchronous process, and
    /// `check`/`backup` wait for a segment to reach the archive.
    pub archive: u32,
}

impl Default for Timeouts {
    /// io 10 s, db 60 s, protocol 90 s, archive 30 s: a dead repository costs an
    /// `archive-push` at most `archive` seconds, and with `start-fast` a backup's start
    /// needs far less than `db`.
    fn default() -> Self {
        Timeouts {
            io: 10,
            db: 60,
            protocol: 90,
            archive: 30,
        }
    }
}

/// A TLS endpoint's files: own certificate and key, and the CA peers must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, 0600).
    pub key: PathBuf,
    /// The cluster CA.
    pub ca: PathBuf,
}

/// A `pgbackrest server` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Address to listen on (`tls-server-address`).
    pub address: String,
    /// Port (`tls-server-port`).
    pub port: u16,
    /// The server's certificate and the CA clients must be signed by.
    pub tls: TlsFiles,
    /// Common names of the client certificates let in for the stanza.
    pub clients: Vec<String>,
}

/// Where pgBackRest keeps its own files on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `log-path`.
    pub log: PathBuf,
    /// `lock-path`.
    pub lock: PathBuf,
    /// `spool-path` (asynchronous archiving's queue; nodes only).
    pub spool: PathBuf,
}

/// One database node as the repository host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgNode {
    /// The node's host name (its pgBackRest server certificate carries it).
    pub host: String,
    /// Port of the node's `pgbackrest server`.
    pub tls_port: u16,
    /// The data directory.
    pub data_dir: PathBuf,
    /// PostgreSQL's port.
    pub pg_port: u16,
    /// PostgreSQL's Unix socket directory.
    pub socket_dir: PathBuf,
    /// pgBackRest's configuration directory on the node (`pg<k>-host-config-path`): the
    /// process the node's server starts for the repository host reads its options there.
    pub config_path: PathBuf,
}

/// Retention of the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Full backups kept (`repo1-retention-full`, by count).
    pub full: u32,
    /// Differential backups kept (`repo1-retention-diff`).
    pub diff: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { full: 2, diff: 6 }
    }
}

/// The repository host's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPlan {
    /// The stanza: the cluster's name.
    pub stanza: String,
    /// `repo1-path`.
    pub repo_path: PathBuf,
    /// The repository host's own files.
    pub paths: Paths,
    /// The repository's `pgbackrest server` (clients: the nodes' client certificates).
    pub server: Server,
    /// The client certificate the repository host presents to the nodes' servers.
    pub client: TlsFiles,
    /// Every database node, `pg1`…`pgN` in this order.
    pub nodes: Vec<PgNode>,
    /// `process-max`.
    pub process_max: u32,
    /// Back up from a replica when one is healthy (`backup-standby`).
    pub backup_standby: bool,
    /// Retention.
    pub retention: Retention,
    /// Timeouts.
    pub timeouts: Timeouts,
}

/// A database node's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The stanza: the cluster's name.
    pub stanza: String,
    /// The node's own files.
    pub paths: Paths,
    /// This node's PostgreSQL (`pg1`: the repository host is a remote).
    pub pg: PgNode,
    /// The repository host's name and port.
    pub repo_host: String,
    /// The repository host's `pgbackrest server` port.
    pub repo_port: u16,
    /// pgBackRest's configuration directory on the repository host
    /// (`repo1-host-config-path`): the process the repository's server starts for this node
    /// reads the repository's options (path, cipher) there.
    pub repo_config_path: PathBuf,
    /// The client certificate the node presents to the repository host.
    pub client: TlsFiles,
    /// The node's `pgbackrest server` (client: the repository host's certificate).
    pub server: Server,
    /// `process-max` of asynchronous archiving.
    pub process_max: u32,
    /// `archive-push-queue-max` in MiB: WAL beyond this waiting for the archive is dropped from
    /// the queue (and reported) rather than filling the disk.
    pub archive_queue_max_mib: u64,
    /// Timeouts.
    pub timeouts: Timeouts,
}

/// `process-max` for a host with `cpus` CPUs: half of them (compression is the work, and the
/// host has other duties), at least 1, at most 8.
pub fn process_max_for(cpus: usize) -> u32 {
    u32::try_from((cpus / 2).clamp(1, 8)).unwrap_or(1)
}

/// An INI file under construction; every value is checked before it is written.
struct Ini {
    text: String,
}

impl Ini {
    fn new(header: &str) -> Ini {
        let mut text = String::new();
        for line in header.lines() {
            let _ = writeln!(text, "# {line}");
        }
        Ini { text }
    }

    fn section(&mut self, name: &str) {
        let _ = writeln!(self.text, "\n[{name}]");
    }

    fn comment(&mut self, text: &str) {
        for line in text.lines() {
            let _ = writeln!(self.text, "# {line}");
        }
    }

    fn opt(&mut self, key: &str, value: impl std::fmt::Display) -> Result<(), PgBackRestError> {
        let v = value.to_string();
        if v.is_empty() {
            return err(key, "empty value");
        }
        if v.contains(['\n', '\r', '#']) || v.trim() != v {
            return err(
                key,
                format!("{v:?} has a line break, a '#' or surrounding spaces"),
            );
        }
        let _ = writeln!(self.text, "{key}={v}");
        Ok(())
    }

    fn path(&mut self, key: &str, p: &Path) -> Result<(), PgBackRestError> {
        if !p.is_absolute() {
            return err(key, format!("{} is not an absolute path", p.display()));
        }
        self.opt(key, p.display())
    }

    fn flag(&mut self, key: &str, on: bool) -> Result<(), PgBackRestError> {
        self.opt(key, if on { "y" } else { "n" })
    }
}

/// Checks a stanza name (letters, digits, '-', '.', '_'): the configuration files and the
/// commands carry it unquoted.
pub fn check_stanza(stanza: &str) -> Result<(), PgBackRestError> {
    check_name("stanza", stanza)
}

fn check_name(what: &str, v: &str) -> Result<(), PgBackRestError> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        err(
            what,
            format!(
                "{v:?} must be a host, stanza or certificate name (letters, digits, '-', '.', '_')"
            ),
        )
    }
}

/// One `tls-server-auth=<CN>=<stanza>` per client (pgBackRest repeats the option): only the
/// named clients, only this stanza.
fn server_auth(s: &Server, stanza: &str) -> Result<Vec<String>, PgBackRestError> {
    if s.clients.is_empty() {
        return err(
            "tls-server-auth",
            "no client is allowed; the server would be useless",
        );
    }
    s.clients
        .iter()
        .map(|c| check_name("tls-server-auth", c).map(|()| format!("{c}={stanza}")))
        .collect()
}

fn write_server(ini: &mut Ini, s: &Server, stanza: &str) -> Result<(), PgBackRestError> {
    if s.address == "*" || s.address == "0.0.0.0" || s.address == "::" {
        return err(
            "tls-server-address",
            "a wildcard address listens on every interface; name the host's own address",
        );
    }
    ini.opt("tls-server-address", &s.address)?;
    ini.opt("tls-server-port", s.port)?;
    ini.path("tls-server-cert-file", &s.tls.cert)?;
    ini.path("tls-server-key-file", &s.tls.key)?;
    ini.path("tls-server-ca-file", &s.tls.ca)?;
    for auth in server_auth(s, stanza)? {
        ini.opt("tls-server-auth", auth)?;
    }
    Ok(())
}

fn write_common(
    ini: &mut Ini,
    paths: &Paths,
    process_max: u32,
    t: &Timeouts,
) -> Result<(), PgBackRestError> {
    if t.protocol <= t.db {
        return err("protocol-timeout", "must be greater than db-timeout");
    }
    ini.path("log-path", &paths.log)?;
    ini.path("lock-path", &paths.lock)?;
    ini.opt("log-level-console", "warn")?;
    ini.opt("log-level-file", "info")?;
    ini.opt("process-max", process_max.max(1))?;
    ini.opt("compress-type", "zst")?;
    ini.opt("io-timeout", t.io)?;
    ini.opt("db-timeout", t.db)?;
    ini.opt("protocol-timeout", t.protocol)?;
    ini.opt("archive-timeout", t.archive)
}

/// The repository host's `pgbackrest.conf`. The cipher passphrase is not in it: see
/// [`render_cipher`].
pub fn render_repo(p: &RepoPlan) -> Result<String, PgBackRestError> {
    check_name("stanza", &p.stanza)?;
    if p.nodes.is_empty() {
        return err("nodes", "the repository needs at least one database node");
    }
    let mut ini = Ini::new(&format!(
        "pgBackRest repository host of cluster {} (rendered by pgkeep; edits are overwritten).\n\
         Backups start here; the encryption passphrase is in the include directory (0600).",
        p.stanza
    ));
    ini.section("global");
    ini.path("repo1-path", &p.repo_path)?;
    ini.opt("repo1-cipher-type", "aes-256-cbc")?;
    ini.flag("repo1-bundle", true)?;
    ini.opt("repo1-retention-full-type", "count")?;
    ini.opt("repo1-retention-full", p.retention.full.max(1))?;
    ini.opt("repo1-retention-diff", p.retention.diff.max(1))?;
    ini.flag("start-fast", true)?;
    ini.flag("backup-standby", p.backup_standby)?;
    write_common(&mut ini, &p.paths, p.process_max, &p.timeouts)?;
    ini.comment("The repository's TLS server: database nodes push WAL and restore through it.");
    write_server(&mut ini, &p.server, &p.stanza)?;
    ini.section(&p.stanza);
    for (i, n) in p.nodes.iter().enumerate() {
        let k = i + 1;
        check_name(&format!("pg{k}-host"), &n.host)?;
        ini.comment(&format!("node {k}: {}", n.host));
        ini.opt(&format!("pg{k}-host"), &n.host)?;
        ini.opt(&format!("pg{k}-host-type"), "tls")?;
        ini.opt(&format!("pg{k}-host-port"), n.tls_port)?;
        ini.path(&format!("pg{k}-host-cert-file"), &p.client.cert)?;
        ini.path(&format!("pg{k}-host-key-file"), &p.client.key)?;
        ini.path(&format!("pg{k}-host-ca-file"), &p.client.ca)?;
        ini.path(&format!("pg{k}-host-config-path"), &n.config_path)?;
        ini.path(&format!("pg{k}-path"), &n.data_dir)?;
        ini.opt(&format!("pg{k}-port"), n.pg_port)?;
        ini.path(&format!("pg{k}-socket-path"), &n.socket_dir)?;
    }
    Ok(ini.text)
}

/// The include file with the repository's passphrase (repository host only, mode 0600).
pub fn render_cipher(passphrase: &str) -> Result<String, PgBackRestError> {
    if passphrase.len() < 32 {
        return err(
            "repo1-cipher-pass",
            "shorter than 32 characters; generate a random one",
        );
    }
    // Checked here so that the error never carries the value, as `Ini::opt`'s would.
    if passphrase.contains(['\n', '\r', '#']) || passphrase.trim() != passphrase {
        return err(
            "repo1-cipher-pass",
            "has a line break, a '#' or surrounding spaces (not shown); generate a random one",
        );
    }
    let mut ini = Ini::new(
        "The repository's encryption passphrase. Mode 0600; never copy it to a database node.",
    );
    ini.section("global");
    ini.opt("repo1-cipher-pass", passphrase)?;
    Ok(ini.text)
}

/// A database node's `pgbackrest.conf`.
pub fn render_node(p: &NodePlan) -> Result<String, PgBackRestError> {
    check_name("stanza", &p.stanza)?;
    check_name("repo1-host", &p.repo_host)?;
    let mut ini = Ini::new(&format!(
        "pgBackRest on database host {} of cluster {} (rendered by pgkeep; edits are overwritten).",
        p.pg.host, p.stanza
    ));
    ini.section("global");
    ini.opt("repo1-host", &p.repo_host)?;
    ini.opt("repo1-host-type", "tls")?;
    ini.opt("repo1-host-port", p.repo_port)?;
    ini.path("repo1-host-cert-file", &p.client.cert)?;
    ini.path("repo1-host-key-file", &p.client.key)?;
    ini.path("repo1-host-ca-file", &p.client.ca)?;
    ini.path("repo1-host-config-path", &p.repo_config_path)?;
    ini.flag("archive-async", true)?;
    ini.path("spool-path", &p.paths.spool)?;
    ini.opt(
        "archive-push-queue-max",
        format!("{}MiB", p.archive_queue_max_mib.max(16)),
    )?;
    write_common(&mut ini, &p.paths, p.process_max, &p.timeouts)?;
    ini.comment("This node's TLS server: the repository host starts backups through it.");
    write_server(&mut ini, &p.server, &p.stanza)?;
    ini.section(&p.stanza);
    ini.path("pg1-path", &p.pg.data_dir)?;
    ini.opt("pg1-port", p.pg.pg_port)?;
    ini.path("pg1-socket-path", &p.pg.socket_dir)?;
    Ok(ini.text)
}

/// A path PostgreSQL may pass to `/bin/sh` inside a command without quoting.
fn shell_safe(what: &str, p: &Path) -> Result<String, PgBackRestError> {
    let s = p.display().to_string();
    let ok = p.is_absolute()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '.' | '_'));
    if ok {
        Ok(s)
    } else {
        err(
            what,
            format!("{s:?} must be an absolute path of letters, digits, '/', '-', '.', '_'"),
        )
    }
}

/// `archive_command` and `restore_command` for a node: pgBackRest with the node's own
/// configuration directory (`--config-path`: its `pgbackrest.conf` and `conf.d`, nothing from
/// `/etc`). Rendered into PostgreSQL's local configuration only, never taken from the DCS.
pub fn wal_commands(
    pgbackrest: &Path,
    config_path: &Path,
    stanza: &str,
) -> Result<(String, String), PgBackRestError> {
    check_name("stanza", stanza)?;
    let bin = shell_safe("pgbackrest binary", pgbackrest)?;
    let conf = shell_safe("pgbackrest config path", config_path)?;
    Ok((
        format!("{bin} --config-path={conf} --stanza={stanza} archive-push %p"),
        format!("{bin} --config-path={conf} --stanza={stanza} archive-get %f \"%p\""),
    ))
}

/// Where a point-in-time recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive: every transaction the repository holds.
    Latest,
    /// A time (`2026-11-29 23:40:00+00`; PostgreSQL's `recovery_target_time` syntax).
    Time(String),
    /// A WAL position (`0/5000060`).
    Lsn(String),
    /// A restore point made with `pg_create_restore_point(name)`.
    Name(String),
}

/// The `pgbackrest restore` options for `target`: recovery stops there (just after the last
/// transaction committed at or before it) and the server is promoted onto a new timeline.
/// Values are checked first: pgBackRest writes them into `postgresql.auto.conf`.
pub fn restore_target_options(target: &RecoveryTarget) -> Result<Vec<String>, PgBackRestError> {
    let printable = |what: &str, v: &str, max: usize| {
        let ok = !v.trim().is_empty()
            && v.len() <= max
            && v.chars().all(|c| !c.is_control() && c != '\'' && c != '\\');
        if ok {
            Ok(())
        } else {
            err(
                what,
                format!("{v:?} is empty, too long or has quotes or control characters"),
            )
        }
    };
    let (kind, value) = match target {
        RecoveryTarget::Latest => return Ok(vec!["--type=default".into()]),
        RecoveryTarget::Time(t) => {
            printable("target-time", t, 64)?;
            if !t.starts_with(|c: char| c.is_ascii_digit()) {
                return err(
                    "target-time",
                    format!("{t:?} must start with a date (YYYY-MM-DD)"),
                );
            }
            // Without a zone pgBackRest reads the host's local time and PostgreSQL its
            // `timezone` setting: they could pick a backup and a stop point hours apart.
            let clock = t.get(10..).unwrap_or("");
            let zoned = clock.ends_with('Z')
                || clock.ends_with(" UTC")
                || clock.get(1..).is_some_and(|c| c.contains(['+', '-']));
            if !zoned {
                return err(
                    "target-time",
                    format!("{t:?} has no time zone; add one, e.g. \"{t}+00\""),
                );
            }
            ("time", t)
        }
        RecoveryTarget::Lsn(l) => {
            let ok = l.split_once('/').is_some_and(|(hi, lo)| {
                [hi, lo]
                    .iter()
                    .all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_hexdigit()))
            });
            if !ok {
                return err(
                    "target-lsn",
                    format!("{l:?} is not a WAL position such as 0/5000060"),
                );
            }
            ("lsn", l)
        }
        RecoveryTarget::Name(n) => {
            // Restore point names are at most 63 bytes (MAXFNAMELEN - 1).
            printable("target-name", n, 63)?;
            ("name", n)
        }
    };
    Ok(vec![
        format!("--type={kind}"),
        format!("--target={value}"),
        "--target-action=promote".into(),
    ])
}
