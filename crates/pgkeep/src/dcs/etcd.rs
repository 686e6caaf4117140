//! [`EtcdDcs`]: the [`Dcs`] trait over etcd v3 (gRPC, mutual TLS), in Patroni's key layout.
//!
//! Every request carries etcd's `hasleader` metadata (`require_leader`): a member that has lost
//! its raft leader refuses requests with "no leader" at once and cancels streams, instead of
//! serving stale data or hanging, so the call is retried on another endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use pgkeep_core::cluster::{
    ClusterStatus, DcsKey, FailoverRequest, HistoryEntry, MemberData, RawEntry, SyncState,
    base_path, history_to_json,
};
use tokio::sync::Mutex;

use super::rpc::{self, Budget};
use super::settings::{EtcdSettings, client_identity, connect_options, endpoints_with};
use super::watch::{self, ClusterWatch};

mod transport;
use super::{Cas, Dcs, DcsError, Expect, KeepaliveReply, Lease, Snapshot};
pub use transport::TlsReload;
use transport::{KeepUpdater, Transport};

/// A keepalive stream kept between calls, so a keepalive costs one round trip.
struct KeepaliveStream {
    lease: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// The etcd v3 implementation of [`Dcs`]. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct EtcdDcs {
    client: Client,
    transport: Arc<Transport>,
    /// `/<namespace>/<scope>` without a trailing slash.
    base: String,
    /// `<base>/`, the prefix every key of the cluster starts with.
    prefix: String,
    budget: Budget,
    keepalive: Arc<Mutex<Option<KeepaliveStream>>>,
}

impl std::fmt::Debug for EtcdDcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDcs")
            .field("base", &self.base)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// The raw entry for a key under `prefix`; `None` for keys outside it or not UTF-8.
pub(crate) fn raw_entry(prefix: &str, kv: &etcd_client::KeyValue) -> Option<RawEntry> {
    let suffix = std::str::from_utf8(kv.key()).ok()?.strip_prefix(prefix)?;
    Some(RawEntry {
        suffix: suffix.to_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

fn header_revision(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

/// The key-value of a `get` in the `or_else` branch of a txn, if the key existed.
fn get_result(resp: &TxnResponse) -> Option<etcd_client::KeyValue> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g.kvs().first().cloned()),
        _ => None,
    })?
}

/// A member name must make exactly one key under `members/`.
fn check_member_name(name: &str) -> Result<(), DcsError> {
    if name.is_empty() || name.contains('/') {
        return Err(DcsError::Config(format!(
            "member name {name:?} must be non-empty and contain no '/'"
        )));
    }
    Ok(())
}

fn encode<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String, DcsError> {
    serde_json::to_string(v).map_err(|source| DcsError::Encode { what, source })
}

impl EtcdDcs {
    /// Checks the settings and prepares the client. Connections are made lazily, on the first
    /// request, so etcd need not be up yet; a TLS problem shows up in that request's error.
    pub async fn connect(settings: &EtcdSettings) -> Result<EtcdDcs, DcsError> {
        // tonic uses the process-wide rustls provider when there is one; installing ring is a
        // no-op (an Err we ignore) when something else installed one first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (endpoints, options, digest) = connect_options(settings)?;
        // The same endpoints as the client's, kept to reconnect after a timeout (TLS only; a
        // plaintext client, an insecure override, does not reconnect).
        let kept = client_identity(settings)
            .ok()
            .and_then(|id| endpoints_with(settings, &id).ok())
            .unwrap_or_default();
        let transport = Arc::new(Transport::new(kept, digest, endpoints.clone()));
        let client = Client::connect_with_balanced_channel(
            &endpoints,
            Some(options),
            KeepUpdater(transport.clone()),
        )
        .await
        .map_err(|e| DcsError::Config(format!("etcd client: {}", rpc::describe(&e))))?;
        let base = base_path(&settings.namespace, &settings.scope);
        Ok(EtcdDcs {
            client,
            transport,
            prefix: format!("{base}/"),
            base,
            budget: Budget::new(settings.request_timeout, endpoints.len()),
            keepalive: Arc::new(Mutex::new(None)),
        })
    }

    /// The cluster prefix, `/<namespace>/<scope>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The underlying etcd client (same connections), for tooling and tests.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn key(&self, k: &DcsKey) -> String {
        k.full(&self.base)
    }

    async fn txn(
        &self,
        op: &'static str,
        lease: Option<i64>,
        txn: Txn,
    ) -> Result<(TxnResponse, u32), DcsError> {
        rpc::call_with(
            op,
            self.budget,
            lease,
            &|| self.transport.reconnect(),
            |attempt| {
                let mut c = self.client.clone();
                let txn = txn.clone();
                async move { c.txn(txn).await.map(|r| (r, attempt)) }
            },
        )
        .await
    }

    async fn put(
        &self,
        op: &'static str,
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), DcsError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        rpc::call_with(
            op,
            self.budget,
            lease,
            &|| self.transport.reconnect(),
            |_| {
                let mut c = self.client.clone();
                let (key, value, options) = (key.clone(), value.clone(), options.clone());
                async move { c.put(key, value, options).await.map(drop) }
            },
        )
        .await
    }

    async fn delete(&self, op: &'static str, key: String, prefix: bool) -> Result<i64, DcsError> {
        let options = prefix.then(|| etcd_client::DeleteOptions::new().with_prefix());
        rpc::call_with(
            op,
            self.budget,
            None,
            &|| self.transport.reconnect(),
            |_| {
                let mut c = self.client.clone();
                let (key, options) = (key.clone(), options.clone());
                async move { c.delete(key, options).await.map(|r| r.deleted()) }
            },
        )
        .await
    }

    /// A compare-and-swap put (`value: Some`) or delete (`None`) of `key` under `expect`. When
    /// an earlier attempt went unanswered and the precondition now fails, the write counts as
    /// ours if the key already holds exactly what we wrote (or is gone, for a delete).
    async fn cas(
        &self,
        op: &'static str,
        key: String,
        value: Option<Vec<u8>>,
        expect: Expect,
    ) -> Result<Cas, DcsError> {
        let compare = match expect {
            Expect::Any => vec![],
            Expect::Absent => vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            Expect::ModRevision(r) => vec![Compare::mod_revision(key.clone(), CompareOp::Equal, r)],
        };
        let write = match &value {
            Some(v) => TxnOp::put(key.clone(), v.clone(), None),
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new()
            .when(compare)
            .and_then(vec![write])
            .or_else(vec![TxnOp::get(key, None)]);
        let (resp, attempt) = self.txn(op, None, txn).await?;
        if resp.succeeded() {
            return Ok(Cas::Written {
                revision: header_revision(&resp),
            });
        }
        if attempt > 1 {
            let current = get_result(&resp);
            let ours = match (&value, &current) {
                (Some(v), Some(kv)) => kv.value() == v.as_slice(),
                (None, None) => true,
                _ => false,
            };
            if ours {
                tracing::info!(op, "an earlier unanswered attempt wrote the value");
                let revision = current.map_or(header_revision(&resp), |kv| kv.mod_revision());
                return Ok(Cas::Written { revision });
            }
        }
        Ok(Cas::Conflict)
    }

    /// One keepalive on the kept stream (opened first if needed). The stream is taken out of
    /// its slot for the duration, so a call abandoned mid-way (timeout) drops it and a late
    /// reply can never be attributed to a later send.
    async fn keepalive_once(&self, lease: i64) -> Result<KeepaliveReply, etcd_client::Error> {
        let kept = self
            .keepalive
            .lock()
            .await
            .take()
            .filter(|k| k.lease == lease);
        let mut ka = match kept {
            Some(k) => k,
            None => {
                let sent_at = Instant::now();
                match self.client.clone().lease_keep_alive(lease).await {
                    Ok((keeper, stream)) => KeepaliveStream {
                        lease,
                        keeper,
                        stream,
                    },
                    // etcd-client's own answer to a first reply with TTL <= 0.
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => {
                        return Ok(KeepaliveReply {
                            granted_ttl: 0,
                            sent_at,
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let sent_at = Instant::now();
        ka.keeper.keep_alive().await?;
        let reply = loop {
            match ka.stream.message().await? {
                Some(r) if r.id() == lease => break r,
                Some(_) => continue,
                None => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "keepalive stream closed".into(),
                    ));
                }
            }
        };
        let granted_ttl = reply.ttl();
        if granted_ttl > 0 {
            *self.keepalive.lock().await = Some(ka);
        }
        Ok(KeepaliveReply {
            granted_ttl,
            sent_at,
        })
    }
}

impl Dcs for EtcdDcs {
    async fn load(&self) -> Result<Snapshot, DcsError> {
        let prefix = self.prefix.clone();
        let resp = rpc::call_with(
            "load",
            self.budget,
            None,
            &|| self.transport.reconnect(),
            |_| {
                let mut c = self.client.clone();
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            },
        )
        .await?;
        let entries: BTreeMap<String, RawEntry> = resp
            .kvs()
            .iter()
            .filter_map(|kv| raw_entry(&self.prefix, kv))
            .map(|e| (e.suffix.clone(), e))
            .collect();
        let snapshot = watch::snapshot(&entries, resp.header().map_or(0, |h| h.revision()));
        for r in &snapshot.rejected {
            tracing::warn!(key = %r.key, reason = %r.reason, base = %self.base, "ignoring DCS value that does not parse");
        }
        Ok(snapshot)
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<Lease, DcsError> {
        let resp = rpc::call_with(
            "grant_lease",
            self.budget,
            None,
            &|| self.transport.reconnect(),
            |_| {
                let mut c = self.client.clone();
                async move { c.lease_grant(ttl_secs, None).await }
            },
        )
        .await?;
        if !resp.error().is_empty() || resp.ttl() <= 0 {
            return Err(DcsError::Unavailable {
                op: "grant_lease",
                detail: format!("etcd granted ttl {} ({})", resp.ttl(), resp.error()),
                source: None,
            });
        }
        Ok(Lease {
            id: resp.id(),
            granted_ttl: resp.ttl(),
        })
    }

    async fn keepalive(&self, lease: i64) -> Result<KeepaliveReply, DcsError> {
        rpc::call_with(
            "keepalive",
            self.budget,
            Some(lease),
            &|| self.transport.reconnect(),
            |_| self.keepalive_once(lease),
        )
        .await
    }

    async fn revoke(&self, lease: i64) -> Result<(), DcsError> {
        {
            let mut slot = self.keepalive.lock().await;
            if slot.as_ref().is_some_and(|k| k.lease == lease) {
                *slot = None;
            }
        }
        let r = rpc::call_with(
            "revoke",
            self.budget,
            Some(lease),
            &|| self.transport.reconnect(),
            |_| {
                let mut c = self.client.clone();
                async move { c.lease_revoke(lease).await.map(drop) }
            },
        )
        .await;
        match r {
            Err(DcsError::LeaseNotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn acquire_leader(&self, name: &str, lease: i64) -> Result<Option<i64>, DcsError> {
        let key = self.key(&DcsKey::Leader);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                name,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let (resp, _) = self.txn("acquire_leader", Some(lease), txn).await?;
        if resp.succeeded() {
            return Ok(Some(header_revision(&resp)));
        }
        // Not created: still ours if an earlier, unanswered attempt created it.
        Ok(get_result(&resp)
            .filter(|kv| kv.value() == name.as_bytes() && kv.lease() == lease)
            .map(|kv| kv.mod_revision()))
    }

    async fn renew_leader(&self, name: &str, lease: i64) -> Result<Option<i64>, DcsError> {
        let key = self.key(&DcsKey::Leader);
        let txn = Txn::new()
            .when(vec![Compare::value(key.clone(), CompareOp::Equal, name)])
            .and_then(vec![TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let (resp, _) = self.txn("renew_leader", Some(lease), txn).await?;
        Ok(resp.succeeded().then(|| header_revision(&resp)))
    }

    async fn release_leader(&self, name: &str) -> Result<bool, DcsError> {
        let key = self.key(&DcsKey::Leader);
        let txn = Txn::new()
            .when(vec![Compare::value(key.clone(), CompareOp::Equal, name)])
            .and_then(vec![TxnOp::delete(key.clone(), None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let (resp, attempt) = self.txn("release_leader", None, txn).await?;
        // After an unanswered attempt, a missing key means that attempt deleted it.
        Ok(resp.succeeded() || (attempt > 1 && get_result(&resp).is_none()))
    }

    async fn put_member(&self, name: &str, data: &MemberData, lease: i64) -> Result<(), DcsError> {
        check_member_name(name)?;
        let value = encode("member data", data)?;
        let key = self.key(&DcsKey::Member(name.to_owned()));
        self.put("put_member", key, value.into_bytes(), Some(lease))
            .await
    }

    async fn delete_member(&self, name: &str) -> Result<bool, DcsError> {
        check_member_name(name)?;
        let key = self.key(&DcsKey::Member(name.to_owned()));
        Ok(self.delete("delete_member", key, false).await? > 0)
    }

    async fn race_initialize(&self, lease: i64) -> Result<bool, DcsError> {
        let key = self.key(&DcsKey::Initialize);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                "",
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let (resp, _) = self.txn("race_initialize", Some(lease), txn).await?;
        Ok(resp.succeeded()
            || get_result(&resp).is_some_and(|kv| kv.value().is_empty() && kv.lease() == lease))
    }

    async fn confirm_initialize(&self, sysid: &str, lease: i64) -> Result<bool, DcsError> {
        let key = self.key(&DcsKey::Initialize);
        let txn = Txn::new()
            .when(vec![
                Compare::value(key.clone(), CompareOp::Equal, ""),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ])
            .and_then(vec![TxnOp::put(key.clone(), sysid, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let (resp, _) = self.txn("confirm_initialize", None, txn).await?;
        // An earlier, unanswered attempt may have written it already.
        Ok(resp.succeeded()
            || get_result(&resp)
                .is_some_and(|kv| kv.value() == sysid.as_bytes() && kv.lease() == 0))
    }

    async fn set_initialize(&self, sysid: &str, create_only: bool) -> Result<bool, DcsError> {
        let key = self.key(&DcsKey::Initialize);
        if !create_only {
            self.put("set_initialize", key, sysid.as_bytes().to_vec(), None)
                .await?;
            return Ok(true);
        }
        let expect = Expect::Absent;
        Ok(matches!(
            self.cas(
                "set_initialize",
                key,
                Some(sysid.as_bytes().to_vec()),
                expect
            )
            .await?,
            Cas::Written { .. }
        ))
    }

    async fn cancel_initialize(&self) -> Result<(), DcsError> {
        let key = self.key(&DcsKey::Initialize);
        self.delete("cancel_initialize", key, false).await.map(drop)
    }

    async fn put_config(
        &self,
        config: &serde_json::Map<String, serde_json::Value>,
        expect: Expect,
    ) -> Result<Cas, DcsError> {
        let value = encode("config", config)?;
        self.cas(
            "put_config",
            self.key(&DcsKey::Config),
            Some(value.into_bytes()),
            expect,
        )
        .await
    }

    async fn put_history(&self, history: &[HistoryEntry]) -> Result<(), DcsError> {
        let value = history_to_json(history);
        self.put(
            "put_history",
            self.key(&DcsKey::History),
            value.into_bytes(),
            None,
        )
        .await
    }

    async fn put_status(&self, status: &ClusterStatus) -> Result<(), DcsError> {
        let value = status.to_json();
        self.put(
            "put_status",
            self.key(&DcsKey::Status),
            value.into_bytes(),
            None,
        )
        .await
    }

    async fn put_sync(&self, state: &SyncState, expect: Expect) -> Result<Cas, DcsError> {
        let value = encode("sync state", state)?;
        self.cas(
            "put_sync",
            self.key(&DcsKey::Sync),
            Some(value.into_bytes()),
            expect,
        )
        .await
    }

    async fn delete_sync(&self, expect: Expect) -> Result<Cas, DcsError> {
        self.cas("delete_sync", self.key(&DcsKey::Sync), None, expect)
            .await
    }

    async fn put_failover(
        &self,
        request: &FailoverRequest,
        expect: Expect,
    ) -> Result<Cas, DcsError> {
        let value = encode("failover request", request)?;
        self.cas(
            "put_failover",
            self.key(&DcsKey::Failover),
            Some(value.into_bytes()),
            expect,
        )
        .await
    }

    async fn delete_cluster(&self) -> Result<i64, DcsError> {
        let n = self
            .delete("delete_cluster", self.prefix.clone(), true)
            .await?;
        tracing::warn!(base = %self.base, deleted = n, "deleted every key of the cluster");
        Ok(n)
    }

    fn watch(&self) -> ClusterWatch {
        watch::spawn_etcd(self.client.clone(), self.prefix.clone(), self.budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::TlsFiles;
    use std::time::Duration;

    fn eps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn connect_refuses_bad_settings_before_any_network() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        std::fs::write(&key, "k").unwrap();
        let settings = EtcdSettings {
            endpoints: eps(&["https://127.0.0.1:2379"]),
            tls: None,
            namespace: "/service".into(),
            scope: "demo".into(),
            request_timeout: Duration::from_secs(1),
            insecure: false,
        };
        let err = EtcdDcs::connect(&settings).await.unwrap_err();
        assert!(matches!(err, DcsError::Config(_)), "{err}");
        let with_tls = EtcdSettings {
            tls: Some(TlsFiles {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("client.pem"),
                key: key.clone(),
            }),
            ..settings.clone()
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = EtcdDcs::connect(&with_tls).await.unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = EtcdDcs::connect(&with_tls).await.unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let zero = EtcdSettings {
            request_timeout: Duration::ZERO,
            ..settings
        };
        assert!(EtcdDcs::connect(&zero).await.is_err());
    }

    #[tokio::test]
    async fn insecure_plaintext_is_allowed_explicitly_and_keys_use_the_base_path() {
        let settings = EtcdSettings {
            endpoints: eps(&["http://127.0.0.1:1"]),
            tls: None,
            namespace: "service/".into(),
            scope: "demo".into(),
            request_timeout: Duration::from_secs(1),
            insecure: true,
        };
        let dcs = EtcdDcs::connect(&settings).await.unwrap();
        assert_eq!(dcs.base(), "/service/demo");
        assert_eq!(
            dcs.key(&DcsKey::Member("n1".into())),
            "/service/demo/members/n1"
        );
        // Refused before any request is made.
        for bad in ["", "a/b"] {
            let err = dcs.delete_member(bad).await.unwrap_err();
            assert!(matches!(err, DcsError::Config(_)), "{err}");
        }
    }
}
