//! The container image (scripts/image) run with podman the way a DaemonSet
//! runs it: host PID namespace, only the capabilities it needs, the seccomp
//! profile of deploy/seccomp/, a read-only root filesystem, the image's own
//! non-root user. What it sees of the host's VMs is compared with what the
//! same binary sees on the host, KVM's own statistics and the VMs' pids.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::exporter::{exchange, free_port, sum_of};
use common::qemu::Qemu;
use serde_json::Value;

/// What the DaemonSet grants (deploy/kubernetes/base/daemonset.yaml says
/// why each is needed), in podman's spelling.
fn caps() -> String {
    common::manifests::capabilities(&common::manifests::daemonset_container()).join(",")
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Root, BPF, /dev/kvm and podman; otherwise skips.
fn ready() -> bool {
    if !(common::require_bpf() && common::require_kvm()) {
        return false;
    }
    let have = Command::new("podman").arg("--version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        return common::skip("podman is not installed (scripts/setup installs podman and runc)");
    }
    true
}

/// An image built by scripts/image from the binary under test, with a
/// containers.conf of its own; the image is removed on drop.
struct Image {
    tag: String,
    conf: PathBuf,
}

impl Image {
    fn build() -> Image {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("localhost/kvm-watcher:test-{}-{n}", std::process::id());
        let out = Command::new(repo("scripts/image"))
            .args(["--binary", common::bin(), "--tag", &tag])
            .output()
            .expect("running scripts/image");
        assert!(
            out.status.success(),
            "scripts/image failed:\n{}",
            text(&out)
        );
        let conf = std::env::temp_dir().join(format!(
            "kvm-watcher-containers-{}-{n}.conf",
            std::process::id()
        ));
        std::fs::write(&conf, containers_conf()).unwrap();
        Image { tag, conf }
    }

    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf);
        c
    }

    /// `podman run` with the DaemonSet's settings, `caps` granted, then `args`.
    fn run_args(&self, caps: &str) -> Vec<String> {
        let seccomp = repo("deploy/seccomp/kvm-watcher.json");
        [
            "run",
            "--pid=host",
            "--read-only",
            "--cap-drop=all",
            &format!("--cap-add={caps}"),
            "--security-opt",
            &format!("seccomp={}", seccomp.display()),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Runs `kvm-watcher <args>` in a container to completion.
    fn run(&self, caps: &str, args: &[&str]) -> Output {
        self.podman()
            .args(self.run_args(caps))
            .args(["--rm", &self.tag])
            .args(args)
            .output()
            .expect("podman run")
    }

    fn inspect(&self, format: &str) -> String {
        let out = self
            .podman()
            .args(["image", "inspect", "--format", format, &self.tag])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.podman().args(["rmi", "-f", &self.tag]).output();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// A detached container, removed on drop.
struct Container<'a> {
    image: &'a Image,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .image
            .podman()
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// The runtime and limits this host needs: runc (crun cannot run on its
/// hybrid cgroups) and explicit ulimits, since root here lacks
/// CAP_SYS_RESOURCE and podman's defaults are above the hard limits (runc
/// could not set a process limit above 32768 here).
fn containers_conf() -> String {
    let hard = |r| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit on a local struct.
        unsafe { libc::getrlimit(r, &mut lim) };
        lim.rlim_max
    };
    let nofile = hard(libc::RLIMIT_NOFILE).min(20000);
    let nproc = hard(libc::RLIMIT_NPROC).min(32768);
    format!(
        "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\n[engine]\nruntime = \"runc\"\n"
    )
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_of(out: &Output, what: &str) -> Value {
    assert!(out.status.success(), "{what}: {}", text(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", text(out)))
}

/// The entries of a `vms --json` list (or doctor's `vms`) for these pids, by pid.
/// A thread's `vcpu_id` comes from the system call it is in at the moment
/// of the reading (null while the VMM handles an exit), so two readings
/// may differ there: it must be null or one of the VM's ids, and is left
/// out of the comparison.
fn entries(list: &Value, pids: &[u32]) -> Vec<Value> {
    pids.iter()
        .filter_map(|p| {
            let mut vm = list
                .as_array()?
                .iter()
                .find(|v| v["pid"].as_u64() == Some(*p as u64))
                .cloned()?;
            let ids = vm["vcpu_ids"].clone();
            for t in vm["vcpu_threads"].as_array_mut()? {
                let id = t["vcpu_id"].take();
                assert!(
                    id.is_null() || ids.as_array().is_some_and(|a| a.contains(&id)),
                    "thread vCPU id {id} not among the VM's {ids}"
                );
            }
            Some(vm)
        })
        .collect()
}

/// The image holds the binary and its C runtime only, runs as nobody,
/// starts kvm-watcher, and carries the OCI labels and annotations of the
/// checkout it was built from.
#[test]
fn image_is_small_labelled_and_not_root() {
    if !ready() {
        return;
    }
    let image = Image::build();
    let size: u64 = image.inspect("{{.Size}}").parse().unwrap();
    eprintln!("image {}: {:.1} MB", image.tag, size as f64 / 1e6);
    // The binary (stripped, so no larger than here) and the C runtime files
    // ldd names, plus the image's metadata, and nothing else.
    let binary = std::fs::metadata(common::bin()).unwrap().len();
    let ldd = Command::new("ldd").arg(common::bin()).output().unwrap();
    let runtime: u64 = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(runtime > 1_000_000, "libc and the loader: {runtime} bytes");
    assert!(
        size > runtime && size < binary + runtime + 65536,
        "image of {size} bytes for a binary of {binary} and a runtime of {runtime}"
    );
    assert_eq!(image.inspect("{{.Config.User}}"), "65534:65534");
    assert_eq!(
        image.inspect("{{json .Config.Entrypoint}}"),
        r#"["/usr/bin/kvm-watcher"]"#
    );
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    for what in ["Labels", "Annotations"] {
        let map: Value =
            serde_json::from_str(&image.inspect(&format!("{{{{json .{what}}}}}"))).unwrap();
        let get = |k: &str| {
            map[format!("org.opencontainers.image.{k}")]
                .as_str()
                .map(String::from)
        };
        assert_eq!(
            get("version").as_deref(),
            Some(env!("CARGO_PKG_VERSION")),
            "{what}: {map}"
        );
        assert_eq!(get("revision"), Some(head.clone()), "{what}: {map}");
        assert!(
            get("source").is_some_and(|s| !s.is_empty()),
            "{what}: {map}"
        );
    }
    // The entrypoint is the binary under test; there is no shell to fall into.
    let out = image.run(&caps(), &["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    let host = common::run_cli(&["--version"], Duration::from_secs(10));
    assert_eq!(out.stdout, host.stdout);
    let out = image
        .podman()
        .args([
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            &image.tag,
            "-c",
            "true",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a shell in the image: {}",
        text(&out)
    );
}

/// The DaemonSet's volumes: its web configuration (the Secret's file) and
/// the host's tracefs and debugfs, read-only.
fn daemonset_mounts() -> Vec<String> {
    let web = repo("deploy/kubernetes/base/web-config.yml");
    vec![
        "-v".into(),
        format!("{}:/etc/kvm-watcher/web-config.yml:ro", web.display()),
        "-v".into(),
        "/sys/kernel/tracing:/sys/kernel/tracing:ro".into(),
        "-v".into(),
        "/sys/kernel/debug:/sys/kernel/debug:ro".into(),
    ]
}

/// The monitors' backends in a doctor report, by monitor.
fn backends(doctor: &Value) -> Vec<(String, String)> {
    doctor["monitors"]
        .as_array()
        .expect("doctor's monitors")
        .iter()
        .map(|m| (m["monitor"].to_string(), m["backend"].to_string()))
        .collect()
}

/// `doctor`, `vms` and `serve` in the container see a synthetic guest and a
/// real QEMU VM on the host exactly as the same binary does on the host, and
/// a scrape from the host through the published port returns their series:
/// the guest's wake-ups equal KVM's own count of its halts.
#[test]
fn doctor_vms_and_serve_in_the_container_see_the_hosts_vms() {
    if !ready() {
        return;
    }
    let image = Image::build();
    let id = std::process::id();
    let (syn, qname) = (format!("img-syn-{id}"), format!("img-qemu-{id}"));
    let vm = common::spawn_vm(&["--name", &syn, "--halt-hz", "200", "--seconds", "2"]);
    let Some(mut qemu) = Qemu::start(&qname, 1) else {
        return;
    };
    qemu.wait_until_halting(Duration::from_millis(500), 2);
    let pids = [vm.ready.pid, qemu.pid()];

    let host = json_of(
        &common::run_cli(&["vms", "--json"], Duration::from_secs(30)),
        "host vms",
    );
    let inside = json_of(
        &image.run(&caps(), &["vms", "--json"]),
        "vms in the container",
    );
    let seen = entries(&inside, &pids);
    assert_eq!(seen.len(), 2, "both VMs in the container: {inside}");
    assert_eq!(
        seen,
        entries(&host, &pids),
        "the container's view is the host's"
    );
    assert_eq!(seen[0]["name"], syn.as_str());
    assert_eq!(seen[1]["name"], qname.as_str());
    // Without CAP_DAC_READ_SEARCH the image's user cannot list the VMMs'
    // /proc/PID/fd, where KVM's file descriptors are found.
    let fewer: Vec<String> = caps()
        .split(',')
        .filter(|c| *c != "CAP_DAC_READ_SEARCH")
        .map(String::from)
        .collect();
    assert_eq!(fewer.len(), 3, "{fewer:?}");
    let without = image.run(&fewer.join(","), &["vms", "--json"]);
    // It finds none of them, and says why instead of "no VMs" (exit 1 when
    // nothing at all could be found).
    let found = if without.status.success() {
        entries(&json_of(&without, "vms without CAP_DAC_READ_SEARCH"), &pids)
    } else {
        assert_eq!(without.status.code(), Some(1), "{}", text(&without));
        Default::default()
    };
    assert!(
        found.is_empty(),
        "VMs found without CAP_DAC_READ_SEARCH: {}",
        text(&without)
    );
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("cannot"),
        "vms without CAP_DAC_READ_SEARCH does not say what it cannot see: {}",
        text(&without)
    );

    let host_doctor = json_of(
        &common::run_cli(&["doctor", "--json"], Duration::from_secs(60)),
        "host doctor",
    );
    let doctor = json_of(
        &image.run(&caps(), &["doctor", "--json"]),
        "doctor in the container",
    );
    assert_eq!(
        entries(&doctor["vms"], &pids),
        entries(&host_doctor["vms"], &pids)
    );
    assert_eq!(entries(&doctor["vms"], &pids).len(), 2, "{}", doctor["vms"]);
    assert_eq!(
        backends(&doctor),
        backends(&host_doctor),
        "the same backends as on the host"
    );
    let privileges = &doctor["privileges"];
    assert_eq!(privileges["euid"], 65534, "{privileges}");
    assert_eq!(privileges["cap_bpf"], true, "{privileges}");
    assert_eq!(privileges["cap_sys_admin"], false, "{privileges}");

    // The DaemonSet's own arguments: it listens on 0.0.0.0:9464.
    let args = common::manifests::args(&common::manifests::daemonset_container());
    assert!(
        args.iter().any(|a| a == "--listen=0.0.0.0:9464"),
        "{args:?}"
    );
    let port = free_port();
    let name = format!("kvm-watcher-test-{id}");
    let start = Instant::now();
    let out = image
        .podman()
        .args(image.run_args(&caps()))
        .args([
            "-d",
            "--name",
            &name,
            "-p",
            &format!("127.0.0.1:{port}:9464"),
        ])
        .args(daemonset_mounts())
        .arg(&image.tag)
        .args(&args)
        .output()
        .unwrap();
    let _container = Container {
        image: &image,
        name: name.clone(),
    };
    assert!(out.status.success(), "podman run -d serve: {}", text(&out));
    let scrape = || {
        exchange(
            port,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
    };
    let qemu_label = format!("vm=\"{qname}\"");
    loop {
        if scrape().is_some_and(|b| b.contains(&qemu_label)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let logs = image.podman().args(["logs", &name]).output().unwrap();
            panic!(
                "no scrape with the QEMU VM's series within 60 s; logs:\n{}",
                text(&logs)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "start to first scrape with the QEMU VM's series: {:.2} s",
        start.elapsed().as_secs_f64()
    );

    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    let want: u64 = report
        .vcpus
        .iter()
        .map(|v| common::stat(v.stats.as_ref().unwrap(), "halt_wait_hist"))
        .sum();
    assert!(want > 100, "the guest halted {want} times");
    let syn_labels = [format!("vm=\"{syn}\""), "waited=\"true\"".to_string()];
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = scrape().and_then(|b| sum_of(&b, "kvm_watcher_vcpu_wakeups_total", &syn_labels));
        if got == Some(want as f64) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        got,
        Some(want as f64),
        "the guest's wake-ups after a halt, as KVM counted them"
    );
    // QEMU's vCPU halts since serve attached: some, and no more than KVM
    // counted since QEMU started (read after the scrape).
    let q_labels = [qemu_label, "waited=\"true\"".to_string()];
    let got = scrape()
        .and_then(|b| sum_of(&b, "kvm_watcher_vcpu_wakeups_total", &q_labels))
        .unwrap_or(0.0);
    let kvm: u64 = qemu.halts_waited().iter().sum();
    assert!(
        got > 0.0 && got <= kvm as f64,
        "QEMU: {got} wake-ups exported, KVM counted {kvm}"
    );
}
