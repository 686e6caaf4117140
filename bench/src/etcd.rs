//! What the harness sees in etcd: the leader key, its lease (to find the leader's keepalives),
//! a recorder of the leader key's events, and the dynamic `config` key.
//!
//! Both products use Patroni's layout, `/<namespace>/<scope>/leader` holding the leader's name
//! and attached to its lease. A keepalive does not change the key (Patroni only refreshes the
//! lease), so a renewal is found by polling the lease's remaining TTL: it only ever rises when
//! the holder renews it. etcd reports whole seconds (truncated), and with `loop_wait` ≥ 1 s a
//! renewal always lifts the value by at least one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, Identity, TlsOptions, WatchOptions,
};
use tokio::task::JoinHandle;

use crate::sys::now;

/// A connection to the shared etcd cluster (mutual TLS).
#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

/// The leader key as read.
#[derive(Debug, Clone)]
pub struct LeaderKey {
    /// The leader's member name.
    pub name: String,
    /// Its lease.
    pub lease: i64,
    /// The key's modification revision.
    pub mod_revision: i64,
}

/// A renewal of the leader's lease, as seen by polling.
#[derive(Debug, Clone, Copy)]
pub struct Renewal {
    /// When the raised TTL was first seen.
    pub seen: f64,
    /// The poll before it (the renewal happened in between).
    pub previous_poll: f64,
    /// Remaining TTL (s) just after the renewal.
    pub remaining: i64,
    /// The lease's granted TTL (s).
    pub granted: i64,
    /// Time since the previous renewal seen in the same wait, if any (the keepalive period).
    pub period: Option<f64>,
}

/// One event of the leader key.
#[derive(Debug, Clone)]
pub struct LeaderEvent {
    /// When the harness received it.
    pub t: f64,
    /// True for a delete (lease expiry or release), false for a put.
    pub deleted: bool,
    /// The value put (member name), empty for deletes.
    pub value: String,
}

/// Records the leader key's events while alive.
pub struct LeaderWatch {
    events: Arc<Mutex<Vec<LeaderEvent>>>,
    task: JoinHandle<()>,
}

impl Drop for LeaderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaderWatch {
    /// The events recorded so far.
    pub fn events(&self) -> Vec<LeaderEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Etcd {
    /// Connects to `endpoints` (`https://name:port`) with the CA and a client certificate.
    pub async fn connect(endpoints: &[String], ca: &Path, cert: &Path, key: &Path) -> Result<Etcd> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(ca)?))
            .identity(Identity::from_pem(read(cert)?, read(key)?));
        let opts = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .context("connecting to etcd")?;
        Ok(Etcd { client })
    }

    /// The leader key under `prefix` (`/service/<scope>/`), if any.
    pub async fn leader(&self, prefix: &str) -> Result<Option<LeaderKey>> {
        let mut c = self.client.clone();
        let resp = bounded(c.get(format!("{prefix}leader"), None))
            .await
            .context("reading the leader key")?;
        Ok(resp.kvs().first().map(|kv| LeaderKey {
            name: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// (remaining, granted) TTL of `lease` in seconds; remaining is -1 once it expired.
    pub async fn lease_ttl(&self, lease: i64) -> Result<(i64, i64)> {
        let mut c = self.client.clone();
        let r = bounded(c.lease_time_to_live(lease, None))
            .await
            .context("lease time-to-live")?;
        Ok((r.ttl(), r.granted_ttl()))
    }

    /// Polls `lease` every `poll` until its remaining TTL rises (a keepalive), at most
    /// `timeout`. With `two`, waits for a second renewal too and reports the period.
    pub async fn wait_renewal(
        &self,
        lease: i64,
        poll: Duration,
        timeout: Duration,
        two: bool,
    ) -> Result<Renewal> {
        let deadline = Instant::now() + timeout;
        let (mut prev, _) = self.lease_ttl(lease).await?;
        let mut prev_t = now();
        let mut first: Option<f64> = None;
        loop {
            tokio::time::sleep(poll).await;
            let (ttl, granted) = self.lease_ttl(lease).await?;
            let t = now();
            if ttl < 0 {
                bail!("the leader's lease expired while waiting for a renewal");
            }
            if ttl > prev {
                if two && first.is_none() {
                    first = Some(t);
                } else {
                    return Ok(Renewal {
                        seen: t,
                        previous_poll: prev_t,
                        remaining: ttl,
                        granted,
                        period: first.map(|f| t - f),
                    });
                }
            }
            prev = ttl;
            prev_t = t;
            if Instant::now() >= deadline {
                bail!("no keepalive of lease {lease:x} seen within {timeout:?}");
            }
        }
    }

    /// Starts recording the events of `prefix` + `leader`.
    pub async fn watch_leader(&self, prefix: &str) -> Result<LeaderWatch> {
        let key = format!("{prefix}leader");
        let mut stream = self
            .client
            .clone()
            .watch(key.clone(), Some(WatchOptions::new()))
            .await
            .context("watching the leader key")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let t = now();
                for ev in resp.events() {
                    let deleted = ev.event_type() == EventType::Delete;
                    let value = ev
                        .kv()
                        .filter(|_| !deleted)
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                        .unwrap_or_default();
                    if let Ok(mut v) = sink.lock() {
                        v.push(LeaderEvent { t, deleted, value });
                    }
                }
            }
        });
        Ok(LeaderWatch { events, task })
    }

    /// The JSON value of `key`, if present.
    pub async fn get_json(&self, key: &str) -> Result<Option<serde_json::Value>> {
        let mut c = self.client.clone();
        let resp = bounded(c.get(key, None)).await.context("etcd get")?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(
                serde_json::from_slice(kv.value()).with_context(|| format!("{key} is not JSON"))?,
            )),
        }
    }

    /// Writes `value` to `key`.
    pub async fn put_json(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        let mut c = self.client.clone();
        bounded(c.put(key, value.to_string(), None))
            .await
            .with_context(|| format!("writing {key}"))?;
        Ok(())
    }
}

/// `f` within 3 s.
async fn bounded<T>(f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(Duration::from_secs(3), f).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("etcd did not answer within 3 s"),
    }
}

/// From the leader key's events after a kill of `old` at `t_kill`: (expiry seen, new leader
/// key seen). Expiry is the first delete, or a put naming another member; the new leader key is
/// the first put naming another member.
pub fn expiry_and_takeover(
    events: &[LeaderEvent],
    old: &str,
    t_kill: f64,
) -> (Option<f64>, Option<f64>) {
    let after = || events.iter().filter(|e| e.t >= t_kill);
    let expiry = after().find(|e| e.deleted || e.value != old).map(|e| e.t);
    let takeover = after().find(|e| !e.deleted && e.value != old).map(|e| e.t);
    (expiry, takeover)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, deleted: bool, value: &str) -> LeaderEvent {
        LeaderEvent {
            t,
            deleted,
            value: value.into(),
        }
    }

    #[test]
    fn expiry_then_takeover() {
        let evs = vec![
            ev(1.0, false, "node1"),
            ev(9.5, true, ""),
            ev(9.6, false, "node2"),
        ];
        assert_eq!(
            expiry_and_takeover(&evs, "node1", 2.0),
            (Some(9.5), Some(9.6))
        );
        // a put by the old leader after the kill (a late write) is neither
        let evs = vec![ev(2.5, false, "node1"), ev(9.6, false, "node3")];
        assert_eq!(
            expiry_and_takeover(&evs, "node1", 2.0),
            (Some(9.6), Some(9.6))
        );
        assert_eq!(expiry_and_takeover(&[], "node1", 2.0), (None, None));
    }
}
