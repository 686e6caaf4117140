//! WAL that pgBackRest dropped from the archive queue.
//!
//! With `archive-push-queue-max`, asynchronous archiving that cannot reach the repository
//! stops queueing once the queue is full: it reports the oldest waiting segments to PostgreSQL
//! as archived (so `pg_wal` does not fill the disk) and only logs
//! `WARN: dropped WAL file '<segment>' because archive queue exceeded <size>`. PostgreSQL's
//! statistics then say "archived" for segments the archive never received: a gap that no
//! point-in-time recovery can cross. The only trace is that line in the asynchronous process's
//! log (`<log-path>/<stanza>-archive-push-async.log`), which [`DropWatch`] follows.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One dropped segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The log line's time stamp (pgBackRest's local time, `2026-11-30 02:52:08.955`).
    pub at: String,
    /// The WAL segment.
    pub wal: String,
}

const MARK: &str = "WARN: dropped WAL file '";

/// The drops logged in `text` (complete lines of a pgBackRest log), in order.
pub fn parse(text: &str) -> Vec<Dropped> {
    text.lines()
        .filter_map(|line| {
            let (head, rest) = line.split_once(MARK)?;
            let (wal, _) = rest.split_once('\'')?;
            // `2026-11-30 02:52:08.955 P00   WARN: ...`: date and time are the first two words.
            let at = head
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Some(Dropped {
                at,
                wal: wal.to_owned(),
            })
        })
        .collect()
}

/// The asynchronous archive-push log of `stanza` for the node configuration in `config_path`
/// (its `log-path`, pgBackRest's default `/var/log/pgbackrest` without one).
pub fn async_log(config_path: &Path, stanza: &str) -> PathBuf {
    let conf = std::fs::read_to_string(config_path.join("pgbackrest.conf")).unwrap_or_default();
    let dir = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("log-path="))
        .next_back()
        .map_or_else(|| PathBuf::from("/var/log/pgbackrest"), PathBuf::from);
    dir.join(format!("{stanza}-archive-push-async.log"))
}

/// Follows a log file from where it was when the watch started; each poll returns the drops
/// appended since the previous one.
#[derive(Debug)]
pub struct DropWatch {
    path: PathBuf,
    offset: u64,
}

/// At most this much of the log is read per poll (the rest on the next ones).
const READ_MAX: u64 = 4 << 20;

impl DropWatch {
    /// Starts at the current end of `path`, and returns the drops already in it (logged before
    /// this watch: the archive's older gaps).
    pub fn start(path: PathBuf) -> (DropWatch, Vec<Dropped>) {
        let mut w = DropWatch { path, offset: 0 };
        let mut earlier = Vec::new();
        loop {
            let before = w.offset;
            earlier.extend(w.poll());
            if w.offset == before {
                break;
            }
        }
        (w, earlier)
    }

    /// The drops logged since the last poll. A log that shrank (rotated, removed) is read again
    /// from its start; a missing one has none.
    pub fn poll(&mut self) -> Vec<Dropped> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            self.offset = 0;
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
        }
        if len == self.offset || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.take(READ_MAX).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        // Only complete lines; a line being written is read whole next time.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        self.offset += end as u64 + 1;
        parse(&String::from_utf8_lossy(&buf[..=end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LOG: &str = "\
-------------------PROCESS START-------------------
2026-11-30 03:10:01.100 P00   INFO: archive-push:async command begin 2.45: [/var/lib/pg/pg_wal] --archive-async
2026-11-30 03:10:02.200 P00   WARN: dropped WAL file '000000010000000000000005' because archive queue exceeded 16MB
2026-11-30 03:10:02.201 P00   WARN: dropped WAL file '000000010000000000000006' because archive queue exceeded 16MB
2026-11-30 03:10:02.300 P00   INFO: archive-push:async command end: completed successfully (1200ms)
";

    #[test]
    fn drop_lines_give_the_segment_and_the_time() {
        let d = parse(LOG);
        assert_eq!(
            d,
            vec![
                Dropped {
                    at: "2026-11-30 03:10:02.200".into(),
                    wal: "000000010000000000000005".into()
                },
                Dropped {
                    at: "2026-11-30 03:10:02.201".into(),
                    wal: "000000010000000000000006".into()
                },
            ]
        );
        assert!(parse("2026-11-30 03:10:02.200 P00   WARN: unable to push\n").is_empty());
    }

    #[test]
    fn the_watch_reports_each_new_drop_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s-archive-push-async.log");
        let (lines, rest) = LOG.split_at(LOG.find("2026-11-30 03:10:02.201").unwrap());
        std::fs::write(&path, lines).unwrap();
        let (mut w, earlier) = DropWatch::start(path.clone());
        assert_eq!(earlier.len(), 1, "the drop logged before the watch");
        assert!(w.poll().is_empty());
        // Half a line is left for the next poll.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&rest.as_bytes()[..20]).unwrap();
        assert!(w.poll().is_empty());
        f.write_all(&rest.as_bytes()[20..]).unwrap();
        let d = w.poll();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].wal, "000000010000000000000006");
        assert!(w.poll().is_empty());
        // Rotated: read from the start again.
        std::fs::write(&path, LOG.lines().nth(2).unwrap().to_owned() + "\n").unwrap();
        assert_eq!(w.poll().len(), 1);
        std::fs::remove_file(&path).unwrap();
        assert!(w.poll().is_empty());
    }

    #[test]
    fn the_log_path_comes_from_the_node_configuration() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pgbackrest.conf"),
            "[global]\nlog-path=/var/tmp/x/log\n\n[s]\npg1-path=/d\n",
        )
        .unwrap();
        assert_eq!(
            async_log(dir.path(), "s"),
            PathBuf::from("/var/tmp/x/log/s-archive-push-async.log")
        );
        assert_eq!(
            async_log(&dir.path().join("none"), "s"),
            PathBuf::from("/var/log/pgbackrest/s-archive-push-async.log")
        );
    }
}
