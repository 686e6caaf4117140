//! Helpers of the quick-start scenario: named checks, psql, raw HTTP, the cluster as a client sees it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgkeep::api::{ApiClient, ApiResponse};
use pgkeep::inventory::{DbHost, Inventory};
use secrecy::SecretString;
use serde_json::Value;

use crate::local::{Scenario, alive};

pub(super) const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
pub(super) const ETCDCTL: &str = "/usr/bin/etcdctl";
/// What etcd logs when a client offers no certificate.
pub(super) const ETCD_NO_CERT: &str = "client didn't provide a certificate";
/// What an agent logs for a DCS value it cannot parse.
pub(super) const DCS_GARBAGE: &str = "ignoring DCS value that does not parse";
/// Rounds of the repeated agent restart (see `up_after_stop_is_reliable`).
pub(super) const UP_ROUNDS: u32 = 8;

/// Named checks: each one's outcome is printed, failures are collected.
#[derive(Default)]
pub(super) struct Checks {
    pub(super) failed: Vec<String>,
}

impl Checks {
    pub(super) fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        let t = Instant::now();
        eprintln!("==== check: {name}");
        match f() {
            Ok(()) => {
                eprintln!("==== ok    ({:.1}s): {name}", t.elapsed().as_secs_f64());
                true
            }
            Err(e) => {
                eprintln!(
                    "==== FAIL  ({:.1}s): {name}: {e:#}",
                    t.elapsed().as_secs_f64()
                );
                self.failed.push(format!("{name}: {e:#}"));
                false
            }
        }
    }
}

/// Polls `f` every 250 ms until it succeeds or `timeout` has passed (then its last error).
pub(super) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not within {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// `psql CONN -c SQL...` as root with a cleared environment, never prompting, bounded.
pub(super) fn psql(conn: &str, sql: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("/usr/bin/timeout");
    cmd.args(["20", PSQL, conn, "-XAtqw", "-v", "ON_ERROR_STOP=1"]);
    for s in sql {
        cmd.args(["-c", s]);
    }
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .context("running psql")
}

/// The last output line of a successful psql run.
pub(super) fn psql_ok(conn: &str, sql: &[&str]) -> Result<String> {
    let out = psql(conn, sql)?;
    ensure!(
        out.status.success(),
        "psql {conn:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// The error of a psql run that must fail.
pub(super) fn psql_refused(conn: &str) -> Result<String> {
    let out = psql(conn, &["SELECT 'logged in'"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && !stdout.contains("logged in"),
        "psql {conn:?} logged in: {stdout}"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Sends a plaintext HTTP request to `addr` and returns whatever comes back (at most 4 KiB)
/// before the peer closes, resets or stays silent for 3 s.
pub(super) fn plaintext_http(addr: SocketAddr, host: &str) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    let req = format!("GET /primary HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    // The server may close or reset as soon as it sees a byte that is not TLS.
    let _ = s.write_all(req.as_bytes());
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < 4096 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Ok(got)
}

pub(super) fn signal(pid: u32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(i32::try_from(pid)?), sig).with_context(|| format!("{sig} to {pid}"))
}

pub(super) fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// The environment as a client sees it.
pub(super) struct Quick<'a> {
    pub(super) sc: &'a Scenario,
    pub(super) inv: Inventory,
    pub(super) cluster: Value,
    pub(super) ca: PathBuf,
    pub(super) passfile: PathBuf,
    /// Operator: CA, client certificate and basic auth.
    pub(super) operator: ApiClient,
    /// CA only.
    pub(super) anonymous: ApiClient,
    pub(super) rt: tokio::runtime::Runtime,
}

impl Quick<'_> {
    pub(super) fn new(sc: &Scenario) -> Result<Quick<'_>> {
        let inv = sc.inventory()?;
        let cluster: Value =
            serde_json::from_str(&fs::read_to_string(sc.dir.join("cluster.json"))?)?;
        let path = |v: &Value| -> Result<PathBuf> {
            Ok(PathBuf::from(
                v.as_str().with_context(|| format!("cluster.json: {v}"))?,
            ))
        };
        let ca = path(&cluster["ca"])?;
        let passfile = path(&cluster["passfile"])?;
        let ca_pem = fs::read(&ca)?;
        let user = cluster["rest_api"]["username"]
            .as_str()
            .context("rest_api.username")?;
        let password = fs::read_to_string(path(&cluster["rest_api"]["password_file"])?)?;
        let operator = ApiClient::builder(&ca_pem)?
            .identity_files(
                &path(&cluster["operator"]["cert"])?,
                &path(&cluster["operator"]["key"])?,
            )?
            .basic_auth(user, SecretString::from(password.trim().to_owned()))
            .timeout(Duration::from_secs(5))
            .build()?;
        let anonymous = ApiClient::builder(&ca_pem)?
            .timeout(Duration::from_secs(5))
            .build()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Quick {
            sc,
            inv,
            cluster,
            ca,
            passfile,
            operator,
            anonymous,
            rt,
        })
    }

    pub(super) fn host(&self, name: &str) -> &DbHost {
        self.inv
            .database_hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the inventory"))
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.inv
            .database_hosts
            .iter()
            .map(|h| h.name.clone())
            .collect()
    }

    pub(super) fn get(&self, client: &ApiClient, node: &str, path: &str) -> Result<ApiResponse> {
        let url = format!(
            "https://{}:{}{path}",
            self.inv.fqdn(node),
            self.host(node).api_port
        );
        self.rt
            .block_on(client.get(&url))
            .with_context(|| format!("GET {url}"))
    }

    /// `GET /patroni` as the operator, as JSON.
    pub(super) fn status(&self, node: &str) -> Result<Value> {
        let r = self.get(&self.operator, node, "/patroni")?;
        ensure!(r.status == 200, "GET /patroni on {node}: {}", r.status);
        Ok(r.json()?)
    }

    /// A libpq string for `node`'s address and port, verifying the server as `host_name`.
    pub(super) fn libpq(&self, node: &str, host_name: &str, user: &str, sslmode: &str) -> String {
        let h = self.host(node);
        let db = if user == "app" { "app" } else { "postgres" };
        format!(
            "host={host_name} hostaddr={} port={} dbname={db} user={user} sslmode={sslmode} \
             sslrootcert={} passfile={} connect_timeout=5",
            h.address,
            h.pg_port,
            self.ca.display(),
            self.passfile.display()
        )
    }

    /// `app` on `node`, verify-full against the node's own name.
    pub(super) fn app_on(&self, node: &str) -> String {
        self.libpq(node, &self.inv.fqdn(node), "app", "verify-full")
    }

    pub(super) fn agent_log(&self, node: &str) -> PathBuf {
        self.sc.dir.join("logs").join(format!("{node}-agent.log"))
    }

    pub(super) fn log_len(&self, node: &str) -> u64 {
        fs::metadata(self.agent_log(node)).map_or(0, |m| m.len())
    }

    /// What `node`'s agent logged after byte `offset`.
    pub(super) fn log_since(&self, node: &str, offset: u64) -> String {
        let all = fs::read(self.agent_log(node)).unwrap_or_default();
        let from = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    /// Every agent's recorded PID, checked to be that node's live agent.
    pub(super) fn agent_pids(&self) -> Result<BTreeMap<String, u32>> {
        let mut pids = BTreeMap::new();
        for n in self.names() {
            let pid = self.sc.pid(&format!("{n}-agent"))?;
            let cmd = cmdline(pid);
            ensure!(
                alive(pid) && cmd.contains(" agent ") && cmd.contains(&format!("/{n}/node.yml")),
                "the recorded agent pid {pid} of {n} is not its live agent: {cmd:?}"
            );
            pids.insert(n, pid);
        }
        Ok(pids)
    }

    pub(super) fn data_dir(&self, node: &str) -> Result<PathBuf> {
        let m = self.cluster["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == node))
            .with_context(|| format!("cluster.json has no member {node}"))?;
        Ok(PathBuf::from(
            m["data_dir"].as_str().context("members[].data_dir")?,
        ))
    }

    /// The PID of `node`'s live postmaster (first line of `postmaster.pid`).
    pub(super) fn postmaster(&self, node: &str) -> Result<u32> {
        let f = self.data_dir(node)?.join("postmaster.pid");
        let pid: u32 = fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .parse()
            .with_context(|| format!("{} has no PID", f.display()))?;
        ensure!(
            alive(pid) && cmdline(pid).contains("postgres"),
            "{node}: postmaster pid {pid} is not a live postgres"
        );
        Ok(pid)
    }

    /// `etcdctl` (API 3) against all three members, with the operator's client certificate or
    /// with the CA only.
    pub(super) fn etcdctl(&self, with_cert: bool, args: &[&str]) -> Result<Output> {
        let e = &self.cluster["etcd"];
        let endpoints: Vec<&str> = e["endpoints"]
            .as_array()
            .context("etcd.endpoints")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut cmd = Command::new("/usr/bin/timeout");
        cmd.args(["20", ETCDCTL])
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--cacert={}", self.ca.display()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"]);
        if with_cert {
            cmd.arg(format!(
                "--cert={}",
                e["cert"].as_str().context("etcd.cert")?
            ))
            .arg(format!("--key={}", e["key"].as_str().context("etcd.key")?));
        }
        let out = cmd
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("ETCDCTL_API", "3")
            .output()
            .context("running etcdctl")?;
        eprintln!(
            "$ etcdctl{} {}\n{}{}",
            if with_cert {
                " (operator cert)"
            } else {
                " (no client cert)"
            },
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// How often the etcd members logged a TLS client without a certificate.
    pub(super) fn etcd_no_cert_refusals(&self) -> usize {
        self.inv
            .etcd_hosts
            .iter()
            .map(|m| {
                fs::read_to_string(self.sc.dir.join("logs").join(format!("{}.log", m.name)))
                    .unwrap_or_default()
                    .matches(ETCD_NO_CERT)
                    .count()
            })
            .sum()
    }

    /// `up` again; it must succeed and start exactly `node`'s agent, finding the three etcd
    /// members, the other two agents, the four pgBackRest servers and the backup scheduler
    /// running.
    pub(super) fn up_starts_only(&self, node: &str) -> Result<()> {
        let out = self.sc.up(&[])?;
        let started: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(" started (pid "))
            .collect();
        ensure!(
            started.len() == 1 && started[0].trim_start().starts_with(&format!("{node} ")),
            "up started {started:?}, not just {node}'s agent:\n{out}"
        );
        ensure!(
            out.matches("already running").count() == 10,
            "up did not find the 3 etcd members, the other 2 agents, the 4 pgBackRest \
             servers and the backup scheduler running:\n{out}"
        );
        Ok(())
    }

    /// `node`'s agent is a new live process; every other agent is the one of `before`.
    pub(super) fn only_restarted(&self, node: &str, before: &BTreeMap<String, u32>) -> Result<()> {
        let after = self.agent_pids()?;
        for (n, pid) in before {
            if n == node {
                ensure!(after[n] != *pid, "{n}'s agent pid did not change ({pid})");
            } else {
                ensure!(
                    after[n] == *pid,
                    "{n}'s agent was restarted too: {pid} -> {}",
                    after[n]
                );
            }
        }
        Ok(())
    }

    /// Stops `node`'s agent with SIGTERM and waits until it and `postmaster` (if given) exit.
    pub(super) fn stop_agent(&self, node: &str, postmaster: Option<u32>) -> Result<()> {
        let pid = self.agent_pids()?[node];
        signal(pid, Signal::SIGTERM)?;
        wait_for(
            &format!("{node}'s agent and PostgreSQL stopped"),
            Duration::from_secs(30),
            || {
                let pm = postmaster.is_some_and(alive);
                ensure!(
                    !alive(pid) && !pm,
                    "agent {pid} alive: {}, postmaster {postmaster:?} alive: {pm}",
                    alive(pid)
                );
                Ok(())
            },
        )
    }
}
