//! The fuzz targets' seeds as an ordinary test: every file in `fuzz/corpus/<target>/` (and in
//! `fuzz/artifacts/<target>/`, where `cargo fuzz` leaves crashes, when present) goes through
//! the same check the fuzzer runs, `fuzz/checks.rs`. Longer runs: README, "Fuzzing".

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` over every seed of `target`; a failure names the file.
fn seeds(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        if let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) {
            files.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    assert!(
        files.len() >= 5,
        "{target}: only {} seed files in fuzz/corpus/{target}",
        files.len()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            eprintln!(
                "seed {} failed; reproduce: cargo fuzz run {target} {}",
                f.display(),
                f.display()
            );
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn usage_scanner_seeds() {
    seeds("usage_scanner", checks::usage_scanner);
}

#[test]
fn config_seeds() {
    seeds("config", checks::config);
}

#[test]
fn key_record_seeds() {
    seeds("key_record", checks::key_record);
}

#[test]
fn router_seeds() {
    seeds("router", checks::router);
}
