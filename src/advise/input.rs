//! What advice is made from: the `vcpu_interval` records of a summary
//! session (live, or read back from `watch --output json`), added up per
//! vCPU thread over the whole run.

use std::collections::BTreeMap;

use serde_json::Value;

/// A task that ran while a vCPU waited for its CPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Culprit {
    /// Its process.
    pub pid: u32,
    /// The task.
    pub tid: u32,
    /// Its name.
    pub comm: String,
    /// Its VM's name, if it is a VMM's thread.
    pub vm: Option<String>,
    /// Time it ran during the waits, ns.
    pub ns: u64,
}

/// A port or guest-physical address the vCPU's exits to the VMM were about.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Target {
    /// `pio` or `mmio`.
    pub kind: String,
    /// Port or address.
    pub addr: u64,
    /// Accesses.
    pub count: u64,
    /// Time in the VMM, ns.
    pub vmm_ns: u64,
}

/// One vCPU thread's figures over the run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vcpu {
    /// VMM process.
    pub pid: u32,
    /// The thread.
    pub tid: u32,
    /// KVM's vCPU id.
    pub vcpu_id: Option<u32>,
    /// The VMM's number of it (QEMU's `CPU n/KVM`, libvirt's vCPU n), from
    /// the thread's name; on some topologies not KVM's id.
    pub vmm_index: Option<u32>,
    /// Observed time, ns (the intervals it was reported in).
    pub observed_ns: u64,
    /// Wake-ups (halts that ended).
    pub wakeups: u64,
    /// Wake-ups that polling caught.
    pub polled: u64,
    /// Wake-ups without a real cause.
    pub invalid: u64,
    /// Sum of halt durations, ns.
    pub halt_ns: u64,
    /// log2 histogram of halt durations in µs (see `halt_hist`).
    pub halt_hist: Vec<u64>,
    /// Largest polling window seen, ns.
    pub poll_window_max_ns: u64,
    /// Time runnable without a CPU, ns.
    pub run_delay_ns: u64,
    /// Tasks that ran instead, by tid.
    pub culprits: BTreeMap<u32, Culprit>,
    /// Loaded time per physical CPU, ns.
    pub pcpus: BTreeMap<u32, u64>,
    /// Time loaded on a CPU, ns.
    pub run_ns: u64,
    /// Loads (load/put pairs that ended).
    pub loads: u64,
    /// Loads on another CPU than the load before (moves between CPUs).
    pub cpu_migrations: u64,
    /// Switch-ins as the kernel counts them (run-delay's `run_delay_switch_ins`).
    pub switch_ins: u64,
    /// Exits from the guest by reason name: (count, ns).
    pub exit_reasons: BTreeMap<String, (u64, u64)>,
    /// Exits to the VMM by target.
    pub targets: BTreeMap<(String, u64), Target>,
}

/// A VM's vCPUs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vm {
    /// VMM process.
    pub pid: u32,
    /// Its name.
    pub name: Option<String>,
    /// Its vCPU threads, by tid.
    pub vcpus: BTreeMap<u32, Vcpu>,
    /// KVM's own halt-polling figures over the run (debugfs), and the
    /// seconds they cover.
    pub kvm: Option<(super::kvm_stats::HaltStats, f64)>,
    /// The dirty-rate monitor's latest VM record (`dirty_rate`, `slot`
    /// null), the latest with migration advice once one has it; runs with
    /// `--link` only.
    pub dirty: Option<Value>,
}

impl Vm {
    /// The longest time any of its vCPUs was observed, ns.
    pub fn observed_ns(&self) -> u64 {
        self.vcpus
            .values()
            .map(|v| v.observed_ns)
            .max()
            .unwrap_or(0)
    }
}

/// Every VM of a run, by pid.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recording {
    /// The VMs.
    pub vms: BTreeMap<u32, Vm>,
    /// `vcpu_interval` records taken in.
    pub records: u64,
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn add_hist(sum: &mut Vec<u64>, h: Option<&Value>) {
    let Some(h) = h.and_then(Value::as_array) else {
        return;
    };
    if sum.len() < h.len() {
        sum.resize(h.len(), 0);
    }
    for (s, x) in sum.iter_mut().zip(h) {
        *s += x.as_u64().unwrap_or(0);
    }
}

impl Recording {
    /// Takes in one record; anything but a `vcpu_interval` is ignored.
    pub fn add(&mut self, r: &Value) {
        let monitor = r.get("monitor").and_then(Value::as_str);
        if monitor == Some("kvm_halt_poll") {
            if let (Some(pid), Some(seconds), Ok(stats)) = (
                r.get("pid").and_then(Value::as_u64),
                r.get("seconds").and_then(Value::as_f64),
                serde_json::from_value(r.get("kvm").cloned().unwrap_or_default()),
            ) && let Some(vm) = self.vms.get_mut(&(pid as u32))
            {
                vm.kvm = Some((stats, seconds));
            }
            return;
        }
        if monitor == Some("dirty_rate") {
            self.add_dirty(r);
            return;
        }
        if monitor != Some("vcpu_interval") {
            return;
        }
        let (Some(pid), Some(tid)) = (
            r.get("pid").and_then(Value::as_u64),
            r.get("tid").and_then(Value::as_u64),
        ) else {
            return;
        };
        self.records += 1;
        let vm = self.vms.entry(pid as u32).or_insert_with(|| Vm {
            pid: pid as u32,
            ..Vm::default()
        });
        if let Some(name) = r.get("vm").and_then(Value::as_str) {
            vm.name = Some(name.to_string());
        }
        let v = vm.vcpus.entry(tid as u32).or_insert_with(|| Vcpu {
            pid: pid as u32,
            tid: tid as u32,
            ..Vcpu::default()
        });
        if let Some(id) = r.get("vcpu_id").and_then(Value::as_u64) {
            v.vcpu_id = Some(id as u32);
        }
        if let Some(n) = r
            .get("comm")
            .and_then(Value::as_str)
            .and_then(crate::procfs::vmm_index)
        {
            v.vmm_index = Some(n);
        }
        v.observed_ns += u(r, "interval_ns");
        v.wakeups += u(r, "wakeups");
        v.polled += u(r, "polled");
        v.invalid += u(r, "invalid");
        v.halt_ns += u(r, "halt_ns");
        add_hist(&mut v.halt_hist, r.get("halt_hist"));
        v.poll_window_max_ns = v.poll_window_max_ns.max(u(r, "poll_window_ns"));
        v.run_delay_ns += u(r, "run_delay_ns");
        v.run_ns += u(r, "run_ns");
        v.loads += u(r, "load_count");
        v.cpu_migrations += u(r, "cpu_migrations");
        v.switch_ins += u(r, "run_delay_switch_ins");
        for c in r
            .get("run_delay_culprits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tid = u(c, "tid") as u32;
            let e = v.culprits.entry(tid).or_insert_with(|| Culprit {
                pid: u(c, "pid") as u32,
                tid,
                comm: c.get("comm").and_then(Value::as_str).unwrap_or("").into(),
                vm: c.get("vm").and_then(Value::as_str).map(String::from),
                ns: 0,
            });
            e.ns += u(c, "ns");
        }
        if let Some(p) = r.get("pcpus").and_then(Value::as_object) {
            for (cpu, ns) in p {
                if let Ok(cpu) = cpu.parse::<u32>() {
                    *v.pcpus.entry(cpu).or_default() += ns.as_u64().unwrap_or(0);
                }
            }
        }
        for e in r
            .get("exits_by_reason")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = e.get("name").and_then(Value::as_str).unwrap_or("?");
            let s = v.exit_reasons.entry(name.to_string()).or_default();
            s.0 += u(e, "count");
            s.1 += u(e, "ns");
        }
        for t in r
            .get("exits_targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = t.get("kind").and_then(Value::as_str).unwrap_or("?");
            let addr = u(t, "addr");
            let e = v
                .targets
                .entry((kind.to_string(), addr))
                .or_insert_with(|| Target {
                    kind: kind.to_string(),
                    addr,
                    ..Target::default()
                });
            e.count += u(t, "count");
            e.vmm_ns += u(t, "vmm_ns");
        }
    }

    /// Keeps a VM's latest dirty-rate record, the latest with migration
    /// advice over a later one without.
    fn add_dirty(&mut self, r: &Value) {
        let (Some(pid), true) = (
            r.get("pid").and_then(Value::as_u64),
            r.get("slot").is_none_or(Value::is_null),
        ) else {
            return;
        };
        let vm = self.vms.entry(pid as u32).or_insert_with(|| Vm {
            pid: pid as u32,
            ..Vm::default()
        });
        if vm.name.is_none() {
            vm.name = r.get("vm").and_then(Value::as_str).map(String::from);
        }
        let advised = |v: &Value| v.get("migration").is_some_and(|m| !m.is_null());
        if advised(r) || !vm.dirty.as_ref().is_some_and(advised) {
            vm.dirty = Some(r.clone());
        }
    }

    /// Reads NDJSON (a `watch --output json` recording); lines that are not
    /// JSON objects are an error naming the line.
    pub fn read(text: &str) -> anyhow::Result<Recording> {
        let mut rec = Recording::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!(
                    "line {}: not a JSON record ({e}); record with `kvm-watcher watch --output json`",
                    i + 1
                )
            })?;
            rec.add(&v);
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_add_up_per_thread() {
        let line = r#"{"monitor":"vcpu_interval","pid":7,"tid":8,"vcpu_id":0,"vm":"a","interval_ns":1000,"wakeups":3,"halt_ns":30,"halt_hist":[1,2],"run_delay_ns":5,"run_delay_culprits":[{"pid":1,"tid":2,"comm":"hog","vm":null,"ns":4}],"pcpus":{"1":900},"cpu_migrations":7,"run_delay_switch_ins":9,"exits_targets":[{"kind":"pio","addr":1284,"count":10,"vmm_ns":100}]}"#;
        let text = format!("{line}\n{line}\n{{\"monitor\":\"summary\"}}\n");
        let rec = Recording::read(&text).unwrap();
        let v = &rec.vms[&7].vcpus[&8];
        assert_eq!((v.observed_ns, v.wakeups, v.halt_ns), (2000, 6, 60));
        assert_eq!(v.halt_hist, vec![2, 4]);
        assert_eq!(v.culprits[&2].ns, 8);
        assert_eq!(v.pcpus[&1], 1800);
        assert_eq!((v.cpu_migrations, v.switch_ins), (14, 18));
        assert_eq!(v.targets[&("pio".into(), 1284)].vmm_ns, 200);
        assert_eq!(rec.vms[&7].name.as_deref(), Some("a"));
        assert!(Recording::read("{\"x\":1}\nnot json").is_err());
    }
}
