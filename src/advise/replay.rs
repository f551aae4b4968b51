//! KVM's halt-polling policy, replayed over a sequence of observed halts
//! (Documentation/virt/kvm/halt-polling.rst; `kvm_vcpu_halt()`,
//! `grow_halt_poll_ns()` and `shrink_halt_poll_ns()` in virt/kvm/kvm_main.c).
//!
//! Each vCPU keeps its own window (`vcpu->halt_poll_ns`), starting at 0.
//! At a halt the window is first cut to the maximum (the VM's
//! `KVM_CAP_HALT_POLL` value, else `kvm.halt_poll_ns`); KVM polls for that
//! long and catches the wake-up if it comes within the window. After the
//! halt, with `halt_ns` the whole halt (polling included):
//! - an invalid wake-up (no real cause) shrinks the window;
//! - `halt_ns <= window`: no change;
//! - window > 0 and `halt_ns > max`: shrink (÷ `halt_poll_ns_shrink`, to 0
//!   when that is 0 or the result falls under `halt_poll_ns_grow_start`);
//! - window < max and `halt_ns < max`: grow (× `halt_poll_ns_grow`, at
//!   least `halt_poll_ns_grow_start`);
//! - a maximum of 0 resets the window to 0.

use serde::Serialize;

/// The module parameters of KVM's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The maximum window, ns (`halt_poll_ns` or the VM's `KVM_CAP_HALT_POLL`).
    pub max_ns: u64,
    /// `halt_poll_ns_grow` (0: never grows).
    pub grow: u64,
    /// `halt_poll_ns_grow_start` (Linux 5.1+; before it, 10 µs fixed).
    pub grow_start: u64,
    /// `halt_poll_ns_shrink` (0: shrink to 0).
    pub shrink: u64,
}

impl Policy {
    /// Linux's defaults on x86 since 5.1 (`halt_poll_ns` 200 µs, grow 2,
    /// grow_start 10 µs, shrink 2).
    pub const DEFAULT: Policy = Policy {
        max_ns: 200_000,
        grow: 2,
        grow_start: 10_000,
        shrink: 2,
    };

    /// The same policy with another maximum.
    pub fn with_max(self, max_ns: u64) -> Policy {
        Policy { max_ns, ..self }
    }

    /// The running kernel's parameters (/sys/module/kvm/parameters), each
    /// missing one from [`Policy::DEFAULT`].
    pub fn of_host() -> Policy {
        let read = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/sys/module/kvm/parameters/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        let d = Policy::DEFAULT;
        Policy {
            max_ns: read("halt_poll_ns", d.max_ns),
            grow: read("halt_poll_ns_grow", d.grow),
            grow_start: read("halt_poll_ns_grow_start", d.grow_start),
            shrink: read("halt_poll_ns_shrink", d.shrink),
        }
    }

    fn grown(&self, window: u64) -> u64 {
        if self.grow == 0 {
            return window;
        }
        window.saturating_mul(self.grow).max(self.grow_start)
    }

    fn shrunk(&self, window: u64) -> u64 {
        let v = window.checked_div(self.shrink).unwrap_or(0);
        if v < self.grow_start { 0 } else { v }
    }
}

/// One observed halt: how long until the wake-up came, and whether it had
/// a real cause (KVM's `valid` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Halt {
    /// ns from the halt to the wake-up.
    pub ns: u64,
    /// The wake-up had a real cause.
    pub valid: bool,
}

/// What the policy did over the halts, in KVM's own statistics' terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Halts replayed.
    pub halts: u64,
    /// `halt_attempted_poll`: halts that polled.
    pub attempted: u64,
    /// `halt_successful_poll`: polls that caught the wake-up.
    pub caught: u64,
    /// `halt_poll_success_ns`: time polling in polls that caught it.
    pub success_ns: u64,
    /// `halt_poll_fail_ns`: time polling in polls that did not.
    pub fail_ns: u64,
    /// Window changes (KVM's `kvm_halt_poll_ns` events).
    pub grows: u64,
    /// Window shrinks.
    pub shrinks: u64,
    /// The window after the last halt.
    pub window_ns: u64,
}

impl Outcome {
    /// Time spent polling, ns.
    pub fn poll_ns(&self) -> u64 {
        self.success_ns + self.fail_ns
    }

    /// Share of the halts whose wake-up polling caught (0 without halts).
    pub fn caught_share(&self) -> f64 {
        if self.halts == 0 {
            0.0
        } else {
            self.caught as f64 / self.halts as f64
        }
    }
}

/// Replays `halts` in order from a window of `start_ns` (KVM starts every
/// vCPU at 0).
pub fn replay(policy: &Policy, start_ns: u64, halts: impl IntoIterator<Item = Halt>) -> Outcome {
    let mut o = Outcome {
        window_ns: start_ns,
        ..Outcome::default()
    };
    let mut window = start_ns;
    for h in halts {
        o.halts += 1;
        window = window.min(policy.max_ns);
        if window > 0 {
            o.attempted += 1;
            if h.ns <= window {
                o.caught += 1;
                o.success_ns += h.ns;
            } else {
                o.fail_ns += window;
            }
        }
        let before = window;
        if !h.valid {
            window = policy.shrunk(window);
        } else if policy.max_ns == 0 {
            window = 0;
        } else if h.ns <= window {
        } else if window > 0 && h.ns > policy.max_ns {
            window = policy.shrunk(window);
        } else if window < policy.max_ns && h.ns < policy.max_ns {
            window = policy.grown(window);
        }
        if window > before {
            o.grows += 1;
        } else if window < before {
            o.shrinks += 1;
        }
    }
    o.window_ns = window;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(ns: &[u64]) -> Vec<Halt> {
        ns.iter().map(|&ns| Halt { ns, valid: true }).collect()
    }

    const P: Policy = Policy::DEFAULT;

    #[test]
    fn grows_from_zero_by_grow_start_then_doubles_up_to_the_maximum() {
        // 150 µs halts under a 200 µs maximum: window 0 (no poll), 10 µs
        // (fails), 20, 40, 80 (fail), 160 µs (catches 150 µs), then stays.
        let o = replay(&P, 0, valid(&[150_000; 7]));
        assert_eq!(o.attempted, 6);
        assert_eq!(o.caught, 2);
        assert_eq!(o.fail_ns, 10_000 + 20_000 + 40_000 + 80_000);
        assert_eq!(o.success_ns, 2 * 150_000);
        assert_eq!(o.grows, 5);
        assert_eq!(o.shrinks, 0);
        assert_eq!(o.window_ns, 160_000);
    }

    #[test]
    fn the_window_never_passes_the_maximum() {
        // 190 µs halts: ... 160 µs fails, grows to 320 µs, cut to 200 µs at
        // the next halt, which it catches; from then on every halt is caught.
        let o = replay(&P, 0, valid(&[190_000; 8]));
        // 0, 10, 20, 40, 80, 160 (all fail or no poll), 200, 200.
        assert_eq!(o.attempted, 7);
        assert_eq!(o.caught, 2);
        assert_eq!(o.fail_ns, 10_000 + 20_000 + 40_000 + 80_000 + 160_000);
        assert_eq!(o.success_ns, 2 * 190_000);
    }

    #[test]
    fn a_wake_up_just_inside_the_window_is_caught_just_outside_is_not() {
        let inside = replay(&P, 200_000, valid(&[200_000]));
        assert_eq!(
            (inside.caught, inside.success_ns, inside.fail_ns),
            (1, 200_000, 0)
        );
        assert_eq!(inside.window_ns, 200_000);
        // One ns later: polled the whole window and failed; longer than the
        // maximum, so the window halves.
        let outside = replay(&P, 200_000, valid(&[200_001]));
        assert_eq!(
            (outside.caught, outside.success_ns, outside.fail_ns),
            (0, 0, 200_000)
        );
        assert_eq!(outside.window_ns, 100_000);
    }

    #[test]
    fn long_halts_shrink_to_zero_and_stay_there() {
        // 2 ms halts from a 200 µs window: 200 -> 100 -> 50 -> 25 -> 12.5 ->
        // 6.25 µs, under grow_start, so 0; then no more polling.
        let o = replay(&P, 200_000, valid(&[2_000_000; 10]));
        assert_eq!(o.attempted, 5);
        assert_eq!(o.caught, 0);
        assert_eq!(o.fail_ns, 200_000 + 100_000 + 50_000 + 25_000 + 12_500);
        assert_eq!(o.shrinks, 5);
        assert_eq!(o.window_ns, 0);
        // From 0 a halt longer than the maximum never starts polling.
        let never = replay(&P, 0, valid(&[2_000_000; 100]));
        assert_eq!((never.attempted, never.poll_ns()), (0, 0));
    }

    #[test]
    fn shrink_zero_resets_and_invalid_wake_ups_shrink() {
        let reset = P.with_max(200_000);
        let reset = Policy { shrink: 0, ..reset };
        let o = replay(&reset, 200_000, valid(&[300_000]));
        assert_eq!(o.window_ns, 0);
        let o = replay(
            &P,
            80_000,
            [Halt {
                ns: 5_000,
                valid: false,
            }],
        );
        // Caught, but the wake-up had no cause: 80 -> 40 µs.
        assert_eq!((o.caught, o.window_ns), (1, 40_000));
    }

    #[test]
    fn a_maximum_of_zero_never_polls() {
        let o = replay(&P.with_max(0), 0, valid(&[5_000; 50]));
        assert_eq!((o.attempted, o.poll_ns(), o.window_ns), (0, 0, 0));
    }

    #[test]
    fn short_halts_are_caught_once_the_window_covers_them() {
        // 20 µs halts: 0 (no poll), 10 µs (fails), 20 µs catches from then on.
        let o = replay(&P, 0, valid(&[20_000; 100]));
        assert_eq!(o.attempted, 99);
        assert_eq!(o.caught, 98);
        assert_eq!(o.fail_ns, 10_000);
        assert_eq!(o.success_ns, 98 * 20_000);
        assert!((o.caught_share() - 0.98).abs() < 1e-12);
    }
}
