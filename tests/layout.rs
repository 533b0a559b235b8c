//! The layout rules of `src/`, checked on the source text:
//! - the import graph between files has no cycle;
//! - no upward import: a component imports only layers below it (the agent
//!   and the CLI never import the control plane; the control plane never
//!   imports the agent), and inside previewd the same holds for its parts;
//! - every file opens with a doc comment that says what it owns;
//! - no file is longer than 500 lines.
//!
//! `cargo test --test layout -- --nocapture` prints the graph's size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer: a module may import only lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("filter", 0),
    ("net", 0),
    ("proto", 0),
    ("telemetry", 1),
    ("model", 1),
    ("config", 2),
    ("wire", 2),
    ("agent", 3),
    ("cli", 3),
    ("previewd", 3),
];

/// The same inside previewd.
const PREVIEWD_LAYERS: &[(&str, u8)] = &[
    ("auth", 0),
    ("dbs", 0),
    ("metrics", 0),
    ("queues", 0),
    ("store", 0),
    ("cluster", 1),
    ("manager", 2),
    ("api", 3),
    ("attach", 3),
    ("server", 4),
];

const MAX_LINES: usize = 500;

type Module = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library file (the thin mains in src/bin are their own crates) by module path.
fn files() -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("src/ is readable") {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "bin") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&src(), &mut paths);
    let root = src();
    paths
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).expect("under src/").with_extension("");
            let mut m: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if m.last().is_some_and(|l| l == "mod" || l == "lib") {
                m.pop();
            }
            (m, p)
        })
        .collect()
}

/// The code of a file without its comments and its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// Every `crate::…` and `super::…` path in `code`, with `use` groups
/// (`use crate::{a, b::c}`) expanded, as (base, segments).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let base = ["crate::", "super::"].into_iter().any(|b| rest.starts_with(b));
        let boundary =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
        if !(base && boundary) {
            i += 1;
            continue;
        };
        // Read `super::super::a::b` or `crate::a::{b, c::d}` up to the end of the path.
        let mut j = i;
        let mut depth = 0usize;
        while j < bytes.len() {
            let c = bytes[j];
            match c {
                b'{' => depth += 1,
                b'}' if depth > 0 => depth -= 1,
                b'}' => break,
                _ if depth == 0 && !(c.is_ascii_alphanumeric() || c == b'_' || c == b':') => break,
                _ => {}
            }
            j += 1;
        }
        expand(&code[i..j], &mut Vec::new(), &mut out);
        i = j.max(i + 1);
    }
    out
}

/// Expands one path with groups into plain ones.
fn expand(path: &str, prefix: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
    let path = path.trim();
    if let Some(open) = path.find('{') {
        let head: Vec<String> = path[..open].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
        let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
        // Split the group on top-level commas.
        let (mut depth, mut start) = (0, 0);
        let mut parts = Vec::new();
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&inner[start..k]);
                    start = k + 1;
                }
                _ => {}
            }
        }
        parts.push(&inner[start..]);
        let n = prefix.len();
        prefix.extend(head);
        for p in parts.into_iter().filter(|p| !p.trim().is_empty()) {
            expand(p, prefix, out);
        }
        prefix.truncate(n);
    } else {
        let mut segs = prefix.clone();
        segs.extend(path.split(" as ").next().unwrap_or(path).split("::").map(|s| s.trim().to_string()));
        segs.retain(|s| !s.is_empty() && s != "self");
        if let Some(first) = segs.first().cloned() {
            out.push((first, segs[1..].to_vec()));
        }
    }
}

/// The file a path lands in: the deepest module its segments name.
fn resolve(from: &Module, base: &str, segs: &[String], modules: &BTreeSet<Module>) -> Module {
    let mut m: Module = if base == "crate" {
        Vec::new()
    } else {
        // `super` of module `a::b` (a/b.rs or a/b/mod.rs) is `a`.
        from[..from.len().saturating_sub(1)].to_vec()
    };
    let mut segs = segs.iter().peekable();
    while segs.peek().is_some_and(|s| *s == "super") {
        m.pop();
        segs.next();
    }
    for s in segs {
        let mut next = m.clone();
        next.push(s.clone());
        if modules.contains(&next) {
            m = next;
        } else {
            break;
        }
    }
    m
}

fn graph() -> (BTreeMap<Module, BTreeSet<Module>>, BTreeMap<Module, PathBuf>) {
    let files = files();
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, path) in &files {
        let text = std::fs::read_to_string(path).expect("source is readable");
        let e = edges.entry(m.clone()).or_default();
        for (base, segs) in paths(&code(&text)) {
            let to = resolve(m, &base, &segs, &modules);
            if to != *m && !to.is_empty() {
                e.insert(to);
            }
        }
    }
    (edges, files)
}

fn name(m: &Module) -> String {
    if m.is_empty() { "crate".into() } else { m.join("::") }
}

#[test]
fn the_import_graph_has_no_cycles() {
    let (edges, files) = graph();
    // Depth-first search with colours; a grey node reached again closes a cycle.
    fn visit(
        n: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        colour: &mut BTreeMap<Module, u8>,
        stack: &mut Vec<Module>,
        cycles: &mut Vec<String>,
    ) {
        colour.insert(n.clone(), 1);
        stack.push(n.clone());
        for to in edges.get(n).into_iter().flatten() {
            match colour.get(to).copied().unwrap_or(0) {
                0 => visit(to, edges, colour, stack, cycles),
                1 => {
                    let at = stack.iter().position(|s| s == to).unwrap_or(0);
                    let mut c: Vec<String> = stack[at..].iter().map(name).collect();
                    c.push(name(to));
                    cycles.push(c.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.clone(), 2);
    }
    let mut colour = BTreeMap::new();
    let mut cycles = Vec::new();
    for n in edges.keys() {
        if colour.get(n).copied().unwrap_or(0) == 0 {
            visit(n, &edges, &mut colour, &mut Vec::new(), &mut cycles);
        }
    }
    let n_edges: usize = edges.values().map(BTreeSet::len).sum();
    println!("layout: {} files, {n_edges} imports between them, {} cycles", files.len(), cycles.len());
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn no_upward_imports() {
    let (edges, _) = graph();
    let rank = |layers: &[(&str, u8)], m: &str| layers.iter().find(|(n, _)| *n == m).map(|(_, r)| *r);
    let mut upward = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            let (Some(f), Some(t)) = (from.first(), to.first()) else { continue };
            let bad = if f != t {
                let (Some(rf), Some(rt)) = (rank(LAYERS, f), rank(LAYERS, t)) else {
                    upward.push(format!("{} -> {}: a top-level module missing from LAYERS", name(from), name(to)));
                    continue;
                };
                rt >= rf
            } else if f == "previewd" && from.len() > 1 && to.len() > 1 && from[1] != to[1] {
                match (rank(PREVIEWD_LAYERS, &from[1]), rank(PREVIEWD_LAYERS, &to[1])) {
                    (Some(rf), Some(rt)) => rt >= rf,
                    _ => {
                        upward.push(format!("{} -> {}: missing from PREVIEWD_LAYERS", name(from), name(to)));
                        continue;
                    }
                }
            } else {
                false
            };
            if bad {
                upward.push(format!("{} -> {}", name(from), name(to)));
            }
        }
    }
    println!("layout: {} upward imports", upward.len());
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn every_file_says_what_it_owns_and_stays_short() {
    let mut bad = Vec::new();
    let mut longest = (0, PathBuf::new());
    for path in files().values() {
        let text = std::fs::read_to_string(path).expect("source is readable");
        if !text.trim_start().starts_with("//!") {
            bad.push(format!("{}: no module doc comment (//!) at the top", path.display()));
        }
        let n = text.lines().count();
        if n > longest.0 {
            longest = (n, path.clone());
        }
        if n > MAX_LINES {
            bad.push(format!("{}: {n} lines (at most {MAX_LINES})", path.display()));
        }
    }
    println!("layout: longest file {} with {} lines", longest.1.display(), longest.0);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_groups_and_relative_paths() {
    let got = paths("use crate::{model::{Key, Mode}, wire};\nlet x = super::super::a::f();\nuse super::{b::C, d};");
    let got: Vec<String> = got.iter().map(|(b, s)| format!("{b}::{}", s.join("::"))).collect();
    assert_eq!(
        got,
        ["crate::model::Key", "crate::model::Mode", "crate::wire", "super::super::a::f", "super::b::C", "super::d"]
    );
    let modules: BTreeSet<Module> =
        [vec!["a".to_string()], vec!["a".into(), "b".into()], vec!["c".into()]].into_iter().collect();
    let from: Module = vec!["a".into(), "x".into()];
    assert_eq!(resolve(&from, "super", &["b".into(), "C".into()], &modules), vec!["a", "b"]);
    assert_eq!(resolve(&from, "super", &["super".into(), "c".into()], &modules), vec!["c"]);
    assert_eq!(resolve(&from, "crate", &["a".into(), "f".into()], &modules), vec!["a"]);
}
