//! The IETF rate-limit fields on every metered response
//! (draft-ietf-httpapi-ratelimit-headers, structured fields).
//!
//! `RateLimit-Policy` lists each window of the call's policy as a quota
//! policy named after it, with `q` (calls allowed) and `w` (window seconds);
//! `RateLimit` gives, for the same names, `r` (calls remaining) and `t`
//! (seconds until the oldest counted call stops counting, so `r` grows).
//! Both list the window closest to exhaustion first, so a client that reads
//! only the first item paces itself by the binding one.

use std::fmt::Write;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::admission::rejection::whole_seconds;
use crate::quota::{BudgetUse, WindowUse};

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Add both fields for `usage` to `headers`.
pub fn insert(headers: &mut HeaderMap, usage: &[WindowUse]) {
    insert_all(headers, usage, &[]);
}

/// One quota policy as the fields state it.
struct Item {
    name: String,
    quota: u64,
    window: u64,
    remaining: u64,
    reset: std::time::Duration,
    /// Extra parameters (the quota unit).
    unit: &'static str,
}

impl Item {
    fn share(&self) -> f64 {
        self.remaining as f64 / self.quota.max(1) as f64
    }
}

/// Add both fields for call windows and running-time budgets. A budget is
/// stated in seconds of running time, with the quota unit `qu="seconds"`.
pub fn insert_all(headers: &mut HeaderMap, usage: &[WindowUse], runtime: &[BudgetUse]) {
    let mut items: Vec<Item> = usage
        .iter()
        .map(|u| Item {
            name: name("calls", u.window.per),
            quota: u64::from(u.window.limit.get()),
            window: u.window.per.as_secs().max(1),
            remaining: u64::from(u.remaining()),
            reset: u.reset,
            unit: "",
        })
        .chain(runtime.iter().map(|b| Item {
            name: name("running-time", b.budget.per),
            quota: b.budget.limit.as_secs(),
            window: b.budget.per.as_secs().max(1),
            remaining: b.remaining().as_secs(),
            reset: b.reset,
            unit: ";qu=\"seconds\"",
        }))
        .collect();
    if items.is_empty() {
        return;
    }
    // Closest to exhaustion first: the smallest share remaining.
    items.sort_by(|a, b| a.share().total_cmp(&b.share()));
    let (mut policy, mut state) = (String::new(), String::new());
    for (i, it) in items.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(policy, "{sep}\"{}\";q={};w={}{}", it.name, it.quota, it.window, it.unit);
        let t = if it.reset.is_zero() { 0 } else { whole_seconds(it.reset) };
        let _ = write!(state, "{sep}\"{}\";r={};t={t}", it.name, it.remaining);
    }
    for (field, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(field, value);
        }
    }
}

/// A window's name: `calls-per-minute`, `running-time-per-hour`, `calls-per-90s`.
fn name(what: &str, per: std::time::Duration) -> String {
    match per.as_secs() {
        1 => format!("{what}-per-second"),
        60 => format!("{what}-per-minute"),
        3600 => format!("{what}-per-hour"),
        86_400 => format!("{what}-per-day"),
        0 => format!("{what}-per-{}ms", per.as_millis()),
        s => format!("{what}-per-{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::quota::Window;

    fn use_of(limit: u32, per: u64, used: u32, reset_ms: u64) -> WindowUse {
        WindowUse {
            window: Window::new(NonZeroU32::new(limit).unwrap(), Duration::from_secs(per)),
            used,
            reset: Duration::from_millis(reset_ms),
        }
    }

    #[test]
    fn the_window_closest_to_exhaustion_comes_first() {
        let mut h = HeaderMap::new();
        insert(&mut h, &[use_of(45, 60, 10, 30_500), use_of(1500, 3600, 1480, 1_000_001)]);
        assert_eq!(h[RATELIMIT_POLICY], "\"calls-per-hour\";q=1500;w=3600, \"calls-per-minute\";q=45;w=60");
        assert_eq!(h[RATELIMIT], "\"calls-per-hour\";r=20;t=1001, \"calls-per-minute\";r=35;t=31");
    }

    #[test]
    fn running_time_budgets_are_stated_in_seconds_among_the_windows() {
        use crate::quota::Budget;
        let mut h = HeaderMap::new();
        let budget = BudgetUse {
            budget: Budget { limit: Duration::from_secs(600), per: Duration::from_secs(3600) },
            charged: Duration::from_secs(500),
            reserved: Duration::from_secs(40),
            reset: Duration::from_millis(1500),
        };
        insert_all(&mut h, &[use_of(45, 60, 10, 30_500)], &[budget]);
        assert_eq!(
            h[RATELIMIT_POLICY],
            "\"running-time-per-hour\";q=600;w=3600;qu=\"seconds\", \"calls-per-minute\";q=45;w=60"
        );
        assert_eq!(h[RATELIMIT], "\"running-time-per-hour\";r=60;t=2, \"calls-per-minute\";r=35;t=31");
    }

    #[test]
    fn an_unused_window_resets_now_and_names_are_readable() {
        let mut h = HeaderMap::new();
        insert(&mut h, &[use_of(10, 2, 0, 0)]);
        assert_eq!(h[RATELIMIT_POLICY], "\"calls-per-2s\";q=10;w=2");
        assert_eq!(h[RATELIMIT], "\"calls-per-2s\";r=10;t=0");
    }
}
