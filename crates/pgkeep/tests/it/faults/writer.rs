//! The fault tests' client: writers that never cancel a commit and record every one as
//! acknowledged, failed (certainly not committed) or unknown, and the checker that compares
//! what was acknowledged with what the surviving primary holds.
//!
//! One writer connects libpq-style to every node with `target_session_attrs=read-write` (the
//! application's view); one more per node connects to that node only, so a node that still
//! commits while another was promoted is caught in the act. Each acknowledged insert returns the
//! node's port and its current timeline (from `pg_walfile_name(pg_current_wal_lsn())`), which
//! is how the checker tells primaries apart.
//!
//! In a network-namespace bed the nodes' addresses exist only inside the bed: a [`Route`]
//! names the namespace every writer thread enters (`setns`, which is per thread) before it
//! creates its runtime and sockets, and each node's address, to connect to by address with
//! the node's DNS name as TLS server name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How one write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Committed and acknowledged by the node on `port`, on `timeline`.
    Acked { port: u16, timeline: u32 },
    /// Acknowledged after PostgreSQL warned that the commit was only local (synchronous
    /// replication wait cancelled): not durable.
    NotDurable,
    /// Certainly not committed (no connection, or refused before committing).
    Failed,
    /// The connection broke while the commit was in flight.
    Unknown,
}

/// One write.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) writer: String,
    pub(super) seq: i64,
    /// Since the writers started.
    pub(super) start: Duration,
    pub(super) end: Duration,
    pub(super) outcome: Outcome,
}

/// Where and how to connect.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) nodes: Vec<(String, u16)>,
    pub(super) user: String,
    pub(super) password: String,
    pub(super) tls: rustls::ClientConfig,
}

/// Where the writers' sockets live when the nodes are in a network-namespace bed.
#[derive(Clone, Debug)]
pub(super) struct Route {
    /// The network namespace every writer thread joins, `/run/netns/<ns>`.
    pub(super) netns: PathBuf,
    /// Each node's address, in the order of [`Target::nodes`] (whose DNS names stay the TLS
    /// server names).
    pub(super) addrs: Vec<IpAddr>,
}

/// One node as a writer connects to it: DNS name, port, and the address to use instead of
/// resolving the name.
type NodeAddr = (String, u16, Option<IpAddr>);

/// Running writers.
pub(super) struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Record>>>,
    pub(super) t0: Instant,
}

/// The SQL the writers need (run it on the primary once).
pub(super) fn schema_sql(user: &str, password: &str) -> String {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    format!(
        "CREATE ROLE {user} LOGIN PASSWORD '{verifier}'; \
         CREATE TABLE fault_log(writer text, seq bigint, PRIMARY KEY (writer, seq)); \
         GRANT SELECT, INSERT ON fault_log TO {user}"
    )
}

const CONNECT_DEADLINE: Duration = Duration::from_millis(500);
const PAUSE: Duration = Duration::from_millis(20);
/// No writer runs longer than this, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(600);

impl Writers {
    /// Starts the multi-host writer `any` and one direct writer per node (`node<port>`).
    pub(super) fn start(target: &Target) -> Writers {
        Self::start_routed(target, None)
    }

    /// [`Writers::start`], with every writer inside `route`'s network namespace connecting to
    /// the nodes by `route`'s addresses (when given).
    pub(super) fn start_routed(target: &Target, route: Option<&Route>) -> Writers {
        if let Some(r) = route {
            assert_eq!(r.addrs.len(), target.nodes.len(), "one address per node");
        }
        let nodes: Vec<NodeAddr> = target
            .nodes
            .iter()
            .enumerate()
            .map(|(i, (h, p))| (h.clone(), *p, route.map(|r| r.addrs[i])))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let mut handles = Vec::new();
        let mut specs = vec![("any".to_owned(), nodes.clone(), true)];
        for n in &nodes {
            specs.push((format!("node{}", n.1), vec![n.clone()], false));
        }
        for (name, nodes, rw) in specs {
            let stop = stop.clone();
            let target = target.clone();
            let netns = route.map(|r| r.netns.clone());
            handles.push(std::thread::spawn(move || {
                if let Some(ns) = netns {
                    // Network namespaces are per thread: this thread (and the threads it
                    // starts, such as the runtime's blocking pool) now lives in the bed.
                    let f = std::fs::File::open(&ns)
                        .unwrap_or_else(|e| panic!("opening {}: {e}", ns.display()));
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {}: {e}", ns.display()));
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(write_loop(name, nodes, rw, target, stop, t0))
            }));
        }
        Writers { stop, handles, t0 }
    }

    /// Time since the writers started.
    pub(super) fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Stops every writer and returns all records.
    pub(super) fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    }
}

fn config(nodes: &[NodeAddr], rw: bool, t: &Target) -> Config {
    let mut c = Config::new();
    for (h, p, addr) in nodes {
        c.host(h).port(*p);
        if let Some(a) = addr {
            c.hostaddr(*a);
        }
    }
    c.user(&t.user)
        .password(&t.password)
        .dbname("postgres")
        .ssl_mode(SslMode::Require)
        .connect_timeout(CONNECT_DEADLINE)
        .application_name("pgkeep-fault-writer");
    if rw {
        c.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    c
}

async fn connect(cfg: &Config, t: &Target, warned: Arc<AtomicBool>) -> Option<Client> {
    let tls = MakeRustlsConnect::new(t.tls.clone());
    let budget = CONNECT_DEADLINE * 4;
    let (client, mut conn) = tokio::time::timeout(budget, cfg.connect(tls))
        .await
        .ok()?
        .ok()?;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notice(n))
                    if n.detail().unwrap_or("").contains("committed locally")
                        || n.message().contains("committed locally") =>
                {
                    warned.store(true, Ordering::SeqCst)
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Some(client)
}

async fn write_loop(
    name: String,
    nodes: Vec<NodeAddr>,
    rw: bool,
    target: Target,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<Record> {
    let cfg = config(&nodes, rw, &target);
    let warned = Arc::new(AtomicBool::new(false));
    let mut client: Option<Client> = None;
    let mut records = Vec::new();
    let mut seq = 0i64;
    while !stop.load(Ordering::SeqCst) && t0.elapsed() < MAX_RUN {
        seq += 1;
        let start = t0.elapsed();
        if client.as_ref().is_none_or(Client::is_closed) {
            warned.store(false, Ordering::SeqCst);
            client = connect(&cfg, &target, warned.clone()).await;
        }
        let outcome = match &client {
            None => Outcome::Failed,
            Some(c) => {
                warned.store(false, Ordering::SeqCst);
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&name, &seq];
                let insert = c.query_one(
                    "INSERT INTO fault_log(writer, seq) VALUES ($1, $2) \
                     RETURNING inet_server_port(), pg_walfile_name(pg_current_wal_lsn())",
                    &params,
                );
                // Never cancelled: when the test stops, an unfinished commit is "unknown".
                let result = tokio::select! {
                    r = insert => Some(r),
                    () = wait_stop(&stop) => None,
                };
                match result {
                    None => Outcome::Unknown,
                    Some(Ok(row)) => {
                        let port: i32 = row.get(0);
                        let wal: String = row.get(1);
                        if warned.load(Ordering::SeqCst) {
                            Outcome::NotDurable
                        } else {
                            Outcome::Acked {
                                port: u16::try_from(port).unwrap_or(0),
                                timeline: u32::from_str_radix(&wal[..8], 16).unwrap_or(0),
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let refused = e.code().is_some_and(|c| {
                            // read_only_sql_transaction, cannot_connect_now, admin_shutdown at
                            // start-up: nothing was committed.
                            *c == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
                        });
                        client = None;
                        if refused {
                            Outcome::Failed
                        } else {
                            Outcome::Unknown
                        }
                    }
                }
            }
        };
        records.push(Record {
            writer: name.clone(),
            seq,
            start,
            end: t0.elapsed(),
            outcome,
        });
        if matches!(outcome, Outcome::Failed | Outcome::Unknown) {
            tokio::time::sleep(PAUSE * 5).await;
        } else {
            tokio::time::sleep(PAUSE).await;
        }
    }
    records
}

async fn wait_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the checker found.
#[derive(Debug)]
pub(super) struct Report {
    /// Acknowledged (durable) writes.
    pub(super) acked: usize,
    /// Acknowledged writes missing on the surviving primary.
    pub(super) lost: Vec<(String, i64)>,
    /// Writes recorded as certainly failed that the primary holds anyway (a writer bug).
    pub(super) failed_but_present: Vec<(String, i64)>,
    /// Pairs of acknowledged writes proving two primaries committed at once: a write on an
    /// older timeline that started after a write on a newer timeline was acknowledged.
    pub(super) split_brain: Vec<String>,
    /// Distinct (port, timeline) pairs that acknowledged writes.
    pub(super) primaries: BTreeSet<(u16, u32)>,
}

impl Report {
    /// The first timeline on which the server on `port` acknowledged writes.
    pub(super) fn first_timeline_on(&self, port: u16) -> Option<u32> {
        self.primaries
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, tl)| *tl)
    }
}

/// Compares the records with the rows the surviving primary holds.
pub(super) fn check(records: &[Record], present: &BTreeSet<(String, i64)>) -> Report {
    let mut lost = Vec::new();
    let mut failed_but_present = Vec::new();
    let mut acked = 0;
    let mut primaries = BTreeSet::new();
    for r in records {
        let key = (r.writer.clone(), r.seq);
        match r.outcome {
            Outcome::Acked { port, timeline } => {
                acked += 1;
                primaries.insert((port, timeline));
                if !present.contains(&key) {
                    lost.push(key);
                }
            }
            Outcome::Failed if present.contains(&key) => failed_but_present.push(key),
            _ => {}
        }
    }
    // The latest acknowledgement on each timeline versus the first on every newer one.
    let mut first_ack: BTreeMap<u32, (Duration, u16)> = BTreeMap::new();
    for r in records {
        if let Outcome::Acked { port, timeline } = r.outcome {
            let e = first_ack.entry(timeline).or_insert((r.end, port));
            if r.end < e.0 {
                *e = (r.end, port);
            }
        }
    }
    let mut split_brain = Vec::new();
    // One timeline has one primary: acknowledgements from two nodes on the same timeline mean
    // two promotions onto it.
    let mut port_of_tl: BTreeMap<u32, u16> = BTreeMap::new();
    for (port, tl) in &primaries {
        if let Some(other) = port_of_tl.insert(*tl, *port) {
            split_brain.push(format!(
                "ports {other} and {port} both acknowledged writes on timeline {tl}"
            ));
        }
    }
    for r in records {
        if let Outcome::Acked { port, timeline } = r.outcome {
            for (tl, (end, p)) in first_ack.range(timeline + 1..) {
                if r.start > *end {
                    split_brain.push(format!(
                        "{}#{} on port {port} timeline {timeline} started at {:?}, after port {p} \
                         timeline {tl} acknowledged at {end:?}",
                        r.writer, r.seq, r.start
                    ));
                }
            }
        }
    }
    Report {
        acked,
        lost,
        failed_but_present,
        split_brain,
        primaries,
    }
}

/// The first acknowledged write (by any writer) that started at or after `t`.
pub(super) fn first_ack_after(records: &[Record], t: Duration) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.start >= t && matches!(r.outcome, Outcome::Acked { .. }))
        .map(|r| r.end)
        .min()
}

/// The last acknowledgement by the node on `port` on `timeline`.
pub(super) fn last_ack_on(records: &[Record], port: u16, timeline: u32) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.outcome == Outcome::Acked { port, timeline })
        .map(|r| r.end)
        .max()
}

/// The longest time between two consecutive acknowledgements of writer `any` that overlaps
/// `[from, to]`: the write gap clients saw. `None` without two acknowledgements around it.
pub(super) fn ack_gap(records: &[Record], from: Duration, to: Duration) -> Option<Duration> {
    let mut acks: Vec<Duration> = records
        .iter()
        .filter(|r| r.writer == "any" && matches!(r.outcome, Outcome::Acked { .. }))
        .map(|r| r.end)
        .collect();
    acks.sort();
    acks.windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(writer: &str, seq: i64, start: u64, end: u64, outcome: Outcome) -> Record {
        Record {
            writer: writer.into(),
            seq,
            start: Duration::from_millis(start),
            end: Duration::from_millis(end),
            outcome,
        }
    }

    #[test]
    fn checker_finds_losses_and_overlapping_primaries() {
        let a1 = Outcome::Acked {
            port: 1,
            timeline: 1,
        };
        let b2 = Outcome::Acked {
            port: 2,
            timeline: 2,
        };
        let records = vec![
            rec("any", 1, 0, 10, a1),
            rec("any", 2, 20, 30, a1),
            rec("any", 3, 40, 50, b2),
            rec("node1", 1, 60, 70, a1),
            rec("any", 4, 80, 90, Outcome::Failed),
        ];
        let present: BTreeSet<_> = [("any", 1), ("any", 3), ("any", 4)]
            .iter()
            .map(|(w, s)| ((*w).to_owned(), *s))
            .collect();
        let r = check(&records, &present);
        assert_eq!(r.acked, 4);
        assert_eq!(r.lost, vec![("any".into(), 2), ("node1".into(), 1)]);
        assert_eq!(r.failed_but_present, vec![("any".into(), 4)]);
        assert_eq!(r.split_brain.len(), 1, "{:?}", r.split_brain);
        // The same history without the late write on the old timeline is clean.
        let clean = check(&records[..3], &present);
        assert!(clean.split_brain.is_empty());
        // Two nodes acknowledging on one timeline is two primaries too.
        let twin = vec![
            rec("any", 1, 0, 10, a1),
            rec(
                "node2",
                1,
                0,
                10,
                Outcome::Acked {
                    port: 2,
                    timeline: 1,
                },
            ),
        ];
        assert_eq!(check(&twin, &present).split_brain.len(), 1);
    }
}
