//! The child-process helper against real child processes (sh), no root needed.
use super::*;

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// True while `pid` exists (a zombie counts: it is not reaped yet).
fn exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn child_collects_stdout_and_finds_the_marker() {
    let p = Spawn::new(sh(
        "echo one; echo 'x ready pid=7' >&2; echo two; echo late >&2",
    ))
    .ready_on(Stream::Stderr, "ready")
    .start()
    .unwrap();
    assert_eq!(p.ready_line(), Some("x ready pid=7"));
    let exit = p.wait().unwrap();
    assert!(exit.status.success() && !exit.killed);
    assert_eq!(exit.stdout, "one\ntwo\n");
    assert_eq!(exit.stderr, "x ready pid=7\nlate\n");
}

#[test]
fn child_marker_on_stdout() {
    let p = Spawn::new(sh("echo Attaching 1 probe; exec sleep 30"))
        .ready_on(Stream::Stdout, "Attaching")
        .start()
        .unwrap();
    assert_eq!(p.ready_line(), Some("Attaching 1 probe"));
    let exit = p.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit.status),
        Some(libc::SIGTERM)
    );
    assert!(!exit.killed);
    assert_eq!(exit.stdout, "Attaching 1 probe\n");
}

#[test]
fn child_without_marker_starts_at_once() {
    let p = Spawn::new(sh("echo hi")).start().unwrap();
    assert_eq!(p.ready_line(), None);
    assert_eq!(p.wait().unwrap().stdout, "hi\n");
}

#[test]
fn child_dropped_is_killed_and_reaped() {
    let p = Spawn::new(sh("echo ready >&2; exec sleep 30"))
        .ready_on(Stream::Stderr, "ready")
        .start()
        .unwrap();
    let pid = p.pid();
    assert!(exists(pid));
    drop(p);
    assert!(!exists(pid), "pid {pid} still exists after drop");
}

#[test]
fn child_that_never_gets_ready_is_killed() {
    let t0 = Instant::now();
    let e = Spawn::new(sh("echo starting >&2; exec sleep 30"))
        .name("sleeper")
        .ready_on(Stream::Stderr, "ready")
        .ready_within(Duration::from_secs(1))
        .start()
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    let Error::Timeout { ref exit, .. } = e else {
        panic!("not a timeout: {e:?}");
    };
    assert!(exit.killed && !exit.status.success());
    assert_eq!(exit.stderr, "starting\n");
    assert_eq!(e.to_string(), "sleeper did not print `ready` within 1.0 s");
}

#[test]
fn child_that_exits_before_the_marker() {
    let e = Spawn::new(sh("echo out; echo 'no luck' >&2; exit 3"))
        .ready_on(Stream::Stderr, "ready")
        .start()
        .unwrap_err();
    let Error::Exited { ref exit, .. } = e else {
        panic!("not an early exit: {e:?}");
    };
    assert_eq!(exit.status.code(), Some(3));
    assert!(!exit.killed);
    assert_eq!(
        (exit.stdout.as_str(), exit.stderr.as_str()),
        ("out\n", "no luck\n")
    );
    assert_eq!(
        e.to_string(),
        "sh exited (exit status: 3) before printing `ready`"
    );
}

#[test]
fn child_failure_line_before_the_marker() {
    let t0 = Instant::now();
    let e = Spawn::new(sh(
        "echo 'tool: warning: w' >&2; echo 'tool: error: bad' >&2; exec sleep 30",
    ))
    .name("tool")
    .ready_on(Stream::Stderr, "ready")
    .fail_on("error")
    .start()
    .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    let Error::Failed {
        ref line, ref exit, ..
    } = e
    else {
        panic!("not a failure: {e:?}");
    };
    assert_eq!(line, "tool: error: bad");
    assert!(exit.killed);
    assert_eq!(e.to_string(), "tool failed: tool: error: bad");
}

#[test]
fn child_timed_wait_kills() {
    let p = Spawn::new(sh("exec sleep 30")).start().unwrap();
    let pid = p.pid();
    let mut polls = 0;
    let exit = p
        .wait_or_kill_polling(Duration::from_millis(50), Duration::from_millis(5), |p| {
            assert_eq!(p, pid);
            polls += 1;
        })
        .unwrap();
    assert!(exit.killed);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit.status),
        Some(libc::SIGKILL)
    );
    assert!(polls > 1);
    assert!(!exists(pid));
}

#[test]
fn child_keeps_at_most_and_discards() {
    // 1 MiB on each stream: more than a pipe holds, so the child would
    // block if the streams were not drained.
    let script =
        "head -c 1048576 /dev/zero | tr '\\0' a; head -c 1048576 /dev/zero | tr '\\0' b >&2";
    let exit = Spawn::new(sh(script))
        .keep_at_most(100)
        .start()
        .unwrap()
        .wait_or_kill(Duration::from_secs(30))
        .unwrap();
    assert!(exit.status.success() && !exit.killed);
    assert_eq!(exit.stdout, "a".repeat(100));
    assert_eq!(exit.stderr, "b".repeat(100));

    let exit = Spawn::new(sh("echo gone; echo kept >&2"))
        .discard_stdout()
        .start()
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((exit.stdout.as_str(), exit.stderr.as_str()), ("", "kept\n"));
}

#[test]
fn child_stderr_so_far() {
    let p = Spawn::new(sh("echo a >&2; echo ready >&2; exec sleep 30"))
        .ready_on(Stream::Stderr, "ready")
        .start()
        .unwrap();
    assert_eq!(p.stderr_so_far(), "a\nready\n");
}

#[test]
fn child_that_cannot_start() {
    let e = Spawn::new(Command::new("/nonexistent/program"))
        .start()
        .unwrap_err();
    assert!(matches!(e, Error::Spawn { .. }), "{e:?}");
    assert_eq!(e.to_string(), "cannot start /nonexistent/program");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.exit().is_none());
}

/// Voluntary context switches of the calling thread so far (the kernel's
/// count, getrusage(RUSAGE_THREAD)).
fn my_switches() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    ru.ru_nvcsw
}

#[test]
fn child_timed_wait_sleeps_until_the_exit() {
    let p = Spawn::new(sh("exec sleep 0.3")).start().unwrap();
    let before = my_switches();
    let t0 = Instant::now();
    let exit = p.wait_or_kill(Duration::from_secs(10)).unwrap();
    let waited = t0.elapsed();
    let switches = my_switches() - before;
    assert!(!exit.killed && exit.status.success());
    // A wait that looked every half millisecond slept 525 times here.
    assert!(switches < 20, "{switches} sleeps in a {waited:?} wait");
    assert!(waited < Duration::from_secs(2), "woke {waited:?} after");
}
