//! Archiving health as the primary publishes it: the `pgkeep_archive` field of its member key
//! and of `GET /patroni`, read by `ctl list`; and the log events its changes cause.
//!
//! The facts are PostgreSQL's own (`pg_stat_archiver`): archiving is *failing* when the last
//! failure is newer than the last success, which is how PostgreSQL's documentation tells a
//! stuck archiver from one that recovered.

use serde::{Deserialize, Serialize};

use super::metrics::ArchiverStats;

/// The member-key and status field.
pub const ARCHIVE_FIELD: &str = "pgkeep_archive";

/// What the primary says about its archiving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHealth {
    /// WAL files archived since the statistics were reset.
    pub archived_count: i64,
    /// The last WAL file archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<String>,
    /// Failed attempts.
    pub failed_count: i64,
    /// The WAL file of the last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// When (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_time: Option<String>,
    /// The last attempt failed: WAL is piling up in `pg_wal`.
    pub failing: bool,
    /// Segments pgBackRest dropped from the archive queue since the agent started: PostgreSQL
    /// counts them as archived, the archive does not have them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_count: u64,
    /// The last dropped segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dropped_wal: Option<String>,
    /// When pgBackRest logged it (its local time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dropped_at: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn rfc3339(ms: Option<i64>) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms?) * 1_000_000).ok()?;
    Some(crate::pki::format_time(t))
}

/// True when the last failure is newer than the last success.
pub fn failing(a: &ArchiverStats) -> bool {
    match (a.last_failed_ms, a.last_archived_ms) {
        (Some(f), Some(s)) => f > s,
        (Some(_), None) => true,
        _ => false,
    }
}

impl ArchiveHealth {
    /// The health to publish; `None` when nothing was ever archived or attempted (archiving
    /// off, or a primary too young to have switched a segment).
    pub fn from_stats(a: &ArchiverStats) -> Option<ArchiveHealth> {
        if a.archived_count == 0 && a.failed_count == 0 {
            return None;
        }
        Some(ArchiveHealth {
            archived_count: a.archived_count,
            last_archived_wal: a.last_archived_wal.clone(),
            last_archived_time: rfc3339(a.last_archived_ms),
            failed_count: a.failed_count,
            last_failed_wal: a.last_failed_wal.clone(),
            last_failed_time: rfc3339(a.last_failed_ms),
            failing: failing(a),
            dropped_count: 0,
            last_dropped_wal: None,
            last_dropped_at: None,
        })
    }

    /// The same health with `count` dropped segments, the last one `last`.
    pub fn with_drops(
        mut self,
        count: u64,
        last: Option<&crate::pgbackrest::drops::Dropped>,
    ) -> Self {
        self.dropped_count = count;
        self.last_dropped_wal = last.map(|d| d.wal.clone());
        self.last_dropped_at = last.map(|d| d.at.clone());
        self
    }

    /// One line for people: `ok, last 0000...05 at T` or `FAILING: 0000...06 at T (3 failures)`.
    pub fn summary(&self) -> String {
        let dash = || "-".to_owned();
        let gap = if self.dropped_count > 0 {
            format!(
                "GAP: {} segments dropped from the archive queue (last {} at {}), take a full backup; ",
                self.dropped_count,
                self.last_dropped_wal.clone().unwrap_or_else(dash),
                self.last_dropped_at.clone().unwrap_or_else(dash),
            )
        } else {
            String::new()
        };
        gap + &self.state_summary()
    }

    fn state_summary(&self) -> String {
        let dash = || "-".to_owned();
        if self.failing {
            format!(
                "FAILING: {} at {} ({} failures; last success {})",
                self.last_failed_wal.clone().unwrap_or_else(dash),
                self.last_failed_time.clone().unwrap_or_else(dash),
                self.failed_count,
                self.last_archived_wal.clone().unwrap_or_else(dash),
            )
        } else {
            format!(
                "ok, last {} at {} ({} archived, {} failures)",
                self.last_archived_wal.clone().unwrap_or_else(dash),
                self.last_archived_time.clone().unwrap_or_else(dash),
                self.archived_count,
                self.failed_count
            )
        }
    }
}

/// A change of archiving health worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveEvent {
    /// A new failure (each one is logged: PostgreSQL retries a segment three times, then
    /// waits a minute).
    Failed {
        /// The WAL file that could not be archived.
        wal: String,
        /// Failures so far.
        failures: i64,
    },
    /// Archiving works again after failures.
    Recovered {
        /// The last WAL file archived.
        wal: String,
    },
}

/// The event between two observations of the same postmaster (`prev` None: the first one,
/// which reports a failing archiver once).
pub fn event(prev: Option<&ArchiverStats>, now: &ArchiverStats) -> Option<ArchiveEvent> {
    let was_failing = prev.is_some_and(failing);
    let new_failure = prev.map_or(failing(now), |p| now.failed_count > p.failed_count);
    if failing(now) && new_failure {
        return Some(ArchiveEvent::Failed {
            wal: now.last_failed_wal.clone().unwrap_or_default(),
            failures: now.failed_count,
        });
    }
    if was_failing && !failing(now) {
        return Some(ArchiveEvent::Recovered {
            wal: now.last_archived_wal.clone().unwrap_or_default(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ok: i64, ok_ms: Option<i64>, failed: i64, failed_ms: Option<i64>) -> ArchiverStats {
        ArchiverStats {
            archived_count: ok,
            failed_count: failed,
            last_archived_ms: ok_ms,
            last_failed_ms: failed_ms,
            last_archived_wal: ok_ms.map(|_| "000000010000000000000004".into()),
            last_failed_wal: failed_ms.map(|_| "000000010000000000000005".into()),
        }
    }

    #[test]
    fn failing_means_the_last_failure_is_newer_than_the_last_success() {
        assert!(!failing(&stats(4, Some(1000), 0, None)));
        assert!(failing(&stats(4, Some(1000), 1, Some(2000))));
        assert!(!failing(&stats(5, Some(3000), 1, Some(2000))));
        assert!(failing(&stats(0, None, 2, Some(2000))));
    }

    #[test]
    fn health_is_published_once_something_was_archived_or_tried() {
        assert_eq!(ArchiveHealth::from_stats(&stats(0, None, 0, None)), None);
        let h = ArchiveHealth::from_stats(&stats(4, Some(1_795_995_206_000), 0, None)).unwrap();
        assert!(!h.failing);
        assert_eq!(
            h.last_archived_time.as_deref(),
            Some("2026-11-29T23:33:26Z")
        );
        assert!(
            h.summary().starts_with("ok, last 000000010000000000000004"),
            "{}",
            h.summary()
        );
        let h = ArchiveHealth::from_stats(&stats(4, Some(1000), 3, Some(2000))).unwrap();
        assert!(
            h.summary().starts_with("FAILING: 000000010000000000000005"),
            "{}",
            h.summary()
        );
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(serde_json::from_value::<ArchiveHealth>(v).unwrap(), h);
        assert!(!serde_json::to_string(&h).unwrap().contains("dropped"));
    }

    #[test]
    fn dropped_segments_lead_the_summary_even_when_archiving_looks_fine() {
        let d = crate::pgbackrest::drops::Dropped {
            at: "2026-11-30 03:10:02.201".into(),
            wal: "000000010000000000000006".into(),
        };
        let h = ArchiveHealth::from_stats(&stats(6, Some(1000), 0, None))
            .unwrap()
            .with_drops(2, Some(&d));
        assert!(!h.failing);
        assert!(
            h.summary().starts_with(
                "GAP: 2 segments dropped from the archive queue (last 000000010000000000000006 at 2026-11-30 03:10:02.201)"
            ),
            "{}",
            h.summary()
        );
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["dropped_count"], 2);
        assert_eq!(serde_json::from_value::<ArchiveHealth>(v).unwrap(), h);
    }

    #[test]
    fn each_new_failure_and_the_recovery_are_events() {
        let good = stats(4, Some(1000), 0, None);
        let bad = stats(4, Some(1000), 1, Some(2000));
        let worse = stats(4, Some(1000), 2, Some(3000));
        let healed = stats(5, Some(4000), 2, Some(3000));
        assert_eq!(event(None, &good), None);
        assert_eq!(event(Some(&good), &good), None);
        assert_eq!(
            event(Some(&good), &bad),
            Some(ArchiveEvent::Failed {
                wal: "000000010000000000000005".into(),
                failures: 1
            })
        );
        assert!(matches!(
            event(Some(&bad), &worse),
            Some(ArchiveEvent::Failed { failures: 2, .. })
        ));
        assert_eq!(event(Some(&worse), &worse), None);
        assert_eq!(
            event(Some(&worse), &healed),
            Some(ArchiveEvent::Recovered {
                wal: "000000010000000000000004".into()
            })
        );
        // An agent that starts beside a failing archiver says so once.
        assert!(matches!(
            event(None, &bad),
            Some(ArchiveEvent::Failed { .. })
        ));
    }
}
