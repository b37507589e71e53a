//! The IETF rate-limit fields on every metered response
//! (draft-ietf-httpapi-ratelimit-headers, structured fields).
//!
//! `RateLimit-Policy` lists each window of the call's policy as a quota
//! policy named after it, with `q` (calls allowed) and `w` (window seconds);
//! `RateLimit` gives, for the same names, `r` (calls remaining) and `t`
//! (seconds until the oldest counted call stops counting, so `r` grows).
//! Both list the window closest to exhaustion first, so a client that reads
//! only the first item paces itself by the binding one.

use std::time::Duration;

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
    what: &'static str,
    per: Duration,
    quota: u64,
    remaining: u64,
    reset: Duration,
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
/// On every metered response: numbers are written with `itoa`, not `fmt`.
pub fn insert_all(headers: &mut HeaderMap, usage: &[WindowUse], runtime: &[BudgetUse]) {
    let mut items: Vec<Item> = Vec::with_capacity(usage.len() + runtime.len());
    items.extend(usage.iter().map(|u| Item {
        what: "calls",
        per: u.window.per,
        quota: u64::from(u.window.limit.get()),
        remaining: u64::from(u.remaining()),
        reset: u.reset,
        unit: "",
    }));
    items.extend(runtime.iter().map(|b| Item {
        what: "running-time",
        per: b.budget.per,
        quota: b.budget.limit.as_secs(),
        remaining: b.remaining().as_secs(),
        reset: b.reset,
        unit: ";qu=\"seconds\"",
    }));
    if items.is_empty() {
        return;
    }
    // Closest to exhaustion first: the smallest share remaining.
    items.sort_by(|a, b| a.share().total_cmp(&b.share()));
    let mut n = itoa::Buffer::new();
    let (mut policy, mut state) = (String::with_capacity(96), String::with_capacity(96));
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            policy.push_str(", ");
            state.push_str(", ");
        }
        for out in [&mut policy, &mut state] {
            out.push('"');
            name(out, it.what, it.per);
            out.push('"');
        }
        policy.push_str(";q=");
        policy.push_str(n.format(it.quota));
        policy.push_str(";w=");
        policy.push_str(n.format(it.per.as_secs().max(1)));
        policy.push_str(it.unit);
        state.push_str(";r=");
        state.push_str(n.format(it.remaining));
        state.push_str(";t=");
        state.push_str(n.format(if it.reset.is_zero() { 0 } else { whole_seconds(it.reset) }));
    }
    for (field, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(field, value);
        }
    }
}

/// A window's name: `calls-per-minute`, `running-time-per-hour`, `calls-per-90s`.
fn name(out: &mut String, what: &str, per: Duration) {
    out.push_str(what);
    out.push_str("-per-");
    match per.as_secs() {
        1 => out.push_str("second"),
        60 => out.push_str("minute"),
        3600 => out.push_str("hour"),
        86_400 => out.push_str("day"),
        0 => {
            out.push_str(itoa::Buffer::new().format(per.as_millis()));
            out.push_str("ms");
        }
        s => {
            out.push_str(itoa::Buffer::new().format(s));
            out.push('s');
        }
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
