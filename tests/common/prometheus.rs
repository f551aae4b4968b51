//! The real Prometheus, started for a test on loopback, and its HTTP API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::exporter::{exchange, free_port};

/// True if the `prometheus` binary runs; otherwise skips.
pub fn available() -> bool {
    Command::new("prometheus").arg("--version").output().is_ok()
        || super::skip("prometheus is not installed (apt-get install prometheus)")
}

/// A running Prometheus. Killed on drop.
pub struct Prometheus {
    child: Child,
    /// Its API port on 127.0.0.1.
    pub port: u16,
}

impl Prometheus {
    /// Prometheus with `config` (prometheus.yml text) and its data in `dir`.
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        let port = free_port();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, port }
    }

    /// GET on its API, as JSON (null when it does not answer yet). HTTP/1.0:
    /// a bigger answer to HTTP/1.1 would come chunked.
    pub fn api(&self, path_and_query: &str) -> Value {
        exchange(
            self.port,
            &format!("GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
            Duration::from_secs(10),
        )
        .ok()
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or(Value::Null)
    }

    /// The series an instant query returns (their label sets).
    pub fn query(&self, promql: &str) -> Vec<serde_json::Map<String, Value>> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| s["metric"].as_object().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `q` as a URL query value.
pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
