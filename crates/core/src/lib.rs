//! pgkeep's pure core.
//!
//! Everything here is a function of its inputs: no async runtime, no filesystem, no processes,
//! no network and no clock of its own. The agent (crate `pgkeep`) observes the world, calls into
//! this crate, and executes what it returns. That is what lets the HA rules be tested with tables
//! and deterministic simulations instead of mocks.

pub mod apps;
pub mod audit;
pub mod cluster;
pub mod dynamic;
pub mod ha;
pub mod health;
pub mod ops;
pub mod pgconf;
pub mod policy;
