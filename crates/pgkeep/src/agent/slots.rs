//! Logical slots across failover. PostgreSQL 15 has no failover slots: the leader creates the
//! permanent logical slots, each failover-capable replica gets a copy of the slot's state file
//! (read from the leader over SQL, then PostgreSQL restarted so it loads it) and moves the copy
//! forward to the position the leader publishes in `/status`. After a promotion the consumer
//! resumes from the copy: it may see a few changes again, never miss one.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use pgkeep_core::ha::{SlotAdvance, StartRole};

use super::Shell;
use crate::postgres::observe::connect_local_db;

/// `SLOT_MAGIC` of PostgreSQL's `ReplicationSlotOnDisk`.
const SLOT_MAGIC: u32 = 0x0105_1CA1;
/// magic, checksum, version, length (4 bytes each), then the slot's `NameData`.
const NAME_OFFSET: usize = 16;
const NAMEDATALEN: usize = 64;

/// The most WAL segments a replica fetches from the leader for its slot copies.
const MAX_FETCHED_SEGMENTS: usize = 64;
/// The wait after a failed copy before the next attempt.
const COPY_RETRY: Duration = Duration::from_secs(30);
/// `restart_lsn` in `ReplicationSlotPersistentData`, after the name, the database OID, the
/// persistency and two transaction ids (4 bytes each).
const RESTART_LSN_OFFSET: usize = NAME_OFFSET + NAMEDATALEN + 16;

/// `confirmed_flush` in `ReplicationSlotPersistentData`, after `restart_lsn` and
/// `invalidated_at` (8 bytes each).
const CONFIRMED_FLUSH_OFFSET: usize = RESTART_LSN_OFFSET + 16;
/// How long a copy waits for local replay to reach the copied slot's position.
const REPLAY_WAIT: Duration = Duration::from_secs(5);

/// Slot creation waits for running transactions; the HA loop must not.
const CREATE_TIMEOUT: Duration = Duration::from_secs(3);

impl Shell {
    async fn slot_db(&self, database: &str) -> Result<tokio_postgres::Client> {
        connect_local_db(
            self.layout.socket_dir(),
            self.layout.node.port,
            &self.cfg.postgresql.authentication.superuser.username,
            database,
            Duration::from_secs(5),
        )
        .await
        .with_context(|| format!("connecting to database {database}"))
    }

    /// Creates a permanent logical slot on the primary.
    pub(super) async fn create_logical_slot(
        &self,
        name: &str,
        database: &str,
        plugin: &str,
    ) -> Result<()> {
        let client = self.slot_db(database).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&name, &plugin];
        let create = client.execute(
            "SELECT pg_create_logical_replication_slot($1, $2) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &params,
        );
        // Dropping the connection on a timeout ends the backend and with it the half-made slot.
        tokio::time::timeout(CREATE_TIMEOUT, create)
            .await
            .map_err(|_| anyhow!("still waiting for running transactions after {CREATE_TIMEOUT:?}; trying again next cycle"))?
            .with_context(|| format!("creating logical slot {name}"))?;
        tracing::info!(slot = name, database, plugin, "created the logical slot");
        Ok(())
    }

    /// Moves logical slot copies forward on a replica.
    pub(super) async fn advance_slots(&self, advances: &[SlotAdvance]) -> Result<()> {
        for a in advances {
            let client = self.slot_db(&a.database).await?;
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&a.name, &a.lsn.to_string()],
                )
                .await
                .with_context(|| format!("advancing slot {} to {}", a.name, a.lsn))?;
            tracing::debug!(slot = %a.name, lsn = %a.lsn, "advanced the logical slot copy");
        }
        Ok(())
    }

    /// Copies logical slots from the leader `from` and restarts this replica so PostgreSQL
    /// loads them. Nothing is stopped until every state file (and any WAL the copies need that
    /// this replica no longer has) was fetched and checked. After a failure the next attempt
    /// waits [`COPY_RETRY`].
    pub(super) async fn copy_logical_slots(&mut self, from: &str, names: &[String]) -> Result<()> {
        if self
            .slot_copy_after
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return Ok(());
        }
        let r = self.try_copy(from, names).await;
        self.slot_copy_after = r.is_err().then(|| std::time::Instant::now() + COPY_RETRY);
        r
    }

    async fn try_copy(&mut self, from: &str, names: &[String]) -> Result<()> {
        let local = self
            .pg_client
            .as_ref()
            .ok_or_else(|| anyhow!("no connection to the local postgres"))?;
        let row = local
            .query_one(
                "SELECT current_setting('wal_level'), \
                        (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
                        (SELECT min(name) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$')",
                &[],
            )
            .await?;
        let (wal_level, seg_size, oldest): (String, i64, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        // A standby with a logical slot and wal_level below logical refuses to start.
        if wal_level != "logical" {
            bail!(
                "wal_level is {wal_level} here; a logical slot copy needs logical (restart pending?)"
            );
        }
        let seg_size = u64::try_from(seg_size).context("wal_segment_size")?;
        let conninfo = self.tool_conninfo(from, true)?;
        // The state file on disk is written at checkpoints; a checkpoint first makes the copy
        // as recent as the slot itself. The rewind role holds pg_checkpoint for this.
        if let Err(e) = self.psql(&conninfo, "CHECKPOINT").await {
            tracing::warn!(
                error = format!("{e:#}"),
                "checkpoint on the leader before copying slots failed; copying an older state"
            );
        }
        let mut files = Vec::new();
        for name in names {
            // `name` passed the dynamic configuration's check: lower-case letters, digits, '_'.
            let sql =
                format!("SELECT encode(pg_read_binary_file('pg_replslot/{name}/state'), 'hex')");
            let out = self.psql(&conninfo, &sql).await?;
            let state = decode_hex(out.trim())
                .ok_or_else(|| anyhow!("slot {name}: the leader sent no state file"))?;
            let restart = check_state(&state, name)?;
            files.push((name.clone(), state, restart));
        }
        // A copy must not stand past what this replica replayed: promoted before replay got
        // there, the consumer would skip the new timeline's changes below that position.
        let ahead = files
            .iter()
            .filter_map(|(_, state, _)| lsn_at(state, CONFIRMED_FLUSH_OFFSET))
            .max()
            .unwrap_or(0);
        self.wait_for_replay(ahead).await?;
        // Decoding (and so advancing) a copy reads WAL from its restart_lsn on; a replica made
        // by a base backup started later. Fetch the missing segments from the leader, which
        // keeps them for its own slot.
        let need = files
            .iter()
            .map(|f| f.2 / seg_size)
            .min()
            .unwrap_or(u64::MAX);
        let have = oldest
            .as_deref()
            .and_then(|n| segno(n, seg_size))
            .unwrap_or(0);
        let staging = self.layout.data_dir.with_extension("pgkeep-slotwal");
        let staged = if need < have {
            self.fetch_wal(&conninfo, need..have, seg_size, &staging)
                .await?
        } else {
            Vec::new()
        };
        tracing::warn!(slots = ?names, %from, wal_segments = staged.len(), "restarting this replica to load logical slot copies");
        let replslot = self.layout.data_dir.join("pg_replslot");
        let pg_wal = self.layout.data_dir.join("pg_wal");
        let install = || -> Result<()> {
            for (name, state, _) in &files {
                install_state(&replslot, name, state)
                    .with_context(|| format!("installing slot {name}"))?;
            }
            for seg in &staged {
                let to = pg_wal.join(seg);
                if !to.exists() {
                    std::fs::rename(staging.join(seg), &to)
                        .with_context(|| format!("moving WAL segment {seg} into place"))?;
                }
            }
            std::fs::File::open(&pg_wal)?.sync_all()?;
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        };
        let role = StartRole::Replica {
            upstream: self.upstream.clone(),
        };
        // A restart as any other: before_stop and on_restart callbacks run.
        self.restart_pg_with(&role, install).await?;
        tracing::info!(slots = ?names, "logical slot copies loaded");
        Ok(())
    }

    /// Fetches the leader's WAL segments numbered `range` into `staging` (every timeline's file
    /// the leader has for each number) and returns their names.
    async fn fetch_wal(
        &self,
        conninfo: &str,
        range: std::ops::Range<u64>,
        seg_size: u64,
        staging: &Path,
    ) -> Result<Vec<String>> {
        let listing = self
            .psql(
                conninfo,
                "SELECT name FROM pg_ls_dir('pg_wal', true, false) AS name \
                 WHERE name ~ '^[0-9A-F]{24}$' ORDER BY 1",
            )
            .await?;
        let wanted: Vec<&str> = listing
            .lines()
            .filter(|n| segno(n, seg_size).is_some_and(|s| range.contains(&s)))
            .collect();
        let covered: std::collections::BTreeSet<u64> =
            wanted.iter().filter_map(|n| segno(n, seg_size)).collect();
        if covered.len() as u64 != range.end - range.start {
            bail!(
                "the leader no longer has all the WAL its logical slots need (segments {range:?})"
            );
        }
        if wanted.len() > MAX_FETCHED_SEGMENTS {
            bail!(
                "the logical slot copies need {} WAL segments this replica does not have (more than {MAX_FETCHED_SEGMENTS}); waiting for the consumers to move the slots on",
                wanted.len()
            );
        }
        let _ = std::fs::remove_dir_all(staging);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        for name in &wanted {
            let out = self
                .psql(
                    conninfo,
                    &format!("SELECT encode(pg_read_binary_file('pg_wal/{name}'), 'hex')"),
                )
                .await?;
            let data = decode_hex(out.trim())
                .filter(|d| d.len() as u64 == seg_size)
                .ok_or_else(|| anyhow!("WAL segment {name} from the leader is incomplete"))?;
            crate::fsutil::write_atomic(&staging.join(name), &data, 0o600)?;
        }
        Ok(wanted.iter().map(|n| (*n).to_owned()).collect())
    }

    /// Waits up to [`REPLAY_WAIT`] until local replay reached `lsn`.
    async fn wait_for_replay(&self, lsn: u64) -> Result<()> {
        let deadline = std::time::Instant::now() + REPLAY_WAIT;
        loop {
            let replayed = match self.pg_client.as_ref() {
                Some(c) => c
                    .query_one("SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint", &[])
                    .await?
                    .get::<_, Option<i64>>(0)
                    .and_then(|v| u64::try_from(v).ok())
                    .unwrap_or(0),
                None => bail!("no connection to the local postgres"),
            };
            if replayed >= lsn {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the leader's slot is at {lsn:X}, past this replica's replay ({replayed:X}); copying later"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn psql(&self, conninfo: &str, sql: &str) -> Result<String> {
        let args: Vec<OsString> = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"]
            .iter()
            .map(OsString::from)
            .chain([conninfo.into(), "-c".into(), sql.into()])
            .collect();
        let out = self
            .instance
            .runner
            .run("psql", &args, &[], Duration::from_secs(30))
            .await?;
        Ok(out.stdout)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The segment number of a WAL file name (`TTTTTTTTLLLLLLLLSSSSSSSS`).
fn segno(name: &str, seg_size: u64) -> Option<u64> {
    if name.len() != 24 || seg_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    Some(log * (0x1_0000_0000 / seg_size) + seg)
}

/// Checks that `state` is a slot state file for slot `name` (magic number and slot name) and
/// returns the slot's `restart_lsn`.
fn check_state(state: &[u8], name: &str) -> Result<u64> {
    let magic = state
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(SLOT_MAGIC) {
        bail!("slot {name}: not a replication slot state file (magic {magic:x?})");
    }
    let stored = state
        .get(NAME_OFFSET..NAME_OFFSET + NAMEDATALEN)
        .ok_or_else(|| anyhow!("slot {name}: state file too short"))?;
    let end = stored.iter().position(|b| *b == 0).unwrap_or(NAMEDATALEN);
    if &stored[..end] != name.as_bytes() {
        bail!(
            "slot {name}: the state file names slot {:?}",
            String::from_utf8_lossy(&stored[..end])
        );
    }
    lsn_at(state, CONFIRMED_FLUSH_OFFSET + 8)
        .and_then(|_| lsn_at(state, RESTART_LSN_OFFSET))
        .ok_or_else(|| anyhow!("slot {name}: state file too short"))
}

/// The little-endian 8-byte position at `offset`.
fn lsn_at(state: &[u8], offset: usize) -> Option<u64> {
    let b = state.get(offset..offset + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Writes `pg_replslot/<name>/state` durably (PostgreSQL's own modes: 0700 directory, 0600
/// file), replacing a leftover directory of the same name.
fn install_state(replslot: &Path, name: &str, state: &[u8]) -> Result<()> {
    let dir = replslot.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    crate::fsutil::write_atomic(&dir.join("state"), state, 0o600)?;
    std::fs::File::open(replslot)?.sync_all()?;
    Ok(())
}

/// Removes every slot of a rewound data directory. pg_rewind leaves `pg_replslot` as it was: its
/// slots describe the abandoned history (a logical slot there may stand past changes the new
/// timeline never had). Member slots are recreated and logical slots copied again by the rules.
pub(super) fn clear_slots(data_dir: &Path) -> Result<()> {
    let dir = data_dir.join("pg_replslot");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut removed = Vec::new();
    for e in entries {
        let e = e?;
        std::fs::remove_dir_all(e.path())
            .with_context(|| format!("removing {}", e.path().display()))?;
        removed.push(e.file_name().to_string_lossy().into_owned());
    }
    if !removed.is_empty() {
        std::fs::File::open(&dir)?.sync_all()?;
        tracing::info!(slots = ?removed, "removed the slots of the rewound data directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> Vec<u8> {
        let mut v = SLOT_MAGIC.to_le_bytes().to_vec();
        v.extend([0u8; 12]);
        let mut n = name.as_bytes().to_vec();
        n.resize(NAMEDATALEN, 0);
        v.extend(n);
        v.extend([0u8; 100]);
        v
    }

    #[test]
    fn state_files_are_checked_for_magic_and_name() {
        let mut s = state("cdc");
        s[RESTART_LSN_OFFSET..RESTART_LSN_OFFSET + 8]
            .copy_from_slice(&0x0500_0028u64.to_le_bytes());
        assert_eq!(check_state(&s, "cdc").unwrap(), 0x0500_0028);
        s[CONFIRMED_FLUSH_OFFSET..CONFIRMED_FLUSH_OFFSET + 8]
            .copy_from_slice(&0x0500_0100u64.to_le_bytes());
        assert_eq!(lsn_at(&s, CONFIRMED_FLUSH_OFFSET), Some(0x0500_0100));
        assert!(check_state(&state("cdc2"), "cdc").is_err());
        assert!(check_state(&state("cdc")[..20], "cdc").is_err());
        let mut bad = state("cdc");
        bad[0] ^= 1;
        assert!(check_state(&bad, "cdc").is_err());
    }

    #[test]
    fn wal_file_names_give_segment_numbers() {
        let mb16 = 16 << 20;
        assert_eq!(segno("000000010000000000000005", mb16), Some(5));
        assert_eq!(segno("0000000200000001000000A0", mb16), Some(256 + 160));
        assert_eq!(segno("00000001000000000000005.partial", mb16), None);
        assert_eq!(segno("000000010000000000000005", 0), None);
    }

    #[test]
    fn hex_decoding_refuses_odd_or_foreign_input() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), None);
    }

    #[test]
    fn installing_replaces_a_leftover_and_clearing_removes_every_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let replslot = tmp.path().join("pg_replslot");
        std::fs::create_dir(&replslot).unwrap();
        std::fs::create_dir(replslot.join("cdc")).unwrap();
        std::fs::write(replslot.join("cdc").join("junk"), b"x").unwrap();
        install_state(&replslot, "cdc", &state("cdc")).unwrap();
        let names: Vec<_> = std::fs::read_dir(replslot.join("cdc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&replslot.join("cdc")), 0o700);
        assert_eq!(mode(&replslot.join("cdc/state")), 0o600);
        clear_slots(tmp.path()).unwrap();
        assert_eq!(std::fs::read_dir(&replslot).unwrap().count(), 0);
    }
}
