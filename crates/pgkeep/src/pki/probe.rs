//! Which certificate a TLS listener presents to a new connection: the check that a rotated
//! certificate is really in use (`pgkeep pki rotate` runs it against every listener it touched).
//!
//! The server is verified as a careful client would (chain to the given CA, the given host
//! name), so the probe also proves that the listener is usable; a client certificate can be
//! presented for listeners that require one (etcd). PostgreSQL is reached as libpq does: an
//! `SSLRequest` first, then the handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use secrecy::zeroize::Zeroizing;

use super::pem::{certs_from_pem, read_file};
use super::{CertInfo, PkiError, inspect_der};

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// A listener to probe.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The host name its certificate must carry (and the SNI sent).
    pub server_name: String,
    /// True for PostgreSQL (`SSLRequest` before the handshake).
    pub postgres: bool,
}

/// Connects to `listener`, verifies its certificate against the CA(s) in `ca` and its name, and
/// describes the certificate it presented. `client` (certificate, key) is presented when given.
pub fn presented(
    listener: &Listener,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    timeout: Duration,
) -> Result<CertInfo, PkiError> {
    let label = PathBuf::from(format!("{} ({})", listener.addr, listener.server_name));
    let fail = |reason: String| PkiError::Probe {
        target: label.display().to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for der in certs_from_pem(&read_file(ca)?, ca)? {
        roots.add(der).map_err(|e| PkiError::Certificate {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = certs_from_pem(&read_file(cert)?, cert)?;
            let key_bytes = Zeroizing::new(read_file(key)?);
            let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| PkiError::Key {
                path: key.to_path_buf(),
                reason: format!("no usable private key ({e})"),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| fail(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(listener.server_name.clone())
        .map_err(|e| fail(format!("server name: {e}")))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| fail(e.to_string()))?;

    let mut sock = TcpStream::connect_timeout(&listener.addr, timeout)
        .map_err(|e| fail(format!("connect: {e}")))?;
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .and_then(|()| sock.set_nodelay(true))
        .map_err(|e| fail(e.to_string()))?;
    if listener.postgres {
        sock.write_all(&SSL_REQUEST)
            .map_err(|e| fail(format!("SSLRequest: {e}")))?;
        let mut answer = [0u8; 1];
        sock.read_exact(&mut answer)
            .map_err(|e| fail(format!("SSLRequest: {e}")))?;
        if answer[0] != b'S' {
            return Err(fail("the server does not offer TLS".to_owned()));
        }
    }
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| fail(format!("TLS handshake: {e}")))?;
    }
    let Some(der) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err(fail("no certificate presented".to_owned()));
    };
    let info = inspect_der(der, &label, time::OffsetDateTime::now_utc(), 1)?;
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertRequest, Usage};
    use std::net::TcpListener;

    /// A one-shot TLS server on 127.0.0.1 presenting `cert`.
    fn serve_once(issued: &crate::pki::Issued, postgres: bool) -> SocketAddr {
        use secrecy::ExposeSecret;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let chain = vec![issued.cert_der().clone()];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.expose_secret().as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            if postgres {
                let mut req = [0u8; 8];
                sock.read_exact(&mut req).unwrap();
                assert_eq!(req, SSL_REQUEST);
                sock.write_all(b"S").unwrap();
            }
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            while conn.is_handshaking() {
                if conn.complete_io(&mut sock).is_err() {
                    return;
                }
            }
            let _ = conn.complete_io(&mut sock);
        });
        addr
    }

    #[test]
    fn reports_the_presented_certificate_and_verifies_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("probe CA", 10).unwrap();
        let ca_file = ca.write(dir.path()).unwrap().cert;
        let issued = ca
            .issue(&CertRequest {
                common_name: "srv".into(),
                usage: Usage::Server,
                dns_names: vec!["srv.example".into()],
                ip_addresses: vec![],
                validity_days: 2,
            })
            .unwrap();
        let written = issued.write(dir.path(), "srv").unwrap();
        let want = crate::pki::inspect(&written.cert).unwrap().serial;
        for postgres in [false, true] {
            let addr = serve_once(&issued, postgres);
            let l = Listener {
                addr,
                server_name: "srv.example".into(),
                postgres,
            };
            let got = presented(&l, &ca_file, None, Duration::from_secs(5)).unwrap();
            assert_eq!(got.serial, want);
            assert_eq!(got.subject_cn, "srv");
        }
        // Another name: refused like a careful client would.
        let addr = serve_once(&issued, false);
        let l = Listener {
            addr,
            server_name: "other.example".into(),
            postgres: false,
        };
        let err = presented(&l, &ca_file, None, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("other.example"), "{err}");
    }
}
