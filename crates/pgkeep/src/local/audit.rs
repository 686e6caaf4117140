//! The facts `pgkeep audit --dir D` judges, collected from a local environment as root: each
//! node's PostgreSQL through its superuser's Unix socket (one query returning JSON), the owners
//! and modes of its files, its configuration's relaxations and its certificates; the dynamic
//! configuration and etcd's state; HAProxy's configuration file; the pgBackRest repository.
//!
//! What cannot be read is left out of the facts, and the checks that need it say "manual".

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pgkeep_core::audit::{BackupFacts, EtcdFacts, Facts, FileFacts, NodeFacts};

use super::{Layout, ServiceUser, backup, etcd, health};
use crate::dcs::Dcs;
use crate::inventory::{DbHost, Inventory};

/// Everything in one statement, as one JSON document.
const NODE_QUERY: &str = r"SELECT json_build_object(
  'settings', (SELECT json_object_agg(name, setting) FROM pg_settings),
  'hba', (SELECT coalesce(json_agg(json_build_object(
      'line', coalesce(line_number, 0), 'kind', coalesce(type, ''),
      'databases', coalesce(database, '{}'), 'users', coalesce(user_name, '{}'),
      'address', address, 'netmask', netmask, 'method', coalesce(auth_method, ''),
      'error', error) ORDER BY line_number), '[]') FROM pg_hba_file_rules),
  'roles', (SELECT coalesce(json_agg(json_build_object(
      'name', rolname, 'superuser', rolsuper, 'login', rolcanlogin,
      'replication', rolreplication, 'bypass_rls', rolbypassrls, 'create_role', rolcreaterole,
      'password', CASE WHEN rolpassword IS NULL THEN NULL
                       WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram-sha-256'
                       WHEN rolpassword ~ '^md5[0-9a-f]{32}$' THEN 'md5'
                       ELSE 'plain' END)), '[]')
      FROM pg_authid WHERE rolname !~ '^pg_'),
  'extensions', (SELECT coalesce(json_object_agg(extname, extversion), '{}') FROM pg_extension),
  'public_create_schemas', (SELECT coalesce(json_agg(n.nspname), '[]')
      FROM pg_namespace n, aclexplode(n.nspacl) a
      WHERE a.grantee = 0 AND a.privilege_type = 'CREATE'),
  'synchronous_commit_overrides', (SELECT coalesce(json_agg(
      coalesce(r.rolname, 'all') || '@' || coalesce(d.datname, 'all') || '=' ||
      split_part(c, '=', 2)), '[]')
      FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
      LEFT JOIN pg_database d ON d.oid = s.setdatabase, unnest(s.setconfig) c
      WHERE c LIKE 'synchronous_commit=%'))::text";

#[derive(serde::Deserialize)]
struct NodeSql {
    settings: std::collections::BTreeMap<String, String>,
    hba: Vec<pgkeep_core::audit::HbaRule>,
    roles: Vec<pgkeep_core::audit::Role>,
    extensions: std::collections::BTreeMap<String, String>,
    public_create_schemas: Vec<String>,
    synchronous_commit_overrides: Vec<String>,
}

/// Collects the facts of the environment in `dir`; `haproxy_cfg` overrides the environment's
/// own HAProxy configuration file.
pub fn collect(dir: &Path, haproxy_cfg: Option<&Path>) -> Result<Facts> {
    let layout = Layout::new(dir)?;
    let inv = Inventory::load(&layout.inventory())
        .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
    let pg = ServiceUser::postgres()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let nodes = inv
        .database_hosts
        .iter()
        .map(|h| node(&layout, h, &pg, &rt))
        .collect();
    let (dcs_config, etcd) = rt.block_on(etcd_facts(&layout, &inv));
    let haproxy_path = haproxy_cfg
        .map(Path::to_path_buf)
        .unwrap_or_else(|| layout.haproxy_config());
    Ok(Facts {
        nodes,
        dcs_config,
        etcd,
        haproxy_cfg: std::fs::read_to_string(haproxy_path).ok(),
        backup: backup_facts(&layout, &inv),
        listeners: Vec::new(),
        rest: Vec::new(),
    })
}

fn node(layout: &Layout, h: &DbHost, pg: &ServiceUser, rt: &tokio::runtime::Runtime) -> NodeFacts {
    let mut n = NodeFacts {
        name: h.name.clone(),
        ..NodeFacts::default()
    };
    match rt
        .block_on(health::psql(layout, h, pg, NODE_QUERY))
        .context("querying PostgreSQL")
        .and_then(|text| serde_json::from_str::<NodeSql>(text.trim()).context("its answer"))
    {
        Ok(sql) => {
            n.data_checksums = sql.settings.get("data_checksums").map(|v| v == "on");
            n.settings = sql.settings;
            n.hba = sql.hba;
            n.roles = sql.roles;
            n.extensions = sql.extensions;
            n.public_create_schemas = sql.public_create_schemas;
            n.synchronous_commit_overrides = sql.synchronous_commit_overrides;
        }
        Err(e) => {
            tracing::warn!(node = %h.name, error = format!("{e:#}"), "PostgreSQL facts not collected")
        }
    }
    n.files = node_files(layout, h, &n);
    n.installed_version = installed_postgres();
    n.data_encrypted = on_dm_crypt(&layout.data_dir(&h.name));
    match crate::config::Config::load(&layout.node_config(&h.name)) {
        Ok(c) => {
            n.insecure = Some(
                c.insecure
                    .active()
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            )
        }
        Err(e) => tracing::warn!(node = %h.name, error = %e, "configuration not read"),
    }
    let tls = super::certs::node_tls(layout, &h.name);
    for e in std::fs::read_dir(&tls).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "crt")
            && let Ok(info) = crate::pki::inspect(&p)
        {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.cert_seconds_left.insert(name, info.seconds_left);
        }
    }
    n
}

fn file_facts(kind: &str, path: &Path) -> Option<FileFacts> {
    let meta = std::fs::metadata(path).ok()?;
    let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |u| u.name);
    Some(FileFacts {
        kind: kind.into(),
        path: path.display().to_string(),
        owner,
        mode: meta.mode() & 0o7777,
    })
}

/// The node's data directory, log directory, configuration and private keys; a CA key found in
/// the node's own directory.
fn node_files(layout: &Layout, h: &DbHost, n: &NodeFacts) -> Vec<FileFacts> {
    let mut out = Vec::new();
    out.extend(file_facts("data_directory", &layout.data_dir(&h.name)));
    if let Some(d) = n
        .settings
        .get("log_directory")
        .filter(|d| d.starts_with('/'))
    {
        out.extend(file_facts("log_directory", Path::new(d)));
    }
    out.extend(file_facts("config", &layout.node_config(&h.name)));
    let conf = layout.conf_dir(&h.name);
    for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        out.extend(file_facts("config", &conf.join(f)));
    }
    // The agent writes the server's output here (the logging collector stays off).
    out.extend(file_facts("server_log", &conf.join("postgresql.log")));
    let mut stack = vec![layout.node_dir(&h.name)];
    while let Some(d) = stack.pop() {
        // The data directory's own files are PostgreSQL's (its modes are checked as a whole).
        if d == layout.data_dir(&h.name) {
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == crate::pki::CA_KEY_FILE) {
                out.extend(file_facts("ca_key", &p));
            } else if p.extension().is_some_and(|x| x == "key") {
                out.extend(file_facts("private_key", &p));
            }
        }
    }
    out
}

async fn etcd_facts(
    layout: &Layout,
    inv: &Inventory,
) -> (Option<serde_json::Value>, Option<EtcdFacts>) {
    let mut healthy = 0;
    for m in &inv.etcd_hosts {
        if tokio::time::timeout(Duration::from_secs(5), etcd::member_health(layout, inv, m))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            healthy += 1;
        }
    }
    let auth_enabled = match super::etcd_access::auth_enabled(layout, inv).await {
        Ok(on) => Some(on),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "etcd authentication state not read"
            );
            None
        }
    };
    let settings = etcd::operator_settings(layout, inv, inv.etcd_endpoints());
    let config = match crate::dcs::EtcdDcs::connect(&settings).await {
        Ok(dcs) => dcs
            .load()
            .await
            .ok()
            .and_then(|s| s.view.config.map(|c| serde_json::Value::Object(c.value))),
        Err(_) => None,
    };
    let facts = EtcdFacts {
        members: u32::try_from(inv.etcd_hosts.len()).unwrap_or(u32::MAX),
        healthy,
        auth_enabled,
        tls: settings.endpoints.iter().all(|e| e.starts_with("https://")),
        flags: inv
            .etcd_hosts
            .iter()
            .filter_map(|m| {
                let pid = super::spawn::running(
                    &layout.etcd_pid(&m.name),
                    &etcd::identity(layout, &m.name),
                )?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                Some(
                    cmd.split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .filter(|a| a.starts_with("--"))
                        .collect(),
                )
            })
            .collect(),
    };
    (config, Some(facts))
}

fn backup_facts(layout: &Layout, inv: &Inventory) -> Option<BackupFacts> {
    inv.backup_host.as_ref()?;
    let info = backup::repo_command(layout, inv, &["--output=json", "info"]).ok()?;
    let stanza = crate::pgbackrest::info::parse(&info, &inv.cluster).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let conf = std::fs::read_to_string(backup::repo_config_path(layout).join("pgbackrest.conf"))
        .unwrap_or_default();
    Some(BackupFacts {
        stanza: !stanza.missing(),
        cipher: stanza.cipher.clone(),
        newest_backup_age_seconds: stanza.backups.iter().map(|b| b.stop).max().map(|t| now - t),
        tls_server_auth: conf
            .lines()
            .filter_map(|l| l.trim().strip_prefix("tls-server-auth="))
            .map(str::to_owned)
            .collect(),
    })
}

/// The installed server package's version (Debian's `postgresql-15`).
fn installed_postgres() -> Option<String> {
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "postgresql-15"])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// Whether `dir` lies on a dm-crypt device: its mount's source and every device under it as
/// `lsblk` lists them (`crypt` type).
fn on_dm_crypt(dir: &Path) -> Option<bool> {
    let src = std::process::Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "-T"])
        .arg(dir)
        .output()
        .ok()?;
    let source = String::from_utf8_lossy(&src.stdout).trim().to_owned();
    if !source.starts_with("/dev/") {
        // overlay, tmpfs, a network file system: no block device to judge.
        return Some(false);
    }
    let out = std::process::Command::new("lsblk")
        .args(["-s", "-n", "-o", "TYPE"])
        .arg(&source)
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "crypt")
    })
}
