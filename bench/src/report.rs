//! The markdown report: settings, per-trial rows, medians, ratios and the targets.

use std::fmt::Write as _;

use crate::client::Loss;
use crate::cluster::Timings;
use crate::floor::FloorTrial;
use crate::scenario_rest::RestSet;
use crate::trials::{FailoverRow, SwitchRow};

/// Failover trials under one set of timings.
#[derive(Debug, Default)]
pub struct FailoverSet {
    /// The timings (None until set).
    pub timings: Option<Timings>,
    /// "pgkeep: granted lease TTL 10 s" lines, or why the timings could not be applied.
    pub applied: Vec<String>,
    /// pgkeep's trials (an error text when a trial failed).
    pub pgkeep: Vec<Result<FailoverRow, String>>,
    /// Patroni's trials.
    pub patroni: Vec<Result<FailoverRow, String>>,
}

/// Switchover trials.
#[derive(Debug, Default)]
pub struct SwitchSet {
    /// pgkeep's trials.
    pub pgkeep: Vec<Result<SwitchRow, String>>,
    /// Set when pgkeep does not implement `POST /switchover`.
    pub pgkeep_unsupported: Option<String>,
    /// Patroni's trials.
    pub patroni: Vec<Result<SwitchRow, String>>,
    /// The floor's trials.
    pub floor: Vec<Result<FloorTrial, String>>,
}

/// Everything a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Title line details (start time, duration).
    pub header: String,
    /// (setting, value) rows.
    pub settings: Vec<(String, String)>,
    /// Failover sets, one per timings.
    pub failover: Vec<FailoverSet>,
    /// Switchovers (None when not run).
    pub switchover: Option<SwitchSet>,
    /// The REST/resources scenario (None when not run).
    pub rest: Option<RestSet>,
    /// Errors and remarks.
    pub notes: Vec<String>,
    /// The run used `synchronous_mode: true`.
    pub sync: bool,
    /// WAL senders stopped this many ms before each kill.
    pub stall: Option<u64>,
    /// The failover and switchover writers went through HAProxy (`--via-haproxy`).
    pub via_haproxy: bool,
}

/// A per-trial measurement.
type Metric = fn(&FailoverRow) -> Option<f64>;

/// Median of `v` (None when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) fn s3(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}

pub(crate) fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{:.0}", x * 1000.0))
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn r2(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.2}"))
}

fn loss_cells(l: &Option<Loss>) -> (String, String) {
    match l {
        Some(l) => {
            let mut lost = format!("{} / {}", l.acked, l.lost);
            if l.failed_present > 0 {
                lost.push_str(&format!(" ({} failed but present!)", l.failed_present));
            }
            (lost, format!("{} ({})", l.unknown, l.unknown_present))
        }
        None => ("read-back failed".into(), "–".into()),
    }
}

fn ok_rows<T: Clone>(v: &[Result<T, String>]) -> Vec<T> {
    v.iter().filter_map(|r| r.as_ref().ok().cloned()).collect()
}

pub(crate) fn med<T>(rows: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    median(&rows.iter().filter_map(f).collect::<Vec<_>>())
}

fn lost_total<T>(rows: &[T], f: impl Fn(&T) -> &Option<Loss>) -> (usize, usize) {
    rows.iter()
        .filter_map(|r| f(r).as_ref())
        .fold((0, 0), |(a, l), x| (a + x.acked, l + x.lost))
}

pub(crate) fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "n/a",
    }
}

impl Report {
    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# pgkeep vs Patroni: {}{}, {}\n\n{}\n",
            self.scenarios(),
            if self.via_haproxy {
                " through HAProxy"
            } else {
                ""
            },
            self.mode(),
            self.header
        );
        let _ = writeln!(o, "## Settings\n\n| setting | value |\n| --- | --- |");
        for (k, v) in &self.settings {
            let _ = writeln!(o, "| {k} | {} |", v.replace('|', "\\|"));
        }
        let mut targets: Vec<(String, &'static str)> = Vec::new();
        for set in &self.failover {
            self.failover_section(&mut o, set, &mut targets);
        }
        if let Some(sw) = &self.switchover {
            self.switch_section(&mut o, sw, &mut targets);
        }
        if let Some(r) = &self.rest {
            crate::report_rest::section(&mut o, r, &mut targets);
        }
        let _ = writeln!(
            o,
            "\n## Targets (issue 5: failover and switchover; issue 8: REST API and resources, failover and switchover through HAProxy)\n\n| target | verdict |\n| --- | --- |"
        );
        for (t, v) in &targets {
            let _ = writeln!(o, "| {t} | {v} |");
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(o, "- {}", n.replace('\n', " "));
            }
        }
        o
    }

    /// `failover, switchover and REST API / resources`: what the report holds.
    pub fn scenarios(&self) -> String {
        let mut v = Vec::new();
        if !self.failover.is_empty() {
            v.push("failover");
        }
        if self.switchover.is_some() {
            v.push("switchover");
        }
        if self.rest.is_some() {
            v.push("REST API / resources");
        }
        match v.len() {
            0 => "no scenario".into(),
            1 => v[0].into(),
            n => format!("{} and {}", v[..n - 1].join(", "), v[n - 1]),
        }
    }

    /// `synchronous replication` / `asynchronous replication`, with the stall if any.
    pub fn mode(&self) -> String {
        let mut m = if self.sync {
            "synchronous replication (synchronous_mode: true)".to_owned()
        } else {
            "asynchronous replication".to_owned()
        };
        if let Some(ms) = self.stall {
            let _ = write!(m, ", WAL senders stopped {ms} ms before each kill");
        }
        m
    }

    fn failover_section(
        &self,
        o: &mut String,
        set: &FailoverSet,
        targets: &mut Vec<(String, &'static str)>,
    ) {
        let Some(t) = set.timings else {
            return;
        };
        let _ = writeln!(
            o,
            "\n## Failover (host loss){}, {}, {}\n",
            if self.via_haproxy {
                " through HAProxy"
            } else {
                ""
            },
            t.text(),
            self.mode()
        );
        for a in &set.applied {
            let _ = writeln!(o, "- {a}");
        }
        let _ = writeln!(
            o,
            "\n| product | # | leader → new | kill − keepalive (ms) | keepalive period (s) | procs killed | kill → expiry (s) | expiry → 1st ack (s) | kill → 1st ack (s) | kill → new leader key (s) | client gap (s) | acked / lost | unknown (present) | rejoin (restart → healthy) | note |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (label, rows) in [("pgkeep", &set.pgkeep), ("Patroni", &set.patroni)] {
            for (i, r) in rows.iter().enumerate() {
                match r {
                    Ok(r) => {
                        let (lost, unknown) = loss_cells(&r.loss);
                        let mut new = r.new.clone();
                        if let Some(names) = &r.sync_standby {
                            let _ = write!(new, " (sync: {})", names.join(","));
                        }
                        let mut note = r.note.trim().to_owned();
                        if let Some((n, before)) = r.stall {
                            note = format!(
                                "{n} WAL senders stopped {:.0} ms before the kill. {note}",
                                before * 1000.0
                            );
                        }
                        let _ = writeln!(
                            o,
                            "| {label} | {} | {} → {new} | {:.0} ±{:.0} | {} | {} | {} | {} | {} | {} | {} | {lost} | {unknown} | {} | {} |",
                            r.trial,
                            r.old,
                            r.phase * 1000.0,
                            r.phase_uncertainty * 1000.0,
                            s3(r.keepalive_period),
                            r.killed,
                            s3(r.kill_to_expiry),
                            s3(r.expiry_to_ack),
                            s3(r.kill_to_ack),
                            s3(r.kill_to_new_key),
                            s3(r.client_gap),
                            r.rejoin,
                            note.trim()
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            o,
                            "| {label} | {} | trial failed: {} |||||||||||||",
                            i + 1,
                            e.replace(['|', '\n'], " ")
                        );
                    }
                }
            }
        }
        let (k, p) = (ok_rows(&set.pgkeep), ok_rows(&set.patroni));
        let _ = writeln!(
            o,
            "\nMedians ({} pgkeep and {} Patroni trials measured):\n\n| metric | pgkeep | Patroni | pgkeep / Patroni |\n| --- | --- | --- | --- |",
            k.len(),
            p.len()
        );
        let metrics: [(&str, Metric); 5] = [
            ("kill → lease expiry seen (s)", |r| r.kill_to_expiry),
            ("expiry → first acknowledged write (s)", |r| {
                r.expiry_to_ack
            }),
            ("kill → first acknowledged write (s)", |r| r.kill_to_ack),
            ("kill → new leader key (s)", |r| r.kill_to_new_key),
            ("client write gap (s)", |r| r.client_gap),
        ];
        for (name, f) in metrics {
            let (a, b) = (med(&k, f), med(&p, f));
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} |",
                s3(a),
                s3(b),
                r2(ratio(a, b))
            );
        }
        let (ka, kl) = lost_total(&k, |r| &r.loss);
        let (pa, pl) = lost_total(&p, |r| &r.loss);
        let _ = writeln!(
            o,
            "| acknowledged writes lost (all trials) | {kl} of {ka} | {pl} of {pa} | |"
        );
        if self.via_haproxy {
            crate::report_haproxy::failover(o, t, &k, &p, targets);
        }
        let (a, b) = (med(&k, |r| r.expiry_to_ack), med(&p, |r| r.expiry_to_ack));
        targets.push((
            format!(
                "{}: lease expiry → first write below Patroni's (pgkeep {} s, Patroni {} s)",
                t.text(),
                s3(a),
                s3(b)
            ),
            verdict(a.zip(b).map(|(a, b)| a < b)),
        ));
        if self.sync {
            for (label, rows, acked, lost) in [("pgkeep", &k, ka, kl), ("Patroni", &p, pa, pl)] {
                targets.push((
                    format!(
                        "{}: synchronous mode: no acknowledged write lost by {label} in host loss ({lost} lost of {acked} acknowledged)",
                        t.text()
                    ),
                    verdict((acked > 0).then_some(lost == 0)),
                ));
                let to_sync = rows
                    .iter()
                    .filter(|r| r.sync_standby.as_ref().is_some_and(|n| n.contains(&r.new)))
                    .count();
                targets.push((
                    format!(
                        "{}: synchronous mode: {label} promoted the synchronous standby ({to_sync} of {} trials)",
                        t.text(),
                        rows.len()
                    ),
                    verdict((!rows.is_empty()).then_some(to_sync == rows.len())),
                ));
            }
        } else if self.stall.is_some() {
            targets.push((
                format!(
                    "{}: asynchronous with the replication stalled (context: the stalled commits are lost by design): pgkeep {kl} of {ka}, Patroni {pl} of {pa}",
                    t.text()
                ),
                "(context)",
            ));
        } else {
            targets.push((
                format!(
                    "{}: no acknowledged write lost by pgkeep in host loss (async; {kl} of {ka})",
                    t.text()
                ),
                verdict((ka > 0).then_some(kl == 0)),
            ));
        }
    }

    fn switch_section(
        &self,
        o: &mut String,
        sw: &SwitchSet,
        targets: &mut Vec<(String, &'static str)>,
    ) {
        let _ = writeln!(
            o,
            "\n## Switchover (`POST /switchover`, client write gap measured {}), {}\n",
            if self.via_haproxy {
                "through HAProxy"
            } else {
                "directly"
            },
            if self.sync {
                "synchronous replication (to the synchronous standby; the floor stays asynchronous)"
            } else {
                "asynchronous replication"
            }
        );
        if let Some(u) = &sw.pgkeep_unsupported {
            let _ = writeln!(o, "- pgkeep: **not supported by this pgkeep build** ({u})");
        }
        let _ = writeln!(
            o,
            "\n| product | # | leader → candidate | POST → response (s) | HTTP | write gap (ms) | POST → 1st ack on new primary (s) | failed / unknown / connect failures | acked / lost | unknown (present) | rejoin | note |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (label, rows) in [("pgkeep", &sw.pgkeep), ("Patroni", &sw.patroni)] {
            for (i, r) in rows.iter().enumerate() {
                match r {
                    Ok(r) => {
                        let (lost, unknown) = loss_cells(&r.loss);
                        let _ = writeln!(
                            o,
                            "| {label} | {} | {} | {:.3} | {} | {} | {} | {} / {} / {} | {lost} | {unknown} | {} | {} |",
                            r.trial,
                            r.direction,
                            r.post_secs,
                            r.http.replace('|', " "),
                            ms(r.gap),
                            s3(r.post_to_ack),
                            r.errors.0,
                            r.errors.1,
                            r.errors.2,
                            r.rejoin,
                            r.note
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            o,
                            "| {label} | {} | trial failed: {} ||||||||||",
                            i + 1,
                            e.replace(['|', '\n'], " ")
                        );
                    }
                }
            }
        }
        let (k, p) = (ok_rows(&sw.pgkeep), ok_rows(&sw.patroni));
        let (ka, kl) = lost_total(&k, |r| &r.loss);
        let (pa, pl) = lost_total(&p, |r| &r.loss);
        if self.sync {
            for (label, acked, lost) in [("pgkeep", ka, kl), ("Patroni", pa, pl)] {
                targets.push((
                    format!(
                        "synchronous mode: no acknowledged write lost by {label} in switchovers ({lost} lost of {acked} acknowledged)"
                    ),
                    verdict((acked > 0).then_some(lost == 0)),
                ));
            }
        }
        if self.via_haproxy {
            let (gk, gp) = (med(&k, |r| r.gap), med(&p, |r| r.gap));
            let _ = writeln!(
                o,
                "\n| median write gap | ms | trials |\n| --- | --- | --- |\n| pgkeep | {} | {} |\n| Patroni | {} | {} |\n\nAcknowledged writes lost in switchovers: pgkeep {kl} of {ka}, Patroni {pl} of {pa}. The floor is not run through HAProxy (it has no REST API to check).",
                ms(gk),
                k.len(),
                ms(gp),
                p.len(),
            );
            crate::report_haproxy::switchover(o, &k, &p, targets);
        } else {
            floor_part(o, sw, (&k, &p), targets);
        }
    }
}

/// The floor's table, the median gaps with the floor, and the issue-5 switchover targets.
fn floor_part(
    o: &mut String,
    sw: &SwitchSet,
    (k, p): (&[SwitchRow], &[SwitchRow]),
    targets: &mut Vec<(String, &'static str)>,
) {
    let _ = writeln!(
        o,
        "\nFloor (no HA manager: untimed CHECKPOINT on both, `pg_ctl stop -m fast`, wait for the shutdown checkpoint on the replica, `pg_promote(wait => true)`):\n\n| # | direction | stop (ms) | replay wait (ms) | promote (ms) | write gap (ms) | stop → 1st ack (s) | acked / lost | unknown (present) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, r) in sw.floor.iter().enumerate() {
        match r {
            Ok(f) => {
                let (lost, unknown) = loss_cells(&f.loss);
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {lost} | {unknown} |",
                    i + 1,
                    f.direction,
                    ms(Some(f.stop)),
                    ms(Some(f.replay_wait)),
                    ms(Some(f.promote)),
                    ms(f.gap),
                    s3(f.to_first_ack)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    o,
                    "| {} | trial failed: {} ||||||||",
                    i + 1,
                    e.replace(['|', '\n'], " ")
                );
            }
        }
    }
    let f = ok_rows(&sw.floor);
    let (gk, gp, gf) = (med(k, |r| r.gap), med(p, |r| r.gap), med(&f, |r| r.gap));
    let _ = writeln!(
        o,
        "\n| median write gap | ms | trials |\n| --- | --- | --- |\n| pgkeep | {} | {} |\n| Patroni | {} | {} |\n| floor | {} | {} |\n\n| ratio | value | target |\n| --- | --- | --- |\n| pgkeep gap / floor gap | {} | ≤ 1.5 |\n| pgkeep gap / Patroni gap | {} | ≤ 0.25 |\n| Patroni gap / floor gap | {} | (context) |",
        ms(gk),
        k.len(),
        ms(gp),
        p.len(),
        ms(gf),
        f.len(),
        r2(ratio(gk, gf)),
        r2(ratio(gk, gp)),
        r2(ratio(gp, gf)),
    );
    let (ka, kl) = lost_total(k, |r| &r.loss);
    let (pa, pl) = lost_total(p, |r| &r.loss);
    let _ = writeln!(
        o,
        "\nAcknowledged writes lost in switchovers: pgkeep {kl} of {ka}, Patroni {pl} of {pa}, floor {} of {}.\n",
        lost_total(&f, |r| &r.loss).1,
        lost_total(&f, |r| &r.loss).0,
    );
    targets.push((
        format!(
            "switchover write gap within 1.5× the floor (pgkeep/floor = {})",
            r2(ratio(gk, gf))
        ),
        verdict(ratio(gk, gf).map(|r| r <= 1.5)),
    ));
    targets.push((
        format!(
            "switchover write gap at most a quarter of Patroni's (pgkeep/Patroni = {})",
            r2(ratio(gk, gp))
        ),
        verdict(ratio(gk, gp).map(|r| r <= 0.25)),
    ));
}
