//! netbed integration tests: hosts in network namespaces on a private switch, and the faults the
//! bed injects between them.
//!
//! These need root (namespaces, nftables, cgroups) and run one at a time (nextest test group
//! `real-cluster`). The traffic is a tiny Python TCP server and client (Debian's
//! `/usr/bin/python3`), run as the unprivileged `postgres` user inside the hosts; a Python loop
//! that resolves names shows that the bed's names stay pinned in a long-running process.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgkeep_testkit::{Env, NetBed, Service, ServiceUser, pid_is_alive, sweep};

const PYTHON: &str = "/usr/bin/python3";

/// The port every test server listens on (each host has its own network stack).
const PORT: u16 = 7070;

/// Client timeout for a connection that should go through.
const REACH_TIMEOUT: f64 = 5.0;

/// Client timeout for a connection a cut should swallow.
const CUT_TIMEOUT: f64 = 1.5;

/// Accepts connections forever; answers each with `<server name> <peer address>`.
const SERVER: &str = r#"import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
while True:
    c, peer = s.accept()
    try:
        c.sendall(("%s %s\n" % (sys.argv[3], peer[0])).encode())
    finally:
        c.close()
"#;

/// Connects to `host port` within `timeout` seconds and prints what happened.
const CLIENT: &str = r#"import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(float(sys.argv[3]))
    print("OK " + s.recv(200).decode().strip())
except socket.timeout:
    print("TIMEOUT")
except ConnectionRefusedError:
    print("REFUSED")
except OSError as e:
    print("ERROR %s" % e)
"#;

/// Resolves every name in `argv[1:]` every 100 ms, forever, and prints one line per round:
/// `<round> <addr-or-ERROR>,<addr-or-ERROR>...`.
const RESOLVER: &str = r#"import socket, sys, time
n = 0
while True:
    out = []
    for name in sys.argv[1:]:
        try:
            out.append(socket.gethostbyname(name))
        except OSError:
            out.append("ERROR")
    print(n, ",".join(out), flush=True)
    n += 1
    time.sleep(0.1)
"#;

/// What a client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// Connected; the server's answer (`<server> <client address>`).
    Ok(String),
    /// No answer at all within the timeout.
    Timeout,
    /// Connection refused (RST).
    Refused,
    /// Anything else (unreachable, name not resolved, ...).
    Error(String),
}

fn user() -> Result<ServiceUser> {
    ServiceUser::postgres()
}

/// Starts the test server in `host`, bound to the host's own address, and waits until it
/// answers (from the host itself).
fn start_server(bed: &NetBed, host: &str) -> Result<Service> {
    let addr = bed.addr(host).to_string();
    let port = PORT.to_string();
    let svc = bed.spawn(
        host,
        &format!("server-{}-{host}", bed.id()),
        &user()?,
        &bed.env().tmp_dir(),
        PYTHON,
        &[
            "-c".as_ref(),
            SERVER.as_ref(),
            addr.as_ref(),
            port.as_ref(),
            host.as_ref(),
        ],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Probe::Ok(_) = probe(bed, host, host, REACH_TIMEOUT)? {
            return Ok(svc);
        }
        ensure!(
            svc.is_running(),
            "server in {host} exited: {}",
            svc.log_tail(20)
        );
        ensure!(
            Instant::now() < deadline,
            "server in {host} not answering: {}",
            svc.log_tail(20)
        );
        sleep(Duration::from_millis(50));
    }
}

/// Connects from `from` to `to`'s server by `to`'s DNS name.
fn probe(bed: &NetBed, from: &str, to: &str, timeout: f64) -> Result<Probe> {
    probe_target(bed, from, &bed.dns_name(to), PORT, timeout)
}

/// Connects from `from` to `target` (a name or an address) on `port`.
fn probe_target(bed: &NetBed, from: &str, target: &str, port: u16, timeout: f64) -> Result<Probe> {
    let port = port.to_string();
    let t = timeout.to_string();
    let out = bed.run(
        from,
        &user()?,
        &bed.env().tmp_dir(),
        PYTHON,
        &[
            "-c".as_ref(),
            CLIENT.as_ref(),
            target.as_ref(),
            port.as_ref(),
            t.as_ref(),
        ],
        &[],
        Duration::from_secs_f64(timeout + 10.0),
    )?;
    let out = out.ensure_success(&format!("client {from} -> {target}"))?;
    Ok(parse_probe(out.stdout.trim(), out.stderr.trim()))
}

/// What the client printed (`stderr` only adds detail to an unexpected answer).
fn parse_probe(line: &str, stderr: &str) -> Probe {
    match line {
        "TIMEOUT" => Probe::Timeout,
        "REFUSED" => Probe::Refused,
        _ => match line.strip_prefix("OK ") {
            Some(answer) => Probe::Ok(answer.to_string()),
            None => Probe::Error(format!("{line} {stderr}")),
        },
    }
}

/// `from` reaches `to`'s server, and the server saw `from`'s bed address as the peer.
fn assert_reaches(bed: &NetBed, from: &str, to: &str) -> Result<()> {
    let got = probe(bed, from, to, REACH_TIMEOUT)?;
    let want = Probe::Ok(format!("{to} {}", bed.addr(from)));
    ensure!(got == want, "{from} -> {to}: {got:?}, expected {want:?}");
    Ok(())
}

/// A connection from `from` to `to` hears nothing: no answer, no RST, no error, for the whole
/// client timeout.
fn assert_silent(bed: &NetBed, from: &str, to: &str) -> Result<()> {
    let t0 = Instant::now();
    let got = probe(bed, from, to, CUT_TIMEOUT)?;
    let took = t0.elapsed();
    ensure!(
        got == Probe::Timeout,
        "{from} -> {to}: {got:?}, expected silence"
    );
    ensure!(
        took >= Duration::from_secs_f64(CUT_TIMEOUT),
        "{from} -> {to} gave up after {took:?}"
    );
    Ok(())
}

/// `ip -br <what>` in the root namespace.
fn root_ip_br(what: &str) -> Result<String> {
    let out = Command::new("/usr/sbin/ip")
        .args(["-br", what])
        .stdin(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "ip -br {what}: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// Connects from the root namespace (this process) to `addr` and reads what the peer says
/// within a second.
fn root_connect(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if buf.is_empty() => return Err(e),
        Err(_) => {}
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Device and inode of a namespace file (`/proc/<pid>/ns/net` or `/run/netns/<name>`).
fn ns_identity(path: &Path) -> Result<(u64, u64)> {
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.dev(), m.ino()))
}

/// Everything of `bed` that is visible on the machine: namespace files and `/etc/netns` dirs.
fn bed_paths(bed: &NetBed) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = bed
        .namespaces()
        .iter()
        .map(|ns| Path::new("/run/netns").join(ns))
        .collect();
    out.extend(bed.hosts().iter().map(|h| bed.etc_dir(h)));
    out
}

fn assert_all_exist(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        ensure!(p.exists(), "{} missing", p.display());
    }
    Ok(())
}

fn assert_none_exist(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        ensure!(!p.exists(), "{} still exists", p.display());
    }
    Ok(())
}

#[test]
fn hosts_reach_each_other_by_dns_name() -> Result<()> {
    let env = Env::new("netbed-reach")?;
    let bed = NetBed::new(&env, &["a", "b", "c"])?;
    eprintln!("bed: {bed:?}");

    // Addresses: distinct, in the bed's private /24.
    let subnet = bed.subnet();
    ensure!(subnet.starts_with("10.231.") && subnet.ends_with(".0/24"));
    let addrs: Vec<Ipv4Addr> = bed.hosts().iter().map(|h| bed.addr(h)).collect();
    for (i, a) in addrs.iter().enumerate() {
        ensure!(
            a.octets()[..3] == addrs[0].octets()[..3],
            "{a} outside {subnet}"
        );
        ensure!(!addrs[..i].contains(a), "address {a} given twice");
    }
    ensure!(bed.dns_name("a") == format!("a.{}.pgkeep.test", bed.id()));
    assert_all_exist(&bed_paths(&bed))?;

    // Names resolve inside the bed, both the DNS name and the short name.
    let pg = user()?;
    for name in [bed.dns_name("a"), "a".to_string()] {
        let out = bed
            .run(
                "b",
                &pg,
                &env.tmp_dir(),
                "getent",
                &["hosts".as_ref(), name.as_ref()],
                &[],
                Duration::from_secs(10),
            )?
            .ensure_success(&format!("getent hosts {name} in b"))?;
        ensure!(
            out.stdout.split_whitespace().next() == Some(bed.addr("a").to_string().as_str()),
            "{name} resolves to {:?} in b",
            out.stdout
        );
    }

    let server = start_server(&bed, "a")?;
    // The server is the program itself, runs as postgres, is in the env's cgroup and in a's
    // network namespace.
    let pid = server.pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    ensure!(comm.trim().starts_with("python3"), "pid {pid} is {comm:?}");
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status.lines().any(|l| l.starts_with("Uid:")
            && l.split_whitespace().nth(1) == Some(pg.uid.to_string().as_str())),
        "pid {pid} does not run as postgres"
    );
    ensure!(
        env.cgroup_pids()?.contains(&pid),
        "server {pid} is not in the env's cgroup"
    );
    ensure!(
        ns_identity(Path::new(&format!("/proc/{pid}/ns/net")))?
            == ns_identity(&Path::new("/run/netns").join(bed.ns_name("a")))?,
        "server {pid} is not in a's namespace"
    );

    // b and c reach a by name, from their own addresses.
    assert_reaches(&bed, "b", "a")?;
    assert_reaches(&bed, "c", "a")?;
    // Nobody listens on b: refused, which also shows the probe can fail.
    let nobody = probe(&bed, "a", "b", REACH_TIMEOUT)?;
    ensure!(
        nobody == Probe::Refused,
        "a -> b without a server: {nobody:?}"
    );
    // A name outside the bed does not resolve in it.
    let foreign = probe_target(&bed, "b", "nosuchhost.pgkeep.test", PORT, REACH_TIMEOUT)?;
    ensure!(
        matches!(foreign, Probe::Error(_)),
        "foreign name: {foreign:?}"
    );
    Ok(())
}

#[test]
fn root_namespace_cannot_reach_the_bed() -> Result<()> {
    let env = Env::new("netbed-root")?;
    let bed = NetBed::new(&env, &["a", "b"])?;
    let _server = start_server(&bed, "a")?;
    let a = SocketAddr::from((bed.addr("a"), PORT));

    // The bed's addresses exist only inside the bed.
    let root_addrs = root_ip_br("addr")?;
    let net = bed.subnet();
    let net_prefix = net.trim_end_matches("0/24");
    ensure!(
        !root_addrs.contains(net_prefix),
        "the root namespace has an address in {net}:\n{root_addrs}"
    );
    // Positive control: the server answers inside the bed, now.
    assert_reaches(&bed, "b", "a")?;
    // Negative control: not from the root namespace. Whatever the root namespace's own routes
    // do with the address (here a default route may lead to a gateway that accepts any TCP
    // connection), the bed's server, which greets every client at once, is not what answers.
    let t0 = Instant::now();
    let answer = root_connect(a);
    eprintln!("root -> {a}: {answer:?} after {:?}", t0.elapsed());
    ensure!(
        !answer.as_deref().is_ok_and(|s| s.starts_with("a ")),
        "the root namespace reached the bed's server at {a}: {answer:?}"
    );
    // The bed's names are not in the root namespace's hosts file.
    let hosts = fs::read_to_string("/etc/hosts")?;
    ensure!(
        !hosts.contains(bed.id()),
        "/etc/hosts mentions {}",
        bed.id()
    );

    // The other way round: a listener of the root namespace on 127.0.0.1 is not the bed's
    // loopback, and the root namespace's own address is unreachable from the bed.
    let listener =
        TcpListener::bind(("127.0.0.1", PORT)).or_else(|_| TcpListener::bind(("127.0.0.1", 0)))?;
    let port = listener.local_addr()?.port();
    let root_loopback = probe_target(&bed, "b", "127.0.0.1", port, 2.0)?;
    ensure!(
        root_loopback == Probe::Refused,
        "b -> root's 127.0.0.1:{port}: {root_loopback:?}"
    );
    let root_v4 = root_addrs
        .lines()
        .filter(|l| !l.starts_with("lo "))
        .flat_map(|l| l.split_whitespace().skip(2))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next();
    if let Some(root_v4) = root_v4 {
        let wide = TcpListener::bind((root_v4, 0))?;
        let port = wide.local_addr()?.port();
        let got = probe_target(&bed, "b", &root_v4.to_string(), port, 2.0)?;
        ensure!(
            !matches!(got, Probe::Ok(_)),
            "b reached the root namespace at {root_v4}:{port}"
        );
        eprintln!("b -> root {root_v4}:{port}: {got:?}");
    }
    Ok(())
}

#[test]
fn isolate_silences_a_host_until_heal() -> Result<()> {
    let env = Env::new("netbed-isolate")?;
    let bed = NetBed::new(&env, &["a", "b", "c"])?;
    let _servers: Vec<Service> = ["a", "b", "c"]
        .iter()
        .map(|h| start_server(&bed, h))
        .collect::<Result<_>>()?;
    assert_reaches(&bed, "b", "a")?;
    assert_reaches(&bed, "a", "b")?;

    bed.isolate("a")?;
    // a hears nobody and nobody hears a: the connections time out rather than being refused.
    assert_silent(&bed, "b", "a")?;
    assert_silent(&bed, "c", "a")?;
    assert_silent(&bed, "a", "b")?;
    // The others still talk to each other, and a still talks to itself.
    assert_reaches(&bed, "b", "c")?;
    assert_reaches(&bed, "c", "b")?;
    assert_reaches(&bed, "a", "a")?;

    bed.heal()?;
    assert_reaches(&bed, "b", "a")?;
    assert_reaches(&bed, "a", "c")?;

    // Isolating twice and healing twice are fine; an unknown host is an error.
    bed.isolate("b")?;
    bed.isolate("b")?;
    assert_silent(&bed, "a", "b")?;
    bed.heal()?;
    bed.heal()?;
    assert_reaches(&bed, "a", "b")?;
    ensure!(bed.isolate("nosuch").is_err());
    Ok(())
}

#[test]
fn partition_cuts_only_between_groups() -> Result<()> {
    let env = Env::new("netbed-partition")?;
    let bed = NetBed::new(&env, &["a", "b", "c"])?;
    let _servers: Vec<Service> = ["a", "b", "c"]
        .iter()
        .map(|h| start_server(&bed, h))
        .collect::<Result<_>>()?;

    bed.partition(&["a"], &["b"])?;
    assert_silent(&bed, "a", "b")?;
    assert_silent(&bed, "b", "a")?;
    for (from, to) in [("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")] {
        assert_reaches(&bed, from, to)?;
    }
    bed.heal()?;
    assert_reaches(&bed, "a", "b")?;
    assert_reaches(&bed, "b", "a")?;

    // Groups of two: a and b stay together, c is alone.
    bed.partition(&["a", "b"], &["c"])?;
    assert_reaches(&bed, "a", "b")?;
    assert_silent(&bed, "a", "c")?;
    assert_silent(&bed, "c", "b")?;
    bed.heal()?;
    assert_reaches(&bed, "c", "b")?;

    ensure!(
        bed.partition(&["a"], &["a", "b"]).is_err(),
        "overlapping groups accepted"
    );
    ensure!(
        bed.partition(&["a"], &["x"]).is_err(),
        "unknown host accepted"
    );
    Ok(())
}

/// The rounds the resolver in `svc` has printed so far: `(round, answers)`.
fn resolver_rounds(svc: &Service) -> Result<Vec<(u64, String)>> {
    let text = fs::read_to_string(svc.log_path())
        .with_context(|| format!("reading {}", svc.log_path().display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (n, answers) = l.split_once(' ')?;
            Some((n.parse().ok()?, answers.to_string()))
        })
        .collect())
}

/// Waits (at most 20 s) until the resolver in `svc` has printed at least `n` rounds.
fn wait_resolver_rounds(svc: &Service, n: usize) -> Result<Vec<(u64, String)>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rounds = resolver_rounds(svc)?;
        if rounds.len() >= n {
            return Ok(rounds);
        }
        ensure!(svc.is_running(), "resolver exited: {}", svc.log_tail(20));
        ensure!(
            Instant::now() < deadline,
            "resolver printed {} of {n} rounds: {}",
            rounds.len(),
            svc.log_tail(20)
        );
        sleep(Duration::from_millis(50));
    }
}

/// Replaces the root namespace's `/etc/hosts` by rename with an identical copy, under the lock
/// every editor of the file takes (as the harness's environments and `pgkeep up` do whenever
/// they add or drop a block). Fails if the file was not actually replaced (a bind-mounted
/// `/etc/hosts` is rewritten in place, which would prove nothing).
fn replace_root_hosts_by_rename() -> Result<()> {
    use pgkeep::local::hosts::{HOSTS_FILE, lock, read_hosts, write_hosts};
    let _lock = lock()?;
    let before = fs::metadata(HOSTS_FILE)?.ino();
    let content = read_hosts()?;
    write_hosts(&content)?;
    let after = fs::metadata(HOSTS_FILE)?.ino();
    ensure!(
        before != after,
        "{HOSTS_FILE} was rewritten in place (inode {before}), not replaced by rename"
    );
    ensure!(read_hosts()? == content, "{HOSTS_FILE} changed");
    Ok(())
}

#[test]
fn long_running_process_keeps_the_bed_names_when_etc_hosts_is_replaced() -> Result<()> {
    let env = Env::new("netbed-pin")?;
    let bed = NetBed::new(&env, &["a", "b"])?;
    let b_name = bed.dns_name("b");
    let want = format!("{b},{b}", b = bed.addr("b"));
    let svc = bed.spawn(
        "a",
        &format!("resolver-{}", bed.id()),
        &user()?,
        &env.tmp_dir(),
        PYTHON,
        &[
            "-c".as_ref(),
            RESOLVER.as_ref(),
            b_name.as_ref(),
            "b".as_ref(),
        ],
        &[],
    )?;
    let pid = svc.pid();

    // Positive control: the process resolves the bed's names before anything happens.
    let rounds = wait_resolver_rounds(&svc, 1)?;
    ensure!(
        rounds.iter().all(|(_, got)| *got == want),
        "before the rename, a resolved {b_name} and b to {rounds:?}, expected {want}"
    );

    replace_root_hosts_by_rename()?;

    // A round printed after the rename may have resolved before it; the ones after that did
    // not. Each must still see the bed's names.
    let seen = resolver_rounds(&svc)?.len();
    let rounds = wait_resolver_rounds(&svc, seen + 5)?;
    let after: Vec<&(u64, String)> = rounds[seen + 1..].iter().collect();
    ensure!(
        after.iter().all(|(_, got)| *got == want),
        "after /etc/hosts was replaced, the long-running process in a resolved {b_name} and b \
         to {after:?}, expected {want}"
    );
    // Still the same process, the program itself.
    ensure!(svc.is_running() && svc.pid() == pid, "resolver restarted");
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    ensure!(comm.trim().starts_with("python3"), "pid {pid} is {comm:?}");

    // The root namespace still does not know the bed's names, and a new process in the bed
    // does.
    ensure!(
        !fs::read_to_string("/etc/hosts")?.contains(bed.id()),
        "/etc/hosts mentions {}",
        bed.id()
    );
    let out = bed
        .run(
            "b",
            &user()?,
            &env.tmp_dir(),
            "getent",
            &["hosts".as_ref(), b_name.as_ref()],
            &[],
            Duration::from_secs(10),
        )?
        .ensure_success(&format!("getent hosts {b_name} in b"))?;
    ensure!(
        out.stdout.split_whitespace().next() == Some(bed.addr("b").to_string().as_str()),
        "{b_name} resolves to {:?} in b",
        out.stdout
    );
    Ok(())
}

#[test]
fn teardown_leaves_no_trace() -> Result<()> {
    let links_before = root_ip_br("link")?;
    let addrs_before = root_ip_br("addr")?;
    let env = Env::new("netbed-teardown")?;

    // Explicit teardown, with a server still running in a host.
    let bed = NetBed::new(&env, &["a", "b"])?;
    let paths = bed_paths(&bed);
    assert_all_exist(&paths)?;
    // While the bed exists, the root namespace has not changed either.
    ensure!(
        root_ip_br("link")? == links_before,
        "root links changed while the bed exists"
    );
    ensure!(
        root_ip_br("addr")? == addrs_before,
        "root addresses changed while the bed exists"
    );
    let server = start_server(&bed, "a")?;
    let pid = server.pid();
    bed.teardown()?;
    assert_none_exist(&paths)?;
    ensure!(!pid_is_alive(pid), "server {pid} survived the teardown");
    ensure!(server.exit_status().is_some(), "server not reaped");
    bed.teardown()?;
    drop(bed);

    // Teardown on drop.
    let bed = NetBed::new(&env, &["x", "y", "z"])?;
    let paths = bed_paths(&bed);
    assert_all_exist(&paths)?;
    assert_reaches_after_start(&bed)?;
    drop(bed);
    assert_none_exist(&paths)?;

    let prefix = format!("pgkt-{}.{}.", pgkeep_testkit::checkout_id(), env.id());
    let leftovers: Vec<String> = ["/run/netns", "/etc/netns"]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(leftovers.is_empty(), "left behind: {leftovers:?}");
    ensure!(root_ip_br("link")? == links_before, "root links changed");
    ensure!(
        root_ip_br("addr")? == addrs_before,
        "root addresses changed"
    );
    // The environment is untouched by the beds' teardown.
    ensure!(env.cgroup_path().is_dir() && env.root().is_dir());
    Ok(())
}

/// A server in `x` answers `y`: the bed dropped next was fully working.
fn assert_reaches_after_start(bed: &NetBed) -> Result<()> {
    let server = start_server(bed, "x")?;
    assert_reaches(bed, "y", "x")?;
    drop(server);
    Ok(())
}

/// Set (to the marker file path) only when `killed_test_bed_is_swept` runs the victim.
const VICTIM_VAR: &str = "PGKEEP_TESTKIT_NETBED_VICTIM_MARKER";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BedFootprint {
    namespaces: Vec<String>,
    paths: Vec<PathBuf>,
    server: u32,
}

/// Not a test on its own: `killed_test_bed_is_swept` runs it in a child process and kills that
/// process with SIGKILL. Without the marker variable it returns at once.
#[test]
#[ignore = "run (and killed) by netbed::killed_test_bed_is_swept"]
fn victim_bed() {
    let Some(marker) = std::env::var_os(VICTIM_VAR) else {
        return;
    };
    let env = Env::new("netbed-victim").expect("env");
    let bed = NetBed::new(&env, &["a", "b"]).expect("bed");
    let server = start_server(&bed, "a").expect("server");
    let fp = BedFootprint {
        namespaces: bed.namespaces().iter().map(|s| s.to_string()).collect(),
        paths: bed_paths(&bed),
        server: server.pid(),
    };
    let marker = PathBuf::from(marker);
    let tmp = marker.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(&fp).expect("json")).expect("write marker");
    fs::rename(&tmp, &marker).expect("rename marker");
    // Wait to be killed; bounded so a broken parent cannot leave this running forever.
    sleep(Duration::from_secs(120));
}

/// Kills (and reaps) the child process when dropped, then sweeps what it left.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = sweep();
        }
    }
}

#[test]
fn killed_test_bed_is_swept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("victim.json");
    let log = dir.path().join("victim.log");
    let child = Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "netbed::victim_bed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(VICTIM_VAR, &marker)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let mut child = KillOnDrop(child);
    let victim_pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "victim exited early ({status}):\n{}",
                fs::read_to_string(&log)?
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "victim not ready after 60 s:\n{}",
                fs::read_to_string(&log)?
            );
        }
        sleep(Duration::from_millis(50));
    }
    let fp: BedFootprint = serde_json::from_slice(&fs::read(&marker)?)?;
    ensure!(
        fp.namespaces
            .iter()
            .all(|ns| ns.contains(&format!("-{victim_pid}-"))),
        "namespace names lack the victim's pid {victim_pid}: {:?}",
        fp.namespaces
    );
    assert_all_exist(&fp.paths)?;
    ensure!(pid_is_alive(fp.server));

    kill(Pid::from_raw(i32::try_from(victim_pid)?), Signal::SIGKILL)?;
    let status = child.0.wait()?;
    ensure!(status.code().is_none(), "victim was not killed: {status}");
    // Its destructors did not run: the bed is still there.
    assert_all_exist(&fp.paths).context("bed vanished without a sweep")?;

    let report = sweep()?;
    eprintln!("sweep: {report:?}");
    ensure!(
        report.errors.is_empty(),
        "sweep errors: {:?}",
        report.errors
    );
    for ns in &fp.namespaces {
        ensure!(
            report.netns_removed.contains(ns),
            "sweep did not report {ns}: {report:?}"
        );
    }
    assert_none_exist(&fp.paths)?;
    ensure!(
        !pid_is_alive(fp.server),
        "server {} survived the sweep",
        fp.server
    );
    Ok(())
}
