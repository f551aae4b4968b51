//! A libvirt domain through its lifecycle with one `watch --vm NAME
//! --follow` and one `serve --vm NAME` attached from start to end: resume, reset, save and restore, destroy and
//! start. The domain runs in three QEMU processes one after the other; each
//! is checked on its own against KVM's counters of that process (libvirt's
//! `domstats` and QMP `query-stats`, read while the domain is paused, so
//! they bracket what the watchers saw), every vCPU: wake-ups after
//! sleeping, those caught by polling, and the halt time, all exact; and
//! serve's wake-up counters of each process, the exited ones kept for
//! `--retain`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::exporter::{Exporter, metrics, sum_of};
use common::libvirt::{Domain, Libvirt, VcpuStats, delta, stop, totals, wait_idle};
use common::observe::{summary, u, watcher};

/// What KVM counted in one QEMU process of the domain, between two reads
/// while it was paused.
struct Span {
    what: &'static str,
    pid: u32,
    /// libvirt's vCPU number -> (thread id, QOM path).
    vcpus: BTreeMap<u32, (u32, String)>,
    before: (VcpuStats, BTreeMap<String, u64>),
    after: Option<(VcpuStats, BTreeMap<String, u64>)>,
}

impl Span {
    /// The first read, with the domain paused.
    fn begin(dom: &Domain, what: &'static str) -> Span {
        Span {
            what,
            pid: dom.pid(),
            vcpus: dom
                .vcpus()
                .into_iter()
                .map(|(n, (tid, qom, ..))| (n, (tid, qom)))
                .collect(),
            before: (dom.vcpu_stats(), dom.halts_waited()),
            after: None,
        }
    }

    /// The second read, with the domain paused again.
    fn end(mut self, dom: &Domain) -> Span {
        assert_eq!(
            dom.pid(),
            self.pid,
            "{}: the QEMU process changed",
            self.what
        );
        self.after = Some((dom.vcpu_stats(), dom.halts_waited()));
        self
    }
}

/// Pauses for the watcher to follow a new QEMU process of the domain (it
/// looks for the name about once a second) before the guest runs.
fn let_it_follow() {
    std::thread::sleep(Duration::from_millis(2500));
}

#[test]
fn watch_follows_the_domain_through_reset_save_restore_and_restart() {
    if !common::require_bpf() {
        return;
    }
    let Some(lv) = Libvirt::connect() else { return };
    let dom = lv.define("life");
    dom.run("start", &["--paused"]);
    let w = watcher(&[
        "watch", "-w", "--vm", &dom.name, "--follow", "-i", "0.5", "--output", "json",
    ]);
    let e = Exporter::start(
        1024,
        &["--vm", &dom.name, "--metrics.pid-labels", "--retain", "600"],
    );
    let mut spans = Vec::new();

    // One process: the firmware's POST and idle, a reset (the vCPUs start
    // over in the same process), POST and idle again.
    let span = Span::begin(&dom, "start and reset");
    dom.run("resume", &[]);
    wait_idle(&dom);
    dom.run("reset", &[]);
    wait_idle(&dom);
    dom.run("suspend", &[]);
    spans.push(span.end(&dom));

    // Saved and restored: a new process, the guest carries on where it was.
    let file = std::env::temp_dir().join(format!("kvm-watcher-life-{}.save", std::process::id()));
    let file = file.to_str().unwrap();
    lv.must(&["save", &dom.name, file]);
    lv.must(&["restore", file, "--paused"]);
    let _ = std::fs::remove_file(file);
    let_it_follow();
    let span = Span::begin(&dom, "restored");
    dom.run("resume", &[]);
    std::thread::sleep(Duration::from_secs(2));
    dom.run("suspend", &[]);
    spans.push(span.end(&dom));

    // Destroyed and started again: a new process from the firmware on.
    dom.run("destroy", &[]);
    dom.run("start", &["--paused"]);
    let_it_follow();
    let span = Span::begin(&dom, "restarted");
    dom.run("resume", &[]);
    wait_idle(&dom);
    dom.run("suspend", &[]);
    spans.push(span.end(&dom));

    let recs = stop(w);
    // serve refreshes once a second; the domain is paused, nothing moves.
    std::thread::sleep(Duration::from_millis(1500));
    let page = metrics(&e);
    let served = |pid: u32, tid: u32, waited: bool| {
        let labels = [
            format!("pid=\"{pid}\""),
            format!("tid=\"{tid}\""),
            format!("waited=\"{waited}\""),
        ];
        sum_of(&page, "kvm_watcher_vcpu_wakeups_total", &labels).unwrap_or(-1.0) as i64
    };
    let mut failed = Vec::new();
    for s in &spans {
        let (before, waited_before) = &s.before;
        let (after, waited_after) = s.after.as_ref().unwrap();
        let mut bsp_waited = 0;
        for (&n, (tid, qom)) in &s.vcpus {
            let (ours, _) = totals(&recs, *tid, &["wakeups", "polled", "waited", "halt_ns"]);
            let kvm_waited = waited_after[qom] - waited_before[qom];
            let kvm_polled = delta(before, after, n, "halt_successful_poll");
            let kvm_halt_ns: u64 = ["halt_wait_ns", "halt_poll_success_ns", "halt_poll_fail_ns"]
                .iter()
                .map(|f| delta(before, after, n, f))
                .sum();
            let serve = (served(s.pid, *tid, true), served(s.pid, *tid, false));
            let line = format!(
                "{} (pid {}), vCPU {n} (tid {tid}): watch {ours:?}, serve waited/polled {serve:?}; \
                 KVM waited {kvm_waited}, polled {kvm_polled}, halt {kvm_halt_ns} ns",
                s.what, s.pid
            );
            eprintln!("{line}");
            let get = |f: &str| ours.get(f).copied().unwrap_or(0);
            if (get("waited"), get("polled"), get("halt_ns"))
                != (kvm_waited, kvm_polled, kvm_halt_ns)
                || serve != (kvm_waited as i64, kvm_polled as i64)
            {
                failed.push(line);
            }
            if n == 0 {
                bsp_waited = kvm_waited;
            }
        }
        assert!(bsp_waited >= 5, "{}: vCPU 0 hardly halted", s.what);
    }
    assert!(failed.is_empty(), "{failed:#?}");
    let pids: std::collections::BTreeSet<u32> = spans.iter().map(|s| s.pid).collect();
    assert_eq!(pids.len(), 3, "three QEMU processes: {pids:?}");
    assert_eq!(u(&summary(&recs)["lost"]["wakeup"]), 0);
}
