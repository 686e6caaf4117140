//! `pgkeep pki rotate --ca --dir D`: the environment's CA replaced by a new one, with no
//! failover and no PostgreSQL restart, in three commands with a period between them in which
//! both CAs are trusted. Each records its progress in `D/pki/ca-rollover` and, interrupted,
//! resumes where it stopped.
//!
//! 1. `--ca`: a new CA. `D/pki/ca.crt` becomes a bundle, the new CA first and the old one after
//!    it; `D/pki/ca.key` becomes the new CA's key (written beside it first, then renamed, so an
//!    interrupted run is completed by the next one). Every component then trusts both: etcd
//!    reads its trusted CA file only when it starts, so each member is restarted, one at a time
//!    and the next only once the cluster is healthy again; agents get SIGHUP (their REST API,
//!    their client of the other members' APIs and their etcd client take the bundle; PostgreSQL
//!    reloads `ssl_ca_file`), replicas first; each `pgbackrest server` is restarted (it reads its
//!    CA when it starts); HAProxy reloads; the backup scheduler is stopped meanwhile and started
//!    again. Certificates are still the old CA's: clients that verify the cluster with a copy of
//!    the old CA get the bundle now.
//! 2. `pki rotate` (refused while step 1 is incomplete): every certificate issued again, by the
//!    new CA, and taken into use as always.
//! 3. `--ca --finish`: refused until step 2 completed and while any certificate of the
//!    environment is still the old CA's; then `ca.crt` holds the new CA only and the components
//!    are told again, agents first and etcd last. From then on a certificate of the old CA is
//!    refused everywhere.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::certs::{self, Target};
use super::rotate::{
    RotateOptions, leader, read_from, restart_etcd, rotate_pgbackrest, sighup_agent,
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
        let (haproxy, pgbackrest) = super::rotate::optional_users(&layout, &inv)?;
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

/// Where a rollover stands, in `D/pki/ca-rollover`: each command resumes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `ca.crt` holds both CAs; not every component has read it yet.
    Bundle,
    /// Every component trusts both CAs; certificates are still the old CA's.
    Trusted,
    /// Every certificate was issued again by the new CA (a complete `pki rotate`).
    Reissued,
    /// `ca.crt` holds the new CA only; not every component has read it yet.
    Finishing,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Bundle => "bundle",
            Phase::Trusted => "trusted",
            Phase::Reissued => "reissued",
            Phase::Finishing => "finishing",
        }
    }
}

fn phase_file(layout: &Layout) -> std::path::PathBuf {
    layout.pki().join("ca-rollover")
}

/// The rollover's phase (none: no rollover under way).
pub fn phase(layout: &Layout) -> Result<Option<Phase>> {
    let path = phase_file(layout);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let p = [
        Phase::Bundle,
        Phase::Trusted,
        Phase::Reissued,
        Phase::Finishing,
    ]
    .into_iter()
    .find(|p| p.as_str() == text.trim())
    .with_context(|| format!("{}: unknown phase {:?}", path.display(), text.trim()))?;
    Ok(Some(p))
}

/// Records `p` (none: the rollover is over).
pub fn set_phase(layout: &Layout, p: Option<Phase>) -> Result<()> {
    let path = phase_file(layout);
    match p {
        Some(p) => {
            crate::fsutil::write_atomic(&path, format!("{}\n", p.as_str()).as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        },
    }
}

/// Starts a CA rollover, or resumes one interrupted before every component trusted the new CA
/// (see the module documentation).
pub fn start(opts: &RotateOptions) -> Result<()> {
    let env = Env::open(opts)?;
    let layout = &env.layout;
    let dir = layout.dir.display();
    println!("pgkeep pki rotate --ca: {dir}");
    complete_key_switch(layout)?;
    let mut steps = super::up::Steps::new(2);
    match phase(layout)? {
        None => {
            let trusted = env.trusted()?;
            if trusted.len() != 1 {
                bail!(
                    "{} holds {} CA certificates and no rollover is recorded: a rollover starts \
                     from exactly one",
                    layout.ca_cert().display(),
                    trusted.len()
                );
            }
            steps.run("a new CA, trusted beside the old one", || {
                new_ca(&env, &trusted[0])
            })?;
        }
        Some(Phase::Bundle) => {
            steps.run("a new CA, trusted beside the old one", || {
                println!("      already in place; the interrupted rollover goes on");
                Ok(())
            })?;
        }
        Some(Phase::Trusted | Phase::Reissued) => bail!(
            "every component already trusts both CAs; next: `pgkeep pki rotate --dir {dir}` \
             (certificates from the new CA), then `pgkeep pki rotate --ca --finish --dir {dir}`"
        ),
        Some(Phase::Finishing) => bail!(
            "the rollover is being finished; resume it with `pgkeep pki rotate --ca --finish --dir {dir}`"
        ),
    }
    steps.run("every component trusts both CAs", || {
        distribute_trust(&env, opts.timeout, false)?;
        set_phase(layout, Some(Phase::Trusted))
    })?;
    println!();
    println!(
        "Every component trusts both CAs; certificates are still the old CA's. Next:\n  \
         1. give {} (it holds both CAs) to every client that verifies the cluster with a copy of \
         the old CA;\n  2. pgkeep pki rotate --dir {dir}   (every certificate issued again by the \
         new CA);\n  3. pgkeep pki rotate --ca --finish --dir {dir}   (the old CA no longer trusted).",
        layout.ca_cert().display()
    );
    Ok(())
}

/// Step 1 of a rollover: the new CA beside the old one, its key in place.
fn new_ca(env: &Env, old_pem: &str) -> Result<()> {
    let layout = &env.layout;
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
    set_phase(layout, Some(Phase::Bundle))?;
    let bundle = format!("{}{}", ensure_newline(new.cert_pem()), old_pem);
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
}

/// Ends a CA rollover: only the new CA is trusted (see the module documentation).
pub fn finish(opts: &RotateOptions) -> Result<()> {
    let env = Env::open(opts)?;
    let layout = &env.layout;
    let dir = layout.dir.display();
    println!("pgkeep pki rotate --ca --finish: {dir}");
    complete_key_switch(layout)?;
    let mut steps = super::up::Steps::new(3);
    match phase(layout)? {
        None => bail!(
            "no CA rollover is under way; start one with `pgkeep pki rotate --ca --dir {dir}`"
        ),
        Some(Phase::Bundle) => bail!(
            "not every component trusts the new CA yet; resume with `pgkeep pki rotate --ca --dir {dir}`"
        ),
        Some(Phase::Trusted) => {
            bail!("the certificates are still the old CA's; first `pgkeep pki rotate --dir {dir}`")
        }
        Some(Phase::Reissued) => {
            let trusted = env.trusted()?;
            let Some(first) = trusted.first() else {
                bail!("{} holds no certificate", layout.ca_cert().display());
            };
            steps.run("every certificate is signed by the new CA", || {
                stale_certificates(&env)
            })?;
            steps.run("the old CA removed from the trusted file", || {
                set_phase(layout, Some(Phase::Finishing))?;
                crate::fsutil::write_atomic(&layout.ca_cert(), first.as_bytes(), 0o644)
                    .with_context(|| format!("writing {}", layout.ca_cert().display()))?;
                println!(
                    "      {}: the new CA only ({} removed)",
                    layout.ca_cert().display(),
                    trusted.len() - 1
                );
                Ok(())
            })?;
        }
        Some(Phase::Finishing) => {
            steps.run("every certificate is signed by the new CA", || {
                stale_certificates(&env)
            })?;
            steps.run("the old CA removed from the trusted file", || {
                println!("      already done; the interrupted finish goes on");
                Ok(())
            })?;
        }
    }
    steps.run("every component trusts the new CA only", || {
        // Agents first: with new certificates they work against etcd before and after its
        // restart; etcd, restarted last, then refuses the old CA.
        distribute_trust(&env, opts.timeout, true)?;
        set_phase(layout, None)
    })?;
    println!();
    println!("The CA rollover is complete: certificates of the old CA are refused everywhere.");
    Ok(())
}

/// Fails naming every certificate of the environment not issued by the first CA of `ca.crt`.
fn stale_certificates(env: &Env) -> Result<()> {
    let layout = &env.layout;
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
            "still signed by another CA than {:?}: {}; issue them again with `pgkeep pki rotate \
             --dir {}`, then finish",
            ca.subject_cn,
            stale.join(", "),
            layout.dir.display()
        );
    }
    println!("      every certificate is signed by {:?}", ca.subject_cn);
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
    let next_cert = std::fs::read_to_string(next.join(pki::CA_CERT_FILE)).unwrap_or_default();
    let trusted = std::fs::read_to_string(layout.ca_cert())
        .with_context(|| format!("reading {}", layout.ca_cert().display()))?;
    let named_first =
        pem_blocks(&trusted).first() == pem_blocks(&next_cert).first() && !next_cert.is_empty();
    if named_first {
        // ca.crt names the new CA first: its key must take the old one's place, never be lost.
        Ca::load(&layout.ca_cert(), &key)
            .with_context(|| format!("checking the new CA's key {}", key.display()))?;
        std::fs::rename(&key, layout.pki().join(pki::CA_KEY_FILE))
            .with_context(|| format!("moving {} into place", key.display()))?;
        std::fs::File::open(layout.pki())
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", layout.pki().display()))?;
    }
    // Either moved, or a new CA that never reached ca.crt: nothing else refers to it.
    std::fs::remove_dir_all(&next).with_context(|| format!("removing {}", next.display()))
}

/// Every component re-reads `ca.crt`: etcd members restarted one at a time, agents reloaded
/// (replicas first), pgBackRest servers restarted, HAProxy reloaded; etcd first when trust is
/// added, last (`etcd_last`) when it is taken away. The backup scheduler is stopped meanwhile
/// (a backup under way is waited for: its server worker would hold the port a restart needs)
/// and started again with the new files.
fn distribute_trust(env: &Env, timeout: Duration, etcd_last: bool) -> Result<()> {
    let (layout, inv) = (&env.layout, &env.inv);
    let scheduler = !spawn::scan(&super::backup::scheduler_identity(layout)).is_empty();
    if env.pgbackrest.is_some() {
        super::backup::stop_scheduler(layout, Duration::from_secs(30))?;
        super::backup::wait_backup_done(layout, inv, Duration::from_secs(1800))?;
    }
    if !etcd_last {
        restart_etcd_members(env)?;
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
    if let Some(user) = &env.haproxy {
        let id = haproxy::identity(layout);
        match spawn::running(&layout.haproxy_pid(), &id) {
            Some(pid) => {
                haproxy::write_files(layout, inv, user)?;
                haproxy::reload(layout, pid)?;
                super::rotate::wait_routing_as_before(layout, inv, leader.as_deref(), timeout)?;
                println!("      haproxy reloaded (pid {pid}), routing as before");
            }
            None => println!("      haproxy: not running; it reads the file when it starts"),
        }
    }
    if etcd_last {
        restart_etcd_members(env)?;
    }
    if scheduler && let Some(user) = &env.pgbackrest {
        let exe = super::up::agent_binary(layout, user)?;
        let pid = spawn::start(&super::backup::scheduler_spec(layout, user, &exe))?;
        println!("      backup scheduler started again (pid {pid})");
    }
    Ok(())
}

/// Restarts each running etcd member, one at a time, the next once the cluster is healthy.
fn restart_etcd_members(env: &Env) -> Result<()> {
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
    let Some((pid, log, offset)) = sighup_agent(layout, h)? else {
        return Ok(());
    };
    let t0 = Instant::now();
    while !read_from(&log, offset).contains("configuration reloaded") {
        if t0.elapsed() >= timeout {
            bail!("the agent did not reload its configuration within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // A part that kept its previous TLS state says so before "configuration reloaded".
    let text = read_from(&log, offset);
    if let Some(line) = text.lines().find(|l| {
        l.contains("certificate not reloaded")
            || l.contains("not rebuilt")
            || l.contains("re-rendering after reload failed")
    }) {
        bail!("the agent kept part of its previous TLS state: {line}");
    }
    if let Some(serial) = etcd_serial {
        wait_etcd_client(&log, offset, &serial, timeout)?;
    }
    println!("      {}: agent reloaded (pid {pid})", h.name);
    Ok(())
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
