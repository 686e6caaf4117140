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

/// Checks `settings` and builds the client options: the normalised endpoints and the gRPC
/// options (mutual TLS, `require_leader`, timeouts, HTTP/2 keepalive).
pub(crate) fn connect_options(
    settings: &EtcdSettings,
) -> Result<(Vec<String>, ConnectOptions), DcsError> {
    if settings.request_timeout.is_zero() {
        return Err(DcsError::Config("request timeout must be positive".into()));
    }
    let (endpoints, use_tls) = normalise_endpoints(&settings.endpoints, settings.insecure)?;
    let mut options = ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
        // etcd's default --grpc-keepalive-min-time is 5 s and it does not permit pings
        // without streams: ping every 10 s, only while a stream (the watch) is open.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false)
        .with_tcp_keepalive(Duration::from_secs(30));
    if use_tls {
        let files = settings.tls.as_ref().ok_or_else(|| {
            DcsError::Config("https etcd endpoints need the CA, client certificate and key".into())
        })?;
        options = options.with_tls(tls_options(files)?);
    } else {
        tracing::warn!(
            endpoints = ?endpoints,
            "INSECURE: talking to etcd in plaintext without client certificates"
        );
    }
    Ok((endpoints, options))
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

fn tls_options(files: &TlsFiles) -> Result<TlsOptions, DcsError> {
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
    let key = read_file("client key", &files.key)?;
    // No domain name: tonic verifies each endpoint against its own host (IP or DNS SAN).
    Ok(TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
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
