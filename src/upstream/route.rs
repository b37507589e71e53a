//! Which upstream a request goes to.
//!
//! In order: the upstream a listener is bound to; the configured upstream
//! whose host the request names (its `Host` header or absolute URI, as with
//! a hosts-file override); the upstream with the longest matching route
//! prefix. A host that is not configured never selects anything, so the
//! gateway cannot be made to forward outside its upstream table.

use http::uri::{Authority, Scheme};
use http::{HeaderMap, Uri};

/// The error shape and conventions clients of an upstream expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// Defender XDR and Defender for Endpoint: `{"error":{"code","message","target"}}`.
    Defender,
    /// Microsoft Graph: `{"error":{"code","message","innerError":{...}}}`.
    Graph,
}

/// A configured upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    pub kind: ApiKind,
    /// Lower-case path prefixes that route base-URL requests here.
    pub route_prefixes: Vec<String>,
    /// Connect here instead of resolving the host (TLS still checks the host name).
    pub connect_to: Option<std::net::SocketAddr>,
    /// `authority`'s host and port (the scheme's default when it names
    /// none), read once here rather than parsed again for every request.
    host: Box<str>,
    port: u16,
}

impl Upstream {
    pub fn new(
        name: String,
        scheme: Scheme,
        authority: Authority,
        kind: ApiKind,
        route_prefixes: Vec<String>,
        connect_to: Option<std::net::SocketAddr>,
    ) -> Self {
        let port = authority.port_u16().unwrap_or(default_port(&scheme));
        let host = authority.host().into();
        Upstream { name, scheme, authority, kind, route_prefixes, connect_to, host, port }
    }

    /// The host, as configured.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, the scheme's default when the URL names none.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether a requested authority (`host[:port]`) names this upstream:
    /// same host, and the same port, a missing port standing for the scheme's default.
    fn is_named_by(&self, named: &str) -> bool {
        let split = match named.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map(|(h, rest)| (&named[..h.len() + 2], rest.strip_prefix(':'))),
            None => Some(named.rsplit_once(':').map_or((named, None), |(h, p)| (h, Some(p)))),
        };
        let Some((host, port)) = split else { return false };
        let Ok(port) = port.map(str::parse::<u16>).transpose() else { return false };
        host.eq_ignore_ascii_case(&self.host) && port.unwrap_or(default_port(&self.scheme)) == self.port
    }
}

fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS {
        443
    } else {
        80
    }
}

/// The first upstream whose host is `host` (any port): how a forward-proxy
/// target (`CONNECT host:443`, `GET http://host/...`) names its upstream.
pub fn by_host(upstreams: &[Upstream], host: &str) -> Option<usize> {
    upstreams.iter().position(|u| u.host.eq_ignore_ascii_case(host))
}

/// The first upstream whose host is `host` and whose port is `port`: its
/// url's, or 443, the port a client's TLS (`CONNECT host:443`) asks for.
/// Two upstreams may share a host on different ports.
pub fn by_host_and_port(upstreams: &[Upstream], host: &str, port: u16) -> Option<usize> {
    upstreams
        .iter()
        .position(|u| u.host.eq_ignore_ascii_case(host) && u.authority.port_u16().unwrap_or(443) == port)
}

/// Pick the upstream for a request; `bound` is the listener's own upstream.
pub fn select(upstreams: &[Upstream], bound: Option<usize>, uri: &Uri, headers: &HeaderMap) -> Option<usize> {
    if bound.is_some() {
        return bound;
    }
    let named = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
    if let Some(named) = named {
        if let Some(i) = upstreams.iter().position(|u| u.is_named_by(named)) {
            return Some(i);
        }
    }
    let path = uri.path();
    upstreams
        .iter()
        .enumerate()
        .flat_map(|(i, u)| u.route_prefixes.iter().map(move |p| (i, p)))
        .filter(|(_, p)| {
            path.len() >= p.len() && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        })
        .max_by_key(|(_, p)| p.len())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, url: &str, prefixes: &[&str]) -> Upstream {
        let uri: Uri = url.parse().unwrap();
        Upstream::new(
            name.into(),
            uri.scheme().unwrap().clone(),
            uri.authority().unwrap().clone(),
            ApiKind::Defender,
            prefixes.iter().map(|p| p.to_string()).collect(),
            None,
        )
    }

    fn table() -> Vec<Upstream> {
        vec![
            up("defender", "https://api.security.microsoft.com", &["/api/"]),
            up("mde", "https://api.securitycenter.microsoft.com", &[]),
            up("graph", "https://graph.microsoft.com", &["/v1.0/", "/beta/"]),
        ]
    }

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(http::header::HOST, h.parse().unwrap());
        m
    }

    #[test]
    fn base_url_mode_routes_by_path() {
        let t = table();
        let local = host("127.0.0.1:7480");
        assert_eq!(select(&t, None, &"/api/incidents".parse().unwrap(), &local), Some(0));
        assert_eq!(select(&t, None, &"/API/incidents".parse().unwrap(), &local), Some(0));
        assert_eq!(select(&t, None, &"/v1.0/security/x".parse().unwrap(), &local), Some(2));
        assert_eq!(select(&t, None, &"/beta/security/x".parse().unwrap(), &local), Some(2));
        assert_eq!(select(&t, None, &"/other".parse().unwrap(), &local), None);
    }

    #[test]
    fn a_configured_host_selects_its_upstream_and_others_never_do() {
        let t = table();
        let uri: Uri = "/api/machines".parse().unwrap();
        assert_eq!(select(&t, None, &uri, &host("api.securitycenter.microsoft.com")), Some(1));
        assert_eq!(select(&t, None, &uri, &host("api.securitycenter.microsoft.com:443")), Some(1));
        assert_eq!(select(&t, None, &uri, &host("api.securitycenter.microsoft.com:8080")), Some(0));
        let v6 = [up("v6", "http://[::1]:9000", &[])];
        assert_eq!(select(&v6, None, &uri, &host("[::1]:9000")), Some(0));
        assert_eq!(select(&v6, None, &uri, &host("[::1]")), None);
        assert_eq!(select(&v6, None, &uri, &host("[::1]:x")), None);
        assert_eq!(select(&t, None, &uri, &host("evil.example.com")), Some(0));
        let abs: Uri = "https://evil.example.com/other".parse().unwrap();
        assert_eq!(select(&t, None, &abs, &HeaderMap::new()), None);
    }

    #[test]
    fn a_proxy_target_names_its_upstream_by_host_alone() {
        let t = table();
        assert_eq!(by_host(&t, "GRAPH.microsoft.com"), Some(2));
        assert_eq!(by_host(&t, "api.securitycenter.microsoft.com"), Some(1));
        assert_eq!(by_host(&t, "microsoft.com"), None);
        assert_eq!(by_host(&t, "evil.api.security.microsoft.com"), None);
    }

    #[test]
    fn a_proxy_target_with_a_port_names_the_upstream_on_that_port() {
        let t = [
            up("a", "https://x.example:8443", &[]),
            up("b", "https://x.example:9443", &[]),
            up("c", "https://y.example", &[]),
        ];
        assert_eq!(by_host_and_port(&t, "x.example", 9443), Some(1));
        assert_eq!(by_host_and_port(&t, "X.example", 8443), Some(0));
        assert_eq!(by_host_and_port(&t, "x.example", 443), None);
        assert_eq!(by_host_and_port(&t, "y.example", 443), Some(2));
        assert_eq!(by_host_and_port(&t, "y.example", 8443), None);
    }

    #[test]
    fn a_bound_listener_wins() {
        let t = table();
        assert_eq!(select(&t, Some(1), &"/api/incidents".parse().unwrap(), &HeaderMap::new()), Some(1));
    }
}
