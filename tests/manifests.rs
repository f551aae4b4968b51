//! deploy/kubernetes/: the container's arguments are ones the binary
//! accepts, its image is this release, and the kustomize output passes the
//! offline validators (kubernetes-validate --strict for core objects, the
//! prometheus-operator models for ServiceMonitor and PodMonitor), each
//! shown to reject a manifest with a mistake in it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::manifests::{args, daemonset_container, kvm_watcher_containers};

/// The kustomizations a user applies.
const KUSTOMIZATIONS: &[&str] = &["deploy/kubernetes", "deploy/kubernetes/podmonitor"];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// kvm-watcher's own argument parser on `args`.
fn parse(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("kvm-watcher".to_string()).chain(args.iter().cloned());
    kvm_watcher::cli::command()
        .try_get_matches_from(argv)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn container_args_are_ones_the_binary_accepts() {
    let containers = kvm_watcher_containers();
    assert!(
        !containers.is_empty(),
        "no kvm-watcher container in deploy/kubernetes"
    );
    for (file, c) in &containers {
        let args = args(c);
        if let Err(e) = parse(&args) {
            panic!("{}: kvm-watcher rejects {args:?}: {e}", file.display());
        }
    }
    // The check itself: a flag the binary lacks, a value it refuses.
    let mut wrong = args(&daemonset_container());
    wrong.push("--web.listen-address=:9464".into());
    assert!(parse(&wrong).is_err(), "{wrong:?} accepted");
    let mut wrong = args(&daemonset_container());
    wrong.push("--retain=-1".into());
    assert!(parse(&wrong).is_err(), "{wrong:?} accepted");
}

/// The DaemonSet runs this release's image, by its tag (what scripts/image
/// builds), never a floating one.
#[test]
fn the_image_is_pinned_to_this_release() {
    let c = daemonset_container();
    let image = c["image"].as_str().unwrap();
    assert_eq!(image, format!("kvm-watcher:{}", env!("CARGO_PKG_VERSION")));
    let script = std::fs::read_to_string(repo("scripts/image")).unwrap();
    assert!(
        script.contains("localhost/kvm-watcher:$version"),
        "scripts/image tags by version"
    );
}

/// `kubectl kustomize DIR` into a file, or None (after a skip) without kubectl.
fn kustomize(dir: &str) -> Option<String> {
    let out = match Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo(dir))
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            common::skip("kubectl is not installed (scripts/setup installs kubernetes-client)");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        text(&out)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// A tool of the Python environment scripts/setup makes, or None (after a skip).
fn venv_tool(name: &str) -> Option<PathBuf> {
    let p = repo("target/tools/venv/bin").join(name);
    if p.exists() {
        Some(p)
    } else {
        common::skip(&format!("{} is missing (run scripts/setup)", p.display()));
        None
    }
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

fn kubernetes_validate(tool: &Path, file: &Path) -> Output {
    Command::new(tool)
        .arg("--strict")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn kustomize_output_passes_kubernetes_validate_strict() {
    let Some(tool) = venv_tool("kubernetes-validate") else {
        return;
    };
    for dir in KUSTOMIZATIONS {
        let Some(yaml) = kustomize(dir) else {
            return;
        };
        let file = write_temp("kustomized.yaml", &yaml);
        let out = kubernetes_validate(&tool, &file);
        let report = text(&out);
        assert!(out.status.success(), "{dir}: {report}");
        for kind in ["namespace", "secret", "service", "daemonset"] {
            assert!(
                report.contains(&format!("passed for resource {kind}/")),
                "{dir}: no {kind} validated: {report}"
            );
        }
        assert!(!report.contains("ERROR"), "{dir}: {report}");
        eprintln!("{dir}:\n{}", String::from_utf8_lossy(&out.stdout));
        // --strict rejects a field Kubernetes does not have.
        let wrong = yaml.replacen("readOnlyRootFilesystem: true", "readOnlyRootFS: true", 1);
        assert_ne!(wrong, yaml);
        let bad = write_temp("kustomized-wrong.yaml", &wrong);
        let out = kubernetes_validate(&tool, &bad);
        assert!(
            !out.status.success(),
            "a misspelt field passed: {}",
            text(&out)
        );
        let _ = std::fs::remove_file(bad);
        let _ = std::fs::remove_file(file);
    }
}

/// Validates every ServiceMonitor and PodMonitor in the YAML on stdin with
/// the prometheus-operator models; a field the models do not know is dropped
/// when the model is dumped again, so the dump must equal the input.
const CHECK_MONITORS: &str = r#"
import sys, yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, ServiceMonitor
kinds = {"ServiceMonitor": ServiceMonitor, "PodMonitor": PodMonitor}
n = 0
for doc in yaml.safe_load_all(sys.stdin):
    model = kinds.get(doc["kind"])
    if model is None:
        continue
    dumped = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    if dumped != doc:
        sys.exit(f"{doc['kind']}: fields the schema does not know:\n{doc}\nvs\n{dumped}")
    print(f"{doc['kind']}/{doc['metadata']['name']}: valid")
    n += 1
if n == 0:
    sys.exit("no ServiceMonitor or PodMonitor")
"#;

fn check_monitors(python: &Path, yaml: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(python)
        .args(["-c", CHECK_MONITORS])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn service_and_pod_monitors_match_the_prometheus_operator_schema() {
    let Some(python) = venv_tool("python3") else {
        return;
    };
    let mut kinds = String::new();
    for dir in KUSTOMIZATIONS {
        let Some(yaml) = kustomize(dir) else {
            return;
        };
        let out = check_monitors(&python, &yaml);
        assert!(out.status.success(), "{dir}: {}", text(&out));
        kinds += &String::from_utf8_lossy(&out.stdout);
        // The check itself: a misspelt field and a bad value are refused.
        for (from, to) in [
            ("relabelings:", "relabelling:"),
            ("scheme: http", "scheme: htp"),
        ] {
            let wrong = yaml.replacen(from, to, 1);
            assert_ne!(wrong, yaml, "{from}");
            let out = check_monitors(&python, &wrong);
            assert!(!out.status.success(), "{dir}: {to} passed: {}", text(&out));
        }
    }
    eprint!("{kinds}");
    assert!(
        kinds.contains("ServiceMonitor/kvm-watcher: valid"),
        "{kinds}"
    );
    assert!(kinds.contains("PodMonitor/kvm-watcher: valid"), "{kinds}");
}
