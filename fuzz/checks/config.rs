//! The config loader: `Config::from_toml` (parse, then validate).
//!
//! Input: the TOML text.
//!
//! Properties:
//! - it never panics: a config loads or says what is wrong;
//! - every problem it reports names a line of the text (or none);
//! - a config that loads can be described (`check-config` prints that), and
//!   its file, written back as TOML, parses to the same file and loads to a
//!   config that describes the same.
//!
//! Texts that name device or kernel files (`/dev/`, `/proc/`, `/sys/`) are
//! skipped: validation reads the certificate files a config names, and
//! reading `/dev/zero` never ends. That is the operator's file to choose.

use quotagate::config::{self, Config, ConfigError};

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if ["/dev/", "/proc/", "/sys/"].iter().any(|p| text.contains(p)) {
        return;
    }
    let lines = text.lines().count().max(1);
    let config = match Config::from_toml(&text, "fuzz.toml") {
        Ok(config) => config,
        Err(ConfigError::Parse { line, .. }) => {
            assert!(line.is_none_or(|l| (1..=lines + 1).contains(&l)), "line {line:?} of {lines}");
            return;
        }
        Err(ConfigError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "invalid without a problem");
            for p in &problems {
                assert!(p.line.is_none_or(|l| (1..=lines + 1).contains(&l)), "{p:?} of {lines} lines");
                assert!(!p.message.is_empty(), "{p:?}");
            }
            return;
        }
        Err(e @ ConfigError::Read { .. }) => panic!("from_toml reads no config file: {e}"),
    };
    let described = config.describe();
    let file = config::parse(&text, "fuzz.toml").expect("a loaded config parses");
    let written = toml::to_string(&file).unwrap_or_else(|e| panic!("a loaded config cannot be written: {e}"));
    let reread = config::parse(&written, "written").unwrap_or_else(|e| panic!("{e}\n{written}"));
    assert_eq!(reread, file, "written as\n{written}");
    let reloaded = Config::from_toml(&written, "written").unwrap_or_else(|e| panic!("{e}\n{written}"));
    assert_eq!(reloaded.describe(), described, "written as\n{written}");
}
