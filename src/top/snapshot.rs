//! One refresh of `top`, with no terminal and no kernel: the VMs running now
//! (from /proc) and the interval the monitors just closed, put together into
//! a row per VM and per vCPU with a cell per column.

use std::collections::BTreeMap;

use crate::monitors::{Cell, Column, Figures, Monitor, Part, VmRule};
use crate::procfs::VmProcess;

/// A column of figures: which monitor fills it, and whether it runs.
#[derive(Clone, Debug)]
pub struct FigureColumn {
    /// The monitor that declares it.
    pub monitor: &'static dyn Monitor,
    /// Its place among the monitor's columns.
    pub index: usize,
    /// The column.
    pub column: &'static Column,
    /// Whether the monitor runs (a column of one that does not shows a dash).
    pub running: bool,
}

impl FigureColumn {
    /// Every column of `monitors`, in their order; `running` says which run.
    pub fn all(
        monitors: &[&'static dyn Monitor],
        running: impl Fn(&dyn Monitor) -> bool,
    ) -> Vec<FigureColumn> {
        monitors
            .iter()
            .flat_map(|&m| {
                let on = running(m);
                m.top_columns()
                    .iter()
                    .enumerate()
                    .map(move |(index, column)| FigureColumn {
                        monitor: m,
                        index,
                        column,
                        running: on,
                    })
            })
            .collect()
    }
}

/// A titled group of lines in the detail pane (one per monitor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The monitor's name, or its per-VM title.
    pub title: String,
    /// Its lines, without their common indentation.
    pub lines: Vec<String>,
}

/// A vCPU thread's row.
#[derive(Clone, Debug)]
pub struct VcpuRow {
    /// The thread.
    pub tid: u32,
    /// Its vCPU id, if known.
    pub vcpu_id: Option<u32>,
    /// Its name.
    pub comm: String,
    /// One cell per figure column.
    pub cells: Vec<Cell>,
    /// The monitors' summary lines of it.
    pub sections: Vec<Section>,
}

/// A VM's row.
#[derive(Clone, Debug)]
pub struct VmRow {
    /// The VMM process.
    pub pid: u32,
    /// The VM's name.
    pub name: String,
    /// Which VMM runs it.
    pub vmm: String,
    /// vCPUs it has (vCPU file descriptors).
    pub vcpu_count: usize,
    /// One cell per figure column.
    pub cells: Vec<Cell>,
    /// The monitors' per-VM lines (e.g. its memslots).
    pub sections: Vec<Section>,
    /// Its vCPU threads, by vCPU id then thread id.
    pub vcpus: Vec<VcpuRow>,
}

/// Everything one refresh shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The interval's length, ns (0 before the first one).
    pub interval_ns: u64,
    /// The VMs, by pid.
    pub vms: Vec<VmRow>,
}

/// Replaces control characters (from a VM's command line, a thread name or
/// a warning) so nothing reaches the terminal raw.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `lines` without the indentation they all share.
fn dedent(lines: Vec<String>) -> Vec<String> {
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .into_iter()
        .map(|l| clean(l.get(indent..).unwrap_or(l.trim_start())))
        .collect()
}

/// The VMs to show: those running now, and those shown last time that have
/// exited but still have figures in this interval (their last ones; a VMM
/// can close its VM before its vCPU threads end), with `exited` as their VMM.
pub fn with_exited(
    mut now: Vec<VmProcess>,
    before: &[VmProcess],
    parts: &[(&'static dyn Monitor, Part)],
) -> Vec<VmProcess> {
    let seen = |pid: u32| {
        parts.iter().any(|(_, p)| {
            p.vcpus.iter().any(|v| v.thread.pid == pid) || p.vm_rows.iter().any(|r| r.pid() == pid)
        })
    };
    for vm in before {
        if !now.iter().any(|v| v.pid == vm.pid) && seen(vm.pid) {
            now.push(VmProcess {
                vmm: "exited".into(),
                ..vm.clone()
            });
        }
    }
    now.sort_by_key(|v| v.pid);
    now
}

/// A vCPU while it is being put together: per running monitor, the
/// figures it has of it.
struct Building<'a> {
    row: VcpuRow,
    figures: Vec<Option<&'a dyn Figures>>,
}

/// The refresh of `interval_ns` from the VMs in `vms` and the monitors'
/// `parts` of the interval (monitors in `parts` are the running ones).
pub fn build(
    columns: &[FigureColumn],
    parts: &[(&'static dyn Monitor, Part)],
    interval_ns: u64,
    vms: &[VmProcess],
) -> Snapshot {
    let slot = |m: &dyn Monitor| parts.iter().position(|(p, _)| p.name() == m.name());
    // vCPU threads by (pid, tid): those /proc shows, then those the monitors saw.
    let mut threads: BTreeMap<(u32, u32), Building> = BTreeMap::new();
    for vm in vms {
        for t in &vm.vcpu_threads {
            threads.insert(
                (vm.pid, t.tid),
                Building {
                    row: VcpuRow {
                        tid: t.tid,
                        vcpu_id: t.vcpu_id,
                        comm: clean(&t.comm),
                        cells: Vec::new(),
                        sections: Vec::new(),
                    },
                    figures: vec![None; parts.len()],
                },
            );
        }
    }
    let alive = |pid: u32| vms.iter().any(|v| v.pid == pid);
    for (i, (_, part)) in parts.iter().enumerate() {
        // Annotations only fill in what the monitor's own figures left out.
        for (v, own) in part
            .vcpus
            .iter()
            .map(|v| (v, true))
            .chain(part.annotations.iter().map(|v| (v, false)))
        {
            let t = &v.thread;
            if !alive(t.pid) {
                continue;
            }
            let b = threads.entry((t.pid, t.tid)).or_insert_with(|| Building {
                row: VcpuRow {
                    tid: t.tid,
                    vcpu_id: t.vcpu_id,
                    comm: clean(&t.comm),
                    cells: Vec::new(),
                    sections: Vec::new(),
                },
                figures: vec![None; parts.len()],
            });
            if b.row.vcpu_id.is_none() {
                b.row.vcpu_id = t.vcpu_id;
            }
            if own || b.figures[i].is_none() {
                b.figures[i] = Some(v.figures.as_ref());
            }
        }
    }
    let mut rows: BTreeMap<u32, Vec<VcpuRow>> = BTreeMap::new();
    for ((pid, _), b) in threads {
        let mut row = b.row;
        for (i, f) in b.figures.iter().enumerate() {
            if let Some(f) = f {
                let lines = dedent(f.lines(interval_ns));
                if !lines.is_empty() {
                    row.sections.push(Section {
                        title: parts[i].0.name().to_string(),
                        lines,
                    });
                }
            }
        }
        let cells_of: Vec<Option<Vec<Cell>>> = b
            .figures
            .iter()
            .map(|f| f.map(|f| f.top_cells(interval_ns)))
            .collect();
        row.cells = columns
            .iter()
            .map(|c| match slot(c.monitor) {
                None => Cell::Blank,
                Some(_) if c.column.vm == VmRule::Rows => Cell::Blank,
                Some(s) => match &cells_of[s] {
                    Some(cells) => cells.get(c.index).cloned().unwrap_or(Cell::Blank),
                    None => c.column.idle.clone(),
                },
            })
            .collect();
        rows.entry(pid).or_default().push(row);
    }
    let mut out = Vec::new();
    for vm in vms {
        let mut vcpus = rows.remove(&vm.pid).unwrap_or_default();
        vcpus.sort_by_key(|v| (v.vcpu_id.is_none(), v.vcpu_id, v.tid));
        let mut sections = Vec::new();
        let mut row_cells: Vec<Vec<Cell>> = vec![Vec::new(); parts.len()];
        for (i, (_, part)) in parts.iter().enumerate() {
            let mine: Vec<_> = part.vm_rows.iter().filter(|r| r.pid() == vm.pid).collect();
            for r in &mine {
                let cells = r.top_cells();
                if row_cells[i].is_empty() {
                    row_cells[i] = vec![Cell::Blank; cells.len()];
                }
                for (sum, c) in row_cells[i].iter_mut().zip(cells) {
                    *sum = add(sum, &c);
                }
            }
            if !mine.is_empty() {
                let title = part.vm_title.trim().trim_end_matches(':');
                sections.push(Section {
                    title: title.to_string(),
                    lines: dedent(mine.iter().map(|r| r.line()).collect()),
                });
            }
        }
        let cells = columns
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let Some(s) = slot(c.monitor) else {
                    return Cell::Blank;
                };
                let of_vcpus = vcpus.iter().map(|v| &v.cells[k]);
                match c.column.vm {
                    VmRule::Sum => of_vcpus.fold(Cell::Blank, |a, b| add(&a, b)),
                    VmRule::Mean => mean(of_vcpus),
                    VmRule::Max => of_vcpus.fold(Cell::Blank, max),
                    VmRule::Blank => Cell::Blank,
                    // A running monitor that saw no rows of this VM saw nothing.
                    VmRule::Rows => row_cells[s]
                        .get(c.index)
                        .cloned()
                        .unwrap_or(Cell::Value(0.0)),
                }
            })
            .collect();
        out.push(VmRow {
            pid: vm.pid,
            name: clean(&vm.display()),
            vmm: clean(&vm.vmm),
            vcpu_count: vm.vcpu_ids.len(),
            cells,
            sections,
            vcpus,
        });
    }
    Snapshot {
        interval_ns,
        vms: out,
    }
}

/// The sum of two cells (shares add parts and wholes; text does not add up).
fn add(a: &Cell, b: &Cell) -> Cell {
    match (a, b) {
        (Cell::Blank, x) | (x, Cell::Blank) => match x {
            Cell::Text(_) => Cell::Blank,
            x => x.clone(),
        },
        (Cell::Value(x), Cell::Value(y)) => Cell::Value(x + y),
        (
            Cell::Share { part, whole },
            Cell::Share {
                part: p2,
                whole: w2,
            },
        ) => Cell::Share {
            part: part + p2,
            whole: whole + w2,
        },
        _ => Cell::Blank,
    }
}

fn max(a: Cell, b: &Cell) -> Cell {
    match (a.number(), b.number()) {
        (_, None) => a,
        (Some(x), Some(y)) if x >= y => a,
        _ => Cell::Value(b.number().unwrap_or(0.0)),
    }
}

fn mean<'a>(cells: impl Iterator<Item = &'a Cell>) -> Cell {
    let numbers: Vec<f64> = cells.filter_map(Cell::number).collect();
    if numbers.is_empty() {
        Cell::Blank
    } else {
        Cell::Value(numbers.iter().sum::<f64>() / numbers.len() as f64)
    }
}

#[cfg(test)]
mod tests;
