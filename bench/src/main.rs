//! `pgkeep-bench`: failover and switchover of pgkeep and Patroni side by side in one run, on
//! one machine, one etcd cluster, the same timings and the same client, with the physical
//! switchover floor measured alongside. Prints a markdown report and writes it to
//! `bench/out/<timestamp>.md` (raw writer logs and service logs in `bench/out/<timestamp>/`).
//! Everything it starts runs in its own cgroups and is stopped again, even on failure or
//! SIGINT/SIGTERM. See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use pgkeep_bench::client::WriterSettings;
use pgkeep_bench::cluster::{Cluster, Timings};
use pgkeep_bench::floor::Floor;
use pgkeep_bench::front::{self, Front};
use pgkeep_bench::loops::{self, Fronts};
use pgkeep_bench::nginx::Nginx;
use pgkeep_bench::report::{FailoverSet, Report};
use pgkeep_bench::scenario_rest::{self, RestArgs};
use pgkeep_bench::sys::{self, Cgroups, Cmd, User, now};
use pgkeep_bench::trials::Settings;
use pgkeep_bench::{patroni, pgkeep};

/// Compare pgkeep and Patroni: failover (host loss) and switchover, side by side.
#[derive(Debug, Parser)]
#[command(name = "pgkeep-bench", version, about)]
struct Args {
    /// Trials per product and scenario.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Scenarios, comma-separated, run in this order: failover, switchover, rest (REST API
    /// `GET /primary` with ab next to nginx, and the agents' idle memory and CPU).
    #[arg(long, default_value = "failover,switchover", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Timings for failover, comma-separated: aggressive (10/2/4), default (30/10/10) or
    /// TTL/LOOP_WAIT/RETRY_TIMEOUT. Switchovers run under the first only.
    #[arg(long, default_value = "aggressive", value_delimiter = ',')]
    timings: Vec<String>,
    /// Kill the leader's host this many ms after a keepalive of its lease was seen.
    #[arg(long, default_value_t = 250)]
    kill_phase_ms: u64,
    /// Synchronous replication: `synchronous_mode: true` in both products' dynamic
    /// configuration (the etcd `config` key) for every scenario; trials start only with a
    /// synchronous standby in place, switchovers go to it.
    #[arg(long)]
    sync: bool,
    /// Stop (SIGSTOP) the leader's WAL senders this many ms before the kill (at most
    /// --kill-phase-ms): asynchronous replication then loses the writes acknowledged
    /// meanwhile, synchronous replication must lose none. 0 = no stall.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// The failover and switchover writers go through HAProxy: one per product, the same
    /// configuration for both (pgkeep's write backend and check settings), write ports
    /// --port-base + 201 (pgkeep) and + 202 (Patroni). The floor is not run.
    #[arg(long)]
    via_haproxy: bool,
    /// The writer's period (one INSERT per tick).
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// The client's connect deadline per attempt (all hosts).
    #[arg(long, default_value_t = 500)]
    connect_deadline_ms: u64,
    /// The pgkeep binary (default: the checkout's target/debug/pgkeep, what `make build` makes).
    #[arg(long)]
    pgkeep_bin: Option<PathBuf>,
    /// Work directory (clusters live in <work>/run-*; removed afterwards).
    #[arg(long, default_value = "/var/tmp/pgkeep-bench")]
    work: PathBuf,
    /// Where reports go (default: bench/out of the source tree).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Ports of the Patroni side, the floor, HAProxy and nginx: PostgreSQL base+433.., REST
    /// base+9.., floor base+101.., HAProxy write base+201 (pgkeep) and base+202 (Patroni),
    /// nginx base+443; all on 127.0.0.1.
    #[arg(long, default_value_t = 17000)]
    port_base: u16,
    /// How long a node may take to rejoin before it is re-cloned (s).
    #[arg(long, default_value_t = 120)]
    rejoin_timeout: u64,
    #[command(flatten)]
    rest: RestArgs,
}

/// Everything started, so it can be stopped again.
struct Env {
    work: PathBuf,
    bin: PathBuf,
    cgroups: Option<Cgroups>,
    pgkeep_dir: Option<PathBuf>,
    pgkeep: Option<Cluster>,
    patroni: Option<Cluster>,
    floor: Option<Floor>,
    nginx: Option<Nginx>,
    fronts: Vec<Front>,
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
    cleaned: bool,
}

impl Env {
    /// Stops everything (floor, Patroni, pgkeep down --purge), removes the hosts block if
    /// left, kills what remains in the cgroups, removes them and the work directory.
    async fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        eprintln!("cleanup: stopping everything this run started");
        for f in &mut self.fronts {
            f.proxy.stop().await;
        }
        if let Some(n) = self.nginx.as_mut() {
            n.stop().await;
        }
        if let Some(f) = &self.floor {
            f.down().await;
        }
        if let Some(p) = self.patroni.as_mut() {
            patroni::down(p).await;
        }
        if let Some(dir) = &self.pgkeep_dir {
            pgkeep::down(&self.bin, dir).await;
            match sys::remove_hosts_block(dir) {
                Ok(true) => eprintln!(
                    "cleanup: removed a leftover /etc/hosts block of {}",
                    dir.display()
                ),
                Ok(false) => {}
                Err(e) => eprintln!("warning: checking /etc/hosts: {e:#}"),
            }
        }
        if let Some(cg) = &self.cgroups {
            cg.remove().await;
            let _ = std::fs::remove_dir(Cgroups::base());
        }
        sys::reap();
        if self.work.starts_with("/var/tmp/pgkeep-bench")
            || self.work.join(".pgkeep-bench-run").exists()
        {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        self.lock = None;
        eprintln!("cleanup: done");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !self.cleaned
            && let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        {
            rt.block_on(self.cleanup());
        }
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = now();
    let stamp = sys::utc_stamp(started);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("out"));
    let raw = out.join(&stamp);
    let bin = args.pgkeep_bin.clone().unwrap_or_else(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        manifest
            .parent()
            .unwrap_or(manifest)
            .join("target/debug/pgkeep")
    });
    let mut env = Env {
        work: args
            .work
            .join(format!("run-{stamp}-{}", std::process::id())),
        bin,
        cgroups: None,
        pgkeep_dir: None,
        pgkeep: None,
        patroni: None,
        floor: None,
        nginx: None,
        fronts: Vec::new(),
        lock: None,
        cleaned: false,
    };
    let mut report = Report::default();
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = run(&args, &mut env, &mut report, &raw) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow::anyhow!("interrupted (SIGTERM)")),
        }
    });
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
        report
            .notes
            .push(format!("**The run stopped early**: {e:#}"));
    }
    report.header = format!(
        "Run {} → {} ({:.0} s). Raw writer logs and service logs: `{}`.",
        sys::utc_text(started),
        sys::utc_text(now()),
        now() - started,
        raw.display()
    );
    save_logs(&env, &raw);
    let md = report.markdown();
    println!("{md}");
    let file = out.join(format!("{stamp}.md"));
    match std::fs::create_dir_all(&out).and_then(|()| std::fs::write(&file, &md)) {
        Ok(()) => eprintln!("report written to {}", file.display()),
        Err(e) => eprintln!("error: writing {}: {e}", file.display()),
    }
    rt.block_on(env.cleanup());
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Copies the agents', Patroni's, etcd's, the floor's, nginx's and HAProxy's logs (and
/// HAProxy's configurations) next to the writer logs.
fn save_logs(env: &Env, raw: &Path) {
    let dest = raw.join("logs");
    let mut dirs: Vec<(PathBuf, String)> = Vec::new();
    if let Some(d) = &env.pgkeep_dir {
        dirs.push((d.join("logs"), "pgkeep-".into()));
    }
    dirs.push((env.work.join("patroni/log"), "patroni-".into()));
    dirs.push((env.work.join("floor"), "floor-".into()));
    dirs.push((env.work.join("nginx"), "nginx-".into()));
    for f in &env.fronts {
        let label = f.proxy.label.to_lowercase();
        dirs.push((f.proxy.dir.clone(), format!("{label}-")));
        let _ = std::fs::create_dir_all(&dest);
        let _ = std::fs::write(dest.join(format!("{label}-haproxy.cfg")), &f.proxy.config);
    }
    for (dir, prefix) in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let _ = std::fs::create_dir_all(&dest);
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let name = format!("{prefix}{}", e.file_name().to_string_lossy());
                let _ = std::fs::copy(&p, dest.join(name));
            }
        }
    }
    for (label, c) in [("pgkeep", &env.pgkeep), ("patroni", &env.patroni)] {
        if let Some(c) = c {
            for m in &c.members {
                let log = m.data_dir.parent().map(|d| d.join("conf/postgresql.log"));
                if let Some(l) = log.filter(|l| l.exists()) {
                    let _ =
                        std::fs::copy(l, dest.join(format!("{label}-{}-postgresql.log", m.name)));
                }
            }
        }
    }
}

/// Leftovers of an earlier run that was killed before it could clean up: their cgroups
/// (every process in them), their pgkeep environments and hosts blocks, their directories.
async fn sweep(work: &Path, bin: &Path, own: &Path) {
    if let Ok(rd) = std::fs::read_dir(Cgroups::base()) {
        for e in rd.flatten().filter(|e| e.path().is_dir()) {
            eprintln!("sweeping leftover cgroup {}", e.path().display());
            sys::remove_tree(&e.path()).await;
        }
    }
    let Ok(rd) = std::fs::read_dir(work) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p == own || !e.file_name().to_string_lossy().starts_with("run-") {
            continue;
        }
        eprintln!("sweeping leftover run directory {}", p.display());
        let dir = p.join("pgkeep");
        if dir.join("inventory.yml").exists() {
            pgkeep::down(bin, &dir).await;
        }
        let _ = sys::remove_hosts_block(&dir);
        let _ = std::fs::remove_dir_all(&p);
    }
}

async fn one_line(program: &str, args: &[&str]) -> String {
    Cmd::new(program)
        .args(args)
        .timeout(Duration::from_secs(20))
        .output()
        .await
        .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e:#})"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(a: &Args, env: &mut Env, report: &mut Report, raw: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root (it starts services as their users, uses cgroups and /etc/hosts)");
    }
    let timings: Vec<Timings> = a
        .timings
        .iter()
        .map(|t| Timings::parse(t))
        .collect::<Result<_>>()?;
    let first = *timings.first().context("--timings is empty")?;
    if a.stall_ms > a.kill_phase_ms {
        bail!(
            "--stall-ms {} exceeds --kill-phase-ms {}: the stall must start after the keepalive",
            a.stall_ms,
            a.kill_phase_ms
        );
    }
    // The binary as given (env.bin becomes the run's private copy below).
    let given_bin = env.bin.display().to_string();
    report.sync = a.sync;
    report.stall = (a.stall_ms > 0).then_some(a.stall_ms);
    report.via_haproxy = a.via_haproxy;
    for s in &a.scenarios {
        if !["failover", "switchover", "rest"].contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (failover, switchover, rest)");
        }
    }
    let has = |name: &str| a.scenarios.iter().any(|s| s == name);
    let (do_failover, do_switch, do_rest) = (has("failover"), has("switchover"), has("rest"));
    if a.via_haproxy && !do_failover && !do_switch {
        bail!("--via-haproxy applies to the failover and switchover scenarios; none is selected");
    }
    let mut needed = vec![
        env.bin.as_path(),
        Path::new("/usr/bin/patroni"),
        Path::new("/usr/bin/etcd"),
        Path::new("/usr/bin/openssl"),
    ];
    if do_rest {
        needed.extend([
            Path::new("/usr/bin/ab"),
            Path::new(pgkeep_bench::nginx::BIN),
        ]);
        if a.rest.loads().is_empty() {
            bail!("rest: no load (--rest-concurrency and --rest-keepalive-concurrency are empty)");
        }
    }
    if a.via_haproxy {
        needed.push(Path::new(front::BIN));
    }
    for p in needed {
        if !p.exists() {
            bail!(
                "{} is missing (cargo build; make deps; make bench SCENARIOS=rest installs nginx)",
                p.display()
            );
        }
    }
    sys::mkdir(&a.work, 0o755, None)?;
    env.lock = Some(sys::lock(&a.work.join(".lock"), Duration::from_secs(5))?);
    sweep(&a.work, &env.bin, &env.work).await;
    sys::mkdir(&env.work, 0o755, None)?;
    sys::write_file(&env.work.join(".pgkeep-bench-run"), "", 0o644, None)?;
    std::fs::create_dir_all(raw)?;
    let pg = User::lookup("postgres")?;
    // A private copy: postgres can execute it, and a rebuild during the run cannot change it.
    let bin = env.work.join("bin/pgkeep");
    sys::mkdir(&env.work.join("bin"), 0o755, None)?;
    std::fs::copy(&env.bin, &bin).with_context(|| format!("copying {}", env.bin.display()))?;
    let cgroups = Cgroups::create(&format!("run-{}", std::process::id()))?;
    env.cgroups = Some(cgroups.clone());
    let cg = &cgroups;
    let ws = WriterSettings {
        interval: Duration::from_millis(a.interval_ms),
        connect_deadline: Duration::from_millis(a.connect_deadline_ms),
        commit_limit: Duration::from_secs(30),
    };
    let settings = Settings {
        writer: ws,
        kill_phase: Duration::from_millis(a.kill_phase_ms),
        lease_poll: Duration::from_millis(10),
        rejoin_timeout: Duration::from_secs(a.rejoin_timeout),
        stall: (a.stall_ms > 0).then(|| Duration::from_millis(a.stall_ms)),
        raw_dir: raw.to_owned(),
    };
    let git = one_line(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .await;
    let rows: Vec<(&str, String)> = vec![
        ("command", format!("`{}`", std::env::args().collect::<Vec<_>>().join(" "))),
        ("machine", format!("{} vCPU, kernel {}, load average at start {}", std::thread::available_parallelism().map_or(0, |n| n.get()), one_line("uname", &["-r"]).await, loadavg())),
        ("pgkeep", format!("{} (checkout {git}), binary {}", pgkeep::version(&bin).await, env.bin.display())),
        ("Patroni", patroni::version().await),
        ("etcd", one_line("/usr/bin/etcd", &["--version"]).await),
        ("PostgreSQL", one_line(&format!("{}/postgres", sys::PG_BIN), &["--version"]).await),
        ("etcd setup", "ONE 3-member etcd cluster shared by both products, started by `pgkeep up` (client and peer TLS, client-certificate auth, heartbeat 100 ms, election timeout 1000 ms); pgkeep under `/service/pgkbench/`, Patroni under `/service/patroni/` with a client certificate from the same CA".into()),
        ("timings", format!("{} (failover); switchovers under {}; both bootstrap with the first set (pgkeep: bootstrap.dcs of node.yml patched before the agents start); later sets go through the etcd `config` key, checked by the leader lease's granted TTL", timings.iter().map(Timings::text).collect::<Vec<_>>().join("; "), first.text())),
        ("replication", if a.sync {
            "**synchronous**: `synchronous_mode: true` (synchronous_node_count 1, not strict) written to both products' etcd `config` key after bootstrap; every trial starts with the `/sync` key naming a standby that the leader's `pg_stat_replication` shows as `sync`; switchovers go to that standby; the floor pair stays asynchronous (a 2-node pair has no standby left after its switch)".to_owned()
        } else {
            "asynchronous (`synchronous_mode` not set)".to_owned()
        }),
        ("replication stall", match a.stall_ms {
            0 => "none".to_owned(),
            ms => format!("the leader's WAL senders SIGSTOPped {ms} ms before the kill ({} ms after the keepalive): the replicas miss what the primary acknowledges meanwhile (asynchronous) or the primary acknowledges nothing (synchronous)", a.kill_phase_ms - ms),
        }),
        ("other dynamic settings", "maximum_lag_on_failover 1048576, use_pg_rewind, use_slots, no watchdog".into()),
        ("health checks / HAProxy", if a.via_haproxy { "(HAProxy not started yet)".into() } else { "no HAProxy: the client connects to the members directly; the harness's health check is REST `GET /primary` (200 on exactly one member) plus the leader's `/patroni` listing the other two as streaming".into() }),
        ("client", format!("Rust tokio-postgres 0.7 + rustls: CA chain and host name verified (verify-full), SCRAM password, TLS ≥ 1.2; {} with target_session_attrs=read-write; own connect deadline {} ms per attempt over all hosts; one autocommit INSERT every {} ms; after any error it reconnects at the next tick; commits are never cancelled (30 s safety limit, then outcome unknown)", if a.via_haproxy { "one host, the product's HAProxy write port," } else { "libpq-style multi-host list in member order" }, a.connect_deadline_ms, a.interval_ms)),
        ("failover method", format!("the leader's host = its cgroup (agent + postmaster + all backends + helpers) killed at once with cgroup.kill, {} ms after a keepalive of the leader lease was seen (LeaseTimeToLive polled every 10 ms: the remaining TTL rises); expiry and new leader key from a watch on the leader key; the killed node restarted afterwards and the next trial starts on a healthy cluster (3 members streaming)", a.kill_phase_ms)),
        ("switchover method", "REST `POST /switchover` {\"leader\",\"candidate\"} with basic auth to the leader (pgkeep also presents the operator client certificate); write gap = last ack by the old primary → first ack by the candidate".into()),
        ("trials", format!("{} per product and scenario; scenarios {}", a.trials, a.scenarios.join(", "))),
    ];
    let mut rows = rows;
    if do_rest {
        rows.push(("REST / resources method", a.rest.text(a.port_base + 443)));
    }
    report.settings = rows.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();

    eprintln!("[1/4] pgkeep up (etcd for everyone, then 3 agents in their own cgroups)");
    let dir = env.work.join("pgkeep");
    env.pgkeep_dir = Some(dir.clone());
    env.bin = bin.clone();
    let (pgk, shared) = pgkeep::up(&bin, &dir, first, cg, &pg, &raw.join("pgkeep-up.txt")).await?;
    let etcd = pgk.etcd.clone();
    env.pgkeep = Some(pgk);
    eprintln!("[2/4] Patroni (3 nodes, same etcd, scope patroni)");
    let pat = patroni::up(
        &env.work.join("patroni"),
        a.port_base,
        first,
        &shared,
        &etcd,
        cg,
        &pg,
    )
    .await?;
    env.patroni = Some(pat);
    if !do_switch || a.via_haproxy {
        eprintln!("[3/4] floor pair: not needed (no switchover scenario, or through HAProxy)");
    } else {
        eprintln!("[3/4] floor pair (plain streaming replication, no HA manager)");
        let ports = [a.port_base + 101, a.port_base + 102];
        env.floor = Some(Floor::setup(&env.work.join("floor"), ports, &shared, cg, &pg).await?);
    }
    if do_rest {
        eprintln!("[3/4] nginx (the REST scenario's reference endpoint)");
        let n = Nginx::start(&env.work.join("nginx"), a.port_base + 443, &shared, cg).await?;
        report.settings.push(("nginx".into(), n.version.clone()));
        env.nginx = Some(n);
    }
    if a.via_haproxy {
        eprintln!("[3/4] HAProxy, one per product (the same write backend and checks)");
        let (Some(k), Some(p)) = (env.pgkeep.as_ref(), env.patroni.as_ref()) else {
            bail!("clusters missing");
        };
        let setup = front::start_all(
            &env.work,
            a.port_base,
            &bin,
            &dir,
            (k, p),
            &shared,
            cg,
            &mut env.fronts,
        )
        .await?;
        let text = setup.text(&env.fronts);
        for (key, v) in report.settings.iter_mut() {
            if key == "health checks / HAProxy" {
                *v = text.clone();
            }
        }
        if !setup.diffs.is_empty() {
            report.notes.push(format!(
                "The bench's pgkeep-side HAProxy configuration differs from `pgkeep render haproxy`: {}",
                setup.diffs.join("; ")
            ));
        }
    }
    let (Some(k), Some(p)) = (env.pgkeep.as_mut(), env.patroni.as_mut()) else {
        bail!("clusters missing");
    };
    let fronts: Fronts<'_> = match &env.fronts[..] {
        [fk, fp] => Some([fk, fp]),
        _ => None,
    };
    k.create_table().await?;
    p.create_table().await?;
    eprintln!("[4/4] trials");
    // A product whose cluster cannot be made healthy again is skipped from then on.
    let mut usable = [true, true];
    for (ti, t) in timings.iter().enumerate() {
        let mut set = FailoverSet {
            timings: Some(*t),
            ..FailoverSet::default()
        };
        let mut ready = usable;
        for (i, c) in [&mut *k, &mut *p].into_iter().enumerate() {
            if !usable[i] {
                set.applied
                    .push(format!("{}: skipped (cluster unusable)", c.label));
                continue;
            }
            match c.apply_dynamic(*t, a.sync).await {
                Ok(g) => set.applied.push(format!(
                    "{}: leader lease granted TTL {g} s; config key {}",
                    c.label,
                    c.config_text().await
                )),
                Err(e) => {
                    ready[i] = false;
                    set.applied.push(format!(
                        "{}: timings{} NOT applied: {e:#}",
                        c.label,
                        if a.sync { " / synchronous_mode" } else { "" }
                    ));
                }
            }
        }
        // The first timings run the scenarios in the order given; later ones only failover.
        let order: Vec<&str> = if ti == 0 {
            a.scenarios.iter().map(String::as_str).collect()
        } else {
            vec!["failover"]
        };
        for scenario in order {
            if scenario == "failover" && do_failover {
                let before = ready;
                loops::failovers(
                    k,
                    p,
                    &mut ready,
                    *t,
                    a.trials,
                    &settings,
                    fronts,
                    &mut set,
                    &mut report.notes,
                )
                .await;
                for i in 0..2 {
                    // Unusable only if the trials broke it (not when the timings were refused).
                    usable[i] = usable[i] && (ready[i] || !before[i]);
                }
            } else if scenario == "switchover" && do_switch {
                let sw = loops::switchovers(
                    k,
                    p,
                    &mut usable,
                    env.floor.as_ref(),
                    a.trials,
                    &settings,
                    fronts,
                    raw,
                    &mut report.notes,
                )
                .await;
                report.switchover = Some(sw);
                ready = [ready[0] && usable[0], ready[1] && usable[1]];
            } else if scenario == "rest"
                && do_rest
                && let Some(n) = env.nginx.as_ref()
            {
                let o = a.rest.options(std::fs::read(&shared.ca)?, raw.to_owned());
                report.rest = Some(scenario_rest::run(k, p, n, &o, &given_bin).await);
            }
        }
        if do_failover {
            report.failover.push(set);
        } else {
            let applied = set.applied.join("; ");
            report
                .settings
                .push(("dynamic configuration applied".into(), applied));
        }
    }
    report
        .settings
        .push(("load average at end".into(), loadavg()));
    Ok(())
}
