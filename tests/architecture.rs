//! The layout docs/architecture.md promises, read off the sources: the
//! module graph is one-way with the command line on top, and a monitor is
//! named only in its own folder, the registry and the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every .rs file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The file's text without its unit tests (`#[cfg(test)]` to the end, or a
/// whole file of tests).
fn non_test_text(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The top-level module a file belongs to (`src/X.rs` or `src/X/...`).
fn top_module(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// `crate::X` paths in `text`, including `use crate::{X, Y::...}` groups.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// Edges between top-level modules of the library.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = fs::read_dir(src())
        .unwrap()
        .flatten()
        .filter_map(|e| top_module(&e.path()))
        .filter(|m| !["main", "lib", "bin"].contains(&m.as_str()))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in rust_files(&src()) {
        let Some(from) = top_module(&path) else {
            continue;
        };
        if !modules.contains(&from) {
            continue;
        }
        for to in crate_refs(&non_test_text(&path)) {
            if to != from && modules.contains(&to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// A path from `to` back to `from`, if the graph has one.
fn path_back(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
) -> Option<Vec<String>> {
    let mut stack = vec![vec![to.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap().clone();
        if last == from {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in graph.get(&last).into_iter().flatten() {
            let mut p = path.clone();
            p.push(next.clone());
            stack.push(p);
        }
    }
    None
}

#[test]
fn the_module_graph_is_one_way_with_the_command_line_on_top() {
    let graph = module_graph();
    assert!(
        graph.get("cli").is_some_and(|e| e.contains("session")),
        "the reader sees cli's imports"
    );
    for (from, tos) in &graph {
        assert!(!tos.contains("cli"), "{from} imports the command line");
        for to in tos {
            if let Some(back) = path_back(&graph, from, to) {
                panic!("import cycle: {from} -> {}", back.join(" -> "));
            }
        }
    }
}

#[test]
fn a_monitor_is_named_only_in_its_folder_the_registry_and_the_command_line() {
    let monitors_dir = src().join("monitors");
    let names: Vec<String> = fs::read_dir(&monitors_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 4, "monitor folders: {names:?}");
    let registry = fs::read_to_string(monitors_dir.join("mod.rs")).unwrap();
    for name in &names {
        assert!(
            registry.contains(&format!("pub mod {name};")),
            "{name} is not in the registry's module list"
        );
        let own = monitors_dir.join(name);
        for path in rust_files(&src()) {
            if path.starts_with(&own)
                || path == monitors_dir.join("mod.rs")
                || path.starts_with(src().join("cli"))
                || path.starts_with(src().join("bin"))
            {
                continue;
            }
            let text = non_test_text(&path);
            let named = text.contains(&format!("monitors::{name}::"))
                || text.contains(&format!("monitors::{name};"))
                || (path.starts_with(&monitors_dir) && text.contains(&format!("super::{name}")))
                || text.contains(&format!("by_name(\"{name}\")"));
            assert!(!named, "{} names the {name} monitor", path.display());
        }
    }
}

#[test]
fn the_reader_finds_grouped_and_plain_paths() {
    let refs = crate_refs("use crate::{output::Row, procfs};\nlet x = crate::bpf::read_record(y);");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["bpf", "output", "procfs"]
    );
}
