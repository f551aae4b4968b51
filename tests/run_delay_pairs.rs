//! run-delay's split of the waits (by cause: woken or preempted) and its
//! per-wait histogram against a second observer of the same scheduler
//! events: bpftrace pairs each vCPU thread's `sched_wakeup` (or switch-out
//! while still runnable) with its next `sched_switch` in, on the same
//! threads, with its own clock and its own maps. run-delay's totals equal
//! schedstat (tests/run_delay.rs), but schedstat has neither the cause nor
//! the distribution: this is their check.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::observe::{observer, observer_maps, records, summary, u};
use common::sched::{Hog, pin, run_delay_summary, wait_lingering};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Buckets compared: log2 of microseconds, the last one holding the rest.
const BUCKETS: usize = 21;

/// How far apart the two observers' stamps of one wait may be, on
/// average, ns. Both read the clock at the same tracepoints but at
/// different points of them: whichever runs first at a hook delays the
/// other's stamp by its own run time there, which differs between the hook
/// where a wait begins and the one where it ends (kvm-watcher walks the
/// CPU's recent slices for the culprits after its switch-in stamp;
/// bpftrace's switch-in program does the most of its work), and grows on a
/// loaded host. Measured as the difference of the two totals per wait:
/// -0.1 to +0.7 µs for woken waits and 0.3 to 1.9 µs for preempted ones,
/// up to 5.2 µs with a busy loop on the other CPU.
const MAX_OFFSET_NS: u64 = 8_000;

/// Fewest waits of a cause whose time is compared with the other
/// observer's on its own. One wait's two stamps may lie far apart: when
/// this machine's own CPU stalls (a virtual CPU descheduled by its host)
/// between the two programs at one hook. Per wait, paired in order with
/// bpftrace's, the stamps differ by -2 to +2 µs from the 1st to the 99th
/// percentile, but single waits by up to 13 µs on an idle machine and
/// 136 µs with a busy loop on the other CPU. A cause with fewer waits (a
/// busy vCPU's first wake-up, a halting vCPU's rare preemption) is
/// compared by count, and its time counts in the run's offset over all
/// waits.
const MIN_TIMED_WAITS: u64 = 100;

/// Distances from a bucket's edge the script counts waits within: a wait
/// closer to an edge than twice the run's measured offset may fall on
/// either side of it.
const WIDTHS_NS: [u64; 4] = [1_000, 2_000, 4_000, 8_000];

/// The causes, as run-delay's fields name them and as the script numbers them.
const CAUSES: [&str; 2] = ["woken", "preempted"];

/// The bpftrace script: per thread and cause (0 woken, 1 preempted) the
/// waits and their time, and per thread the log2-µs histogram of the waits.
/// A wait begins at a wake-up of a thread that is not already waiting, or
/// at a switch-out that leaves it runnable (the tracepoint's state 0, or
/// the preemption mark 0x100 that `sched_switch` reports), and ends at its
/// next switch-in; a switch-out that sleeps ends any wait in progress (a
/// wake-up of a thread still on its CPU is followed by one of the two).
fn script(tids: &[u32]) -> String {
    let is = |field: &str| common::observe::one_of(field, tids);
    // The bucket, with its edges in ns ($lo, $hi): bucket 0 is under 2 µs
    // (its lower end, 0, is no edge), the last one has no upper edge.
    let mut buckets = String::from("if ($us < 2) { $b = 0; $lo = 0; $hi = 2000; }");
    for k in 1..BUCKETS - 1 {
        buckets += &format!(
            " else if ($us < {}) {{ $b = {k}; $lo = {}; $hi = {}; }}",
            1u64 << (k + 1),
            (1u64 << k) * 1000,
            (1u64 << (k + 1)) * 1000
        );
    }
    buckets += &format!(
        " else {{ $b = {}; $lo = {}; $hi = {}; }}",
        BUCKETS - 1,
        (1u64 << (BUCKETS - 1)) * 1000,
        u64::MAX / 2
    );
    // The edge nearest the wait (index k: 2^k µs) and how near, by class.
    let mut near = String::from("if ($x < ");
    for (i, w) in WIDTHS_NS.iter().enumerate() {
        if i > 0 {
            near += " else if ($x < ";
        }
        near += &format!("{w}) {{ @near[$t, $e, {i}] = count(); }}");
    }
    format!(
        r#"
tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new /{wakee}/ {{
    $now = nsecs;
    if (@q[args->pid] == 0) {{ @q[args->pid] = $now; @c[args->pid] = 0; }}
}}
tracepoint:sched:sched_switch /{prev}/ {{
    $now = nsecs;
    if ((args->prev_state & 0xff) == 0) {{ @q[args->prev_pid] = $now; @c[args->prev_pid] = 1; }}
    else {{ delete(@q[args->prev_pid]); }}
}}
tracepoint:sched:sched_switch /({next}) && @q[args->next_pid] != 0/ {{
    $now = nsecs;
    $t = args->next_pid;
    $d = $now - @q[$t];
    $c = @c[$t];
    @waits[$t, $c] = count();
    @ns[$t, $c] = sum($d);
    $us = $d / 1000;
    {buckets}
    @hist[$t, $b] = count();
    $dl = $d - $lo;
    $dh = $hi - $d;
    if ($dh <= $dl) {{ $e = $b + 1; $x = $dh; }} else {{ $e = $b; $x = $dl; }}
    {near}
    delete(@q[$t]);
}}
END {{ clear(@q); clear(@c); }}
"#,
        wakee = is("args->pid"),
        prev = is("args->prev_pid"),
        next = is("args->next_pid"),
    )
}

/// One thread's figures from either side.
#[derive(Debug, Default)]
struct Waits {
    waits: [u64; 2],
    ns: [u64; 2],
    hist: [u64; BUCKETS],
    /// (bpftrace's) waits whose nearest bucket edge is 2^k µs, within
    /// `WIDTHS_NS[i]` of it, as `edge[i][k]`.
    edge: [[u64; BUCKETS]; WIDTHS_NS.len()],
}

/// run-delay's figures per thread, summed over its intervals.
fn ours(recs: &[Value]) -> HashMap<u64, Waits> {
    let mut out: HashMap<u64, Waits> = HashMap::new();
    for r in recs.iter().filter(|r| r["monitor"] == "vcpu_interval") {
        let w = out.entry(u(&r["tid"])).or_default();
        for (i, cause) in CAUSES.iter().enumerate() {
            w.waits[i] += r[format!("run_delay_{cause}_waits")].as_u64().unwrap_or(0);
            w.ns[i] += r[format!("run_delay_{cause}_ns")].as_u64().unwrap_or(0);
        }
        for (i, n) in r["run_delay_hist"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            w.hist[i.min(BUCKETS - 1)] += u(n);
        }
    }
    out
}

/// Whether `a` is within `pct` % of `b`, plus `abs`.
fn near(a: u64, b: u64, pct: u64, abs: u64) -> bool {
    a.abs_diff(b) <= b * pct / 100 + abs
}

/// On one CPU: a busy thread of this test, a busy vCPU (preempted at the
/// end of its slices) and a vCPU that halts 500 times a second (woken, to
/// find the CPU taken or not).
#[test]
fn causes_and_histogram_of_the_waits_equal_bpftraces_pairs() {
    if !(common::require_root()
        && common::require_kvm()
        && common::require_bpf()
        && common::observe::have_bpftrace())
    {
        return;
    }
    let halting = common::spawn_vm(&[
        "--vcpus",
        "1",
        "--halt-hz",
        "500",
        "--seconds",
        "2",
        "--linger",
    ]);
    let busy = common::spawn_vm(&["--vcpus", "1", "--seconds", "2", "--linger"]);
    let tids = [halting.ready.tids[0], busy.ready.tids[0]];
    let hog = Hog::on(0);
    for &tid in &tids {
        pin(tid, 0);
    }
    let obs = observer(&script(&tids));
    let w = run_delay_summary(&[halting.ready.pid, busy.ready.pid]);
    halting.start();
    busy.start();
    wait_lingering(&halting);
    wait_lingering(&busy);
    w.signal(libc::SIGINT);
    let (status, stdout, stderr) = w.wait(T);
    let maps = observer_maps(obs);
    drop(hog);
    for vm in [halting, busy] {
        vm.signal(libc::SIGUSR1);
        vm.finish(T);
    }
    assert!(status.success(), "run-delay failed: {stderr}");
    let recs = records(&stdout);
    assert_eq!(u(&summary(&recs)["lost"]["run_delay"]), 0);
    let ours = ours(&recs);
    let get = |map: &str, k: &[i64]| {
        maps.get(map)
            .and_then(|m| m.get(&k.to_vec()))
            .copied()
            .unwrap_or(0) as u64
    };
    let mut checks = Vec::new();
    for &tid in &tids {
        let mine = ours
            .get(&(tid as u64))
            .unwrap_or_else(|| panic!("no record of {tid}"));
        let mut theirs = Waits::default();
        for c in 0..2 {
            theirs.waits[c] = get("waits", &[tid as i64, c as i64]);
            theirs.ns[c] = get("ns", &[tid as i64, c as i64]);
        }
        for (b, n) in theirs.hist.iter_mut().enumerate() {
            *n = get("hist", &[tid as i64, b as i64]);
        }
        for i in 0..WIDTHS_NS.len() {
            for k in 0..BUCKETS {
                // Within a width: the classes up to it.
                theirs.edge[i][k] = (0..=i)
                    .map(|j| get("near", &[tid as i64, k as i64, j as i64]))
                    .sum();
            }
        }
        let ctx = format!("vCPU thread {tid}: kvm-watcher {mine:?}; bpftrace {theirs:?}");
        eprintln!("{ctx}");
        checks.push((mine, theirs, ctx));
    }
    for (mine, theirs, ctx) in checks {
        let all = theirs.waits[0] + theirs.waits[1];
        assert!(all > 300, "the guest barely waited: {ctx}");
        for (c, cause) in CAUSES.iter().enumerate() {
            assert!(
                near(mine.waits[c], theirs.waits[c], 1, 3),
                "{cause} waits: {} vs bpftrace's {}; {ctx}",
                mine.waits[c],
                theirs.waits[c]
            );
            // Each wait's length may differ by the stamps' offset.
            assert!(
                theirs.waits[c] < MIN_TIMED_WAITS
                    || near(mine.ns[c], theirs.ns[c], 1, theirs.waits[c] * MAX_OFFSET_NS),
                "{cause} wait time: {} ns vs bpftrace's {} ns over {} waits; {ctx}",
                mine.ns[c],
                theirs.ns[c],
                theirs.waits[c]
            );
        }
        // The offset of this run, over all the thread's waits: one stalled
        // wait among hundreds moves it little (see MIN_TIMED_WAITS).
        let sum = |x: &[u64; 2]| x[0] + x[1];
        let offset = sum(&mine.ns).abs_diff(sum(&theirs.ns)) / all.max(1);
        assert!(
            offset <= MAX_OFFSET_NS,
            "the stamps are {offset} ns apart per wait: {ctx}"
        );
        // The distributions: cumulative counts at each bucket's upper edge,
        // give or take the waits that lie within twice this run's offset.
        let i = WIDTHS_NS
            .iter()
            .position(|w| *w >= 2 * offset)
            .unwrap_or(WIDTHS_NS.len() - 1);
        let (mut a, mut b) = (0, 0);
        for k in 0..BUCKETS {
            a += mine.hist[k];
            b += theirs.hist[k];
            let close = theirs.edge[i].get(k + 1).copied().unwrap_or(0);
            assert!(
                a.abs_diff(b) <= b / 100 + 3 + close,
                "waits under 2^{} us: {a} vs {b} ({close} within {} ns of the edge, the stamps {offset} ns apart per wait): {ctx}",
                k + 1,
                WIDTHS_NS[i]
            );
        }
    }
}
