//! The monitors on the command line, from the registry: each monitor's
//! subcommand (`kvm-watcher wakeup`), its short flag at the top level
//! (`-w`, `--wakeup-events`) and in `watch` (`-w`, `--wakeup`), and its own
//! options ([`OptionSpec`]) wherever it can run.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command};

use super::{MonitorArgs, mib_per_second, positive_seconds};
use crate::monitors::{Monitor, OptionKind, OptionSpec, OptionValue, Options, REGISTRY};

/// A clap argument for one monitor option.
fn option_arg(spec: &'static OptionSpec) -> Arg {
    let arg = Arg::new(spec.id)
        .long(spec.long)
        .value_name(spec.value_name)
        .help(spec.help)
        .action(ArgAction::Set);
    let arg = match spec.kind {
        OptionKind::Count { min, max } => {
            arg.value_parser(clap::value_parser!(u64).range(min..=max))
        }
        OptionKind::Seconds => arg.value_parser(positive_seconds).allow_hyphen_values(true),
        OptionKind::MibPerSecond => arg.value_parser(mib_per_second).allow_hyphen_values(true),
        OptionKind::Path => arg.value_parser(clap::value_parser!(PathBuf)),
    };
    let arg = match spec.default {
        Some(d) => arg.default_value(d),
        None => arg,
    };
    match spec.requires {
        Some(other) => arg.requires(other),
        None => arg,
    }
}

/// The options of `monitors` (those `serve` has, if `serve`).
fn option_args(monitors: &[&'static dyn Monitor], serve: bool) -> Vec<Arg> {
    monitors
        .iter()
        .flat_map(|m| m.options())
        .filter(|spec| spec.serve || !serve)
        .map(option_arg)
        .collect()
}

/// Moves the arguments `cmd` has so far after the `n` monitor flags.
fn after_monitor_flags(mut cmd: Command, n: usize) -> Command {
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for (k, id) in ids.iter().enumerate() {
        cmd = cmd.mut_arg(id, |a| a.display_order(n + k));
    }
    cmd
}

/// Adds every monitor to the derived command line.
pub fn augment(mut cmd: Command) -> Command {
    // The monitors' subcommands first, the others after them.
    let others: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for (j, name) in others.iter().enumerate() {
        cmd = cmd.mut_subcommand(name, |s| s.display_order(REGISTRY.len() + j));
    }
    cmd = after_monitor_flags(cmd, REGISTRY.len());
    for (i, m) in REGISTRY.iter().enumerate() {
        let f = m.face();
        let sub = MonitorArgs::augment_args(Command::new(f.command))
            .about(f.about)
            .args(option_args(&[*m], false))
            .display_order(i);
        cmd = cmd.subcommand(sub).arg(
            Arg::new(f.name)
                .short(f.short)
                .long(f.events_flag)
                .action(ArgAction::SetTrue)
                .help(format!(
                    "Short form of `kvm-watcher {}`: {}",
                    f.command, f.what
                ))
                .display_order(i),
        );
    }
    cmd = cmd.args(option_args(REGISTRY, false));
    // `watch` and `top` take the monitors' flags; top only the options that
    // set up the kernel side (as `serve`), since it writes no output.
    for (name, kernel_side_only) in [("watch", false), ("top", true)] {
        cmd = cmd.mut_subcommand(name, |sub| {
            let mut sub = after_monitor_flags(sub, REGISTRY.len());
            for (i, m) in REGISTRY.iter().enumerate() {
                let f = m.face();
                sub = sub.arg(
                    Arg::new(f.name)
                        .short(f.short)
                        .long(f.command)
                        .action(ArgAction::SetTrue)
                        .help(format!("Watch {}", f.what))
                        .display_order(i),
                );
            }
            sub.args(option_args(REGISTRY, kernel_side_only))
        });
    }
    // `serve` runs every monitor on by default; the others have a flag each,
    // as node_exporter's `--collector.<name>` (`--dirty-rate`).
    cmd.mut_subcommand("serve", |serve| {
        serve
            .args(REGISTRY.iter().filter(|m| !m.by_default()).map(|m| {
                let f = m.face();
                Arg::new(f.name)
                    .long(f.command)
                    .action(ArgAction::SetTrue)
                    .help(format!(
                        "Also export {}; see `kvm-watcher {}`",
                        f.what, f.command
                    ))
            }))
            .args(option_args(REGISTRY, true))
    })
}

/// The monitors `serve` runs: those on by default, and those asked for
/// by their flag.
pub fn serve_chosen(matches: &ArgMatches) -> Vec<&'static dyn Monitor> {
    REGISTRY
        .iter()
        .copied()
        .filter(|m| m.by_default() || matches.get_flag(m.name()))
        .collect()
}

/// The monitors whose flags `matches` has, in registry order.
pub fn chosen(matches: &ArgMatches) -> Vec<&'static dyn Monitor> {
    REGISTRY
        .iter()
        .copied()
        .filter(|m| matches.get_flag(m.name()))
        .collect()
}

/// The monitors `watch`, `top` and `serve` run when none is named.
pub fn defaults() -> Vec<&'static dyn Monitor> {
    REGISTRY
        .iter()
        .copied()
        .filter(|m| m.by_default())
        .collect()
}

/// The values of the options of `monitors` (with their defaults); an option
/// of another monitor given on the command line is a usage error.
pub fn options(
    monitors: &[&'static dyn Monitor],
    matches: &ArgMatches,
    serve: bool,
) -> anyhow::Result<Options> {
    for m in REGISTRY {
        if monitors.iter().any(|c| c.name() == m.name()) {
            continue;
        }
        for spec in m.options() {
            if matches!(matches.try_contains_id(spec.id), Ok(true))
                && matches.value_source(spec.id) == Some(ValueSource::CommandLine)
            {
                crate::usage_bail!(
                    "--{} belongs to the {} monitor (-{})",
                    spec.long,
                    m.name(),
                    m.face().short
                );
            }
        }
    }
    let mut out = Options::default();
    for spec in monitors.iter().flat_map(|m| m.options()) {
        if serve && !spec.serve {
            continue;
        }
        let value = match spec.kind {
            OptionKind::Count { .. } => matches
                .get_one::<u64>(spec.id)
                .map(|v| OptionValue::Count(*v)),
            OptionKind::Seconds => matches
                .get_one::<f64>(spec.id)
                .map(|v| OptionValue::Seconds(*v)),
            OptionKind::MibPerSecond => matches
                .get_one::<f64>(spec.id)
                .map(|v| OptionValue::MibPerSecond(*v)),
            OptionKind::Path => matches
                .get_one::<PathBuf>(spec.id)
                .map(|v| OptionValue::Path(v.clone())),
        };
        if let Some(v) = value {
            out.set(spec.id, v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ArgMatches, clap::Error> {
        super::super::command()
            .try_get_matches_from(std::iter::once("kvm-watcher").chain(args.iter().copied()))
    }

    #[test]
    fn every_monitor_has_a_subcommand_a_top_level_flag_and_a_watch_flag() {
        for m in REGISTRY {
            let f = m.face();
            let sub = parse(&[f.command]).unwrap();
            assert_eq!(sub.subcommand_name(), Some(f.command));
            let top = parse(&[&format!("-{}", f.short)]).unwrap();
            assert_eq!(
                chosen(&top).iter().map(|m| m.name()).collect::<Vec<_>>(),
                [f.name]
            );
            let watch = parse(&["watch", &format!("--{}", f.command)]).unwrap();
            let watch = watch.subcommand_matches("watch").unwrap();
            assert_eq!(chosen(watch)[0].name(), f.name);
        }
    }

    #[test]
    fn options_reach_their_monitor_with_defaults_and_ranges() {
        let dirty = crate::monitors::by_name("dirty").unwrap();
        let m = parse(&["dirty", "--counts-file", "/tmp/c", "--counts-every", "0.5"]).unwrap();
        let sub = m.subcommand_matches("dirty").unwrap();
        let o = options(&[dirty], sub, false).unwrap();
        assert_eq!(o.count("max_pages"), Some(4 << 20), "the default");
        assert_eq!(o.path("counts_file"), Some(std::path::Path::new("/tmp/c")));
        assert_eq!(o.seconds("counts_every"), Some(0.5));
        assert!(parse(&["dirty", "--max-pages", "0"]).is_err());
        assert!(
            parse(&["dirty", "--counts-every", "1"]).is_err(),
            "needs --counts-file"
        );
        assert!(
            parse(&["wakeup", "--counts-file", "x"]).is_err(),
            "not wakeup's option"
        );
    }

    #[test]
    fn an_option_of_a_monitor_that_does_not_run_is_a_usage_error() {
        let m = parse(&["-w", "--counts-file", "x"]).unwrap();
        let err = options(&chosen(&m), &m, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--counts-file belongs to the dirty monitor (-d)"
        );
        let m = parse(&["-w", "-d", "--counts-file", "x"]).unwrap();
        assert!(options(&chosen(&m), &m, false).is_ok());
    }

    #[test]
    fn serve_runs_a_monitor_off_by_default_only_with_its_flag() {
        let names = |args: &[&str]| -> Vec<&'static str> {
            let m = parse(args).unwrap();
            let sub = m.subcommand_matches("serve").unwrap();
            serve_chosen(sub).iter().map(|m| m.name()).collect()
        };
        let plain = names(&["serve"]);
        let defaults: Vec<_> = defaults().iter().map(|m| m.name()).collect();
        assert_eq!(plain, defaults);
        let opt_in: Vec<_> = REGISTRY.iter().filter(|m| !m.by_default()).collect();
        assert!(!opt_in.is_empty(), "no monitor is off by default");
        for m in opt_in {
            let f = m.face();
            assert!(names(&["serve", &format!("--{}", f.command)]).contains(&f.name));
        }
        // An option of the exporter it runs only when asked, without the flag.
        let m = parse(&["serve", "--window", "2"]).unwrap();
        let sub = m.subcommand_matches("serve").unwrap();
        let err = super::super::checks::check_serve(&serve_chosen(sub), REGISTRY, sub);
        assert_eq!(
            err.unwrap_err().to_string(),
            "--window: an option of the dirty-rate exporter, which runs only with --dirty-rate"
        );
        let m = parse(&["serve", "--window", "2", "--dirty-rate"]).unwrap();
        let sub = m.subcommand_matches("serve").unwrap();
        assert!(super::super::checks::check_serve(&serve_chosen(sub), REGISTRY, sub).is_ok());
    }

    #[test]
    fn serve_takes_only_the_options_meant_for_it() {
        let m = parse(&["serve", "--max-pages", "1024"]).unwrap();
        let sub = m.subcommand_matches("serve").unwrap();
        let o = options(REGISTRY, sub, true).unwrap();
        assert_eq!(o.count("max_pages"), Some(1024));
        assert!(parse(&["serve", "--counts-file", "x"]).is_err());
    }
}
