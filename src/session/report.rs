//! The last record of a run (`"monitor": "summary"`): events, lost events
//! and the backend of each monitor, and what the monitors add.

use std::collections::BTreeMap;

use libbpf_rs::MapHandle;
use serde::Serialize;
use serde_json::{Map, Value};

use super::Choice;
use crate::bpf::read_counters;
use crate::monitors::{REGISTRY, Watching};
use crate::output::{Clock, Row, monotonic_ns, warn};

/// The last record of a run.
#[derive(Debug, Serialize)]
pub struct Summary {
    time_ns: u64,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<String>,
    vcpu_id: Option<u32>,
    events: BTreeMap<&'static str, u64>,
    lost: BTreeMap<&'static str, u64>,
    backend: BTreeMap<&'static str, &'static str>,
    /// Records whose thread ran no vCPU (vcpu_id null), per monitor.
    unknown_vcpu: BTreeMap<&'static str, u64>,
    /// What each monitor adds (e.g. dirty's `dirty_map_full`), in registry order.
    #[serde(flatten)]
    monitors: Map<String, Value>,
}

impl Row for Summary {
    fn monitor(&self) -> &'static str {
        "summary"
    }
    fn header(&self) -> String {
        String::new()
    }
    fn row(&self, _clock: &Clock) -> String {
        let parts: Vec<String> = self
            .backend
            .iter()
            .map(|(m, b)| {
                format!(
                    "{m}: {} events, {} lost, backend {b}",
                    self.events.get(m).copied().unwrap_or(0),
                    self.lost.get(m).copied().unwrap_or(0)
                )
            })
            .collect();
        format!("# summary: {}", parts.join("; "))
    }
}

/// The summary of a session whose running monitors are `choices` (with
/// their user-space halves `watching`, in the same order); warns about lost
/// events.
pub fn summary(
    choices: &[Choice],
    watching: &[Box<dyn Watching>],
    counters: &MapHandle,
) -> Summary {
    let totals = read_counters(counters);
    let mut s = Summary {
        time_ns: monotonic_ns(),
        pid: None,
        tid: None,
        comm: None,
        vcpu_id: None,
        events: BTreeMap::new(),
        lost: BTreeMap::new(),
        backend: BTreeMap::new(),
        unknown_vcpu: BTreeMap::new(),
        monitors: Map::new(),
    };
    for c in choices {
        let name = c.monitor.name();
        let t = &totals[c.monitor.kind().0 as usize];
        s.events.insert(name, t.events);
        s.lost.insert(name, t.lost);
        s.unknown_vcpu.insert(name, t.unknown_vcpu);
        s.backend.insert(name, c.backend());
        if t.lost > 0 {
            warn(&format!(
                "{} {name} events lost because the ring buffer was full; raise --ringbuf-size{}",
                t.lost,
                c.monitor.lost_hint()
            ));
        }
    }
    // Every monitor's fields, with 0 for those that did not run.
    for m in REGISTRY {
        let running = choices.iter().position(|c| c.monitor.name() == m.name());
        match running {
            Some(i) => {
                let t = &totals[m.kind().0 as usize];
                for (k, v) in watching[i].summary(t) {
                    s.monitors.insert(k.to_string(), v);
                }
            }
            None => {
                for k in m.summary_fields() {
                    s.monitors.insert(k.to_string(), 0.into());
                }
            }
        }
    }
    s
}
