//! Local callbacks on a real two-node cluster: `on_start` at start, `before_stop` before the
//! old primary stops, `on_stop` and `on_role_change` on both nodes of a switchover with the
//! right roles, `on_reload` and `on_restart`; a failing `pre_promote` on the candidate aborts
//! the switchover (the candidate never leaves recovery, the old primary leads again, never two
//! primaries); callbacks written into the DCS configuration are refused and never run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgkeep_testkit::{AgentCluster, DcsOptions, Env, EtcdCluster, ServiceUser};

const SCOPE: &str = "cbk";

/// The per-node files: the log every script appends to, and the flag that makes
/// `pre_promote` fail.
struct Scripts {
    log: PathBuf,
    fail_flag: PathBuf,
}

fn write_script(path: &Path, body: &str, pg: &ServiceUser) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    pg.chown(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Writes node `i`'s callback scripts into its directory (0700, owned by `postgres`) and adds
/// them to its configuration.
fn install(c: &AgentCluster, i: usize, pg: &ServiceUser) -> Scripts {
    let a = &c.agents[i];
    let dir = &a.node.dir;
    let log = dir.join("callbacks.log");
    let fail_flag = dir.join("fail-pre-promote");
    let record = dir.join("record.sh");
    // Patroni's convention: <action> <role> <scope> appended to the configured command.
    write_script(
        &record,
        &format!(
            "echo \"$*\" >> {log}\necho \"hello from $2\"",
            log = log.display()
        ),
        pg,
    );
    let pre_promote = dir.join("pre-promote.sh");
    write_script(
        &pre_promote,
        &format!(
            "if [ -e {flag} ]; then echo \"pre_promote fail $PGKEEP_ROLE\" >> {log}; exit 1; fi\n\
             echo \"pre_promote ok $PGKEEP_ROLE\" >> {log}",
            flag = fail_flag.display(),
            log = log.display()
        ),
        pg,
    );
    let before_stop = dir.join("before-stop.sh");
    write_script(
        &before_stop,
        &format!(
            "if [ -e {data}/postmaster.pid ]; then state=running; else state=stopped; fi\n\
             sleep 1\n\
             echo \"before_stop $state $PGKEEP_ROLE\" >> {log}",
            data = a.data_dir().display(),
            log = log.display()
        ),
        pg,
    );
    let r = record.display();
    let text = std::fs::read_to_string(&a.config).unwrap();
    let text = text.replacen(
        "\npostgresql:\n",
        &format!(
            "\npostgresql:\n  callbacks:\n    on_start: {r}\n    on_stop: {r}\n    on_restart: {r}\n    \
             on_reload: [{r}, x]\n    on_role_change: {r}\n  pre_promote: {}\n  before_stop: {}\n",
            pre_promote.display(),
            before_stop.display()
        ),
        1,
    );
    assert!(
        text.contains("  callbacks:"),
        "no postgresql section in {text}"
    );
    std::fs::write(
        &a.config,
        format!("{text}pgkeep:\n  callback_timeout: 20\n"),
    )
    .unwrap();
    Scripts { log, fail_flag }
}

fn lines(s: &Scripts) -> Vec<String> {
    std::fs::read_to_string(&s.log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until node's log has `want` (a whole line), after `from` lines; returns its index.
fn wait_line(c: &AgentCluster, s: &Scripts, from: usize, want: &str) -> usize {
    let mut at = None;
    let found = c.wait(
        &format!("callback line {want:?}"),
        Duration::from_secs(60),
        |_| {
            at = lines(s).iter().skip(from).position(|l| l == want);
            at.is_some()
        },
    );
    if let Err(e) = found {
        panic!("{e:#}\ncallback log: {:#?}", lines(s));
    }
    from + at.unwrap()
}

fn agent_log(c: &AgentCluster, i: usize) -> String {
    let svc = c.agents[i].service.as_ref().unwrap();
    std::fs::read_to_string(svc.log_path()).unwrap_or_default()
}

/// PostgreSQL of node `i` is a running primary.
fn is_primary(c: &AgentCluster, i: usize) -> bool {
    c.psql(i, "SELECT pg_is_in_recovery()")
        .is_ok_and(|o| o.success() && o.stdout.trim() == "f")
}

fn api(c: &AgentCluster, env: &Env) -> (pgkeep::api::ApiClient, tokio::runtime::Runtime) {
    let ca = std::fs::read(env.ca_cert_path()).unwrap();
    let client = pgkeep::api::ApiClient::builder(&ca)
        .unwrap()
        .identity_files(&c.operator_cert, &c.operator_key)
        .unwrap()
        .basic_auth(
            pgkeep_testkit::API_USER,
            secrecy::SecretString::from(c.api_password.clone()),
        )
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (client, rt)
}

/// A running two-node cluster whose nodes have every callback, node 0 primary.
struct Bed {
    env: Env,
    etcd: EtcdCluster,
    c: AgentCluster,
    s: [Scripts; 2],
}

fn bed(name: &str, scope: &str, dcs: &DcsOptions) -> Bed {
    let env = Env::new(name).unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare_with(&env, &etcd, scope, 2, &bin, dcs).unwrap();
    let pg = ServiceUser::postgres().unwrap();
    let s = [install(&c, 0, &pg), install(&c, 1, &pg)];
    c.start_all().unwrap();
    c.wait("node 0 primary", Duration::from_secs(90), |c| {
        c.primary() == Some(0)
    })
    .unwrap();
    c.wait("node 1 streaming", Duration::from_secs(90), |c| {
        c.replicas_streaming(0)
    })
    .unwrap();
    Bed { env, etcd, c, s }
}

/// A switchover from `leader` to `candidate` whose `pre_promote` fails: the candidate never
/// leaves recovery (sampled every 100 ms from the request on), `leader` leads again with the
/// candidate streaming from it. Returns the REST answer.
fn failing_switchover(b: &Bed, leader: usize, candidate: usize) -> (u16, String) {
    let (c, s) = (&b.c, &b.s);
    std::fs::write(&s[candidate].fail_flag, b"").unwrap();
    let from = [lines(&s[0]).len(), lines(&s[1]).len()];
    let name = |i: usize| c.agents[i].node.name.clone();
    let body = serde_json::json!({"leader": name(leader), "candidate": name(candidate)});
    let url = format!("{}/switchover", c.agents[leader].api_base());
    // The request waits for its outcome; the candidate is watched meanwhile.
    let (client, rt) = api(c, &b.env);
    let t = Instant::now();
    let (answer, samples) = std::thread::scope(|sc| {
        let post = sc.spawn(move || {
            let r = rt
                .block_on(client.post_json(&url, &body.to_string()))
                .unwrap();
            (r.status, r.text())
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut samples = 0;
        loop {
            assert!(
                !is_primary(c, candidate),
                "node {candidate} left recovery although its pre_promote failed"
            );
            samples += 1;
            let failed = lines(&s[candidate])[from[candidate]..]
                .contains(&"pre_promote fail replica".into());
            let back = lines(&s[leader])[from[leader]..]
                .iter()
                .any(|l| l.starts_with("on_role_change master"));
            if failed && back && is_primary(c, leader) && c.replicas_streaming(leader) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {leader} did not lead again\n--- node 0 ---\n{}\n--- node 1 ---\n{}",
                tail(&agent_log(c, 0)),
                tail(&agent_log(c, 1))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (post.join().unwrap(), samples)
    });
    eprintln!(
        "failing switchover answered {answer:?}; node {leader} led again {:?} after the \
         request ({samples} samples of node {candidate}, never out of recovery)",
        t.elapsed()
    );
    // The candidate held the key for a moment but never ran as a primary: not a success.
    assert_eq!(answer.0, 503, "{answer:?}");
    let lines_c = lines(&s[candidate]);
    assert!(
        !lines_c[from[candidate]..]
            .iter()
            .any(|l| l.starts_with("on_role_change master")),
        "node {candidate} never became primary: {lines_c:?}"
    );
    // The old primary: stopped for the hand-over, back as a replica, then promoted again.
    let bs = wait_line(c, &s[leader], from[leader], "before_stop running master");
    let again = wait_line(c, &s[leader], bs, "pre_promote ok replica");
    wait_line(
        c,
        &s[leader],
        again,
        &format!("on_role_change master {}", c.scope),
    );
    assert!(
        agent_log(c, candidate).contains("PRE_PROMOTE FAILED"),
        "the failure is logged loudly"
    );
    assert_eq!(c.primary(), Some(leader));
    std::fs::remove_file(&s[candidate].fail_flag).unwrap();
    answer
}

#[test]
fn local_callbacks_on_a_real_cluster() {
    let b = bed("callbacks", SCOPE, &DcsOptions::default());
    let (env, etcd, c, s) = (&b.env, &b.etcd, &b.c, &b.s);
    let (client, rt) = api(c, env);
    let name = |i: usize| c.agents[i].node.name.clone();

    // (1) on_start with each node's role; the callback's output is in the agent's log.
    wait_line(c, &s[0], 0, &format!("on_start master {SCOPE}"));
    wait_line(c, &s[1], 0, &format!("on_start replica {SCOPE}"));
    assert!(agent_log(c, 0).contains("hello from master"));

    // (2) Switchover 0 -> 1: pre_promote on the candidate, then on_role_change master there;
    // before_stop (while PostgreSQL still ran), on_stop, on_role_change replica on the old
    // primary, in that order.
    let from = [lines(&s[0]).len(), lines(&s[1]).len()];
    let body = serde_json::json!({"leader": name(0), "candidate": name(1)});
    let url = format!("{}/switchover", c.agents[0].api_base());
    // Right after the start the candidate's member key may not show it streaming yet (412).
    let deadline = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        let resp = rt
            .block_on(client.post_json(&url, &body.to_string()))
            .unwrap();
        if resp.status != 412 || Instant::now() > deadline {
            break resp;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(resp.status, 200, "{}", resp.text());
    c.wait(
        "node 1 primary, node 0 streaming",
        Duration::from_secs(60),
        |c| c.primary() == Some(1) && c.replicas_streaming(1),
    )
    .unwrap();
    let pre = wait_line(c, &s[1], from[1], "pre_promote ok replica");
    wait_line(c, &s[1], pre, &format!("on_role_change master {SCOPE}"));
    let bs = wait_line(c, &s[0], from[0], "before_stop running master");
    let stop = wait_line(c, &s[0], bs, &format!("on_stop master {SCOPE}"));
    wait_line(c, &s[0], stop, &format!("on_role_change replica {SCOPE}"));

    // (3) on_reload (its configured argument first) and on_restart, on the replica.
    let from0 = lines(&s[0]).len();
    let resp = rt
        .block_on(client.post_json(&format!("{}/reload", c.agents[0].api_base()), "{}"))
        .unwrap();
    assert!(resp.status < 300, "{} {}", resp.status, resp.text());
    wait_line(c, &s[0], from0, &format!("x on_reload replica {SCOPE}"));
    let resp = rt
        .block_on(client.post_json(&format!("{}/restart", c.agents[0].api_base()), "{}"))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let bs = wait_line(c, &s[0], from0, "before_stop running replica");
    wait_line(c, &s[0], bs, &format!("on_restart replica {SCOPE}"));
    c.wait("node 0 streaming again", Duration::from_secs(60), |c| {
        c.replicas_streaming(1)
    })
    .unwrap();
    let restart_lines = &lines(&s[0])[from0..];
    assert!(
        !restart_lines
            .iter()
            .any(|l| l.starts_with("on_stop") || l.starts_with("on_start")),
        "a restart fires on_restart only: {restart_lines:?}"
    );

    // (4) A failing pre_promote on the candidate aborts the switchover 1 -> 0: node 0 never
    // leaves recovery, node 1 leads again, and at no moment are there two primaries.
    failing_switchover(&b, 1, 0);

    // (5) Callbacks written straight into the DCS configuration are dropped as a security
    // event and never run, not even by a reload or a restart.
    let pwned = c.agents[0].node.dir.join("pwned");
    let path = format!("/service/{SCOPE}/config");
    let out = etcd.etcdctl(&["get", &path, "--print-value-only"]).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    config["postgresql"] = serde_json::json!({
        "callbacks": {"on_reload": ["/bin/sh", "-c", format!("touch {}", pwned.display())]},
        "pre_promote": format!("/usr/bin/touch {}", pwned.display()),
        "before_stop": format!("/usr/bin/touch {}", pwned.display()),
    });
    let put = etcd.etcdctl(&["put", &path, &config.to_string()]).unwrap();
    assert!(put.success(), "{}", put.stderr);
    c.wait(
        "the injected callbacks refused on both nodes",
        Duration::from_secs(30),
        |c| {
            (0..2).all(|i| {
                let log = agent_log(c, i);
                log.lines()
                    .any(|l| l.contains("security") && l.contains("postgresql.callbacks"))
            })
        },
    )
    .unwrap();
    let from0 = lines(&s[0]).len();
    let resp = rt
        .block_on(client.post_json(&format!("{}/reload", c.agents[0].api_base()), "{}"))
        .unwrap();
    assert!(resp.status < 300, "{} {}", resp.status, resp.text());
    let resp = rt
        .block_on(client.post_json(&format!("{}/restart", c.agents[0].api_base()), "{}"))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    wait_line(c, &s[0], from0, &format!("on_restart replica {SCOPE}"));
    // The local on_reload ran; the injected one did not.
    assert!(lines(&s[0])[from0..].contains(&format!("x on_reload replica {SCOPE}")));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!pwned.exists(), "a callback from the DCS ran");
    for (i, node) in s.iter().enumerate() {
        eprintln!("--- callbacks of node {i} ---\n{}", lines(node).join("\n"));
    }
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(4000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Synchronous mode: the candidate rewrites `/sync` to name itself alone before `pre_promote`
/// runs (as Patroni does). When `pre_promote` then fails during a switchover, `/sync` goes back
/// to the old leader, which leads again at once instead of the cluster waiting for the
/// candidate's next attempt.
#[test]
fn a_failing_pre_promote_in_synchronous_mode_hands_sync_back() {
    let dcs = DcsOptions {
        synchronous_mode: true,
        ..DcsOptions::default()
    };
    let b = bed("callbacks-sync", "cbs", &dcs);
    let sync = || {
        let out = b
            .etcd
            .etcdctl(&["get", "/service/cbs/sync", "--print-value-only"])
            .unwrap();
        serde_json::from_str::<serde_json::Value>(out.stdout.trim()).unwrap_or_default()
    };
    let name = |i: usize| b.c.agents[i].node.name.clone();
    b.c.wait("node 1 synchronous", Duration::from_secs(60), |_| {
        sync()["sync_standby"] == name(1).as_str()
    })
    .unwrap();
    failing_switchover(&b, 0, 1);
    assert!(
        agent_log(&b.c, 1).contains("/sync handed back to the old leader"),
        "{}",
        tail(&agent_log(&b.c, 1))
    );
    b.c.wait("/sync names node 0 again", Duration::from_secs(30), |_| {
        sync()["leader"] == name(0).as_str() && sync()["sync_standby"] == name(1).as_str()
    })
    .unwrap();
}
