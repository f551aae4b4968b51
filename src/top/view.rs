//! Drawing a [`State`] with ratatui: three header lines, the table, the
//! detail pane, the status line and the help screen. Text is laid out here
//! as plain strings (so tests read it like a screen capture), styles added
//! on top.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::format;
use super::snapshot::Section;
use super::state::{Col, Line as Row, State};

/// Width of the NAME column: the longest VM name with its expand mark,
/// within these bounds (libvirt, KubeVirt and OpenStack names run long;
/// a longer one is cut with an ellipsis, and the detail pane shows it whole).
const NAME_WIDTH: (usize, usize) = (16, 40);

fn name_width(state: &State) -> usize {
    let longest = state.snapshot.vms.iter().map(|v| v.name.chars().count());
    (longest.max().unwrap_or(0) + 2).clamp(NAME_WIDTH.0, NAME_WIDTH.1)
}

fn width_of(state: &State, col: Col) -> usize {
    match col {
        Col::Name => name_width(state),
        Col::Pid => 8,
        Col::Vcpus => 5,
        Col::Figure(i) => state
            .columns
            .get(i)
            .map_or(6, |c| usize::from(c.column.width)),
        Col::Vmm => 11,
    }
}

/// `s` cut to `w` characters, its last one an ellipsis when cut.
fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(w.saturating_sub(1)).collect();
    if w > 0 {
        cut.push('…');
    }
    cut
}

/// The columns that fit in `width`: NAME and PID always, then the others
/// from [`State::scroll`] on; and whether more are hidden to the right.
pub fn visible_columns(state: &State, width: usize) -> (Vec<Col>, bool) {
    let all = state.screen_columns();
    let mut cols = vec![Col::Name, Col::Pid];
    // The selection mark, then each column after a space.
    let mut used = 1 + 1 + name_width(state) + 1 + width_of(state, Col::Pid);
    let rest: Vec<Col> = all.into_iter().skip(2).collect();
    let start = state.scroll.min(rest.len().saturating_sub(1));
    let mut more = false;
    for &c in &rest[start..] {
        let w = 1 + width_of(state, c);
        if used + w > width {
            more = true;
            break;
        }
        used += w;
        cols.push(c);
    }
    (cols, more)
}

fn cell_text(state: &State, row: &Row, col: Col) -> String {
    let vm = row.vm;
    match (col, row.vcpu) {
        (Col::Name, None) => {
            let mark = if state.expanded.contains(&vm.pid) {
                '-'
            } else {
                '+'
            };
            format!("{mark} {}", vm.name)
        }
        (Col::Name, Some(v)) => match v.vcpu_id {
            Some(id) => format!("  vCPU {id}"),
            None => "  vCPU ?".to_string(),
        },
        (Col::Pid, None) => vm.pid.to_string(),
        (Col::Pid, Some(v)) => v.tid.to_string(),
        (Col::Vcpus, None) => vm.vcpu_count.to_string(),
        (Col::Vcpus, Some(_)) => String::new(),
        (Col::Vmm, None) => vm.vmm.clone(),
        (Col::Vmm, Some(v)) => v.comm.clone(),
        (Col::Figure(i), _) => {
            let Some(c) = state.columns.get(i) else {
                return String::new();
            };
            if !c.running {
                return "-".into();
            }
            let cells = row.vcpu.map_or(&vm.cells, |v| &v.cells);
            cells
                .get(i)
                .map(|cell| format::cell(cell, c.column.unit))
                .unwrap_or_default()
        }
    }
}

fn join(state: &State, cols: &[Col], text: impl Fn(Col) -> String) -> String {
    let mut out = String::new();
    for &c in cols {
        let w = width_of(state, c);
        let t = fit(&text(c), w);
        out.push(' ');
        if matches!(c, Col::Name | Col::Vmm) {
            out.push_str(&format!("{t:<w$}"));
        } else {
            out.push_str(&format!("{t:>w$}"));
        }
    }
    out
}

/// The table's heading and rows as text, `width` wide; the selected row
/// starts with `>`.
pub fn table_text(state: &State, width: usize) -> (String, Vec<(String, bool)>) {
    let (cols, _) = visible_columns(state, width);
    let heading = format!(" {}", join(state, &cols, |c| state.title(c).to_string()));
    let rows = state
        .rows()
        .iter()
        .map(|r| {
            let selected = state.selected == Some(r.key);
            let mut line = format!(" {}", join(state, &cols, |c| cell_text(state, r, c)));
            if selected {
                line.replace_range(..1, ">");
            }
            (line, selected)
        })
        .collect();
    (heading, rows)
}

/// The three header lines.
pub fn header_text(state: &State, width: usize) -> [String; 3] {
    let h = &state.header;
    let first = format!(
        "kvm-watcher top {}  interval {:.3} s  lost {}  own CPU {}  mem {}",
        h.time,
        state.snapshot.interval_ns as f64 / 1e9,
        h.lost,
        h.cpu_percent.map_or("-".into(), |p| format!("{p:.1}%")),
        h.rss.map_or("-".into(), format::mib),
    );
    // Monitors grouped by backend: `tracepoint: wakeup dirty; kprobe: ...`.
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (m, b) in &h.backends {
        match groups.iter_mut().find(|(g, _)| g == b) {
            Some((_, ms)) => ms.push(m),
            None => groups.push((b, vec![m])),
        }
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|(b, ms)| format!("{b}: {}", ms.join(" ")))
        .collect();
    let second = format!("kernel {}  {}", h.kernel, groups.join("; "));
    let arrow = if state.descending { "v" } else { "^" };
    let (cols, more) = visible_columns(state, width);
    let mut third = format!(
        "{}VMs {}  sort {} {arrow}",
        if state.paused { "PAUSED  " } else { "" },
        state.snapshot.vms.len(),
        state.title(state.sort)
    );
    if !state.current_filter().is_empty() {
        third.push_str(&format!("  filter \"{}\"", state.current_filter()));
    }
    if state.scroll > 0 || more {
        let shown = cols.len().saturating_sub(2);
        let total = state.screen_columns().len() - 2;
        let first_shown = state.scroll.min(total.saturating_sub(1)) + 1;
        third.push_str(&format!(
            "  columns {first_shown}-{} of {total} (<- ->)",
            first_shown + shown.saturating_sub(1)
        ));
    }
    third.push_str("  ? help  q quit");
    [first, second, third].map(|l| fit(&l, width))
}

/// The status line: the filter being typed, else warnings and notes.
pub fn status_text(state: &State, width: usize) -> String {
    if let Some(text) = &state.editing {
        return fit(
            &format!("filter by VM name: {text}_  (Enter to keep, Esc to cancel)"),
            width,
        );
    }
    let parts: Vec<&str> = state
        .warnings
        .iter()
        .rev()
        .chain(state.notes.iter())
        .map(String::as_str)
        .collect();
    fit(&parts.join(" | "), width)
}

/// The detail pane's title and lines for the selected row.
pub fn detail_text(state: &State) -> (String, Vec<(String, bool)>) {
    let Some(row) = state.selected_line() else {
        return ("detail".into(), vec![("no row selected".into(), false)]);
    };
    let vm = row.vm;
    let mut sections: Vec<&Section> = Vec::new();
    let title = match row.vcpu {
        Some(v) => {
            sections.extend(&v.sections);
            format!(
                "vCPU {} of {} (tid {}, {})",
                v.vcpu_id.map_or("?".into(), |i| i.to_string()),
                vm.name,
                v.tid,
                v.comm
            )
        }
        None => format!("VM {} (pid {}, {})", vm.name, vm.pid, vm.vmm),
    };
    sections.extend(&vm.sections);
    let mut lines = Vec::new();
    for s in sections {
        lines.push((s.title.clone(), true));
        lines.extend(s.lines.iter().map(|l| (format!("  {l}"), false)));
    }
    if lines.is_empty() {
        let hint = match row.vcpu {
            Some(_) => "no figures of this vCPU in the last interval",
            None => "no per-VM figures; Enter shows its vCPUs, select one for its figures",
        };
        lines.push((hint.into(), false));
    }
    (title, lines)
}

/// The help screen's lines.
pub fn help_text(state: &State) -> Vec<String> {
    let mut lines: Vec<String> = [
        "Keys",
        "  Up/Down PgUp/PgDn Home/End  select a row",
        "  Enter/Space  expand or collapse a VM; on a vCPU, its detail pane",
        "  + / -        expand / collapse every VM",
        "  < / >        sort by the previous / next column;  r  reverse",
        "  Left/Right   scroll the columns",
        "  /            filter by VM name (Enter keeps it, Esc clears it)",
        "  d  detail pane   p  pause   ?  this help   q  Ctrl-C  quit",
        "Columns (- : the monitor does not run here, see the status line)",
        "  VCPUS        vCPUs of the VM",
    ]
    .map(String::from)
    .to_vec();
    for c in &state.columns {
        lines.push(format!(
            "  {:<12} {}: {}",
            c.column.title,
            c.monitor.name(),
            c.column.help
        ));
    }
    lines.push("  VMM          the VMM (for a vCPU: its thread's name)".into());
    lines
}

fn styled(lines: Vec<(String, bool)>, style: Style) -> Vec<Line<'static>> {
    lines
        .into_iter()
        .map(|(t, on)| {
            if on {
                Line::from(Span::styled(t, style))
            } else {
                Line::from(t)
            }
        })
        .collect()
}

/// Draws the whole screen; sets [`State::page`] to the rows the table holds.
pub fn draw(frame: &mut Frame, state: &mut State) {
    let area = frame.area();
    let width = usize::from(area.width);
    let detail = state.detail.then(|| detail_text(state));
    // The pane gets what the table does not need, and at least half.
    let free = area.height.saturating_sub(3 + 1);
    let table_needs = state.rows().len() as u16 + 2;
    let detail_height = detail.as_ref().map_or(0, |(_, l)| {
        let room = free.saturating_sub(table_needs).max(free / 2);
        (l.len() as u16 + 2).min(room)
    });
    let [head, table, pane, status] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(2),
        Constraint::Length(detail_height),
        Constraint::Length(1),
    ])
    .areas(area);
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let header = header_text(state, width);
    frame.render_widget(Paragraph::new(header.map(Line::from).to_vec()), head);
    draw_table(frame, state, table, width);
    if let Some((title, lines)) = detail {
        let block = Block::bordered().title(Span::styled(format!(" {title} "), bold));
        frame.render_widget(Paragraph::new(styled(lines, bold)).block(block), pane);
    }
    frame.render_widget(Paragraph::new(status_text(state, width)), status);
    if state.help {
        draw_help(frame, state, area);
    }
}

fn draw_table(frame: &mut Frame, state: &mut State, area: Rect, width: usize) {
    let (heading, rows) = table_text(state, width);
    let body = usize::from(area.height.saturating_sub(1));
    state.page = body.max(1);
    let at = state.selected_index().unwrap_or(0);
    // Keep the selected row on screen.
    let first = at.saturating_sub(body.saturating_sub(1));
    let reversed = Style::default().add_modifier(Modifier::REVERSED);
    let mut lines = vec![Line::from(Span::styled(
        format!("{heading:<width$}"),
        reversed,
    ))];
    lines.extend(styled(
        rows.into_iter()
            .skip(first)
            .take(body)
            .map(|(t, sel)| (format!("{t:<width$}"), sel))
            .collect(),
        reversed,
    ));
    if state.snapshot.vms.is_empty() {
        lines.push(Line::from(" no KVM VM is running (waiting for one)"));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_help(frame: &mut Frame, state: &mut State, area: Rect) {
    let lines = help_text(state);
    let w = lines
        .iter()
        .map(|l| l.chars().count() as u16 + 2)
        .max()
        .unwrap_or(20)
        .min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let rect = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    frame.render_widget(Clear, rect);
    // Taller than the screen: the moving keys scroll it.
    let shown = usize::from(h.saturating_sub(2));
    let hidden = lines.len().saturating_sub(shown);
    state.help_scroll = state.help_scroll.min(hidden);
    let title = if hidden > 0 {
        format!(
            " help (? or Esc to close; Up/Down scroll, {}-{} of {}) ",
            state.help_scroll + 1,
            state.help_scroll + shown,
            lines.len()
        )
    } else {
        " help (? or Esc to close) ".to_string()
    };
    let block = Block::bordered().title(title);
    frame.render_widget(
        Paragraph::new(
            lines
                .into_iter()
                .skip(state.help_scroll)
                .map(Line::from)
                .collect::<Vec<_>>(),
        )
        .block(block),
        rect,
    );
}

#[cfg(test)]
mod tests;
