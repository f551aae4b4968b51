//! Bad command lines: the right exit status (2 for usage, 1 for a runtime
//! failure), exactly one `kvm-watcher: error: ...` line on stderr that names what
//! is wrong, nothing on stdout, never a panic. Plus --help/--version, and units in
//! every subcommand's help for its time options.

mod common;

use serde_json::Value;

use common::usage::{RUNTIME, T, USAGE, check_error, expect_error, expect_errors, pid_max, run};

// ---------------------------------------------------------------------------
// usage errors (exit 2) that need no privileges

#[test]
fn unknown_flag_and_subcommand() {
    expect_errors(&[
        (vec!["--nosuch"], USAGE, "--nosuch"),
        (vec!["-w", "--nosuch"], USAGE, "--nosuch"),
        (vec!["wakeup", "--nosuch"], USAGE, "--nosuch"),
        (vec!["nosuch"], USAGE, "nosuch"),
    ]);
}

#[test]
fn missing_and_malformed_option_values() {
    expect_errors(&[
        (vec!["-w", "--pid"], USAGE, "--pid"),
        (vec!["wakeup", "--pid"], USAGE, "--pid"),
        (vec!["-w", "--pid", "abc"], USAGE, "abc"),
        (vec!["dirty", "--pid", "12x"], USAGE, "12x"),
        (vec!["-w", "--pid", "-5"], USAGE, "-5"),
        // --follow follows VMs by name: without --vm there is nothing to follow.
        (vec!["-w", "--follow"], USAGE, "--vm"),
        (vec!["watch", "-w", "--follow", "-p", "1"], USAGE, "--vm"),
        (vec!["-w", "--ringbuf-size", "3"], USAGE, "--ringbuf-size"),
        (
            vec!["halt-poll", "--ringbuf-size", "3"],
            USAGE,
            "--ringbuf-size",
        ),
    ]);
}

/// Negative, zero, NaN, infinite, non-numeric and empty intervals and durations,
/// in the forms people type (`-t -1`, `--duration=-1`), for the monitors, `vm`
/// and `demo`: (command line, long option, bad value).
fn bad_time_values() -> Vec<(Vec<String>, &'static str, &'static str)> {
    let mut cases = Vec::new();
    let sv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    for value in [
        "-1", "-0.5", "0", "0.0", "NaN", "nan", "inf", "-inf", "abc", "",
    ] {
        for (prefix, opt, long) in [
            (sv(&["-w"]), "-t", "--duration"),
            (sv(&["-w"]), "-i", "--interval"),
            (sv(&["vcpu-load"]), "--interval", "--interval"),
            (sv(&["dirty"]), "--duration", "--duration"),
            (
                sv(&[
                    "dirty",
                    "-t",
                    "0.5",
                    "--counts-file",
                    "/tmp/kvm-watcher-cli-test-counts",
                ]),
                "--counts-every",
                "--counts-every",
            ),
            (sv(&["vm"]), "--seconds", "--seconds"),
            (sv(&["demo"]), "--seconds", "--seconds"),
        ] {
            let mut a = prefix;
            a.push(opt.to_string());
            a.push(value.to_string());
            cases.push((a, long, value));
        }
        for (prefix, long) in [
            ("-w", "--duration"),
            ("-o", "--interval"),
            ("vm", "--seconds"),
        ] {
            cases.push((
                vec![prefix.to_string(), format!("{long}={value}")],
                long,
                value,
            ));
        }
    }
    cases
}

/// Each bad time value is a usage error with one error line.
#[test]
fn bad_intervals_and_durations() {
    let cases = bad_time_values();
    let cases: Vec<(Vec<&str>, i32, &str)> = cases
        .iter()
        .map(|(a, _, _)| (a.iter().map(String::as_str).collect(), USAGE, ""))
        .collect();
    expect_errors(&cases);
}

/// ...and its one line names the option or the bad value, so people can tell
/// what to fix (`unexpected argument '-i' found` for `--seconds -inf` does not).
#[test]
fn bad_time_value_errors_name_the_option_or_the_value() {
    let mut failures = Vec::new();
    for (args, long, value) in bad_time_values() {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let named = stderr.contains(long) || (!value.is_empty() && stderr.contains(value));
        if !named {
            failures.push(format!(
                "kvm-watcher {a:?}: {stderr:?} names neither {long} nor `{value}`"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "unhelpful error messages:\n{}",
        failures.join("\n")
    );
}

#[test]
fn pid_that_does_not_exist() {
    // Pids are below pid_max, so this one cannot exist.
    let pid = pid_max().to_string();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    expect_errors(&[
        (vec!["-w", "--pid", &pid, "-t", "0.5"], USAGE, &pid),
        (vec!["dirty", "-p", &pid, "-t", "0.5"], USAGE, &pid),
    ]);
}

#[test]
fn pid_that_is_not_a_vmm() {
    // This test process holds no KVM VM.
    let pid = std::process::id().to_string();
    expect_errors(&[
        (vec!["-w", "--pid", &pid, "-t", "0.5"], USAGE, &pid),
        (vec!["vcpu-load", "-p", &pid, "-t", "0.5"], USAGE, &pid),
    ]);
}

#[test]
fn backend_that_does_not_exist() {
    expect_errors(&[
        (
            vec!["-w", "--backend", "nosuch", "-t", "0.5"],
            USAGE,
            "nosuch",
        ),
        (
            vec!["dirty", "--backend", "nosuch", "-t", "0.5"],
            USAGE,
            "nosuch",
        ),
    ]);
}

/// `--backend MONITOR=NAME` picks one monitor's backend among several; a
/// bare NAME, a monitor not watched, a backend it lacks or a monitor named
/// twice is refused before anything is attached.
#[test]
fn backends_forced_per_monitor_are_checked_first() {
    let two = ["watch", "-e", "-o", "-t", "0.5"];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = two.to_vec();
        v.extend_from_slice(extra);
        v
    };
    expect_errors(&[
        (
            with(&["--backend", "kvm-only"]),
            USAGE,
            "--backend exits=kvm-only",
        ),
        (
            with(&["--backend", "exits=nosuch"]),
            USAGE,
            "tracepoint, kvm-only",
        ),
        (
            with(&["--backend", "wakeup=tracepoint"]),
            USAGE,
            "no such monitor is watched",
        ),
        (
            with(&[
                "--backend",
                "exits=kvm-only",
                "--backend",
                "exits=tracepoint",
            ]),
            USAGE,
            "twice",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "exits=nosuch",
            ],
            USAGE,
            "exits has no backend",
        ),
    ]);
}

#[test]
fn no_monitor_chosen() {
    expect_error(&[], USAGE, "monitor");
    expect_error(&["--pid", "1"], USAGE, "no monitor chosen");
}

#[test]
fn counts_file_without_the_dirty_monitor() {
    expect_errors(&[
        (vec!["-w", "--counts-file", "x"], USAGE, "--counts-file"),
        (vec!["-n", "--counts-file", "x"], USAGE, "--counts-file"),
        (vec!["wakeup", "--counts-file", "x"], USAGE, "--counts-file"),
    ]);
}

/// Times too long for a Duration, intervals too short to mean anything,
/// out-of-range ids and sizes: usage errors naming the option, never a panic
/// or a busy loop.
#[test]
fn values_out_of_range() {
    let cf = "/tmp/kvm-watcher-cli-test-counts";
    expect_errors(&[
        (vec!["wakeup", "-t", "1e300"], USAGE, "1e300"),
        (vec!["wakeup", "-i", "1e300"], USAGE, "1e300"),
        (vec!["vcpu-load", "-i", "1e-12"], USAGE, "1e-12"),
        (
            vec!["dirty", "--counts-file", cf, "--counts-every", "1e300"],
            USAGE,
            "1e300",
        ),
        (vec!["serve", "--retain", "1e300"], USAGE, "1e300"),
        (vec!["serve", "-t", "1e300"], USAGE, "1e300"),
        (vec!["wakeup", "--vcpu", "4294967295"], USAGE, "4294967295"),
        (
            vec!["dirty", "--max-pages", "4294967295"],
            USAGE,
            "4294967295",
        ),
        (
            vec!["watch", "-w", "--counts-file", cf],
            USAGE,
            "--counts-file",
        ),
    ]);
}

/// A vCPU thread id given as --pid names the process it belongs to.
#[test]
fn pid_that_is_a_thread_of_a_vmm() {
    if !common::require_kvm() {
        return;
    }
    let vm = common::spawn_vm(&["--seconds", "1"]);
    let tid = vm.ready.tids[0].to_string();
    let pid = vm.ready.pid.to_string();
    let problem = check_error(&["wakeup", "-p", &tid, "-t", "0.5"], USAGE, &pid);
    vm.start();
    let _ = vm.finish(T);
    assert!(problem.is_none(), "{}", problem.unwrap_or_default());
}

/// Output that cannot be written (a full disk) is a runtime failure, not a
/// silent success.
#[test]
fn output_to_a_full_device() {
    if !common::require_bpf() {
        return;
    }
    let out = std::process::Command::new(common::bin())
        .args(["wakeup", "-t", "0.5", "--output", "json"])
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .expect("running kvm-watcher");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(RUNTIME), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
}

/// One-shot reports: a full device is a runtime failure with one line, a
/// reader that went away (`| head`) ends them quietly; never a panic.
#[test]
fn reports_to_a_full_device_or_a_closed_pipe() {
    for args in [
        &["vms"][..],
        &["vms", "--json"],
        &["doctor", "--json"],
        &["completions", "bash"],
        &["manpage"],
    ] {
        let full = std::process::Command::new(common::bin())
            .args(args)
            .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
            .output()
            .expect("running kvm-watcher");
        let stderr = String::from_utf8_lossy(&full.stderr);
        // `vms` with no VM running prints one short line; a full device
        // refuses even that.
        assert_eq!(
            full.status.code(),
            Some(RUNTIME),
            "{args:?} > /dev/full: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?} > /dev/full: {stderr}");
        assert!(
            stderr.contains("cannot write the output"),
            "{args:?}: {stderr}"
        );

        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let closed = std::process::Command::new(common::bin())
            .args(args)
            .stdout(writer)
            .output()
            .expect("running kvm-watcher");
        let stderr = String::from_utf8_lossy(&closed.stderr);
        assert_eq!(
            closed.status.code(),
            Some(0),
            "{args:?} | (closed): {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn vm_with_zero_vcpus() {
    expect_error(&["vm", "--vcpus", "0"], USAGE, "--vcpus");
}

/// `--counts-every` needs `--counts-file`: a usage error with one error line.
#[test]
fn counts_every_without_counts_file() {
    expect_errors(&[
        (vec!["dirty", "--counts-every", "1", "-t", "0.5"], USAGE, ""),
        (vec!["-d", "--counts-every", "1", "-t", "0.5"], USAGE, ""),
    ]);
}

/// ...and that line says which argument is missing.
#[test]
fn counts_every_error_names_counts_file() {
    expect_errors(&[
        (
            vec!["dirty", "--counts-every", "1", "-t", "0.5"],
            USAGE,
            "--counts-file",
        ),
        (
            vec!["-d", "--counts-every", "1", "-t", "0.5"],
            USAGE,
            "--counts-file",
        ),
    ]);
}

#[test]
fn counts_file_in_a_missing_directory() {
    expect_error(
        &["dirty", "--counts-file", "/nonexistent-dir/x", "-t", "0.5"],
        USAGE,
        "/nonexistent-dir",
    );
}

#[test]
fn counts_file_that_is_a_directory() {
    let dir = std::env::temp_dir().join(format!("kvm-watcher-cli-test-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.to_str().unwrap().to_string();
    let r = check_error(
        &["dirty", "--counts-file", &path, "-t", "0.5"],
        USAGE,
        &path,
    );
    let still_dir = dir.is_dir();
    let _ = std::fs::remove_dir(&dir);
    assert!(still_dir, "kvm-watcher replaced the directory {path}");
    if let Some(f) = r {
        panic!("{f}");
    }
}

// ---------------------------------------------------------------------------
// runtime failure (exit 1), derived from doctor

/// `--backend fentry` for wakeup: where doctor says wakeup's fentry backend is
/// refused, forcing it is a runtime failure (exit 1) with one line naming the
/// backend; where doctor chose fentry, it runs (exit 0).
#[test]
fn forced_fentry_backend_follows_doctor() {
    if !common::require_bpf() {
        return;
    }
    let out = run(&["doctor", "--json"]);
    assert!(out.status.success(), "doctor --json failed: {}", out.status);
    let d: Value = serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    let wakeup = d["monitors"]
        .as_array()
        .expect("monitors")
        .iter()
        .find(|m| m["monitor"] == "wakeup")
        .expect("doctor reports the wakeup monitor");
    let refused = wakeup["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .any(|r| r["backend"] == "fentry");
    let chosen = wakeup["backend"].as_str();
    let args = ["wakeup", "--backend", "fentry", "-t", "0.5"];
    if refused {
        expect_error(&args, RUNTIME, "fentry");
    } else {
        assert_eq!(
            chosen,
            Some("fentry"),
            "doctor neither refuses nor chooses fentry for wakeup: {wakeup}"
        );
        let out = run(&args);
        assert!(
            out.status.success(),
            "doctor says fentry works for wakeup, but --backend fentry exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// help and version

#[test]
fn help_and_version_exit_0() {
    for args in [
        vec!["--help"],
        vec!["-h"],
        vec!["help"],
        vec!["wakeup", "--help"],
        vec!["help", "dirty"],
        vec!["vm", "--help"],
    ] {
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", out.status);
        assert!(
            stdout.contains("Usage:"),
            "{args:?} printed no usage:\n{stdout}"
        );
        assert!(out.stderr.is_empty(), "{args:?} wrote on stderr");
    }
    let expected = format!(
        "kvm-watcher {} (git {}, libbpf v{})",
        env!("CARGO_PKG_VERSION"),
        git_head(),
        libbpf_in_lockfile()
    );
    for flag in ["--version", "-V"] {
        let out = run(&[flag]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{flag}: {}", out.status);
        assert_eq!(stdout.trim(), expected, "{flag}");
        assert!(out.stderr.is_empty(), "{flag} wrote on stderr");
    }
}

/// The first 12 digits of the checkout's HEAD, from git itself ("unknown"
/// outside a git checkout, as the binary says then).
fn git_head() -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim()[..12].to_string(),
        _ => "unknown".to_string(),
    }
}

/// libbpf's major.minor as Cargo.lock pins it (libbpf-sys `1.7.0+v1.7.0`).
fn libbpf_in_lockfile() -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let at = lock
        .find("name = \"libbpf-sys\"")
        .expect("libbpf-sys in Cargo.lock");
    let version = lock[at..].lines().nth(1).expect("its version line");
    let libbpf = version
        .split("+v")
        .nth(1)
        .expect("libbpf's version after +v");
    let mut parts = libbpf.trim_end_matches('"').split('.');
    format!("{}.{}", parts.next().unwrap(), parts.next().unwrap())
}

/// The subcommands listed under `Commands:` in the top-level help.
fn subcommands() -> Vec<String> {
    let out = run(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut subs = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            if let Some(name) = line.split_whitespace().next()
                && name != "help"
            {
                subs.push(name.to_string());
            }
        }
    }
    assert!(!subs.is_empty(), "no Commands: section in --help:\n{text}");
    subs
}

/// Option blocks of a help text: (long option name, header + description).
fn option_blocks(help: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let header = line.starts_with("  ")
            && (t.starts_with("--") || (t.starts_with('-') && t.get(2..4) == Some(", ")));
        if header {
            let long = t
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .map(|w| w.trim_end_matches(',').to_string());
            if let Some(long) = long {
                blocks.push((long, line.to_string()));
                continue;
            }
        }
        if let Some(b) = blocks.last_mut() {
            b.1.push('\n');
            b.1.push_str(line);
        }
    }
    blocks
}

fn is_time_option(long: &str) -> bool {
    [
        "duration", "interval", "every", "seconds", "timeout", "period", "delay",
    ]
    .iter()
    .any(|w| long.contains(w))
        || ["-ns", "-us", "-ms", "-hz"]
            .iter()
            .any(|s| long.ends_with(s))
}

fn mentions_unit(block: &str, long: &str) -> bool {
    let text = block.replace(long, " ").to_lowercase();
    text.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
        matches!(
            w,
            "second"
                | "seconds"
                | "ns"
                | "nanosecond"
                | "nanoseconds"
                | "us"
                | "microsecond"
                | "microseconds"
                | "ms"
                | "millisecond"
                | "milliseconds"
                | "hz"
        )
    })
}

/// Every time option in every help (top level and each subcommand) says its
/// unit, in its value name or its description.
#[test]
fn every_subcommand_help_gives_units_for_time_options() {
    let mut checked = Vec::new();
    let mut missing = Vec::new();
    let mut helps = vec![(String::from("kvm-watcher"), vec![String::from("--help")])];
    for sub in subcommands() {
        helps.push((
            format!("kvm-watcher {sub}"),
            vec![sub.clone(), String::from("--help")],
        ));
    }
    for (what, args) in &helps {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&a);
        assert_eq!(out.status.code(), Some(0), "{what} --help: {}", out.status);
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for (long, block) in option_blocks(&help) {
            // A flag (`--run-delay`) takes no time, whatever its name.
            let takes_value = block.lines().next().is_some_and(|l| l.contains('<'));
            if !is_time_option(&long) || !takes_value {
                continue;
            }
            checked.push(format!("{what} {long}"));
            if !mentions_unit(&block, &long) {
                missing.push(format!("{what} {long}:\n{block}"));
            }
        }
        // The monitors all take -t/--duration: make sure the parser saw it.
        if kvm_watcher::monitors::REGISTRY
            .iter()
            .any(|m| what.ends_with(m.face().command))
        {
            assert!(
                checked.iter().any(|c| c == &format!("{what} --duration")),
                "{what} --help: no --duration option found:\n{help}"
            );
        }
    }
    eprintln!("time options checked: {checked:?}");
    assert!(
        missing.is_empty(),
        "time options whose help gives no unit:\n{}",
        missing.join("\n\n")
    );
}
