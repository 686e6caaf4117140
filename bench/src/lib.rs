//! The benchmark harness of pgkeep: failover and switchover of pgkeep and Patroni side by
//! side (same machine, same etcd, same timings, same client) with the physical switchover
//! floor measured in the same run. The binary is `pgkeep-bench` (`src/main.rs`); the method is
//! described in `bench/README.md`.

pub mod client;
pub mod cluster;
pub mod etcd;
pub mod floor;
pub mod patroni;
pub mod pgkeep;
pub mod report;
pub mod rest;
pub mod sys;
pub mod trials;
