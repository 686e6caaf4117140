//! The environment's etcd members: how each is started and how its health is checked.
//!
//! Each member runs as `etcd` with client and peer TLS, client-certificate authentication on
//! both, the environment's CA as the only trust anchor, `--pre-vote`, periodic compaction, an
//! explicit backend quota and the v2 API off. On loopback every connection's source address is
//! 127.0.0.1 whatever address the dialing member uses, so etcd's check of a peer certificate's
//! SANs against the source address cannot pass: `--experimental-peer-skip-client-san-verification`
//! turns off that one check (the chain is still verified; servers are still checked by name).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::certs::{self, etcd_tls, operator_etcd};
use super::spawn::{Identity, Spec};
use super::{ETCD_BIN, Layout, ServiceUser, s};
use crate::dcs::Dcs;
use crate::dcs::{EtcdDcs, EtcdSettings, TlsFiles};
use crate::inventory::{EtcdHost, Inventory};
use crate::pki::Service;

/// Backend quota: 256 MiB, explicit rather than etcd's default.
const QUOTA_BACKEND_BYTES: u64 = 256 * 1024 * 1024;

/// How `down` and `up` recognise member `m`'s process.
pub fn identity(layout: &Layout, m: &str) -> Identity {
    Identity {
        program: "etcd".into(),
        marker: s(&layout.etcd_data(m)),
    }
}

/// The start specification of member `m`.
pub fn spec(layout: &Layout, inv: &Inventory, m: &EtcdHost, user: &ServiceUser) -> Spec {
    let url = |port: u16| format!("https://{}:{port}", inv.fqdn(&m.name));
    let listen = |port: u16| format!("https://{}:{port}", m.address);
    let initial_cluster = inv
        .etcd_hosts
        .iter()
        .map(|e| format!("{}=https://{}:{}", e.name, inv.fqdn(&e.name), e.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    let cert = certs::pair(&etcd_tls(layout, &m.name), Service::EtcdServer, &m.name);
    let ca = s(&layout.ca_cert());
    let args: Vec<OsString> = [
        format!("--name={}", m.name),
        format!("--data-dir={}", s(&layout.etcd_data(&m.name))),
        format!("--listen-client-urls={}", listen(m.client_port)),
        format!("--advertise-client-urls={}", url(m.client_port)),
        format!("--listen-peer-urls={}", listen(m.peer_port)),
        format!("--initial-advertise-peer-urls={}", url(m.peer_port)),
        format!("--initial-cluster={initial_cluster}"),
        // Ignored once the member has data; a member of another environment cannot join.
        format!(
            "--initial-cluster-token=pgkeep-{}-{}",
            inv.cluster,
            layout.hash()
        ),
        "--initial-cluster-state=new".into(),
        "--client-cert-auth=true".into(),
        format!("--trusted-ca-file={ca}"),
        format!("--cert-file={}", s(&cert.cert)),
        format!("--key-file={}", s(&cert.key)),
        "--peer-client-cert-auth=true".into(),
        format!("--peer-trusted-ca-file={ca}"),
        format!("--peer-cert-file={}", s(&cert.cert)),
        format!("--peer-key-file={}", s(&cert.key)),
        "--experimental-peer-skip-client-san-verification=true".into(),
        "--pre-vote=true".into(),
        "--auto-compaction-mode=periodic".into(),
        "--auto-compaction-retention=1h".into(),
        format!("--quota-backend-bytes={QUOTA_BACKEND_BYTES}"),
        "--heartbeat-interval=100".into(),
        "--election-timeout=1000".into(),
        "--enable-v2=false".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    Spec {
        name: m.name.clone(),
        user: user.clone(),
        program: ETCD_BIN.into(),
        args,
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
    let op = operator_etcd(layout);
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
