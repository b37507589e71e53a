//! The admin listener's guard against DNS rebinding.
//!
//! A web page the operator opens can make its own host name resolve to
//! 127.0.0.1 and then read the admin listener from the browser: `/quota`
//! names every tenant and its usage. Such a request still carries the
//! page's host name in `Host`. So while the admin listener is on a loopback
//! address, it answers only requests addressed to an IP address or to
//! `localhost` (and its subdomains, which resolve to loopback by RFC 6761),
//! and refuses the rest with 403. Scripts, probes and Prometheus address it
//! by IP or `localhost` and are unaffected. On any other address the
//! operator chose to expose it, and names such as a Kubernetes service's
//! are expected, so nothing is refused.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_TYPE, HOST};
use http::StatusCode;

/// Whether a loopback admin listener answers a request addressed to
/// `authority` (`Host`, or HTTP/2's `:authority`; `None` when it has
/// neither, which only a non-browser HTTP/1.0 client sends).
pub fn addressed_locally(authority: Option<&str>) -> bool {
    let Some(authority) = authority else { return true };
    let Ok(parsed) = authority.parse::<http::uri::Authority>() else { return false };
    if parsed.as_str().contains('@') {
        return false;
    }
    let host = parsed.host();
    if host.starts_with('[') {
        return host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Middleware: refuse a request whose `Host` is a name other than
/// `localhost`, with a message that says why and what to use instead.
pub async fn guard(request: Request, next: Next) -> Response {
    let authority = match request.headers().get(HOST) {
        Some(value) => Some(value.to_str().unwrap_or("\u{fffd}").to_string()),
        None => request.uri().authority().map(|a| a.to_string()),
    };
    if addressed_locally(authority.as_deref()) {
        return next.run(request).await;
    }
    let shown: String = authority.unwrap_or_default().chars().take(100).collect();
    let message = format!(
        "quotagate admin: refused a request addressed to `{}`. The admin listener is on a loopback \
         address, so it answers only requests addressed to an IP address or to localhost (a guard \
         against DNS rebinding); use http://127.0.0.1:PORT or http://localhost:PORT.\n",
        shown.escape_debug()
    );
    (StatusCode::FORBIDDEN, [(CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

#[cfg(test)]
mod tests {
    use super::addressed_locally;

    #[test]
    fn ip_addresses_and_localhost_are_local_and_other_names_are_not() {
        for local in [
            "127.0.0.1:7481",
            "127.0.0.1",
            "10.1.2.3:7481",
            "[::1]:7481",
            "[::1]",
            "localhost",
            "LocalHost:7481",
            "localhost.:7481",
            "status.localhost:7481",
        ] {
            assert!(addressed_locally(Some(local)), "{local}");
        }
        assert!(addressed_locally(None), "no Host at all is no browser");
        for foreign in [
            "rebind.example:7481",
            "rebind.example",
            "localhost.example:7481",
            "notlocalhost:7481",
            "127.0.0.1.nip.io:7481",
            "user@127.0.0.1:7481",
            "[::1",
            "",
            "a b",
        ] {
            assert!(!addressed_locally(Some(foreign)), "{foreign}");
        }
    }
}
