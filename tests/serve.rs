//! `serve` as a long-running service: it follows the VMs it was asked for
//! across restarts.

mod common;

use std::time::{Duration, Instant};

use common::exporter::{Exporter, metrics, sum_of};

/// `serve --vm NAME`: after the VM restarts with a new pid, the new process
/// is exported too, with KVM's own counts; `-p PID` warns when its VM exits.
#[test]
fn serve_follows_a_vm_that_restarts_under_its_name() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm =
        |name: &str| common::spawn_vm(&["--name", name, "--halt-hz", "500", "--seconds", "0.5"]);
    let first = vm("phoenix-vm");
    let pinned = vm("pinned-vm");
    let pinned_pid = pinned.ready.pid.to_string();
    let mut e = Exporter::start(
        1024,
        &[
            "--vm",
            "phoenix-vm",
            "--retain",
            "120",
            "--metrics.pid-labels",
        ],
    );
    let mut p = Exporter::start(1024, &["-p", &pinned_pid]);
    first.start();
    let r1 = first.finish(Duration::from_secs(60));
    pinned.start();
    pinned.finish(Duration::from_secs(60));
    let second = vm("phoenix-vm");
    let pid2 = second.ready.pid;
    // It says when it exports the new process; the counts below decide.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !e.stderr().contains(&format!("runs as pid {pid2}")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    second.start();
    let r2 = second.finish(Duration::from_secs(60));
    for (report, pid) in [(&r1, r1.pid), (&r2, pid2)] {
        let want: u64 = report
            .vcpus
            .iter()
            .map(|v| common::stat(v.stats.as_ref().unwrap(), "halt_wait_hist"))
            .sum();
        let labels = [format!("pid=\"{pid}\""), "waited=\"true\"".to_string()];
        // Final figures are read within a second of the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let got = sum_of(&metrics(&e), "kvm_watcher_vcpu_wakeups_total", &labels);
            if got == Some(want as f64) || Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            got,
            Some(want as f64),
            "wake-ups after sleeping of pid {pid}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.stderr().contains(&format!("--pid {pinned_pid} exited")) {
        assert!(
            Instant::now() < deadline,
            "no warning when the -p VM exited:\n{}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(e.running() && p.running());
}

/// The run-delay families of a vCPU (and kvm_watcher_vcpu_delay_seconds_total,
/// the KubeVirt and libvirt equivalent) equal its thread's schedstat, read
/// before the guest runs and once it has run and sleeps (`--linger`): the
/// histogram's sum, and the waiting time by cause nearly all of it.
#[test]
fn run_delay_metrics_equal_each_vcpus_schedstat() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--halt-hz",
        "500",
        "--seconds",
        "1",
        "--linger",
    ]);
    let pid = vm.ready.pid;
    let schedstat = |tid: u32| -> u64 {
        kvm_watcher::procfs::schedstat(pid, tid)
            .expect("schedstat")
            .wait_ns
    };
    let e = Exporter::start(
        1024,
        &[
            "-p",
            &pid.to_string(),
            "--metrics.pid-labels",
            "--metrics.vcpu-histograms",
        ],
    );
    let before: Vec<u64> = vm.ready.tids.iter().map(|&t| schedstat(t)).collect();
    vm.start();
    vm.wait_lingering(Duration::from_secs(60));
    for (i, &tid) in vm.ready.tids.iter().enumerate() {
        let want = (schedstat(tid) - before[i]) as f64 / 1e9;
        let labels = [format!("tid=\"{tid}\"")];
        let near = |x: Option<f64>| x.is_some_and(|x| (x - want).abs() <= (want / 100.0).max(1e-4));
        // serve refreshes once a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (sum, by_cause, count, delay) = loop {
            let text = metrics(&e);
            let sum = sum_of(&text, "kvm_watcher_vcpu_run_delay_seconds_sum", &labels);
            let by_cause = sum_of(
                &text,
                "kvm_watcher_vcpu_run_delay_cause_seconds_total",
                &labels,
            );
            let count = sum_of(&text, "kvm_watcher_vcpu_run_delay_seconds_count", &labels);
            let delay = sum_of(&text, "kvm_watcher_vcpu_delay_seconds_total", &labels);
            if near(delay) || Instant::now() > deadline {
                break (sum, by_cause, count, delay);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let ctx = format!(
            "vCPU thread {tid}: histogram sum {sum:?} s in {count:?} waits, by cause {by_cause:?} s, delay counter {delay:?} s; schedstat {want} s"
        );
        println!("{ctx}");
        // kvm_watcher_vcpu_delay_seconds_total is libvirt's vcpu.N.delay and
        // KubeVirt's kubevirt_vmi_vcpu_delay_seconds_total: schedstat's
        // run-queue wait, counted from when kvm-watcher saw the thread.
        assert!(near(delay), "{ctx}");
        // The histogram and the split by cause are the waits switch-ins
        // showed, each by the wall clock (their check against a second
        // observer is tests/run_delay_pairs.rs): the kernel's clock counts
        // a wake-up that preempts as ~0, so a vCPU that is only ever woken
        // waits at least as long by the wall clock, less the arrivals no
        // switch-in showed (their wait is the next one's, in schedstat).
        let (sum, by_cause) = (sum.expect(&ctx), by_cause.expect(&ctx));
        assert!((by_cause - sum).abs() <= 1e-6, "{ctx}");
        assert!(sum >= want * 0.8, "{ctx}");
        assert!(count.is_some_and(|c| c > 100.0), "{ctx}");
    }
    vm.signal(libc::SIGUSR1);
    vm.finish(Duration::from_secs(60));
}

/// The exits families of a vCPU against what its guest made on purpose:
/// exits to the VMM by reason equal the guest's own counts (and its stop),
/// their time in the VMM is a histogram of every one the VMM came back
/// from, at least the time the VMM itself measured and within the run.
#[test]
fn exits_metrics_equal_the_guests_own_counts() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--passes",
        "200",
        "--io-exits",
        "3",
        "--mmio-exits",
        "2",
    ]);
    let pid = vm.ready.pid;
    let e = Exporter::start(
        1024,
        &[
            "-p",
            &pid.to_string(),
            "--retain",
            "120",
            "--metrics.pid-labels",
            "--metrics.vcpu-histograms",
            "--metrics.reason-histograms",
        ],
    );
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    for v in &report.vcpus {
        let made = v.exits_made;
        let io = [format!("tid=\"{}\"", v.tid), "reason=\"IO\"".to_string()];
        let mmio = [format!("tid=\"{}\"", v.tid), "reason=\"MMIO\"".to_string()];
        let want = (made.io + 1) as f64;
        // Final figures are read within a second of the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = metrics(&e);
            let got = sum_of(&text, "kvm_watcher_vcpu_userspace_exits_total", &io);
            if got == Some(want) || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let got = |family: &str, labels: &[String]| sum_of(&text, family, labels);
        let ctx = format!("vCPU {} (tid {}): guest {made:?}", v.vcpu_id, v.tid);
        assert_eq!(
            got("kvm_watcher_vcpu_userspace_exits_total", &io),
            Some(want),
            "{ctx}"
        );
        assert_eq!(
            got("kvm_watcher_vcpu_userspace_exits_total", &mmio),
            Some(made.mmio as f64),
            "{ctx}"
        );
        // serve leaves the host's system calls alone: exits' time in the
        // VMM ends once KVM_RUN has loaded the vCPU again.
        assert!(
            text.contains("kvm_watcher_backend_info{monitor=\"exits\",backend=\"kvm-only\"} 1"),
            "{ctx}: exits' backend"
        );
        // Every exit but the last (the stop) came back with KVM_RUN.
        let count = got("kvm_watcher_vcpu_userspace_exit_seconds_count", &io).unwrap_or(0.0)
            + got("kvm_watcher_vcpu_userspace_exit_seconds_count", &mmio).unwrap_or(0.0);
        assert_eq!(count, (made.io + made.mmio) as f64, "{ctx}");
        let sum = got("kvm_watcher_vcpu_userspace_exit_seconds_sum", &io).unwrap_or(0.0)
            + got("kvm_watcher_vcpu_userspace_exit_seconds_sum", &mmio).unwrap_or(0.0);
        assert!(
            sum >= made.vmm_ns as f64 / 1e9 && sum <= report.seconds,
            "{ctx}: {sum} s in the VMM"
        );
    }
}

/// A VM name with escape sequences, BEL, quotes and a newline reaches
/// /metrics with its control characters shown as text (`\u{1b}`, as the
/// tables show them): no raw control byte, no forged series or line.
#[test]
fn vm_names_with_control_characters_are_shown_as_text() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let name = "evil\x1b]0;owned\x07\x1b[2J\"} 1\nkvm_watcher_forged_total 1\r\u{202e}";
    let vm = common::spawn_vm(&["--name", name, "--halt-hz", "100", "--seconds", "30"]);
    let pid = vm.ready.pid.to_string();
    let e = Exporter::start(1024, &["-p", &pid]);
    vm.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = metrics(&e);
        if page.contains("vm=\"evil") || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(vm);
    let raw: Vec<char> = page
        .chars()
        .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
        .collect();
    assert!(
        raw.is_empty(),
        "raw control characters on the page: {raw:?}"
    );
    assert!(
        !page.lines().any(|l| l.starts_with("kvm_watcher_forged")),
        "a forged series"
    );
    let line = page
        .lines()
        .find(|l| l.starts_with("kvm_watcher_vm_info{") && l.contains("vm=\"evil"))
        .expect("the VM's identity series");
    eprintln!("{line}");
    assert!(
        line.contains(r#"vm="evil\\u{1b}]0;owned\\u{7}\\u{1b}[2J\"} 1\\nkvm_watcher_forged_total 1\\r\\u{202e}""#),
        "{line}"
    );
}
