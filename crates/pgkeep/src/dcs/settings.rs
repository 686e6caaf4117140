//! [`EtcdSettings`]: how to reach etcd, checked before any connection: https endpoints with a
//! client certificate (plaintext only behind the explicit `insecure` flag), a private key file
//! nobody else can read, and the gRPC options every connection uses.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::DcsError;

/// The files of the client's mutual-TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CA(s) that sign the etcd server certificates.
    pub ca: PathBuf,
    /// PEM client certificate (with the `clientAuth` extended key usage).
    pub cert: PathBuf,
    /// PEM private key of the client certificate; must not be readable by group or others.
    pub key: PathBuf,
}

/// How to reach etcd and where the cluster's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs, `https://host:port` (a bare `host:port` means https). The server name
    /// checked against each server certificate is that endpoint's host.
    pub endpoints: Vec<String>,
    /// The client's TLS files; required for `https` endpoints.
    pub tls: Option<TlsFiles>,
    /// Patroni's `namespace` (default `/service`).
    pub namespace: String,
    /// The cluster name.
    pub scope: String,
    /// Time budget of each call, retries included (Patroni's `retry_timeout`).
    pub request_timeout: Duration,
    /// Allows `http://` endpoints (plaintext, no client authentication). Logs a warning.
    pub insecure: bool,
}

/// Checks `settings` and builds the client options: the normalised endpoints, the gRPC
/// options (mutual TLS, `require_leader`, timeouts, HTTP/2 keepalive) and the digest of the TLS
/// files read (`None` without TLS).
pub(crate) fn connect_options(
    settings: &EtcdSettings,
) -> Result<(Vec<String>, ConnectOptions, Option<u64>), DcsError> {
    if settings.request_timeout.is_zero() {
        return Err(DcsError::Config("request timeout must be positive".into()));
    }
    let (endpoints, use_tls) = normalise_endpoints(&settings.endpoints, settings.insecure)?;
    let mut options = ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(connect_timeout(settings))
        // etcd's default --grpc-keepalive-min-time is 5 s and it does not permit pings
        // without streams: ping every 10 s, only while a stream (the watch) is open.
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false)
        .with_tcp_keepalive(TCP_KEEPALIVE);
    let mut digest = None;
    if use_tls {
        let identity = client_identity(settings)?;
        digest = Some(identity.digest);
        options = options.with_tls(identity.tls);
    } else {
        tracing::warn!(
            endpoints = ?endpoints,
            "INSECURE: talking to etcd in plaintext without client certificates"
        );
    }
    Ok((endpoints, options, digest))
}

/// HTTP/2 ping interval while a stream is open.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive of every connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

fn connect_timeout(settings: &EtcdSettings) -> Duration {
    settings.request_timeout.min(Duration::from_secs(5))
}

/// The client's TLS identity as read from its files, with a digest of what was read (to tell
/// whether the files changed since).
pub(crate) struct ClientIdentity {
    /// CA, certificate and key, as tonic takes them.
    pub(crate) tls: TlsOptions,
    /// A digest of the three files' contents (not a secret: a change detector).
    pub(crate) digest: u64,
}

/// Reads the CA, certificate and key of `settings.tls` (the key must be private to its owner).
pub(crate) fn client_identity(settings: &EtcdSettings) -> Result<ClientIdentity, DcsError> {
    let files = settings.tls.as_ref().ok_or_else(|| {
        DcsError::Config("https etcd endpoints need the CA, client certificate and key".into())
    })?;
    tls_options(files)
}

/// The gRPC endpoints of `settings` with `identity`, built with exactly the options
/// [`connect_options`] gives etcd-client (so an endpoint replaced on the shared channel differs
/// only in its TLS identity).
pub(crate) fn endpoints_with(
    settings: &EtcdSettings,
    identity: &ClientIdentity,
) -> Result<Vec<tonic::transport::Endpoint>, DcsError> {
    let (urls, use_tls) = normalise_endpoints(&settings.endpoints, settings.insecure)?;
    if !use_tls {
        return Err(DcsError::Config(
            "plaintext etcd endpoints have no TLS identity to reload".into(),
        ));
    }
    urls.iter()
        .map(|url| {
            tonic::transport::Endpoint::from_shared(url.clone())
                .and_then(|e| e.tls_config(identity.tls.clone()))
                .map(|e| {
                    e.keep_alive_while_idle(false)
                        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                        .connect_timeout(connect_timeout(settings))
                        .tcp_keepalive(Some(TCP_KEEPALIVE))
                })
                .map_err(|e| DcsError::Config(format!("etcd endpoint {url}: {e}")))
        })
        .collect()
}

/// Checks the endpoints: all `https` (bare `host:port` counts as https) or, with `insecure`,
/// all `http`. Returns the normalised URLs and whether they use TLS.
fn normalise_endpoints(
    endpoints: &[String],
    insecure: bool,
) -> Result<(Vec<String>, bool), DcsError> {
    if endpoints.is_empty() {
        return Err(DcsError::Config("no etcd endpoints".into()));
    }
    let mut out = Vec::with_capacity(endpoints.len());
    let (mut plain, mut tls) = (false, false);
    for e in endpoints {
        let e = e.trim();
        let (url, rest) = if let Some(rest) = e.strip_prefix("https://") {
            tls = true;
            (e.to_owned(), rest)
        } else if let Some(rest) = e.strip_prefix("http://") {
            plain = true;
            (e.to_owned(), rest)
        } else if e.contains("://") {
            return Err(DcsError::Config(format!(
                "etcd endpoint {e:?}: only https:// is supported"
            )));
        } else {
            tls = true;
            (format!("https://{e}"), e)
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if authority.contains(['/', '@', '?', '#']) || !port_ok {
            return Err(DcsError::Config(format!(
                "etcd endpoint {e:?} is not of the form https://host:port"
            )));
        }
        out.push(url.trim_end_matches('/').to_owned());
    }
    match (plain, tls) {
        (true, true) => Err(DcsError::Config(
            "etcd endpoints mix http:// and https://".into(),
        )),
        (true, false) if !insecure => Err(DcsError::Config(
            "plaintext etcd endpoints (http://) need the explicit insecure option; use https:// with client certificates".into(),
        )),
        _ => Ok((out, tls)),
    }
}

fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, DcsError> {
    std::fs::read(path)
        .map_err(|e| DcsError::Config(format!("cannot read etcd {what} {}: {e}", path.display())))
}

fn tls_options(files: &TlsFiles) -> Result<ClientIdentity, DcsError> {
    let meta = std::fs::metadata(&files.key)
        .map_err(|e| DcsError::Config(format!("etcd client key {}: {e}", files.key.display())))?;
    if crate::fsutil::readable_by_others(&meta) {
        return Err(DcsError::Config(format!(
            "etcd client key {} is accessible by group or others; chmod 600 it",
            files.key.display()
        )));
    }
    let ca = read_file("CA", &files.ca)?;
    let cert = read_file("client certificate", &files.cert)?;
    let key = secrecy::zeroize::Zeroizing::new(read_file("client key", &files.key)?);
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&ca, &cert, &*key).hash(&mut h);
        h.finish()
    };
    // No domain name: tonic verifies each endpoint against its own host (IP or DNS SAN).
    Ok(ClientIdentity {
        tls: TlsOptions::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key.as_slice())),
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn identity_digest_tracks_the_files_and_endpoints_keep_their_urls() {
        use crate::pki::{Ca, CertRequest, Usage};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("CA", 10).unwrap();
        let ca_file = ca.write(dir.path()).unwrap().cert;
        let req = CertRequest {
            common_name: "pgkeep-n1".into(),
            usage: Usage::Client,
            dns_names: vec![],
            ip_addresses: vec![],
            validity_days: 2,
        };
        let files = ca.issue(&req).unwrap().write(dir.path(), "c").unwrap();
        let settings = EtcdSettings {
            endpoints: eps(&["https://e1.example:2379", "e2.example:2379/"]),
            tls: Some(TlsFiles {
                ca: ca_file,
                cert: files.cert.clone(),
                key: files.key.clone(),
            }),
            namespace: "/service".into(),
            scope: "demo".into(),
            request_timeout: Duration::from_secs(2),
            insecure: false,
        };
        let first = client_identity(&settings).unwrap();
        assert_eq!(client_identity(&settings).unwrap().digest, first.digest);
        let (_, _, digest) = connect_options(&settings).unwrap();
        assert_eq!(digest, Some(first.digest));
        ca.issue(&req).unwrap().write(dir.path(), "c").unwrap();
        let second = client_identity(&settings).unwrap();
        assert_ne!(second.digest, first.digest);
        let urls: Vec<String> = endpoints_with(&settings, &second)
            .unwrap()
            .iter()
            .map(|e| e.uri().to_string())
            .collect();
        assert_eq!(
            urls,
            ["https://e1.example:2379/", "https://e2.example:2379/"]
        );
        let plain = EtcdSettings {
            endpoints: eps(&["http://e1.example:2379"]),
            insecure: true,
            ..settings
        };
        assert!(endpoints_with(&plain, &second).is_err());
    }

    #[test]
    fn endpoints_must_be_https_unless_insecure() {
        let (urls, tls) =
            normalise_endpoints(&eps(&["https://127.0.0.1:2379/", "10.0.0.2:2379"]), false)
                .unwrap();
        assert!(tls);
        assert_eq!(urls, ["https://127.0.0.1:2379", "https://10.0.0.2:2379"]);
        let err = normalise_endpoints(&eps(&["http://127.0.0.1:2379"]), false).unwrap_err();
        assert!(err.to_string().contains("insecure"), "{err}");
        let (urls, tls) = normalise_endpoints(&eps(&["http://127.0.0.1:2379"]), true).unwrap();
        assert!(!tls);
        assert_eq!(urls, ["http://127.0.0.1:2379"]);
        assert!(normalise_endpoints(&eps(&["http://a:1", "https://b:2"]), true).is_err());
        assert!(normalise_endpoints(&eps(&["unix://x:1"]), true).is_err());
        assert!(normalise_endpoints(&eps(&["https://host"]), false).is_err());
        assert!(normalise_endpoints(&eps(&["https://u:p@host:1"]), false).is_err());
        assert!(normalise_endpoints(&eps(&["https://host:1/v3"]), false).is_err());
        assert!(normalise_endpoints(&eps(&["https://[::1]:2379"]), false).is_ok());
        assert!(normalise_endpoints(&[], false).is_err());
    }
}
