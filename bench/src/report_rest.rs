//! The REST/resources part of the report: endpoints, every `ab` run, medians and ratios per
//! load, the agents' memory and idle CPU, and the issue 8 targets.

use std::fmt::Write as _;

use crate::ab::{AbResult, Load};
use crate::report::{median, ratio, verdict};
use crate::scenario_rest::{ProcUsage, RestSet};
use crate::usage::Memory;

/// The products in table order.
const PRODUCTS: [&str; 3] = ["nginx", "pgkeep", "Patroni"];

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn x(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.2}"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Medians over the clean rounds of one product and load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Requests per second.
    pub rps: Option<f64>,
    /// p50 (ms).
    pub p50: Option<f64>,
    /// p99 (ms).
    pub p99: Option<f64>,
    /// Server CPU per request (µs).
    pub cpu_us: Option<f64>,
    /// Clean rounds / rounds.
    pub clean: (usize, usize),
}

/// The medians of `product` under `load`.
pub fn summary(set: &RestSet, product: &str, load: Load) -> Summary {
    let rows: Vec<_> = set
        .rows
        .iter()
        .filter(|r| r.product == product && r.load == load)
        .collect();
    let clean: Vec<(&AbResult, Option<f64>)> = rows
        .iter()
        .filter_map(|r| {
            r.result
                .as_ref()
                .ok()
                .filter(|a| a.clean())
                .map(|a| (a, r.server_cpu))
        })
        .collect();
    let m = |g: &dyn Fn(&AbResult, Option<f64>) -> Option<f64>| {
        median(
            &clean
                .iter()
                .filter_map(|(a, c)| g(a, *c))
                .collect::<Vec<_>>(),
        )
    };
    Summary {
        rps: m(&|a, _| Some(a.rps)),
        p50: m(&|a, _| a.p50),
        p99: m(&|a, _| a.p99),
        cpu_us: m(&|a, c| c.map(|c| c / a.complete.max(1) as f64 * 1e6)),
        clean: (clean.len(), rows.len()),
    }
}

fn rss_median(usage: &[ProcUsage], product: &str, process: &str) -> Option<f64> {
    mem_median(usage, product, process, |m| Some(m.rss_kb))
}

/// The median over the members of one memory figure (MB) at the end of the idle window.
fn mem_median(
    usage: &[ProcUsage],
    product: &str,
    process: &str,
    g: fn(&Memory) -> Option<u64>,
) -> Option<f64> {
    median(
        &usage
            .iter()
            .filter(|u| u.product == product && u.process == process)
            .filter_map(|u| u.idle.as_ref().and_then(g).map(mb))
            .collect::<Vec<_>>(),
    )
}

/// Per member: agent RSS + its fence-guards' (MB).
fn with_children(usage: &[ProcUsage], product: &str) -> Vec<f64> {
    let mut members: Vec<&str> = usage
        .iter()
        .filter(|u| u.product == product)
        .map(|u| u.member.as_str())
        .collect();
    members.sort_unstable();
    members.dedup();
    members
        .iter()
        .map(|m| {
            usage
                .iter()
                .filter(|u| u.product == product && u.member == *m)
                .filter_map(|u| u.idle.map(|x| mb(x.rss_kb)))
                .sum()
        })
        .collect()
}

fn cpu_median(usage: &[ProcUsage], product: &str, process: &str) -> Option<f64> {
    median(
        &usage
            .iter()
            .filter(|u| u.product == product && u.process == process)
            .filter_map(|u| u.cpu_per_min)
            .collect::<Vec<_>>(),
    )
}

/// Writes the section and pushes its targets.
pub fn section(o: &mut String, set: &RestSet, targets: &mut Vec<(String, &'static str)>) {
    let _ = writeln!(
        o,
        "\n## REST API `GET /primary` over TLS (ab) and agent resources\n\n\
         Same load tool for all three: `ab -t {} -n 5000000 -r -e` (apache2-utils), each measured run after an untimed {} s warm-up with the same load; {} round(s); medians over the clean rounds. \
         Without `-k` every request opens a new TCP + TLS connection (as HAProxy's checks do); ab's time per request is connect + TLS handshake + request + response. pgkeep binary: `{}`{}.\n",
        set.secs,
        set.warmup_secs,
        set.rounds,
        set.pgkeep_bin,
        if set.pgkeep_bin.contains("/debug/") {
            " (**a debug build**: unoptimised Rust code, the figures of a release build are better)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "| product | member | URL | anonymous `GET /primary` (CA verified, no client certificate) | TLS (ab) | key exchange | Server | document length |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for e in &set.endpoints {
        let first = set
            .rows
            .iter()
            .filter(|r| r.product == e.product)
            .find_map(|r| r.result.as_ref().ok());
        let cell = |g: fn(&AbResult) -> &str| first.map_or("–".to_owned(), |a| g(a).to_owned());
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            e.product,
            e.member,
            e.url,
            e.probe.replace('|', "\\|"),
            cell(|a| &a.tls),
            cell(|a| &a.temp_key),
            cell(|a| &a.server),
            cell(|a| &a.doc_length)
        );
    }
    let _ = writeln!(
        o,
        "\nEvery run:\n\n| load | product | round | req/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | complete | failed | non-2xx | keep-alive reqs | server CPU (s) | server CPU / request (µs) | ab CPU (s) | other CPU (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in &set.rows {
        match &r.result {
            Ok(a) => {
                let failed = if a.failed > 0 {
                    format!("{} {}", a.failed, a.failed_detail)
                } else {
                    "0".into()
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {failed} | {} | {} | {} | {} | {} | {} |",
                    r.load.text(),
                    r.product,
                    r.round,
                    a.rps,
                    f(a.p50, 2),
                    f(a.p90, 2),
                    f(a.p99, 2),
                    f(a.max, 1),
                    a.complete,
                    a.non2xx,
                    a.keepalive_requests.map_or("–".into(), |k| k.to_string()),
                    f(r.server_cpu, 2),
                    f(r.server_cpu.map(|c| c / a.complete.max(1) as f64 * 1e6), 0),
                    f(r.ab_cpu, 2),
                    f(r.other_cpu, 2),
                );
            }
            Err(e) => {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | ab failed: {} |||||||||||||",
                    r.load.text(),
                    r.product,
                    r.round,
                    e.replace(['|', '\n'], " ")
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "\nMedians (clean runs: completed, no non-2xx answer, no connect/receive failure):\n\n| load | nginx req/s | pgkeep req/s | Patroni req/s | pgkeep / nginx | pgkeep / Patroni | p50 ms nginx / pgkeep / Patroni | p99 ms nginx / pgkeep / Patroni | server CPU µs/request nginx / pgkeep / Patroni |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for load in &set.loads {
        let s: Vec<Summary> = PRODUCTS.iter().map(|p| summary(set, p, *load)).collect();
        let rps = |i: usize| {
            let (c, n) = s[i].clean;
            let v = f(s[i].rps, 0);
            if c < n {
                format!("{v} ({c} of {n} clean)")
            } else {
                v
            }
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {} / {} / {} |",
            load.text(),
            rps(0),
            rps(1),
            rps(2),
            x(ratio(s[1].rps, s[0].rps)),
            x(ratio(s[1].rps, s[2].rps)),
            f(s[0].p50, 2),
            f(s[1].p50, 2),
            f(s[2].p50, 2),
            f(s[0].p99, 2),
            f(s[1].p99, 2),
            f(s[2].p99, 2),
            f(s[0].cpu_us, 0),
            f(s[1].cpu_us, 0),
            f(s[2].cpu_us, 0),
        );
    }
    resources(o, set);
    for n in &set.notes {
        let _ = writeln!(o, "- {}", n.replace('\n', " "));
    }
    rest_targets(set, targets);
}

fn resources(o: &mut String, set: &RestSet) {
    let _ = writeln!(
        o,
        "\nAgent resources, both clusters idle in the same window ({:.0} s settle, then {:.1} s measured; RSS = `VmRSS` of `/proc/<pid>/status` at the end of the window, anon = `RssAnon`, file = `RssFile` (pages of the executable and libraries, shared by every process mapping the same file), PSS = `Pss` of `/proc/<pid>/smaps_rollup` (shared pages divided among the processes sharing them); CPU = `utime + stime` delta of `/proc/<pid>/stat`; node = the member's whole cgroup `cpu.stat usage_usec`: agent + PostgreSQL + helpers):\n\n| product | member | role | process | PID | RSS idle (MB) | anon (MB) | file (MB) | PSS (MB) | CPU idle (s/min) | node cgroup CPU idle (s/min) | RSS after the REST load (MB) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        set.settle_secs, set.idle_secs
    );
    for u in &set.usage {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            u.product,
            u.member,
            u.role,
            u.process,
            u.pid,
            f(u.idle.map(|m| mb(m.rss_kb)), 1),
            f(u.idle.map(|m| mb(m.anon_kb)), 1),
            f(u.idle.map(|m| mb(m.file_kb)), 1),
            f(u.idle.and_then(|m| m.pss_kb).map(mb), 1),
            f(u.cpu_per_min, 3),
            f(u.node_cpu_per_min, 3),
            f(u.after_load.map(|m| mb(m.rss_kb)), 1),
        );
    }
    let us = &set.usage;
    per_node(o, us);
    let (ka, pa) = (
        rss_median(us, "pgkeep", "agent"),
        rss_median(us, "Patroni", "patroni"),
    );
    let kg = median(&with_children(us, "pgkeep"));
    let (kc, pc) = (
        cpu_median(us, "pgkeep", "agent"),
        cpu_median(us, "Patroni", "patroni"),
    );
    let fc = cpu_median(us, "pgkeep", "fence-guard");
    let pss = |p: &str, q: &str| mem_median(us, p, q, |m| m.pss_kb);
    let anon = |p: &str, q: &str| mem_median(us, p, q, |m| Some(m.anon_kb));
    let (kp, pp) = (pss("pgkeep", "agent"), pss("Patroni", "patroni"));
    let (kn, pn) = (anon("pgkeep", "agent"), anon("Patroni", "patroni"));
    let _ = writeln!(
        o,
        "\n| per node (median of 3) | pgkeep | Patroni | pgkeep / Patroni |\n| --- | --- | --- | --- |\n\
         | agent RSS (MB) | {} | {} | {} |\n\
         | agent + fence-guard RSS (MB) | {} | {} | {} |\n\
         | agent PSS (MB) | {} | {} | {} |\n\
         | agent anonymous RSS (MB) | {} | {} | {} |\n\
         | agent idle CPU (s/min) | {} | {} | {} |\n\
         | fence-guard idle CPU (s/min) | {} | – | |",
        f(ka, 1),
        f(pa, 1),
        x(ratio(ka, pa)),
        f(kg, 1),
        f(pa, 1),
        x(ratio(kg, pa)),
        f(kp, 1),
        f(pp, 1),
        x(ratio(kp, pp)),
        f(kn, 1),
        f(pn, 1),
        x(ratio(kn, pn)),
        f(kc, 3),
        f(pc, 3),
        x(ratio(kc, pc)),
        f(fc, 3),
    );
}

/// Node by node (same member name in both clusters; the roles may differ): RSS and idle CPU
/// of pgkeep's agent (and with its fence-guard) against Patroni's.
fn per_node(o: &mut String, us: &[ProcUsage]) {
    let mut names: Vec<&str> = us.iter().map(|u| u.member.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let _ = writeln!(
        o,
        "\n| node | pgkeep agent RSS (MB) | + fence-guard (MB) | Patroni RSS (MB) | agent / Patroni | agent + fence-guard / Patroni | pgkeep agent CPU (s/min) | Patroni CPU (s/min) | CPU pgkeep / Patroni |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for n in names {
        let one = |product: &str, process: &str| {
            us.iter()
                .find(|u| u.product == product && u.process == process && u.member == n)
        };
        let rss = |u: Option<&ProcUsage>| u.and_then(|u| u.idle).map(|m| mb(m.rss_kb));
        let (ka, pa) = (rss(one("pgkeep", "agent")), rss(one("Patroni", "patroni")));
        let fg: f64 = us
            .iter()
            .filter(|u| u.product == "pgkeep" && u.process == "fence-guard" && u.member == n)
            .filter_map(|u| u.idle.map(|m| mb(m.rss_kb)))
            .sum();
        let kg = ka.map(|a| a + fg);
        let cpu = |u: Option<&ProcUsage>| u.and_then(|u| u.cpu_per_min);
        let (kc, pc) = (cpu(one("pgkeep", "agent")), cpu(one("Patroni", "patroni")));
        let _ = writeln!(
            o,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f(ka, 1),
            f(kg, 1),
            f(pa, 1),
            x(ratio(ka, pa)),
            x(ratio(kg, pa)),
            f(kc, 3),
            f(pc, 3),
            x(ratio(kc, pc)),
        );
    }
}

fn rest_targets(set: &RestSet, targets: &mut Vec<(String, &'static str)>) {
    let c4 = Load {
        concurrency: 4,
        keepalive: false,
    };
    let k4 = Load {
        concurrency: 4,
        keepalive: true,
    };
    if set.loads.contains(&c4) {
        let (n, k, p) = (
            summary(set, "nginx", c4),
            summary(set, "pgkeep", c4),
            summary(set, "Patroni", c4),
        );
        let r = ratio(k.rps, n.rps);
        targets.push((
            format!(
                "REST `GET /primary`, c4 new TLS connection per request: pgkeep ≥ 80 % of nginx's throughput (pgkeep {} req/s, nginx {} req/s, ratio {})",
                f(k.rps, 0),
                f(n.rps, 0),
                x(r)
            ),
            verdict(r.map(|r| r >= 0.8)),
        ));
        targets.push((
            format!(
                "REST c4 new connections: pgkeep p50 ≤ 3 ms ({} ms)",
                f(k.p50, 2)
            ),
            verdict(k.p50.map(|v| v <= 3.0)),
        ));
        targets.push((
            format!(
                "REST c4 new connections: pgkeep p99 ≤ 10 ms ({} ms)",
                f(k.p99, 2)
            ),
            verdict(k.p99.map(|v| v <= 10.0)),
        ));
        let rp = ratio(k.rps, p.rps);
        targets.push((
            format!(
                "REST c4 new connections: pgkeep ≥ 15× Patroni's throughput (expected; pgkeep {} req/s, Patroni {} req/s, ratio {})",
                f(k.rps, 0),
                f(p.rps, 0),
                x(rp)
            ),
            verdict(rp.map(|r| r >= 15.0)),
        ));
    }
    if set.loads.contains(&k4) {
        let k = summary(set, "pgkeep", k4);
        targets.push((
            format!(
                "REST keep-alive c4: pgkeep ≥ 20 000 req/s ({} req/s)",
                f(k.rps, 0)
            ),
            verdict(k.rps.map(|v| v >= 20_000.0)),
        ));
    }
    let us = &set.usage;
    let (ka, pa) = (
        rss_median(us, "pgkeep", "agent"),
        rss_median(us, "Patroni", "patroni"),
    );
    let kg = median(&with_children(us, "pgkeep"));
    targets.push((
        format!(
            "agent resident memory ≤ 1/5 of Patroni's: pgkeep agent {} MB / Patroni {} MB = {}",
            f(ka, 1),
            f(pa, 1),
            x(ratio(ka, pa))
        ),
        verdict(ratio(ka, pa).map(|r| r <= 0.2)),
    ));
    targets.push((
        format!(
            "the same with pgkeep's fence-guard counted: agent + fence-guard {} MB / Patroni {} MB = {}",
            f(kg, 1),
            f(pa, 1),
            x(ratio(kg, pa))
        ),
        verdict(ratio(kg, pa).map(|r| r <= 0.2)),
    ));
    let pss = |p: &str, q: &str| mem_median(us, p, q, |m| m.pss_kb);
    let anon = |p: &str, q: &str| mem_median(us, p, q, |m| Some(m.anon_kb));
    let (kp, pp) = (pss("pgkeep", "agent"), pss("Patroni", "patroni"));
    let (kn, pn) = (anon("pgkeep", "agent"), anon("Patroni", "patroni"));
    targets.push((
        format!(
            "agent memory not shared with other processes (context): PSS pgkeep {} MB / Patroni {} MB = {}; anonymous RSS {} MB / {} MB = {}",
            f(kp, 1),
            f(pp, 1),
            x(ratio(kp, pp)),
            f(kn, 1),
            f(pn, 1),
            x(ratio(kn, pn))
        ),
        "(context)",
    ));
    let (kc, pc) = (
        cpu_median(us, "pgkeep", "agent"),
        cpu_median(us, "Patroni", "patroni"),
    );
    targets.push((
        format!(
            "idle CPU per agent (context, no target): pgkeep {} s/min, Patroni {} s/min",
            f(kc, 3),
            f(pc, 3)
        ),
        "(context)",
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario_rest::LoadRow;

    fn row(product: &'static str, load: Load, rps: f64, p50: f64, p99: f64) -> LoadRow {
        LoadRow {
            load,
            product,
            round: 1,
            result: Ok(AbResult {
                complete: (rps * 10.0) as u64,
                rps,
                p50: Some(p50),
                p99: Some(p99),
                ..AbResult::default()
            }),
            server_cpu: Some(1.0),
            ab_cpu: Some(9.0),
            other_cpu: Some(0.5),
        }
    }

    #[test]
    fn renders_ratios_and_targets() {
        let c4 = Load {
            concurrency: 4,
            keepalive: false,
        };
        let k4 = Load {
            concurrency: 4,
            keepalive: true,
        };
        let mem = |mb: u64| {
            Some(Memory {
                rss_kb: mb * 1024,
                anon_kb: mb * 512,
                file_kb: mb * 512,
                pss_kb: Some(mb * 256),
            })
        };
        let u = |product, process, member: &str, m| ProcUsage {
            product,
            member: member.into(),
            role: "replica".into(),
            process,
            pid: 1,
            idle: mem(m),
            cpu_per_min: Some(0.1),
            ..ProcUsage::default()
        };
        let set = RestSet {
            loads: vec![c4, k4],
            rows: vec![
                row("nginx", c4, 1600.0, 2.3, 5.0),
                row("pgkeep", c4, 1400.0, 2.6, 6.0),
                row("Patroni", c4, 88.0, 44.0, 51.0),
                row("pgkeep", k4, 30_000.0, 0.1, 0.3),
                LoadRow {
                    result: Err("ab: boom".into()),
                    ..row("Patroni", k4, 0.0, 0.0, 0.0)
                },
            ],
            usage: vec![
                u("pgkeep", "agent", "node1", 10),
                u("pgkeep", "fence-guard", "node1", 3),
                u("Patroni", "patroni", "node1", 62),
            ],
            secs: 10,
            rounds: 1,
            pgkeep_bin: "/x/target/debug/pgkeep".into(),
            ..RestSet::default()
        };
        let mut o = String::new();
        let mut t = Vec::new();
        section(&mut o, &set, &mut t);
        assert!(
            o.contains("| c4 new conn | 1600 | 1400 | 88 | 0.88 | 15.91 |"),
            "{o}"
        );
        assert!(o.contains("ab failed: ab: boom"), "{o}");
        assert!(o.contains("a debug build"), "{o}");
        assert!(
            o.contains("| node1 | 10.0 | 13.0 | 62.0 | 0.16 | 0.21 | 0.100 | 0.100 | 1.00 |"),
            "{o}"
        );
        let find = |s: &str| t.iter().find(|(k, _)| k.contains(s)).map(|(_, v)| *v);
        assert_eq!(find("80 % of nginx"), Some("**met**"));
        assert_eq!(find("p50 ≤ 3 ms"), Some("**met**"));
        assert_eq!(find("15× Patroni"), Some("**met**"));
        assert_eq!(find("20 000 req/s"), Some("**met**"));
        assert_eq!(find("agent resident memory"), Some("**met**"));
        // 13 MB / 62 MB = 0.21.
        assert_eq!(find("fence-guard counted"), Some("**not met**"));
        assert_eq!(find("idle CPU"), Some("(context)"));
        assert_eq!(
            find("PSS pgkeep 2.5 MB / Patroni 15.5 MB = 0.16"),
            Some("(context)")
        );
    }
}
