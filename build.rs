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
}
