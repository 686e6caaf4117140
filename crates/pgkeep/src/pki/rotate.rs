//! Replacing a certificate and its key in place, for services that read them while running.
//!
//! A service that re-reads its files (etcd on every new connection, PostgreSQL on reload) must
//! never see a key that nobody can read or a key without its certificate. So both files are
//! first written completely beside their targets, with their final mode and owner, and only
//! then renamed over the old ones, the key first and the certificate right after: the window
//! in which a reader could pair a new key with the old certificate is two `rename` calls, and
//! a handshake that falls into it fails once and is retried by its client.

use std::fs;
use std::path::Path;

use secrecy::ExposeSecret;

use super::{DEFAULT_LEAF_DAYS, Issued, IssuedFiles, PkiError, check_basename, ensure_dir};

/// The validity of a renewed leaf: `requested` days, or by default [`DEFAULT_LEAF_DAYS`]
/// shortened to what is left of the CA's life (true in the second field when shortened). An
/// explicit request that outlives the CA fails later, when the CA issues.
pub fn leaf_days(requested: Option<u32>, ca_not_after: time::OffsetDateTime) -> (u32, bool) {
    if let Some(days) = requested {
        return (days, false);
    }
    let left = (ca_not_after - time::OffsetDateTime::now_utc()).whole_days();
    if left < i64::from(DEFAULT_LEAF_DAYS) {
        (u32::try_from(left.max(1)).unwrap_or(1), true)
    } else {
        (DEFAULT_LEAF_DAYS, false)
    }
}

/// Writes `<dir>/<basename>.key` (0600) and `<dir>/<basename>.crt` (0644) owned by `owner`
/// (uid, gid; the caller's when `None`), replacing existing files as described in the module
/// documentation.
pub fn replace_pair(
    issued: &Issued,
    dir: &Path,
    basename: &str,
    owner: Option<(u32, u32)>,
) -> Result<IssuedFiles, PkiError> {
    check_basename(basename)?;
    ensure_dir(dir)?;
    let files = IssuedFiles {
        cert: dir.join(format!("{basename}.crt")),
        key: dir.join(format!("{basename}.key")),
    };
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Write { path, source }
    };
    let key_tmp = crate::fsutil::write_staged(
        &files.key,
        issued.key_pem.expose_secret().as_bytes(),
        0o600,
        owner,
    )
    .map_err(write_err(&files.key))?;
    let cert_tmp =
        match crate::fsutil::write_staged(&files.cert, issued.cert_pem.as_bytes(), 0o644, owner) {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(&key_tmp);
                return Err(write_err(&files.cert)(e));
            }
        };
    if let Err(e) = fs::rename(&key_tmp, &files.key) {
        let _ = fs::remove_file(&key_tmp);
        let _ = fs::remove_file(&cert_tmp);
        return Err(write_err(&files.key)(e));
    }
    if let Err(e) = fs::rename(&cert_tmp, &files.cert) {
        let _ = fs::remove_file(&cert_tmp);
        return Err(write_err(&files.cert)(e));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(dir))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertRequest, Usage, inspect};
    use std::os::unix::fs::MetadataExt;

    fn client(ca: &Ca) -> Issued {
        ca.issue(&CertRequest {
            common_name: "pgkeep-n1".into(),
            usage: Usage::Client,
            dns_names: vec![],
            ip_addresses: vec![],
            validity_days: 3,
        })
        .unwrap()
    }

    #[test]
    fn replaces_both_files_with_modes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("CA", 30).unwrap();
        let first = client(&ca).write(dir.path(), "etcd-client-n1").unwrap();
        let old = inspect(&first.cert).unwrap().serial;
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let files = replace_pair(&client(&ca), dir.path(), "etcd-client-n1", Some(me)).unwrap();
        assert_eq!(files, first);
        assert_ne!(inspect(&files.cert).unwrap().serial, old);
        let key = fs::metadata(&files.key).unwrap();
        assert_eq!(key.mode() & 0o777, 0o600);
        assert_eq!((key.uid(), key.gid()), me);
        assert_eq!(fs::metadata(&files.cert).unwrap().mode() & 0o777, 0o644);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // The key belongs to the certificate.
        let key_pem = fs::read(&files.key).unwrap();
        let kp = crate::pki::pem::key_from_pem(&key_pem, &files.key).unwrap();
        let cert_pem = fs::read(&files.cert).unwrap();
        let der = &crate::pki::pem::certs_from_pem(&cert_pem, &files.cert).unwrap()[0];
        use x509_parser::prelude::FromDer;
        let (_, x509) = x509_parser::prelude::X509Certificate::from_der(der).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(
            kp.der_bytes(),
            x509.public_key().subject_public_key.data.as_ref()
        );
    }

    #[test]
    fn default_validity_follows_the_ca() {
        let now = time::OffsetDateTime::now_utc();
        assert_eq!(
            leaf_days(None, now + time::Duration::days(3650)),
            (DEFAULT_LEAF_DAYS, false)
        );
        let (days, short) = leaf_days(None, now + time::Duration::days(100));
        assert!(short && (99..=100).contains(&days), "{days}");
        assert_eq!(
            leaf_days(Some(5), now + time::Duration::days(1)),
            (5, false)
        );
    }
}
