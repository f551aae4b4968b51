//! halt-poll's metric families: the window now and its changes.

use super::HaltPollTotals;
use crate::monitors::families::{Family, Get};

pub const FAMILIES: &[Family<HaltPollTotals>] = &[
    Family::setting(
        "halt_poll_window",
        "The vCPU's halt-polling window after its last change",
        Get::Nanos(|t| t.window_ns),
    ),
    Family::counters(
        "halt_poll_changes",
        "Halt-polling window changes, by direction (grow or shrink)",
        "direction",
        &[
            ("grow", Get::Count(|t| t.grows)),
            ("shrink", Get::Count(|t| t.shrinks)),
        ],
    ),
];
