//! Finding KVM virtual machines from /proc: processes that hold a
//! `anon_inode:kvm-vm` file descriptor, their VMM and their vCPU threads.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::output::terminal_safe;

/// A vCPU thread of a VMM process.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuThreadInfo {
    /// Thread id.
    pub tid: u32,
    /// Thread name (QEMU: `CPU 0/KVM`).
    pub comm: String,
    /// vCPU id, when the thread sits in `ioctl(vcpu_fd, ...)` right now (from
    /// /proc/PID/task/TID/syscall); otherwise unknown.
    pub vcpu_id: Option<u32>,
}

/// A process that holds a KVM VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmProcess {
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// Which VMM this looks like: qemu, firecracker, cloud-hypervisor, crosvm, kvm-watcher, or the process name.
    pub vmm: String,
    /// The VM's name as its fleet knows it: QEMU/libvirt `-name guest=...`
    /// (QEMU's `,,` read as a comma; else `-uuid`), for a KubeVirt domain
    /// `<namespace>_<name>` its `<name>`; Firecracker `--id`, cloud-hypervisor's
    /// API socket name, `kvm-watcher vm --name`; the process name otherwise.
    pub name: String,
    /// The KubeVirt namespace of the VM (null for other VMs).
    pub namespace: Option<String>,
    /// The VM's UUID (QEMU's `-uuid`), when its command line gives one.
    pub uuid: Option<String>,
    /// KVM VMs it holds (usually 1).
    pub vms: u32,
    /// vCPU file descriptors it holds, by vCPU id.
    pub vcpu_ids: Vec<u32>,
    /// Threads that look like vCPU threads (in a vCPU ioctl now, or named like one).
    pub vcpu_threads: Vec<VcpuThreadInfo>,
    /// The name the VMM was given, when it differs from `name` (a KubeVirt
    /// domain's `<namespace>_<name>`).
    #[serde(skip)]
    pub domain: Option<String>,
}

impl VmProcess {
    /// Its identity.
    pub fn id(&self) -> VmId {
        VmId {
            name: self.name.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            uuid: self.uuid.clone().unwrap_or_default(),
            vmm: self.vmm.clone(),
            domain: self.domain.clone(),
        }
    }

    /// The name shown for it (see [`VmId::display`]).
    pub fn display(&self) -> String {
        self.id().display()
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The targets of a process's file descriptors, by fd number.
fn fd_targets(pid: u32) -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(target) = fs::read_link(entry.path()) {
            out.push((fd, target.to_string_lossy().into_owned()));
        }
    }
    Ok(out)
}

fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value of option `opt` in `args` (`opt value` or `opt=value`).
fn option_value<'a>(args: &'a [String], opt: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == opt {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(opt)?.strip_prefix('=')
        }
    })
}

/// Who a VM is to its fleet: its name, its KubeVirt namespace, its UUID.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct VmId {
    /// The VM's name (see [`VmProcess::name`]).
    pub name: String,
    /// KubeVirt namespace; empty for other VMs.
    pub namespace: String,
    /// `-uuid`, or empty.
    pub uuid: String,
    /// The VMM (see [`VmProcess::vmm`]).
    pub vmm: String,
    /// The name the VMM was given, when it differs from `name` (a KubeVirt
    /// domain's `<namespace>_<name>`).
    pub domain: Option<String>,
}

impl VmId {
    /// The name shown in tables, JSON, CSV and top: `<namespace>/<name>` for
    /// a KubeVirt VM (no libvirt domain name holds a `/`), the name otherwise.
    pub fn display(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }

    /// True when `--vm arg` means this VM: its name, its `<namespace>/<name>`
    /// or the domain name the VMM was given.
    pub fn matches(&self, arg: &str) -> bool {
        arg == self.name || arg == self.display() || self.domain.as_deref() == Some(arg)
    }
}

/// The parts of a QEMU option value (`guest=a,,b,debug-threads=on`): QEMU's
/// `,,` is a literal comma; a first part without `=` is the implied key's value.
pub fn qemu_opts(value: &str) -> Vec<(Option<String>, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            // Only the first part may be a bare value (`-name foo,process=bar`).
            match p.split_once('=') {
                Some((k, v)) if i > 0 || !k.is_empty() => (Some(k.to_string()), v.to_string()),
                _ => (None, p),
            }
        })
        .collect()
}

/// The value of key `key` of a QEMU option (`implied` names a bare first value).
fn qemu_opt(value: &str, key: &str, implied: bool) -> Option<String> {
    qemu_opts(value).into_iter().find_map(|(k, v)| match k {
        Some(k) if k == key => Some(v),
        None if implied => Some(v),
        _ => None,
    })
}

/// True for a QEMU that KubeVirt's virt-launcher started: its command line
/// names KubeVirt (its SMBIOS manufacturer `KubeVirt`, its sockets under
/// `/var/run/kubevirt-private/`), or it runs in a Kubernetes pod's cgroup.
pub fn is_kubevirt(args: &[String], cgroup: &str) -> bool {
    args.iter()
        .any(|a| a.to_ascii_lowercase().contains("kubevirt"))
        || cgroup.contains("kubepods")
}

/// The identity of the VM run by `vmm` with command line `args` (process
/// name `comm`, cgroup file `cgroup`).
pub fn vm_id(vmm: &str, args: &[String], comm: &str, cgroup: &str) -> VmId {
    let named = match vmm {
        "qemu" => option_value(args, "-name")
            .and_then(|v| qemu_opt(v, "guest", true))
            .or_else(|| option_value(args, "-uuid").map(str::to_string)),
        "firecracker" => option_value(args, "--id").map(str::to_string),
        "cloud-hypervisor" => option_value(args, "--api-socket").map(|s| {
            let path = s
                .split(',')
                .find_map(|kv| kv.strip_prefix("path="))
                .unwrap_or(s);
            Path::new(path)
                .file_stem()
                .map_or_else(|| path.to_string(), |f| f.to_string_lossy().into_owned())
        }),
        "crosvm" => option_value(args, "--name")
            .or_else(|| option_value(args, "--socket"))
            .map(str::to_string),
        "kvm-watcher" => option_value(args, "--name").map(str::to_string),
        _ => None,
    };
    let name = named
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| comm.to_string());
    let uuid = match vmm {
        "qemu" => option_value(args, "-uuid").unwrap_or_default().to_string(),
        _ => String::new(),
    };
    let mut id = VmId {
        name,
        namespace: String::new(),
        uuid,
        vmm: vmm.to_string(),
        domain: None,
    };
    // KubeVirt names its libvirt domain `<namespace>_<name>`; neither part
    // can hold `_` (Kubernetes names are DNS labels and subdomains).
    if vmm == "qemu"
        && is_kubevirt(args, cgroup)
        && let Some((ns, n)) = id.name.split_once('_')
        && !ns.is_empty()
        && !n.is_empty()
    {
        let (ns, n) = (ns.to_string(), n.to_string());
        id.domain = Some(std::mem::replace(&mut id.name, n));
        id.namespace = ns;
    }
    id
}

/// The name of the VM in process `pid` run by `vmm` (see [`VmProcess::name`]).
pub fn vm_name(vmm: &str, args: &[String], comm: &str) -> String {
    vm_id(vmm, args, comm, "").name
}

fn vmm_name(pid: u32, comm: &str) -> String {
    let args = cmdline(pid);
    let exe = args.first().map(|a| a.to_lowercase()).unwrap_or_default();
    let hay = format!("{exe} {}", comm.to_lowercase());
    for (needle, name) in [
        ("qemu", "qemu"),
        ("firecracker", "firecracker"),
        ("cloud-hypervisor", "cloud-hypervisor"),
        ("crosvm", "crosvm"),
        ("kvm-watcher", "kvm-watcher"),
    ] {
        if hay.contains(needle) {
            return name.to_string();
        }
    }
    comm.to_string()
}

/// The VM process `pid`, or `None` if it holds no KVM VM (or has gone).
pub fn vm_process(pid: u32) -> Option<VmProcess> {
    let fds = fd_targets(pid).ok()?;
    let vms = fds.iter().filter(|(_, t)| t == "anon_inode:kvm-vm").count() as u32;
    if vms == 0 {
        return None;
    }
    let vcpu_fds: Vec<(u32, u32)> = fds
        .iter()
        .filter_map(|(fd, t)| {
            let id = t.strip_prefix("anon_inode:kvm-vcpu:")?.parse().ok()?;
            Some((*fd, id))
        })
        .collect();
    let comm = read_trimmed(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut vcpu_threads = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if is_kernel_worker(&task.path()) {
                continue; // e.g. KVM's kvm-nx-lpage-recovery worker, which mirrors a vCPU's syscall
            }
            let tcomm = read_trimmed(task.path().join("comm")).unwrap_or_default();
            let vcpu_id = read_trimmed(task.path().join("syscall"))
                .and_then(|s| vcpu_in_syscall(&s))
                .and_then(|fd| vcpu_fds.iter().find(|(f, _)| *f == fd).map(|(_, id)| *id));
            if vcpu_id.is_some() || looks_like_vcpu_thread(&tcomm) {
                vcpu_threads.push(VcpuThreadInfo {
                    tid,
                    comm: tcomm,
                    vcpu_id,
                });
            }
        }
    }
    vcpu_threads.sort_by_key(|t| t.tid);
    let mut vcpu_ids: Vec<u32> = vcpu_fds.iter().map(|(_, id)| *id).collect();
    vcpu_ids.sort_unstable();
    let vmm = vmm_name(pid, &comm);
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let id = vm_id(&vmm, &cmdline(pid), &comm, &cgroup);
    Some(VmProcess {
        pid,
        name: id.name,
        namespace: (!id.namespace.is_empty()).then_some(id.namespace),
        uuid: (!id.uuid.is_empty()).then_some(id.uuid),
        domain: id.domain,
        vmm,
        comm,
        vms,
        vcpu_ids,
        vcpu_threads,
    })
}

/// True for kernel threads and user workers (PF_KTHREAD, PF_USER_WORKER) that
/// live in a VMM process but are not its threads.
fn is_kernel_worker(task: &Path) -> bool {
    const PF_USER_WORKER: u64 = 0x4000;
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Some(stat) = read_trimmed(task.join("stat")) else {
        return false;
    };
    // Fields after the parenthesised comm: state is field 3, flags field 9.
    let Some(after_comm) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return false;
    };
    after_comm
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & (PF_USER_WORKER | PF_KTHREAD) != 0)
}

/// The fd of `ioctl(fd, KVMIO...)` from a /proc/.../syscall line, if that is what the thread is in.
fn vcpu_in_syscall(line: &str) -> Option<u32> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "16" {
        return None; // not ioctl (x86_64)
    }
    let fd = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    let cmd = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    ((cmd >> 8) & 0xff == 0xae).then_some(fd as u32)
}

/// The VMM's number of a vCPU thread, from its name: QEMU's and
/// `kvm-watcher vm`'s `CPU n/KVM`, Firecracker's `fc_vcpu n`,
/// cloud-hypervisor's `vcpun`, crosvm's `crosvm_vcpun`.
pub fn vmm_index(comm: &str) -> Option<u32> {
    let digits = if let Some(rest) = comm.strip_prefix("CPU ") {
        rest.strip_suffix("/KVM")?
    } else if let Some(rest) = comm.strip_prefix("fc_vcpu ") {
        rest
    } else if let Some(rest) = comm.strip_prefix("crosvm_vcpu") {
        rest
    } else {
        comm.strip_prefix("vcpu")?
    };
    digits.parse().ok()
}

fn looks_like_vcpu_thread(comm: &str) -> bool {
    // QEMU and kvm-watcher vm: "CPU 0/KVM"; Firecracker: "fc_vcpu 0"; cloud-hypervisor: "vcpu0".
    (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
        || comm.starts_with("fc_vcpu")
        || comm.starts_with("vcpu")
}

/// Every process on the host that holds a KVM VM, by pid.
pub fn list_vms() -> Vec<VmProcess> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                && let Some(vm) = vm_process(pid)
            {
                out.push(vm);
            }
        }
    }
    out.sort_by_key(|v| v.pid);
    out
}

/// How many processes' file descriptors this process may not read: VMs
/// among them would be invisible.
fn uninspectable_processes() -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|s| s.parse::<u32>().is_ok())
        })
        .filter(|e| {
            fs::read_dir(e.path().join("fd"))
                .is_err_and(|err| err.kind() == std::io::ErrorKind::PermissionDenied)
        })
        .count()
}

/// Whether this process has capability `bit` (e.g. 19, CAP_SYS_PTRACE) in
/// its effective set, from /proc/self/status.
pub fn has_capability(bit: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1u64 << bit) != 0)
}

/// The process (thread group) thread `tid` belongs to, from /proc/TID/status.
fn tgid_of(tid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Checks that `pid` is a running process that holds a KVM VM; a usage error otherwise.
pub fn check_vmm_pid(pid: u32) -> anyhow::Result<()> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        crate::usage_bail!("--pid {pid}: no such process; list KVM VMs with `kvm-watcher vms`");
    }
    if let Some(tgid) = tgid_of(pid)
        && tgid != pid
    {
        crate::usage_bail!(
            "--pid {pid}: is a thread of process {tgid}; pass the process id (-p {tgid}), or this thread with --tid {pid}"
        );
    }
    if let Err(e) = fd_targets(pid)
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        anyhow::bail!(
            "--pid {pid}: cannot read its file descriptors ({e}); inspecting another user's VMM needs root or CAP_SYS_PTRACE"
        );
    }
    if vm_process(pid).is_none() {
        crate::usage_bail!(
            "--pid {pid}: process is not a VMM (it holds no KVM VM file descriptor); list KVM VMs with `kvm-watcher vms`"
        );
    }
    Ok(())
}

/// Checks that `tid` is a running thread of a process that holds a KVM VM; a
/// usage error otherwise (thread id 0 would turn the in-kernel filter off).
pub fn check_vcpu_tid(tid: u32, pids: &[u32]) -> anyhow::Result<()> {
    if tid == 0 {
        crate::usage_bail!(
            "--tid 0: thread ids start at 1; list vCPU threads with `kvm-watcher vms`"
        );
    }
    let Some(tgid) = tgid_of(tid) else {
        crate::usage_bail!("--tid {tid}: no such thread; list vCPU threads with `kvm-watcher vms`");
    };
    let Some(vm) = vm_process(tgid) else {
        crate::usage_bail!(
            "--tid {tid}: its process {tgid} is not a VMM (it holds no KVM VM file descriptor); list vCPU threads with `kvm-watcher vms`"
        );
    };
    if !pids.is_empty() && !pids.contains(&tgid) {
        crate::usage_bail!(
            "--tid {tid}: a thread of process {tgid}, which -p/--vm leave out: nothing would match; drop one of the filters"
        );
    }
    // Every vCPU of the VM has its thread found, and this is none of them.
    let found = vm.vcpu_threads.len() >= vm.vcpu_ids.len();
    if found && !vm.vcpu_threads.iter().any(|t| t.tid == tid) {
        crate::usage_bail!(
            "--tid {tid}: not a vCPU thread of VM pid {tgid} (its vCPU threads: {}); list them with `kvm-watcher vms`",
            vm.vcpu_threads
                .iter()
                .map(|t| t.tid.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The running kernel's (major, minor) version, from /proc/sys/kernel/osrelease.
pub fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// User + system CPU time in clock ticks from a /proc/PID/stat line.
fn cpu_ticks_of_stat(stat: &str) -> Option<u64> {
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let after_comm = stat.rsplit_once(')')?.1;
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// True while process `pid` exists: the one liveness check of a VM. Also
/// true for the id of any live thread (`/proc/TID` exists, unlisted), for
/// a thread whose process is not known.
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// True while thread `tid` of process `pid` exists: the one liveness
/// check of a vCPU thread (a thread id reused by another process is not it).
pub fn thread_alive(pid: u32, tid: u32) -> bool {
    Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// CPU time this process used so far (user + system), in seconds.
pub fn own_cpu_seconds() -> Option<f64> {
    let ticks = cpu_ticks_of_stat(&fs::read_to_string("/proc/self/stat").ok()?)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// A thread's scheduler accounting from `/proc/.../schedstat` (the kernel's
/// sched_info, kept with CONFIG_SCHED_INFO): the figures run-delay's BPF
/// side reads at each switch-in, and the ground truth its tests use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedstat {
    /// Time on a CPU, ns.
    pub run_ns: u64,
    /// Time runnable but waiting on a run queue, ns.
    pub wait_ns: u64,
    /// Timeslices run: the times the thread was switched in.
    pub timeslices: u64,
}

impl Schedstat {
    /// Parses the file's text, "RUN_NS WAIT_NS TIMESLICES\n"; None unless
    /// its first three fields are numbers (fields a later kernel may add
    /// after them are ignored).
    pub fn parse(text: &str) -> Option<Schedstat> {
        let mut f = text.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some(Schedstat {
            run_ns: f.next()??,
            wait_ns: f.next()??,
            timeslices: f.next()??,
        })
    }

    fn read(path: &str) -> Option<Schedstat> {
        Schedstat::parse(&fs::read_to_string(path).ok()?)
    }
}

/// Thread `tid` of process `pid` (`/proc/PID/task/TID/schedstat`); None once
/// it has gone, or on a kernel without schedstat.
pub fn schedstat(pid: u32, tid: u32) -> Option<Schedstat> {
    Schedstat::read(&format!("/proc/{pid}/task/{tid}/schedstat"))
}

/// Thread `tid` of whichever process holds it (`/proc/TID/schedstat`).
pub fn thread_schedstat(tid: u32) -> Option<Schedstat> {
    Schedstat::read(&format!("/proc/{tid}/schedstat"))
}

/// The calling thread (`/proc/thread-self/schedstat`).
pub fn own_schedstat() -> Option<Schedstat> {
    Schedstat::read("/proc/thread-self/schedstat")
}

/// This process's resident memory, in bytes.
pub fn own_rss_bytes() -> Option<u64> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The running kernel's release (`6.1.0-18-cloud-amd64`).
pub fn kernel_release() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "?".into())
}

/// VM identities by pid, looked up once per pid.
#[derive(Default)]
pub struct VmNames {
    cache: std::collections::HashMap<u32, Named>,
}

/// What was looked up for a pid.
struct Named {
    id: Option<VmId>,
    /// The process's start time (clock ticks after boot): a pid reused by
    /// another process starts later.
    started: Option<u64>,
    /// When it was first found gone.
    gone_since: Option<std::time::Instant>,
}

/// The start time of process `pid` (field 22 of /proc/PID/stat), None if
/// it is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl VmNames {
    /// The name shown for the VM in process `pid` (see [`VmId::display`]),
    /// or None if it holds no VM (any more).
    pub fn get(&mut self, pid: u32) -> Option<String> {
        self.id(pid).map(|id| id.display())
    }

    /// Forgets what it looked up for `pid` (gone; the pid may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
    }

    /// Forgets the processes gone for `keep` or longer (what is still to be
    /// written about them was by then) and pids now another process's: a
    /// long watch looks up every VM that ever ran, and pids are reused.
    pub fn prune(&mut self, keep: std::time::Duration) {
        let now = std::time::Instant::now();
        self.cache.retain(|&pid, n| match start_time(pid) {
            Some(s) => n.started == Some(s),
            None => now.duration_since(*n.gone_since.get_or_insert(now)) < keep,
        });
    }

    /// The identity of the VM in process `pid`, or None if it holds no VM (any more).
    pub fn id(&mut self, pid: u32) -> Option<VmId> {
        self.cache
            .entry(pid)
            .or_insert_with(|| {
                let started = start_time(pid);
                Named {
                    id: vm_process(pid).map(|v| v.id()),
                    started,
                    gone_since: None,
                }
            })
            .id
            .clone()
    }
}

/// The pids of the running VMs called `name`; a usage error if there are none.
pub fn pids_of_vm(name: &str) -> anyhow::Result<Vec<u32>> {
    let vms = list_vms();
    let pids: Vec<u32> = vms
        .iter()
        .filter(|v| v.id().matches(name))
        .map(|v| v.pid)
        .collect();
    if pids.is_empty() {
        let names: Vec<String> = vms
            .iter()
            .map(|v| format!("{} (pid {})", terminal_safe(&v.display()), v.pid))
            .collect();
        crate::usage_bail!(
            "--vm {}: no running VM has that name; running: {}",
            terminal_safe(name),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    Ok(pids)
}

/// `kvm-watcher vms`: prints the VMs running on this host (only those of
/// the VMM processes `only`, if given).
pub fn print_vms(only: Option<&[u32]>, json: bool, w: &mut dyn Write) -> anyhow::Result<()> {
    let mut vms = list_vms();
    if let Some(only) = only {
        vms.retain(|v| only.contains(&v.pid));
    }
    let hidden = uninspectable_processes();
    if hidden > 0 {
        let what = format!(
            "{hidden} processes of other users cannot be inspected (their file descriptors are not readable): run as root or with CAP_SYS_PTRACE"
        );
        if vms.is_empty() {
            anyhow::bail!("no KVM VM found, but {what}");
        }
        crate::output::warn(&format!("only this user's VMs are listed: {what}"));
    }
    if json {
        let json = serde_json::to_string_pretty(&vms)?;
        writeln!(w, "{}", crate::output::json_safe(&json))?;
        return Ok(());
    }
    if vms.is_empty() {
        writeln!(
            w,
            "no KVM VMs running (no process holds an anon_inode:kvm-vm file descriptor)"
        )?;
        return Ok(());
    }
    print_vm_table(&vms, w)?;
    Ok(())
}

/// Prints VMs as a table: pid, VMM, name, vCPUs and vCPU threads.
pub fn print_vm_table(vms: &[VmProcess], w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        w,
        "{:<8} {:<17} {:<24} {:<6} VCPU THREADS (tid/name/vcpu)",
        "PID", "VMM", "NAME", "VCPUS"
    )?;
    for vm in vms {
        let threads: Vec<String> = vm
            .vcpu_threads
            .iter()
            .map(|t| {
                format!(
                    "{}/{}/{}",
                    t.tid,
                    terminal_safe(&t.comm),
                    t.vcpu_id.map_or("?".into(), |v| v.to_string())
                )
            })
            .collect();
        writeln!(
            w,
            "{:<8} {:<17} {:<24} {:<6} {}",
            vm.pid,
            terminal_safe(&vm.vmm),
            terminal_safe(&vm.display()),
            vm.vcpu_ids.len(),
            threads.join(", ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// A pid still running is kept, one that exited is kept for `keep` and
    /// then forgotten, one reused by a later process is looked up again.
    #[test]
    fn vmm_numbers_from_thread_names() {
        assert_eq!(vmm_index("CPU 3/KVM"), Some(3));
        assert_eq!(vmm_index("fc_vcpu 2"), Some(2));
        assert_eq!(vmm_index("vcpu12"), Some(12));
        assert_eq!(vmm_index("crosvm_vcpu1"), Some(1));
        assert_eq!(vmm_index("CPU 3/TCG"), None);
        assert_eq!(vmm_index("qemu-system-x86"), None);
        assert_eq!(vmm_index("vcpu"), None);
    }

    #[test]
    fn names_of_gone_and_reused_pids_are_forgotten() {
        let me = std::process::id();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let mut names = VmNames::default();
        names.get(me);
        names.get(gone);
        names.cache.insert(
            1,
            Named {
                id: None,
                started: Some(u64::MAX),
                gone_since: None,
            },
        );
        assert!(start_time(me).is_some() && start_time(gone).is_none());
        names.prune(std::time::Duration::from_secs(60));
        let mut kept: Vec<u32> = names.cache.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            [me, gone],
            "pid 1 started at another time: looked up again"
        );
        names.prune(std::time::Duration::ZERO);
        assert_eq!(names.cache.keys().copied().collect::<Vec<_>>(), [me]);
    }

    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn vm_names_come_from_each_vmms_own_option() {
        let q = args("qemu-system-x86_64 -accel kvm -name guest=web1,debug-threads=on -m 1G");
        assert_eq!(vm_name("qemu", &q, "qemu-system-x86"), "web1");
        let q = args("qemu-system-x86_64 -name db2,process=qemu-db2");
        assert_eq!(vm_name("qemu", &q, "qemu-system-x86"), "db2");
        let q = args("qemu-system-x86_64 -uuid 5f0e8b9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(
            vm_name("qemu", &q, "qemu-system-x86"),
            "5f0e8b9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
        );
        let f = args("firecracker --api-sock /run/fc.sock --id vm-42");
        assert_eq!(vm_name("firecracker", &f, "firecracker"), "vm-42");
        let c = args("cloud-hypervisor --api-socket path=/run/ch/edge7.sock --cpus boot=2");
        assert_eq!(vm_name("cloud-hypervisor", &c, "cloud-hyperviso"), "edge7");
        let k = args("kvm-watcher vm --name=fleet-vm --vcpus 2");
        assert_eq!(vm_name("kvm-watcher", &k, "kvm-watcher"), "fleet-vm");
        // Nothing to go by: the process name.
        assert_eq!(
            vm_name("qemu", &args("qemu-system-x86_64 -m 1G"), "qemu-system-x86"),
            "qemu-system-x86"
        );
        assert_eq!(vm_name("myvmm", &args("myvmm --name x"), "myvmm"), "myvmm");
    }

    #[test]
    fn libvirt_names_keep_their_commas_and_kubevirt_domains_split() {
        // libvirt escapes a comma in a domain name as QEMU does: `,,`.
        let q = args("qemu-system-x86_64 -name guest=a,,b,debug-threads=on -uuid 1-2");
        let id = vm_id("qemu", &q, "qemu-system-x86", "");
        assert_eq!((id.name.as_str(), id.uuid.as_str()), ("a,b", "1-2"));
        assert!(id.matches("a,b") && !id.matches("a"));
        assert_eq!(
            vm_name("qemu", &args("qemu -name x,,y,process=p"), "q"),
            "x,y"
        );
        // An underscore is part of an ordinary domain's name.
        let q = args("qemu-system-x86_64 -name guest=prod_web,debug-threads=on");
        let id = vm_id("qemu", &q, "qemu-system-x86", "0::/system.slice");
        assert_eq!((id.name.as_str(), id.namespace.as_str()), ("prod_web", ""));
        // KubeVirt's domain `<namespace>_<name>`: told by its SMBIOS
        // manufacturer, or a Kubernetes pod's cgroup.
        let kv = args(
            "qemu-system-x86_64 -name guest=prod_web,debug-threads=on -smbios type=1,manufacturer=KubeVirt,product=None",
        );
        let id = vm_id("qemu", &kv, "qemu-kvm", "");
        assert_eq!((id.name.as_str(), id.namespace.as_str()), ("web", "prod"));
        assert_eq!(id.display(), "prod/web");
        assert!(id.matches("prod_web") && id.matches("prod/web") && id.matches("web"));
        let id = vm_id(
            "qemu",
            &q,
            "qemu-kvm",
            "0::/kubepods.slice/kubepods-pod1.slice",
        );
        assert_eq!((id.name.as_str(), id.namespace.as_str()), ("web", "prod"));
        // Other VMMs are never split.
        let k = args("kvm-watcher vm --name prod_web");
        assert_eq!(
            vm_id("kvm-watcher", &k, "kvm-watcher", "kubepods").namespace,
            ""
        );
    }

    #[test]
    fn cpu_time_is_utime_plus_stime_even_with_a_parenthesis_in_the_name() {
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 500 0 0 0 37 5 0 0 20 0 1 0 99";
        assert_eq!(cpu_ticks_of_stat(stat), Some(42));
        assert_eq!(cpu_ticks_of_stat("4242 (x) S 1"), None);
        assert!(own_cpu_seconds().is_some() && own_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn schedstat_fields() {
        let s = Schedstat::parse("1234567 89012 345\n");
        assert_eq!(
            s,
            Some(Schedstat {
                run_ns: 1234567,
                wait_ns: 89012,
                timeslices: 345
            })
        );
        // A kernel with sched_info switched off prints zeros.
        assert_eq!(Schedstat::parse("0 0 0\n"), Some(Schedstat::default()));
        assert_eq!(Schedstat::parse("1 2 3 4\n").map(|s| s.timeslices), Some(3));
        assert_eq!(Schedstat::parse("1 2\n"), None);
        assert_eq!(Schedstat::parse("1 -2 3\n"), None);
        assert_eq!(Schedstat::parse("x 2 3\n"), None);
        assert_eq!(Schedstat::parse(""), None);
    }

    #[test]
    fn own_schedstat_counts_this_threads_run() {
        let me = own_schedstat().expect("this kernel keeps schedstat");
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let later = own_schedstat().unwrap();
        assert!(later.run_ns > me.run_ns && later.timeslices >= me.timeslices);
        // SAFETY: no arguments.
        let tid = unsafe { libc::gettid() } as u32;
        let by_tid = thread_schedstat(tid).unwrap();
        let by_pid = schedstat(std::process::id(), tid).unwrap();
        assert!(by_tid.run_ns >= later.run_ns && by_pid.run_ns >= by_tid.run_ns);
    }

    #[test]
    fn vcpu_ioctls_are_read_from_the_syscall_file() {
        // ioctl(fd 12, KVM_RUN) as /proc/PID/task/TID/syscall shows it.
        assert_eq!(
            vcpu_in_syscall("16 0xc 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f12"),
            Some(12)
        );
        // An ioctl that is not KVM's, and a syscall that is not ioctl.
        assert_eq!(
            vcpu_in_syscall("16 0x3 0x5401 0x0 0x0 0x0 0x0 0x1 0x2"),
            None
        );
        assert_eq!(
            vcpu_in_syscall("7 0x3 0xae80 0x0 0x0 0x0 0x0 0x1 0x2"),
            None
        );
        assert_eq!(vcpu_in_syscall("running"), None);
    }
}
