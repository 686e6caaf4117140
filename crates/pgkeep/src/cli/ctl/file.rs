//! The file `pgkeep ctl` reads: `D/ctl.yml` or a node's `node.yml`. Both have Patroni's
//! `scope`, `namespace`, `etcd3` and `ctl` sections (a node.yml also `restapi`, whose `cafile`
//! and `authentication` are the fallbacks of `ctl.cacert` and `ctl.authentication`, as in
//! Patroni); other top-level sections are ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pgkeep_core::policy::GucName;
use secrecy::SecretString;
use serde::Deserialize;

use crate::api::ApiClient;
use crate::dcs::{EtcdSettings, TlsFiles};

/// A list Patroni also accepts as one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Hosts {
    List(Vec<String>),
    Text(String),
}

/// The `etcd3` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdSection {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    hosts: Option<Hosts>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    cacert: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
}

/// Basic-auth credentials: an inline password or a 0600 password file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSection")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// The `ctl` section (Patroni's `insecure` and `keyfile_password` are refused: pgkeep always
/// verifies the REST API's certificate and reads unencrypted keys only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CtlSection {
    #[serde(default)]
    cacert: Option<PathBuf>,
    #[serde(default)]
    certfile: Option<PathBuf>,
    #[serde(default)]
    keyfile: Option<PathBuf>,
    #[serde(default)]
    authentication: Option<AuthSection>,
}

/// The fallbacks `ctl` takes from a node's `restapi` section (other keys ignored).
#[derive(Debug, Default, Deserialize)]
struct RestApiSection {
    #[serde(default)]
    cafile: Option<PathBuf>,
    #[serde(default)]
    authentication: Option<AuthSection>,
}

/// The part of a node's `pgkeep` section `ctl` uses (other keys ignored).
#[derive(Debug, Default, Deserialize)]
struct PgkeepSection {
    #[serde(default)]
    dynamic_parameter_allowlist: Vec<String>,
}

/// What `ctl` reads from its file.
#[derive(Debug, Deserialize)]
struct CtlFile {
    scope: String,
    #[serde(default)]
    namespace: Option<String>,
    etcd3: EtcdSection,
    #[serde(default)]
    ctl: Option<CtlSection>,
    #[serde(default)]
    restapi: Option<RestApiSection>,
    #[serde(default)]
    pgkeep: Option<PgkeepSection>,
}

/// How `ctl` reaches the agents' REST APIs. Secrets are read only when a client is built.
#[derive(Debug, Clone)]
pub(super) struct RestSettings {
    file: PathBuf,
    cacert: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    auth: Option<AuthSection>,
}

impl RestSettings {
    /// A client with this CA, client certificate and basic auth, and `timeout` per request.
    pub(super) fn client(&self, timeout: Duration) -> Result<ApiClient> {
        let file = self.file.display();
        let Some(ca) = &self.cacert else {
            bail!("{file}: ctl.cacert: name the CA of the REST API certificates");
        };
        let mut b = ApiClient::builder(
            &std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
        )?
        .timeout(timeout);
        if let Some((cert, key)) = &self.identity {
            b = b.identity_files(cert, key)?;
        }
        if let Some(a) = &self.auth {
            b = b.basic_auth(&a.username, password(&self.file, a)?);
        }
        Ok(b.build()?)
    }
}

fn password(file: &Path, a: &AuthSection) -> Result<SecretString> {
    match (&a.password, &a.password_file) {
        (Some(p), None) => Ok(SecretString::from(p.clone())),
        (None, Some(pf)) => {
            let meta =
                std::fs::metadata(pf).with_context(|| format!("reading {}", pf.display()))?;
            if crate::fsutil::readable_by_others(&meta) {
                bail!(
                    "{} is readable by group or others; run `chmod 600` on it",
                    pf.display()
                );
            }
            let text =
                std::fs::read_to_string(pf).with_context(|| format!("reading {}", pf.display()))?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                bail!("{} is empty", pf.display());
            }
            Ok(SecretString::from(text.to_owned()))
        }
        _ => bail!(
            "{}: authentication: set password or password_file (exactly one)",
            file.display()
        ),
    }
}

/// The whole file: etcd and REST settings.
#[derive(Debug)]
pub(super) struct Loaded {
    /// etcd.
    pub(super) etcd: EtcdSettings,
    /// The REST APIs.
    pub(super) rest: RestSettings,
    /// `pgkeep.dynamic_parameter_allowlist` of a node's file (empty in `ctl.yml`): what
    /// `edit-config` checks a change with before sending it (the leader checks again with its
    /// own).
    pub(super) allowlist: BTreeSet<GucName>,
}

/// Reads and checks the file.
pub(super) fn load(path: &Path) -> Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid YAML: {e}", path.display()))?;
    let f: CtlFile = serde_path_to_error::deserialize(&doc)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    let e = f.etcd3;
    let mut hosts: Vec<String> = match e.hosts {
        None => Vec::new(),
        Some(Hosts::List(v)) => v,
        Some(Hosts::Text(t)) => t.split(',').map(|s| s.trim().to_owned()).collect(),
    };
    hosts.extend(e.host);
    hosts.retain(|h| !h.is_empty());
    if hosts.is_empty() {
        bail!(
            "{}: etcd3.hosts: list at least one host:port",
            path.display()
        );
    }
    let protocol = e.protocol.unwrap_or_else(|| "https".into());
    if protocol != "https" {
        bail!(
            "{}: etcd3.protocol: pgkeep ctl talks to etcd over https only",
            path.display()
        );
    }
    let (Some(ca), Some(cert), Some(key)) = (e.cacert, e.cert, e.key) else {
        bail!(
            "{}: etcd3: set cacert, cert and key (mutual TLS)",
            path.display()
        );
    };
    let mut allowlist = BTreeSet::new();
    for (i, n) in f
        .pgkeep
        .unwrap_or_default()
        .dynamic_parameter_allowlist
        .iter()
        .enumerate()
    {
        let name = GucName::parse(n).map_err(|e| {
            anyhow::anyhow!(
                "{}: pgkeep.dynamic_parameter_allowlist[{i}]: {e}",
                path.display()
            )
        })?;
        allowlist.insert(name);
    }
    let ctl = f.ctl.unwrap_or_default();
    let restapi = f.restapi.unwrap_or_default();
    let identity = match (ctl.certfile, ctl.keyfile) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("{}: ctl: set certfile and keyfile together", path.display()),
    };
    Ok(Loaded {
        etcd: EtcdSettings {
            endpoints: hosts.into_iter().map(|h| format!("https://{h}")).collect(),
            tls: Some(TlsFiles { ca, cert, key }),
            namespace: f.namespace.unwrap_or_else(|| "/service/".into()),
            scope: f.scope,
            request_timeout: Duration::from_secs(5),
            insecure: false,
        },
        rest: RestSettings {
            file: path.to_owned(),
            cacert: ctl.cacert.or(restapi.cafile),
            identity,
            auth: ctl.authentication.or(restapi.authentication),
        },
        allowlist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_node_config_is_a_ctl_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.yml");
        std::fs::write(
            &f,
            "scope: demo\nname: node1\nrestapi: {listen: '127.0.0.1:1', cafile: /ca.crt, authentication: {username: u, password: p}}\netcd3:\n  hosts: a:1,b:2\n  cacert: /ca\n  cert: /c\n  key: /k\n",
        )
        .unwrap();
        let s = load(&f).unwrap();
        assert_eq!(s.etcd.endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(s.etcd.namespace, "/service/");
        assert_eq!(s.rest.cacert.as_deref(), Some(Path::new("/ca.crt")));
        assert_eq!(s.rest.auth.as_ref().unwrap().username, "u");
        std::fs::write(&f, "scope: demo\netcd3: {hosts: [a:1], protocol: http}\n").unwrap();
        assert!(load(&f).unwrap_err().to_string().contains("https only"));
    }

    #[test]
    fn ctl_section_and_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = dir.path().join("ctl.yml");
        std::fs::write(
            &f,
            format!(
                "scope: demo\netcd3: {{hosts: [a:1], cacert: /ca, cert: /c, key: /k}}\nctl:\n  cacert: /rest-ca\n  certfile: /op.crt\n  keyfile: /op.key\n  authentication: {{username: admin, password_file: {}}}\n",
                pw.display()
            ),
        )
        .unwrap();
        let s = load(&f).unwrap();
        assert_eq!(s.rest.cacert.as_deref(), Some(Path::new("/rest-ca")));
        assert_eq!(
            s.rest.identity,
            Some((PathBuf::from("/op.crt"), PathBuf::from("/op.key")))
        );
        let a = s.rest.auth.clone().unwrap();
        let e = password(&f, &a).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(password(&f, &a).unwrap().expose_secret(), "s3cret");
        std::fs::write(
            &f,
            "scope: demo\netcd3: {hosts: [a:1], cacert: /ca, cert: /c, key: /k}\nctl: {insecure: true}\n",
        )
        .unwrap();
        assert!(load(&f).unwrap_err().to_string().contains("insecure"));
    }
}
