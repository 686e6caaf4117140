//! PKI: a certificate authority, server and client certificates, and inspection.
//!
//! Everything is pure Rust (rcgen to build certificates, x509-parser to read them); nothing shells
//! out to `openssl`.
//!
//! # What gets issued
//!
//! - **Keys** are ECDSA P-256, generated fresh for every certificate, written as PKCS#8 PEM with
//!   mode 0600. Certificates are written with mode 0644. Writes are atomic
//!   ([`crate::fsutil::write_atomic`]).
//! - **Validity** is always explicit: `not_before` is the current time minus one hour (so a peer
//!   whose clock is a little behind still accepts a fresh certificate) and `not_after` is the
//!   current time plus the requested number of days. Defaults: [`DEFAULT_CA_DAYS`] for a CA,
//!   [`DEFAULT_LEAF_DAYS`] for a leaf. A leaf may not outlive its CA: asking for more is an
//!   error, not a silent truncation.
//! - **Serial numbers** are 128 random bits (the top bit cleared so the DER integer is positive).
//! - **The CA** created by pgkeep has `basicConstraints CA:TRUE, pathlen:0` (it signs leaves
//!   only), key usage `keyCertSign, cRLSign`, and no extended key usage.
//! - **Leaves** have `basicConstraints CA:FALSE`, key usage `digitalSignature`, an authority key
//!   identifier, and the extended key usage of their [`Usage`]: `serverAuth`, `clientAuth`, or
//!   both. Server certificates must carry at least one DNS name or IP address (TLS clients check
//!   the subject alternative names, never the common name).
//!
//! # An organisation's CA
//!
//! [`Ca::load`] reads an existing CA certificate and key (PKCS#8, SEC1 `EC PRIVATE KEY` or
//! PKCS#1 `RSA PRIVATE KEY`; P-256, P-384 or RSA). It checks that the certificate is a CA that may
//! sign certificates, that the key belongs to it, that it is currently valid, and that its
//! subject name can be reproduced byte for byte as the issuer of new certificates (otherwise TLS
//! peers could not link a leaf to it). The key file must not be readable by group or others. The
//! first certificate of the CA file is the issuer; leaves are written without a chain, so the
//! organisation CA should be the certificate every peer trusts.
//!
//! # One identity per service
//!
//! [`Service`] maps each component of a cluster to a certificate profile so that one service's
//! certificate is never another service's client identity (the `--service` of `pgkeep pki
//! issue`). `<name>` is the node or member name given with `--name`:
//!
//! | service | usage | common name | SANs | files |
//! |---|---|---|---|---|
//! | `postgres` | server | first host name (else first address) | required | `postgres-<name>` |
//! | `etcd-server` | server + client | `etcd-server-<name>` | required | `etcd-server-<name>` |
//! | `etcd-client` | client | `pgkeep-<name>` | none | `etcd-client-<name>` |
//! | `etcd-root` | client | `root` | none | `etcd-root-<name>` |
//! | `etcd-gateway` | client | none (`O=pgkeep, OU=password-authenticated client`) | none | `etcd-gateway-<name>` |
//! | `restapi` | server | `restapi-<name>` | required | `restapi-<name>` |
//! | `restapi-client` | client | `restapi-client-<name>` | none | `restapi-client-<name>` |
//! | `pgbackrest` | server | `pgbackrest-<name>` | required | `pgbackrest-<name>` |
//! | `pgbackrest-client` | client | `pgbackrest-client-<name>` | none | `pgbackrest-client-<name>` |
//! | `haproxy` | client | `haproxy-<name>` | none | `haproxy-<name>` |
//! | `replication` | client | role, default `replicator` | none | `replication-<name>` |
//! | `rewind` | client | role, default `rewind_user` | none | `rewind-<name>` |
//! | `operator` | client | `operator-<name>` | none | `operator-<name>` |
//!
//! Why these rules:
//!
//! - etcd server certificates carry `clientAuth` as well as `serverAuth` because etcd's own gRPC
//!   gateway dials its client port with the server certificate, and the same certificate serves
//!   peer TLS. Their common name `etcd-server-<name>` is not the name of any etcd user, so with
//!   `--client-cert-auth` the certificate grants no etcd permissions if presented as a client.
//! - An agent's etcd identity is `pgkeep-<name>`: the etcd user that holds the cluster's keys.
//!   etcd user names belong to the etcd profiles alone: `root` (`etcd-root`, etcd's
//!   administrator, used only to manage users and roles), `pgkeep-*` (`etcd-client`) and
//!   password users, whose names contain `@` ([`is_etcd_identity`]). No other profile can carry
//!   such a common name: theirs start with their service name, and a `postgres` host name or a
//!   `replication`/`rewind` role that is an etcd user name is refused. So a certificate issued
//!   for another purpose by the same CA is never an etcd identity.
//! - `etcd-gateway` certificates have no common name. etcd's JSON gateway (which `patronictl`
//!   uses) cannot authenticate by certificate and, once authentication is on, refuses any client
//!   certificate that has a common name; such a client presents this one for TLS and logs in
//!   with a password user. Over gRPC the certificate is no etcd user and may do nothing.
//! - `replication` and `rewind` certificates are for PostgreSQL `cert` authentication, where the
//!   common name must equal the role; `--role` overrides the default role name. The role
//!   `postgres` is refused: superuser access is by peer authentication over the Unix socket only.
//! - Server-only certificates (`postgres`, `restapi`, `pgbackrest`) lack `clientAuth`, so etcd,
//!   PostgreSQL and the REST API reject them as client identities whatever their common name.
//! - Client-only certificates carry no host names or addresses: their identity is the common name.
//! - A load balancer's name is simply one more `--host` on the `postgres` (and, if health checks
//!   go through it, `restapi`) certificates.

mod ca;
mod inspect;
mod pem;
pub mod probe;
pub mod rotate;
mod service;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

pub use ca::Ca;
pub use inspect::{CertInfo, inspect, inspect_der, inspect_pem};
pub use service::{ETCD_CLIENT_CN_PREFIX, ETCD_ROOT_CN, Service, ServiceCert, is_etcd_identity};

/// Default validity of a CA created by pgkeep, in days (about ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a server or client certificate, in days (the CA/Browser Forum's cap).
pub const DEFAULT_LEAF_DAYS: u32 = 397;
/// Longest validity pgkeep will put into any certificate, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// How far `not_before` is set in the past, to tolerate clock skew between hosts.
pub const CLOCK_SKEW: time::Duration = time::Duration::hours(1);

/// Errors of the PKI module. Variants that involve a file name it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM, or holds no section of the kind needed.
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A PEM certificate section does not hold a usable X.509 certificate.
    #[error("{}: not a usable X.509 certificate: {reason}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key cannot be used.
    #[error("{}: {reason}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never any key material).
        reason: String,
    },
    /// A private key file is readable by group or others.
    #[error(
        "{}: private key is readable by group or others (mode {mode:04o}); run chmod 600 on it",
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The certificate given as a CA cannot sign certificates.
    #[error("{}: not a usable CA certificate: {reason}", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error(
        "{} does not belong to {}: their public keys differ",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The CA is expired, not yet valid, or would expire before the requested certificate.
    #[error("{ca}: {reason}")]
    CaValidity {
        /// The CA: its common name and the file it came from, if any.
        ca: String,
        /// What is wrong.
        reason: String,
    },
    /// The certificate request is invalid (bad name, missing SAN, validity out of range...).
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    /// Building or signing the certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// A listener could not be reached or did not present a verifiable certificate.
    #[error("{target}: {reason}")]
    Probe {
        /// The listener: address and expected name.
        target: String,
        /// What went wrong.
        reason: String,
    },
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// What a leaf certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// TLS server only (`serverAuth`).
    Server,
    /// TLS client only (`clientAuth`).
    Client,
    /// Both (`serverAuth` and `clientAuth`), e.g. etcd members.
    ServerAndClient,
}

impl Usage {
    /// True when the certificate may authenticate a TLS server.
    pub fn is_server(self) -> bool {
        matches!(self, Usage::Server | Usage::ServerAndClient)
    }

    /// True when the certificate may authenticate a TLS client.
    pub fn is_client(self) -> bool {
        matches!(self, Usage::Client | Usage::ServerAndClient)
    }

    /// A short human name: `server`, `client` or `server+client`.
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Server => "server",
            Usage::Client => "client",
            Usage::ServerAndClient => "server+client",
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request for a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// Subject common name (1 to 64 characters). For client certificates this is the identity
    /// peers map to a user or role. Empty only for a client-only certificate that must name no
    /// one (its subject is then `O=pgkeep, OU=password-authenticated client`).
    pub common_name: String,
    /// Server, client or both.
    pub usage: Usage,
    /// DNS subject alternative names (no wildcards). Duplicates are dropped.
    pub dns_names: Vec<String>,
    /// IP subject alternative names. Duplicates are dropped.
    pub ip_addresses: Vec<IpAddr>,
    /// Validity in days from now (1 to [`MAX_DAYS`], and not past the CA's own expiry).
    pub validity_days: u32,
}

/// A freshly issued certificate and its private key.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM; zeroized on drop, redacted in `Debug`.
    pub key_pem: SecretString,
    cert_der: rustls_pki_types::CertificateDer<'static>,
}

/// Paths of a written CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca.crt`, mode 0644.
    pub cert: PathBuf,
    /// `ca.key`, mode 0600.
    pub key: PathBuf,
}

/// Paths of a written leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    /// `<basename>.crt`, mode 0644.
    pub cert: PathBuf,
    /// `<basename>.key`, mode 0600.
    pub key: PathBuf,
}

/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";

impl Issued {
    /// The certificate in DER, e.g. for a rustls configuration.
    pub fn cert_der(&self) -> &rustls_pki_types::CertificateDer<'static> {
        &self.cert_der
    }

    /// Writes `<dir>/<basename>.crt` (0644) and `<dir>/<basename>.key` (0600), creating `dir`
    /// if needed. Existing files are replaced atomically; the key is written first.
    pub fn write(&self, dir: &Path, basename: &str) -> Result<IssuedFiles, PkiError> {
        check_basename(basename)?;
        ensure_dir(dir)?;
        let files = IssuedFiles {
            cert: dir.join(format!("{basename}.crt")),
            key: dir.join(format!("{basename}.key")),
        };
        write_file(&files.key, self.key_pem.expose_secret().as_bytes(), 0o600)?;
        write_file(&files.cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// A file base name must be a plain, visible file name.
fn check_basename(basename: &str) -> Result<(), PkiError> {
    let ok = !basename.is_empty()
        && !basename.starts_with('.')
        && basename.len() <= 200
        && basename
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidRequest(format!(
            "file base name {basename:?} must be letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Creates `dir` (and parents) with mode 0755 when missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    crate::fsutil::write_atomic(path, bytes, mode).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Formats a time as RFC 3339 in UTC with second precision, e.g. `2026-03-01T12:00:00Z`.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests;
