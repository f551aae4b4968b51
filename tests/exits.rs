//! exits against what someone else counted: the synthetic guest's own
//! counts of the exits it made on purpose (`vm --io-exits N --mmio-exits M`),
//! what its VMM handled and timed, and KVM's per-vCPU statistics.
//!
//! Every pass of the guest ends with N OUTs to port 0x504 and M writes to
//! guest-physical 0xfed00000 (no memory there), each one exit to the VMM;
//! with --passes the guest stops on its own with one more OUT, to port
//! 0x501. So per vCPU: KVM_EXIT_IO exits = N * passes + 1, KVM_EXIT_MMIO
//! exits = M * passes, exactly. With `--io-in K`, K INs from port 0x505
//! follow, each one more KVM_EXIT_IO.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::VmReport;
use common::observe::{records, summary, u, watcher};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const IO_PORT: u64 = 0x504;
const MMIO_GPA: u64 = 0xfed0_0000;

fn ready() -> bool {
    common::require_root() && common::require_kvm() && common::require_bpf()
}

/// Whether this host's KVM is the nested PVM backend, which never fires
/// kvm:kvm_exit and does not count io_exits.
fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Per thread, summed over a summary watch's intervals.
#[derive(Debug, Default)]
struct Seen {
    /// Exits to the VMM by reason name: (count, timed, ns).
    user: HashMap<String, (u64, u64, u64)>,
    /// Exits from the guest by reason name: count.
    kvm: HashMap<String, u64>,
    /// (kind, addr): (count, user_exits, vmm_ns).
    targets: HashMap<(String, u64), (u64, u64, u64)>,
    /// Values of exits_kvm_exit_fires seen.
    fires: Vec<Value>,
    /// Intervals whose `exits` was null.
    null_exits: usize,
}

fn seen(recs: &[Value]) -> HashMap<u32, Seen> {
    let mut out: HashMap<u32, Seen> = HashMap::new();
    for r in recs.iter().filter(|r| r["monitor"] == "vcpu_interval") {
        if r["exits_user"].is_null() {
            continue;
        }
        let s = out.entry(u(&r["tid"]) as u32).or_default();
        for x in r["exits_user_by_reason"].as_array().unwrap() {
            let e = s
                .user
                .entry(x["name"].as_str().unwrap().to_string())
                .or_default();
            e.0 += u(&x["count"]);
            e.1 += u(&x["timed"]);
            e.2 += u(&x["ns"]);
        }
        if let Some(by) = r["exits_by_reason"].as_array() {
            for x in by {
                *s.kvm
                    .entry(x["name"].as_str().unwrap().to_string())
                    .or_default() += u(&x["count"]);
            }
        }
        for t in r["exits_targets"].as_array().unwrap() {
            let e = s
                .targets
                .entry((t["kind"].as_str().unwrap().to_string(), u(&t["addr"])))
                .or_default();
            e.0 += u(&t["count"]);
            e.1 += u(&t["user_exits"]);
            e.2 += u(&t["vmm_ns"]);
        }
        s.fires.push(r["exits_kvm_exit_fires"].clone());
        if r["exits"].is_null() {
            s.null_exits += 1;
        }
    }
    out
}

/// Runs the guest with `vm_args` under `exits <watch_args> -p PID`.
fn watch_vm(vm_args: &[&str], watch_args: &[&str]) -> (VmReport, Vec<Value>, String) {
    let vm = common::spawn_vm(vm_args);
    let pid = vm.ready.pid.to_string();
    let mut args = vec!["exits"];
    args.extend_from_slice(watch_args);
    args.extend_from_slice(&["--output", "json", "-p", &pid]);
    let w = watcher(&args);
    vm.start();
    let report = vm.finish(T);
    w.signal(libc::SIGINT);
    let (status, stdout, stderr) = w.wait(T);
    assert!(status.success(), "exits failed: {stderr}");
    (report, records(&stdout), stderr)
}

#[test]
fn exits_to_the_vmm_equal_the_guests_counts_and_kvms_statistics() {
    if ready() {
        exits_equal_the_truth(&[]);
    }
}

/// The kvm-only backend (nothing on the host's system calls) counts the
/// same exits, and its time in the VMM, which ends once the next KVM_RUN
/// has loaded the vCPU, still holds what the VMM itself measured.
#[test]
fn the_kvm_only_backend_counts_the_same_exits() {
    if ready() {
        exits_equal_the_truth(&["--backend", "kvm-only"]);
    }
}

fn exits_equal_the_truth(backend: &[&str]) {
    let (passes, n_io, n_mmio) = (300u64, 5u64, 2u64);
    let mut watch = vec!["--summary", "-i", "0.5"];
    watch.extend_from_slice(backend);
    let (report, recs, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--passes",
            &passes.to_string(),
            "--io-exits",
            &n_io.to_string(),
            "--mmio-exits",
            &n_mmio.to_string(),
        ],
        &watch,
    );
    let ours = seen(&recs);
    let wall_ns = (report.seconds * 1e9) as u64;
    for v in &report.vcpus {
        let made = v.exits_made;
        assert_eq!(v.exit, "guest", "vCPU {} stopped by itself", v.index);
        assert_eq!((made.io, made.mmio), (n_io * passes, n_mmio * passes));
        assert_eq!((made.vmm_io, made.vmm_mmio), (made.io, made.mmio));
        let s = ours
            .get(&v.tid)
            .unwrap_or_else(|| panic!("no exits of vCPU thread {}: {ours:?}", v.tid));
        let ctx = format!(
            "vCPU {} (tid {}): guest {made:?}; kvm-watcher {s:?}",
            v.index, v.tid
        );
        let io = s.user.get("IO").copied().unwrap_or_default();
        let mmio = s.user.get("MMIO").copied().unwrap_or_default();
        assert_eq!(
            io.0,
            made.io + 1,
            "I/O exits: the guest's and its stop: {ctx}"
        );
        assert_eq!(mmio.0, made.mmio, "MMIO exits: {ctx}");
        let stats = v.stats.as_ref().expect("KVM stats");
        assert_eq!(
            mmio.0,
            common::stat(stats, "mmio_exits"),
            "KVM's mmio_exits: {ctx}"
        );
        let io_exits = common::stat(stats, "io_exits");
        if pvm_host() {
            // The PVM backend does not count its I/O exits (io_exits is
            // kept by the VMX and SVM exit handlers).
            assert_eq!(io_exits, 0, "{ctx}");
        } else {
            assert_eq!(io.0, io_exits, "KVM's io_exits: {ctx}");
        }
        // The ports and the address are the guest's.
        let port = s.targets[&("pio".to_string(), IO_PORT)];
        assert_eq!((port.0, port.1), (made.io, made.io), "port 0x504: {ctx}");
        let page = s.targets[&("mmio".to_string(), MMIO_GPA)];
        assert_eq!(
            (page.0, page.1),
            (made.mmio, made.mmio),
            "0xfed00000: {ctx}"
        );
        assert_eq!(
            s.targets[&("pio".to_string(), 0x501)].1,
            1,
            "the stop: {ctx}"
        );
        // Every exit to the VMM but the last came back with KVM_RUN, after
        // some positive time, within the guest's run, and at least the time
        // the VMM itself measured between KVM_RUN's return and the next call.
        assert_eq!(
            io.1 + mmio.1,
            io.0 + mmio.0 - 1,
            "all timed but the stop: {ctx}"
        );
        let vmm_ns = io.2 + mmio.2;
        assert!(io.2 > 0 && mmio.2 > 0, "{ctx}");
        assert!(
            vmm_ns <= wall_ns,
            "{vmm_ns} ns in the VMM in a {wall_ns} ns run: {ctx}"
        );
        assert!(
            vmm_ns >= made.vmm_ns,
            "the VMM's own {} ns: {ctx}",
            made.vmm_ns
        );
        assert!(port.2 + page.2 <= vmm_ns, "{ctx}");
        // Where kvm_exit is silent, that is said, not shown as zeros.
        if pvm_host() {
            assert!(s.kvm.is_empty(), "{ctx}");
            assert!(s.fires.iter().all(|f| f == false), "{ctx}");
            assert_eq!(s.null_exits, s.fires.len(), "{ctx}");
        } else {
            assert!(s.fires.iter().any(|f| f == true), "{ctx}");
        }
    }
}

/// `vm --io-in M`: M INs from port 0x505 per pass after the N OUTs to
/// 0x504. kvm_pio fires for an IN only after the VMM answered it, in the
/// next KVM_RUN; each IN's exit is still credited to 0x505, each OUT's to
/// 0x504, and the exits credited to ports add up to every I/O exit.
#[test]
fn in_exits_are_credited_to_their_own_port() {
    if !ready() {
        return;
    }
    let (passes, n_out, n_in) = (200u64, 2u64, 3u64);
    let (report, recs, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--passes",
            &passes.to_string(),
            "--io-exits",
            &n_out.to_string(),
            "--io-in",
            &n_in.to_string(),
        ],
        &["--summary", "-i", "0.5"],
    );
    let ours = seen(&recs);
    for v in &report.vcpus {
        let made = v.exits_made;
        assert_eq!(v.exit, "guest", "vCPU {} stopped by itself", v.index);
        assert_eq!((made.io, made.io_in), (n_out * passes, n_in * passes));
        assert_eq!((made.vmm_io, made.vmm_io_in), (made.io, made.io_in));
        let s = &ours[&v.tid];
        let ctx = format!(
            "vCPU {} (tid {}): guest {made:?}; kvm-watcher {s:?}",
            v.index, v.tid
        );
        let pio = |port: u64| {
            s.targets
                .get(&("pio".to_string(), port))
                .copied()
                .unwrap_or_default()
        };
        // (accesses, exits to the VMM)
        assert_eq!(
            (pio(0x505).0, pio(0x505).1),
            (made.io_in, made.io_in),
            "port 0x505 (IN): {ctx}"
        );
        assert_eq!(
            (pio(IO_PORT).0, pio(IO_PORT).1),
            (made.io, made.io),
            "port 0x504 (OUT): {ctx}"
        );
        assert_eq!(pio(0x501).1, 1, "the stop: {ctx}");
        let io = s.user.get("IO").copied().unwrap_or_default().0;
        assert_eq!(io, made.io + made.io_in + 1, "I/O exits: {ctx}");
        let credited: u64 = s
            .targets
            .iter()
            .filter(|((kind, _), _)| kind == "pio")
            .map(|(_, t)| t.1)
            .sum();
        eprintln!(
            "vCPU {}: IN exits {} (guest {}), OUT exits {} (guest {}), I/O exits {io}, credited to ports {credited}",
            v.index,
            pio(0x505).1,
            made.io_in,
            pio(IO_PORT).1,
            made.io
        );
        assert_eq!(credited, io, "exits credited to ports: {ctx}");
    }
}

#[test]
fn rows_are_the_exits_with_their_reasons_and_ports() {
    if !ready() {
        return;
    }
    let passes = 100u64;
    let (report, recs, _) = watch_vm(
        &[
            "--vcpus",
            "1",
            "--passes",
            &passes.to_string(),
            "--io-exits",
            "3",
            "--mmio-exits",
            "1",
        ],
        &[],
    );
    let made = report.vcpus[0].exits_made;
    let rows: Vec<&Value> = recs.iter().filter(|r| r["monitor"] == "exits").collect();
    let count = |f: &dyn Fn(&Value) -> bool| rows.iter().filter(|r| f(r)).count() as u64;
    let port = count(&|r| r["kind"] == "vmm" && r["target"] == "pio" && u(&r["addr"]) == IO_PORT);
    let page = count(&|r| r["kind"] == "vmm" && r["target"] == "mmio" && u(&r["addr"]) == MMIO_GPA);
    assert_eq!((port, page), (made.io, made.mmio), "rows {}", rows.len());
    for r in &rows {
        assert_eq!(u(&r["tid"]), report.vcpus[0].tid as u64, "{r}");
        assert!(u(&r["ns"]) > 0, "{r}");
        if r["kind"] == "vmm" && r["target"] == "pio" {
            assert_eq!(r["reason_name"], "IO", "{r}");
        }
    }
    let s = summary(&recs);
    assert_eq!(u(&s["events"]["exits"]), rows.len() as u64);
    assert_eq!(u(&s["lost"]["exits"]), 0);
}

#[test]
fn a_small_ring_buffer_loses_rows_and_counts_them() {
    if !ready() {
        return;
    }
    let (report, recs, err) = watch_vm(
        &["--vcpus", "2", "--passes", "2000", "--io-exits", "20"],
        &["--ringbuf-size", "4"],
    );
    let s = summary(&recs);
    let (events, lost) = (u(&s["events"]["exits"]), u(&s["lost"]["exits"]));
    let rows = recs.iter().filter(|r| r["monitor"] == "exits").count() as u64;
    // Every exit to the VMM but each vCPU's last ends with a KVM_RUN.
    let ended: u64 = report.vcpus.iter().map(|v| v.exits_made.io).sum();
    assert!(
        lost > 0,
        "a 4 KiB ring buffer should overflow ({events} events)"
    );
    assert_eq!(events, rows, "events = rows written");
    assert!(
        events + lost >= ended,
        "events {events} + lost {lost} cover the {ended} exits to port 0x504"
    );
    assert!(err.contains("lost"), "no warning about lost rows: {err}");
}

#[test]
fn filters_keep_only_the_chosen_vcpu() {
    if !ready() {
        return;
    }
    let (report, recs, _) = watch_vm(
        &["--vcpus", "2", "--passes", "200", "--io-exits", "2"],
        &["--summary", "-i", "0.5", "--vcpu", "1"],
    );
    let ours = seen(&recs);
    let one = &report.vcpus[1];
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[&one.tid].user["IO"].0, one.exits_made.io + 1);
    for r in recs.iter().filter(|r| r["monitor"] == "vcpu_interval") {
        assert_eq!(r["vcpu_id"], 1, "{r}");
    }
}

/// A vCPU thread that is outside KVM_RUN when the watcher attaches (the
/// guest waits for its start, as a domain started paused does) and whose
/// first exit is an exit to the VMM (an IN: no kvm_pio before it) still has
/// its vcpu_id, KVM's (here 4 and 5, not the VMM's indexes 0 and 1), on
/// every row and interval.
#[test]
fn threads_first_seen_leaving_kvm_run_have_their_vcpu_id() {
    if !ready() {
        return;
    }
    let vm_args = [
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "4",
        "--passes",
        "100",
        "--io-in",
        "2",
    ];
    let (report, recs, _) = watch_vm(&vm_args, &[]);
    let id_of: HashMap<u64, u64> = report
        .vcpus
        .iter()
        .map(|v| (v.tid as u64, v.vcpu_id as u64))
        .collect();
    let rows: Vec<&Value> = recs.iter().filter(|r| r["monitor"] == "exits").collect();
    let wrong: Vec<&&Value> = rows
        .iter()
        .filter(|r| r["vcpu_id"].as_u64() != id_of.get(&u(&r["tid"])).copied())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} rows without their vCPU's id, e.g. {}",
        wrong.len(),
        rows.len(),
        wrong[0]
    );
    for v in &report.vcpus {
        let theirs = rows.iter().filter(|r| u(&r["tid"]) == v.tid as u64);
        let port = theirs
            .filter(|r| r["target"] == "pio" && u(&r["addr"]) == 0x505)
            .count() as u64;
        assert_eq!(port, v.exits_made.io_in, "IN rows of vCPU {}", v.index);
    }
    let (report, recs, _) = watch_vm(&vm_args, &["--summary", "-i", "0.5"]);
    let intervals: Vec<&Value> = recs
        .iter()
        .filter(|r| r["monitor"] == "vcpu_interval" && !r["exits_user"].is_null())
        .collect();
    assert!(!intervals.is_empty());
    for r in intervals {
        let want = report.vcpus.iter().find(|v| u(&r["tid"]) == v.tid as u64);
        assert_eq!(r["vcpu_id"].as_u64(), want.map(|v| v.vcpu_id as u64), "{r}");
    }
}

/// A vCPU thread already inside `KVM_RUN` when the watcher attaches (a busy
/// guest that only makes IN exits, so the first event seen of it may be its
/// return to the VMM, after KVM let go of the vCPU): every row has KVM's
/// vcpu_id, 3 here (the VMM's index is 0).
#[test]
fn a_vcpu_inside_kvm_run_at_attach_has_its_vcpu_id_on_every_row() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&["--first-vcpu-id", "3", "--io-in", "1", "--seconds", "4"]);
    let pid = vm.ready.pid.to_string();
    vm.start();
    std::thread::sleep(Duration::from_millis(500));
    let w = watcher(&["exits", "--output", "json", "-t", "1", "-p", &pid]);
    let (status, stdout, stderr) = w.wait(T);
    assert!(status.success(), "exits failed: {stderr}");
    let report = vm.finish(T);
    let tid = report.vcpus[0].tid as u64;
    let recs = records(&stdout);
    let rows: Vec<&Value> = recs.iter().filter(|r| r["monitor"] == "exits").collect();
    assert!(rows.len() > 100, "{} rows", rows.len());
    let wrong: Vec<&&Value> = rows
        .iter()
        .filter(|r| u(&r["tid"]) != tid || r["vcpu_id"] != 3 || u(&r["addr"]) != 0x505)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} rows not of vCPU 3 at port 0x505, e.g. {}",
        wrong.len(),
        rows.len(),
        wrong[0]
    );
}

/// Ids of the BPF maps named `name` that the process `pid` holds.
fn maps_of(pid: u32, name: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(info.lines().filter_map(|l| {
            l.strip_prefix("map_id:")
                .and_then(|v| v.trim().parse::<u64>().ok())
        }));
    }
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|id| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        let map: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        map["name"] == name
    });
    ids
}

/// The thread ids the keys of BPF map `id` begin with, as bpftool reads them.
fn tids_in(id: u64) -> std::collections::BTreeSet<u32> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .expect("bpftool");
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool map dump id {id}: {e}"));
    entries
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .unwrap_or_else(|| panic!("a key that is not bytes: {e}"))
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect();
            u32::from_ne_bytes(bytes[..4].try_into().unwrap())
        })
        .collect()
}

#[test]
fn rows_delete_the_kernel_entries_of_threads_that_exited() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--passes",
        "20",
        "--io-exits",
        "2",
        "--linger",
    ]);
    let w = watcher(&["exits", "--output", "json"]);
    vm.start();
    vm.wait_lingering(T);
    let tids: std::collections::BTreeSet<u32> = vm.ready.tids.iter().copied().collect();
    let names = ["exits_stats", "exits_threads", "exits_targets"];
    let maps: Vec<(&str, u64)> = names
        .iter()
        .map(|n| {
            let ids = maps_of(w.pid(), n);
            assert_eq!(ids.len(), 1, "maps named {n} of the watcher: {ids:?}");
            (*n, ids[0])
        })
        .collect();
    for (name, id) in &maps {
        let have = tids_in(*id);
        assert!(
            tids.is_subset(&have),
            "{name} while the vCPUs live: {have:?}, vCPUs {tids:?}"
        );
    }
    vm.start();
    vm.finish(T);
    // The session prunes every 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for (name, id) in &maps {
        loop {
            let left: Vec<u32> = tids_in(*id).intersection(&tids).copied().collect();
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} keeps the entries of exited threads {left:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    w.signal(libc::SIGINT);
    let (status, _, stderr) = w.wait(T);
    assert!(status.success(), "exits failed: {stderr}");
}
