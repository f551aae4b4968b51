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
/// KVM_MEMSLOT_INVALID, KVM's own flag on a slot it is deleting or moving
/// (the VMM's KVM_SET_USER_MEMORY_REGION is under way): no longer usable.
const KVM_MEMSLOT_INVALID: u32 = 1 << 16;
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
    /// KVM changed the VM's memslots during every one of 20 passes (or was
    /// deleting or moving a slot each time): `slots` is the last reading and
    /// may mix two states; a slot being deleted or moved is left out.
    pub changing: bool,
}

/// Every KVM VM on the host (or only these pids), read from the kernel in one BPF iterator pass.
pub fn list(pids: Option<&[u32]>) -> Result<Vec<VmMemslots>> {
    let mut storage = [MaybeUninit::uninit(), MaybeUninit::uninit()];
    Reader::load(&mut storage)?.list(pids)
}

/// Whether the memslot iterator loads and runs here; the error says why not.
pub fn probe() -> Result<()> {
    let mut storage = [MaybeUninit::uninit(), MaybeUninit::uninit()];
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
    /// Loads the bpf_loop() program (Linux 5.17+), or where the kernel
    /// refuses it the one with bounded loops only (each in its own storage);
    /// the error says what is missing.
    pub fn load(
        storage: &'obj mut [MaybeUninit<libbpf_rs::OpenObject>; 2],
    ) -> Result<Reader<'obj>> {
        check_can_load()?;
        crate::hooks::quiet_libbpf();
        let [with_loop, without] = storage;
        match Self::load_one(with_loop, true) {
            Ok(reader) => Ok(reader),
            Err(_) => Self::load_one(without, false),
        }
    }

    fn load_one(
        storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
        with_loop: bool,
    ) -> Result<Reader<'obj>> {
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        let explain = |step: &str, e: libbpf_rs::Error| {
            let errno = crate::bpf::errno_of(&e);
            let why = match errno {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    "reading memslots needs root (or CAP_BPF and CAP_PERFMON): \
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
        let mut open = crate::bpf::memslots::MemslotsSkelBuilder::default()
            .open(storage)
            .map_err(|e| explain("open", e))?;
        open.progs.list_memslots_loop.set_autoload(with_loop);
        open.progs.list_memslots.set_autoload(!with_loop);
        let skel = open.load().map_err(|e| explain("load", e))?;
        let prog = if with_loop {
            &skel.progs.list_memslots_loop
        } else {
            &skel.progs.list_memslots
        };
        let link = prog.attach().map_err(|e| explain("attach", e))?;
        Ok(Reader {
            link,
            skel,
            user_slots: user_slot_limit(),
        })
    }

    /// Every KVM VM on the host (or only these pids), now.
    pub fn list(&mut self, pids: Option<&[u32]>) -> Result<Vec<VmMemslots>> {
        let mut vms = decode(&self.pass()?, self.user_slots)?;
        for _ in 1..ATTEMPTS {
            if !vms.iter().any(|v| v.changing) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            vms = decode(&self.pass()?, self.user_slots)?;
        }
        Ok(select(vms, pids))
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

/// The record kinds and flags of src/bpf/memslots.h.
const REC_FILE: u8 = types::memslot_record_kind::MEMSLOT_REC_FILE.0 as u8;
const REC_SLOT: u8 = types::memslot_record_kind::MEMSLOT_REC_SLOT.0 as u8;
const REC_END: u8 = types::memslot_record_kind::MEMSLOT_REC_END.0 as u8;
const ALIAS: u32 = types::memslot_flags::MEMSLOTS_ALIAS.0;
const TRUNCATED: u32 = types::memslot_flags::MEMSLOTS_TRUNCATED.0;
const CHANGED: u32 = types::memslot_flags::MEMSLOTS_CHANGED.0;

/// Decodes one pass's records into its VMs. `user_slots`: ids from there
/// on are KVM's own.
fn decode(bytes: &[u8], user_slots: Option<u16>) -> Result<Vec<VmMemslots>> {
    let mut vms: Vec<VmMemslots> = Vec::new();
    let mut by_number: HashMap<u32, usize> = HashMap::new();
    // The VM whose slots the records now are, by index into vms.
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
                    vms[i].shared_with.push(VmFile {
                        pid: r.pid,
                        fd: r.fd,
                    });
                    current = None;
                } else {
                    by_number.insert(r.vm, vms.len());
                    current = Some(vms.len());
                    vms.push(VmMemslots {
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
                    .and_then(|i| vms.get_mut(i))
                    .ok_or_else(|| anyhow!("memslot iterator: a slot outside any VM"))?;
                if r.flags & KVM_MEMSLOT_INVALID != 0 {
                    // Mid-update: read again, as for a change seen while reading.
                    vm.changing = true;
                } else {
                    vm.slots.push(Memslot {
                        as_id: u16::from(r.as_id),
                        id: r.id,
                        base_gfn: r.base_gfn,
                        npages: r.npages,
                        userspace_addr: r.userspace_addr,
                        flags: r.flags,
                        internal: user_slots.is_some_and(|n| r.id >= n),
                    });
                }
                std::mem::size_of::<types::memslot_slot_record>()
            }
            REC_END => {
                let r: types::memslot_end_record = read_record(rest)
                    .ok_or_else(|| anyhow!("memslot iterator: short end record"))?;
                let vm = current
                    .and_then(|i| vms.get_mut(i))
                    .ok_or_else(|| anyhow!("memslot iterator: an address space outside any VM"))?;
                vm.truncated |= r.flags & TRUNCATED != 0;
                vm.changing |= r.flags & CHANGED != 0;
                std::mem::size_of::<types::memslot_end_record>()
            }
            other => bail!("memslot iterator: unknown record kind {other}"),
        };
        rest = &rest[size.min(rest.len())..];
    }
    for vm in &mut vms {
        vm.slots.sort_by_key(|s| (s.as_id, s.id));
    }
    Ok(vms)
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
                name: procs.get(&v.pid).map(|p| p.display()),
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
    let names: HashMap<u32, String> = procs
        .into_iter()
        .map(|(pid, p)| (pid, p.display()))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::as_bytes;

    fn file(pid: u32, fd: u32, vm: u32, alias: bool) -> Vec<u8> {
        let r = types::memslot_file_record {
            kind: REC_FILE,
            flags: if alias { ALIAS } else { 0 },
            pid,
            fd,
            vm,
            ..Default::default()
        };
        as_bytes(&r).to_vec()
    }

    fn slot(as_id: u8, id: u16, base_gfn: u64, npages: u64, addr: u64, flags: u32) -> Vec<u8> {
        let r = types::memslot_slot_record {
            kind: REC_SLOT,
            as_id,
            id,
            flags,
            base_gfn,
            npages,
            userspace_addr: addr,
        };
        as_bytes(&r).to_vec()
    }

    fn end(as_id: u8, count: u32, flags: u32) -> Vec<u8> {
        let r = types::memslot_end_record {
            kind: REC_END,
            as_id,
            flags,
            count,
            ..Default::default()
        };
        as_bytes(&r).to_vec()
    }

    fn memslot(as_id: u16, id: u16, base_gfn: u64, npages: u64, addr: u64, flags: u32) -> Memslot {
        Memslot {
            as_id,
            id,
            base_gfn,
            npages,
            userspace_addr: addr,
            flags,
            internal: false,
        }
    }

    #[test]
    fn records_decode_into_vms_with_sorted_slots_and_aliases_grouped() {
        let bytes = [
            file(100, 7, 0, false),
            // The kernel writes slots in hash or gfn order, not by id.
            slot(0, 2, 0x200, 16, 0x7f00_0000_0000, KVM_MEM_LOG_DIRTY_PAGES),
            slot(0, 0, 0, 160, 0x7f10_0000_0000, 0),
            end(0, 2, 0),
            slot(1, 0, 0, 160, 0x7f10_0000_0000, 0),
            end(1, 1, 0),
            file(100, 9, 0, true),
            file(200, 3, 1, false),
            end(0, 0, TRUNCATED),
            file(300, 4, 0, true),
        ]
        .concat();
        let vms = decode(&bytes, Some(509)).unwrap();
        assert_eq!(vms.len(), 2);
        let a = &vms[0];
        assert_eq!(
            (a.pid, a.fd, a.truncated, a.changing),
            (100, 7, false, false)
        );
        assert_eq!(
            a.slots,
            vec![
                memslot(0, 0, 0, 160, 0x7f10_0000_0000, 0),
                memslot(0, 2, 0x200, 16, 0x7f00_0000_0000, 1),
                memslot(1, 0, 0, 160, 0x7f10_0000_0000, 0),
            ]
        );
        assert_eq!(
            a.shared_with,
            vec![VmFile { pid: 100, fd: 9 }, VmFile { pid: 300, fd: 4 }]
        );
        let b = &vms[1];
        assert_eq!((b.pid, b.fd, b.truncated), (200, 3, true));
        assert!(b.slots.is_empty());
    }

    #[test]
    fn ids_past_the_user_slots_are_kvms_own() {
        let bytes = [
            file(1, 3, 0, false),
            slot(0, 508, 0, 1, 0x1000, 0),
            slot(0, 509, 0xfee00, 1, 0x2000, 0),
            end(0, 2, CHANGED),
        ]
        .concat();
        let vms = decode(&bytes, Some(509)).unwrap();
        let internal: Vec<bool> = vms[0].slots.iter().map(|s| s.internal).collect();
        assert_eq!(internal, [false, true]);
        assert!(vms[0].changing);
        // Without the limit nothing is called internal.
        let vms = decode(&bytes, None).unwrap();
        assert!(vms[0].slots.iter().all(|s| !s.internal));
    }

    #[test]
    fn a_slot_kvm_is_deleting_or_moving_is_left_out_and_read_again() {
        let bytes = [
            file(1, 3, 0, false),
            slot(0, 0, 0, 16, 0x1000, 0),
            slot(0, 1, 0x100, 4, 0x2000, KVM_MEMSLOT_INVALID),
            end(0, 2, 0),
        ]
        .concat();
        let vm = &decode(&bytes, None).unwrap()[0];
        assert_eq!(vm.slots, [memslot(0, 0, 0, 16, 0x1000, 0)]);
        assert!(vm.changing);
    }

    #[test]
    fn broken_streams_are_errors_not_panics() {
        let short = &file(1, 3, 0, false)[..10];
        assert!(decode(short, None).is_err());
        let orphan = slot(0, 1, 0, 1, 0, 0);
        assert!(decode(&orphan, None).is_err());
        let alias_first = file(1, 3, 5, true);
        assert!(decode(&alias_first, None).is_err());
        let unknown = [file(1, 3, 0, false), vec![9u8; 24]].concat();
        let err = decode(&unknown, None).unwrap_err().to_string();
        assert!(err.contains("unknown record kind 9"), "{err}");
        assert!(decode(&[], None).unwrap().is_empty());
    }

    #[test]
    fn a_pid_filter_names_a_shared_vm_by_a_file_of_those_pids() {
        let vm = |pid, fd, shared: Vec<VmFile>| VmMemslots {
            pid,
            fd,
            slots: vec![],
            shared_with: shared,
            truncated: false,
            changing: false,
        };
        let all = vec![
            vm(300, 5, vec![]),
            vm(
                100,
                7,
                vec![VmFile { pid: 200, fd: 4 }, VmFile { pid: 100, fd: 9 }],
            ),
        ];
        let every = select(all.clone(), None);
        assert_eq!(
            every.iter().map(|v| (v.pid, v.fd)).collect::<Vec<_>>(),
            [(100, 7), (300, 5)]
        );
        assert_eq!(
            every[0].shared_with,
            [VmFile { pid: 100, fd: 9 }, VmFile { pid: 200, fd: 4 }]
        );
        let only = select(all.clone(), Some(&[200]));
        assert_eq!(only.len(), 1);
        assert_eq!((only[0].pid, only[0].fd), (200, 4));
        assert_eq!(
            only[0].shared_with,
            [VmFile { pid: 100, fd: 7 }, VmFile { pid: 100, fd: 9 }]
        );
        assert!(select(all, Some(&[42])).is_empty());
    }

    #[test]
    fn sizes_flags_and_the_table() {
        let ram = memslot(
            0,
            1,
            0x100,
            0x7ff00,
            0x7f12_3400_0000,
            KVM_MEM_LOG_DIRTY_PAGES,
        );
        assert!(ram.dirty_logging() && !ram.readonly());
        assert_eq!(ram.bytes(), 0x7ff00 * 4096);
        let rom = Memslot {
            internal: true,
            ..memslot(1, 3, 0xfffc0, 64, 0x7f00_0000_0000, KVM_MEM_READONLY | 8)
        };
        assert_eq!(flags_text(&rom), "readonly,0x8,internal");
        assert_eq!(flags_text(&memslot(0, 0, 0, 1, 0, 0)), "-");
        assert_eq!(human_bytes(256 << 10), "256 KiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 B");

        let vms = vec![
            VmMemslots {
                pid: 4242,
                fd: 11,
                slots: vec![ram, rom],
                shared_with: vec![VmFile { pid: 4243, fd: 5 }],
                truncated: true,
                changing: false,
            },
            VmMemslots {
                pid: 4300,
                fd: 3,
                slots: vec![],
                shared_with: vec![],
                truncated: false,
                changing: true,
            },
        ];
        let names = HashMap::from([(4242, "web\n1".to_string())]);
        let mut out = Vec::new();
        write_table(&vms, &names, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("PID"), "{text}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "4242",
                "11",
                "web\\n1",
                "0",
                "1",
                "0x100",
                "524032",
                "2.0",
                "GiB",
                "0x7f1234000000",
                "dirty-log"
            ],
            "{text}"
        );
        assert!(lines[2].contains("0xfffc0") && lines[2].ends_with("readonly,0x8,internal"));
        assert!(
            lines[3].starts_with("4300")
                && lines[3].contains("?")
                && lines[3].ends_with("(no memslots)")
        );
        assert!(
            text.contains("pid 4242 fd 11: the same VM as pid 4243 fd 5"),
            "{text}"
        );
        assert!(text.contains(
            "pid 4242 fd 11: more memslots than one pass reads; only the first 2 are listed"
        ));
        assert!(text.contains("pid 4300 fd 3: its memslots changed during every read"));
        assert_eq!(text.lines().count(), 7, "{text}");
    }
}
