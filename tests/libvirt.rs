//! kvm-watcher on a libvirt host: a domain of Debian's libvirt (SeaBIOS,
//! no disk, 2 sockets x 3 cores, a name with a comma and a space), and
//! what kvm-watcher counts next to what libvirt reports of it: KVM's own
//! per-vCPU statistics (`virsh domstats --vcpu`, which reads them through
//! QEMU's `query-stats`, and the histograms through QMP) and the kernel's
//! run delay (`vcpu.N.delay`, from schedstat).
//!
//! Reads happen while the domain is paused (started with `--paused`, or
//! `virsh suspend`), when its vCPUs are outside KVM_RUN: KVM's statistics do
//! not move, so they bracket exactly what kvm-watcher saw between attach
//! and detach. `domstats` runs `query-stats` on every vCPU thread (a
//! halted running vCPU wakes once for it; a paused vCPU thread only runs
//! and sleeps again), after libvirt has read schedstat: the run delay of
//! that wake belongs after the read.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::exporter::{Exporter, metrics};
use common::libvirt::{
    Domain, Libvirt, VcpuStats, delta, halted_ns, stop, totals, unpolled_halts, wait_idle,
};
use common::observe::{of, summary, u, watcher};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// One domain at a time: SeaBIOS's POST keeps a CPU busy for seconds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    common::one_at_a_time(&SERIAL)
}

fn ready() -> Option<Libvirt> {
    if !common::require_bpf() {
        return None;
    }
    Libvirt::connect()
}

/// KVM's vcpu_id of the vCPU at `socket`, `core` on 3 cores of 1 thread:
/// the x86 APIC id, with 2 bits for the core.
fn apic_id(socket: u64, core: u64) -> u64 {
    socket << 2 | core
}

/// With the domain paused (never run yet): attaches `watch <flags>
/// --output json` and reads libvirt's figures (`before`), lets SeaBIOS run
/// its POST and idle for 2 s, suspends the domain, detaches and reads them
/// again (`after`).
fn watched_run(dom: &Domain, flags: &[&str]) -> (VcpuStats, VcpuStats, Vec<Value>) {
    let mut args = vec!["watch", "--output", "json", "-i", "1"];
    args.extend_from_slice(flags);
    let w = watcher(&args);
    let before = dom.vcpu_stats();
    dom.run("resume", &[]);
    wait_idle(dom);
    std::thread::sleep(Duration::from_secs(2));
    dom.run("suspend", &[]);
    let recs = stop(w);
    (before, dom.vcpu_stats(), recs)
}

/// Per vCPU, wake-ups after sleeping equal KVM's halt_wait_hist, those
/// caught by polling halt_successful_poll, and the halt time (polling plus
/// sleeping) halt_wait_ns + halt_poll_success_ns + halt_poll_fail_ns (KVM
/// adds the polling of a halt that then slept to halt_poll_fail_ns): all
/// exact. libvirt's vCPU N is the thread QEMU names `CPU N/KVM` and KVM's
/// APIC id: kvm-watcher's rows carry both.
///
/// kvm-watcher's `polled` is the tracepoint's `waited == false`: the halt
/// ended without sleeping. KVM counts that as a successful poll only when
/// it polled; a halt with a zero window that ends without sleeping (an
/// interrupt arriving between the HLT exit and the sleep, a window of
/// nanoseconds) would count for kvm-watcher only. SeaBIOS's halts last
/// 55 ms, longer than any polling window, so no poll succeeds here: the
/// polled side is 0 on both sides.
#[test]
fn wakeups_and_halt_time_equal_kvm_stats_from_libvirt() {
    let Some(lv) = ready() else { return };
    let _serial = serial();
    let dom = lv.define("wakeups");
    dom.run("start", &["--paused"]);
    let pid = dom.pid().to_string();
    let vcpus = dom.vcpus();
    let waited_before = dom.halts_waited();
    let (before, after, recs) = watched_run(&dom, &["-w", "-p", &pid]);
    let waited_after = dom.halts_waited();
    assert_eq!(vcpus.len(), 6, "{vcpus:?}");
    for (&n, (tid, qom, socket, core)) in &vcpus {
        let (ours, who) = totals(&recs, *tid, &["wakeups", "polled", "waited", "halt_ns"]);
        let kvm_waited = waited_after[qom] - waited_before[qom];
        let kvm_polled = delta(&before, &after, n, "halt_successful_poll");
        let kvm_halt_ns = halted_ns(&before, &after, n);
        let ctx = format!(
            "libvirt vCPU {n} (tid {tid}, socket {socket} core {core}): kvm-watcher {ours:?} as {who:?}; \
             KVM waited {kvm_waited}, polled {kvm_polled}, halt {kvm_halt_ns} ns"
        );
        eprintln!("{ctx}");
        assert_eq!(
            who,
            Some((apic_id(*socket, *core), format!("CPU {n}/KVM"))),
            "vcpu_id and thread name: {ctx}"
        );
        assert_eq!(ours["waited"], kvm_waited, "woken after sleeping: {ctx}");
        // Not waited: caught by polling, or woken before it slept (see
        // unpolled_halts); the halt time KVM counts is the rest.
        let unpolled = unpolled_halts(
            (ours["wakeups"], ours["polled"], ours["halt_ns"]),
            kvm_polled,
            delta(&before, &after, n, "halt_attempted_poll"),
            kvm_halt_ns,
        );
        assert!(
            unpolled.is_some(),
            "caught by polling, and halt time: {ctx}"
        );
    }
    // SeaBIOS idled on vCPU 0 for 2 s at 18.2 Hz.
    let bsp = waited_after[&vcpus[&0].1] - waited_before[&vcpus[&0].1];
    assert!(bsp >= 20, "vCPU 0 hardly halted: {bsp}");
    assert_eq!(u(&summary(&recs)["lost"]["wakeup"]), 0);
}

/// Per vCPU, the run delay kvm-watcher's run-delay monitor sums equals
/// libvirt's `vcpu.N.delay` (schedstat) over the same span, exactly: the
/// first read comes after the attach (its wake of each vCPU thread is seen
/// by both), the second after the detach (its wake is seen by neither).
/// The domain is picked by its name, comma and space included.
#[test]
fn run_delay_equals_libvirts_vcpu_delay() {
    let Some(lv) = ready() else { return };
    let _serial = serial();
    let dom = lv.define("delay");
    dom.run("start", &["--paused"]);
    let vcpus = dom.vcpus();
    let (before, after, recs) = watched_run(&dom, &["-r", "--vm", &dom.name]);
    let fields = ["run_delay_ns", "run_delay_waits"];
    let mut total = 0;
    for (&n, (tid, ..)) in &vcpus {
        let (ours, who) = totals(&recs, *tid, &fields);
        let delay = delta(&before, &after, n, "delay");
        let ctx = format!(
            "libvirt vCPU {n} (tid {tid}): kvm-watcher {ours:?} as {who:?}; libvirt delay {delay} ns"
        );
        eprintln!("{ctx}");
        assert_eq!(ours["run_delay_ns"], delay, "run delay: {ctx}");
        total += delay;
    }
    assert!(total > 0, "no vCPU thread ever waited for a CPU");
    assert!(
        of(&recs, "vcpu_interval")
            .iter()
            .all(|r| r["vm"] == dom.name.as_str()),
        "records without the domain's name"
    );
    assert_eq!(u(&summary(&recs)["lost"]["run_delay"]), 0);
}

/// The labels of an exposition line `family{k="v",...} value` (values
/// may hold commas), or None for another family.
fn labels_of(line: &str, family: &str) -> Option<BTreeMap<String, String>> {
    let mut rest = line.strip_prefix(family)?.strip_prefix('{')?;
    let mut labels = BTreeMap::new();
    while let Some((key, tail)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = tail.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(chars.next()?.1),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = &tail[end + 1..];
    }
    Some(labels)
}

/// `serve --vm NAME` with the name whole (comma and space) exports the
/// domain's vCPUs under that name, and follows it through `virsh destroy`
/// and `virsh start`: series for the new QEMU process appear, with the
/// vCPU threads and KVM ids QEMU reports.
#[test]
fn serve_follows_the_domain_by_name_through_a_restart() {
    let Some(lv) = ready() else { return };
    let _serial = serial();
    let dom = lv.define("serve");
    // serve refuses a --vm name no running VM has: start the domain first.
    dom.run("start", &[]);
    let e = Exporter::start(1024, &["--vm", &dom.name, "--metrics.pid-labels"]);
    let mut pids = Vec::new();
    for round in 0..2 {
        if round == 1 {
            dom.run("destroy", &[]);
            dom.run("start", &[]);
        }
        let pid = dom.pid();
        let want: BTreeMap<String, String> = dom
            .vcpus()
            .values()
            .map(|(tid, _, s, c)| (tid.to_string(), apic_id(*s, *c).to_string()))
            .collect();
        let deadline = Instant::now() + T;
        let mut text;
        let got = loop {
            text = metrics(&e);
            let got: BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| labels_of(l, "kvm_watcher_vcpu_delay_seconds_total"))
                .filter(|l| l["pid"] == pid.to_string())
                .map(|l| {
                    assert_eq!(l["vm"], dom.name, "{l:?}");
                    (l["tid"].clone(), l["vcpu"].clone())
                })
                .collect();
            if got == want || Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("pid {pid}: tid -> vcpu {got:?}");
        let mine: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("pid=\"{pid}\"")))
            .collect();
        assert_eq!(
            got,
            want,
            "the vCPUs of pid {pid}: {mine:#?}\nstderr:\n{}",
            e.stderr()
        );
        pids.push(pid);
    }
    assert_ne!(pids[0], pids[1], "the restart kept the pid");
}

/// `vms` lists the domain under its name with its six vCPU threads and
/// KVM's ids 0, 1, 2, 4, 5, 6 (libvirt numbers them 0..5), each thread the
/// one QEMU reports for that vCPU; `vms --vm NAME` finds it by that name.
#[test]
fn vms_lists_the_domain_with_kvms_vcpu_ids() {
    let Some(lv) = ready() else { return };
    let _serial = serial();
    let dom = lv.define("vms");
    dom.run("start", &[]);
    let pid = dom.pid() as u64;
    let want: Vec<(u64, String, u64)> = dom
        .vcpus()
        .iter()
        .map(|(n, (tid, _, s, c))| (*tid as u64, format!("CPU {n}/KVM"), apic_id(*s, *c)))
        .collect();
    // A vCPU's id is known once its thread has entered KVM_RUN.
    let deadline = Instant::now() + T;
    let me = loop {
        let out = common::run_cli(&["vms", "--json", "--vm", &dom.name], T);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let all = listed.as_array().unwrap();
        assert_eq!(all.len(), 1, "--vm lists only the domain: {listed}");
        let me = all[0].clone();
        let known = me["vcpu_threads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["vcpu_id"].is_u64());
        if known || Instant::now() > deadline {
            break me;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(me["pid"].as_u64(), Some(pid), "{me}");
    assert_eq!(me["name"], dom.name.as_str(), "{me}");
    let threads: Vec<(u64, String, u64)> = me["vcpu_threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                u(&t["tid"]),
                t["comm"].as_str().unwrap_or_default().to_string(),
                t["vcpu_id"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(threads, want, "{me}");
    let ids: Vec<u64> = want.iter().map(|w| w.2).collect();
    assert_eq!(ids, [0, 1, 2, 4, 5, 6]);
    assert_eq!(me["vcpu_ids"], serde_json::json!(ids), "{me}");
    // libvirt's vCPU 3 is KVM's 4: `--vcpu 3` would match nothing, and is
    // refused, saying which number it takes and what the VMM's 3 is.
    let pid = pid.to_string();
    let out = common::run_cli(&["-w", "-p", &pid, "--vcpu", "3", "-t", "1"], T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("KVM's vCPU ids:") && err.contains("0,1,2,4,5,6") && err.lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("the VMM's vCPU 3 is KVM's 4"), "{err}");
    // `--vcpu vmm:3` is libvirt's vCPU 3: only its thread, as KVM's 4. A
    // suspend and resume takes every vCPU out of KVM_RUN and back in, so
    // each loads: a filter that let another through would show it.
    let (tid3, ..) = dom.vcpus()[&3].clone();
    let w = watcher(&[
        "watch", "-o", "-p", &pid, "--vcpu", "vmm:3", "-i", "0.5", "--output", "json",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    dom.run("suspend", &[]);
    std::thread::sleep(Duration::from_millis(500));
    dom.run("resume", &[]);
    std::thread::sleep(Duration::from_secs(1));
    let recs = stop(w);
    let seen: std::collections::BTreeSet<(u64, Option<u64>)> = of(&recs, "vcpu_interval")
        .iter()
        .map(|r| (u(&r["tid"]), r["vcpu_id"].as_u64()))
        .collect();
    assert_eq!(
        seen,
        [(tid3 as u64, Some(4))].into(),
        "only libvirt's vCPU 3 (tid {tid3}), KVM's 4"
    );
}
