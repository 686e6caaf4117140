//! HAProxy (Debian's 2.6, configured by `pgkeep::haproxy::render`) in front of a real
//! three-node cluster: the write port follows a failover, the read port reaches replicas only,
//! a reload keeps the servers' states, and a node whose REST API presents an impostor
//! certificate (another CA, or the cluster's CA with another name) is DOWN and gets no traffic
//! although it answers 200 to every check. Clients connect to the load balancer's name with
//! the certificate verified (rustls: chain and name, as `sslmode=verify-full`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgkeep::haproxy::{READ_BACKEND, WRITE_BACKEND};
use pgkeep::pki::{Ca, CertRequest, Issued, Usage};
use pgkeep_testkit::{AgentCluster, Env, EtcdCluster, Haproxy};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::ExposeSecret;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres_rustls::MakeRustlsConnect;

const ROLE: &str = "hx_client";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client reaches the cluster through the load balancer.
#[derive(Clone)]
struct Client {
    host: String,
    password: String,
    tls: rustls::ClientConfig,
}

impl Client {
    fn config(&self, port: u16, read_write: bool) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(port)
            .user(ROLE)
            .password(&self.password)
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .connect_timeout(Duration::from_millis(500))
            .application_name("pgkeep-haproxy-test");
        if read_write {
            c.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        c
    }

    async fn connect(&self, port: u16, read_write: bool) -> Option<tokio_postgres::Client> {
        let tls = MakeRustlsConnect::new(self.tls.clone());
        let cfg = self.config(port, read_write);
        let (client, conn) = tokio::time::timeout(Duration::from_secs(2), cfg.connect(tls))
            .await
            .ok()?
            .ok()?;
        tokio::spawn(conn);
        Some(client)
    }

    /// One new session through `port`: (in recovery, the server's PostgreSQL port).
    fn probe(&self, port: u16) -> Result<(bool, u16), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = self
                .connect(port, false)
                .await
                .ok_or("no session through HAProxy")?;
            let row = c
                .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                .await
                .map_err(|e| e.to_string())?;
            let port: i32 = row.get(1);
            Ok((row.get(0), u16::try_from(port).unwrap_or(0)))
        })
    }
}

/// A running cluster behind a running HAProxy.
struct Bed {
    c: AgentCluster,
    lb: Haproxy,
    client: Client,
    _etcd: EtcdCluster,
    env: Env,
}

impl Bed {
    fn name(&self, i: usize) -> &str {
        &self.c.agents[i].node.name
    }

    fn others(&self, p: usize) -> Vec<usize> {
        (0..self.c.agents.len()).filter(|i| *i != p).collect()
    }

    fn port_owner(&self, port: u16) -> Option<usize> {
        self.c.agents.iter().position(|a| a.pg_port == port)
    }
}

fn bed(name: &str) -> Bed {
    let env = Env::new(name).unwrap();
    let etcd = EtcdCluster::start(&env, 1).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("pgkeep");
    let mut c = AgentCluster::prepare(&env, &etcd, name, 3, &bin).unwrap();
    let mut lb = Haproxy::prepare(&env, &c).unwrap();
    c.start_all().unwrap();
    c.wait("a primary", Duration::from_secs(60), |c| {
        c.primary().is_some()
    })
    .unwrap();
    let p = c.primary().unwrap();
    c.wait("two streaming replicas", Duration::from_secs(90), |c| {
        c.replicas_streaming(p)
    })
    .unwrap();
    let password = format!("hx-{:x}", std::process::id());
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let out = c
        .psql(
            p,
            &format!(
                "CREATE ROLE {ROLE} LOGIN PASSWORD '{verifier}'; \
                 CREATE TABLE hx_log(seq bigint PRIMARY KEY); GRANT SELECT, INSERT ON hx_log TO {ROLE}"
            ),
        )
        .unwrap();
    assert!(out.success(), "{}", out.stderr);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env.ca_cert_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = Client {
        host: lb.dns_name().to_owned(),
        password,
        tls,
    };
    lb.start().unwrap();
    let b = Bed {
        c,
        lb,
        client,
        _etcd: etcd,
        env,
    };
    let replicas: Vec<&str> = b.others(p).into_iter().map(|i| b.name(i)).collect();
    b.lb.wait_routing(&[b.name(p)], &replicas, Duration::from_secs(30))
        .unwrap();
    b
}

/// One write: start and end since the writer started, and the acknowledging server's port.
type WriteRecord = (Duration, Duration, Result<u16, ()>);

/// Writes through the write port (one INSERT every 20 ms, reconnecting after any error).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<WriteRecord>>,
    t0: Instant,
}

impl Writer {
    fn start(client: &Client, port: u16) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let (client, flag) = (client.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut records = Vec::new();
                let mut session = None;
                let mut seq = 0i64;
                while !flag.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(300) {
                    seq += 1;
                    let start = t0.elapsed();
                    if session
                        .as_ref()
                        .is_none_or(tokio_postgres::Client::is_closed)
                    {
                        session = client.connect(port, true).await;
                    }
                    let result = match &session {
                        None => Err(()),
                        Some(s) => {
                            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&seq];
                            let q = s.query_one(
                                "INSERT INTO hx_log VALUES ($1) RETURNING inet_server_port()",
                                &params,
                            );
                            match tokio::time::timeout(Duration::from_secs(5), q).await {
                                Ok(Ok(row)) => Ok(u16::try_from(row.get::<_, i32>(0)).unwrap_or(0)),
                                _ => {
                                    session = None;
                                    Err(())
                                }
                            }
                        }
                    };
                    records.push((start, t0.elapsed(), result));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                records
            })
        });
        Writer { stop, handle, t0 }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn stop(self) -> Vec<WriteRecord> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

#[test]
fn haproxy_read_port_reaches_only_replicas_and_write_port_follows_a_failover() {
    let b = bed("hxfail");
    let p = b.c.primary().unwrap();
    let replicas = b.others(p);
    let (w, r) = (b.lb.write_port, b.lb.read_port);

    // (c) The read port reaches replicas only, both of them; the write port the primary.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (recovery, port) = b.client.probe(r).unwrap();
        let owner = b.port_owner(port);
        assert!(recovery, "read port reached a primary (port {port})");
        assert!(
            owner.is_some_and(|o| replicas.contains(&o)),
            "read port reached {owner:?}, not a replica"
        );
        seen.extend(owner);
    }
    assert_eq!(seen.len(), 2, "reads should spread over both replicas");
    for _ in 0..5 {
        assert_eq!(
            b.client.probe(w).unwrap(),
            (false, b.c.agents[p].pg_port),
            "write port"
        );
    }
    let primary_in_read = b.lb.server(READ_BACKEND, b.name(p)).unwrap();
    assert_eq!(primary_in_read.status, "DOWN", "{primary_in_read:?}");
    assert_eq!(primary_in_read.sessions, 0);

    // A reload (as for a certificate rotation) keeps the states: no replica is ever UP for
    // writes afterwards, even for the moment a new HAProxy would start every server UP.
    let stats_before = b.lb.stats().unwrap();
    b.lb.reload().unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let up = b.lb.routable(WRITE_BACKEND).unwrap_or_default();
        assert!(
            up.is_empty() || up == [b.name(p)],
            "after a reload the write backend routes to {up:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats_after = b.lb.stats().unwrap();
    assert!(
        stats_after.iter().map(|s| s.sessions).sum::<u64>()
            < stats_before.iter().map(|s| s.sessions).sum::<u64>(),
        "the reload did not replace the worker (session counters kept)"
    );
    assert!(
        !b.client.probe(w).unwrap().0,
        "the write port after the reload"
    );

    // (a) Writes through the write port; the primary's host is lost; writes succeed again
    // through the same port, on the new primary.
    let writer = Writer::start(&b.client, w);
    std::thread::sleep(Duration::from_secs(2));
    b.c.kill_host(p).unwrap();
    let t_kill = writer.now();
    b.c.wait("a new primary", Duration::from_secs(45), |c| {
        c.primary().is_some_and(|n| n != p)
    })
    .unwrap();
    let t_promoted = writer.now();
    let np = b.c.primary().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && b.lb.routable(WRITE_BACKEND).unwrap() != [b.name(np)] {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t_routed = writer.now();
    std::thread::sleep(Duration::from_secs(2));
    let records = writer.stop();
    let new_port = b.c.agents[np].pg_port;
    let before = records
        .iter()
        .filter(|(_, end, res)| *end <= t_kill && res.is_ok())
        .count();
    let first_after = records
        .iter()
        .find(|(start, _, res)| *start > t_kill && res.is_ok())
        .map(|(_, end, res)| (*end, *res));
    let last_old = records
        .iter()
        .filter(|(_, _, res)| *res == Ok(b.c.agents[p].pg_port))
        .map(|(_, end, _)| *end)
        .max();
    let gap = first_after.map(|(end, _)| end - t_kill);
    println!(
        "haproxy failover: acked before the kill {before}; kill -> new primary seen {:.2?}; \
         kill -> only the new primary UP in {WRITE_BACKEND} {:.2?}; kill -> first write \
         acknowledged through the write port {gap:.2?} (HAProxy inter 1s, fastinter 250ms, \
         downinter 100ms, rise 1, fall 2; ttl 10, loop_wait 1)",
        t_promoted - t_kill,
        t_routed - t_kill
    );
    assert!(before > 10, "the writer did not write before the kill");
    let (end, port) = first_after.expect("no write succeeded through HAProxy after the kill");
    assert_eq!(port, Ok(new_port), "the first write after the kill");
    assert!(
        end - t_kill < Duration::from_secs(26),
        "writes resumed {:?} after the kill",
        end - t_kill
    );
    assert!(
        last_old.is_none_or(|t| t <= t_kill + Duration::from_millis(100)),
        "the dead primary acknowledged a write at {last_old:?} (kill at {t_kill:?})"
    );
    // Every acknowledged write after the kill came from the new primary, which holds them all.
    assert!(
        records
            .iter()
            .filter(|(start, _, res)| *start > t_kill && res.is_ok())
            .all(|(_, _, res)| *res == Ok(new_port))
    );
    let out = b.c.psql(np, "SELECT count(*) FROM hx_log").unwrap();
    let rows: usize = out.stdout.trim().parse().unwrap();
    let acked = records.iter().filter(|(_, _, r)| r.is_ok()).count();
    assert!(
        rows >= acked,
        "{acked} acknowledged, {rows} on the new primary"
    );
    drop(b.env);
}

/// A TLS server on a node's REST API port that answers 200 to every request, and a plain TCP
/// listener on its PostgreSQL port that counts connections: a node HAProxy must not trust.
struct Impostor {
    config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    pg_connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn server_config(issued: &Issued) -> Arc<rustls::ServerConfig> {
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.expose_secret().as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert_der().clone()], key)
            .unwrap(),
    )
}

fn serve_one(mut tcp: std::net::TcpStream, cfg: Arc<rustls::ServerConfig>, requests: &AtomicUsize) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(mut conn) = rustls::ServerConnection::new(cfg) else {
        return;
    };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let _ = tls.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
          Connection: close\r\n\r\n{}",
    );
    let _ = tls.flush();
}

impl Impostor {
    fn start(api: SocketAddr, pg: SocketAddr, cfg: Arc<rustls::ServerConfig>) -> Impostor {
        let mut imp = Impostor {
            config: Arc::new(Mutex::new(cfg)),
            handshakes: Arc::default(),
            requests: Arc::default(),
            pg_connections: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        for (addr, tls) in [(api, true), (pg, false)] {
            let listener = TcpListener::bind(addr).unwrap();
            listener.set_nonblocking(true).unwrap();
            let (config, hs, rq, pgc, stop) = (
                imp.config.clone(),
                imp.handshakes.clone(),
                imp.requests.clone(),
                imp.pg_connections.clone(),
                imp.stop.clone(),
            );
            imp.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((tcp, _)) if tls => {
                            let _ = tcp.set_nonblocking(false);
                            hs.fetch_add(1, Ordering::SeqCst);
                            let cfg = config.lock().unwrap().clone();
                            serve_one(tcp, cfg, &rq);
                        }
                        Ok(_) => {
                            pgc.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        imp
    }

    fn set_certificate(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.config.lock().unwrap() = cfg;
    }

    fn counts(&self) -> (usize, usize, usize) {
        (
            self.handshakes.load(Ordering::SeqCst),
            self.requests.load(Ordering::SeqCst),
            self.pg_connections.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn haproxy_marks_an_impostor_rest_api_down_and_sends_it_no_traffic() {
    let b = bed("hximp");
    let p = b.c.primary().unwrap();
    let others = b.others(p);
    let (x, y) = (others[0], others[1]);
    let w = b.lb.write_port;
    let node = &b.c.agents[x].node;
    let name = |i: usize| b.name(i).to_owned();

    // Node x is lost; an impostor takes its address: it answers 200 to /primary and /replica.
    b.c.kill_host(x).unwrap();
    b.lb.wait_routing(&[b.name(p)], &[b.name(y)], Duration::from_secs(10))
        .unwrap();
    let api = SocketAddr::new(node.addr.into(), b.c.agents[x].api_port);
    let pg = SocketAddr::new(node.addr.into(), b.c.agents[x].pg_port);
    let issue = |ca: &Ca, dns: &str| {
        ca.issue(&CertRequest {
            common_name: format!("restapi-{}", node.name),
            usage: Usage::Server,
            dns_names: vec![dns.to_owned()],
            ip_addresses: vec![node.addr.into()],
            validity_days: 1,
        })
        .unwrap()
    };
    let other_ca = Ca::create("impostor CA", 2).unwrap();
    let wrong_name = format!("impostor.{}", node.dns_name);
    let phases = [
        (
            "another CA, the node's name",
            server_config(&issue(&other_ca, &node.dns_name)),
        ),
        (
            "the cluster CA, another name",
            server_config(&issue(b.env.ca(), &wrong_name)),
        ),
    ];
    let imp = Impostor::start(api, pg, phases[0].1.clone());
    for (what, cfg) in &phases {
        imp.set_certificate(cfg.clone());
        let (hs0, rq0, pg0) = imp.counts();
        let sessions0: Vec<u64> = [WRITE_BACKEND, READ_BACKEND]
            .iter()
            .map(|be| b.lb.server(be, &name(x)).unwrap().sessions)
            .collect();
        // Several checks' worth (downinter 100ms in pg_write, 1s in pg_read) while clients
        // keep connecting through the write port.
        let t0 = Instant::now();
        let mut probes = 0;
        while t0.elapsed() < Duration::from_secs(4) {
            assert_eq!(
                b.client.probe(w).unwrap(),
                (false, b.c.agents[p].pg_port),
                "{what}: a write session landed elsewhere"
            );
            assert_eq!(b.lb.routable(WRITE_BACKEND).unwrap(), [name(p)], "{what}");
            assert_eq!(b.lb.routable(READ_BACKEND).unwrap(), [name(y)], "{what}");
            probes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let (hs, rq, pgc) = imp.counts();
        let st = b.lb.server(WRITE_BACKEND, &name(x)).unwrap();
        println!(
            "impostor ({what}): {} TLS checks refused, {} HTTP requests answered, {} client \
             sessions received; {WRITE_BACKEND}/{}: {} {} ({}); {probes} sessions through the \
             write port all on the primary",
            hs - hs0,
            rq - rq0,
            pgc - pg0,
            name(x),
            st.status,
            st.check_status,
            st.last_check
        );
        assert!(hs - hs0 >= 8, "{what}: HAProxy did not check the impostor");
        assert_eq!(
            rq - rq0,
            0,
            "{what}: HAProxy sent a check request to the impostor"
        );
        assert_eq!(
            pgc - pg0,
            0,
            "{what}: a client session reached the impostor"
        );
        assert_eq!(st.status, "DOWN", "{what}: {st:?}");
        assert!(st.check_status.starts_with("L6"), "{what}: {st:?}");
        for (be, before) in [WRITE_BACKEND, READ_BACKEND].iter().zip(sessions0) {
            assert_eq!(
                b.lb.server(be, &name(x)).unwrap().sessions,
                before,
                "{what}: {be}"
            );
        }
    }

    // Control: the same impostor with a certificate the cluster CA issued for the node's name
    // is believed at once (UP for writes, and then receives client sessions) — what the two
    // phases above showed is the certificate check, not a broken fake.
    let good = server_config(&issue(b.env.ca(), &node.dns_name));
    imp.set_certificate(good);
    b.lb.wait_routing(
        &[b.name(p), b.name(x)],
        &[b.name(x), b.name(y)],
        Duration::from_secs(10),
    )
    .unwrap();
    let t0 = Instant::now();
    while imp.counts().2 == 0 && t0.elapsed() < Duration::from_secs(10) {
        let _ = b.client.probe(w);
    }
    let (_, rq, pgc) = imp.counts();
    println!("control (cluster CA, the node's name): {rq} checks answered, UP, {pgc} sessions");
    assert!(rq > 0 && pgc > 0, "the control impostor got no traffic");
    drop(imp);
    drop(b.env);
}

/// `pgkeep render haproxy --inventory` prints a configuration Debian's HAProxy accepts
/// (`haproxy -c`), with every check verified.
#[test]
fn haproxy_render_from_an_inventory_is_valid_for_debian_haproxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create("render test CA", 2).unwrap();
    let ca_file = dir.path().join("ca.crt");
    ca.write_cert(&ca_file).unwrap();
    let inv = dir.path().join("inventory.yml");
    std::fs::write(
        &inv,
        "cluster: demo\ndomain: demo.example\ndatabase_hosts:\n\
         - {name: db1, address: 10.1.0.11, pg_port: 25433, api_port: 28443}\n\
         - {name: db2, address: 10.1.0.12, pg_port: 25433, api_port: 28443}\n\
         etcd_hosts:\n- {name: etcd1, address: 10.1.0.21, client_port: 22379, peer_port: 22380}\n\
         load_balancer: {name: lb, address: 10.1.0.41, write_port: 25100, read_port: 25101}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .args(["render", "haproxy", "--inventory"])
        .arg(&inv)
        .arg("--ca-file")
        .arg(&ca_file)
        .args(["--no-client-cert", "--replica-lag", "1MB", "--stats-socket"])
        .arg(dir.path().join("admin.sock"))
        .arg("--state-file")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("option httpchk GET /replica?lag=1048576"),
        "{text}"
    );
    assert!(text.contains("bind 10.1.0.41:25100") && text.contains("bind 10.1.0.41:25101"));
    assert!(
        text.contains(
            "server db2 10.1.0.12:25433 check port 28443 check-ssl verify required ca-file"
        )
    );
    assert!(text.contains("verifyhost db2.demo.example check-sni db2.demo.example"));
    assert!(!text.contains("verify none") && !text.contains(" crt "));
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, &text).unwrap();
    std::fs::write(dir.path().join("state"), "1\n").unwrap();
    let check = std::process::Command::new("/usr/sbin/haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Neither inventory nor directory: a usage error.
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .args(["render", "haproxy"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
}
