//! The inventory: which hosts make up one cluster's environment. Written by `pgkeep up` (and by
//! hand for real deployments), read by every `render --inventory` and `init`.
//!
//! ```yaml
//! cluster: demo
//! namespace: /service/
//! domain: demo.internal          # host names are <name>.<domain>
//! organisation_ca: {cert: /etc/org/ca.crt, key: /etc/org/ca.key}   # optional
//! database_hosts:
//!   - {name: node1, address: 127.42.0.11, pg_port: 25433, api_port: 28443, pgbackrest_port: 28453}
//! etcd_hosts:
//!   - {name: etcd1, address: 127.42.0.21, client_port: 22379, peer_port: 22380}
//! backup_host: {name: backup, address: 127.42.0.31, port: 28432}
//! load_balancer: {name: lb, address: 127.42.0.41, write_port: 25000, read_port: 25001}
//! ```

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// A database host: PostgreSQL plus its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbHost {
    /// Member name.
    pub name: String,
    /// Address PostgreSQL and the REST API listen on.
    pub address: IpAddr,
    /// PostgreSQL port.
    pub pg_port: u16,
    /// REST API port.
    pub api_port: u16,
    /// Port of the node's `pgbackrest server` (the repository host starts backups through
    /// it); needed when the inventory has a backup host (`pgkeep up` adds one to an
    /// environment written before it had one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgbackrest_port: Option<u16>,
}

/// An etcd member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdHost {
    /// Member name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Client port.
    pub client_port: u16,
    /// Peer port.
    pub peer_port: u16,
}

/// The pgBackRest repository host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupHost {
    /// Host name (first label).
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// pgBackRest TLS server port.
    pub port: u16,
}

/// The load balancer clients connect through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Host name (first label); goes into every PostgreSQL server certificate.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Port that reaches the primary.
    pub write_port: u16,
    /// Port that reaches the replicas.
    pub read_port: u16,
}

/// An organisation CA to issue certificates from, instead of one pgkeep creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganisationCa {
    /// CA certificate.
    pub cert: PathBuf,
    /// CA key.
    pub key: PathBuf,
}

/// One cluster's environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Cluster name (`scope`).
    pub cluster: String,
    /// DCS namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// DNS domain: a host named `n` is `n.<domain>`.
    pub domain: String,
    /// Optional organisation CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation_ca: Option<OrganisationCa>,
    /// Database hosts.
    pub database_hosts: Vec<DbHost>,
    /// etcd members.
    pub etcd_hosts: Vec<EtcdHost>,
    /// The backup repository host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_host: Option<BackupHost>,
    /// The load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

fn default_namespace() -> String {
    "/service/".into()
}

impl Inventory {
    /// The fully qualified name of a host.
    pub fn fqdn(&self, name: &str) -> String {
        format!("{name}.{}", self.domain)
    }

    /// Every (address, fqdn) pair, for a hosts file.
    pub fn host_entries(&self) -> Vec<(IpAddr, String)> {
        let mut v: Vec<(IpAddr, String)> = Vec::new();
        v.extend(
            self.database_hosts
                .iter()
                .map(|h| (h.address, self.fqdn(&h.name))),
        );
        v.extend(
            self.etcd_hosts
                .iter()
                .map(|h| (h.address, self.fqdn(&h.name))),
        );
        v.extend(
            self.backup_host
                .iter()
                .map(|h| (h.address, self.fqdn(&h.name))),
        );
        v.extend(
            self.load_balancer
                .iter()
                .map(|h| (h.address, self.fqdn(&h.name))),
        );
        v
    }

    /// etcd client endpoints as `host:port` (names, so certificates are checked by name).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd_hosts
            .iter()
            .map(|h| format!("{}:{}", self.fqdn(&h.name), h.client_port))
            .collect()
    }

    /// Checks names, duplicates and counts. Errors name the file and the entry.
    pub fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: String, reason: &str| Err(ConfigError::new(file, key, reason));
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
        };
        if !label_ok(&self.cluster) {
            return err("cluster".into(), "use lower-case letters, digits and '-'");
        }
        if self.domain.split('.').any(|l| !label_ok(l)) {
            return err("domain".into(), "must be a DNS name of lower-case labels");
        }
        if self.database_hosts.is_empty() {
            return err("database_hosts".into(), "list at least one database host");
        }
        if self.etcd_hosts.is_empty() || self.etcd_hosts.len().is_multiple_of(2) {
            return err(
                "etcd_hosts".into(),
                "list an odd number of etcd members (1, 3 or 5)",
            );
        }
        let mut names = BTreeSet::new();
        let mut sockets = BTreeSet::new();
        let mut check_host = |key: String, name: &str, socks: Vec<(IpAddr, u16)>| {
            if !label_ok(name) {
                return Err(ConfigError::new(
                    file,
                    key,
                    "host names use lower-case letters, digits and '-'",
                ));
            }
            if !names.insert(name.to_owned()) {
                return Err(ConfigError::new(
                    file,
                    key,
                    format!("host name {name} appears twice"),
                ));
            }
            for s in socks {
                if !sockets.insert(s) {
                    return Err(ConfigError::new(
                        file,
                        key,
                        format!("{}:{} is used twice", s.0, s.1),
                    ));
                }
            }
            Ok(())
        };
        for (i, h) in self.database_hosts.iter().enumerate() {
            check_host(
                format!("database_hosts[{i}]"),
                &h.name,
                [(h.address, h.pg_port), (h.address, h.api_port)]
                    .into_iter()
                    .chain(h.pgbackrest_port.map(|p| (h.address, p)))
                    .collect(),
            )?;
        }
        for (i, h) in self.etcd_hosts.iter().enumerate() {
            check_host(
                format!("etcd_hosts[{i}]"),
                &h.name,
                vec![(h.address, h.client_port), (h.address, h.peer_port)],
            )?;
        }
        if let Some(h) = &self.backup_host {
            check_host("backup_host".into(), &h.name, vec![(h.address, h.port)])?;
        }
        if let Some(h) = &self.load_balancer {
            check_host(
                "load_balancer".into(),
                &h.name,
                vec![(h.address, h.write_port), (h.address, h.read_port)],
            )?;
        }
        Ok(())
    }

    /// Reads and checks an inventory file.
    pub fn load(file: &Path) -> Result<Inventory, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, "", format!("cannot read the file: {e}")))?;
        let doc: serde_json::Value = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::new(file, "", format!("invalid YAML: {e}")))?;
        let inv: Inventory = serde_path_to_error::deserialize(&doc).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::new(
                file,
                if key == "." { String::new() } else { key },
                e.inner().to_string(),
            )
        })?;
        inv.check(file)?;
        Ok(inv)
    }

    /// Writes the inventory as YAML (0644: it holds no secret).
    pub fn save(&self, file: &Path) -> std::io::Result<()> {
        let text = serde_saphyr::to_string(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(file, text.as_bytes(), 0o644)
    }
}

/// A three-node inventory with a load balancer, for unit tests.
#[cfg(test)]
pub(crate) fn test_inventory() -> Inventory {
    Inventory {
        cluster: "demo".into(),
        namespace: "/service/".into(),
        domain: "demo.internal".into(),
        organisation_ca: None,
        database_hosts: (1..=3)
            .map(|i| DbHost {
                name: format!("node{i}"),
                address: format!("127.42.5.1{i}").parse().unwrap(),
                pg_port: 25430 + i,
                api_port: 28440 + i,
                pgbackrest_port: None,
            })
            .collect(),
        etcd_hosts: vec![EtcdHost {
            name: "etcd1".into(),
            address: "127.42.5.21".parse().unwrap(),
            client_port: 22379,
            peer_port: 22380,
        }],
        backup_host: None,
        load_balancer: Some(LoadBalancer {
            name: "lb".into(),
            address: "127.42.5.41".parse().unwrap(),
            write_port: 25100,
            read_port: 25101,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Inventory {
        Inventory {
            cluster: "demo".into(),
            namespace: default_namespace(),
            domain: "demo.internal".into(),
            organisation_ca: None,
            database_hosts: (1..=3)
                .map(|i| DbHost {
                    name: format!("node{i}"),
                    address: format!("127.42.0.1{i}").parse().unwrap(),
                    pg_port: 25433,
                    api_port: 28443,
                    pgbackrest_port: None,
                })
                .collect(),
            etcd_hosts: vec![EtcdHost {
                name: "etcd1".into(),
                address: "127.42.0.21".parse().unwrap(),
                client_port: 22379,
                peer_port: 22380,
            }],
            backup_host: None,
            load_balancer: Some(LoadBalancer {
                name: "lb".into(),
                address: "127.42.0.41".parse().unwrap(),
                write_port: 25000,
                read_port: 25001,
            }),
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("inventory.yml");
        let inv = sample();
        inv.save(&f).unwrap();
        assert_eq!(Inventory::load(&f).unwrap(), inv);
        assert_eq!(inv.etcd_endpoints(), ["etcd1.demo.internal:22379"]);
        assert_eq!(inv.host_entries().len(), 5);
    }

    #[test]
    fn duplicates_and_even_etcd_counts_are_refused() {
        let f = Path::new("inv.yml");
        let mut inv = sample();
        inv.database_hosts[1].name = "node1".into();
        let e = inv.check(f).unwrap_err();
        assert_eq!(e.key, "database_hosts[1]");
        let mut inv = sample();
        inv.etcd_hosts.push(inv.etcd_hosts[0].clone());
        assert_eq!(inv.check(f).unwrap_err().key, "etcd_hosts");
        let mut inv = sample();
        inv.load_balancer.as_mut().unwrap().address = "127.42.0.11".parse().unwrap();
        inv.load_balancer.as_mut().unwrap().write_port = 25433;
        assert!(inv.check(f).unwrap_err().reason.contains("used twice"));
        let mut inv = sample();
        for (i, h) in inv.database_hosts.iter_mut().enumerate() {
            h.pgbackrest_port = Some(28450 + u16::try_from(i).unwrap());
        }
        inv.check(f).unwrap();
        inv.database_hosts[2].pgbackrest_port = Some(28443);
        assert!(inv.check(f).unwrap_err().reason.contains("used twice"));
    }
}
