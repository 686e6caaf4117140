//! Table tests, one per rule, named after the rule (see `docs/ha-rules.md`).

mod bootstrap;
mod docs;
mod lease;
mod race;
mod rejoin;
mod requests;
mod slots;
mod switchover;
mod sync;

use std::collections::BTreeMap;

use crate::cluster::{
    ClusterView, FailoverRequest, Initialize, LeaderKey, Lsn, MemberData, MemberKey, SyncState,
    Versioned,
};

use super::*;

pub(super) const SYSID: &str = "7300000000000000001";

/// A cluster of n1 (leader, primary), n2 and n3 (streaming replicas) on timeline 1, seen by
/// `obs.name`. Timings: ttl 10 s, loop_wait 2 s, retry_timeout 3 s, margin 2 s.
pub(super) struct Fx {
    pub(super) cfg: HaConfig,
    pub(super) view: ClusterView,
    pub(super) obs: LocalObservation,
    pub(super) now: Millis,
}

pub(super) fn member(role: &str, lsn: u64, tl: u32) -> MemberData {
    MemberData {
        state: "running".into(),
        role: role.into(),
        xlog_location: Some(Lsn(lsn)),
        timeline: Some(tl),
        ..MemberData::default()
    }
}

impl Fx {
    fn base(me: &str) -> Fx {
        let cfg = HaConfig {
            ttl: Millis::from_secs(10),
            loop_wait: Millis::from_secs(2),
            retry_timeout: Millis::from_secs(3),
            lease_safety_margin: Millis::from_secs(2),
            ..HaConfig::default()
        };
        cfg.validate().unwrap();
        let mut members = BTreeMap::new();
        for (n, role) in [("n1", "primary"), ("n2", "replica"), ("n3", "replica")] {
            members.insert(
                n.to_owned(),
                MemberKey {
                    data: member(role, 1000, 1),
                    mod_revision: 5,
                    lease: 1,
                },
            );
        }
        let view = ClusterView {
            initialize: Some(Initialize::SystemId(SYSID.into())),
            leader: Some(LeaderKey {
                name: "n1".into(),
                lease: 1,
                mod_revision: 10,
            }),
            members,
            history: Some(Vec::new()),
            ..ClusterView::default()
        };
        let obs = LocalObservation {
            name: me.into(),
            wall_clock_ms: 1_784_894_400_000,
            pg: PgObservation {
                process: PgProcess::Running,
                in_recovery: true,
                timeline: Some(1),
                wal_position: Lsn(1000),
                upstream: Some("n1".into()),
                streaming: true,
                data_dir: DataDir::Initialised {
                    system_id: SYSID.into(),
                },
                ..PgObservation::default()
            },
            dcs: DcsSession {
                reachable: true,
                view_revision: 100,
                ..DcsSession::default()
            },
            ever_joined: true,
            ..LocalObservation::default()
        };
        Fx {
            cfg,
            view,
            obs,
            now: Millis(100_000),
        }
    }

    /// `me` is a streaming replica of n1.
    pub(super) fn replica(me: &str) -> Fx {
        Fx::base(me)
    }

    /// n1 holds the key (renewed 1 s ago) and runs the primary.
    pub(super) fn leader() -> Fx {
        let mut fx = Fx::base("n1");
        fx.obs.pg.in_recovery = false;
        fx.obs.pg.upstream = None;
        fx.obs.pg.streaming = false;
        fx.obs.dcs.leader_lease = Some(LeaderLease {
            sent_at: fx.now - Millis(1000),
            granted_ttl: Millis::from_secs(10),
            revision: 10,
        });
        fx.obs.memory.members_seen = ["n1", "n2", "n3"]
            .iter()
            .map(|n| (n.to_string(), fx.now))
            .collect();
        fx.obs.pg.slots = ["n2", "n3"].iter().map(|s| s.to_string()).collect();
        fx.view.status.optime = Some(Lsn(1000));
        fx.view.status.retain_slots = vec!["n1".into(), "n2".into(), "n3".into()];
        fx
    }

    /// The leader key (n1, revision 10) was deleted; `me` saw that revision arrive 9 s ago.
    pub(super) fn leaderless(me: &str) -> Fx {
        let mut fx = Fx::base(me);
        fx.view.leader = None;
        fx.view.members.remove("n1");
        fx.obs.pg.upstream = Some("n1".into());
        fx.obs.pg.streaming = false;
        fx.obs.dcs.deleted_leader = Some(DeletedLeader {
            name: "n1".into(),
            mod_revision: 10,
            put_seen_at: Some(fx.now - Millis(9000)),
        });
        fx.obs.memory.last_leader = Some(SeenLeader {
            name: "n1".into(),
            revision: 10,
            seen_at: fx.now - Millis(9000),
        });
        fx.view.status.optime = Some(Lsn(1000));
        fx
    }

    pub(super) fn decide(&self) -> Decision {
        decide(self.now, &self.cfg, &self.view, &self.obs)
    }

    pub(super) fn member(&mut self, name: &str) -> &mut MemberData {
        &mut self
            .view
            .members
            .entry(name.to_owned())
            .or_insert_with(|| MemberKey {
                data: member("replica", 1000, 1),
                mod_revision: 5,
                lease: 1,
            })
            .data
    }

    /// Peers' answers: (name, primary, wal position).
    pub(super) fn peers(&mut self, answers: &[(&str, bool, u64)]) {
        let mut report = PeerReport::default();
        for &(n, primary, lsn) in answers {
            report.asked.insert(n.to_owned());
            report.answers.insert(
                n.to_owned(),
                PeerStatus {
                    running: true,
                    primary,
                    wal_position: Lsn(lsn),
                    timeline: Some(1),
                    tags: Default::default(),
                    watchdog_failed: false,
                },
            );
        }
        self.obs.peers = Some(report);
    }

    pub(super) fn sync(&mut self, leader: &str, standbys: &[&str]) {
        self.cfg.synchronous_mode = SyncMode::On;
        self.view.sync = Some(Versioned {
            value: SyncState::new(leader, standbys.iter().map(|s| s.to_string()).collect(), 0),
            mod_revision: 40,
        });
    }

    pub(super) fn failover(&mut self, leader: Option<&str>, member: Option<&str>) {
        self.view.failover = Some(Versioned {
            value: FailoverRequest {
                leader: leader.map(str::to_owned),
                member: member.map(str::to_owned),
                scheduled_at: None,
            },
            mod_revision: 50,
        });
    }
}

/// Actions without the trailing member publication, for compact assertions.
pub(super) fn acts(d: &Decision) -> Vec<Action> {
    d.actions
        .iter()
        .filter(|a| !matches!(a, Action::PublishMember(_)))
        .cloned()
        .collect()
}

/// After the race: `me` holds the key (revision 20, in the view), its PostgreSQL is still a
/// replica; the preceding deletion was n1's revision 10, whose put arrived 9 s ago.
pub(super) fn holding(me: &str) -> Fx {
    let mut fx = Fx::leaderless(me);
    fx.view.leader = Some(LeaderKey {
        name: me.into(),
        lease: 2,
        mod_revision: 20,
    });
    fx.obs.dcs.leader_lease = Some(LeaderLease {
        sent_at: fx.now,
        granted_ttl: Millis::from_secs(10),
        revision: 20,
    });
    fx
}
