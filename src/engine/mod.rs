//! The engine under `watch`, `top` and `serve`: the loader that attaches
//! the monitors' programs ([`start`]), the VMs followed by name across
//! restarts ([`Targets`]), and the ledger that owns, per monitor and key,
//! the last cumulative reading and who it belongs to ([`ledger`]). The
//! session writes intervals, `top` keeps them and `serve` encodes the
//! cumulative values: three sinks over the same start and the same ledger.

pub mod families;
pub mod ledger;
mod load;
mod targets;
pub mod tracked;

pub use load::{Attached, Choice, EngineConfig, Unavailable, resolve_pids, start, stop_flag};
pub use targets::Targets;
