//! The forward-proxy listener's service: `CONNECT` (intercept, tunnel or
//! refuse) and absolute-form requests.
//!
//! An intercepted tunnel is served on the worker that accepted the
//! `CONNECT`: the upgraded connection, its TLS session and its requests all
//! stay on that worker's runtime and use its upstream pools. When the
//! server stops, an intercepted tunnel finishes its request in flight and
//! closes; a blind tunnel closes at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::credential::ClientCredential;
use super::ForwardProxy;
use crate::app::{proxy, Worker};
use crate::error::GatewayError;
use crate::identity::client::IdentityMode;
use crate::metrics::ConnectOutcome;
use crate::upstream::route::{by_host, by_host_and_port};
use crate::upstream::ApiKind;

/// Longest wait for a client's TLS handshake, and for a blind tunnel's connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The service of the forward-proxy listener on one worker; `stopped`
/// turns true when the server stops.
pub fn service(
    worker: Arc<Worker>,
    fp: Arc<ForwardProxy>,
    stopped: watch::Receiver<bool>,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send {
    tower::service_fn(move |req: Request| {
        let (worker, fp, stopped) = (worker.clone(), fp.clone(), stopped.clone());
        async move { Ok(handle(worker, fp, req, stopped).await) }
    })
}

async fn handle(
    worker: Arc<Worker>,
    fp: Arc<ForwardProxy>,
    mut req: Request,
    stopped: watch::Receiver<bool>,
) -> Response {
    let credential = ClientCredential::from_headers(req.headers());
    if req.method() == Method::CONNECT {
        return connect(worker, fp, req, credential, stopped).await;
    }
    let refuse = |e: GatewayError| e.into_response_for(ApiKind::Defender);
    let Some(host) = req.uri().host() else {
        return refuse(GatewayError::BadProxyRequest {
            detail:
                "send CONNECT or an absolute URL (http://host/path); for base-URL mode use the main listener"
                    .into(),
        });
    };
    // A port in the URL picks among upstreams of one host; `http://host/`
    // (port 80) names the host's first.
    let upstreams = &worker.gateway().config().upstreams;
    let on_port = req.uri().port_u16().and_then(|p| by_host_and_port(upstreams, host, p));
    let Some(up) = on_port.or_else(|| by_host(upstreams, host)) else {
        tracing::debug!(target = host, "forward proxy refused a host");
        return refuse(GatewayError::ProxyRefused { target: host.to_string() });
    };
    if let Some(c) = credential {
        req.extensions_mut().insert(c);
    }
    proxy(&worker, Some(up), req).await
}

async fn connect(
    worker: Arc<Worker>,
    fp: Arc<ForwardProxy>,
    mut req: Request,
    credential: Option<ClientCredential>,
    mut stopped: watch::Receiver<bool>,
) -> Response {
    let metrics = worker.gateway().metrics.clone();
    let refuse = |e: GatewayError| {
        let outcome = match e {
            GatewayError::TunnelUnreachable { .. } | GatewayError::Internal { .. } => ConnectOutcome::Failed,
            _ => ConnectOutcome::Refused,
        };
        metrics.proxy_connect(outcome);
        e.into_response_for(ApiKind::Defender)
    };
    let Some(target) = req.uri().authority().cloned() else {
        return refuse(GatewayError::BadProxyRequest { detail: "CONNECT needs a host:port target".into() });
    };
    let Some(port) = target.port_u16() else {
        return refuse(GatewayError::BadProxyRequest {
            detail: format!("CONNECT target `{}` has no port", target.host()),
        });
    };
    let upstreams = &worker.gateway().config().upstreams;
    let intercepted = by_host_and_port(upstreams, target.host(), port);
    if let Some(up) = intercepted {
        let tls = match fp.leaves.server_config(up, upstreams[up].host()) {
            Ok(tls) => tls,
            Err(e) => return refuse(GatewayError::Internal { detail: e.to_string() }),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        metrics.proxy_connect(ConnectOutcome::Intercepted);
        let open = worker.gateway().tunnels.open();
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = intercept(upgrade, tls, worker, up, credential, stopped).await {
                tracing::debug!(error = %e, "intercepted tunnel ended with an error");
            }
        });
        return established();
    }
    // `host:port`, without any userinfo (`user:secret@`), which is never
    // logged or echoed.
    let wanted = format!("{}:{port}", target.host()).to_ascii_lowercase();
    // Where clients are told apart by key, a tunnel is theirs alone; and a
    // caller without a key learns nothing of which targets are allowed:
    // every target but the upstreams gets the same 407.
    if !known_client(&worker, credential.as_ref()) {
        tracing::debug!(target = %wanted, "CONNECT refused: no known client key");
        return refuse(GatewayError::ProxyUnauthorized { target: wanted });
    }
    if fp.allow_tunnel.contains(&wanted) {
        // An IPv6 literal comes bracketed, as in a URI.
        let host = target.host().trim_start_matches('[').trim_end_matches(']');
        let tcp = match tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect((host, port))).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return refuse(GatewayError::TunnelUnreachable { target: wanted, detail: e.to_string() })
            }
            Err(_) => {
                return refuse(GatewayError::TunnelUnreachable { target: wanted, detail: "timed out".into() })
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut client, mut tcp) = (TokioIo::new(upgraded), tcp);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut tcp) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            }
        });
        metrics.proxy_connect(ConnectOutcome::Tunnelled);
        tracing::debug!(target = %wanted, "blind tunnel opened");
        return established();
    }
    tracing::debug!(target = %wanted, "forward proxy refused a CONNECT");
    refuse(GatewayError::ProxyRefused { target: wanted })
}

/// Whether `credential` names a configured client, where the gateway tells
/// its clients apart by key; any caller may tunnel where it does not.
fn known_client(worker: &Worker, credential: Option<&ClientCredential>) -> bool {
    let config = worker.gateway().config();
    let roster = &config.clients;
    if roster.mode != IdentityMode::Key {
        return true;
    }
    let mut headers = http::HeaderMap::new();
    if let Some(key) = credential.and_then(|c| http::HeaderValue::from_str(&c.key).ok()) {
        headers.insert(roster.header.clone(), key);
    }
    roster.identify(&headers, None).is_ok()
}

/// `200 Connection established`, after which the connection is the tunnel's.
fn established() -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// Terminate TLS on the upgraded connection and serve its requests as upstream `up`'s.
async fn intercept(
    upgrade: hyper::upgrade::OnUpgrade,
    tls: Arc<rustls::ServerConfig>,
    worker: Arc<Worker>,
    up: usize,
    credential: Option<ClientCredential>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let upgraded = TokioIo::new(upgrade.await?);
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(upgraded);
    let stream =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await.map_err(|_| "TLS handshake timed out")??;
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let worker = worker.clone();
        let mut req = req.map(Body::new);
        if let Some(c) = &credential {
            req.extensions_mut().insert(c.clone());
        }
        async move { Ok::<_, Infallible>(proxy(&worker, Some(up), req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => return done,
        _ = stopped.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
