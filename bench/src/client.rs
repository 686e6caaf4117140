//! The one client every product and the floor are measured with.
//!
//! tokio-postgres with rustls (the CA's chain and the host name are verified: libpq's
//! `verify-full`), SCRAM password authentication, a libpq-style multi-host connection with
//! `target_session_attrs=read-write`, and its own connect deadline (0.5 s by default, for the
//! whole host list; libpq's `connect_timeout` takes whole seconds and treats < 2 as 2).
//!
//! The writer inserts one row per tick in autocommit and never cancels a commit: it waits for
//! the answer (a safety limit, 30 s by default, only drops the connection). Every attempt is
//! recorded: `ack` (the server confirmed the commit), `failed` (the server rejected the
//! statement, so nothing was committed) or `unknown` (the connection broke or the server
//! terminated the session during the statement, or the commit came back with PostgreSQL's
//! "already committed locally" warning). After an error it reconnects at the next tick.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::task::JoinHandle;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::sys::now;

/// The table every run writes to.
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS bench_writes (run text NOT NULL, \
    seq bigint NOT NULL, t timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (run, seq))";

/// A rustls connector trusting only the CA certificates in `ca_pem`.
pub fn tls(ca_pem: &[u8]) -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.context("parsing the CA certificate")?)
            .context("adding the CA certificate")?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(cfg))
}

/// One PostgreSQL server: the name its certificate is checked against, its address, its port.
#[derive(Debug, Clone)]
pub struct Host {
    /// Member name (`node1`, `n1`).
    pub member: String,
    /// TLS server name (DNS name or IP address literal).
    pub name: String,
    /// Where to connect.
    pub addr: IpAddr,
    /// PostgreSQL port.
    pub port: u16,
}

/// How to reach a cluster's primary as the application role.
#[derive(Clone)]
pub struct Target {
    /// Every member, in order (libpq tries them in this order).
    pub hosts: Vec<Host>,
    /// Role.
    pub user: String,
    /// Its password (SCRAM).
    pub password: String,
    /// Database.
    pub dbname: String,
    /// The verifying TLS connector.
    pub tls: MakeRustlsConnect,
}

/// A connection and its driver task.
pub struct Session {
    /// The client.
    pub client: tokio_postgres::Client,
    /// Set when the server sent the "already committed locally" warning.
    committed_locally: Arc<AtomicBool>,
    driver: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Target {
    /// The port of `member`.
    pub fn port_of(&self, member: &str) -> Option<u16> {
        self.hosts
            .iter()
            .find(|h| h.member == member)
            .map(|h| h.port)
    }

    /// Connects to the first host that accepts read-write sessions (or to `only`, any role),
    /// within `deadline` for the whole attempt.
    pub async fn connect(&self, deadline: Duration, only: Option<&str>) -> Result<Session> {
        let mut cfg = tokio_postgres::Config::new();
        let hosts: Vec<&Host> = self
            .hosts
            .iter()
            .filter(|h| only.is_none_or(|m| h.member == m))
            .collect();
        if hosts.is_empty() {
            bail!("no such member {only:?}");
        }
        for h in &hosts {
            cfg.host(&h.name).hostaddr(h.addr).port(h.port);
        }
        cfg.user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name("pgkeep-bench")
            .ssl_mode(SslMode::Require)
            .connect_timeout(deadline);
        if only.is_none() {
            cfg.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        let (client, mut conn) = tokio::time::timeout(deadline, cfg.connect(self.tls.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("connect deadline {deadline:?} passed"))?
            .map_err(|e| anyhow::anyhow!("{}", one_line(&e)))?;
        let flag = Arc::new(AtomicBool::new(false));
        let seen = flag.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        if n.message().contains("committed locally")
                            || n.detail().is_some_and(|d| d.contains("committed locally"))
                        {
                            seen.store(true, Ordering::SeqCst);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        });
        Ok(Session {
            client,
            committed_locally: flag,
            driver,
        })
    }

    /// Connects (retrying for up to `within`) and runs `sql` (simple protocol); the rows.
    pub async fn query(&self, sql: &str, within: Duration) -> Result<Vec<Vec<String>>> {
        let t0 = Instant::now();
        loop {
            let r = async {
                let s = self.connect(Duration::from_secs(3), None).await?;
                simple_rows(&s.client, sql).await
            }
            .await;
            match r {
                Ok(rows) => return Ok(rows),
                Err(e) if t0.elapsed() >= within => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
}

/// Runs `sql` with the simple protocol; every row's columns as text ("" for NULL).
pub async fn simple_rows(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<Vec<String>>> {
    let msgs = client
        .simple_query(sql)
        .await
        .map_err(|e| anyhow::anyhow!("{sql}: {}", one_line(&e)))?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// A tokio-postgres error on one line, with the server's SQLSTATE when there is one.
pub fn one_line(e: &tokio_postgres::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(x) = src {
                s.push_str(": ");
                s.push_str(&x.to_string());
                src = x.source();
            }
            s
        }
    };
    text.replace(['\n', '\t'], " ")
}

/// What one attempt of the writer came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A session was established.
    Connected,
    /// No read-write session within the deadline.
    ConnectFailed,
    /// The commit was acknowledged.
    Ack,
    /// The server rejected the statement: not committed.
    Failed,
    /// The outcome cannot be known from the client.
    Unknown,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Connected => "conn",
            Outcome::ConnectFailed => "cerr",
            Outcome::Ack => "ack",
            Outcome::Failed => "failed",
            Outcome::Unknown => "unknown",
        }
    }
}

/// One attempt: times are epoch seconds on this host's clock.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Row number (0 for connection attempts).
    pub seq: u64,
    /// When it started.
    pub t0: f64,
    /// When it ended.
    pub t1: f64,
    /// The outcome.
    pub outcome: Outcome,
    /// The server port that acknowledged it (0 if none).
    pub port: u16,
    /// The error, if any.
    pub msg: String,
}

/// The writer's settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// One INSERT per tick.
    pub interval: Duration,
    /// Connect deadline of one attempt (all hosts).
    pub connect_deadline: Duration,
    /// Longest wait for a commit's answer before the connection is dropped (outcome unknown).
    pub commit_limit: Duration,
}

/// A running writer.
pub struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
    handle: JoinHandle<()>,
}

impl Writer {
    /// Starts writing rows `(run, 1..)` to `target`'s primary.
    pub fn start(target: Target, run: String, s: WriterSettings) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (stop.clone(), log.clone());
        let handle = tokio::spawn(async move { write_loop(target, run, s, flag, sink).await });
        Writer { stop, log, handle }
    }

    /// True once a write that started at or after `t` was acknowledged by `port` (any port
    /// when `None`).
    pub fn acked_after(&self, t: f64, port: Option<u16>) -> bool {
        self.log.lock().is_ok_and(|l| {
            l.iter()
                .any(|a| a.outcome == Outcome::Ack && a.t0 >= t && port.is_none_or(|p| a.port == p))
        })
    }

    /// Stops after the attempt in progress (never interrupting a commit) and returns the log.
    pub async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.await;
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

async fn write_loop(
    target: Target,
    run: String,
    s: WriterSettings,
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<Attempt>>>,
) {
    let push = |a: Attempt| {
        if let Ok(mut l) = sink.lock() {
            l.push(a);
        }
    };
    let mut session: Option<Session> = None;
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if session.is_none() {
            let t0 = now();
            match target.connect(s.connect_deadline, None).await {
                Ok(sess) => {
                    push(attempt(0, t0, Outcome::Connected, 0, String::new()));
                    session = Some(sess);
                }
                Err(e) => {
                    push(attempt(0, t0, Outcome::ConnectFailed, 0, format!("{e:#}")));
                    pace(&mut next, s.interval).await;
                    continue;
                }
            }
        }
        let Some(sess) = session.as_ref() else {
            continue;
        };
        seq += 1;
        let sql = format!(
            "INSERT INTO bench_writes (run, seq) VALUES ('{run}', {seq}) RETURNING inet_server_port()"
        );
        let t0 = now();
        let (outcome, port, msg) =
            match tokio::time::timeout(s.commit_limit, sess.client.simple_query(&sql)).await {
                Ok(Ok(msgs)) => {
                    let port = msgs
                        .iter()
                        .find_map(|m| match m {
                            SimpleQueryMessage::Row(r) => r.get(0).and_then(|p| p.parse().ok()),
                            _ => None,
                        })
                        .unwrap_or(0);
                    if sess.committed_locally.swap(false, Ordering::SeqCst) {
                        (
                            Outcome::Unknown,
                            port,
                            "committed locally only (warning)".into(),
                        )
                    } else {
                        (Outcome::Ack, port, String::new())
                    }
                }
                Ok(Err(e)) => (classify(&e), 0, one_line(&e)),
                Err(_) => (
                    Outcome::Unknown,
                    0,
                    format!("no answer within {:?}; connection dropped", s.commit_limit),
                ),
            };
        if outcome != Outcome::Ack {
            session = None;
        }
        push(attempt(seq, t0, outcome, port, msg));
        pace(&mut next, s.interval).await;
    }
}

fn attempt(seq: u64, t0: f64, outcome: Outcome, port: u16, msg: String) -> Attempt {
    Attempt {
        seq,
        t0,
        t1: now(),
        outcome,
        port,
        msg,
    }
}

/// Sleeps until the next tick; a writer that fell behind starts a new schedule.
async fn pace(next: &mut Instant, interval: Duration) {
    *next += interval;
    let now = Instant::now();
    if *next > now {
        tokio::time::sleep_until((*next).into()).await;
    } else {
        *next = now;
    }
}

/// A rejected statement (read-only session, constraint, syntax) committed nothing; anything
/// else (the session terminated, the connection broke) leaves the commit's fate unknown.
pub fn classify(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) if sqlstate_means_not_committed(db.code().code()) => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

/// SQLSTATE classes that reject a statement before anything is committed.
pub fn sqlstate_means_not_committed(code: &str) -> bool {
    ["25", "23", "42", "22"].iter().any(|c| code.starts_with(c))
}

/// What the new primary holds of one run's rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loss {
    /// Acknowledged rows.
    pub acked: usize,
    /// Acknowledged rows missing on the primary: lost.
    pub lost: usize,
    /// Rows whose outcome was unknown.
    pub unknown: usize,
    /// ... of which the primary has.
    pub unknown_present: usize,
    /// Rows reported failed that are present anyway (should be 0).
    pub failed_present: usize,
}

/// Compares the writer's log with the rows of `run` on the current primary.
pub async fn check_loss(target: &Target, run: &str, log: &[Attempt]) -> Result<Loss> {
    let rows = target
        .query(
            &format!("SELECT seq FROM bench_writes WHERE run = '{run}'"),
            Duration::from_secs(30),
        )
        .await
        .context("reading back the rows")?;
    let present: std::collections::BTreeSet<u64> = rows
        .iter()
        .filter_map(|r| r.first()?.parse().ok())
        .collect();
    let mut l = Loss::default();
    for a in log.iter().filter(|a| a.seq > 0) {
        let here = present.contains(&a.seq);
        match a.outcome {
            Outcome::Ack => {
                l.acked += 1;
                l.lost += usize::from(!here);
            }
            Outcome::Unknown => {
                l.unknown += 1;
                l.unknown_present += usize::from(here);
            }
            Outcome::Failed => l.failed_present += usize::from(here),
            Outcome::Connected | Outcome::ConnectFailed => {}
        }
    }
    Ok(l)
}

/// The writer log as text: `outcome seq t0 t1 port message`, one attempt per line.
pub fn log_text(log: &[Attempt]) -> String {
    log.iter()
        .map(|a| {
            format!(
                "{} {} {:.6} {:.6} {} {}\n",
                a.outcome.word(),
                a.seq,
                a.t0,
                a.t1,
                a.port,
                a.msg
            )
        })
        .collect()
}

/// The first acknowledged write that started at or after `t`.
pub fn first_ack_after(log: &[Attempt], t: f64) -> Option<&Attempt> {
    log.iter().find(|a| a.outcome == Outcome::Ack && a.t0 >= t)
}

/// The last acknowledged write that ended at or before `t`.
pub fn last_ack_before(log: &[Attempt], t: f64) -> Option<&Attempt> {
    log.iter()
        .filter(|a| a.outcome == Outcome::Ack && a.t1 <= t)
        .max_by(|a, b| a.t1.total_cmp(&b.t1))
}

/// The client's write gap across a change of primary from `old_port` to `new_port` after
/// `from`: (last ack by the old primary, first ack by the new one).
pub fn switch_gap(log: &[Attempt], old_port: u16, new_port: u16, from: f64) -> Option<(f64, f64)> {
    let first_new = log
        .iter()
        .find(|a| a.outcome == Outcome::Ack && a.port == new_port && a.t0 >= from)?;
    let last_old = log
        .iter()
        .filter(|a| a.outcome == Outcome::Ack && a.port == old_port && a.t1 <= first_new.t1)
        .max_by(|a, b| a.t1.total_cmp(&b.t1))?;
    Some((last_old.t1, first_new.t1))
}

/// How many attempts of each non-ack kind ended in `[a, b]`: (failed, unknown, connect failures).
pub fn errors_between(log: &[Attempt], a: f64, b: f64) -> (usize, usize, usize) {
    let n = |o: Outcome| {
        log.iter()
            .filter(|x| x.outcome == o && x.t1 >= a && x.t1 <= b)
            .count()
    };
    (
        n(Outcome::Failed),
        n(Outcome::Unknown),
        n(Outcome::ConnectFailed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(seq: u64, t0: f64, outcome: Outcome, port: u16) -> Attempt {
        Attempt {
            seq,
            t0,
            t1: t0 + 0.002,
            outcome,
            port,
            msg: String::new(),
        }
    }

    fn log() -> Vec<Attempt> {
        vec![
            a(1, 1.00, Outcome::Ack, 5001),
            a(2, 1.01, Outcome::Ack, 5001),
            a(3, 1.02, Outcome::Unknown, 0),
            a(0, 1.03, Outcome::ConnectFailed, 0),
            a(4, 1.20, Outcome::Failed, 0),
            a(5, 1.30, Outcome::Ack, 5002),
            a(6, 1.31, Outcome::Ack, 5002),
        ]
    }

    #[test]
    fn gap_between_primaries() {
        let l = log();
        let (last, first) = switch_gap(&l, 5001, 5002, 1.015).unwrap();
        assert!((last - 1.012).abs() < 1e-9);
        assert!((first - 1.302).abs() < 1e-9);
        assert!(switch_gap(&l, 5001, 5003, 1.0).is_none());
    }

    #[test]
    fn first_and_last_acks() {
        let l = log();
        assert_eq!(first_ack_after(&l, 1.015).unwrap().seq, 5);
        assert_eq!(last_ack_before(&l, 1.2).unwrap().seq, 2);
        assert_eq!(errors_between(&l, 1.0, 2.0), (1, 1, 1));
    }

    #[test]
    fn sqlstates() {
        assert!(sqlstate_means_not_committed("25006"));
        assert!(!sqlstate_means_not_committed("57P01"));
        assert!(!sqlstate_means_not_committed("08006"));
    }

    #[test]
    fn log_lines() {
        let t = log_text(&log()[..1]);
        assert!(t.starts_with("ack 1 1.000000 1.002000 5001"));
    }
}
