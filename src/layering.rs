//! The layers of DESIGN §1, enforced: each module may name only modules of its own layer or
//! below, and the top-level modules form no cycle. Read from the `crate::` paths in the source
//! (test modules excluded), so a new import that runs up a layer fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A module missing from this table fails the test: place it deliberately.
const LAYERS: &[(&str, &[&str])] = &[
    ("vocabulary", &["vocab"]),
    (
        "domain",
        &[
            "provider",
            "pricing",
            "ledger",
            "audit",
            "access_log",
            "metrics",
            "usage",
            "tls",
            "timeouts",
        ],
    ),
    ("services", &["keys", "policy", "pool"]),
    (
        "steps",
        &[
            "accept",
            "route",
            "identify",
            "admit",
            "rewrite",
            "forward",
            "stream_usage",
            "cut",
            "failover",
            "meter",
            "record",
        ],
    ),
    ("composition", &["error", "config", "pipeline"]),
    ("surfaces", &["admin", "admin_api", "server", "verify"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// The top-level module a source file belongs to (`src/keys/pg.rs` → `keys`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// The top-level modules a file names through `crate::`, outside its test module and comments.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::c}`: every first segment in the group.
                let end = group.find('}').unwrap_or(group.len());
                for part in group[..end].split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let module = module_of(&src, &f).unwrap();
        if module == "lib" || module == "main" || module == "layering" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    g
}

#[test]
fn every_import_stays_in_its_layer_or_below() {
    let mut wrong = Vec::new();
    for (module, deps) in graph() {
        let Some(own) = layer_of(&module) else {
            wrong.push(format!("`{module}` is in no layer: add it to LAYERS"));
            continue;
        };
        for d in deps {
            match layer_of(&d) {
                Some(l) if l > own => wrong.push(format!(
                    "`{module}` ({}) imports `{d}` ({}), a higher layer",
                    LAYERS[own].0, LAYERS[l].0
                )),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_modules_form_no_cycle() {
    let g = graph();
    // Depth-first search with colours: reaching a module still on the stack is a cycle.
    fn visit<'a>(
        m: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        on_stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = on_stack.iter().position(|x| *x == m) {
            let mut cycle: Vec<String> = on_stack[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        on_stack.push(m);
        for d in g.get(m).into_iter().flatten() {
            if g.contains_key(d.as_str())
                && let Some(c) = visit(d, g, on_stack, done)
            {
                return Some(c);
            }
        }
        on_stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_reader_sees_use_groups_and_skips_tests_and_comments() {
    let text = "use crate::{a, b::c};\n// crate::comment\nfn f() { crate::d::e(); }\n#[cfg(test)]\nuse crate::t;\n";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "d"]);
}
