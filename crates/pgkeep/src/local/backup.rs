//! pgBackRest in a local environment: the repository host's `pgbackrest server` (user
//! `pgbackrest`), one node-side `pgbackrest server` per database node (user `postgres`), their
//! configuration files (rendered by [`crate::pgbackrest`]) and the stanza.
//!
//! ```text
//! D/backup/               0750 pgbackrest
//!   conf/                 0750 root:pgbackrest: pgbackrest.conf (0640), conf.d/cipher.conf
//!                         (0600 pgbackrest: the repository's passphrase)
//!   repo/ log/ lock/      0700 pgbackrest: the encrypted repository, pgBackRest's logs, locks
//!   tls/                  0700 pgbackrest: pgbackrest-backup (server), pgbackrest-client-backup
//! D/nodes/<n>/pgbackrest/ 0750 root:postgres: pgbackrest.conf (0640), conf.d/ (empty)
//!   spool/ log/ lock/     0700 postgres: asynchronous archiving's queue, logs, locks
//! D/backup/scheduler.yml  0640 root:pgbackrest: `pgkeep backup-scheduler`'s configuration
//!                         (its status: D/backup/scheduler-status.json)
//! D/secrets/pgbackrest-cipher.pw   the passphrase (0600 root)
//! ```
//!
//! Every command is given `--config-path`, so pgBackRest reads exactly these files (never
//! `/etc/pgbackrest.conf` nor `/etc/pgbackrest/conf.d`).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::certs::{node_tls, pair};
use super::files::{self, dir, write};
use super::spawn::{self, Identity, SERVICE_PATH, Spec};
use super::{Layout, ServiceUser, s};
use crate::inventory::{BackupHost, DbHost, Inventory};
use crate::pgbackrest::{
    self as render, NodePlan, Paths, PgNode, RepoPlan, Retention, Server, Timeouts, TlsFiles,
};
use crate::pki::Service;

/// Debian's pgBackRest.
pub const PGBACKREST_BIN: &str = "/usr/bin/pgbackrest";

/// The OS user of the repository host.
pub const PGBACKREST_USER: &str = "pgbackrest";

/// `archive-push-queue-max` of a local node (MiB).
const ARCHIVE_QUEUE_MAX_MIB: u64 = 1024;

/// `D/backup`.
pub fn backup_dir(layout: &Layout) -> PathBuf {
    layout.path("backup")
}

/// The repository host's `--config-path` (`D/backup/conf`).
pub fn repo_config_path(layout: &Layout) -> PathBuf {
    backup_dir(layout).join("conf")
}

/// The repository (`D/backup/repo`).
pub fn repo_path(layout: &Layout) -> PathBuf {
    backup_dir(layout).join("repo")
}

/// Node `n`'s `--config-path` (`D/nodes/<n>/pgbackrest`).
pub fn node_config_path(layout: &Layout, n: &str) -> PathBuf {
    layout.node_dir(n).join("pgbackrest")
}

/// The repository's passphrase, kept by root (`D/secrets/pgbackrest-cipher.pw`).
pub fn cipher_secret(layout: &Layout) -> PathBuf {
    layout.secrets().join("pgbackrest-cipher.pw")
}

/// The repository host's TLS directory.
fn repo_tls(layout: &Layout) -> PathBuf {
    backup_dir(layout).join("tls")
}

/// The files of the repository host's `service` certificate.
pub fn repo_pair(layout: &Layout, inv: &Inventory, service: Service) -> Option<super::certs::Pair> {
    inv.backup_host
        .as_ref()
        .map(|b| pair(&repo_tls(layout), service, &b.name))
}

fn tls_files(p: &super::certs::Pair, layout: &Layout) -> TlsFiles {
    TlsFiles {
        cert: p.cert.clone(),
        key: p.key.clone(),
        ca: layout.ca_cert(),
    }
}

fn state_paths(root: &Path) -> Paths {
    Paths {
        log: root.join("log"),
        lock: root.join("lock"),
        spool: root.join("spool"),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Node `h` as pgBackRest addresses it.
fn pg_node(layout: &Layout, inv: &Inventory, h: &DbHost) -> Result<PgNode> {
    Ok(PgNode {
        host: inv.fqdn(&h.name),
        tls_port: node_port(h)?,
        data_dir: layout.data_dir(&h.name),
        pg_port: h.pg_port,
        socket_dir: layout.socket_dir(&h.name),
        config_path: node_config_path(layout, &h.name),
    })
}

/// The repository host's plan.
pub fn repo_plan(layout: &Layout, inv: &Inventory, b: &BackupHost) -> Result<RepoPlan> {
    let tls = repo_tls(layout);
    let nodes = inv
        .database_hosts
        .iter()
        .map(|h| pg_node(layout, inv, h))
        .collect::<Result<Vec<_>>>()?;
    Ok(RepoPlan {
        stanza: inv.cluster.clone(),
        repo_path: repo_path(layout),
        paths: state_paths(&backup_dir(layout)),
        server: Server {
            address: b.address.to_string(),
            port: b.port,
            tls: tls_files(&pair(&tls, Service::PgBackRest, &b.name), layout),
            clients: inv
                .database_hosts
                .iter()
                .map(|h| client_cn(&h.name))
                .collect(),
        },
        client: tls_files(&pair(&tls, Service::PgBackRestClient, &b.name), layout),
        nodes,
        process_max: render::process_max_for(cpus()),
        backup_standby: true,
        retention: Retention::default(),
        timeouts: Timeouts::default(),
    })
}

/// The common name of host `name`'s pgBackRest client certificate.
fn client_cn(name: &str) -> String {
    format!("{}-{name}", Service::PgBackRestClient)
}

fn node_port(h: &DbHost) -> Result<u16> {
    h.pgbackrest_port.with_context(|| {
        format!(
            "the inventory gives {} no pgbackrest_port (needed with a backup host)",
            h.name
        )
    })
}

/// Node `h`'s plan.
pub fn node_plan(layout: &Layout, inv: &Inventory, h: &DbHost, b: &BackupHost) -> Result<NodePlan> {
    let tls = node_tls(layout, &h.name);
    Ok(NodePlan {
        stanza: inv.cluster.clone(),
        paths: state_paths(&node_config_path(layout, &h.name)),
        pg: pg_node(layout, inv, h)?,
        repo_host: inv.fqdn(&b.name),
        repo_port: b.port,
        repo_config_path: repo_config_path(layout),
        client: tls_files(&pair(&tls, Service::PgBackRestClient, &h.name), layout),
        server: Server {
            address: h.address.to_string(),
            port: node_port(h)?,
            tls: tls_files(&pair(&tls, Service::PgBackRest, &h.name), layout),
            clients: vec![client_cn(&b.name)],
        },
        process_max: 1,
        archive_queue_max_mib: ARCHIVE_QUEUE_MAX_MIB,
        timeouts: Timeouts::default(),
    })
}

/// Node `n`'s `archive_command` and `restore_command`.
pub fn wal_commands(layout: &Layout, inv: &Inventory, n: &str) -> Result<(String, String)> {
    Ok(render::wal_commands(
        Path::new(PGBACKREST_BIN),
        &node_config_path(layout, n),
        &inv.cluster,
    )?)
}

fn group_owner(u: &ServiceUser) -> ServiceUser {
    ServiceUser {
        name: "root".into(),
        uid: 0,
        gid: u.gid,
    }
}

/// Directories, configuration files and the cipher file of the repository host and of every
/// node (idempotent; a no-op without a backup host).
pub fn write_files(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
    pgbr: &ServiceUser,
) -> Result<()> {
    let Some(b) = &inv.backup_host else {
        return Ok(());
    };
    let base = backup_dir(layout);
    dir(&base, 0o750, Some(pgbr))?;
    for sub in ["repo", "log", "lock", "tls"] {
        dir(&base.join(sub), 0o700, Some(pgbr))?;
    }
    let conf = repo_config_path(layout);
    dir(&conf, 0o750, Some(&group_owner(pgbr)))?;
    dir(&conf.join("conf.d"), 0o750, Some(&group_owner(pgbr)))?;
    let text = render::render_repo(&repo_plan(layout, inv, b)?)?;
    write(
        &conf.join("pgbackrest.conf"),
        &text,
        0o640,
        Some(&group_owner(pgbr)),
    )?;
    write(
        &scheduler_config(layout),
        &scheduler_yaml(layout, inv, b)?,
        0o640,
        Some(&group_owner(pgbr)),
    )?;
    let pass = files::secret(&cipher_secret(layout))?;
    write(
        &conf.join("conf.d/cipher.conf"),
        &render::render_cipher(&pass)?,
        0o600,
        Some(pgbr),
    )?;
    for h in &inv.database_hosts {
        let root = node_config_path(layout, &h.name);
        dir(&root, 0o750, Some(&group_owner(pg)))?;
        dir(&root.join("conf.d"), 0o750, Some(&group_owner(pg)))?;
        for sub in ["spool", "log", "lock"] {
            dir(&root.join(sub), 0o700, Some(pg))?;
        }
        let text = render::render_node(&node_plan(layout, inv, h, b)?)?;
        write(
            &root.join("pgbackrest.conf"),
            &text,
            0o640,
            Some(&group_owner(pg)),
        )?;
    }
    Ok(())
}

/// `D/backup/scheduler.yml`.
pub fn scheduler_config(layout: &Layout) -> PathBuf {
    backup_dir(layout).join("scheduler.yml")
}

/// The local environment's backup schedule (cron, UTC): a full backup on Sundays at 01:00, a
/// differential one the other days at 01:00, an incremental one every hour.
pub const DEFAULT_SCHEDULE: [(&str, &str); 3] = [
    ("full", "0 1 * * 0"),
    ("diff", "0 1 * * 1-6"),
    ("incr", "0 * * * *"),
];

fn scheduler_yaml(layout: &Layout, inv: &Inventory, b: &BackupHost) -> Result<String> {
    let etcd = pair(&repo_tls(layout), Service::EtcdClient, &b.name);
    let doc = serde_json::json!({
        "scope": inv.cluster,
        "namespace": inv.namespace,
        "etcd3": {
            "hosts": inv.etcd_endpoints(),
            "cacert": s(&layout.ca_cert()),
            "cert": s(&etcd.cert),
            "key": s(&etcd.key),
        },
        "pgbackrest": {"config_path": s(&repo_config_path(layout)), "stanza": inv.cluster},
        "schedule": DEFAULT_SCHEDULE.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "grace": 3600,
        "interval": 30,
        "status_file": s(&backup_dir(layout).join("scheduler-status.json")),
    });
    Ok(format!(
        "# pgkeep backup-scheduler -c {} (written by `pgkeep up`; edits are overwritten)\n{}",
        s(&scheduler_config(layout)),
        serde_saphyr::to_string(&doc).context("rendering the scheduler's YAML")?
    ))
}

/// How `up` and `down` recognise the backup scheduler.
pub fn scheduler_identity(layout: &Layout) -> Identity {
    Identity {
        program: "pgkeep".into(),
        marker: s(&scheduler_config(layout)),
    }
}

/// The backup scheduler, run by `exe` (the pgkeep binary) as `pgbackrest`.
pub fn scheduler_spec(layout: &Layout, pgbr: &ServiceUser, exe: &Path) -> Spec {
    Spec {
        name: "backup-scheduler".into(),
        user: pgbr.clone(),
        program: exe.to_owned(),
        args: vec![
            "backup-scheduler".into(),
            "-c".into(),
            scheduler_config(layout).into_os_string(),
        ],
        home: backup_dir(layout),
        log: layout.logs().join("backup-scheduler.log"),
        pid_file: layout.run().join("backup-scheduler.pid"),
        identity: scheduler_identity(layout),
        listens: Vec::new(),
    }
}

/// Stops the backup scheduler if it runs (a backup it started finishes on its own).
pub fn stop_scheduler(layout: &Layout, timeout: Duration) -> Result<()> {
    let id = scheduler_identity(layout);
    for pid in spawn::scan(&id) {
        if !spawn::stop(pid, &id, Signal::SIGTERM, timeout)? {
            bail!("the backup scheduler (pid {pid}) did not stop");
        }
        println!("      backup scheduler stopped (pid {pid})");
    }
    Ok(())
}

/// Waits until no backup holds the repository's backup lock.
pub fn wait_backup_done(layout: &Layout, inv: &Inventory, timeout: Duration) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut said = false;
    loop {
        let json = repo_command(layout, inv, &["info", "--output=json"])?;
        let v: serde_json::Value = serde_json::from_str(&json).context("pgbackrest info")?;
        let held = v
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == inv.cluster.as_str()))
            .is_some_and(|s| s["status"]["lock"]["backup"]["held"] == true);
        if !held {
            return Ok(());
        }
        if !said {
            println!("      a backup is under way; waiting for it to finish");
            said = true;
        }
        if t0.elapsed() > timeout {
            bail!("a backup still holds the repository's lock after {timeout:?}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Every pgBackRest process whose `--config-path` is `config` (archivers, backups, remotes).
fn any_identity(config: &Path) -> Identity {
    Identity {
        program: "pgbackrest".into(),
        marker: s(config),
    }
}

/// The `pgbackrest server` of the configuration directory `config`: started with `--config=`
/// (its file) rather than `--config-path=` like every other pgBackRest command here, so that a
/// stale PID file never makes an archiver or a backup pass for the server.
fn server_identity(config: &Path) -> Identity {
    Identity {
        program: "pgbackrest".into(),
        marker: s(&config.join("pgbackrest.conf")),
    }
}

/// The `pgbackrest server` processes of the environment: the repository host's first.
pub fn server_specs(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
    pgbr: &ServiceUser,
) -> Vec<Spec> {
    let Some(b) = &inv.backup_host else {
        return Vec::new();
    };
    let one = |name: String, user: &ServiceUser, config: PathBuf, home: PathBuf, listen| Spec {
        pid_file: layout.run().join(format!("{name}-pgbackrest.pid")),
        log: layout.logs().join(format!("{name}-pgbackrest.log")),
        name: format!("{name}-pgbackrest"),
        user: user.clone(),
        program: PathBuf::from(PGBACKREST_BIN),
        args: vec![
            OsString::from(format!("--config={}", s(&config.join("pgbackrest.conf")))),
            OsString::from(format!(
                "--config-include-path={}",
                s(&config.join("conf.d"))
            )),
            "server".into(),
        ],
        home,
        identity: server_identity(&config),
        listens: vec![listen],
    };
    let mut v = vec![one(
        b.name.clone(),
        pgbr,
        repo_config_path(layout),
        backup_dir(layout),
        (b.address, b.port).into(),
    )];
    for h in &inv.database_hosts {
        if let Some(port) = h.pgbackrest_port {
            v.push(one(
                h.name.clone(),
                pg,
                node_config_path(layout, &h.name),
                layout.node_dir(&h.name),
                (h.address, port).into(),
            ));
        }
    }
    v
}

/// Stops every pgBackRest process of the environment: the nodes' servers and any
/// asynchronous archiver their PostgreSQL left behind, then the repository host's server.
/// Processes are found in `/proc` by their `--config-path` (or the server's `--config`) inside
/// `D`. False when one still runs after `timeout`.
pub fn stop_all(layout: &Layout, inv: &Inventory, timeout: Duration) -> Result<bool> {
    let mut configs: Vec<PathBuf> = inv
        .database_hosts
        .iter()
        .map(|h| node_config_path(layout, &h.name))
        .collect();
    configs.push(repo_config_path(layout));
    let mut all = true;
    let sched = scheduler_identity(layout);
    for pid in spawn::scan(&sched) {
        all &= spawn::stop(pid, &sched, Signal::SIGTERM, timeout)?;
    }
    for config in configs {
        for id in [any_identity(&config), server_identity(&config)] {
            for pid in spawn::scan(&id) {
                all &= spawn::stop(pid, &id, Signal::SIGTERM, timeout)?;
            }
        }
    }
    Ok(all)
}

/// Runs pgBackRest as `user` with the configuration in `config_path` (cleared environment,
/// output captured).
pub fn run_as(
    user: &ServiceUser,
    home: &Path,
    config_path: &Path,
    stanza: &str,
    args: &[&str],
) -> Result<Output> {
    Command::new(PGBACKREST_BIN)
        .arg(format!("--config-path={}", s(config_path)))
        .arg(format!("--stanza={stanza}"))
        .args(args)
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .current_dir(home)
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running pgbackrest {} as {}", args.join(" "), user.name))
}

/// Runs a pgBackRest command on the repository host (as `pgbackrest`); fails with its output.
pub fn repo_command(layout: &Layout, inv: &Inventory, args: &[&str]) -> Result<String> {
    let user = ServiceUser::lookup(PGBACKREST_USER)?;
    let out = run_as(
        &user,
        &backup_dir(layout),
        &repo_config_path(layout),
        &inv.cluster,
        args,
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgbackrest {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// Creates the stanza unless `info` shows it healthy, and checks that the primary's WAL
/// reaches the repository. A lock held by a concurrent pgBackRest command (an archive push in
/// progress: error 050) is waited out, a few seconds at most.
pub fn ensure_stanza(layout: &Layout, inv: &Inventory) -> Result<()> {
    let info = repo_command(layout, inv, &["info", "--output=json"])?;
    let exists = crate::pgbackrest::info::parse(&info, &inv.cluster).is_ok_and(|s| !s.missing());
    if !exists {
        retry_locked(|| repo_command(layout, inv, &["stanza-create"]))?;
    }
    retry_locked(|| repo_command(layout, inv, &["check"]))?;
    Ok(())
}

fn retry_locked(mut f: impl FnMut() -> Result<String>) -> Result<String> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if tries < 10 && format!("{e:#}").contains("[050]") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}
