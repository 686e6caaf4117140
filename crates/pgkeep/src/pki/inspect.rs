//! Reading a certificate back: names, validity, usages, subject alternative names.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::PkiError;
use super::pem::{certs_from_pem, read_file};

/// What a certificate says, as shown by `pgkeep pki show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// The file the certificate was read from (the first certificate of the file).
    pub path: PathBuf,
    /// Subject common name (empty if none).
    pub subject_cn: String,
    /// The whole subject name, e.g. `CN=node1`.
    pub subject: String,
    /// Issuer common name (empty if none).
    pub issuer_cn: String,
    /// The whole issuer name.
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// Start of validity.
    #[serde(serialize_with = "rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(serialize_with = "rfc3339")]
    pub not_after: OffsetDateTime,
    /// Seconds from the time of inspection to `not_after`; negative once expired.
    pub seconds_left: i64,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
    /// Whether subject and issuer names are the same.
    pub self_issued: bool,
    /// Key usage bits, e.g. `digitalSignature`, `keyCertSign`.
    pub key_usage: Vec<String>,
    /// Extended key usages, e.g. `serverAuth`, `clientAuth` (other OIDs in dotted form).
    pub ekus: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Public key type and size, e.g. `EC 256` or `RSA 2048`.
    pub public_key: String,
    /// How many certificates the file holds (a bundle shows its first one).
    pub certificates_in_file: usize,
}

impl CertInfo {
    /// Whole days left until expiry, rounded down (negative once expired).
    pub fn days_left(&self) -> i64 {
        self.seconds_left.div_euclid(86_400)
    }

    /// True once `not_after` has passed (at the time of inspection).
    pub fn is_expired(&self) -> bool {
        self.seconds_left < 0
    }
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&super::format_time(*t))
}

/// Reads the first certificate of a PEM file and describes it, with `seconds_left` counted
/// from now.
pub fn inspect(path: &Path) -> Result<CertInfo, PkiError> {
    let bytes = read_file(path)?;
    inspect_pem(&bytes, path, OffsetDateTime::now_utc())
}

/// Like [`inspect`] for PEM already in memory; `path` is used in errors and in the result,
/// `now` is the reference time for `seconds_left`.
pub fn inspect_pem(pem: &[u8], path: &Path, now: OffsetDateTime) -> Result<CertInfo, PkiError> {
    let certs = certs_from_pem(pem, path)?;
    let Some(der) = certs.first() else {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE section found in the file".to_owned(),
        });
    };
    inspect_der(der, path, now, certs.len())
}

/// Describes one DER certificate; `path` names it in errors and in the result (for a
/// certificate presented by a server, its address), `in_file` is how many certificates came
/// with it.
pub fn inspect_der(
    der: &[u8],
    path: &Path,
    now: OffsetDateTime,
    in_file: usize,
) -> Result<CertInfo, PkiError> {
    let bad = |reason: String| PkiError::Certificate {
        path: path.to_path_buf(),
        reason,
    };
    let (_, x509) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;

    let first_cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let not_before = x509.validity().not_before.to_datetime();
    let not_after = x509.validity().not_after.to_datetime();

    let is_ca = match x509.basic_constraints() {
        Ok(bc) => bc.is_some_and(|bc| bc.value.ca),
        Err(e) => return Err(bad(format!("basicConstraints: {e}"))),
    };
    let key_usage = match x509.key_usage() {
        Ok(Some(ku)) => {
            let ku = ku.value;
            [
                (ku.digital_signature(), "digitalSignature"),
                (ku.non_repudiation(), "nonRepudiation"),
                (ku.key_encipherment(), "keyEncipherment"),
                (ku.data_encipherment(), "dataEncipherment"),
                (ku.key_agreement(), "keyAgreement"),
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
                (ku.encipher_only(), "encipherOnly"),
                (ku.decipher_only(), "decipherOnly"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_owned())
            .collect()
        }
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad(format!("keyUsage: {e}"))),
    };
    let ekus = match x509.extended_key_usage() {
        Ok(Some(eku)) => {
            let eku = eku.value;
            let mut out: Vec<String> = [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_owned())
            .collect();
            out.extend(eku.other.iter().map(|oid| oid.to_id_string()));
            out
        }
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad(format!("extendedKeyUsage: {e}"))),
    };
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    match x509.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            ip_addresses.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(None) => {}
        Err(e) => return Err(bad(format!("subjectAltName: {e}"))),
    }
    let public_key = match x509.public_key().parsed() {
        Ok(PublicKey::EC(ec)) => format!("EC {}", ec.key_size()),
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(_) | Err(_) => x509.public_key().algorithm.algorithm.to_id_string(),
    };

    Ok(CertInfo {
        path: path.to_path_buf(),
        subject_cn: first_cn(x509.subject()),
        subject: x509.subject().to_string(),
        issuer_cn: first_cn(x509.issuer()),
        issuer: x509.issuer().to_string(),
        serial: x509.raw_serial_as_string(),
        not_before,
        not_after,
        seconds_left: (not_after - now).whole_seconds(),
        is_ca,
        self_issued: x509.subject().as_raw() == x509.issuer().as_raw(),
        key_usage,
        ekus,
        dns_names,
        ip_addresses,
        public_key,
        certificates_in_file: in_file,
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}
