//! The REST/resources scenario (issue 8): with both clusters up and idle, first the agents'
//! idle resource use (resident memory, CPU over a window), then `GET /primary` over TLS on
//! each product's current leader and on a plain nginx endpoint, all loaded by the same `ab`
//! with the same loads (a new TLS connection per request at several concurrencies, and
//! keep-alive), then the agents' memory again after the load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::ab::{self, AbResult, Load};
use crate::cluster::Cluster;
use crate::nginx::Nginx;
use crate::rest::Rest;
use crate::usage::{self, Memory};

/// The scenario's command-line flags.
#[derive(Debug, Clone, clap::Args)]
pub struct RestArgs {
    /// rest: seconds per measured `ab` run (`ab -t`).
    #[arg(long, default_value_t = 10)]
    pub rest_secs: u64,
    /// rest: seconds of the untimed warm-up before each measured run (same load).
    #[arg(long, default_value_t = 2)]
    pub rest_warmup_secs: u64,
    /// rest: rounds over every load and endpoint (medians over the rounds).
    #[arg(long, default_value_t = 1)]
    pub rest_rounds: usize,
    /// rest: concurrencies with a new TLS connection per request (`ab -c`).
    #[arg(long, default_value = "4,16", value_delimiter = ',')]
    pub rest_concurrency: Vec<u32>,
    /// rest: concurrencies with keep-alive (`ab -k -c`); empty = none.
    #[arg(long, default_value = "4", value_delimiter = ',')]
    pub rest_keepalive_concurrency: Vec<u32>,
    /// rest: seconds the clusters stay idle before the idle window.
    #[arg(long, default_value_t = 20)]
    pub idle_settle_secs: u64,
    /// rest: the idle window over which the agents' CPU time is measured (s).
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
}

impl RestArgs {
    /// The loads: new connections first, then keep-alive.
    pub fn loads(&self) -> Vec<Load> {
        let new = self.rest_concurrency.iter().map(|c| (*c, false));
        let ka = self.rest_keepalive_concurrency.iter().map(|c| (*c, true));
        new.chain(ka)
            .filter(|(c, _)| *c > 0)
            .map(|(concurrency, keepalive)| Load {
                concurrency,
                keepalive,
            })
            .collect()
    }

    /// The options of a run.
    pub fn options(&self, ca_pem: Vec<u8>, raw_dir: PathBuf) -> Options {
        Options {
            loads: self.loads(),
            secs: self.rest_secs.max(1),
            warmup_secs: self.rest_warmup_secs,
            rounds: self.rest_rounds.max(1),
            settle: Duration::from_secs(self.idle_settle_secs),
            idle: Duration::from_secs(self.idle_secs.max(1)),
            ca_pem,
            raw_dir,
        }
    }

    /// The report's settings row.
    pub fn text(&self, nginx_port: u16) -> String {
        format!(
            "`ab` (apache2-utils) for all three endpoints: `-t {} -n 5000000 -r -e`, loads {}, {} s warm-up before each run, {} round(s); `GET /primary` on each product's leader (anonymous: no client certificate, no basic auth) and on nginx (1 worker, `return 200`, 127.0.0.1:{nginx_port}, certificate from the same CA); idle resources: {} s settle, then {} s window",
            self.rest_secs,
            self.loads()
                .iter()
                .map(Load::text)
                .collect::<Vec<_>>()
                .join(", "),
            self.rest_warmup_secs,
            self.rest_rounds,
            self.idle_settle_secs,
            self.idle_secs
        )
    }
}

/// How the scenario runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The loads, in order.
    pub loads: Vec<Load>,
    /// Seconds per measured `ab` run.
    pub secs: u64,
    /// Seconds of the untimed warm-up run before each measured one.
    pub warmup_secs: u64,
    /// Rounds over every load and endpoint (the report gives medians).
    pub rounds: usize,
    /// Idle time before the idle window.
    pub settle: Duration,
    /// The idle window (CPU delta).
    pub idle: Duration,
    /// The cluster CA (the anonymous probe verifies every endpoint's certificate).
    pub ca_pem: Vec<u8>,
    /// Where ab's raw output goes.
    pub raw_dir: PathBuf,
}

/// One endpoint under load.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// `nginx`, `pgkeep` or `Patroni`.
    pub product: &'static str,
    /// The member whose API is loaded (the leader), or `–` for nginx.
    pub member: String,
    /// `https://…/primary`.
    pub url: String,
    /// The processes whose CPU time is the server's (nginx master + worker, the agent,
    /// Patroni's python process).
    pub server_pids: Vec<u32>,
    /// An anonymous `GET /primary` (CA-verified TLS, no client certificate, no basic auth):
    /// `200 {}` or the error.
    pub probe: String,
}

/// One measured `ab` run.
#[derive(Debug, Clone)]
pub struct LoadRow {
    /// The load.
    pub load: Load,
    /// `nginx`, `pgkeep` or `Patroni`.
    pub product: &'static str,
    /// Round (1-based).
    pub round: usize,
    /// ab's figures, or why it failed.
    pub result: Result<AbResult, String>,
    /// CPU seconds the server processes used during the run.
    pub server_cpu: Option<f64>,
    /// CPU seconds ab used.
    pub ab_cpu: Option<f64>,
    /// CPU seconds everything else on the machine used during the run (noise).
    pub other_cpu: Option<f64>,
}

/// One agent process's resource use.
#[derive(Debug, Clone, Default)]
pub struct ProcUsage {
    /// `pgkeep` or `Patroni`.
    pub product: &'static str,
    /// Member name.
    pub member: String,
    /// `leader` / `replica`.
    pub role: String,
    /// `agent`, `fence-guard` (pgkeep's child) or `patroni` (the python process).
    pub process: &'static str,
    /// Its PID.
    pub pid: u32,
    /// Memory at the end of the idle window.
    pub idle: Option<Memory>,
    /// CPU seconds per minute over the idle window.
    pub cpu_per_min: Option<f64>,
    /// The member's whole cgroup (agent + PostgreSQL + helpers), CPU s/min over the window
    /// (on the agent's row only).
    pub node_cpu_per_min: Option<f64>,
    /// Memory after the REST load.
    pub after_load: Option<Memory>,
}

/// Everything the scenario found.
#[derive(Debug, Clone, Default)]
pub struct RestSet {
    /// The endpoints (nginx, pgkeep, Patroni).
    pub endpoints: Vec<Endpoint>,
    /// The loads.
    pub loads: Vec<Load>,
    /// Every measured run.
    pub rows: Vec<LoadRow>,
    /// Per agent process.
    pub usage: Vec<ProcUsage>,
    /// The idle window actually measured (s).
    pub idle_secs: f64,
    /// The settle time before it (s).
    pub settle_secs: f64,
    /// Seconds per measured run, warm-up seconds, rounds.
    pub secs: u64,
    /// Warm-up seconds.
    pub warmup_secs: u64,
    /// Rounds.
    pub rounds: usize,
    /// The pgkeep binary loaded (a debug build is slower).
    pub pgkeep_bin: String,
    /// Remarks (a cluster not healthy, a probe that failed).
    pub notes: Vec<String>,
}

/// The agent processes of a cluster: (member, role, process, pid, member cgroup).
fn agents(c: &Cluster, leader: Option<&str>) -> Vec<(String, String, &'static str, u32, PathBuf)> {
    let mut v = Vec::new();
    for (m, pid) in c.members.iter().zip(&c.pids) {
        let Some(pid) = *pid else { continue };
        let role = if Some(m.name.as_str()) == leader {
            "leader"
        } else {
            "replica"
        };
        let main = if c.label == "pgkeep" {
            "agent"
        } else {
            "patroni"
        };
        v.push((m.name.clone(), role.into(), main, pid, m.cgroup.clone()));
        if c.label == "pgkeep" {
            for g in usage::children(pid, "fence-guard") {
                v.push((
                    m.name.clone(),
                    role.into(),
                    "fence-guard",
                    g,
                    m.cgroup.clone(),
                ));
            }
        }
    }
    v
}

fn cpu_of(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|p| usage::cpu_ticks(*p)).sum()
}

/// Runs the scenario on pgkeep `k`, Patroni `p` and `nginx`.
pub async fn run(k: &Cluster, p: &Cluster, nginx: &Nginx, o: &Options, bin: &str) -> RestSet {
    let mut set = RestSet {
        loads: o.loads.clone(),
        secs: o.secs,
        warmup_secs: o.warmup_secs,
        rounds: o.rounds,
        pgkeep_bin: bin.to_owned(),
        ..RestSet::default()
    };
    let tck = usage::clk_tck().await;
    let anon = Rest::new(&o.ca_pem, None, "", "");
    // Endpoints: nginx and each product's current leader.
    set.endpoints.push(Endpoint {
        product: "nginx",
        member: "–".into(),
        url: nginx.url.clone(),
        server_pids: nginx.pids(),
        probe: String::new(),
    });
    let mut leaders: [Option<String>; 2] = [None, None];
    for (i, c) in [k, p].into_iter().enumerate() {
        match c.wait_healthy(Duration::from_secs(60)).await {
            Ok(h) => {
                let idx = c.index(&h.leader).unwrap_or(0);
                set.endpoints.push(Endpoint {
                    product: c.label,
                    member: h.leader.clone(),
                    url: format!("{}/primary", c.members[idx].api),
                    server_pids: c.pids[idx].into_iter().collect(),
                    probe: String::new(),
                });
                leaders[i] = Some(h.leader);
            }
            Err(e) => set.notes.push(format!(
                "{}: not healthy, its REST API was not measured: {e:#}",
                c.label
            )),
        }
    }
    for e in &mut set.endpoints {
        e.probe = match &anon {
            Ok(r) => match r.get(&e.url).await {
                Ok((code, body)) => format!("{code} `{}`", body.trim().replace('\n', " ")),
                Err(err) => format!("failed: {err:#}"),
            },
            Err(err) => format!("no client: {err:#}"),
        };
    }

    // Idle resources: both clusters idle in the same window.
    let mut procs: Vec<(&'static str, String, String, &'static str, u32, PathBuf)> = Vec::new();
    for (i, c) in [k, p].into_iter().enumerate() {
        for (m, role, what, pid, cg) in agents(c, leaders[i].as_deref()) {
            procs.push((c.label, m, role, what, pid, cg));
        }
    }
    eprintln!(
        "  rest: settling {:?}, then measuring {} agent processes idle for {:?}",
        o.settle,
        procs.len(),
        o.idle
    );
    tokio::time::sleep(o.settle).await;
    let t0 = Instant::now();
    let before: Vec<(Option<u64>, Option<u64>)> = procs
        .iter()
        .map(|x| (usage::cpu_ticks(x.4), usage::cgroup_cpu_usec(&x.5)))
        .collect();
    tokio::time::sleep(o.idle).await;
    let secs = t0.elapsed().as_secs_f64();
    set.settle_secs = o.settle.as_secs_f64();
    set.idle_secs = secs;
    for (x, (cpu0, cg0)) in procs.iter().zip(before) {
        let (product, member, role, process, pid, cg) = x;
        let per_min = |d: f64| d / secs * 60.0;
        let cpu = cpu0
            .zip(usage::cpu_ticks(*pid))
            .map(|(a, b)| per_min(b.saturating_sub(a) as f64 / tck));
        let node = (*process != "fence-guard")
            .then(|| cg0.zip(usage::cgroup_cpu_usec(cg)))
            .flatten()
            .map(|(a, b)| per_min(b.saturating_sub(a) as f64 / 1e6));
        set.usage.push(ProcUsage {
            product,
            member: member.clone(),
            role: role.clone(),
            process,
            pid: *pid,
            idle: usage::memory(*pid),
            cpu_per_min: cpu,
            node_cpu_per_min: node,
            after_load: None,
        });
    }

    // Load: every round runs every load on every endpoint; the endpoint order rotates by round.
    for round in 1..=o.rounds {
        for load in &o.loads {
            let mut order = set.endpoints.clone();
            let n = order.len().max(1);
            order.rotate_left((round - 1) % n);
            for e in &order {
                let tag = format!(
                    "{}-c{}{}-r{round}",
                    e.product.to_lowercase(),
                    load.concurrency,
                    if load.keepalive { "k" } else { "" }
                );
                eprintln!(
                    "  rest: {} {} round {round}/{}",
                    e.product,
                    load.text(),
                    o.rounds
                );
                if o.warmup_secs > 0 {
                    let _ = ab::run(
                        &e.url,
                        *load,
                        o.warmup_secs,
                        &o.raw_dir.join(format!("ab-warmup-{tag}")),
                    )
                    .await;
                }
                let sample = || {
                    (
                        cpu_of(&e.server_pids),
                        usage::own_children_ticks(),
                        usage::busy_ticks(),
                    )
                };
                let (s0, a0, b0) = sample();
                let r = ab::run(&e.url, *load, o.secs, &o.raw_dir.join(format!("ab-{tag}"))).await;
                let (s1, a1, b1) = sample();
                let d = |a: Option<u64>, b: Option<u64>| {
                    a.zip(b).map(|(a, b)| b.saturating_sub(a) as f64 / tck)
                };
                let (server_cpu, ab_cpu) = (d(s0, s1), d(a0, a1));
                let other_cpu = d(b0, b1)
                    .zip(server_cpu.zip(ab_cpu))
                    .map(|(busy, (s, a))| (busy - s - a).max(0.0));
                if let Ok(r) = &r {
                    eprintln!(
                        "    {:.0} req/s, p50 {} ms, p99 {} ms, {} complete, {} failed, {} non-2xx",
                        r.rps,
                        r.p50.map_or("–".into(), |x| format!("{x:.2}")),
                        r.p99.map_or("–".into(), |x| format!("{x:.2}")),
                        r.complete,
                        r.failed,
                        r.non2xx
                    );
                }
                set.rows.push(LoadRow {
                    load: *load,
                    product: e.product,
                    round,
                    result: r.map_err(|e| format!("{e:#}")),
                    server_cpu,
                    ab_cpu,
                    other_cpu,
                });
            }
        }
    }
    for u in &mut set.usage {
        u.after_load = usage::memory(u.pid);
    }
    set
}
