//! The layering `lib.rs` promises, checked: each top-level module may only name the modules
//! listed for it below (through `crate::…` paths), so dependencies point one way and form no
//! circle. A new `use` across layers fails this test with the file and line that broke it.
//!
//! Inside `api`, REST (`api/*.rs`) and gRPC (`api/grpc/`) are sibling front ends over the
//! shared pieces (`backend`, `error`, `request`, ...): neither may name the other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Module → the modules it may depend on. Leaves first; `cli` wires everything together.
const ALLOWED: &[(&str, &[&str])] = &[
    ("tensor", &[]),
    ("echo", &[]),
    ("proto", &[]),
    ("heap", &[]),
    ("telemetry", &["heap"]),
    ("auth", &["telemetry", "echo"]),
    ("net", &["telemetry"]),
    ("tls", &["telemetry", "net"]),
    ("worker", &["tensor", "telemetry"]),
    // The continuous-batching scheduler (an engine scheduler) drives `llm`'s policy and text.
    ("llm", &["tensor", "worker", "telemetry"]),
    ("engine", &["worker", "llm", "tensor", "telemetry", "echo"]),
    ("regions", &["worker", "tensor"]),
    ("repository", &["engine", "tensor", "telemetry", "echo"]),
    (
        "api",
        &[
            "engine",
            "repository",
            "regions",
            "auth",
            "tls",
            "net",
            "telemetry",
            "tensor",
            "proto",
            "echo",
        ],
    ),
    ("bench", &["tensor", "proto", "tls"]),
    (
        "cluster",
        &[
            "api",
            "engine",
            "repository",
            "auth",
            "tls",
            "net",
            "telemetry",
            "tensor",
            "proto",
            "echo",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a line, without its `//` comment (doc comments name other layers freely).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// Every `crate::NAME` a line names.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code(line);
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        found.push(name);
        rest = after;
    }
    found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_module_names_only_the_layers_below_it() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut broken = Vec::new();
    for (module, may_use) in &allowed {
        let mut files = Vec::new();
        let dir = src().join(module);
        rust_files(&dir, &mut files);
        let single = src().join(format!("{module}.rs"));
        if single.exists() {
            files.push(single);
        }
        assert!(
            !files.is_empty(),
            "module `{module}` has no files: update ALLOWED"
        );
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                for name in crate_paths(line) {
                    if name != *module && !may_use.contains(&name.as_str()) {
                        broken.push(format!(
                            "{}:{}: `{module}` names `crate::{name}` (allowed: {may_use:?})",
                            file.strip_prefix(src()).unwrap_or(&file).display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn every_top_level_module_has_a_rule() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap_or_default();
    let rules: Vec<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    let missing: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub mod ")
                .or(l.trim().strip_prefix("mod "))
        })
        .map(|m| m.trim_end_matches(';'))
        .filter(|m| *m != "cli" && !rules.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a layering rule: {missing:?}"
    );
}

#[test]
fn rest_and_grpc_front_ends_do_not_name_each_other() {
    let api = src().join("api");
    let mut broken = Vec::new();
    let mut files = Vec::new();
    rust_files(&api, &mut files);
    for file in files {
        let in_grpc = file.starts_with(api.join("grpc"));
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let line = code(line);
            let names_grpc = line.contains("grpc::") && !line.contains("tonic");
            let names_rest = ["http::", "generate::", "response::"].iter().any(|m| {
                line.contains(&format!("api::{m}")) || line.contains(&format!("super::{m}"))
            });
            if (!in_grpc && names_grpc) || (in_grpc && names_rest) {
                broken.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "REST and gRPC name each other:\n{}",
        broken.join("\n")
    );
}
