//! pgkeep: the IO shell around `pgkeep-core`.
//!
//! Modules here talk to the outside world (files, etcd, PostgreSQL, the network). Decisions are
//! made in `pgkeep_core`; this crate gathers observations and carries out actions.

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod etcdconf;
pub mod fsutil;
pub mod guard;
pub mod haproxy;
pub mod inventory;
pub mod local;
pub mod pgbackrest;
pub mod pki;
pub mod postgres;
pub mod scheduler;
