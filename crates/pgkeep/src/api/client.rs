//! A small client of the agents' REST APIs, for `pgkeep ctl`, peer calls and tests.
//!
//! Unlike Patroni's peer client it always verifies the server certificate (chain to the given
//! CA, name or address in the subject alternative names), never uses a proxy from the
//! environment, and sends basic-auth credentials only when given.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use super::json::MemberStatus;
use super::server::{ApiError, provider, read_certs, read_key};

/// Default time budget of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A status, headers and body.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body (empty for `HEAD`/`OPTIONS`).
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builds an [`ApiClient`].
pub struct ApiClientBuilder {
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    basic: Option<(String, SecretString)>,
    timeout: Duration,
}

impl std::fmt::Debug for ApiClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClientBuilder")
            .field("roots", &self.roots.len())
            .field("identity", &self.identity.is_some())
            .field("basic_auth", &self.basic.as_ref().map(|(u, _)| u))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ApiClientBuilder {
    /// A client that trusts the CA certificates of `ca_pem` (PEM, one or more).
    pub fn new(ca_pem: &[u8]) -> Result<ApiClientBuilder, ApiError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| ApiError::Client(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ApiError::Client(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ApiError::Client("the CA PEM holds no certificate".into()));
        }
        Ok(ApiClientBuilder {
            roots,
            identity: None,
            basic: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// A client that trusts the CA certificates of the file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<ApiClientBuilder, ApiError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| ApiError::Client(format!("{}: {e}", ca.display())))?;
        }
        Ok(ApiClientBuilder {
            roots,
            identity: None,
            basic: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Presents this client certificate (PEM chain) and key (PEM).
    pub fn identity_pem(
        mut self,
        cert_pem: &[u8],
        key_pem: &SecretString,
    ) -> Result<ApiClientBuilder, ApiError> {
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::Client(format!("client certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.expose_secret().as_bytes())
            .map_err(|_| ApiError::Client("client key PEM holds no usable private key".into()))?;
        self.identity = Some((certs, key));
        Ok(self)
    }

    /// Presents the client certificate and key of these files (the key must be 0600).
    pub fn identity_files(mut self, cert: &Path, key: &Path) -> Result<ApiClientBuilder, ApiError> {
        self.identity = Some((read_certs(cert)?, read_key(key)?));
        Ok(self)
    }

    /// Sends these basic-auth credentials with every request.
    pub fn basic_auth(mut self, username: &str, password: SecretString) -> ApiClientBuilder {
        self.basic = Some((username.to_owned(), password));
        self
    }

    /// Time budget of one request (connect, TLS, request and response).
    pub fn timeout(mut self, timeout: Duration) -> ApiClientBuilder {
        self.timeout = timeout;
        self
    }

    /// Builds the client.
    pub fn build(self) -> Result<ApiClient, ApiError> {
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ApiError::Client(e.to_string()))?
            .with_root_certificates(self.roots);
        let tls = match self.identity {
            Some((certs, key)) => tls
                .with_client_auth_cert(certs, key)
                .map_err(|e| ApiError::Client(format!("client certificate: {e}")))?,
            None => tls.with_no_client_auth(),
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .http1_only()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ApiError::Client(e.to_string()))?;
        Ok(ApiClient {
            http,
            basic: self.basic,
        })
    }
}

/// A REST API client: HTTPS only, server certificate verified, connections kept alive.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    basic: Option<(String, SecretString)>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("basic_auth", &self.basic.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// Starts building a client that trusts the CA certificates of `ca_pem`.
    pub fn builder(ca_pem: &[u8]) -> Result<ApiClientBuilder, ApiError> {
        ApiClientBuilder::new(ca_pem)
    }

    /// A client trusting `ca_pem`, presenting `identity` (certificate PEM, key PEM) if given
    /// and sending `basic` (user, password) if given, with the default timeout.
    pub fn new(
        ca_pem: &[u8],
        identity: Option<(&[u8], &SecretString)>,
        basic: Option<(&str, SecretString)>,
    ) -> Result<ApiClient, ApiError> {
        let mut b = ApiClientBuilder::new(ca_pem)?;
        if let Some((cert, key)) = identity {
            b = b.identity_pem(cert, key)?;
        }
        if let Some((user, password)) = basic {
            b = b.basic_auth(user, password);
        }
        b.build()
    }

    /// Sends a request without a body. Errors are transport errors (connection, TLS, timeout);
    /// any HTTP status is an `Ok`.
    pub async fn request(&self, method: Method, url: &str) -> Result<ApiResponse, reqwest::Error> {
        self.send(method, url, None).await
    }

    /// Sends a request with an optional body `(content type, bytes)`. Errors are transport
    /// errors; any HTTP status is an `Ok`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<ApiResponse, reqwest::Error> {
        self.send_with(method, url, body, None).await
    }

    /// Sends a JSON body with `method` (`PATCH`, `PUT`, `POST`), with `If-Match: "<revision>"`
    /// when `if_match` names one (`PATCH`/`PUT /config` then write only over that revision).
    pub async fn send_json(
        &self,
        method: Method,
        url: &str,
        json: &str,
        if_match: Option<i64>,
    ) -> Result<ApiResponse, reqwest::Error> {
        let body = Some(("application/json", json.as_bytes().to_vec()));
        self.send_with(method, url, body, if_match).await
    }

    async fn send_with(
        &self,
        method: Method,
        url: &str,
        body: Option<(&'static str, Vec<u8>)>,
        if_match: Option<i64>,
    ) -> Result<ApiResponse, reqwest::Error> {
        let mut req = self.http.request(method, url);
        if let Some(rev) = if_match {
            req = req.header(reqwest::header::IF_MATCH, format!("\"{rev}\""));
        }
        if let Some((content_type, bytes)) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        if let Some((user, pass)) = &self.basic {
            req = req.basic_auth(user, Some(pass.expose_secret()));
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<ApiResponse, reqwest::Error> {
        self.request(Method::GET, url).await
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(&self, url: &str, json: &str) -> Result<ApiResponse, reqwest::Error> {
        self.send(
            Method::POST,
            url,
            Some(("application/json", json.as_bytes().to_vec())),
        )
        .await
    }

    /// `DELETE url`.
    pub async fn delete(&self, url: &str) -> Result<ApiResponse, reqwest::Error> {
        self.request(Method::DELETE, url).await
    }

    /// `HEAD url`.
    pub async fn head(&self, url: &str) -> Result<ApiResponse, reqwest::Error> {
        self.request(Method::HEAD, url).await
    }

    /// `GET <base>/patroni`, parsed. `base` is `https://host:port`.
    pub async fn status(&self, base: &str) -> Result<MemberStatus, ApiError> {
        let url = format!("{}/patroni", base.trim_end_matches('/'));
        let resp = self
            .get(&url)
            .await
            .map_err(|e| ApiError::Client(format!("GET {url}: {e}")))?;
        if resp.status != 200 {
            return Err(ApiError::Client(format!(
                "GET {url}: HTTP {}: {}",
                resp.status,
                resp.text()
            )));
        }
        resp.json()
            .map_err(|e| ApiError::Client(format!("GET {url}: invalid status JSON: {e}")))
    }
}
