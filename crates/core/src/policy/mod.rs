//! The parameter policy: which PostgreSQL settings may come from where, and how they are written.
//!
//! PostgreSQL configuration reaches `postgresql.conf` only through this module. Two sources exist:
//!
//! * the **local** configuration file on the node, written by its administrator. It may set any
//!   parameter with a valid name, including those that run commands or name files;
//! * the **dynamic** configuration (the DCS `config` key, written by `PATCH /config`,
//!   `pgkeep ctl edit-config`, `patronictl edit-config`, or anyone with write access to etcd).
//!   Whoever can write it must not be able to run code on the database hosts, so a dynamic value
//!   is accepted only for parameters on an allowlist of ordinary tuning settings. Anything that
//!   runs a command, loads code or names a file or directory, and the settings whose change would
//!   silently weaken security or data safety, is local-only: a dynamic value for it is dropped
//!   and reported as a [`Dropped`] entry so the agent logs a security warning.
//!
//! Names must match a strict pattern before they are written, and values are always written as
//! quoted literals, so neither can smuggle a second assignment or an `include` into the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

/// Longest accepted parameter name. PostgreSQL's own names are far shorter; the bound keeps
/// hostile input from producing huge log lines.
const MAX_NAME_LEN: usize = 128;

/// Longest accepted value.
const MAX_VALUE_LEN: usize = 8192;

/// A PostgreSQL parameter name that is safe to write into `postgresql.conf`: ASCII letters,
/// digits and `_`, not starting with a digit, with at most one `.` separating an extension
/// prefix (`pgaudit.log`). Stored lower-case, because PostgreSQL treats names case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GucName(String);

/// Why a parameter name or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The name does not match `^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$` (case-insensitively).
    #[error(
        "{0:?} is not a valid parameter name (letters, digits and '_', optionally one '.' for an extension prefix)"
    )]
    BadName(String),
    /// `include`, `include_if_exists` and `include_dir` are file directives, not parameters.
    #[error("{0:?} is a configuration-file directive, not a parameter")]
    Directive(String),
    /// The value contains a character PostgreSQL's configuration parser cannot take in a
    /// quoted string (newline, carriage return, NUL or another control character).
    #[error("the value of {name} contains a control character")]
    ControlCharacter {
        /// The parameter.
        name: String,
    },
    /// The value is longer than [`MAX_VALUE_LEN`].
    #[error("the value of {name} is longer than {MAX_VALUE_LEN} bytes")]
    TooLong {
        /// The parameter.
        name: String,
    },
    /// The value is a JSON array, object or null.
    #[error("the value of {name} must be a string, number or boolean")]
    BadType {
        /// The parameter.
        name: String,
    },
}

impl GucName {
    /// Checks and normalises a parameter name.
    pub fn parse(raw: &str) -> Result<GucName, PolicyError> {
        let lower = raw.to_ascii_lowercase();
        let valid_part = |p: &str| {
            let mut bytes = p.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
                && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let mut parts = lower.split('.');
        let ok = raw.len() <= MAX_NAME_LEN
            && raw.is_ascii()
            && parts.next().is_some_and(valid_part)
            && parts.next().is_none_or(valid_part)
            && parts.next().is_none();
        if !ok {
            return Err(PolicyError::BadName(truncate(raw)));
        }
        if matches!(
            lower.as_str(),
            "include" | "include_if_exists" | "include_dir"
        ) {
            return Err(PolicyError::Directive(lower));
        }
        Ok(GucName(lower))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for extension parameters (`prefix.name`).
    pub fn is_extension(&self) -> bool {
        self.0.contains('.')
    }
}

impl fmt::Display for GucName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A parameter value, checked to be writable as a quoted `postgresql.conf` literal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GucValue(String);

impl GucValue {
    /// Converts a JSON/YAML scalar. Booleans become `on`/`off`, as PostgreSQL writes them.
    pub fn from_json(name: &GucName, v: &Value) -> Result<GucValue, PolicyError> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(PolicyError::BadType {
                    name: name.to_string(),
                });
            }
        };
        GucValue::new(name, text)
    }

    /// Checks a textual value.
    pub fn new(name: &GucName, text: String) -> Result<GucValue, PolicyError> {
        if text.len() > MAX_VALUE_LEN {
            return Err(PolicyError::TooLong {
                name: name.to_string(),
            });
        }
        if text.chars().any(char::is_control) {
            return Err(PolicyError::ControlCharacter {
                name: name.to_string(),
            });
        }
        Ok(GucValue(text))
    }

    /// The value as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value as a `postgresql.conf` literal: single-quoted, with `'` and `\` doubled.
    pub fn quoted(&self) -> String {
        let mut out = String::with_capacity(self.0.len() + 2);
        out.push('\'');
        for c in self.0.chars() {
            match c {
                '\'' => out.push_str("''"),
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    }
}

/// Why a parameter may not come from the dynamic configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LocalOnlyReason {
    /// It runs an operating-system command.
    RunsCommand,
    /// It loads native code or sets where code is loaded from.
    LoadsCode,
    /// It names a file or directory.
    NamesPath,
    /// pgkeep sets it itself (addresses, replication source, synchronous standbys).
    ManagedByPgkeep,
    /// Changing it weakens authentication, encryption or auditing.
    WeakensSecurity,
    /// Changing it risks data loss or breaks rewind and point-in-time recovery.
    DataSafety,
    /// It is not on the dynamic allowlist (unknown settings and extension settings are
    /// local-only unless the local configuration allows them by name).
    NotAllowlisted,
}

impl fmt::Display for LocalOnlyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LocalOnlyReason::RunsCommand => "it runs an operating-system command",
            LocalOnlyReason::LoadsCode => "it loads native code",
            LocalOnlyReason::NamesPath => "it names a file or directory",
            LocalOnlyReason::ManagedByPgkeep => "pgkeep manages it",
            LocalOnlyReason::WeakensSecurity => "changing it can weaken security",
            LocalOnlyReason::DataSafety => "changing it risks data safety or recovery",
            LocalOnlyReason::NotAllowlisted => "it is not on the dynamic-parameter allowlist",
        })
    }
}

/// Parameters that must never come from the dynamic configuration, with the reason. The local
/// allowlist cannot open these.
const LOCAL_ONLY: &[(&str, LocalOnlyReason)] = {
    use LocalOnlyReason::*;
    &[
        ("archive_command", RunsCommand),
        ("restore_command", RunsCommand),
        ("archive_cleanup_command", RunsCommand),
        ("recovery_end_command", RunsCommand),
        ("ssl_passphrase_command", RunsCommand),
        ("shared_preload_libraries", LoadsCode),
        ("session_preload_libraries", LoadsCode),
        ("local_preload_libraries", LoadsCode),
        ("archive_library", LoadsCode),
        ("jit_provider", LoadsCode),
        ("oauth_validator_libraries", LoadsCode),
        ("dynamic_library_path", LoadsCode),
        ("extension_control_path", LoadsCode),
        ("data_directory", NamesPath),
        ("config_file", NamesPath),
        ("hba_file", NamesPath),
        ("ident_file", NamesPath),
        ("external_pid_file", NamesPath),
        ("log_directory", NamesPath),
        ("log_filename", NamesPath),
        ("log_file_mode", NamesPath),
        ("unix_socket_directories", NamesPath),
        ("unix_socket_group", NamesPath),
        ("unix_socket_permissions", NamesPath),
        ("ssl_cert_file", NamesPath),
        ("ssl_key_file", NamesPath),
        ("ssl_ca_file", NamesPath),
        ("ssl_crl_file", NamesPath),
        ("ssl_crl_dir", NamesPath),
        ("ssl_dh_params_file", NamesPath),
        ("krb_server_keyfile", NamesPath),
        ("stats_temp_directory", NamesPath),
        ("promote_trigger_file", NamesPath),
        ("trigger_file", NamesPath),
        ("event_source", NamesPath),
        ("listen_addresses", ManagedByPgkeep),
        ("port", ManagedByPgkeep),
        ("cluster_name", ManagedByPgkeep),
        ("hot_standby", ManagedByPgkeep),
        ("primary_conninfo", ManagedByPgkeep),
        ("primary_slot_name", ManagedByPgkeep),
        ("recovery_target", ManagedByPgkeep),
        ("recovery_target_action", ManagedByPgkeep),
        ("recovery_target_inclusive", ManagedByPgkeep),
        ("recovery_target_lsn", ManagedByPgkeep),
        ("recovery_target_name", ManagedByPgkeep),
        ("recovery_target_time", ManagedByPgkeep),
        ("recovery_target_timeline", ManagedByPgkeep),
        ("recovery_target_xid", ManagedByPgkeep),
        ("recovery_min_apply_delay", ManagedByPgkeep),
        ("standby_mode", ManagedByPgkeep),
        ("synchronous_standby_names", ManagedByPgkeep),
        ("ssl", WeakensSecurity),
        ("ssl_min_protocol_version", WeakensSecurity),
        ("ssl_max_protocol_version", WeakensSecurity),
        ("ssl_ciphers", WeakensSecurity),
        ("ssl_prefer_server_ciphers", WeakensSecurity),
        ("ssl_ecdh_curve", WeakensSecurity),
        ("password_encryption", WeakensSecurity),
        ("allow_alter_system", WeakensSecurity),
        ("restrict_nonsystem_relation_kind", WeakensSecurity),
        ("log_statement", WeakensSecurity),
        ("log_min_duration_statement", WeakensSecurity),
        ("log_min_duration_sample", WeakensSecurity),
        ("log_parameter_max_length", WeakensSecurity),
        ("log_parameter_max_length_on_error", WeakensSecurity),
        ("log_connections", WeakensSecurity),
        ("log_min_messages", WeakensSecurity),
        ("log_min_error_statement", WeakensSecurity),
        ("log_disconnections", WeakensSecurity),
        ("krb_caseins_users", WeakensSecurity),
        ("db_user_namespace", WeakensSecurity),
        ("row_security", WeakensSecurity),
        ("archive_mode", DataSafety),
        ("full_page_writes", DataSafety),
        ("wal_log_hints", DataSafety),
        ("fsync", DataSafety),
        ("data_sync_retry", DataSafety),
        ("zero_damaged_pages", DataSafety),
        ("ignore_checksum_failure", DataSafety),
        ("ignore_invalid_pages", DataSafety),
        ("ignore_system_indexes", DataSafety),
        ("allow_system_table_mods", DataSafety),
    ]
};

/// Ordinary tuning parameters a dynamic configuration may set. Everything here changes
/// performance or behaviour inside PostgreSQL's own sandbox; nothing runs code, names a path,
/// or turns off a safety or security feature.
const DYNAMIC_ALLOWLIST: &[&str] = &[
    // Connections and resources
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "shared_buffers",
    "huge_pages",
    "temp_buffers",
    "max_prepared_transactions",
    "work_mem",
    "hash_mem_multiplier",
    "maintenance_work_mem",
    "autovacuum_work_mem",
    "logical_decoding_work_mem",
    "max_stack_depth",
    "temp_file_limit",
    "max_files_per_process",
    "effective_io_concurrency",
    "maintenance_io_concurrency",
    "max_worker_processes",
    "max_parallel_workers",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "parallel_leader_participation",
    "bgwriter_delay",
    "bgwriter_lru_maxpages",
    "bgwriter_lru_multiplier",
    "bgwriter_flush_after",
    "backend_flush_after",
    "vacuum_cost_delay",
    "vacuum_cost_limit",
    "vacuum_cost_page_hit",
    "vacuum_cost_page_miss",
    "vacuum_cost_page_dirty",
    // WAL and replication
    "wal_level",
    "synchronous_commit",
    "wal_compression",
    "wal_buffers",
    "wal_writer_delay",
    "wal_writer_flush_after",
    "wal_init_zero",
    "wal_recycle",
    "commit_delay",
    "commit_siblings",
    "checkpoint_timeout",
    "checkpoint_completion_target",
    "checkpoint_flush_after",
    "checkpoint_warning",
    "max_wal_size",
    "min_wal_size",
    "archive_timeout",
    "max_wal_senders",
    "max_replication_slots",
    "max_slot_wal_keep_size",
    "wal_keep_size",
    "wal_sender_timeout",
    "wal_receiver_timeout",
    "wal_receiver_status_interval",
    "wal_retrieve_retry_interval",
    "hot_standby_feedback",
    "max_standby_archive_delay",
    "max_standby_streaming_delay",
    "track_commit_timestamp",
    "vacuum_defer_cleanup_age",
    "max_logical_replication_workers",
    "max_sync_workers_per_subscription",
    "max_parallel_apply_workers_per_subscription",
    // Planner
    "seq_page_cost",
    "random_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "parallel_setup_cost",
    "parallel_tuple_cost",
    "min_parallel_table_scan_size",
    "min_parallel_index_scan_size",
    "effective_cache_size",
    "default_statistics_target",
    "constraint_exclusion",
    "cursor_tuple_fraction",
    "from_collapse_limit",
    "join_collapse_limit",
    "jit",
    "jit_above_cost",
    "jit_inline_above_cost",
    "jit_optimize_above_cost",
    "plan_cache_mode",
    "enable_bitmapscan",
    "enable_hashagg",
    "enable_hashjoin",
    "enable_indexscan",
    "enable_indexonlyscan",
    "enable_material",
    "enable_memoize",
    "enable_mergejoin",
    "enable_nestloop",
    "enable_parallel_append",
    "enable_parallel_hash",
    "enable_partition_pruning",
    "enable_partitionwise_join",
    "enable_partitionwise_aggregate",
    "enable_seqscan",
    "enable_sort",
    "enable_incremental_sort",
    "enable_tidscan",
    "geqo",
    "geqo_threshold",
    // Statistics and monitoring
    "track_activities",
    "track_activity_query_size",
    "track_counts",
    "track_io_timing",
    "track_wal_io_timing",
    "track_functions",
    "compute_query_id",
    "log_autovacuum_min_duration",
    "log_checkpoints",
    "log_lock_waits",
    "log_temp_files",
    "log_error_verbosity",
    "log_recovery_conflict_waits",
    "log_startup_progress_interval",
    "deadlock_timeout",
    // Autovacuum
    "autovacuum",
    "autovacuum_max_workers",
    "autovacuum_naptime",
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_analyze_threshold",
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_analyze_scale_factor",
    "autovacuum_freeze_max_age",
    "autovacuum_multixact_freeze_max_age",
    "autovacuum_vacuum_cost_delay",
    "autovacuum_vacuum_cost_limit",
    // Client defaults
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "vacuum_freeze_min_age",
    "vacuum_freeze_table_age",
    "vacuum_multixact_freeze_min_age",
    "vacuum_multixact_freeze_table_age",
    "vacuum_failsafe_age",
    "vacuum_multixact_failsafe_age",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "client_encoding",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "default_text_search_config",
    "gin_pending_list_limit",
    "max_locks_per_transaction",
    "max_pred_locks_per_transaction",
    "max_pred_locks_per_relation",
    "max_pred_locks_per_page",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "client_connection_check_interval",
    "authentication_timeout",
];

/// Where a parameter may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Accepted from the dynamic configuration.
    Dynamic,
    /// Only the local configuration file may set it.
    LocalOnly(LocalOnlyReason),
}

/// Decides where a parameter may come from. `local_allowlist` holds the extra names the node's
/// local configuration opens to dynamic configuration (for instance extension parameters); it
/// cannot open any parameter of the built-in local-only list, nor one whose name says it runs a
/// command, loads a library or names a path.
pub fn admission(name: &GucName, local_allowlist: &BTreeSet<GucName>) -> Admission {
    if let Some((_, reason)) = LOCAL_ONLY.iter().find(|(n, _)| *n == name.as_str()) {
        return Admission::LocalOnly(*reason);
    }
    // Any name that mentions a command, library or path is local-only even if a future
    // PostgreSQL version adds it: the allowlist cannot open it by accident.
    let n = name.as_str();
    if n.ends_with("_command") || n.contains("librar") {
        return Admission::LocalOnly(if n.ends_with("_command") {
            LocalOnlyReason::RunsCommand
        } else {
            LocalOnlyReason::LoadsCode
        });
    }
    if n.ends_with("_file")
        || n.ends_with("_dir")
        || n.ends_with("_directory")
        || n.ends_with("_path")
    {
        return Admission::LocalOnly(LocalOnlyReason::NamesPath);
    }
    if DYNAMIC_ALLOWLIST.contains(&n) || local_allowlist.contains(name) {
        Admission::Dynamic
    } else {
        Admission::LocalOnly(LocalOnlyReason::NotAllowlisted)
    }
}

/// A parameter the policy refused, with the reason to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The name as it was given (truncated if long).
    pub name: String,
    /// Why it was dropped.
    pub reason: DropReason,
}

/// Why a parameter was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// The name or value is malformed.
    Invalid(PolicyError),
    /// The value would break replication or the cluster's ability to fail over.
    Unsafe(String),
    /// The parameter is local-only.
    LocalOnly(LocalOnlyReason),
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            DropReason::Invalid(e) => write!(f, "dropped dynamic parameter {:?}: {e}", self.name),
            DropReason::Unsafe(why) => write!(f, "dropped dynamic parameter {}: {why}", self.name),
            DropReason::LocalOnly(r) => write!(
                f,
                "dropped dynamic parameter {}: it may only be set in the local configuration because {r}",
                self.name
            ),
        }
    }
}

/// Checked parameters, in name order.
pub type Parameters = BTreeMap<GucName, GucValue>;

/// Filters parameters from the dynamic configuration: accepted ones are returned, the others
/// are listed in the second element so the caller can log a security warning for each.
pub fn filter_dynamic(
    raw: &serde_json::Map<String, Value>,
    local_allowlist: &BTreeSet<GucName>,
) -> (Parameters, Vec<Dropped>) {
    let mut accepted = Parameters::new();
    let mut dropped = Vec::new();
    for (raw_name, raw_value) in raw {
        let checked = GucName::parse(raw_name).and_then(|n| {
            let v = GucValue::from_json(&n, raw_value)?;
            Ok((n, v))
        });
        match checked {
            Err(e) => dropped.push(Dropped {
                name: truncate(raw_name),
                reason: DropReason::Invalid(e),
            }),
            Ok((name, value)) => match admission(&name, local_allowlist) {
                Admission::Dynamic => match unsafe_value(&name, &value) {
                    Some(why) => dropped.push(Dropped {
                        name: name.to_string(),
                        reason: DropReason::Unsafe(why),
                    }),
                    None => {
                        accepted.insert(name, value);
                    }
                },
                Admission::LocalOnly(r) => dropped.push(Dropped {
                    name: name.to_string(),
                    reason: DropReason::LocalOnly(r),
                }),
            },
        }
    }
    (accepted, dropped)
}

/// Values of allowlisted parameters that would stop replication or failover from working, with
/// the reason. Patroni checks the same minimums for these settings.
fn unsafe_value(name: &GucName, value: &GucValue) -> Option<String> {
    let v = value.as_str().trim().to_ascii_lowercase();
    match name.as_str() {
        "wal_level" if !matches!(v.as_str(), "replica" | "logical") => {
            Some("wal_level must be replica or logical for streaming replication".into())
        }
        "max_wal_senders" | "max_replication_slots" => match v.parse::<u32>() {
            Ok(n) if n >= 4 => None,
            _ => Some(format!(
                "{name} must be a whole number of at least 4 for replication and failover"
            )),
        },
        _ => None,
    }
}

/// Checks parameters from the local configuration file: every name and value must be
/// well-formed; any parameter may be set. Errors name the offending parameter.
pub fn check_local(raw: &serde_json::Map<String, Value>) -> Result<Parameters, PolicyError> {
    raw.iter()
        .map(|(k, v)| {
            let name = GucName::parse(k)?;
            let value = GucValue::from_json(&name, v)?;
            Ok((name, value))
        })
        .collect()
}

/// Merges the layers, later ones winning: pgkeep's baseline, the filtered dynamic parameters,
/// the local file's parameters, and last the values pgkeep must control (addresses, ports,
/// TLS files, replication settings).
pub fn merge(layers: &[&Parameters]) -> Parameters {
    let mut out = Parameters::new();
    for layer in layers {
        for (k, v) in *layer {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Renders `postgresql.conf`. Every line is `name = 'value'`; nothing else can appear.
pub fn render_conf(header: &str, params: &Parameters) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(&line.replace(|c: char| c.is_control(), " "));
        out.push('\n');
    }
    for (name, value) in params {
        out.push_str(name.as_str());
        out.push_str(" = ");
        out.push_str(&value.quoted());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
