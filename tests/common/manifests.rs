//! What deploy/kubernetes/ says about the kvm-watcher container: its
//! arguments, capabilities and image, read from the YAML itself so the tests
//! run the container exactly as the manifests describe it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

/// Every document of every YAML file under deploy/kubernetes/, with its file.
pub fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
            docs.push((f.clone(), v));
        }
    }
    docs
}

/// The containers (and init containers) of every workload in the manifests
/// that run the kvm-watcher image, with their file.
pub fn kvm_watcher_containers() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for (file, doc) in documents() {
        let spec = &doc["spec"]["template"]["spec"];
        for key in ["containers", "initContainers"] {
            for c in spec[key].as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or("");
                if image
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .starts_with("kvm-watcher:")
                {
                    out.push((file.clone(), c.clone()));
                }
            }
        }
    }
    out
}

/// The one kvm-watcher container of the DaemonSet.
pub fn daemonset_container() -> Value {
    let mut found: Vec<Value> = documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == "DaemonSet")
        .flat_map(|(_, d)| {
            d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(found.len(), 1, "one container in one DaemonSet");
    found.remove(0)
}

/// The container's arguments.
pub fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .expect("the container's args")
        .iter()
        .map(|a| a.as_str().expect("string arguments").to_string())
        .collect()
}

/// The capabilities the container adds, in podman's spelling (CAP_BPF,...).
pub fn capabilities(container: &Value) -> Vec<String> {
    container["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect()
}
