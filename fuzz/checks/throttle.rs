//! The upstream throttle parser: `throttle::parse` and `retry_after_header`.
//!
//! Input: a status selector byte, four bytes of clock, a `Retry-After` value
//! up to a NUL, then the body.
//!
//! Properties:
//! - it is a throttle exactly when the status is 429, or 503/504 with a usable
//!   `Retry-After`;
//! - the wait it reads is at most `MAX_RETRY_AFTER` (a day, the longest
//!   window the service has), and at least the header's when there is one;
//! - a revealed limit is positive, over a window longer than zero and no
//!   longer than a day;
//! - the Defender/Graph JSON envelope does not change what a message says:
//!   the message alone as the body reads the same;
//! - the gateway's own 429 (error.rs) reads back with exactly the
//!   `Retry-After` it carries, in both error shapes.

use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt as _;
use quotagate::admission::rejection::whole_seconds;
use quotagate::error::GatewayError;
use quotagate::upstream::route::ApiKind;
use quotagate::upstream::throttle::{parse, retry_after_header, MAX_RETRY_AFTER as MAX_WAIT};

pub fn check(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let status = match data[0] % 8 {
        0..=3 => StatusCode::TOO_MANY_REQUESTS,
        4 => StatusCode::SERVICE_UNAVAILABLE,
        5 => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::from_u16(100 + u16::from(data[0]) * 2 % 500).expect("100..600 is a status"),
    };
    // Around 2026, give or take 68 years.
    let offset = i64::from(i32::from_le_bytes([data[1], data[2], data[3], data[4]]));
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000u64.saturating_add_signed(offset));
    let (header, body) = super::split_once(&data[5..], 0);

    let mut headers = HeaderMap::new();
    let mut from_header = None;
    if let Ok(value) = HeaderValue::from_bytes(header) {
        from_header = value.to_str().ok().and_then(|v| retry_after_header(v, now));
        headers.insert(http::header::RETRY_AFTER, value);
    }
    let parsed = parse(status, &headers, body, now);
    let is_throttle = status == StatusCode::TOO_MANY_REQUESTS
        || (matches!(status.as_u16(), 503 | 504) && from_header.is_some());
    assert_eq!(parsed.is_some(), is_throttle, "status {status}, Retry-After {from_header:?}");
    if let Some(h) = from_header {
        assert!(h <= MAX_WAIT, "Retry-After {header:?} read as {h:?}");
    }
    let Some(t) = parsed else { return };
    if let Some(wait) = t.retry_after {
        assert!(wait <= MAX_WAIT, "a wait of {wait:?} from {:?}", String::from_utf8_lossy(body));
    }
    if let Some(h) = from_header {
        assert!(
            t.retry_after.is_some_and(|w| w >= h),
            "{:?} is shorter than the header's {h:?}",
            t.retry_after
        );
    }
    if let Some((n, per)) = t.revealed {
        assert!(n > 0 && !per.is_zero() && per <= MAX_WAIT, "revealed {n} per {per:?}");
    }

    envelope_is_transparent(status, &headers, body, now);
    own_429_reads_back(data[0], body, now);
}

/// A message read from a JSON error body, or as the body itself, says the same.
fn envelope_is_transparent(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) {
    let Ok(message) = std::str::from_utf8(body) else { return };
    let wrapped = serde_json::json!({"error": {"code": "TooManyRequests", "message": message}}).to_string();
    let is_envelope = serde_json::from_str::<serde_json::Value>(message)
        .is_ok_and(|v| v.get("error").and_then(|e| e.get("message")).is_some_and(|m| m.is_string()));
    if wrapped.len() > 64 * 1024 || is_envelope {
        return;
    }
    let bare = parse(status, headers, body, now).expect("a throttle");
    let enveloped = parse(status, headers, wrapped.as_bytes(), now).expect("a throttle");
    assert_eq!(enveloped.message.as_deref(), Some(message));
    assert_eq!(
        (bare.kind, bare.retry_after, bare.revealed),
        (enveloped.kind, enveloped.retry_after, enveloped.revealed),
        "the envelope changed the reading of {message:?}"
    );
}

/// The gateway's 429 for an upstream throttle, passed through the parser.
fn own_429_reads_back(selector: u8, body: &[u8], now: SystemTime) {
    let message = String::from_utf8_lossy(body);
    // An upstream message that already names a wait comes first in the text.
    if message.to_ascii_lowercase().contains("send requests again in") || body.len() > 4 * 1024 {
        return;
    }
    let ms = body.iter().fold(0u64, |acc, &b| acc.wrapping_mul(31).wrapping_add(u64::from(b)));
    let retry_after = Duration::from_millis(ms % (MAX_WAIT.as_millis() as u64));
    let kind = if selector & 0x80 == 0 { ApiKind::Defender } else { ApiKind::Graph };
    let error =
        GatewayError::UpstreamThrottled { tenant: "t".into(), retry_after, message: message.into_owned() };
    let response = error.into_response_for(kind);
    let (head, body) = response.into_parts();
    let bytes = body.collect().now_or_never().expect("a full body").expect("a body").to_bytes();
    let n = whole_seconds(retry_after);
    assert_eq!(
        head.headers.get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()),
        Some(n.to_string()).as_deref()
    );
    let t = parse(head.status, &head.headers, &bytes, now).expect("the gateway's 429 is a throttle");
    assert_eq!(t.retry_after, Some(Duration::from_secs(n)), "{}", String::from_utf8_lossy(&bytes));
}
