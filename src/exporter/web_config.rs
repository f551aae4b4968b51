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
//! Everything is read and checked at start; a key of the toolkit this
//! exporter does not implement (client certificates, cipher choices, HTTP
//! headers) is refused by name rather than ignored.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    min_version: Option<String>,
}

/// What the web configuration turns on.
pub struct WebConfig {
    /// TLS, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Basic authentication, when users are configured.
    pub auth: Option<BasicAuth>,
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
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        let file: File = serde_norway::from_str(&text).map_err(|e| {
            bad(format!("{e}; the format is the Prometheus exporter toolkit's (tls_server_config, basic_auth_users)"))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => Some(Arc::new(
                tls_config(&t, dir).map_err(|e| bad(format!("{e:#}")))?,
            )),
            None => None,
        };
        let auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            for (user, hash) in &file.basic_auth_users {
                if hash.parse::<bcrypt::HashParts>().is_err() {
                    return Err(bad(format!(
                        "basic_auth_users: the hash of {user:?} is not a bcrypt hash ($2y$...; make one with `htpasswd -nBC 10 USER`)"
                    )));
                }
            }
            Some(BasicAuth::new(file.basic_auth_users))
        };
        Ok(WebConfig { tls, auth })
    }
}

fn tls_config(t: &TlsFile, dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let cert_path = dir.join(&t.cert_file);
    let key_path = dir.join(&t.key_file);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("cert_file {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "cert_file {}: no PEM certificate in it",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
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
    let encoded = header?.strip_prefix(b"Basic ")?;
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
