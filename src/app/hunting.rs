//! A hunting request is read before it may spend any quota: a body the
//! service would refuse gets a local 400, and a query reaching further back
//! than the service keeps data is flagged or refused (`hunting.lookback`).
//!
//! Hunting bodies are a KQL query of a few kilobytes, so the body is read
//! whole (up to `max_body_bytes`) and kept for a replay; it is then in
//! memory while the request waits in a queue.

use std::time::SystemTime;

use axum::body::Body;
use axum::extract::Request;
use http::HeaderValue;
use http_body_util::{BodyExt, Limited};

use crate::config::Config;
use crate::error::GatewayError;
use crate::hunting::lookback::{self, Lookback};
use crate::hunting::request::{self, HuntingRequest};
use crate::hunting::LookbackMode;

/// Response header on a hunting response whose query reaches past the
/// lookback limit (`hunting.lookback = "warn"`).
pub const LOOKBACK_WARNING: http::HeaderName = http::HeaderName::from_static("x-quotagate-lookback-warning");

/// A hunting request read and checked.
pub(super) struct Inspected {
    /// The request, its body whole.
    pub req: Request,
    /// The lookback to warn about, if any.
    pub lookback: Option<Lookback>,
    /// Its query and `Timespan`: what makes its cost, for an estimate
    /// learnt from the same query's earlier costs.
    pub asked: HuntingRequest,
}

/// Read a hunting request's body and check it.
pub(super) async fn inspect(req: Request, config: &Config) -> Result<Inspected, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let limit = usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::PayloadTooLarge { limit: config.max_body_bytes })
        }
        Err(e) => return Err(GatewayError::BadBody { detail: e.to_string() }),
    };
    let asked = request::parse(&bytes).map_err(|detail| GatewayError::BadHuntingQuery { detail })?;
    let h = &config.hunting;
    let beyond = match h.lookback {
        LookbackMode::Off => None,
        _ => lookback::beyond(&asked.query, asked.timespan.as_deref(), h.lookback_limit, SystemTime::now()),
    };
    if let (Some(lb), LookbackMode::Reject) = (&beyond, h.lookback) {
        return Err(GatewayError::LookbackTooLong {
            found: lb.found.clone(),
            reach: lb.reach,
            limit: h.lookback_limit,
        });
    }
    // The body is whole now: announce its length, so it can be replayed.
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Inspected { req: Request::from_parts(parts, Body::from(bytes)), lookback: beyond, asked })
}

/// The warning header's value for a lookback.
pub(super) fn warning(lb: &Lookback, config: &Config) -> HeaderValue {
    let days = |d: std::time::Duration| d.as_secs().div_ceil(86_400);
    let text = format!(
        "the query reaches back {} days ({}); the service keeps {} days, so it returns less",
        days(lb.reach),
        lb.found,
        days(config.hunting.lookback_limit)
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| {
        HeaderValue::from_str(&format!(
            "the query reaches back {} days; the service keeps {} days, so it returns less",
            days(lb.reach),
            days(config.hunting.lookback_limit)
        ))
        .expect("ASCII text")
    })
}
