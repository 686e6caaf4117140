//! Following the leader and rejoining it after a timeline change; tags on replicas; pause.

use super::*;
use crate::cluster::HistoryEntry;

fn entry(parent: u32, lsn: u64) -> HistoryEntry {
    HistoryEntry {
        parent_timeline: parent,
        switch_lsn: Lsn(lsn),
        reason: String::new(),
        timestamp: None,
        new_leader: None,
    }
}

/// n2 is the leader on timeline 2 (switch from 1 at 900, history published and vouched for);
/// n1, the former primary, is stopped on timeline 1 at `pos`.
fn former_primary(pos: u64) -> Fx {
    let mut fx = Fx::replica("n1");
    fx.view.leader.as_mut().unwrap().name = "n2".into();
    fx.view.history = Some(vec![entry(1, 900)]);
    let l = fx.member("n2");
    l.role = "primary".into();
    l.timeline = Some(2);
    l.other.insert(HISTORY_TL_FIELD.into(), 2.into());
    fx.obs.pg.process = PgProcess::Stopped;
    fx.obs.pg.in_recovery = false;
    fx.obs.pg.wal_position = Lsn(pos);
    fx.obs.pg.upstream = None;
    fx.obs.pg.streaming = false;
    fx
}

#[test]
fn replica_follows_leader() {
    let d = Fx::replica("n2").decide();
    assert_eq!(
        d.reason,
        Reason::FollowingLeader {
            upstream: Some("n1".into())
        }
    );
    assert_eq!(d.state, MemberState::Replica);
    assert!(acts(&d).is_empty());
    let mut fx = Fx::replica("n2");
    fx.obs.pg.upstream = Some("n3".into());
    assert!(fx.decide().has(|a| *a
        == Action::Follow {
            upstream: Some("n1".into())
        }));
}

#[test]
fn former_primary_with_wal_past_switch_point_rewinds() {
    let d = former_primary(950).decide();
    assert_eq!(
        d.reason,
        Reason::Diverged {
            timeline: 1,
            position: Lsn(950),
            switch_point: Some(Lsn(900))
        }
    );
    assert_eq!(
        acts(&d),
        vec![Action::Rewind {
            source: "n2".into()
        }]
    );
}

#[test]
fn not_diverged_at_switch_point_starts_as_replica() {
    let d = former_primary(900).decide();
    assert_eq!(d.reason, Reason::StartingReplica);
    assert_eq!(
        acts(&d),
        vec![Action::Start {
            role: StartRole::Replica {
                upstream: Some("n2".into())
            }
        }]
    );
}

#[test]
fn replica_past_switch_point_stops_then_rewinds() {
    let mut fx = former_primary(950);
    fx.obs.pg.process = PgProcess::Running;
    fx.obs.pg.in_recovery = true;
    fx.obs.pg.upstream = Some("n2".into());
    let d = fx.decide();
    assert!(matches!(d.reason, Reason::Diverged { .. }));
    assert_eq!(
        acts(&d),
        vec![Action::Stop {
            mode: StopMode::Fast
        }]
    );
}

#[test]
fn streaming_replica_of_the_leader_is_not_diverged() {
    let mut fx = former_primary(950);
    fx.obs.pg.process = PgProcess::Running;
    fx.obs.pg.in_recovery = true;
    fx.obs.pg.upstream = Some("n2".into());
    fx.obs.pg.streaming = true;
    fx.obs.pg.timeline = Some(3);
    assert!(matches!(fx.decide().reason, Reason::FollowingLeader { .. }));
}

#[test]
fn diverged_without_pg_rewind_reclones() {
    let mut fx = former_primary(950);
    fx.cfg.use_pg_rewind = false;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::RecloneAfterDivergence);
    assert_eq!(
        acts(&d),
        vec![Action::Clone {
            source: "n2".into(),
            wipe: true
        }]
    );
}

#[test]
fn failed_rewind_reclones() {
    let mut fx = former_primary(950);
    fx.obs.rewind_failed = true;
    assert_eq!(fx.decide().reason, Reason::RecloneAfterDivergence);
}

#[test]
fn forked_timeline_missing_from_authoritative_history_rewinds() {
    // We are on timeline 3, a fork the leader (timeline 4, history 1 -> 2 -> 4) never had.
    let mut fx = former_primary(800);
    fx.obs.pg.timeline = Some(3);
    fx.view.history = Some(vec![entry(1, 500), entry(2, 700)]);
    let l = fx.member("n2");
    l.timeline = Some(4);
    l.other.insert(HISTORY_TL_FIELD.into(), 4.into());
    assert!(matches!(
        fx.decide().reason,
        Reason::Diverged {
            switch_point: None,
            ..
        }
    ));
}

#[test]
fn higher_timeline_than_leader_rewinds() {
    let mut fx = former_primary(800);
    fx.obs.pg.timeline = Some(5);
    assert!(matches!(fx.decide().reason, Reason::Diverged { .. }));
}

#[test]
fn unknown_history_waits() {
    let mut fx = former_primary(800);
    fx.member("n2").other.clear();
    let d = fx.decide();
    assert_eq!(d.reason, Reason::WaitingForHistory);
    assert!(acts(&d).is_empty());
    // Past the switch point is diverged whatever the history's age.
    let mut fx = former_primary(950);
    fx.member("n2").other.clear();
    assert!(matches!(fx.decide().reason, Reason::Diverged { .. }));
}

#[test]
fn rewind_waits_for_leader_running_as_primary() {
    let mut fx = former_primary(950);
    fx.member("n2").role = "replica".into();
    let d = fx.decide();
    assert!(matches!(d.reason, Reason::Diverged { .. }));
    assert!(acts(&d).is_empty());
}

#[test]
fn divergence_table() {
    use Divergence::{No, Unknown, Yes};
    let h = [entry(1, 900), entry(2, 1500)];
    type Case = (Option<u32>, u64, Option<u32>, bool, Divergence);
    let cases: &[Case] = &[
        (Some(3), 2000, Some(3), true, No),
        (Some(2), 1500, Some(3), true, No),
        (
            Some(2),
            1501,
            Some(3),
            true,
            Yes {
                switch_point: Some(Lsn(1500)),
            },
        ),
        (
            Some(1),
            901,
            Some(3),
            false,
            Yes {
                switch_point: Some(Lsn(900)),
            },
        ),
        (Some(1), 900, Some(3), false, Unknown),
        (Some(4), 10, Some(3), false, Yes { switch_point: None }),
        (None, 10, Some(3), true, No),
    ];
    for &(ours, pos, leader, auth, want) in cases {
        assert_eq!(
            divergence(ours, Lsn(pos), leader, Some(&h), auth),
            want,
            "{ours:?} {pos} {leader:?} {auth}"
        );
    }
}

#[test]
fn replicatefrom_streams_from_named_member() {
    let mut fx = Fx::replica("n2");
    fx.obs.tags.replicatefrom = Some("n3".into());
    assert!(fx.decide().has(|a| *a
        == Action::Follow {
            upstream: Some("n3".into())
        }));
    // Not running: fall back to the leader.
    fx.member("n3").state = "stopped".into();
    assert!(!fx.decide().has(|a| matches!(a, Action::Follow { .. })));
}

#[test]
fn nostream_has_no_upstream() {
    let mut fx = Fx::replica("n2");
    fx.obs.tags.nostream = true;
    assert!(fx.decide().has(|a| *a == Action::Follow { upstream: None }));
}

#[test]
fn tags_are_published_in_member_key() {
    let mut fx = Fx::replica("n2");
    fx.obs.tags.noloadbalance = true;
    fx.obs.tags.clonefrom = true;
    let d = fx.decide();
    let Some(Action::PublishMember(m)) = d.actions.last() else {
        panic!()
    };
    assert!(m.tags.noloadbalance && m.tags.clonefrom);
    assert_eq!(m.role, "replica");
    assert_eq!(m.replication_state.as_deref(), Some("streaming"));
}

#[test]
fn reinitialize_stops_then_reclones() {
    let mut fx = Fx::replica("n2");
    fx.obs.requests.reinitialize = true;
    assert!(fx.decide().has(|a| *a
        == Action::Stop {
            mode: StopMode::Fast
        }));
    fx.obs.pg.process = PgProcess::Stopped;
    assert!(fx.decide().has(|a| *a
        == Action::Clone {
            source: "n1".into(),
            wipe: true
        }));
}

#[test]
fn pause_no_automatic_start_of_replica() {
    let mut fx = Fx::replica("n2");
    fx.cfg.pause = true;
    fx.obs.pg.process = PgProcess::Stopped;
    let d = fx.decide();
    assert_eq!(d.reason, Reason::Paused);
    assert!(acts(&d).is_empty());
}

#[test]
fn paused_leader_not_primary_releases_key() {
    let mut fx = Fx::leader();
    fx.cfg.pause = true;
    fx.obs.pg.process = PgProcess::Stopped;
    let d = fx.decide();
    assert!(d.has(|a| *a == Action::ReleaseLeaderKey));
    assert!(!d.has(|a| matches!(a, Action::Start { .. })));
}

#[test]
fn running_primary_is_fenced_when_another_member_leads() {
    let mut fx = Fx::replica("n2");
    fx.obs.pg.in_recovery = false;
    let d = fx.decide();
    assert_eq!(
        d.reason,
        Reason::LeaderKeyTaken {
            holder: "n1".into()
        }
    );
    assert_eq!(acts(&d), vec![Action::Fence]);
}

#[test]
fn rewind_waits_for_the_new_primarys_checkpoint_after_promotion() {
    let mut fx = former_primary(950);
    fx.member("n2").checkpoint_after_promote = Some(false);
    let d = fx.decide();
    assert_eq!(d.state, MemberState::Rewinding);
    assert!(
        acts(&d).is_empty(),
        "no pg_rewind before the checkpoint: {d:?}"
    );
    fx.member("n2").checkpoint_after_promote = Some(true);
    assert_eq!(
        acts(&fx.decide()),
        vec![Action::Rewind {
            source: "n2".into()
        }]
    );
}

/// A replica that switched to the new leader before it promoted, with WAL past the new
/// timeline's switch point: its receiver may still say "streaming", but it is on the old
/// timeline and must be rewound.
#[test]
fn streaming_on_an_older_timeline_than_the_leader_is_not_trusted() {
    let mut fx = former_primary(950);
    fx.obs.pg.process = PgProcess::Running;
    fx.obs.pg.in_recovery = true;
    fx.obs.pg.upstream = Some("n2".into());
    fx.obs.pg.streaming = true;
    fx.obs.pg.timeline = Some(1);
    assert!(matches!(fx.decide().reason, Reason::Diverged { .. }));
}

/// A crashed former primary on the timeline of a leader that has not promoted yet, with WAL
/// past what that leader published: it waits for the new timeline instead of starting (it
/// would serve commits the cluster lost).
#[test]
fn former_primary_ahead_of_a_leader_still_taking_over_waits() {
    let mut fx = former_primary(950);
    fx.view.history = Some(Vec::new());
    let l = fx.member("n2");
    l.role = "replica".into();
    l.timeline = Some(1);
    l.xlog_location = Some(Lsn(900));
    l.other.insert(HISTORY_TL_FIELD.into(), 1.into());
    fx.obs.pg.timeline = Some(1);
    let d = fx.decide();
    assert_eq!(d.reason, Reason::WaitingForHistory);
    assert!(!d.has(|a| matches!(a, Action::Start { .. })));
    // At or behind the leader's position it starts as usual.
    fx.obs.pg.wal_position = Lsn(900);
    assert!(fx.decide().has(|a| matches!(a, Action::Start { .. })));
}

/// The cluster of `former_primary`'s view: n2 leads timeline 2, which forked from 1 at 900.
fn cluster_on_timeline_2() -> crate::cluster::ClusterView {
    former_primary(0).view
}

#[test]
fn backup_on_the_current_timeline_fits() {
    let view = cluster_on_timeline_2();
    assert_eq!(backup_fits_cluster(&view, 2, Lsn(5_000)), Ok(()));
}

#[test]
fn backup_on_an_older_timeline_fits_only_before_its_switch_point() {
    let view = cluster_on_timeline_2();
    assert_eq!(backup_fits_cluster(&view, 1, Lsn(800)), Ok(()));
    assert_eq!(backup_fits_cluster(&view, 1, Lsn(900)), Ok(()));
    // Stopped past the fork (a backup of the timeline a point-in-time restore abandoned).
    let e = backup_fits_cluster(&view, 1, Lsn(901)).unwrap_err();
    assert!(e.contains("past that timeline's end"), "{e}");
}

#[test]
fn backup_on_a_newer_or_foreign_timeline_does_not_fit() {
    let view = cluster_on_timeline_2();
    assert!(backup_fits_cluster(&view, 3, Lsn(10)).is_err());
    // Timeline 3 forked from 2 at 2000: a backup of timeline 2 fits only up to there.
    let mut view = cluster_on_timeline_2();
    view.history = Some(vec![entry(1, 900), entry(2, 2_000)]);
    for m in view.members.values_mut() {
        m.data.timeline = Some(3);
    }
    assert_eq!(backup_fits_cluster(&view, 2, Lsn(1_500)), Ok(()));
    assert!(backup_fits_cluster(&view, 2, Lsn(2_500)).is_err());
}

#[test]
fn backup_fit_unknown_while_the_history_lags_the_timeline() {
    // A member already on timeline 3, the history key still says 2: no decision on timeline 1.
    let mut view = cluster_on_timeline_2();
    view.members.values_mut().next().unwrap().data.timeline = Some(3);
    let e = backup_fits_cluster(&view, 1, Lsn(100)).unwrap_err();
    assert!(e.contains("does not reach it"), "{e}");
    // Nothing known about timelines: none fits.
    let mut view = crate::cluster::ClusterView::default();
    assert!(backup_fits_cluster(&view, 7, Lsn(1)).is_err());
    view.history = Some(Vec::new());
    assert_eq!(backup_fits_cluster(&view, 1, Lsn(1)), Ok(()));
    assert!(backup_fits_cluster(&view, 2, Lsn(1)).is_err());
}

#[test]
fn a_backup_fits_the_archives_newest_timeline_as_postgresql_decides() {
    // Timeline 3 came from a point-in-time restore to 500 on timeline 1; timeline 2 (forked
    // at 900) was abandoned. Its history file names only timeline 1.
    let h3 = [entry(1, 500)];
    assert_eq!(backup_fits_timeline(3, Lsn(7_000), 3, &h3), Ok(()));
    assert_eq!(backup_fits_timeline(1, Lsn(400), 3, &h3), Ok(()));
    assert!(backup_fits_timeline(1, Lsn(600), 3, &h3).is_err());
    let e = backup_fits_timeline(2, Lsn(950), 3, &h3).unwrap_err();
    assert!(e.contains("not in the history"), "{e}");
    assert!(backup_fits_timeline(4, Lsn(1), 3, &h3).is_err());
    // Timeline 1 only.
    assert_eq!(backup_fits_timeline(1, Lsn(1), 1, &[]), Ok(()));
}
