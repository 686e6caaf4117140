//! Certificate profiles per service: usage, common name and file name (see the module docs of
//! [`crate::pki`] for the table and the reasons).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::{CertRequest, PkiError, Usage};

/// Longest node or member name accepted (so every derived common name fits in 64 characters).
const MAX_NAME_LEN: usize = 40;
/// Longest PostgreSQL role name (NAMEDATALEN - 1).
const MAX_ROLE_LEN: usize = 63;

/// The common name of the `etcd-root` profile: etcd's `root` user.
pub const ETCD_ROOT_CN: &str = "root";
/// What every `etcd-client` common name starts with (`pgkeep-<name>`).
pub const ETCD_CLIENT_CN_PREFIX: &str = "pgkeep-";

/// True when `cn` is, or could be, the name of an etcd user of a pgkeep cluster: `root`, a
/// certificate user `pgkeep-*`, or a password user (`*@*`, e.g. `patronictl@demo`). With
/// `--client-cert-auth` etcd takes a client certificate's common name as its user name, so only
/// the `etcd-client` and `etcd-root` profiles may produce such a name; every other profile
/// either has its own prefix or refuses it (compared without regard to case).
pub fn is_etcd_identity(cn: &str) -> bool {
    let lower = cn.to_ascii_lowercase();
    lower == ETCD_ROOT_CN || lower.starts_with(ETCD_CLIENT_CN_PREFIX) || lower.contains('@')
}

/// A component of the cluster that gets its own certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// PostgreSQL's server certificate (`ssl_cert_file`).
    Postgres,
    /// An etcd member: client-facing and peer TLS, server and client usage.
    EtcdServer,
    /// An agent's client identity on etcd (etcd user `pgkeep-<name>`).
    EtcdClient,
    /// etcd's `root` user (CN `root`): user and role management by `pgkeep up` and
    /// `pgkeep etcd grant` only.
    EtcdRoot,
    /// The TLS identity of a client of etcd's JSON gateway (`patronictl`): no common name, so it
    /// is no etcd user; the client authenticates with a user name and password.
    EtcdGateway,
    /// An agent's REST API server certificate.
    RestApi,
    /// A client of agents' REST APIs (another agent, a tool).
    RestApiClient,
    /// A pgBackRest TLS server (repository host or database node).
    PgBackRest,
    /// A pgBackRest client (`repo1-host-cert-file`, `pg1-host-cert-file`).
    PgBackRestClient,
    /// HAProxy's client certificate for its health checks against the REST API.
    HaProxy,
    /// PostgreSQL `cert` authentication of the replication role.
    Replication,
    /// PostgreSQL `cert` authentication of the pg_rewind role.
    Rewind,
    /// A human operator's client certificate (`pgkeep ctl`).
    Operator,
}

impl Service {
    /// Every service, in documentation order.
    pub const ALL: [Service; 13] = [
        Service::Postgres,
        Service::EtcdServer,
        Service::EtcdClient,
        Service::EtcdRoot,
        Service::EtcdGateway,
        Service::RestApi,
        Service::RestApiClient,
        Service::PgBackRest,
        Service::PgBackRestClient,
        Service::HaProxy,
        Service::Replication,
        Service::Rewind,
        Service::Operator,
    ];

    /// The name used on the command line and in file names, e.g. `etcd-server`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Postgres => "postgres",
            Service::EtcdServer => "etcd-server",
            Service::EtcdClient => "etcd-client",
            Service::EtcdRoot => "etcd-root",
            Service::EtcdGateway => "etcd-gateway",
            Service::RestApi => "restapi",
            Service::RestApiClient => "restapi-client",
            Service::PgBackRest => "pgbackrest",
            Service::PgBackRestClient => "pgbackrest-client",
            Service::HaProxy => "haproxy",
            Service::Replication => "replication",
            Service::Rewind => "rewind",
            Service::Operator => "operator",
        }
    }

    /// Server, client or both.
    pub fn usage(self) -> Usage {
        match self {
            Service::Postgres | Service::RestApi | Service::PgBackRest => Usage::Server,
            Service::EtcdServer => Usage::ServerAndClient,
            Service::EtcdClient
            | Service::EtcdRoot
            | Service::EtcdGateway
            | Service::RestApiClient
            | Service::PgBackRestClient
            | Service::HaProxy
            | Service::Replication
            | Service::Rewind
            | Service::Operator => Usage::Client,
        }
    }

    /// The PostgreSQL role a `replication` or `rewind` certificate authenticates by default.
    pub fn default_role(self) -> Option<&'static str> {
        match self {
            Service::Replication => Some("replicator"),
            Service::Rewind => Some("rewind_user"),
            _ => None,
        }
    }

    /// One line on what the certificate is for.
    pub fn description(self) -> &'static str {
        match self {
            Service::Postgres => "PostgreSQL server (ssl_cert_file)",
            Service::EtcdServer => "etcd member, client and peer TLS (serverAuth + clientAuth)",
            Service::EtcdClient => "agent's client identity on etcd",
            Service::EtcdRoot => "etcd's root user (user and role management only; CN root)",
            Service::EtcdGateway => {
                "TLS identity of a password client of etcd's JSON gateway (no CN: no etcd user)"
            }
            Service::RestApi => "agent's REST API server",
            Service::RestApiClient => "client of the agents' REST APIs",
            Service::PgBackRest => "pgBackRest TLS server",
            Service::PgBackRestClient => "pgBackRest client",
            Service::HaProxy => "HAProxy health checks against the REST API",
            Service::Replication => "PostgreSQL cert authentication of the replication role",
            Service::Rewind => "PostgreSQL cert authentication of the rewind role",
            Service::Operator => "operator (pgkeep ctl)",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL
            .into_iter()
            .find(|svc| svc.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Service::ALL.iter().map(|s| s.as_str()).collect();
                PkiError::InvalidRequest(format!(
                    "unknown service {s:?}; expected one of {}",
                    all.join(", ")
                ))
            })
    }
}

/// A certificate for one service on one node, before it becomes a [`CertRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCert {
    /// The service.
    pub service: Service,
    /// Node or member name: letters, digits, `-`, `_`, `.`, at most 40 characters.
    pub name: String,
    /// PostgreSQL role for `replication` and `rewind` (their default role otherwise); must be
    /// `None` for other services.
    pub role: Option<String>,
    /// Host names (server certificates; the load balancer's name included).
    pub dns_names: Vec<String>,
    /// Addresses (server certificates).
    pub ip_addresses: Vec<IpAddr>,
    /// Validity in days.
    pub validity_days: u32,
}

impl ServiceCert {
    /// The subject common name the rules give this certificate.
    pub fn common_name(&self) -> Result<String, PkiError> {
        check_name(&self.name)?;
        let name = &self.name;
        if self.role.is_some() && self.service.default_role().is_none() {
            return Err(PkiError::InvalidRequest(format!(
                "a role applies only to the replication and rewind services, not {}",
                self.service
            )));
        }
        Ok(match self.service {
            Service::Postgres => {
                let cn = match (self.dns_names.first(), self.ip_addresses.first()) {
                    (Some(host), _) => host.clone(),
                    (None, Some(ip)) => ip.to_string(),
                    (None, None) => return Err(missing_host(self.service)),
                };
                if is_etcd_identity(&cn) {
                    return Err(PkiError::InvalidRequest(format!(
                        "the common name of a postgres certificate is its first host name, and \
                         {cn:?} is an etcd user name (root, pgkeep-*, *@*); give another host name first"
                    )));
                }
                cn
            }
            Service::EtcdServer => format!("etcd-server-{name}"),
            Service::EtcdClient => format!("{ETCD_CLIENT_CN_PREFIX}{name}"),
            Service::EtcdRoot => ETCD_ROOT_CN.to_owned(),
            // No common name: the etcd gateway refuses a client certificate that has one once
            // authentication is on, and without one the certificate is no etcd user.
            Service::EtcdGateway => String::new(),
            Service::RestApi => format!("restapi-{name}"),
            Service::RestApiClient => format!("restapi-client-{name}"),
            Service::PgBackRest => format!("pgbackrest-{name}"),
            Service::PgBackRestClient => format!("pgbackrest-client-{name}"),
            Service::HaProxy => format!("haproxy-{name}"),
            Service::Operator => format!("operator-{name}"),
            Service::Replication | Service::Rewind => {
                let role = match (&self.role, self.service.default_role()) {
                    (Some(role), _) => role.as_str(),
                    (None, Some(default)) => default,
                    (None, None) => return Err(PkiError::InvalidRequest("no role".to_owned())),
                };
                check_role(role)?;
                role.to_owned()
            }
        })
    }

    /// The base name of the written files: `<service>-<name>`.
    pub fn basename(&self) -> Result<String, PkiError> {
        check_name(&self.name)?;
        Ok(format!("{}-{}", self.service, self.name))
    }

    /// The certificate request these rules produce.
    pub fn request(&self) -> Result<CertRequest, PkiError> {
        let usage = self.service.usage();
        let has_sans = !self.dns_names.is_empty() || !self.ip_addresses.is_empty();
        if usage.is_server() && !has_sans {
            return Err(missing_host(self.service));
        }
        if !usage.is_server() && has_sans {
            return Err(PkiError::InvalidRequest(format!(
                "{} certificates are client identities (their common name); they carry no host names or addresses",
                self.service
            )));
        }
        Ok(CertRequest {
            common_name: self.common_name()?,
            usage,
            dns_names: self.dns_names.clone(),
            ip_addresses: self.ip_addresses.clone(),
            validity_days: self.validity_days,
        })
    }
}

fn missing_host(service: Service) -> PkiError {
    PkiError::InvalidRequest(format!(
        "{service} is a server certificate: give at least one host name or address"
    ))
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidRequest(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn check_role(role: &str) -> Result<(), PkiError> {
    let ok = !role.is_empty()
        && role.len() <= MAX_ROLE_LEN
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if !ok {
        return Err(PkiError::InvalidRequest(format!(
            "role {role:?} must be 1 to {MAX_ROLE_LEN} letters, digits, '_' or '-'"
        )));
    }
    if is_etcd_identity(role) {
        return Err(PkiError::InvalidRequest(format!(
            "role {role:?} is an etcd user name (root, pgkeep-*): a PostgreSQL role certificate must not double as an etcd identity"
        )));
    }
    if role == "postgres" {
        return Err(PkiError::InvalidRequest(
            "no certificate for the superuser role postgres: superuser access is by peer authentication only"
                .to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(service: Service) -> ServiceCert {
        let server = service.usage().is_server();
        ServiceCert {
            service,
            name: "n1".to_owned(),
            role: None,
            dns_names: if server {
                vec!["n1.example".to_owned()]
            } else {
                Vec::new()
            },
            ip_addresses: if server {
                vec!["10.0.0.1".parse().unwrap()]
            } else {
                Vec::new()
            },
            validity_days: 30,
        }
    }

    #[test]
    fn parse_round_trip() {
        for svc in Service::ALL {
            assert_eq!(svc.as_str().parse::<Service>().unwrap(), svc);
        }
        assert!("etcd".parse::<Service>().is_err());
    }

    #[test]
    fn common_names_are_distinct_per_service() {
        let mut seen = std::collections::HashSet::new();
        for svc in Service::ALL {
            let cn = cert(svc).common_name().unwrap();
            assert!(seen.insert(cn.clone()), "{svc}: {cn} used twice");
        }
    }

    #[test]
    fn the_documented_rules() {
        let cn = |svc| cert(svc).common_name().unwrap();
        assert_eq!(cn(Service::Postgres), "n1.example");
        assert_eq!(cn(Service::EtcdServer), "etcd-server-n1");
        assert_eq!(cn(Service::EtcdClient), "pgkeep-n1");
        assert_eq!(cn(Service::Replication), "replicator");
        assert_eq!(cn(Service::Rewind), "rewind_user");
        assert_eq!(Service::EtcdServer.usage(), Usage::ServerAndClient);
        assert_eq!(Service::Postgres.usage(), Usage::Server);
        assert_eq!(
            cert(Service::EtcdClient).basename().unwrap(),
            "etcd-client-n1"
        );

        let mut pg = cert(Service::Postgres);
        pg.dns_names.clear();
        assert_eq!(pg.common_name().unwrap(), "10.0.0.1");
        pg.ip_addresses.clear();
        assert!(pg.request().is_err());
    }

    #[test]
    fn roles() {
        let mut r = cert(Service::Replication);
        r.role = Some("repl".to_owned());
        assert_eq!(r.common_name().unwrap(), "repl");
        r.role = Some("postgres".to_owned());
        assert!(r.common_name().is_err());
        r.role = Some("a b".to_owned());
        assert!(r.common_name().is_err());
        let mut e = cert(Service::EtcdClient);
        e.role = Some("repl".to_owned());
        assert!(e.common_name().is_err());
    }

    #[test]
    fn only_the_etcd_profiles_name_an_etcd_user() {
        let cn = |svc| cert(svc).common_name().unwrap();
        assert_eq!(cn(Service::EtcdRoot), "root");
        assert!(is_etcd_identity(&cn(Service::EtcdClient)));
        assert_eq!(cn(Service::EtcdGateway), "", "no common name at all");
        assert_eq!(
            cert(Service::EtcdGateway).request().unwrap().usage,
            Usage::Client
        );
        // Whatever name, host or role is asked for, no other profile yields an etcd user name.
        let tricky = [
            "root",
            "pgkeep-node1",
            "pgkeep-operator",
            "ROOT",
            "Pgkeep-x",
        ];
        for svc in Service::ALL {
            if matches!(svc, Service::EtcdClient | Service::EtcdRoot) {
                continue;
            }
            for t in tricky {
                let mut c = cert(svc);
                c.name = t.to_owned();
                if svc.usage().is_server() {
                    c.dns_names = vec![t.to_ascii_lowercase(), "n1.example".to_owned()];
                }
                if svc.default_role().is_some() {
                    c.role = Some(t.to_owned());
                }
                if let Ok(name) = c.common_name() {
                    assert!(!is_etcd_identity(&name), "{svc} with {t:?}: CN {name:?}");
                }
            }
        }
        assert!(is_etcd_identity("patronictl@demo"));
        assert!(!is_etcd_identity("etcd-server-etcd1"));
        assert!(!is_etcd_identity("node1.demo.internal"));
    }

    #[test]
    fn client_certificates_carry_no_hosts() {
        let mut c = cert(Service::Operator);
        c.dns_names.push("x.example".to_owned());
        assert!(c.request().is_err());
    }

    #[test]
    fn bad_names() {
        for name in ["", "-x", "a/b", "a b", &"x".repeat(41)] {
            let mut c = cert(Service::EtcdClient);
            c.name = name.to_owned();
            assert!(c.request().is_err(), "{name:?} accepted");
        }
    }
}
