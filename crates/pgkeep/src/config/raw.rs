//! The file as written: serde types mirroring `patroni.yml`, before checking.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{LogFormat, VerifyClient, WatchdogMode};

/// A list that Patroni also accepts as one comma-separated string.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub(super) enum ListOrString {
    #[default]
    Empty,
    List(Vec<String>),
    Text(String),
}

impl ListOrString {
    pub(super) fn items(&self) -> Vec<String> {
        match self {
            ListOrString::Empty => Vec::new(),
            ListOrString::List(v) => v
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            ListOrString::Text(s) => s
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) scope: String,
    #[serde(default)]
    pub(super) namespace: Option<String>,
    pub(super) name: String,
    pub(super) restapi: RawRestApi,
    #[serde(default)]
    pub(super) ctl: Option<RawCtl>,
    pub(super) etcd3: RawEtcd,
    #[serde(default)]
    pub(super) bootstrap: Option<RawBootstrap>,
    pub(super) postgresql: RawPostgresql,
    #[serde(default)]
    pub(super) tags: Option<Map<String, Value>>,
    #[serde(default)]
    pub(super) watchdog: Option<RawWatchdog>,
    #[serde(default)]
    pub(super) log: Option<RawLog>,
    #[serde(default)]
    pub(super) pgkeep: Option<RawPgkeep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) username: String,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestApi {
    pub(super) listen: String,
    #[serde(default)]
    pub(super) connect_address: Option<String>,
    #[serde(default)]
    pub(super) certfile: Option<PathBuf>,
    #[serde(default)]
    pub(super) keyfile: Option<PathBuf>,
    #[serde(default)]
    pub(super) cafile: Option<PathBuf>,
    #[serde(default)]
    pub(super) verify_client: Option<VerifyClient>,
    #[serde(default)]
    pub(super) authentication: Option<RawAuth>,
    #[serde(default)]
    pub(super) allowlist: ListOrString,
    #[serde(default)]
    pub(super) allowlist_include_members: bool,
    #[serde(default)]
    pub(super) allowed_client_names: ListOrString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCtl {
    #[serde(default)]
    pub(super) certfile: Option<PathBuf>,
    #[serde(default)]
    pub(super) keyfile: Option<PathBuf>,
    #[serde(default)]
    pub(super) cacert: Option<PathBuf>,
    #[serde(default)]
    pub(super) authentication: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    #[serde(default)]
    pub(super) host: Option<String>,
    #[serde(default)]
    pub(super) hosts: ListOrString,
    #[serde(default)]
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) cacert: Option<PathBuf>,
    #[serde(default)]
    pub(super) cert: Option<PathBuf>,
    #[serde(default)]
    pub(super) key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBootstrap {
    #[serde(default)]
    pub(super) dcs: Option<Map<String, Value>>,
    #[serde(default)]
    pub(super) initdb: Vec<Value>,
    #[serde(default)]
    pub(super) applications: Vec<RawApplication>,
}

/// One entry of `bootstrap.applications`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApplication {
    pub(super) name: String,
    pub(super) password_file: PathBuf,
    #[serde(default)]
    pub(super) readonly_password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPgRole {
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) sslmode: Option<String>,
    #[serde(default)]
    pub(super) sslcert: Option<PathBuf>,
    #[serde(default)]
    pub(super) sslkey: Option<PathBuf>,
    #[serde(default)]
    pub(super) sslrootcert: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPgAuthentication {
    #[serde(default)]
    pub(super) superuser: Option<RawPgRole>,
    #[serde(default)]
    pub(super) replication: Option<RawPgRole>,
    #[serde(default)]
    pub(super) rewind: Option<RawPgRole>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgresql {
    pub(super) listen: String,
    pub(super) connect_address: String,
    pub(super) data_dir: PathBuf,
    #[serde(default)]
    pub(super) config_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) bin_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) pgpass: Option<PathBuf>,
    #[serde(default)]
    pub(super) authentication: Option<RawPgAuthentication>,
    #[serde(default)]
    pub(super) parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub(super) pg_hba: Vec<String>,
    #[serde(default)]
    pub(super) pg_ident: Vec<String>,
    #[serde(default)]
    pub(super) use_pg_rewind: Option<bool>,
    #[serde(default)]
    pub(super) pg_ctl_timeout: Option<u64>,
    #[serde(default)]
    pub(super) ldap_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) callbacks: Option<Map<String, Value>>,
    #[serde(default)]
    pub(super) pre_promote: Option<Value>,
    #[serde(default)]
    pub(super) before_stop: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWatchdog {
    #[serde(default)]
    pub(super) mode: Option<WatchdogMode>,
    #[serde(default)]
    pub(super) device: Option<PathBuf>,
    #[serde(default)]
    pub(super) safety_margin: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub(super) level: Option<String>,
    #[serde(default)]
    pub(super) format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInsecure {
    #[serde(default)]
    pub(super) plaintext_restapi: bool,
    #[serde(default)]
    pub(super) plaintext_etcd: bool,
    #[serde(default)]
    pub(super) weak_pg_hba: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPgkeep {
    #[serde(default)]
    pub(super) dynamic_parameter_allowlist: Vec<String>,
    #[serde(default)]
    pub(super) cluster_networks: Vec<String>,
    #[serde(default)]
    pub(super) insecure: Option<RawInsecure>,
    #[serde(default)]
    pub(super) callback_timeout: Option<u64>,
    #[serde(default)]
    pub(super) callback_primary_role: Option<String>,
    #[serde(default)]
    pub(super) certificate_expiry_warning_days: Option<u32>,
    #[serde(default)]
    pub(super) pgbackrest: Option<RawPgBackRest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPgBackRest {
    pub(super) config_path: Option<String>,
    #[serde(default)]
    pub(super) stanza: Option<String>,
    #[serde(default)]
    pub(super) replica_without_leader: bool,
}
