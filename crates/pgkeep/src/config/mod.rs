//! The node's local configuration: Patroni's `patroni.yml` structure plus a `pgkeep` section.
//!
//! Loading happens in three steps, each with errors that name the file, the key path and the
//! reason: the YAML is parsed (syntax errors carry line and column), its shape is checked
//! (unknown keys and Patroni options pgkeep does not implement are refused, see
//! [`schema`]), and it is converted into the typed [`Config`], whose fields are already
//! checked: addresses are socket addresses, networks are CIDRs, PostgreSQL parameters have
//! passed the [`pgkeep_core::policy`] name and value checks. A file that holds a secret must not be
//! readable by group or others.

mod callbacks;
mod effective;
mod hba;
mod raw;
mod resolve;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use pgkeep_core::cluster::Tags;
use pgkeep_core::policy::{GucName, Parameters};
use secrecy::SecretString;

pub use callbacks::{
    CallbackCommand, CallbackEvent, Callbacks, DEFAULT_CALLBACK_TIMEOUT, PrimaryRoleWord,
    check_program as check_callback_program,
};
pub use effective::effective_yaml;

/// A configuration error: the file, the key path (dotted, empty for the whole file) and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{reason}", file.display(), if key.is_empty() { String::new() } else { format!("{key}: ") })]
pub struct ConfigError {
    /// The file that holds the error.
    pub file: PathBuf,
    /// Dotted key path, e.g. `restapi.listen`.
    pub key: String,
    /// What is wrong and, where possible, what to do.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The typed, checked configuration of one node.
#[derive(Debug)]
pub struct Config {
    /// The file this was loaded from.
    pub source: PathBuf,
    /// Cluster name (`scope`).
    pub scope: String,
    /// DCS namespace (default `/service/`).
    pub namespace: String,
    /// This member's name.
    pub name: String,
    /// The REST API.
    pub restapi: RestApi,
    /// How the operator CLI and the agent's peer calls authenticate.
    pub ctl: Ctl,
    /// The etcd cluster.
    pub etcd: Etcd,
    /// First-start settings.
    pub bootstrap: Bootstrap,
    /// The local PostgreSQL.
    pub postgresql: Postgresql,
    /// This member's tags.
    pub tags: Tags,
    /// The hardware watchdog.
    pub watchdog: Watchdog,
    /// Logging.
    pub log: Log,
    /// Parameters the local administrator opens to dynamic configuration, beyond the built-in
    /// allowlist (extension parameters such as `pgaudit.log`, for instance).
    pub dynamic_parameter_allowlist: BTreeSet<GucName>,
    /// Networks the cluster's members connect from (replication, rewind, peer calls); pg_hba
    /// admits replication and rewind only from these, with client certificates.
    pub cluster_networks: Vec<IpNet>,
    /// Explicit, loudly logged insecure overrides.
    pub insecure: Insecure,
    /// Local callbacks (`postgresql.callbacks`, `pre_promote`, `before_stop`): from this file
    /// only, never from the DCS.
    pub callbacks: Callbacks,
    /// The agent warns in its log when a certificate it uses expires within this many days
    /// (`pgkeep.certificate_expiry_warning_days`, default 30).
    pub certificate_expiry_warning_days: u32,
    /// This node's pgBackRest (`pgkeep.pgbackrest`): replicas are then created from the
    /// repository first (delta restore, then streaming), `pg_basebackup` being the fallback.
    pub pgbackrest: Option<PgBackRest>,
    /// Key paths of secrets written inline in the file (rather than in a password file); such a
    /// file must not be readable by group or others.
    pub inline_secret_keys: Vec<String>,
}

/// The node's pgBackRest: its configuration directory and the cluster's stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBackRest {
    /// `--config-path`: `pgbackrest.conf` (and `conf.d`) of this node.
    pub config_path: PathBuf,
    /// The stanza (default: the scope).
    pub stanza: String,
    /// With no leader for a TTL, an empty node restores its replica from the repository
    /// instead of waiting for a member to copy (Patroni: `no_leader` on a replica method).
    pub replica_without_leader: bool,
}

/// REST API settings.
#[derive(Debug)]
pub struct RestApi {
    /// Where to listen.
    pub listen: SocketAddr,
    /// `host:port` other members and tools use (goes into `api_url`).
    pub connect_address: String,
    /// Server certificate and key; `None` only with `pgkeep.insecure.plaintext_restapi`.
    pub tls: Option<TlsFiles>,
    /// CA that client certificates must chain to.
    pub cafile: Option<PathBuf>,
    /// Whether client certificates are asked for.
    pub verify_client: VerifyClient,
    /// Basic-auth credentials for protected endpoints.
    pub authentication: Option<BasicAuth>,
    /// Networks allowed to call protected endpoints (empty = any).
    pub allowlist: Vec<IpNet>,
    /// Also allow the addresses of the cluster's members.
    pub allowlist_include_members: bool,
    /// Client-certificate common names allowed to call protected endpoints (empty = any
    /// certificate the CA signed).
    pub allowed_client_names: Vec<String>,
}

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate (chain).
    pub cert: PathBuf,
    /// PEM private key (must be 0600).
    pub key: PathBuf,
}

/// `restapi.verify_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyClient {
    /// Never ask for a client certificate.
    None,
    /// Ask; a presented certificate must be valid; protected endpoints require one.
    Optional,
    /// Every connection needs a valid client certificate.
    Required,
}

/// A user name and password.
pub struct BasicAuth {
    /// User name.
    pub username: String,
    /// Password (never logged).
    pub password: SecretString,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Operator CLI / outgoing REST calls.
#[derive(Debug, Default)]
pub struct Ctl {
    /// Client certificate for REST calls.
    pub client: Option<TlsFiles>,
    /// CA for verifying the REST API's certificate.
    pub cacert: Option<PathBuf>,
    /// Basic-auth credentials.
    pub authentication: Option<BasicAuth>,
}

/// etcd connection settings.
#[derive(Debug)]
pub struct Etcd {
    /// Endpoints as `https://host:port`.
    pub endpoints: Vec<String>,
    /// CA of the etcd server certificates.
    pub cacert: Option<PathBuf>,
    /// The client certificate pgkeep authenticates with.
    pub client: Option<TlsFiles>,
}

/// First-start settings.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// The initial dynamic configuration (`bootstrap.dcs`), written to the DCS by the node that
    /// bootstraps the cluster. Kept as JSON: it goes through the dynamic-configuration policy
    /// like any other DCS value.
    pub dcs: serde_json::Map<String, serde_json::Value>,
    /// Extra initdb options (`--data-checksums` and `--auth-*` are always set by pgkeep).
    pub initdb: Vec<String>,
    /// Applications whose database, schema and roles the bootstrap creates
    /// (see [`pgkeep_core::apps`]).
    pub applications: Vec<Application>,
}

/// One `bootstrap.applications` entry.
#[derive(Debug)]
pub struct Application {
    /// The name: database, schema and login role.
    pub name: String,
    /// The login role's password (from a 0600 file).
    pub password: SecretString,
    /// The password of the read-only login role `<name>_ro`, if it is wanted.
    pub readonly_password: Option<SecretString>,
}

/// Local PostgreSQL settings.
#[derive(Debug)]
pub struct Postgresql {
    /// Where PostgreSQL listens.
    pub listen: SocketAddr,
    /// `host:port` other members connect to (goes into `conn_url`).
    pub connect_address: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where pgkeep renders postgresql.conf, pg_hba.conf and pg_ident.conf: outside the data
    /// directory, so clones and rewinds never copy another node's configuration.
    pub config_dir: PathBuf,
    /// PostgreSQL's binaries; `None` means search `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// The passfile pgkeep writes for its own libpq connections.
    pub pgpass: Option<PathBuf>,
    /// Roles pgkeep connects as.
    pub authentication: PgAuthentication,
    /// Parameters from the local file (any parameter; names and values checked).
    pub parameters: Parameters,
    /// Extra pg_hba lines, placed after pgkeep's own.
    pub pg_hba: Vec<String>,
    /// Extra pg_ident lines.
    pub pg_ident: Vec<String>,
    /// Use pg_rewind to rejoin a former primary (falls back to a re-clone).
    pub use_pg_rewind: bool,
    /// Seconds to wait for pg_ctl-like operations.
    pub pg_ctl_timeout: u64,
    /// The CA certificates the postmaster's libldap trusts for `ldap` authentication over TLS
    /// (`LDAPTLS_CACERT`): `postgresql.ldap_ca_file`, by default `ssl_ca_file`.
    pub ldap_ca_file: Option<PathBuf>,
}

/// The roles pgkeep uses.
#[derive(Debug)]
pub struct PgAuthentication {
    /// Local superuser (peer authentication over the Unix socket).
    pub superuser: PgRole,
    /// Replication role (TLS client certificate).
    pub replication: PgRole,
    /// pg_rewind role (TLS client certificate).
    pub rewind: PgRole,
}

/// One role's connection settings.
pub struct PgRole {
    /// Role name.
    pub username: String,
    /// Password, when the role uses one.
    pub password: Option<SecretString>,
    /// libpq sslmode for TCP connections.
    pub sslmode: String,
    /// Client certificate and key.
    pub client: Option<TlsFiles>,
    /// CA for the server certificate.
    pub sslrootcert: Option<PathBuf>,
}

impl fmt::Debug for PgRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRole")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sslmode", &self.sslmode)
            .field("client", &self.client)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

/// `watchdog.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    /// No watchdog.
    Off,
    /// Use the device if it exists.
    Automatic,
    /// Refuse to become leader without it.
    Required,
}

/// Watchdog settings.
#[derive(Debug)]
pub struct Watchdog {
    /// Mode.
    pub mode: WatchdogMode,
    /// Device path.
    pub device: PathBuf,
    /// Seconds before the lease deadline at which the watchdog fires.
    pub safety_margin: u64,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug)]
pub struct Log {
    /// A `tracing` filter directive such as `info` or `pgkeep=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Insecure overrides. Each one is refused by default and logged as a warning at every start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Insecure {
    /// Serve the REST API without TLS.
    pub plaintext_restapi: bool,
    /// Talk to etcd without TLS.
    pub plaintext_etcd: bool,
    /// Allow `trust`, `password`, `md5`, non-SSL `host` lines, and `ldap` without TLS to the
    /// LDAP server in pg_hba.
    pub weak_pg_hba: bool,
}

impl Insecure {
    /// The overrides in force, by name, for the start-up warning.
    pub fn active(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.plaintext_restapi {
            v.push("pgkeep.insecure.plaintext_restapi");
        }
        if self.plaintext_etcd {
            v.push("pgkeep.insecure.plaintext_etcd");
        }
        if self.weak_pg_hba {
            v.push("pgkeep.insecure.weak_pg_hba");
        }
        v
    }
}

impl Config {
    /// Reads, checks and converts a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "", format!("cannot read the file: {e}")))?;
        let meta = std::fs::metadata(path)
            .map_err(|e| ConfigError::new(path, "", format!("cannot stat the file: {e}")))?;
        // The local file is what every policy trusts: nobody but its owner may change it.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(ConfigError::new(
                path,
                "",
                "the file is writable by group or others; run `chmod go-w` on it",
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(ConfigError::new(
                path,
                "",
                format!(
                    "the file belongs to uid {}, not to this user (uid {me}) or root",
                    meta.uid()
                ),
            ));
        }
        let config = Self::parse(path, &text)?;
        if let Some(secret_key) = config.inline_secret_keys.first()
            && crate::fsutil::readable_by_others(&meta)
        {
            return Err(ConfigError::new(
                path,
                secret_key.clone(),
                "the file holds a secret but is readable by group or others; run `chmod 600` on it \
                 (or move the secret to a 0600 password_file)",
            ));
        }
        Ok(config)
    }

    /// Parses configuration text. `path` is only used in error messages and to resolve the
    /// password files the text names.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let doc: serde_json::Value = serde_saphyr::from_str(text)
            .map_err(|e| ConfigError::new(path, "", format!("invalid YAML: {e}")))?;
        schema::check(&doc).map_err(|e| ConfigError::new(path, e.path, e.reason))?;
        let raw: raw::RawConfig = serde_path_to_error::deserialize(&doc).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::new(
                path,
                if key == "." { String::new() } else { key },
                e.inner().to_string(),
            )
        })?;
        resolve::resolve(path, raw)
    }

    /// The DCS prefix of this cluster.
    pub fn dcs_base(&self) -> String {
        pgkeep_core::cluster::base_path(&self.namespace, &self.scope)
    }
}
