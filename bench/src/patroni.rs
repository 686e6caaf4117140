//! The Patroni side, set up as in the reference lab (`../shared/patroni-lab/up.sh`): Debian's
//! Patroni 3.0.2 with PostgreSQL 15, REST API over TLS with basic auth on unsafe endpoints,
//! `ssl=on` with `hostssl … scram-sha-256` only, replication and superuser connections with
//! `sslmode=verify-full`, checksums, `use_pg_rewind` and `use_slots`. It talks to the same etcd
//! cluster as pgkeep (client certificate from the same CA), under its own scope `patroni`.
//! Not carried over from the lab: pgBackRest archiving, pgaudit and HAProxy (not part of a
//! failover or switchover measured with a direct multi-host client).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::client::{self, Host, Target};
use crate::cluster::{Cluster, Member, Side, Timings};
use crate::etcd::Etcd;
use crate::pgkeep::Shared;
use crate::rest::Rest;
use crate::sys::{self, Cgroups, Cmd, PG_BIN, User};

/// Patroni's scope (etcd prefix `/service/patroni/`).
pub const SCOPE: &str = "patroni";

/// Ports of one Patroni node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// PostgreSQL.
    pub pg: u16,
    /// REST API.
    pub rest: u16,
}

/// Node `i` (1-based)'s ports from `base`: PostgreSQL base+432+i, REST base+8+i.
pub fn ports(base: u16, i: u16) -> Ports {
    Ports {
        pg: base + 432 + i,
        rest: base + 8 + i,
    }
}

/// Issues `<dir>/<name>.crt/.key` (EC P-256, SAN localhost + 127.0.0.1, server and client
/// usage) from the shared CA with openssl, the key owned by `owner`. An empty `cn` gives a
/// subject without a common name (`O=pgkeep-bench`): etcd's JSON gateway refuses a client
/// certificate with one once authentication is on.
pub async fn issue(dir: &Path, name: &str, cn: &str, shared: &Shared, owner: &User) -> Result<()> {
    let subject = if cn.is_empty() {
        "/O=pgkeep-bench".to_owned()
    } else {
        format!("/CN={cn}")
    };
    let p = |ext: &str| {
        dir.join(format!("{name}.{ext}"))
            .to_string_lossy()
            .into_owned()
    };
    Cmd::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p("key"),
        ])
        .output()
        .await?;
    Cmd::new("openssl")
        .args([
            "req",
            "-new",
            "-key",
            &p("key"),
            "-subj",
            &subject,
            "-out",
            &p("csr"),
        ])
        .output()
        .await?;
    sys::write_file(
        Path::new(&p("ext")),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        0o600,
        None,
    )?;
    let serial = format!("0x{}", sys::random_hex(12)?);
    Cmd::new("openssl")
        .args(["x509", "-req", "-in", &p("csr"), "-CA"])
        .args([
            shared.ca.to_string_lossy(),
            "-CAkey".into(),
            shared.ca_key.to_string_lossy(),
        ])
        .args([
            "-set_serial",
            &serial,
            "-days",
            "7",
            "-sha256",
            "-extfile",
            &p("ext"),
            "-out",
            &p("crt"),
        ])
        .output()
        .await?;
    std::fs::remove_file(p("csr"))?;
    std::fs::remove_file(p("ext"))?;
    owner.chown(Path::new(&p("key")))?;
    owner.chown(Path::new(&p("crt")))?;
    Ok(())
}

/// Secrets of the Patroni side.
struct Secrets {
    superuser: String,
    replication: String,
    rewind: String,
    rest: String,
    app: String,
    etcd: String,
}

fn yml(
    dir: &Path,
    tls: &Path,
    name: &str,
    p: Ports,
    etcd_hosts: &[String],
    t: Timings,
    s: &Secrets,
) -> String {
    let d = dir.join(name);
    let (d, tls) = (d.display(), tls.display());
    let hosts = etcd_hosts.join(", ");
    let auth = |user: &str, pw: &str| {
        format!(
            "{{username: {user}, password: '{pw}', sslmode: verify-full, sslrootcert: {tls}/ca.crt}}"
        )
    };
    format!(
        r#"# written by pgkeep-bench
scope: {SCOPE}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
  certfile: {tls}/rest.crt
  keyfile: {tls}/rest.key
  cafile: {tls}/ca.crt
  authentication: {{username: patroni, password: '{rpw}'}}
ctl:
  insecure: false
  cacert: {tls}/ca.crt
  certfile: {tls}/rest.crt
  keyfile: {tls}/rest.key
etcd3:
  hosts: [{hosts}]
  protocol: https
  cacert: {tls}/ca.crt
  cert: {tls}/etcd.crt
  key: {tls}/etcd.key
  username: {etcd_user}
  password: '{etcd_pw}'
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {lw}
    retry_timeout: {rt}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters: {{wal_level: replica, hot_standby: 'on', wal_log_hints: 'on', max_wal_senders: 10, max_replication_slots: 10, wal_keep_size: 256MB}}
  initdb: [{{encoding: UTF8}}, {{locale: C.UTF-8}}, data-checksums, {{auth-local: peer}}, {{auth-host: scram-sha-256}}]
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {d}/data
  bin_dir: {PG_BIN}
  pgpass: {d}/pgpass
  use_unix_socket: true
  authentication:
    superuser: {su}
    replication: {repl}
    rewind: {rew}
  parameters:
    unix_socket_directories: {d}/run
    ssl: 'on'
    ssl_cert_file: {tls}/pg.crt
    ssl_key_file: {tls}/pg.key
    ssl_ca_file: {tls}/ca.crt
    ssl_min_protocol_version: TLSv1.2
    password_encryption: scram-sha-256
  pg_hba:
  - local all postgres peer
  - local all all scram-sha-256
  - hostssl replication replicator 127.0.0.1/32 scram-sha-256
  - hostssl all all 127.0.0.1/32 scram-sha-256
  - hostnossl all all 0.0.0.0/0 reject
  - hostnossl all all ::/0 reject
  basebackup: [{{checkpoint: fast}}]
tags: {{nofailover: false, noloadbalance: false, clonefrom: false, nosync: false}}
"#,
        rest = p.rest,
        rpw = s.rest,
        ttl = t.ttl,
        lw = t.loop_wait,
        rt = t.retry_timeout,
        pg = p.pg,
        su = auth("postgres", &s.superuser),
        repl = auth("replicator", &s.replication),
        rew = auth("rewind_user", &s.rewind),
        etcd_user = crate::pgkeep::PATRONI_ETCD_USER,
        etcd_pw = s.etcd,
    )
}

/// Brings up three Patroni nodes in `dir` (ports from `base`) against the shared etcd with
/// bootstrap timings `t`, waits for health and creates the `app` role and database.
pub async fn up(
    dir: &Path,
    base: u16,
    t: Timings,
    shared: &Shared,
    etcd: &Etcd,
    cg: &Cgroups,
    pg: &User,
) -> Result<Cluster> {
    let names = ["node1", "node2", "node3"];
    for i in 1..=3 {
        let p = ports(base, i);
        sys::check_port_free(p.pg)?;
        sys::check_port_free(p.rest)?;
    }
    sys::mkdir(dir, 0o755, None)?;
    sys::mkdir(&dir.join("log"), 0o755, None)?;
    let tls = dir.join("tls");
    sys::mkdir(&tls, 0o700, Some(pg))?;
    std::fs::copy(&shared.ca, tls.join("ca.crt"))?;
    pg.chown(&tls.join("ca.crt"))?;
    issue(&tls, "rest", "patroni-rest", shared, pg).await?;
    issue(&tls, "pg", "patroni-postgres", shared, pg).await?;
    issue(&tls, "etcd", "", shared, pg).await?;
    let s = Secrets {
        superuser: sys::random_hex(16)?,
        replication: sys::random_hex(16)?,
        rewind: sys::random_hex(16)?,
        rest: sys::random_hex(16)?,
        app: sys::random_hex(16)?,
        etcd: shared.patroni_etcd_password.clone(),
    };
    let etcd_hosts: Vec<String> = shared
        .etcd_endpoints
        .iter()
        .map(|e| e.trim_start_matches("https://").to_owned())
        .collect();
    let mut members = Vec::new();
    let mut hosts = Vec::new();
    for (i, name) in (1u16..).zip(names) {
        let p = ports(base, i);
        let nd = dir.join(name);
        sys::mkdir(&nd, 0o700, Some(pg))?;
        sys::mkdir(&nd.join("run"), 0o700, Some(pg))?;
        sys::mkdir(&nd.join("data"), 0o700, Some(pg))?;
        sys::write_file(
            &nd.join("patroni.yml"),
            &yml(dir, &tls, name, p, &etcd_hosts, t, &s),
            0o600,
            Some(pg),
        )?;
        members.push(Member {
            name: name.into(),
            api: format!("https://127.0.0.1:{}", p.rest),
            data_dir: nd.join("data"),
            cgroup: cg.group(&format!("patroni-{name}"))?,
        });
        hosts.push(Host {
            member: name.into(),
            name: "127.0.0.1".into(),
            addr: "127.0.0.1".parse()?,
            port: p.pg,
        });
    }
    let ca_pem = std::fs::read(&shared.ca)?;
    let tls_connect = client::tls(&ca_pem)?;
    let mut cluster = Cluster {
        label: "Patroni",
        prefix: format!("/service/{SCOPE}/"),
        members,
        rest: Rest::new(&ca_pem, None, "patroni", &s.rest)?,
        etcd: etcd.clone(),
        app: Target {
            hosts: hosts.clone(),
            user: "app".into(),
            password: s.app.clone(),
            dbname: "app".into(),
            tls: tls_connect.clone(),
        },
        side: Side::Patroni {
            dir: dir.to_owned(),
        },
        pg: pg.clone(),
        pids: vec![None; 3],
        sync: false,
    };
    for name in names {
        cluster.start(name).await?;
    }
    cluster.wait_healthy(Duration::from_secs(180)).await?;
    let admin = Target {
        hosts,
        user: "postgres".into(),
        password: s.superuser.clone(),
        dbname: "postgres".into(),
        tls: tls_connect,
    };
    let exists = admin
        .query(
            "SELECT 1 FROM pg_roles WHERE rolname = 'app'",
            Duration::from_secs(30),
        )
        .await?;
    if exists.is_empty() {
        admin
            .query(
                &format!("CREATE ROLE app LOGIN PASSWORD '{}'", s.app),
                Duration::from_secs(10),
            )
            .await?;
        admin
            .query("CREATE DATABASE app OWNER app", Duration::from_secs(30))
            .await?;
    }
    Ok(cluster)
}

/// Stops every Patroni node gracefully (SIGTERM stops its PostgreSQL), by PID; bounded.
pub async fn down(cluster: &mut Cluster) {
    let pids: Vec<u32> = cluster.pids.iter().flatten().copied().collect();
    let mut waits = Vec::new();
    for pid in pids {
        waits.push(tokio::spawn(sys::terminate(pid, Duration::from_secs(40))));
    }
    for w in waits {
        let _ = w.await;
    }
    cluster.pids.iter_mut().for_each(|p| *p = None);
}

/// `patroni --version`.
pub async fn version() -> String {
    Cmd::new("/usr/bin/patroni")
        .args(["--version"])
        .timeout(Duration::from_secs(20))
        .output()
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e:#})"))
}
