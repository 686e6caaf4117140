//! Writes postgresql.conf, pg_hba.conf and pg_ident.conf into the configuration directory,
//! outside the data directory, from the layers the core defines.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pgkeep_core::ha::SyncStandbyNames;
use pgkeep_core::pgconf::{self, HbaRoles, NodeLayout, Upstream};
use pgkeep_core::policy::{self, GucName, GucValue, Parameters};

use crate::config::Config;
use crate::fsutil::write_atomic;

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StandbyOf {
    /// Upstream host name and port (from its `conn_url`).
    pub(super) host: String,
    /// Port.
    pub(super) port: u16,
    /// Slot to stream through, if slots are used.
    pub(super) slot: Option<String>,
}

/// The node's file layout, derived once from the configuration.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// What the core needs to render the managed settings.
    pub(super) node: NodeLayout,
    /// The data directory.
    pub(super) data_dir: PathBuf,
    /// The configuration directory.
    pub(super) config_dir: PathBuf,
}

fn local_param(cfg: &Config, name: &str) -> Option<String> {
    let n = GucName::parse(name).ok()?;
    cfg.postgresql
        .parameters
        .get(&n)
        .map(|v| v.as_str().to_owned())
}

impl Layout {
    /// Derives the layout. TLS files come from the local parameters (`ssl_cert_file`,
    /// `ssl_key_file`, `ssl_ca_file`), which are required: pgkeep never runs PostgreSQL without
    /// TLS.
    pub(super) fn from_config(cfg: &Config) -> Result<Layout> {
        let need = |n: &str| {
            local_param(cfg, n).with_context(|| {
                format!(
                    "{}: postgresql.parameters.{n} is required (PostgreSQL always runs with TLS)",
                    cfg.source.display()
                )
            })
        };
        let socket_dir = local_param(cfg, "unix_socket_directories")
            .and_then(|s| s.split(',').next().map(|d| d.trim().to_owned()))
            .unwrap_or_else(|| "/var/run/postgresql".into());
        if socket_dir.len() + 20 > 107 {
            bail!(
                "unix_socket_directories {socket_dir:?} is too long for a Unix socket path (PostgreSQL refuses over 107 bytes)"
            );
        }
        let config_dir = cfg.postgresql.config_dir.clone();
        Ok(Layout {
            node: NodeLayout {
                listen_address: cfg.postgresql.listen.ip(),
                port: cfg.postgresql.listen.port(),
                socket_dir,
                ssl_cert_file: need("ssl_cert_file")?,
                ssl_key_file: need("ssl_key_file")?,
                ssl_ca_file: need("ssl_ca_file")?,
                hba_file: config_dir.join("pg_hba.conf").display().to_string(),
                ident_file: config_dir.join("pg_ident.conf").display().to_string(),
                member_name: cfg.name.clone(),
            },
            data_dir: cfg.postgresql.data_dir.clone(),
            config_dir,
        })
    }

    /// The Unix socket directory.
    pub(super) fn socket_dir(&self) -> &Path {
        Path::new(&self.node.socket_dir)
    }
}

fn set(p: &mut Parameters, name: &str, value: &str) -> Result<()> {
    let n = GucName::parse(name)?;
    let v = GucValue::new(&n, value.to_owned())?;
    p.insert(n, v);
    Ok(())
}

/// Renders and writes the three files. `dynamic` has already passed the policy.
pub(super) fn write_files(
    cfg: &Config,
    layout: &Layout,
    dynamic: &Parameters,
    standby: Option<&StandbyOf>,
    sync: &SyncStandbyNames,
) -> Result<()> {
    let mut managed = pgconf::managed(&layout.node);
    set(
        &mut managed,
        "data_directory",
        &layout.data_dir.display().to_string(),
    )?;
    set(&mut managed, "synchronous_standby_names", &sync.to_guc())?;
    let auth = &cfg.postgresql.authentication;
    if let Some(s) = standby {
        let repl = &auth.replication;
        let files = repl
            .client
            .as_ref()
            .context("postgresql.authentication.replication needs sslcert and sslkey")?;
        let root = repl
            .sslrootcert
            .as_ref()
            .context("postgresql.authentication.replication needs sslrootcert")?;
        let upstream = Upstream {
            host: s.host.clone(),
            port: s.port,
            application_name: cfg.name.clone(),
            user: repl.username.clone(),
            sslcert: files.cert.display().to_string(),
            sslkey: files.key.display().to_string(),
            sslrootcert: root.display().to_string(),
        };
        managed.extend(pgconf::standby_settings(&upstream, s.slot.as_deref()));
    }
    let merged = policy::merge(&[
        &pgconf::baseline(),
        dynamic,
        &cfg.postgresql.parameters,
        &managed,
    ]);
    let conf = policy::render_conf(
        &format!(
            "postgresql.conf for member {} of {}, rendered by pgkeep; edits are overwritten.",
            cfg.name, cfg.scope
        ),
        &merged,
    );
    let roles = HbaRoles {
        superuser: auth.superuser.username.clone(),
        replication: auth.replication.username.clone(),
        rewind: auth.rewind.username.clone(),
    };
    let networks: Vec<String> = cfg
        .cluster_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    let hba = pgconf::render_hba(&roles, &networks, &cfg.postgresql.pg_hba);
    let mut ident =
        String::from("# pg_ident.conf rendered by pgkeep; add lines with postgresql.pg_ident.\n");
    for line in &cfg.postgresql.pg_ident {
        ident.push_str(line.trim());
        ident.push('\n');
    }
    std::fs::create_dir_all(&layout.config_dir)
        .with_context(|| format!("creating {}", layout.config_dir.display()))?;
    for (name, text) in [
        ("postgresql.conf", conf),
        ("pg_hba.conf", hba),
        ("pg_ident.conf", ident),
    ] {
        let path = layout.config_dir.join(name);
        write_atomic(&path, text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Creates or removes `standby.signal` in the data directory.
pub(super) fn set_standby_signal(layout: &Layout, standby: bool) -> Result<()> {
    let path = layout.data_dir.join("standby.signal");
    if standby {
        // A `recovery.signal` (left by a restore) would mean "recover, then promote" the day
        // standby.signal is gone: a standby has none.
        let recovery = layout.data_dir.join("recovery.signal");
        match std::fs::remove_file(&recovery) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", recovery.display()));
            }
            _ => {}
        }
        write_atomic(&path, b"", 0o600).with_context(|| format!("writing {}", path.display()))
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Removes the configuration files initdb leaves in the data directory, so nobody mistakes them
/// for the live ones (those live in the configuration directory).
pub(super) fn remove_initdb_config_copies(layout: &Layout) {
    for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        let _ = std::fs::remove_file(layout.data_dir.join(f));
    }
}
