use std::process::ExitCode;

use clap::Parser;
use kvm_watcher::cli::{self, Cli};
use kvm_watcher::error::UsageError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
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
