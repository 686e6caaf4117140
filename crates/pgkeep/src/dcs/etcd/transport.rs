//! The etcd client's shared channel: its endpoint feed, new connections after a timed-out
//! request, and the switch to new TLS files without a new client.

use std::sync::Arc;

use etcd_client::{Client, GetOptions};
use tokio::sync::Mutex;

use super::EtcdDcs;
use crate::dcs::DcsError;
use crate::dcs::rpc;
use crate::dcs::settings::{EtcdSettings, client_identity, connect_options, endpoints_with};

/// Feeds endpoints to the gRPC channel every clone of the client (the watch's included) shares.
type EndpointUpdater = tokio::sync::mpsc::Sender<
    tonic::transport::channel::Change<tonic::transport::Uri, tonic::transport::Endpoint>,
>;

/// What a TLS identity reload needs: the shared channel's endpoint feed, and the digest of the
/// TLS files in use (its lock serialises reloads).
pub(super) struct Transport {
    updater: std::sync::Mutex<Option<EndpointUpdater>>,
    /// The endpoints in use (TLS only), for [`Transport::reconnect`].
    endpoints: std::sync::Mutex<Vec<tonic::transport::Endpoint>>,
    /// When [`Transport::reconnect`] last replaced the connections.
    reconnected: std::sync::Mutex<Option<std::time::Instant>>,
    digest: Mutex<Option<u64>>,
    /// The normalised endpoint URLs the client was made with.
    urls: Vec<String>,
}

impl Transport {
    /// A transport for a client made with `urls`, reconnecting to `endpoints` (TLS) and using
    /// the TLS files whose contents hash to `digest`.
    pub(super) fn new(
        endpoints: Vec<tonic::transport::Endpoint>,
        digest: Option<u64>,
        urls: Vec<String>,
    ) -> Transport {
        Transport {
            updater: std::sync::Mutex::new(None),
            endpoints: std::sync::Mutex::new(endpoints),
            reconnected: std::sync::Mutex::new(None),
            digest: Mutex::new(digest),
            urls,
        }
    }

    /// Replaces every endpoint's connection with a new one (at most every 2 s). A frozen member
    /// (SIGSTOP, a hung host) still accepts TCP, so the balancer keeps its connection ready and
    /// keeps sending it requests until HTTP/2 keepalive notices, some 15 s later; a new
    /// connection to it hangs in the TLS handshake instead and the balancer uses the others.
    pub(super) fn reconnect(&self) {
        let now = std::time::Instant::now();
        if let Ok(mut last) = self.reconnected.lock() {
            if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(2)) {
                return;
            }
            *last = Some(now);
        }
        let endpoints = self.endpoints.lock().map(|e| e.clone()).unwrap_or_default();
        let Some(updater) = self.updater.lock().ok().and_then(|u| u.clone()) else {
            return;
        };
        if endpoints.is_empty() {
            return;
        }
        tracing::info!("an etcd request timed out; opening new connections to every endpoint");
        for ep in endpoints {
            let change = tonic::transport::channel::Change::Insert(ep.uri().clone(), ep);
            if updater.try_send(change).is_err() {
                tracing::debug!("the etcd endpoint feed is full; reconnect skipped");
            }
        }
    }
}

/// Builds etcd-client's balanced channel as etcd-client does, keeping its endpoint feed.
pub(super) struct KeepUpdater(pub(super) Arc<Transport>);

impl etcd_client::BalancedChannelBuilder for KeepUpdater {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        capacity: usize,
    ) -> Result<(etcd_client::Channel, EndpointUpdater), Self::Error> {
        let (channel, tx) = tonic::transport::Channel::balance_channel(capacity);
        if let Ok(mut slot) = self.0.updater.lock() {
            *slot = Some(tx.clone());
        }
        Ok((etcd_client::Channel::Tonic(channel), tx))
    }
}

/// What [`EtcdDcs::reload_tls`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsReload {
    /// The CA, certificate and key files hold what the client already uses.
    Unchanged,
    /// A client with the new files read the cluster prefix, and every endpoint of the shared
    /// channel now connects with them.
    Reloaded,
}

impl EtcdDcs {
    /// Switches every connection made from now on to the TLS files of `settings` (a rotated
    /// client certificate and key, or a new CA bundle), without a new client: the lease, the
    /// keys attached to it and every clone of this client stay as they are.
    ///
    /// Nothing changes unless all of this holds: the files' contents differ from those in use,
    /// they are readable and the key is private, the endpoints are the ones the client was made
    /// with, and a separate client with the new files completes a linearizable read of the
    /// cluster prefix (proof that etcd accepts the new identity and the new CA verifies etcd).
    /// Then each endpoint of the shared channel is replaced by one with the new identity:
    /// requests from then on connect with it, requests in flight finish on their connection,
    /// and a stream already open (the watch) stays on its connection, whose TLS session etcd
    /// never checks again, until it next restarts. The kept lease keepalive stream is dropped,
    /// so the next keepalive opens one with the new identity. On any error the previous
    /// identity stays in use for every connection.
    pub async fn reload_tls(&self, settings: &EtcdSettings) -> Result<TlsReload, DcsError> {
        let mut digest = self.transport.digest.lock().await;
        let identity = client_identity(settings)?;
        if *digest == Some(identity.digest) {
            return Ok(TlsReload::Unchanged);
        }
        let endpoints = endpoints_with(settings, &identity)?;
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| e.uri().to_string().trim_end_matches('/').to_owned())
            .collect();
        if urls != self.transport.urls {
            return Err(DcsError::Config(format!(
                "etcd endpoints changed ({:?} -> {urls:?}); they take effect after an agent restart",
                self.transport.urls
            )));
        }
        let Some(updater) = self
            .transport
            .updater
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
        else {
            return Err(DcsError::Config(
                "this etcd client cannot replace its endpoints".into(),
            ));
        };
        self.probe(settings, identity.digest).await?;
        for endpoint in endpoints {
            let change =
                tonic::transport::channel::Change::Insert(endpoint.uri().clone(), endpoint);
            updater
                .send(change)
                .await
                .map_err(|_| DcsError::Config("the etcd client's channel is closed".into()))?;
        }
        if let Ok(mut kept) = self.transport.endpoints.lock() {
            *kept = endpoints_with(settings, &identity)?;
        }
        *digest = Some(identity.digest);
        drop(digest);
        *self.keepalive.lock().await = None;
        Ok(TlsReload::Reloaded)
    }

    /// A linearizable read of one key of the cluster prefix through a client of its own made
    /// from `settings` (within the usual budget, so an unreachable member is tried on another).
    /// Fails unless that client read the TLS files as they were when `digest` was taken.
    async fn probe(&self, settings: &EtcdSettings, digest: u64) -> Result<(), DcsError> {
        let (urls, options, read) = connect_options(settings)?;
        if read != Some(digest) {
            return Err(DcsError::Config(
                "the etcd TLS files changed during the reload; reload again".into(),
            ));
        }
        let probe = Client::connect(&urls, Some(options))
            .await
            .map_err(|e| DcsError::Config(format!("etcd probe client: {}", rpc::describe(&e))))?;
        let prefix = self.prefix.clone();
        rpc::call("tls_probe", self.budget, None, |_| {
            let mut c = probe.clone();
            let prefix = prefix.clone();
            async move {
                c.get(
                    prefix,
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await
                .map(drop)
            }
        })
        .await
    }
}
