//! REST clients the real-cluster tests share.

use std::time::Duration;

use pgkeep::api::ApiClient;
use pgkeep_testkit::{API_USER, AgentCluster, Env};
use secrecy::SecretString;

/// REST clients of a test cluster and a runtime to drive them.
pub(crate) struct Clients {
    /// The operator: client certificate and basic auth (60 s per request: a switchover waits).
    pub(crate) operator: ApiClient,
    /// No credentials at all, trusting the cluster CA.
    pub(crate) anonymous: ApiClient,
    /// A current-thread runtime for `block_on`.
    pub(crate) rt: tokio::runtime::Runtime,
}

impl Clients {
    pub(crate) fn new(env: &Env, c: &AgentCluster) -> Clients {
        let ca = std::fs::read(env.ca_cert_path()).unwrap();
        let operator = ApiClient::builder(&ca)
            .unwrap()
            .identity_files(&c.operator_cert, &c.operator_key)
            .unwrap()
            .basic_auth(API_USER, SecretString::from(c.api_password.clone()))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let anonymous = ApiClient::builder(&ca).unwrap().build().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Clients {
            operator,
            anonymous,
            rt,
        }
    }
}
