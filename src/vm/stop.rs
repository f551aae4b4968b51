//! Stopping the synthetic VM: the guest is asked to stop, vCPUs that do not are
//! kicked out of KVM_RUN, then the last dirty-log collection and the report.
//! Dropping a VM that was not stopped stops it the quick way.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::SyntheticVm;
use super::guest;
use super::report::{DirtyReport, ExitsMade, SchedReport, SlotSwap, Stats, VcpuReport, VmReport};
use super::run;
use super::stats::StatsFd;
use super::vcpu::{Handled, SchedDelta, VcpuEnd, VcpuThread};

impl SyntheticVm {
    /// Stops every vCPU and returns the report. An error that cut the run short,
    /// or that a vCPU ended with, comes out here, once all vCPU threads are gone.
    ///
    /// The guest's stop flag is raised first: a halted vCPU sees it at its next
    /// timer interrupt (so its last HLT still ends with an interrupt). Whoever is
    /// still in KVM_RUN after 100 ms + 2 timer periods (at most 250 ms) is kicked
    /// and reported with exit `kick`.
    pub fn stop(&mut self) -> Result<VmReport> {
        let Some(outcome) = self.outcome.take() else {
            bail!("this synthetic VM has not run");
        };
        let mut ends = self.stop_vcpus()?;
        let ended = ends
            .iter()
            .map(|e| e.ended)
            .max()
            .unwrap_or(outcome.started);
        let seconds = if outcome.aborted {
            0.0
        } else {
            ended
                .saturating_duration_since(outcome.started)
                .as_secs_f64()
        };
        let mut exits = Vec::new();
        for (i, e) in ends.iter_mut().enumerate() {
            let r = std::mem::replace(&mut e.result, Ok(""));
            exits.push(r.with_context(|| format!("vCPU {i} (id {})", self.vcpu_id(i)))?);
        }
        if let Some(e) = outcome.error {
            return Err(e);
        }
        self.collect_dirty()?; // final collection, all vCPUs stopped
        let dirty = self.dirty_report();
        let sched: Vec<_> = ends.iter().map(|e| e.sched).collect();
        let handled: Vec<_> = ends.iter().map(|e| e.handled).collect();
        let vcpus = self.vcpu_reports(&exits, &sched, &handled)?;
        let now = self.memory.memslots.clone();
        let (memslots, swapped) = match outcome.swapped {
            Some((at_seconds, created)) => (
                created,
                Some(SlotSwap {
                    at_seconds,
                    memslots: now,
                }),
            ),
            None => (now, None),
        };
        let report = VmReport {
            pid: std::process::id(),
            seconds,
            vcpus,
            memslots,
            swapped,
            dirty,
            vm_stats: read_stats(&self.vm_stats).context("reading the VM stats")?,
            timeline: outcome.timeline,
        };
        drop(ends); // vCPU fds (and their kvm_run mappings) go now
        Ok(report)
    }

    /// Raises the guest's stop flag, kicks whoever is still running after the
    /// grace time, and joins every vCPU thread.
    fn stop_vcpus(&mut self) -> Result<Vec<VcpuEnd>> {
        let n = self.config.vcpus;
        self.memory.sys.write_u32(guest::CTRL_STOP, 1);
        let grace = Duration::from_millis(100)
            + self
                .config
                .halt_hz
                .map(|hz| Duration::from_secs_f64(2.0 / hz as f64))
                .unwrap_or_default()
            + 2 * Duration::from_nanos(
                self.config
                    .halt_pattern
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0)
                    .into(),
            );
        let grace_end = Instant::now() + grace.min(Duration::from_millis(250));
        while self.shared.finished() < n && Instant::now() < grace_end {
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.shared.finished() < n {
            self.shared.kick();
            for t in &self.threads {
                t.interrupt();
            }
        }
        if self.config.linger {
            self.linger_until_signal();
        }
        // Join them all before looking at how they ended, so that none is left running.
        let joined: Vec<Result<VcpuEnd>> = self.threads.drain(..).map(VcpuThread::join).collect();
        joined.into_iter().collect()
    }

    /// `--linger`: once every vCPU thread has ended its run (and sleeps),
    /// says so and waits for SIGUSR1, SIGINT or SIGTERM, then lets them end.
    fn linger_until_signal(&self) {
        let n = self.config.vcpus;
        while self.shared.finished() < n && !self.shared.failed() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let tids: Vec<String> = self.tids.iter().map(u32::to_string).collect();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "kvm-watcher vm: lingering pid={} tids={}",
            std::process::id(),
            tids.join(",")
        );
        let _ = err.flush();
        drop(err);
        let signals = run::stop_signals();
        while run::wait_signal(&signals, None).is_none() {}
        self.shared.release();
    }

    /// Every dirty page collected, for the report.
    fn dirty_report(&self) -> DirtyReport {
        let mut collected = std::mem::take(&mut *self.shared.collected.lock().unwrap());
        collected.ring_full_exits = self.shared.ring_full.load(Ordering::SeqCst);
        collected.report(self.config.dirty_log.name(), &self.memory.logged)
    }

    /// One report per vCPU: the guest's own counters, how it stopped, KVM's stats.
    fn vcpu_reports(
        &self,
        exits: &[&'static str],
        sched: &[Option<SchedDelta>],
        handled: &[Handled],
    ) -> Result<Vec<VcpuReport>> {
        let sys = &self.memory.sys;
        let mut reports = Vec::new();
        for (i, exit) in exits.iter().enumerate() {
            let area = guest::area(i as u64);
            reports.push(VcpuReport {
                index: i as u32,
                vcpu_id: self.vcpu_id(i),
                tid: self.tids[i],
                comm: self.comms[i].clone(),
                interrupts: sys.read_u64(area + guest::AREA_INTERRUPTS),
                halts: sys.read_u64(area + guest::AREA_HALTS),
                passes: sys.read_u64(area + guest::AREA_PASSES),
                pages_written: sys.read_u64(area + guest::AREA_PAGES_WRITTEN),
                exits_made: ExitsMade {
                    io: sys.read_u64(area + guest::AREA_IO_EXITS),
                    mmio: sys.read_u64(area + guest::AREA_MMIO_EXITS),
                    io_port: guest::IO_EXIT_PORT,
                    mmio_gpa: guest::MMIO_EXIT_GPA,
                    vmm_io: handled.get(i).map_or(0, |h| h.io),
                    vmm_mmio: handled.get(i).map_or(0, |h| h.mmio),
                    io_in: sys.read_u64(area + guest::AREA_IO_IN_EXITS),
                    io_in_port: guest::IO_IN_PORT,
                    vmm_io_in: handled.get(i).map_or(0, |h| h.io_in),
                    vmm_ns: handled.get(i).map_or(0, |h| h.ns),
                },
                exit: exit.to_string(),
                stats: read_stats(&self.vcpu_stats[i])
                    .with_context(|| format!("reading the stats of vCPU {i}"))?,
                sched: sched.get(i).copied().flatten().map(|d| SchedReport {
                    cpu_ns: d.cpu_ns,
                    run_delay_ns: d.wait_ns,
                    switch_ins: d.switch_ins,
                }),
            });
        }
        Ok(reports)
    }
}

impl Drop for SyntheticVm {
    /// Stops vCPU threads that [`SyntheticVm::stop`] did not (an error cut the
    /// run short): the guest's stop flag, a kick, and a join. The fields then
    /// go in order: vCPU fds, dirty rings and stats fds, the VM fd, its memory.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.memory.sys.write_u32(guest::CTRL_STOP, 1);
        self.shared.abandon();
        for t in &self.threads {
            t.interrupt();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_stats(s: &Option<StatsFd>) -> Result<Option<Stats>> {
    s.as_ref().map(|s| s.read()).transpose()
}

/// Prints the report on stdout: one JSON document with `json`, else a few lines of text.
pub(super) fn print_report(r: &VmReport, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r).context("writing the JSON report")?;
        writeln!(out)?;
    } else {
        writeln!(out, "pid {}: guest ran {:.3} s", r.pid, r.seconds)?;
        for v in &r.vcpus {
            writeln!(
                out,
                "vCPU {} (id {}, tid {}, {}): {} interrupts, {} halts, {} passes, {} page writes, stopped by {}",
                v.index,
                v.vcpu_id,
                v.tid,
                v.comm,
                v.interrupts,
                v.halts,
                v.passes,
                v.pages_written,
                v.exit
            )?;
        }
        for m in &r.memslots {
            writeln!(
                out,
                "slot {} ({}): gfn {:#x}..{:#x} ({} pages) at {:#x}, flags {}",
                m.slot,
                m.role,
                m.base_gfn,
                m.base_gfn + m.npages,
                m.npages,
                m.userspace_addr,
                m.flags
            )?;
        }
        if r.dirty.mode != "off" {
            writeln!(
                out,
                "dirty ({}): {} distinct pages, {} harvested in {} collections",
                r.dirty.mode, r.dirty.distinct_pages, r.dirty.harvested, r.dirty.collections
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
