//! The report's HAProxy parts (`--via-haproxy`, issue 8): per trial when HAProxy marked the old
//! primary DOWN and the new one UP, relative to the kill or the POST and to the new leader key;
//! their medians; and the target: pgkeep's write gap at most a quarter of Patroni's, with the
//! same HAProxy settings for both.

use std::fmt::Write as _;

use crate::cluster::Timings;
use crate::haproxy::ProxyView;
use crate::report::{med, ms, r2, ratio, s3, verdict};
use crate::trials::{FailoverRow, SwitchRow};

/// The target ratio pgkeep / Patroni.
pub const TARGET: f64 = 0.25;

type View = fn(&ProxyView) -> Option<f64>;

fn view_cells(v: Option<&ProxyView>, cols: &[View]) -> String {
    cols.iter()
        .map(|f| s3(v.and_then(f)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Medians of the HAProxy columns for both products.
fn view_medians<T>(
    o: &mut String,
    k: &[T],
    p: &[T],
    get: fn(&T) -> Option<&ProxyView>,
    cols: &[(&str, View)],
) {
    let _ = writeln!(
        o,
        "\n| median (s) | pgkeep | Patroni | pgkeep / Patroni |\n| --- | --- | --- | --- |"
    );
    for (name, f) in cols {
        let (a, b) = (
            med(k, |r| get(r).and_then(f)),
            med(p, |r| get(r).and_then(f)),
        );
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} |",
            s3(a),
            s3(b),
            r2(ratio(a, b))
        );
    }
}

/// One row of the quarter-of-Patroni table and its target line.
fn quarter(
    o: &mut String,
    targets: &mut Vec<(String, &'static str)>,
    scenario: &str,
    measure: &str,
    (a, b): (Option<f64>, Option<f64>),
    unit_ms: bool,
) {
    let r = ratio(a, b);
    let v = verdict(r.map(|r| r <= TARGET));
    let fmt = |x| {
        if unit_ms {
            format!("{} ms", ms(x))
        } else {
            format!("{} s", s3(x))
        }
    };
    let _ = writeln!(
        o,
        "| {scenario} | {measure} | {} | {} | {} | ≤ {TARGET} | {v} |",
        fmt(a),
        fmt(b),
        r2(r)
    );
    targets.push((
        format!(
            "through HAProxy, {scenario}: {measure} at most a quarter of Patroni's (pgkeep {}, Patroni {}: pgkeep/Patroni = {})",
            fmt(a),
            fmt(b),
            r2(r)
        ),
        v,
    ));
}

const QUARTER_HEAD: &str = "| scenario | measure (median) | pgkeep | Patroni | pgkeep / Patroni | target | verdict |\n| --- | --- | --- | --- | --- | --- | --- |";

/// After the failover medians: the HAProxy table, its medians and the quarter targets.
pub(crate) fn failover(
    o: &mut String,
    t: Timings,
    k: &[FailoverRow],
    p: &[FailoverRow],
    targets: &mut Vec<(String, &'static str)>,
) {
    let cols: [(&str, View); 5] = [
        ("kill → old primary DOWN in HAProxy", |v| v.old_down),
        ("kill → new leader key", |v| v.new_key),
        ("new leader key → new primary UP in HAProxy", |v| {
            v.key_to_up
        }),
        ("new primary UP → first acknowledged write", |v| {
            v.up_to_ack
        }),
        ("kill → new primary UP in HAProxy", |v| v.new_up),
    ];
    let _ = writeln!(
        o,
        "\nHAProxy's view (from its log, µs timestamps; UP/DOWN = HAProxy marked the server):\n\n| product | # | leader → new | kill → old DOWN (s) | kill → new key (s) | new key → new UP (s) | new UP → 1st ack (s) | kill → new UP (s) | HAProxy's reason for UP |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let fns: Vec<View> = cols.iter().map(|c| c.1).collect();
    for (label, rows) in [("pgkeep", k), ("Patroni", p)] {
        for r in rows {
            let _ = writeln!(
                o,
                "| {label} | {} | {} → {} | {} | {} |",
                r.trial,
                r.old,
                r.new,
                view_cells(r.proxy.as_ref(), &fns),
                r.proxy.as_ref().map_or("–", |v| v.up_reason.as_str())
            );
        }
    }
    view_medians(o, k, p, |r| r.proxy.as_ref(), &cols);
    let _ = writeln!(
        o,
        "\n### Through HAProxy: at most a quarter of Patroni's write gap ({})\n\n{QUARTER_HEAD}",
        t.text()
    );
    let scenario = format!("failover ({})", t.text());
    quarter(
        o,
        targets,
        &scenario,
        "lease expiry → first acknowledged write",
        (med(k, |r| r.expiry_to_ack), med(p, |r| r.expiry_to_ack)),
        false,
    );
    quarter(
        o,
        targets,
        &scenario,
        "kill → first acknowledged write",
        (med(k, |r| r.kill_to_ack), med(p, |r| r.kill_to_ack)),
        false,
    );
}

/// After the switchover medians: the HAProxy table, its medians and the quarter target.
pub(crate) fn switchover(
    o: &mut String,
    k: &[SwitchRow],
    p: &[SwitchRow],
    targets: &mut Vec<(String, &'static str)>,
) {
    let cols: [(&str, View); 5] = [
        ("POST → new leader key", |v| v.new_key),
        ("POST → old primary DOWN in HAProxy", |v| v.old_down),
        ("POST → new primary UP in HAProxy", |v| v.new_up),
        ("new leader key → new primary UP in HAProxy", |v| {
            v.key_to_up
        }),
        ("new primary UP → first acknowledged write", |v| {
            v.up_to_ack
        }),
    ];
    let _ = writeln!(
        o,
        "\nHAProxy's view (from its log, µs timestamps; UP/DOWN = HAProxy marked the server):\n\n| product | # | leader → candidate | POST → new key (s) | POST → old DOWN (s) | POST → new UP (s) | new key → new UP (s) | new UP → 1st ack (s) | write gap (ms) | HAProxy's reason for UP |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let fns: Vec<View> = cols.iter().map(|c| c.1).collect();
    for (label, rows) in [("pgkeep", k), ("Patroni", p)] {
        for r in rows {
            let _ = writeln!(
                o,
                "| {label} | {} | {} | {} | {} | {} |",
                r.trial,
                r.direction,
                view_cells(r.proxy.as_ref(), &fns),
                ms(r.gap),
                r.proxy.as_ref().map_or("–", |v| v.up_reason.as_str())
            );
        }
    }
    view_medians(o, k, p, |r| r.proxy.as_ref(), &cols);
    let _ = writeln!(
        o,
        "\n### Through HAProxy: at most a quarter of Patroni's write gap (switchover)\n\n{QUARTER_HEAD}"
    );
    quarter(
        o,
        targets,
        "switchover",
        "write gap (last ack by the old primary → first ack by the new one)",
        (med(k, |r| r.gap), med(p, |r| r.gap)),
        true,
    );
}
