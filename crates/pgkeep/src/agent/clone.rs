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
    /// (or when that fails) with `pg_basebackup` from `source`. Without a source (no leader)
    /// only the repository can serve, and its failure is the operation's.
    pub(super) fn start_clone(&mut self, source: Option<&str>, wipe: bool) -> Result<()> {
        // A failed attempt is not repeated at once: a repository or source that fails fast
        // would otherwise be asked again many times a second.
        let pause = Duration::from_millis(self.ha.loop_wait.0);
        if self.clone_failed_at.is_some_and(|t| t.elapsed() < pause) {
            tracing::debug!("the last clone failed less than loop_wait ago; not retrying yet");
            return Ok(());
        }
        let conninfo = source.map(|s| self.tool_conninfo(s, false)).transpose()?;
        let instance = self.instance.clone();
        let initdb_marker = self.layout.config_dir.join(super::observe::INITDB_MARKER);
        let restore_marker = self.layout.config_dir.join(super::observe::RESTORE_MARKER);
        let repository = self.cfg.pgbackrest.clone();
        // The cluster as the DCS shows it: its system identifier, timelines and history.
        let view = self.watch.snapshot().map(|s| s.view.clone());
        let source = source.map(str::to_owned);
        self.spawn_busy(LongOperation::Clone, async move {
            if let Some(p) = &repository {
                tracing::info!(stanza = %p.stanza, wipe, "creating the replica from the pgBackRest repository (delta restore)");
                let fit = match &source {
                    Some(_) => Fit::Cluster(view.as_ref()),
                    None => Fit::Archive,
                };
                match restore_replica(&instance, p, view.as_ref(), fit, &restore_marker).await {
                    Ok(()) => {
                        tracing::info!("replica restored from the pgBackRest repository; it catches up from the archive, then streams");
                        let _ = std::fs::remove_file(&initdb_marker);
                        let _ = std::fs::remove_file(&restore_marker);
                        return Ok(());
                    }
                    // Nothing else to copy: the next attempt restores over what this one left
                    // (the marker says it is ours).
                    Err(e) if source.is_none() => {
                        return Err(e.context("no leader to copy either"));
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
                // The directory was empty (or is replaced whole below): what a failed restore
                // wrote into it goes.
                if !wipe {
                    empty_dir(&instance.data_dir)?;
                }
                let _ = std::fs::remove_file(&restore_marker);
            }
            let (Some(source), Some(conninfo)) = (source, conninfo) else {
                anyhow::bail!("no leader to copy and no pgBackRest repository configured");
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

/// How a backup is judged able to become a replica of the cluster.
enum Fit<'a> {
    /// Against the DCS (a leader runs and publishes its timeline and history):
    /// [`backup_fits_cluster`](pgkeep_core::ha::backup_fits_cluster).
    Cluster(Option<&'a pgkeep_core::cluster::ClusterView>),
    /// Against the archive, as PostgreSQL will follow it (no leader): from the backup's
    /// timeline, the next ones whose history files the archive holds.
    Archive,
}

/// The data directory as of the repository's newest usable backup, in place (`--delta`: files
/// that match are kept, so re-creating a diverged replica copies only what differs), with the
/// backup's own `postgresql.auto.conf` and no recovery target (`--type=none`): the agent
/// starts the node as a standby, which fetches the WAL since the backup from the archive (its
/// `restore_command`) and then streams. pgBackRest writes the control file last, so an
/// interrupted restore never starts.
///
/// Usable: taken from this cluster (the stanza's system identifier is the cluster's), and its
/// WAL is a prefix of the timeline the replica will follow ([`Fit`]). After a point-in-time
/// restore the newest backups lie on the abandoned timeline, past the new one's fork, and a
/// standby made from them could never follow it; an older backup from before the fork can.
/// Without such a backup the caller clones with `pg_basebackup` (until the next backup).
async fn restore_replica(
    instance: &crate::postgres::Instance,
    p: &crate::config::PgBackRest,
    view: Option<&pgkeep_core::cluster::ClusterView>,
    fit: Fit<'_>,
    marker: &std::path::Path,
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
    if matches!(fit, Fit::Archive) && stanza.system_id.is_none() {
        return Err(NoUsableBackup(format!(
            "the stanza {} does not say which cluster it holds",
            p.stanza
        ))
        .into());
    }
    if let (Some(repo), Some(pgkeep_core::cluster::Initialize::SystemId(ours))) = (
        stanza.system_id.as_deref(),
        view.and_then(|v| v.initialize.as_ref()),
    ) && repo != ours
    {
        return Err(NoUsableBackup(format!(
            "the stanza {} holds the cluster with system identifier {repo}, this cluster is {ours}",
            p.stanza
        ))
        .into());
    }
    let mut archive = match fit {
        Fit::Cluster(_) => None,
        Fit::Archive => Some(ArchiveTimelines::list(instance, &base, &stanza).await?),
    };
    let mut refused = Vec::new();
    let mut newest = None;
    for b in stanza.backups.iter().rev().filter(|b| !b.error) {
        let fits = match (b.stop_position(), &fit, archive.as_mut()) {
            (None, _, _) => Err(format!(
                "its last WAL segment {:?} is unreadable",
                b.wal_stop
            )),
            (Some((tl, lsn)), Fit::Cluster(Some(v)), _) => {
                pgkeep_core::ha::backup_fits_cluster(v, tl, lsn)
            }
            (Some(_), Fit::Cluster(None), _) => Err("the cluster's state is not known yet".into()),
            (Some((tl, lsn)), Fit::Archive, Some(a)) => {
                match a.followed_from(instance, &base, tl).await {
                    // The DCS knows a newer timeline than the archive reaches: its history
                    // file was never archived, and a node restored from here would start a
                    // timeline whose number the lost one already used.
                    Ok((latest, _))
                        if view.and_then(known_timeline).is_some_and(|k| latest < k) =>
                    {
                        Err(format!(
                            "the archive reaches timeline {latest} from it, the cluster was on {}",
                            view.and_then(known_timeline).unwrap_or(latest)
                        ))
                    }
                    Ok((latest, history)) => {
                        pgkeep_core::ha::backup_fits_timeline(tl, lsn, latest, &history)
                    }
                    Err(e) => Err(format!("{e:#}")),
                }
            }
            (Some(_), Fit::Archive, None) => Err("the archive was not listed".into()),
        };
        match fits {
            Ok(()) => {
                newest = Some(b);
                break;
            }
            Err(why) => refused.push(format!("{}: {why}", b.label)),
        }
    }
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
    // Delta needs a data directory to compare with: pgBackRest recognises one by PG_VERSION or
    // by the manifest it writes first (an interrupted restore of its own).
    let d = &instance.data_dir;
    if d.join("PG_VERSION").exists() || d.join("backup.manifest").exists() {
        args.push("--delta".into());
    } else {
        empty_dir(d)?;
    }
    args.push("restore".into());
    // From here the directory is this restore's: an interruption leaves pgBackRest's manifest
    // and this marker, and the next attempt may restore over them.
    crate::fsutil::write_atomic(marker, b"", 0o600)
        .with_context(|| format!("writing {}", marker.display()))?;
    instance
        .runner
        .run(PGBACKREST, &args, &[], RESTORE_TIMEOUT)
        .await
        .context("pgbackrest restore")?;
    Ok(())
}

/// A restore of a large database takes hours; a stuck one is the operator's to see.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(48 * 3600);

/// The history files of the stanza's archive, read as a standby restored from it reads them
/// (`recovery_target_timeline = latest`: from its own timeline, each next one the archive
/// has a history file for).
struct ArchiveTimelines {
    /// `archive/<stanza>/<archive id>`.
    dir: String,
    /// Timelines with a history file.
    timelines: std::collections::BTreeSet<u32>,
}

impl ArchiveTimelines {
    async fn list(
        instance: &crate::postgres::Instance,
        base: &[String; 2],
        stanza: &crate::pgbackrest::info::Stanza,
    ) -> Result<ArchiveTimelines> {
        let id = stanza
            .archive_id
            .as_deref()
            .context("pgbackrest info shows no archive for the stanza")?;
        let dir = format!("archive/{}/{id}", stanza.name);
        let mut args: Vec<OsString> = base.iter().map(OsString::from).collect();
        args.extend(["repo-ls".into(), dir.clone().into()]);
        let out = instance
            .runner
            .run(PGBACKREST, &args, &[], Duration::from_secs(60))
            .await
            .with_context(|| format!("pgbackrest repo-ls {dir}"))?;
        let timelines = out
            .stdout
            .lines()
            .filter_map(|l| l.trim().strip_suffix(".history"))
            .filter_map(|t| u32::from_str_radix(t, 16).ok())
            .collect();
        Ok(ArchiveTimelines { dir, timelines })
    }

    /// The timeline a standby starting on `from` ends up following, and its history.
    async fn followed_from(
        &self,
        instance: &crate::postgres::Instance,
        base: &[String; 2],
        from: u32,
    ) -> Result<(u32, Vec<pgkeep_core::cluster::HistoryEntry>)> {
        let mut latest = from;
        while self.timelines.contains(&(latest + 1)) {
            latest += 1;
        }
        if latest == from {
            return Ok((latest, Vec::new()));
        }
        let file = format!("{}/{latest:08X}.history", self.dir);
        let mut args: Vec<OsString> = base.iter().map(OsString::from).collect();
        args.extend(["repo-get".into(), file.clone().into()]);
        let out = instance
            .runner
            .run(PGBACKREST, &args, &[], Duration::from_secs(60))
            .await
            .with_context(|| format!("pgbackrest repo-get {file}"))?;
        Ok((latest, super::observe::parse_history(&out.stdout)))
    }
}

/// Removes everything inside `dir`, keeping the directory itself; creates it 0700 when
/// missing.
fn empty_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsutil::empty_dir(dir).with_context(|| format!("emptying {}", dir.display()))
}

/// The newest timeline the DCS knows of: the members' and the one the history key implies.
fn known_timeline(v: &pgkeep_core::cluster::ClusterView) -> Option<u32> {
    let history = v
        .history
        .as_ref()
        .map(|h| h.last().map_or(1, |e| e.parent_timeline + 1));
    v.members
        .values()
        .filter_map(|m| m.data.timeline)
        .max()
        .max(history)
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
