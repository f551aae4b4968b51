//! Names of exit reasons: from the running kernel's tracepoint print formats
//! where tracefs is readable (`events/kvm/kvm_exit/format` holds the VMX and
//! the SVM table as `__print_symbolic` lists, `kvm_userspace_exit/format` the
//! KVM_EXIT_* one), otherwise from the tables built in (`builtin.rs`). A
//! reason no table names is shown as its number, in hex for exits from the
//! guest.

use std::collections::BTreeMap;

use super::builtin;

/// The reason of a failed KVM_RUN: `EXITS_USER_ERROR` + errno (src/bpf/exits.h).
pub const USER_ERROR: u32 = 0x10000;
/// An exit whose reason the kernel half could not read (exits.bpf.c).
pub const REASON_UNKNOWN: u32 = 0xffff_fffe;

/// Whose hardware exit codes these are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// Intel VMX (kvm_intel).
    Vmx,
    /// AMD SVM (kvm_amd).
    Svm,
}

impl Vendor {
    /// The vendor module loaded here, if any.
    pub fn of_host() -> Option<Vendor> {
        if std::path::Path::new("/sys/module/kvm_amd").exists() {
            Some(Vendor::Svm)
        } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
            Some(Vendor::Vmx)
        } else {
            None
        }
    }
}

/// The names of exit reasons of both vendors and of exits to the VMM.
#[derive(Clone, Debug)]
pub struct Reasons {
    vmx: BTreeMap<u32, String>,
    svm: BTreeMap<u32, String>,
    user: BTreeMap<u32, String>,
    /// The vendor whose table names exits from the guest.
    pub vendor: Option<Vendor>,
    /// Where the names came from: `tracefs` or `built-in`.
    pub source: &'static str,
}

fn table(entries: &[(u32, &str)]) -> BTreeMap<u32, String> {
    entries.iter().map(|&(v, n)| (v, n.to_string())).collect()
}

impl Reasons {
    /// The built-in tables.
    pub fn builtin(vendor: Option<Vendor>) -> Reasons {
        Reasons {
            vmx: table(builtin::VMX),
            svm: table(builtin::SVM),
            user: table(builtin::USER),
            vendor,
            source: "built-in",
        }
    }

    /// The running kernel's names where tracefs can be read, else the built-in ones.
    pub fn of_host() -> Reasons {
        let read = |event: &str| {
            ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                .iter()
                .find_map(|d| {
                    std::fs::read_to_string(format!("{d}/events/kvm/{event}/format")).ok()
                })
        };
        Reasons::builtin(Vendor::of_host()).completed_by(
            read("kvm_exit").as_deref(),
            read("kvm_userspace_exit").as_deref(),
        )
    }

    /// These tables with the names of the running kernel's tracepoint
    /// formats laid over them. A format names only the reasons its kernel
    /// knew when it was written (6.18's `kvm_userspace_exit` stops at
    /// X86_WRMSR, 30, while KVM also returns DIRTY_RING_FULL, 31), so the
    /// built-in names fill what a format leaves out.
    pub fn completed_by(mut self, exit_format: Option<&str>, user_format: Option<&str>) -> Reasons {
        if let Some((vmx, svm)) = exit_format.and_then(parse_exit_format) {
            self.vmx.extend(vmx);
            self.svm.extend(svm);
            self.source = "tracefs";
        }
        if let Some(user) = user_format.and_then(parse_userspace_format) {
            self.user.extend(user);
        }
        self
    }

    /// The name of exit reason `reason` from the guest (VMX: its basic
    /// reason, the low 16 bits, with " (failed entry)" when bit 31 is set).
    pub fn kvm(&self, reason: u32) -> String {
        if reason == REASON_UNKNOWN {
            return "unknown (no vendor BTF)".into();
        }
        let found = match self.vendor {
            Some(Vendor::Vmx) => self.vmx.get(&(reason & 0xffff)).map(|n| {
                if reason & 0x8000_0000 != 0 {
                    format!("{n} (failed entry)")
                } else {
                    n.clone()
                }
            }),
            Some(Vendor::Svm) => self.svm.get(&reason).cloned(),
            None => None,
        };
        found.unwrap_or_else(|| format!("{reason:#x}"))
    }

    /// The name of the reason of an exit to the VMM (KVM_EXIT_*, without the prefix).
    pub fn user(&self, reason: u32) -> String {
        if reason > USER_ERROR {
            // KVM_RUN returns EAGAIN, normally, for an AP that got INIT but
            // no SIPI yet: the VMM runs it again.
            return match (reason - USER_ERROR) as i32 {
                libc::EAGAIN => "EAGAIN (vCPU waiting for SIPI)".into(),
                e => match crate::hooks::errno_name(e) {
                    "errno" => format!("error (errno {e})"),
                    name => format!("error ({name})"),
                },
            };
        }
        self.user
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| reason.to_string())
    }
}

/// The `{ value, "name" }` lists of every `__print_symbolic(...)` in `text`, in order.
pub fn symbolic_tables(text: &str) -> Vec<BTreeMap<u32, String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("__print_symbolic(") {
        let body = &rest[at + "__print_symbolic(".len()..];
        let mut depth = 1usize;
        let mut end = body.len();
        let mut in_str = false;
        for (i, c) in body.char_indices() {
            match c {
                '"' => in_str = !in_str,
                '(' if !in_str => depth += 1,
                ')' if !in_str => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push(entries(&body[..end]));
        rest = &body[end..];
    }
    out
}

/// The `{ value, "name" }` entries of one `__print_symbolic` argument list.
fn entries(body: &str) -> BTreeMap<u32, String> {
    let mut map = BTreeMap::new();
    for item in body.split('{').skip(1) {
        let Some(item) = item.split('}').next() else {
            continue;
        };
        let Some((value, name)) = item.split_once(',') else {
            continue;
        };
        let (Some(v), Some(n)) = (eval(value), strings(name)) else {
            continue;
        };
        map.insert(v, n);
    }
    map
}

/// A value as the format writes it: a sum of decimal or hex literals
/// (`0x040 + 13`), possibly negative (`-1` is 0xffffffff).
fn eval(expr: &str) -> Option<u32> {
    let mut sum: i64 = 0;
    for term in expr.split('+') {
        let t = term.trim().trim_end_matches(['u', 'U', 'l', 'L']);
        let (neg, t) = match t.strip_prefix('-') {
            Some(t) => (true, t.trim()),
            None => (false, t),
        };
        let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => i64::from_str_radix(h, 16).ok()?,
            None => t.parse::<i64>().ok()?,
        };
        sum += if neg { -v } else { v };
    }
    Some(sum as u32)
}

/// Adjacent string literals joined (`"KVM_EXIT_" "IO"`); None without any.
fn strings(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
    (!parts.is_empty()).then(|| parts.concat())
}

/// The VMX and SVM tables of kvm:kvm_exit's format: the one that names
/// EXCEPTION_NMI is VMX's, the one that names vmrun SVM's (the format tests
/// `isa == 1`, VMX, first).
pub fn parse_exit_format(text: &str) -> Option<(BTreeMap<u32, String>, BTreeMap<u32, String>)> {
    let fmt = &text[text.find("print fmt:")?..];
    let tables = symbolic_tables(fmt);
    let has = |t: &BTreeMap<u32, String>, name: &str| t.values().any(|n| n == name);
    let vmx = tables.iter().find(|t| has(t, "EXCEPTION_NMI"))?.clone();
    let svm = tables.iter().find(|t| has(t, "vmrun"))?.clone();
    Some((vmx, svm))
}

/// kvm:kvm_userspace_exit's KVM_EXIT_* table, without the prefix.
pub fn parse_userspace_format(text: &str) -> Option<BTreeMap<u32, String>> {
    let fmt = &text[text.find("print fmt:")?..];
    let table = symbolic_tables(fmt).into_iter().next()?;
    (!table.is_empty()).then(|| {
        table
            .into_iter()
            .map(|(v, n)| (v, n.trim_start_matches("KVM_EXIT_").to_string()))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_6_18: &str = include_str!("testdata/kvm_exit-6.18.format");
    const USER_6_18: &str = include_str!("testdata/kvm_userspace_exit-6.18.format");
    /// Linux 5.10's kvm_exit format (Debian 11), as its source prints it:
    /// the reason is the tracepoint's first argument and the tables are the
    /// same macros, expanded.
    const EXIT_5_10: &str = r#"name: kvm_exit
format:
	field:unsigned int exit_reason;	offset:8;	size:4;	signed:0;
print fmt: "reason %s rip 0x%lx info %llx %llx", (REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 0, "EXCEPTION_NMI" }, { 1, "EXTERNAL_INTERRUPT" }, { 12, "HLT" }, { 30, "IO_INSTRUCTION" }, { 48, "EPT_VIOLATION" }) : __print_symbolic(REC->exit_reason, { 0x000, "read_cr0" }, { 0x040 + 14, "PF excp" }, { 0x060, "interrupt" }, { 0x078, "hlt" }, { 0x07b, "io" }, { 0x080, "vmrun" }, { 0x400, "npf" }, { -1, "invalid" }), REC->guest_rip, REC->info1, REC->info2"#;

    #[test]
    fn both_vendors_tables_are_read_from_the_recorded_format() {
        let (vmx, svm) = parse_exit_format(EXIT_6_18).unwrap();
        assert_eq!(vmx.len(), 65);
        assert_eq!(svm.len(), 110);
        assert_eq!(vmx[&12], "HLT");
        assert_eq!(vmx[&30], "IO_INSTRUCTION");
        assert_eq!(vmx[&48], "EPT_VIOLATION");
        assert_eq!(svm[&0x78], "hlt");
        assert_eq!(svm[&0x7b], "io");
        assert_eq!(svm[&0x400], "npf");
        assert_eq!(svm[&(0x40 + 14)], "PF excp", "sums of literals");
        assert_eq!(svm[&0xffff_ffff], "invalid_guest_state", "-1 as u32");
        assert_eq!(svm[&0x8000_fffd], "vmgexit_hypervisor_feature");
    }

    #[test]
    fn the_older_format_reads_the_same_way() {
        let (vmx, svm) = parse_exit_format(EXIT_5_10).unwrap();
        assert_eq!(vmx.len(), 5);
        assert_eq!(vmx[&30], "IO_INSTRUCTION");
        assert_eq!(svm[&0x4e], "PF excp");
        assert_eq!(svm[&0xffff_ffff], "invalid");
    }

    #[test]
    fn the_builtin_tables_are_those_of_the_recorded_format() {
        let (vmx, svm) = parse_exit_format(EXIT_6_18).unwrap();
        assert_eq!(vmx, table(builtin::VMX));
        assert_eq!(svm, table(builtin::SVM));
        let user = parse_userspace_format(USER_6_18).unwrap();
        for (v, n) in &user {
            assert_eq!(table(builtin::USER).get(v), Some(n));
        }
    }

    #[test]
    fn user_space_names_join_the_format_strings() {
        let user = parse_userspace_format(USER_6_18).unwrap();
        assert_eq!(user[&2], "IO");
        assert_eq!(user[&6], "MMIO");
        assert_eq!(user[&10], "INTR");
        assert_eq!(user[&30], "X86_WRMSR");
    }

    #[test]
    fn names_never_hide_a_known_reason_and_show_unknown_ones_as_numbers() {
        let svm = Reasons::builtin(Some(Vendor::Svm));
        assert_eq!(svm.kvm(0x7b), "io");
        assert_eq!(svm.kvm(0x1234), "0x1234");
        let vmx = Reasons::builtin(Some(Vendor::Vmx));
        assert_eq!(vmx.kvm(30), "IO_INSTRUCTION");
        assert_eq!(vmx.kvm(0x8000_0021), "INVALID_STATE (failed entry)");
        assert_eq!(Reasons::builtin(None).kvm(30), "0x1e");
        assert_eq!(svm.user(2), "IO");
        assert_eq!(svm.user(USER_ERROR + 14), "error (EFAULT)");
        assert_eq!(svm.user(USER_ERROR + 11), "EAGAIN (vCPU waiting for SIPI)");
        assert_eq!(svm.user(USER_ERROR + 99), "error (errno 99)");
        assert_eq!(svm.user(99), "99");
    }

    #[test]
    fn a_format_that_stops_early_keeps_the_builtin_names_after_it() {
        let r = Reasons::builtin(Some(Vendor::Vmx)).completed_by(Some(EXIT_5_10), Some(USER_6_18));
        assert_eq!(r.source, "tracefs");
        assert_eq!(r.user(30), "X86_WRMSR", "from the format");
        assert_eq!(r.user(31), "DIRTY_RING_FULL", "past the format's end");
        assert_eq!(r.kvm(30), "IO_INSTRUCTION", "from the format");
        assert_eq!(
            r.kvm(0x8000_0021),
            "INVALID_STATE (failed entry)",
            "not in the 5.10 format"
        );
        let none = Reasons::builtin(Some(Vendor::Svm)).completed_by(None, None);
        assert_eq!(none.source, "built-in");
        assert_eq!(none.user(31), "DIRTY_RING_FULL");
    }

    #[test]
    fn malformed_formats_are_refused() {
        assert!(parse_exit_format("").is_none());
        assert!(parse_exit_format("print fmt: \"%d\", REC->x").is_none());
        assert!(
            parse_exit_format("print fmt: __print_symbolic(x, { 0, \"EXCEPTION_NMI\" }").is_none()
        );
        assert_eq!(eval("0x40 + 1"), Some(0x41));
        assert_eq!(eval("nonsense"), None);
    }
}
