//! Checks of failing command lines: the exit status, exactly one
//! `kvm-watcher: error: ...` line naming what is wrong, nothing on stdout, no panic.

use std::process::Output;
use std::time::Duration;

/// Every spawned kvm-watcher is killed (and the test fails) after this long.
pub const T: Duration = Duration::from_secs(30);
pub const USAGE: i32 = 2;
pub const RUNTIME: i32 = 1;

pub fn run(args: &[&str]) -> Output {
    super::run_cli(args, T)
}

/// Checks one failing command line; returns a description of what is wrong, if anything.
pub fn check_error(args: &[&str], status: i32, mentions: &str) -> Option<String> {
    let out = run(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut bad = Vec::new();
    if out.status.code() != Some(status) {
        bad.push(format!(
            "exit status {:?}, want {status}",
            out.status.code()
        ));
    }
    if !stdout.is_empty() {
        bad.push("stdout is not empty".to_string());
    }
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
        bad.push("panic on stderr".to_string());
    }
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.len() != 1 || !stderr.ends_with('\n') {
        bad.push(format!("{} lines on stderr, want exactly one", lines.len()));
    }
    if !lines
        .first()
        .is_some_and(|l| l.starts_with("kvm-watcher: error:"))
    {
        bad.push("stderr does not start with `kvm-watcher: error:`".to_string());
    }
    if !stderr.contains(mentions) {
        bad.push(format!("the message does not mention `{mentions}`"));
    }
    (!bad.is_empty()).then(|| {
        format!(
            "kvm-watcher {args:?}: {}\n  stdout: {stdout:?}\n  stderr: {stderr:?}",
            bad.join("; ")
        )
    })
}

/// Runs every case and fails once, listing every case that went wrong.
pub fn expect_errors(cases: &[(Vec<&str>, i32, &str)]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(args, status, mentions)| check_error(args, *status, mentions))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad command lines were mishandled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

pub fn expect_error(args: &[&str], status: i32, mentions: &str) {
    if let Some(f) = check_error(args, status, mentions) {
        panic!("{f}");
    }
}

/// The kernel's pid_max: no process or thread has this id.
pub fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("reading pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number")
}
