//! `pgbackrest info --output=json` as data: the backups of a stanza and its archive range.

use serde::Serialize;
use serde_json::Value;

use super::PgBackRestError;

/// One backup of the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backup {
    /// pgBackRest's label (`20261129-233326F`, `..._20261129-234001I`).
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Start, Unix seconds.
    pub start: i64,
    /// Stop, Unix seconds.
    pub stop: i64,
    /// Size of the database it restores, bytes.
    pub size: u64,
    /// Bytes it added to the repository (compressed, encrypted).
    pub repo_size: u64,
    /// First WAL segment it needs.
    pub wal_start: String,
    /// Last WAL segment it needs.
    pub wal_stop: String,
    /// Where it became consistent (`lsn.stop`), when pgBackRest reports it.
    pub lsn_stop: Option<String>,
    /// The backup it depends on (diff and incr).
    pub prior: Option<String>,
    /// pgBackRest found an error (a page checksum) while taking it.
    pub error: bool,
}

/// A stanza as `info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stanza {
    /// Stanza name.
    pub name: String,
    /// pgBackRest's status code (0: ok) and message.
    pub status: (i64, String),
    /// The repository's cipher (`aes-256-cbc`, or `none`).
    pub cipher: String,
    /// Oldest and newest WAL segment in the archive of the current database.
    pub archive: Option<(String, String)>,
    /// The directory of that archive under `archive/<stanza>/` (`15-1`).
    pub archive_id: Option<String>,
    /// Backups, oldest first.
    pub backups: Vec<Backup>,
    /// The system identifier of the stanza's current database.
    pub system_id: Option<String>,
}

fn bad<T>(what: &str) -> Result<T, PgBackRestError> {
    Err(PgBackRestError {
        what: "info".into(),
        reason: format!("unexpected JSON from pgbackrest info: {what}"),
    })
}

fn str_at(v: &Value, path: &[&str]) -> Option<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))?
        .as_str()
        .map(str::to_owned)
}

fn i64_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

/// Parses `pgbackrest info --output=json` and returns the stanza named `stanza`.
pub fn parse(json: &str, stanza: &str) -> Result<Stanza, PgBackRestError> {
    let doc: Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return bad(&e.to_string()),
    };
    let Some(list) = doc.as_array() else {
        return bad("not a list of stanzas");
    };
    let Some(s) = list
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(stanza))
    else {
        return bad(&format!("no stanza {stanza:?}"));
    };
    let status = (
        i64_at(s, &["status", "code"]).unwrap_or(-1),
        str_at(s, &["status", "message"]).unwrap_or_default(),
    );
    // The archive of the newest database id (a stanza-upgrade adds one).
    let newest_archive = s.get("archive").and_then(Value::as_array).and_then(|a| {
        a.iter()
            .max_by_key(|x| i64_at(x, &["database", "id"]).unwrap_or(0))
    });
    let archive = newest_archive.and_then(|a| Some((str_at(a, &["min"])?, str_at(a, &["max"])?)));
    let archive_id = newest_archive.and_then(|a| str_at(a, &["id"]));
    let mut backups = Vec::new();
    for b in s
        .get("backup")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
    {
        let (Some(label), Some(kind)) = (str_at(b, &["label"]), str_at(b, &["type"])) else {
            return bad("a backup without label or type");
        };
        let u = |p: &[&str]| {
            p.iter()
                .try_fold(b, |v, k| v.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        backups.push(Backup {
            start: i64_at(b, &["timestamp", "start"]).unwrap_or(0),
            stop: i64_at(b, &["timestamp", "stop"]).unwrap_or(0),
            size: u(&["info", "size"]),
            repo_size: u(&["info", "repository", "delta"]),
            wal_start: str_at(b, &["archive", "start"]).unwrap_or_default(),
            wal_stop: str_at(b, &["archive", "stop"]).unwrap_or_default(),
            lsn_stop: str_at(b, &["lsn", "stop"]),
            prior: str_at(b, &["prior"]),
            error: b.get("error").and_then(Value::as_bool).unwrap_or(false),
            label,
            kind,
        });
    }
    backups.sort_by_key(|b| b.start);
    Ok(Stanza {
        name: stanza.to_owned(),
        status,
        cipher: str_at(s, &["cipher"]).unwrap_or_else(|| "none".into()),
        archive,
        archive_id,
        backups,
        system_id: s
            .get("db")
            .and_then(Value::as_array)
            .and_then(|d| d.iter().max_by_key(|x| i64_at(x, &["id"]).unwrap_or(0)))
            .and_then(|d| d.get("system-id"))
            .and_then(|v| {
                v.as_u64()
                    .map(|n| n.to_string())
                    .or_else(|| v.as_str().map(str::to_owned))
            }),
    })
}

impl Backup {
    /// The timeline the backup ended on and the position it is consistent at: `lsn.stop`, or
    /// without it the end of its last WAL segment (16 MiB segments), which is never earlier.
    pub fn stop_position(&self) -> Option<(u32, pgkeep_core::cluster::Lsn)> {
        let seg = |r: std::ops::Range<usize>| {
            self.wal_stop
                .get(r)
                .and_then(|x| u64::from_str_radix(x, 16).ok())
        };
        let timeline = u32::try_from(seg(0..8)?).ok()?;
        let lsn = match self.lsn_stop.as_deref().map(str::parse) {
            Some(Ok(l)) => l,
            _ => pgkeep_core::cluster::Lsn((seg(8..16)? << 32) + ((seg(16..24)? + 1) << 24)),
        };
        Some((timeline, lsn))
    }
}

impl Stanza {
    /// pgBackRest reports the stanza missing (status 1, no stanza path; 3, no stanza data):
    /// `stanza-create` is needed. "No valid backups" (2) is a stanza that exists.
    pub fn missing(&self) -> bool {
        matches!(self.status.0, 1 | 3)
    }
}

/// Bytes as a short human figure (KiB, MiB, GiB).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1",
      "max":"000000030000000000000009","min":"000000010000000000000001"}],
      "backup":[
        {"archive":{"start":"00000003000000000000000B","stop":"00000003000000000000000B"},
         "error":false,"info":{"repository":{"delta":1000,"size":1000},"size":30845809},
         "label":"20261129-233326F_20261129-234000I","prior":"20261129-233326F",
         "lsn":{"start":"0/B000028","stop":"0/B000138"},
         "timestamp":{"start":1795995600,"stop":1795995602},"type":"incr"},
        {"archive":{"start":"000000030000000000000009","stop":"000000030000000000000009"},
         "error":false,"info":{"repository":{"delta":3786624,"size":3786624},"size":30845809},
         "label":"20261129-233326F","prior":null,
         "timestamp":{"start":1795995206,"stop":1795995208},"type":"full"}],
      "cipher":"aes-256-cbc","db":[{"id":1,"repo-key":1,"system-id":7713789783062165397,"version":"15"}],
      "name":"bk","status":{"code":0,"message":"ok"}}]"#;

    #[test]
    fn backups_come_out_oldest_first_with_their_wal_range() {
        let s = parse(INFO, "bk").unwrap();
        assert_eq!(s.status, (0, "ok".into()));
        assert_eq!(s.cipher, "aes-256-cbc");
        assert_eq!(
            s.archive,
            Some((
                "000000010000000000000001".into(),
                "000000030000000000000009".into()
            ))
        );
        let kinds: Vec<&str> = s.backups.iter().map(|b| b.kind.as_str()).collect();
        assert_eq!(kinds, ["full", "incr"]);
        assert_eq!(s.backups[0].repo_size, 3_786_624);
        assert_eq!(s.backups[1].prior.as_deref(), Some("20261129-233326F"));
        assert_eq!(s.backups[1].wal_start, "00000003000000000000000B");
        assert_eq!(s.system_id.as_deref(), Some("7713789783062165397"));
        assert_eq!(s.archive_id.as_deref(), Some("15-1"));
    }

    #[test]
    fn a_backup_stops_at_its_lsn_or_at_the_end_of_its_last_segment() {
        let s = parse(INFO, "bk").unwrap();
        let lsn = |x: &str| x.parse::<pgkeep_core::cluster::Lsn>().unwrap();
        assert_eq!(s.backups[1].lsn_stop.as_deref(), Some("0/B000138"));
        assert_eq!(s.backups[1].stop_position(), Some((3, lsn("0/B000138"))));
        // No `lsn` (the full backup of the fixture): the end of segment 9 of timeline 3.
        assert_eq!(s.backups[0].stop_position(), Some((3, lsn("0/A000000"))));
        let mut b = s.backups[0].clone();
        b.wal_stop = "0000000A000000010000000F".into();
        assert_eq!(b.stop_position(), Some((10, lsn("1/10000000"))));
        b.wal_stop = "garbage".into();
        assert_eq!(b.stop_position(), None);
    }

    #[test]
    fn a_missing_stanza_or_broken_json_is_an_error() {
        assert!(parse(INFO, "other").unwrap_err().reason.contains("other"));
        assert!(parse("{", "bk").is_err());
        assert!(parse(r#"[{"name":"bk","backup":[{"type":"full"}]}]"#, "bk").is_err());
        let empty = parse(
            r#"[{"name":"bk","status":{"code":1,"message":"missing stanza path"}}]"#,
            "bk",
        )
        .unwrap();
        assert!(empty.backups.is_empty() && empty.archive.is_none());
        assert!(empty.missing());
        let no_backups = parse(
            r#"[{"name":"bk","status":{"code":2,"message":"no valid backups"}}]"#,
            "bk",
        )
        .unwrap();
        assert!(!no_backups.missing());
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3_786_624), "3.6 MiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
