//! A fleet on one machine: hosts in their own network namespaces, each
//! exporter watching its own synthetic VMs, one real Prometheus scraping them
//! through file-based service discovery (a `host` label per target) and
//! evaluating the packaged rules (minutes read as seconds). Planted problems
//! fire the right alert with the right host and VM labels; a VM restarted
//! under its name continues its series.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fleet::{self, Host, firing, label};
use common::prometheus::Prometheus;

fn ready() -> bool {
    common::require_bpf()
        && common::require_kvm()
        && common::prometheus::available()
        && fleet::netns_available()
}

/// A thread pinned to `cpu` that spins until the flag is set.
fn busy_loop(cpu: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // SAFETY: gettid has no arguments.
        common::sched::pin(unsafe { libc::gettid() } as u32, cpu);
        while !stop.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    })
}

/// Run-queue wait of thread `tid` so far, ns (schedstat's second field).
fn waited_ns(tid: u32) -> u64 {
    kvm_watcher::procfs::thread_schedstat(tid)
        .unwrap_or_else(|| panic!("no schedstat for thread {tid}"))
        .wait_ns
}

/// Polls until every alert of `names` fires (or `within` passes); returns
/// the firing alerts of each.
fn wait_firing(
    prom: &Prometheus,
    names: &[&str],
    within: Duration,
) -> Vec<Vec<serde_json::Map<String, serde_json::Value>>> {
    let deadline = Instant::now() + within;
    loop {
        let all: Vec<_> = names.iter().map(|n| firing(prom, n)).collect();
        if all.iter().all(|a| !a.is_empty()) || Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// (host, vm, vcpu) of each alert.
fn who(
    alerts: &[serde_json::Map<String, serde_json::Value>],
) -> BTreeSet<(String, String, String)> {
    alerts
        .iter()
        .map(|a| {
            (
                label(a, "host").to_string(),
                label(a, "vm").to_string(),
                label(a, "vcpu").to_string(),
            )
        })
        .collect()
}

fn calm_vm(name: &str) -> common::VmProcess {
    common::spawn_vm(&["--name", name, "--halt-hz", "5", "--seconds", "180"])
}

/// Three hosts: on host-a a VM whose vCPU shares its CPU with a busy task
/// (KvmVcpuStealHigh), on host-b a VM changing its memory faster than the
/// migration link (KvmVmDirtyRateAboveMigrationLink), each next to a calm VM;
/// host-c is healthy until its exporter stops (KvmWatcherDown).
#[test]
fn planted_problems_fire_with_their_host_and_vm() {
    if !ready() {
        return;
    }
    // A guest that never halts, its vCPU thread pinned with a busy loop.
    let steal = common::spawn_vm(&["--name", "steal-vm", "--seconds", "180"]);
    let writer = common::spawn_vm(&[
        "--name",
        "writer",
        "--memory",
        "256",
        "--dirty-pages",
        "32768",
        "--sweep",
        "2048",
        "--halt-hz",
        "20",
        "--seconds",
        "180",
    ]);
    let calm: Vec<_> = ["calm-a", "calm-b", "calm-c"].map(calm_vm).into();
    // serve --vm wants the VMs there (not yet running) when it starts.
    let dir = fleet::tempdir("alerts");
    let hosts = [
        Host::start("host-a", 0, &["--vm", "steal-vm", "--vm", "calm-a"]),
        Host::start(
            "host-b",
            1,
            &["--dirty-rate", "--vm", "writer", "--vm", "calm-b"],
        ),
        Host::start("host-c", 2, &["--vm", "calm-c"]),
    ];
    let [a, b, c] = &hosts;
    // 32 MiB/s: the writer changes 32768 pages (128 MiB) within every second.
    let link = 32.0 * 1048576.0;
    let prom = fleet::prometheus(&dir, &[a, b, c], &fleet::scaled_rules(link));
    fleet::wait_up(&prom, &[a, b, c], Duration::from_secs(30));

    let cpu = common::sched::last_cpu();
    let tid = steal.ready.tids[0];
    common::sched::pin(tid, cpu);
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = busy_loop(cpu, Arc::clone(&stop));
    // The machine is shared: every other VM's vCPUs are kept from waiting
    // for a CPU, so that the planted wait is the only one.
    for vm in calm.iter().chain([&writer]) {
        vm.ready.tids.iter().for_each(|t| fleet::realtime(*t));
    }
    for vm in calm.iter().chain([&steal, &writer]) {
        vm.start();
    }

    let names = ["KvmVcpuStealHigh", "KvmVmDirtyRateAboveMigrationLink"];
    let fired = wait_firing(&prom, &names, Duration::from_secs(120));
    // The steal the rules computed, next to the kernel's own accounting of
    // the vCPU thread over the same 5 s.
    let (w0, t0) = (waited_ns(tid), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let truth = (waited_ns(tid) - w0) as f64 / t0.elapsed().as_nanos() as f64;
    let ratio = value(
        &prom,
        "kvm_watcher:vcpu_run_delay:ratio_rate5m{vm=\"steal-vm\"}",
    );
    let dirty = |vm: &str| {
        value(
            &prom,
            &format!("kvm_watcher:vm_dirty_bytes:rate5m{{vm=\"{vm}\"}}"),
        )
    };
    let (fast, slow) = (dirty("writer"), dirty("calm-b"));
    // The runbook's confirmation: dirty-rate with the link says pre-copy
    // would not converge.
    let out = common::run_cli(
        &[
            "dirty-rate",
            "--vm",
            "writer",
            "--link",
            "32",
            "-i",
            "2",
            "-t",
            "4.5",
            "--output",
            "json",
        ],
        Duration::from_secs(30),
    );
    let verdicts: Vec<serde_json::Value> =
        common::observe::records(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter_map(|r| r.get("migration").filter(|m| m.is_object()).cloned())
            .collect();
    assert!(
        !verdicts.is_empty() && verdicts.iter().all(|m| m["converges"] == false),
        "dirty-rate --link 32 for the writer: {verdicts:?} {out:?}"
    );
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    eprintln!(
        "steal-vm vCPU 0 waits {ratio:.3} of the time (rules), {truth:.3} (schedstat); \
         writer changes {:.1} MiB/s, calm-b {:.2} MiB/s, link {:.0} MiB/s",
        fast / 1048576.0,
        slow / 1048576.0,
        link / 1048576.0
    );
    let want = |h: &str, vm: &str, vcpu: &str| {
        BTreeSet::from([(h.to_string(), vm.to_string(), vcpu.to_string())])
    };
    assert_eq!(
        who(&fired[0]),
        want("host-a", "steal-vm", "0"),
        "{fired:#?}"
    );
    assert_eq!(who(&fired[1]), want("host-b", "writer", ""), "{fired:#?}");
    assert_eq!(label(&fired[0][0], "instance"), a.target);
    assert_eq!(label(&fired[1][0], "instance"), b.target);
    for alert in fired.iter().flatten() {
        assert!(
            !alert.contains_key("pid") && !alert.contains_key("tid"),
            "{alert:?}"
        );
    }
    assert!(
        (ratio - truth).abs() < 0.1,
        "steal {ratio} vs schedstat {truth}"
    );
    assert!(slow < link / 10.0, "calm-b changes {slow} B/s");

    // A host whose exporter stops.
    assert!(firing(&prom, "KvmWatcherDown").is_empty());
    let mut hosts = hosts;
    hosts[2].stop_exporter();
    let down = wait_firing(&prom, &["KvmWatcherDown"], Duration::from_secs(60));
    assert_eq!(who(&down[0]), want("host-c", "", ""), "{down:#?}");
    for h in &hosts[..2] {
        assert!(!h.stderr().contains("panicked"), "{}", h.stderr());
    }
    drop(prom);
    std::fs::remove_dir_all(dir).ok();
}

/// The value of the one series `promql` returns.
fn value(prom: &Prometheus, promql: &str) -> f64 {
    let v = prom.api(&format!(
        "/api/v1/query?query={}",
        common::prometheus::encode(promql)
    ));
    let r = v["data"]["result"].as_array().cloned().unwrap_or_default();
    assert_eq!(r.len(), 1, "{promql}: {v}");
    r[0]["value"][1].as_str().unwrap().parse().unwrap()
}

/// A VM stopped and started again under the same name (a new process) is
/// stored by Prometheus as the same series: every label set of its first
/// run comes back in its second, none names the process (with
/// `--metrics.pid-labels` this test fails: 164 series of a new identity), and
/// its wake-up counter goes on as KVM counted both runs.
#[test]
fn a_restarted_vm_keeps_its_series() {
    if !ready() {
        return;
    }
    let args = [
        "--name",
        "again",
        "--vcpus",
        "2",
        "--halt-hz",
        "200",
        "--dirty-pages",
        "16",
        "--dirty-log",
        "ring",
        "--seconds",
        "4",
    ];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let mut vm = Some(common::spawn_vm(&args));
    let dir = fleet::tempdir("restart");
    let host = Host::start("host-r", 3, &["--vm", "again"]);
    let prom = fleet::prometheus(&dir, &[&host], &fleet::scaled_rules(1e9));
    fleet::wait_up(&prom, &[&host], Duration::from_secs(30));
    let (mut runs, mut slept) = (Vec::new(), 0);
    for _ in 0..2 {
        let vm = vm.take().unwrap_or_else(|| common::spawn_vm(&args));
        // serve --vm finds a new process of its VMs within a second, and
        // counts only the processes it has found.
        std::thread::sleep(Duration::from_secs(2));
        let start = now();
        vm.start();
        let pid = vm.ready.pid;
        let report = vm.finish(Duration::from_secs(60));
        slept += report
            .vcpus
            .iter()
            .map(|v| common::stat(v.stats.as_ref().unwrap(), "halt_wait_hist"))
            .sum::<u64>();
        // A few scrapes of its final counts.
        std::thread::sleep(Duration::from_secs(3));
        runs.push((pid, start, now()));
    }
    assert_ne!(runs[0].0, runs[1].0, "two processes");
    // The counter goes on: both runs' wake-ups after sleeping, as KVM
    // counted them (the first run's threads are kept for --retain).
    let counted = value(
        &prom,
        "sum(kvm_watcher_vcpu_wakeups_total{vm=\"again\",waited=\"true\"})",
    );
    assert_eq!(counted, slept as f64, "wake-ups of both runs");
    let series = |(_, from, to): (u32, f64, f64)| -> BTreeSet<Labels> {
        let v = prom.api(&format!(
            "/api/v1/series?match%5B%5D={}&start={from:.3}&end={to:.3}",
            common::prometheus::encode("{vm=\"again\",__name__=~\"kvm_watcher_.*\"}")
        ));
        let all = v["data"]
            .as_array()
            .unwrap_or_else(|| panic!("series: {v}"));
        all.iter()
            .map(|s| {
                let m = s.as_object().unwrap();
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            })
            .collect()
    };
    let (first, second) = (series(runs[0]), series(runs[1]));
    eprintln!(
        "{} series in the first run, {} in the second, {} new",
        first.len(),
        second.len(),
        second.difference(&first).count()
    );
    assert!(
        first
            .iter()
            .any(|s| s["__name__"] == "kvm_watcher_vcpu_wakeups_total")
    );
    let lost: Vec<_> = first.difference(&second).take(5).collect();
    assert!(
        lost.is_empty(),
        "series not continued (the first 5): {lost:#?}"
    );
    // A series new in the second run is one whose event did not happen in
    // the first (a halt-poll window that never moved): it names a VM and
    // vCPU the first run already had, with nothing else that identifies it.
    let known: BTreeSet<Labels> = first.iter().map(identity).collect();
    let strangers: Vec<_> = second
        .difference(&first)
        .filter(|s| !known.contains(&identity(s)))
        .take(5)
        .collect();
    assert!(
        strangers.is_empty(),
        "series of another identity after the restart (the first 5): {strangers:#?}"
    );
    drop(prom);
    std::fs::remove_dir_all(dir).ok();
}

type Labels = std::collections::BTreeMap<String, String>;

/// A series' labels without its name and the labels that say which event
/// or bucket it counts: what is left names where it comes from.
fn identity(s: &Labels) -> Labels {
    const EVENT: [&str; 11] = [
        "__name__",
        "le",
        "waited",
        "direction",
        "cause",
        "reason",
        "kind",
        "slot",
        "as",
        "window",
        "method",
    ];
    s.iter()
        .filter(|(k, _)| !EVENT.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The scaled rules read every minute as a second and still check.
#[test]
fn scaled_rules_read_minutes_as_seconds() {
    assert_eq!(
        fleet::minutes_as_seconds("rate(x[5m]) + increase(y[10m]) + z[1h] + w[\"m]\"]"),
        "rate(x[5s]) + increase(y[10s]) + z[1h] + w[\"m]\"]"
    );
    let rules = fleet::scaled_rules(1234.0);
    assert!(rules.contains("vector(1234)"), "{rules}");
    assert!(
        !rules.contains("m]") && !rules.contains("for: 15m"),
        "{rules}"
    );
    assert!(rules.contains("for: 15s"), "{rules}");
}
