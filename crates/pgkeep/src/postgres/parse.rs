//! Pure parsers for what PostgreSQL leaves on disk: `pg_controldata` output and
//! `postmaster.pid`.

use std::path::PathBuf;

use pgkeep_core::cluster::Lsn;

/// `Database cluster state` from pg_control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterState {
    /// Cleanly shut down as a primary.
    ShutDown,
    /// Cleanly shut down while in recovery (a standby).
    ShutDownInRecovery,
    /// A shutdown is under way.
    ShuttingDown,
    /// Crash recovery is under way.
    InCrashRecovery,
    /// Archive or streaming recovery (a running standby, or a crashed one).
    InArchiveRecovery,
    /// Running as a primary, or crashed while running as one.
    InProduction,
    /// Anything else, verbatim.
    Other(String),
}

impl ClusterState {
    fn parse(s: &str) -> ClusterState {
        match s {
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "shutting down" => ClusterState::ShuttingDown,
            "in crash recovery" => ClusterState::InCrashRecovery,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            "in production" => ClusterState::InProduction,
            other => ClusterState::Other(other.to_owned()),
        }
    }

    /// True when the data directory was shut down cleanly, so pg_rewind can use it as a target
    /// and a former primary's last checkpoint is its shutdown checkpoint.
    pub fn is_clean_shutdown(&self) -> bool {
        matches!(
            self,
            ClusterState::ShutDown | ClusterState::ShutDownInRecovery
        )
    }
}

/// The fields of `pg_controldata` pgkeep uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// `Database system identifier`.
    pub system_identifier: String,
    /// `Database cluster state`.
    pub state: ClusterState,
    /// `Latest checkpoint location`.
    pub checkpoint: Lsn,
    /// `Latest checkpoint's REDO location`.
    pub redo: Lsn,
    /// `Latest checkpoint's TimeLineID`.
    pub timeline: u32,
    /// `Minimum recovery ending location`.
    pub min_recovery_end: Lsn,
    /// `Min recovery ending loc's timeline`.
    pub min_recovery_end_timeline: u32,
    /// `Data page checksum version` (0 = off).
    pub data_checksum_version: u32,
    /// `wal_log_hints setting` is on.
    pub wal_log_hints: bool,
}

/// Parses `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse_controldata(text: &str) -> Result<ControlData, String> {
    let mut fields = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.trim(), v.trim());
        }
    }
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .ok_or_else(|| format!("pg_controldata output has no {k:?}"))
    };
    let lsn = |k: &str| -> Result<Lsn, String> { get(k)?.parse() };
    let num = |k: &str| -> Result<u32, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("pg_controldata {k:?} is not a number"))
    };
    Ok(ControlData {
        system_identifier: get("Database system identifier")?.to_owned(),
        state: ClusterState::parse(get("Database cluster state")?),
        checkpoint: lsn("Latest checkpoint location")?,
        redo: lsn("Latest checkpoint's REDO location")?,
        timeline: num("Latest checkpoint's TimeLineID")?,
        min_recovery_end: lsn("Minimum recovery ending location")?,
        min_recovery_end_timeline: num("Min recovery ending loc's timeline")?,
        data_checksum_version: num("Data page checksum version").unwrap_or(0),
        wal_log_hints: get("wal_log_hints setting").is_ok_and(|v| v == "on"),
    })
}

/// The contents of `postmaster.pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostmasterPid {
    /// The postmaster's PID.
    pub pid: i32,
    /// The data directory it serves.
    pub data_dir: PathBuf,
    /// Start time, seconds since the epoch.
    pub start_time: i64,
    /// Port.
    pub port: u16,
    /// First Unix socket directory.
    pub socket_dir: Option<PathBuf>,
    /// Status word (`starting`, `ready`, `standby`, `stopping`), present once the postmaster has
    /// got that far.
    pub status: Option<String>,
}

/// Parses `postmaster.pid`.
pub fn parse_postmaster_pid(text: &str) -> Result<PostmasterPid, String> {
    let lines: Vec<&str> = text.lines().collect();
    let line = |i: usize| lines.get(i).map(|s| s.trim()).unwrap_or("");
    let pid: i32 = line(0)
        .parse()
        .map_err(|_| format!("postmaster.pid: {:?} is not a PID", line(0)))?;
    if pid <= 0 {
        return Err(format!("postmaster.pid: {pid} is not a PID"));
    }
    Ok(PostmasterPid {
        pid,
        data_dir: PathBuf::from(line(1)),
        start_time: line(2)
            .parse()
            .map_err(|_| "postmaster.pid: bad start time".to_owned())?,
        port: line(3)
            .parse()
            .map_err(|_| "postmaster.pid: bad port".to_owned())?,
        socket_dir: Some(line(4)).filter(|s| !s.is_empty()).map(PathBuf::from),
        status: Some(line(7)).filter(|s| !s.is_empty()).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROLDATA: &str = "pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7713571444937004753
Database cluster state:               shut down in recovery
pg_control last modified:             Sun Nov 29 12:36:44 2026
Latest checkpoint location:           0/17529B0
Latest checkpoint's REDO location:    0/1752978
Latest checkpoint's TimeLineID:       3
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
wal_log_hints setting:                on
Data page checksum version:           1
";

    #[test]
    fn controldata_fields() {
        let c = parse_controldata(CONTROLDATA).unwrap();
        assert_eq!(c.system_identifier, "7713571444937004753");
        assert_eq!(c.state, ClusterState::ShutDownInRecovery);
        assert!(c.state.is_clean_shutdown());
        assert_eq!(c.checkpoint, "0/17529B0".parse().unwrap());
        assert_eq!(c.timeline, 3);
        assert_eq!(c.data_checksum_version, 1);
        assert!(c.wal_log_hints);
    }

    #[test]
    fn controldata_missing_field_is_an_error_naming_it() {
        let e = parse_controldata("Database cluster state: in production\n").unwrap_err();
        assert!(e.contains("Database system identifier"), "{e}");
    }

    #[test]
    fn postmaster_pid_fields() {
        let p = parse_postmaster_pid("10002\n/var/tmp/pgx/d\n1795955807\n5432\n/var/tmp/pgx\n\n   780495        34\nready   \n").unwrap();
        assert_eq!(p.pid, 10002);
        assert_eq!(p.port, 5432);
        assert_eq!(p.status.as_deref(), Some("ready"));
        assert_eq!(p.socket_dir, Some(PathBuf::from("/var/tmp/pgx")));
        assert!(parse_postmaster_pid("").is_err());
        assert!(parse_postmaster_pid("-1\n").is_err());
        // A pid file written half-way (postmaster still starting) has no status yet.
        assert_eq!(
            parse_postmaster_pid("7\n/d\n1\n5432\n").unwrap().status,
            None
        );
    }
}
