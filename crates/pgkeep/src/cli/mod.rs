//! Command-line front ends: argument types and presentation. The work itself is done by the
//! library modules they call.

pub mod audit;
pub mod backup;
pub mod config;
pub mod ctl;
pub mod etcd;
pub mod pki;
pub mod render;
pub mod up;
