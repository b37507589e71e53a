//! `quotagate healthcheck`: one blocking GET of the admin listener's `/healthz`.
//!
//! Container images without a shell or curl (distroless) run this as their
//! HEALTHCHECK. It speaks just enough HTTP/1.1 over a plain TCP socket to read
//! a status line: no TLS, no redirects, no body. It does not start the
//! gateway's runtime and never touches proxy traffic.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use http::Uri;

/// Why a health probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("`{0}` is not an http:// URL with a host")]
    Url(String),
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{addr} answered no HTTP status line")]
    Garbled { addr: String },
    #[error("{addr} answered {status}")]
    Unhealthy { addr: String, status: u16 },
}

/// GET `url` and succeed on a 2xx status, all within `timeout` per step.
pub fn probe(url: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let uri: Uri = url.parse().map_err(|_| ProbeError::Url(url.into()))?;
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(ProbeError::Url(url.into()));
    };
    let addr = authority.to_string();
    let host_port = if authority.port().is_some() { addr.clone() } else { format!("{addr}:80") };
    let connect = |source| ProbeError::Connect { addr: addr.clone(), source };
    let target = host_port
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::Error::other("the host has no address")))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: quotagate-healthcheck\r\nConnection: close\r\n\r\n")
        .map_err(connect)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(connect)?;
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Garbled { addr: addr.clone() })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(ProbeError::Unhealthy { addr, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_probed() {
        for url in ["https://127.0.0.1:1/healthz", "127.0.0.1:7481", "/healthz", "http:///x"] {
            assert!(matches!(probe(url, Duration::from_millis(100)), Err(ProbeError::Url(_))), "{url}");
        }
    }
}
