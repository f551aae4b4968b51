//! The guest: a few hundred bytes of 32-bit machine code, its memory layout, and
//! the vCPU register state that starts it.
//!
//! The guest runs in 32-bit flat protected mode without paging (CR0.PE set by
//! KVM_SET_SREGS, 4 GiB code/data segments, a 3-entry GDT and a 256-entry IDT in
//! guest memory), so guest virtual = guest physical. Every vCPU runs the same code;
//! EBP points at its own 64-byte area and ESP at its own stack. The LAPIC is used in
//! x2APIC mode (WRMSR only: no MMIO to emulate).
//!
//! # Guest physical memory
//!
//! System slot (slot 0, gpa 0, never dirty-logged):
//!
//! | gpa | content |
//! |---|---|
//! | `0x0000` | IDT, 256 interrupt gates (vector 0x40 = timer, 0xff = spurious, all others = fault stubs) |
//! | `0x0800` | GDT: null, code (selector 0x08), data (selector 0x10) |
//! | `0x1000` | control block: `+0` u32 stop flag (host sets 1), `+4` u32 max passes (0 = none), `+8` u32 LAPIC timer initial count (0 = no timer, no HLT), `+12` u32 yield every N page writes (0 = never), `+16` u32 port writes per pass, `+20` u32 MMIO writes per pass, `+24` u32 their guest-physical address, `+28` u32 their stride, `+32` u32 port reads per pass, `+36` u32 LVT timer value (mode and vector), `+40` u32 halt pattern length (0 = periodic timer) |
//! | `0x1100` | halt pattern: up to [`MAX_HALT_PATTERN`] u32 one-shot timer counts (ns) |
//! | `0x2000` | guest code ([`CODE`]); `0x20c0` halt routine; `0x2100` timer handler; `0x2140` spurious handler; `0x2180` exit routine; `0x21c0` pass end; `0x21e5` port reads; `0x2200 + 8*v` fault stub of vector v |
//! | `0x3000 + 64*i` | per-vCPU area of vCPU index i, see `AREA_*` |
//! | `0x10000 + 4096*i` | stack of vCPU index i (ESP starts at the end of its page) |
//! | `0x200000 + 4*N*i` | page list of vCPU index i: N u32 guest physical addresses, N = `--dirty-pages` |
//!
//! Data slots (slots 1..=K, KVM_MEM_LOG_DIRTY_PAGES when `--dirty-log` is not off)
//! are contiguous from [`DATA_BASE`] (gpa 0x1000_0000, gfn 0x10000): with P data
//! pages in total, slot `1 + k` holds `P / K` pages (the last slot also gets the
//! remainder) starting at `DATA_BASE + k * (P / K) * 4096`.
//!
//! # Which pages each vCPU writes
//!
//! vCPU index `i`, page `j` (0 <= j < N): let `g = i * N + j`; it writes the first
//! u32 (the current pass number) of relative page `g / K` of data slot `1 + g % K`,
//! i.e. gpa `DATA_BASE + (g % K) * (P / K) * 4096 + (g / K) * 4096`. So every vCPU
//! has its own pages, consecutive vCPUs' pages follow each other, and they alternate
//! over all the data slots. Every pass writes all N pages again, in order j = 0..N.
//!
//! With a sweep of C pages per pass (`--sweep C`, N a multiple of C), pass p
//! writes only the C pages `j = (p * C) mod N ..` of the list: the vCPU moves
//! through its N pages at C pages per pass and starts over at the end. The
//! value written is the pass number (so every write changes the page), or 0
//! for every write with `--same-content` (the page keeps what it holds).
//!
//! # Halts
//!
//! With `--halt-hz` the LAPIC timer is periodic and every pass ends in a HLT
//! that the next tick ends. With a halt pattern (`--halt-pattern`) the timer
//! is one-shot: right before each HLT the halt routine arms it with the
//! pattern's next count, in a cycle (the vCPU's position is `AREA_PATTERN_POS`),
//! so the halts last the pattern's durations (less the few instructions
//! between the arming and the HLT, plus the host's wake-up when KVM let the
//! vCPU sleep).
//!
//! # Exits on purpose
//!
//! After its pages, every pass makes `--io-exits` one-byte `OUT`s to
//! [`IO_EXIT_PORT`] and `--mmio-exits` 4-byte writes to [`MMIO_EXIT_GPA`], a page
//! no memslot and no in-kernel device covers: each is one exit to the VMM
//! (KVM_EXIT_IO, KVM_EXIT_MMIO), then `--io-in` one-byte `IN`s from
//! [`IO_IN_PORT`], each an exit the VMM answers (KVM_EXIT_IO, direction in).
//! The guest counts each after it completed (`AREA_IO_EXITS`,
//! `AREA_MMIO_EXITS`, `AREA_IO_IN_EXITS`); the VMM counts them too.

use anyhow::{Context, Result, bail};
use kvm_bindings::{CpuId, KVM_MP_STATE_RUNNABLE, Msrs, kvm_mp_state, kvm_msr_entry, kvm_segment};
use kvm_ioctls::VcpuFd;

/// Guest page size.
pub const PAGE: u64 = 4096;
/// Guest physical address of the IDT.
pub const IDT: u64 = 0x0;
/// Guest physical address of the GDT.
pub const GDT: u64 = 0x800;
/// Control block: stop flag.
pub const CTRL_STOP: u64 = 0x1000;
/// Control block: maximum passes (0 = unlimited).
pub const CTRL_MAX_PASSES: u64 = 0x1004;
/// Control block: LAPIC timer initial count (0 = no timer and no HLT).
pub const CTRL_TIMER_COUNT: u64 = 0x1008;
/// Control block: OUT to [`YIELD_PORT`] after every this many page writes (0 = never).
pub const CTRL_YIELD_EVERY: u64 = 0x100c;
/// Control block: `OUT`s to [`IO_EXIT_PORT`] per pass.
pub const CTRL_IO_EXITS: u64 = 0x1010;
/// Control block: writes to [`MMIO_EXIT_GPA`] per pass.
pub const CTRL_MMIO_EXITS: u64 = 0x1014;
/// Control block: the guest-physical address of those writes.
pub const CTRL_MMIO_GPA: u64 = 0x1018;
/// Where the guest's `--mmio-exits` write (one address, or consecutive words
/// with `--mmio-spread`): nothing lives there.
pub const MMIO_EXITS: std::ops::Range<u64> = MMIO_EXIT_GPA..MMIO_EXIT_GPA + 0x10_0000;
/// Control block: how far each of those writes moves the address (0: all to one).
pub const CTRL_MMIO_STRIDE: u64 = 0x101c;
/// Control block: `IN`s from [`IO_IN_PORT`] per pass.
pub const CTRL_IO_IN_EXITS: u64 = 0x1020;
/// Control block: the LVT timer register's value (timer mode and vector).
pub const CTRL_TIMER_LVT: u64 = 0x1024;
/// Control block: entries in the halt pattern (0: the timer is periodic).
pub const CTRL_PATTERN_LEN: u64 = 0x1028;
/// The halt pattern: u32 one-shot timer counts, ns.
pub const CTRL_PATTERN: u64 = 0x1100;
/// Most entries in a halt pattern.
pub const MAX_HALT_PATTERN: usize = 64;
/// LVT timer: periodic, vector [`TIMER_VECTOR`].
const LVT_PERIODIC: u32 = 0x20000 | TIMER_VECTOR as u32;
/// LVT timer: one-shot, vector [`TIMER_VECTOR`].
const LVT_ONE_SHOT: u32 = TIMER_VECTOR as u32;
/// Guest code.
pub const CODE: u64 = 0x2000;
/// The routine before each HLT (called from the main loop).
pub const HALT_SUB: u64 = 0x20c0;
/// Timer interrupt handler (vector [`TIMER_VECTOR`]).
pub const TIMER_ISR: u64 = 0x2100;
/// Spurious interrupt handler (vector 0xff).
pub const SPURIOUS_ISR: u64 = 0x2140;
/// The routine that makes the exits of a pass (called from the main loop).
pub const EXITS_SUB: u64 = 0x2180;
/// The routine that ends a pass (sweep, next value), then makes its exits.
pub const PASS_END_SUB: u64 = 0x21c0;
/// The routine that makes the port reads of a pass (the exit routine ends there).
pub const IO_IN_SUB: u64 = 0x21e5;
/// Fault stubs, 8 bytes per vector.
pub const FAULT_STUBS: u64 = 0x2200;
/// Per-vCPU areas, [`AREA_SIZE`] bytes each.
pub const AREAS: u64 = 0x3000;
/// Size of one per-vCPU area.
pub const AREA_SIZE: u64 = 128;

/// Guest-physical address of vCPU `index`'s area.
pub const fn area(index: u64) -> u64 {
    AREAS + AREA_SIZE * index
}
/// Area offset: u64 interrupts taken.
pub const AREA_INTERRUPTS: u64 = 0;
/// Area offset: u64 HLTs executed.
pub const AREA_HALTS: u64 = 8;
/// Area offset: u64 passes completed.
pub const AREA_PASSES: u64 = 16;
/// Area offset: u64 page writes.
pub const AREA_PAGES_WRITTEN: u64 = 24;
/// Area offset: u32 gpa of this vCPU's page list.
pub const AREA_PAGE_LIST: u64 = 32;
/// Area offset: u32 number of pages in the list.
pub const AREA_NPAGES: u64 = 36;
/// Area offset: u64 `OUT`s to [`IO_EXIT_PORT`] completed.
pub const AREA_IO_EXITS: u64 = 40;
/// Area offset: u64 writes to [`MMIO_EXIT_GPA`] completed.
pub const AREA_MMIO_EXITS: u64 = 48;
/// Area offset: u32 the value the next pass writes into the first u32 of its pages.
pub const AREA_VALUE: u64 = 56;
/// Area offset: u32 what that value grows by after each pass (1, or 0 for same-content writes).
pub const AREA_VALUE_STEP: u64 = 60;
/// Area offset: u32 gpa right after the end of the sweep's page list (0 = no sweep).
pub const AREA_LIST_END: u64 = 64;
/// Area offset: u32 gpa of the start of the sweep's page list.
pub const AREA_LIST_START: u64 = 68;
/// Area offset: u64 `IN`s from [`IO_IN_PORT`] completed.
pub const AREA_IO_IN_EXITS: u64 = 72;
/// Area offset: u32 the halt pattern's entry the next halt arms the timer with.
pub const AREA_PATTERN_POS: u64 = 80;
/// Stacks, one page per vCPU.
pub const STACKS: u64 = 0x10000;
/// Page lists.
pub const PAGE_LISTS: u64 = 0x20_0000;
/// First guest physical address of the data slots.
pub const DATA_BASE: u64 = 0x1000_0000;
/// Data slots must end below the in-kernel IOAPIC (0xfec00000) and LAPIC pages.
pub const DATA_LIMIT: u64 = 0xfec0_0000;
/// Most vCPUs supported by the layout (areas and stacks).
pub const MAX_VCPUS: u32 = 256;
/// The guest does `OUT` to this port when it stops on its own.
pub const EXIT_PORT: u16 = 0x501;
/// The guest does `OUT` to this port every `CTRL_YIELD_EVERY` page writes (dirty ring
/// mode): the exit makes KVM pass through its request checks, where a soft-full dirty
/// ring stops the vCPU (KVM_EXIT_DIRTY_RING_FULL). Without it, a backend that emulates
/// the guest's instructions in a loop (nested PVM) pushes past the ring's end, which
/// KVM cannot recover from (entries are overwritten and KVM_RESET_DIRTY_RINGS stalls).
pub const YIELD_PORT: u16 = 0x503;
/// The guest does `OUT` to this port `--io-exits` times per pass; the VMM counts them.
pub const IO_EXIT_PORT: u16 = 0x504;
/// The guest does `IN` from this port `--io-in` times per pass; the VMM answers 0
/// and counts them.
pub const IO_IN_PORT: u16 = 0x505;
/// The guest writes this guest-physical address `--mmio-exits` times per pass: above
/// the data slots, below the LAPIC, away from the in-kernel IOAPIC (0xfec00000).
pub const MMIO_EXIT_GPA: u64 = 0xfed0_0000;
/// Fault stubs do `OUT` of the vector number to this port.
pub const FAULT_PORT: u16 = 0x502;
/// Interrupt vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// KVM's emulated LAPIC bus runs at 1 GHz (APIC_BUS_CYCLE_NS = 1); with divide-by-1
/// the timer's initial count is in nanoseconds.
pub const LAPIC_NS_PER_TICK: u64 = 1;
/// KVM clamps a periodic LAPIC timer to `min_timer_period_us` (200 us by default).
pub const MAX_HALT_HZ: u32 = 5000;

/// Main program, loaded at [`CODE`]. Entered with EBP = per-vCPU area, ESP = stack top, IF = 0.
#[rustfmt::skip]
const MAIN: &[u8] = &[
    // entry:
    0xb9, 0x0f, 0x08, 0x00, 0x00,        // 00 mov  $0x80f,%ecx        x2APIC SVR
    0xb8, 0xff, 0x01, 0x00, 0x00,        // 05 mov  $0x1ff,%eax        APIC enabled, spurious vector 0xff
    0x31, 0xd2,                          // 0a xor  %edx,%edx
    0x0f, 0x30,                          // 0c wrmsr
    0x8b, 0x1d, 0x08, 0x10, 0x00, 0x00,  // 0e mov  0x1008,%ebx        timer initial count
    0x85, 0xdb,                          // 14 test %ebx,%ebx
    0x74, 0x21,                          // 16 je   loop               no timer
    0xb9, 0x3e, 0x08, 0x00, 0x00,        // 18 mov  $0x83e,%ecx        x2APIC divide configuration
    0xb8, 0x0b, 0x00, 0x00, 0x00,        // 1d mov  $0xb,%eax          divide by 1
    0x0f, 0x30,                          // 22 wrmsr
    0xb9, 0x32, 0x08, 0x00, 0x00,        // 24 mov  $0x832,%ecx        x2APIC LVT timer
    0xa1, 0x24, 0x10, 0x00, 0x00,        // 29 mov  0x1024,%eax        timer mode, vector 0x40
    0x0f, 0x30,                          // 2e wrmsr
    0xb9, 0x38, 0x08, 0x00, 0x00,        // 30 mov  $0x838,%ecx        x2APIC timer initial count
    0x89, 0xd8,                          // 35 mov  %ebx,%eax
    0x0f, 0x30,                          // 37 wrmsr                   starts the timer
    // loop:
    0x83, 0x3d, 0x00, 0x10, 0x00, 0x00, 0x00, // 39 cmpl $0,0x1000     stop flag
    0x75, 0x6a,                          // 40 jne  done
    0xa1, 0x04, 0x10, 0x00, 0x00,        // 42 mov  0x1004,%eax        max passes
    0x85, 0xc0,                          // 47 test %eax,%eax
    0x74, 0x05,                          // 49 je   1f
    0x3b, 0x45, 0x10,                    // 4b cmp  0x10(%ebp),%eax    passes (low dword)
    0x76, 0x5c,                          // 4e jbe  done               max <= passes
    // 1:
    0x8b, 0x75, 0x20,                    // 50 mov  0x20(%ebp),%esi    page list
    0x8b, 0x4d, 0x24,                    // 53 mov  0x24(%ebp),%ecx    npages
    0x8b, 0x45, 0x38,                    // 56 mov  0x38(%ebp),%eax    value to write
    0x8b, 0x1d, 0x0c, 0x10, 0x00, 0x00,  // 59 mov  0x100c,%ebx        yield every (0 = never)
    0x85, 0xc9,                          // 5f test %ecx,%ecx
    0x74, 0x26,                          // 61 je   3f
    // 2:
    0x8b, 0x3e,                          // 63 mov  (%esi),%edi        gpa of the next page
    0x89, 0x07,                          // 65 mov  %eax,(%edi)        dirty it
    0x83, 0xc6, 0x04,                    // 67 add  $4,%esi
    0x85, 0xdb,                          // 6a test %ebx,%ebx
    0x74, 0x0e,                          // 6c je   4f
    0x4b,                                // 6e dec  %ebx
    0x75, 0x0b,                          // 6f jne  4f
    0x66, 0xba, 0x03, 0x05,              // 71 mov  $0x503,%dx
    0xee,                                // 75 out  %al,(%dx)          yield to the host
    0x8b, 0x1d, 0x0c, 0x10, 0x00, 0x00,  // 76 mov  0x100c,%ebx
    // 4:
    0x49,                                // 7c dec  %ecx
    0x75, 0xe4,                          // 7d jne  2b
    0x8b, 0x4d, 0x24,                    // 7f mov  0x24(%ebp),%ecx
    0x01, 0x4d, 0x18,                    // 82 add  %ecx,0x18(%ebp)    pages_written += npages
    0x83, 0x55, 0x1c, 0x00,              // 85 adcl $0,0x1c(%ebp)
    // 3:
    0xe8, 0x32, 0x01, 0x00, 0x00,        // 89 call pass_end (0x21c0)
    0x83, 0x45, 0x10, 0x01,              // 8e addl $1,0x10(%ebp)      passes++
    0x83, 0x55, 0x14, 0x00,              // 92 adcl $0,0x14(%ebp)
    0x83, 0x3d, 0x08, 0x10, 0x00, 0x00, 0x00, // 96 cmpl $0,0x1008    timer?
    0x74, 0x9a,                          // 9d je   loop
    0xe8, 0x1c, 0x00, 0x00, 0x00,        // 9f call halt (0x20c0)      halts++, one-shot timer armed
    0x90, 0x90, 0x90,                    // a4 nop; nop; nop
    0xfb,                                // a7 sti                     (interrupt shadow: no IRQ before HLT)
    0xf4,                                // a8 hlt                     wait for the timer
    0xfa,                                // a9 cli                     (not reached: the timer handler jumps to loop)
    0xeb, 0x8d,                          // aa jmp  loop
    // done:
    0x66, 0xba, 0x01, 0x05,              // ac mov  $0x501,%dx
    0xee,                                // b0 out  %al,(%dx)          tell the host we stopped
    0xeb, 0xf9,                          // b1 jmp  done
];

/// The routine before each HLT, loaded at [`HALT_SUB`]: counts the halt;
/// with a halt pattern (`CTRL_PATTERN_LEN` not 0) arms the one-shot timer
/// with the pattern's next count and moves the vCPU's position on, wrapping
/// at the end. Clobbers EAX, ECX, EDX (the main loop reloads them).
#[rustfmt::skip]
const HALT: &[u8] = &[
    0x83, 0x45, 0x08, 0x01,              // c0 addl $1,0x8(%ebp)       halts++
    0x83, 0x55, 0x0c, 0x00,              // c4 adcl $0,0xc(%ebp)
    0x8b, 0x0d, 0x28, 0x10, 0x00, 0x00,  // c8 mov  0x1028,%ecx        pattern length
    0x85, 0xc9,                          // ce test %ecx,%ecx
    0x74, 0x1d,                          // d0 je   1f                 periodic timer: nothing to arm
    0x8b, 0x55, 0x50,                    // d2 mov  0x50(%ebp),%edx    position
    0x8b, 0x04, 0x95, 0x00, 0x11, 0x00, 0x00, // d5 mov 0x1100(,%edx,4),%eax  this halt's count
    0x42,                                // dc inc  %edx
    0x39, 0xca,                          // dd cmp  %ecx,%edx
    0x72, 0x02,                          // df jb   2f
    0x31, 0xd2,                          // e1 xor  %edx,%edx          wrap
    // 2:
    0x89, 0x55, 0x50,                    // e3 mov  %edx,0x50(%ebp)
    0x31, 0xd2,                          // e6 xor  %edx,%edx
    0xb9, 0x38, 0x08, 0x00, 0x00,        // e8 mov  $0x838,%ecx        x2APIC timer initial count
    0x0f, 0x30,                          // ed wrmsr                   one-shot, fires in EAX ns
    // 1:
    0xc3,                                // ef ret
];

/// Timer interrupt handler, loaded at [`TIMER_ISR`].
///
/// It never returns with IRET: KVM's instruction emulator cannot emulate a
/// protected-mode IRET, and backends that emulate 32-bit guests (the nested PVM
/// backend of the development machines) fail on it with KVM_EXIT_INTERNAL_ERROR.
/// Interrupts are only enabled by `sti; hlt` (the STI shadow covers the HLT), so the
/// frame points right after that HLT; where an emulator does not keep the
/// shadow (seen under nested SVM on TCG: a virtual interrupt pending at the
/// STI is taken before the HLT) it points at the HLT, which never ran, and
/// the halt counted before the STI is taken back. The handler drops the
/// 12-byte frame (EIP, CS, EFLAGS; IF stays 0 through the interrupt gate) and
/// jumps to `loop`.
#[rustfmt::skip]
const TIMER: &[u8] = &[
    0x83, 0x45, 0x00, 0x01,              // 100 addl $1,0x0(%ebp)      interrupts++
    0x83, 0x55, 0x04, 0x00,              // 104 adcl $0,0x4(%ebp)
    0xb9, 0x0b, 0x08, 0x00, 0x00,        // 108 mov  $0x80b,%ecx       x2APIC EOI
    0x31, 0xc0,                          // 10d xor  %eax,%eax
    0x31, 0xd2,                          // 10f xor  %edx,%edx
    0x0f, 0x30,                          // 111 wrmsr
    0x81, 0x3c, 0x24, 0xa8, 0x20, 0x00, 0x00, // 113 cmpl $0x20a8,(%esp) taken at the HLT?
    0x75, 0x08,                          // 11a jne  1f
    0x83, 0x6d, 0x08, 0x01,              // 11c subl $1,0x8(%ebp)      then it never halted: halts--
    0x83, 0x5d, 0x0c, 0x00,              // 120 sbbl $0,0xc(%ebp)
    // 1:
    0x83, 0xc4, 0x0c,                    // 124 add  $12,%esp          drop the interrupt frame
    0xe9, 0x0d, 0xff, 0xff, 0xff,        // 127 jmp  loop (0x2039)
];

/// The HLT of the main loop, whose address the timer handler compares.
const MAIN_HLT: usize = 0xa8;
const _: () = assert!(MAIN[MAIN_HLT] == 0xf4);

/// Spurious interrupt handler (vector 0xff, no EOI), loaded at [`SPURIOUS_ISR`]; same
/// frame handling as the timer handler.
#[rustfmt::skip]
const SPURIOUS: &[u8] = &[
    0x83, 0xc4, 0x0c,                    // 140 add  $12,%esp
    0xe9, 0xf1, 0xfe, 0xff, 0xff,        // 143 jmp  loop (0x2039)
];

/// The exits of one pass, loaded at [`EXITS_SUB`]: `CTRL_IO_EXITS` OUTs to
/// [`IO_EXIT_PORT`], then `CTRL_MMIO_EXITS` writes to the address at
/// `CTRL_MMIO_GPA` (each `CTRL_MMIO_STRIDE` bytes past the one before), each
/// counted in the vCPU's area once it completed; then on to [`IO_IN`].
/// Clobbers EAX, ECX, EDX, EDI (the main loop reloads them).
#[rustfmt::skip]
const EXITS: &[u8] = &[
    0x8b, 0x0d, 0x10, 0x10, 0x00, 0x00,  // 180 mov  0x1010,%ecx       port writes per pass
    0x85, 0xc9,                          // 186 test %ecx,%ecx
    0x74, 0x10,                          // 188 je   1f
    0x66, 0xba, 0x04, 0x05,              // 18a mov  $0x504,%dx
    // 0:
    0xee,                                // 18e out  %al,(%dx)         one exit to the VMM
    0x83, 0x45, 0x28, 0x01,              // 18f addl $1,0x28(%ebp)     io_exits++
    0x83, 0x55, 0x2c, 0x00,              // 193 adcl $0,0x2c(%ebp)
    0x49,                                // 197 dec  %ecx
    0x75, 0xf4,                          // 198 jne  0b
    // 1:
    0x8b, 0x0d, 0x14, 0x10, 0x00, 0x00,  // 19a mov  0x1014,%ecx       MMIO writes per pass
    0x85, 0xc9,                          // 1a0 test %ecx,%ecx
    0x74, 0x19,                          // 1a2 je   3f
    0x8b, 0x3d, 0x18, 0x10, 0x00, 0x00,  // 1a4 mov  0x1018,%edi       their address
    // 2:
    0x89, 0x07,                          // 1aa mov  %eax,(%edi)       one exit to the VMM
    0x03, 0x3d, 0x1c, 0x10, 0x00, 0x00,  // 1ac add  0x101c,%edi       the next address
    0x83, 0x45, 0x30, 0x01,              // 1b2 addl $1,0x30(%ebp)     mmio_exits++
    0x83, 0x55, 0x34, 0x00,              // 1b6 adcl $0,0x34(%ebp)
    0x49,                                // 1ba dec  %ecx
    0x75, 0xed,                          // 1bb jne  2b
    // 3:
    0xeb, 0x26,                          // 1bd jmp  io_in (0x21e5)
];

/// The port reads of one pass, loaded at [`IO_IN_SUB`]: `CTRL_IO_IN_EXITS`
/// one-byte `IN`s from [`IO_IN_PORT`], each counted in the vCPU's area once
/// it completed (KVM completes it in the KVM_RUN after the VMM answered).
/// Clobbers EAX, ECX, EDX.
#[rustfmt::skip]
const IO_IN: &[u8] = &[
    0x8b, 0x0d, 0x20, 0x10, 0x00, 0x00,  // 1e5 mov  0x1020,%ecx       port reads per pass
    0x85, 0xc9,                          // 1eb test %ecx,%ecx
    0x74, 0x10,                          // 1ed je   1f
    0x66, 0xba, 0x05, 0x05,              // 1ef mov  $0x505,%dx
    // 0:
    0xec,                                // 1f3 in   (%dx),%al         one exit to the VMM
    0x83, 0x45, 0x48, 0x01,              // 1f4 addl $1,0x48(%ebp)     io_in_exits++
    0x83, 0x55, 0x4c, 0x00,              // 1f8 adcl $0,0x4c(%ebp)
    0x49,                                // 1fc dec  %ecx
    0x75, 0xf4,                          // 1fd jne  0b
    // 1:
    0xc3,                                // 1ff ret
];

// Each routine ends before the next begins.
const _: () = assert!(EXITS_SUB + EXITS.len() as u64 <= PASS_END_SUB);
const _: () = assert!(PASS_END_SUB + PASS_END.len() as u64 <= IO_IN_SUB);
const _: () = assert!(IO_IN_SUB + IO_IN.len() as u64 <= FAULT_STUBS);

/// The end of a pass, loaded at [`PASS_END_SUB`]: with a sweep (`AREA_LIST_END`
/// not 0), the page list moves on by the pass's pages and wraps from its end to
/// `AREA_LIST_START`; the value written next pass grows by `AREA_VALUE_STEP` (0:
/// every write stores what the page already holds); then it goes on to [`EXITS`].
/// Clobbers ECX, EDX (and what [`EXITS`] clobbers).
#[rustfmt::skip]
const PASS_END: &[u8] = &[
    0x8b, 0x4d, 0x40,                    // 1c0 mov  0x40(%ebp),%ecx   list end (0 = no sweep)
    0x85, 0xc9,                          // 1c3 test %ecx,%ecx
    0x74, 0x13,                          // 1c5 je   1f
    0x8b, 0x55, 0x24,                    // 1c7 mov  0x24(%ebp),%edx   pages per pass
    0xc1, 0xe2, 0x02,                    // 1ca shl  $2,%edx
    0x03, 0x55, 0x20,                    // 1cd add  0x20(%ebp),%edx   the next pass's first entry
    0x39, 0xca,                          // 1d0 cmp  %ecx,%edx
    0x72, 0x03,                          // 1d2 jb   2f
    0x8b, 0x55, 0x44,                    // 1d4 mov  0x44(%ebp),%edx   wrap to the list's start
    // 2:
    0x89, 0x55, 0x20,                    // 1d7 mov  %edx,0x20(%ebp)
    // 1:
    0x8b, 0x4d, 0x3c,                    // 1da mov  0x3c(%ebp),%ecx   value step
    0x01, 0x4d, 0x38,                    // 1dd add  %ecx,0x38(%ebp)
    0xe9, 0x9b, 0xff, 0xff, 0xff,        // 1e0 jmp  exits (0x2180)
];

/// Fault stub of vector `v`: `mov $v,%al; mov $0x502,%dx; out %al,(%dx); hlt` (8 bytes).
fn fault_stub(v: u8) -> [u8; 8] {
    [0xb0, v, 0x66, 0xba, 0x02, 0x05, 0xee, 0xf4]
}

/// 32-bit interrupt gate: selector 0x08, present, DPL 0, type 0xe.
fn idt_gate(handler: u64) -> u64 {
    let h = handler & 0xffff_ffff;
    (h & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((h >> 16) << 48)
}

/// Size of the system slot for `vcpus` vCPUs writing `npages` pages each.
pub fn system_slot_size(vcpus: u32, npages: u64) -> u64 {
    let list = (vcpus as u64 * npages * 4).div_ceil(PAGE) * PAGE;
    PAGE_LISTS + list.max(PAGE)
}

/// Geometry of the data slots.
#[derive(Debug, Clone, Copy)]
pub struct DataLayout {
    /// Number of data slots (K).
    pub slots: u32,
    /// Pages in each slot except possibly the last (P / K).
    pub pages_per_slot: u64,
    /// Pages in all data slots (P).
    pub total_pages: u64,
}

impl DataLayout {
    /// Pages of data slot number `k` (0-based: slot id `1 + k`).
    pub fn slot_pages(&self, k: u32) -> u64 {
        if k + 1 == self.slots {
            self.total_pages - self.pages_per_slot * (self.slots as u64 - 1)
        } else {
            self.pages_per_slot
        }
    }

    /// Guest physical address of the first page of data slot number `k` (0-based).
    pub fn slot_gpa(&self, k: u32) -> u64 {
        DATA_BASE + k as u64 * self.pages_per_slot * PAGE
    }

    /// Page `j` of vCPU index `i` when each vCPU writes `n` pages:
    /// (data slot number k (0-based), relative page in that slot).
    pub fn page_of(&self, i: u32, j: u64, n: u64) -> (u32, u64) {
        let g = i as u64 * n + j;
        ((g % self.slots as u64) as u32, g / self.slots as u64)
    }
}

/// The exits to the VMM each pass makes on purpose.
#[derive(Debug, Clone, Copy)]
pub struct OnPurpose {
    /// `OUT`s to [`IO_EXIT_PORT`].
    pub io: u32,
    /// Writes to [`MMIO_EXIT_GPA`].
    pub mmio: u32,
    /// Those writes go to consecutive words instead of all to one.
    pub mmio_spread: bool,
    /// `IN`s from [`IO_IN_PORT`].
    pub io_in: u32,
}

/// Which pages each pass writes, and what.
#[derive(Debug, Clone, Copy)]
pub struct Writes {
    /// Pages in each vCPU's list (N, `--dirty-pages`).
    pub npages: u64,
    /// With a sweep: pages written per pass (C; N is a multiple of it).
    pub sweep: Option<u64>,
    /// Every write stores 0, which the page already holds, instead of the pass number.
    pub same_content: bool,
}

/// Writes code, IDT, GDT, control block, per-vCPU areas and page lists into the
/// system slot (`sys` is its host mapping).
#[allow(clippy::too_many_arguments)]
pub fn write_image(
    sys: &mut [u8],
    vcpus: u32,
    writes: &Writes,
    timer_count: u32,
    max_passes: u32,
    yield_every: u32,
    exits: &OnPurpose,
    halt_pattern: &[u32],
    data: &DataLayout,
) {
    let put = |mem: &mut [u8], gpa: u64, bytes: &[u8]| {
        mem[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
    };
    for v in 0..=255u8 {
        let handler = match v {
            TIMER_VECTOR => TIMER_ISR,
            0xff => SPURIOUS_ISR,
            _ => FAULT_STUBS + 8 * v as u64,
        };
        put(sys, IDT + 8 * v as u64, &idt_gate(handler).to_le_bytes());
        put(sys, FAULT_STUBS + 8 * v as u64, &fault_stub(v));
    }
    put(sys, GDT, &0u64.to_le_bytes());
    put(sys, GDT + 8, &0x00cf_9a00_0000_ffffu64.to_le_bytes()); // code: base 0, 4 GiB, exec/read
    put(sys, GDT + 16, &0x00cf_9200_0000_ffffu64.to_le_bytes()); // data: base 0, 4 GiB, read/write
    put(sys, CTRL_STOP, &0u32.to_le_bytes());
    put(sys, CTRL_MAX_PASSES, &max_passes.to_le_bytes());
    // With a pattern the timer is one-shot and every halt arms it; the
    // entry's first count only has to outlast the way to the first halt.
    let (timer_count, lvt) = if halt_pattern.is_empty() {
        (timer_count, LVT_PERIODIC)
    } else {
        (u32::MAX, LVT_ONE_SHOT)
    };
    put(sys, CTRL_TIMER_COUNT, &timer_count.to_le_bytes());
    put(sys, CTRL_TIMER_LVT, &lvt.to_le_bytes());
    let pattern = &halt_pattern[..halt_pattern.len().min(MAX_HALT_PATTERN)];
    put(sys, CTRL_PATTERN_LEN, &(pattern.len() as u32).to_le_bytes());
    for (i, ns) in pattern.iter().enumerate() {
        put(sys, CTRL_PATTERN + 4 * i as u64, &ns.to_le_bytes());
    }
    put(sys, CTRL_YIELD_EVERY, &yield_every.to_le_bytes());
    put(sys, CTRL_IO_EXITS, &exits.io.to_le_bytes());
    put(sys, CTRL_MMIO_EXITS, &exits.mmio.to_le_bytes());
    put(sys, CTRL_MMIO_GPA, &(MMIO_EXIT_GPA as u32).to_le_bytes());
    put(
        sys,
        CTRL_MMIO_STRIDE,
        &(u32::from(exits.mmio_spread) * 4).to_le_bytes(),
    );
    put(sys, CTRL_IO_IN_EXITS, &exits.io_in.to_le_bytes());
    put(sys, CODE, MAIN);
    put(sys, HALT_SUB, HALT);
    put(sys, TIMER_ISR, TIMER);
    put(sys, SPURIOUS_ISR, SPURIOUS);
    put(sys, EXITS_SUB, EXITS);
    put(sys, PASS_END_SUB, PASS_END);
    put(sys, IO_IN_SUB, IO_IN);
    let npages = writes.npages;
    for i in 0..vcpus {
        let area = area(u64::from(i));
        let list = PAGE_LISTS + 4 * npages * i as u64;
        let per_pass = writes.sweep.unwrap_or(npages);
        put(sys, area, &[0u8; AREA_SIZE as usize]);
        put(sys, area + AREA_PAGE_LIST, &(list as u32).to_le_bytes());
        put(sys, area + AREA_NPAGES, &(per_pass as u32).to_le_bytes());
        let step = u32::from(!writes.same_content);
        put(sys, area + AREA_VALUE_STEP, &step.to_le_bytes());
        if writes.sweep.is_some() {
            let end = list + 4 * npages;
            put(sys, area + AREA_LIST_END, &(end as u32).to_le_bytes());
            put(sys, area + AREA_LIST_START, &(list as u32).to_le_bytes());
        }
        for j in 0..npages {
            let (k, rel) = data.page_of(i, j, npages);
            let gpa = data.slot_gpa(k) + rel * PAGE;
            put(sys, list + 4 * j, &(gpa as u32).to_le_bytes());
        }
    }
}

fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // accessed exec/read, accessed read/write
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const MSR_IA32_APICBASE: u32 = 0x1b;
const APICBASE_ENABLE: u64 = 1 << 11;
const APICBASE_X2APIC: u64 = 1 << 10;

/// Puts vCPU index `index` (KVM id `vcpu_id`) at the guest's entry point: CPUID,
/// x2APIC mode, flat protected mode, registers, RUNNABLE.
pub fn setup_vcpu(vcpu: &VcpuFd, supported: &CpuId, index: u32, vcpu_id: u32) -> Result<()> {
    let mut cpuid = supported.clone();
    let mut has_x2apic = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((vcpu_id & 0xff) << 24);
                has_x2apic = e.ecx & (1 << 21) != 0;
            }
            0xb | 0x1f => e.edx = vcpu_id,
            _ => {}
        }
    }
    if !has_x2apic {
        bail!("this KVM does not offer x2APIC in KVM_GET_SUPPORTED_CPUID; the guest needs it");
    }
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;

    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APICBASE,
        ..Default::default()
    }])
    .context("building the MSR list")?;
    vcpu.get_msrs(&mut msrs)
        .context("KVM_GET_MSRS(IA32_APIC_BASE)")?;
    let base = msrs.as_slice()[0].data | APICBASE_ENABLE | APICBASE_X2APIC;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APICBASE,
        data: base,
        ..Default::default()
    }])
    .context("building the MSR list")?;
    let n = vcpu
        .set_msrs(&msrs)
        .context("KVM_SET_MSRS(IA32_APIC_BASE)")?;
    if n != 1 {
        bail!("KVM refused to switch the LAPIC to x2APIC mode (IA32_APIC_BASE = {base:#x})");
    }

    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cs = flat_segment(0x08, true);
    let data = flat_segment(0x10, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 256 * 8 - 1;
    sregs.cr0 = 0x31; // PE | ET | NE; no paging, caches enabled
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;

    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = CODE;
    regs.rflags = 0x2;
    regs.rsp = STACKS + PAGE * (index as u64 + 1);
    regs.rbp = area(u64::from(index));
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;

    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .context("KVM_SET_MP_STATE(RUNNABLE)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_pieces_fit_and_the_halt_call_reaches_its_routine() {
        assert!(CODE + MAIN.len() as u64 <= HALT_SUB);
        assert!(HALT_SUB + HALT.len() as u64 <= TIMER_ISR);
        assert!(TIMER_ISR + TIMER.len() as u64 <= SPURIOUS_ISR);
        // The call at 0x9f of the main loop: e8 rel32 from the next instruction.
        let at = 0x9f;
        assert_eq!(MAIN[at], 0xe8);
        let rel = i32::from_le_bytes(MAIN[at + 1..at + 5].try_into().unwrap());
        assert_eq!(CODE as i64 + at as i64 + 5 + rel as i64, HALT_SUB as i64);
        // Then STI; HLT, the HLT where the timer handler looks for it.
        assert_eq!(&MAIN[0xa7..0xa9], &[0xfb, 0xf4]);
        assert_eq!(MAIN[MAIN_HLT], 0xf4);
        let cmp = u32::from_le_bytes(TIMER[0x16..0x1a].try_into().unwrap());
        assert_eq!(u64::from(cmp), CODE + MAIN_HLT as u64);
        // The handler's jump back lands on the main loop.
        let end = TIMER.len();
        assert_eq!(TIMER[end - 5], 0xe9);
        let rel = i32::from_le_bytes(TIMER[end - 4..].try_into().unwrap());
        assert_eq!(
            TIMER_ISR as i64 + end as i64 + rel as i64,
            CODE as i64 + 0x39
        );
        assert!(TIMER_ISR + TIMER.len() as u64 <= SPURIOUS_ISR);
        // The pattern lies in the control block, below the code.
        assert!(CTRL_PATTERN + 4 * MAX_HALT_PATTERN as u64 <= CODE);
    }

    #[test]
    fn a_pattern_makes_the_timer_one_shot() {
        let data = DataLayout {
            slots: 1,
            pages_per_slot: 1,
            total_pages: 1,
        };
        let writes = Writes {
            npages: 0,
            sweep: None,
            same_content: false,
        };
        const NONE: OnPurpose = OnPurpose {
            io: 0,
            mmio: 0,
            mmio_spread: false,
            io_in: 0,
        };
        let mut sys = vec![0u8; system_slot_size(1, 0) as usize];
        let u32_at = |m: &[u8], a: u64| {
            u32::from_le_bytes(m[a as usize..a as usize + 4].try_into().unwrap())
        };
        write_image(&mut sys, 1, &writes, 200_000, 0, 0, &NONE, &[], &data);
        assert_eq!(u32_at(&sys, CTRL_TIMER_LVT), 0x20040);
        assert_eq!(u32_at(&sys, CTRL_PATTERN_LEN), 0);
        assert_eq!(u32_at(&sys, CTRL_TIMER_COUNT), 200_000);
        write_image(
            &mut sys,
            1,
            &writes,
            0,
            0,
            0,
            &NONE,
            &[300_000, 40_000],
            &data,
        );
        assert_eq!(u32_at(&sys, CTRL_TIMER_LVT), 0x40);
        assert_eq!(u32_at(&sys, CTRL_PATTERN_LEN), 2);
        assert_eq!(u32_at(&sys, CTRL_PATTERN + 4), 40_000);
        assert_ne!(u32_at(&sys, CTRL_TIMER_COUNT), 0, "the main loop halts");
        assert_eq!(u32_at(&sys, AREAS + AREA_PATTERN_POS), 0);
    }
}
