//! `kvm-watcher top` in a real terminal (a tmux pane of a fixed size): its
//! figures against the synthetic guest's own counts, KVM's statistics and
//! the scheduler's; its keys; VMs coming and going; the terminal restored on
//! every way out; and the refusal without a terminal.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::sched::{last_cpu, pin};
use common::screen::{interval_of, next_refresh, refresh_time, seconds_of, table, vm_rows};
use common::tmux::{Tmux, have_tmux};
use kvm_watcher::procfs::thread_schedstat;

fn ready() -> bool {
    common::require_bpf() && common::require_kvm() && have_tmux()
}

/// A pane running `kvm-watcher top <args>`; when top ends the shell prints
/// its exit status and the terminal's modes.
fn top(width: u16, height: u16, args: &str) -> Tmux {
    let script = format!(
        "{} top {args}; st=$?; modes=$(stty -a | tr -s ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '); echo \"TOP-EXIT=$st modes: $modes.\"",
        common::bin()
    );
    Tmux::start(width, height, &script)
}

#[test]
fn top_refuses_to_start_without_a_terminal_with_exit_2() {
    let out = common::run_cli(&["top"], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("needs a terminal")
            && err.contains("kvm-watcher watch")
            && err.contains("--output json"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing on the pipe");
}

/// Everything top shows of a VM with known rates, added up over every
/// refresh of the guest's life, next to what the guest, KVM and the
/// scheduler counted over the same time. The tolerances are the screen's
/// rounding (of each figure and of the interval's length) in each refresh.
#[test]
fn top_figures_match_the_guest_kvm_and_the_scheduler() {
    if !ready() {
        return;
    }
    const PAGES: u64 = 20;
    const INTERVAL: f64 = 2.0;
    let name = format!("tf-{}", std::process::id());
    let vm = common::spawn_vm(&[
        "--name",
        &name,
        "--vcpus",
        "2",
        "--halt-hz",
        "200",
        "--halt-poll-ns",
        "0",
        "--slots",
        "2",
        "--dirty-pages",
        &PAGES.to_string(),
        "--dirty-log",
        "ring",
        "--seconds",
        "5",
    ]);
    let cpu = last_cpu();
    for &tid in &vm.ready.tids {
        pin(tid, cpu);
    }
    let pid = vm.ready.pid;
    let t = top(260, 30, &format!("-p {pid} -i {INTERVAL}"));
    t.wait_for("the VM's row", |s| s.contains(&name));
    t.keys(&["+"]);
    let mut screen = t.wait_for("a refresh with the vCPUs", |s| {
        refresh_time(s).contains(':')
            && vm_rows(&table(s).1, &name).is_some_and(|(_, v)| v.len() == 2)
    });
    vm.start();
    // Every refresh from the guest's start to its last figures.
    let mut refreshes = Vec::new();
    let on_cpu = std::sync::Mutex::new(vec![0u64; 2]);
    loop {
        // The scheduler's figures until the thread is gone, while waiting.
        let before = refresh_time(&screen);
        let next = t.wait_for("a new refresh", |s| {
            for (i, &tid) in vm.ready.tids.iter().enumerate() {
                if let Some(ns) = thread_schedstat(tid).map(|s| s.run_ns) {
                    on_cpu.lock().unwrap()[i] = ns;
                }
            }
            let now = refresh_time(s);
            now != before && now.contains(':')
        });
        let gap = seconds_of(&refresh_time(&next)) - seconds_of(&refresh_time(&screen));
        assert!(
            (gap as f64 - INTERVAL).abs() <= 1.0,
            "a refresh was missed (the test was too slow to read the screen):\n{screen}\n{next}"
        );
        screen = next;
        // Until the VM is gone: after it exits it shows its last figures.
        let Some((v, vcpus)) = vm_rows(&table(&screen).1, &name) else {
            break;
        };
        refreshes.push((interval_of(&screen), v, vcpus, screen.clone()));
        assert!(refreshes.len() < 10, "the VM never went\n{screen}");
    }
    assert_eq!(
        refreshes.last().map(|r| r.1.get("VMM").to_string()),
        Some("exited".to_string()),
        "its last figures are marked"
    );
    let report = vm.finish(Duration::from_secs(60));
    let s = next_refresh(&t, &screen);
    assert!(
        vm_rows(&table(&s).1, &name).is_none(),
        "gone after its last figures\n{s}"
    );

    let n = refreshes.len() as f64;
    let mut sums = BTreeMap::<String, f64>::new();
    for (l, v, vcpus, c) in &refreshes {
        println!("{c}");
        assert_eq!(v.get("PID"), pid.to_string());
        assert_eq!(v.get("VCPUS"), "2");
        assert_eq!(vcpus.len(), 2, "one row per vCPU\n{c}");
        *sums.entry("VM DIRTY".into()).or_default() += v.num("DIRTY/s") * l;
        if v.num("DIRTY/s") > 0.0 {
            assert_eq!(
                v.get("PAGES"),
                report.dirty.distinct_pages.to_string(),
                "every pass writes each page of the guest\n{c}"
            );
            let mib = report.dirty.distinct_pages as f64 * 4096.0 / 1048576.0 / l;
            assert!((v.num("MiB/s") - mib).abs() <= 0.0051, "MiB/s\n{c}");
        }
        let sum: f64 = vcpus.iter().map(|r| r.num("WAKE/s")).sum();
        assert!(
            (v.num("WAKE/s") - sum).abs() <= 1.0,
            "the VM's wake-ups are its vCPUs'\n{c}"
        );
        let mean = vcpus.iter().map(|r| r.num("HALT%")).sum::<f64>() / 2.0;
        assert!(
            (v.num("HALT%") - mean).abs() <= 0.1,
            "the VM's halted % is its vCPUs' mean\n{c}"
        );
        for (row, truth) in vcpus.iter().zip(&report.vcpus) {
            assert_eq!(row.get("NAME"), format!("vCPU {}", truth.vcpu_id));
            assert_eq!(row.get("PID"), truth.tid.to_string());
            assert_eq!(row.get("DIRTY/s"), "", "per VM only");
            let k = |what: &str| format!("vCPU {} {what}", truth.vcpu_id);
            *sums.entry(k("wake-ups")).or_default() += row.num("WAKE/s") * l;
            *sums.entry(k("halted s")).or_default() += row.num("HALT%") / 100.0 * l;
            *sums.entry(k("run s")).or_default() += row.num("RUN%") / 100.0 * l;
            if row.num("WAKE/s") > 0.0 {
                assert_eq!(row.get("POLL%"), "0.0", "--halt-poll-ns 0\n{c}");
            }
            if row.num("RUN%") > 0.0 {
                assert_eq!(row.get("PCPU"), cpu.to_string(), "pinned\n{c}");
            }
        }
    }
    let close = |what: &str, got: f64, want: f64, tolerance: f64| {
        println!("{what}: top {got:.3}, truth {want:.3} (tolerance {tolerance:.3})");
        assert!(
            (got - want).abs() <= tolerance,
            "{what}: top shows {got} over {n} refreshes, the truth is {want} (tolerance {tolerance})"
        );
    };
    for (i, truth) in report.vcpus.iter().enumerate() {
        let stats = truth.stats.as_ref().expect("KVM stats");
        let k = |what: &str| sums[&format!("vCPU {} {what}", truth.vcpu_id)];
        assert_eq!(common::stat(stats, "halt_successful_poll"), 0);
        // Every HLT exit that blocked (KVM's halt_wait_hist) is a wake-up;
        // one whose interrupt was already there may not halt at all, so
        // KVM's halt_exits (the guest's HLTs) bound them from above.
        // Rounding: wake-ups/s to 1, the interval to 1 ms, per refresh.
        let (slept, exits) = (
            common::stat(stats, "halt_wait_hist") as f64,
            common::stat(stats, "halt_exits") as f64,
        );
        assert_eq!(
            exits, truth.halts as f64,
            "KVM's halt exits are the guest's HLTs"
        );
        let tol = n * (0.5 * INTERVAL + 0.0005 * exits / report.seconds) + 1.0;
        let wake = k("wake-ups");
        println!(
            "vCPU {} wake-ups: top {wake:.1}, KVM: {slept} slept, {exits} HLT exits (tolerance {tol:.1})",
            truth.vcpu_id
        );
        assert!(
            wake >= slept - tol && wake <= exits + tol,
            "vCPU {}: top shows {wake} wake-ups, KVM {slept} that slept and {exits} HLT exits (tolerance {tol})",
            truth.vcpu_id
        );
        let halted = ["halt_wait_ns", "halt_poll_success_ns", "halt_poll_fail_ns"]
            .iter()
            .map(|s| common::stat(stats, s))
            .sum::<u64>() as f64
            / 1e9;
        close(
            &format!("vCPU {} halted s vs KVM's halt_*_ns", truth.vcpu_id),
            k("halted s"),
            halted,
            n * 0.0015 * INTERVAL + 0.01,
        );
        let ran = on_cpu.lock().unwrap()[i] as f64 / 1e9;
        close(
            &format!("vCPU {} run s vs schedstat", truth.vcpu_id),
            k("run s"),
            ran,
            (ran * 0.25).max(0.05),
        );
    }
    let writes = report.dirty.harvested as f64;
    let tol = n * (0.5 * INTERVAL + 0.0005 * writes / report.seconds) + 1.0;
    close(
        "VM dirty writes vs ring entries harvested",
        sums["VM DIRTY"],
        writes,
        tol,
    );
    t.keys(&["q"]);
    t.wait_for("top's end", |s| s.contains("TOP-EXIT=0"));
}

/// Two VMs at 80x24: each key does what the help says.
#[test]
fn top_keys_sort_filter_expand_detail_help_pause_scroll_and_quit() {
    if !ready() {
        return;
    }
    let id = std::process::id();
    let (a, b) = (format!("tk-a-{id}"), format!("tk-b-{id}"));
    let vm_a = common::spawn_vm(&[
        "--name",
        &a,
        "--vcpus",
        "1",
        "--halt-hz",
        "100",
        "--seconds",
        "300",
    ]);
    let vm_b = common::spawn_vm(&[
        "--name",
        &b,
        "--vcpus",
        "2",
        "--halt-hz",
        "300",
        "--seconds",
        "300",
    ]);
    vm_a.start();
    vm_b.start();
    let t = top(
        80,
        24,
        &format!("-p {} -p {}", vm_a.ready.pid, vm_b.ready.pid),
    );
    let s = t.wait_for("both VMs with figures", |s| {
        let (_, rows) = table(s);
        [&a, &b]
            .iter()
            .all(|n| vm_rows(&rows, n).is_some_and(|(r, _)| !r.get("WAKE/s").is_empty()))
    });
    let names = |s: &str| -> Vec<String> {
        table(s)
            .1
            .iter()
            .map(|r| r.get("NAME").to_string())
            .collect()
    };
    assert_eq!(
        names(&s),
        [format!("+ {a}"), format!("+ {b}")],
        "by name first\n{s}"
    );
    assert!(s.lines().nth(2).unwrap().contains("sort NAME ^"));
    let (titles, _) = table(&s);
    assert_eq!(&titles[..4], ["NAME", "PID", "VCPUS", "WAKE/s"], "{s}");
    assert!(
        !titles.contains(&"VMM".to_string()),
        "80 columns do not hold them all"
    );
    assert!(s.lines().nth(2).unwrap().contains("columns 1-"), "{s}");

    // Sort: > moves to PID, VCPUS, WAKE/s (busiest first); r reverses.
    t.keys(&[">", ">", ">"]);
    let s = t.wait_for("sort by WAKE/s", |s| s.contains("sort WAKE/s v"));
    assert_eq!(
        names(&s),
        [format!("+ {b}"), format!("+ {a}")],
        "600/s before 100/s\n{s}"
    );
    t.keys(&["r"]);
    let s = t.wait_for("reversed", |s| s.contains("sort WAKE/s ^"));
    assert_eq!(names(&s), [format!("+ {a}"), format!("+ {b}")]);

    // Filter by name; Esc clears it.
    t.keys(&["/", "t", "k", "-", "b"]);
    let s = t.wait_for("the filter prompt", |s| {
        s.contains("filter by VM name: tk-b_")
    });
    assert_eq!(names(&s), [format!("+ {b}")], "{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for("the filter kept", |s| {
        s.contains("filter \"tk-b\"") && !s.contains("filter by VM name")
    });
    assert_eq!(names(&s), [format!("+ {b}")]);
    t.keys(&["Escape"]);
    t.wait_for("the filter cleared", |s| names(s).len() == 2);

    // Expand all, select a vCPU of b, open its detail pane.
    t.keys(&["+"]);
    let s = t.wait_for("vCPU rows", |s| names(s).len() == 5);
    assert_eq!(names(&s)[0], format!("- {a}"));
    assert!(names(&s)[1..].contains(&"vCPU 0".to_string()), "{s}");
    t.keys(&["End", "d"]);
    let s = t.wait_for("the detail pane", |s| {
        s.contains(&format!(" of {b} (tid"))
            && s.contains("halt duration (us)")
            && s.contains("run: ")
    });
    let selected = table(&s)
        .1
        .into_iter()
        .find(|r| r.selected)
        .expect("a selected row");
    let tid: u32 = selected.get("PID").parse().unwrap();
    assert!(
        vm_b.ready.tids.contains(&tid),
        "the last row is one of b's vCPUs\n{s}"
    );
    assert!(
        s.contains("wakeup") && s.contains("wake-ups ") && s.contains("halt duration (us)"),
        "{s}"
    );
    assert!(s.contains("vcpu_load") && s.contains("run: "), "{s}");
    t.keys(&["Escape"]);
    t.wait_for("the detail pane closed", |s| {
        !s.contains(" of {b} (tid") && !s.contains('┌')
    });
    t.keys(&["-"]);
    let s = t.wait_for("collapsed", |s| names(s).len() == 2);
    let selected = table(&s)
        .1
        .into_iter()
        .find(|r| r.selected)
        .expect("a selected row");
    assert_eq!(
        selected.get("NAME"),
        format!("+ {b}"),
        "the vCPU's VM is selected\n{s}"
    );

    // Help names every column of every monitor top runs by default
    // (scrolled: at 80x24 it is taller than the screen).
    t.keys(&["?"]);
    t.wait_for("help", |s| {
        s.contains("help (? or Esc to close") && s.contains("filter by VM name")
    });
    let wanted: Vec<String> = kvm_watcher::monitors::REGISTRY
        .iter()
        .filter(|m| m.by_default())
        .flat_map(|m| {
            m.top_columns()
                .iter()
                .map(|c| format!("{:<12} {}: ", c.title, m.name()))
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let s = t.screen();
        seen.extend(wanted.iter().filter(|w| s.contains(w.as_str())).cloned());
        if seen.len() == wanted.len() || s.contains("the VMM (for a vCPU") {
            break;
        }
        t.keys(&["Down"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let missing: Vec<&String> = wanted.iter().filter(|w| !seen.contains(*w)).collect();
    assert!(
        missing.is_empty(),
        "help never named {missing:?}\n{}",
        t.screen()
    );
    t.keys(&["Escape"]);
    t.wait_for("help closed", |s| !s.contains("help (? or Esc"));

    // Pause: the refresh time stops; p again resumes.
    t.keys(&["p"]);
    let s = t.wait_for("paused", |s| s.contains("PAUSED"));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        refresh_time(&t.screen()),
        refresh_time(&s),
        "no refresh while paused"
    );
    t.keys(&["p"]);
    next_refresh(&t, &s);

    // Scroll right: VMM comes into view, NAME and PID stay.
    t.keys(&["Right"; 20]);
    let s = t.wait_for("scrolled", |s| table(s).0.contains(&"VMM".to_string()));
    assert_eq!(&table(&s).0[..2], ["NAME", "PID"]);

    // Resizing: wider shows every column once scrolled back.
    t.resize(200, 30);
    t.keys(&["Left"; 20]);
    // Every column's title is on the heading line (titles may hold a space:
    // RAN INSTEAD, so they are looked for, not counted as words).
    let titles: Vec<&str> = ["NAME", "PID", "VCPUS", "VMM"]
        .into_iter()
        .chain(
            kvm_watcher::monitors::REGISTRY
                .iter()
                .filter(|m| m.by_default())
                .flat_map(|m| m.top_columns().iter().map(|c| c.title)),
        )
        .collect();
    let s = t.wait_for("every column", |s| {
        let heading = s.lines().find(|l| l.starts_with("  NAME ")).unwrap_or("");
        titles.iter().all(|t| heading.contains(&format!(" {t}")))
            && !s.lines().nth(2).unwrap_or("").contains("columns ")
    });
    assert_eq!(table(&s).0.last().map(String::as_str), Some("VMM"));
    assert_eq!(names(&s).len(), 2, "{s}");

    t.keys(&["q"]);
    let s = t.wait_for("top's end", |s| s.contains("TOP-EXIT="));
    assert!(s.contains("TOP-EXIT=0"), "{s}");
}

/// Leaves full-screen mode: the shell's screen is back, raw mode and the
/// hidden cursor undone.
fn assert_restored(t: &Tmux, how: &str) {
    let s = t.wait_for(&format!("top's end after {how}"), |s| {
        s.contains("TOP-EXIT=")
    });
    assert!(s.contains("TOP-EXIT=0"), "{how}: exit status\n{s}");
    assert!(
        !s.contains("kvm-watcher top "),
        "{how}: top's screen is gone\n{s}"
    );
    assert!(
        s.contains("icanon") && !s.contains("-icanon"),
        "{how}: canonical mode back\n{s}"
    );
    assert!(
        s.contains(" echo") && !s.contains("-echo"),
        "{how}: echo back\n{s}"
    );
    assert_eq!(
        t.display("#{alternate_on}"),
        "0",
        "{how}: alternate screen left"
    );
    assert_eq!(t.display("#{cursor_flag}"), "1", "{how}: cursor shown");
}

#[test]
fn top_restores_the_terminal_after_q_ctrl_c_sigterm_and_sighup() {
    if !ready() {
        return;
    }
    for how in ["q", "C-c", "SIGTERM", "SIGHUP"] {
        let t = top(100, 30, "");
        let s = t.wait_for("top's screen", |s| s.starts_with("kvm-watcher top "));
        assert_eq!(
            t.display("#{alternate_on}"),
            "1",
            "top is on the alternate screen\n{s}"
        );
        assert_eq!(t.display("#{cursor_flag}"), "0", "with the cursor hidden");
        match how {
            "SIGTERM" | "SIGHUP" => {
                let sig = if how == "SIGTERM" {
                    libc::SIGTERM
                } else {
                    libc::SIGHUP
                };
                // SAFETY: a signal to the process the pane runs.
                assert_eq!(unsafe { libc::kill(t.child_pid() as i32, sig) }, 0);
            }
            key => t.keys(&[key]),
        }
        assert_restored(&t, how);
    }
}

/// Errors found before the screen is set up leave the terminal alone: a VM
/// that does not exist (exit 2), a backend the kernel refuses (exit 1).
#[test]
fn top_errors_before_the_screen_leave_the_terminal_as_it_was() {
    if !ready() {
        return;
    }
    let t = top(100, 20, "--vm no-such-vm-here");
    let s = t.wait_for("top's end", |s| s.contains("TOP-EXIT="));
    assert!(
        s.contains("TOP-EXIT=2") && s.contains("--vm no-such-vm-here: no running VM"),
        "{s}"
    );
    assert_eq!(t.display("#{alternate_on}"), "0");
    // A backend doctor says this kernel refuses, if any.
    let doctor = common::run_cli(&["doctor", "--json"], Duration::from_secs(60));
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor --json");
    let refused = report["monitors"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|m| {
            let b = m["refused"].as_array()?.first()?["backend"]
                .as_str()?
                .to_string();
            let short = kvm_watcher::monitors::by_name(m["monitor"].as_str()?)?
                .face()
                .short;
            Some((short, b))
        });
    if let Some((short, backend)) = refused {
        let t = top(100, 20, &format!("-{short} --backend {backend}"));
        let s = t.wait_for("top's end", |s| s.contains("TOP-EXIT="));
        assert!(
            s.contains("TOP-EXIT=1") && s.contains(&format!("backend `{backend}` cannot be used")),
            "{s}"
        );
        assert_eq!(t.display("#{alternate_on}"), "0");
        assert!(s.contains("icanon") && !s.contains("-icanon"), "{s}");
    }
}

/// A VM that starts while top runs gets a row; one that exits loses it.
#[test]
fn top_shows_vms_that_start_and_drops_those_that_exit() {
    if !ready() {
        return;
    }
    let id = std::process::id();
    let (stays, comes) = (format!("tc-stay-{id}"), format!("tc-come-{id}"));
    let stay = common::spawn_vm(&["--name", &stays, "--halt-hz", "100", "--seconds", "300"]);
    stay.start();
    let t = top(120, 30, "");
    t.wait_for("top's screen", |s| s.starts_with("kvm-watcher top "));
    t.keys(&["/", "t", "c", "-", "Enter"]);
    let has = |s: &str, n: &str| vm_rows(&table(s).1, n).is_some();
    t.wait_for("the first VM", |s| has(s, &stays) && !has(s, &comes));
    let come = common::spawn_vm(&[
        "--name",
        &comes,
        "--vcpus",
        "2",
        "--halt-hz",
        "100",
        "--seconds",
        "3",
    ]);
    come.start();
    let s = t.wait_for("the new VM", |s| has(s, &comes));
    let (row, _) = vm_rows(&table(&s).1, &comes).unwrap();
    assert_eq!(row.get("PID"), come.ready.pid.to_string());
    assert_eq!(row.get("VCPUS"), "2");
    let report = come.finish(Duration::from_secs(60));
    let s = t.wait_for("the new VM gone", |s| !has(s, &comes));
    assert!(has(&s, &stays), "the other VM stays\n{s}");
    assert!(!std::path::Path::new(&format!("/proc/{}", report.pid)).exists());
    t.keys(&["q"]);
    assert_restored(&t, "q");
}

/// `top --vm NAME` follows the VM when it restarts with a new pid (a
/// libvirt destroy+start or save+restore), as `serve --vm` does.
#[test]
fn top_follows_a_vm_that_restarts_under_its_name() {
    if !ready() {
        return;
    }
    let name = format!("tf-{}", std::process::id());
    let vm = || common::spawn_vm(&["--name", &name, "--halt-hz", "100", "--seconds", "300"]);
    let first = vm();
    first.start();
    let t = top(120, 30, &format!("--vm {name}"));
    let pid_shown =
        |s: &str| vm_rows(&table(s).1, &name).map(|(row, _)| row.get("PID").to_string());
    let pid1 = first.ready.pid.to_string();
    t.wait_for("the VM", |s| pid_shown(s).as_deref() == Some(pid1.as_str()));
    first.signal(libc::SIGKILL);
    drop(first);
    let second = vm();
    second.start();
    let pid2 = second.ready.pid.to_string();
    let s = t.wait_for("the restarted VM", |s| {
        pid_shown(s).as_deref() == Some(pid2.as_str())
    });
    assert!(!s.contains("waiting for one"), "{s}");
    t.keys(&["q"]);
    assert_restored(&t, "q");
}

/// A VM whose vCPUs stopped running (a suspended domain; here the
/// synthetic guest lingering after its run, its vCPU threads asleep outside
/// KVM_RUN) shows as paused, its vCPUs still numbered by the ids the kernel
/// saw while they ran (/proc gives none outside the ioctl).
#[test]
fn top_marks_a_paused_vm_and_keeps_its_vcpu_ids() {
    if !ready() {
        return;
    }
    let name = format!("tp-{}", std::process::id());
    let vm = common::spawn_vm(&[
        "--name",
        &name,
        "--vcpus",
        "2",
        "--halt-hz",
        "100",
        "--seconds",
        "2",
        "--linger",
    ]);
    let t = top(260, 30, &format!("--vm {name} -i 0.5"));
    let rows = |s: &str| vm_rows(&table(s).1, &name);
    t.wait_for("the VM", |s| rows(s).is_some());
    t.keys(&["+"]);
    vm.start();
    t.wait_for("the VM running", |s| {
        rows(s).is_some_and(|(v, _)| v.get("VMM") == "kvm-watcher")
    });
    vm.wait_lingering(Duration::from_secs(30));
    let s = t.wait_for("the VM paused", |s| {
        rows(s).is_some_and(|(v, _)| v.get("VMM") == "paused")
    });
    let (_, vcpus) = rows(&s).unwrap();
    let names: Vec<String> = vcpus.iter().map(|r| r.get("NAME").to_string()).collect();
    let mut want: Vec<String> = vm
        .ready
        .vcpu_ids
        .iter()
        .map(|id| format!("vCPU {id}"))
        .collect();
    want.sort();
    assert_eq!(names, want, "{s}");
    t.keys(&["q"]);
    assert_restored(&t, "q");
}

/// `kvm-watcher` with no arguments on a terminal is `top` (as kvm_stat,
/// htop and bpftop open their live view): the same screen, listing a VM
/// that runs, and `q` ends it with exit 0 and the terminal restored.
#[test]
fn no_arguments_on_a_terminal_opens_top() {
    if !ready() {
        return;
    }
    let name = format!("bare-{}", std::process::id());
    let vm = common::spawn_vm(&["--name", &name, "--halt-hz", "100", "--seconds", "120"]);
    vm.start();
    let script = format!(
        "{}; st=$?; modes=$(stty -a | tr -s ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '); echo \"TOP-EXIT=$st modes: $modes.\"",
        common::bin()
    );
    let t = Tmux::start(120, 30, &script);
    let s = t.wait_for("the VM in top", |s| {
        s.starts_with("kvm-watcher top ") && vm_rows(&table(s).1, &name).is_some()
    });
    let (row, _) = vm_rows(&table(&s).1, &name).unwrap();
    assert_eq!(row.get("PID"), vm.ready.pid.to_string(), "{s}");
    assert_eq!(t.display("#{alternate_on}"), "1", "full screen\n{s}");
    t.keys(&["q"]);
    assert_restored(&t, "q");
}

/// Off a terminal, `kvm-watcher` alone says what to run instead, on one
/// line, and exits 2 (a service or a container started without arguments
/// must not sit waiting for keys).
#[test]
fn no_arguments_off_a_terminal_says_what_to_run_with_exit_2() {
    let out = common::run_cli(&[], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for what in ["kvm-watcher serve", "kvm-watcher watch", "terminal"] {
        assert!(err.contains(what), "no `{what}` in: {err}");
    }
    assert!(out.stdout.is_empty(), "nothing on the pipe");
}
