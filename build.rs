//! Compiles the BPF objects under src/bpf/ into libbpf-rs skeletons.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

/// One skeleton per object: the monitors, doctor's hook probes, the memslot
/// iterator of `vms --slots` (loaded alone), and the benchmark-only object
/// (used by src/bin/kvm-watcher-bench.rs alone).
const OBJECTS: &[&str] = &["kvm_watcher", "probe", "memslots", "bench"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in OBJECTS {
        let src = format!("src/bpf/{name}.bpf.c");
        SkeletonBuilder::new()
            .source(&src)
            // BPF ISA v3 for 32-bit atomics (cmpxchg, Linux 5.12+); -Wall keeps the C honest.
            .clang_args(["-mcpu=v3", "-Wall", "-Wno-unused-function", "-Isrc/bpf"])
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("cannot build {src}: {e:#}"));
    }
    println!("cargo:rerun-if-changed=src/bpf");
    git_revision();
}

/// The commit this is built from, for `--version` (KVM_WATCHER_GIT_REVISION:
/// a full hash, or "unknown" outside a git checkout, e.g. from a tarball).
fn git_revision() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let rev = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KVM_WATCHER_GIT_REVISION={rev}");
    // HEAD's reflog changes on every commit, checkout and reset here.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "logs/HEAD"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
    }
}
