//! Scheduled backups: cron schedules (UTC) per backup type and the decision of what to run now,
//! from the backups the repository holds. Pure: the scheduler's shell reads the clock, the
//! DCS and `pgbackrest info`, and runs what this decides.
//!
//! Rules:
//! - A type is **due** when its latest scheduled time (at or before now) has no backup of that
//!   type or a stronger one (full > diff > incr) started at or after it. The repository is the
//!   record, so a restarted scheduler never runs a slot twice, and two slots never produce
//!   two backups: one run covers every missed slot of its type and every weaker type.
//! - The strongest due type runs; at most one backup at a time.
//! - A due slot older than the grace period is **missed**: it still runs (once), and the
//!   scheduler reports it, with how late it is.
//! - A failed attempt is retried after `retry_after`, never in a tight loop.

use std::collections::BTreeMap;

/// A backup type, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackupType {
    /// Changes since the last backup of any type.
    Incr,
    /// Changes since the last full backup.
    Diff,
    /// Everything.
    Full,
}

impl BackupType {
    /// pgBackRest's name (`--type=`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Incr => "incr",
            BackupType::Diff => "diff",
            BackupType::Full => "full",
        }
    }

    /// The type pgBackRest reports (`full`, `diff`, `incr`).
    pub fn parse(s: &str) -> Option<BackupType> {
        match s {
            "incr" => Some(BackupType::Incr),
            "diff" => Some(BackupType::Diff),
            "full" => Some(BackupType::Full),
            _ => None,
        }
    }
}

/// A schedule that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cron schedule {expr:?}: {reason}")]
pub struct CronError {
    /// The expression.
    pub expr: String,
    /// What is wrong.
    pub reason: String,
}

/// A standard five-field cron expression (minute hour day-of-month month day-of-week), in UTC:
/// numbers, `*`, lists (`1,15`), ranges (`1-5`) and steps (`*/4`, `0-30/10`); day of week 0-7
/// with 0 and 7 Sunday. As in cron, when both day fields are restricted a day matching either
/// one matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minute: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    dom_any: bool,
    dow_any: bool,
}

fn field(expr: &str, text: &str, lo: u32, hi: u32, what: &str) -> Result<(u64, bool), CronError> {
    let bad = |reason: String| CronError {
        expr: expr.to_owned(),
        reason: format!("{what}: {reason}"),
    };
    let mut mask = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad(format!("step {s:?} is not a positive number")))?,
            ),
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let n = |x: &str| {
                x.parse::<u32>()
                    .map_err(|_| bad(format!("{x:?} is not a number")))
            };
            (n(a)?, n(b)?)
        } else {
            let v = range
                .parse::<u32>()
                .map_err(|_| bad(format!("{range:?} is not a number")))?;
            // `5/15` means from 5 to the end, every 15.
            if part.contains('/') { (v, hi) } else { (v, v) }
        };
        if a < lo || b > hi || a > b {
            return Err(bad(format!("{part:?} is outside {lo}-{hi}")));
        }
        let mut v = a;
        while v <= b {
            mask |= 1 << v;
            v += step;
        }
    }
    Ok((mask, text == "*"))
}

impl Cron {
    /// Parses `m h dom mon dow`.
    pub fn parse(expr: &str) -> Result<Cron, CronError> {
        let f: Vec<&str> = expr.split_whitespace().collect();
        if f.len() != 5 {
            return Err(CronError {
                expr: expr.to_owned(),
                reason: format!(
                    "{} fields; cron has five: minute hour day-of-month month day-of-week",
                    f.len()
                ),
            });
        }
        let (minute, _) = field(expr, f[0], 0, 59, "minute")?;
        let (hour, _) = field(expr, f[1], 0, 23, "hour")?;
        let (dom, dom_any) = field(expr, f[2], 1, 31, "day of month")?;
        let (month, _) = field(expr, f[3], 1, 12, "month")?;
        let (mut dow, dow_any) = field(expr, f[4], 0, 7, "day of week")?;
        if dow & (1 << 7) != 0 {
            dow |= 1;
        }
        Ok(Cron {
            minute,
            hour,
            dom,
            month,
            dow,
            dom_any,
            dow_any,
        })
    }

    fn day_matches(&self, days: i64) -> bool {
        let (_, m, d) = civil_from_days(days);
        // 1970-01-01 was a Thursday (4).
        let wd = (days + 4).rem_euclid(7);
        let dom = self.dom & (1 << d) != 0;
        let dow = self.dow & (1 << wd) != 0;
        let day = match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        };
        day && self.month & (1 << m) != 0
    }

    /// The latest scheduled time at or before `now` (Unix seconds, UTC), looking back at most
    /// 366 days; `None` when there is none (a 29 February schedule in a long gap).
    pub fn latest_at_or_before(&self, now: i64) -> Option<i64> {
        let today = now.div_euclid(86_400);
        let secs = now.rem_euclid(86_400);
        for back in 0..=366 {
            let day = today - back;
            if !self.day_matches(day) {
                continue;
            }
            let limit = if back == 0 { secs / 60 } else { 24 * 60 - 1 };
            for minute_of_day in (0..=limit).rev() {
                let (h, m) = (minute_of_day / 60, minute_of_day % 60);
                if self.hour & (1 << h) != 0 && self.minute & (1 << m) != 0 {
                    return Some(day * 86_400 + minute_of_day * 60);
                }
            }
        }
        None
    }
}

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The schedules of one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Per type; a type without a schedule is never started by the scheduler.
    pub cron: BTreeMap<BackupType, Cron>,
    /// A slot not started this many seconds after its time counts as missed.
    pub grace_secs: i64,
    /// A failed attempt is retried after this many seconds.
    pub retry_after_secs: i64,
}

/// A backup in the repository: its type and start (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Type.
    pub kind: BackupType,
    /// Start.
    pub start: i64,
}

/// The last failed attempt of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The slot (scheduled time) it was for.
    pub slot: i64,
    /// When it failed.
    pub at: i64,
}

/// What the scheduler should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing is due.
    Idle,
    /// Start this backup now.
    Run {
        /// Type.
        kind: BackupType,
        /// The scheduled time it is for.
        slot: i64,
        /// Seconds past the grace period (`Some`: the slot was missed and this is its catch-up).
        missed_by: Option<i64>,
    },
    /// Due, but no primary is known (the cluster has no leader): waiting.
    NoPrimary {
        /// Type.
        kind: BackupType,
        /// The slot.
        slot: i64,
        /// Seconds past the grace period, when missed.
        missed_by: Option<i64>,
    },
    /// Due, but the last attempt failed less than `retry_after` ago.
    Backoff {
        /// Type.
        kind: BackupType,
        /// The slot.
        slot: i64,
        /// When to try again.
        retry_at: i64,
    },
}

/// The slot `kind` is due for, if any.
fn due_slot(s: &Schedule, kind: BackupType, taken: &[Taken], now: i64) -> Option<i64> {
    let slot = s.cron.get(&kind)?.latest_at_or_before(now)?;
    let covered = taken.iter().any(|t| t.kind >= kind && t.start >= slot);
    (!covered).then_some(slot)
}

/// Decides what to do now from the schedule, the repository's backups, the last failed attempt
/// and whether a primary is known.
pub fn next(
    s: &Schedule,
    taken: &[Taken],
    failed: Option<Attempt>,
    primary_known: bool,
    now: i64,
) -> Next {
    let Some((kind, slot)) = [BackupType::Full, BackupType::Diff, BackupType::Incr]
        .into_iter()
        .find_map(|k| due_slot(s, k, taken, now).map(|slot| (k, slot)))
    else {
        return Next::Idle;
    };
    let late = now - slot - s.grace_secs;
    let missed_by = (late > 0).then_some(late);
    if !primary_known {
        return Next::NoPrimary {
            kind,
            slot,
            missed_by,
        };
    }
    if let Some(a) = failed
        && a.slot == slot
        && now < a.at + s.retry_after_secs
    {
        return Next::Backoff {
            kind,
            slot,
            retry_at: a.at + s.retry_after_secs,
        };
    }
    Next::Run {
        kind,
        slot,
        missed_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-29 (a Sunday) 00:00 UTC.
    const SUN: i64 = 1_795_910_400;
    const H: i64 = 3600;
    const D: i64 = 86_400;

    fn sched() -> Schedule {
        let mut cron = BTreeMap::new();
        cron.insert(BackupType::Full, Cron::parse("0 1 * * 0").unwrap());
        cron.insert(BackupType::Diff, Cron::parse("0 1 * * 1-6").unwrap());
        cron.insert(BackupType::Incr, Cron::parse("30 */6 * * *").unwrap());
        Schedule {
            cron,
            grace_secs: 2 * H,
            retry_after_secs: 300,
        }
    }

    #[test]
    fn civil_dates_and_weekdays() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(SUN / D), (2026, 11, 29));
        assert_eq!((SUN / D + 4).rem_euclid(7), 0, "a Sunday");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn cron_finds_the_latest_slot() {
        let c = Cron::parse("0 1 * * 0").unwrap();
        assert_eq!(c.latest_at_or_before(SUN + H), Some(SUN + H), "inclusive");
        assert_eq!(c.latest_at_or_before(SUN + H - 1), Some(SUN - 7 * D + H));
        let c = Cron::parse("*/15 9-17 * * 1-5").unwrap();
        // Monday 10:07 -> 10:00; Sunday -> the Friday before, 17:45.
        assert_eq!(
            c.latest_at_or_before(SUN + D + 10 * H + 7 * 60),
            Some(SUN + D + 10 * H)
        );
        assert_eq!(
            c.latest_at_or_before(SUN + 12 * H),
            Some(SUN - 2 * D + 17 * H + 45 * 60)
        );
        // Both day fields restricted: either matches (the 1st, or any Sunday).
        let c = Cron::parse("0 0 1 * 0").unwrap();
        assert_eq!(c.latest_at_or_before(SUN + 5), Some(SUN));
        assert_eq!(
            c.latest_at_or_before(SUN + 2 * D),
            Some(SUN + 2 * D),
            "1 December"
        );
        // 7 is Sunday too.
        assert_eq!(
            Cron::parse("0 0 * * 7").unwrap().latest_at_or_before(SUN),
            Some(SUN)
        );
        let leap = Cron::parse("0 0 29 2 *").unwrap();
        assert_eq!(
            leap.latest_at_or_before(SUN),
            None,
            "no 29 February within a year"
        );
    }

    #[test]
    fn bad_expressions_say_which_field() {
        for (e, want) in [
            ("0 1 * *", "five"),
            ("60 1 * * *", "minute"),
            ("0 24 * * *", "hour"),
            ("0 1 0 * *", "day of month"),
            ("0 1 * 13 *", "month"),
            ("0 1 * * 8", "day of week"),
            ("*/0 * * * *", "step"),
            ("a * * * *", "not a number"),
            ("5-1 * * * *", "outside"),
        ] {
            let err = Cron::parse(e).unwrap_err().to_string();
            assert!(err.contains(want), "{e}: {err}");
        }
    }

    #[test]
    fn the_strongest_due_type_runs_once_per_slot() {
        let s = sched();
        let now = SUN + H + 60;
        // Nothing in the repository: the Sunday full is due.
        assert_eq!(
            next(&s, &[], None, true, now),
            Next::Run {
                kind: BackupType::Full,
                slot: SUN + H,
                missed_by: None
            }
        );
        // It ran: nothing is due, the 00:30 incr included (a full covers it).
        let taken = [Taken {
            kind: BackupType::Full,
            start: SUN + H + 5,
        }];
        assert_eq!(next(&s, &taken, None, true, now), Next::Idle);
        // At 06:30 the incr is due.
        let at = SUN + 6 * H + 30 * 60;
        assert_eq!(
            next(&s, &taken, None, true, at),
            Next::Run {
                kind: BackupType::Incr,
                slot: at,
                missed_by: None
            }
        );
        // Monday 01:00: the diff, not the incr of 00:30.
        let mon = SUN + D + H;
        let taken = [
            taken[0],
            Taken {
                kind: BackupType::Incr,
                start: at,
            },
        ];
        assert!(matches!(
            next(&s, &taken, None, true, mon),
            Next::Run {
                kind: BackupType::Diff,
                ..
            }
        ));
    }

    #[test]
    fn a_missed_slot_runs_once_late_and_is_reported() {
        let s = sched();
        // The scheduler was down from Saturday to Sunday 05:00: the full of 01:00 is 2 h late.
        let now = SUN + 5 * H;
        assert_eq!(
            next(&s, &[], None, true, now),
            Next::Run {
                kind: BackupType::Full,
                slot: SUN + H,
                missed_by: Some(2 * H)
            }
        );
        // No primary: reported, not run.
        assert!(matches!(
            next(&s, &[], None, false, now),
            Next::NoPrimary {
                kind: BackupType::Full,
                missed_by: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_failed_attempt_is_retried_after_the_backoff() {
        let s = sched();
        let now = SUN + H + 60;
        let failed = Attempt {
            slot: SUN + H,
            at: now,
        };
        assert_eq!(
            next(&s, &[], Some(failed), true, now + 10),
            Next::Backoff {
                kind: BackupType::Full,
                slot: SUN + H,
                retry_at: now + 300
            }
        );
        assert!(matches!(
            next(&s, &[], Some(failed), true, now + 300),
            Next::Run { .. }
        ));
    }
}
