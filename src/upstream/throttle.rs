//! Read an upstream throttle: how long to wait, what kind of limit, and
//! what the message reveals about the upstream's own limit.
//!
//! One pure parser for every signal the service sends (see the upstream
//! notes in the README): `Retry-After` as integer seconds, fractional
//! seconds (Graph sends `2.128`) or an HTTP date; Defender bodies with
//! "You can send requests again in N seconds." and "maximum allowed N per
//! hh:mm:ss"; the running-time message "You can run queries again in
//! <duration>"; the Graph envelope. It only parses: deciding what to do with
//! the answer (hold a key, retry) is the caller's business. It never panics,
//! whatever the input.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

/// The longest window the service has (running time per day).
const LONGEST_WINDOW: Duration = Duration::from_secs(86_400);

/// The longest wait a throttle is read as: a day. A longer `Retry-After` or
/// message (a bogus number, a date far ahead, a skewed clock) is read as a
/// day, so that one answer cannot hold a key, in memory and in the state
/// file, for years.
pub const MAX_RETRY_AFTER: Duration = LONGEST_WINDOW;

/// What kind of limit the upstream says was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Calls per window: holds the (policy, tenant, app) call key.
    CallRate,
    /// Hunting running time: holds the tenant's running-time key.
    RunningTime,
    /// Too many at once (live response sessions): affects only this request.
    Concurrency,
}

/// A parsed throttle.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    pub kind: Kind,
    /// The time the server gave, from the header or the body (the longer
    /// of the two when both are present). `None`: the server gave no usable
    /// time, so the caller falls back to [`backoff`].
    pub retry_after: Option<Duration>,
    /// "maximum allowed N per hh:mm:ss": the upstream's own limit and window.
    pub revealed: Option<(u32, Duration)>,
    /// The upstream's `error.message`, when the body had one.
    pub message: Option<String>,
}

/// Parse a response as a throttle. `None` when it is not one: a throttle is
/// a 429, or a Graph 503/504 that carries `Retry-After` (which the Graph
/// SDKs retry the same way).
pub fn parse(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Option<Throttle> {
    let header = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after_header(v, now));
    let is_throttle =
        status == StatusCode::TOO_MANY_REQUESTS || (matches!(status.as_u16(), 503 | 504) && header.is_some());
    if !is_throttle {
        return None;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]);
    let json_message = message_of(&text);
    let message = json_message.as_deref().unwrap_or(&text);
    let lower = message.to_ascii_lowercase();
    let kind = if lower.contains("run queries again") || lower.contains("processing resources") {
        Kind::RunningTime
    } else if lower.contains("concurren") {
        Kind::Concurrency
    } else {
        Kind::CallRate
    };
    let from_body = after_phrase(&lower, "send requests again in ")
        .and_then(number_then_unit)
        .or_else(|| after_phrase(&lower, "run queries again in ").and_then(duration_text));
    let retry_after = match (header, from_body) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
    .map(|wait| wait.min(MAX_RETRY_AFTER));
    let revealed = after_phrase(&lower, "maximum allowed ").and_then(|rest| {
        let (n, rest) = rest.split_once(" per ")?;
        let n: u32 = n.trim().parse().ok()?;
        let window = timespan(rest.split(|c: char| c.is_whitespace() || c == ',').next()?)?;
        // A window the service does not have is not a limit to apply.
        (n > 0 && !window.is_zero() && window <= LONGEST_WINDOW).then_some((n, window))
    });
    Some(Throttle { kind, retry_after, revealed, message: json_message })
}

/// `Retry-After`: integer or fractional seconds, or an HTTP date; at most
/// [`MAX_RETRY_AFTER`].
pub fn retry_after_header(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

/// Capped exponential back-off with jitter, for a throttle without a time:
/// `base · 2^attempt`, capped, then scaled by a factor in [0.5, 1.0] taken
/// from `jitter` (any value; only its low bits are used).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: u64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(cap);
    let factor = 0.5 + (jitter % 1000) as f64 / 2000.0;
    exp.mul_f64(factor)
}

/// `error.message` of a Defender or Graph error body.
fn message_of(text: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_string))
}

fn after_phrase<'a>(text: &'a str, phrase: &str) -> Option<&'a str> {
    text.find(phrase).map(|i| &text[i + phrase.len()..])
}

/// "8 seconds", "2.5 minutes", "1 hour": a number and an optional unit (seconds by default).
fn number_then_unit(text: &str) -> Option<Duration> {
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let n: f64 = text[..end].parse().ok()?;
    let unit = text[end..].trim_start();
    let scale = if unit.starts_with("min") {
        60.0
    } else if unit.starts_with("hour") || unit.starts_with('h') && !unit.starts_with("ho") {
        3600.0
    } else if unit.starts_with("ms") || unit.starts_with("milli") {
        0.001
    } else {
        1.0
    };
    let secs = n * scale;
    secs.is_finite().then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// A TimeSpan ("00:12:30", "1.00:00:00") or a number with a unit.
fn duration_text(text: &str) -> Option<Duration> {
    let token = text.split(|c: char| c.is_whitespace() || c == ',').next()?.trim_end_matches('.');
    timespan(token).or_else(|| number_then_unit(text))
}

/// A .NET TimeSpan: `[d.]hh:mm:ss[.fffffff]`.
fn timespan(text: &str) -> Option<Duration> {
    let text = text.trim().trim_end_matches('.');
    let mut parts = text.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (days, hours) = match h.split_once('.') {
        Some((d, h)) => (d.parse::<u64>().ok()?, h.parse::<u64>().ok()?),
        None => (0, h.parse::<u64>().ok()?),
    };
    let minutes: u64 = m.parse().ok()?;
    let seconds: f64 = s.parse().ok()?;
    if hours > 23 || minutes > 59 || !(0.0..60.0).contains(&seconds) {
        return None;
    }
    let whole = days.checked_mul(86_400)?.checked_add(hours * 3600 + minutes * 60)?;
    Some(Duration::from_secs(whole) + Duration::try_from_secs_f64(seconds).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = retry_after {
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        }
        h
    }

    fn t429(retry_after: Option<&str>, body: &str) -> Throttle {
        parse(StatusCode::TOO_MANY_REQUESTS, &headers(retry_after), body.as_bytes(), SystemTime::UNIX_EPOCH)
            .expect("a 429 is a throttle")
    }

    #[test]
    fn retry_after_header_forms() {
        let now = httpdate::parse_http_date("Fri, 27 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(retry_after_header("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after_header(" 2.128 ", now), Some(Duration::from_millis(2128)));
        assert_eq!(retry_after_header("Fri, 27 Nov 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after_header("Fri, 27 Nov 2026 09:59:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after_header("-1", now), None);
        assert_eq!(retry_after_header("soon", now), None);
        assert_eq!(retry_after_header("NaN", now), None);
    }

    /// Regression (found by the `throttle` fuzz target): `Retry-After: 6e6`,
    /// or a date years ahead, was read as that long, and held the key (and
    /// the state file's record of it) for months or years.
    #[test]
    fn waits_and_windows_past_a_day_are_not_believed() {
        let now = httpdate::parse_http_date("Fri, 27 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(retry_after_header("6e6", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after_header("1e300", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after_header("Sat, 27 Nov 2077 10:00:00 GMT", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after_header("86400", now), Some(Duration::from_secs(86_400)));
        let t = t429(None, r#"{"error":{"message":"You can send requests again in 99999999 hours."}}"#);
        assert_eq!(t.retry_after, Some(MAX_RETRY_AFTER));
        let t = t429(None, "You can run queries again in 9999.00:00:00.");
        assert_eq!(t.retry_after, Some(MAX_RETRY_AFTER));
        let t = t429(None, "You can send requests again in 100000000000000000000000000000 seconds.");
        assert_eq!(t.retry_after, Some(MAX_RETRY_AFTER));
        assert_eq!(t429(None, "Maximum allowed 1 per 2.00:00:00").revealed, None);
        assert_eq!(t429(None, "Maximum allowed 1 per 1.00:00:00").revealed, Some((1, LONGEST_WINDOW)));
    }

    #[test]
    fn defender_call_rate_bodies() {
        let t = t429(
            None,
            r#"{"error":{"code":"429","message":"API calls quota exceeded! Maximum allowed 30 per 00:01:00 for the key Destination+TenantID+AppID. You can send requests again in 8 seconds.","target":"TENANT_ID"}}"#,
        );
        assert_eq!(t.kind, Kind::CallRate);
        assert_eq!(t.retry_after, Some(Duration::from_secs(8)));
        assert_eq!(t.revealed, Some((30, Duration::from_secs(60))));

        let t = t429(
            None,
            r#"{"error":{"code":"429","message":"API calls quota exceeded! maximum allowed 45 per 00:01:00","target":"x"}}"#,
        );
        assert_eq!((t.retry_after, t.revealed), (None, Some((45, Duration::from_secs(60)))));
    }

    #[test]
    fn header_and_body_together_take_the_longer() {
        let t = t429(
            Some("3"),
            r#"{"error":{"code":"429","message":"You can send requests again in 8 seconds."}}"#,
        );
        assert_eq!(t.retry_after, Some(Duration::from_secs(8)));
        let t = t429(
            Some("12"),
            r#"{"error":{"code":"429","message":"You can send requests again in 8 seconds."}}"#,
        );
        assert_eq!(t.retry_after, Some(Duration::from_secs(12)));
    }

    #[test]
    fn running_time_messages() {
        let msg = |m: &str| format!(r#"{{"error":{{"code":"429","message":"{m}"}}}}"#);
        let t = t429(None, &msg("You have exceeded processing resources allocated to this tenant. You can run queries again in 00:12:30."));
        assert_eq!((t.kind, t.retry_after), (Kind::RunningTime, Some(Duration::from_secs(750))));
        let t = t429(None, &msg("You have exceeded processing resources allocated to this tenant. You can run queries again in 15 minutes."));
        assert_eq!((t.kind, t.retry_after), (Kind::RunningTime, Some(Duration::from_secs(900))));
        let t = t429(None, &msg("You have exceeded processing resources allocated to this tenant."));
        assert_eq!((t.kind, t.retry_after), (Kind::RunningTime, None));
    }

    #[test]
    fn graph_envelope_with_a_fractional_header() {
        let body = r#"{"error":{"code":"TooManyRequests","innerError":{"code":"429","date":"2020-08-18T12:51:51","message":"Please retry after","request-id":"94fb3b52-452a-4535-a601-69e0a90e3aa2","status":"429"},"message":"Please retry again later."}}"#;
        let t = t429(Some("2.128"), body);
        assert_eq!(
            t,
            Throttle {
                kind: Kind::CallRate,
                retry_after: Some(Duration::from_millis(2128)),
                revealed: None,
                message: Some("Please retry again later.".into()),
            }
        );
    }

    #[test]
    fn graph_503_and_504_with_retry_after_are_throttles_and_without_are_not() {
        let now = SystemTime::UNIX_EPOCH;
        for status in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT] {
            let t = parse(status, &headers(Some("5")), b"{}", now).unwrap();
            assert_eq!(t.retry_after, Some(Duration::from_secs(5)));
            assert!(parse(status, &headers(None), b"{}", now).is_none());
        }
        assert!(parse(StatusCode::OK, &headers(Some("5")), b"{}", now).is_none());
    }

    #[test]
    fn concurrency_and_no_usable_time() {
        let t = t429(
            None,
            r#"{"error":{"code":"TooManyRequests","message":"Maximum concurrent live response sessions reached"}}"#,
        );
        assert_eq!((t.kind, t.retry_after), (Kind::Concurrency, None));
        let t = t429(None, "not json at all");
        assert_eq!((t.kind, t.retry_after, t.revealed), (Kind::CallRate, None, None));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(0, base, cap, 999), Duration::from_secs_f64(0.9995));
        assert_eq!(backoff(3, base, cap, 0), Duration::from_secs(4));
        assert_eq!(backoff(40, base, cap, 0), Duration::from_secs(30));
        for j in 0..2000 {
            let d = backoff(2, base, cap, j);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4));
        }
    }

    #[test]
    fn timespans() {
        assert_eq!(timespan("00:01:00"), Some(Duration::from_secs(60)));
        assert_eq!(timespan("01:00:00"), Some(Duration::from_secs(3600)));
        assert_eq!(timespan("1.00:00:00"), Some(Duration::from_secs(86_400)));
        assert_eq!(timespan("00:00:01.5"), Some(Duration::from_millis(1500)));
        assert_eq!(timespan("24:00:00"), None);
        assert_eq!(timespan("00:61:00"), None);
        assert_eq!(timespan("99999999999999999999.00:00:00"), None);
    }

    proptest! {
        #[test]
        fn no_input_makes_it_panic(
            status in 100u16..600,
            header in "\\PC{0,40}",
            body in prop::collection::vec(any::<u8>(), 0..400),
            text in "\\PC{0,200}",
            secs in any::<u64>(),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let mut h = HeaderMap::new();
            if let Ok(v) = header.parse() {
                h.insert(http::header::RETRY_AFTER, v);
            }
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs % (1 << 40));
            let _ = parse(status, &h, &body, now);
            let _ = parse(status, &h, text.as_bytes(), now);
            for phrase in ["You can send requests again in ", "You can run queries again in ", "maximum allowed "] {
                let _ = parse(StatusCode::TOO_MANY_REQUESTS, &h, format!("{phrase}{text}").as_bytes(), now);
            }
            let _ = backoff((secs % 64) as u32, Duration::from_secs(secs % 100), Duration::from_secs(60), secs);
        }
    }
}
