//! Find `Stats.ExecutionTime` and the row counts in a hunting response as
//! it streams past, in constant memory.
//!
//! Defender answers `{"Stats": {"ExecutionTime": 4.62, ..., "dataset_statistics":
//! [{"table_row_count": 2, ...}]}, "Schema": [...], "Results": [...]}`, with
//! `Stats` first in the documented example. The [`Scanner`] is a small JSON
//! lexer fed chunk by chunk: it keeps a bounded stack of containers and the
//! key each object is at, never the document, so a 100 MB result costs the
//! same as a small one and `Stats` is found wherever it stands. Keys match
//! case-insensitively once their escapes are decoded; unknown keys, other
//! orders and any whitespace are fine. It does not validate JSON: malformed input yields what could be
//! read, never a panic.

/// What the response says about its own cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// `Stats.ExecutionTime`, in seconds.
    pub execution_time: Option<f64>,
    /// Sum of `Stats.dataset_statistics[].table_row_count`.
    pub rows: Option<u64>,
    /// The `Stats` object has been read to its end.
    pub complete: bool,
}

const MAX_DEPTH: usize = 32;
const MAX_TOKEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Stats,
    ExecutionTime,
    DatasetStatistics,
    TableRowCount,
    Other,
}

impl Key {
    fn of(name: &[u8]) -> Key {
        let is = |k: &str| name.eq_ignore_ascii_case(k.as_bytes());
        if is("stats") {
            Key::Stats
        } else if is("executiontime") {
            Key::ExecutionTime
        } else if is("dataset_statistics") {
            Key::DatasetStatistics
        } else if is("table_row_count") {
            Key::TableRowCount
        } else {
            Key::Other
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// An object, and the key whose value is being read.
    Object(Option<Key>),
    Array,
}

/// Where a string is in an escape sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// Just after a backslash.
    Backslash,
    /// `n` hex digits into a `\uXXXX` escape, and their value so far.
    Unicode { n: u8, value: u16 },
}

/// What an escaped character that is not ASCII becomes in a token: a byte
/// no key has, so such a key matches none (every key looked for is ASCII).
const NOT_ASCII: u8 = 0xff;

/// An incremental scanner; feed it the body's chunks in order.
#[derive(Debug, Default)]
pub struct Scanner {
    stack: Vec<Frame>,
    /// Containers opened past `MAX_DEPTH`, not tracked.
    deep: usize,
    expecting_key: bool,
    in_string: bool,
    escape: Escape,
    string_is_key: bool,
    in_number: bool,
    token: Vec<u8>,
    token_overflow: bool,
    stats: Stats,
}

impl Scanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// What has been found so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.in_string {
                self.string_byte(b);
                continue;
            }
            if self.in_number {
                if matches!(b, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E') {
                    self.push(b);
                    continue;
                }
                self.end_number();
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.string_is_key = self.expecting_key;
                    self.token.clear();
                    self.token_overflow = false;
                }
                b'{' => self.open(Frame::Object(None)),
                b'[' => self.open(Frame::Array),
                b'}' | b']' => self.close(),
                b':' => self.expecting_key = false,
                b',' => {
                    self.expecting_key = matches!(self.stack.last(), Some(Frame::Object(_))) && self.deep == 0
                }
                b'-' | b'0'..=b'9' => {
                    self.in_number = true;
                    self.token.clear();
                    self.token_overflow = false;
                    self.push(b);
                }
                _ => {}
            }
        }
    }

    fn push(&mut self, b: u8) {
        if self.token.len() < MAX_TOKEN {
            self.token.push(b);
        } else {
            self.token_overflow = true;
        }
    }

    fn string_byte(&mut self, b: u8) {
        match self.escape {
            Escape::None => {}
            Escape::Backslash => {
                self.escape = Escape::None;
                let decoded = match b {
                    b'u' => {
                        self.escape = Escape::Unicode { n: 0, value: 0 };
                        return;
                    }
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    // `\"`, `\\`, `\/` (and what JSON does not allow) stand for themselves.
                    other => other,
                };
                self.push(decoded);
                return;
            }
            Escape::Unicode { n, value } => {
                let Some(digit) = char::from(b).to_digit(16) else {
                    // Not JSON: end the escape and read the byte as it is.
                    self.escape = Escape::None;
                    self.push(NOT_ASCII);
                    return self.string_byte(b);
                };
                let value = value << 4 | digit as u16;
                if n < 3 {
                    self.escape = Escape::Unicode { n: n + 1, value };
                } else {
                    self.escape = Escape::None;
                    self.push(u8::try_from(value).ok().filter(u8::is_ascii).unwrap_or(NOT_ASCII));
                }
                return;
            }
        }
        if b == b'\\' {
            self.escape = Escape::Backslash;
        } else if b == b'"' {
            self.in_string = false;
            if self.string_is_key && self.deep == 0 {
                let key = if self.token_overflow { Key::Other } else { Key::of(&self.token) };
                if let Some(Frame::Object(k)) = self.stack.last_mut() {
                    *k = Some(key);
                }
                self.expecting_key = false;
            }
        } else {
            self.push(b);
        }
    }

    fn open(&mut self, frame: Frame) {
        if self.deep > 0 || self.stack.len() >= MAX_DEPTH {
            self.deep += 1;
        } else {
            self.stack.push(frame);
        }
        self.expecting_key = matches!(frame, Frame::Object(_)) && self.deep == 0;
    }

    fn close(&mut self) {
        if self.deep > 0 {
            self.deep -= 1;
        } else if self.stack.pop().is_some() && self.path_is(&[Frame::Object(Some(Key::Stats))]) {
            self.stats.complete = true;
        }
        self.expecting_key = false;
    }

    fn path_is(&self, path: &[Frame]) -> bool {
        self.deep == 0 && self.stack == path
    }

    fn end_number(&mut self) {
        self.in_number = false;
        if self.token_overflow {
            return;
        }
        let Some(n) = std::str::from_utf8(&self.token).ok().and_then(|t| t.parse::<f64>().ok()) else {
            return;
        };
        let stats = Frame::Object(Some(Key::Stats));
        if self.path_is(&[stats, Frame::Object(Some(Key::ExecutionTime))]) && n.is_finite() && n >= 0.0 {
            self.stats.execution_time = Some(n);
        } else if self.path_is(&[
            stats,
            Frame::Object(Some(Key::DatasetStatistics)),
            Frame::Array,
            Frame::Object(Some(Key::TableRowCount)),
        ]) && n.is_finite()
            && n >= 0.0
        {
            self.stats.rows = Some(self.stats.rows.unwrap_or(0).saturating_add(n as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan(chunks: &[&[u8]]) -> Stats {
        let mut s = Scanner::new();
        for c in chunks {
            s.feed(c);
        }
        s.stats()
    }

    const DOC: &str = r#"{"Stats": {"ExecutionTime": 4.621215,
           "resource_usage": {"cache": {"memory": {"hits": 773461, "misses": 4481, "total": 777942},
                                        "disk": {"hits": 994, "misses": 197, "total": 1191}},
                              "cpu": {"user": "00:00:19.0468750", "kernel": "00:00:00.0156250",
                                      "total cpu": "00:00:19.0625000"},
                              "memory": {"peak_per_node": 236822432}},
           "dataset_statistics": [{"table_row_count": 2, "table_size": 102}, {"table_row_count": 40}]},
 "Schema": [{"Name": "Timestamp", "Type": "DateTime"}],
 "Results": [{"Timestamp": "2020-08-30T06:38:35.7664356Z", "ExecutionTime": 99, "Stats": {"ExecutionTime": 77}}]}"#;

    #[test]
    fn the_documented_response() {
        let s = scan(&[DOC.as_bytes()]);
        assert_eq!(s, Stats { execution_time: Some(4.621215), rows: Some(42), complete: true });
    }

    #[test]
    fn stats_last_other_order_other_case_and_escapes() {
        let doc = r#"{"Results":[{"a":"x\"y}","Stats":1}],"schema":[], "STATS" : { "Other" : [1,{"ExecutionTime":5}], "dataset_statistics":[ {"table_size":1,"Table_Row_Count":100000} ], "executionTime" : 1.5e1 } }"#;
        let s = scan(&[doc.as_bytes()]);
        assert_eq!(s, Stats { execution_time: Some(15.0), rows: Some(100_000), complete: true });
    }

    #[test]
    fn graph_responses_have_no_stats() {
        let doc = r#"{"@odata.context":"x","schema":[{"name":"a","type":"String"}],"results":[{"a":"b"}]}"#;
        assert_eq!(scan(&[doc.as_bytes()]), Stats::default());
    }

    #[test]
    fn an_unfinished_stats_is_not_complete() {
        let s = scan(&[br#"{"Stats": {"ExecutionTime": 2.5, "dataset_st"#]);
        assert_eq!(s, Stats { execution_time: Some(2.5), rows: None, complete: false });
    }

    /// Regression (found by the `stats` fuzz target): an escape stood for
    /// the letter after the backslash, so the key `"Sta\ts"` (with a tab)
    /// was taken for `Stats`; a `\u` escape never matched.
    #[test]
    fn escapes_in_keys_are_decoded() {
        assert_eq!(scan(&[br#"{"Sta\ts":[]}"#]), Stats::default());
        let s = scan(&[br#"{"St\u0061ts":{"Execution\u0054ime":3,"x\"y":1}}"#]);
        assert_eq!(s, Stats { execution_time: Some(3.0), rows: None, complete: true });
        // A non-ASCII character, or a broken escape, matches no key.
        assert_eq!(scan(&[br#"{"Stat\u0161":{"ExecutionTime":3}}"#]), Stats::default());
        assert_eq!(scan(&[br#"{"Stats\u12":{"ExecutionTime":3}}"#]), Stats::default());
    }

    #[test]
    fn memory_stays_bounded_on_deep_or_long_input() {
        let mut s = Scanner::new();
        s.feed(&[b'['; 10_000]);
        s.feed(&[b'"'; 1]);
        s.feed(&[b'x'; 100_000]);
        assert!(s.stack.len() <= MAX_DEPTH && s.token.len() <= MAX_TOKEN);
    }

    proptest! {
        /// However the body is cut into chunks, the scanner finds the same.
        #[test]
        fn chunking_does_not_matter(cuts in prop::collection::vec(0usize..DOC.len(), 0..20)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let bytes = DOC.as_bytes();
            let mut s = Scanner::new();
            let mut from = 0;
            for c in cuts {
                s.feed(&bytes[from..c.max(from)]);
                from = c.max(from);
            }
            s.feed(&bytes[from..]);
            prop_assert_eq!(s.stats(), scan(&[bytes]));
        }

        /// Extra members and whitespace anywhere in Stats do not hide the values.
        #[test]
        fn lenient_about_what_surrounds_the_values(
            before in prop::collection::vec(("[a-z]{1,8}", 0u32..1000), 0..5),
            space in "[ \t\r\n]{0,4}",
            time in 0.0f64..10_000.0,
            rows in prop::collection::vec(0u64..1_000_000, 0..5),
        ) {
            let extra: String = before.iter().map(|(k, v)| format!("\"x{k}\":{space}{v},")).collect();
            let tables: Vec<String> = rows.iter().map(|r| format!("{{\"table_row_count\":{space}{r}}}")).collect();
            let doc = format!(
                "{{\"Schema\":[],{space}\"Stats\":{space}{{{extra}\"dataset_statistics\":[{}],{space}\"ExecutionTime\"{space}:{space}{time}}}}}",
                tables.join(",")
            );
            let s = scan(&[doc.as_bytes()]);
            prop_assert_eq!(s.execution_time, Some(time));
            prop_assert_eq!(s.rows, if rows.is_empty() { None } else { Some(rows.iter().sum()) });
            prop_assert!(s.complete);
        }

        #[test]
        fn no_input_makes_it_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut s = Scanner::new();
            s.feed(&bytes);
            let _ = s.stats();
        }
    }
}
