//! How a child ended, and why starting or waiting for it failed.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How a child ended, and what it wrote.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// It was killed with SIGKILL: it did not exit in time, or did not get ready.
    pub killed: bool,
    /// When its exit was seen.
    pub at: Instant,
    /// Its stdout (empty if discarded), lossily decoded as UTF-8.
    pub stdout: String,
    /// Its stderr, lossily decoded as UTF-8.
    pub stderr: String,
}

/// Why a child could not be started, did not get ready, or could not be waited for.
#[derive(Debug)]
pub enum Error {
    /// The command could not be started.
    Spawn { name: String, source: io::Error },
    /// Waiting for the child failed.
    Wait { name: String, source: io::Error },
    /// No marker within the time given; the child was killed.
    Timeout {
        name: String,
        marker: String,
        waited: Duration,
        exit: Box<Exit>,
    },
    /// The child's output ended (it exited) before the marker.
    Exited {
        name: String,
        marker: String,
        exit: Box<Exit>,
    },
    /// A [`Spawn::fail_on`] line came before the marker; the child was killed.
    Failed {
        name: String,
        line: String,
        exit: Box<Exit>,
    },
}

impl Error {
    /// The name of the child it is about.
    pub fn name(&self) -> &str {
        match self {
            Error::Spawn { name, .. }
            | Error::Wait { name, .. }
            | Error::Timeout { name, .. }
            | Error::Exited { name, .. }
            | Error::Failed { name, .. } => name,
        }
    }

    /// How the child ended, if it was started and reaped.
    pub fn exit(&self) -> Option<&Exit> {
        match self {
            Error::Spawn { .. } | Error::Wait { .. } => None,
            Error::Timeout { exit, .. }
            | Error::Exited { exit, .. }
            | Error::Failed { exit, .. } => Some(exit.as_ref()),
        }
    }
}

impl fmt::Display for Error {
    /// One line; what the child wrote is in [`Error::exit`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn { name, .. } => write!(f, "cannot start {name}"),
            Error::Wait { name, .. } => write!(f, "cannot wait for {name}"),
            Error::Timeout {
                name,
                marker,
                waited,
                ..
            } => write!(
                f,
                "{name} did not print `{marker}` within {:.1} s",
                waited.as_secs_f64()
            ),
            Error::Exited { name, marker, exit } => {
                write!(
                    f,
                    "{name} exited ({}) before printing `{marker}`",
                    exit.status
                )
            }
            Error::Failed { name, line, .. } => write!(f, "{name} failed: {line}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Wait { source, .. } => Some(source),
            _ => None,
        }
    }
}
