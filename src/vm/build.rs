//! Building the synthetic VM: what this KVM can do, the VM with its in-kernel
//! irqchip and PIT, the memslots, the guest code and the vCPUs at its entry point.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use kvm_bindings::{
    CpuId, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_HALT_POLL, KVM_MAX_CPUID_ENTRIES, kvm_enable_cap,
    kvm_pit_config,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::dirty::{ByGfn, Collected, Ring, RingSet};
use super::guest::{self, DataLayout};
use super::memory::{GuestMemory, Region};
use super::stats::{self, StatsFd};
use super::vcpu::Shared;
use super::{DirtyLog, SyntheticVm, VmConfig};
use crate::usage_bail;

impl SyntheticVm {
    /// Creates the VM and everything in it: memory and memslots, the guest code,
    /// and the vCPUs set up at the guest's entry point. No vCPU thread exists and
    /// no guest instruction runs until [`SyntheticVm::run`]. What this KVM cannot
    /// do with `config` is a usage error, like a bad option value.
    pub fn build(config: &VmConfig) -> Result<SyntheticVm> {
        let data = config.data_layout();
        let kvm = open_kvm()?;
        let host = HostKvm::check(&kvm, config)?;
        let vm = create_vm(&kvm, config)?;
        let memory = GuestMemory::new(&vm, config, &data)?;
        write_guest(&memory.sys, config, &data);
        enable_dirty_ring(&vm, config)?;

        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        let mut vcpu_stats = Vec::new();
        for i in 0..config.vcpus {
            let (vcpu, ring, stats) = create_vcpu(&vm, config, &host, i)?;
            rings.extend(ring);
            vcpu_stats.push(stats);
            vcpus.push(vcpu);
        }
        let vm_stats = host.have_stats.then(|| StatsFd::open(&vm)).transpose()?;

        let rings = (!rings.is_empty()).then(|| RingSet {
            vm_fd: vm.as_raw_fd(),
            rings,
        });
        let mut collected = Collected::default();
        if config.swap_slots_at.is_some() {
            collected.by_gfn = Some(ByGfn {
                bases: memory.slot_bases(),
                ..Default::default()
            });
        }
        Ok(SyntheticVm {
            config: config.clone(),
            threads: Vec::new(),
            vcpus,
            tids: Vec::new(),
            comms: Vec::new(),
            outcome: None,
            shared: Arc::new(Shared::new(rings, collected)),
            vcpu_stats,
            vm_stats,
            vm,
            memory,
            _kvm: kvm,
        })
    }
}

fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::EACCES | libc::EPERM => "; run as root or add yourself to the kvm group",
            libc::ENOENT | libc::ENODEV | libc::ENXIO => {
                "; is KVM enabled (modprobe kvm_intel or kvm_amd, or a host with nested virtualization)?"
            }
            _ => "",
        };
        anyhow!("cannot open /dev/kvm: {}{hint}", std::io::Error::from_raw_os_error(e.errno()))
    })
}

/// What the VM needs from this KVM, checked before anything is created.
struct HostKvm {
    /// KVM_GET_STATS_FD works (Linux 5.14+).
    have_stats: bool,
    /// KVM_GET_SUPPORTED_CPUID, the base of every vCPU's CPUID.
    cpuid: CpuId,
}

impl HostKvm {
    fn check(kvm: &Kvm, config: &VmConfig) -> Result<HostKvm> {
        let n = config.vcpus;
        let max_vcpus = kvm.get_max_vcpus() as u32;
        if n > max_vcpus {
            usage_bail!("--vcpus {n} is more than this KVM supports ({max_vcpus})");
        }
        let max_id = kvm.get_max_vcpu_id() as u64;
        if config.first_vcpu_id as u64 + n as u64 > max_id {
            usage_bail!(
                "vCPU ids {}..{} exceed this KVM's KVM_CAP_MAX_VCPU_ID ({max_id})",
                config.first_vcpu_id,
                config.first_vcpu_id as u64 + n as u64 - 1
            );
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                bail!("this KVM lacks {name}, which the synthetic guest needs");
            }
        }
        let nr_slots = kvm.get_nr_memslots() as u32;
        if config.slots + 1 > nr_slots {
            usage_bail!(
                "--slots {} plus the code slot exceed this KVM's {nr_slots} memslots",
                config.slots
            );
        }
        let have_stats = kvm.check_extension_raw(stats::KVM_CAP_BINARY_STATS_FD) > 0;
        if !have_stats {
            eprintln!(
                "kvm-watcher vm: this kernel has no KVM_GET_STATS_FD (Linux < 5.14): stats and vm_stats will be null"
            );
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        Ok(HostKvm { have_stats, cpuid })
    }
}

/// KVM_CREATE_VM with an in-kernel irqchip and PIT, and the halt-polling window.
fn create_vm(kvm: &Kvm, config: &VmConfig) -> Result<VmFd> {
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    if vm.check_extension(Cap::SetTssAddr) {
        // Only used by VMX for real mode emulation; harmless elsewhere.
        let _ = vm.set_tss_address(0xfffb_d000);
    }
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    // A PIT makes the VM look like a normal PC to KVM; the guest does not use it.
    if vm.check_extension(Cap::Pit2) {
        vm.create_pit2(kvm_pit_config::default())
            .context("KVM_CREATE_PIT2")?;
    }
    if let Some(ns) = config.halt_poll_ns {
        if vm.check_extension_raw(KVM_CAP_HALT_POLL as _) <= 0 {
            bail!("--halt-poll-ns needs KVM_CAP_HALT_POLL (Linux 5.12+), which this kernel lacks");
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_HALT_POLL,
            ..Default::default()
        };
        cap.args[0] = ns.into();
        vm.enable_cap(&cap)
            .context("KVM_ENABLE_CAP(KVM_CAP_HALT_POLL)")?;
    }
    Ok(vm)
}

/// The guest code, tables and page lists, into the system slot.
fn write_guest(sys: &Region, config: &VmConfig, data: &DataLayout) {
    // SAFETY: the system region is ours and no vCPU runs yet.
    let sys_mem = unsafe { std::slice::from_raw_parts_mut(sys.ptr, sys.len) };
    let timer_count = config
        .halt_hz
        .map(|hz| (1_000_000_000 / guest::LAPIC_NS_PER_TICK / hz as u64) as u32)
        .unwrap_or(0);
    let max_passes = config.passes.unwrap_or(0);
    // Ring mode: yield to KVM well within the ring's 64 reserved entries (see YIELD_PORT).
    let yield_every = if config.dirty_log == DirtyLog::Ring {
        16
    } else {
        0
    };
    guest::write_image(
        sys_mem,
        config.vcpus,
        &guest::Writes {
            npages: config.dirty_pages,
            sweep: config.sweep,
            same_content: config.same_content,
        },
        timer_count,
        max_passes,
        yield_every,
        &guest::OnPurpose {
            io: config.io_exits,
            mmio: config.mmio_exits,
            mmio_spread: config.mmio_spread,
            io_in: config.io_in,
        },
        &config.halt_pattern,
        data,
    );
}

/// With `--dirty-log ring`: KVM_CAP_DIRTY_LOG_RING, before any vCPU exists.
fn enable_dirty_ring(vm: &VmFd, config: &VmConfig) -> Result<()> {
    if config.dirty_log != DirtyLog::Ring {
        return Ok(());
    }
    let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING as _);
    if max <= 0 {
        bail!(
            "--dirty-log ring needs KVM_CAP_DIRTY_LOG_RING (Linux 5.11+), which this kernel lacks; use --dirty-log bitmap"
        );
    }
    let bytes = config.dirty_ring_entries as u64 * 16;
    if bytes > max as u64 {
        usage_bail!(
            "--dirty-ring-entries {} is more than this KVM allows ({})",
            config.dirty_ring_entries,
            max / 16
        );
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = bytes;
    match vm.enable_cap(&cap) {
        // KVM also wants room for its reserved entries (more with Intel PML).
        Err(e) if e.errno() == libc::EINVAL => usage_bail!(
            "--dirty-ring-entries {}: this KVM refuses a ring of that size (EINVAL); try a larger power of two",
            config.dirty_ring_entries
        ),
        r => r.context("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)"),
    }
}

/// vCPU index `i` at the guest's entry point, with its dirty ring (`--dirty-log
/// ring`) and its stats fd (when the kernel has them).
fn create_vcpu(
    vm: &VmFd,
    config: &VmConfig,
    host: &HostKvm,
    i: u32,
) -> Result<(VcpuFd, Option<Ring>, Option<StatsFd>)> {
    let id = config.first_vcpu_id + i;
    let vcpu = vm
        .create_vcpu(id as u64)
        .with_context(|| format!("KVM_CREATE_VCPU({id})"))?;
    guest::setup_vcpu(&vcpu, &host.cpuid, i, id)
        .with_context(|| format!("setting up vCPU {id}"))?;
    let ring = if config.dirty_log == DirtyLog::Ring {
        Some(Ring::map(&vcpu, config.dirty_ring_entries)?)
    } else {
        None
    };
    let stats = if host.have_stats {
        Some(StatsFd::open(&vcpu)?)
    } else {
        None
    };
    Ok((vcpu, ring, stats))
}
