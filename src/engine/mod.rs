//! The engine under `watch`, `top` and `serve`: the loader that attaches
//! the monitors' programs ([`start`]) and the VMs followed by name across
//! restarts ([`Targets`]). What each monitor reads goes through the ledger
//! of its user-space half (src/monitors/ledger.rs); the session writes
//! intervals, `top` keeps them and `serve` encodes the cumulative values.

mod forced;
mod load;
mod targets;

pub use forced::Forced;
pub use load::{Attached, Choice, EngineConfig, Unavailable, resolve_pids, start, stop_flag};
pub use targets::Targets;
