//! The environment's etcd members: how each is started and how its health is checked.
//!
//! Each member runs as `etcd` with the flags of [`crate::etcdconf::member_args`]: client and peer
//! TLS, client-certificate authentication on both, the environment's CA as the only trust anchor,
//! `--pre-vote`, periodic compaction, an explicit backend quota, the v2 API off and the JSON
//! gateway on. On loopback every connection's source address is 127.0.0.1 whatever address the
//! dialing member uses, so etcd's check of a peer certificate's SANs against the source address
//! cannot pass: `--experimental-peer-skip-client-san-verification` turns off that one check (the
//! chain is still verified; servers are still checked by name). Users, roles and authentication:
//! [`super::etcd_access`].

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::certs::{self, etcd_tls, operator_etcd};
use super::spawn::{Identity, Spec};
use super::{ETCD_BIN, Layout, ServiceUser, s};
use crate::dcs::Dcs;
use crate::dcs::{EtcdDcs, EtcdSettings, TlsFiles};
use crate::etcdconf::{MemberFiles, MemberOptions};
use crate::inventory::{EtcdHost, Inventory};
use crate::pki::Service;

/// How `down` and `up` recognise member `m`'s process.
pub fn identity(layout: &Layout, m: &str) -> Identity {
    Identity {
        program: "etcd".into(),
        marker: s(&layout.etcd_data(m)),
    }
}

/// Member `m`'s files in the environment.
pub fn member_files(layout: &Layout, m: &str) -> MemberFiles {
    let cert = certs::pair(&etcd_tls(layout, m), Service::EtcdServer, m);
    MemberFiles {
        data_dir: layout.etcd_data(m),
        cert: cert.cert,
        key: cert.key,
        ca: layout.ca_cert(),
    }
}

/// Member `m`'s flags ([`crate::etcdconf::member_args`] on loopback; a member of another
/// environment cannot join: the cluster token names this directory).
pub fn member_args(layout: &Layout, inv: &Inventory, m: &EtcdHost) -> Vec<String> {
    let opts = MemberOptions {
        cluster_token: format!("pgkeep-{}-{}", inv.cluster, layout.hash()),
        loopback: true,
    };
    crate::etcdconf::member_args(inv, m, &member_files(layout, &m.name), &opts)
}

/// The start specification of member `m`.
pub fn spec(layout: &Layout, inv: &Inventory, m: &EtcdHost, user: &ServiceUser) -> Spec {
    Spec {
        name: m.name.clone(),
        user: user.clone(),
        program: ETCD_BIN.into(),
        args: member_args(layout, inv, m)
            .into_iter()
            .map(OsString::from)
            .collect(),
        home: layout.etcd_dir(&m.name),
        log: layout.etcd_log(&m.name),
        pid_file: layout.etcd_pid(&m.name),
        identity: identity(layout, &m.name),
        listens: vec![
            (m.address, m.client_port).into(),
            (m.address, m.peer_port).into(),
        ],
    }
}

/// etcd settings with the operator's client certificate for `endpoints` (`host:port`).
pub fn operator_settings(layout: &Layout, inv: &Inventory, endpoints: Vec<String>) -> EtcdSettings {
    settings_with(layout, inv, endpoints, operator_etcd(layout))
}

/// etcd settings with etcd's root certificate ([`certs::etcd_root`]), for user and role
/// management only.
pub fn root_settings(layout: &Layout, inv: &Inventory) -> EtcdSettings {
    settings_with(layout, inv, inv.etcd_endpoints(), certs::etcd_root(layout))
}

fn settings_with(
    layout: &Layout,
    inv: &Inventory,
    endpoints: Vec<String>,
    op: certs::Pair,
) -> EtcdSettings {
    EtcdSettings {
        endpoints: endpoints
            .into_iter()
            .map(|e| format!("https://{e}"))
            .collect(),
        tls: Some(TlsFiles {
            ca: layout.ca_cert(),
            cert: op.cert,
            key: op.key,
        }),
        namespace: inv.namespace.clone(),
        scope: inv.cluster.clone(),
        request_timeout: Duration::from_secs(3),
        insecure: false,
    }
}

/// Member `m` answers a linearizable read (it is up, reachable over mutual TLS, and part of a
/// cluster with a leader). The error says why not.
pub async fn member_health(layout: &Layout, inv: &Inventory, m: &EtcdHost) -> Result<()> {
    let endpoint = format!("{}:{}", inv.fqdn(&m.name), m.client_port);
    let dcs = EtcdDcs::connect(&operator_settings(layout, inv, vec![endpoint])).await?;
    dcs.load().await?;
    Ok(())
}

/// Waits until every member is healthy, at most `timeout`; a member whose process exited fails
/// the wait at once with the end of its log.
pub async fn wait_healthy(layout: &Layout, inv: &Inventory, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut unhealthy = Vec::new();
        for m in &inv.etcd_hosts {
            let id = identity(layout, &m.name);
            if super::spawn::running(&layout.etcd_pid(&m.name), &id).is_none() {
                let log = layout.etcd_log(&m.name);
                bail!(
                    "etcd member {} is not running; see {}:\n{}",
                    m.name,
                    log.display(),
                    super::spawn::log_tail(&log, 15)
                );
            }
            if let Err(e) = member_health(layout, inv, m).await {
                unhealthy.push(format!("{}: {e:#}", m.name));
            }
        }
        if unhealthy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "etcd is not healthy after {timeout:?}: {}; see the logs in {}",
                unhealthy.join("; "),
                layout.logs().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
