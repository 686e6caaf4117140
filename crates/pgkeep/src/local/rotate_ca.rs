//! `pgkeep pki rotate --ca --dir D`: the environment's CA replaced by a new one, with no
//! failover and no PostgreSQL restart, in two commands with a period between them in which both
//! CAs are trusted.
//!
//! `--ca` (start):
//! 1. A new CA. `D/pki/ca.crt` becomes a bundle, the new CA first and the old one after it;
//!    `D/pki/ca.key` becomes the new CA's key (written beside it first, then renamed, so an
//!    interrupted run is completed by the next one).
//! 2. Every component trusts both: etcd reads its trusted CA file only when it starts, so each
//!    member is restarted, one at a time and the next only once the cluster is healthy again;
//!    agents get SIGHUP (their REST API, their client of the other members' APIs and their etcd
//!    client take the bundle; PostgreSQL reloads `ssl_ca_file`), replicas first; each
//!    `pgbackrest server` is restarted (it reads its CA when it starts); HAProxy reloads.
//! 3. Every certificate of the environment is issued again, by the new CA, and taken into use
//!    as `pgkeep pki rotate` does. Certificates of either CA are accepted meanwhile.
//!
//! Clients outside the environment that verify the cluster with a copy of the old CA need the
//! bundle before the old CA goes. Then `--ca --finish`: refused while any certificate of the
//! environment is still signed by the old CA; otherwise `ca.crt` holds the new CA only and the
//! components are told again, as in step 2. From then on a certificate of the old CA is refused
//! everywhere.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::certs::{self, Target};
use super::rotate::{
    RotateOptions, leader, load_balancer_name, restart_etcd, rotate, rotate_pgbackrest,
    wait_etcd_client,
};
use super::{Layout, ServiceUser, haproxy, spawn};
use crate::inventory::{DbHost, Inventory};
use crate::pki::{self, Ca, Service};

/// The directory the next CA is written to before its key takes the current one's place.
const NEXT_DIR: &str = "ca-next";

/// What a rollover works on: the environment and its service users.
struct Env {
    layout: Layout,
    inv: Inventory,
    pg: ServiceUser,
    etcd: ServiceUser,
    haproxy: Option<ServiceUser>,
    pgbackrest: Option<ServiceUser>,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn open(opts: &RotateOptions) -> Result<Env> {
        if !nix::unistd::geteuid().is_root() {
            bail!("pgkeep pki rotate --ca must run as root (it writes every service's files)");
        }
        let layout = Layout::new(&opts.dir)?;
        let inv = Inventory::load(&layout.inventory())
            .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
        if let Some(org) = &inv.organisation_ca {
            bail!(
                "this environment's certificates are signed by your organisation's CA ({}): roll \
                 that CA over with your PKI, point the inventory at the new one, then run \
                 `pgkeep pki rotate --dir {}`",
                org.cert.display(),
                layout.dir.display()
            );
        }
        let haproxy = if certs::haproxy_client(&layout, &load_balancer_name(&inv))
            .cert
            .exists()
        {
            Some(ServiceUser::haproxy()?)
        } else {
            None
        };
        let pgbackrest = match &inv.backup_host {
            Some(_) => Some(ServiceUser::lookup(super::backup::PGBACKREST_USER)?),
            None => None,
        };
        Ok(Env {
            pg: ServiceUser::postgres()?,
            etcd: ServiceUser::etcd()?,
            haproxy,
            pgbackrest,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?,
            layout,
            inv,
        })
    }

    fn targets(&self) -> Vec<Target> {
        certs::targets(
            &self.layout,
            &self.inv,
            &self.pg,
            &self.etcd,
            self.haproxy.as_ref(),
            self.pgbackrest.as_ref(),
        )
    }

    /// The CA certificates `ca.crt` holds, each as its own PEM block.
    fn trusted(&self) -> Result<Vec<String>> {
        let path = self.layout.ca_cert();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(pem_blocks(&text))
    }
}

/// Starts a CA rollover (see the module documentation).
pub fn start(opts: &RotateOptions) -> Result<()> {
    let env = Env::open(opts)?;
    let layout = &env.layout;
    println!("pgkeep pki rotate --ca: {}", layout.dir.display());
    complete_key_switch(layout)?;
    let trusted = env.trusted()?;
    if trusted.len() > 1 {
        bail!(
            "a CA rollover is already under way ({} holds {} CAs): end it with `pgkeep pki rotate \
             --ca --finish --dir {}` first",
            layout.ca_cert().display(),
            trusted.len(),
            layout.dir.display()
        );
    }
    let mut steps = super::up::Steps::new(3);
    steps.run("a new CA, trusted beside the old one", || {
        let old = certs::ca(layout, &env.inv)?;
        let stamp = time::OffsetDateTime::now_utc();
        let cn = format!(
            "pgkeep {} CA {:04}{:02}{:02}{:02}{:02}{:02}",
            env.inv.cluster,
            stamp.year(),
            u8::from(stamp.month()),
            stamp.day(),
            stamp.hour(),
            stamp.minute(),
            stamp.second()
        );
        let new = Ca::create(&cn, pki::DEFAULT_CA_DAYS).context("creating the new CA")?;
        let next = layout.pki().join(NEXT_DIR);
        new.write(&next).context("writing the new CA")?;
        let bundle = format!("{}{}", ensure_newline(new.cert_pem()), trusted[0]);
        crate::fsutil::write_atomic(&layout.ca_cert(), bundle.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", layout.ca_cert().display()))?;
        complete_key_switch(layout)?;
        println!(
            "      new CA {:?} (until {}); {} holds it and the old {:?}",
            new.common_name(),
            pki::format_time(new.not_after()),
            layout.ca_cert().display(),
            old.common_name()
        );
        Ok(())
    })?;
    steps.run("every component trusts both CAs", || {
        distribute_trust(&env, opts.timeout)
    })?;
    steps.run("every certificate issued again by the new CA", || {
        println!();
        rotate(&RotateOptions {
            dir: opts.dir.clone(),
            services: Vec::new(),
            days: opts.days,
            timeout: opts.timeout,
        })
    })?;
    println!();
    println!(
        "Both CAs are trusted. Give {} (it holds both) to every client that verifies the cluster \
         with the old CA, then end the rollover:\n  pgkeep pki rotate --ca --finish --dir {}",
        layout.ca_cert().display(),
        layout.dir.display()
    );
    Ok(())
}

/// Ends a CA rollover: only the new CA is trusted (see the module documentation).
pub fn finish(opts: &RotateOptions) -> Result<()> {
    let env = Env::open(opts)?;
    let layout = &env.layout;
    println!("pgkeep pki rotate --ca --finish: {}", layout.dir.display());
    complete_key_switch(layout)?;
    let trusted = env.trusted()?;
    if trusted.len() < 2 {
        bail!(
            "no CA rollover is under way ({} holds one CA); start one with `pgkeep pki rotate --ca`",
            layout.ca_cert().display()
        );
    }
    let mut steps = super::up::Steps::new(3);
    steps.run("every certificate is signed by the new CA", || {
        let ca = pki::inspect(&layout.ca_cert())?;
        let stale: Vec<String> = env
            .targets()
            .iter()
            .map(|t| t.pair().cert)
            .filter(|c| c.exists())
            .filter_map(|c| match pki::inspect(&c) {
                Ok(i) if i.issuer == ca.subject => None,
                Ok(i) => Some(format!("{} (issuer {})", c.display(), i.issuer)),
                Err(e) => Some(format!("{}: {e}", c.display())),
            })
            .collect();
        if !stale.is_empty() {
            bail!(
                "still signed by another CA than {:?}: {}; issue them again with `pgkeep pki \
                 rotate --dir {}`, then finish",
                ca.subject_cn,
                stale.join(", "),
                layout.dir.display()
            );
        }
        println!("      every certificate is signed by {:?}", ca.subject_cn);
        Ok(())
    })?;
    steps.run("the old CA removed from the trusted file", || {
        crate::fsutil::write_atomic(&layout.ca_cert(), trusted[0].as_bytes(), 0o644)
            .with_context(|| format!("writing {}", layout.ca_cert().display()))?;
        println!(
            "      {}: the new CA only ({} removed)",
            layout.ca_cert().display(),
            trusted.len() - 1
        );
        Ok(())
    })?;
    steps.run("every component trusts the new CA only", || {
        distribute_trust(&env, opts.timeout)
    })?;
    println!();
    println!("The CA rollover is complete: certificates of the old CA are refused everywhere.");
    Ok(())
}

/// The new CA's key takes the current one's place once `ca.crt` names the new CA first: after
/// an interruption between the two writes, the next run completes the switch.
fn complete_key_switch(layout: &Layout) -> Result<()> {
    let next = layout.pki().join(NEXT_DIR);
    let key = next.join(pki::CA_KEY_FILE);
    if !key.exists() {
        return Ok(());
    }
    if Ca::load(&layout.ca_cert(), &key).is_ok() {
        std::fs::rename(&key, layout.pki().join(pki::CA_KEY_FILE))
            .with_context(|| format!("moving {} into place", key.display()))?;
    }
    std::fs::remove_dir_all(&next).with_context(|| format!("removing {}", next.display()))
}

/// Every component re-reads `ca.crt`: etcd members restarted one at a time, agents reloaded
/// (replicas first), pgBackRest servers restarted, HAProxy reloaded.
fn distribute_trust(env: &Env, timeout: Duration) -> Result<()> {
    let (layout, inv) = (&env.layout, &env.inv);
    for m in &inv.etcd_hosts {
        let id = super::etcd::identity(layout, &m.name);
        if spawn::running(&layout.etcd_pid(&m.name), &id).is_none() {
            println!(
                "      etcd {}: not running; it reads the file when it starts",
                m.name
            );
            continue;
        }
        restart_etcd(layout, inv, m, &env.etcd, &env.rt)?;
        println!("      etcd {}: restarted, cluster healthy", m.name);
    }
    let leader = env.rt.block_on(leader(layout, inv))?;
    let mut order: Vec<&DbHost> = inv.database_hosts.iter().collect();
    order.sort_by_key(|h| Some(&h.name) == leader.as_ref());
    let targets = env.targets();
    let serial = |svc: Service, name: &str| {
        targets
            .iter()
            .find(|t| t.service == svc && t.name == name)
            .and_then(|t| pki::inspect(&t.pair().cert).ok())
            .map(|i| i.serial)
    };
    for h in order {
        reload_agent(layout, h, serial(Service::EtcdClient, &h.name), timeout)
            .with_context(|| format!("{}: the agents after it were not reloaded", h.name))?;
    }
    if let Some(user) = &env.pgbackrest {
        rotate_pgbackrest(layout, inv, &env.pg, user, &serial, timeout)?;
    }
    if env.haproxy.is_some() {
        let id = haproxy::identity(layout);
        match spawn::running(&layout.haproxy_pid(), &id) {
            Some(pid) => {
                haproxy::reload(layout, pid)?;
                if let Some(leader) = &leader {
                    let replicas: Vec<String> = inv
                        .database_hosts
                        .iter()
                        .map(|h| h.name.clone())
                        .filter(|n| n != leader)
                        .collect();
                    haproxy::wait_routing(layout, leader, &replicas, timeout)?;
                }
                println!("      haproxy reloaded (pid {pid}), routing as before");
            }
            None => println!("      haproxy: not running; it reads the file when it starts"),
        }
    }
    Ok(())
}

/// SIGHUP to node `h`'s agent; done when its log says the configuration was reloaded and its
/// etcd client (whose trusted CAs changed) reconnected with `etcd_serial`.
fn reload_agent(
    layout: &Layout,
    h: &DbHost,
    etcd_serial: Option<String>,
    timeout: Duration,
) -> Result<()> {
    let id = super::up::agent_identity(layout, &h.name);
    let Some(pid) = spawn::running(&layout.agent_pid(&h.name), &id) else {
        println!(
            "      {}: agent not running; it reads the file when it starts",
            h.name
        );
        return Ok(());
    };
    let log = layout.agent_log(&h.name);
    let offset = std::fs::metadata(&log).map_or(0, |m| m.len());
    let raw = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGHUP)
        .with_context(|| format!("SIGHUP to the agent of {} (pid {pid})", h.name))?;
    let t0 = Instant::now();
    while !read_from(&log, offset).contains("configuration reloaded") {
        if t0.elapsed() >= timeout {
            bail!("the agent did not reload its configuration within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(serial) = etcd_serial {
        wait_etcd_client(&log, offset, &serial, timeout)?;
    }
    println!("      {}: agent reloaded (pid {pid})", h.name);
    Ok(())
}

fn read_from(path: &std::path::Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

/// The `CERTIFICATE` blocks of a PEM text, each with its markers and a final newline.
fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else { break };
        out.push(format!("{}\n", &rest[b..b + e + END.len()]));
        rest = &rest[b + e + END.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_splits_into_its_certificates() {
        let a = Ca::create("a", 2).unwrap();
        let b = Ca::create("b", 2).unwrap();
        let bundle = format!("{}{}", ensure_newline(a.cert_pem()), b.cert_pem());
        let blocks = pem_blocks(&bundle);
        assert_eq!(blocks.len(), 2);
        let first = pki::inspect_pem(
            blocks[0].as_bytes(),
            std::path::Path::new("x"),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(first.subject_cn, "a");
        assert_eq!(pem_blocks(&blocks[1]), vec![blocks[1].clone()]);
        assert!(pem_blocks("no certificate here").is_empty());
    }

    #[test]
    fn an_interrupted_key_switch_is_completed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path()).unwrap();
        let old = Ca::create("old", 2).unwrap();
        old.write(&layout.pki()).unwrap();
        let new = Ca::create("new", 2).unwrap();
        let next = layout.pki().join(NEXT_DIR);
        new.write(&next).unwrap();
        // Interrupted before the bundle: the old CA stays, the unused new one goes.
        complete_key_switch(&layout).unwrap();
        assert!(!next.exists());
        let ca = Ca::load(&layout.ca_cert(), &layout.pki().join(pki::CA_KEY_FILE)).unwrap();
        assert_eq!(ca.common_name(), "old");
        // Interrupted after the bundle: the new key takes its place.
        new.write(&next).unwrap();
        let bundle = format!("{}{}", ensure_newline(new.cert_pem()), old.cert_pem());
        std::fs::write(layout.ca_cert(), bundle).unwrap();
        complete_key_switch(&layout).unwrap();
        let ca = Ca::load(&layout.ca_cert(), &layout.pki().join(pki::CA_KEY_FILE)).unwrap();
        assert_eq!(ca.common_name(), "new");
        assert!(!next.exists());
    }
}
