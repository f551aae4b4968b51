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

/// Whether no backend of `m` needs a hook: it runs no BPF program of its
/// own (dirty-rate samples whole VMs from user space), so the in-kernel
/// filters by thread and vCPU and the ring buffer do not reach it.
fn hookless(m: &dyn Monitor) -> bool {
    m.backends()
        .iter()
        .all(|b| b.needs.is_empty() && b.quirks.iter().all(|q| q.also.is_empty()))
}

/// The shared options that `monitors` would ignore.
pub fn check_common(monitors: &[&'static dyn Monitor], matches: &ArgMatches) -> anyhow::Result<()> {
    if let Some(m) = monitors.iter().find(|m| hookless(**m)) {
        let f = m.face();
        for (id, long) in [("tid", "--tid"), ("vcpu", "--vcpu")] {
            if given(matches, id) {
                crate::usage_bail!(
                    "{long}: the {} monitor (-{}) samples whole VMs; choose them with -p or --vm",
                    f.command,
                    f.short
                );
            }
        }
    }
    if let Some(m) = monitors.first()
        && monitors.iter().all(|m| hookless(*m))
        && given(matches, "ringbuf_size")
    {
        crate::usage_bail!(
            "--ringbuf-size: the {} monitor (-{}) uses no ring buffer; drop the option",
            m.face().command,
            m.face().short
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

/// `serve` options of a monitor of `all` that `serve` runs only when asked
/// (`--dirty-rate`), given without it.
pub fn check_serve(
    chosen: &[&'static dyn Monitor],
    all: &[&'static dyn Monitor],
    matches: &ArgMatches,
) -> anyhow::Result<()> {
    let left_out = all
        .iter()
        .filter(|m| !chosen.iter().any(|c| c.name() == m.name()));
    for m in left_out {
        let command = m.face().command;
        for spec in m.options().iter().filter(|s| s.serve) {
            if given(matches, spec.id) {
                crate::usage_bail!(
                    "--{}: an option of the {command} exporter, which runs only with --{command}",
                    spec.long
                );
            }
        }
    }
    Ok(())
}
