//! ARCHITECTURE.md's layering, held by a test: which drover crate may depend on which.
//! Reads every workspace crate's `Cargo.toml` (`[dependencies]` only; tests may use more).

use std::collections::BTreeMap;
use std::path::Path;

/// For each crate, the drover crates its `[dependencies]` may name.
const ALLOWED: &[(&str, &[&str])] = &[
    ("drover-core", &[]),
    ("drover-ledger", &["drover-core"]),
    ("drover-broker", &["drover-core"]),
    ("drover-pipeline", &["drover-core"]),
    (
        "drover-worker",
        &[
            "drover-core",
            "drover-ledger",
            "drover-broker",
            "drover-pipeline",
        ],
    ),
    (
        "drover-client",
        &[
            "drover-core",
            "drover-ledger",
            "drover-broker",
            "drover-pipeline",
        ],
    ),
    (
        "drover-dashboard",
        &["drover-core", "drover-ledger", "drover-broker"],
    ),
];

/// The drover crates named in a manifest's `[dependencies]` table.
fn drover_deps(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("read Cargo.toml");
    let doc: toml::Table = text.parse().expect("Cargo.toml parses");
    doc.get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| {
            t.keys()
                .filter(|k| k.starts_with("drover"))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn crates_depend_only_on_the_layers_below_them() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(&crates).expect("read crates/") {
        let dir = entry.expect("entry").path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_string();
        seen.insert(name.clone(), drover_deps(&manifest));
    }
    for (name, deps) in &seen {
        if name == "drover" {
            continue; // the CLI may use every library crate
        }
        let allowed = ALLOWED
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("crate {name} has no rule in ALLOWED: add one"));
        for d in deps {
            assert!(
                allowed.contains(&d.as_str()),
                "{name} depends on {d}, which ARCHITECTURE.md does not allow"
            );
        }
    }
    assert!(
        seen.contains_key("drover-worker"),
        "read the crates: {seen:?}"
    );
}

/// No library crate depends on the CLI crate or on an example.
#[test]
fn nothing_depends_on_the_cli_or_the_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in ["crates", "examples"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("read dir") {
            let path = entry.expect("entry").path();
            let manifest = path.join("Cargo.toml");
            if !manifest.exists() || path.ends_with("examples/invoicing") {
                continue;
            }
            let deps = drover_deps(&manifest);
            assert!(
                !deps
                    .iter()
                    .any(|d| d == "drover" || d.starts_with("drover-example")),
                "{} depends on the CLI or an example: {deps:?}",
                path.display()
            );
        }
    }
}
