//! A 3-node cluster under test, whichever product runs it: its members, REST API, etcd prefix,
//! application connection, and the operations every trial needs (health, kill a host, bring
//! it back, dynamic timings).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::Target;
use crate::etcd::Etcd;
use crate::rest::Rest;
use crate::sys::{self, Cmd, User, now};

/// ttl / loop_wait / retry_timeout, the dynamic timings both products share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Leader lease TTL (s).
    pub ttl: u32,
    /// HA loop period (s).
    pub loop_wait: u32,
    /// DCS and PostgreSQL retry budget (s).
    pub retry_timeout: u32,
}

impl Timings {
    /// The lab's aggressive timings.
    pub const AGGRESSIVE: Timings = Timings {
        ttl: 10,
        loop_wait: 2,
        retry_timeout: 4,
    };
    /// Patroni's defaults.
    pub const DEFAULT: Timings = Timings {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 10,
    };

    /// `aggressive`, `default` or `TTL/LOOP_WAIT/RETRY_TIMEOUT`.
    pub fn parse(s: &str) -> Result<Timings> {
        match s {
            "aggressive" => Ok(Timings::AGGRESSIVE),
            "default" => Ok(Timings::DEFAULT),
            other => {
                let v: Vec<u32> = other
                    .split('/')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| {
                        format!(
                            "timings {other:?}: aggressive, default or TTL/LOOP_WAIT/RETRY_TIMEOUT"
                        )
                    })?;
                let [ttl, loop_wait, retry_timeout] = v[..] else {
                    bail!("timings {other:?}: three numbers TTL/LOOP_WAIT/RETRY_TIMEOUT");
                };
                if loop_wait + 2 * retry_timeout > ttl || loop_wait == 0 {
                    bail!("timings {other:?}: loop_wait + 2*retry_timeout must not exceed ttl");
                }
                Ok(Timings {
                    ttl,
                    loop_wait,
                    retry_timeout,
                })
            }
        }
    }

    /// `ttl=10 loop_wait=2 retry_timeout=4`.
    pub fn text(&self) -> String {
        format!(
            "ttl={} loop_wait={} retry_timeout={}",
            self.ttl, self.loop_wait, self.retry_timeout
        )
    }
}

/// Which product runs the cluster, and what it takes to start one of its nodes.
#[derive(Debug, Clone)]
pub enum Side {
    /// `pgkeep agent -c D/nodes/<n>/node.yml`.
    Pgkeep {
        /// The pgkeep binary the agents run.
        bin: PathBuf,
        /// The environment directory `D`.
        dir: PathBuf,
    },
    /// `patroni <dir>/<n>/patroni.yml`.
    Patroni {
        /// The Patroni side's directory.
        dir: PathBuf,
    },
}

/// One member.
#[derive(Debug, Clone)]
pub struct Member {
    /// Member name.
    pub name: String,
    /// REST API base URL.
    pub api: String,
    /// PostgreSQL data directory.
    pub data_dir: PathBuf,
    /// The member's cgroup ("host").
    pub cgroup: PathBuf,
}

/// A cluster under test.
pub struct Cluster {
    /// "pgkeep" or "Patroni".
    pub label: &'static str,
    /// `/service/<scope>/`.
    pub prefix: String,
    /// The members.
    pub members: Vec<Member>,
    /// REST client (with the product's credentials).
    pub rest: Rest,
    /// The shared etcd.
    pub etcd: Etcd,
    /// The application's multi-host connection.
    pub app: Target,
    /// How nodes are started.
    pub side: Side,
    /// The PostgreSQL OS user.
    pub pg: User,
    /// The main PID of each member's agent (pgkeep agent or Patroni), by member index.
    pub pids: Vec<Option<u32>>,
    /// `synchronous_mode: true` is in force: a healthy cluster also has a synchronous standby.
    pub sync: bool,
}

/// What a health check found.
#[derive(Debug, Clone)]
pub struct Health {
    /// The member answering `/primary` with 200.
    pub leader: String,
    /// In synchronous mode: the standby the `/sync` key names and the leader's
    /// `pg_stat_replication` shows with `sync_state = sync`.
    pub sync_standby: Option<String>,
}

/// The `/sync` key: (leader, synchronous standbys).
pub type SyncKey = (String, Vec<String>);

/// Parses the `/sync` key's JSON (`{"leader": "node1", "sync_standby": "node2[,node3]"}`,
/// Patroni's format, which pgkeep writes too).
pub fn parse_sync_key(v: &Value) -> Option<SyncKey> {
    let leader = v["leader"].as_str()?.to_owned();
    let standbys = v["sync_standby"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    Some((leader, standbys))
}

impl Cluster {
    /// The index of member `name`.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.members
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("{}: no member {name}", self.label))
    }

    /// Starts member `name`'s agent in its cgroup.
    pub async fn start(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        let m = self.members[i].clone();
        let pid = match &self.side {
            Side::Pgkeep { bin, dir } => {
                let node = dir.join("nodes").join(name);
                let pid = Cmd::new(bin.to_string_lossy())
                    .args(["agent", "-c"])
                    .args([node.join("node.yml").to_string_lossy()])
                    .user(&self.pg)
                    .env("HOME", node.to_string_lossy())
                    .cwd(&node)
                    .cgroup(&m.cgroup)
                    .spawn(&dir.join("logs").join(format!("{name}-agent.log")))
                    .await?;
                // Where `pgkeep up` / `down` look for it.
                sys::write_file(
                    &dir.join("run").join(format!("{name}-agent.pid")),
                    &format!("{pid}\n"),
                    0o644,
                    None,
                )?;
                pid
            }
            Side::Patroni { dir } => {
                let yml = dir.join(name).join("patroni.yml");
                Cmd::new("/usr/bin/patroni")
                    .args([yml.to_string_lossy()])
                    .user(&self.pg)
                    .cwd(&dir.join(name))
                    .cgroup(&m.cgroup)
                    .spawn(&dir.join("log").join(format!("{name}.log")))
                    .await?
            }
        };
        self.pids[i] = Some(pid);
        Ok(())
    }

    /// The members answering `GET /primary` with 200.
    pub async fn primaries(&self) -> Vec<String> {
        let mut v = Vec::new();
        for m in &self.members {
            if self.rest.status(&format!("{}/primary", m.api)).await == Some(200) {
                v.push(m.name.clone());
            }
        }
        v
    }

    /// The `/sync` key, if present.
    pub async fn sync_key(&self) -> Result<Option<SyncKey>> {
        let v = self.etcd.get_json(&format!("{}sync", self.prefix)).await?;
        Ok(v.as_ref().and_then(parse_sync_key))
    }

    /// Healthy: exactly one member answers `/primary`, and its `/patroni` lists every other
    /// member as a streaming replica (by application_name; a pg_basebackup stream is not one).
    /// In synchronous mode also: the `/sync` key belongs to that leader and names a member
    /// its `/patroni` shows streaming with `sync_state` `sync`.
    pub async fn health(&self) -> std::result::Result<Health, String> {
        let p = self.primaries().await;
        let [leader] = &p[..] else {
            return Err(format!("primaries by REST: {p:?}"));
        };
        let api = &self.members[self.index(leader).map_err(|e| e.to_string())?].api;
        let status = self
            .rest
            .json(&format!("{api}/patroni"))
            .await
            .map_err(|e| format!("{e:#}"))?;
        let streaming_with = |sync_only: bool| -> Vec<&str> {
            status["replication"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|r| r["state"] == "streaming")
                        .filter(|r| !sync_only || r["sync_state"] == "sync")
                        .filter_map(|r| r["application_name"].as_str())
                        .collect()
                })
                .unwrap_or_default()
        };
        let streaming = streaming_with(false);
        let missing: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.name.as_str())
            .filter(|n| n != leader && !streaming.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(format!("leader {leader}; not streaming: {missing:?}"));
        }
        let mut sync_standby = None;
        if self.sync {
            let key = self.sync_key().await.map_err(|e| format!("{e:#}"))?;
            let sync_rep = streaming_with(true);
            let Some((owner, names)) = key.clone().filter(|(owner, _)| owner == leader) else {
                return Err(format!(
                    "leader {leader}; no /sync key of this leader yet ({key:?})"
                ));
            };
            let Some(s) = names.iter().find(|n| sync_rep.contains(&n.as_str())) else {
                return Err(format!(
                    "leader {owner}; /sync names {names:?}, pg_stat_replication sync: {sync_rep:?}"
                ));
            };
            sync_standby = Some(s.clone());
        }
        Ok(Health {
            leader: leader.clone(),
            sync_standby,
        })
    }

    /// Waits for [`Cluster::health`], at most `timeout`.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Health> {
        let t0 = Instant::now();
        loop {
            let dead: Vec<&str> = self
                .members
                .iter()
                .zip(&self.pids)
                .filter(|(_, p)| p.is_some_and(|p| !sys::alive(p)))
                .map(|(m, _)| m.name.as_str())
                .collect();
            if !dead.is_empty() {
                bail!("{}: the agent of {dead:?} exited (see its log)", self.label);
            }
            match self.health().await {
                Ok(h) => return Ok(h),
                Err(why) if t0.elapsed() >= timeout => {
                    bail!("{} not healthy after {timeout:?}: {why}", self.label)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Kills every process of member `name`'s host at once; the time right after the kill.
    pub async fn kill_host(&mut self, name: &str) -> Result<(f64, usize)> {
        let i = self.index(name)?;
        let cg = self.members[i].cgroup.clone();
        let n = sys::cgroup_procs(&cg).len();
        sys::cgroup_kill(&cg)?;
        let t = now();
        self.pids[i] = None;
        if !sys::cgroup_wait_empty(&cg, Duration::from_secs(10)).await {
            bail!(
                "{} {name}: processes left in {} after cgroup.kill",
                self.label,
                cg.display()
            );
        }
        Ok((t, n))
    }

    /// Starts member `name` again and waits for a healthy cluster; if it does not rejoin
    /// within `timeout`, re-clones it ([`Cluster::reclone`]). Says which.
    pub async fn recover(&mut self, name: &str, timeout: Duration) -> Result<&'static str> {
        self.start(name).await?;
        if self.wait_healthy(timeout).await.is_ok() {
            return Ok("rejoined");
        }
        self.reclone(name, timeout).await?;
        Ok("re-cloned")
    }

    /// Kills member `name`'s host, empties its data directory and starts it again, so it is
    /// cloned from the leader; waits for a healthy cluster.
    pub async fn reclone(&mut self, name: &str, timeout: Duration) -> Result<()> {
        eprintln!(
            "  {} {name} did not rejoin within {timeout:?}; re-cloning it",
            self.label
        );
        self.kill_host(name).await?;
        let dir = self.members[self.index(name)?].data_dir.clone();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        self.start(name).await?;
        self.wait_healthy(timeout).await?;
        Ok(())
    }

    /// Sets ttl/loop_wait/retry_timeout and `synchronous_mode` (`sync`) in the `config` key
    /// (both products watch it; `synchronous_mode` is only written when it changes, so an
    /// asynchronous run keeps the bootstrap configuration as it was) and waits until the
    /// leader holds a lease of the new TTL and, with `sync`, the cluster is healthy with a
    /// synchronous standby. Returns the lease's granted TTL.
    pub async fn apply_dynamic(&mut self, t: Timings, sync: bool) -> Result<i64> {
        let key = format!("{}config", self.prefix);
        let mut cfg = self
            .etcd
            .get_json(&key)
            .await?
            .unwrap_or_else(|| Value::Object(Default::default()));
        let old_loop = cfg["loop_wait"].as_u64().unwrap_or(10);
        let want = [
            ("ttl", t.ttl),
            ("loop_wait", t.loop_wait),
            ("retry_timeout", t.retry_timeout),
        ];
        let sync_now = cfg["synchronous_mode"].as_bool().unwrap_or(false);
        if sync_now != sync
            || want
                .iter()
                .any(|(k, v)| cfg[*k].as_u64() != Some(u64::from(*v)))
        {
            for (k, v) in want {
                cfg[k] = Value::from(v);
            }
            if sync_now != sync {
                cfg["synchronous_mode"] = Value::from(sync);
            }
            self.etcd.put_json(&key, &cfg).await?;
        }
        let budget = Duration::from_secs(3 * old_loop.max(u64::from(t.loop_wait)) + 30);
        let deadline = Instant::now() + budget;
        loop {
            if let Some(l) = self.etcd.leader(&self.prefix).await?
                && let Ok((remaining, granted)) = self.etcd.lease_ttl(l.lease).await
                && remaining >= 0
                && granted == i64::from(t.ttl)
            {
                // One more old loop so every member runs with the new loop_wait.
                tokio::time::sleep(Duration::from_secs(old_loop.min(10))).await;
                self.sync = sync;
                if sync {
                    self.wait_healthy(budget).await.with_context(|| {
                        format!(
                            "{}: no synchronous standby after synchronous_mode: true",
                            self.label
                        )
                    })?;
                }
                return Ok(granted);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: the leader's lease does not have ttl {} after the config change",
                    self.label,
                    t.ttl
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The dynamic configuration as stored (for the report).
    pub async fn config_text(&self) -> String {
        match self.etcd.get_json(&format!("{}config", self.prefix)).await {
            Ok(Some(v)) => v.to_string(),
            Ok(None) => "(no config key)".into(),
            Err(e) => format!("({e:#})"),
        }
    }

    /// Creates the benchmark table (as the application role, on the primary).
    pub async fn create_table(&self) -> Result<()> {
        self.app
            .query(crate::client::TABLE_DDL, Duration::from_secs(30))
            .await
            .with_context(|| format!("{}: creating the table", self.label))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sync_keys() {
        assert_eq!(
            parse_sync_key(&json!({"leader": "node1", "sync_standby": "node2"})),
            Some(("node1".into(), vec!["node2".into()]))
        );
        assert_eq!(
            parse_sync_key(&json!({"leader": "n0", "sync_standby": "n1, n2", "quorum": 0})),
            Some(("n0".into(), vec!["n1".into(), "n2".into()]))
        );
        assert_eq!(
            parse_sync_key(&json!({"leader": "n0", "sync_standby": null})),
            Some(("n0".into(), vec![]))
        );
        assert_eq!(parse_sync_key(&json!({"sync_standby": "n1"})), None);
    }
}
