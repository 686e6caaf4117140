//! The environment's PKI: a CA (created, or the organisation's) and one certificate per service
//! and host, each written where its user can read it. Existing certificates are kept, so `up`
//! is idempotent; a missing one is issued.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Layout, OPERATOR_NAME, ServiceUser};
use crate::inventory::Inventory;
use crate::pki::{Ca, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, IssuedFiles, Service, ServiceCert};

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate (PEM, 0644).
    pub cert: PathBuf,
    /// Key (PEM, 0600).
    pub key: PathBuf,
}

impl From<IssuedFiles> for Pair {
    fn from(f: IssuedFiles) -> Pair {
        Pair {
            cert: f.cert,
            key: f.key,
        }
    }
}

/// The files of one `service`/`name` certificate in `dir`.
pub fn pair(dir: &Path, service: Service, name: &str) -> Pair {
    let base = format!("{service}-{name}");
    Pair {
        cert: dir.join(format!("{base}.crt")),
        key: dir.join(format!("{base}.key")),
    }
}

/// `D/nodes/<n>/tls`.
pub fn node_tls(layout: &Layout, n: &str) -> PathBuf {
    layout.node_dir(n).join("tls")
}

/// `D/etcd/<m>/tls`.
pub fn etcd_tls(layout: &Layout, m: &str) -> PathBuf {
    layout.etcd_dir(m).join("tls")
}

/// The operator's REST API client certificate (`operator-admin`).
pub fn operator_rest(layout: &Layout) -> Pair {
    pair(&layout.pki(), Service::Operator, OPERATOR_NAME)
}

/// The name of the operator's etcd client certificate (CN `pgkeep-operator`).
pub const OPERATOR_ETCD_NAME: &str = "operator";

/// The operator's etcd client certificate (CN `pgkeep-operator`).
pub fn operator_etcd(layout: &Layout) -> Pair {
    pair(&layout.pki(), Service::EtcdClient, OPERATOR_ETCD_NAME)
}

/// etcd's administrator (CN `root`, `etcd-root-admin`): only `up` and `pgkeep etcd grant` use
/// it, to manage users and roles. Root-only, like the CA key beside it.
pub fn etcd_root(layout: &Layout) -> Pair {
    pair(&layout.pki(), Service::EtcdRoot, "admin")
}

/// `patronictl`'s TLS identity towards etcd's JSON gateway (`etcd-gateway-patronictl`, no
/// common name): it names no etcd user; `patronictl` logs in with its password.
pub fn etcd_gateway(layout: &Layout) -> Pair {
    pair(&layout.pki(), Service::EtcdGateway, "patronictl")
}

/// Common names allowed to call the agents' protected REST endpoints.
pub fn allowed_client_names(inv: &Inventory) -> Vec<String> {
    let mut v = vec![format!("operator-{OPERATOR_NAME}")];
    v.extend(
        inv.database_hosts
            .iter()
            .map(|h| format!("restapi-client-{}", h.name)),
    );
    v
}

/// The CA: loaded from `D/pki` when present, else created (or adopted from the inventory's
/// organisation CA) and written there. `D/pki/ca.crt` is what every peer trusts.
pub fn ca(layout: &Layout, inv: &Inventory) -> Result<Ca> {
    let cert = layout.ca_cert();
    let key = layout.pki().join(crate::pki::CA_KEY_FILE);
    if let Some(org) = &inv.organisation_ca {
        let ca = Ca::load(&org.cert, &org.key).context("loading the organisation CA")?;
        if !cert.exists() {
            ca.write_cert(&cert)?;
        }
        return Ok(ca);
    }
    if cert.exists() && key.exists() {
        return Ca::load(&cert, &key)
            .with_context(|| format!("loading the CA in {}", layout.pki().display()));
    }
    let ca = Ca::create(&format!("pgkeep {} CA", inv.cluster), DEFAULT_CA_DAYS)
        .context("creating the CA")?;
    ca.write(&layout.pki()).context("writing the CA")?;
    Ok(ca)
}

/// Issues `t` unless both of its files exist; makes them owned by its owner.
fn ensure(ca: &Ca, t: &Target) -> Result<Pair> {
    let p = t.pair();
    if !(p.cert.exists() && p.key.exists()) {
        let req = t.request(DEFAULT_LEAF_DAYS)?;
        ca.issue(&req)
            .and_then(|i| i.write(&t.dir, &format!("{}-{}", t.service, t.name)))
            .with_context(|| format!("issuing the {} certificate for {}", t.service, t.name))?;
    }
    if let Some(u) = &t.owner {
        u.chown(&p.cert)?;
        u.chown(&p.key)?;
    }
    Ok(p)
}

/// HAProxy's client certificate for its checks (`haproxy-<lb>`, CN `haproxy-<lb>`), in
/// `D/haproxy`.
pub fn haproxy_client(layout: &Layout, lb: &str) -> Pair {
    pair(&layout.haproxy_dir(), Service::HaProxy, lb)
}

/// One certificate of the environment: its profile, where it lives and who owns it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The service (fixes usage and common name).
    pub service: Service,
    /// Node, member, load balancer or operator name.
    pub name: String,
    /// The directory of `<service>-<name>.{crt,key}`.
    pub dir: PathBuf,
    /// Host names and addresses (server certificates).
    pub sans: (Vec<String>, Vec<IpAddr>),
    /// The owner of both files (`None`: root).
    pub owner: Option<ServiceUser>,
}

impl Target {
    /// The certificate and key files.
    pub fn pair(&self) -> Pair {
        pair(&self.dir, self.service, &self.name)
    }

    /// The request these rules give, valid for `days`.
    pub fn request(&self, days: u32) -> Result<crate::pki::CertRequest> {
        Ok(ServiceCert {
            service: self.service,
            name: self.name.clone(),
            role: None,
            dns_names: self.sans.0.clone(),
            ip_addresses: self.sans.1.clone(),
            validity_days: days,
        }
        .request()?)
    }
}

/// Every certificate of the environment (HAProxy's and pgBackRest's only when their users are
/// given): per node its PostgreSQL, REST API and pgBackRest server certificates and its REST
/// API, etcd, replication, rewind and pgBackRest client certificates; per etcd member its
/// server/peer certificate; HAProxy's client certificate; the repository host's pgBackRest
/// server and client certificates; the operator's REST API and etcd client certificates, etcd's
/// root certificate and patronictl's gateway certificate.
pub fn targets(
    layout: &Layout,
    inv: &Inventory,
    postgres: &ServiceUser,
    etcd: &ServiceUser,
    haproxy: Option<&ServiceUser>,
    pgbackrest: Option<&ServiceUser>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let none = || (Vec::new(), Vec::new());
    let lb = inv.load_balancer.as_ref().map(|l| inv.fqdn(&l.name));
    for h in &inv.database_hosts {
        let dir = node_tls(layout, &h.name);
        let fqdn = inv.fqdn(&h.name);
        let mut pg_names = vec![fqdn.clone()];
        pg_names.extend(lb.clone());
        let target = |service, sans| Target {
            service,
            name: h.name.clone(),
            dir: dir.clone(),
            sans,
            owner: Some(postgres.clone()),
        };
        out.push(target(Service::Postgres, (pg_names, vec![h.address])));
        out.push(target(
            Service::RestApi,
            (vec![fqdn.clone()], vec![h.address]),
        ));
        if pgbackrest.is_some() && inv.backup_host.is_some() {
            out.push(target(Service::PgBackRest, (vec![fqdn], vec![h.address])));
            out.push(target(Service::PgBackRestClient, none()));
        }
        for svc in [
            Service::RestApiClient,
            Service::EtcdClient,
            Service::Replication,
            Service::Rewind,
        ] {
            out.push(target(svc, none()));
        }
    }
    for m in &inv.etcd_hosts {
        out.push(Target {
            service: Service::EtcdServer,
            name: m.name.clone(),
            dir: etcd_tls(layout, &m.name),
            sans: (vec![inv.fqdn(&m.name)], vec![m.address]),
            owner: Some(etcd.clone()),
        });
    }
    if let (Some(user), Some(lb)) = (haproxy, &inv.load_balancer) {
        out.push(Target {
            service: Service::HaProxy,
            name: lb.name.clone(),
            dir: layout.haproxy_dir(),
            sans: none(),
            owner: Some(user.clone()),
        });
    }
    if let (Some(user), Some(b)) = (pgbackrest, &inv.backup_host) {
        let dir = super::backup::backup_dir(layout).join("tls");
        for (service, sans) in [
            (
                Service::PgBackRest,
                (vec![inv.fqdn(&b.name)], vec![b.address]),
            ),
            (Service::PgBackRestClient, none()),
            // The backup scheduler's read-only etcd identity (CN pgkeep-<backup host>).
            (Service::EtcdClient, none()),
        ] {
            out.push(Target {
                service,
                name: b.name.clone(),
                dir: dir.clone(),
                sans,
                owner: Some(user.clone()),
            });
        }
    }
    for (service, name) in [
        (Service::Operator, OPERATOR_NAME),
        (Service::EtcdClient, OPERATOR_ETCD_NAME),
        (Service::EtcdRoot, "admin"),
        (Service::EtcdGateway, "patronictl"),
    ] {
        out.push(Target {
            service,
            name: name.to_owned(),
            dir: layout.pki(),
            sans: none(),
            owner: None,
        });
    }
    out
}

/// Issues every certificate of the environment that does not exist yet (HAProxy's and
/// pgBackRest's only when their users are given).
pub fn issue_all(
    layout: &Layout,
    inv: &Inventory,
    postgres: &ServiceUser,
    etcd: &ServiceUser,
    haproxy: Option<&ServiceUser>,
    pgbackrest: Option<&ServiceUser>,
) -> Result<()> {
    let ca = ca(layout, inv)?;
    for h in &inv.database_hosts {
        super::files::dir(&node_tls(layout, &h.name), 0o700, Some(postgres))?;
    }
    for m in &inv.etcd_hosts {
        super::files::dir(&etcd_tls(layout, &m.name), 0o700, Some(etcd))?;
    }
    if let (Some(user), Some(_)) = (haproxy, &inv.load_balancer) {
        // root:haproxy 0750: HAProxy reads its files here and cannot change the directory.
        let owner = ServiceUser {
            name: "root".into(),
            uid: 0,
            gid: user.gid,
        };
        super::files::dir(&layout.haproxy_dir(), 0o750, Some(&owner))?;
    }
    if let (Some(user), Some(_)) = (pgbackrest, &inv.backup_host) {
        let base = super::backup::backup_dir(layout);
        super::files::dir(&base, 0o750, Some(user))?;
        super::files::dir(&base.join("tls"), 0o700, Some(user))?;
    }
    for t in targets(layout, inv, postgres, etcd, haproxy, pgbackrest) {
        ensure(&ca, &t)?;
    }
    Ok(())
}
