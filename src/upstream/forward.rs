//! One exchange with the upstream: rewrite the request, send it, time it,
//! and hand back a streaming response.
//!
//! Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1, including
//! those named by `Connection`); `Host` becomes the upstream's. Bodies are
//! streamed, never buffered, and compressed bodies pass untouched.

use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::client::HttpClient;
use super::deadline::DeadlineBody;
use super::route::Upstream;
use crate::policy::Timeouts;

/// Why an exchange produced no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("request body over the limit")]
    BodyTooLarge,
    #[error("{0}")]
    Protocol(String),
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Send `req` to `upstream` and return its response with a streaming body
/// bounded by the total timeout.
pub async fn send(
    client: &HttpClient,
    upstream: &Upstream,
    req: Request<Body>,
    timeouts: &Timeouts,
    max_body_bytes: u64,
) -> Result<Response<Body>, UpstreamError> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = upstream.uri_for(path_and_query).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let limit = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
    let req = Request::from_parts(parts, Body::new(Limited::new(body, limit)));

    let header_deadline = timeouts.header.min(timeouts.total);
    let response = match tokio::time::timeout(header_deadline, client.request(req)).await {
        Err(_) => return Err(UpstreamError::Timeout(header_deadline)),
        Ok(Err(e)) => return Err(classify(&e)),
        Ok(Ok(r)) => r,
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = DeadlineBody::new(body, start + timeouts.total);
    Ok(Response::from_parts(parts, Body::new(body.map_err(axum::Error::new))))
}

fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut detail = Vec::new();
    while let Some(err) = source {
        if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            return UpstreamError::BodyTooLarge;
        }
        detail.push(err.to_string());
        source = err.source();
    }
    detail.dedup();
    let detail = detail.join(": ");
    if e.is_connect() {
        UpstreamError::Connect(detail)
    } else {
        UpstreamError::Protocol(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("content-encoding", "gzip"),
            ("authorization", "Bearer x"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-encoding", "authorization"]);
    }
}
