//! The Patroni-compatible REST API as the harness uses it: health codes, `/patroni`, and the
//! authenticated `POST /switchover`. HTTPS only, the server certificate verified against the CA.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A REST client for one product's members.
#[derive(Clone)]
pub struct Rest {
    http: reqwest::Client,
    user: String,
    password: String,
}

impl Rest {
    /// Trusts `ca_pem`, presents `identity` (certificate PEM, key PEM) when given, and sends
    /// basic-auth `user`/`password` where the API wants it.
    pub fn new(
        ca_pem: &[u8],
        identity: Option<(Vec<u8>, Vec<u8>)>,
        user: &str,
        password: &str,
    ) -> Result<Rest> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(c.context("CA certificate")?)
                .context("CA certificate")?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots);
        let tls = match identity {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .context("client certificate")?;
                let key = PrivateKeyDer::from_pem_slice(&key).context("client key")?;
                tls.with_client_auth_cert(certs, key)
                    .context("client certificate")?
            }
            None => tls.with_no_client_auth(),
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .http1_only()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the REST client")?;
        Ok(Rest {
            http,
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The status code of an anonymous `GET url` (None when the request failed).
    pub async fn status(&self, url: &str) -> Option<u16> {
        self.http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// A `GET url` without basic auth: (status, body text).
    pub async fn get(&self, url: &str) -> Result<(u16, String)> {
        let r = self
            .http
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.unwrap_or_default()))
    }

    /// The JSON of an authenticated `GET url`.
    pub async fn json(&self, url: &str) -> Result<serde_json::Value> {
        let r = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let text = r.text().await.with_context(|| format!("GET {url}"))?;
        serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON: {text:.200}"))
    }

    /// An authenticated `POST url` with a JSON body: (status, body text).
    pub async fn post(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(u16, String)> {
        let r = self
            .http
            .post(url)
            .basic_auth(&self.user, Some(&self.password))
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(timeout)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        Ok((status, text.trim().replace('\n', " ")))
    }
}
