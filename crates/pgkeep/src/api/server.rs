//! The listener: TLS (rustls with the ring provider), TCP_NODELAY, HTTP/1.1 keep-alive, one
//! write per response, timeouts against slow clients, graceful shutdown and certificate reload.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::Handle;
use axum_server::accept::{TcpConfigAcceptor, TcpSocketConfig};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ApiSnapshot;
use super::auth::AccessPolicy;
use super::control::Control;
use super::handlers::{AppState, router};
use crate::config::{RestApi, TlsFiles, VerifyClient};

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to send a request's headers, and longest an idle keep-alive
/// connection is kept open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (and read buffer) accepted. Health checks are a few hundred bytes.
const MAX_BUF_SIZE: usize = 16 * 1024;
/// How long open requests may finish after shutdown was requested.
const GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(2);

/// Why the REST API could not start (or its certificates could not be reloaded).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A certificate, key or CA file is unusable.
    #[error("{}: {reason}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong (never key material).
        reason: String,
    },
    /// The TLS configuration was refused by rustls.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The client could not be built.
    #[error("REST API client: {0}")]
    Client(String),
    /// The server stopped with an error.
    #[error("REST API server: {0}")]
    Serve(#[from] io::Error),
}

/// A running server.
#[derive(Debug)]
pub struct BoundServer {
    local_addr: SocketAddr,
    handle: Handle<SocketAddr>,
    tls: Option<RustlsConfig>,
    task: JoinHandle<io::Result<()>>,
}

impl BoundServer {
    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the server speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The number of open connections.
    pub fn connection_count(&self) -> usize {
        self.handle.connection_count()
    }

    /// Loads the certificate, key and client CA named in `cfg` again and uses them for new
    /// connections (certificate rotation without downtime). Open connections keep theirs.
    pub fn reload_tls(&self, cfg: &RestApi) -> Result<(), ApiError> {
        TlsReloader(self.tls.clone()).reload(cfg)
    }

    /// A handle that reloads this server's certificates (see [`BoundServer::reload_tls`]),
    /// for whoever handles reloads while the server runs.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader(self.tls.clone())
    }

    /// Waits until the server has stopped (after the shutdown token was cancelled).
    pub async fn stopped(self) -> Result<(), ApiError> {
        match self.task.await {
            Ok(r) => r.map_err(ApiError::Serve),
            Err(e) => Err(ApiError::Serve(io::Error::other(e))),
        }
    }
}

/// Reloads a running server's certificate, key and client CA (cheap to clone).
#[derive(Debug, Clone)]
pub struct TlsReloader(Option<RustlsConfig>);

impl TlsReloader {
    /// Loads the files named in `cfg` and uses them for new connections; on any error the
    /// server keeps the configuration it has.
    pub fn reload(&self, cfg: &RestApi) -> Result<(), ApiError> {
        let (Some(current), Some(files)) = (&self.0, &cfg.tls) else {
            return Err(ApiError::Tls(
                "TLS cannot be switched on or off without a restart".into(),
            ));
        };
        current.reload_from_config(Arc::new(server_tls_config(cfg, files)?));
        tracing::info!(cert = %files.cert.display(), "reloaded the REST API certificate");
        Ok(())
    }
}

/// Starts the REST API on `cfg.listen` and returns once the socket is bound. The server answers
/// from the latest snapshot of `snapshot` and stops (letting open requests finish for up to two
/// seconds) when `shutdown` is cancelled. The state-changing endpoints write through `control`;
/// without one they answer 503 `this server cannot change the cluster`.
///
/// With `cfg.tls` set, only TLS is spoken (rustls, TLS 1.2 and 1.3): a plaintext request on the
/// port fails the handshake. Client certificates are asked for when `verify_client` is
/// `optional` (a presented certificate must chain to `cafile`) and required when it is
/// `required` (the handshake fails without one). Without `cfg.tls` (only possible with
/// `pgkeep.insecure.plaintext_restapi`) the server speaks plaintext HTTP and logs a warning.
pub async fn serve(
    cfg: &RestApi,
    snapshot: watch::Receiver<Arc<ApiSnapshot>>,
    control: Option<Arc<dyn Control>>,
    shutdown: CancellationToken,
) -> Result<BoundServer, ApiError> {
    let tls = cfg
        .tls
        .as_ref()
        .map(|files| server_tls_config(cfg, files).map(|c| RustlsConfig::from_config(Arc::new(c))))
        .transpose()?;

    let listener = std::net::TcpListener::bind(cfg.listen).map_err(|source| ApiError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let bind_err = |source| ApiError::Bind {
        addr: cfg.listen,
        source,
    };

    let policy = AccessPolicy::from_config(cfg);
    if !policy.is_configured() {
        tracing::warn!(
            "restapi: neither authentication nor client certificates are configured; \
             /patroni, /cluster, /config, /history and every state-changing endpoint refuse all callers"
        );
    }
    let app = router(AppState::new(policy, snapshot, control))
        .into_make_service_with_connect_info::<SocketAddr>();

    let handle: Handle<SocketAddr> = Handle::new();
    let tcp = TcpConfigAcceptor::new(TcpSocketConfig::new().nodelay(true));
    let server = axum_server::from_tcp(listener)
        .map_err(bind_err)?
        .handle(handle.clone())
        .http1_only()
        .first_request_timeout(HEADER_READ_TIMEOUT)
        .accept_error_handler(|peer: Option<&SocketAddr>, e: &io::Error| {
            tracing::debug!(peer = ?peer, error = %e, "REST API connection failed");
        });
    let task = match &tls {
        Some(tls_config) => {
            let acceptor = RustlsAcceptor::new(tls_config.clone())
                .handshake_timeout(HANDSHAKE_TIMEOUT)
                .acceptor(tcp);
            let mut server = server.acceptor(acceptor);
            tune_http(&mut server);
            tracing::info!(addr = %local_addr, "REST API listening (HTTPS)");
            tokio::spawn(server.serve(app))
        }
        None => {
            let mut server = server.acceptor(tcp);
            tune_http(&mut server);
            tracing::warn!(
                addr = %local_addr,
                "REST API listening WITHOUT TLS (pgkeep.insecure.plaintext_restapi): \
                 credentials and cluster state travel in clear text"
            );
            tokio::spawn(server.serve(app))
        }
    };

    let stop = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.graceful_shutdown(Some(GRACEFUL_SHUTDOWN));
    });

    Ok(BoundServer {
        local_addr,
        handle,
        tls,
        task,
    })
}

/// HTTP/1.1 settings: keep-alive on, responses flattened into one buffer so each goes out in
/// one write, bounded head size and read time.
fn tune_http<A>(server: &mut axum_server::Server<SocketAddr, A>) {
    server
        .http_builder()
        .http1()
        .keep_alive(true)
        .writev(false)
        .max_buf_size(MAX_BUF_SIZE)
        .header_read_timeout(HEADER_READ_TIMEOUT);
}

fn tls_file_err(path: &Path, reason: impl ToString) -> ApiError {
    ApiError::TlsFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file.
pub(super) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ApiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_file_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Reads a private key, refusing a file that group or others can read.
pub(super) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ApiError> {
    let meta = std::fs::metadata(path).map_err(|e| tls_file_err(path, e))?;
    if crate::fsutil::readable_by_others(&meta) {
        return Err(tls_file_err(
            path,
            "private key is readable by group or others; run chmod 600 on it",
        ));
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| tls_file_err(path, format!("no usable private key ({e})")))
}

/// The crypto provider of every TLS configuration here: ring, never a process default.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration `cfg` describes.
fn server_tls_config(cfg: &RestApi, files: &TlsFiles) -> Result<rustls::ServerConfig, ApiError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::Tls(e.to_string()))?;
    let builder = match (cfg.verify_client, &cfg.cafile) {
        (VerifyClient::None, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(ApiError::Tls(
                "verify_client needs restapi.cafile to check client certificates".into(),
            ));
        }
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| tls_file_err(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if mode == VerifyClient::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| ApiError::Tls(format!("client certificate verifier: {e}")))?,
            )
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_file_err(&files.key, format!("certificate and key do not fit: {e}")))
}
