//! Operator requests from the local REST API: `POST /restart` and `POST /reinitialize`.

use super::*;

#[test]
fn restart_requested_on_leader_restarts_primary_in_place() {
    let mut fx = Fx::leader();
    fx.obs.requests.restart = true;
    let d = fx.decide();
    assert_eq!(
        (d.state, d.reason.clone()),
        (MemberState::Primary, Reason::RestartRequested)
    );
    // The key is renewed first, then the primary restarts in its role; nothing is released.
    assert_eq!(acts(&d), [Action::RenewLeaderKey, Action::Restart]);
    assert!(matches!(d.watchdog, WatchdogCmd::Arm { .. }));
}

/// Table: where a restart request is acted on. (setup, restart planned)
#[test]
fn restart_request_is_acted_on_only_with_a_running_server() {
    type Setup = fn(&mut Fx);
    let cases: &[(&str, Setup, bool)] = &[
        ("streaming replica", |_| {}, true),
        (
            "paused replica",
            |fx| {
                fx.cfg.pause = true;
            },
            true,
        ),
        (
            "stopped replica",
            |fx| {
                fx.obs.pg.process = PgProcess::Stopped;
            },
            false,
        ),
        (
            "busy replica",
            |fx| {
                fx.obs.busy = Some(LongOperation::Clone);
            },
            false,
        ),
        (
            "starting replica",
            |fx| {
                fx.obs.pg.process = PgProcess::Starting;
            },
            false,
        ),
    ];
    for (what, setup, planned) in cases {
        let mut fx = Fx::replica("n2");
        fx.obs.requests.restart = true;
        setup(&mut fx);
        let d = fx.decide();
        assert_eq!(d.has(|a| *a == Action::Restart), *planned, "{what}: {d:?}");
    }
}

#[test]
fn restart_request_on_leader_waits_for_a_handover_in_progress() {
    let mut fx = Fx::leader();
    fx.failover(Some("n1"), Some("n2"));
    fx.obs.requests.restart = true;
    let d = fx.decide();
    assert!(!d.has(|a| *a == Action::Restart), "{d:?}");
}

#[test]
fn reinitialize_from_leader_ignores_clonefrom() {
    let mut fx = Fx::replica("n2");
    fx.member("n3").tags.clonefrom = true;
    fx.obs.requests.reinitialize = true;
    fx.obs.pg.process = PgProcess::Stopped;
    assert!(fx.decide().has(|a| *a
        == Action::Clone {
            source: "n3".into(),
            wipe: true
        }));
    fx.obs.requests.reinitialize_from_leader = true;
    assert!(fx.decide().has(|a| *a
        == Action::Clone {
            source: "n1".into(),
            wipe: true
        }));
}

#[test]
fn reinitialize_is_never_acted_on_by_the_leader() {
    let mut fx = Fx::leader();
    fx.obs.requests.reinitialize = true;
    let d = fx.decide();
    assert!(
        !d.has(|a| matches!(a, Action::Clone { .. } | Action::Stop { .. })),
        "{d:?}"
    );
}
