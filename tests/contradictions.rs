//! Options that would be silently ignored, filters that contradict each
//! other, and exit statuses the README promises: usage errors (2) found
//! before any work, runtime errors (1) for output that cannot be written.

mod common;

use common::usage::{USAGE, expect_errors};

/// Each of these used to run (for its whole duration, printing nothing or
/// ignoring an option) and exit 0.
#[test]
fn ignored_options_and_contradictory_filters_are_usage_errors() {
    if !common::require_kvm() {
        return;
    }
    let (a, b) = (common::spawn_vm(&[]), common::spawn_vm(&[]));
    let main_thread = a.ready.pid.to_string();
    let vcpu = a.ready.tids[0].to_string();
    let other_vcpu = b.ready.tids[0].to_string();
    let pid_a = a.ready.pid.to_string();
    expect_errors(&[
        (
            vec!["dirty-rate", "--tid", &vcpu, "-t", "2"],
            USAGE,
            "--tid",
        ),
        (
            vec!["dirty-rate", "--vcpu", "0", "-t", "2"],
            USAGE,
            "--vcpu",
        ),
        (vec!["-D", "--vcpu", "0", "-t", "2"], USAGE, "--vcpu"),
        (
            vec!["dirty-rate", "--ringbuf-size", "64", "-t", "2"],
            USAGE,
            "--ringbuf-size",
        ),
        (
            vec!["watch", "--rows", "--summary", "-t", "2"],
            USAGE,
            "--summary",
        ),
        (
            vec!["-D", "--max-downtime", "1", "-t", "2"],
            USAGE,
            "--link",
        ),
        (
            vec!["serve", "--window", "2", "-t", "2"],
            USAGE,
            "--dirty-rate",
        ),
        (
            vec!["-w", "--tid", &main_thread, "-t", "2"],
            USAGE,
            &main_thread,
        ),
        (
            vec!["-w", "-p", &pid_a, "--tid", &other_vcpu, "-t", "2"],
            USAGE,
            &other_vcpu,
        ),
        // A one-vCPU VM has KVM id 0 only: 3 would match nothing.
        (
            vec!["-w", "-p", &pid_a, "--vcpu", "3", "-t", "2"],
            USAGE,
            "no watched VM has a vCPU with that id",
        ),
        // Nor has it a thread QEMU would name `CPU 5/KVM`.
        (
            vec!["-w", "-p", &pid_a, "--vcpu", "vmm:5", "-t", "2"],
            USAGE,
            "has a vCPU thread its VMM numbers 5",
        ),
        // Its `CPU 0/KVM` waits outside KVM_RUN for the run to start: KVM's
        // id of it cannot be known, and guessing could watch the wrong vCPU.
        (
            vec!["-w", "-p", &pid_a, "--vcpu", "vmm:0", "-t", "2"],
            USAGE,
            "is not inside KVM_RUN",
        ),
        (
            vec!["-w", "-p", &pid_a, "--vcpu", "cpu:0", "-t", "2"],
            USAGE,
            "or the VMM's vCPU number as vmm:N",
        ),
    ]);
    // An id the VM has runs.
    if !common::require_bpf() {
        return;
    }
    for vcpu in ["0", "kvm:0"] {
        let out = common::run_cli(
            &["-w", "-p", &pid_a, "--vcpu", vcpu, "-t", "0.5"],
            std::time::Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(0), "--vcpu {vcpu}: {out:?}");
    }
}
