//! The hunting response's `Stats` scanner (`hunting::stats::Scanner`).
//!
//! Input: the response body; its bytes also choose where to cut it.
//!
//! Properties:
//! - fed in any chunks (one byte at a time, or cut at positions taken from
//!   the input), it finds what it finds when fed the whole body at once;
//! - on valid JSON it agrees with a full parse: `ExecutionTime` is the last
//!   non-negative number member of the top-level `Stats` object (keys match
//!   ASCII case-insensitively, escapes decoded), `rows` the sum of the
//!   `table_row_count` numbers of `Stats.dataset_statistics[]`, and the
//!   `Stats` object is complete once it has been read. Number tokens longer
//!   than the scanner's 64 bytes are its documented limit and are left out.

use std::fmt;

use quotagate::hunting::stats::{Scanner, Stats};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The scanner's longest number token, in bytes.
const MAX_TOKEN: usize = 64;

pub fn check(data: &[u8]) {
    let whole = scan(&[data]);
    let bytewise: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(scan(&bytewise), whole, "fed one byte at a time");
    let mut cuts: Vec<usize> = data.iter().take(8).map(|&b| usize::from(b) * 37 % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for c in cuts {
        chunks.push(&data[from..c]);
        from = c;
    }
    chunks.push(&data[from..]);
    assert_eq!(
        scan(&chunks),
        whole,
        "fed in chunks cut at {:?}",
        chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
    );

    if let Ok(json) = serde_json::from_slice::<Json>(data) {
        if !has_long_number(data) {
            let expected = reference(&json);
            assert_eq!(whole.complete, expected.stats.complete, "complete");
            match (whole.rows, expected.rows) {
                (Some(n), Some((lo, hi))) => assert!(lo <= n && n <= hi, "rows {n} against {lo}..={hi}"),
                (n, e) => assert_eq!(n.is_some(), e.is_some(), "rows {n:?}"),
            }
            match (whole.execution_time, expected.stats.execution_time) {
                (Some(a), Some(b)) => assert!(near(b, a), "ExecutionTime {a} against {b}"),
                (a, b) => assert_eq!(a, b, "ExecutionTime"),
            }
        }
    }
}

fn scan(chunks: &[&[u8]]) -> Stats {
    let mut s = Scanner::new();
    for c in chunks {
        s.feed(c);
    }
    s.stats()
}

/// serde_json's float parsing (without `float_roundtrip`) may be off from
/// `str::parse`, which the scanner uses, by an ulp: `a` within two of `b`.
fn near(b: f64, a: f64) -> bool {
    ulps(b, -2) <= a && a <= ulps(b, 2)
}

/// `n` moved `k` representable values up (or down, for a negative `k`).
fn ulps(n: f64, k: i32) -> f64 {
    (0..k.unsigned_abs()).fold(n, |n, _| {
        let up = k > 0;
        if n == 0.0 {
            let tiny = f64::from_bits(1);
            return if up { tiny } else { -tiny };
        }
        let bits = n.to_bits();
        f64::from_bits(if (n > 0.0) == up { bits + 1 } else { bits - 1 })
    })
}

/// A JSON value that keeps its members in document order, duplicates included.
enum Json {
    Number(f64),
    Other,
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Number(n as f64))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Number(n as f64))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Json, E> {
                Ok(Json::Number(n))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Json>()? {
                    members.push(member);
                }
                Ok(Json::Object(members))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a full parse says the scanner should find; rows as a range, for the
/// ulp that may separate the two parses of a fractional count.
struct Expected {
    stats: Stats,
    rows: Option<(u64, u64)>,
}

fn reference(json: &Json) -> Expected {
    let mut found = Stats::default();
    let mut rows: Option<(u64, u64)> = None;
    let Json::Object(top) = json else { return Expected { stats: found, rows } };
    let is = |k: &str, name: &str| k.eq_ignore_ascii_case(name);
    for (key, value) in top {
        if !is(key, "stats") {
            continue;
        }
        match value {
            Json::Object(stats) => {
                for (key, value) in stats {
                    match value {
                        Json::Number(n) if is(key, "executiontime") && *n >= 0.0 => {
                            found.execution_time = Some(*n)
                        }
                        Json::Array(tables) if is(key, "dataset_statistics") => {
                            for table in tables {
                                let Json::Object(members) = table else { continue };
                                for (key, value) in members {
                                    if let Json::Number(n) = value {
                                        if is(key, "table_row_count") && *n >= 0.0 {
                                            let (lo, hi) = rows.unwrap_or((0, 0));
                                            let (down, up) = (ulps(*n, -2), ulps(*n, 2));
                                            rows = Some((
                                                lo.saturating_add(down as u64),
                                                hi.saturating_add(up as u64),
                                            ));
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                found.complete = true;
            }
            // The scanner closes `Stats` when its value closes, whatever it is.
            Json::Array(_) => found.complete = true,
            _ => {}
        }
    }
    Expected { stats: found, rows }
}

/// Whether a number token outside strings is longer than the scanner keeps.
fn has_long_number(data: &[u8]) -> bool {
    let (mut in_string, mut escaped, mut run) = (false, false, 0usize);
    for &b in data {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if matches!(b, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E') {
            run += 1;
            if run > MAX_TOKEN {
                return true;
            }
        } else {
            run = 0;
            in_string = b == b'"';
        }
    }
    false
}
