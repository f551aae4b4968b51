//! How cells are written: compact numbers that fit their columns.

use crate::monitors::{Cell, Unit};

/// `v` in at most five characters or so: `1234`, `12.3k`, `123k`, `4.5M`.
fn compact(v: f64) -> String {
    let a = v.abs();
    if a < 10_000.0 {
        format!("{v:.0}")
    } else if a < 100_000.0 {
        format!("{:.1}k", v / 1e3)
    } else if a < 10_000_000.0 {
        format!("{:.0}k", v / 1e3)
    } else if a < 100e6 {
        format!("{:.1}M", v / 1e6)
    } else {
        format!("{:.0}M", v / 1e6)
    }
}

/// A duration: `0`, `950ns`, `12.5us`, `200us`, `1.5ms`, `2.0s`.
fn duration(ns: f64) -> String {
    if ns == 0.0 {
        "0".into()
    } else if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e4 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1e6 {
        format!("{:.0}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.1}s", ns / 1e9)
    }
}

/// The text of `cell` in a column of `unit`; empty for no figure.
pub fn cell(cell: &Cell, unit: Unit) -> String {
    if let Cell::Text(t) = cell {
        return super::snapshot::clean(t);
    }
    let Some(v) = cell.number() else {
        return String::new();
    };
    match unit {
        Unit::PerSecond | Unit::Count => compact(v),
        Unit::Percent => format!("{v:.1}"),
        Unit::Nanoseconds => duration(v),
        Unit::Cpu => format!("{v:.0}"),
        Unit::MibPerSecond => format!("{v:.2}"),
        Unit::Text => String::new(),
    }
}

/// `bytes` as `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_short_in_every_unit() {
        let v = |x| Cell::Value(x);
        assert_eq!(cell(&v(999.4), Unit::PerSecond), "999");
        assert_eq!(cell(&v(12_345.0), Unit::PerSecond), "12.3k");
        assert_eq!(cell(&v(300_000.0), Unit::PerSecond), "300k");
        assert_eq!(cell(&v(45_000_000.0), Unit::Count), "45.0M");
        assert_eq!(cell(&v(99.96), Unit::Percent), "100.0");
        assert_eq!(cell(&v(0.0), Unit::Nanoseconds), "0");
        assert_eq!(cell(&v(950.0), Unit::Nanoseconds), "950ns");
        assert_eq!(cell(&v(12_400.0), Unit::Nanoseconds), "12us");
        assert_eq!(cell(&v(200_000.0), Unit::Nanoseconds), "200us");
        assert_eq!(cell(&v(1_500_000.0), Unit::Nanoseconds), "1.5ms");
        assert_eq!(cell(&v(3.0), Unit::Cpu), "3");
        assert_eq!(cell(&v(0.03125), Unit::MibPerSecond), "0.03");
        let share = Cell::Share {
            part: 1.0,
            whole: 3.0,
        };
        assert_eq!(cell(&share, Unit::Percent), "33.3");
        assert_eq!(cell(&Cell::Blank, Unit::Percent), "");
        assert_eq!(cell(&Cell::Text("HLT\x07".into()), Unit::Text), "HLT?");
        assert_eq!(mib(3 << 20), "3.0 MiB");
    }
}
