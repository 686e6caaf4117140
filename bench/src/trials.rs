//! The two trials run against each product: host loss (failover) and a planned switchover
//! through `POST /switchover`, both with the same writer running.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::client::{self, Attempt, Loss, Target, Writer, WriterSettings};
use crate::cluster::{Cluster, Timings};
use crate::etcd;
use crate::front::Front;
use crate::haproxy::{self, ProxyView};
use crate::sys::{self, now};

/// Settings shared by every trial.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The writer.
    pub writer: WriterSettings,
    /// Kill this long after a keepalive of the leader's lease was seen.
    pub kill_phase: Duration,
    /// Lease TTL poll period (how a keepalive is found).
    pub lease_poll: Duration,
    /// How long a node may take to rejoin before it is re-cloned.
    pub rejoin_timeout: Duration,
    /// Stop (SIGSTOP) the leader's WAL senders this long before the kill (at most
    /// `kill_phase`, so it still follows the keepalive): the replicas fall behind, so
    /// asynchronous replication loses what the primary acknowledged meanwhile and
    /// synchronous replication acknowledges nothing.
    pub stall: Option<Duration>,
    /// Where the writer logs go.
    pub raw_dir: PathBuf,
}

/// One host-loss trial.
#[derive(Debug, Clone, Default)]
pub struct FailoverRow {
    /// Trial number.
    pub trial: usize,
    /// The killed leader.
    pub old: String,
    /// The member that took the leader key.
    pub new: String,
    /// Kill time − keepalive seen (s).
    pub phase: f64,
    /// Uncertainty of the keepalive time (poll interval, s).
    pub phase_uncertainty: f64,
    /// Keepalive period seen just before (s).
    pub keepalive_period: Option<f64>,
    /// Processes killed with the host.
    pub killed: usize,
    /// Synchronous mode: the standbys the `/sync` key named just before the kill.
    pub sync_standby: Option<Vec<String>>,
    /// With a stall: (WAL senders stopped, their stop → the kill in s).
    pub stall: Option<(usize, f64)>,
    /// Kill → leader key deleted (lease expired) or replaced, as seen by a watch (s).
    pub kill_to_expiry: Option<f64>,
    /// Expiry → first acknowledged write (s).
    pub expiry_to_ack: Option<f64>,
    /// Kill → first acknowledged write (s).
    pub kill_to_ack: Option<f64>,
    /// Kill → another member's leader key (s).
    pub kill_to_new_key: Option<f64>,
    /// Last acknowledged write before the kill → first after (client gap, s).
    pub client_gap: Option<f64>,
    /// Read-back of the run's rows.
    pub loss: Option<Loss>,
    /// How the killed node came back (restart → healthy cluster).
    pub rejoin: String,
    /// Through HAProxy: when it marked the old primary DOWN and the new one UP.
    pub proxy: Option<ProxyView>,
    /// Anything unusual.
    pub note: String,
}

/// One switchover trial.
#[derive(Debug, Clone, Default)]
pub struct SwitchRow {
    /// Trial number.
    pub trial: usize,
    /// Old leader → candidate.
    pub direction: String,
    /// HTTP status and body of `POST /switchover`.
    pub http: String,
    /// POST sent → response (s).
    pub post_secs: f64,
    /// The client's write gap (s): last ack by the old primary → first ack by the new one.
    pub gap: Option<f64>,
    /// POST sent → first ack by the new primary (s).
    pub post_to_ack: Option<f64>,
    /// Read-back.
    pub loss: Option<Loss>,
    /// Failed / unknown / connect failures during the trial.
    pub errors: (usize, usize, usize),
    /// How the old leader came back (POST answered → healthy cluster).
    pub rejoin: String,
    /// Through HAProxy: when it marked the old primary DOWN and the new one UP, and when the
    /// new leader key appeared.
    pub proxy: Option<ProxyView>,
    /// Anything unusual.
    pub note: String,
}

/// The result of a switchover attempt.
pub enum Switch {
    /// Measured.
    Done(Box<SwitchRow>),
    /// The product does not implement `POST /switchover` (status, body).
    Unsupported(u16, String),
}

fn run_id(c: &Cluster, what: &str, trial: usize) -> String {
    format!("{}-{what}-{trial}", c.label.to_lowercase())
}

async fn finish_writer(w: Writer, raw: PathBuf) -> Result<Vec<Attempt>> {
    let log = w.stop().await;
    std::fs::write(&raw, client::log_text(&log))
        .with_context(|| format!("writing {}", raw.display()))?;
    Ok(log)
}

/// Sleeps until wall-clock time `t` (epoch seconds); returns at once if it passed.
async fn sleep_until(t: f64) {
    let wait = t - now();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

/// Before a trial through HAProxy: it must route to `leader` only; the writer's target (HAProxy's
/// write port, or the members directly) and where HAProxy's log of the trial starts.
async fn prepare(c: &Cluster, front: Option<&Front>, leader: &str) -> Result<(Target, u64)> {
    match front {
        Some(f) => {
            f.proxy
                .wait_routing(leader, Duration::from_secs(60))
                .await?;
            Ok((f.target.clone(), f.proxy.log_len()))
        }
        None => Ok((c.app.clone(), 0)),
    }
}

/// Kills the leader's host at a fixed phase after its lease keepalive, measures, brings the
/// host back. With `front`, the writer goes through that HAProxy.
pub async fn failover(
    c: &mut Cluster,
    trial: usize,
    t: Timings,
    s: &Settings,
    front: Option<&Front>,
) -> Result<FailoverRow> {
    let h = c.wait_healthy(Duration::from_secs(180)).await?;
    let (target, log_at) = prepare(c, front, &h.leader).await?;
    let what = if c.sync { "failover-sync" } else { "failover" };
    let run = run_id(c, &format!("{what}-ttl{}", t.ttl), trial);
    let writer = Writer::start(target, run.clone(), s.writer);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = c.etcd.leader(&c.prefix).await?.context("no leader key")?;
    if leader.name != h.leader {
        let _ = finish_writer(writer, s.raw_dir.join(format!("{run}.log"))).await;
        bail!(
            "leader key names {} but {} answers /primary",
            leader.name,
            h.leader
        );
    }
    let watch = c.etcd.watch_leader(&c.prefix).await?;
    let renewal = c
        .etcd
        .wait_renewal(
            leader.lease,
            s.lease_poll,
            Duration::from_secs(u64::from(3 * t.ttl) + 5),
            true,
        )
        .await;
    let renewal = match renewal {
        Ok(r) => r,
        Err(e) => {
            let _ = finish_writer(writer, s.raw_dir.join(format!("{run}.log"))).await;
            return Err(e);
        }
    };
    let sync_standby = if c.sync {
        match c.sync_key().await {
            Ok(Some((owner, names))) if owner == leader.name => Some(names),
            Ok(_) => Some(Vec::new()),
            Err(e) => {
                let _ = finish_writer(writer, s.raw_dir.join(format!("{run}.log"))).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let t_target = renewal.seen + s.kill_phase.as_secs_f64();
    let mut stopped: Vec<u32> = Vec::new();
    let mut t_stall = None;
    if let Some(stall) = s.stall {
        sleep_until(t_target - stall.as_secs_f64()).await;
        stopped = sys::walsenders(&c.members[c.index(&leader.name)?].cgroup);
        for p in &stopped {
            sys::signal(*p, Signal::SIGSTOP);
        }
        t_stall = Some(now());
    }
    sleep_until(t_target).await;
    let (t_kill, killed) = match c.kill_host(&leader.name).await {
        Ok(k) => k,
        Err(e) => {
            for p in &stopped {
                sys::signal(*p, Signal::SIGCONT);
            }
            let _ = finish_writer(writer, s.raw_dir.join(format!("{run}.log"))).await;
            return Err(e);
        }
    };
    let mut row = FailoverRow {
        trial,
        old: leader.name.clone(),
        phase: t_kill - renewal.seen,
        phase_uncertainty: renewal.seen - renewal.previous_poll,
        keepalive_period: renewal.period,
        killed,
        sync_standby,
        stall: t_stall.map(|t| (stopped.len(), t_kill - t)),
        ..FailoverRow::default()
    };
    let deadline = Instant::now() + Duration::from_secs(u64::from(3 * t.ttl) + 60);
    loop {
        let (exp, _) = etcd::expiry_and_takeover(&watch.events(), &leader.name, t_kill);
        if exp.is_some() && writer.acked_after(t_kill, None) {
            break;
        }
        if Instant::now() >= deadline {
            row.note = "no acknowledged write within 3×ttl+60 s".into();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = finish_writer(writer, s.raw_dir.join(format!("{run}.log"))).await?;
    let events = watch.events();
    let (expiry, takeover) = etcd::expiry_and_takeover(&events, &leader.name, t_kill);
    row.new = events
        .iter()
        .find(|e| e.t >= t_kill && !e.deleted && e.value != leader.name)
        .map(|e| e.value.clone())
        .unwrap_or_default();
    let first = client::first_ack_after(&log, t_kill);
    let old_port = c.app.port_of(&leader.name);
    if let Some(f) = first
        && Some(f.port) == old_port
    {
        row.note = "first write after the kill was acknowledged by the killed primary?!".into();
    }
    if let Some(names) = &row.sync_standby
        && !row.new.is_empty()
        && !names.contains(&row.new)
    {
        row.note
            .push_str(" the new leader was NOT the synchronous standby named in /sync");
    }
    row.kill_to_expiry = expiry.map(|e| e - t_kill);
    row.kill_to_new_key = takeover.map(|e| e - t_kill);
    row.kill_to_ack = first.map(|f| f.t1 - t_kill);
    row.expiry_to_ack = match (expiry, first) {
        (Some(e), Some(f)) => Some(f.t1 - e),
        _ => None,
    };
    row.client_gap = match (client::last_ack_before(&log, t_kill), first) {
        (Some(l), Some(f)) => Some(f.t1 - l.t1),
        _ => None,
    };
    if let Some(f) = front {
        let ev = f.proxy.events_from(log_at);
        let ack = first.map(|a| a.t1);
        row.proxy = Some(haproxy::view(
            &ev, t_kill, &row.old, &row.new, takeover, ack,
        ));
    }
    row.loss = match client::check_loss(&c.app, &run, &log).await {
        Ok(l) => Some(l),
        Err(e) => {
            row.note.push_str(&format!(" read-back failed: {e:#}"));
            None
        }
    };
    let t_rejoin = Instant::now();
    row.rejoin = match c.recover(&leader.name, s.rejoin_timeout).await {
        Ok(how) => format!("{how} in {:.1} s", t_rejoin.elapsed().as_secs_f64()),
        Err(e) => format!("FAILED: {e:#}"),
    };
    Ok(row)
}

/// `POST /switchover` from the leader to the next member, measured with the writer (through
/// HAProxy with `front`).
pub async fn switchover(
    c: &mut Cluster,
    trial: usize,
    s: &Settings,
    front: Option<&Front>,
) -> Result<Switch> {
    let h = c.wait_healthy(Duration::from_secs(180)).await?;
    let (target, log_at) = prepare(c, front, &h.leader).await?;
    let li = c.index(&h.leader)?;
    // In synchronous mode both products only switch over to a synchronous standby.
    let cand = match &h.sync_standby {
        Some(s) => s.clone(),
        None => c.members[(li + 1) % c.members.len()].name.clone(),
    };
    let (old_port, new_port) = (
        c.app.port_of(&h.leader).context("leader port")?,
        c.app.port_of(&cand).context("candidate port")?,
    );
    let run = run_id(
        c,
        if c.sync {
            "switchover-sync"
        } else {
            "switchover"
        },
        trial,
    );
    let writer = Writer::start(target, run.clone(), s.writer);
    // Through HAProxy: when the candidate's leader key appears.
    let watch = match front {
        Some(_) => Some(c.etcd.watch_leader(&c.prefix).await?),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = format!("{}/switchover", c.members[li].api);
    let body = json!({"leader": h.leader, "candidate": cand});
    let t0 = now();
    let posted = c.rest.post(&url, &body, Duration::from_secs(90)).await;
    let t_resp = now();
    let raw = s.raw_dir.join(format!("{run}.log"));
    let (status, text) = match posted {
        Ok(x) => x,
        Err(e) => {
            let _ = finish_writer(writer, raw).await;
            return Err(e);
        }
    };
    if matches!(status, 404 | 405 | 501) {
        let _ = finish_writer(writer, raw).await;
        return Ok(Switch::Unsupported(status, text));
    }
    let mut row = SwitchRow {
        trial,
        direction: format!("{} → {cand}", h.leader),
        http: format!("{status} {text:.80}"),
        post_secs: t_resp - t0,
        ..SwitchRow::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.acked_after(t0, Some(new_port)) {
        if Instant::now() >= deadline {
            row.note = "the candidate acknowledged no write within 60 s".into();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = finish_writer(writer, raw).await?;
    let gap = client::switch_gap(&log, old_port, new_port, t0);
    row.gap = gap.map(|(a, b)| b - a);
    row.post_to_ack = gap.map(|(_, b)| b - t0);
    row.errors = client::errors_between(&log, t0, now());
    row.loss = client::check_loss(&c.app, &run, &log).await.ok();
    let t_rejoin = Instant::now();
    let took = || format!("in {:.1} s", t_rejoin.elapsed().as_secs_f64());
    row.rejoin = match c.wait_healthy(s.rejoin_timeout).await {
        Ok(_) => format!("rejoined {}", took()),
        Err(_) => match c.reclone(&h.leader, s.rejoin_timeout).await {
            Ok(()) => format!("re-cloned {}", took()),
            Err(e) => format!("FAILED: {e:#}"),
        },
    };
    // Read after the rejoin: HAProxy marks the old primary DOWN up to inter + fastinter after
    // its `/primary` stops answering 200, which can be after the writer stopped.
    if let (Some(f), Some(w)) = (front, &watch) {
        let key = w
            .events()
            .iter()
            .find(|e| e.t >= t0 && !e.deleted && e.value == cand)
            .map(|e| e.t);
        let ev = f.proxy.events_from(log_at);
        let ack = gap.map(|(_, b)| b);
        row.proxy = Some(haproxy::view(&ev, t0, &h.leader, &cand, key, ack));
    }
    Ok(Switch::Done(Box::new(row)))
}
