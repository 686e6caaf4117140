//! Long operations in the background: cloning a replica (from the pgBackRest repository
//! when the node has one, else or on failure with `pg_basebackup`), `pg_rewind` and `initdb`.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result};
use pgkeep_core::ha::LongOperation;

use super::render;
use super::{Busy, Shell};

impl Shell {
    pub(super) fn spawn_busy(
        &mut self,
        op: LongOperation,
        fut: impl std::future::Future<Output = Result<()>> + Send + 'static,
    ) {
        let done = self.busy_done.clone();
        let handle = tokio::spawn(async move {
            let r = fut.await;
            done.notify_one();
            r
        });
        self.busy = Some(Busy { op, handle });
    }

    /// Makes this node a replica: from the pgBackRest repository when the node has one, else
    /// (or when that fails) with `pg_basebackup` from `source`. Without a source (no running
    /// member to copy) only the repository can serve, and its failure is the operation's.
    pub(super) fn start_clone(&mut self, source: Option<&str>, wipe: bool) -> Result<()> {
        let conninfo = source.map(|s| self.tool_conninfo(s, false)).transpose()?;
        let instance = self.instance.clone();
        let initdb_marker = self.layout.config_dir.join(super::observe::INITDB_MARKER);
        let repository = self.cfg.pgbackrest.clone();
        // The cluster's timelines and history: a backup must lie on the current timeline's.
        let view = self.watch.snapshot().map(|s| s.view.clone());
        let source = source.map(str::to_owned);
        self.spawn_busy(LongOperation::Clone, async move {
            if let Some(p) = &repository {
                tracing::info!(stanza = %p.stanza, wipe, "creating the replica from the pgBackRest repository (delta restore)");
                match restore_replica(&instance, p, view.as_ref()).await {
                    Ok(()) => {
                        tracing::info!("replica restored from the pgBackRest repository; it catches up from the archive, then streams");
                        let _ = std::fs::remove_file(&initdb_marker);
                        return Ok(());
                    }
                    Err(e) if source.is_none() => {
                        return Err(e.context("no running member to copy either"));
                    }
                    Err(e) if e.downcast_ref::<NoUsableBackup>().is_some() => tracing::info!(
                        source = source.as_deref().unwrap_or("-"),
                        reason = %e,
                        "no backup in the pgBackRest repository to make this replica from; cloning with pg_basebackup"
                    ),
                    Err(e) => tracing::warn!(
                        error = %format!("{e:#}"),
                        source = source.as_deref().unwrap_or("-"),
                        "restoring from the pgBackRest repository failed; cloning with pg_basebackup instead"
                    ),
                }
            }
            let (Some(source), Some(conninfo)) = (source, conninfo) else {
                anyhow::bail!("no running member to copy and no pgBackRest repository configured");
            };
            tracing::info!(%source, wipe, "cloning with pg_basebackup");
            // Replacing a data directory: clone beside it and swap only once the clone is
            // complete, so a source that dies mid-way (or was never reachable) costs nothing.
            let target = if wipe {
                side_dir(&instance.data_dir, "clone")
            } else {
                instance.data_dir.clone()
            };
            if wipe {
                remove_dir_if_exists(&target)?;
            }
            let args: Vec<OsString> = vec![
                "-D".into(),
                target.clone().into(),
                "-X".into(),
                "stream".into(),
                "-c".into(),
                "fast".into(),
                "--no-password".into(),
                "-d".into(),
                conninfo.into(),
            ];
            if let Err(e) = instance
                .runner
                .run("pg_basebackup", &args, &[], Duration::from_secs(3600))
                .await
            {
                if wipe {
                    let _ = remove_dir_if_exists(&target);
                }
                return Err(e.into());
            }
            if wipe {
                swap_in(&instance.data_dir, &target)?;
                let _ = std::fs::remove_file(initdb_marker);
            }
            Ok(())
        });
        Ok(())
    }

    pub(super) fn start_rewind(&mut self, source: &str) -> Result<()> {
        let conninfo = self.tool_conninfo(source, true)?;
        let instance = self.instance.clone();
        tracing::info!(%source, "rewinding with pg_rewind");
        self.spawn_busy(LongOperation::Rewind, async move {
            let args: Vec<OsString> = vec![
                format!("--target-pgdata={}", instance.data_dir.display()).into(),
                format!("--source-server={conninfo}").into(),
                "--no-sync".into(),
            ];
            let out = instance
                .runner
                .run("pg_rewind", &args, &[], Duration::from_secs(3600))
                .await?;
            // pg_rewind judges by the control file alone; the core judged by the end of the WAL
            // and found it past the switch point. Trusting "nothing to do" would start a standby
            // holding records the new primary never had, so it counts as a failed rewind.
            if format!("{}{}", out.stdout, out.stderr).contains("no rewind required") {
                anyhow::bail!(
                    "pg_rewind found nothing to rewind although the local WAL passed the switch point"
                );
            }
            super::slots::clear_slots(&instance.data_dir)
        });
        Ok(())
    }

    pub(super) fn start_initdb(&mut self) -> Result<()> {
        let instance = self.instance.clone();
        let superuser = self
            .cfg
            .postgresql
            .authentication
            .superuser
            .username
            .clone();
        let extra = self.cfg.bootstrap.initdb.clone();
        let layout = self.layout.clone();
        self.fresh_bootstrap = true;
        let marker = self.layout.config_dir.join(super::observe::INITDB_MARKER);
        crate::fsutil::write_atomic(&marker, b"", 0o600)
            .with_context(|| format!("writing {}", marker.display()))?;
        tracing::info!("running initdb for a new cluster");
        self.spawn_busy(LongOperation::Initdb, async move {
            instance
                .initdb(&superuser, &extra, Duration::from_secs(600))
                .await?;
            render::remove_initdb_config_copies(&layout);
            Ok(())
        });
        Ok(())
    }
}

/// The data directory as of the repository's newest usable backup, in place (`--delta`: files
/// that match are kept, so re-creating a diverged replica copies only what differs), with the
/// backup's own `postgresql.auto.conf` and no recovery target (`--type=none`): the agent
/// starts the node as a standby, which fetches the WAL since the backup from the archive (its
/// `restore_command`) and then streams. pgBackRest writes the control file last, so an
/// interrupted restore never starts.
///
/// Usable: the backup's WAL is a prefix of the cluster's current timeline
/// ([`backup_fits_cluster`](pgkeep_core::ha::backup_fits_cluster)). After a point-in-time
/// restore the newest backups lie on the abandoned timeline, past the new one's fork, and a
/// standby made from them could never follow it; an older backup from before the fork can.
/// Without such a backup the caller clones with `pg_basebackup` (until the next backup).
async fn restore_replica(
    instance: &crate::postgres::Instance,
    p: &crate::config::PgBackRest,
    view: Option<&pgkeep_core::cluster::ClusterView>,
) -> Result<()> {
    let base = [
        format!("--config-path={}", p.config_path.display()),
        format!("--stanza={}", p.stanza),
    ];
    let mut info_args: Vec<OsString> = base.iter().map(OsString::from).collect();
    info_args.extend(["--output=json".into(), "info".into()]);
    let info = instance
        .runner
        .run(PGBACKREST, &info_args, &[], Duration::from_secs(60))
        .await
        .context("pgbackrest info")?;
    let stanza = crate::pgbackrest::info::parse(&info.stdout, &p.stanza)?;
    let mut refused = Vec::new();
    let newest = stanza.backups.iter().rev().filter(|b| !b.error).find(|b| {
        let fits = match (b.stop_position(), view) {
            (Some((tl, lsn)), Some(v)) => pgkeep_core::ha::backup_fits_cluster(v, tl, lsn),
            (None, Some(_)) => Err(format!(
                "its last WAL segment {:?} is unreadable",
                b.wal_stop
            )),
            (_, None) => Err("the cluster's state is not known yet".into()),
        };
        fits.map_err(|why| refused.push(format!("{}: {why}", b.label)))
            .is_ok()
    });
    let Some(newest) = newest else {
        return Err(NoUsableBackup(if refused.is_empty() {
            "the repository has no backup yet".into()
        } else {
            format!(
                "no backup lies on the cluster's timeline ({})",
                refused.join("; ")
            )
        })
        .into());
    };
    let mut args: Vec<OsString> = base.iter().map(OsString::from).collect();
    args.extend([
        format!("--set={}", newest.label).into(),
        format!("--pg1-path={}", instance.data_dir.display()).into(),
        "--type=none".into(),
        "--log-level-console=warn".into(),
    ]);
    // Delta needs a data directory to compare with; an empty one gets a plain restore.
    if instance.data_dir.join("PG_VERSION").exists() {
        args.push("--delta".into());
    }
    args.push("restore".into());
    {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&instance.data_dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", instance.data_dir.display()));
            }
        }
    }
    instance
        .runner
        .run(PGBACKREST, &args, &[], Duration::from_secs(3600))
        .await
        .context("pgbackrest restore")?;
    Ok(())
}

/// Debian's pgBackRest.
const PGBACKREST: &str = "/usr/bin/pgbackrest";

/// The repository has no backup a replica can be made from (not a failure of pgBackRest).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoUsableBackup(String);

/// `<data_dir>.pgkeep-<what>`, beside the data directory.
fn side_dir(data_dir: &std::path::Path, what: &str) -> std::path::PathBuf {
    let mut name = data_dir.file_name().unwrap_or_default().to_owned();
    name.push(format!(".pgkeep-{what}"));
    data_dir.with_file_name(name)
}

fn remove_dir_if_exists(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Puts the complete clone `fresh` in place of `data_dir` (two renames in the same parent
/// directory), then removes the old data.
fn swap_in(data_dir: &std::path::Path, fresh: &std::path::Path) -> Result<()> {
    let old = side_dir(data_dir, "old");
    remove_dir_if_exists(&old)?;
    match std::fs::rename(data_dir, &old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "moving {} aside (the data directory must be renameable; the clone stays in {})",
                    data_dir.display(),
                    fresh.display()
                )
            });
        }
    }
    std::fs::rename(fresh, data_dir)
        .with_context(|| format!("moving {} to {}", fresh.display(), data_dir.display()))?;
    remove_dir_if_exists(&old)
}
