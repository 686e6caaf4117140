//! `pgkeep render`: configuration for the components around the cluster, printed to stdout.
//!
//! ```text
//! pgkeep render haproxy --dir D                       # the local environment of `pgkeep up`
//! pgkeep render haproxy --inventory FILE [--ca-file F] [--client-cert PEM | --no-client-cert]
//!                       [--stats-socket PATH] [--state-file PATH] [--replica-lag SIZE]
//! pgkeep render etcd --dir D                          # the flags and users `up` uses
//! pgkeep render etcd --inventory FILE [--etc-dir DIR] [--data-dir DIR] [--operator NAME]...
//! pgkeep render pgbackrest --dir D [--host NAME]      # the files `up` writes
//! pgkeep render pgbackrest --inventory FILE [--host NAME] [--etc-dir DIR] [--data-dir DIR]
//!                          [--repo-path DIR]
//! ```
//!
//! Every target reads the same inventory (`D/inventory.yml`, the file `pgkeep up` writes, or a
//! hand-written one for real hosts); with `--dir` the paths are the environment's own.
//!
//! `render pgbackrest` prints one block per file, each after a line
//! `# ==== <host fqdn>: <path> ====`: the repository host's `pgbackrest.conf`, where its
//! passphrase file goes (the passphrase itself is never printed), every node's
//! `pgbackrest.conf`, then for every node the `archive_command` and `restore_command` of its
//! local pgkeep configuration. With `--inventory` the paths are a Debian installation's
//! ([`DeployPaths::default`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::etcdconf;
use crate::haproxy::{self, Files, Plan};
use crate::inventory::Inventory;
use crate::local::{Layout, backup};
use crate::pgbackrest::deploy::{self, DeployPaths};
use crate::pgbackrest::{NodePlan, RepoPlan, render_node, render_repo};

/// Where HAProxy's files live on a real load-balancer host by default.
const ETC_DIR: &str = "/etc/haproxy/pgkeep";

/// `pgkeep render ...`
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// What to render.
    #[command(subcommand)]
    pub target: RenderTarget,
}

/// The components `render` knows.
#[derive(Debug, Subcommand)]
pub enum RenderTarget {
    /// HAProxy: a write port (the primary) and a read port (healthy replicas), checking every
    /// node's REST API over verified TLS.
    Haproxy(HaproxyArgs),
    /// etcd: each member's flags (mutual TLS, client-certificate users, the JSON gateway on) and
    /// the access control (users, roles, authentication) as an idempotent etcdctl script.
    Etcd(EtcdArgs),
    /// pgBackRest: the repository host's and every database node's `pgbackrest.conf` (TLS both
    /// ways, named client certificates only), and each node's `archive_command` and
    /// `restore_command`. Never the repository's passphrase.
    #[command(name = "pgbackrest")]
    PgBackRest(PgBackRestArgs),
}

/// Which cluster: an inventory file, or a local environment directory.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// An inventory file (the format `pgkeep up` writes to D/inventory.yml).
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// A local environment directory (`pgkeep up --dir D`): its inventory and its file paths.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `pgkeep render haproxy`.
#[derive(Debug, Args)]
pub struct HaproxyArgs {
    #[command(flatten)]
    source: Source,
    /// The cluster CA the REST API certificates chain to [default with --inventory:
    /// /etc/haproxy/pgkeep/ca.crt].
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// HAProxy's client certificate and key in one PEM file, presented on every check (needed
    /// when the REST API has `verify_client: required`) [default with --inventory:
    /// /etc/haproxy/pgkeep/haproxy-<load balancer>.pem].
    #[arg(long, value_name = "PEM", conflicts_with = "no_client_cert")]
    client_cert: Option<PathBuf>,
    /// Present no client certificate on the checks.
    #[arg(long)]
    no_client_cert: bool,
    /// The stats socket (mode 0600) [default with --inventory: /run/haproxy/pgkeep-<cluster>.sock].
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
    /// The server-state file a reload starts from [default with --inventory:
    /// /var/lib/haproxy/pgkeep-<cluster>.state].
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    /// Most replay lag a replica may have and still take reads (bytes, or with kB, MB, GB).
    #[arg(long, value_name = "SIZE", default_value = "16MB", value_parser = parse_lag)]
    replica_lag: u64,
}

/// `pgkeep render etcd`.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    #[command(flatten)]
    source: Source,
    /// Where the CA, each member's etcd-server certificate and key, etcd's root certificate
    /// (etcd-root-admin.{crt,key}) and the password files are on the etcd hosts (with
    /// --inventory).
    #[arg(long, value_name = "DIR", default_value = ETCD_ETC_DIR, conflicts_with = "dir")]
    etc_dir: PathBuf,
    /// Each member's data directory (with --inventory) [default: /var/lib/etcd/pgkeep-<cluster>].
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    data_dir: Option<PathBuf>,
    /// An operator whose etcd-client certificate (CN pgkeep-<NAME>) reads and writes the
    /// cluster's keys (repeatable; with --inventory).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "operator",
        conflicts_with = "dir"
    )]
    operator: Vec<String>,
}

/// Where etcd's files for pgkeep live on a real etcd host by default.
const ETCD_ETC_DIR: &str = "/etc/etcd/pgkeep";

fn etcd_document(a: &EtcdArgs) -> Result<String> {
    let (inv, layout) = load(&a.source)?;
    if let Some(l) = &layout {
        return crate::local::etcd_access::document(l, &inv);
    }
    let etc = &a.etc_dir;
    let data = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/etcd/pgkeep-{}", inv.cluster)));
    let opts = etcdconf::MemberOptions {
        cluster_token: format!("pgkeep-{}", inv.cluster),
        loopback: inv.etcd_hosts.iter().all(|h| h.address.is_loopback()),
    };
    let members = inv
        .etcd_hosts
        .iter()
        .map(|m| {
            let base = format!("{}-{}", crate::pki::Service::EtcdServer, m.name);
            let files = etcdconf::MemberFiles {
                data_dir: data.clone(),
                cert: etc.join(format!("{base}.crt")),
                key: etc.join(format!("{base}.key")),
                ca: etc.join(crate::pki::CA_CERT_FILE),
            };
            (m, etcdconf::member_args(&inv, m, &files, &opts))
        })
        .collect();
    let plan = etcdconf::cluster_plan(&inv, &a.operator)?;
    let patronictl = crate::dcs::access::password_user(etcdconf::PATRONICTL, &inv.cluster);
    let root = format!("{}-admin", crate::pki::Service::EtcdRoot);
    Ok(etcdconf::render(&etcdconf::Document {
        inv: &inv,
        members,
        member_user: "etcd".into(),
        plan: &plan,
        files: etcdconf::AccessFiles {
            ca: etc.join(crate::pki::CA_CERT_FILE),
            root_cert: etc.join(format!("{root}.crt")),
            root_key: etc.join(format!("{root}.key")),
            password_files: std::collections::BTreeMap::from([(
                patronictl,
                etc.join("etcd-patronictl.pw"),
            )]),
        },
    }))
}

fn parse_lag(s: &str) -> Result<u64, String> {
    pgkeep_core::health::parse_size(s)
}

/// Runs `pgkeep render`.
pub fn run(args: RenderArgs) -> Result<()> {
    match args.target {
        RenderTarget::Haproxy(a) => {
            print!("{}", haproxy_config(&a)?);
            Ok(())
        }
        RenderTarget::Etcd(a) => {
            print!("{}", etcd_document(&a)?);
            Ok(())
        }
        RenderTarget::PgBackRest(a) => {
            print!("{}", pgbackrest_document(&a)?);
            Ok(())
        }
    }
}

/// The inventory and, for `--dir`, the environment's layout.
fn load(source: &Source) -> Result<(Inventory, Option<Layout>)> {
    match (&source.inventory, &source.dir) {
        (Some(file), _) => Ok((Inventory::load(file)?, None)),
        (None, Some(dir)) => {
            let layout = Layout::new(dir)?;
            let inv = Inventory::load(&layout.inventory()).with_context(|| {
                format!("{} holds no environment of `pgkeep up`", dir.display())
            })?;
            Ok((inv, Some(layout)))
        }
        (None, None) => anyhow::bail!("give --inventory FILE or --dir DIR"),
    }
}

/// `pgkeep render pgbackrest`.
#[derive(Debug, Args)]
pub struct PgBackRestArgs {
    #[command(flatten)]
    source: Source,
    /// Print only this host's files (its inventory name or its FQDN).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// pgBackRest's configuration directory on the database nodes, given to every pgBackRest
    /// command there as --config-path (with --inventory) [default: /etc/pgkeep/pgbackrest].
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    etc_dir: Option<PathBuf>,
    /// PostgreSQL's data directory on the database nodes (with --inventory)
    /// [default: /var/lib/postgresql/15/main].
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    data_dir: Option<PathBuf>,
    /// The repository on the repository host, repo1-path (with --inventory)
    /// [default: /var/lib/pgbackrest].
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    repo_path: Option<PathBuf>,
}

/// One database node's part of `render pgbackrest`.
struct NodeFiles {
    /// Inventory name.
    name: String,
    plan: NodePlan,
    /// The node's pgBackRest `--config-path`.
    config_path: PathBuf,
    /// `archive_command` and `restore_command`.
    wal: (String, String),
    /// Where the node's pgkeep configuration is (a description with --inventory).
    agent_config: String,
}

/// Everything `render pgbackrest` prints, before rendering.
struct BackRestFiles {
    /// The repository host's inventory name.
    backup: String,
    repo: RepoPlan,
    /// The repository host's pgBackRest `--config-path`.
    repo_config_path: PathBuf,
    /// What to say instead of the passphrase file's content.
    cipher_note: String,
    nodes: Vec<NodeFiles>,
}

/// One printed file (or comment block), on one host.
struct Part {
    host: String,
    fqdn: String,
    path: String,
    body: String,
}

/// The passphrase file on a real repository host: where and how, never its content.
const CIPHER_NOTE_DEPLOY: &str = "\
# Not printed: the repository's encryption passphrase, which never leaves the repository host.
# Create this file there only: owner pgbackrest, mode 0600, with a [global] section setting the
# passphrase option of repo1 (pgBackRest's \"Repository Cipher Passphrase\") to a random value,
# e.g. the output of `openssl rand -base64 48`. Never copy it to a database node, and keep a
# copy offline: without it no backup can be restored.
";

fn deploy_files(inv: &Inventory, a: &PgBackRestArgs) -> Result<BackRestFiles> {
    let mut paths = DeployPaths::default();
    if let Some(p) = &a.etc_dir {
        paths.node_config = p.clone();
    }
    if let Some(p) = &a.data_dir {
        paths.data_dir = p.clone();
    }
    if let Some(p) = &a.repo_path {
        paths.repo_path = p.clone();
    }
    let b = deploy::backup_host(inv)?;
    let wal = deploy::wal_commands(inv, &paths)?;
    let nodes = deploy::node_plans(inv, &paths)?
        .into_iter()
        .zip(&inv.database_hosts)
        .map(|(plan, h)| NodeFiles {
            name: h.name.clone(),
            plan,
            config_path: paths.node_config.clone(),
            wal: wal.clone(),
            agent_config: "its pgkeep configuration (pgkeep agent -c FILE)".into(),
        })
        .collect();
    Ok(BackRestFiles {
        backup: b.name.clone(),
        repo: deploy::repo_plan(inv, &paths)?,
        repo_config_path: paths.repo_config.clone(),
        cipher_note: CIPHER_NOTE_DEPLOY.into(),
        nodes,
    })
}

fn local_files(l: &Layout, inv: &Inventory) -> Result<BackRestFiles> {
    let b = deploy::backup_host(inv)?;
    let nodes = inv
        .database_hosts
        .iter()
        .map(|h| {
            Ok(NodeFiles {
                name: h.name.clone(),
                plan: backup::node_plan(l, inv, h, b)?,
                config_path: backup::node_config_path(l, &h.name),
                wal: backup::wal_commands(l, inv, &h.name)?,
                agent_config: l.node_config(&h.name).display().to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(BackRestFiles {
        backup: b.name.clone(),
        repo: backup::repo_plan(l, inv, b)?,
        repo_config_path: backup::repo_config_path(l),
        cipher_note: format!(
            "# Not printed: the repository's encryption passphrase. `pgkeep up` writes this file\n\
             # (owner pgbackrest, mode 0600) from {} (root, mode 0600).\n",
            backup::cipher_secret(l).display()
        ),
        nodes,
    })
}

/// A YAML single-quoted scalar.
fn yaml_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The comment block with what goes into a node's pgkeep configuration.
fn wal_block(stanza: &str, n: &NodeFiles) -> String {
    let (archive, restore) = &n.wal;
    format!(
        "# Merge into this node's pgkeep configuration (local: these commands are never taken\n\
         # from the DCS); archive_mode takes effect when PostgreSQL restarts.\n\
         # postgresql:\n\
         #   parameters:\n\
         #     archive_mode: 'on'\n\
         #     archive_command: {}\n\
         #     restore_command: {}\n\
         # pgkeep:\n\
         #   pgbackrest:\n\
         #     config_path: {}\n\
         #     stanza: {stanza}\n",
        yaml_quote(archive),
        yaml_quote(restore),
        n.config_path.display(),
    )
}

/// The printed files in order: the repository host's, every node's configuration, every
/// node's WAL commands.
fn parts(inv: &Inventory, f: &BackRestFiles) -> Result<Vec<Part>> {
    let on = |host: &str, path: String, body: String| Part {
        host: host.to_owned(),
        fqdn: inv.fqdn(host),
        path,
        body,
    };
    let mut v = vec![
        on(
            &f.backup,
            f.repo_config_path
                .join("pgbackrest.conf")
                .display()
                .to_string(),
            render_repo(&f.repo).context("the repository host's pgbackrest.conf")?,
        ),
        on(
            &f.backup,
            f.repo_config_path
                .join("conf.d/cipher.conf")
                .display()
                .to_string(),
            f.cipher_note.clone(),
        ),
    ];
    for n in &f.nodes {
        let text = render_node(&n.plan).with_context(|| format!("{}'s pgbackrest.conf", n.name))?;
        v.push(on(
            &n.name,
            n.config_path.join("pgbackrest.conf").display().to_string(),
            text,
        ));
    }
    for n in &f.nodes {
        v.push(on(
            &n.name,
            n.agent_config.clone(),
            wal_block(&f.repo.stanza, n),
        ));
    }
    Ok(v)
}

fn pgbackrest_document(a: &PgBackRestArgs) -> Result<String> {
    let (inv, layout) = load(&a.source)?;
    let files = match &layout {
        Some(l) => local_files(l, &inv),
        None => deploy_files(&inv, a),
    };
    let what = match (&a.source.inventory, &layout) {
        (_, Some(l)) => format!("the environment in {}", l.dir.display()),
        (Some(f), None) => f.display().to_string(),
        (None, None) => String::new(),
    };
    let files = files.with_context(|| format!("pgBackRest configuration for {what}"))?;
    let mut all = parts(&inv, &files)?;
    if let Some(h) = &a.host {
        all.retain(|p| &p.host == h || &p.fqdn == h);
        if all.is_empty() {
            let mut names = vec![files.backup.clone()];
            names.extend(files.nodes.iter().map(|n| n.name.clone()));
            anyhow::bail!(
                "--host {h}: not a pgBackRest host of the inventory (one of: {})",
                names.join(", ")
            );
        }
    }
    let mut out = String::new();
    for (i, p) in all.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("# ==== {}: {} ====\n{}", p.fqdn, p.path, p.body));
    }
    Ok(out)
}

fn haproxy_config(a: &HaproxyArgs) -> Result<String> {
    let (inv, layout) = load(&a.source)?;
    let lb = inv
        .load_balancer
        .as_ref()
        .context("the inventory has no load_balancer")?;
    let mut files = match &layout {
        Some(l) => crate::local::haproxy::files(l, lb),
        None => Files {
            ca_file: PathBuf::from(ETC_DIR).join("ca.crt"),
            client_cert: Some(PathBuf::from(ETC_DIR).join(format!("haproxy-{}.pem", lb.name))),
            stats_socket: PathBuf::from(format!("/run/haproxy/pgkeep-{}.sock", inv.cluster)),
            state_file: PathBuf::from(format!("/var/lib/haproxy/pgkeep-{}.state", inv.cluster)),
        },
    };
    if let Some(p) = &a.ca_file {
        files.ca_file = p.clone();
    }
    if let Some(p) = &a.client_cert {
        files.client_cert = Some(p.clone());
    }
    if a.no_client_cert {
        files.client_cert = None;
    }
    if let Some(p) = &a.stats_socket {
        files.stats_socket = p.clone();
    }
    if let Some(p) = &a.state_file {
        files.state_file = p.clone();
    }
    Ok(haproxy::render(&Plan::from_inventory(
        &inv,
        files,
        a.replica_lag,
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::haproxy::DEFAULT_REPLICA_LAG;

    #[test]
    fn default_lag_is_the_library_default() {
        assert_eq!(parse_lag("16MB"), Ok(DEFAULT_REPLICA_LAG));
    }

    fn backup_inventory() -> Inventory {
        let mut inv = crate::inventory::test_inventory();
        for (i, h) in inv.database_hosts.iter_mut().enumerate() {
            h.pgbackrest_port = Some(28451 + u16::try_from(i).unwrap());
        }
        inv.backup_host = Some(crate::inventory::BackupHost {
            name: "backup".into(),
            address: "127.42.5.31".parse().unwrap(),
            port: 28432,
        });
        inv
    }

    fn pgbackrest_args(source: Source, host: Option<&str>) -> PgBackRestArgs {
        PgBackRestArgs {
            source,
            host: host.map(str::to_owned),
            etc_dir: None,
            data_dir: None,
            repo_path: None,
        }
    }

    #[test]
    fn pgbackrest_for_a_real_deployment_never_prints_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("inventory.yml");
        backup_inventory().save(&file).unwrap();
        let source = || Source {
            inventory: Some(file.clone()),
            dir: None,
        };
        let text = pgbackrest_document(&pgbackrest_args(source(), None)).unwrap();
        assert!(!text.contains("cipher-pass"), "{text}");
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("# ====")).collect();
        assert_eq!(
            headers,
            [
                "# ==== backup.demo.internal: /etc/pgbackrest/pgbackrest.conf ====",
                "# ==== backup.demo.internal: /etc/pgbackrest/conf.d/cipher.conf ====",
                "# ==== node1.demo.internal: /etc/pgkeep/pgbackrest/pgbackrest.conf ====",
                "# ==== node2.demo.internal: /etc/pgkeep/pgbackrest/pgbackrest.conf ====",
                "# ==== node3.demo.internal: /etc/pgkeep/pgbackrest/pgbackrest.conf ====",
                "# ==== node1.demo.internal: its pgkeep configuration (pgkeep agent -c FILE) ====",
                "# ==== node2.demo.internal: its pgkeep configuration (pgkeep agent -c FILE) ====",
                "# ==== node3.demo.internal: its pgkeep configuration (pgkeep agent -c FILE) ====",
            ]
        );
        for want in [
            "openssl rand -base64 48",
            "#     archive_command: '/usr/bin/pgbackrest --config-path=/etc/pgkeep/pgbackrest \
             --stanza=demo archive-push %p'\n",
            "tls-server-auth=pgbackrest-client-node2=demo\n",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }

        let mut args = pgbackrest_args(source(), Some("node2.demo.internal"));
        args.etc_dir = Some("/etc/pgkeep/br".into());
        args.data_dir = Some("/srv/pg/main".into());
        let one = pgbackrest_document(&args).unwrap();
        assert_eq!(one.matches("# ====").count(), 2, "{one}");
        assert!(one.contains("pg1-path=/srv/pg/main\n"), "{one}");
        assert!(one.contains("--config-path=/etc/pgkeep/br "), "{one}");
        assert!(!one.contains("node1"), "{one}");
        let repo = pgbackrest_document(&pgbackrest_args(source(), Some("backup"))).unwrap();
        assert_eq!(repo.matches("# ====").count(), 2, "{repo}");
        let e = pgbackrest_document(&pgbackrest_args(source(), Some("lb"))).unwrap_err();
        assert!(
            format!("{e:#}").contains("backup, node1, node2, node3"),
            "{e:#}"
        );
    }

    #[test]
    fn pgbackrest_errors_name_the_inventory_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("inventory.yml");
        let mut inv = backup_inventory();
        inv.database_hosts[2].pgbackrest_port = None;
        inv.save(&file).unwrap();
        let source = || Source {
            inventory: Some(file.clone()),
            dir: None,
        };
        let e = pgbackrest_document(&pgbackrest_args(source(), None)).unwrap_err();
        assert!(
            format!("{e:#}").contains("database_hosts[2].pgbackrest_port"),
            "{e:#}"
        );
        inv.backup_host = None;
        inv.save(&file).unwrap();
        let e = pgbackrest_document(&pgbackrest_args(source(), None)).unwrap_err();
        assert!(format!("{e:#}").contains("no backup_host"), "{e:#}");
    }

    #[test]
    fn pgbackrest_for_a_local_environment_uses_its_paths() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path()).unwrap();
        backup_inventory().save(&layout.inventory()).unwrap();
        let source = Source {
            inventory: None,
            dir: Some(dir.path().to_owned()),
        };
        let text = pgbackrest_document(&pgbackrest_args(source, None)).unwrap();
        assert!(!text.contains("cipher-pass"), "{text}");
        let d = layout.dir.display();
        for want in [
            format!("# ==== backup.demo.internal: {d}/backup/conf/pgbackrest.conf ====\n"),
            format!(
                "# ==== node1.demo.internal: {d}/nodes/node1/pgbackrest/pgbackrest.conf ====\n"
            ),
            format!("# ==== node3.demo.internal: {d}/nodes/node3/node.yml ====\n"),
            format!("repo1-path={d}/backup/repo\n"),
            format!("{d}/secrets/pgbackrest-cipher.pw"),
        ] {
            assert!(text.contains(&want), "{want:?} missing:\n{text}");
        }
    }

    #[test]
    fn etcd_for_a_real_deployment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("inventory.yml");
        let mut inv = crate::inventory::test_inventory();
        inv.etcd_hosts[0].address = "10.0.0.21".parse().unwrap();
        inv.save(&file).unwrap();
        let args = EtcdArgs {
            source: Source {
                inventory: Some(file),
                dir: None,
            },
            etc_dir: PathBuf::from("/etc/etcd/pgkeep"),
            data_dir: None,
            operator: vec!["alice".into(), "bob".into()],
        };
        let text = etcd_document(&args).unwrap();
        for want in [
            "--data-dir=/var/lib/etcd/pgkeep-demo",
            "--cert-file=/etc/etcd/pgkeep/etcd-server-etcd1.crt",
            "--initial-cluster-token=pgkeep-demo",
            "export ETCDCTL_KEY=/etc/etcd/pgkeep/etcd-root-admin.key",
            "certificate_user pgkeep-alice\n",
            "certificate_user pgkeep-bob\n",
            "password_user patronictl@demo /etc/etcd/pgkeep/etcd-patronictl.pw\n",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        // Not loopback: the peer SAN check stays on.
        assert!(!text.contains("skip-client-san"), "{text}");
        assert!(!text.contains("pgkeep-operator"), "{text}");
    }
}
