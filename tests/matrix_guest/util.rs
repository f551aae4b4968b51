//! Small helpers of the matrix's checks: the processes it starts and the
//! multisets it compares.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use kvm_watcher::child::{Running, Spawn, Stream};
use serde_json::Value;

use crate::common::{self, bin};

/// Starts `kvm-watcher <args>` and waits until a stderr line contains `marker`.
pub fn start(name: String, args: &[String], marker: &str) -> Result<Running, String> {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    Spawn::new(cmd)
        .name(name)
        .ready_on(Stream::Stderr, marker)
        .ready_within(Duration::from_secs(120))
        .start()
        .map_err(|e| common::failure(&e))
}

/// Waits (killing after `timeout`); returns (exited with 0 in time, stdout, stderr).
pub fn finish(p: Running, timeout: Duration) -> (bool, String, String) {
    match p.wait_or_kill(timeout) {
        Ok(exit) => (
            exit.status.success() && !exit.killed,
            exit.stdout,
            exit.stderr,
        ),
        Err(e) => (false, String::new(), common::failure(&e)),
    }
}

/// A number field of a row, u64::MAX if it is not one. Unlike
/// `common::observe::u` it does not panic: a check here fails its cell, since
/// a panic would end the whole run in the matrix's VM and lose every later cell.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(u64::MAX)
}

pub fn multiset<T: Ord + Clone>(v: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for x in v {
        *m.entry(x).or_insert(0) += 1;
    }
    m
}

/// Describes the first difference of two multisets.
pub fn diff<T: Ord + std::fmt::Debug>(a: &BTreeMap<T, usize>, b: &BTreeMap<T, usize>) -> String {
    let total = |m: &BTreeMap<T, usize>| m.values().sum::<usize>();
    for (k, n) in a {
        if b.get(k) != Some(n) {
            return format!(
                "{} vs {} rows; e.g. {k:?}: {n} vs {:?}",
                total(a),
                total(b),
                b.get(k)
            );
        }
    }
    for (k, n) in b {
        if a.get(k) != Some(n) {
            return format!(
                "{} vs {} rows; e.g. {k:?}: {:?} vs {n}",
                total(a),
                total(b),
                a.get(k)
            );
        }
    }
    String::new()
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}
