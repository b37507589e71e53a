//! Hunting queries as the emulator runs them: a query's text says what it
//! costs and what it returns, so tests can ask for "a 0.3 s query with
//! 100,000 rows and `Stats` last" in plain KQL comments.
//!
//! Recognised tokens anywhere in the query (`// cost=0.25 rows=100000`):
//! - `cost=S`: the query runs S seconds and reports `Stats.ExecutionTime = S`;
//!   without it the query takes no time and reports 0.01. `cost=A..B` draws
//!   each run's cost at random between A and B seconds, as the same query
//!   costs more or less from run to run on the service;
//! - `rows=N`: `Stats.dataset_statistics[0].table_row_count` (default 1);
//! - `bytes=N`: the response is padded with result rows to about N bytes
//!   (at most [`MAX_BYTES`]);
//! - `stats=last` puts `Stats` after `Results`, `stats=none` leaves it out;
//! - `pad=random` fills the rows with pseudo-random hex digits instead of one
//!   repeated letter, so that a compressed result stays about half its size.

use std::time::Duration;

use bytes::Bytes;

/// The largest body the emulator makes up (64 MiB, the most any test asks
/// for): a bigger `bytes=N` is cut to it, and a bigger `/api/test/bytes/{n}`
/// is a 400, so that no input, a fuzzer's included, makes it allocate
/// without bound.
pub const MAX_BYTES: usize = 64 << 20;

/// Where `Stats` stands in a Defender response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsAt {
    First,
    Last,
    None,
}

/// What a query asks the emulator to do.
#[derive(Debug, Clone, PartialEq)]
pub struct HuntSpec {
    /// Running time, if the query names one.
    pub cost: Option<Duration>,
    pub rows: u64,
    pub bytes: usize,
    pub stats: StatsAt,
    /// Rows padded with pseudo-random digits (`pad=random`).
    pub random_pad: bool,
}

impl HuntSpec {
    pub fn of(query: &str) -> HuntSpec {
        let value = |key: &str| {
            query.split(|c: char| c.is_whitespace() || c == ',' || c == ';').find_map(|t| t.strip_prefix(key))
        };
        HuntSpec {
            cost: value("cost=").and_then(cost).and_then(|s| Duration::try_from_secs_f64(s).ok()),
            rows: value("rows=").and_then(|s| s.parse().ok()).unwrap_or(1),
            bytes: value("bytes=").and_then(|s| s.parse().ok()).unwrap_or(0).min(MAX_BYTES),
            stats: match value("stats=") {
                Some("last") => StatsAt::Last,
                Some("none") => StatsAt::None,
                _ => StatsAt::First,
            },
            random_pad: value("pad=") == Some("random"),
        }
    }

    /// The reported execution time in seconds.
    pub fn execution_time(&self) -> f64 {
        self.cost.map_or(0.01, |c| c.as_secs_f64())
    }
}

/// A `cost=` value in seconds: `S`, or a draw between `A..B`.
fn cost(text: &str) -> Option<f64> {
    let Some((low, high)) = text.split_once("..") else { return text.parse().ok() };
    let (low, high): (f64, f64) = (low.parse().ok()?, high.parse().ok()?);
    (low <= high).then(|| low + (high - low) * unit())
}

/// A pseudo-random number in [0, 1) (splitmix64 over a shared counter).
fn unit() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut z = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
}

/// A hunting query for the emulator costing `seconds`, plus extra tokens.
pub fn query(seconds: f64, extra: &str) -> String {
    format!("DeviceProcessEvents | where Timestamp > ago(1d) | take 10 // cost={seconds} {extra}")
}

/// The request body of a hunting call.
pub fn body(query: &str) -> String {
    serde_json::json!({ "Query": query }).to_string()
}

/// The response body the emulator sends for `query`: deterministic (for a
/// fixed cost), so a test can compare what came through the gateway byte
/// for byte.
pub fn response_body(query: &str, graph: bool) -> Bytes {
    response_of(&HuntSpec::of(query), graph)
}

/// The response body of a query run as `spec` says (its cost drawn).
pub fn response_of(spec: &HuntSpec, graph: bool) -> Bytes {
    let stats = format!(
        r#""Stats":{{"ExecutionTime":{},"resource_usage":{{"cache":{{"memory":{{"hits":1,"misses":0,"total":1}},"disk":{{"hits":0,"misses":0,"total":0}}}},"cpu":{{"user":"00:00:00.0100000","kernel":"00:00:00","total cpu":"00:00:00.0100000"}},"memory":{{"peak_per_node":1024}}}},"dataset_statistics":[{{"table_row_count":{},"table_size":{}}}]}}"#,
        spec.execution_time(),
        spec.rows,
        spec.bytes
    );
    let mut results = String::with_capacity(spec.bytes + 64);
    results.push_str(if graph { r#""results":["# } else { r#""Results":["# });
    let mut pad = "a".repeat(1000);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut i = 0u64;
    loop {
        if i > 0 {
            results.push(',');
        }
        if spec.random_pad {
            pad.clear();
            while pad.len() < 1000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                pad.push_str(&format!("{seed:016x}"));
            }
            pad.truncate(1000);
        }
        results.push_str(&format!(r#"{{"x":"row-{i:08}-{pad}"}}"#));
        i += 1;
        if results.len() >= spec.bytes {
            break;
        }
    }
    results.push(']');
    let out = if graph {
        format!(
            r#"{{"@odata.context":"https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.security.huntingQueryResults","schema":[{{"name":"x","type":"String"}}],{results}}}"#
        )
    } else {
        let schema = r#""Schema":[{"Name":"x","Type":"String"}]"#;
        match spec.stats {
            StatsAt::First => format!("{{{stats},{schema},{results}}}"),
            StatsAt::Last => format!("{{{schema},{results},{stats}}}"),
            StatsAt::None => format!("{{{schema},{results}}}"),
        }
    };
    Bytes::from(out)
}

/// Running time charged to one tenant: `(end, cost)` per query, in end order.
#[derive(Debug, Default, Clone)]
pub struct Charges(pub Vec<(std::time::Instant, Duration)>);

impl Charges {
    /// Sum of costs whose end lies in `(to - window, to]`.
    pub fn in_window(&self, to: std::time::Instant, window: Duration) -> Duration {
        self.0.iter().filter(|(end, _)| *end <= to && to.duration_since(*end) < window).map(|(_, c)| *c).sum()
    }

    /// Sum of costs whose end lies in `[from, to)`.
    pub fn between(&self, from: std::time::Instant, to: std::time::Instant) -> Duration {
        self.0.iter().filter(|(end, _)| *end >= from && *end < to).map(|(_, c)| *c).sum()
    }

    /// The most running time in any interval of `window` (ending at a charge).
    pub fn max_in_any(&self, window: Duration) -> Duration {
        self.0.iter().map(|(end, _)| self.in_window(*end, window)).max().unwrap_or_default()
    }

    /// Time from `now` until the sum in the trailing window drops below `limit`, if it is not.
    pub fn wait(&self, now: std::time::Instant, limit: Duration, window: Duration) -> Option<Duration> {
        let mut inside: Vec<&(std::time::Instant, Duration)> =
            self.0.iter().filter(|(end, _)| *end <= now && now.duration_since(*end) < window).collect();
        inside.sort_by_key(|(end, _)| *end);
        let mut sum: Duration = inside.iter().map(|(_, c)| *c).sum();
        if sum < limit {
            return None;
        }
        for (end, cost) in inside {
            sum -= *cost;
            if sum < limit {
                return Some((*end + window).saturating_duration_since(now));
            }
        }
        Some(window)
    }
}
