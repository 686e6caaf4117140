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

/// The operator's etcd client certificate (CN `pgkeep-operator`).
pub fn operator_etcd(layout: &Layout) -> Pair {
    pair(&layout.pki(), Service::EtcdClient, "operator")
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

/// Issues `service`/`name` into `dir` unless both files exist; makes them owned by `owner`.
fn ensure(
    ca: &Ca,
    dir: &Path,
    service: Service,
    name: &str,
    sans: (Vec<String>, Vec<IpAddr>),
    owner: Option<&ServiceUser>,
) -> Result<Pair> {
    let p = pair(dir, service, name);
    if !(p.cert.exists() && p.key.exists()) {
        let req = ServiceCert {
            service,
            name: name.to_owned(),
            role: None,
            dns_names: sans.0,
            ip_addresses: sans.1,
            validity_days: DEFAULT_LEAF_DAYS,
        }
        .request()?;
        ca.issue(&req)
            .and_then(|i| i.write(dir, &format!("{service}-{name}")))
            .with_context(|| format!("issuing the {service} certificate for {name}"))?;
    }
    if let Some(u) = owner {
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

/// Issues every certificate of the environment that does not exist yet (HAProxy's only when
/// its user is given).
pub fn issue_all(
    layout: &Layout,
    inv: &Inventory,
    postgres: &ServiceUser,
    etcd: &ServiceUser,
    haproxy: Option<&ServiceUser>,
) -> Result<()> {
    let ca = ca(layout, inv)?;
    let none = || (Vec::new(), Vec::new());
    let lb = inv.load_balancer.as_ref().map(|l| inv.fqdn(&l.name));
    for h in &inv.database_hosts {
        let dir = node_tls(layout, &h.name);
        super::files::dir(&dir, 0o700, Some(postgres))?;
        let fqdn = inv.fqdn(&h.name);
        let mut pg_names = vec![fqdn.clone()];
        pg_names.extend(lb.clone());
        let own = Some(postgres);
        ensure(
            &ca,
            &dir,
            Service::Postgres,
            &h.name,
            (pg_names, vec![h.address]),
            own,
        )?;
        ensure(
            &ca,
            &dir,
            Service::RestApi,
            &h.name,
            (vec![fqdn], vec![h.address]),
            own,
        )?;
        for svc in [
            Service::RestApiClient,
            Service::EtcdClient,
            Service::Replication,
            Service::Rewind,
        ] {
            ensure(&ca, &dir, svc, &h.name, none(), own)?;
        }
    }
    for m in &inv.etcd_hosts {
        let dir = etcd_tls(layout, &m.name);
        super::files::dir(&dir, 0o700, Some(etcd))?;
        let sans = (vec![inv.fqdn(&m.name)], vec![m.address]);
        ensure(&ca, &dir, Service::EtcdServer, &m.name, sans, Some(etcd))?;
    }
    if let (Some(user), Some(lb)) = (haproxy, &inv.load_balancer) {
        // root:haproxy 0750: HAProxy reads its files here and cannot change the directory.
        let owner = ServiceUser {
            name: "root".into(),
            uid: 0,
            gid: user.gid,
        };
        super::files::dir(&layout.haproxy_dir(), 0o750, Some(&owner))?;
        ensure(
            &ca,
            &layout.haproxy_dir(),
            Service::HaProxy,
            &lb.name,
            none(),
            Some(user),
        )?;
    }
    ensure(
        &ca,
        &layout.pki(),
        Service::Operator,
        OPERATOR_NAME,
        none(),
        None,
    )?;
    ensure(
        &ca,
        &layout.pki(),
        Service::EtcdClient,
        "operator",
        none(),
        None,
    )?;
    Ok(())
}
