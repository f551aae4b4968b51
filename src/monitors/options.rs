//! Options a monitor has of its own (e.g. dirty's `--max-pages`), described
//! as data: the command line turns each [`OptionSpec`] into a flag and hands
//! the values back as [`Options`], so neither side knows the other's types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What kind of value an option takes.
#[derive(Clone, Copy, Debug)]
pub enum OptionKind {
    /// A whole number in `min..=max`.
    Count {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// A number of seconds (fractions allowed, more than 0).
    Seconds,
    /// A bandwidth in MiB/s (fractions allowed, more than 0).
    MibPerSecond,
    /// A file path.
    Path,
}

/// One option of a monitor.
#[derive(Debug)]
pub struct OptionSpec {
    /// Its key in [`Options`] (and its clap id).
    pub id: &'static str,
    /// Its long flag, without the dashes.
    pub long: &'static str,
    /// The name of its value in the help (`PAGES`).
    pub value_name: &'static str,
    /// Its help text, units included (no final period, as clap shows it).
    pub help: &'static str,
    /// Its kind.
    pub kind: OptionKind,
    /// Its default, as typed on the command line.
    pub default: Option<&'static str>,
    /// Another option (id) of the same monitor it needs.
    pub requires: Option<&'static str>,
    /// `serve` has it too.
    pub serve: bool,
}

/// One option's value.
#[derive(Clone, Debug, PartialEq)]
pub enum OptionValue {
    /// [`OptionKind::Count`].
    Count(u64),
    /// [`OptionKind::Seconds`].
    Seconds(f64),
    /// [`OptionKind::MibPerSecond`].
    MibPerSecond(f64),
    /// [`OptionKind::Path`].
    Path(PathBuf),
}

/// Option values by [`OptionSpec::id`]: those given, and the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    values: BTreeMap<&'static str, OptionValue>,
}

impl Options {
    /// Sets option `id`.
    pub fn set(&mut self, id: &'static str, value: OptionValue) {
        self.values.insert(id, value);
    }

    /// The defaults of `specs`.
    pub fn defaults(specs: &[OptionSpec]) -> anyhow::Result<Options> {
        let mut out = Options::default();
        for spec in specs {
            if let Some(text) = spec.default {
                out.set(spec.id, parse_default(spec, text)?);
            }
        }
        Ok(out)
    }

    /// Option `id` as a count.
    pub fn count(&self, id: &str) -> Option<u64> {
        match self.values.get(id) {
            Some(OptionValue::Count(n)) => Some(*n),
            _ => None,
        }
    }

    /// Option `id` as seconds.
    pub fn seconds(&self, id: &str) -> Option<f64> {
        match self.values.get(id) {
            Some(OptionValue::Seconds(s)) => Some(*s),
            _ => None,
        }
    }

    /// Option `id` as MiB/s.
    pub fn mib_per_second(&self, id: &str) -> Option<f64> {
        match self.values.get(id) {
            Some(OptionValue::MibPerSecond(v)) => Some(*v),
            _ => None,
        }
    }

    /// Option `id` as a path.
    pub fn path(&self, id: &str) -> Option<&Path> {
        match self.values.get(id) {
            Some(OptionValue::Path(p)) => Some(p),
            _ => None,
        }
    }
}

fn parse_default(spec: &OptionSpec, text: &str) -> anyhow::Result<OptionValue> {
    let bad = || anyhow::anyhow!("default of --{} is not valid: {text}", spec.long);
    Ok(match spec.kind {
        OptionKind::Count { .. } => OptionValue::Count(text.parse().map_err(|_| bad())?),
        OptionKind::Seconds => OptionValue::Seconds(text.parse().map_err(|_| bad())?),
        OptionKind::MibPerSecond => OptionValue::MibPerSecond(text.parse().map_err(|_| bad())?),
        OptionKind::Path => OptionValue::Path(PathBuf::from(text)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec {
            id: "pages",
            long: "pages",
            value_name: "N",
            help: "",
            kind: OptionKind::Count { min: 1, max: 10 },
            default: Some("4"),
            requires: None,
            serve: false,
        },
        OptionSpec {
            id: "file",
            long: "file",
            value_name: "PATH",
            help: "",
            kind: OptionKind::Path,
            default: None,
            requires: None,
            serve: false,
        },
    ];

    #[test]
    fn defaults_are_typed_and_absent_options_are_none() {
        let mut o = Options::defaults(SPECS).unwrap();
        assert_eq!(o.count("pages"), Some(4));
        assert_eq!(o.path("file"), None);
        assert_eq!(o.seconds("pages"), None, "a count is not seconds");
        o.set("file", OptionValue::Path("/tmp/x".into()));
        assert_eq!(o.path("file"), Some(Path::new("/tmp/x")));
    }
}
