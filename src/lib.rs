//! kvm-watcher: watch the vCPUs of KVM virtual machines from the host with eBPF.
//!
//! Data flows one way: a kernel hook (`src/bpf/<monitor>.bpf.c`) fills BPF maps
//! or a ring buffer, the matching Rust module under [`monitors`] decodes and
//! aggregates, and [`output`] writes tables or NDJSON.

pub mod advise;
pub mod backend;
pub mod bpf;
pub mod child;
pub mod cli;
pub mod demo;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod exporter;
pub mod hooks;
pub mod memslots;
pub mod monitors;
pub mod output;
pub mod procfs;
pub mod session;
pub mod summary;
pub mod top;
pub mod vm;
