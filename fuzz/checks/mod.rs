//! The bodies of the fuzz targets: one `check(&[u8])` per target, each of
//! which panics when a property does not hold.
//!
//! Included with `#[path]` by the `cargo fuzz` targets in `fuzz/fuzz_targets/`
//! and by `tests/fuzz_corpus.rs`, which replays every file of `fuzz/corpus/`
//! in `cargo test`, so the test suite runs exactly what the fuzzers run.

// Each includer uses some of the checks and of the emulator's API, not all.
#![allow(dead_code)]

pub mod config;
pub mod http;
pub mod jwt;
pub mod stats;
pub mod throttle;

// The upstream emulator of the integration tests, for the HTTP target.
#[path = "../../tests/support/emulator.rs"]
mod emulator;
#[path = "../../tests/support/hunt.rs"]
mod hunt;

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// The check of each target, by the name of its corpus directory.
pub const TARGETS: [(&str, Check); 5] = [
    ("config", config::check),
    ("http", http::check),
    ("jwt", jwt::check),
    ("stats", stats::check),
    ("throttle", throttle::check),
];

/// Split `data` at the first `sep`: (before, after); all of it when absent.
fn split_once(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
