//! The layout docs/architecture.md promises, read off the sources: the
//! module graph is one-way with the command line on top, a monitor's module
//! is named only in its own folder and the registry (and the benchmark), and
//! its name as a string only in its own folder (and the places listed in
//! [`ALLOWED`], each with its reason).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use kvm_watcher::monitors::{Face, REGISTRY};

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
fn a_monitor_module_is_named_only_in_its_folder_and_the_registry() {
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

/// The string literals of Rust source `text`, comments left out: a small
/// lexer that knows line and (nested) block comments, strings with escapes,
/// raw strings, byte strings, char literals and lifetimes.
fn string_literals(text: &str) -> Vec<String> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        let ident_before = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        match c[i] {
            '/' if at(i + 1) == '/' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            'r' if !ident_before && (at(i + 1) == '"' || at(i + 1) == '#') => {
                let mut j = i + 1;
                while at(j) == '#' {
                    j += 1;
                }
                if at(j) != '"' {
                    i += 1;
                    continue;
                }
                let close: String = std::iter::once('"')
                    .chain(std::iter::repeat_n('#', j - i - 1))
                    .collect();
                let body: String = c[j + 1..].iter().collect();
                let end = body.find(&close).unwrap_or(body.len());
                out.push(body[..end].to_string());
                i = j + 1 + body[..end].chars().count() + close.len();
            }
            '"' => {
                let mut lit = String::new();
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        i += 1;
                        lit.push(match at(i) {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '0' => '\0',
                            other => other,
                        });
                    } else {
                        lit.push(c[i]);
                    }
                    i += 1;
                }
                out.push(lit);
                i += 1;
            }
            '\'' if at(i + 1) == '\\' => {
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            }
            '\'' if at(i + 2) == '\'' => i += 3,
            _ => i += 1,
        }
    }
    out
}

/// The monitor `face` names in `literal`, if it does: the whole string is
/// its name, subcommand or flag (`"exits"`, `"--dirty-rate"`), or a word of
/// the string is one of those of two words or more (`run_delay`,
/// `halt-poll`, `dirty-rate-events`), which nothing but the monitor is
/// called. One-word names inside a sentence are plain English ("3 exits to
/// its VMM", "dirty pages") and are not counted.
fn named<'a>(literal: &'a str, face: &Face) -> Option<&'a str> {
    let names = [face.name, face.command, face.events_flag];
    let is_name = |w: &str| names.contains(&w.trim_start_matches('-'));
    if is_name(literal) {
        return Some(literal);
    }
    literal
        .split(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == '-'))
        .find(|w| {
            let w = w.trim_start_matches('-');
            (w.contains('_') || w.contains('-')) && is_name(w)
        })
}

/// Files outside a monitor's folder that may name it in a string, and why:
/// a file and the names it may use, so a new mention elsewhere (or of another
/// monitor) still fails; a name nothing matches any more fails too. Unit
/// tests (`#[cfg(test)]`, `tests.rs`) are not read: they choose monitors by
/// name as users do.
const ALLOWED: &[(&str, &[&str], &str)] = &[
    (
        "src/advise/mod.rs",
        &[
            "wakeup",
            "halt_poll",
            "vcpu_load",
            "run_delay",
            "exits",
            "dirty_rate",
        ],
        "advise watches the monitors whose figures its rules read (dirty-rate with --link), as a user would name them to `watch`",
    ),
    (
        "src/advise/input.rs",
        &["dirty_rate"],
        "advise reads a recording by the record kinds of docs/json-schema.md, dirty-rate's VM records among them",
    ),
    (
        "src/advise/migration.rs",
        &["dirty-rate"],
        "the migration finding comes from the dirty-rate monitor's records and tells the user so",
    ),
    (
        "src/advise/rules.rs",
        &["run_delay", "exits"],
        "advise's rule names (docs/advise.md) are those of the monitor whose figures each rule reads",
    ),
];

/// Folders the check above does not read, and why.
const NOT_READ: &[(&str, &str)] = &[(
    "src/bin/kvm-watcher-bench",
    "the benchmark drives the command line as the tests do: one case per monitor, with a workload and a bpftrace script made for it (docs/architecture.md)",
)];

#[test]
fn a_monitor_is_named_as_a_string_only_in_its_own_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for path in rust_files(&src()) {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if NOT_READ
            .iter()
            .any(|(dir, _)| path.starts_with(root.join(dir)))
        {
            continue;
        }
        let literals = string_literals(&non_test_text(&path));
        for m in REGISTRY {
            let f = m.face();
            if path.starts_with(src().join("monitors").join(f.name)) {
                continue;
            }
            for lit in &literals {
                if let Some(word) = named(lit, f) {
                    found.push((
                        rel.clone(),
                        word.trim_start_matches('-').to_string(),
                        lit.clone(),
                    ));
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    let unexplained: Vec<String> = found
        .iter()
        .filter(|(file, word, _)| {
            let allowed = ALLOWED
                .iter()
                .any(|(f, words, _)| f == file && words.contains(&word.as_str()));
            if allowed {
                used.insert((file.as_str(), word.as_str()));
            }
            !allowed
        })
        .map(|(file, word, lit)| format!("{file} names {word}: {lit:?}"))
        .collect();
    assert!(
        unexplained.is_empty(),
        "monitors named outside their folders (move the code into the monitor, or add an entry to ALLOWED saying why):\n{}",
        unexplained.join("\n")
    );
    for (file, words, _) in ALLOWED {
        for word in *words {
            assert!(
                used.contains(&(*file, *word)),
                "ALLOWED: {file} no longer names {word}"
            );
        }
    }
}

#[test]
fn strings_that_name_a_monitor_are_found_and_english_is_not() {
    let lits = string_literals(
        r##"let a = "run_delay"; // "exits" in a comment
/* "dirty_rate" /* nested */ "wakeup" */ let c = '"'; let l: &'static str = r#"a "halt-poll" b"#;
let e = "escaped \" quote"; let f = "3 exits to its VMM";"##,
    );
    assert_eq!(
        lits,
        [
            "run_delay",
            "a \"halt-poll\" b",
            "escaped \" quote",
            "3 exits to its VMM"
        ]
    );
    let face = |name| REGISTRY.iter().find(|m| m.name() == name).unwrap().face();
    assert_eq!(named("run_delay", face("run_delay")), Some("run_delay"));
    assert_eq!(
        named("--dirty-rate", face("dirty_rate")),
        Some("--dirty-rate")
    );
    assert_eq!(named("exits", face("exits")), Some("exits"));
    assert_eq!(
        named("a \"halt-poll\" b", face("halt_poll")),
        Some("halt-poll")
    );
    assert_eq!(
        named("the dirty-rate monitor (-D)", face("dirty_rate")),
        Some("dirty-rate")
    );
    assert_eq!(named("3 exits to its VMM", face("exits")), None);
    assert_eq!(named("run_delay_ns", face("run_delay")), None);
    assert_eq!(named("--dirty-pages", face("dirty")), None);
}

#[test]
fn the_reader_finds_grouped_and_plain_paths() {
    let refs = crate_refs("use crate::{output::Row, procfs};\nlet x = crate::bpf::read_record(y);");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["bpf", "output", "procfs"]
    );
}
