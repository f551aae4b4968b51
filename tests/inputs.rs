//! Inputs that must be refused before any work starts: a thread filter that
//! would match nothing or everything, and counts files that could not be
//! written or could be redirected.

mod common;

use common::usage::{USAGE, expect_errors, pid_max};

/// `--tid 0` would turn the in-kernel thread filter off (every VM shown);
/// a thread that does not exist, or that is no VMM's, would show nothing.
#[test]
fn tid_that_is_zero_missing_or_not_a_vmms() {
    let missing = pid_max().to_string();
    // This test process holds no KVM VM.
    let mine = std::process::id().to_string();
    expect_errors(&[
        (vec!["-w", "--tid", "0", "-t", "0.5"], USAGE, "--tid"),
        (vec!["watch", "--tid", "0", "-t", "0.5"], USAGE, "--tid"),
        (
            vec!["wakeup", "--tid", &missing, "-t", "0.5"],
            USAGE,
            &missing,
        ),
        (vec!["-n", "--tid", &mine, "-t", "0.5"], USAGE, &mine),
    ]);
}
