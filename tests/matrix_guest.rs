//! The in-guest half of `scripts/kernel-matrix`: runs inside a stock Debian
//! kernel booted under QEMU (TCG, nested AMD KVM) and checks every monitor
//! with every backend that kernel offers against ground truth:
//!
//! - the synthetic guest's own report (`kvm-watcher vm --json`: tids, vCPU
//!   ids, halts, memslots, the dirty log KVM handed it, KVM's stats where the
//!   kernel has the stats fd),
//! - tracefs as an independent observer (the same tracepoints, recorded by
//!   ftrace into the trace buffer, filtered on the vCPU threads),
//! - and the other backends: all backends of a monitor watch the same
//!   deterministic workload side by side (plus one run with no `--backend`,
//!   which must pick what `doctor` says), and must report identical rows
//!   (as multisets of their tid-independent fields) or identical counts.
//!
//! It prints one `MATRIX\t<monitor>\t<backend>\t<mode>\t<status>\t<ms>\t<detail>`
//! line per cell, `MATRIX-DOCTOR\t<json>` and `MATRIX-DEFAULT\t<monitor>\t<backend>`.
//! Ignored by a plain `cargo test` (it needs the matrix's VMs); the matrix
//! runs it with `--ignored` and `KVM_WATCHER_BIN` set.
//!
//! The harness is in `tests/matrix_guest/`: `matrix.rs` holds what the
//! kernel offers and turns a scenario's runs into cells, `scenario.rs` runs
//! a VM with watchers side by side, `tracefs.rs` records the independent
//! observer, and one file per monitor holds its scenarios and checks.

/// Fails the check (the cell) with a message: a panic would end the whole
/// run in the matrix's VM and lose every later cell.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

mod common;
#[path = "matrix_guest/dirty.rs"]
mod dirty;
#[path = "matrix_guest/exits.rs"]
mod exits;
#[path = "matrix_guest/halts.rs"]
mod halts;
#[path = "matrix_guest/linux.rs"]
mod linux;
#[path = "matrix_guest/matrix.rs"]
mod matrix;
#[path = "matrix_guest/memslots.rs"]
mod memslots;
#[path = "matrix_guest/perf.rs"]
mod perf;
#[path = "matrix_guest/qmp.rs"]
mod qmp;
#[path = "matrix_guest/run_delay.rs"]
mod run_delay;
#[path = "matrix_guest/scenario.rs"]
mod scenario;
#[path = "matrix_guest/tracefs.rs"]
mod tracefs;
#[path = "matrix_guest/util.rs"]
mod util;
#[path = "matrix_guest/vcpu_load.rs"]
mod vcpu_load;

use matrix::Matrix;

#[test]
#[ignore = "runs inside the kernel matrix's VMs (scripts/kernel-matrix)"]
fn kernel_matrix_guest() {
    // The harness has printed "test kernel_matrix_guest ... " without a newline.
    println!();
    // Runs doctor and prints the cells of the backends this kernel refuses.
    let m = Matrix::new();
    if m.wanted("wakeup") {
        m.halts_side_by_side();
        m.halt_summaries();
    }
    if m.wanted("vcpu_load") {
        m.vcpu_load();
        m.vcpu_load_attach();
    }
    if m.wanted("dirty") {
        m.dirty_bitmap_and_ring();
        m.dirty_moved();
    }
    if m.wanted("run_delay") {
        m.run_delay();
    }
    if m.wanted("exits") {
        m.exits();
        m.exits_next_to_perf();
    }
    if m.wanted("memslots") {
        m.memslots();
    }
    m.linux_guest();
}

/// The workload of the matrix's Linux guest, run by its /init
/// (scripts/matrix/l2-init) inside it: see `linux::workload`.
#[test]
#[ignore = "runs inside the kernel matrix's Linux guest (scripts/matrix/l2-init)"]
fn linux_guest_workload() {
    linux::workload();
}
