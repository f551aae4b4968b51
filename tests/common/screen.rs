//! Reading `kvm-watcher top`'s screen as tmux captures it: the refresh
//! time and interval of its header, and its table as rows of cells by
//! column title.

use std::collections::BTreeMap;

use super::tmux::Tmux;

/// The wall-clock time of the refresh on `screen` (header line).
pub fn refresh_time(screen: &str) -> String {
    screen
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}

/// Waits for a refresh after the one on `screen`, and returns it.
pub fn next_refresh(t: &Tmux, screen: &str) -> String {
    let before = refresh_time(screen);
    t.wait_for("a new refresh", |s| {
        let now = refresh_time(s);
        now != before && now.contains(':')
    })
}

/// A row of top's table, its cells by column title.
#[derive(Debug, Clone)]
pub struct Row {
    pub selected: bool,
    pub cells: BTreeMap<String, String>,
}

impl Row {
    pub fn get(&self, title: &str) -> &str {
        self.cells.get(title).map_or("", String::as_str)
    }

    pub fn num(&self, title: &str) -> f64 {
        let v = self.get(title);
        v.parse()
            .unwrap_or_else(|_| panic!("{title} is {v:?}, not a number: {self:?}"))
    }
}

/// The table on `screen`: the columns of its heading line and its rows.
pub fn table(screen: &str) -> (Vec<String>, Vec<Row>) {
    let lines: Vec<Vec<char>> = screen.lines().map(|l| l.chars().collect()).collect();
    let Some(h) = lines.iter().position(|l| {
        let s: String = l.iter().collect();
        s.starts_with("  NAME ") && s.contains(" PID")
    }) else {
        return (Vec::new(), Vec::new());
    };
    let heading = &lines[h];
    // (title, start, end) of each heading word.
    let mut titles: Vec<(String, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < heading.len() {
        if heading[i] == ' ' {
            i += 1;
            continue;
        }
        let start = i;
        while i < heading.len() && heading[i] != ' ' {
            i += 1;
        }
        titles.push((heading[start..i].iter().collect(), start, i));
    }
    // NAME is as wide as the longest VM name needs; PID, right-aligned in 8
    // places after a space, ends where its heading does.
    let name_end = titles.iter().find(|t| t.0 == "PID").map_or(18, |t| t.2 - 9);
    let mut rows = Vec::new();
    for line in &lines[h + 1..] {
        let text: String = line.iter().collect();
        if text.trim().is_empty() || text.starts_with('┌') || text.starts_with(" no KVM VM") {
            break;
        }
        let cut = |a: usize, b: usize| -> String {
            line.get(a.min(line.len())..b.min(line.len()))
                .map(|c| c.iter().collect::<String>().trim().to_string())
                .unwrap_or_default()
        };
        let mut cells = BTreeMap::new();
        let mut prev_end = 1;
        for (title, start, end) in &titles {
            let value = match title.as_str() {
                // Left-aligned: from the heading's start to the next column.
                "NAME" => cut(*start, name_end),
                "VMM" => cut(*start, line.len()),
                _ => cut(prev_end, *end),
            };
            cells.insert(title.clone(), value);
            prev_end = if title == "NAME" { name_end } else { *end };
        }
        rows.push(Row {
            selected: line.first() == Some(&'>'),
            cells,
        });
    }
    (titles.into_iter().map(|t| t.0).collect(), rows)
}

/// The VM row named `name` and its vCPU rows (when expanded).
pub fn vm_rows(rows: &[Row], name: &str) -> Option<(Row, Vec<Row>)> {
    let at = rows.iter().position(|r| {
        let n = r.get("NAME");
        n.len() > 2 && n[2..] == *name
    })?;
    let vcpus = rows[at + 1..]
        .iter()
        .take_while(|r| r.get("NAME").starts_with("vCPU"))
        .cloned()
        .collect();
    Some((rows[at].clone(), vcpus))
}

/// The interval length in top's header.
pub fn interval_of(screen: &str) -> f64 {
    screen
        .lines()
        .next()
        .and_then(|l| l.split("interval ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("the interval in the header")
}

/// Seconds since midnight of a refresh time `HH:MM:SS`.
pub fn seconds_of(time: &str) -> i64 {
    time.split(':')
        .map(|x| x.parse::<i64>().expect("HH:MM:SS"))
        .fold(0, |acc, x| acc * 60 + x)
}
