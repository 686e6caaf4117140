//! pgBackRest on real hosts: the [`RepoPlan`] of the repository host and the [`NodePlan`] of
//! every database node of an inventory, with the file locations of a Debian installation
//! ([`DeployPaths::default`]). Pure: nothing is read, the paths are only written into the plans.
//!
//! What the plans encode, beyond [`super`]'s rules:
//!
//! - every host is addressed by its FQDN (`<name>.<domain>`): pgBackRest 2.45 ignores IP
//!   addresses in certificates, so only a name can be verified;
//! - every `pgbackrest server` listens on its host's own inventory address, never a wildcard;
//! - the repository's server lets in `pgbackrest-client-<node>` for each node, and each node's
//!   server lets in only `pgbackrest-client-<backup host>`;
//! - certificates are named as `pgkeep pki` issues them: `pgbackrest-<host>.crt/.key` (server,
//!   CN `pgbackrest-<host>`) and `pgbackrest-client-<host>.crt/.key` (client, CN
//!   `pgbackrest-client-<host>`).

use std::path::{Path, PathBuf};

use super::{
    NodePlan, Paths, PgBackRestError, PgNode, RepoPlan, Retention, Server, Timeouts, TlsFiles,
};
use crate::inventory::{BackupHost, DbHost, Inventory};
use crate::pki::{CA_CERT_FILE, Service};

/// `process-max` of the repository host: backups compress there (a host with 8 CPUs, see
/// [`super::process_max_for`]; the renderer cannot count the CPUs of another machine).
pub const REPO_PROCESS_MAX: u32 = 4;

/// `process-max` of a node's asynchronous archiving: two pushes in flight keep up with a busy
/// primary without taking CPUs from PostgreSQL.
pub const NODE_PROCESS_MAX: u32 = 2;

/// `archive-push-queue-max` of a node (MiB): 4 GiB of WAL waiting for a dead repository before
/// archiving gives up on it (and reports it) rather than filling the WAL volume.
pub const ARCHIVE_QUEUE_MAX_MIB: u64 = 4096;

/// Where pgBackRest's files live on real hosts. [`DeployPaths::default`] gives a Debian
/// installation (packages `pgbackrest` and `postgresql-15`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployPaths {
    /// The repository host's `--config-path`: `pgbackrest.conf` and `conf.d/cipher.conf`
    /// (default `/etc/pgbackrest`, pgBackRest's own default, so a bare `pgbackrest` run by the
    /// `pgbackrest` user there finds it).
    pub repo_config: PathBuf,
    /// `repo1-path` (default `/var/lib/pgbackrest`, the directory Debian's package creates).
    pub repo_path: PathBuf,
    /// The repository host's certificates, keys and CA (default `/etc/pgbackrest/tls`).
    pub repo_tls: PathBuf,
    /// A node's `--config-path` (default `/etc/pgkeep/pgbackrest`: next to pgkeep's own files,
    /// away from a stray `/etc/pgbackrest.conf` of the package; every command gets it).
    pub node_config: PathBuf,
    /// A node's certificates, keys and CA (default `/etc/pgkeep/tls`).
    pub node_tls: PathBuf,
    /// PostgreSQL's data directory on the nodes (default `/var/lib/postgresql/15/main`,
    /// Debian's `pg_createcluster 15 main`).
    pub data_dir: PathBuf,
    /// PostgreSQL's Unix socket directory on the nodes (default `/var/run/postgresql`,
    /// Debian's `unix_socket_directories`).
    pub socket_dir: PathBuf,
    /// A node's `spool-path` (default `/var/spool/pgbackrest`, pgBackRest's default).
    pub spool: PathBuf,
    /// `log-path` on every host (default `/var/log/pgbackrest`, pgBackRest's default; Debian's
    /// logrotate rule covers it).
    pub log: PathBuf,
    /// `lock-path` on every host (default `/tmp/pgbackrest`, pgBackRest's default: locks do not
    /// survive a reboot).
    pub lock: PathBuf,
    /// The pgBackRest binary in `archive_command`/`restore_command` (default
    /// `/usr/bin/pgbackrest`).
    pub pgbackrest: PathBuf,
}

impl Default for DeployPaths {
    fn default() -> Self {
        DeployPaths {
            repo_config: "/etc/pgbackrest".into(),
            repo_path: "/var/lib/pgbackrest".into(),
            repo_tls: "/etc/pgbackrest/tls".into(),
            node_config: "/etc/pgkeep/pgbackrest".into(),
            node_tls: "/etc/pgkeep/tls".into(),
            data_dir: "/var/lib/postgresql/15/main".into(),
            socket_dir: "/var/run/postgresql".into(),
            spool: "/var/spool/pgbackrest".into(),
            log: "/var/log/pgbackrest".into(),
            lock: "/tmp/pgbackrest".into(),
            pgbackrest: "/usr/bin/pgbackrest".into(),
        }
    }
}

impl DeployPaths {
    /// The repository host's `pgbackrest.conf`.
    pub fn repo_config_file(&self) -> PathBuf {
        self.repo_config.join("pgbackrest.conf")
    }

    /// The repository host's include file with the passphrase (`conf.d/cipher.conf`).
    pub fn cipher_file(&self) -> PathBuf {
        self.repo_config.join("conf.d").join("cipher.conf")
    }

    /// A node's `pgbackrest.conf`.
    pub fn node_config_file(&self) -> PathBuf {
        self.node_config.join("pgbackrest.conf")
    }

    fn repo_paths(&self) -> Paths {
        Paths {
            log: self.log.clone(),
            lock: self.lock.clone(),
            spool: self.spool.clone(),
        }
    }
}

/// Why the plans cannot be made from an inventory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// The inventory has no `backup_host`.
    #[error(
        "the inventory has no backup_host: pgBackRest needs a repository host \
         (backup_host: {{name: ..., address: ..., port: ...}})"
    )]
    NoBackupHost,
    /// A database node has no `pgbackrest_port`.
    #[error(
        "database_hosts[{index}].pgbackrest_port: missing for node {name}; with a backup host \
         every database node runs a pgbackrest server and the inventory must give its port"
    )]
    MissingPort {
        /// Position of the node in `database_hosts`.
        index: usize,
        /// The node's name.
        name: String,
    },
    /// The pgBackRest renderer refused a value.
    #[error(transparent)]
    Render(#[from] PgBackRestError),
}

/// The inventory's repository host.
pub fn backup_host(inv: &Inventory) -> Result<&BackupHost, DeployError> {
    inv.backup_host.as_ref().ok_or(DeployError::NoBackupHost)
}

/// The files of `host`'s `service` certificate in `dir`, with the CA beside them.
fn tls_files(dir: &Path, service: Service, host: &str) -> TlsFiles {
    let base = format!("{service}-{host}");
    TlsFiles {
        cert: dir.join(format!("{base}.crt")),
        key: dir.join(format!("{base}.key")),
        ca: dir.join(CA_CERT_FILE),
    }
}

/// The common name of `host`'s pgBackRest client certificate.
pub fn client_cn(host: &str) -> String {
    format!("{}-{host}", Service::PgBackRestClient)
}

/// Node `index`'s `pgbackrest server` port.
fn node_port(index: usize, h: &DbHost) -> Result<u16, DeployError> {
    h.pgbackrest_port.ok_or_else(|| DeployError::MissingPort {
        index,
        name: h.name.clone(),
    })
}

/// A node as the plans see it (the repository host's `pg<k>` and the node's own `pg1`).
fn pg_node(
    inv: &Inventory,
    paths: &DeployPaths,
    index: usize,
    h: &DbHost,
) -> Result<PgNode, DeployError> {
    Ok(PgNode {
        host: inv.fqdn(&h.name),
        tls_port: node_port(index, h)?,
        data_dir: paths.data_dir.clone(),
        pg_port: h.pg_port,
        socket_dir: paths.socket_dir.clone(),
        config_path: paths.node_config.clone(),
    })
}

/// The repository host's plan: its server lets in every node's client certificate, and it
/// reaches every node's server with its own client certificate.
pub fn repo_plan(inv: &Inventory, paths: &DeployPaths) -> Result<RepoPlan, DeployError> {
    let b = backup_host(inv)?;
    let nodes = inv
        .database_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| pg_node(inv, paths, i, h))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RepoPlan {
        stanza: inv.cluster.clone(),
        repo_path: paths.repo_path.clone(),
        paths: paths.repo_paths(),
        server: Server {
            address: b.address.to_string(),
            port: b.port,
            tls: tls_files(&paths.repo_tls, Service::PgBackRest, &b.name),
            clients: inv
                .database_hosts
                .iter()
                .map(|h| client_cn(&h.name))
                .collect(),
        },
        client: tls_files(&paths.repo_tls, Service::PgBackRestClient, &b.name),
        nodes,
        process_max: REPO_PROCESS_MAX,
        backup_standby: true,
        retention: Retention::default(),
        timeouts: Timeouts::default(),
    })
}

/// The plan of node `index` of `database_hosts`: its server lets in only the repository
/// host's client certificate.
pub fn node_plan(
    inv: &Inventory,
    paths: &DeployPaths,
    index: usize,
) -> Result<NodePlan, DeployError> {
    let b = backup_host(inv)?;
    let Some(h) = inv.database_hosts.get(index) else {
        return Err(PgBackRestError {
            what: format!("database_hosts[{index}]"),
            reason: "no such database host".into(),
        }
        .into());
    };
    let pg = pg_node(inv, paths, index, h)?;
    Ok(NodePlan {
        stanza: inv.cluster.clone(),
        paths: paths.repo_paths(),
        server: Server {
            address: h.address.to_string(),
            port: pg.tls_port,
            tls: tls_files(&paths.node_tls, Service::PgBackRest, &h.name),
            clients: vec![client_cn(&b.name)],
        },
        pg,
        repo_host: inv.fqdn(&b.name),
        repo_port: b.port,
        repo_config_path: paths.repo_config.clone(),
        client: tls_files(&paths.node_tls, Service::PgBackRestClient, &h.name),
        process_max: NODE_PROCESS_MAX,
        archive_queue_max_mib: ARCHIVE_QUEUE_MAX_MIB,
        timeouts: Timeouts::default(),
    })
}

/// Every node's plan, in the inventory's order.
pub fn node_plans(inv: &Inventory, paths: &DeployPaths) -> Result<Vec<NodePlan>, DeployError> {
    (0..inv.database_hosts.len())
        .map(|i| node_plan(inv, paths, i))
        .collect()
}

/// A node's `archive_command` and `restore_command` (the same on every node).
pub fn wal_commands(inv: &Inventory, paths: &DeployPaths) -> Result<(String, String), DeployError> {
    Ok(super::wal_commands(
        &paths.pgbackrest,
        &paths.node_config,
        &inv.cluster,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgbackrest::{render_node, render_repo};

    fn inventory() -> Inventory {
        let mut inv = crate::inventory::test_inventory();
        for (i, h) in inv.database_hosts.iter_mut().enumerate() {
            h.address = format!("10.0.0.1{}", i + 1).parse().unwrap();
            h.pgbackrest_port = Some(8432);
        }
        inv.backup_host = Some(BackupHost {
            name: "backup".into(),
            address: "10.0.0.31".parse().unwrap(),
            port: 8432,
        });
        inv
    }

    #[test]
    fn repo_plan_lets_in_every_node_and_names_hosts_by_fqdn() {
        let inv = inventory();
        let p = repo_plan(&inv, &DeployPaths::default()).unwrap();
        assert_eq!(
            p.server.clients,
            [
                "pgbackrest-client-node1",
                "pgbackrest-client-node2",
                "pgbackrest-client-node3"
            ]
        );
        assert_eq!(p.server.address, "10.0.0.31");
        let hosts: Vec<&str> = p.nodes.iter().map(|n| n.host.as_str()).collect();
        assert_eq!(
            hosts,
            [
                "node1.demo.internal",
                "node2.demo.internal",
                "node3.demo.internal"
            ]
        );
        assert_eq!(
            p.server.tls.cert,
            Path::new("/etc/pgbackrest/tls/pgbackrest-backup.crt")
        );
        assert_eq!(
            p.client.key,
            Path::new("/etc/pgbackrest/tls/pgbackrest-client-backup.key")
        );
        assert_eq!(p.client.ca, Path::new("/etc/pgbackrest/tls/ca.crt"));
        assert_eq!(p.nodes[1].pg_port, 25432);
        assert_eq!(p.nodes[0].config_path, Path::new("/etc/pgkeep/pgbackrest"));
    }

    #[test]
    fn node_servers_let_in_only_the_backup_host() {
        let inv = inventory();
        let plans = node_plans(&inv, &DeployPaths::default()).unwrap();
        assert_eq!(plans.len(), 3);
        for (i, p) in plans.iter().enumerate() {
            let n = i + 1;
            assert_eq!(p.server.clients, ["pgbackrest-client-backup"]);
            assert_eq!(p.server.address, format!("10.0.0.1{n}"));
            assert_eq!(p.repo_host, "backup.demo.internal");
            assert_eq!(p.pg.host, format!("node{n}.demo.internal"));
            assert_eq!(p.pg.pg_port, inv.database_hosts[i].pg_port);
            assert_eq!(p.repo_config_path, Path::new("/etc/pgbackrest"));
            assert_eq!(
                p.client.cert,
                PathBuf::from(format!("/etc/pgkeep/tls/pgbackrest-client-node{n}.crt"))
            );
            assert_eq!(
                p.server.tls.key,
                PathBuf::from(format!("/etc/pgkeep/tls/pgbackrest-node{n}.key"))
            );
        }
    }

    #[test]
    fn a_missing_pgbackrest_port_names_the_key() {
        let mut inv = inventory();
        inv.database_hosts[1].pgbackrest_port = None;
        let e = repo_plan(&inv, &DeployPaths::default()).unwrap_err();
        assert_eq!(
            e,
            DeployError::MissingPort {
                index: 1,
                name: "node2".into()
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("database_hosts[1].pgbackrest_port") && text.contains("node2"),
            "{text}"
        );
        let e = node_plan(&inv, &DeployPaths::default(), 1).unwrap_err();
        assert!(e.to_string().contains("database_hosts[1].pgbackrest_port"));
        node_plan(&inv, &DeployPaths::default(), 0).unwrap();
    }

    #[test]
    fn no_backup_host_is_an_error() {
        let mut inv = inventory();
        inv.backup_host = None;
        let e = repo_plan(&inv, &DeployPaths::default()).unwrap_err();
        assert_eq!(e, DeployError::NoBackupHost);
        assert!(e.to_string().contains("backup_host"));
        assert_eq!(
            node_plans(&inv, &DeployPaths::default()).unwrap_err(),
            DeployError::NoBackupHost
        );
    }

    #[test]
    fn plans_render() {
        let inv = inventory();
        let paths = DeployPaths::default();
        let repo = render_repo(&repo_plan(&inv, &paths).unwrap()).unwrap();
        for want in [
            "repo1-path=/var/lib/pgbackrest\n",
            "tls-server-address=10.0.0.31\n",
            "tls-server-auth=pgbackrest-client-node3=demo\n",
            "pg2-host=node2.demo.internal\n",
            "pg2-path=/var/lib/postgresql/15/main\n",
            "pg3-socket-path=/var/run/postgresql\n",
            "pg1-host-config-path=/etc/pgkeep/pgbackrest\n",
            "log-path=/var/log/pgbackrest\n",
            "lock-path=/tmp/pgbackrest\n",
        ] {
            assert!(repo.contains(want), "{want:?} missing:\n{repo}");
        }
        assert!(!repo.contains("cipher-pass"), "{repo}");
        for p in node_plans(&inv, &paths).unwrap() {
            let text = render_node(&p).unwrap();
            for want in [
                "repo1-host=backup.demo.internal\n",
                "repo1-host-config-path=/etc/pgbackrest\n",
                "spool-path=/var/spool/pgbackrest\n",
                "tls-server-auth=pgbackrest-client-backup=demo\n",
                "archive-push-queue-max=4096MiB\n",
            ] {
                assert!(text.contains(want), "{want:?} missing:\n{text}");
            }
            assert!(!text.contains("cipher"), "{text}");
            assert_eq!(text.matches("tls-server-auth=").count(), 1, "{text}");
        }
        let (archive, restore) = wal_commands(&inv, &paths).unwrap();
        assert_eq!(
            archive,
            "/usr/bin/pgbackrest --config-path=/etc/pgkeep/pgbackrest --stanza=demo archive-push %p"
        );
        assert!(restore.ends_with("archive-get %f \"%p\""), "{restore}");
    }

    #[test]
    fn relative_paths_are_refused_by_the_renderer() {
        let inv = inventory();
        let paths = DeployPaths {
            data_dir: "pgdata".into(),
            ..DeployPaths::default()
        };
        let e = render_repo(&repo_plan(&inv, &paths).unwrap()).unwrap_err();
        assert_eq!(e.what, "pg1-path");
    }
}
