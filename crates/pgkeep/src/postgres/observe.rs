//! What the local PostgreSQL says about itself, read over the Unix socket as the superuser
//! (peer authentication, so no password is involved). One round trip per HA cycle; the REST
//! API answers from the result, never with a query of its own.

use std::path::Path;
use std::time::Duration;

use pgkeep_core::cluster::Lsn;
use tokio_postgres::{Client, NoTls};

use super::PgError;

/// A walsender on this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walsender {
    /// Connected role.
    pub usename: String,
    /// `application_name` (pgkeep sets it to the member name).
    pub application_name: String,
    /// Client address.
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, `backup`, ...
    pub state: String,
    /// `async`, `sync`, `potential`, `quorum`.
    pub sync_state: String,
    /// Priority in `synchronous_standby_names`.
    pub sync_priority: i32,
    /// The standby's flushed position.
    pub flush_lsn: Option<Lsn>,
    /// The standby's replayed position.
    pub replay_lsn: Option<Lsn>,
}

/// The WAL receiver of a standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`, ...
    pub status: String,
    /// The timeline it receives.
    pub received_tli: u32,
    /// The last position the sender reported.
    pub latest_end_lsn: Option<Lsn>,
    /// The host it streams from.
    pub sender_host: Option<String>,
    /// The slot it uses.
    pub slot_name: Option<String>,
}

/// A physical replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Slot name.
    pub name: String,
    /// Whether a walsender uses it now.
    pub active: bool,
    /// Oldest WAL it retains.
    pub restart_lsn: Option<Lsn>,
}

/// A logical replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalSlot {
    /// Slot name.
    pub name: String,
    /// Its database.
    pub database: String,
    /// Its output plugin.
    pub plugin: String,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush: Option<Lsn>,
}

/// One observation of the running server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPg {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `server_version_num`.
    pub server_version: i32,
    /// Current timeline (the WAL insert timeline on a primary, the received or checkpoint
    /// timeline on a standby).
    pub timeline: u32,
    /// Flushed WAL position on a primary.
    pub flush_lsn: Option<Lsn>,
    /// Received position on a standby.
    pub receive_lsn: Option<Lsn>,
    /// Replayed position on a standby.
    pub replay_lsn: Option<Lsn>,
    /// Replay is paused.
    pub replay_paused: bool,
    /// Timestamp of the last replayed transaction.
    pub last_replay_timestamp: Option<String>,
    /// The standby's WAL receiver.
    pub wal_receiver: Option<WalReceiver>,
    /// Walsenders (on a primary, or a cascading standby).
    pub replication: Vec<Walsender>,
    /// Physical slots.
    pub slots: Vec<Slot>,
    /// Logical slots.
    pub logical_slots: Vec<LogicalSlot>,
    /// `pg_stat_archiver` (primary only).
    pub archiver: Option<crate::api::metrics::ArchiverStats>,
    /// Some changed parameter needs a restart.
    pub pending_restart: bool,
}

const STATUS_SQL: &str = "
SELECT pg_is_in_recovery(),
       current_setting('server_version_num')::int,
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT timeline_id FROM pg_control_checkpoint())::bigint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_flush_lsn() - '0/0')::bigint END,
       (pg_last_wal_receive_lsn() - '0/0')::bigint,
       (pg_last_wal_replay_lsn() - '0/0')::bigint,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       pg_last_xact_replay_timestamp()::text,
       EXISTS (SELECT 1 FROM pg_settings WHERE pending_restart),
       (SELECT min_recovery_end_timeline FROM pg_control_recovery())::bigint";

const RECEIVER_SQL: &str = "
SELECT status, received_tli::bigint, (latest_end_lsn - '0/0')::bigint, sender_host, slot_name
  FROM pg_stat_wal_receiver";

const SENDERS_SQL: &str = "
SELECT usename::text, application_name, client_addr::text, state, sync_state, sync_priority,
       (flush_lsn - '0/0')::bigint, (replay_lsn - '0/0')::bigint
  FROM pg_stat_replication ORDER BY application_name";

const SLOTS_SQL: &str = "
SELECT slot_name::text, active, (restart_lsn - '0/0')::bigint, slot_type = 'logical',
       database::text, plugin::text, (confirmed_flush_lsn - '0/0')::bigint
  FROM pg_replication_slots WHERE NOT temporary ORDER BY slot_name";

const ARCHIVER_SQL: &str = "
SELECT archived_count, failed_count, (extract(epoch FROM last_archived_time) * 1000)::bigint,
       (extract(epoch FROM last_failed_time) * 1000)::bigint, last_archived_wal, last_failed_wal
  FROM pg_stat_archiver";

/// Connects over the Unix socket in `socket_dir` as `user` (peer authentication).
pub async fn connect_local(
    socket_dir: &Path,
    port: u16,
    user: &str,
    timeout: Duration,
) -> Result<Client, PgError> {
    connect_local_db(socket_dir, port, user, "postgres", timeout).await
}

/// [`connect_local`] to database `dbname`.
pub async fn connect_local_db(
    socket_dir: &Path,
    port: u16,
    user: &str,
    dbname: &str,
    timeout: Duration,
) -> Result<Client, PgError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname(dbname)
        .application_name("pgkeep")
        .connect_timeout(timeout);
    let (client, connection) = tokio::time::timeout(timeout, cfg.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout {
            what: "connecting to the local postgres".into(),
            timeout,
        })?
        .map_err(|e| PgError::Parse(format!("connecting to the local postgres: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "local postgres connection closed");
        }
    });
    Ok(client)
}

fn lsn(v: Option<i64>) -> Option<Lsn> {
    v.and_then(|n| u64::try_from(n).ok()).map(Lsn)
}

fn sql_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    move |e| PgError::Parse(format!("{what}: {e}"))
}

/// Reads everything the HA cycle needs in one go.
pub async fn observe(client: &Client) -> Result<LocalPg, PgError> {
    let row = client
        .query_one(STATUS_SQL, &[])
        .await
        .map_err(sql_err("reading server status"))?;
    let in_recovery: bool = row.get(0);
    let receiver = client
        .query_opt(RECEIVER_SQL, &[])
        .await
        .map_err(sql_err("reading pg_stat_wal_receiver"))?
        .map(|r| WalReceiver {
            status: r.get(0),
            received_tli: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            latest_end_lsn: lsn(r.get(2)),
            sender_host: r.get(3),
            slot_name: r.get(4),
        });
    let replication = client
        .query(SENDERS_SQL, &[])
        .await
        .map_err(sql_err("reading pg_stat_replication"))?
        .iter()
        .map(|r| Walsender {
            usename: r.get::<_, Option<String>>(0).unwrap_or_default(),
            application_name: r.get::<_, Option<String>>(1).unwrap_or_default(),
            client_addr: r.get(2),
            state: r.get::<_, Option<String>>(3).unwrap_or_default(),
            sync_state: r.get::<_, Option<String>>(4).unwrap_or_default(),
            sync_priority: r.get::<_, Option<i32>>(5).unwrap_or(0),
            flush_lsn: lsn(r.get(6)),
            replay_lsn: lsn(r.get(7)),
        })
        .collect();
    let (mut slots, mut logical_slots) = (Vec::new(), Vec::new());
    for r in client
        .query(SLOTS_SQL, &[])
        .await
        .map_err(sql_err("reading pg_replication_slots"))?
    {
        if r.get::<_, bool>(3) {
            logical_slots.push(LogicalSlot {
                name: r.get(0),
                database: r.get::<_, Option<String>>(4).unwrap_or_default(),
                plugin: r.get::<_, Option<String>>(5).unwrap_or_default(),
                confirmed_flush: lsn(r.get(6)),
            });
        } else {
            slots.push(Slot {
                name: r.get(0),
                active: r.get(1),
                restart_lsn: lsn(r.get(2)),
            });
        }
    }
    let archiver = if in_recovery {
        None
    } else {
        client
            .query_opt(ARCHIVER_SQL, &[])
            .await
            .map_err(sql_err("reading pg_stat_archiver"))?
            .map(|r| crate::api::metrics::ArchiverStats {
                archived_count: r.get(0),
                failed_count: r.get(1),
                last_archived_ms: r.get(2),
                last_failed_ms: r.get(3),
                last_archived_wal: r.get(4),
                last_failed_wal: r.get(5),
            })
    };
    // A standby's replay timeline has no SQL function in PostgreSQL 15. Each of these is a
    // timeline it provably reached (the receiver streams a timeline only once recovery checked
    // the fork point), so their maximum never claims a timeline the standby is not on; the
    // agent also remembers the highest one seen since the postmaster started.
    let checkpoint_tli = u32::try_from(row.get::<_, i64>(2)).unwrap_or(0);
    let min_recovery_tli = row
        .get::<_, Option<i64>>(9)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(0);
    let timeline = match &receiver {
        Some(r) if in_recovery => r.received_tli.max(checkpoint_tli).max(min_recovery_tli),
        _ if in_recovery => checkpoint_tli.max(min_recovery_tli),
        _ => checkpoint_tli,
    };
    Ok(LocalPg {
        in_recovery,
        server_version: row.get(1),
        timeline,
        flush_lsn: lsn(row.get(3)),
        receive_lsn: lsn(row.get(4)),
        replay_lsn: lsn(row.get(5)),
        replay_paused: row.get(6),
        last_replay_timestamp: row.get(7),
        wal_receiver: receiver,
        replication,
        slots,
        logical_slots,
        archiver,
        pending_restart: row.get(8),
    })
}
