//! QEMU as the matrix's Linux guest runs it (tests/matrix_guest/linux.rs):
//! its QMP connection, the process, the boot parameters this nested
//! backend needs, and where a stalled guest is.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// QOM path -> statistic -> value (histograms summed).
pub type Stats = BTreeMap<String, BTreeMap<String, u64>>;

/// A QMP connection.
pub struct Qmp {
    out: UnixStream,
    inp: BufReader<UnixStream>,
}

impl Qmp {
    pub fn connect(path: &str) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("QMP {path}: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let inp = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Qmp { out: s, inp };
        q.line()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        self.inp
            .read_line(&mut l)
            .map_err(|e| format!("QMP: {e}"))?;
        serde_json::from_str(&l).map_err(|e| format!("QMP said {l:?}: {e}"))
    }

    /// Runs `command`; its `return` (events on the way are skipped).
    pub fn cmd(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let c = json!({"execute": command, "arguments": arguments});
        writeln!(self.out, "{c}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            ensure!(v.get("error").is_none(), "QMP {command}: {v}");
        }
    }

    pub fn stats(&mut self) -> Result<Stats, String> {
        let r = self.cmd("query-stats", json!({"target": "vcpu"}))?;
        let mut out = Stats::new();
        for s in r.as_array().into_iter().flatten() {
            let qom = s["qom-path"].as_str().unwrap_or_default().to_string();
            for x in s["stats"].as_array().into_iter().flatten() {
                let v = &x["value"];
                let n = match v.as_array() {
                    Some(h) => h.iter().map(|b| b.as_u64().unwrap_or(0)).sum(),
                    None => v.as_u64().unwrap_or(0),
                };
                let name = x["name"].as_str().unwrap_or_default().to_string();
                out.entry(qom.clone()).or_default().insert(name, n);
            }
        }
        Ok(out)
    }
}

/// QEMU, killed if still running when dropped.
pub struct Qemu(pub Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lpj=` and `tsc_early_khz=` for the guest, from this kernel's boot log:
/// without them the guest stalls in early boot on this nested backend.
pub fn timing() -> Result<(String, String), String> {
    let out = Command::new("dmesg")
        .output()
        .map_err(|e| format!("dmesg: {e}"))?;
    let log = String::from_utf8_lossy(&out.stdout);
    let lpj = log
        .split("lpj=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .ok_or("no lpj= in the boot log")?;
    let mhz = log
        .split("tsc: Detected ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|m| m.parse::<f64>().ok())
        .ok_or("no TSC frequency in the boot log")?;
    Ok((lpj.to_string(), format!("{}", (mhz * 1000.0) as u64)))
}

/// The function of this kernel at `rip` of the guest, which runs the same
/// image without KASLR: the same offset from `_text` in /proc/kallsyms.
pub fn symbol(rip: u64) -> String {
    const NOKASLR_TEXT: u64 = 0xffff_ffff_8100_0000;
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let syms: Vec<(u64, &str)> = kallsyms
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let a = u64::from_str_radix(f.next()?, 16).ok()?;
            f.next()?;
            Some((a, f.next()?))
        })
        .collect();
    let text = syms.iter().find(|s| s.1 == "_text").map(|s| s.0);
    let at = text.and_then(|t| Some(t + rip.checked_sub(NOKASLR_TEXT)?));
    at.and_then(|at| {
        let s = syms.iter().filter(|s| s.0 <= at).max_by_key(|s| s.0)?;
        Some(format!("{}+{:#x}", s.1, at - s.0))
    })
    .unwrap_or_else(|| format!("{rip:#x}"))
}

/// Where the stalled guest's vCPUs are: their functions (HMP `info registers`).
pub fn where_stalled(q: &mut Qmp) -> String {
    let regs = q
        .cmd(
            "human-monitor-command",
            json!({"command-line": "info registers -a"}),
        )
        .unwrap_or_default();
    let rips: Vec<String> = crate::common::qemu::rips(regs.as_str().unwrap_or_default())
        .into_iter()
        .map(symbol)
        .collect();
    rips.join(", ")
}
