//! The memslots of every KVM VM on the host, read from KVM itself (not from
//! the VMM) in one pass of a BPF task-file iterator
//! (`src/bpf/memslots.bpf.c`, its own small object, loaded alone): what
//! `kvm-watcher vms --slots` prints and what the dirty-rate sampler samples.
//!
//! A VM is named by the process and file descriptor that hold it (`pid`,
//! `fd`); files of the same VM elsewhere (a descriptor passed on or
//! inherited) are listed with it, never as another VM. No kernel address
//! leaves the kernel.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::bpf::memslots::types;
use crate::bpf::read_record;
use crate::output::terminal_safe;

/// KVM_MEM_LOG_DIRTY_PAGES: KVM logs the slot's dirty pages.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
/// KVM_MEM_READONLY: guest writes to the slot exit to the VMM.
pub const KVM_MEM_READONLY: u32 = 2;
/// The size of a guest page frame (gfn) on x86.
pub const PAGE_SIZE: u64 = 4096;

/// Passes tried when KVM changes a VM's memslots while they are read.
const ATTEMPTS: u32 = 20;

/// One memslot of a VM, as KVM holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memslot {
    /// Address space (x86: 0, or 1 for System Management Mode).
    pub as_id: u16,
    /// Slot id within its address space.
    pub id: u16,
    /// First guest frame number (guest physical address / 4096).
    pub base_gfn: u64,
    /// Number of 4 KiB pages.
    pub npages: u64,
    /// Where the slot's memory is in the VMM's address space.
    pub userspace_addr: u64,
    /// KVM_MEM_* flags: [`KVM_MEM_LOG_DIRTY_PAGES`] (1), [`KVM_MEM_READONLY`] (2).
    pub flags: u32,
    /// A slot KVM made for itself (an id past the user slots
    /// `KVM_CAP_NR_MEMSLOTS` allows: on Intel the APIC-access page, the EPT
    /// identity map and the real-mode TSS), not one the VMM made.
    pub internal: bool,
}

impl Memslot {
    /// Whether KVM logs this slot's dirty pages (a migration, or a VMM's own
    /// dirty-rate measurement, is running).
    pub fn dirty_logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// Whether guest writes to the slot are refused (ROM, flash).
    pub fn readonly(&self) -> bool {
        self.flags & KVM_MEM_READONLY != 0
    }

    /// The slot's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.npages.saturating_mul(PAGE_SIZE)
    }
}

/// Another file descriptor of the same VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFile {
    /// Process holding it.
    pub pid: u32,
    /// Its file descriptor.
    pub fd: u32,
}

/// The memslots of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMemslots {
    /// The process holding the VM (the lowest pid, among those asked for,
    /// that holds a file of it).
    pub pid: u32,
    /// Its `anon_inode:kvm-vm` file descriptor there (the lowest).
    pub fd: u32,
    /// Every active memslot of every address space, sorted by (as_id, id).
    pub slots: Vec<Memslot>,
    /// Other descriptors of the same VM, in this or other processes.
    pub shared_with: Vec<VmFile>,
    /// The VM has more memslots than one pass reads (1000): `slots` holds
    /// only the first ones, and the others are missing.
    pub truncated: bool,
    /// KVM changed the VM's memslots during every one of 20 passes: `slots`
    /// is the last reading and may mix two states.
    pub changing: bool,
}

/// Every KVM VM on the host (or only these pids), read from the kernel in one BPF iterator pass.
pub fn list(pids: Option<&[u32]>) -> Result<Vec<VmMemslots>> {
    let mut storage = MaybeUninit::uninit();
    Reader::load(&mut storage)?.list(pids)
}

/// Whether the memslot iterator loads and runs here; the error says why not.
pub fn probe() -> Result<()> {
    check_can_load()?;
    let mut storage = MaybeUninit::uninit();
    Reader::load(&mut storage)?.pass().map(drop)
}

/// What is missing for the iterator, before libbpf is tried (its errors say less).
fn check_can_load() -> Result<()> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "cannot read memslots: this kernel has no BTF (/sys/kernel/btf/vmlinux); the BPF task-file \
             iterator needs Linux 5.8+ built with CONFIG_DEBUG_INFO_BTF"
        );
    }
    Ok(())
}

/// The loaded iterator, run once per pass: loading costs a few hundred ms
/// (BTF, verifier), a pass a few ms, so a reader that lists again and again
/// (the dirty-rate sampler) keeps one.
pub struct Reader<'obj> {
    // Dropped first: the link goes before the object it was made from.
    link: libbpf_rs::Link,
    skel: crate::bpf::memslots::MemslotsSkel<'obj>,
    user_slots: Option<u16>,
}

impl<'obj> Reader<'obj> {
    /// Loads and attaches the iterator; the error says what is missing.
    pub fn load(storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>) -> Result<Reader<'obj>> {
        check_can_load()?;
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        crate::hooks::quiet_libbpf();
        let explain = |step: &str, e: libbpf_rs::Error| {
            let errno = crate::bpf::errno_of(&e);
            let why = match errno {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    "reading memslots needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): \
                     run kvm-watcher as root"
                        .to_string()
                }
                _ => match crate::hooks::verifier_refusal() {
                    Some(v) => format!(
                        "this kernel refused the BPF task-file iterator (Linux 5.8+ with BTF): {v}"
                    ),
                    None => format!("the BPF task-file iterator (Linux 5.8+ with BTF) failed: {e}"),
                },
            };
            anyhow!("cannot {step} the memslot iterator: {why}")
        };
        let open = crate::bpf::memslots::MemslotsSkelBuilder::default()
            .open(storage)
            .map_err(|e| explain("open", e))?;
        let skel = open.load().map_err(|e| explain("load", e))?;
        let link = skel
            .progs
            .list_memslots
            .attach()
            .map_err(|e| explain("attach", e))?;
        Ok(Reader {
            link,
            skel,
            user_slots: user_slot_limit(),
        })
    }

    /// Every KVM VM on the host (or only these pids), now.
    pub fn list(&mut self, pids: Option<&[u32]>) -> Result<Vec<VmMemslots>> {
        let mut pass = decode(&self.pass()?, self.user_slots)?;
        for _ in 1..ATTEMPTS {
            if !pass.vms.iter().any(|v| v.changing) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            pass = decode(&self.pass()?, self.user_slots)?;
        }
        Ok(select(pass.vms, pids))
    }

    /// One run of the iterator over every task's files: its raw records.
    fn pass(&mut self) -> Result<Vec<u8>> {
        use libbpf_rs::MapCore;
        let bss = self
            .skel
            .maps
            .bss_data
            .as_deref_mut()
            .ok_or_else(|| anyhow!("the memslot iterator's object has no .bss"))?;
        bss.next_vm = 0;
        bss.slots_written = 0;
        let keys: Vec<Vec<u8>> = self.skel.maps.vm_numbers.keys().collect();
        for key in keys {
            // A key gone already is what deleting it wants.
            let _ = self.skel.maps.vm_numbers.delete(&key);
        }
        let mut iter =
            libbpf_rs::Iter::new(&self.link).context("cannot start the memslot iterator")?;
        let mut out = Vec::new();
        iter.read_to_end(&mut out)
            .context("cannot run the memslot iterator")?;
        Ok(out)
    }
}

/// The user slots KVM allows per address space (`KVM_CAP_NR_MEMSLOTS`):
/// higher ids are KVM's own. None if /dev/kvm cannot say.
fn user_slot_limit() -> Option<u16> {
    use std::os::fd::AsRawFd;
    const KVM_CHECK_EXTENSION: u64 = 0xae03;
    const KVM_CAP_NR_MEMSLOTS: u64 = 10;
    let kvm = std::fs::File::open("/dev/kvm").ok()?;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one.
    let n = unsafe {
        libc::ioctl(
            kvm.as_raw_fd(),
            KVM_CHECK_EXTENSION as _,
            KVM_CAP_NR_MEMSLOTS,
        )
    };
    u16::try_from(n).ok().filter(|&n| n > 0)
}

/// What one pass read.
#[derive(Debug, Default)]
struct Pass {
    vms: Vec<VmMemslots>,
}

/// The record kinds and flags of src/bpf/memslots.h.
const REC_FILE: u8 = types::memslot_record_kind::MEMSLOT_REC_FILE.0 as u8;
const REC_SLOT: u8 = types::memslot_record_kind::MEMSLOT_REC_SLOT.0 as u8;
const REC_END: u8 = types::memslot_record_kind::MEMSLOT_REC_END.0 as u8;
const ALIAS: u32 = types::memslot_flags::MEMSLOTS_ALIAS.0;
const TRUNCATED: u32 = types::memslot_flags::MEMSLOTS_TRUNCATED.0;
const CHANGED: u32 = types::memslot_flags::MEMSLOTS_CHANGED.0;

/// Decodes one pass's records. `user_slots`: ids from there on are KVM's own.
fn decode(bytes: &[u8], user_slots: Option<u16>) -> Result<Pass> {
    let mut pass = Pass::default();
    let mut by_number: HashMap<u32, usize> = HashMap::new();
    // The VM whose slots the records now are, by index into pass.vms.
    let mut current: Option<usize> = None;
    let mut rest = bytes;
    while let Some(&kind) = rest.first() {
        let size = match kind {
            REC_FILE => {
                let r: types::memslot_file_record = read_record(rest)
                    .ok_or_else(|| anyhow!("memslot iterator: short file record"))?;
                if r.flags & ALIAS != 0 {
                    let &i = by_number.get(&r.vm).ok_or_else(|| {
                        anyhow!("memslot iterator: a file of VM {} before the VM", r.vm)
                    })?;
                    pass.vms[i].shared_with.push(VmFile {
                        pid: r.pid,
                        fd: r.fd,
                    });
                    current = None;
                } else {
                    by_number.insert(r.vm, pass.vms.len());
                    current = Some(pass.vms.len());
                    pass.vms.push(VmMemslots {
                        pid: r.pid,
                        fd: r.fd,
                        slots: Vec::new(),
                        shared_with: Vec::new(),
                        truncated: false,
                        changing: false,
                    });
                }
                std::mem::size_of::<types::memslot_file_record>()
            }
            REC_SLOT => {
                let r: types::memslot_slot_record = read_record(rest)
                    .ok_or_else(|| anyhow!("memslot iterator: short slot record"))?;
                let vm = current
                    .and_then(|i| pass.vms.get_mut(i))
                    .ok_or_else(|| anyhow!("memslot iterator: a slot outside any VM"))?;
                vm.slots.push(Memslot {
                    as_id: u16::from(r.as_id),
                    id: r.id,
                    base_gfn: r.base_gfn,
                    npages: r.npages,
                    userspace_addr: r.userspace_addr,
                    flags: r.flags,
                    internal: user_slots.is_some_and(|n| r.id >= n),
                });
                std::mem::size_of::<types::memslot_slot_record>()
            }
            REC_END => {
                let r: types::memslot_end_record = read_record(rest)
                    .ok_or_else(|| anyhow!("memslot iterator: short end record"))?;
                let vm = current
                    .and_then(|i| pass.vms.get_mut(i))
                    .ok_or_else(|| anyhow!("memslot iterator: an address space outside any VM"))?;
                vm.truncated |= r.flags & TRUNCATED != 0;
                vm.changing |= r.flags & CHANGED != 0;
                std::mem::size_of::<types::memslot_end_record>()
            }
            other => bail!("memslot iterator: unknown record kind {other}"),
        };
        rest = &rest[size.min(rest.len())..];
    }
    for vm in &mut pass.vms {
        vm.slots.sort_by_key(|s| (s.as_id, s.id));
    }
    Ok(pass)
}

/// The VMs of `pids` (all without), each named by its first file among
/// them, sorted by (pid, fd).
fn select(vms: Vec<VmMemslots>, pids: Option<&[u32]>) -> Vec<VmMemslots> {
    let mut out: Vec<VmMemslots> = vms
        .into_iter()
        .filter_map(|mut vm| {
            let Some(pids) = pids else {
                return Some(vm);
            };
            let mut files: Vec<VmFile> = std::iter::once(VmFile {
                pid: vm.pid,
                fd: vm.fd,
            })
            .chain(vm.shared_with.drain(..))
            .collect();
            files.sort_by_key(|f| (!pids.contains(&f.pid), f.pid, f.fd));
            let first = files.first()?.clone();
            if !pids.contains(&first.pid) {
                return None;
            }
            vm.pid = first.pid;
            vm.fd = first.fd;
            vm.shared_with = files.split_off(1);
            Some(vm)
        })
        .collect();
    for vm in &mut out {
        vm.shared_with.sort_by_key(|f| (f.pid, f.fd));
    }
    out.sort_by_key(|v| (v.pid, v.fd));
    out
}

/// One VM of `kvm-watcher vms --slots --json`: its memslots, with the
/// process's VMM and VM name.
#[derive(Serialize)]
struct VmSlotsJson<'a> {
    pid: u32,
    fd: u32,
    vmm: Option<String>,
    name: Option<String>,
    shared_with: &'a [VmFile],
    truncated: bool,
    changing: bool,
    slots: Vec<SlotJson<'a>>,
}

/// A memslot in JSON: its fields and the ones derived from them.
#[derive(Serialize)]
struct SlotJson<'a> {
    #[serde(flatten)]
    slot: &'a Memslot,
    bytes: u64,
    dirty_logging: bool,
    readonly: bool,
}

/// `kvm-watcher vms --slots`: every VM's memslots, as a table or JSON.
pub fn print(pids: Option<&[u32]>, json: bool, w: &mut dyn Write) -> Result<()> {
    let vms = list(pids)?;
    let procs: HashMap<u32, crate::procfs::VmProcess> = vms
        .iter()
        .filter_map(|v| crate::procfs::vm_process(v.pid).map(|p| (v.pid, p)))
        .collect();
    if json {
        let out: Vec<VmSlotsJson<'_>> = vms
            .iter()
            .map(|v| VmSlotsJson {
                pid: v.pid,
                fd: v.fd,
                vmm: procs.get(&v.pid).map(|p| p.vmm.clone()),
                name: procs.get(&v.pid).map(|p| p.name.clone()),
                shared_with: &v.shared_with,
                truncated: v.truncated,
                changing: v.changing,
                slots: v
                    .slots
                    .iter()
                    .map(|s| SlotJson {
                        slot: s,
                        bytes: s.bytes(),
                        dirty_logging: s.dirty_logging(),
                        readonly: s.readonly(),
                    })
                    .collect(),
            })
            .collect();
        writeln!(w, "{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    if vms.is_empty() {
        writeln!(
            w,
            "no KVM VMs running (no process holds an anon_inode:kvm-vm file)"
        )?;
        return Ok(());
    }
    let names: HashMap<u32, String> = procs.into_iter().map(|(pid, p)| (pid, p.name)).collect();
    write_table(&vms, &names, w)?;
    Ok(())
}

/// The table of `vms --slots`: one row per memslot, then a note per VM that
/// was cut short or kept changing.
fn write_table(
    vms: &[VmMemslots],
    names: &HashMap<u32, String>,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(
        w,
        "{:<8} {:<4} {:<20} {:>2} {:>5} {:>12} {:>10} {:>10} {:>18}  FLAGS",
        "PID", "FD", "NAME", "AS", "SLOT", "BASE_GFN", "PAGES", "SIZE", "USERSPACE_ADDR"
    )?;
    for vm in vms {
        let name = names.get(&vm.pid).map_or("?", String::as_str);
        for s in &vm.slots {
            writeln!(
                w,
                "{:<8} {:<4} {:<20} {:>2} {:>5} {:>12} {:>10} {:>10} {:>18}  {}",
                vm.pid,
                vm.fd,
                terminal_safe(name),
                s.as_id,
                s.id,
                format!("{:#x}", s.base_gfn),
                s.npages,
                human_bytes(s.bytes()),
                format!("{:#x}", s.userspace_addr),
                flags_text(s)
            )?;
        }
        if vm.slots.is_empty() {
            writeln!(
                w,
                "{:<8} {:<4} {:<20} (no memslots)",
                vm.pid,
                vm.fd,
                terminal_safe(name)
            )?;
        }
    }
    for vm in vms {
        let files: Vec<String> = vm
            .shared_with
            .iter()
            .map(|f| format!("pid {} fd {}", f.pid, f.fd))
            .collect();
        if !files.is_empty() {
            writeln!(
                w,
                "pid {} fd {}: the same VM as {}",
                vm.pid,
                vm.fd,
                files.join(", ")
            )?;
        }
        if vm.truncated {
            writeln!(
                w,
                "pid {} fd {}: more memslots than one pass reads; only the first {} are listed",
                vm.pid,
                vm.fd,
                vm.slots.len()
            )?;
        }
        if vm.changing {
            writeln!(
                w,
                "pid {} fd {}: its memslots changed during every read; the listing may mix two states",
                vm.pid, vm.fd
            )?;
        }
    }
    Ok(())
}

/// The FLAGS column: `dirty-log`, `readonly`, `internal`, or `-`.
fn flags_text(s: &Memslot) -> String {
    let mut parts = Vec::new();
    if s.dirty_logging() {
        parts.push("dirty-log".to_string());
    }
    if s.readonly() {
        parts.push("readonly".to_string());
    }
    let other = s.flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY);
    if other != 0 {
        parts.push(format!("{other:#x}"));
    }
    if s.internal {
        parts.push("internal".to_string());
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(",")
    }
}

/// Bytes in binary units: `512 KiB`, `2 GiB`, `1.5 MiB`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut v = b as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
