//! The TIME column: kernel CLOCK_MONOTONIC timestamps as wall-clock or
//! monotonic time.

use super::TimeFormat;

/// Converts kernel CLOCK_MONOTONIC timestamps to the TIME column.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns, measured at start.
    offset_ns: i128,
    format: TimeFormat,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

impl Clock {
    /// Measures the wall-clock offset now.
    pub fn new(format: TimeFormat) -> Self {
        let offset_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
        Clock { offset_ns, format }
    }

    /// The TIME column for a CLOCK_MONOTONIC timestamp.
    pub fn format(&self, mono_ns: u64) -> String {
        match self.format {
            TimeFormat::Mono => format!("{:.6}", mono_ns as f64 / 1e9),
            TimeFormat::Wall => {
                let wall = mono_ns as i128 + self.offset_ns;
                let secs = wall.div_euclid(1_000_000_000) as i64;
                let nanos = wall.rem_euclid(1_000_000_000) as u32;
                match chrono::DateTime::from_timestamp(secs, nanos) {
                    Some(t) => t
                        .with_timezone(&chrono::Local)
                        .format("%H:%M:%S%.3f")
                        .to_string(),
                    None => format!("{:.6}", mono_ns as f64 / 1e9),
                }
            }
        }
    }
}
