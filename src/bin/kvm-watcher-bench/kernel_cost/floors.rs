//! The empty programs (floors) on every hook, loaded once.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use libbpf_rs::Link;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};

use crate::procfs::prog_id_of_fd;
use crate::skel::{BenchSkel, BenchSkelBuilder};

pub struct Floors {
    skel: BenchSkel<'static>,
}

impl Floors {
    pub fn load() -> Result<Floors> {
        // The skeleton borrows its storage: leak one, it lives as long as the run.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = BenchSkelBuilder::default()
            .open(storage)
            .context("cannot open the bench BPF object")?;
        for mut p in open.open_object_mut().progs_mut() {
            let gen_prog = p.name().to_str() == Some("gen_dirty_events");
            p.set_autoload(!gen_prog);
        }
        let skel = open.load().context("cannot load the bench BPF object")?;
        Ok(Floors { skel })
    }

    /// Attaches the empty `kind` ("raw" or "tp") program on each of `hooks`.
    pub fn attach(&self, kind: &str, hooks: &[&str]) -> Result<(Vec<Link>, HashMap<u32, String>)> {
        let mut links = Vec::new();
        let mut ids = HashMap::new();
        for prog in self.skel.object().progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            let Some(hook) = name.strip_prefix(&format!("floor_{kind}_")) else {
                continue;
            };
            if !hooks.contains(&hook) {
                continue;
            }
            links.push(
                prog.attach()
                    .with_context(|| format!("cannot attach {name}"))?,
            );
            let id = prog_id_of_fd(prog.as_fd().as_raw_fd())
                .with_context(|| format!("no prog id for {name}"))?;
            ids.insert(id, hook.to_string());
        }
        Ok((links, ids))
    }
}
