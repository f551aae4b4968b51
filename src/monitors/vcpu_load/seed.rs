//! The vCPUs already loaded at attach: vcpu-load's task iterator
//! (`seed_vcpu_load` in src/bpf/vcpu_load.bpf.c) opens their pairs, so the
//! first interval counts a busy vCPU from its first instant instead of from
//! its next switch-in.

use std::sync::Once;

use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel};
use crate::hooks;
use crate::monitors::seed::run_iterator;

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
    run_iterator(&skel.progs.seed_vcpu_load, &SAID, |e| {
        format!(
            "vcpu-load: cannot look for vCPUs loaded before it attached ({e:#}; BPF task \
             iterators need Linux 5.8+ with BTF): such a vCPU counts from its next load"
        )
    });
}
