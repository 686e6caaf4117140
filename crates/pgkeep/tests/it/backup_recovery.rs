//! Recovery and archive health with pgBackRest in `pgkeep up`: the cluster rebuilt from the
//! repository when every data directory is lost, and WAL dropped from a full archive queue
//! reported as a gap; against real pgBackRest, PostgreSQL and etcd.

use std::fs;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::backup::{
    cluster_json, leader_name, psql, stop_repository_server, su_psql, superuser_conn, wait_for,
};
use crate::local::{Scenario, ok};

/// Every data directory is lost while the cluster is down: with no leader and no member to
/// copy, each node makes its replica from the repository, replays the archive, and one of them
/// takes over; nothing written and archived before is missing.
#[test]
fn with_every_data_directory_lost_replicas_come_from_the_repository_and_one_leads() -> Result<()> {
    let sc = Scenario::new("dr");
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    let d = sc.dir.clone();
    let cluster: Value = cluster_json(&sc)?;
    let app = cluster["libpq"]["app"].as_str().context("app libpq")?;
    psql(
        app,
        "CREATE TABLE dr(x int); INSERT INTO dr SELECT generate_series(1, 1000)",
    )?;
    ok(&["backup", "run", "--dir", sc.d(), "--type", "full"])?;
    // Rows after the backup live only in the archive once the segment is complete.
    psql(app, "INSERT INTO dr SELECT generate_series(1001, 2000)")?;
    let rows = sc.ctl_list()?;
    let leader = rows
        .iter()
        .find(|r| r["role"] == "leader")
        .and_then(|r| r["name"].as_str())
        .context("no leader")?
        .to_owned();
    let tl_before = rows
        .iter()
        .find(|r| r["role"] == "leader")
        .and_then(|r| r["timeline"].as_u64())
        .unwrap_or(0);
    let su = superuser_conn(&cluster, &leader, "postgres")?;
    let segment = su_psql(
        &su,
        &["SELECT pg_walfile_name(pg_current_wal_lsn()) FROM pg_switch_wal()"],
    )?;
    wait_for("the last segment to reach the archive", || {
        Ok(su_psql(
            &su,
            &["SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"],
        )?
        .as_str()
            >= segment.as_str())
    })?;
    ok(&["down", "--dir", sc.d()])?;
    // The agents' logs go on in the same files: only what follows counts.
    let mut log_from = std::collections::HashMap::new();
    for n in ["node1", "node2", "node3"] {
        let log = d.join(format!("logs/{n}-agent.log"));
        log_from.insert(n, fs::metadata(&log)?.len() as usize);
        let data = d.join(format!("nodes/{n}/data"));
        fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }

    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    wait_for("every member running again", || {
        crate::local::wait_members(&sc).map(|()| true)
    })?;
    ensure!(
        psql(app, "SELECT count(*), max(x) FROM dr")? == "2000|2000",
        "rows written before the loss are missing"
    );
    let rows = sc.ctl_list()?;
    ensure!(
        rows.iter()
            .all(|r| r["timeline"].as_u64().is_some_and(|t| t > tl_before)),
        "the new leader should have promoted onto a new timeline: {rows:?}"
    );
    for n in ["node1", "node2", "node3"] {
        let log = fs::read_to_string(d.join(format!("logs/{n}-agent.log")))?;
        let log = log.get(log_from[n]..).unwrap_or_default();
        ensure!(
            log.contains(
                "no running member to copy: restoring a replica from the backup repository"
            ) && log.contains("replica restored from the pgBackRest repository"),
            "{n} was not restored from the repository"
        );
        ensure!(
            !log.contains("cloning with pg_basebackup"),
            "{n} fell back to pg_basebackup"
        );
        let su = superuser_conn(&cluster, n, "app")?;
        let count = su_psql(
            &su,
            &["SET search_path = app, public", "SELECT count(*) FROM dr"],
        )?;
        ensure!(count == "2000", "{n}: {count}");
    }
    ok(&["backup", "check", "--dir", sc.d()])?;
    Ok(())
}

/// The repository is unreachable long enough for the archive queue to pass its limit:
/// pgBackRest drops the queued WAL and tells PostgreSQL it was archived; the agent finds the
/// drop in pgBackRest's log and reports the gap.
#[test]
fn wal_dropped_from_a_full_archive_queue_is_reported_as_a_gap() -> Result<()> {
    let sc = Scenario::new("drop");
    sc.up(&["--no-haproxy", "--no-backup-scheduler"])?;
    let d = sc.dir.clone();
    let cluster: Value = cluster_json(&sc)?;
    let leader = leader_name(&sc)?;
    ensure!(
        !ok(&["ctl", "--dir", sc.d(), "list"])?.contains("GAP"),
        "a gap before anything was dropped"
    );
    // The smallest queue pgBackRest allows, as an operator would set it in the node's file.
    let conf = d.join(format!("nodes/{leader}/pgbackrest/pgbackrest.conf"));
    let text = fs::read_to_string(&conf)?;
    ensure!(text.contains("archive-push-queue-max="), "{text}");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("archive-push-queue-max=") {
                "archive-push-queue-max=16MiB\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&conf, text)?;

    stop_repository_server(&d)?;
    let su = superuser_conn(&cluster, &leader, "postgres")?;
    let mut fill = vec!["CREATE TABLE fill(x int)"];
    for _ in 0..3 {
        fill.extend([
            "INSERT INTO fill SELECT generate_series(1, 1000)",
            "SELECT pg_switch_wal()",
        ]);
    }
    su_psql(&su, &fill)?;
    wait_for("the gap in ctl list", || {
        Ok(ok(&["ctl", "--dir", sc.d(), "list"])?.contains(&format!("Archive {leader}: GAP: ")))
    })?;
    let log = fs::read_to_string(d.join(format!("logs/{leader}-agent.log")))?;
    ensure!(
        log.contains("pgBackRest dropped WAL from the archive queue"),
        "no error logged"
    );
    // PostgreSQL itself sees nothing wrong: the dropped segments count as archived.
    let failing = su_psql(
        &su,
        &["SELECT coalesce(last_failed_time > last_archived_time, false) FROM pg_stat_archiver"],
    )?;
    ensure!(
        failing == "f",
        "pg_stat_archiver should look healthy: {failing}"
    );
    Ok(())
}
