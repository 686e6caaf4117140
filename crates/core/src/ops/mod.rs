//! Operator operations, as pure functions: what `pgkeep ctl` and the REST API decide before
//! they change anything.
//!
//! * [`config_edit`]: editing the dynamic configuration (`PATCH`/`PUT /config`, `ctl
//!   edit-config`, `ctl pause`): Patroni's JSON merge patch, `-s key=value` / `-p name=value`
//!   edits, and the check every proposed configuration must pass before it is written. pgkeep
//!   **refuses** a change that the agents would drop (a key that could run code or weaken
//!   security, an unknown key, a malformed value, unsafe timing) instead of writing it and
//!   silently ignoring it as Patroni does.
//! * [`restart_order`]: the order in which `ctl restart` restarts members when hot-standby-critical
//!   parameters change (PostgreSQL requires a standby's values to be at least the primary's).
//! * [`backup_schedule`]: cron schedules of backups and what the backup scheduler runs now.

pub mod backup_schedule;
pub mod config_edit;
pub mod restart_order;

pub use config_edit::{Checked, Refusal, changed_paths, check_config, edit_patch, merge_patch};
pub use restart_order::{
    HOT_STANDBY_PARAMETERS, OrderError, RestartMember, RestartPlan, Setting, restart_order,
};
