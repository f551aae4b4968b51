//! memslots: `vms --slots` (the task-file iterator) against the synthetic
//! guest's report and against a bare VM this checker makes itself.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, VmReport, bin};
use crate::matrix::{Matrix, emit_timed};
use crate::util::{finish, s, start, u};

impl Matrix {
    /// Scenario 8: Memslots (`vms --slots`, the task-file iterator): the synthetic
    /// guest's slots before it runs and after slots 1 and 2 traded places,
    /// with dirty logging on and off, against its report; and a bare VM
    /// this checker makes itself with as many slots as KVM allows (up to
    /// 600) and one in the SMM address space.
    pub fn memslots(&self) {
        for mode in ["bitmap", "off"] {
            emit_timed("memslots", "iterator", mode, || memslots_of_the_guest(mode));
        }
        emit_timed("memslots", "iterator", "bare", memslots_of_a_bare_vm);
    }
}

/// A memslot as (as_id, id, base_gfn, npages, userspace_addr, flags).
type Slot = (u64, u64, u64, u64, u64, u64);

/// `kvm-watcher vms --slots --json -p PID`: the VMM's own slots of its one
/// VM (KVM's internal ones left out), and how many internal ones it has.
fn listed_slots(pid: u32) -> Result<(Vec<Slot>, usize), String> {
    let out = Command::new(bin())
        .args(["vms", "--slots", "--json", "-p", &pid.to_string()])
        .output()
        .map_err(|e| format!("vms --slots: {e}"))?;
    ensure!(
        out.status.success(),
        "vms --slots exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("vms --slots --json: {e}"))?;
    let vms = v.as_array().ok_or("vms --slots --json is not an array")?;
    ensure!(vms.len() == 1, "pid {pid} holds {} VMs: {v}", vms.len());
    ensure!(
        vms[0]["truncated"] == false && vms[0]["changing"] == false,
        "truncated or changing: {}",
        vms[0]
    );
    let all = vms[0]["slots"].as_array().ok_or("no slots array")?;
    let mut slots: Vec<Slot> = all
        .iter()
        .filter(|s| s["internal"] == false)
        .map(|s| {
            (
                u(&s["as_id"]),
                u(&s["id"]),
                u(&s["base_gfn"]),
                u(&s["npages"]),
                u(&s["userspace_addr"]),
                u(&s["flags"]),
            )
        })
        .collect();
    slots.sort();
    let internal = all.len() - slots.len();
    Ok((slots, internal))
}

/// The slots of a guest report, as the listing shows them.
fn reported_slots(slots: &[kvm_watcher::vm::report::MemslotReport]) -> Vec<Slot> {
    let mut v: Vec<Slot> = slots
        .iter()
        .map(|m| {
            (
                0,
                u64::from(m.slot),
                m.base_gfn,
                m.npages,
                m.userspace_addr,
                u64::from(m.flags),
            )
        })
        .collect();
    v.sort();
    v
}

/// The synthetic guest (4 data slots, `--dirty-log MODE`, with a bitmap the
/// swap of slots 1 and 2): the listing before it runs equals its report's
/// memslots, and once it has run (and lingers) its memslots after the swap.
fn memslots_of_the_guest(mode: &str) -> Result<String, String> {
    let mut args = s(&[
        "vm",
        "--slots",
        "4",
        "--memory",
        "16",
        "--dirty-pages",
        "32",
        "--seconds",
        "0.6",
        "--dirty-log",
        mode,
        "--linger",
        "--wait-for-signal",
        "--json",
    ]);
    if mode != "off" {
        args.extend(s(&["--swap-slots-at", "0.2"]));
    }
    let vm = start("vm".into(), &args, "kvm-watcher vm: ready ")?;
    let ready = common::parse_ready(vm.ready_line().unwrap_or_default()).ok_or("bad ready line")?;
    let before = listed_slots(ready.pid);
    vm.signal(libc::SIGUSR1).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !vm.stderr_so_far().contains("kvm-watcher vm: lingering") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = listed_slots(ready.pid);
    let _ = vm.signal(libc::SIGUSR1);
    let (ok, out, err) = finish(vm, Duration::from_secs(120));
    ensure!(ok, "the vm failed: {err}");
    let report: VmReport = serde_json::from_str(&out).map_err(|e| format!("vm report: {e}"))?;
    let (before, internal) = before?;
    let (after, _) = after?;
    let want_before = reported_slots(&report.memslots);
    ensure!(
        before == want_before,
        "before the run: listed {before:?}, the guest made {want_before:?}"
    );
    let logged = before.iter().filter(|s| s.5 & 1 == 1).count();
    ensure!(
        logged == if mode == "off" { 0 } else { 4 },
        "{logged} slots dirty-logged with --dirty-log {mode}"
    );
    let want_after = match &report.swapped {
        Some(swap) => reported_slots(&swap.memslots),
        None => want_before.clone(),
    };
    ensure!(
        after == want_after,
        "after the run: listed {after:?}, the guest had {want_after:?}"
    );
    ensure!(mode == "off" || after != before, "the swap did not show");
    Ok(format!(
        "{} slots as the guest made them{}, {logged} dirty-logged, {internal} internal",
        before.len(),
        if mode == "off" {
            ""
        } else {
            " before and after the swap"
        }
    ))
}

/// A bare VM made here: min(600, KVM_CAP_NR_MEMSLOTS) one-page slots, every
/// third dirty-logged, two deleted again, and one slot in address space 1
/// where KVM has SMM: the listing holds exactly these.
fn memslots_of_a_bare_vm() -> Result<String, String> {
    use common::rawvm::{self, RawVm};
    let vm = RawVm::new(700).map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let limit = vm.cap(rawvm::KVM_CAP_NR_MEMSLOTS).clamp(0, 600) as u16;
    let smm = vm.cap(rawvm::KVM_CAP_MULTI_ADDRESS_SPACE) > 1;
    let mut made: Vec<Slot> = Vec::new();
    for i in 0..limit {
        let flags = if i % 3 == 0 {
            rawvm::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let gfn = 0x100000 - 2 * u64::from(i);
        vm.set_slot(0, i, flags, gfn, 1, usize::from(i))
            .map_err(|e| format!("slot {i}: {e}"))?;
        made.push((
            0,
            u64::from(i),
            gfn,
            1,
            vm.addr(usize::from(i)),
            u64::from(flags),
        ));
    }
    for id in [5u16, 6] {
        vm.set_slot(0, id, 0, 0, 0, 0)
            .map_err(|e| format!("deleting slot {id}: {e}"))?;
        made.retain(|s| !(s.0 == 0 && s.1 == u64::from(id)));
    }
    if smm {
        vm.set_slot(1, 7, 0, 0x30, 4, 650)
            .map_err(|e| format!("SMM slot: {e}"))?;
        made.push((1, 7, 0x30, 4, vm.addr(650), 0));
    }
    made.sort();
    let (listed, internal) = listed_slots(std::process::id())?;
    if listed != made {
        let missing = made.iter().find(|s| !listed.contains(s));
        let extra = listed.iter().find(|s| !made.contains(s));
        return Err(format!(
            "listed {} slots, made {}; first missing {missing:?}, first extra {extra:?}",
            listed.len(),
            made.len()
        ));
    }
    Ok(format!(
        "{} slots as made ({} address spaces), {internal} internal",
        made.len(),
        if smm { 2 } else { 1 }
    ))
}
