//! The backends the user forced with `--backend`, checked against the
//! monitors a front-end runs before anything is loaded.

use crate::monitors::Monitor;

/// The backends the user forced with `--backend`: `NAME` for the one
/// monitor watched, or `MONITOR=NAME` (repeatable) for any of those watched,
/// e.g. `serve --backend exits=kvm-only`.
#[derive(Clone, Debug, Default)]
pub struct Forced(Vec<(Option<String>, String)>);

impl Forced {
    /// The `--backend` values, as given.
    pub fn new(values: &[String]) -> Forced {
        Forced(
            values
                .iter()
                .map(|v| match v.split_once('=') {
                    Some((m, b)) => (Some(m.to_string()), b.to_string()),
                    None => (None, v.clone()),
                })
                .collect(),
        )
    }

    /// A usage error unless every value names one monitor of `monitors`
    /// and one of its backends, at most once each.
    pub fn check(&self, monitors: &[&'static dyn Monitor]) -> anyhow::Result<()> {
        let mut seen: Vec<&str> = Vec::new();
        for (monitor, name) in &self.0 {
            let shown = name.escape_debug();
            let m = match monitor {
                None if monitors.len() == 1 => monitors[0],
                None => crate::usage_bail!(
                    "--backend {shown}: several monitors are watched; say which one, e.g. --backend {}={shown}",
                    monitors
                        .iter()
                        .find(|m| m.backends().iter().any(|b| b.name == name))
                        .or(monitors.first())
                        .map_or("MONITOR", |m| m.face().command)
                ),
                Some(wanted) => match monitors.iter().find(|m| named(**m, wanted)) {
                    Some(m) => *m,
                    None => {
                        let names: Vec<_> = monitors.iter().map(|m| m.face().command).collect();
                        crate::usage_bail!(
                            "--backend {}={shown}: no such monitor is watched here (watched: {})",
                            wanted.escape_debug(),
                            names.join(", ")
                        )
                    }
                },
            };
            if seen.contains(&m.name()) {
                crate::usage_bail!("--backend names {} twice", m.face().command);
            }
            seen.push(m.name());
            if !m.backends().iter().any(|b| b.name == name) {
                let names: Vec<_> = m.backends().iter().map(|b| b.name).collect();
                crate::usage_bail!(
                    "{} has no backend `{shown}`; choose one of: {}",
                    m.face().command,
                    names.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The backend forced for monitor `m`, if any (after [`Forced::check`]).
    pub fn of(&self, m: &dyn Monitor) -> Option<&str> {
        self.0
            .iter()
            .find(|(monitor, _)| monitor.as_deref().is_none_or(|w| named(m, w)))
            .map(|(_, name)| name.as_str())
    }
}

/// Whether `wanted` names monitor `m`: its command (`halt-poll`) or its name
/// (`halt_poll`).
fn named(m: &dyn Monitor, wanted: &str) -> bool {
    m.face().command == wanted || m.name() == wanted
}
