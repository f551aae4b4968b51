//! Whether a pre-copy live migration of a VM converges, from its dirty rate.
//!
//! The model (docs/dirty-rate.md states it with its assumptions):
//!
//! - Round 0 sends the VM's memory that is not zero (`first_bytes`); round
//!   `i + 1` sends what changed while round `i` was on the wire.
//! - What changes within `t` seconds is `dirtied(t)`: the guest's measured
//!   working-set curve, bytes changed within windows of 0.1, 1 and 10 s,
//!   joined by straight lines from (0, 0), continued past the last point at
//!   the rate of the last segment, and never more than the VM's memory.
//!   With a single rate `D` it is `min(D * t, memory)`.
//! - The link carries `link` bytes a second, whatever the round.
//! - The migration stops the guest once what is left fits the allowed
//!   downtime (`left <= link * max_downtime`) and sends it then.
//! - Throttling the vCPUs by `p` % (QEMU's auto-converge) slows the guest:
//!   in `t` seconds it changes what it changed in `t * (1 - p / 100)`. A
//!   guest that rewrites a small working set very fast is barely helped,
//!   one that moves through its memory is helped in proportion. A dirty
//!   limit caps the rate: `min(dirtied(t), limit * t)`.

use serde::Serialize;

/// Rounds after which a migration that has not converged is called stuck
/// (QEMU has no limit of its own; past a few dozen rounds nobody waits).
pub const MAX_ROUNDS: u32 = 30;

/// Bytes changed within a window, as a curve through measured points.
#[derive(Clone, Debug, PartialEq)]
pub struct Dirtying {
    /// (window in seconds, bytes changed within it), by window, non-decreasing.
    points: Vec<(f64, f64)>,
    /// The VM's memory, bytes: nothing dirties more.
    memory: f64,
    /// The guest's speed, 1 unthrottled.
    speed: f64,
    /// A cap on the rate, bytes/s (a dirty limit).
    limit: Option<f64>,
}

impl Dirtying {
    /// A constant rate of `bytes_per_s`.
    pub fn rate(bytes_per_s: f64, memory: u64) -> Dirtying {
        Dirtying::curve(&[(1.0, bytes_per_s)], memory)
    }

    /// Through measured (window s, bytes changed) points; windows that are not
    /// positive or values that are not finite are ignored, and a point below
    /// an earlier one is raised to it (a longer window never changes less).
    pub fn curve(points: &[(f64, f64)], memory: u64) -> Dirtying {
        let mut points: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(w, b)| *w > 0.0 && w.is_finite() && b.is_finite())
            .map(|(w, b)| (w, b.max(0.0)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        // One point per window: the highest measured.
        points.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = kept.1.max(later.1);
            }
            same
        });
        let mut highest = 0.0f64;
        for p in &mut points {
            highest = highest.max(p.1);
            p.1 = highest;
        }
        Dirtying {
            points,
            memory: memory as f64,
            speed: 1.0,
            limit: None,
        }
    }

    /// Bytes changed within `t` seconds.
    pub fn within(&self, t: f64) -> f64 {
        let d = self.curve_at(t * self.speed);
        self.limit.map_or(d, |l| d.min(l * t))
    }

    fn curve_at(&self, t: f64) -> f64 {
        let mut prev = (0.0, 0.0);
        for &(w, b) in &self.points {
            if t <= w {
                let f = (t - prev.0) / (w - prev.0);
                return (prev.1 + f * (b - prev.1)).min(self.memory);
            }
            prev = (w, b);
        }
        // Past the last point: on at the last segment's rate.
        let n = self.points.len();
        let slope = match n {
            0 => 0.0,
            1 => self.points[0].1 / self.points[0].0,
            _ => {
                let (a, b) = (self.points[n - 2], self.points[n - 1]);
                (b.1 - a.1) / (b.0 - a.0)
            }
        };
        (prev.1 + slope * (t - prev.0)).min(self.memory)
    }

    /// The same guest slowed to `1 - throttle` of its speed.
    fn throttled(&self, throttle: f64) -> Dirtying {
        Dirtying {
            speed: (1.0 - throttle).clamp(0.0, 1.0),
            ..self.clone()
        }
    }

    /// The same guest with its rate capped at `bytes_per_s`.
    fn limited(&self, bytes_per_s: f64) -> Dirtying {
        Dirtying {
            limit: Some(bytes_per_s),
            ..self.clone()
        }
    }

    /// Bytes per second over the shortest measured window: the rate that
    /// decides the last rounds.
    pub fn initial_rate(&self) -> f64 {
        self.points.first().map_or(0.0, |(w, b)| b / w)
    }
}

/// The link and the downtime allowed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Link {
    /// Bytes per second the migration gets.
    pub bytes_per_s: f64,
    /// The longest pause of the guest allowed at the end, seconds.
    pub max_downtime_s: f64,
}

/// A migration that converges.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// Rounds while the guest runs (round 0, the whole memory, included).
    pub rounds: u32,
    /// From start to the guest running on the destination, seconds.
    pub total_s: f64,
    /// The final pause, seconds.
    pub downtime_s: f64,
    /// Bytes sent in all.
    pub sent_bytes: f64,
}

/// What the model says about one VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Advice {
    /// It converges as it is.
    Converges(Plan),
    /// It does not within [`MAX_ROUNDS`]: what it would take.
    DoesNotConverge {
        /// The guest's dirty rate over the shortest window, bytes/s.
        dirty_bytes_per_s: f64,
        /// That shortest window, seconds.
        dirty_window_s: f64,
        /// What is left after the last round, in seconds of the link: the
        /// downtime it would need.
        downtime_needed_s: f64,
        /// The smallest vCPU throttle, %, under which it converges (QEMU's
        /// auto-converge goes up to 99 %); `None` if not even 99 % does.
        throttle_percent: Option<u32>,
        /// The highest dirty rate, bytes/s, under which it converges (a dirty limit).
        dirty_limit_bytes_per_s: f64,
    },
}

/// Runs the rounds: `Some(plan)` if it converges within [`MAX_ROUNDS`], else
/// what is left after the last round, bytes.
fn simulate(first_bytes: f64, dirtying: &Dirtying, link: &Link) -> Result<Plan, f64> {
    let fits = link.bytes_per_s * link.max_downtime_s;
    let mut left = first_bytes;
    let (mut total, mut sent) = (0.0, 0.0);
    for round in 0..MAX_ROUNDS {
        if round > 0 && left <= fits {
            let downtime = left / link.bytes_per_s;
            return Ok(Plan {
                rounds: round,
                total_s: total + downtime,
                downtime_s: downtime,
                sent_bytes: sent + left,
            });
        }
        let t = left / link.bytes_per_s;
        total += t;
        sent += left;
        left = dirtying.within(t);
    }
    Err(left)
}

/// The model's answer for a VM whose round 0 sends `first_bytes`.
pub fn advise(first_bytes: f64, dirtying: &Dirtying, link: &Link) -> Advice {
    let left = match simulate(first_bytes, dirtying, link) {
        Ok(plan) => return Advice::Converges(plan),
        Err(left) => left,
    };
    let converges = |d: &Dirtying| simulate(first_bytes, d, link).is_ok();
    let throttle_percent = (1..=99).find(|p| converges(&dirtying.throttled(f64::from(*p) / 100.0)));
    // The highest capped rate that converges, by bisection (converging is
    // monotone in the cap).
    let (mut lo, mut hi) = (0.0, dirtying.initial_rate().max(link.bytes_per_s));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if converges(&dirtying.limited(mid)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Advice::DoesNotConverge {
        dirty_bytes_per_s: dirtying.initial_rate(),
        dirty_window_s: dirtying.points.first().map_or(1.0, |p| p.0),
        downtime_needed_s: left / link.bytes_per_s,
        throttle_percent,
        dirty_limit_bytes_per_s: lo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;
    const GIB: u64 = 1 << 30;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-9)
    }

    #[test]
    fn an_idle_guest_moves_in_one_round() {
        // 1 GiB over 100 MiB/s: 10.24 s, nothing left, no pause to speak of.
        let link = Link {
            bytes_per_s: 100.0 * MIB,
            max_downtime_s: 0.3,
        };
        let Advice::Converges(p) = advise(GIB as f64, &Dirtying::rate(0.0, GIB), &link) else {
            panic!("an idle guest converges");
        };
        assert_eq!(p.rounds, 1);
        assert!(close(p.total_s, 10.24, 1e-9));
        assert_eq!(p.downtime_s, 0.0);
    }

    #[test]
    fn a_geometric_series_by_hand() {
        // 1000 MiB, dirty 25 MiB/s, link 100 MiB/s, 0.3 s allowed (30 MiB):
        // round 0: 10 s (250 MiB dirtied); round 1: 2.5 s (62.5 MiB);
        // round 2: 0.625 s (15.625 MiB <= 30): stop, 0.15625 s of downtime.
        let link = Link {
            bytes_per_s: 100.0 * MIB,
            max_downtime_s: 0.3,
        };
        let d = Dirtying::rate(25.0 * MIB, 4 * GIB);
        let Advice::Converges(p) = advise(1000.0 * MIB, &d, &link) else {
            panic!("converges");
        };
        assert_eq!(p.rounds, 3);
        assert!(close(p.downtime_s, 0.15625, 1e-9), "{p:?}");
        assert!(
            close(p.total_s, 10.0 + 2.5 + 0.625 + 0.15625, 1e-9),
            "{p:?}"
        );
        assert!(close(
            p.sent_bytes,
            (1000.0 + 250.0 + 62.5 + 15.625) * MIB,
            1e-9
        ));
    }

    #[test]
    fn a_dirty_rate_above_the_link_does_not_converge_and_says_what_would() {
        // 200 MiB/s of changes on a 100 MiB/s link: each round sends more.
        let link = Link {
            bytes_per_s: 100.0 * MIB,
            max_downtime_s: 0.3,
        };
        let d = Dirtying::rate(200.0 * MIB, 4 * GIB);
        let Advice::DoesNotConverge {
            dirty_bytes_per_s,
            dirty_window_s,
            downtime_needed_s,
            throttle_percent,
            dirty_limit_bytes_per_s,
        } = advise(4.0 * GIB as f64, &d, &link)
        else {
            panic!("does not converge");
        };
        assert!(close(dirty_bytes_per_s, 200.0 * MIB, 1e-9));
        assert_eq!(dirty_window_s, 1.0);
        // Capped by the memory: all 4 GiB left, 40.96 s of link.
        assert!(close(downtime_needed_s, 40.96, 1e-9));
        // Throttled to below the link's speed, with room to shrink in 30 rounds.
        let p = throttle_percent.unwrap();
        assert!((51..=60).contains(&p), "{p}");
        assert!(
            advise(4.0 * GIB as f64, &d.throttled(f64::from(p) / 100.0), &link).is_converging()
        );
        assert!(
            !advise(
                4.0 * GIB as f64,
                &d.throttled(f64::from(p - 1) / 100.0),
                &link
            )
            .is_converging()
        );
        // The dirty limit lies below the link.
        assert!(dirty_limit_bytes_per_s < 100.0 * MIB);
        assert!(
            dirty_limit_bytes_per_s > 50.0 * MIB,
            "{dirty_limit_bytes_per_s}"
        );
    }

    #[test]
    fn a_small_working_set_converges_even_when_rewritten_fast() {
        // 64 MiB rewritten at 1 GiB/s: the rate exceeds the link, but no
        // window changes more than 64 MiB, and 64 MiB fits 1 s of downtime.
        let link = Link {
            bytes_per_s: 100.0 * MIB,
            max_downtime_s: 1.0,
        };
        let d = Dirtying::curve(
            &[(0.1, 64.0 * MIB), (1.0, 64.0 * MIB), (10.0, 64.0 * MIB)],
            GIB,
        );
        assert!(advise(GIB as f64, &d, &link).is_converging());
        // At 0.3 s it cannot: 64 MiB is 0.64 s of link. Throttling helps
        // only once a round, at the slowed speed, is shorter than the
        // shortest window (0.1 s), below which the curve is taken as a
        // straight line from 0: at 85 % a 0.64 s round is 0.096 s of guest
        // time, and each round sends 4 % less, enough within 30 rounds.
        let tight = Link {
            max_downtime_s: 0.3,
            ..link
        };
        match advise(GIB as f64, &d, &tight) {
            Advice::DoesNotConverge {
                downtime_needed_s,
                throttle_percent,
                ..
            } => {
                assert!(close(downtime_needed_s, 0.64, 1e-9));
                assert_eq!(throttle_percent, Some(85));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_curve_interpolates_extrapolates_and_caps() {
        let d = Dirtying::curve(&[(1.0, 100.0), (0.1, 50.0), (10.0, 1000.0)], 5000);
        assert!(close(d.within(0.05), 25.0, 1e-9));
        assert!(close(d.within(0.55), 75.0, 1e-9));
        assert!(close(d.within(5.5), 550.0, 1e-9));
        // Past 10 s at the last segment's 100 B/s, up to the memory.
        assert!(close(d.within(20.0), 2000.0, 1e-9));
        assert_eq!(d.within(1000.0), 5000.0);
        // Two points of one window: the higher one counts.
        let d = Dirtying::curve(&[(1.0, 10.0), (1.0, 30.0)], 5000);
        assert!(close(d.within(2.0), 60.0, 1e-9));
        // A later point lower than an earlier one is raised.
        let d = Dirtying::curve(&[(0.1, 50.0), (1.0, 10.0)], 5000);
        assert!(close(d.within(1.0), 50.0, 1e-9));
        assert!(close(Dirtying::rate(7.0, 100).within(3.0), 21.0, 1e-9));
        assert_eq!(Dirtying::curve(&[], 10).within(5.0), 0.0);
    }

    impl Advice {
        fn is_converging(&self) -> bool {
            matches!(self, Advice::Converges(_))
        }
    }
}
