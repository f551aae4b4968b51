//! Seeding at attach: a monitor whose state begins at an event (a load, a
//! halt) runs a BPF task iterator once, after its other programs are
//! attached, to mark the threads already in that state.

use std::sync::Once;

use anyhow::Context;

use crate::hooks;
use crate::output::warn;

/// Runs the task iterator `prog` once; where this kernel cannot, or it
/// fails, warns once per `said` with `warning(error)` and goes on without it.
pub fn run_iterator(
    prog: &libbpf_rs::ProgramMut<'_>,
    said: &Once,
    warning: impl FnOnce(&anyhow::Error) -> String,
) {
    let result = hooks::task_iterator()
        .map_err(|why| anyhow::anyhow!("{why}"))
        .and_then(|()| {
            let link = prog.attach().context("cannot attach the task iterator")?;
            let mut iter =
                libbpf_rs::Iter::new(&link).context("cannot create the task iterator")?;
            std::io::copy(&mut iter, &mut std::io::sink())
                .context("cannot run the task iterator")?;
            Ok(())
        });
    if let Err(e) = result {
        said.call_once(|| warn(&warning(&e)));
    }
}
