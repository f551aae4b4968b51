//! Debian's libvirt managing the VMs (tests/libvirt.rs): a daemon to talk
//! to, throwaway domains that are always destroyed and undefined, and what
//! libvirt reports about them (`virsh domstats --vcpu`, QMP through
//! `virsh qemu-monitor-command`).
//!
//! Which daemon: a libvirtd that answers on `qemu:///system` is the host's
//! own and is used as its operator configured it; nothing of it is changed.
//! Otherwise (a fresh CI machine, no systemd) the tests start their own,
//! isolated from the host's libvirt:
//!
//! - libvirtd reads its QEMU driver settings from /etc/libvirt/qemu.conf
//!   and nothing else (no option or environment variable moves it for the
//!   system daemon; `--config` only replaces libvirtd.conf), and a machine
//!   without systemd, cgroup delegation or a security module needs
//!   settings there (`QEMU_CONF` below).
//!   Rather than edit the host's file, the daemon runs in a private mount
//!   namespace (`unshare --mount`, which makes every mount private) where a
//!   directory under the cargo target dir is bind-mounted over
//!   /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
//!   /var/log/libvirt. The host's files stay untouched (the one trace is an
//!   empty /run/libvirt mount point, which libvirt creates anyway); domains,
//!   sockets and logs stay in that directory; the capabilities cache
//!   survives between runs.
//! - Clients reach it through its socket in that directory
//!   (`qemu:///system?socket=...`), so it never answers for the host's
//!   `qemu:///system` and never clashes with a daemon started later.
//! - `stdio_handler = "file"`: QEMU's output goes to a file, so no virtlogd
//!   is needed (libvirtd does not start one itself, and one started with a
//!   timeout could exit while libvirtd still needs it).
//! - `--timeout`: the daemon exits once idle (no client, no running domain)
//!   for that long, so nothing is left running after the tests; the next
//!   run starts it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::observe::Spawned;

/// What this sandbox needs (no systemd, no cgroup delegation, no SELinux or
/// AppArmor, root-owned files) for libvirt to start QEMU, and QEMU's
/// output in a file instead of virtlogd.
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"#;

/// Seconds the private daemon lingers once idle.
const IDLE_EXIT_S: u32 = 120;

/// The directories of the private daemon, by their place on the host.
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
];

/// The prefix of every test domain's name: a comma and a space, which
/// libvirt passes to QEMU as `-name guest=kw,,lv test-...`.
pub const NAME_PREFIX: &str = "kw,lv test-";

/// A libvirt daemon the tests talk to.
#[derive(Clone)]
pub struct Libvirt {
    uri: String,
    /// Where QEMU's logs go, for the tests' own daemon.
    logs: Option<PathBuf>,
}

/// `virsh -c URI args`, killed after a minute.
fn virsh_at(uri: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["60", "virsh", "-q", "-c", uri])
        .args(args)
        .output()
        .expect("running virsh")
}

fn answers(uri: &str) -> bool {
    virsh_at(uri, &["version"]).status.success()
}

/// The private daemon's directory: under the cargo target dir of the tests.
fn private_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libvirt")
}

/// Starts (or finds running) the private daemon; its URI.
fn private_daemon() -> Result<String, String> {
    let dir = private_dir();
    let sock = dir.join("run/libvirt-sock");
    let uri = format!("qemu:///system?socket={}", sock.display());
    if answers(&uri) {
        return Ok(uri);
    }
    for (sub, _) in PRIVATE_DIRS {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join("etc").join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write("qemu.conf", QEMU_CONF)?;
    write("libvirtd.conf", "")?;
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut script = String::from("set -e\n");
    for (sub, target) in PRIVATE_DIRS {
        script += &format!(
            "mkdir -p {target}\nmount --bind {} {target}\n",
            quote(&dir.join(sub))
        );
    }
    script += &format!(
        "exec libvirtd --daemon --timeout {IDLE_EXIT_S} --pid-file {} --config /etc/libvirt/libvirtd.conf\n",
        quote(&dir.join("libvirtd.pid"))
    );
    // A daemon of an earlier run that is just exiting holds the pid file:
    // try again until it has gone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .map_err(|e| format!("running unshare: {e}"))?;
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        // libvirtd answers once its drivers are up (the first start probes
        // QEMU's capabilities for a few seconds).
        let up = Instant::now() + Duration::from_secs(30);
        while Instant::now() < up {
            if answers(&uri) {
                return Ok(uri);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Err(format!(
        "libvirtd did not start (logs in {}): {last}",
        dir.display()
    ))
}

impl Libvirt {
    /// A daemon to talk to: the host's if one answers on `qemu:///system`,
    /// else the tests' own (see the module's notes). None (after
    /// `common::skip`) without root or libvirt.
    pub fn connect() -> Option<Libvirt> {
        static START: Mutex<()> = Mutex::new(());
        if !super::require_root() || !super::require_kvm() {
            return None;
        }
        if Command::new("virsh").arg("--version").output().is_err()
            || Command::new("libvirtd").arg("--version").output().is_err()
        {
            super::skip(
                "libvirt is not installed (apt-get install libvirt-daemon-system libvirt-clients)",
            );
            return None;
        }
        let _one = super::one_at_a_time(&START);
        let lv = if answers("qemu:///system") {
            Libvirt {
                uri: "qemu:///system".to_string(),
                logs: None,
            }
        } else {
            Libvirt {
                uri: private_daemon().unwrap_or_else(|e| panic!("{e}")),
                logs: Some(private_dir().join("log/qemu")),
            }
        };
        lv.remove_stale_domains();
        Some(lv)
    }

    /// `virsh args` on this daemon.
    pub fn virsh(&self, args: &[&str]) -> Output {
        virsh_at(&self.uri, args)
    }

    /// `virsh args`, asserting success; its stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Test domains whose test process has gone (killed before its guard
    /// ran): destroyed and undefined.
    fn remove_stale_domains(&self) {
        for name in self.must(&["list", "--all", "--name"]).lines() {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = self.virsh(&["destroy", name]);
                let _ = self.virsh(&["undefine", name]);
            }
        }
    }

    /// Defines `Domain::xml(name)` with this name: `kw,lv test-<pid>-<tag>`.
    pub fn define(&self, tag: &str) -> Domain {
        let name = format!("{NAME_PREFIX}{}-{tag}", std::process::id());
        let path = std::env::temp_dir().join(format!(
            "kvm-watcher-libvirt-{}-{tag}.xml",
            std::process::id()
        ));
        std::fs::write(&path, Domain::xml(&name)).unwrap();
        let out = self.virsh(&["define", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "virsh define: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Domain {
            lv: self.clone(),
            name,
        }
    }
}

/// A defined domain; destroyed and undefined on drop, whatever the test did.
pub struct Domain {
    lv: Libvirt,
    /// Its name.
    pub name: String,
}

/// libvirt's vCPU number -> statistic -> value (`vcpu.N.NAME`, `.sum` and
/// `.cur` dropped; booleans and non-numbers left out).
pub type VcpuStats = BTreeMap<u32, BTreeMap<String, u64>>;

impl Domain {
    /// SeaBIOS with no disk (after its POST it finds no bootable device and
    /// idles in HLT on its 18.2 Hz timer; the other vCPUs halt with
    /// interrupts off once it has counted them), 2 sockets x 3 cores: KVM's
    /// vcpu_id is the APIC id (socket << 2 | core), so libvirt's vCPUs
    /// 3, 4, 5 are KVM's 4, 5, 6. No USB controller or balloon: nothing
    /// but the firmware runs.
    fn xml(name: &str) -> String {
        let name = name
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        format!(
            "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>6</vcpu>
  <cpu><topology sockets='2' cores='3' threads='1'/></cpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"
        )
    }

    /// `virsh CMD [extra] NAME`, asserting success.
    pub fn run(&self, cmd: &str, extra: &[&str]) -> String {
        let mut args = vec![cmd];
        args.extend_from_slice(extra);
        args.push(&self.name);
        self.lv.must(&args)
    }

    /// A QMP command through `virsh qemu-monitor-command`; its `return`.
    pub fn qmp(&self, command: &Value) -> Value {
        let out = self
            .lv
            .must(&["qemu-monitor-command", &self.name, &command.to_string()]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("QMP answer is not JSON ({e}): {out}"));
        v["return"].clone()
    }

    /// The QEMU process running the domain, found by the `-name` argument
    /// libvirt gives it (a comma doubled).
    pub fn pid(&self) -> u32 {
        let want = format!("guest={},debug-threads=on", self.name.replace(',', ",,"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if cmdline.split(|&b| b == 0).any(|a| a == want.as_bytes()) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no QEMU process with -name {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Per libvirt vCPU number (QEMU's cpu-index): (thread id, qom path,
    /// socket, core), as QEMU reports them (`query-cpus-fast`).
    pub fn vcpus(&self) -> BTreeMap<u32, (u32, String, u64, u64)> {
        let cpus = self.qmp(&serde_json::json!({"execute": "query-cpus-fast"}));
        cpus.as_array()
            .expect("query-cpus-fast returns a list")
            .iter()
            .map(|c| {
                let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("{c}"));
                (
                    n(&c["cpu-index"]) as u32,
                    (
                        n(&c["thread-id"]) as u32,
                        c["qom-path"].as_str().unwrap_or_default().to_string(),
                        n(&c["props"]["socket-id"]),
                        n(&c["props"]["core-id"]),
                    ),
                )
            })
            .collect()
    }

    /// `virsh domstats --vcpu`, parsed.
    pub fn vcpu_stats(&self) -> VcpuStats {
        let out = self.lv.must(&["domstats", "--vcpu", &self.name]);
        let mut stats = VcpuStats::new();
        for line in out.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let Some(rest) = key.strip_prefix("vcpu.") else {
                continue;
            };
            let Some((n, field)) = rest.split_once('.') else {
                continue;
            };
            let (Ok(n), Ok(value)) = (n.parse::<u32>(), value.parse::<u64>()) else {
                continue;
            };
            let field = field.trim_end_matches(".sum").trim_end_matches(".cur");
            stats.entry(n).or_default().insert(field.to_string(), value);
        }
        stats
    }

    /// KVM's `halt_wait_hist` of each vCPU (summed), by QOM path: QMP
    /// `query-stats` through libvirt, since `domstats` leaves histograms
    /// out.
    pub fn halts_waited(&self) -> BTreeMap<String, u64> {
        let stats = self.qmp(&serde_json::json!({
            "execute": "query-stats",
            "arguments": {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["halt_wait_hist"]}]}
        }));
        stats
            .as_array()
            .expect("query-stats returns a list")
            .iter()
            .map(|s| {
                let hist = s["stats"][0]["value"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no halt_wait_hist: {s}"));
                (
                    s["qom-path"].as_str().unwrap_or_default().to_string(),
                    hist.iter().map(|b| b.as_u64().unwrap_or(0)).sum(),
                )
            })
            .collect()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.lv.virsh(&["destroy", &self.name]);
        let _ = self.lv.virsh(&["undefine", &self.name]);
        // QEMU's log is kept when the test failed.
        if let Some(dir) = &self.lv.logs
            && !std::thread::panicking()
        {
            let _ = std::fs::remove_file(dir.join(format!("{}.log", self.name)));
        }
    }
}

/// Waits (up to 60 s) until vCPU 0 idles on SeaBIOS's timer: 5 or more
/// halts it slept in (KVM's halt_wait_hist) within half a second, after the
/// POST. Halt exits alone are not enough: the POST's halts need not sleep,
/// and a restarted domain once made 5 halt exits in its first half second
/// with 4 halts slept in all (the lifecycle test wants 5).
pub fn wait_idle(dom: &Domain) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let bsp = dom.vcpus()[&0].1.clone();
    let slept = || dom.halts_waited().get(&bsp).copied().unwrap_or(0);
    let mut last = slept();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = slept();
        if now >= last + 5 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SeaBIOS never idled: vCPU 0 slept in {now} halts"
        );
        last = now;
    }
}

/// Detaches the watcher (SIGTERM) and returns its records.
pub fn stop(w: Spawned) -> Vec<Value> {
    w.signal(libc::SIGTERM);
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "watch failed: {err}");
    super::observe::records(&out)
}

/// Sums of `fields` of the `vcpu_interval` records of thread `tid`, with
/// the records' vcpu_id and comm (None without a record).
pub fn totals(
    recs: &[Value],
    tid: u32,
    fields: &[&str],
) -> (BTreeMap<String, u64>, Option<(u64, String)>) {
    let mut sums = BTreeMap::new();
    let mut who = None;
    for r in super::observe::of(recs, "vcpu_interval") {
        if super::observe::u(&r["tid"]) != tid as u64 {
            continue;
        }
        if let Some(id) = r["vcpu_id"].as_u64() {
            who = Some((id, r["comm"].as_str().unwrap_or_default().to_string()));
        }
        for f in fields {
            *sums.entry(f.to_string()).or_default() += r[*f].as_u64().unwrap_or(0);
        }
    }
    (sums, who)
}

/// KVM's time halted of libvirt's vCPU `n` between two reads, ns: sleeping,
/// and polling that caught the wake-up or did not.
pub fn halted_ns(before: &VcpuStats, after: &VcpuStats, n: u32) -> u64 {
    ["halt_wait_ns", "halt_poll_success_ns", "halt_poll_fail_ns"]
        .iter()
        .map(|f| delta(before, after, n, f))
        .sum()
}

/// The change of libvirt's `vcpu.N.<field>` between two reads.
pub fn delta(before: &VcpuStats, after: &VcpuStats, n: u32, field: &str) -> u64 {
    let get = |s: &VcpuStats| {
        *s[&n]
            .get(field)
            .unwrap_or_else(|| panic!("domstats has no vcpu.{n}.{field}: {:?}", s[&n].keys()))
    };
    get(after) - get(before)
}

/// kvm:kvm_vcpu_wakeup's `waited` is false for a halt that halt polling
/// caught, and also, when the polling window is 0, for a halt whose wake-up
/// came before the vCPU slept: KVM's halt_successful_poll counts only the
/// first, and no KVM statistic times the second (kvm_vcpu_halt() updates
/// them only when it polled). kvm-watcher's polled wake-ups (not waited)
/// are KVM's successful polls plus such halts, which are among the halts
/// KVM did not poll (wake-ups - halt_attempted_poll), and each lasted the
/// microseconds of a wake-up that never slept. Returns how many there
/// were, None if the figures do not fit that.
pub fn unpolled_halts(
    (wakeups, polled, halt_ns): (u64, u64, u64),
    kvm_polled: u64,
    kvm_attempted: u64,
    kvm_halt_ns: u64,
) -> Option<u64> {
    let extra = polled.checked_sub(kvm_polled)?;
    let extra_ns = halt_ns.checked_sub(kvm_halt_ns)?;
    (extra <= wakeups.saturating_sub(kvm_attempted) && extra_ns <= extra * 100_000).then_some(extra)
}
