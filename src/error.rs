//! The one place where a failure becomes a status and a body.
//!
//! Every local answer uses the error shape the client already parses:
//! Defender's `{"error":{"code","message","target"}}` or Graph's envelope
//! with `innerError`. A local 429 carries `Retry-After` in whole seconds,
//! rounded up, and ends its message with "You can send requests again in N
//! seconds." with the same N, which is what the PowerShell modules, the
//! Splunk add-on and the Graph SDKs read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::admission::rejection::whole_seconds as secs;
use crate::admission::runtime::RuntimeRejection;
use crate::admission::{Reason, Rejection};
use crate::identity::client::{ClientError, GuardSpec};
use crate::identity::TokenError;
use crate::upstream::route::ApiKind;

/// Marks a response the gateway made itself, and says whose throttle a 429 is.
pub const THROTTLED_BY: &str = "x-quotagate-throttled-by";

/// What went wrong, with what the response needs.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Unauthorized(#[from] TokenError),
    #[error("{0}")]
    UnknownClient(#[from] ClientError),
    #[error("{}", guard_message(.client, .guard, *.retry_after))]
    Guarded { client: String, guard: GuardSpec, retry_after: Duration },
    #[error("{}", throttle_message(.policy, .rejection))]
    Throttled { policy: String, tenant: String, rejection: Rejection },
    #[error("{}", upstream_throttle_message(.message, *.retry_after))]
    UpstreamThrottled { tenant: String, retry_after: Duration, message: String },
    #[error("{}", running_time_message(.rejection))]
    RunningTime { tenant: String, rejection: RuntimeRejection },
    #[error("the request body could not be read: {detail}")]
    BadBody { detail: String },
    #[error("invalid hunting request: {detail}")]
    BadHuntingQuery { detail: String },
    #[error("the query reaches back {} days ({found}), but advanced hunting holds only the past {} days of data, so the service would silently return less; shorten the lookback (this gateway refuses such queries: hunting.lookback = \"reject\")", days(*.reach), days(*.limit))]
    LookbackTooLong { found: String, reach: Duration, limit: Duration },
    #[error("the request body is larger than the gateway's limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("no configured upstream serves `{path}`; Defender paths start with /api/, Graph paths with /v1.0/ or /beta/")]
    NoRoute { path: String },
    #[error("the gateway could not reach upstream `{upstream}`: {detail}")]
    UpstreamUnreachable { upstream: String, detail: String },
    #[error("upstream `{upstream}` did not answer within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { upstream: String, after: Duration },
    #[error("upstream `{upstream}` failed: {detail}")]
    UpstreamFailed { upstream: String, detail: String },
    #[error("this forward proxy reaches only its configured upstream hosts (and the blind tunnels it allows), not `{target}`")]
    ProxyRefused { target: String },
    #[error("not a forward-proxy request: {detail}")]
    BadProxyRequest { detail: String },
    #[error("the blind tunnel to `{target}` could not be opened: {detail}")]
    TunnelUnreachable { target: String, detail: String },
    #[error("CONNECT to `{target}`: this forward proxy serves only this gateway's clients: send your API key in Proxy-Authorization (HTTPS_PROXY=http://name:<key>@host:port)")]
    ProxyUnauthorized { target: String },
    /// The detail is logged, never sent.
    #[error("internal error; the gateway's log has the details")]
    Internal { detail: String },
    /// The quota store could not record the admission (or, for Redis, could
    /// not be reached and the config fails closed): nothing was forwarded.
    #[error("the gateway's quota store is unavailable, so the call was not forwarded ({detail}). You can send requests again in {} seconds.", secs(*.retry_after))]
    StoreUnavailable { detail: String, retry_after: Duration },
}

/// The upstream's own message (or a generic one), ending with the wait the
/// gateway stands behind, so message parsers and `Retry-After` agree.
fn upstream_throttle_message(message: &str, retry_after: Duration) -> String {
    let message = message.trim().trim_end_matches('.');
    let message = if message.is_empty() { "The upstream throttled this call" } else { message };
    format!("{message}. You can send requests again in {} seconds.", secs(retry_after))
}

fn days(d: Duration) -> u64 {
    d.as_secs().div_ceil(86_400)
}

fn running_time_message(r: &RuntimeRejection) -> String {
    let n = secs(r.retry_after);
    let why = match (r.reason, r.budget, r.held) {
        (Reason::Draining, _, _) => {
            "The gateway is shutting down and this query cannot start before it stops.".to_string()
        }
        (Reason::QueueFull, _, _) => "The gateway's queue for this tenant's hunting running time is full.".to_string(),
        (_, _, true) => "You have exceeded processing resources allocated to this tenant (the upstream said so).".into(),
        (_, Some(b), _) => format!(
            "You have exceeded processing resources allocated to this tenant: at most {} seconds of query running time per {} (enforced by quotagate).",
            b.limit.as_secs_f64(),
            timespan(b.per)
        ),
        (_, None, _) => "Too many hunting queries of this tenant are running at once (enforced by quotagate).".into(),
    };
    format!("{why} You can send requests again in {n} seconds.")
}

fn guard_message(client: &str, guard: &GuardSpec, retry_after: Duration) -> String {
    format!(
        "Client '{client}' sent more requests than its runaway-loop guard allows ({} per second, bursts of {}); \
         the gateway turned this one away before it reached any quota. You can send requests again in {} seconds.",
        guard.per_second,
        guard.burst,
        secs(retry_after)
    )
}

fn throttle_message(policy: &str, r: &Rejection) -> String {
    let n = secs(r.retry_after);
    let why = match (r.reason, r.window) {
        (Reason::QueueFull, _) => format!("The gateway's queue for policy '{policy}' is full."),
        (Reason::Draining, _) => format!(
            "The gateway is shutting down and cannot admit this call of policy '{policy}' before it stops."
        ),
        (_, Some(w)) if r.capped => format!(
            "This client's share is used up: at most {} per {} of policy '{policy}' go to it (its cap in quotagate).",
            w.limit,
            timespan(w.per)
        ),
        (_, Some(w)) => format!(
            "API calls quota exceeded! Maximum allowed {} per {} for policy '{policy}' of this tenant and app (enforced by quotagate).",
            w.limit,
            timespan(w.per)
        ),
        (_, None) => format!("The upstream asked to pause calls of policy '{policy}' for this tenant and app."),
    };
    format!("{why} You can send requests again in {n} seconds.")
}

/// A .NET TimeSpan as the service prints windows: `00:01:00`, `1.00:00:00`.
fn timespan(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}.{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

impl GatewayError {
    /// A queued or new call turned away because the gateway is stopping.
    fn draining(&self) -> bool {
        match self {
            GatewayError::Throttled { rejection, .. } => rejection.reason == Reason::Draining,
            GatewayError::RunningTime { rejection, .. } => rejection.reason == Reason::Draining,
            _ => false,
        }
    }

    fn status(&self) -> StatusCode {
        if self.draining() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        match self {
            GatewayError::Unauthorized(_) | GatewayError::UnknownClient(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Throttled { .. }
            | GatewayError::UpstreamThrottled { .. }
            | GatewayError::RunningTime { .. }
            | GatewayError::Guarded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BadBody { .. }
            | GatewayError::BadHuntingQuery { .. }
            | GatewayError::LookbackTooLong { .. } => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NoRoute { .. } => StatusCode::NOT_FOUND,
            GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ProxyRefused { .. } => StatusCode::FORBIDDEN,
            GatewayError::BadProxyRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::TunnelUnreachable { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::ProxyUnauthorized { .. } => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            GatewayError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        if self.draining() {
            return "ServiceUnavailable";
        }
        match self {
            GatewayError::Unauthorized(_) | GatewayError::UnknownClient(_) => "Unauthorized",
            GatewayError::Throttled { .. }
            | GatewayError::UpstreamThrottled { .. }
            | GatewayError::RunningTime { .. }
            | GatewayError::Guarded { .. } => "TooManyRequests",
            GatewayError::BadBody { .. }
            | GatewayError::BadHuntingQuery { .. }
            | GatewayError::LookbackTooLong { .. } => "BadRequest",
            GatewayError::PayloadTooLarge { .. } => "RequestEntityTooLarge",
            GatewayError::NoRoute { .. } => "NotFound",
            GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamFailed { .. } => "BadGateway",
            GatewayError::UpstreamTimeout { .. } => "GatewayTimeout",
            GatewayError::ProxyRefused { .. } => "Forbidden",
            GatewayError::BadProxyRequest { .. } => "BadRequest",
            GatewayError::TunnelUnreachable { .. } => "BadGateway",
            GatewayError::ProxyUnauthorized { .. } => "ProxyAuthenticationRequired",
            GatewayError::Internal { .. } => "InternalServerError",
            GatewayError::StoreUnavailable { .. } => "ServiceUnavailable",
        }
    }

    /// The response in the shape clients of `kind` expect.
    pub fn into_response_for(self, kind: ApiKind) -> Response {
        let status = self.status();
        if let GatewayError::Internal { detail } = &self {
            tracing::error!(%detail, "internal error");
        }
        let id = request_id();
        let message = self.to_string();
        let body = match kind {
            ApiKind::Defender => {
                let target = match &self {
                    GatewayError::Throttled { tenant, .. }
                    | GatewayError::UpstreamThrottled { tenant, .. }
                    | GatewayError::RunningTime { tenant, .. } => tenant.clone(),
                    _ => id,
                };
                json!({"error": {"code": self.code(), "message": message, "target": target}})
            }
            ApiKind::Graph => {
                let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                json!({"error": {"code": self.code(), "message": message, "innerError": {
                    "code": status.as_str(), "date": date.trim_end_matches('Z'), "message": message,
                    "request-id": id, "status": status.as_str()}}})
            }
        };
        let mut response = (status, axum::Json(body)).into_response();
        let throttle = match &self {
            GatewayError::Throttled { rejection, .. } => Some((rejection.retry_after, "gateway")),
            GatewayError::UpstreamThrottled { retry_after, .. } => Some((*retry_after, "upstream")),
            GatewayError::RunningTime { rejection, .. } => Some((rejection.retry_after, "gateway")),
            GatewayError::Guarded { retry_after, .. } => Some((*retry_after, "guard")),
            GatewayError::StoreUnavailable { retry_after, .. } => Some((*retry_after, "gateway")),
            _ => None,
        };
        if let GatewayError::ProxyUnauthorized { .. } = &self {
            let challenge = HeaderValue::from_static("Basic realm=\"quotagate\"");
            response.headers_mut().insert(http::header::PROXY_AUTHENTICATE, challenge);
        }
        if let Some((retry_after, by)) = throttle {
            let headers = response.headers_mut();
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs(retry_after)));
            headers.insert(THROTTLED_BY, HeaderValue::from_static(by));
        }
        response
    }
}

/// A request id shaped like the service's GUIDs, unique within the process.
fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut h = SEED.get_or_init(Default::default).build_hasher();
    h.write_u64(n);
    let a = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        n >> 48 & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::quota::Window;

    #[test]
    fn timespans_like_the_service() {
        assert_eq!(timespan(Duration::from_secs(60)), "00:01:00");
        assert_eq!(timespan(Duration::from_secs(3600)), "01:00:00");
        assert_eq!(timespan(Duration::from_secs(86_400)), "1.00:00:00");
    }

    #[test]
    fn the_last_number_of_a_throttle_message_is_the_retry_after() {
        let r = Rejection {
            reason: Reason::NoSlot,
            retry_after: Duration::from_millis(7200),
            window: Some(Window::new(NonZeroU32::new(45).unwrap(), Duration::from_secs(60))),
            capped: false,
            usage: vec![],
        };
        let m = throttle_message("hunting", &r);
        assert!(m.contains("Maximum allowed 45 per 00:01:00"), "{m}");
        assert!(m.ends_with("You can send requests again in 8 seconds."), "{m}");
        let m = throttle_message("hunting", &Rejection { capped: true, ..r });
        assert!(m.starts_with("This client's share is used up: at most 45 per 00:01:00"), "{m}");
        assert!(m.ends_with("You can send requests again in 8 seconds."), "{m}");
    }
}
