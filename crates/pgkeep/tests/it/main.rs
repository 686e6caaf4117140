//! The one integration-test binary. Each module is a scenario against real components.

mod agent;
mod api;
mod backup;
mod backup_recovery;
mod callbacks;
mod clients;
mod config;
mod dcs;
mod etcd_rbac;
mod faults;
mod haproxy;
mod harness;
mod ldap;
mod local;
mod metrics;
mod netbed;
mod ops;
mod pki;
mod quickstart;
mod rotate;
mod security;
