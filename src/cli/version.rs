//! What `--version` says: the release, the commit it was built from, and the
//! libbpf linked into it (the BPF loader whose features decide what attaches).

use std::sync::OnceLock;

/// The commit this binary was built from (build.rs), or "unknown".
pub const GIT_REVISION: &str = env!("KVM_WATCHER_GIT_REVISION");

/// The version of the libbpf linked into this binary, as libbpf reports it
/// (`v1.7`).
pub fn libbpf() -> String {
    // SAFETY: libbpf returns a pointer to a static NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(libbpf_rs::libbpf_sys::libbpf_version_string()) };
    s.to_string_lossy().into_owned()
}

/// `0.1.0 (git 0123456789ab, libbpf v1.7)`.
pub fn long() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let rev = GIT_REVISION.get(..12).unwrap_or(GIT_REVISION);
        format!(
            "{} (git {rev}, libbpf {})",
            env!("CARGO_PKG_VERSION"),
            libbpf()
        )
    })
}
