//! The vCPUs already loaded at attach: vcpu-load's task iterator
//! (`seed_vcpu_load` in src/bpf/vcpu_load.bpf.c) opens their pairs, so the
//! first interval counts a busy vCPU from its first instant instead of from
//! its next switch-in.

use std::sync::Once;

use anyhow::Context;

use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel};
use crate::hooks;
use crate::output::warn;

/// Turns the iterator on in the object to load, where this kernel can run it.
pub fn configure(open: &mut OpenKvmWatcherSkel<'_>, running: bool) {
    open.progs
        .seed_vcpu_load
        .set_autoload(running && hooks::task_iterator().is_ok());
}

/// Runs the iterator once (the other programs are attached); where the
/// kernel cannot, or it fails, says so once and goes on without it.
pub fn run(skel: &KvmWatcherSkel<'_>) {
    static SAID: Once = Once::new();
    let result = match hooks::task_iterator() {
        Ok(()) => iterate(skel),
        Err(why) => Err(anyhow::anyhow!("{why}")),
    };
    if let Err(e) = result {
        SAID.call_once(|| {
            warn(&format!(
                "vcpu-load: cannot look for vCPUs loaded before it attached ({e:#}; BPF task \
                 iterators need Linux 5.8+ with BTF): such a vCPU counts from its next load"
            ))
        });
    }
}

fn iterate(skel: &KvmWatcherSkel<'_>) -> anyhow::Result<()> {
    let link = skel
        .progs
        .seed_vcpu_load
        .attach()
        .context("cannot attach the task iterator")?;
    let mut iter = libbpf_rs::Iter::new(&link).context("cannot create the task iterator")?;
    std::io::copy(&mut iter, &mut std::io::sink()).context("cannot run the task iterator")?;
    Ok(())
}
