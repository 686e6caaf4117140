//! Test harness: starts real etcd clusters and real PostgreSQL instances for pgkeep's
//! integration tests, each environment isolated and cleaned up.
//!
//! An [`Env`] is one test environment:
//!
//! - a temp root `/var/tmp/pgkeep-test/<checkout-id>/<env-id>` (directories 0755, so every
//!   service user can traverse them; each node's own directory is 0700 and owned by the
//!   service's user);
//! - its own loopback `/24` (`127.a.b.0/24`, never `127.0.0.0/24`), one address and one DNS
//!   name (`<node>.<env-id>.pgkeep.test`) per node, resolved through a marked block of
//!   `/etc/hosts` (`# BEGIN pgkeep-test <checkout-id> <env-id>` ... `# END ...`);
//! - a cgroup `<cgroup2>/pgkeep-test-<checkout-id>/<env-id>` that every process it starts enters
//!   before it execs;
//! - a CA generated for this environment, and ports allocated at run time.
//!
//! Dropping the last handle of an [`Env`] (also while a test panics) kills the cgroup, removes
//! the hosts block and the temp root. A test process that is killed cannot run its destructors,
//! so [`sweep`] (run automatically by the first [`Env::new`] of each process) removes everything
//! a dead test process of the same checkout left behind.
//!
//! `/etc/hosts` doubles as the registry of networks in use: a `/24` that any line of the file
//! mentions is taken, and every edit happens under an exclusive `flock` of
//! `/var/tmp/pgkeep-test/.hosts.lock` (anything else that edits marked blocks, such as
//! `pgkeep up`, should take the same lock).
//!
//! One property of loopback shapes the configuration: whatever `127.x.y.z` a client connects
//! to, the kernel picks `127.0.0.1` as the source address. So PostgreSQL's `pg_hba.conf`
//! allows `127.0.0.1/32` next to the environment's subnet, and etcd members run with
//! `--experimental-peer-skip-client-san-verification` (etcd would otherwise compare a peer
//! certificate's SANs with the connection's source address, which is never the member's own).
//! Server identities are unaffected: clients connect by DNS name and verify it.
//!
//! The API is blocking (std processes and short sleeps); every wait is bounded. Call it from a
//! plain `#[test]`, or from async tests before and after the async part.
//!
//! Everything here needs root (cgroups, `/etc/hosts`, switching to the `etcd` and `postgres`
//! users), which is how the integration tests run.

mod agents;
mod bedcluster;
mod cgroup;
mod env;
mod etcd;
mod faults;
mod haproxy;
mod hosts;
mod netns;
mod paths;
mod postgres;
mod proc;
mod service;
mod slapd;
mod sweep;

pub use agents::{API_USER, Agent, AgentCluster, DcsOptions};
pub use bedcluster::{BedAgentCluster, BedEtcdCluster};
pub use env::{ClientCert, Env, Node, ServiceUser};
pub use etcd::{ETCD_CLIENT_CN, EtcdCluster};
pub use faults::{Frozen, process_tree};
pub use haproxy::Haproxy;
pub use netns::NetBed;
pub use postgres::PgInstance;
pub use service::{CommandOutput, Service};
pub use slapd::{LDAP_PEOPLE, LDAP_SUFFIX, Slapd};
pub use sweep::{SweepReport, sweep};

pub use paths::{checkout_id, test_base_dir};
pub use proc::pid_is_alive;

/// Tags of the `pgkeep-test` blocks now in `/etc/hosts` (`pgkeep-test <checkout-id> <env-id>`),
/// e.g. to check that a teardown removed its block.
pub fn hosts_blocks() -> anyhow::Result<Vec<String>> {
    hosts::block_tags()
}

/// Suffix of every DNS name the harness puts into `/etc/hosts`.
pub const DNS_SUFFIX: &str = "pgkeep.test";

/// Directory holding the PostgreSQL 15 binaries (Debian layout).
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Path of the `etcd` server binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// Path of the `etcdctl` client binary.
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
