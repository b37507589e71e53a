//! The pooled HTTP client to the upstreams: HTTP/1.1 and HTTP/2 (by ALPN)
//! over rustls with certificate verification against the Web PKI roots and
//! the CA certificates of `trust_ca_files`; upstreams with `connect_to` are
//! reached at that address ([`super::resolve`]).
//!
//! One pool per distinct connect timeout in the config (connect timeouts
//! live in the connector); usually one or two.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

use super::resolve::Resolver;
use crate::config::Config;

pub type HttpClient = Client<HttpsConnector<HttpConnector<Resolver>>, Body>;

/// The upstream clients, keyed by connect timeout.
pub struct Clients {
    by_connect_timeout: HashMap<Duration, HttpClient>,
}

impl Clients {
    pub fn new(connect_timeouts: impl IntoIterator<Item = Duration>, config: &Config) -> Self {
        let tls = tls_config(&config.trust_roots);
        let resolver = Resolver::new(
            config.upstreams.iter().filter_map(|u| Some((u.host().to_string(), u.connect_to?))),
        );
        let by_connect_timeout =
            connect_timeouts.into_iter().map(|t| (t, build(t, tls.clone(), resolver.clone()))).collect();
        Clients { by_connect_timeout }
    }

    /// The client for a connect timeout given to [`Clients::new`].
    pub fn get(&self, connect_timeout: Duration) -> &HttpClient {
        self.by_connect_timeout
            .get(&connect_timeout)
            .or_else(|| self.by_connect_timeout.values().next())
            .expect("at least one client")
    }
}

fn tls_config(extra: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Validation parsed these; one that rustls still refuses is left out.
    let (_, refused) = roots.add_parsable_certificates(extra.iter().cloned());
    if refused > 0 {
        tracing::warn!(refused, "some trust_ca_files certificates are not usable trust anchors");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

fn build(connect_timeout: Duration, tls: Arc<rustls::ClientConfig>, resolver: Resolver) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https)
}
