//! The documentation and the code stay in step.

use super::*;

const DOC: &str = include_str!("../../../../../docs/ha-rules.md");

/// The names listed between the state-list markers of `docs/ha-rules.md`.
fn documented_states() -> Vec<String> {
    let start = DOC
        .find("<!-- states:begin -->")
        .expect("states:begin marker");
    let end = DOC.find("<!-- states:end -->").expect("states:end marker");
    DOC[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn member_states_match_docs() {
    let code: Vec<String> = MemberState::ALL
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    assert_eq!(documented_states(), code);
    for s in MemberState::ALL {
        assert!(
            DOC[DOC.find("```mermaid").expect("diagram")..].contains(s.name()),
            "state {s} missing from the diagram"
        );
    }
}

#[test]
fn every_documented_rule_test_exists() {
    let sources = [
        include_str!("lease.rs"),
        include_str!("race.rs"),
        include_str!("switchover.rs"),
        include_str!("rejoin.rs"),
        include_str!("requests.rs"),
        include_str!("bootstrap.rs"),
        include_str!("sync.rs"),
        include_str!("slots.rs"),
        include_str!("docs.rs"),
        include_str!("../config.rs"),
    ]
    .concat();
    let mut n = 0;
    for line in DOC.lines().filter(|l| l.starts_with("| ")) {
        for name in line.split("`test:").skip(1) {
            let name = name.split('`').next().unwrap();
            assert!(
                sources.contains(&format!("fn {name}()")),
                "docs/ha-rules.md names test {name}, which does not exist"
            );
            n += 1;
        }
    }
    assert!(n >= 50, "only {n} rule tests referenced");
}

#[test]
fn every_reason_displays() {
    let reasons = [
        Reason::LeaseRevoked,
        Reason::NotHealthiest(RaceLoss::PeerAhead { peer: "x".into() }),
        Reason::WaitingForData(WaitingForData::EverJoined),
        Reason::Diverged {
            timeline: 1,
            position: Lsn(5),
            switch_point: None,
        },
    ];
    for r in reasons {
        assert!(!r.to_string().is_empty());
    }
}
