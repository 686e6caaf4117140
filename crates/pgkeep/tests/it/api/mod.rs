//! REST API over HTTPS, in process on 127.0.0.1 with certificates made at test time: health
//! codes from published snapshots, anonymous answers that describe nothing, the access check of
//! protected endpoints (basic auth, client-certificate names, source allowlist), refused
//! plaintext and untrusted clients, malformed requests, keep-alive, and the state-changing
//! switchover/failover, configuration, restart, reinitialize and reload endpoints against fake
//! control handles.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep::api::{self, ApiClient, ApiSnapshot, BoundServer, MemberStatus, Xlog};
use pgkeep::config::{BasicAuth, RestApi, TlsFiles, VerifyClient};
use pgkeep::pki::{Ca, CertRequest, Usage};
use pgkeep_core::cluster::{ClusterView, Lsn, RawEntry};
use secrecy::SecretString;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MB: u64 = 1 << 20;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A CA, a server certificate for 127.0.0.1, and client certificates, in a temporary directory.
struct Pki {
    dir: TempDir,
    ca: Ca,
    ca_cert: PathBuf,
    server: TlsFiles,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("pgkeep api test CA", 31).unwrap();
        let ca_cert = ca.write(dir.path()).unwrap().cert;
        let issued = ca
            .issue(&CertRequest {
                common_name: "restapi-node1".into(),
                usage: Usage::Server,
                dns_names: vec!["localhost".into()],
                ip_addresses: vec![LOCALHOST],
                validity_days: 30,
            })
            .unwrap()
            .write(dir.path(), "restapi-node1")
            .unwrap();
        Pki {
            server: TlsFiles {
                cert: issued.cert,
                key: issued.key,
            },
            dir,
            ca,
            ca_cert,
        }
    }

    fn ca_pem(&self) -> &[u8] {
        self.ca.cert_pem().as_bytes()
    }

    /// A client certificate with common name `cn`, written as `<cn>.crt`/`<cn>.key`.
    fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let f = self
            .ca
            .issue(&CertRequest {
                common_name: cn.into(),
                usage: Usage::Client,
                dns_names: vec![],
                ip_addresses: vec![],
                validity_days: 30,
            })
            .unwrap()
            .write(self.dir.path(), cn)
            .unwrap();
        (f.cert, f.key)
    }

    /// REST API settings: TLS, nothing else.
    fn restapi(&self) -> RestApi {
        RestApi {
            listen: SocketAddr::new(LOCALHOST, 0),
            connect_address: "127.0.0.1:0".into(),
            tls: Some(self.server.clone()),
            cafile: None,
            verify_client: VerifyClient::None,
            authentication: None,
            allowlist: Vec::new(),
            allowlist_include_members: false,
            allowed_client_names: Vec::new(),
        }
    }

    fn with_basic_auth(&self) -> RestApi {
        let mut c = self.restapi();
        c.authentication = Some(BasicAuth {
            username: "admin".into(),
            password: SecretString::from("correct horse"),
        });
        c
    }

    /// A client trusting this CA, optionally with a client certificate.
    fn client_for(&self, identity: Option<(&Path, &Path)>) -> ApiClient {
        let mut b = ApiClient::builder(self.ca_pem()).unwrap();
        if let Some((cert, key)) = identity {
            b = b.identity_files(cert, key).unwrap();
        }
        b.build().unwrap()
    }

    fn basic_client(&self, password: &str) -> ApiClient {
        ApiClient::builder(self.ca_pem())
            .unwrap()
            .basic_auth("admin", SecretString::from(password))
            .build()
            .unwrap()
    }
}

fn entry(suffix: &str, value: &str) -> RawEntry {
    RawEntry {
        suffix: suffix.into(),
        value: value.as_bytes().to_vec(),
        mod_revision: 3,
        lease: 0,
    }
}

fn view() -> Arc<ClusterView> {
    let (view, rejected) = ClusterView::from_entries(&[
        entry("leader", "node1"),
        entry(
            "config",
            r#"{"ttl":30,"loop_wait":10,"maximum_lag_on_failover":1048576}"#,
        ),
        entry(
            "history",
            r#"[[1,25623960,"no recovery target specified","2026-01-01T00:00:00+00:00","node1"]]"#,
        ),
        entry("status", &format!(r#"{{"optime":{}}}"#, 100 * MB)),
        entry(
            "members/node1",
            r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","api_url":"https://127.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.4","xlog_location":104857600,"timeline":2}"#,
        ),
        entry(
            "members/node2",
            r#"{"conn_url":"postgres://127.0.0.2:5432/postgres","api_url":"https://127.0.0.2:8008/patroni","state":"running","role":"replica","version":"4.1.4","xlog_location":102760448,"replay_lsn":102760448,"receive_lsn":104857600,"replication_state":"streaming","timeline":2}"#,
        ),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");
    Arc::new(view)
}

fn later(secs: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(secs))
}

fn leader_snapshot() -> ApiSnapshot {
    let mut s = ApiSnapshot::new("demo-scope", "node1");
    s.status.state = "running".into();
    s.status.role = "primary".into();
    s.status.server_version = Some(150018);
    s.status.timeline = Some(2);
    s.status.xlog = Some(Xlog::Primary {
        location: Lsn(100 * MB),
    });
    s.status.database_system_identifier = Some("7301234567890123456".into());
    s.lease_deadline = later(60);
    s.dcs_fresh_until = later(60);
    s.loop_deadline = later(60);
    s.cluster = Some(view());
    s
}

/// A streaming replica `lag_mb` MB behind the leader's optime, tagged `dc=east`.
fn replica_snapshot(lag_mb: u64) -> ApiSnapshot {
    let mut s = ApiSnapshot::new("demo-scope", "node2");
    s.status.state = "running".into();
    s.status.role = "replica".into();
    s.status.replication_state = Some("streaming".into());
    s.status.xlog = Some(Xlog::Replica {
        received_location: Lsn(100 * MB),
        replayed_location: Lsn((100 - lag_mb) * MB),
        replayed_timestamp: None,
        paused: false,
    });
    s.status
        .tags
        .other
        .insert("dc".into(), Value::String("east".into()));
    s.latest_end_lsn = Some(Lsn(100 * MB));
    s.dcs_fresh_until = later(60);
    s.loop_deadline = later(60);
    s.cluster = Some(view());
    s
}

/// A server on 127.0.0.1:0 and the means to feed and stop it.
struct Running {
    server: BoundServer,
    publish: watch::Sender<Arc<ApiSnapshot>>,
    stop: CancellationToken,
    base: String,
}

impl Running {
    async fn start(cfg: &RestApi, snapshot: ApiSnapshot) -> Running {
        Running::start_with(cfg, snapshot, None).await
    }

    /// A server whose state-changing endpoints write through `control`.
    async fn start_with(
        cfg: &RestApi,
        snapshot: ApiSnapshot,
        control: Option<Arc<dyn api::Control>>,
    ) -> Running {
        let (publish, rx) = watch::channel(Arc::new(snapshot));
        let stop = CancellationToken::new();
        let server = api::serve(cfg, rx, control, stop.clone())
            .await
            .expect("server starts");
        let base = format!("https://127.0.0.1:{}", server.local_addr().port());
        Running {
            server,
            publish,
            stop,
            base,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn set(&self, snapshot: ApiSnapshot) {
        self.publish.send_replace(Arc::new(snapshot));
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server.stopped())
            .await
            .expect("server stops within 10 s")
            .expect("server stops cleanly");
    }
}

async fn code(client: &ApiClient, url: &str) -> u16 {
    client
        .get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status
}

fn error_of(resp: &api::ApiResponse) -> String {
    let v: Value = resp
        .json()
        .unwrap_or_else(|e| panic!("error body is JSON ({e}): {}", resp.text()));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {v}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Health checks

mod access;
mod health;
mod ops;
mod switchover;
