//! What watches the guest in each condition of the guest tax: nothing, each
//! monitor alone (summary and rows), the default set (`serve`, and `watch
//! --rows`), and bpftrace doing the default set's jobs (part 6's script).

use anyhow::Result;

use crate::bpftrace::{BT_SERVE_SET, BtScript};
use crate::env::Env;
use crate::process::Proc;

/// How a condition's watcher is started.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    None,
    /// `kvm-watcher serve` with its default monitors.
    Serve,
    /// `kvm-watcher <args>` (output to /dev/null).
    Kw(&'static [&'static str]),
    Bpftrace(&'static BtScript),
}

#[derive(Clone, Copy, Debug)]
pub struct Cond {
    /// "dirty", ..., or "default set".
    pub monitor: &'static str,
    /// "summary", "rows" or "counts" (bpftrace).
    pub mode: &'static str,
    pub tool: Tool,
}

/// The default set (every monitor but dirty-rate), as its own label.
pub const DEFAULT_SET: &str = "default set";

const fn kw(monitor: &'static str, mode: &'static str, args: &'static [&'static str]) -> Cond {
    Cond {
        monitor,
        mode,
        tool: Tool::Kw(args),
    }
}

/// Every condition, the unwatched one first.
pub const ALL: &[Cond] = &[
    Cond {
        monitor: "none",
        mode: "",
        tool: Tool::None,
    },
    Cond {
        monitor: DEFAULT_SET,
        mode: "summary",
        tool: Tool::Serve,
    },
    kw(
        DEFAULT_SET,
        "rows",
        &["watch", "--rows", "--output", "json"],
    ),
    Cond {
        monitor: DEFAULT_SET,
        mode: "counts",
        tool: Tool::Bpftrace(&BT_SERVE_SET),
    },
    kw(
        "dirty",
        "summary",
        &["watch", "-d", "-i", "1", "--output", "json"],
    ),
    kw(
        "dirty",
        "rows",
        &["watch", "-d", "--rows", "--output", "json"],
    ),
    kw(
        "wakeup",
        "summary",
        &["watch", "-w", "-i", "1", "--output", "json"],
    ),
    kw(
        "wakeup",
        "rows",
        &["watch", "-w", "--rows", "--output", "json"],
    ),
    kw(
        "halt-poll",
        "summary",
        &["watch", "-n", "-i", "1", "--output", "json"],
    ),
    kw(
        "halt-poll",
        "rows",
        &["watch", "-n", "--rows", "--output", "json"],
    ),
    kw(
        "vcpu-load",
        "summary",
        &["watch", "-o", "-i", "1", "--output", "json"],
    ),
    kw(
        "vcpu-load",
        "rows",
        &["watch", "-o", "--rows", "--output", "json"],
    ),
    kw(
        "run-delay",
        "summary",
        &["watch", "-r", "-i", "1", "--output", "json"],
    ),
    kw(
        "run-delay",
        "rows",
        &["watch", "-r", "--rows", "--output", "json"],
    ),
    kw(
        "exits",
        "summary",
        &["watch", "-e", "-i", "1", "--output", "json"],
    ),
    kw(
        "exits",
        "rows",
        &["watch", "-e", "--rows", "--output", "json"],
    ),
];

/// The conditions of a `--quick` run: nothing, the default set three ways
/// and one monitor alone both ways.
pub fn quick() -> Vec<Cond> {
    ALL.iter()
        .copied()
        .filter(|c| {
            matches!(c.monitor, "none" | DEFAULT_SET)
                || (c.monitor == "dirty" && c.mode != "counts")
        })
        .collect()
}

impl Cond {
    pub fn is_none(&self) -> bool {
        matches!(self.tool, Tool::None)
    }

    pub fn tool(&self) -> &'static str {
        match self.tool {
            Tool::None => "nothing",
            Tool::Serve | Tool::Kw(_) => "kvm-watcher",
            Tool::Bpftrace(_) => "bpftrace",
        }
    }

    /// "dirty summary", "default set rows", "bpftrace default set", "none".
    pub fn name(&self) -> String {
        match self.tool {
            Tool::None => "none".into(),
            Tool::Bpftrace(_) => format!("bpftrace {}", self.monitor),
            _ => format!("{} {}", self.monitor, self.mode),
        }
    }

    /// The command line, for the JSON.
    pub fn command(&self) -> String {
        match self.tool {
            Tool::None => String::new(),
            Tool::Serve => "kvm-watcher serve --listen 127.0.0.1:PORT".into(),
            Tool::Kw(a) => format!("kvm-watcher {}", a.join(" ")),
            Tool::Bpftrace(s) => format!("bpftrace -e '{}'", s.text.replace('\n', " ")),
        }
    }

    /// Starts the watcher, ready once its programs are attached (None: nothing).
    pub fn start(&self, env: &Env) -> Result<Option<Proc>> {
        Ok(match self.tool {
            Tool::None => None,
            Tool::Serve => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                Some(env.start_serve(port)?)
            }
            Tool::Kw(a) => Some(env.start_kw(&self.name(), a)?),
            Tool::Bpftrace(s) => Some(env.start_bt(&format!("bt_{}", self.monitor), s)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_monitor_has_summary_and_rows_the_default_set_bpftrace_too() {
        assert!(ALL[0].is_none(), "the unwatched condition comes first");
        let monitors: Vec<&str> = ALL.iter().skip(1).map(|c| c.monitor).collect();
        for m in [
            DEFAULT_SET,
            "dirty",
            "wakeup",
            "halt-poll",
            "vcpu-load",
            "run-delay",
            "exits",
        ] {
            for mode in ["summary", "rows"] {
                assert_eq!(
                    ALL.iter()
                        .filter(|c| c.monitor == m && c.mode == mode)
                        .count(),
                    1,
                    "{m} {mode}"
                );
            }
            let n = if m == DEFAULT_SET { 3 } else { 2 };
            assert_eq!(monitors.iter().filter(|&&x| x == m).count(), n, "{m}");
        }
        let names: std::collections::BTreeSet<String> = ALL.iter().map(Cond::name).collect();
        assert_eq!(names.len(), ALL.len(), "names are unique: {names:?}");
    }

    #[test]
    fn rows_stream_and_summaries_do_not() {
        for c in ALL {
            if let Tool::Kw(a) = c.tool {
                assert_eq!(a.contains(&"--rows"), c.mode == "rows", "{}", c.name());
                assert_eq!(a[0], "watch");
            }
        }
        let q = quick();
        assert!(q[0].is_none());
        assert!(q.iter().any(|c| matches!(c.tool, Tool::Serve)));
        assert!(q.iter().any(|c| matches!(c.tool, Tool::Bpftrace(_))));
        assert!(q.len() < ALL.len());
    }
}
