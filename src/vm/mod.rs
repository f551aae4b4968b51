//! `kvm-watcher vm`: a synthetic KVM guest used by the demo and the tests as ground truth.

use clap::Args;

/// Options of `kvm-watcher vm` (placeholder until the guest lands).
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
}

/// Runs the synthetic guest.
pub fn run(_args: &VmArgs) -> anyhow::Result<()> {
    anyhow::bail!("the synthetic guest is not built yet")
}
