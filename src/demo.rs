//! `kvm-watcher demo`: a synthetic guest, and what kvm-watcher sees of it.

use crate::cli::DemoArgs;

/// Runs the demo.
pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("the demo needs the synthetic guest, which is not built yet")
}
