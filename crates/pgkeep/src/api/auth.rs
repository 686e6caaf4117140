//! The access check of protected endpoints.
//!
//! Every protected endpoint (`/patroni`, `/cluster`, `/config`, `/history` and every
//! state-changing endpoint) sits behind `guard`, installed with `route_layer` on the router
//! that holds them, so no handler of that router can be reached without passing it.
//!
//! The checks run in Patroni's order, each with its own answer:
//!
//! 0. Nothing configured to authenticate callers (no basic auth, no client certificates, no
//!    allowed client names): **403** `no authentication configured`. pgkeep never leaves these
//!    endpoints open by omission; a source-network allowlist alone does not authenticate.
//! 1. Source network: when `restapi.allowlist` is non-empty or `allowlist_include_members` is
//!    set, the peer address must be in one of the networks or be a member's address, else
//!    **403** `access is denied`.
//! 2. Client certificate: when `verify_client` is `optional` or `required`, or
//!    `allowed_client_names` is non-empty, the connection must carry a certificate that the TLS
//!    layer verified against `restapi.cafile` (chain, validity, `clientAuth` usage), else
//!    **403** `client certificate required`. With `allowed_client_names` non-empty its subject
//!    common name must be one of them, else **403** `client certificate name not allowed`
//!    (pgkeep's addition: Patroni accepts any certificate the CA signed).
//! 3. Basic authentication, when configured: no `Authorization` header gives **401** `no auth
//!    header received`, a wrong one **401** `not authenticated`, both with
//!    `WWW-Authenticate: Basic realm="pgkeep"`. The comparison takes the same time whatever the
//!    input (it depends only on the length of the configured credentials).
//!
//! Denials are logged at `info` with the peer address and the reason; credentials never are.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum_server::tls::TlsInfo;
use base64::Engine;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretSlice};
use subtle::{Choice, ConstantTimeEq};

use super::handlers::{AppState, json_response};
use super::json::error_body;
use crate::config::{RestApi, VerifyClient};

/// Who passed the access check, for handlers that want to know.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The common name of the verified client certificate, if one was presented.
    pub client_cn: Option<String>,
    /// Basic authentication was checked and matched.
    pub basic_auth: bool,
    /// The user name basic authentication matched (never the password).
    pub basic_user: Option<String>,
}

impl Identity {
    /// Who the caller is, for audit logs: `cn=<certificate CN>` and/or `user=<basic-auth user>`
    /// (never a credential), or `unidentified`.
    pub fn principal(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cn) = &self.client_cn {
            parts.push(format!("cn={cn}"));
        }
        if let Some(user) = &self.basic_user {
            parts.push(format!("user={user}"));
        } else if self.basic_auth {
            parts.push("user=?".to_owned());
        }
        if parts.is_empty() {
            "unidentified".to_owned()
        } else {
            parts.join(",")
        }
    }
}

/// Why the access check refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Nothing is configured to authenticate callers.
    NotConfigured,
    /// The source address is not allowed.
    SourceNotAllowed,
    /// No verified client certificate.
    CertificateRequired,
    /// The certificate's common name is not in `allowed_client_names`.
    CertificateNameNotAllowed,
    /// Basic authentication is configured and no `Authorization` header came.
    NoAuthHeader,
    /// The credentials are wrong or malformed.
    NotAuthenticated,
}

impl Denied {
    /// The HTTP status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Denied::NoAuthHeader | Denied::NotAuthenticated => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// The error text of the answer.
    pub fn message(self) -> &'static str {
        match self {
            Denied::NotConfigured => "no authentication configured",
            Denied::SourceNotAllowed => "access is denied",
            Denied::CertificateRequired => "client certificate required",
            Denied::CertificateNameNotAllowed => "client certificate name not allowed",
            Denied::NoAuthHeader => "no auth header received",
            Denied::NotAuthenticated => "not authenticated",
        }
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let mut resp = json_response(self.status(), error_body(self.message()));
        if self.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"pgkeep\""),
            );
        }
        resp
    }
}

/// The facts about one request the access check looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The peer's address.
    pub peer: IpAddr,
    /// The verified client certificate (DER), if the connection carries one.
    pub client_cert: Option<&'a [u8]>,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a HeaderValue>,
    /// Members' addresses (for `allowlist_include_members`).
    pub member_addrs: &'a [IpAddr],
}

/// The access policy, built once from `restapi`.
pub struct AccessPolicy {
    /// `user:password`, the decoded form of a basic-auth token.
    basic: Option<SecretSlice<u8>>,
    basic_user: Option<String>,
    cert_required: bool,
    allowed_names: Vec<String>,
    allowlist: Vec<IpNet>,
    include_members: bool,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("basic_auth", &self.basic.is_some())
            .field("cert_required", &self.cert_required)
            .field("allowed_names", &self.allowed_names)
            .field("allowlist", &self.allowlist)
            .field("include_members", &self.include_members)
            .finish()
    }
}

impl AccessPolicy {
    /// The policy `restapi` describes.
    pub fn from_config(cfg: &RestApi) -> AccessPolicy {
        let basic = cfg.authentication.as_ref().map(|a| {
            let mut v = Vec::with_capacity(a.username.len() + 1 + a.password.expose_secret().len());
            v.extend_from_slice(a.username.as_bytes());
            v.push(b':');
            v.extend_from_slice(a.password.expose_secret().as_bytes());
            SecretSlice::from(v)
        });
        AccessPolicy {
            basic,
            basic_user: cfg.authentication.as_ref().map(|a| a.username.clone()),
            cert_required: cfg.verify_client != VerifyClient::None
                || !cfg.allowed_client_names.is_empty(),
            allowed_names: cfg.allowed_client_names.clone(),
            allowlist: cfg.allowlist.clone(),
            include_members: cfg.allowlist_include_members,
        }
    }

    /// True when at least one mechanism authenticates callers.
    pub fn is_configured(&self) -> bool {
        self.basic.is_some() || self.cert_required
    }

    /// Runs the checks in order; the first failure decides.
    pub fn check(&self, req: &RequestFacts<'_>) -> Result<Identity, Denied> {
        if !self.is_configured() {
            return Err(Denied::NotConfigured);
        }
        if !self.allowlist.is_empty() || self.include_members {
            let peer = req.peer.to_canonical();
            let allowed = self.allowlist.iter().any(|n| n.contains(&peer))
                || (self.include_members
                    && req.member_addrs.iter().any(|a| a.to_canonical() == peer));
            if !allowed {
                return Err(Denied::SourceNotAllowed);
            }
        }
        let mut identity = Identity::default();
        if self.cert_required {
            let der = req.client_cert.ok_or(Denied::CertificateRequired)?;
            let cn = common_name(der);
            if !self.allowed_names.is_empty()
                && !cn
                    .as_ref()
                    .is_some_and(|cn| self.allowed_names.contains(cn))
            {
                return Err(Denied::CertificateNameNotAllowed);
            }
            identity.client_cn = cn;
        }
        if let Some(expected) = &self.basic {
            let header = req.authorization.ok_or(Denied::NoAuthHeader)?;
            let provided = decode_basic(header).ok_or(Denied::NotAuthenticated)?;
            if !bool::from(ct_eq_padded(expected.expose_secret(), &provided)) {
                return Err(Denied::NotAuthenticated);
            }
            identity.basic_auth = true;
            identity.basic_user = self.basic_user.clone();
        }
        Ok(identity)
    }
}

/// The decoded `user:password` of a `Basic` authorization header.
fn decode_basic(header: &HeaderValue) -> Option<Vec<u8>> {
    let text = header.to_str().ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()
}

/// Constant-time equality whose running time depends only on `expected.len()`: the provided
/// bytes are compared position by position against `expected` (padding with a byte that never
/// matches once they run out), and the lengths are compared separately.
fn ct_eq_padded(expected: &[u8], provided: &[u8]) -> Choice {
    let mut eq = (expected.len() as u64).ct_eq(&(provided.len() as u64));
    for (i, e) in expected.iter().enumerate() {
        let p = provided.get(i).copied().unwrap_or(!*e);
        eq &= e.ct_eq(&p);
    }
    eq
}

/// The first subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The address in an `api_url` (`https://10.0.0.1:8008/patroni`), when its host is an IP
/// literal.
pub fn api_url_ip(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    let host = authority.split(':').next()?;
    host.parse().ok()
}

/// Runs the access check for a request.
pub(super) fn check_request(
    state: &AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    tls: Option<&Arc<TlsInfo>>,
) -> Result<Identity, Denied> {
    let snapshot = state.snapshot();
    let members: Vec<IpAddr> = if state.policy.include_members {
        let from_view = snapshot
            .cluster
            .iter()
            .flat_map(|v| v.members.values())
            .filter_map(|m| api_url_ip(&m.data.api_url));
        snapshot
            .member_addrs
            .iter()
            .copied()
            .chain(from_view)
            .collect()
    } else {
        Vec::new()
    };
    state.policy.check(&RequestFacts {
        peer,
        client_cert: tls
            .and_then(|t| t.peer_certificates.first())
            .map(Vec::as_slice),
        authorization: headers.get(AUTHORIZATION),
        member_addrs: &members,
    })
}

/// The middleware of protected routes: passes the request on with its [`Identity`] in the
/// extensions, or answers 401/403.
pub(super) async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let tls = req.extensions().get::<Arc<TlsInfo>>().cloned();
    match check_request(&state, peer.ip(), req.headers(), tls.as_ref()) {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(denied) => {
            tracing::info!(
                peer = %peer.ip(),
                method = %req.method(),
                path = %req.uri().path(),
                reason = denied.message(),
                "REST API access denied"
            );
            denied.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BasicAuth;
    use secrecy::SecretString;

    fn cfg() -> RestApi {
        RestApi {
            listen: "127.0.0.1:0".parse().unwrap(),
            connect_address: "127.0.0.1:0".into(),
            tls: None,
            cafile: None,
            verify_client: VerifyClient::None,
            authentication: None,
            allowlist: Vec::new(),
            allowlist_include_members: false,
            allowed_client_names: Vec::new(),
        }
    }

    fn basic(user: &str, pass: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    fn facts<'a>(peer: &str, auth: Option<&'a HeaderValue>) -> RequestFacts<'a> {
        RequestFacts {
            peer: peer.parse().unwrap(),
            client_cert: None,
            authorization: auth,
            member_addrs: &[],
        }
    }

    #[test]
    fn nothing_configured_refuses_everyone() {
        let p = AccessPolicy::from_config(&cfg());
        let mut c = cfg();
        c.allowlist = vec!["127.0.0.0/8".parse().unwrap()];
        let p2 = AccessPolicy::from_config(&c);
        for p in [p, p2] {
            assert_eq!(
                p.check(&facts("127.0.0.1", None)),
                Err(Denied::NotConfigured)
            );
        }
    }

    #[test]
    fn basic_auth_and_allowlist_order() {
        let mut c = cfg();
        c.authentication = Some(BasicAuth {
            username: "admin".into(),
            password: SecretString::from("s3cret"),
        });
        c.allowlist = vec!["10.0.0.0/8".parse().unwrap()];
        let p = AccessPolicy::from_config(&c);
        let good = basic("admin", "s3cret");
        let bad = basic("admin", "s3cre");
        let long = basic("admin", "s3cret-and-more");
        // Allowlist first: even good credentials from elsewhere are refused.
        assert_eq!(
            p.check(&facts("192.168.1.1", Some(&good))),
            Err(Denied::SourceNotAllowed)
        );
        assert_eq!(p.check(&facts("10.1.2.3", None)), Err(Denied::NoAuthHeader));
        assert_eq!(
            p.check(&facts("10.1.2.3", Some(&bad))),
            Err(Denied::NotAuthenticated)
        );
        assert_eq!(
            p.check(&facts("10.1.2.3", Some(&long))),
            Err(Denied::NotAuthenticated)
        );
        let garbage = HeaderValue::from_static("Basic !!!");
        assert_eq!(
            p.check(&facts("10.1.2.3", Some(&garbage))),
            Err(Denied::NotAuthenticated)
        );
        let bearer = HeaderValue::from_static("Bearer abc");
        assert_eq!(
            p.check(&facts("10.1.2.3", Some(&bearer))),
            Err(Denied::NotAuthenticated)
        );
        let id = p.check(&facts("10.1.2.3", Some(&good))).unwrap();
        assert!(id.basic_auth);
        assert_eq!(id.principal(), "user=admin");
        assert_eq!(Identity::default().principal(), "unidentified");
        // IPv4-mapped IPv6 peers match IPv4 networks.
        assert!(p.check(&facts("::ffff:10.1.2.3", Some(&good))).is_ok());
    }

    #[test]
    fn members_only_allowlist() {
        let mut c = cfg();
        c.authentication = Some(BasicAuth {
            username: "u".into(),
            password: SecretString::from("p"),
        });
        c.allowlist_include_members = true;
        let p = AccessPolicy::from_config(&c);
        let good = basic("u", "p");
        let members = ["10.0.0.2".parse().unwrap()];
        let mut f = facts("10.0.0.2", Some(&good));
        f.member_addrs = &members;
        assert!(p.check(&f).is_ok());
        f.peer = "10.0.0.3".parse().unwrap();
        assert_eq!(p.check(&f), Err(Denied::SourceNotAllowed));
    }

    #[test]
    fn certificate_required_when_names_are_listed() {
        let mut c = cfg();
        c.allowed_client_names = vec!["ops".into()];
        let p = AccessPolicy::from_config(&c);
        assert!(p.is_configured());
        assert_eq!(
            p.check(&facts("127.0.0.1", None)),
            Err(Denied::CertificateRequired)
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(bool::from(ct_eq_padded(b"abc", b"abc")));
        assert!(!bool::from(ct_eq_padded(b"abc", b"abd")));
        assert!(!bool::from(ct_eq_padded(b"abc", b"ab")));
        assert!(!bool::from(ct_eq_padded(b"abc", b"abcd")));
        assert!(!bool::from(ct_eq_padded(b"abc", b"")));
        assert!(bool::from(ct_eq_padded(b"", b"")));
    }

    #[test]
    fn api_url_hosts() {
        assert_eq!(
            api_url_ip("https://10.0.0.1:8008/patroni"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            api_url_ip("https://[::1]:8008/patroni"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(api_url_ip("https://node1:8008/patroni"), None);
        assert_eq!(api_url_ip(""), None);
    }
}
