//! The vCPUs already halted at attach: wakeup's task iterator
//! (`iter_wakeup_seed*` in src/bpf/wakeup.bpf.c) marks their halts as in
//! progress from now, so a vCPU that stays halted (a parked AP, an idle vCPU
//! of a tickless guest) reads halted from the first interval instead of not
//! at all until it wakes up.

use std::sync::Once;

use super::read::IN_TASK;
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel};
use crate::hooks;
use crate::monitors::seed::run_iterator;
use crate::monitors::{Configure, Start};

/// Turns on the iterator that matches where the aggregates live, where this
/// kernel can run one.
pub fn configure(open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) {
    let programs = cx.resolved.map_or(&[][..], |r| &r.programs[..]);
    let wanted = cx.resolved.is_some() && cx.mode.aggregates() && hooks::task_iterator().is_ok();
    let in_task = IN_TASK.chosen(programs);
    open.progs
        .iter_wakeup_seed_task
        .set_autoload(wanted && in_task);
    open.progs.iter_wakeup_seed.set_autoload(wanted && !in_task);
}

/// Runs the iterator once (the other programs are attached); where the
/// kernel cannot, or it fails, says so once and goes on without it.
pub fn run(skel: &KvmWatcherSkel<'_>, cx: &Start) {
    if !cx.mode.aggregates() {
        return;
    }
    static SAID: Once = Once::new();
    let prog = if IN_TASK.chosen(&cx.resolved.programs) {
        &skel.progs.iter_wakeup_seed_task
    } else {
        &skel.progs.iter_wakeup_seed
    };
    run_iterator(prog, &SAID, |e| {
        format!(
            "wakeup: cannot look for vCPUs halted before it attached ({e:#}; BPF task \
             iterators need Linux 5.8+ with BTF): such a vCPU counts as halted from its \
             next halt"
        )
    });
}
