//! The core crate's modules import downward only, and no files import each other in a circle.
//!
//! Every `crate::…` and `super::…` path in `src/` (imports and paths written in code alike) is
//! resolved to the module file it names. Each top-level module sits on a layer (`LAYERS`, bottom
//! first); a path from a module to one on a higher layer fails the test, as does a circle of
//! imports between files (a file's paths to its own parent modules are part of that module and
//! do not count). `cargo test -p dsrun-core --test layers -- --nocapture` prints the graph.
//!
//! It also holds the crate to its purpose: no user-interface crate among its dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. Modules on one layer may import each other (not in a circle).
const LAYERS: &[&[&str]] = &[
    // Helpers with no knowledge of models.
    &["error", "util", "hot_path", "mapped", "npy"],
    // Weight formats.
    &["quant", "format"],
    // Reading a checkpoint directory.
    &["config", "checkpoint", "gguf", "tiktoken"],
    // The f32 oracle.
    &["model"],
    // The forward pass as backend-neutral ops, shapes, limits and the memory plan.
    &["plan"],
    // Devices lowering the plan.
    &["backend"],
    // Running a plan on a backend; the engine interface over it and the oracle.
    &["expert_cache", "engine", "runtime"],
    // Choosing a device; text in and out; describing and writing checkpoints.
    &["device", "sample", "generation_config", "tokenizer", "chat_template", "inspect", "check", "synth"],
    // Generation over any engine.
    &["speculative", "generate", "perplexity", "bench"],
    // Loading, with its policy.
    &["builder", "quantize"],
];

/// Crates for people at a terminal or on the network: they belong to the `dsrun` binary.
const UI_CRATES: &[&str] = &["clap", "indicatif", "rustyline", "axum", "tokio"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir` with its module path (`backend::wgpu::context`).
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(path.file_name().unwrap().to_string_lossy().to_string());
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if name != "mod" && name != "lib" {
                p.push(name);
            }
            out.insert(p, path);
        }
    }
}

/// The paths a file names: `crate::a::b` and `super::c`, as absolute module paths.
fn paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (start, root) in [("crate::", None), ("super::", Some(()))] {
            let mut rest = code;
            while let Some(at) = rest.find(start) {
                // Not the tail of a longer name (`dsrun_crate::`).
                let before = rest[..at].chars().last();
                rest = &rest[at + start.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let segments: Vec<String> = rest.split("::").map(|s| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()).take_while(|s| !s.is_empty()).collect();
                let mut base: Vec<String> = match root {
                    None => Vec::new(),
                    // `super` is the module's parent (inside a file's `mod tests`, the file's own
                    // module: an ancestor either way, which does not count).
                    Some(()) => module[..module.len().saturating_sub(1)].to_vec(),
                };
                base.extend(segments);
                out.push(base);
            }
        }
    }
    out
}

/// The longest module that `path` starts with.
fn resolve<'a>(path: &[String], known: &'a BTreeMap<Vec<String>, PathBuf>) -> Option<&'a Vec<String>> {
    (0..=path.len()).rev().find_map(|n| known.get_key_value(&path[..n]).map(|(k, _)| k))
}

fn layer_of(module: &[String]) -> Option<usize> {
    let top = module.first()?;
    LAYERS.iter().position(|l| l.contains(&top.as_str()))
}

/// Edges between files, a file's paths to its own ancestors left out.
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut known = BTreeMap::new();
    modules(&src(), &[], &mut known);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &known {
        let text = std::fs::read_to_string(file).unwrap();
        let entry = edges.entry(module.clone()).or_default();
        for p in paths(module, &text) {
            if let Some(target) = resolve(&p, &known) {
                let ancestor = module.starts_with(target);
                if !ancestor && !target.is_empty() {
                    entry.insert(target.clone());
                }
            }
        }
    }
    edges
}

#[test]
fn every_module_has_a_layer() {
    for module in graph().keys().filter(|m| !m.is_empty()) {
        assert!(layer_of(module).is_some(), "`{}` is on no layer: add it to LAYERS in tests/layers.rs", module.join("::"));
    }
}

#[test]
fn imports_point_down_the_layers() {
    let mut upward = Vec::new();
    for (from, targets) in graph() {
        for to in targets {
            if let (Some(a), Some(b)) = (layer_of(&from), layer_of(&to)) {
                if b > a {
                    upward.push(format!("{} (layer {a}) -> {} (layer {b})", from.join("::"), to.join("::")));
                }
            }
        }
    }
    assert!(upward.is_empty(), "imports running up the layers:\n{}", upward.join("\n"));
}

#[test]
fn no_circle_of_imports() {
    let edges = graph();
    // Depth-first search for a back edge; the circle is printed.
    fn visit(n: &Vec<String>, edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, state: &mut BTreeMap<Vec<String>, u8>, stack: &mut Vec<Vec<String>>) -> Option<Vec<Vec<String>>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut circle = stack[at..].to_vec();
                    circle.push(m.clone());
                    return Some(circle);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(circle) = visit(n, &edges, &mut state, &mut Vec::new()) {
                let names: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
                panic!("a circle of imports: {}", names.join(" -> "));
            }
        }
    }
}

/// The module graph by layer, top first (`--nocapture` shows it).
#[test]
fn print_the_graph() {
    let edges = graph();
    for (i, layer) in LAYERS.iter().enumerate().rev() {
        println!("layer {i}: {}", layer.join(", "));
        for top in *layer {
            let mut below: BTreeSet<String> = BTreeSet::new();
            for (from, targets) in &edges {
                if from.first().map(String::as_str) == Some(top) {
                    below.extend(targets.iter().filter(|t| t.first() != from.first()).filter_map(|t| t.first().cloned()));
                }
            }
            println!("  {top} -> {}", below.into_iter().collect::<Vec<_>>().join(", "));
        }
    }
}

#[test]
fn no_user_interface_crates() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps = manifest.split("[dependencies]").nth(1).unwrap_or("").split("\n[").next().unwrap_or("");
    for line in deps.lines() {
        let name = line.split(['=', ' ']).next().unwrap_or("").trim();
        assert!(!UI_CRATES.contains(&name), "dsrun-core depends on `{name}`: user-interface crates belong to the dsrun binary");
    }
}
