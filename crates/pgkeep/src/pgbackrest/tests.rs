use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn tls(dir: &str, name: &str) -> TlsFiles {
    TlsFiles {
        cert: PathBuf::from(format!("{dir}/{name}.crt")),
        key: PathBuf::from(format!("{dir}/{name}.key")),
        ca: PathBuf::from("/etc/pgkeep/ca.crt"),
    }
}

fn paths(root: &str) -> Paths {
    Paths {
        log: PathBuf::from(format!("{root}/log")),
        lock: PathBuf::from(format!("{root}/lock")),
        spool: PathBuf::from(format!("{root}/spool")),
    }
}

fn node(i: u16) -> PgNode {
    PgNode {
        host: format!("db{i}.pgkeep.test"),
        tls_port: 28440 + i,
        data_dir: PathBuf::from(format!("/var/lib/pgkeep/db{i}/data")),
        pg_port: 25430 + i,
        socket_dir: PathBuf::from(format!("/run/pgkeep/db{i}")),
        config_path: PathBuf::from("/etc/pgkeep/pgbackrest"),
    }
}

fn repo() -> RepoPlan {
    RepoPlan {
        stanza: "main".into(),
        repo_path: PathBuf::from("/var/lib/pgbackrest"),
        paths: paths("/var/lib/pgbackrest"),
        server: Server {
            address: "127.42.0.31".into(),
            port: 28432,
            tls: tls("/etc/pgbackrest/tls", "pgbackrest-backup"),
            clients: (1..=3)
                .map(|i| format!("pgbackrest-client-db{i}"))
                .collect(),
        },
        client: tls("/etc/pgbackrest/tls", "pgbackrest-client-backup"),
        nodes: (1..=3).map(node).collect(),
        process_max: 2,
        backup_standby: true,
        retention: Retention::default(),
        timeouts: Timeouts::default(),
    }
}

fn node_plan() -> NodePlan {
    NodePlan {
        stanza: "main".into(),
        paths: paths("/var/lib/pgkeep/db1/pgbackrest"),
        pg: node(1),
        repo_host: "backup.pgkeep.test".into(),
        repo_port: 28432,
        repo_config_path: PathBuf::from("/etc/pgbackrest"),
        client: tls("/etc/pgkeep/db1/tls", "pgbackrest-client-db1"),
        server: Server {
            address: "127.42.0.11".into(),
            port: 28441,
            tls: tls("/etc/pgkeep/db1/tls", "pgbackrest-db1"),
            clients: vec!["pgbackrest-client-backup".into()],
        },
        process_max: 1,
        archive_queue_max_mib: 4096,
        timeouts: Timeouts::default(),
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn repository_lets_in_only_the_named_nodes_for_its_stanza_and_encrypts() {
    let text = render_repo(&repo()).unwrap();
    let l = lines(&text);
    for i in 1..=3 {
        assert!(l.contains(&format!("tls-server-auth=pgbackrest-client-db{i}=main").as_str()));
        assert!(l.contains(&format!("pg{i}-host=db{i}.pgkeep.test").as_str()));
        assert!(l.contains(&format!("pg{i}-host-type=tls").as_str()));
        // The node's server starts the repository's remote with the node's own files.
        assert!(l.contains(&format!("pg{i}-host-config-path=/etc/pgkeep/pgbackrest").as_str()));
    }
    assert!(!text.contains("=*"), "{text}");
    assert!(l.contains(&"repo1-cipher-type=aes-256-cbc"));
    assert!(
        !text.contains("cipher-pass"),
        "the passphrase stays in its own file"
    );
    assert!(l.contains(&"compress-type=zst"));
    assert!(l.contains(&"backup-standby=y"));
    assert!(l.contains(&"start-fast=y"));
    // Options before any section would be ignored; the stanza section holds the nodes.
    let global = text.find("[global]").unwrap();
    let stanza = text.find("[main]").unwrap();
    assert!(global < stanza && text.find("pg1-path").unwrap() > stanza);
}

#[test]
fn node_pushes_to_the_repository_over_tls_and_lets_in_only_the_repository() {
    let text = render_node(&node_plan()).unwrap();
    let l = lines(&text);
    assert!(l.contains(&"repo1-host=backup.pgkeep.test"));
    assert!(l.contains(&"repo1-host-type=tls"));
    assert!(l.contains(&"repo1-host-config-path=/etc/pgbackrest"));
    assert!(l.contains(&"tls-server-auth=pgbackrest-client-backup=main"));
    assert_eq!(
        l.iter()
            .filter(|x| x.starts_with("tls-server-auth="))
            .count(),
        1
    );
    assert!(l.contains(&"archive-async=y"));
    assert!(l.contains(&"archive-push-queue-max=4096MiB"));
    assert!(l.contains(&"io-timeout=10"));
    assert!(
        !text.contains("cipher"),
        "a node never holds the passphrase"
    );
}

#[test]
fn every_value_line_is_a_plain_key_value_pair() {
    for text in [
        render_repo(&repo()).unwrap(),
        render_node(&node_plan()).unwrap(),
    ] {
        for l in lines(&text) {
            if l.is_empty() || l.starts_with('[') {
                continue;
            }
            let (k, v) = l.split_once('=').unwrap();
            assert!(!k.is_empty() && !v.is_empty() && !v.contains('#'), "{l}");
        }
    }
}

#[test]
fn unusable_values_are_refused_with_the_option_named() {
    let mut p = repo();
    p.server.clients.clear();
    assert_eq!(render_repo(&p).unwrap_err().what, "tls-server-auth");
    let mut p = repo();
    p.server.clients.push("*".into());
    assert_eq!(render_repo(&p).unwrap_err().what, "tls-server-auth");
    let mut p = repo();
    p.server.address = "*".into();
    assert_eq!(render_repo(&p).unwrap_err().what, "tls-server-address");
    let mut p = repo();
    p.repo_path = PathBuf::from("relative/repo");
    assert_eq!(render_repo(&p).unwrap_err().what, "repo1-path");
    let mut p = repo();
    p.nodes[1].socket_dir = PathBuf::from("/run/a#b");
    assert_eq!(render_repo(&p).unwrap_err().what, "pg2-socket-path");
    let mut p = repo();
    p.nodes[0].host = "db1\n[global]".into();
    assert_eq!(render_repo(&p).unwrap_err().what, "pg1-host");
    let mut p = node_plan();
    p.timeouts.protocol = p.timeouts.db;
    assert_eq!(render_node(&p).unwrap_err().what, "protocol-timeout");
    let mut p = node_plan();
    p.stanza = "main cluster".into();
    assert_eq!(render_node(&p).unwrap_err().what, "stanza");
    assert_eq!(
        render_cipher("short").unwrap_err().what,
        "repo1-cipher-pass"
    );
    let secret = format!("{}#tail", "s".repeat(40));
    let e = render_cipher(&secret).unwrap_err().to_string();
    assert!(e.contains("repo1-cipher-pass") && !e.contains("sss"), "{e}");
}

#[test]
fn wal_commands_use_the_nodes_own_file_and_refuse_shell_syntax() {
    let (archive, restore) = wal_commands(
        Path::new("/usr/bin/pgbackrest"),
        Path::new("/etc/pgkeep/db1/pgbackrest"),
        "main",
    )
    .unwrap();
    assert_eq!(
        archive,
        "/usr/bin/pgbackrest --config-path=/etc/pgkeep/db1/pgbackrest --stanza=main archive-push %p"
    );
    assert_eq!(
        restore,
        "/usr/bin/pgbackrest --config-path=/etc/pgkeep/db1/pgbackrest --stanza=main archive-get %f \"%p\""
    );
    for bad in ["/etc/x;rm -rf /", "/etc/$(id)", "etc/relative", "/etc/a b"] {
        assert!(wal_commands(Path::new("/usr/bin/pgbackrest"), Path::new(bad), "main").is_err());
    }
    assert!(wal_commands(Path::new("pgbackrest"), Path::new("/etc/p.conf"), "main").is_err());
}

#[test]
fn process_max_is_half_the_cpus_within_bounds() {
    assert_eq!(process_max_for(1), 1);
    assert_eq!(process_max_for(2), 1);
    assert_eq!(process_max_for(8), 4);
    assert_eq!(process_max_for(64), 8);
}

/// Runs Debian's pgBackRest on a rendered file with each of `commands`: every option must be
/// one it knows (it warns about others and ignores them) with a value it accepts (each command
/// checks the values of the options it uses, before it does anything, and then fails here for
/// want of a WAL file, a stanza or a reachable host).
fn pgbackrest_accepts(
    dir: &Path,
    name: &str,
    text: &str,
    include: Option<&str>,
    commands: &[&str],
) {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, text).unwrap();
    let inc = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&inc).unwrap();
    if let Some(i) = include {
        std::fs::write(inc.join("cipher.conf"), i).unwrap();
    }
    for command in commands {
        let out = Command::new("/usr/bin/pgbackrest")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--config-include-path={}", inc.display()))
            .args([
                "--stanza=main",
                "--log-level-console=warn",
                "--log-level-file=off",
            ])
            .args(["--log-level-stderr=warn", command])
            .env_clear()
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for bad in [
            "invalid option",
            "is not valid for",
            "must be 'y' or 'n'",
            "[031]",
            "[032]",
        ] {
            assert!(
                !all.contains(bad),
                "{name} {command}: pgbackrest said {all}\n{text}"
            );
        }
    }
}

#[test]
fn debians_pgbackrest_knows_every_option_written() {
    if !Path::new("/usr/bin/pgbackrest").exists() {
        // The packages `make test` installs include pgbackrest; a bare `cargo test` may lack it.
        eprintln!("pgbackrest is not installed; skipped");
        return;
    }
    // Every path pgBackRest may touch lies in a directory of this test's own.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let mut r = repo();
    r.repo_path = dir.path().join("repo");
    r.paths = paths(&root);
    let mut n = node_plan();
    n.paths = paths(&root);
    n.pg.data_dir = dir.path().join("data");
    let cipher = render_cipher(&"x".repeat(48)).unwrap();
    let text = render_repo(&r).unwrap();
    pgbackrest_accepts(
        dir.path(),
        "repo",
        &text,
        Some(&cipher),
        &["info", "backup"],
    );
    let text = render_node(&n).unwrap();
    let node_commands = ["info", "archive-push", "archive-get"];
    pgbackrest_accepts(dir.path(), "node", &text, None, &node_commands);
    // The check can fail: a value pgBackRest refuses is caught.
    let bad = text.replace("compress-type=zst", "compress-type=bogus");
    let caught = std::panic::catch_unwind(|| {
        pgbackrest_accepts(dir.path(), "bad", &bad, None, &["archive-push"]);
    });
    assert!(caught.is_err(), "compress-type=bogus was not caught");
}

#[test]
fn recovery_targets_become_restore_options_and_bad_ones_are_named() {
    assert_eq!(
        restore_target_options(&RecoveryTarget::Time("2026-11-29 23:40:00+00".into())).unwrap(),
        [
            "--type=time",
            "--target=2026-11-29 23:40:00+00",
            "--target-action=promote"
        ]
    );
    for zoned in [
        "2026-11-29 23:40:00Z",
        "2026-11-29T23:40:00-05:00",
        "2026-11-29 23:40:00 UTC",
    ] {
        assert!(
            restore_target_options(&RecoveryTarget::Time(zoned.into())).is_ok(),
            "{zoned}"
        );
    }
    assert_eq!(
        restore_target_options(&RecoveryTarget::Lsn("0/5000060".into())).unwrap()[1],
        "--target=0/5000060"
    );
    assert_eq!(
        restore_target_options(&RecoveryTarget::Name("before-upgrade".into())).unwrap()[0],
        "--type=name"
    );
    assert_eq!(
        restore_target_options(&RecoveryTarget::Latest).unwrap(),
        ["--type=default"]
    );
    for (t, what) in [
        (RecoveryTarget::Time("yesterday".into()), "target-time"),
        (
            RecoveryTarget::Time("2026-11-29 23:40:00".into()),
            "target-time",
        ),
        (
            RecoveryTarget::Time("2026-11-29' ; x".into()),
            "target-time",
        ),
        (RecoveryTarget::Lsn("0/xyz".into()), "target-lsn"),
        (RecoveryTarget::Lsn("5000060".into()), "target-lsn"),
        (RecoveryTarget::Name("a\nb".into()), "target-name"),
        (RecoveryTarget::Name("n".repeat(64)), "target-name"),
    ] {
        assert_eq!(restore_target_options(&t).unwrap_err().what, what, "{t:?}");
    }
}
