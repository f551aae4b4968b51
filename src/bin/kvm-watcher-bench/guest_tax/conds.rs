//! What watches the guest in each condition of the guest tax: nothing, each
//! monitor alone (summary and rows) and bpftrace doing that monitor's job
//! (part 1's counting script), the default set (`serve`, and `watch
//! --rows`) and bpftrace doing the default set's jobs (part 6's script).

use anyhow::Result;

use crate::bpftrace::{
    BT_DIRTY_COUNT, BT_EXITS_COUNT, BT_HALT_POLL_COUNT, BT_RUN_DELAY, BT_SERVE_SET, BT_VCPU_LOAD,
    BT_WAKEUP_COUNT, BtScript,
};
use crate::env::Env;
use crate::process::Proc;

/// How a condition's watcher is started.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    None,
    /// `kvm-watcher serve` with its default monitors.
    Serve,
    /// `kvm-watcher watch [FLAG] [--rows]` (output to /dev/null): one
    /// monitor by its flag, or the default set without one.
    Watch {
        flag: Option<&'static str>,
        rows: bool,
    },
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

/// Each monitor of the default set, its flag in `watch`, and bpftrace
/// doing its summary's job (the script part 1 holds it against).
const MONITORS: [(&str, &str, &BtScript); 6] = [
    ("dirty", "-d", &BT_DIRTY_COUNT),
    ("wakeup", "-w", &BT_WAKEUP_COUNT),
    ("halt-poll", "-n", &BT_HALT_POLL_COUNT),
    ("vcpu-load", "-o", &BT_VCPU_LOAD),
    ("run-delay", "-r", &BT_RUN_DELAY),
    ("exits", "-e", &BT_EXITS_COUNT),
];

fn bpftrace(monitor: &'static str, script: &'static BtScript) -> Cond {
    Cond {
        monitor,
        mode: "counts",
        tool: Tool::Bpftrace(script),
    }
}

fn watch(monitor: &'static str, flag: Option<&'static str>, rows: bool) -> Cond {
    Cond {
        monitor,
        mode: if rows { "rows" } else { "summary" },
        tool: Tool::Watch { flag, rows },
    }
}

/// Every condition, the unwatched one first: the default set as `serve`,
/// as `watch --rows` and as bpftrace, then each monitor in summary and
/// rows and bpftrace doing its job.
pub fn all() -> Vec<Cond> {
    let mut v = vec![
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
        watch(DEFAULT_SET, None, true),
        bpftrace(DEFAULT_SET, &BT_SERVE_SET),
    ];
    for (m, flag, script) in MONITORS {
        v.push(watch(m, Some(flag), false));
        v.push(watch(m, Some(flag), true));
        v.push(bpftrace(m, script));
    }
    v
}

/// `monitor` (as in [`MONITORS`]) alone in summary mode.
pub fn summary_of(monitor: &str) -> Option<Cond> {
    all()
        .into_iter()
        .find(|c| c.monitor == monitor && c.mode == "summary")
}

/// The conditions of a `--quick` run: nothing, the default set three ways
/// and one monitor alone three ways.
pub fn quick() -> Vec<Cond> {
    all()
        .into_iter()
        .filter(|c| matches!(c.monitor, "none" | DEFAULT_SET | "dirty"))
        .collect()
}

/// The names `--only` takes: the default set, then each monitor.
pub const ONLY: [&str; 7] = [
    "default-set",
    "dirty",
    "wakeup",
    "halt-poll",
    "vcpu-load",
    "run-delay",
    "exits",
];

/// The conditions of `conds` on the monitors named in `only` (as in
/// [`ONLY`]; all of them when `only` is empty), the unwatched one kept: a
/// run of a few conditions has time for more rounds.
pub fn only(conds: Vec<Cond>, only: &[String]) -> Vec<Cond> {
    let named = |c: &Cond| {
        only.iter()
            .any(|o| o.as_str() == c.monitor || (o == "default-set" && c.monitor == DEFAULT_SET))
    };
    conds
        .into_iter()
        .filter(|c| only.is_empty() || c.is_none() || named(c))
        .collect()
}

impl Cond {
    pub fn is_none(&self) -> bool {
        matches!(self.tool, Tool::None)
    }

    pub fn tool(&self) -> &'static str {
        match self.tool {
            Tool::None => "nothing",
            Tool::Serve | Tool::Watch { .. } => "kvm-watcher",
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

    /// `kvm-watcher watch`'s arguments (empty for the other tools).
    pub fn watch_args(&self) -> Vec<&'static str> {
        let Tool::Watch { flag, rows } = self.tool else {
            return Vec::new();
        };
        let mut a = vec!["watch"];
        a.extend(flag);
        a.extend(if rows {
            &["--rows"][..]
        } else {
            &["-i", "1"][..]
        });
        a.extend(["--output", "json"]);
        a
    }

    /// The command line, for the JSON.
    pub fn command(&self) -> String {
        match self.tool {
            Tool::None => String::new(),
            Tool::Serve => "kvm-watcher serve --listen 127.0.0.1:PORT".into(),
            Tool::Watch { .. } => format!("kvm-watcher {}", self.watch_args().join(" ")),
            Tool::Bpftrace(s) => s.command(),
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
                Some(env.start_serve(port, &[])?)
            }
            Tool::Watch { .. } => Some(env.start_kw(&self.name(), &self.watch_args())?),
            Tool::Bpftrace(s) => Some(env.start_bt(&format!("bt_{}", self.monitor), s)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_monitor_and_the_default_set_have_summary_rows_and_bpftrace() {
        let all = all();
        assert!(all[0].is_none(), "the unwatched condition comes first");
        let monitors: Vec<&str> = all.iter().skip(1).map(|c| c.monitor).collect();
        assert!(ONLY[1..].iter().eq(MONITORS.iter().map(|m| &m.0)));
        for m in ONLY.map(|o| if o == "default-set" { DEFAULT_SET } else { o }) {
            for mode in ["summary", "rows", "counts"] {
                assert_eq!(
                    all.iter()
                        .filter(|c| c.monitor == m && c.mode == mode)
                        .count(),
                    1,
                    "{m} {mode}"
                );
            }
            assert_eq!(monitors.iter().filter(|&&x| x == m).count(), 3, "{m}");
            let bt = all
                .iter()
                .find(|c| c.monitor == m && c.tool() == "bpftrace")
                .unwrap();
            assert_eq!(bt.name(), format!("bpftrace {m}"));
        }
        let names: std::collections::BTreeSet<String> = all.iter().map(Cond::name).collect();
        assert_eq!(names.len(), all.len(), "names are unique: {names:?}");
    }

    #[test]
    fn only_keeps_the_named_monitors_and_the_unwatched_guest() {
        let names = |v: Vec<Cond>| v.iter().map(Cond::name).collect::<Vec<_>>();
        assert_eq!(
            names(only(all(), &["default-set".into()])),
            [
                "none",
                "default set summary",
                "default set rows",
                "bpftrace default set"
            ]
        );
        assert_eq!(
            names(only(all(), &["exits".into(), "dirty".into()])).len(),
            7
        );
        assert_eq!(only(all(), &[]).len(), all().len());
        for m in ONLY.iter().skip(1) {
            assert_eq!(only(all(), &[m.to_string()]).len(), 4, "{m}");
        }
    }

    #[test]
    fn rows_stream_and_summaries_do_not() {
        for c in all() {
            if let Tool::Watch { flag, .. } = c.tool {
                let a = c.watch_args();
                assert_eq!(a.contains(&"--rows"), c.mode == "rows", "{}", c.name());
                assert_eq!(a.contains(&"-i"), c.mode == "summary", "{}", c.name());
                assert_eq!(a[0], "watch");
                assert_eq!(flag.is_none(), c.monitor == DEFAULT_SET, "{}", c.name());
            }
        }
        assert_eq!(
            watch("dirty", Some("-d"), false).command(),
            "kvm-watcher watch -d -i 1 --output json"
        );
        assert_eq!(
            watch(DEFAULT_SET, None, true).command(),
            "kvm-watcher watch --rows --output json"
        );
        let q = quick();
        assert!(q[0].is_none());
        assert!(q.iter().any(|c| matches!(c.tool, Tool::Serve)));
        assert!(q.iter().any(|c| matches!(c.tool, Tool::Bpftrace(_))));
        assert_eq!(q.len(), 7, "{q:?}");
    }
}
