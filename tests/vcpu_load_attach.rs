//! vcpu-load and a vCPU already loaded when it attaches. Its own test
//! binary: the busy vCPU runs at real-time priority for a few seconds, which
//! would be contention for tests running beside it.

mod common;

/// A vCPU already loaded when vcpu-load attaches (a busy guest inside
/// KVM_RUN, on a CPU) counts from the first instant of the first interval,
/// on the backend this kernel picks (the matrix checks the others).
#[test]
fn vcpu_loaded_before_attach_counts_from_the_first_interval() {
    if !(common::require_bpf() && common::require_kvm()) {
        return;
    }
    let first = common::seed::busy_vcpu_first_interval(None).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{first}");
    first.check().unwrap_or_else(|e| panic!("{e}"));
}
