//! What the collectors found, as plain data: the only input of the checks. Every field is
//! optional or a list, because a collector may not reach everything (a node down, a file it may
//! not read); a check whose facts are missing says "not applicable" or "manual", never "pass".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything known about one environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    /// Each database node.
    pub nodes: Vec<NodeFacts>,
    /// The dynamic configuration (the DCS `config` key), as stored.
    pub dcs_config: Option<serde_json::Value>,
    /// etcd, as seen from the operator's side.
    pub etcd: Option<EtcdFacts>,
    /// The HAProxy configuration file's text, when one was given.
    pub haproxy_cfg: Option<String>,
    /// The backup repository.
    pub backup: Option<BackupFacts>,
    /// Every TLS listener, probed by connecting to it.
    #[serde(default)]
    pub listeners: Vec<ListenerProbe>,
    /// Each node's REST API, probed as an anonymous caller would.
    #[serde(default)]
    pub rest: Vec<RestProbe>,
}

/// What a connection to one TLS listener showed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerProbe {
    /// `postgres`, `restapi`, `etcd-client`, `etcd-peer`, `pgbackrest`.
    pub service: String,
    /// Its host.
    pub host: String,
    /// `address:port`.
    pub address: String,
    /// The protocol versions older than TLS 1.2 it completed a handshake with.
    pub old_tls_accepted: Vec<String>,
    /// Why its certificate did not verify against the cluster CA and its name (none: it did).
    pub verify_error: Option<String>,
    /// Seconds until the presented certificate expires.
    pub seconds_left: Option<i64>,
    /// It answered a plaintext request (HTTP services only).
    pub plaintext_accepted: Option<bool>,
}

/// What an anonymous caller got from one node's REST API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestProbe {
    /// The node.
    pub node: String,
    /// Status of `POST /restart` without credentials.
    pub restart_status: Option<u16>,
    /// Status and body of `GET /patroni` without credentials.
    pub patroni_status: Option<u16>,
    /// Whether that body names members, roles or the scope.
    pub patroni_describes_cluster: Option<bool>,
    /// A client certificate of another CA completed the handshake.
    pub foreign_cert_accepted: Option<bool>,
}

/// One database node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Member name.
    pub name: String,
    /// `pg_settings`: name → setting, as PostgreSQL reports it (units as in `setting`).
    pub settings: BTreeMap<String, String>,
    /// `pg_hba_file_rules`, as PostgreSQL parsed the file.
    pub hba: Vec<HbaRule>,
    /// Roles (`pg_authid`).
    pub roles: Vec<Role>,
    /// Installed extensions (`pg_extension`): name → version.
    pub extensions: BTreeMap<String, String>,
    /// `pg_control_system()` and friends: data checksums on.
    pub data_checksums: Option<bool>,
    /// Schemas where `PUBLIC` may create objects.
    pub public_create_schemas: Vec<String>,
    /// Files of the node (data directory, configuration, keys).
    pub files: Vec<FileFacts>,
    /// The agent's own `insecure:` relaxations in force (none: not collected).
    pub insecure: Option<Vec<String>>,
    /// The certificates the node uses: role → seconds until expiry.
    pub cert_seconds_left: BTreeMap<String, i64>,
    /// The installed server package's version (`15.10`), to compare with the running one.
    pub installed_version: Option<String>,
    /// The data directory sits on dm-crypt (LUKS) storage.
    pub data_encrypted: Option<bool>,
    /// `ALTER ROLE/DATABASE ... SET synchronous_commit` overrides, as `role@database=value`.
    #[serde(default)]
    pub synchronous_commit_overrides: Vec<String>,
}

/// One row of `pg_hba_file_rules`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HbaRule {
    /// Line number in the file.
    pub line: u32,
    /// `local`, `host`, `hostssl`, ...
    pub kind: String,
    /// Databases.
    pub databases: Vec<String>,
    /// Users.
    pub users: Vec<String>,
    /// Address (or keyword such as `all`, `samehost`), empty for `local`.
    pub address: Option<String>,
    /// Netmask, when given separately.
    pub netmask: Option<String>,
    /// Method.
    pub method: String,
    /// PostgreSQL's error for the line, if it could not use it.
    pub error: Option<String>,
}

/// One role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Role {
    /// Name.
    pub name: String,
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolcanlogin`.
    pub login: bool,
    /// `rolreplication`.
    pub replication: bool,
    /// `rolbypassrls`.
    pub bypass_rls: bool,
    /// `rolcreaterole`.
    pub create_role: bool,
    /// The kind of stored password verifier: `scram-sha-256`, `md5`, `plain`, or none.
    pub password: Option<String>,
}

/// A file's owner and mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileFacts {
    /// What it is: `data_directory`, `private_key`, `config`, `ca_key`, `log_directory`.
    pub kind: String,
    /// Path.
    pub path: String,
    /// Owner's user name.
    pub owner: String,
    /// Permission bits.
    pub mode: u32,
}

/// etcd.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdFacts {
    /// Member count.
    pub members: u32,
    /// Healthy members.
    pub healthy: u32,
    /// Authentication (`auth enable`) is on.
    pub auth_enabled: Option<bool>,
    /// Every client endpoint is `https://`.
    pub tls: bool,
    /// The members' command-line flags (`--name=value`), as one list per member.
    #[serde(default)]
    pub flags: Vec<Vec<String>>,
}

/// The backup repository.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupFacts {
    /// The stanza exists.
    pub stanza: bool,
    /// `repo1-cipher-type`.
    pub cipher: String,
    /// Seconds since the newest backup ended (none: no backup).
    pub newest_backup_age_seconds: Option<i64>,
    /// `tls-server-auth` entries of the repository server (`cn=stanza`).
    pub tls_server_auth: Vec<String>,
}
