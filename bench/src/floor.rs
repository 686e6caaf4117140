//! The physical floor of a planned switchover, measured in the same run: a plain streaming
//! pair with no HA manager, switched over by hand as `../shared/floors/pgfloor.py` does
//! ("A-idle": an untimed `CHECKPOINT` on both nodes first, then `pg_ctl stop -m fast`, wait
//! until the replica replayed the shutdown checkpoint, `SELECT pg_promote(wait => true)`; the
//! old primary rejoins with `standby.signal`, no pg_rewind). Unlike that script, the pair
//! serves the client over TLS with SCRAM like the products, so the client pays the same
//! reconnect cost everywhere.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_postgres::NoTls;

use crate::client::{self, Host, Target, WriterSettings, simple_rows};
use crate::pgkeep::Shared;
use crate::sys::{self, Cgroups, Cmd, PG_BIN, User, now};

/// The floor pair.
pub struct Floor {
    dir: PathBuf,
    sock: PathBuf,
    ports: [u16; 2],
    pg: User,
    cgroup: PathBuf,
    /// The application's multi-host connection to the pair.
    pub app: Target,
}

/// One manual switchover.
#[derive(Debug, Clone)]
pub struct FloorTrial {
    /// "n1 → n2".
    pub direction: String,
    /// `pg_ctl stop -m fast` (s).
    pub stop: f64,
    /// Until the replica replayed the shutdown checkpoint (s).
    pub replay_wait: f64,
    /// `pg_promote(wait => true)` (s).
    pub promote: f64,
    /// The client's write gap (s).
    pub gap: Option<f64>,
    /// Stop command → first acknowledged write on the new primary (s).
    pub to_first_ack: Option<f64>,
    /// The read-back.
    pub loss: Option<client::Loss>,
}

const NAMES: [&str; 2] = ["n1", "n2"];

impl Floor {
    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(NAMES[i])
    }

    fn pg_cmd(&self, program: &str) -> Cmd {
        Cmd::new(format!("{PG_BIN}/{program}"))
            .user(&self.pg)
            .cwd(&self.dir)
    }

    /// A superuser session over the node's Unix socket (root maps to `postgres` in
    /// pg_ident.conf).
    async fn admin(&self, i: usize) -> Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.sock)
            .port(self.ports[i])
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (c, conn) = cfg
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to {} as postgres", NAMES[i]))?;
        tokio::spawn(conn);
        Ok(c)
    }

    async fn sql(&self, i: usize, q: &str) -> Result<Vec<Vec<String>>> {
        simple_rows(&self.admin(i).await?, q).await
    }

    async fn start(&self, i: usize) -> Result<()> {
        let d = self.data(i);
        self.pg_cmd("pg_ctl")
            .args(["-D", &d.to_string_lossy(), "-l"])
            .args([self.dir.join(format!("{}.log", NAMES[i])).to_string_lossy()])
            .args(["-w", "-t", "60", "start"])
            .cgroup(&self.cgroup)
            .output()
            .await?;
        Ok(())
    }

    fn node_conf(&self, i: usize) -> Result<()> {
        let other = 1 - i;
        let text = format!(
            "port = {}\ncluster_name = '{n}'\nprimary_conninfo = 'host={} port={} user=postgres application_name={n}'\nprimary_slot_name = '{n}'\n",
            self.ports[i],
            self.sock.display(),
            self.ports[other],
            n = NAMES[i],
        );
        sys::write_file(
            &self.data(i).join("node.conf"),
            &text,
            0o600,
            Some(&self.pg),
        )
    }

    /// Sets the pair up in `dir` on ports `ports` and creates the app role and table.
    pub async fn setup(
        dir: &Path,
        ports: [u16; 2],
        shared: &Shared,
        cg: &Cgroups,
        pg: &User,
    ) -> Result<Floor> {
        for p in ports {
            sys::check_port_free(p)?;
        }
        sys::mkdir(dir, 0o755, Some(pg))?;
        let sock = dir.join("sock");
        sys::mkdir(&sock, 0o755, Some(pg))?;
        let tls = dir.join("tls");
        sys::mkdir(&tls, 0o700, Some(pg))?;
        crate::patroni::issue(&tls, "pg", "floor-postgres", shared, pg).await?;
        let app_pw = sys::random_hex(16)?;
        let f = Floor {
            dir: dir.to_owned(),
            sock: sock.clone(),
            ports,
            pg: pg.clone(),
            cgroup: cg.group("floor")?,
            app: Target {
                hosts: (0..2)
                    .map(|i| Host {
                        member: NAMES[i].into(),
                        name: "127.0.0.1".into(),
                        addr: "127.0.0.1".parse().expect("an address"),
                        port: ports[i],
                    })
                    .collect(),
                user: "app".into(),
                password: app_pw.clone(),
                dbname: "app".into(),
                tls: client::tls(&std::fs::read(&shared.ca)?)?,
            },
        };
        let d0 = f.data(0);
        f.pg_cmd("initdb")
            .args([
                "-D",
                &d0.to_string_lossy(),
                "--data-checksums",
                "--auth-local=peer",
            ])
            .args([
                "--auth-host=scram-sha-256",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .await?;
        let conf = format!(
            "\n# pgkeep-bench floor\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{t}/pg.crt'\nssl_key_file = '{t}/pg.key'\n\
             ssl_min_protocol_version = 'TLSv1.2'\npassword_encryption = 'scram-sha-256'\n\
             wal_keep_size = '512MB'\nwal_log_hints = on\ninclude_if_exists = 'node.conf'\n",
            sock.display(),
            t = tls.display()
        );
        let pgconf = d0.join("postgresql.conf");
        let base = std::fs::read_to_string(&pgconf)?;
        sys::write_file(&pgconf, &(base + &conf), 0o600, Some(pg))?;
        sys::write_file(
            &d0.join("pg_hba.conf"),
            "local all postgres peer map=bench\nlocal replication postgres peer map=bench\n\
             hostssl all app 127.0.0.1/32 scram-sha-256\n",
            0o600,
            Some(pg),
        )?;
        sys::write_file(
            &d0.join("pg_ident.conf"),
            "bench postgres postgres\nbench root postgres\n",
            0o600,
            Some(pg),
        )?;
        f.node_conf(0)?;
        f.start(0).await?;
        f.sql(0, "SELECT pg_create_physical_replication_slot('n2', true)")
            .await?;
        f.sql(0, &format!("CREATE ROLE app LOGIN PASSWORD '{app_pw}'"))
            .await?;
        f.sql(0, "CREATE DATABASE app OWNER app").await?;
        let d1 = f.data(1);
        f.pg_cmd("pg_basebackup")
            .args([
                "-h",
                &sock.to_string_lossy(),
                "-p",
                &ports[0].to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-D",
                &d1.to_string_lossy(),
                "-X",
                "stream",
                "-S",
                "n2",
                "-c",
                "fast",
            ])
            .output()
            .await?;
        f.node_conf(1)?;
        sys::write_file(&d1.join("standby.signal"), "", 0o600, Some(pg))?;
        f.start(1).await?;
        f.sql(1, "SELECT pg_create_physical_replication_slot('n1')")
            .await?;
        f.wait_streaming(0, 1, Duration::from_secs(60)).await?;
        f.app
            .query(client::TABLE_DDL, Duration::from_secs(30))
            .await
            .context("floor: creating the table")?;
        Ok(f)
    }

    async fn in_recovery(&self, i: usize) -> Result<bool> {
        Ok(self.sql(i, "SELECT pg_is_in_recovery()").await?[0][0] == "t")
    }

    /// (primary, replica) indexes.
    async fn roles(&self) -> Result<(usize, usize)> {
        match (self.in_recovery(0).await?, self.in_recovery(1).await?) {
            (false, true) => Ok((0, 1)),
            (true, false) => Ok((1, 0)),
            other => bail!("floor: unexpected roles (in recovery) {other:?}"),
        }
    }

    /// Until `r` streams from `p` and has replayed `p`'s current LSN.
    async fn wait_streaming(&self, p: usize, r: usize, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let q = format!(
                "SELECT pg_current_wal_lsn() FROM pg_stat_replication WHERE application_name = '{}' AND state = 'streaming'",
                NAMES[r]
            );
            if let Ok(rows) = self.sql(p, &q).await
                && let Some(lsn) = rows.first().and_then(|r| r.first())
            {
                let q = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
                if self.sql(r, &q).await.is_ok_and(|v| v[0][0] == "t") {
                    return Ok(());
                }
            }
            if t0.elapsed() >= timeout {
                bail!("floor: {} not streaming from {}", NAMES[r], NAMES[p]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One manual switchover with the writer running; the old primary rejoins afterwards.
    pub async fn trial(&self, run: &str, ws: WriterSettings, raw: &Path) -> Result<FloorTrial> {
        let (p, r) = self.roles().await?;
        self.wait_streaming(p, r, Duration::from_secs(60)).await?;
        for i in [p, r] {
            self.sql(i, "CHECKPOINT").await?;
        }
        let writer = client::Writer::start(self.app.clone(), run.to_owned(), ws);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ctl = self.admin(r).await?;
        let dp = self.data(p).to_string_lossy().into_owned();
        let t0 = now();
        let stopped = self
            .pg_cmd("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-D", &dp])
            .output()
            .await;
        let t1 = now();
        let promoted = async {
            stopped?;
            let cd = Cmd::new(format!("{PG_BIN}/pg_controldata"))
                .args(["-D", &dp])
                .output()
                .await?;
            let field = |k: &str| {
                cd.lines().find_map(|l| {
                    l.strip_prefix(k)
                        .map(|v| v.trim_start_matches(':').trim().to_owned())
                })
            };
            if field("Database cluster state").as_deref() != Some("shut down") {
                bail!("floor: old primary not cleanly shut down");
            }
            let ckpt = field("Latest checkpoint location").context("no checkpoint location")?;
            let q = format!("SELECT pg_last_wal_replay_lsn() > '{ckpt}'::pg_lsn");
            let deadline = Instant::now() + Duration::from_secs(60);
            while simple_rows(&ctl, &q).await?[0][0] != "t" {
                if Instant::now() >= deadline {
                    bail!("floor: the replica never replayed the shutdown checkpoint {ckpt}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t2 = now();
            simple_rows(&ctl, "SELECT pg_promote(wait => true)").await?;
            Ok((t2, now()))
        }
        .await;
        let new_port = self.ports[r];
        let deadline = Instant::now() + Duration::from_secs(30);
        while promoted.is_ok()
            && Instant::now() < deadline
            && !writer.acked_after(t0, Some(new_port))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let attempts = writer.stop().await;
        std::fs::write(raw, client::log_text(&attempts))?;
        // Rejoin the old primary as a replica whatever happened.
        sys::write_file(
            &self.data(p).join("standby.signal"),
            "",
            0o600,
            Some(&self.pg),
        )?;
        let rejoin = async {
            self.start(p).await?;
            self.wait_streaming(r, p, Duration::from_secs(60)).await
        }
        .await;
        let (t2, t3) = promoted?;
        rejoin?;
        let gap = client::switch_gap(&attempts, self.ports[p], new_port, t0);
        let first = gap.map(|(_, b)| b - t0);
        let loss = client::check_loss(&self.app, run, &attempts).await.ok();
        Ok(FloorTrial {
            direction: format!("{} → {}", NAMES[p], NAMES[r]),
            stop: t1 - t0,
            replay_wait: t2 - t1,
            promote: t3 - t2,
            gap: gap.map(|(a, b)| b - a),
            to_first_ack: first,
            loss,
        })
    }

    /// Stops both nodes (fast, then immediate), by data directory.
    pub async fn down(&self) {
        for i in 0..2 {
            let d = self.data(i);
            if !d.join("postmaster.pid").exists() {
                continue;
            }
            let ds = d.to_string_lossy().into_owned();
            let fast = self
                .pg_cmd("pg_ctl")
                .args(["stop", "-m", "fast", "-w", "-t", "30", "-D", &ds])
                .timeout(Duration::from_secs(40))
                .output()
                .await;
            if fast.is_err() {
                let _ = self
                    .pg_cmd("pg_ctl")
                    .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D", &ds])
                    .timeout(Duration::from_secs(20))
                    .output()
                    .await;
            }
        }
    }
}
