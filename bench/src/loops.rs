//! The failover and switchover loops: trials alternate between the products (pgkeep, then
//! Patroni; the floor after both in switchovers), a product whose cluster cannot be made
//! healthy again is skipped from then on. With `fronts` (`--via-haproxy`) each product's
//! writer goes through its own HAProxy.

use std::path::Path;
use std::time::Duration;

use crate::cluster::{Cluster, Timings};
use crate::floor::Floor;
use crate::front::Front;
use crate::report::{FailoverSet, SwitchSet};
use crate::trials::{self, Settings, Switch};

/// After a failed trial: is the cluster healthy again (within 60 s)? If not, it is marked
/// unusable and a note says so.
async fn still_usable(c: &Cluster, what: &str, usable: &mut bool, notes: &mut Vec<String>) {
    if c.wait_healthy(Duration::from_secs(60)).await.is_err() {
        *usable = false;
        notes.push(format!(
            "{}: cluster unhealthy after {what}; its remaining trials were skipped",
            c.label
        ));
    }
}

/// The products' HAProxies (pgkeep's, Patroni's) when the writers go through them.
pub type Fronts<'a> = Option<[&'a Front; 2]>;

/// Failover trials under timings `t`, pgkeep and Patroni in turn.
#[allow(clippy::too_many_arguments)]
pub async fn failovers(
    k: &mut Cluster,
    p: &mut Cluster,
    usable: &mut [bool; 2],
    t: Timings,
    n: usize,
    s: &Settings,
    fronts: Fronts<'_>,
    set: &mut FailoverSet,
    notes: &mut Vec<String>,
) {
    for i in 1..=n {
        for (j, (c, rows)) in [(&mut *k, &mut set.pgkeep), (&mut *p, &mut set.patroni)]
            .into_iter()
            .enumerate()
        {
            if !usable[j] {
                continue;
            }
            eprintln!("  failover {} {}: trial {i}/{n}", c.label, t.text());
            let r = trials::failover(c, i, t, s, fronts.map(|f| f[j]))
                .await
                .map_err(|e| format!("{e:#}"));
            match &r {
                Ok(row) => eprintln!(
                    "    {} → {}{} kill→expiry {} expiry→ack {} kill→ack {} lost {} rejoin {}",
                    row.old,
                    row.new,
                    row.sync_standby
                        .as_ref()
                        .map_or(String::new(), |n| format!(" (sync: {})", n.join(","))),
                    secs(row.kill_to_expiry),
                    secs(row.expiry_to_ack),
                    secs(row.kill_to_ack),
                    row.loss
                        .map_or("?".into(), |l| format!("{} of {}", l.lost, l.acked)),
                    row.rejoin
                ),
                Err(e) => eprintln!("    failed: {e}"),
            }
            if let Some(v) = r.as_ref().ok().and_then(|row| row.proxy.as_ref()) {
                eprintln!(
                    "    HAProxy: old DOWN kill+{} new key→UP {} UP→ack {}",
                    secs(v.old_down),
                    secs(v.key_to_up),
                    secs(v.up_to_ack)
                );
            }
            if r.as_ref()
                .map_or(true, |row| row.rejoin.starts_with("FAILED"))
            {
                still_usable(c, &format!("failover trial {i}"), &mut usable[j], notes).await;
            }
            rows.push(r);
        }
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}s"))
}

/// Switchover trials: pgkeep, Patroni and the floor (when given) in turn.
#[allow(clippy::too_many_arguments)]
pub async fn switchovers(
    k: &mut Cluster,
    p: &mut Cluster,
    usable: &mut [bool; 2],
    floor: Option<&Floor>,
    n: usize,
    s: &Settings,
    fronts: Fronts<'_>,
    raw: &Path,
    notes: &mut Vec<String>,
) -> SwitchSet {
    let mut set = SwitchSet::default();
    for i in 1..=n {
        for (j, c) in [&mut *k, &mut *p].into_iter().enumerate() {
            if !usable[j] || (j == 0 && set.pgkeep_unsupported.is_some()) {
                continue;
            }
            eprintln!("  switchover {}: trial {i}/{n}", c.label);
            let r = match trials::switchover(c, i, s, fronts.map(|f| f[j])).await {
                Ok(Switch::Done(r)) => {
                    eprintln!("    write gap {} rejoin {}", secs(r.gap), r.rejoin);
                    if let Some(v) = &r.proxy {
                        eprintln!(
                            "    HAProxy: POST→key {} POST→old DOWN {} POST→new UP {} UP→ack {}",
                            secs(v.new_key),
                            secs(v.old_down),
                            secs(v.new_up),
                            secs(v.up_to_ack)
                        );
                    }
                    Ok(*r)
                }
                Ok(Switch::Unsupported(code, body)) if j == 0 => {
                    eprintln!("    not supported by this pgkeep build (HTTP {code})");
                    set.pgkeep_unsupported =
                        Some(format!("`POST /switchover` answered HTTP {code} {body}"));
                    continue;
                }
                Ok(Switch::Unsupported(code, body)) => Err(format!("HTTP {code} {body}")),
                Err(e) => Err(format!("{e:#}")),
            };
            if r.as_ref()
                .map_or(true, |row| row.rejoin.starts_with("FAILED"))
            {
                if let Err(e) = &r {
                    eprintln!("    failed: {e}");
                }
                still_usable(c, &format!("switchover trial {i}"), &mut usable[j], notes).await;
            }
            if j == 0 {
                set.pgkeep.push(r);
            } else {
                set.patroni.push(r);
            }
        }
        if let Some(f) = floor {
            eprintln!("  switchover floor: trial {i}/{n}");
            let run = format!("floor-switchover-{i}");
            let r = f
                .trial(&run, s.writer, &raw.join(format!("{run}.log")))
                .await;
            if let Ok(t) = &r {
                eprintln!("    write gap {}", secs(t.gap));
            }
            set.floor.push(r.map_err(|e| format!("{e:#}")));
        }
    }
    set
}
