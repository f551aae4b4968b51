//! Keyed families, encoded as `serve` does, against figures worked out by hand.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;

use super::*;
use crate::monitors::metrics::Known;
use crate::procfs::VmId;

/// A thread's ports: (port, accesses, exits to the VMM).
#[derive(Debug)]
struct Ports(Vec<(&'static str, u64, u64)>);

fn keys(p: &Ports) -> Vec<Key> {
    p.0.iter()
        .map(|(port, n, exits)| Key {
            group: Some(("kind", "pio")),
            name: port.to_string(),
            values: vec![*n, *exits],
        })
        .collect()
}

const ACCESSES: Keyed<Ports> = Keyed {
    label: "target",
    per: Per::Vm,
    top: |e| e.top_k,
    choice: "ports",
    keys,
    value: 0,
};

const TABLE: &[Family<Ports>] = &[
    Family {
        name: "accesses",
        help: "a",
        only: every,
        kind: Kind::Keyed(ACCESSES),
    },
    Family {
        name: "returns",
        help: "e",
        only: every,
        kind: Kind::Keyed(Keyed {
            value: 1,
            ..ACCESSES
        }),
    },
    Family {
        name: "time",
        help: "t",
        only: every,
        kind: Kind::KeyedHistogram(KeyedHistogram {
            label: "port",
            split: |e| e.reason_histograms,
            get: |p| {
                let h = |n| Hist {
                    sum: n as f64,
                    count: n,
                    buckets: vec![(f64::INFINITY, n)],
                };
                p.0.iter()
                    .map(|(port, n, _)| (port.to_string(), h(*n)))
                    .collect()
            },
        }),
    },
];

#[derive(Debug)]
struct Scrape {
    rows: Vec<(Thread, Ports)>,
    export: Export,
    chosen: Arc<Mutex<Chosen>>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let threads = self
            .rows
            .iter()
            .map(|(t, _)| {
                let k = Known {
                    pid: t.pid,
                    vcpu_id: t.vcpu_id,
                    exited: None,
                };
                (t.tid, k)
            })
            .collect();
        let id = VmId {
            name: "web".into(),
            ..VmId::default()
        };
        let names = BTreeMap::from([(10, id)]);
        let labels = Labeler::new(&threads, &names, &self.export);
        let rows = self.rows.iter().map(|(t, p)| (t, p));
        let chosen = &mut self.chosen.lock().unwrap();
        encode(TABLE, rows, &mut encoder, &labels, chosen)
    }
}

/// One scrape of threads 11 and 12 (vCPUs 0 and 1) of the VM `web`: its
/// series, without comments.
fn scrape(export: &Export, chosen: &Arc<Mutex<Chosen>>, rows: Vec<(u32, Ports)>) -> Vec<String> {
    let rows = rows
        .into_iter()
        .map(|(tid, p)| {
            let t = Thread {
                pid: 10,
                tid,
                comm: String::new(),
                vcpu_id: Some(tid - 11),
            };
            (t, p)
        })
        .collect();
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(Scrape {
        rows,
        export: export.clone(),
        chosen: chosen.clone(),
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

#[test]
fn keyed_families_keep_their_chosen_keys_and_share_one_choice() {
    let export = Export {
        top_k: 1,
        ..Export::default()
    };
    let chosen = Arc::default();
    let first = scrape(
        &export,
        &chosen,
        vec![
            (11, Ports(vec![("a", 5, 1), ("b", 3, 3)])),
            (12, Ports(vec![("a", 1, 0), ("c", 2, 2)])),
        ],
    );
    // Per VM: a 6 accesses (1 exit), b 3 (3), c 2 (2); a has the most.
    let l = r#"{vm="web",namespace="",kind="pio",target="#;
    assert_eq!(
        first[..6],
        lines(&format!(
            "accesses_total{l}\"a\"}} 6\n\
             accesses_total{l}\"other\"}} 5\n\
             returns_total{l}\"a\"}} 1\n\
             returns_total{l}\"other\"}} 5\n\
             time_seconds_sum{{vm=\"web\",namespace=\"\"}} 11.0\n\
             time_seconds_count{{vm=\"web\",namespace=\"\"}} 11"
        ))[..],
        "{first:#?}"
    );
    // b overtakes a: a stays chosen, other only grows.
    let second = scrape(
        &export,
        &chosen,
        vec![
            (11, Ports(vec![("a", 5, 1), ("b", 10, 4)])),
            (12, Ports(vec![("a", 1, 0), ("c", 2, 2)])),
        ],
    );
    assert_eq!(second[0], format!("accesses_total{l}\"a\"}} 6"));
    assert_eq!(second[1], format!("accesses_total{l}\"other\"}} 12"));
    assert_eq!(second[3], format!("returns_total{l}\"other\"}} 6"));
}

#[test]
fn keyed_histograms_are_per_key_only_when_asked() {
    let export = Export {
        reason_histograms: true,
        ..Export::default()
    };
    let out = scrape(
        &export,
        &Arc::default(),
        vec![
            (11, Ports(vec![("a", 5, 1)])),
            (12, Ports(vec![("a", 1, 0), ("c", 2, 2)])),
        ],
    );
    let count: Vec<&String> = out
        .iter()
        .filter(|l| l.starts_with("time_seconds_count"))
        .collect();
    assert_eq!(
        count,
        [
            r#"time_seconds_count{vm="web",namespace="",port="a"} 6"#,
            r#"time_seconds_count{vm="web",namespace="",port="c"} 2"#
        ]
    );
}
