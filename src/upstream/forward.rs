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
    /// The client's own request body failed as it was streamed upstream
    /// (broken chunk framing, or the client left mid-upload).
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
}

/// The request header with which a caller shortens its own wait.
pub const GATEWAY_ONLY: HeaderName = HeaderName::from_static("x-quotagate-max-wait");

/// How many names [`HOP_BY_HOP`] lists.
const HOP_BY_HOP_LEN: usize = 9;

/// The hop-by-hop headers, each at the slot [`hop_by_hop_slot`] gives it.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The slot of a hop-by-hop header in [`HOP_BY_HOP`]; `None` for the others.
/// A match on the (always lower-case) name: one length switch per header,
/// where comparing against each name in turn cost about a thousand
/// instructions a proxied request.
fn hop_by_hop_slot(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// The prefix of the gateway's own request headers.
pub const GATEWAY_PREFIX: &str = "x-quotagate-";

/// Whether `name` is a hop-by-hop header (never forwarded as it came).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_slot(name).is_some()
}

/// The gateway's own headers (`x-quotagate-*`: the client key's default
/// name, the priority, the wait) are said to the gateway, never to the
/// upstream: every one is removed, so a client still sending a name the
/// running config no longer reads (a key header renamed by a reload, say)
/// does not pass it on. A renamed `api_key_header` outside this prefix is
/// removed where the client is identified (`Roster::strip_key_headers`).
pub fn strip_gateway_headers(headers: &mut HeaderMap) {
    let own: Vec<HeaderName> =
        headers.keys().filter(|k| k.as_str().starts_with(GATEWAY_PREFIX)).cloned().collect();
    for name in own {
        headers.remove(name);
    }
}

/// Remove hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass notes which are present (most messages carry one or none),
    // so nothing is hashed or allocated for the absent ones.
    let mut found = [false; HOP_BY_HOP_LEN];
    let mut any = false;
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_slot(k) {
            found[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    if found[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            // Bytes, not text: a value with a non-ASCII byte still names its headers.
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            // `close` names no header; the others are removed below when present.
            .filter(|n| {
                !["close", "keep-alive", "upgrade"].iter().any(|t| n.eq_ignore_ascii_case(t.as_bytes()))
            })
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.into_iter().zip(found) {
        if present {
            headers.remove(name);
        }
    }
}

/// Send `req` to `upstream` and return its response with a streaming body
/// bounded by the total timeout. The caller has refused bodies whose
/// announced length is over `max_body_bytes`; unannounced ones are cut there.
pub async fn send(
    client: &HttpClient,
    upstream: &Upstream,
    req: Request<Body>,
    timeouts: &Timeouts,
    max_body_bytes: u64,
) -> Result<Response<Body>, UpstreamError> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(upstream.scheme.clone());
    uri.authority = Some(upstream.authority.clone());
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = http::Uri::from_parts(uri).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    strip_gateway_headers(&mut parts.headers);
    let announced = parts.headers.contains_key(header::CONTENT_LENGTH);
    let body = if announced || http_body::Body::is_end_stream(&body) {
        body
    } else {
        Body::new(Limited::new(body, usize::try_from(max_body_bytes).unwrap_or(usize::MAX)))
    };
    let req = Request::from_parts(parts, body);

    // One timer serves both deadlines: first the header timeout, then the total.
    let header_deadline = timeouts.header.min(timeouts.total);
    let mut deadline = Box::pin(tokio::time::sleep_until(start + header_deadline));
    let response = tokio::select! {
        biased;
        result = client.request(req) => result.map_err(|e| classify(&e))?,
        _ = deadline.as_mut() => return Err(UpstreamError::Timeout(header_deadline)),
    };
    deadline.as_mut().reset(start + timeouts.total);
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The gateway's own headers are its statements: an upstream's are dropped.
    strip_gateway_headers(&mut parts.headers);
    let body = DeadlineBody::new(body, deadline);
    Ok(Response::from_parts(parts, Body::new(body.map_err(axum::Error::new))))
}

fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut detail = Vec::new();
    let mut from_client = false;
    while let Some(err) = source {
        if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            return UpstreamError::BodyTooLarge;
        }
        // Only the request body is an axum `Body` here: its errors are the client's.
        from_client |= err.downcast_ref::<axum::Error>().is_some();
        detail.push(err.to_string());
        source = err.source();
    }
    detail.dedup();
    let detail = detail.join(": ");
    if from_client {
        UpstreamError::ClientBody(detail)
    } else if e.is_connect() {
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
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("content-encoding", "gzip"),
            ("authorization", "Bearer x"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        // A second `Connection` line with a byte outside ASCII, as HTTP/1.1 allows.
        h.append(header::CONNECTION, http::HeaderValue::from_bytes(b"x-other, caf\xe9").unwrap());
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["authorization", "content-encoding"]);
    }

    #[test]
    fn the_gateways_own_headers_never_go_upstream() {
        let mut h = HeaderMap::new();
        for name in ["x-quotagate-key", "x-quotagate-max-wait", "x-quotagate-priority", "x-quotagate-old-key"]
        {
            h.append(HeaderName::from_static(name), "k".parse().unwrap());
        }
        h.append(HeaderName::from_static("x-quotagate-key"), "second".parse().unwrap());
        for name in ["authorization", "x-quotagatex", "x-ms-quotagate-key"] {
            h.append(HeaderName::from_static(name), "1".parse().unwrap());
        }
        strip_gateway_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["authorization", "x-ms-quotagate-key", "x-quotagatex"]);
    }

    #[test]
    fn every_hop_by_hop_header_is_removed_and_only_those() {
        let mut h = HeaderMap::new();
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_slot(name), Some(i), "{name}");
            h.append(name.clone(), "x".parse().unwrap());
        }
        for name in ["content-length", "date", "x-connection", "tee", "upgrades"] {
            h.append(HeaderName::from_static(name), "1".parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-length", "date", "tee", "upgrades", "x-connection"]);
    }
}
