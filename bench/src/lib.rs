//! The benchmark harness of pgkeep: failover and switchover of pgkeep and Patroni side by
//! side (same machine, same etcd, same timings, same client) with the physical switchover
//! floor measured in the same run, and the REST API (`GET /primary` over TLS, next to a
//! plain nginx endpoint, same `ab` loads) and the agents' idle resource use; failover and
//! switchover also with the writer going through HAProxy (`--via-haproxy`, the same HAProxy
//! configuration for both products). The binary is
//! `pgkeep-bench` (`src/main.rs`); the method is described in `bench/README.md`.

pub mod ab;
pub mod client;
pub mod cluster;
pub mod etcd;
pub mod floor;
pub mod front;
pub mod haproxy;
pub mod loops;
pub mod nginx;
pub mod patroni;
pub mod pgkeep;
pub mod report;
pub mod report_haproxy;
pub mod report_rest;
pub mod rest;
pub mod scenario_rest;
pub mod sys;
pub mod trials;
pub mod usage;
