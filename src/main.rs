use std::process::ExitCode;

use clap::error::ErrorKind;
use kvm_watcher::cli;
use kvm_watcher::error::UsageError;

fn main() -> ExitCode {
    let matches = match cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            // Unwritable output is a runtime error, as for every report; a
            // reader that went away (`| head`) is not.
            use std::io::Write;
            let printed = err.print().and_then(|()| std::io::stdout().flush());
            return match printed {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("kvm-watcher: error: cannot write the output ({e})");
                    ExitCode::from(1)
                }
                _ => ExitCode::SUCCESS,
            };
        }
        Err(err) => {
            // One line: clap's message up to its usage hint, joined.
            let rendered = err.render().to_string();
            let first = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let first = first.trim_start_matches("error: ");
            eprintln!("kvm-watcher: error: {first} (see `kvm-watcher --help`)");
            return ExitCode::from(2);
        }
    };
    match cli::run(&matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the whole context chain joined with ": ".
            eprintln!("kvm-watcher: error: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
