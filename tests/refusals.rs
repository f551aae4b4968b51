//! Exit statuses and messages that tell "not found" from "not allowed":
//! output that cannot be written is a runtime error (1) even for --help,
//! a bad path is a usage error (2), and a user without the capabilities a
//! command needs gets one line saying so instead of an empty answer.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::usage::{RUNTIME, USAGE, expect_errors, pid_max};

fn to_full(args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .expect("running kvm-watcher")
}

/// A copy of the binary anyone can run, removed on drop.
struct Copy(std::path::PathBuf);

impl Copy {
    fn new(tag: &str) -> Copy {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("kvm-watcher-{tag}-{}", std::process::id()));
        std::fs::copy(common::bin(), &p).expect("copying the binary");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Copy(p)
    }

    /// The copy run as user nobody with only the capabilities `caps` (e.g. "+bpf,+perfmon").
    fn as_nobody(&self, caps: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        if !caps.is_empty() {
            cmd.arg(format!("--inh-caps=-all,{caps}"))
                .arg(format!("--ambient-caps=-all,{caps}"));
        }
        cmd.arg("--").arg(&self.0).args(args).stdin(Stdio::null());
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running setpriv (util-linux)");
        let pid = child.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(20));
            // SAFETY: plain kill of our own child (gone already is fine).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        drop(killer);
        child.wait_with_output().expect("waiting for kvm-watcher")
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn one_error_line(out: &Output, status: i32, mentions: &str) -> Result<(), String> {
    let err = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.code() == Some(status)
        && err.lines().count() == 1
        && err.starts_with("kvm-watcher: error:")
        && err.contains(mentions);
    ok.then_some(()).ok_or_else(|| {
        format!(
            "want exit {status} and one error line mentioning `{mentions}`, got {}: stderr {err:?}, stdout {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `--help` and `-V` to a full device are runtime errors like every other
/// output that cannot be written.
#[test]
fn help_and_version_to_a_full_device() {
    for args in [&["--help"][..], &["-V"], &["dirty", "--help"]] {
        let out = to_full(args);
        assert_eq!(
            out.status.code(),
            Some(RUNTIME),
            "{args:?} > /dev/full: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A counts-file name longer than a file name may be is a bad path (2).
#[test]
fn counts_file_name_too_long() {
    let long = format!("/tmp/{}", "c".repeat(300));
    expect_errors(&[(
        vec!["dirty", "--counts-file", &long, "-t", "0.5"],
        USAGE,
        "--counts-file",
    )]);
}

/// `doctor > /dev/full` fails before its probes, not after them.
#[test]
fn doctor_to_a_full_device_fails_before_probing() {
    if !common::require_bpf() {
        return;
    }
    let t = Instant::now();
    let full = Command::new(common::bin())
        .arg("doctor")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let probing = t.elapsed();
    assert!(full.status.success());
    let t = Instant::now();
    let out = to_full(&["doctor"]);
    let failing = t.elapsed();
    one_error_line(&out, RUNTIME, "cannot write").unwrap();
    assert!(
        failing * 4 < probing,
        "doctor > /dev/full took {failing:?}, a whole doctor run {probing:?}"
    );
}

/// `vms [--slots] -p` of a process that does not exist is a usage error, not
/// "no KVM VMs running"; as a user who may not look into other users'
/// processes, `vms` says so instead of claiming there are no VMs.
#[test]
fn vms_tells_not_found_from_not_allowed() {
    if !common::require_kvm() {
        return;
    }
    let missing = pid_max().to_string();
    expect_errors(&[
        (vec!["vms", "--slots", "-p", &missing], USAGE, &missing),
        (vec!["vms", "-p", &missing], USAGE, &missing),
        (vec!["vms", "--vm", "no-such-vm"], USAGE, "no-such-vm"),
    ]);
    let _vm = common::spawn_vm(&[]);
    let copy = Copy::new("vms");
    let out = copy.as_nobody("", &["vms"]);
    one_error_line(&out, RUNTIME, "CAP_SYS_PTRACE").unwrap();
}

/// dirty-rate reads guest memory: without CAP_SYS_PTRACE it fails at once
/// with one line instead of printing empty windows until stopped.
#[test]
fn dirty_rate_without_ptrace_fails_at_once() {
    if !(common::require_bpf() && common::require_kvm()) {
        return;
    }
    let vm = common::spawn_vm(&[]);
    let copy = Copy::new("dirty-rate");
    let pid = vm.ready.pid.to_string();
    for args in [
        &["dirty-rate", "-t", "10"][..],
        &["-D", "-p", &pid, "-t", "10"],
    ] {
        let out = copy.as_nobody("+bpf,+perfmon", args);
        one_error_line(&out, RUNTIME, "CAP_SYS_PTRACE").unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
}
