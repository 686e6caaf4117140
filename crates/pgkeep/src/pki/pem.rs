//! Reading PEM files: certificates and private keys, with errors that name the file.
//!
//! Private keys are accepted in the three plaintext encodings found in practice: PKCS#8
//! (`PRIVATE KEY`, what pgkeep writes), SEC1 (`EC PRIVATE KEY`, what `openssl ecparam -genkey`
//! writes) and PKCS#1 (`RSA PRIVATE KEY`). The signing backend only takes PKCS#8, so SEC1 and
//! PKCS#1 keys are wrapped into a PKCS#8 structure here; that is a few bytes of DER framing around
//! the unchanged key. Encrypted keys are refused with a message that says so.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rcgen::KeyPair;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::zeroize::Zeroizing;

use super::PkiError;

/// Largest PEM file read (certificate bundles and keys are a few kilobytes).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Reads a whole file, refusing anything larger than [`MAX_PEM_BYTES`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, PkiError> {
    let read_err = |source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: format!(
                "file is larger than {MAX_PEM_BYTES} bytes; not a PEM certificate or key"
            ),
        });
    }
    Ok(bytes)
}

/// A short, secret-free description of a PEM syntax error.
fn describe(err: &pem::Error, what: &str) -> String {
    match err {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line".to_owned(),
        pem::Error::Base64Decode(_) => "invalid base64 inside a PEM section".to_owned(),
        pem::Error::NoItemsFound => format!("no {what} found in the file"),
        pem::Error::SectionTooLarge => "a PEM section is too large".to_owned(),
        other => format!("unreadable PEM: {other}"),
    }
}

/// Every `CERTIFICATE` section of a PEM buffer, in file order; at least one.
pub(crate) fn certs_from_pem(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            reason: describe(&e, "certificate"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE section found in the file".to_owned(),
        });
    }
    Ok(certs)
}

/// Parses the first private key of a PEM buffer into a signing key.
pub(crate) fn key_from_pem(bytes: &[u8], path: &Path) -> Result<KeyPair, PkiError> {
    let key_err = |reason: String| PkiError::Key {
        path: path.to_path_buf(),
        reason,
    };
    if contains(bytes, b"ENCRYPTED PRIVATE KEY") || contains(bytes, b"Proc-Type: 4,ENCRYPTED") {
        return Err(key_err(
            "the key is encrypted; pgkeep needs a plaintext key (kept mode 0600)".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| PkiError::Pem {
        path: path.to_path_buf(),
        reason: describe(&e, "private key"),
    })?;
    let parse_err = |e: rcgen::Error| key_err(format!("unsupported or damaged key ({e})"));
    match &key {
        PrivateKeyDer::Pkcs8(der) => KeyPair::try_from(der.secret_pkcs8_der()).map_err(parse_err),
        PrivateKeyDer::Sec1(der) => {
            // The curve is named inside the SEC1 structure; try the ones the backend signs with.
            let mut last = None;
            for curve in [OID_P256, OID_P384] {
                let pkcs8 = Zeroizing::new(wrap_pkcs8(&ec_algorithm(curve), der.secret_sec1_der()));
                match KeyPair::try_from(pkcs8.as_slice()) {
                    Ok(k) => return Ok(k),
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) => parse_err(e),
                None => key_err("unsupported EC key".to_owned()),
            })
        }
        PrivateKeyDer::Pkcs1(der) => {
            let pkcs8 = Zeroizing::new(wrap_pkcs8(&rsa_algorithm(), der.secret_pkcs1_der()));
            KeyPair::try_from(pkcs8.as_slice()).map_err(parse_err)
        }
        _ => Err(key_err("unsupported private key encoding".to_owned())),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// DER OID content of id-ecPublicKey (1.2.840.10045.2.1).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER OID content of prime256v1 (1.2.840.10045.3.1.7).
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID content of secp384r1 (1.3.132.0.34).
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER OID content of rsaEncryption (1.2.840.113549.1.1.1).
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// One DER TLV with a definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        // Short form; the cast cannot truncate.
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = &bytes[skip..];
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

/// AlgorithmIdentifier for an EC key on the given named curve.
fn ec_algorithm(curve: &[u8]) -> Vec<u8> {
    let mut inner = tlv(TAG_OID, OID_EC_PUBLIC_KEY);
    inner.extend(tlv(TAG_OID, curve));
    tlv(TAG_SEQUENCE, &inner)
}

/// AlgorithmIdentifier for an RSA key (rsaEncryption with NULL parameters).
fn rsa_algorithm() -> Vec<u8> {
    let mut inner = tlv(TAG_OID, OID_RSA);
    inner.extend(tlv(TAG_NULL, &[]));
    tlv(TAG_SEQUENCE, &inner)
}

/// PKCS#8 PrivateKeyInfo (RFC 5208): version 0, the algorithm, the key as an OCTET STRING.
fn wrap_pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut inner = Zeroizing::new(tlv(TAG_INTEGER, &[0]));
    inner.extend_from_slice(algorithm);
    inner.extend(Zeroizing::new(tlv(TAG_OCTET_STRING, key)).iter());
    tlv(TAG_SEQUENCE, &inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_lengths() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 0x02, 1, 2]);
        let long = vec![0u8; 200];
        assert_eq!(&tlv(0x04, &long)[..3], &[0x04, 0x81, 200]);
        let longer = vec![0u8; 300];
        assert_eq!(&tlv(0x04, &longer)[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn encrypted_key_is_refused_by_name() {
        let pem =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = key_from_pem(pem, Path::new("/x/org.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/org.key") && err.contains("encrypted"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_refused_by_name() {
        let err = key_from_pem(b"hello", Path::new("/x/k.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/k.pem") && err.contains("no private key"),
            "{err}"
        );
        let err = certs_from_pem(b"hello", Path::new("/x/c.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/c.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
    }
}
