//! `pgkeep render`: configuration for the components around the cluster, printed to stdout.
//!
//! ```text
//! pgkeep render haproxy --dir D                       # the local environment of `pgkeep up`
//! pgkeep render haproxy --inventory FILE [--ca-file F] [--client-cert PEM | --no-client-cert]
//!                       [--stats-socket PATH] [--state-file PATH] [--replica-lag SIZE]
//! pgkeep render etcd --dir D                          # the flags and users `up` uses
//! pgkeep render etcd --inventory FILE [--etc-dir DIR] [--data-dir DIR] [--operator NAME]...
//! ```
//!
//! Every target reads the same inventory (`D/inventory.yml`, the file `pgkeep up` writes, or a
//! hand-written one for real hosts); with `--dir` the paths are the environment's own.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::etcdconf;
use crate::haproxy::{self, Files, Plan};
use crate::inventory::Inventory;
use crate::local::Layout;

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
