//! Replays every file of the fuzz corpus (`fuzz/corpus/<target>/`) through
//! the same check the fuzz target runs (`fuzz/checks/`), so the seeds and
//! every crasher the fuzzers found stay fixed in the normal test suite.
//! How to run the fuzzers themselves: docs/fuzzing.md.

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let (_, check) = checks::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus file", dir.display());
    for path in files {
        let data = std::fs::read(&path).expect("a corpus file");
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "fuzz target `{target}` fails on {}", path.display());
    }
}

/// The names in `fuzz/<dir>`, without `suffix`, sorted.
fn names(dir: &str, suffix: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .filter_map(|name| name.strip_suffix(suffix).map(str::to_string))
        .collect();
    names.sort();
    names
}

#[test]
fn every_fuzz_target_has_a_check_a_corpus_and_a_dictionary() {
    let targets: Vec<&str> = checks::TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(names("fuzz_targets", ".rs"), targets);
    assert_eq!(names("corpus", ""), targets);
    assert_eq!(names("dict", ".dict"), targets);
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn http_corpus() {
    replay("http");
}

#[test]
fn jwt_corpus() {
    replay("jwt");
}

#[test]
fn stats_corpus() {
    replay("stats");
}

#[test]
fn throttle_corpus() {
    replay("throttle");
}
