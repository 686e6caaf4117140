//! `pgkeep ctl list --watch`: the member table, redrawn in place on every change the etcd watch
//! delivers (and at least every `--interval` seconds), instead of polling as `patronictl list
//! -W` does.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgkeep_core::cluster::ClusterView;

use super::{Format, print_out};
use crate::dcs::{Dcs, EtcdDcs, EtcdSettings};

/// Redraws no more often than this, however fast changes arrive.
const MIN_GAP: Duration = Duration::from_millis(200);

/// Draws `render(view)` on every change until `count` frames were drawn (forever without one).
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    settings: &EtcdSettings,
    format: Format,
    interval: Duration,
    count: Option<u64>,
    render: impl Fn(&ClusterView) -> Result<String>,
) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    rt.block_on(async {
        let dcs = EtcdDcs::connect(settings)
            .await
            .with_context(|| format!("connecting to etcd ({})", settings.endpoints.join(", ")))?;
        let mut watch = dcs.watch();
        // The first frame from the watch's own first list (a load otherwise).
        let _ = watch.ready(Duration::from_secs(5)).await;
        let mut drawn = 0u64;
        loop {
            let view = match watch.snapshot() {
                Some(s) => s.view.clone(),
                None => dcs.load().await.context("reading the cluster")?.view,
            };
            let body = render(&view)?;
            let stamp = humantime_now();
            let live = if watch.is_live() {
                ""
            } else {
                " (etcd watch reconnecting)"
            };
            let frame = match (tty, format) {
                // Home, clear screen: the table replaces the previous one.
                (true, Format::Table) => format!("\x1b[H\x1b[2J{stamp}{live}\n{body}"),
                (_, Format::Table) => format!("{stamp}{live}\n{body}\n"),
                (_, Format::Json) => body,
            };
            print_out(&frame)?;
            drawn += 1;
            if count.is_some_and(|c| drawn >= c) {
                return Ok(());
            }
            let started = Instant::now();
            // A change, or the interval; then a short pause so a burst of changes is one frame.
            let _ = tokio::time::timeout(interval, watch.changed()).await;
            tokio::time::sleep(MIN_GAP.saturating_sub(started.elapsed())).await;
        }
    })
}

/// The current UTC time, `2026-11-29 17:44:12 UTC`.
fn humantime_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
