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
use crate::quota::WindowUse;

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Add both fields for `usage` to `headers`.
pub fn insert(headers: &mut HeaderMap, usage: &[WindowUse]) {
    if usage.is_empty() {
        return;
    }
    let mut sorted: Vec<&WindowUse> = usage.iter().collect();
    // Closest to exhaustion first: the smallest share remaining.
    sorted.sort_by(|a, b| {
        let share = |u: &WindowUse| f64::from(u.remaining()) / f64::from(u.window.limit.get());
        share(a).total_cmp(&share(b))
    });
    let (mut policy, mut state) = (String::new(), String::new());
    for (i, u) in sorted.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let name = name(u);
        let _ = write!(policy, "{sep}\"{name}\";q={};w={}", u.window.limit, u.window.per.as_secs().max(1));
        let t = if u.reset.is_zero() { 0 } else { whole_seconds(u.reset) };
        let _ = write!(state, "{sep}\"{name}\";r={};t={t}", u.remaining());
    }
    for (field, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(field, value);
        }
    }
}

/// A window's name: `calls-per-minute`, `calls-per-hour`, `calls-per-90s`.
fn name(u: &WindowUse) -> String {
    match u.window.per.as_secs() {
        1 => "calls-per-second".into(),
        60 => "calls-per-minute".into(),
        3600 => "calls-per-hour".into(),
        86_400 => "calls-per-day".into(),
        0 => format!("calls-per-{}ms", u.window.per.as_millis()),
        s => format!("calls-per-{s}s"),
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
    fn an_unused_window_resets_now_and_names_are_readable() {
        let mut h = HeaderMap::new();
        insert(&mut h, &[use_of(10, 2, 0, 0)]);
        assert_eq!(h[RATELIMIT_POLICY], "\"calls-per-2s\";q=10;w=2");
        assert_eq!(h[RATELIMIT], "\"calls-per-2s\";r=10;t=0");
    }
}
