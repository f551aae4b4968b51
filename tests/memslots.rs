//! `kvm-watcher vms --slots` and `memslots::list()` against memslots whose
//! every field someone else chose: the synthetic guest's own report of the
//! slots it made (before and after it moves two of them, dirty logging on
//! and off), and a bare VM this test makes slot by slot (many slots, a
//! readonly one, deleted ones, a second descriptor of the same VM); and a
//! real QEMU guest against the sections QEMU says it gave KVM, before,
//! during and after a migration.

mod common;

use std::time::{Duration, Instant};

use common::qemu::Qemu;
use common::rawvm::{self, RawVm};
use kvm_watcher::memslots::{self, Memslot, VmFile, VmMemslots};
use kvm_watcher::vm::report::MemslotReport;
use serde_json::{Value, json};

/// The memslots the guest's report says it made, as the listing should show them.
fn expected(report: &[MemslotReport]) -> Vec<Memslot> {
    let mut v: Vec<Memslot> = report
        .iter()
        .map(|m| Memslot {
            as_id: 0,
            id: m.slot as u16,
            base_gfn: m.base_gfn,
            npages: m.npages,
            userspace_addr: m.userspace_addr,
            flags: m.flags,
            internal: false,
        })
        .collect();
    v.sort_by_key(|s| (s.as_id, s.id));
    v
}

/// The one VM of process `pid`, as listed now.
fn listed(pid: u32) -> VmMemslots {
    let mut vms = memslots::list(Some(&[pid])).expect("listing memslots");
    assert_eq!(vms.len(), 1, "pid {pid} should hold one VM: {vms:?}");
    let vm = vms.remove(0);
    assert!(!vm.truncated && !vm.changing, "{vm:?}");
    vm
}

/// The VMM's own slots of a listing (KVM's internal ones, if any, left out).
fn user_slots(vm: &VmMemslots) -> Vec<Memslot> {
    let internal: Vec<&Memslot> = vm.slots.iter().filter(|s| s.internal).collect();
    assert!(
        internal.len() <= 3,
        "more internal slots than KVM makes: {internal:?}"
    );
    vm.slots.iter().filter(|s| !s.internal).cloned().collect()
}

/// Before the guest runs and once it has run past `--swap-slots-at` (slots 1
/// and 2 deleted and made again at each other's place), the listing is the
/// report's memslots of that moment, dirty-logging flag included.
fn slots_follow_the_guest(dirty_log: &str) {
    let mut args = vec![
        "--slots",
        "4",
        "--memory",
        "16",
        "--vcpus",
        "1",
        "--dirty-pages",
        "32",
        "--seconds",
        "0.6",
        "--linger",
        "--dirty-log",
        dirty_log,
    ];
    if dirty_log != "off" {
        args.extend(["--swap-slots-at", "0.2"]);
    }
    let vm = common::spawn_vm(&args);
    let pid = vm.ready.pid;
    let before = listed(pid);
    vm.start();
    vm.wait_lingering(Duration::from_secs(30));
    let after = listed(pid);
    vm.signal(libc::SIGUSR1);
    let report = vm.finish(Duration::from_secs(30));

    assert_eq!(
        user_slots(&before),
        expected(&report.memslots),
        "before the run"
    );
    let data: Vec<&Memslot> = before
        .slots
        .iter()
        .filter(|s| s.id >= 1 && !s.internal)
        .collect();
    assert_eq!(data.len(), 4);
    assert!(
        data.iter()
            .all(|s| s.dirty_logging() == (dirty_log != "off")),
        "--dirty-log {dirty_log}: {data:?}"
    );
    assert!(
        !before.slots.iter().any(|s| s.id == 0 && s.dirty_logging()),
        "the system slot is never logged"
    );
    match &report.swapped {
        Some(swap) => {
            assert_eq!(
                user_slots(&after),
                expected(&swap.memslots),
                "after the swap"
            );
            assert_ne!(
                user_slots(&after),
                user_slots(&before),
                "the swap moved slots 1 and 2"
            );
        }
        None => {
            assert_eq!(dirty_log, "off");
            assert_eq!(
                user_slots(&after),
                expected(&report.memslots),
                "after the run"
            );
        }
    }
}

#[test]
fn slots_follow_the_guest_with_bitmap_logging_and_a_swap() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    slots_follow_the_guest("bitmap");
}

#[test]
fn slots_follow_the_guest_with_ring_logging_and_a_swap() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    slots_follow_the_guest("ring");
}

#[test]
fn slots_follow_the_guest_without_logging() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    slots_follow_the_guest("off");
}

/// `vms --slots --json -p PID` and the table of `vms --slots --vm NAME` say
/// what the guest's report says.
#[test]
fn the_command_line_lists_the_guests_slots() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--slots",
        "3",
        "--memory",
        "12",
        "--dirty-log",
        "bitmap",
        "--seconds",
        "0.2",
        "--name",
        "slots-cli",
    ]);
    let pid = vm.ready.pid.to_string();
    let json = common::run_cli(
        &["vms", "--slots", "--json", "-p", &pid],
        Duration::from_secs(30),
    );
    let table = common::run_cli(
        &["vms", "--slots", "--vm", "slots-cli"],
        Duration::from_secs(30),
    );
    vm.start();
    let report = vm.finish(Duration::from_secs(30));
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );

    let v: Value = serde_json::from_slice(&json.stdout).expect("one JSON array");
    let vms = v.as_array().expect("an array");
    assert_eq!(vms.len(), 1, "{v}");
    let me = &vms[0];
    assert_eq!(me["pid"].to_string(), pid);
    assert_eq!(me["name"], "slots-cli");
    assert_eq!(me["vmm"], "kvm-watcher");
    assert_eq!(me["truncated"], false);
    let slots: Vec<Value> = me["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["internal"] == false)
        .cloned()
        .collect();
    assert_eq!(slots.len(), report.memslots.len(), "{me}");
    let table = String::from_utf8(table.stdout).unwrap();
    for (s, m) in slots.iter().zip(expected(&report.memslots)) {
        assert_eq!(s["as_id"], 0);
        assert_eq!(s["id"].as_u64(), Some(u64::from(m.id)));
        assert_eq!(s["base_gfn"].as_u64(), Some(m.base_gfn));
        assert_eq!(s["npages"].as_u64(), Some(m.npages));
        assert_eq!(s["bytes"].as_u64(), Some(m.npages * 4096));
        assert_eq!(s["userspace_addr"].as_u64(), Some(m.userspace_addr));
        assert_eq!(s["flags"].as_u64(), Some(u64::from(m.flags)));
        assert_eq!(s["dirty_logging"], m.flags & 1 == 1);
        assert_eq!(s["readonly"], false);
        // The table row of that slot: pid, fd, name, as, id, base gfn in hex, pages, .., address in hex, flags.
        let row = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|r| r.len() >= 11 && r[4] == m.id.to_string())
            .unwrap_or_else(|| panic!("no row for slot {}:\n{table}", m.id));
        assert_eq!(row[0], pid);
        assert_eq!(row[2], "slots-cli");
        assert_eq!(row[5], format!("{:#x}", m.base_gfn));
        assert_eq!(row[6], m.npages.to_string());
        assert_eq!(row[9], format!("{:#x}", m.userspace_addr));
        assert_eq!(row[10], if m.flags & 1 == 1 { "dirty-log" } else { "-" });
    }
}

/// A bare VM with 600 slots (fewer where KVM allows fewer), then 1100:
/// every slot it made is listed exactly (a readonly one, one in address
/// space 1 where KVM has SMM, dirty logging on some, deleted ones gone), a
/// VM with more slots than one pass reads is marked truncated and lists
/// only slots it has, and a second descriptor of the VM is the same VM.
#[test]
fn a_bare_vm_with_many_slots_is_listed_exactly_or_marked_truncated() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = RawVm::new(1200).expect("KVM_CREATE_VM");
    let limit = vm.cap(rawvm::KVM_CAP_NR_MEMSLOTS).max(0) as u16;
    let readonly = vm.cap(rawvm::KVM_CAP_READONLY_MEM) > 0;
    let smm = vm.cap(rawvm::KVM_CAP_MULTI_ADDRESS_SPACE) > 1;
    let mut made: Vec<Memslot> = Vec::new();
    let make = |made: &mut Vec<Memslot>,
                as_id: u16,
                id: u16,
                flags: u32,
                gfn: u64,
                npages: u64,
                page: usize| {
        vm.set_slot(as_id, id, flags, gfn, npages, page)
            .unwrap_or_else(|e| panic!("slot {as_id}/{id}: {e}"));
        made.retain(|s| !(s.as_id == as_id && s.id == id));
        if npages > 0 {
            made.push(Memslot {
                as_id,
                id,
                base_gfn: gfn,
                npages,
                userspace_addr: vm.addr(page),
                flags,
                internal: false,
            });
        }
    };
    // Every third slot logged; ids spread over the gfn space backwards.
    let plain = |made: &mut Vec<Memslot>, ids: std::ops::Range<u16>| {
        for i in ids {
            let flags = if i % 3 == 0 {
                rawvm::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            make(
                made,
                0,
                i,
                flags,
                0x100000 - 2 * u64::from(i),
                1,
                usize::from(i),
            );
        }
    };
    let first = limit.min(600);
    plain(&mut made, 0..first);
    if readonly {
        // The last id becomes a readonly two-page slot elsewhere.
        make(&mut made, 0, first - 1, 0, 0, 0, 0);
        make(
            &mut made,
            0,
            first - 1,
            rawvm::KVM_MEM_READONLY,
            0x200000,
            2,
            1100,
        );
    }
    if smm {
        make(&mut made, 1, 7, 0, 0x30, 4, 1190);
    }
    for id in [5u16, 6] {
        make(&mut made, 0, id, 0, 0, 0, 0);
    }
    made.sort_by_key(|s| (s.as_id, s.id));
    // Close-on-exec, as KVM's own fd: processes the other tests start
    // meanwhile must not inherit the VM (they would hold it too).
    // SAFETY: a duplicate of our own VM fd, closed at the end.
    let dup = unsafe { libc::fcntl(vm.fd(), libc::F_DUPFD_CLOEXEC, 0) };
    assert!(dup >= 0);
    let pid = std::process::id();
    let fds = [vm.fd() as u32, dup as u32];

    let got = listed(pid);
    assert_eq!((got.pid, got.fd), (pid, *fds.iter().min().unwrap()));
    assert_eq!(
        got.shared_with,
        [VmFile {
            pid,
            fd: *fds.iter().max().unwrap()
        }]
    );
    assert_eq!(
        user_slots(&got),
        made,
        "{} slots fit in one pass",
        made.len()
    );
    assert_eq!(
        got.slots.iter().filter(|s| s.readonly()).count(),
        usize::from(readonly)
    );

    let more = limit.min(1100);
    if more > first {
        plain(&mut made, first..more);
        let vms = memslots::list(Some(&[pid])).expect("listing memslots");
        assert_eq!(vms.len(), 1);
        let got = &vms[0];
        assert!(!got.changing);
        if made.len() > 1000 {
            assert!(got.truncated, "{} slots do not fit in one pass", made.len());
            assert_eq!(got.slots.len(), 1000);
            for s in user_slots(got) {
                assert!(made.contains(&s), "listed but never made: {s:?}");
            }
        } else {
            assert!(!got.truncated);
            assert_eq!(user_slots(got), made);
        }
    }
    // SAFETY: the fd dup'ed above, closed once.
    unsafe { libc::close(dup) };
}

/// Usage errors exit 2 with one line; a pid without VMs is named, not listed as empty.
#[test]
fn usage_errors_and_empty_listings() {
    let out = common::run_cli(&["vms", "--slots", "-p", "x"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = common::run_cli(
        &["vms", "--slots", "--vm", "no-such-vm"],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no running VM has that name") && err.lines().count() == 1,
        "{err}"
    );
    if !common::require_bpf() {
        return;
    }
    // `vms -p` filters the listing; a pid that is no VMM is named as such.
    let out = common::run_cli(&["vms", "-p", "1"], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--pid 1"), "{err}");
    // Pid 1 holds no VM here: said so, as for --vm, not an empty list.
    let out = common::run_cli(
        &["vms", "--slots", "--json", "-p", "1"],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pid 1") && err.contains("not a VMM") && err.lines().count() == 1,
        "{err}"
    );
}

/// One section QEMU says it gave KVM.
#[derive(Debug)]
struct Section {
    base_gfn: u64,
    npages: u64,
    /// The memory region it shows (`pc.ram`, `pc.bios`).
    region: String,
    /// QEMU maps it read-only (a ROM, or RAM that PAM maps read-only).
    qemu_readonly: bool,
}

/// The sections QEMU says it gave KVM in the guest's "memory" address space
/// (`info mtree -f`: ranges marked KVM), sorted by address.
fn qemu_kvm_sections(qemu: &mut Qemu) -> Vec<Section> {
    let text = qemu.execute(
        "human-monitor-command",
        json!({"command-line": "info mtree -f"}),
    );
    let text = text.as_str().expect("info mtree -f text");
    let mut out = Vec::new();
    let mut in_memory = false;
    for line in text.lines() {
        if line.starts_with("FlatView") {
            in_memory = false;
        } else if line.trim() == "AS \"memory\", root: system" {
            in_memory = true;
        } else if in_memory && line.trim_end().ends_with(" KVM") {
            // "  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000 KVM"
            let (range, rest) = line.trim().split_once(' ').expect("a range");
            let (a, b) = range.split_once('-').expect("start-end");
            let a = u64::from_str_radix(a, 16).expect("hex start");
            let b = u64::from_str_radix(b, 16).expect("hex end");
            let kind = rest.split([',', ')']).nth(1).unwrap_or("").trim();
            let region = rest.split_once("): ").map_or("", |(_, r)| r);
            assert_eq!(a % 4096, 0, "{line}");
            assert_eq!((b + 1) % 4096, 0, "{line}");
            out.push(Section {
                base_gfn: a / 4096,
                npages: (b + 1 - a) / 4096,
                region: region.split(' ').next().unwrap_or("").to_string(),
                qemu_readonly: kind != "ram",
            });
        }
    }
    out.sort_by_key(|s| s.base_gfn);
    out
}

/// QEMU's migration status, polled until it is `want` (or 60 s pass).
fn wait_migration(qemu: &mut Qemu, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = qemu.execute("query-migrate", json!({}));
        if status["status"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "migration never {want}: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real QEMU guest (SeaBIOS, 96 MiB, no VGA): with its vCPUs stopped, the
/// listing is exactly the sections QEMU says it gave KVM (`info mtree -f`):
/// writable slots adding up to its -m RAM, readonly ones to its BIOS ROM;
/// no slot is dirty-logged until a migration
/// (bandwidth-capped, to `exec:cat > /dev/null`) is active, every writable
/// slot is while it is, and none once it is cancelled.
#[test]
fn a_qemu_guests_slots_are_its_ram_and_roms_and_logged_while_it_migrates() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    // 16 MiB of non-zero bytes loaded into guest RAM at 32 MiB: pages a
    // migration has to send in full, so at 1 MiB/s it stays active.
    let fill = std::env::temp_dir().join(format!("kvm-watcher-slots-fill-{}", std::process::id()));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..16 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&fill, bytes).expect("writing the fill file");
    let loader = format!("loader,file={},addr=0x2000000,force-raw=on", fill.display());
    let started = Qemu::start_with("slots-qemu", 1, 96, &["-device", &loader]);
    let _ = std::fs::remove_file(&fill);
    let Some(mut qemu) = started else {
        return;
    };
    // SeaBIOS sets up its memory (PAM, shadowing) before it idles in HLT.
    qemu.wait_until_halting(Duration::from_millis(500), 5);
    qemu.execute("stop", json!({}));
    let sections = qemu_kvm_sections(&mut qemu);
    let vm = listed(qemu.pid());
    let mut ours: Vec<Memslot> = vm.slots.iter().filter(|s| s.as_id == 0).cloned().collect();
    ours.sort_by_key(|s| s.base_gfn);
    let places = |v: &[Memslot]| v.iter().map(|s| (s.base_gfn, s.npages)).collect::<Vec<_>>();
    let want: Vec<(u64, u64)> = sections.iter().map(|s| (s.base_gfn, s.npages)).collect();
    assert_eq!(
        places(&ours),
        want,
        "the listing against QEMU's own view {sections:?}"
    );
    // KVM_MEM_READONLY only for ROM regions themselves: RAM that PAM maps
    // read-only (the BIOS shadow areas) QEMU gives KVM writable.
    for (slot, section) in ours.iter().zip(&sections) {
        let rom = section.qemu_readonly && section.region != "pc.ram";
        assert_eq!(slot.readonly(), rom, "{slot:?} is QEMU's {section:?}");
    }
    let bytes = |f: &dyn Fn(&Section) -> bool| -> u64 {
        sections
            .iter()
            .filter(|s| f(s))
            .map(|s| s.npages * 4096)
            .sum()
    };
    let ram: u64 = ours
        .iter()
        .filter(|s| !s.readonly())
        .map(Memslot::bytes)
        .sum();
    let rom: u64 = ours
        .iter()
        .filter(|s| s.readonly())
        .map(Memslot::bytes)
        .sum();
    eprintln!(
        "QEMU -m 96: {} slots, {ram} bytes writable + {rom} readonly; -m is {} bytes, pc.bios {} bytes",
        ours.len(),
        96u64 << 20,
        bytes(&|s| s.region == "pc.bios"),
    );
    // Without a VGA device nothing covers pc.ram: its slots are all of -m.
    assert_eq!(ram, 96 << 20, "writable slots against -m 96");
    assert_eq!(bytes(&|s| s.region == "pc.ram"), 96 << 20);
    assert_eq!(
        rom,
        bytes(&|s| s.region == "pc.bios"),
        "readonly slots against the BIOS ROM"
    );
    assert!(rom > 0);
    assert!(
        ours.iter().all(|s| !s.dirty_logging()),
        "logged before any migration: {ours:?}"
    );

    qemu.execute("cont", json!({}));
    qemu.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    qemu.execute("migrate", json!({"uri": "exec:cat > /dev/null"}));
    wait_migration(&mut qemu, "active");
    let during = listed(qemu.pid());
    let status = qemu.execute("query-migrate", json!({}));
    assert_eq!(
        status["status"], "active",
        "the migration ended while listing: {status}"
    );
    qemu.execute("migrate_cancel", json!({}));
    wait_migration(&mut qemu, "cancelled");
    let after = listed(qemu.pid());

    let writable: Vec<&Memslot> = during.slots.iter().filter(|s| !s.readonly()).collect();
    assert!(!writable.is_empty());
    assert!(
        writable.iter().all(|s| s.dirty_logging()),
        "a writable slot not logged during the migration: {writable:?}"
    );
    assert!(
        after.slots.iter().all(|s| !s.dirty_logging()),
        "still logged after the cancel: {:?}",
        after.slots
    );
}

/// Without the privileges for BPF: one line saying what is missing, exit 1.
#[test]
fn without_root_it_says_what_is_missing() {
    if !common::require_root() {
        return;
    }
    // A copy nobody can run wherever the build directory is.
    let copy = std::env::temp_dir().join(format!("kvm-watcher-slots-{}", std::process::id()));
    std::fs::copy(common::bin(), &copy).expect("copying the binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .args(["vms", "--slots"])
        .output();
    let _ = std::fs::remove_file(&copy);
    let out = out.expect("running setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("needs root") && err.contains("CAP_BPF"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// Slots deleted and made again while the iterator reads them: no listing
/// shows a slot that never was, and one not marked `changing` is exactly one
/// of the states the VM went through.
#[test]
fn slots_that_move_while_they_are_read_are_never_stale() {
    const MAX_MOVES: u64 = 300_000;
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = RawVm::new(64).expect("KVM_CREATE_VM");
    let slot = |id: u16, gfn: u64, page: usize| Memslot {
        as_id: 0,
        id,
        base_gfn: gfn,
        npages: 4,
        userspace_addr: vm.addr(page),
        flags: 0,
        internal: false,
    };
    // Slots 0 and 2 stay; slot 1 moves between A and B, deleted in between.
    let fixed = [slot(0, 0, 0), slot(2, 0x200, 8)];
    let (a, b) = (slot(1, 0x100, 16), slot(1, 0x300, 24));
    for s in &fixed {
        vm.set_slot(
            0,
            s.id,
            0,
            s.base_gfn,
            4,
            (s.userspace_addr - vm.addr(0)) as usize / 4096,
        )
        .unwrap();
    }
    let states: Vec<Vec<Memslot>> = [Some(&a), Some(&b), None]
        .into_iter()
        .map(|one| {
            let mut v: Vec<Memslot> = fixed.iter().chain(one).cloned().collect();
            v.sort_by_key(|s| s.id);
            v
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let pid = std::process::id();
    let (mut exact, mut changing) = (0, 0);
    /// Stops the mover however the listing loop ends (a failed assertion
    /// included: the scope waits for the mover before it passes the panic on).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let moves = std::thread::scope(|scope| {
        let stopper = StopOnDrop(&stop);
        let mover = scope.spawn(|| {
            let mut moves = 0u64;
            // Bounded: in a debug build, whose listings are slow, the mover
            // ran for minutes and one move then stayed in KVM's
            // synchronize_srcu() for minutes on this host; 300k moves are
            // what a release build's 40 listings see (2.5 s).
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && moves < MAX_MOVES {
                for place in [&a, &b] {
                    vm.set_slot(
                        0,
                        1,
                        0,
                        place.base_gfn,
                        4,
                        (place.userspace_addr - vm.addr(0)) as usize / 4096,
                    )
                    .unwrap();
                    vm.set_slot(0, 1, 0, 0, 0, 0).unwrap();
                    moves += 2;
                }
            }
            moves
        });
        for _ in 0..40 {
            let vms = memslots::list(Some(&[pid])).expect("listing memslots");
            assert_eq!(vms.len(), 1);
            let got: Vec<Memslot> = user_slots(&vms[0]);
            let known: Vec<&Memslot> = fixed.iter().chain([&a, &b]).collect();
            for s in &got {
                assert!(known.contains(&s), "a slot that never was: {s:?}");
            }
            if vms[0].changing {
                changing += 1;
            } else {
                assert!(
                    states.contains(&got),
                    "not a state the VM went through: {got:?}"
                );
                exact += 1;
            }
        }
        drop(stopper);
        mover.join().unwrap()
    });
    eprintln!(
        "40 listings while slot 1 moved {moves} times: {exact} exact, {changing} marked changing"
    );
    assert!(moves > 40, "the slot hardly moved: {moves}");
}
