//! `serve --web.config.file`: TLS and basic authentication, in the YAML
//! format of the Prometheus exporter toolkit (as node_exporter reads it):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt     # PEM, the chain; relative to this file
//!   key_file: server.key      # PEM
//!   min_version: TLS12        # or TLS13 (default TLS12)
//! basic_auth_users:
//!   prometheus: $2y$10$...    # bcrypt hash (htpasswd -nB)
//! ```
//!
//! Everything is read and checked at start, with bounds: each file must be
//! a regular file of at most [`MAX_CONFIG_BYTES`] (the configuration) or
//! [`MAX_PEM_BYTES`] (certificates and keys), the YAML nests at most
//! [`MAX_DEPTH`] levels, a bcrypt cost is at most [`MAX_BCRYPT_COST`] (the
//! most `htpasswd` makes), user names are unique and have no `:`. A key of
//! the toolkit this exporter does not implement (client certificates,
//! cipher choices, HTTP headers) is refused by name rather than ignored. An
//! empty file and `~` both mean "no TLS, no users". What is allowed but
//! risky (an expired certificate) comes back as warnings.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Largest web configuration file.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Largest certificate or key file.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Deepest nesting of `[` and `{` in the configuration.
pub const MAX_DEPTH: usize = 32;
/// Highest bcrypt cost accepted: the most `htpasswd -B -C` makes (one
/// check of cost 17 takes seconds; 31 takes days).
pub const MAX_BCRYPT_COST: u32 = 17;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default, deserialize_with = "pairs")]
    basic_auth_users: Vec<(String, String)>,
}

/// A YAML mapping as its pairs in order, duplicates kept (so they can be
/// refused rather than the last one silently winning).
fn pairs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping of user names to bcrypt hashes")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(pair) = m.next_entry()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Pairs)
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    min_version: Option<String>,
}

/// What the web configuration turns on.
#[derive(Default)]
pub struct WebConfig {
    /// TLS, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Basic authentication, when users are configured.
    pub auth: Option<BasicAuth>,
    /// What is allowed but risky, for the operator (one line each).
    pub warnings: Vec<String>,
}

/// The bytes of `path`, a regular file of at most `max` bytes; opening
/// does not wait (a FIFO), reading does not go on forever (a device).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read it ({e})"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it ({e})"))?;
    if !meta.is_file() {
        return Err("not a regular file; give the path of a file".into());
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it ({e})"))?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "larger than {} KiB; this is not a file it can use",
            max / 1024
        ));
    }
    Ok(bytes)
}

/// The deepest nesting of flow collections (`[`, `{`) in `text`, outside
/// quotes and comments.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote = None;
    let mut comment = false;
    let mut prev = '\n';
    for c in text.chars() {
        match (quote, c) {
            _ if comment => comment = c != '\n',
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '[' | '{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    deepest
}

impl WebConfig {
    /// Reads and checks `path`; every problem is a usage error naming it.
    pub fn load(path: &Path) -> anyhow::Result<WebConfig> {
        let bad = |what: String| -> anyhow::Error {
            anyhow::Error::new(crate::error::UsageError(format!(
                "--web.config.file {}: {what}",
                path.display()
            )))
        };
        let bytes = read_bounded(path, MAX_CONFIG_BYTES).map_err(bad)?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        if flow_depth(&text) > MAX_DEPTH {
            return Err(bad(format!(
                "nested deeper than {MAX_DEPTH} levels; this is not a web configuration"
            )));
        }
        let file: Option<File> = serde_norway::from_str(&text).map_err(|e| {
            bad(format!("{e}; the format is the Prometheus exporter toolkit's (tls_server_config, basic_auth_users)"))
        })?;
        let file = file.unwrap_or_default();
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut warnings = Vec::new();
        let tls = match file.tls_server_config {
            Some(t) => Some(Arc::new(
                tls_config(&t, dir, &mut warnings).map_err(|e| bad(format!("{e:#}")))?,
            )),
            None => None,
        };
        let users = file.basic_auth_users;
        check_users(&users).map_err(bad)?;
        let auth = (!users.is_empty()).then(|| BasicAuth::new(users.into_iter().collect()));
        Ok(WebConfig {
            tls,
            auth,
            warnings,
        })
    }

    /// A warning about serving on `listen` with this configuration:
    /// metrics or passwords open to the network.
    pub fn exposure(&self, listen: std::net::SocketAddr) -> Option<String> {
        if listen.ip().is_loopback() {
            return None;
        }
        match (&self.auth, &self.tls) {
            (None, _) => Some(format!(
                "serving on {listen} without authentication: whoever reaches it reads every VM's name and activity; set basic_auth_users in --web.config.file or listen on 127.0.0.1"
            )),
            (Some(_), None) => Some(format!(
                "basic auth over plain HTTP on {listen}: passwords cross the network readable; add tls_server_config to --web.config.file"
            )),
            _ => None,
        }
    }
}

/// Unique user names without `:`, each with a bcrypt hash of a cost
/// `htpasswd` makes.
fn check_users(users: &[(String, String)]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (user, hash) in users {
        let shown = crate::output::terminal_safe(user);
        if !seen.insert(user) {
            return Err(format!(
                "basic_auth_users: {shown:?} is given twice; keep one"
            ));
        }
        if user.contains(':') {
            return Err(format!(
                "basic_auth_users: {shown:?} has a ':', which Basic authentication cannot carry in a user name; rename it"
            ));
        }
        let Ok(parts) = hash.parse::<bcrypt::HashParts>() else {
            return Err(format!(
                "basic_auth_users: the hash of {shown:?} is not a bcrypt hash ($2y$...; make one with `htpasswd -nBC 10 USER`)"
            ));
        };
        if parts.get_cost() > MAX_BCRYPT_COST {
            return Err(format!(
                "basic_auth_users: the hash of {shown:?} has bcrypt cost {}, above {MAX_BCRYPT_COST} (the most htpasswd makes; every check would take too long); make one with `htpasswd -nBC 10 USER`",
                parts.get_cost()
            ));
        }
    }
    Ok(())
}

fn tls_config(
    t: &TlsFile,
    dir: &Path,
    warnings: &mut Vec<String>,
) -> anyhow::Result<rustls::ServerConfig> {
    let cert_path = dir.join(&t.cert_file);
    let key_path = dir.join(&t.key_file);
    let pem = |path: &Path, what: &str| {
        read_bounded(path, MAX_PEM_BYTES)
            .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
    };
    let cert_pem = pem(&cert_path, "cert_file")?;
    let key_pem = pem(&key_path, "key_file")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("cert_file {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "cert_file {}: no PEM certificate in it",
            cert_path.display()
        );
    }
    if let Some(w) = validity(&certs[0], std::time::SystemTime::now()) {
        warnings.push(format!("cert_file {}: {w}", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("key_file {}: {e}", key_path.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => anyhow::bail!("min_version {v:?}: this exporter offers TLS12 and TLS13"),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate and key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What is wrong with the validity period of `cert` at `now`, if anything.
fn validity(cert: &CertificateDer<'_>, now: std::time::SystemTime) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let now = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    let v = c.validity();
    if v.not_after.timestamp() < now {
        Some(format!(
            "the certificate expired on {}; clients will refuse it until it is renewed",
            v.not_after
        ))
    } else if v.not_before.timestamp() > now {
        Some(format!(
            "the certificate is not valid before {}; clients will refuse it until then",
            v.not_before
        ))
    } else {
        None
    }
}

/// At most this many good (and as many wrong) credentials are remembered,
/// so a scraper costs one bcrypt verification, not one per scrape.
const REMEMBERED: usize = 64;

/// Users and their bcrypt hashes, and the credentials already verified.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    dummy: String,
    /// SHA-256 of `user:password` pairs that verified.
    good: Mutex<HashSet<Vec<u8>>>,
    /// SHA-256 of pairs that did not (a scraper with a wrong password
    /// costs one bcrypt check, not one per scrape).
    bad: Mutex<HashSet<Vec<u8>>>,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Self {
        // Checked for users that do not exist, so an unknown user takes as
        // long as a wrong password.
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|h| h.get_cost())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = bcrypt::hash("no such user", cost).unwrap_or_default();
        BasicAuth {
            users,
            dummy,
            good: Mutex::new(HashSet::new()),
            bad: Mutex::new(HashSet::new()),
        }
    }

    /// What can be said of `header` (the Authorization header's value)
    /// without bcrypt: `Some(true)` or `Some(false)` for credentials checked
    /// before, `Some(false)` for a malformed header, `None` if
    /// [`BasicAuth::verify`] must decide.
    pub fn remembered(&self, header: Option<&[u8]>) -> Option<bool> {
        let Some(decoded) = decode(header) else {
            return Some(false);
        };
        let d = digest(&decoded);
        if lock(&self.good).contains(&d) {
            return Some(true);
        }
        lock(&self.bad).contains(&d).then_some(false)
    }

    /// True if `header` names a user and the right password. Slow (bcrypt):
    /// call it off the HTTP thread.
    pub fn verify(&self, header: Option<&[u8]>) -> bool {
        let Some(decoded) = decode(header) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.split_once(':'))
        else {
            return false;
        };
        let ok = match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.dummy);
                false
            }
        };
        let mut seen = lock(if ok { &self.good } else { &self.bad });
        if seen.len() >= REMEMBERED {
            seen.clear();
        }
        seen.insert(digest(&decoded));
        ok
    }

    /// Both steps, for tests.
    #[cfg(test)]
    fn check(&self, header: Option<&[u8]>) -> bool {
        self.remembered(header)
            .unwrap_or_else(|| self.verify(header))
    }
}

fn lock(set: &Mutex<HashSet<Vec<u8>>>) -> std::sync::MutexGuard<'_, HashSet<Vec<u8>>> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// `user:password` from a `Basic` Authorization header.
fn decode(header: Option<&[u8]>) -> Option<Vec<u8>> {
    // The scheme name is case-insensitive (RFC 7235, section 2.1).
    let (scheme, encoded) = header?.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"Basic ") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()
}

fn digest(credentials: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, credentials)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b}").into_bytes()
    }

    #[test]
    fn basic_auth_takes_the_right_password_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(BTreeMap::from([("prom".to_string(), hash)]));
        assert!(auth.check(Some(&header("prom", "s3cret"))));
        assert!(auth.check(Some(&header("prom", "s3cret"))), "remembered");
        assert!(!auth.check(Some(&header("prom", "s3cret "))));
        assert_eq!(
            auth.remembered(Some(&header("prom", "s3cret "))),
            Some(false)
        );
        assert!(!auth.check(Some(&header("other", "s3cret"))));
        assert!(!auth.check(Some(b"Basic !!!")));
        assert!(!auth.check(Some(b"Bearer x")));
        assert!(!auth.check(None));
    }

    #[test]
    fn unknown_keys_and_bad_hashes_are_usage_errors() {
        let dir = std::env::temp_dir().join(format!("kvm-watcher-webcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("web.yml");
        for (text, mentions) in [
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
                "client_auth_type",
            ),
            (
                "basic_auth_users:\n  prom: plaintext\n",
                "not a bcrypt hash",
            ),
            (
                "http_server_config:\n  http2: false\n",
                "http_server_config",
            ),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
                "missing.crt",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let err = WebConfig::load(&f).err().expect(text);
            assert!(err.downcast_ref::<crate::error::UsageError>().is_some());
            assert!(format!("{err:#}").contains(mentions), "{err:#}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
