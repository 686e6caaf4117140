//! `pgkeep pki rotate --dir D`: new certificates and keys from the environment's CA, and every
//! running component switched to them without a restart of PostgreSQL and without a failover.
//!
//! 1. Every selected certificate is issued first (nothing is written if one cannot be), then
//!    each certificate and key pair replaces the old one in place, with its owner and mode
//!    ([`crate::pki::rotate::replace_pair`]).
//! 2. etcd members: etcd (3.2 and later, Debian's 3.4 included) reads `--cert-file` and
//!    `--key-file` (and the peer pair) again for every new TLS connection, so rewriting the
//!    files is enough; each member's client and peer ports are then probed for the new
//!    certificate. A member that still presents the old one is restarted, one at a time, the
//!    next only once the cluster is healthy again (quorum kept).
//! 3. Agents, replicas first and the leader last, get SIGHUP: the agent re-reads its
//!    configuration, PostgreSQL reloads its `ssl_cert_file`/`ssl_key_file`, the REST API serves
//!    new connections with its new certificate, and the etcd client switches to the new
//!    identity once a separate client with it has read from etcd (the lease and the leader key
//!    are untouched). Each agent is checked before the next: its PostgreSQL and REST API ports
//!    present the new certificates, and its log says the etcd client reloaded the new serial.
//!    If a replica fails, the leader is left alone.
//! 4. HAProxy gets its new client certificate file and reloads through its master (SIGUSR2,
//!    server states kept); its stats socket must then show the new certificate in use, and it
//!    must route as before.
//!
//! Replication and rewind certificates are files that libpq reads for each new connection, and
//! the operator's certificates are read by each `pgkeep ctl` run: writing them is enough.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::certs::{self, Target};
use super::{Layout, ServiceUser, etcd, haproxy, spawn};
use crate::dcs::Dcs;
use crate::inventory::{DbHost, Inventory};
use crate::pki::probe::{self, Listener};
use crate::pki::{self, Service};

/// What `pgkeep pki rotate` was asked to do.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// The environment directory.
    pub dir: PathBuf,
    /// Only these services (empty: all).
    pub services: Vec<Service>,
    /// Validity of the new certificates (default 397 days, or less when the CA ends sooner).
    pub days: Option<u32>,
    /// How long each component may take to present its new certificate.
    pub timeout: Duration,
}

/// One rotated certificate.
struct Rotated {
    target: Target,
    old: String,
    new: String,
}

/// Runs `pgkeep pki rotate`.
pub fn rotate(opts: &RotateOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pgkeep pki rotate --dir must run as root (it writes every service's files)");
    }
    let layout = Layout::new(&opts.dir)?;
    let inv = Inventory::load(&layout.inventory())
        .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
    let (pg, etcd_user) = (ServiceUser::postgres()?, ServiceUser::etcd()?);
    let (haproxy_user, pgbr_user) = optional_users(&layout, &inv)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    println!("pgkeep pki rotate: {}", layout.dir.display());
    let rollover = super::rotate_ca::phase(&layout)?;
    match rollover {
        Some(super::rotate_ca::Phase::Bundle) => bail!(
            "a CA rollover started but not every component trusts the new CA yet: finish that \
             first with `pgkeep pki rotate --ca --dir {}`",
            layout.dir.display()
        ),
        Some(super::rotate_ca::Phase::Finishing) => bail!(
            "a CA rollover is being finished: resume it with `pgkeep pki rotate --ca --finish --dir {}`",
            layout.dir.display()
        ),
        _ => {}
    }
    let mut steps = super::up::Steps::new(5);

    let rotated = steps.run("new certificates and keys", || {
        let users = (&pg, &etcd_user, haproxy_user.as_ref(), pgbr_user.as_ref());
        issue(&layout, &inv, users, opts)
    })?;
    let serial_of = |svc: Service, name: &str| {
        rotated
            .iter()
            .find(|r| r.target.service == svc && r.target.name == name)
            .map(|r| r.new.clone())
    };
    steps.run("etcd members", || {
        let mut restarted = 0;
        for m in &inv.etcd_hosts {
            let Some(new) = serial_of(Service::EtcdServer, &m.name) else {
                continue;
            };
            let ports = [("client", m.client_port), ("peer", m.peer_port)];
            let listeners: Vec<(&str, Listener)> = ports
                .iter()
                .map(|(what, port)| {
                    let l = Listener {
                        addr: (m.address, *port).into(),
                        server_name: inv.fqdn(&m.name),
                        postgres: false,
                    };
                    (*what, l)
                })
                .collect();
            let presented = |timeout| {
                listeners
                    .iter()
                    .all(|(_, l)| wait_presented(&layout, l, &new, timeout).is_ok())
            };
            if presented(Duration::from_secs(5)) {
                println!("      {}: client and peer ports present {new}", m.name);
                continue;
            }
            println!(
                "      {}: still presents its old certificate; restarting it (one member at a time)",
                m.name
            );
            restart_etcd(&layout, &inv, m, &etcd_user, &rt)?;
            restarted += 1;
            for (what, l) in &listeners {
                wait_presented(&layout, l, &new, opts.timeout)
                    .with_context(|| format!("{} {what} port after a restart", m.name))?;
            }
        }
        if restarted == 0 {
            println!("      no member restarted (etcd re-reads its files for every new connection)");
        }
        Ok(())
    })?;
    let leader = rt.block_on(leader(&layout, &inv))?;
    steps.run("agents (replicas first, then the leader)", || {
        let mut order: Vec<&DbHost> = inv.database_hosts.iter().collect();
        order.sort_by_key(|h| Some(&h.name) == leader.as_ref());
        for h in order {
            reload_agent(&layout, &inv, h, &rotated, opts.timeout).with_context(|| {
                format!(
                    "{} did not take its new certificates; the agents after it were not reloaded",
                    h.name
                )
            })?;
        }
        Ok(())
    })?;
    steps.run("pgBackRest servers", || {
        let Some(user) = &pgbr_user else {
            println!("      no pgBackRest repository in this environment");
            return Ok(());
        };
        rotate_pgbackrest(&layout, &inv, &pg, user, &serial_of, opts.timeout)
    })?;
    steps.run("HAProxy", || {
        let (Some(user), Some(lb)) = (&haproxy_user, &inv.load_balancer) else {
            println!("      no HAProxy in this environment");
            return Ok(());
        };
        let Some(new) = serial_of(Service::HaProxy, &lb.name) else {
            println!("      its certificate was not rotated");
            return Ok(());
        };
        let id = haproxy::identity(&layout);
        if spawn::running(&layout.haproxy_pid(), &id).is_none() {
            println!("      not running; it uses the new certificate when it starts");
            return Ok(());
        }
        let changed = haproxy::write_files(&layout, &inv, user)?;
        haproxy::start_or_reload(&layout, &inv, user, changed)?;
        wait_haproxy_cert(&layout, &inv, &new, opts.timeout)?;
        wait_routing_as_before(&layout, &inv, leader.as_deref(), opts.timeout)?;
        Ok(())
    })?;
    if rollover == Some(super::rotate_ca::Phase::Trusted) && opts.services.is_empty() {
        super::rotate_ca::set_phase(&layout, Some(super::rotate_ca::Phase::Reissued))?;
        println!(
            "CA rollover: every certificate is the new CA's; end it with `pgkeep pki rotate --ca \
             --finish --dir {}`",
            layout.dir.display()
        );
    }
    println!();
    println!("Rotated {} certificates:", rotated.len());
    for r in &rotated {
        println!(
            "  {:<15} {:<10} {} -> {}",
            r.target.service.as_str(),
            r.target.name,
            r.old,
            r.new
        );
    }
    Ok(())
}

/// Waits until HAProxy routes writes to `leader` and reads to every other node (nothing to
/// wait for without a leader).
pub(super) fn wait_routing_as_before(
    layout: &Layout,
    inv: &Inventory,
    leader: Option<&str>,
    timeout: Duration,
) -> Result<()> {
    let Some(leader) = leader else {
        return Ok(());
    };
    let replicas: Vec<String> = inv
        .database_hosts
        .iter()
        .map(|h| h.name.clone())
        .filter(|n| n != leader)
        .collect();
    haproxy::wait_routing(layout, leader, &replicas, timeout)
}

/// HAProxy's and pgBackRest's users, for the environments that have them.
pub(super) fn optional_users(
    layout: &Layout,
    inv: &Inventory,
) -> Result<(Option<ServiceUser>, Option<ServiceUser>)> {
    let haproxy = if certs::haproxy_client(layout, &load_balancer_name(inv))
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
    Ok((haproxy, pgbackrest))
}

fn load_balancer_name(inv: &Inventory) -> String {
    inv.load_balancer
        .as_ref()
        .map_or_else(|| "lb".to_owned(), |l| l.name.clone())
}

/// postgres, etcd, HAProxy's and pgBackRest's users.
pub(super) type Users<'a> = (
    &'a ServiceUser,
    &'a ServiceUser,
    Option<&'a ServiceUser>,
    Option<&'a ServiceUser>,
);

/// pgBackRest reads its server certificate when the server starts: each `pgbackrest server`
/// whose certificate changed is restarted (it keeps no state; an asynchronous `archive-push`
/// in flight retries, and the WAL stays queued in the spool meanwhile) and must then present
/// the new one. Client certificates are files each command reads: writing them is enough.
pub(super) fn rotate_pgbackrest(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
    pgbr: &ServiceUser,
    serial_of: &dyn Fn(Service, &str) -> Option<String>,
    timeout: Duration,
) -> Result<()> {
    let mut hosts: Vec<(String, Listener)> = inv
        .database_hosts
        .iter()
        .filter_map(|h| {
            let port = h.pgbackrest_port?;
            Some((h.name.clone(), (h.address, port, inv.fqdn(&h.name))))
        })
        .map(|(n, (a, p, fqdn))| {
            let l = Listener {
                addr: (a, p).into(),
                server_name: fqdn,
                postgres: false,
            };
            (n, l)
        })
        .collect();
    if let Some(b) = &inv.backup_host {
        hosts.push((
            b.name.clone(),
            Listener {
                addr: (b.address, b.port).into(),
                server_name: inv.fqdn(&b.name),
                postgres: false,
            },
        ));
    }
    let specs = super::backup::server_specs(layout, inv, pg, pgbr);
    for (name, l) in hosts {
        let Some(new) = serial_of(Service::PgBackRest, &name) else {
            continue;
        };
        let Some(spec) = specs
            .iter()
            .find(|s| s.name == format!("{name}-pgbackrest"))
        else {
            continue;
        };
        if let Some(pid) = spawn::running(&spec.pid_file, &spec.identity) {
            if !spawn::stop(pid, &spec.identity, Signal::SIGTERM, timeout)? {
                bail!("{} (pid {pid}) did not stop", spec.name);
            }
            // The workers it forked for open connections (an archive push) keep its listening
            // socket until their request ends.
            spawn::wait_listen_free(spec, timeout)?;
            spawn::start(spec)?;
            wait_presented(layout, &l, &new, timeout)
                .with_context(|| format!("{} after a restart", spec.name))?;
            println!("      {}: restarted, presents {new}", spec.name);
        } else {
            println!(
                "      {}: not running; it uses the new certificate when it starts",
                spec.name
            );
        }
    }
    Ok(())
}

/// Issues every selected certificate, then writes them all.
fn issue(
    layout: &Layout,
    inv: &Inventory,
    (pg, etcd_user, haproxy_user, pgbr_user): Users<'_>,
    opts: &RotateOptions,
) -> Result<Vec<Rotated>> {
    let ca = certs::ca(layout, inv)?;
    let (days, shortened) = pki::rotate::leaf_days(opts.days, ca.not_after());
    let wanted: HashSet<Service> = opts.services.iter().copied().collect();
    let targets: Vec<Target> = certs::targets(layout, inv, pg, etcd_user, haproxy_user, pgbr_user)
        .into_iter()
        .filter(|t| wanted.is_empty() || wanted.contains(&t.service))
        .collect();
    if targets.is_empty() {
        bail!("this environment has no certificate of the services {wanted:?}");
    }
    let mut issued = Vec::new();
    for t in targets {
        let cert = t.pair().cert;
        let old = pki::inspect(&cert)
            .map(|i| i.serial)
            .unwrap_or_else(|_| "(none)".to_owned());
        let new = ca
            .issue(&t.request(days)?)
            .with_context(|| format!("issuing the {} certificate for {}", t.service, t.name))?;
        issued.push((t, old, new));
    }
    let mut out = Vec::new();
    for (t, old, new) in issued {
        let owner = t.owner.as_ref().map(|u| (u.uid, u.gid));
        let basename = format!("{}-{}", t.service, t.name);
        let files = pki::rotate::replace_pair(&new, &t.dir, &basename, owner)
            .with_context(|| format!("writing {basename} into {}", t.dir.display()))?;
        let serial = pki::inspect(&files.cert)?.serial;
        out.push(Rotated {
            target: t,
            old,
            new: serial,
        });
    }
    println!(
        "      {} certificates, valid {days} days{}, signed by {:?}",
        out.len(),
        if shortened {
            " (shortened: the CA ends sooner)"
        } else {
            ""
        },
        ca.common_name()
    );
    Ok(out)
}

/// Waits until `l` presents the certificate with serial `want` (verified against the CA and
/// the listener's name).
fn wait_presented(layout: &Layout, l: &Listener, want: &str, timeout: Duration) -> Result<()> {
    let op = certs::operator_etcd(layout);
    let t0 = Instant::now();
    loop {
        let got = probe::presented(
            l,
            &layout.ca_cert(),
            Some((&op.cert, &op.key)),
            Duration::from_secs(3),
        );
        let last = match got {
            Ok(info) if info.serial == want => return Ok(()),
            Ok(info) => format!("presents {}", info.serial),
            Err(e) => e.to_string(),
        };
        if t0.elapsed() >= timeout {
            bail!(
                "{} ({}) does not present {want} after {timeout:?}: {last}",
                l.addr,
                l.server_name
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The current leader's name, if any (read with the operator's new etcd certificate).
pub(super) async fn leader(layout: &Layout, inv: &Inventory) -> Result<Option<String>> {
    let settings = etcd::operator_settings(layout, inv, inv.etcd_endpoints());
    let dcs = crate::dcs::EtcdDcs::connect(&settings).await?;
    let snap = dcs.load().await.context("reading the cluster from etcd")?;
    Ok(snap.view.leader.map(|l| l.name))
}

/// Restarts etcd member `m` and waits until the whole cluster is healthy again.
pub(super) fn restart_etcd(
    layout: &Layout,
    inv: &Inventory,
    m: &crate::inventory::EtcdHost,
    user: &ServiceUser,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let id = etcd::identity(layout, &m.name);
    if let Some(pid) = spawn::running(&layout.etcd_pid(&m.name), &id)
        && !spawn::stop(pid, &id, Signal::SIGTERM, Duration::from_secs(30))?
    {
        bail!("etcd member {} (pid {pid}) did not stop", m.name);
    }
    spawn::start(&etcd::spec(layout, inv, m, user))?;
    rt.block_on(etcd::wait_healthy(layout, inv, Duration::from_secs(60)))
}

/// Sends SIGHUP to node `h`'s agent and waits until each of its rotated certificates is used.
fn reload_agent(
    layout: &Layout,
    inv: &Inventory,
    h: &DbHost,
    rotated: &[Rotated],
    timeout: Duration,
) -> Result<()> {
    let tls_dir = certs::node_tls(layout, &h.name);
    let mine: Vec<&Rotated> = rotated.iter().filter(|r| r.target.dir == tls_dir).collect();
    if mine.is_empty() {
        return Ok(());
    }
    let new = |svc: Service| {
        mine.iter()
            .find(|r| r.target.service == svc)
            .map(|r| r.new.clone())
    };
    let Some((pid, log, offset)) = sighup_agent(layout, h)? else {
        return Ok(());
    };
    let fqdn = inv.fqdn(&h.name);
    let mut done = Vec::new();
    if let Some(serial) = new(Service::Postgres) {
        let l = Listener {
            addr: (h.address, h.pg_port).into(),
            server_name: fqdn.clone(),
            postgres: true,
        };
        wait_presented(layout, &l, &serial, timeout).context("PostgreSQL")?;
        done.push("PostgreSQL");
    }
    if let Some(serial) = new(Service::RestApi) {
        let l = Listener {
            addr: (h.address, h.api_port).into(),
            server_name: fqdn.clone(),
            postgres: false,
        };
        wait_presented(layout, &l, &serial, timeout).context("REST API")?;
        done.push("REST API");
    }
    if let Some(serial) = new(Service::EtcdClient) {
        wait_etcd_client(&log, offset, &serial, timeout)?;
        done.push("etcd client");
    }
    println!(
        "      {}: reloaded (pid {pid}); new certificates in use: {}",
        h.name,
        if done.is_empty() {
            "client files only".to_owned()
        } else {
            done.join(", ")
        }
    );
    Ok(())
}

/// SIGHUP to node `h`'s agent: its pid, its log and where the log ended before the signal
/// (none: the agent does not run, which is said).
pub(super) fn sighup_agent(layout: &Layout, h: &DbHost) -> Result<Option<(u32, PathBuf, u64)>> {
    let id = super::up::agent_identity(layout, &h.name);
    let Some(pid) = spawn::running(&layout.agent_pid(&h.name), &id) else {
        println!(
            "      {}: agent not running; it uses the new files when it starts",
            h.name
        );
        return Ok(None);
    };
    let log = layout.agent_log(&h.name);
    let offset = std::fs::metadata(&log).map_or(0, |m| m.len());
    let raw = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGHUP)
        .with_context(|| format!("SIGHUP to the agent of {} (pid {pid})", h.name))?;
    Ok(Some((pid, log, offset)))
}

/// Waits for the agent's log (after `offset`) to say its etcd client reloaded `serial`.
pub(super) fn wait_etcd_client(
    log: &Path,
    offset: u64,
    serial: &str,
    timeout: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let text = read_from(log, offset);
        for line in text.lines() {
            if line.contains("etcd client certificate reloaded") && line.contains(serial) {
                return Ok(());
            }
            if line.contains("etcd client certificate NOT reloaded")
                || line.contains("etcd client certificate not reloaded")
            {
                bail!("the agent's etcd client kept its previous certificate: {line}");
            }
        }
        if t0.elapsed() >= timeout {
            bail!(
                "the agent's log {} does not say its etcd client reloaded {serial} after {timeout:?}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What `path` holds after `offset` (empty when unreadable).
pub(super) fn read_from(path: &Path, offset: u64) -> String {
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until HAProxy's stats socket shows `serial` for its client certificate file.
fn wait_haproxy_cert(
    layout: &Layout,
    inv: &Inventory,
    serial: &str,
    timeout: Duration,
) -> Result<()> {
    let lb = haproxy::load_balancer(inv)?;
    let pem = haproxy::client_pem(layout, lb);
    let want = normalise_serial(serial);
    let t0 = Instant::now();
    loop {
        let cmd = format!("show ssl cert {}", pem.display());
        let last = match crate::haproxy::stats::command(
            &layout.haproxy_socket(),
            &cmd,
            Duration::from_secs(2),
        ) {
            Ok(out) => match haproxy_serial(&out) {
                Some(s) if s == want => {
                    println!("      haproxy presents {serial} in its checks");
                    return Ok(());
                }
                Some(s) => format!("serial {s}"),
                None => out.trim().to_owned(),
            },
            Err(e) => e.to_string(),
        };
        if t0.elapsed() >= timeout {
            bail!("HAProxy does not use its new certificate after {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Upper-case hex without separators.
fn normalise_serial(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// The `Serial:` line of HAProxy's `show ssl cert <file>`.
fn haproxy_serial(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Serial:"))
        .map(normalise_serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_across_formats() {
        let out =
            "Filename: /d/haproxy/haproxy-lb.pem\nStatus: Used\nSerial: 4A0B11FF\nnotBefore: x\n";
        assert_eq!(haproxy_serial(out).as_deref(), Some("4A0B11FF"));
        assert_eq!(normalise_serial("4a:0b:11:ff"), "4A0B11FF");
        assert_eq!(haproxy_serial("Filename: x\n"), None);
    }

    #[test]
    fn reads_a_log_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        std::fs::write(&log, "old line\nnew line\n").unwrap();
        assert_eq!(read_from(&log, 9), "new line\n");
        assert_eq!(read_from(&dir.path().join("missing"), 0), "");
    }
}
