//! Command lines that would run with an option silently ignored or with
//! filters that can match nothing: usage errors, found before any work.

use clap::ArgMatches;
use clap::parser::ValueSource;

use crate::monitors::Monitor;

/// Whether the user gave `id` on the command line (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.try_contains_id(id), Ok(true))
        && matches.value_source(id) == Some(ValueSource::CommandLine)
}

/// The shared options that `monitors` would ignore.
pub fn check_common(monitors: &[&'static dyn Monitor], matches: &ArgMatches) -> anyhow::Result<()> {
    let sampled = monitors.iter().any(|m| m.name() == "dirty_rate");
    if sampled {
        for (id, long) in [("tid", "--tid"), ("vcpu", "--vcpu")] {
            if given(matches, id) {
                crate::usage_bail!(
                    "{long}: the dirty-rate monitor (-D) samples whole VMs; choose them with -p or --vm"
                );
            }
        }
    }
    if monitors.iter().all(|m| m.name() == "dirty_rate") && given(matches, "ringbuf_size") {
        crate::usage_bail!(
            "--ringbuf-size: the dirty-rate monitor (-D) uses no ring buffer; drop the option"
        );
    }
    Ok(())
}

/// `watch --rows --summary`: one of them has to go.
pub fn check_watch(rows: bool, matches: &ArgMatches) -> anyhow::Result<()> {
    if rows && given(matches, "summary") {
        crate::usage_bail!(
            "--rows and --summary contradict each other: `watch` prints summaries unless --rows is given"
        );
    }
    Ok(())
}

/// `serve` options of the dirty-rate monitor without `--dirty-rate`.
pub fn check_serve(
    dirty_rate: bool,
    all: &[&'static dyn Monitor],
    matches: &ArgMatches,
) -> anyhow::Result<()> {
    if dirty_rate {
        return Ok(());
    }
    for m in all.iter().filter(|m| m.name() == "dirty_rate") {
        for spec in m.options().iter().filter(|s| s.serve) {
            if given(matches, spec.id) {
                crate::usage_bail!(
                    "--{}: an option of the dirty-rate exporter, which runs only with --dirty-rate",
                    spec.long
                );
            }
        }
    }
    Ok(())
}
