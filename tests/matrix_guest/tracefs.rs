//! tracefs as the independent observer: the same KVM tracepoints recorded
//! by ftrace for the VM's threads, read back as a [`Trace`].

const TRACING: &str = "/sys/kernel/tracing";

/// What tracefs recorded for the VM's vCPU threads.
#[derive(Default)]
pub struct Trace {
    /// (tid, waited, valid)
    pub wakeups: Vec<(u32, bool, bool)>,
    /// (tid, the halt's time as kvm_vcpu_wakeup prints it, ns)
    pub halt_ns: Vec<(u32, u64)>,
    /// (tid, vcpu_id, grow, old, new)
    pub halt_polls: Vec<(u32, u32, bool, u64, u64)>,
    /// (tid, slot, offset)
    pub ring_pushes: Vec<(u32, u32, u64)>,
    /// kvm_exit, kvm_entry and kvm_userspace_exit in order: (tid, seconds,
    /// event, reason as printed: kvm_exit's name, kvm_userspace_exit's KVM_EXIT_*).
    pub exits: Vec<(u32, f64, &'static str, String)>,
    /// (tid, port) of each port write (kvm_pio of an OUT).
    pub port_writes: Vec<(u32, u64)>,
    /// Calls of the functions traced, in order: (tid, seconds, function).
    pub calls: Vec<(u32, f64, String)>,
}

fn tracefs_write(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("{TRACING}/{path}"), value).map_err(|e| format!("tracefs {path}: {e}"))
}

/// Records `events` of the threads `tids`, and every call of `functions`
/// (ftrace's function tracer, on every task: its pid filter follows the
/// task switched to, so it would miss a call made as a thread switches
/// out, such as KVM's vcpu put in its preempt notifier).
pub fn tracefs_start(tids: &[u32], events: &[&str], functions: &[&str]) -> Result<(), String> {
    tracefs_write("tracing_on", "0")?;
    tracefs_write("events/enable", "0")?;
    tracefs_write("current_tracer", "nop")?;
    tracefs_write("set_ftrace_filter", &functions.join(" "))?;
    tracefs_write("buffer_size_kb", "8192")?;
    // CLOCK_MONOTONIC, the clock kvm-watcher stamps with: the default local
    // clock (sched_clock) runs at another rate under TCG, where the TSC is
    // unstable, and durations from the two would not compare.
    tracefs_write("trace_clock", "mono")?;
    tracefs_write("trace", "")?;
    let filter = tids
        .iter()
        .map(|t| format!("common_pid == {t}"))
        .collect::<Vec<_>>()
        .join(" || ");
    for e in events {
        tracefs_write(&format!("events/kvm/{e}/filter"), &filter)?;
        tracefs_write(&format!("events/kvm/{e}/enable"), "1")?;
    }
    if !functions.is_empty() {
        tracefs_write("current_tracer", "function")?;
    }
    tracefs_write("tracing_on", "1")
}

pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let i = text.find(key)? + key.len();
    text[i..]
        .split([' ', ',', ')', ':'])
        .find(|s| !s.is_empty())
}

fn num(s: Option<&str>) -> Option<u64> {
    let s = s?;
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn tracefs_stop() -> Result<Trace, String> {
    tracefs_write("tracing_on", "0")?;
    tracefs_write("events/enable", "0")?;
    let text = std::fs::read_to_string(format!("{TRACING}/trace"))
        .map_err(|e| format!("reading trace: {e}"))?;
    // After the read: a change of tracer empties the buffer.
    tracefs_write("current_tracer", "nop")?;
    tracefs_write("set_ftrace_filter", "")?;
    let mut t = Trace::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# entries-in-buffer/entries-written: ") {
            let (a, b) = rest.split_once('/').unwrap_or(("", ""));
            let b = b.split_whitespace().next().unwrap_or("");
            ensure!(a == b, "tracefs lost events: {line}");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // "  CPU 0/KVM-104  [001] d..1.  12.34: kvm_vcpu_wakeup: wait time 1 ns, polling valid"
        let Some(bracket) = line.find(" [") else {
            continue;
        };
        let Some(dash) = line[..bracket].trim_end().rfind('-') else {
            continue;
        };
        let Ok(tid) = line[dash + 1..bracket].trim().parse::<u32>() else {
            continue;
        };
        let Some((stamp, ev)) = line[bracket..].split_once(": ") else {
            continue;
        };
        let seconds: f64 = stamp
            .split_whitespace()
            .last()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0.0);
        // The function tracer's lines: "kvm_arch_vcpu_put <-kvm_sched_out".
        if let Some((function, _caller)) = ev.split_once(" <-") {
            t.calls.push((tid, seconds, function.trim().to_string()));
            continue;
        }
        let Some((name, body)) = ev.split_once(": ") else {
            continue;
        };
        match name {
            "kvm_vcpu_wakeup" => {
                // "wait time 123 ns, polling valid" (or "poll time ...")
                let ns = num(field(body, "time ")).ok_or(format!("bad line {line}"))?;
                t.halt_ns.push((tid, ns));
                t.wakeups
                    .push((tid, body.starts_with("wait"), !body.contains("invalid")))
            }
            "kvm_halt_poll_ns" => {
                // "vcpu 3: halt_poll_ns 20000 (grow 10000)"
                let vcpu = num(field(body, "vcpu ")).ok_or(format!("bad line {line}"))?;
                let new = num(field(body, "halt_poll_ns ")).ok_or(format!("bad line {line}"))?;
                let grow = body.contains("(grow");
                let old = num(field(body, if grow { "(grow " } else { "(shrink " }))
                    .ok_or(format!("bad line {line}"))?;
                t.halt_polls.push((tid, vcpu as u32, grow, old, new));
            }
            "kvm_dirty_ring_push" => {
                let slot = num(field(body, "slot ")).ok_or(format!("bad line {line}"))?;
                let off = num(field(body, "offset ")).ok_or(format!("bad line {line}"))?;
                t.ring_pushes.push((tid, slot as u32, off));
            }
            "kvm_exit" => {
                // "[vcpu 0 ]reason io rip 0x2075 info ..." (names may hold spaces: "PF excp")
                let at = body.find("reason ").ok_or(format!("bad line {line}"))? + 7;
                let end = body[at..].find(" rip ").map_or(body.len(), |e| at + e);
                t.exits
                    .push((tid, seconds, "exit", body[at..end].trim().to_string()));
            }
            "kvm_entry" => t.exits.push((tid, seconds, "entry", String::new())),
            // "pio_write at 0xed size 1 count 1 val 0x0"
            "kvm_pio" if body.starts_with("pio_write") => {
                let port = field(body, "at 0x")
                    .and_then(|p| u64::from_str_radix(p, 16).ok())
                    .ok_or(format!("bad line {line}"))?;
                t.port_writes.push((tid, port));
            }
            "kvm_userspace_exit" => {
                // "reason KVM_EXIT_IO (2)", "reason restart (4)", "reason error (11)"
                // errno -EINTR prints as "restart": KVM_EXIT_INTR; other
                // errnos as "error (errno)", kept here as "error errno".
                let r = match field(body, "reason ").unwrap_or("") {
                    "restart" => "INTR".to_string(),
                    "error" => format!("error {}", field(body, "error (").unwrap_or("?")),
                    r => r.trim_start_matches("KVM_EXIT_").to_string(),
                };
                t.exits.push((tid, seconds, "user", r));
            }
            _ => {}
        }
    }
    Ok(t)
}
