//! From finished windows to one interval's rows: per VM (and per memslot)
//! the rate at which guest memory changed, with its interval, the share of
//! memory changed within each window length (the writable working set), and
//! what a pre-copy migration would do. Pure.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::estimate::{Sample, Share};
use super::precopy::{Advice, Dirtying, Link};
use super::sampler::Window;
use crate::monitors::{Cell, Column, Tick, Unit, VmRow, VmRule};
use crate::output::{Clock, Output, Row, terminal_safe};

const PAGE: f64 = 4096.0;
const MIB: f64 = 1048576.0;

/// What the rows are made with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The window the rate is measured over.
    pub rate_window: Duration,
    /// The working-set windows, shortest first.
    pub windows: Vec<Duration>,
    /// With a link: the migration advice.
    pub link: Option<Link>,
}

/// A window length's share of memory changed, as JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkingSet {
    /// The window, seconds.
    pub window_s: f64,
    /// Between the two readings, seconds (the mean of the rounds pooled).
    pub elapsed_s: f64,
    /// When its last round ended, CLOCK_MONOTONIC ns.
    pub ended_ns: u64,
    /// Share of the VM's RAM whose content changed within it, with its 95 % interval.
    pub share: Share,
    /// Pages compared.
    pub samples: u64,
}

/// The migration advice, flat for CSV.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Migration {
    /// Whether pre-copy converges.
    pub converges: bool,
    /// Rounds while the guest runs.
    pub rounds: Option<u32>,
    /// Total time, seconds.
    pub total_s: Option<f64>,
    /// The final pause, seconds (if it does not converge: the pause it would need).
    pub downtime_s: Option<f64>,
    /// The vCPU throttle (auto-converge) it would need, %.
    pub throttle_percent: Option<u32>,
    /// The dirty limit it would need, MiB/s.
    pub dirty_limit_mib_per_s: Option<f64>,
    /// One line for people.
    pub text: String,
}

/// One row: a VM (`slot` null) or one of its RAM memslots, for one interval.
#[derive(Clone, Debug, Serialize)]
pub struct DirtyRateRow {
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// VMM process.
    pub pid: u32,
    /// Always null: the row is a VM's (the fields every record has).
    pub tid: Option<u32>,
    /// Always null.
    pub comm: Option<String>,
    /// Always null.
    pub vcpu_id: Option<u32>,
    /// VM name.
    pub vm: Option<String>,
    /// The memslot id; null for the whole VM.
    pub slot: Option<u16>,
    /// First guest frame of the slot (null for the VM).
    pub base_gfn: Option<u64>,
    /// Pages sampled from (the VM's RAM, or the slot's).
    pub pages: u64,
    /// KVM logs this memory's dirty pages (for a VM: any of its slots).
    pub logging: bool,
    /// The rate window, seconds (as measured; 0 if none ended in the interval).
    pub window_s: f64,
    /// Pages compared at both ends of the rate's windows in the interval.
    pub samples: u64,
    /// Of those, pages whose content changed.
    pub changed: u64,
    /// Changed distinct pages per second, with the 95 % interval (null if no
    /// window ended in the interval).
    pub rate_pages_per_s: Option<Share>,
    /// The same in MiB/s (estimate).
    pub rate_mib_per_s: Option<f64>,
    /// Share of pages read at a window's start that held something other than zeros.
    pub nonzero_share: Option<f64>,
    /// Per working-set window, the latest (VM rows only).
    pub working_set: Vec<WorkingSet>,
    /// With `--link`: the migration advice (VM rows only).
    pub migration: Option<Migration>,
    /// Samples dropped because their memslot changed during the window.
    pub dropped: u64,
    /// Fewer samples than asked for, because of `--max-read-rate`.
    pub capped: bool,
}

/// Pools windows: sums of compared/changed over windows of one length.
#[derive(Clone, Copy, Debug, Default)]
struct Pool {
    compared: u64,
    changed: u64,
    nonzero: u64,
    elapsed_s: f64,
    windows: u32,
    dropped: u64,
    capped: bool,
}

impl Pool {
    fn add(&mut self, compared: u64, changed: u64, nonzero: u64, elapsed_s: f64) {
        self.compared += compared;
        self.changed += changed;
        self.nonzero += nonzero;
        self.elapsed_s += elapsed_s;
        self.windows += 1;
    }

    /// A whole window: its slots' counts added up.
    fn add_window(&mut self, w: &Window) {
        self.add(
            w.slots.iter().map(|s| s.compared).sum(),
            w.slots.iter().map(|s| s.changed).sum(),
            w.slots.iter().map(|s| s.nonzero).sum(),
            w.elapsed_s,
        );
    }

    fn sample(&self, population: u64) -> Sample {
        Sample {
            population,
            compared: self.compared,
            changed: self.changed,
            window_s: self.elapsed_s / f64::from(self.windows.max(1)),
        }
    }
}

/// Keeps the working sets between intervals (a 10 s window ends every 10 s).
#[derive(Default)]
pub struct Aggregator {
    latest: HashMap<(u32, u128), (WorkingSet, Instant)>,
}

/// A working set not renewed for this long belongs to a VM that is gone.
const FORGET_AFTER: Duration = Duration::from_secs(30);

impl Aggregator {
    /// The rows of interval `tick`, from the windows that ended in it.
    pub fn tick(
        &mut self,
        windows: &[Window],
        settings: &Settings,
        tick: &Tick,
    ) -> Vec<DirtyRateRow> {
        let mut rows = Vec::new();
        let mut pids: Vec<u32> = windows.iter().map(|w| w.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let of_vm: Vec<&Window> = windows.iter().filter(|w| w.pid == pid).collect();
            self.working_sets(pid, &of_vm);
            rows.extend(self.vm_rows(pid, &of_vm, settings, tick));
        }
        let now = Instant::now();
        self.latest
            .retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
        rows
    }

    fn working_sets(&mut self, pid: u32, windows: &[&Window]) {
        // Per window length: the pooled rounds, the pages, when the last ended.
        type Pooled = (Pool, u64, Option<(Instant, u64)>);
        let mut pools: BTreeMap<u128, Pooled> = BTreeMap::new();
        for w in windows {
            let (pool, population, ended) = pools.entry(w.window.as_nanos()).or_default();
            *ended = Some((w.ended, w.ended_ns));
            pool.add_window(w);
            *population = w.slots.iter().map(|s| s.slot.npages).sum();
        }
        for (ns, (pool, population, ended)) in pools {
            let sample = pool.sample(population);
            if let (Some(share), Some((ended, ended_ns))) = (sample.share(), ended) {
                let ws = WorkingSet {
                    window_s: ns as f64 / 1e9,
                    elapsed_s: sample.window_s,
                    ended_ns,
                    share,
                    samples: pool.compared,
                };
                self.latest.insert((pid, ns), (ws, ended));
            }
        }
    }

    fn vm_rows(
        &self,
        pid: u32,
        windows: &[&Window],
        settings: &Settings,
        tick: &Tick,
    ) -> Vec<DirtyRateRow> {
        let rate: Vec<&&Window> = windows
            .iter()
            .filter(|w| w.window == settings.rate_window)
            .collect();
        // The slots: those of the rate's latest window, else of any window.
        let Some(latest) = rate.last().map(|w| **w).or(windows.last().copied()) else {
            return Vec::new();
        };
        let mut vm = Pool::default();
        let mut per_slot: BTreeMap<u16, Pool> = BTreeMap::new();
        for w in &rate {
            for s in &w.slots {
                per_slot.entry(s.slot.id).or_default().add(
                    s.compared,
                    s.changed,
                    s.nonzero,
                    w.elapsed_s,
                );
            }
            vm.add_window(w);
            vm.dropped += w.dropped;
            vm.capped |= w.capped;
        }
        let population: u64 = latest.slots.iter().map(|s| s.slot.npages).sum();
        let mut working_set: Vec<WorkingSet> = settings
            .windows
            .iter()
            .filter_map(|w| self.latest.get(&(pid, w.as_nanos())).map(|l| l.0.clone()))
            .collect();
        working_set.sort_by(|a, b| a.window_s.total_cmp(&b.window_s));
        let mut head = row(pid, None, None, population, &vm, tick);
        head.logging = latest.slots.iter().any(|s| s.slot.logging);
        head.migration = settings
            .link
            .and_then(|link| advice(&head, &working_set, population, &link));
        head.working_set = working_set;
        let mut rows = vec![head];
        for s in &latest.slots {
            let pool = per_slot.get(&s.slot.id).copied().unwrap_or_default();
            let mut r = row(
                pid,
                Some(s.slot.id),
                Some(s.slot.base_gfn),
                s.slot.npages,
                &pool,
                tick,
            );
            r.logging = s.slot.logging;
            rows.push(r);
        }
        rows
    }
}

fn row(
    pid: u32,
    slot: Option<u16>,
    base_gfn: Option<u64>,
    pages: u64,
    pool: &Pool,
    tick: &Tick,
) -> DirtyRateRow {
    let sample = pool.sample(pages);
    let rate = (pool.windows > 0)
        .then(|| sample.pages_per_second())
        .flatten();
    DirtyRateRow {
        time_ns: tick.now_ns,
        pid,
        tid: None,
        comm: None,
        vcpu_id: None,
        vm: None,
        slot,
        base_gfn,
        pages,
        logging: false,
        window_s: if pool.windows > 0 {
            sample.window_s
        } else {
            0.0
        },
        samples: pool.compared,
        changed: pool.changed,
        rate_pages_per_s: rate,
        rate_mib_per_s: rate.map(|r| r.estimate * PAGE / MIB),
        nonzero_share: (pool.compared > 0).then(|| pool.nonzero as f64 / pool.compared as f64),
        working_set: Vec::new(),
        migration: None,
        dropped: pool.dropped,
        capped: pool.capped,
    }
}

/// The model's advice from the row's rate and the working sets.
fn advice(
    row: &DirtyRateRow,
    ws: &[WorkingSet],
    population: u64,
    link: &Link,
) -> Option<Migration> {
    let rate = row.rate_pages_per_s?;
    let memory = population * PAGE as u64;
    let mut points: Vec<(f64, f64)> = ws
        .iter()
        .map(|w| (w.window_s, w.share.estimate * memory as f64))
        .collect();
    points.push((
        row.window_s.max(1e-3),
        rate.estimate * PAGE * row.window_s.max(1e-3),
    ));
    let dirtying = Dirtying::curve(&points, memory);
    let first = row.nonzero_share.unwrap_or(1.0) * memory as f64;
    Some(migration(
        &super::precopy::advise(first, &dirtying, link),
        link,
    ))
}

fn migration(advice: &Advice, link: &Link) -> Migration {
    let mib = |b: f64| b / MIB;
    match advice {
        Advice::Converges(p) => Migration {
            converges: true,
            rounds: Some(p.rounds),
            total_s: Some(p.total_s),
            downtime_s: Some(p.downtime_s),
            throttle_percent: None,
            dirty_limit_mib_per_s: None,
            text: format!(
                "converges: {} round{}, {:.1} s, downtime {:.3} s",
                p.rounds,
                if p.rounds == 1 { "" } else { "s" },
                p.total_s,
                p.downtime_s
            ),
        },
        Advice::DoesNotConverge {
            dirty_bytes_per_s,
            dirty_window_s,
            downtime_needed_s,
            throttle_percent,
            dirty_limit_bytes_per_s,
        } => {
            let throttle = throttle_percent.map_or("no throttle up to 99 %".to_string(), |p| {
                format!("throttle {p} %")
            });
            Migration {
                converges: false,
                rounds: None,
                total_s: None,
                downtime_s: Some(*downtime_needed_s),
                throttle_percent: *throttle_percent,
                dirty_limit_mib_per_s: Some(mib(*dirty_limit_bytes_per_s)),
                text: format!(
                    "does not converge: dirty rate {:.1} MiB/s over {} s vs link {:.1} MiB/s; needs {throttle} or a dirty limit of {:.1} MiB/s (or {:.2} s of downtime)",
                    mib(*dirty_bytes_per_s),
                    dirty_window_s,
                    mib(link.bytes_per_s),
                    mib(*dirty_limit_bytes_per_s),
                    downtime_needed_s
                ),
            }
        }
    }
}

fn rate_text(r: &DirtyRateRow) -> String {
    match r.rate_pages_per_s {
        Some(s) => format!(
            "{:.2} MiB/s ({:.0} pages/s, 95 % {:.0}..{:.0}; {} of {} changed in {:.2} s)",
            s.estimate * PAGE / MIB,
            s.estimate,
            s.low,
            s.high,
            r.changed,
            r.samples,
            r.window_s
        ),
        None => "no window ended".to_string(),
    }
}

impl Row for DirtyRateRow {
    fn monitor(&self) -> &'static str {
        "dirty_rate"
    }

    fn header(&self) -> String {
        format!(
            "{:>8} {:>6} {:>10} {:>9} {:>10} {:>21} {:>8} {:>7} {:>7} {:>7}  VM / MIGRATION",
            "PID",
            "SLOT",
            "PAGES",
            "LOGGING",
            "MiB/s",
            "PAGES/s (95%)",
            "SAMPLES",
            "WS.1s",
            "WS1s",
            "WS10s"
        )
    }

    fn row(&self, _clock: &Clock) -> String {
        let ws = |secs: f64| {
            self.working_set
                .iter()
                .find(|w| (w.window_s - secs).abs() < 1e-9)
                .map_or("-".to_string(), |w| {
                    format!("{:.2}%", w.share.estimate * 100.0)
                })
        };
        let (mib, pages) = match self.rate_pages_per_s {
            Some(s) => (
                format!("{:.2}", s.estimate * PAGE / MIB),
                format!("{:.0} ({:.0}..{:.0})", s.estimate, s.low, s.high),
            ),
            None => ("-".into(), "-".into()),
        };
        let tail = match (&self.slot, &self.migration) {
            (None, Some(m)) => format!(
                "{}  {}",
                terminal_safe(self.vm.as_deref().unwrap_or("-")),
                m.text
            ),
            (None, None) => terminal_safe(self.vm.as_deref().unwrap_or("-")).into_owned(),
            (Some(_), _) => String::new(),
        };
        format!(
            "{:>8} {:>6} {:>10} {:>9} {:>10} {:>21} {:>8} {:>7} {:>7} {:>7}  {tail}",
            self.pid,
            self.slot.map_or("all".to_string(), |s| s.to_string()),
            self.pages,
            if self.logging { "on" } else { "off" },
            mib,
            pages,
            self.samples,
            if self.slot.is_none() {
                ws(0.1)
            } else {
                String::new()
            },
            if self.slot.is_none() {
                ws(1.0)
            } else {
                String::new()
            },
            if self.slot.is_none() {
                ws(10.0)
            } else {
                String::new()
            },
        )
    }
}

/// dirty-rate's columns in `top`: a VM's figures.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "CHANGED",
        width: 9,
        help: "guest memory whose content changed, MiB per second (sampled)",
        unit: Unit::MibPerSecond,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
    Column {
        title: "WS10s",
        width: 6,
        help: "share of guest memory changed within 10 s (writable working set)",
        unit: Unit::Percent,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
];

impl VmRow for DirtyRateRow {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn set_vm(&mut self, name: Option<String>) {
        self.vm = name;
    }

    fn record(&self, out: &mut Output) {
        out.record(self);
    }

    fn value(&self) -> Option<serde_json::Value> {
        let mut with = serde_json::Map::new();
        with.insert("monitor".into(), "dirty_rate".into());
        if let serde_json::Value::Object(mut o) = serde_json::to_value(self).ok()? {
            with.append(&mut o);
        }
        Some(with.into())
    }

    fn line(&self) -> String {
        match self.slot {
            None => {
                let ws: Vec<String> = self
                    .working_set
                    .iter()
                    .map(|w| format!("{:.2}% in {} s", w.share.estimate * 100.0, w.window_s))
                    .collect();
                let mut line = format!("    changed: {}", rate_text(self));
                if !ws.is_empty() {
                    line.push_str(&format!("; working set {}", ws.join(", ")));
                }
                if let Some(m) = &self.migration {
                    line.push_str(&format!("; migration {}", m.text));
                }
                line
            }
            Some(id) => format!(
                "    slot {id} ({} pages, dirty logging {}): {}",
                self.pages,
                if self.logging { "on" } else { "off" },
                rate_text(self)
            ),
        }
    }

    fn top_cells(&self) -> Vec<Cell> {
        if self.slot.is_some() {
            return vec![Cell::Blank, Cell::Blank];
        }
        let ws10 = self
            .working_set
            .iter()
            .find(|w| (w.window_s - 10.0).abs() < 1e-9)
            .map_or(Cell::Blank, |w| Cell::Value(w.share.estimate * 100.0));
        vec![self.rate_mib_per_s.map_or(Cell::Blank, Cell::Value), ws10]
    }
}

#[cfg(test)]
mod tests;
