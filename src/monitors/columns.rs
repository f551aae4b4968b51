//! What a monitor shows in `kvm-watcher top`: columns it declares
//! ([`super::Monitor::top_columns`]), filled every interval from the same
//! figures as its part of a summary ([`super::Figures::top_cells`] for a
//! vCPU, [`super::VmRow::top_cells`] for a VM). A monitor without columns
//! shows none; its summary lines still appear in top's detail pane.

/// One column of `top`.
#[derive(Debug)]
pub struct Column {
    /// Heading, at most [`Column::width`] characters (`WAKE/s`).
    pub title: &'static str,
    /// Cells are right-aligned in this many characters.
    pub width: u16,
    /// What it shows, for top's help screen (one line).
    pub help: &'static str,
    /// How its figures are written.
    pub unit: Unit,
    /// What a VM's row shows.
    pub vm: VmRule,
    /// What a vCPU shows when the monitor runs but saw nothing of it in the
    /// interval (e.g. 0 wake-ups/s, or nothing for a share of no wake-ups).
    pub idle: Cell,
}

/// How a column's figures are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Events per second (`1234`, `12.3k`, `4.5M`).
    PerSecond,
    /// A percentage with one decimal (a [`Cell::Share`] is shown as one).
    Percent,
    /// A duration in nanoseconds (`0`, `950ns`, `200us`, `1.5ms`).
    Nanoseconds,
    /// A physical CPU number.
    Cpu,
    /// MiB per second with two decimals.
    MibPerSecond,
    /// A plain count (`12345`, `123k`).
    Count,
    /// Text (a [`Cell::Text`]).
    Text,
}

/// How a VM's row is made of its vCPUs' cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRule {
    /// Added up (rates, run time: a VM with 4 vCPUs can show 400%); shares
    /// add up their parts and their wholes.
    Sum,
    /// The mean over the VM's vCPUs, idle ones included.
    Mean,
    /// The largest of its vCPUs' figures.
    Max,
    /// Nothing: the figure is a vCPU's own (e.g. its main pCPU).
    Blank,
    /// The sum of the VM's own rows ([`super::VmRow::top_cells`], e.g. its
    /// memslots); vCPU rows show nothing.
    Rows,
}

/// One figure in a column.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// No figure (e.g. no wake-up in the interval, so no share of polled ones).
    Blank,
    /// A number in the column's unit.
    Value(f64),
    /// `part` of `whole`, shown as a percentage; blank when `whole` is 0.
    Share {
        /// The counted part (e.g. wake-ups caught by polling).
        part: f64,
        /// The whole (e.g. all wake-ups).
        whole: f64,
    },
    /// Text, e.g. the most frequent reason.
    Text(String),
}

impl Cell {
    /// The number this cell stands for (a share as a percentage), if any.
    pub fn number(&self) -> Option<f64> {
        match self {
            Cell::Value(v) => Some(*v),
            Cell::Share { part, whole } if *whole > 0.0 => Some(part * 100.0 / whole),
            _ => None,
        }
    }
}

/// `count` events over `interval_ns`, per second.
pub fn per_second(count: u64, interval_ns: u64) -> f64 {
    count as f64 * 1e9 / interval_ns.max(1) as f64
}

/// `ns` as a percentage of `interval_ns`, at most 100.
pub fn percent_of(ns: u64, interval_ns: u64) -> f64 {
    (ns as f64 * 100.0 / interval_ns.max(1) as f64).min(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_percentages_and_empty_ones_have_no_number() {
        assert_eq!(
            Cell::Share {
                part: 1.0,
                whole: 4.0
            }
            .number(),
            Some(25.0)
        );
        assert_eq!(
            Cell::Share {
                part: 0.0,
                whole: 0.0
            }
            .number(),
            None
        );
        assert_eq!(Cell::Value(3.5).number(), Some(3.5));
        assert_eq!(Cell::Blank.number(), None);
        assert_eq!(Cell::Text("x".into()).number(), None);
    }

    #[test]
    fn rates_and_percentages_of_an_interval() {
        assert_eq!(per_second(500, 500_000_000), 1000.0);
        assert_eq!(
            per_second(3, 0),
            3e9,
            "a zero interval does not divide by 0"
        );
        assert_eq!(percent_of(250_000_000, 1_000_000_000), 25.0);
        assert_eq!(
            percent_of(3_000_000_000, 1_000_000_000),
            100.0,
            "a halt that began before the interval counts at most all of it"
        );
    }
}
