//! `pgkeep backup-scheduler -c FILE`: runs on the pgBackRest repository host, as the
//! `pgbackrest` user (backups must start there; pgBackRest refuses otherwise), with its own
//! read-only etcd identity. Every `interval` it reads the cluster from etcd (is there a primary?)
//! and the repository (`pgbackrest info`), asks [`pgkeep_core::ops::backup_schedule::next`]
//! what to do, and starts that backup; pgBackRest finds the primary (or, with `backup-standby`,
//! a replica) among the nodes its configuration lists. It creates the stanza once a primary
//! exists and the repository has none.
//!
//! ```yaml
//! scope: demo
//! namespace: /service/
//! etcd3: {hosts: [etcd1.example:2379], cacert: /etc/pgbackrest/tls/ca.crt,
//!         cert: /etc/pgbackrest/tls/etcd-client-backup.crt, key: /etc/pgbackrest/tls/etcd-client-backup.key}
//! pgbackrest: {config_path: /etc/pgbackrest, stanza: demo}   # stanza: default scope
//! schedule: {full: "0 1 * * 0", diff: "0 1 * * 1-6", incr: "0 */4 * * *"}   # cron, UTC
//! grace: 3600          # seconds after its time a backup that has not started counts as missed
//! retry_after: 300     # seconds before a failed backup is tried again
//! interval: 30         # seconds between checks
//! status_file: /var/lib/pgbackrest/pgkeep-scheduler.json
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use pgkeep_core::ops::backup_schedule::{self, Attempt, BackupType, Cron, Next, Schedule, Taken};
use serde::Deserialize;
use serde_json::json;

use crate::config::ConfigError;
use crate::dcs::{Dcs, EtcdDcs, EtcdSettings, TlsFiles};

const PGBACKREST: &str = "/usr/bin/pgbackrest";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    hosts: Vec<String>,
    cacert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPgBackRest {
    config_path: PathBuf,
    stanza: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    scope: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    etcd3: RawEtcd,
    pgbackrest: RawPgBackRest,
    #[serde(default)]
    schedule: BTreeMap<String, String>,
    grace: Option<i64>,
    retry_after: Option<i64>,
    interval: Option<u64>,
    status_file: Option<PathBuf>,
}

fn default_namespace() -> String {
    "/service/".into()
}

/// The scheduler's checked configuration.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// etcd, read only.
    pub etcd: EtcdSettings,
    /// pgBackRest's configuration directory on this host.
    pub config_path: PathBuf,
    /// The stanza.
    pub stanza: String,
    /// Schedules, grace and retry.
    pub schedule: Schedule,
    /// Time between checks.
    pub interval: Duration,
    /// Where the status is written (JSON), if anywhere.
    pub status_file: Option<PathBuf>,
}

impl SchedulerConfig {
    /// Reads and checks `file`; errors name the file, the key and the reason.
    pub fn load(file: &Path) -> Result<SchedulerConfig, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, "", format!("cannot read the file: {e}")))?;
        let doc: serde_json::Value = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::new(file, "", format!("invalid YAML: {e}")))?;
        let raw: RawScheduler = serde_path_to_error::deserialize(&doc)
            .map_err(|e| ConfigError::new(file, e.path().to_string(), e.inner().to_string()))?;
        let err = |k: &str, r: String| ConfigError::new(file, k, r);
        let mut cron = BTreeMap::new();
        for (k, expr) in &raw.schedule {
            let kind = BackupType::parse(k).ok_or_else(|| {
                err(
                    &format!("schedule.{k}"),
                    "the backup types are full, diff and incr".into(),
                )
            })?;
            let c = Cron::parse(expr).map_err(|e| err(&format!("schedule.{k}"), e.to_string()))?;
            cron.insert(kind, c);
        }
        if !cron.contains_key(&BackupType::Full) && !cron.is_empty() {
            return Err(err(
                "schedule.full",
                "missing: differential and incremental backups need full ones".into(),
            ));
        }
        let positive = |k: &str, v: Option<i64>, default: i64| match v {
            None => Ok(default),
            Some(v) if v > 0 => Ok(v),
            Some(v) => Err(err(k, format!("{v} must be a positive number of seconds"))),
        };
        if !raw.pgbackrest.config_path.is_absolute() {
            return Err(err(
                "pgbackrest.config_path",
                format!(
                    "{} is not an absolute path",
                    raw.pgbackrest.config_path.display()
                ),
            ));
        }
        let stanza = raw.pgbackrest.stanza.unwrap_or_else(|| raw.scope.clone());
        crate::pgbackrest::check_stanza(&stanza).map_err(|e| err("pgbackrest.stanza", e.reason))?;
        let interval = match raw.interval {
            None => 30,
            Some(v) if (1..=3600).contains(&v) => v,
            Some(v) => return Err(err("interval", format!("{v} is outside 1 to 3600 seconds"))),
        };
        Ok(SchedulerConfig {
            etcd: EtcdSettings {
                endpoints: raw
                    .etcd3
                    .hosts
                    .iter()
                    .map(|h| format!("https://{h}"))
                    .collect(),
                tls: Some(TlsFiles {
                    ca: raw.etcd3.cacert,
                    cert: raw.etcd3.cert,
                    key: raw.etcd3.key,
                }),
                namespace: raw.namespace,
                scope: raw.scope,
                request_timeout: Duration::from_secs(3),
                insecure: false,
            },
            config_path: raw.pgbackrest.config_path,
            stanza,
            schedule: Schedule {
                cron,
                grace_secs: positive("grace", raw.grace, 3600)?,
                retry_after_secs: positive("retry_after", raw.retry_after, 300)?,
            },
            interval: Duration::from_secs(interval),
            status_file: raw.status_file,
        })
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(crate::pki::format_time)
        .unwrap_or_else(|_| secs.to_string())
}

/// Runs pgBackRest with the scheduler's configuration; output on failure.
async fn pgbackrest(cfg: &SchedulerConfig, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(PGBACKREST)
        .arg(format!("--config-path={}", cfg.config_path.display()))
        .arg(format!("--stanza={}", cfg.stanza))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        // Not killed when the scheduler stops: a backup under way finishes on its own.
        .output()
        .await
        .with_context(|| format!("running pgbackrest {}", args.join(" ")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "pgbackrest {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

/// The scheduler's memory between checks.
#[derive(Default)]
struct State {
    failed: Option<Attempt>,
    /// The slot last warned about (one warning per slot and condition).
    warned: Option<(i64, &'static str)>,
    last_result: Option<serde_json::Value>,
}

/// Runs the scheduler until SIGTERM or SIGINT.
pub async fn run(cfg: SchedulerConfig) -> Result<()> {
    let dcs = EtcdDcs::connect(&cfg.etcd)
        .await
        .context("connecting to etcd")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut state = State::default();
    tracing::info!(
        stanza = %cfg.stanza,
        schedules = ?cfg.schedule.cron.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        "backup scheduler started"
    );
    loop {
        reload_etcd_tls(&cfg, &dcs).await;
        tokio::select! {
            r = check(&cfg, &dcs, &mut state) => {
                if let Err(e) = r {
                    tracing::error!(error = %format!("{e:#}"), "backup scheduler check failed");
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        tokio::select! {
            () = tokio::time::sleep(cfg.interval) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("backup scheduler stopped");
    Ok(())
}

/// Takes new etcd TLS files (`pgkeep pki rotate`, a CA rollover) before a check: the client
/// switches once a separate client with them has read from etcd, and keeps what it has
/// otherwise.
async fn reload_etcd_tls(cfg: &SchedulerConfig, dcs: &EtcdDcs) {
    match dcs.reload_tls(&cfg.etcd).await {
        Ok(crate::dcs::TlsReload::Reloaded) => tracing::info!(
            "etcd client certificate or trusted CAs reloaded: new etcd connections use them"
        ),
        Ok(crate::dcs::TlsReload::Unchanged) => {}
        Err(e) => tracing::error!(
            error = %e,
            "etcd client certificate NOT reloaded: the scheduler keeps using the previous one"
        ),
    }
}

/// One check: what is due, and run it.
async fn check(cfg: &SchedulerConfig, dcs: &EtcdDcs, state: &mut State) -> Result<()> {
    let primary_known = match dcs.load().await {
        Ok(s) => s.view.leader.is_some(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster from etcd");
            false
        }
    };
    let info = pgbackrest(cfg, &["info", "--output=json"]).await?;
    let stanza = crate::pgbackrest::info::parse(&info, &cfg.stanza)?;
    if stanza.missing() && primary_known {
        tracing::info!(status = %stanza.status.1, "creating the stanza");
        pgbackrest(cfg, &["stanza-create"]).await?;
        pgbackrest(cfg, &["check"]).await?;
        tracing::info!("stanza created; the primary's WAL reaches the repository");
    }
    let taken: Vec<Taken> = stanza
        .backups
        .iter()
        .filter_map(|b| {
            Some(Taken {
                kind: BackupType::parse(&b.kind)?,
                start: b.start,
            })
        })
        .collect();
    let now = unix_now();
    let next = backup_schedule::next(&cfg.schedule, &taken, state.failed, primary_known, now);
    match &next {
        Next::Idle | Next::Backoff { .. } => {}
        Next::NoPrimary {
            kind,
            slot,
            missed_by,
        } => {
            if state.warned != Some((*slot, "no primary")) {
                state.warned = Some((*slot, "no primary"));
                tracing::warn!(
                    kind = kind.as_str(),
                    slot = %rfc3339(*slot),
                    missed = missed_by.is_some(),
                    "a scheduled backup is due but the cluster has no primary; waiting"
                );
            }
        }
        Next::Run {
            kind,
            slot,
            missed_by,
        } => {
            if let Some(late) = missed_by {
                tracing::warn!(
                    kind = kind.as_str(),
                    slot = %rfc3339(*slot),
                    late_secs = late,
                    "MISSED scheduled backup: it did not start within the grace period; \
                     running it now (once, for every missed slot)"
                );
            }
            tracing::info!(kind = kind.as_str(), slot = %rfc3339(*slot), "starting scheduled backup");
            let t0 = std::time::Instant::now();
            let r = pgbackrest(cfg, &["backup", &format!("--type={}", kind.as_str())]).await;
            let secs = t0.elapsed().as_secs_f64();
            let ok = r.is_ok();
            match r {
                Ok(_) => {
                    state.failed = None;
                    tracing::info!(kind = kind.as_str(), secs, "scheduled backup done");
                }
                Err(e) => {
                    state.failed = Some(Attempt {
                        slot: *slot,
                        at: unix_now(),
                    });
                    tracing::error!(
                        kind = kind.as_str(),
                        error = %format!("{e:#}"),
                        retry_after = cfg.schedule.retry_after_secs,
                        "scheduled backup FAILED"
                    );
                }
            }
            state.last_result = Some(json!({
                "type": kind.as_str(), "slot": rfc3339(*slot), "ok": ok, "seconds": secs,
                "missed_by_seconds": missed_by, "finished": rfc3339(unix_now()),
            }));
        }
    }
    if let Some(f) = &cfg.status_file {
        let doc = json!({
            "checked": rfc3339(now),
            "primary_known": primary_known,
            "next": format!("{next:?}"),
            "backups": taken.len(),
            "last_result": state.last_result,
        });
        let text = serde_json::to_string_pretty(&doc)? + "\n";
        crate::fsutil::write_atomic(f, text.as_bytes(), 0o640)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<SchedulerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("scheduler.yml");
        std::fs::write(&f, text).unwrap();
        SchedulerConfig::load(&f)
    }

    const BASE: &str = "scope: demo\netcd3: {hosts: [e1:2379], cacert: /c, cert: /e.crt, key: /e.key}\n\
                        pgbackrest: {config_path: /etc/pgbackrest}\n";

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let c = load(&format!(
            "{BASE}schedule: {{full: '0 1 * * 0', incr: '0 * * * *'}}\n"
        ))
        .unwrap();
        assert_eq!(c.stanza, "demo");
        assert_eq!(c.schedule.cron.len(), 2);
        assert_eq!(c.schedule.grace_secs, 3600);
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.etcd.endpoints, ["https://e1:2379"]);
    }

    #[test]
    fn errors_name_the_key() {
        for (extra, key) in [
            ("schedule: {weekly: '0 1 * * 0'}\n", "schedule.weekly"),
            ("schedule: {full: '0 25 * * *'}\n", "schedule.full"),
            ("schedule: {incr: '0 * * * *'}\n", "schedule.full"),
            ("grace: -5\n", "grace"),
            ("interval: 0\n", "interval"),
            ("unknown: 1\n", ""),
        ] {
            let e = load(&format!("{BASE}{extra}")).unwrap_err();
            assert!(
                e.key == key || (key.is_empty() && e.reason.contains("unknown")),
                "{extra}: {e}"
            );
        }
        let e = load("scope: demo\netcd3: {hosts: [e1:2379], cacert: /c, cert: /e, key: /k}\npgbackrest: {config_path: rel}\n").unwrap_err();
        assert_eq!(e.key, "pgbackrest.config_path");
    }
}
