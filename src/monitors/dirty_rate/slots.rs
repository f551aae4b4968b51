//! The memslots the sampler draws from: every VM's slots as KVM holds them
//! (src/memslots.rs reads them with a BPF iterator), narrowed to the guest's
//! RAM.

use serde::Serialize;

/// One memslot, as the sampler needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// Address space (x86: 0 normal, 1 SMM).
    pub as_id: u16,
    /// Slot id.
    pub id: u16,
    /// First guest frame.
    pub base_gfn: u64,
    /// Pages.
    pub npages: u64,
    /// Where the VMM maps it.
    pub userspace_addr: u64,
    /// KVM logs its dirty pages (a migration or a dirty-rate measurement runs).
    pub logging: bool,
    /// Read-only for the guest (ROM).
    pub readonly: bool,
}

impl Slot {
    fn host_end(&self) -> u64 {
        self.userspace_addr
            .saturating_add(self.npages.saturating_mul(super::pages::PAGE))
    }
}

/// Where the VMs' memslots come from.
pub trait SlotSource {
    /// Every VM (its VMM pid) with its memslots; only `pids` when given.
    fn list(&mut self, pids: Option<&[u32]>) -> anyhow::Result<Vec<(u32, Vec<Slot>)>>;
}

/// The memslots KVM holds, read with the memslot iterator (kept loaded).
pub struct KernelSlots<'obj> {
    reader: crate::memslots::Reader<'obj>,
}

impl<'obj> KernelSlots<'obj> {
    /// Loads the iterator (the error says what is missing).
    pub fn load(
        storage: &'obj mut [std::mem::MaybeUninit<libbpf_rs::OpenObject>; 2],
    ) -> anyhow::Result<KernelSlots<'obj>> {
        Ok(KernelSlots {
            reader: crate::memslots::Reader::load(storage)?,
        })
    }
}

impl SlotSource for KernelSlots<'_> {
    fn list(&mut self, pids: Option<&[u32]>) -> anyhow::Result<Vec<(u32, Vec<Slot>)>> {
        let vms = self.reader.list(pids)?;
        Ok(vms.iter().map(|vm| (vm.pid, user_slots(vm))).collect())
    }
}

/// The slots the VMM made (not KVM's own).
pub fn user_slots(vm: &crate::memslots::VmMemslots) -> Vec<Slot> {
    vm.slots
        .iter()
        .filter(|s| !s.internal)
        .map(|s| Slot {
            as_id: s.as_id,
            id: s.id,
            base_gfn: s.base_gfn,
            npages: s.npages,
            userspace_addr: s.userspace_addr,
            logging: s.dirty_logging(),
            readonly: s.readonly(),
        })
        .collect()
}

/// The slots that are guest RAM, each page once: address space 0 only (SMM
/// maps the same memory again), no ROM, and no slot whose
/// host memory lies inside a bigger one's (an alias, e.g. the legacy VGA or
/// PAM windows QEMU maps over its RAM).
pub fn ram_of(slots: &[Slot]) -> Vec<Slot> {
    let mut ram: Vec<Slot> = slots
        .iter()
        .filter(|s| s.as_id == 0 && !s.readonly && s.npages > 0)
        .cloned()
        .collect();
    ram.sort_by(|a, b| b.npages.cmp(&a.npages).then(a.id.cmp(&b.id)));
    let mut kept: Vec<Slot> = Vec::new();
    for s in ram {
        let inside = kept
            .iter()
            .any(|k| s.userspace_addr >= k.userspace_addr && s.host_end() <= k.host_end());
        if !inside {
            kept.push(s);
        }
    }
    kept.sort_by_key(|s| s.id);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(as_id: u16, id: u16, npages: u64, ua: u64, readonly: bool) -> Slot {
        Slot {
            as_id,
            id,
            base_gfn: 0,
            npages,
            userspace_addr: ua,
            logging: false,
            readonly,
        }
    }

    #[test]
    fn ram_is_address_space_0_without_rom_or_aliases() {
        const G: u64 = 0x7f00_0000_0000;
        let slots = vec![
            slot(0, 0, 0xa0, G, false),               // low RAM
            slot(0, 1, 0x20, G + 0xa0 * 4096, false), // an alias inside slot 3's memory
            slot(0, 2, 0x40, 0x5000_0000, true),      // BIOS ROM
            slot(0, 3, 0x40000, G, false),            // RAM above 1 MiB (same host memory)
            slot(1, 0, 0x40000, G, false),            // SMM's view of it
            slot(0, 4, 0, 0x7000_0000, false),        // empty
        ];
        let ram = ram_of(&slots);
        let ids: Vec<u16> = ram.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![3]);
        // Two separate regions both stay.
        let two = vec![
            slot(0, 1, 10, 0x1000_0000, false),
            slot(0, 2, 10, 0x2000_0000, false),
        ];
        assert_eq!(ram_of(&two).len(), 2);
    }
}
