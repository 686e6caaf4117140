//! After a promotion, the previous timeline's WAL that may never have reached the archive.
//!
//! A replica marks the segments it receives by streaming as archived (`archive_mode = on`;
//! pgBackRest refuses `always`), so when a primary dies while its archiving lags, the segments
//! it had not pushed yet exist only on the replicas. The new primary archives its new timeline
//! and the old one's last, partial segment, not those: the archive would have a hole and no
//! point-in-time recovery could cross it. So right after promoting, before its first checkpoint
//! could recycle them, the new primary marks every complete segment of older timelines still in
//! its `pg_wal`, below the switch point, ready for its archiver (pgBackRest accepts a segment it
//! already holds when the checksum matches, so segments the old primary did push cost a
//! comparison).

use std::path::Path;

use anyhow::{Context, Result};

/// The switch point of `timeline` from its history file: the LSN of its last line.
pub(super) fn switch_lsn(history: &str) -> Option<u64> {
    let line = history
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))?;
    let lsn = line.split_whitespace().nth(1)?;
    let (hi, lo) = lsn.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The names among `names` that are complete WAL segments of a timeline before `timeline`,
/// ending at or before `switch` (the segment holding the switch point is the new primary's to
/// archive, as `.partial`), oldest first.
pub(super) fn previous_segments(
    names: &[String],
    timeline: u32,
    switch: u64,
    seg_size: u64,
) -> Vec<String> {
    if seg_size == 0 {
        return Vec::new();
    }
    let per_log = 0x1_0000_0000 / seg_size;
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .filter(|n| {
            let tli = u32::from_str_radix(&n[0..8], 16).unwrap_or(u32::MAX);
            let log = u64::from_str_radix(&n[8..16], 16).unwrap_or(u64::MAX);
            let seg = u64::from_str_radix(&n[16..24], 16).unwrap_or(u64::MAX);
            let start = (log * per_log + seg).saturating_mul(seg_size);
            tli < timeline && start.saturating_add(seg_size) <= switch
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| a[8..].cmp(&b[8..]).then(a[..8].cmp(&b[..8])));
    out
}

/// Marks the previous timeline's segments of `data_dir` ready for the archiver (their
/// `archive_status/<segment>.done` becomes `.ready`): PostgreSQL then archives them with the
/// node's own `archive_command`, retries a failure like any other segment, and does not recycle
/// a segment before it is archived. Returns the segments marked.
pub(super) fn mark_ready(data_dir: &Path, timeline: u32, seg_size: u64) -> Result<Vec<String>> {
    let pg_wal = data_dir.join("pg_wal");
    let history = std::fs::read_to_string(pg_wal.join(format!("{timeline:08X}.history")))
        .with_context(|| format!("reading the history file of timeline {timeline}"))?;
    let switch = switch_lsn(&history).context("no switch point in the history file")?;
    let names: Vec<String> = std::fs::read_dir(&pg_wal)
        .with_context(|| format!("reading {}", pg_wal.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let status = pg_wal.join("archive_status");
    let mut marked = Vec::new();
    for n in previous_segments(&names, timeline, switch, seg_size) {
        let ready = status.join(format!("{n}.ready"));
        if ready.exists() {
            continue;
        }
        std::fs::write(&ready, b"").with_context(|| format!("writing {}", ready.display()))?;
        let _ = std::fs::remove_file(status.join(format!("{n}.done")));
        marked.push(n);
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn the_switch_point_is_the_history_files_last_line() {
        let h = "1\t0/3000060\tno recovery target specified\n\n2\t0/70000A0\tno recovery target specified\n";
        assert_eq!(switch_lsn(h), Some(0x70000A0));
        assert_eq!(switch_lsn("1\t1/A0\tx\n"), Some((1 << 32) | 0xA0));
        assert_eq!(switch_lsn("# nothing\n"), None);
    }

    #[test]
    fn only_complete_older_timeline_segments_below_the_switch_are_pushed() {
        let names: Vec<String> = [
            "000000010000000000000005",
            "000000010000000000000006",
            "000000010000000000000007", // holds the switch point 0/70000A0: PostgreSQL's .partial
            "000000020000000000000007",
            "000000010000000000000004",
            "00000002.history",
            "000000010000000000000006.partial",
            "archive_status",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            previous_segments(&names, 2, 0x70000A0, SEG),
            [
                "000000010000000000000004",
                "000000010000000000000005",
                "000000010000000000000006"
            ]
        );
        // A segment ending exactly at the switch point is complete.
        assert_eq!(previous_segments(&names, 2, 0x7000000, SEG).len(), 3);
        // Segments above 4 GiB: the log number counts.
        let high = vec!["000000010000000100000002".to_owned()];
        assert_eq!(previous_segments(&high, 2, (1 << 32) + 3 * SEG, SEG), high);
        assert!(previous_segments(&high, 2, 1 << 32, SEG).is_empty());
    }
}
