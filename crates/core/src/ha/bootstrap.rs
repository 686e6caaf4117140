//! Bootstrap and empty data directories: the `initialize` race, `initdb`, cloning.
//!
//! A node runs `initdb` only when all of these hold: its data directory is empty, it never
//! joined a cluster (persisted marker), the operator created its first-start marker, it may
//! become leader, nobody leads, `initialize` is absent, and it then won the compare-and-swap on
//! `initialize`. Every other empty node clones.

use crate::cluster::Initialize;

use super::action::{Action, MemberState};
use super::decide::{Ctx, Plan};
use super::leader_race::{cluster_initialised, failover_priority};
use super::reason::{Reason, WaitingForData};
use super::rejoin::clone_source;
use super::types::{DataDir, PgProcess};

/// Rule family "bootstrap": the data directory is empty or invalid.
pub(crate) fn plan_empty(cx: &mut Ctx<'_>) -> Plan {
    let obs = cx.obs;
    let wipe = obs.pg.data_dir == DataDir::Invalid;
    if !cluster_initialised(cx) {
        match &cx.view.initialize {
            Some(Initialize::InProgress) if obs.dcs.initialize_claimed => {
                return Plan::new(MemberState::Bootstrapping, Reason::RunningInitdb)
                    .with(Action::Initdb);
            }
            Some(Initialize::InProgress) => {
                return Plan::new(
                    MemberState::Uninitialized,
                    Reason::BootstrapInProgressElsewhere,
                );
            }
            _ => {}
        }
        let why = if obs.ever_joined {
            Some(WaitingForData::EverJoined)
        } else if !obs.bootstrap_allowed {
            Some(WaitingForData::NoBootstrapMarker)
        } else if failover_priority(&obs.tags) <= 0 {
            Some(WaitingForData::NoFailoverTag)
        } else {
            None
        };
        return match why {
            Some(w) => Plan::new(MemberState::Uninitialized, Reason::WaitingForData(w)),
            None => Plan::new(MemberState::Bootstrapping, Reason::ClaimingInitialize)
                .with(Action::ClaimInitialize),
        };
    }
    // The cluster exists: never initdb, clone.
    match clone_source(cx) {
        Some(source) => Plan::new(
            MemberState::Cloning,
            Reason::CloningReplica {
                source: source.clone(),
            },
        )
        .with(Action::Clone { source, wipe }),
        // A leader key whose member is not running yet (starting) is waited for.
        None if obs.backup_repository && cx.view.leader.is_none() => restore_without_leader(cx),
        None => Plan::new(
            MemberState::Uninitialized,
            Reason::WaitingForData(WaitingForData::NoSource),
        ),
    }
}

/// Nobody leads (every member down, or every data directory lost): the backup repository still
/// has the cluster's data. The replica it makes replays the archive, then races or follows.
/// Only into an empty data directory (or over this node's own interrupted restore), with the
/// DCS reachable, once the leader has been absent for a whole TTL, and never in synchronous
/// mode (a node rebuilt from the archive could win the race without transactions the
/// synchronous standby acknowledged).
fn restore_without_leader(cx: &mut Ctx<'_>) -> Plan {
    let obs = cx.obs;
    let wait = |w| Plan::new(MemberState::Uninitialized, Reason::WaitingForData(w));
    if !obs.dcs.reachable {
        return wait(WaitingForData::NoSource);
    }
    let invalid = obs.pg.data_dir == DataDir::Invalid;
    if invalid && !obs.restore_interrupted {
        return wait(WaitingForData::UnrecognisedData);
    }
    if cx.sync_active() {
        return wait(WaitingForData::SynchronousMode);
    }
    let since = cx.mem.leader_absent_since.unwrap_or(cx.now);
    let until = since + cx.cfg.ttl;
    if cx.now < until {
        return wait(WaitingForData::LeaderAbsentGrace).wake(until);
    }
    Plan::new(MemberState::Cloning, Reason::RestoringFromRepository)
        .with(Action::RestoreReplica { wipe: invalid })
}

/// After this agent's `initdb`: first make the new system id the cluster's (compare-and-swap on
/// our own claim), then take the key and start as the first primary. No takeover guard: there
/// was never a leader. If the claim was lost meanwhile, the unused data directory is replaced
/// by a clone of the winner's cluster.
pub(crate) fn after_initdb(cx: &mut Ctx<'_>) -> Option<Plan> {
    if !cx.obs.initdb_unconfirmed {
        return None;
    }
    let DataDir::Initialised { system_id } = &cx.obs.pg.data_dir else {
        return None;
    };
    if cx.obs.pg.process != PgProcess::Stopped || cx.holds_key() {
        return None;
    }
    match &cx.view.initialize {
        Some(Initialize::InProgress) if cx.obs.dcs.initialize_claimed => Some(
            Plan::new(MemberState::Bootstrapping, Reason::ConfirmingInitialize).with(
                Action::ConfirmInitialize {
                    system_id: system_id.clone(),
                },
            ),
        ),
        Some(Initialize::SystemId(s)) if s == system_id && cx.view.leader.is_some() => {
            // Somebody else leads our cluster already: we are an ordinary member.
            None
        }
        Some(Initialize::SystemId(s)) if s == system_id => {
            cx.mem.primary_start_began = None;
            Some(
                Plan::new(
                    MemberState::Bootstrapping,
                    Reason::BootstrapTakingLeadership,
                )
                .with(Action::AcquireLeaderKey),
            )
        }
        Some(Initialize::SystemId(s)) if s != system_id => {
            let p = Plan::new(MemberState::Cloning, Reason::BootstrapLost);
            Some(match clone_source(cx) {
                Some(source) => p.with(Action::Clone { source, wipe: true }),
                None => p,
            })
        }
        // Our claim expired before we confirmed it, and nobody claimed since: claim again.
        None if cx.view.leader.is_none() => Some(
            Plan::new(MemberState::Bootstrapping, Reason::ClaimingInitialize)
                .with(Action::ClaimInitialize),
        ),
        // Another node is bootstrapping: wait for its outcome.
        _ => Some(Plan::new(
            MemberState::Bootstrapping,
            Reason::BootstrapInProgressElsewhere,
        )),
    }
}
