//! The layering rules of ARCHITECTURE.md, checked on the source: which of the crate's top-level
//! modules each layer may name (`crate::x` paths and `use crate::{x, ...}` groups, comments
//! ignored), and which layers may not name tonic or candle.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use crate::common::root;

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The files of a layer: `src/<layer>/**.rs`, or `src/<layer>.rs`.
fn layer_files(layer: &str) -> Vec<PathBuf> {
    let dir = root().join("src").join(layer);
    let files = if dir.is_dir() {
        sources(&dir)
    } else {
        vec![root().join("src").join(format!("{layer}.rs"))]
    };
    assert!(files.iter().all(|f| f.exists()), "no layer {layer}");
    files
}

fn rel(f: &Path) -> String {
    f.strip_prefix(root()).unwrap_or(f).display().to_string()
}

/// The code without its comments (line comments, doc comments included; block comments).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        let (at, is_line) = match (line, block) {
            (Some(l), Some(b)) if b < l => (b, false),
            (Some(l), _) => (l, true),
            (None, Some(b)) => (b, false),
            (None, None) => break,
        };
        // A `//` inside a string literal (a URL) is not a comment: skip it when the quotes
        // before it on its line are unbalanced.
        let line_start = rest[..at].rfind('\n').map_or(0, |i| i + 1);
        if rest[line_start..at].matches('"').count() % 2 == 1 {
            out.push_str(&rest[..at + 2]);
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let end = if is_line { "\n" } else { "*/" };
        rest = match rest[at + 2..].find(end) {
            Some(e) => &rest[at + 2 + e + end.len()..],
            None => "",
        };
        out.push('\n');
    }
    out.push_str(rest);
    out
}

/// The crate's top-level modules a file names: `crate::x...` and the first segments of
/// `crate::{x::..., y, ...}`.
fn crate_modules(text: &str) -> BTreeSet<String> {
    let text = code(text);
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let after = &text[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Top-level items of the group: split on commas at brace depth 0.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
    }
    found.remove("");
    found
}

/// Files under `src/<layer>` that name a module outside `allowed` (the layer itself is always
/// allowed), as `file: module` lines.
fn violations(layer: &str, allowed: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for f in layer_files(layer) {
        let text = std::fs::read_to_string(&f).unwrap();
        for m in crate_modules(&text) {
            if m != layer && !allowed.contains(&m.as_str()) {
                bad.push(format!("{}: crate::{m}", rel(&f)));
            }
        }
    }
    bad
}

/// Files under `src/<layer>` whose code names any of `crates` (as `name::`).
fn names_crates(layer: &str, crates: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for f in layer_files(layer) {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for c in crates {
            if text.contains(&format!("{c}::")) {
                bad.push(format!("{}: {c}", rel(&f)));
            }
        }
    }
    bad
}

#[test]
fn the_checker_sees_grouped_and_inline_paths_and_skips_comments() {
    let text = "use crate::{\n    domain::{Limits, Tag},\n    tagging::handbook::Category,\n    \
                model,\n};\n// crate::grpc in a comment\n/// [`crate::store`] in a doc\n\
                fn f() { crate::features::stable_hash(\"a//b\", crate::server::X); }\n";
    let found: Vec<String> = crate_modules(text).into_iter().collect();
    assert_eq!(found, ["domain", "features", "model", "server", "tagging"]);
}

#[test]
fn dependencies_point_down_the_data_flow() {
    // The cross-cutting modules any layer may call.
    const ANY: &[&str] = &["metrics"];
    // `config` assembles every layer's settings and `server` every layer: no layer below them
    // names either.
    let rules: &[(&str, &[&str])] = &[
        // The bottom: pure types, names nothing else.
        ("domain", &[]),
        // A leaf: prompts as chat messages, answers as text; no handbook, tag or feature.
        ("model", &["domain"]),
        ("features", &["domain"]),
        ("store", &["domain", "features"]),
        ("tagging", &["domain", "model", "store", "features"]),
        ("grpc", &["domain", "tagging", "model", "features", "store"]),
        // Replicas write what they follow into the local store, with the local handbook.
        (
            "client",
            &["domain", "grpc", "store", "tagging", "features"],
        ),
        ("training", &["domain", "tagging", "model"]),
    ];
    let mut bad = Vec::new();
    for (layer, allowed) in rules {
        let allowed: Vec<&str> = allowed.iter().chain(ANY).copied().collect();
        bad.extend(violations(layer, &allowed));
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

/// The top-level modules of the library and the crate modules each one names.
fn module_graph() -> Vec<(String, BTreeSet<String>)> {
    let mut graph: Vec<(String, BTreeSet<String>)> = Vec::new();
    for entry in std::fs::read_dir(root().join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        // The binary's modules and the crate roots are glue over everything.
        if ["main", "lib", "cli"].contains(&name.as_str()) {
            continue;
        }
        let mut names = BTreeSet::new();
        for f in layer_files(&name) {
            names.extend(crate_modules(&std::fs::read_to_string(f).unwrap()));
        }
        names.remove(&name);
        graph.push((name, names));
    }
    graph.sort();
    graph
}

#[test]
fn the_modules_form_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() >= 10, "{graph:?}");
    // Depth-first search from every module; a module met again on the current path is a cycle.
    fn visit(
        graph: &[(String, BTreeSet<String>)],
        path: &mut Vec<String>,
        cycles: &mut BTreeSet<String>,
    ) {
        let here = path.last().unwrap().clone();
        let Some((_, names)) = graph.iter().find(|(n, _)| *n == here) else {
            return;
        };
        for next in names {
            if let Some(at) = path.iter().position(|p| p == next) {
                cycles.insert(format!("{} -> {next}", path[at..].join(" -> ")));
            } else {
                path.push(next.clone());
                visit(graph, path, cycles);
                path.pop();
            }
        }
    }
    let mut cycles = BTreeSet::new();
    for (name, _) in &graph {
        visit(&graph, &mut vec![name.clone()], &mut cycles);
    }
    assert!(
        cycles.is_empty(),
        "dependency cycles:\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_inner_layers_name_neither_tonic_nor_candle() {
    let mut bad = Vec::new();
    for layer in ["domain", "tagging", "features", "store"] {
        bad.extend(names_crates(
            layer,
            &["tonic", "candle_core", "candle_nn", "candle_transformers"],
        ));
    }
    for layer in ["grpc", "client"] {
        bad.extend(names_crates(
            layer,
            &["candle_core", "candle_nn", "candle_transformers"],
        ));
    }
    assert!(
        bad.is_empty(),
        "a layer names a crate it must not:\n{}",
        bad.join("\n")
    );
}
