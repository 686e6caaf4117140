//! The certificate authority: create, load, write, issue.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use secrecy::SecretString;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::pem::{certs_from_pem, key_from_pem, read_file};
use super::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, CaFiles, CertRequest, Issued, MAX_DAYS, PkiError, Usage,
    ensure_dir, format_time, write_file,
};

/// Longest common name X.509 allows (`ub-common-name`).
const MAX_CN_LEN: usize = 64;

/// A certificate authority able to sign leaf certificates: its certificate and its key.
pub struct Ca {
    /// The CA certificate file's text (PEM); for a loaded CA, the file as read.
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// DER of the CA's subject name, which every issued certificate must carry as its issuer.
    subject_raw: Vec<u8>,
    common_name: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// Where the certificate was loaded from; `None` for a CA created in memory.
    origin: Option<PathBuf>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &self.common_name)
            .field("not_before", &format_time(self.not_before))
            .field("not_after", &format_time(self.not_after))
            .field("origin", &self.origin)
            .field("key", &"[elided]")
            .finish()
    }
}

impl Ca {
    /// Creates a new self-signed CA with an ECDSA P-256 key: `CA:TRUE, pathlen:0`, key usage
    /// `keyCertSign, cRLSign`, valid from one hour ago for `validity_days` days.
    pub fn create(common_name: &str, validity_days: u32) -> Result<Ca, PkiError> {
        check_common_name(common_name)?;
        check_days(validity_days)?;
        let now = now_utc();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + time::Duration::days(i64::from(validity_days));
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Self::from_parts(cert_pem, cert.der().clone(), key, None, None)
    }

    /// Loads an existing CA: an organisation's CA or one written by [`Ca::write`].
    ///
    /// The first certificate in `cert_path` is the CA. It must be a CA certificate allowed to
    /// sign certificates and currently valid; the key in `key_path` must be its key and must not
    /// be readable by group or others.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let bytes = read_file(cert_path)?;
        let cert_pem = String::from_utf8(bytes).map_err(|_| PkiError::Pem {
            path: cert_path.to_path_buf(),
            reason: "not a text (PEM) file".to_owned(),
        })?;
        let certs = certs_from_pem(cert_pem.as_bytes(), cert_path)?;
        let Some(cert_der) = certs.into_iter().next() else {
            return Err(PkiError::Pem {
                path: cert_path.to_path_buf(),
                reason: "no PEM CERTIFICATE section found in the file".to_owned(),
            });
        };

        let meta = std::fs::metadata(key_path).map_err(|source| PkiError::Read {
            path: key_path.to_path_buf(),
            source,
        })?;
        if crate::fsutil::readable_by_others(&meta) {
            return Err(PkiError::KeyPermissions {
                path: key_path.to_path_buf(),
                mode: meta.permissions().mode() & 0o7777,
            });
        }
        let key_bytes = secrecy::zeroize::Zeroizing::new(read_file(key_path)?);
        let key = key_from_pem(&key_bytes, key_path)?;

        let ca = Self::from_parts(
            cert_pem,
            cert_der,
            key,
            Some(cert_path.to_path_buf()),
            Some(key_path.to_path_buf()),
        )?;
        let now = now_utc();
        if now < ca.not_before {
            return Err(ca.validity_error(format!(
                "the CA is not valid before {}",
                format_time(ca.not_before)
            )));
        }
        if now > ca.not_after {
            return Err(
                ca.validity_error(format!("the CA expired on {}", format_time(ca.not_after)))
            );
        }
        Ok(ca)
    }

    /// Checks the certificate and key and builds the signer.
    fn from_parts(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        cert_path: Option<PathBuf>,
        key_path: Option<PathBuf>,
    ) -> Result<Ca, PkiError> {
        let path = cert_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("(new CA)"));
        let not_ca = |reason: &str| PkiError::NotCa {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| PkiError::Certificate {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(not_ca("basicConstraints does not say CA:TRUE")),
            Err(e) => return Err(not_ca(&format!("unreadable basicConstraints: {e}"))),
        }
        match x509.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(not_ca("its key usage does not include keyCertSign"));
            }
            Ok(_) => {}
            Err(e) => return Err(not_ca(&format!("unreadable keyUsage: {e}"))),
        }
        if key.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                cert: path.clone(),
                key: key_path.unwrap_or_else(|| PathBuf::from("(new CA key)")),
            });
        }
        let common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let not_before = x509.validity().not_before.to_datetime();
        let not_after = x509.validity().not_after.to_datetime();
        let subject_raw = x509.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            not_ca(&format!(
                "its subject name cannot be used as an issuer name ({e}); multi-valued RDNs are not supported"
            ))
        })?;
        let ca = Ca {
            cert_pem,
            cert_der,
            subject_raw,
            common_name,
            not_before,
            not_after,
            origin: cert_path,
            issuer,
        };
        // Prove that a certificate issued now names this CA byte for byte (rcgen rebuilds the
        // name, which fails for repeated attribute types such as DC=example,DC=com).
        if ca.origin.is_some() {
            let probe = CertRequest {
                common_name: "pgkeep-probe".to_owned(),
                usage: Usage::Client,
                dns_names: Vec::new(),
                ip_addresses: Vec::new(),
                validity_days: 1,
            };
            match ca.issue_at(
                &probe,
                now_utc().min(ca.not_after - time::Duration::days(1)),
            ) {
                Err(PkiError::CaValidity { .. }) | Ok(_) => {}
                Err(PkiError::Generate(reason)) => return Err(not_ca(&reason)),
                Err(e) => return Err(e),
            }
        }
        Ok(ca)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating it if needed, and returns
    /// their paths. Existing files are replaced atomically; callers decide whether they may be.
    pub fn write(&self, dir: &Path) -> Result<CaFiles, PkiError> {
        ensure_dir(dir)?;
        let files = CaFiles {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        };
        let key_pem = secrecy::zeroize::Zeroizing::new(self.issuer.key().serialize_pem());
        write_file(&files.key, key_pem.as_bytes(), 0o600)?;
        self.write_cert(&files.cert)?;
        Ok(files)
    }

    /// Writes only the CA certificate (mode 0644) to `path`, e.g. to distribute the trust anchor
    /// of an organisation CA whose key stays where it is.
    pub fn write_cert(&self, path: &Path) -> Result<(), PkiError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(dir)?;
        }
        write_file(path, self.cert_pem.as_bytes(), 0o644)
    }

    /// The CA certificate, PEM (for a loaded CA: the certificate file as read).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER (for a rustls root store).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's subject common name (empty if it has none).
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// Start of the CA's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the CA's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The file the CA certificate was loaded from, if any.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key, valid from one hour ago for
    /// `req.validity_days` days. Fails if the request is invalid or would outlive the CA.
    pub fn issue(&self, req: &CertRequest) -> Result<Issued, PkiError> {
        self.issue_at(req, now_utc())
    }

    fn issue_at(&self, req: &CertRequest, now: OffsetDateTime) -> Result<Issued, PkiError> {
        if req.common_name.is_empty() {
            if req.usage != Usage::Client {
                return Err(PkiError::InvalidRequest(
                    "only a client-only certificate may have no common name".to_owned(),
                ));
            }
        } else {
            check_common_name(&req.common_name)?;
        }
        check_days(req.validity_days)?;
        let sans = subject_alt_names(req)?;
        if req.usage.is_server() && sans.is_empty() {
            return Err(PkiError::InvalidRequest(format!(
                "server certificate {:?} needs at least one DNS name or IP address",
                req.common_name
            )));
        }
        if now > self.not_after {
            return Err(
                self.validity_error(format!("the CA expired on {}", format_time(self.not_after)))
            );
        }
        let not_after = now + time::Duration::days(i64::from(req.validity_days));
        if not_after > self.not_after {
            let max_days = (self.not_after - now).whole_days();
            return Err(self.validity_error(format!(
                "the CA expires on {}, before the requested end of validity {}; ask for at most {} days or renew the CA",
                format_time(self.not_after),
                format_time(not_after),
                max_days
            )));
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(&req.common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match req.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - super::CLOCK_SKEW).max(self.not_before);
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer)?;

        let (_, parsed) = X509Certificate::from_der(cert.der())
            .map_err(|e| PkiError::Generate(format!("cannot re-read the new certificate: {e}")))?;
        if parsed.issuer().as_raw() != self.subject_raw.as_slice() {
            return Err(PkiError::Generate(
                "the issuer name of the new certificate does not match the CA's subject byte for byte"
                    .to_owned(),
            ));
        }
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: SecretString::from(key.serialize_pem()),
            cert_der: cert.der().clone(),
        })
    }

    fn validity_error(&self, reason: String) -> PkiError {
        let ca = match &self.origin {
            Some(path) => format!("CA {:?} ({})", self.common_name, path.display()),
            None => format!("CA {:?}", self.common_name),
        };
        PkiError::CaValidity { ca, reason }
    }
}

/// The current time in UTC, whole seconds (what X.509 can represent).
fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// `CN=<cn>`; for an empty `cn` (a client certificate that must name no user, see
/// [`super::Service::EtcdGateway`]) `O=pgkeep, OU=password-authenticated client` instead, so the
/// subject is not empty.
fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if cn.is_empty() {
        dn.push(DnType::OrganizationName, "pgkeep");
        dn.push(
            DnType::OrganizationalUnitName,
            "password-authenticated client",
        );
    } else {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

/// 128 random bits from the system's secure generator, top bit clear, first byte non-zero (so
/// the DER INTEGER is positive and exactly 16 bytes long).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate("the system random generator failed".to_owned()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn check_common_name(cn: &str) -> Result<(), PkiError> {
    if cn.is_empty() || cn.chars().count() > MAX_CN_LEN || cn.chars().any(char::is_control) {
        return Err(PkiError::InvalidRequest(format!(
            "common name {cn:?} must be 1 to {MAX_CN_LEN} printable characters"
        )));
    }
    if cn.trim() != cn {
        return Err(PkiError::InvalidRequest(format!(
            "common name {cn:?} must not start or end with white space"
        )));
    }
    Ok(())
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if days == 0 || days > MAX_DAYS {
        return Err(PkiError::InvalidRequest(format!(
            "validity of {days} days is out of range (1 to {MAX_DAYS})"
        )));
    }
    Ok(())
}

/// Validated, de-duplicated SANs: DNS names first, then addresses.
fn subject_alt_names(req: &CertRequest) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    let mut seen_dns: Vec<String> = Vec::new();
    for name in &req.dns_names {
        let lower = name.to_ascii_lowercase();
        if seen_dns.contains(&lower) {
            continue;
        }
        check_dns_name(name)?;
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| PkiError::InvalidRequest(format!("DNS name {name:?} is not ASCII")))?;
        sans.push(SanType::DnsName(ia5));
        seen_dns.push(lower);
    }
    let mut seen_ips = Vec::new();
    for ip in &req.ip_addresses {
        if !seen_ips.contains(ip) {
            seen_ips.push(*ip);
            sans.push(SanType::IpAddress(*ip));
        }
    }
    Ok(sans)
}

fn check_dns_name(name: &str) -> Result<(), PkiError> {
    let bad = |why: &str| PkiError::InvalidRequest(format!("DNS name {name:?} {why}"));
    if name.contains('*') {
        return Err(bad("is a wildcard; pgkeep issues one certificate per host"));
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(bad(
            "is an IP address; give it as an address, not a host name",
        ));
    }
    if name.ends_with('.') {
        return Err(bad("must not end with a dot"));
    }
    rustls_pki_types::DnsName::try_from(name)
        .map(|_| ())
        .map_err(|_| bad("is not a valid host name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(usage: Usage) -> CertRequest {
        CertRequest {
            common_name: "x".to_owned(),
            usage,
            dns_names: vec!["a.example".to_owned(), "A.example".to_owned()],
            ip_addresses: vec!["127.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            validity_days: 1,
        }
    }

    #[test]
    fn sans_are_deduplicated() {
        let sans = subject_alt_names(&req(Usage::Server)).unwrap();
        assert_eq!(sans.len(), 2);
    }

    #[test]
    fn bad_dns_names_are_refused() {
        for name in ["*.example", "10.0.0.1", "a..b", "host.", "-x y", ""] {
            assert!(check_dns_name(name).is_err(), "{name:?} accepted");
        }
        for name in ["localhost", "db-1.example.com", "n1"] {
            assert!(check_dns_name(name).is_ok(), "{name:?} refused");
        }
    }

    #[test]
    fn common_name_and_days_limits() {
        assert!(check_common_name("").is_err());
        assert!(check_common_name(&"a".repeat(65)).is_err());
        assert!(check_common_name(" a").is_err());
        assert!(check_common_name("a\nb").is_err());
        assert!(check_common_name(&"a".repeat(64)).is_ok());
        assert!(check_days(0).is_err());
        assert!(check_days(MAX_DAYS + 1).is_err());
        assert!(check_days(MAX_DAYS).is_ok());
    }

    #[test]
    fn serials_are_positive_16_bytes_and_distinct() {
        let a = random_serial().unwrap().to_bytes();
        let b = random_serial().unwrap().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn leaf_may_not_outlive_the_ca() {
        let ca = Ca::create("short CA", 10).unwrap();
        let mut r = req(Usage::Server);
        r.validity_days = 11;
        let err = ca.issue(&r).unwrap_err().to_string();
        // 10 days when both fall in the same second, else 9.
        assert!(
            err.contains("short CA") && err.contains("at most "),
            "{err}"
        );
        assert!(err.contains("10 days") || err.contains("9 days"), "{err}");
        r.validity_days = 9;
        ca.issue(&r).unwrap();
    }

    #[test]
    fn server_needs_a_san_client_does_not() {
        let ca = Ca::create("CA", 10).unwrap();
        let mut r = req(Usage::Server);
        r.dns_names.clear();
        r.ip_addresses.clear();
        assert!(matches!(ca.issue(&r), Err(PkiError::InvalidRequest(_))));
        r.usage = Usage::Client;
        ca.issue(&r).unwrap();
    }

    #[test]
    fn only_client_certificates_may_lack_a_common_name() {
        let ca = Ca::create("CA", 10).unwrap();
        let mut r = req(Usage::Client);
        r.common_name.clear();
        r.dns_names.clear();
        r.ip_addresses.clear();
        let issued = ca.issue(&r).unwrap();
        let info = super::super::inspect_pem(issued.cert_pem.as_bytes(), Path::new("x"), now_utc())
            .unwrap();
        assert_eq!(info.subject_cn, "");
        assert!(info.subject.contains("O=pgkeep"), "{}", info.subject);
        let mut s = req(Usage::ServerAndClient);
        s.common_name.clear();
        assert!(matches!(ca.issue(&s), Err(PkiError::InvalidRequest(_))));
    }

    #[test]
    fn expired_ca_cannot_issue() {
        let ca = Ca::create("old CA", 1).unwrap();
        let later = now_utc() + time::Duration::days(2);
        let err = ca
            .issue_at(&req(Usage::Client), later)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let ca = Ca::create("CA", 10).unwrap();
        let issued = ca.issue(&req(Usage::Client)).unwrap();
        let dbg = format!("{ca:?} {issued:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }
}
