//! What `top` shows and how keys change it, with no terminal: the latest
//! refresh, the sort column and order, the name filter, which VMs are
//! expanded, the selected row, the detail pane, help and pause.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use super::snapshot::{FigureColumn, Snapshot, VcpuRow, VmRow};
use crate::monitors::Cell;

/// A column of the table, in screen order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Col {
    /// The VM's name; `vCPU n` for a vCPU.
    Name,
    /// The VMM's pid; the thread id for a vCPU.
    Pid,
    /// The VM's vCPUs.
    Vcpus,
    /// A monitor's column (index into [`State::columns`]).
    Figure(usize),
    /// Which VMM runs the VM.
    Vmm,
}

/// A key, as `top` reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    Left,
    Right,
    Enter,
    Esc,
    Backspace,
    /// Ctrl-C.
    Interrupt,
    Char(char),
}

/// A row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowKey {
    /// A VM, by pid.
    Vm(u32),
    /// A vCPU thread: pid, tid.
    Vcpu(u32, u32),
}

/// A visible row: its VM, and its vCPU for a vCPU row.
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    pub key: RowKey,
    pub vm: &'a VmRow,
    pub vcpu: Option<&'a VcpuRow>,
}

/// The header's figures.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Wall-clock time of the refresh shown (HH:MM:SS).
    pub time: String,
    /// The kernel release.
    pub kernel: String,
    /// Running monitors and their backends.
    pub backends: Vec<(&'static str, &'static str)>,
    /// Events lost so far.
    pub lost: u64,
    /// kvm-watcher's own CPU use over the last interval, % of one CPU.
    pub cpu_percent: Option<f64>,
    /// kvm-watcher's resident memory, bytes.
    pub rss: Option<u64>,
}

/// CPU use from two readings of the CPU time used so far.
#[derive(Default)]
pub struct CpuMeter {
    last: Option<(f64, f64)>,
}

impl CpuMeter {
    /// Takes a reading (`cpu_s` CPU seconds used at `wall_s`) and returns the
    /// use since the last one, in % of one CPU.
    pub fn sample(&mut self, cpu_s: f64, wall_s: f64) -> Option<f64> {
        let prev = self.last.replace((cpu_s, wall_s))?;
        let wall = wall_s - prev.1;
        (wall > 0.0).then(|| (cpu_s - prev.0).max(0.0) * 100.0 / wall)
    }
}

/// Everything the screen shows.
pub struct State {
    /// The monitors' columns.
    pub columns: Vec<FigureColumn>,
    /// The refresh shown.
    pub snapshot: Snapshot,
    /// The header's figures.
    pub header: Header,
    /// Lines for the status line that stay (e.g. monitors that cannot run).
    pub notes: Vec<String>,
    /// The latest warnings, newest last.
    pub warnings: Vec<String>,
    /// The sort column and order.
    pub sort: Col,
    pub descending: bool,
    /// The name filter in force, and the one being typed.
    pub filter: String,
    pub editing: Option<String>,
    /// Expanded VMs, by pid.
    pub expanded: BTreeSet<u32>,
    /// The selected row.
    pub selected: Option<RowKey>,
    /// Which panes are up.
    pub detail: bool,
    pub help: bool,
    /// The first help line on screen, when the help is taller than the screen.
    pub help_scroll: usize,
    /// New refreshes are not shown.
    pub paused: bool,
    /// The first scrollable column on screen (after NAME and PID).
    pub scroll: usize,
    /// Rows a page holds (the view sets it).
    pub page: usize,
}

/// How many warnings the status line keeps.
const WARNINGS_KEPT: usize = 3;

fn cmp_cells(a: &Cell, b: &Cell, descending: bool) -> Ordering {
    match (a.number(), b.number()) {
        (Some(x), Some(y)) => {
            let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
            if descending { o.reverse() } else { o }
        }
        // Rows without a figure go last either way.
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => match (a, b) {
            (Cell::Text(x), Cell::Text(y)) if descending => y.cmp(x),
            (Cell::Text(x), Cell::Text(y)) => x.cmp(y),
            _ => Ordering::Equal,
        },
    }
}

impl State {
    /// A screen for `columns`, before any refresh.
    pub fn new(columns: Vec<FigureColumn>, header: Header, notes: Vec<String>) -> Self {
        State {
            columns,
            snapshot: Snapshot::default(),
            header,
            notes,
            warnings: Vec::new(),
            sort: Col::Name,
            descending: false,
            filter: String::new(),
            editing: None,
            expanded: BTreeSet::new(),
            selected: None,
            detail: false,
            help: false,
            help_scroll: 0,
            paused: false,
            scroll: 0,
            page: 10,
        }
    }

    /// Every column in screen order.
    pub fn screen_columns(&self) -> Vec<Col> {
        let mut cols = vec![Col::Name, Col::Pid, Col::Vcpus];
        cols.extend((0..self.columns.len()).map(Col::Figure));
        cols.push(Col::Vmm);
        cols
    }

    /// A column's heading.
    pub fn title(&self, col: Col) -> &'static str {
        match col {
            Col::Name => "NAME",
            Col::Pid => "PID",
            Col::Vcpus => "VCPUS",
            Col::Figure(i) => self.columns.get(i).map_or("?", |c| c.column.title),
            Col::Vmm => "VMM",
        }
    }

    /// Shows a new refresh (unless paused), keeping the selection on the
    /// same row, or at the same place if that row has gone.
    pub fn refresh(&mut self, snapshot: Snapshot) {
        if self.paused {
            return;
        }
        let at = self.selected_index();
        self.snapshot = snapshot;
        let pids: BTreeSet<u32> = self.snapshot.vms.iter().map(|v| v.pid).collect();
        self.expanded.retain(|p| pids.contains(p));
        self.reselect(at);
    }

    /// Adds warnings to the status line.
    pub fn warn(&mut self, new: Vec<String>) {
        self.warnings
            .extend(new.iter().map(|w| super::snapshot::clean(w)));
        let extra = self.warnings.len().saturating_sub(WARNINGS_KEPT);
        self.warnings.drain(..extra);
    }

    /// The filter in force (the one being typed, while it is).
    pub fn current_filter(&self) -> &str {
        self.editing.as_deref().unwrap_or(&self.filter)
    }

    fn vm_order(&self, a: &VmRow, b: &VmRow) -> Ordering {
        let by_name = || a.name.to_lowercase().cmp(&b.name.to_lowercase());
        let o = match self.sort {
            Col::Name => by_name(),
            Col::Pid => a.pid.cmp(&b.pid),
            Col::Vcpus => a.vcpu_count.cmp(&b.vcpu_count),
            Col::Vmm => a.vmm.cmp(&b.vmm),
            Col::Figure(i) => {
                return cmp_cells(&a.cells[i], &b.cells[i], self.descending)
                    .then_with(by_name)
                    .then(a.pid.cmp(&b.pid));
            }
        };
        let o = if self.descending { o.reverse() } else { o };
        o.then_with(by_name).then(a.pid.cmp(&b.pid))
    }

    fn vcpu_order(&self, a: &VcpuRow, b: &VcpuRow) -> Ordering {
        let by_id = || {
            (a.vcpu_id.is_none(), a.vcpu_id, a.tid).cmp(&(b.vcpu_id.is_none(), b.vcpu_id, b.tid))
        };
        match self.sort {
            Col::Figure(i) => cmp_cells(&a.cells[i], &b.cells[i], self.descending).then_with(by_id),
            Col::Pid if self.descending => b.tid.cmp(&a.tid),
            Col::Pid => a.tid.cmp(&b.tid),
            _ if self.descending => by_id().reverse(),
            _ => by_id(),
        }
    }

    /// The rows on screen: VMs that pass the filter, sorted, each expanded
    /// one followed by its vCPUs.
    pub fn rows(&self) -> Vec<Line<'_>> {
        let filter = self.current_filter().to_lowercase();
        let mut vms: Vec<&VmRow> = self
            .snapshot
            .vms
            .iter()
            .filter(|v| filter.is_empty() || v.name.to_lowercase().contains(&filter))
            .collect();
        vms.sort_by(|a, b| self.vm_order(a, b));
        let mut out = Vec::new();
        for vm in vms {
            out.push(Line {
                key: RowKey::Vm(vm.pid),
                vm,
                vcpu: None,
            });
            if self.expanded.contains(&vm.pid) {
                let mut vcpus: Vec<&VcpuRow> = vm.vcpus.iter().collect();
                vcpus.sort_by(|a, b| self.vcpu_order(a, b));
                out.extend(vcpus.into_iter().map(|v| Line {
                    key: RowKey::Vcpu(vm.pid, v.tid),
                    vm,
                    vcpu: Some(v),
                }));
            }
        }
        out
    }

    /// The selected row's place among [`State::rows`].
    pub fn selected_index(&self) -> Option<usize> {
        let rows = self.rows();
        self.selected
            .and_then(|k| rows.iter().position(|r| r.key == k))
    }

    /// The selected row, if it is on screen.
    pub fn selected_line(&self) -> Option<Line<'_>> {
        let k = self.selected?;
        self.rows().into_iter().find(|r| r.key == k)
    }

    /// Selects the row that is there now, or the one at `at` (the last if
    /// fewer are left), or the first.
    fn reselect(&mut self, at: Option<usize>) {
        let rows = self.rows();
        if let Some(k) = self.selected
            && rows.iter().any(|r| r.key == k)
        {
            return;
        }
        let i = at.unwrap_or(0).min(rows.len().saturating_sub(1));
        self.selected = rows.get(i).map(|r| r.key);
    }

    fn move_by(&mut self, delta: isize) {
        let n = self.rows().len();
        if n == 0 {
            self.selected = None;
            return;
        }
        let at = self.selected_index().unwrap_or(0) as isize;
        let to = (at + delta).clamp(0, n as isize - 1) as usize;
        self.selected = self.rows().get(to).map(|r| r.key);
    }

    fn toggle(&mut self) {
        match self.selected {
            Some(RowKey::Vm(pid)) if !self.expanded.remove(&pid) => {
                self.expanded.insert(pid);
            }
            Some(RowKey::Vm(_)) => {}
            Some(RowKey::Vcpu(..)) => self.detail = !self.detail,
            None => {}
        }
    }

    fn collapse_all(&mut self) {
        self.expanded.clear();
        if let Some(RowKey::Vcpu(pid, _)) = self.selected {
            self.selected = Some(RowKey::Vm(pid));
        }
    }

    fn sort_by(&mut self, step: isize) {
        let cols = self.screen_columns();
        let at = cols.iter().position(|c| *c == self.sort).unwrap_or(0) as isize;
        let n = cols.len() as isize;
        self.sort = cols[((at + step).rem_euclid(n)) as usize];
        // Figures sort busiest first; names, pids and VMMs in order.
        self.descending = matches!(self.sort, Col::Figure(_) | Col::Vcpus);
    }

    /// Handles a key; true when it asks to quit.
    pub fn key(&mut self, key: Key) -> bool {
        if key == Key::Interrupt {
            return true;
        }
        if let Some(text) = &mut self.editing {
            match key {
                Key::Char(c) => text.push(c),
                Key::Backspace => {
                    text.pop();
                }
                Key::Enter => self.filter = self.editing.take().unwrap_or_default(),
                Key::Esc => self.editing = None,
                _ => {}
            }
            self.reselect(None);
            return false;
        }
        let page = self.page.max(1) as isize;
        // While the help is up, the moving keys scroll it (the view keeps
        // the offset within the help's length).
        if self.help {
            let step = match key {
                Key::Up | Key::Char('k') => Some(-1),
                Key::Down | Key::Char('j') => Some(1),
                Key::PageUp => Some(-page),
                Key::PageDown => Some(page),
                Key::Home => Some(isize::MIN / 2),
                Key::End => Some(isize::MAX / 2),
                _ => None,
            };
            if let Some(step) = step {
                let at = (self.help_scroll as isize).saturating_add(step);
                self.help_scroll = at.clamp(0, isize::MAX / 2) as usize;
                return false;
            }
        }
        match key {
            Key::Char('q') => return true,
            Key::Char('?') | Key::Char('h') => {
                self.help = !self.help;
                self.help_scroll = 0;
            }
            Key::Esc if self.help => self.help = false,
            Key::Esc if self.detail => self.detail = false,
            Key::Esc => self.filter.clear(),
            Key::Up | Key::Char('k') => self.move_by(-1),
            Key::Down | Key::Char('j') => self.move_by(1),
            Key::PageUp => self.move_by(-page),
            Key::PageDown => self.move_by(page),
            Key::Home => self.move_by(isize::MIN / 2),
            Key::End => self.move_by(isize::MAX / 2),
            Key::Left => self.scroll = self.scroll.saturating_sub(1),
            Key::Right => self.scroll = (self.scroll + 1).min(self.columns.len() + 1),
            Key::Enter | Key::Char(' ') => self.toggle(),
            Key::Char('+') => {
                self.expanded = self.snapshot.vms.iter().map(|v| v.pid).collect();
            }
            Key::Char('-') => self.collapse_all(),
            Key::Char('d') => self.detail = !self.detail,
            Key::Char('p') => self.paused = !self.paused,
            Key::Char('>') | Key::Char('s') => self.sort_by(1),
            Key::Char('<') => self.sort_by(-1),
            Key::Char('r') => self.descending = !self.descending,
            Key::Char('/') => self.editing = Some(self.filter.clone()),
            _ => return false,
        }
        self.reselect(None);
        false
    }
}

#[cfg(test)]
mod tests;
