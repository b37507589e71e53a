//! The HTTPS forward proxy, for scripts that hard-code the Microsoft hosts.
//!
//! A client with `HTTPS_PROXY` pointing here sends `CONNECT host:443`
//! ([`connect`]). For a host of the upstream table the gateway answers 200,
//! terminates TLS on the tunnel with a leaf certificate for that host
//! ([`leaf`], signed by the local CA of [`ca`]), and serves the requests
//! inside it with the same request path as base-URL mode, its upstream fixed
//! to the `CONNECT` target's, as on a bound listener: same policies, same
//! identity, same errors, forwarded over verified TLS to the real host.
//! A plain-HTTP absolute-form request (`GET http://host/...`) to such a host
//! takes the same path. `CONNECT` to a target that `allow_tunnel` lists is
//! a blind tunnel, never inspected nor metered; any other target gets 403
//! (407 first, listed or not, where clients need a key and have none).
//! `Proxy-Authorization` is read into a [`credential::ClientCredential`]
//! that rides with the connection's requests and is never forwarded; the
//! request path takes its key as the client's API key (shared mode).
//!
//! Not here: HTTP/2 `CONNECT` to the proxy itself (clients use HTTP/1.1), or
//! upgrades inside an intercepted tunnel.

pub mod ca;
mod connect;
pub mod credential;
mod leaf;
pub mod tunnels;

use std::sync::Arc;

pub use ca::{CaError, LocalCa};
pub use connect::service;

use crate::config::Config;

/// What every worker's forward-proxy listener shares.
pub struct ForwardProxy {
    ca: Arc<LocalCa>,
    leaves: leaf::LeafCerts,
    /// Lower-case `host:port` targets allowed as blind tunnels.
    allow_tunnel: Vec<String>,
}

impl ForwardProxy {
    /// The forward proxy of `config`, loading (or creating) its CA; `None` when not configured.
    pub fn new(config: &Config) -> Result<Option<ForwardProxy>, CaError> {
        let Some(spec) = &config.forward_proxy else { return Ok(None) };
        let ca = Arc::new(LocalCa::load_or_create(&spec.ca_dir)?);
        Ok(Some(ForwardProxy {
            leaves: leaf::LeafCerts::new(ca.clone(), config.upstreams.len()),
            ca,
            allow_tunnel: spec.allow_tunnel.clone(),
        }))
    }

    /// The CA certificate clients must trust, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }
}
