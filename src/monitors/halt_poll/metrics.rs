//! halt-poll's metric families: the window now and its changes.

use super::HaltPollTotals;
use crate::monitors::families::{Family, Get, Kind, every};

pub const FAMILIES: &[Family<HaltPollTotals>] = &[
    Family {
        name: "halt_poll_window",
        help: "The vCPU's halt-polling window after its last change",
        only: every,
        kind: Kind::Setting(Get::Nanos(|t| t.window_ns)),
    },
    Family {
        name: "halt_poll_changes",
        help: "Halt-polling window changes, by direction (grow or shrink)",
        only: every,
        kind: Kind::Counter {
            split: "direction",
            values: &[
                ("grow", Get::Count(|t| t.grows)),
                ("shrink", Get::Count(|t| t.shrinks)),
            ],
        },
    },
];
