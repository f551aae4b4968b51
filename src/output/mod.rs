//! Output sinks: tables for people, NDJSON for programs. Every record goes
//! through [`Output::record`]; tables print a header before a monitor's first row.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

mod clock;

pub use clock::{Clock, monotonic_ns};

/// Output formats of the monitors.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Human-readable table with units in every header.
    #[default]
    Table,
    /// One JSON object per line (NDJSON), schema in docs/json-schema.md.
    Json,
    /// Comma-separated values with a header row, the same fields as JSON.
    Csv,
}

/// Which clock the TIME column shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeFormat {
    /// Local wall-clock time (HH:MM:SS.mmm).
    #[default]
    Wall,
    /// Kernel CLOCK_MONOTONIC, seconds since boot.
    Mono,
}

/// Fields every record carries (JSON names are fixed: see docs/json-schema.md).
#[derive(Clone, Debug, Serialize)]
pub struct Common {
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    /// VMM process id.
    pub pid: u32,
    /// vCPU thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id; null when the thread's vCPU is not known (see `doctor`).
    pub vcpu_id: Option<u32>,
    /// VM name (see `kvm-watcher vms`); null once the VMM has exited.
    pub vm: Option<String>,
}

/// A record that can be printed as a table row or a JSON line.
pub trait Row: Serialize {
    /// The monitor it belongs to (`"monitor"` in JSON).
    fn monitor(&self) -> &'static str;
    /// Table header, units in every column.
    fn header(&self) -> String;
    /// Table row.
    fn row(&self, clock: &Clock) -> String;
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    monitor: &'static str,
    #[serde(flatten)]
    record: &'a T,
}

/// The flag the ending signals set (see [`stop_on`]).
static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Makes a write to stdout that blocks (a reader that does not read) give up
/// once `stop` is set: the ending signals interrupt it (they are installed
/// without SA_RESTART), and from then on the output counts as closed, so a
/// watch still ends, detaches and writes its counts file.
pub fn stop_on(stop: Arc<AtomicBool>) {
    let _ = STOP.set(stop);
}

/// Why a write gave up: stopped by a signal while stdout was blocked.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped while the output was blocked")
    }
}

impl std::error::Error for Stopped {}

/// How long an ending watch waits for a full stdout to take more.
const STOPPED_WAIT_MS: i32 = 1000;

/// File descriptor 1, written directly (not through std's locked, line-buffered
/// stdout), so an interrupted write is seen as such.
struct Stdout {
    gave_up: bool,
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.gave_up {
                return Err(io::Error::other(Stopped));
            }
            let mut len = buf.len();
            if STOP.get().is_some_and(|s| s.load(Ordering::Relaxed)) {
                // Ending: no signal will interrupt a write any more. Write
                // only what fits at once (a pipe with POLLOUT takes
                // PIPE_BUF bytes without blocking), and give up on a stdout
                // that stays full.
                let mut p = libc::pollfd {
                    fd: 1,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, STOPPED_WAIT_MS) } != 1 {
                    self.gave_up = true;
                    continue;
                }
                len = len.min(libc::PIPE_BUF);
            }
            // SAFETY: writes `len` bytes of a live slice to fd 1.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), len) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            // Interrupted (the ending signal, say): go round again. Once
            // ending, the poll above gives a reader that still reads a
            // second to take the rest, so a row cut across two writes is
            // finished rather than left half written.
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where records go.
pub struct Output {
    format: OutputFormat,
    clock: Clock,
    out: BufWriter<Stdout>,
    headers_printed: HashSet<String>,
    csv_columns: std::collections::HashMap<&'static str, Vec<String>>,
    /// Set once stdout is closed (e.g. `| head`) or fails: stop writing.
    pub closed: bool,
    /// Why writing failed, when it was not a closed pipe (e.g. a full disk).
    failure: Option<io::Error>,
}

impl Output {
    /// An output in `format`, with TIME shown per `time`.
    pub fn new(format: OutputFormat, time: TimeFormat) -> Self {
        Output {
            format,
            clock: Clock::new(time),
            out: BufWriter::with_capacity(1 << 16, Stdout { gave_up: false }),
            headers_printed: HashSet::new(),
            csv_columns: std::collections::HashMap::new(),
            closed: false,
            failure: None,
        }
    }

    /// The write error that stopped the output, other than a closed pipe.
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.failure.take()
    }

    /// The format in use.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// The clock used for TIME.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A closed pipe ends the output quietly (the reader has all it wanted);
    /// any other error ends it and is kept for [`Output::take_failure`].
    fn check(&mut self, r: io::Result<()>) {
        if let Err(e) = r {
            self.closed = true;
            let stopped = e.get_ref().is_some_and(|e| e.is::<Stopped>());
            if e.kind() != io::ErrorKind::BrokenPipe && !stopped && self.failure.is_none() {
                self.failure = Some(e);
            }
        }
    }

    /// Writes one record.
    pub fn record<R: Row>(&mut self, record: &R) {
        if self.closed {
            return;
        }
        let r = match self.format {
            OutputFormat::Json => {
                let tagged = Tagged {
                    monitor: record.monitor(),
                    record,
                };
                serde_json::to_string(&tagged)
                    .map_err(io::Error::from)
                    .and_then(|j| writeln!(self.out, "{}", json_safe(&j)))
            }
            OutputFormat::Csv => self.csv_record(record),
            OutputFormat::Table => {
                let header = record.header();
                let mut r = Ok(());
                if self.headers_printed.insert(header.clone()) {
                    r = writeln!(self.out, "{header}");
                }
                let row = record.row(&self.clock);
                r.and_then(|()| writeln!(self.out, "{}", terminal_safe(&row)))
            }
        };
        self.check(r);
    }

    /// CSV: a header row before a record type's first record (the first column
    /// is always `monitor`), then its values; nested values as JSON text.
    fn csv_record<R: Row>(&mut self, record: &R) -> io::Result<()> {
        let tagged = Tagged {
            monitor: record.monitor(),
            record,
        };
        let value = serde_json::to_value(&tagged).map_err(io::Error::from)?;
        let serde_json::Value::Object(fields) = value else {
            return Ok(());
        };
        let monitor = record.monitor();
        let mut w = csv::WriterBuilder::new().from_writer(&mut self.out);
        let columns = match self.csv_columns.get(monitor) {
            Some(c) => c.clone(),
            None => {
                let c: Vec<String> = fields.keys().cloned().collect();
                w.write_record(&c)?;
                self.csv_columns.insert(monitor, c.clone());
                c
            }
        };
        let cells: Vec<String> = columns
            .iter()
            .map(|k| match fields.get(k) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => terminal_safe(s).into_owned(),
                Some(v) => json_safe(&v.to_string()).into_owned(),
            })
            .collect();
        w.write_record(&cells)?;
        w.flush()
    }

    /// Writes a free-form line in table mode (ignored in JSON mode). Leading
    /// newlines make blank lines; anything else that could drive a terminal
    /// (a VM name with a newline or escape codes) is shown escaped.
    pub fn text(&mut self, line: &str) {
        if self.format == OutputFormat::Table && !self.closed {
            let rest = line.trim_start_matches('\n');
            let blank = &line[..line.len() - rest.len()];
            let r = writeln!(self.out, "{blank}{}", terminal_safe(rest));
            self.check(r);
        }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let r = self.out.flush();
        self.check(r);
    }
}

/// `s` made safe to print on a terminal: control characters (newlines,
/// escape sequences, ...) and the Unicode marks that reorder text are shown
/// escaped (`\n`, `\u{1b}`), so a VM or thread name cannot forge lines or
/// drive the terminal.
pub fn terminal_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// JSON text made safe to print on a terminal: the characters
/// [`terminal_safe`] escapes that JSON leaves raw (DEL, C1 controls, the
/// marks that reorder text) written as `\uXXXX` escapes, so the JSON still
/// parses to the same strings. Only valid on serde_json's output, where
/// such characters can only be inside strings.
pub fn json_safe(s: &str) -> std::borrow::Cow<'_, str> {
    // Newlines are pretty-printed JSON's own (serde escapes those in strings).
    let unsafe_here = |c: char| c != '\n' && unsafe_char(c);
    if !s.chars().any(unsafe_here) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_here(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A character that could drive a terminal or reorder what it shows.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Warnings kept by a [`HeldWarnings`], and how many of them were taken.
static HELD: std::sync::Mutex<Option<(Vec<String>, usize)>> = std::sync::Mutex::new(None);

/// Prints a one-line warning on stderr (or keeps it, see [`HeldWarnings`]).
pub fn warn(msg: &str) {
    if let Ok(mut held) = HELD.lock()
        && let Some((all, _)) = held.as_mut()
    {
        all.push(msg.to_string());
        return;
    }
    eprintln!("kvm-watcher: warning: {msg}");
}

/// While it lives, warnings are kept instead of printed (a full-screen view
/// shows them itself); when dropped, it prints every warning it kept.
pub struct HeldWarnings(());

impl HeldWarnings {
    /// Starts keeping warnings.
    pub fn start() -> Self {
        if let Ok(mut held) = HELD.lock() {
            *held = Some((Vec::new(), 0));
        }
        HeldWarnings(())
    }

    /// The warnings that came since the last call.
    pub fn take_new(&self) -> Vec<String> {
        match HELD.lock() {
            Ok(mut held) => match held.as_mut() {
                Some((all, taken)) => {
                    let new = all[*taken..].to_vec();
                    *taken = all.len();
                    new
                }
                None => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for HeldWarnings {
    fn drop(&mut self) {
        let kept = HELD.lock().ok().and_then(|mut h| h.take());
        for msg in kept.map(|(all, _)| all).unwrap_or_default() {
            eprintln!("kvm-watcher: warning: {msg}");
        }
    }
}

/// Runs `f` on stdout, for one-shot reports (doctor, vms, completions, the man
/// page, the demo): a closed pipe (`| head`) ends it quietly, any other write
/// error is a runtime failure. Errors of `f` that are not writes pass through.
pub fn to_stdout(f: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>) -> anyhow::Result<()> {
    /// Stdout that remembers why a write failed.
    struct Recording<'a> {
        out: io::StdoutLock<'a>,
        failed: Option<io::ErrorKind>,
    }
    impl Write for Recording<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let r = self.out.write(buf);
            if let Err(e) = &r {
                self.failed.get_or_insert(e.kind());
            }
            r
        }
        fn flush(&mut self) -> io::Result<()> {
            let r = self.out.flush();
            if let Err(e) = &r {
                self.failed.get_or_insert(e.kind());
            }
            r
        }
    }
    let mut out = Recording {
        out: io::stdout().lock(),
        failed: None,
    };
    let result = f(&mut out).and_then(|()| Ok(out.flush()?));
    match (result, out.failed) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(io::ErrorKind::BrokenPipe)) => Ok(()),
        (Err(e), Some(_)) => Err(anyhow::anyhow!("cannot write the output ({e})")),
        (Err(e), None) => Err(e),
    }
}

/// Fails at once where stdout certainly cannot take what a report would
/// write (a full device or file system), so
/// that a report that takes time to gather (`doctor`) fails before the work,
/// not after it. Anything else is found when written, as always.
pub fn check_stdout() -> anyhow::Result<()> {
    // SAFETY: fstat/fstatvfs on fd 1 into zeroed structs we own.
    let full = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let mut vfs: libc::statvfs = std::mem::zeroed();
        if libc::fstat(1, &mut st) != 0 {
            return Ok(());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 7) {
            true // /dev/full
        } else {
            kind == libc::S_IFREG && libc::fstatvfs(1, &mut vfs) == 0 && vfs.f_bfree == 0
        }
    };
    if full {
        anyhow::bail!(
            "cannot write the output ({})",
            io::Error::from_raw_os_error(libc::ENOSPC)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::terminal_safe;

    #[test]
    fn names_cannot_drive_the_terminal() {
        assert_eq!(terminal_safe("web-01 (prod)"), "web-01 (prod)");
        assert_eq!(terminal_safe("vm\nVM forged"), "vm\\nVM forged");
        assert_eq!(terminal_safe("\x1b[2J\x07x"), "\\u{1b}[2J\\u{7}x");
        assert_eq!(terminal_safe("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(terminal_safe("émoji ✓"), "émoji ✓");
    }

    #[test]
    fn json_keeps_its_strings_but_not_their_terminal_codes() {
        let name = "a\u{202e}b\u{85}\u{7f}\n\u{1b}é";
        let json = serde_json::to_string(&name).unwrap();
        let safe = super::json_safe(&json);
        assert!(
            !safe.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{safe}"
        );
        assert_eq!(serde_json::from_str::<String>(&safe).unwrap(), name);
    }
}
