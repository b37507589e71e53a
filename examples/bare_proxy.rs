//! The floor of the proxy benchmarks: the same HTTP stack as the gateway
//! with none of the gateway's work, to tell what the stack costs a request
//! from what the gateway adds (`bench/cpu-per-request.sh`, `docs/benchmarks.md`).
//!
//! Built like the gateway's data path, at its cheapest: one single-threaded
//! tokio runtime per worker, each accepting on its own `SO_REUSEPORT`
//! socket (no hand-off between threads), hyper's HTTP/1 server, and
//! hyper-util's pooled client per worker over a plain `HttpConnector`, with
//! mimalloc. Each request is forwarded as it came, path and headers
//! unchanged but for `Host`, and the response streamed back. No identity, no
//! admission, no metrics, no logs, no TLS connector, no error bodies.
//!
//! With `axum` as its last argument it serves through `axum::serve` and a
//! `Router` whose fallback forwards, as the gateway's listeners do, instead
//! of hyper's HTTP/1 server and a bare service function: the difference is
//! what axum's serving and dispatch cost a request.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:18007 http://127.0.0.1:18001 [WORKERS] [hyper|axum]
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN_ADDR UPSTREAM_URL [WORKERS] [hyper|axum]";
    let listen: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let upstream: Uri = args.next().and_then(|u| u.parse().ok()).expect(usage);
    let workers: usize = args
        .next()
        .map(|w| w.parse().expect(usage))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let axum = match args.next().as_deref() {
        None | Some("hyper") => false,
        Some("axum") => true,
        Some(_) => panic!("{usage}"),
    };
    let (scheme, authority) =
        (upstream.scheme().cloned().expect(usage), upstream.authority().cloned().expect(usage));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (scheme, authority) = (scheme.clone(), authority.clone());
            std::thread::spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let upstream = Upstream::new(scheme, authority);
                if axum {
                    runtime.block_on(axum_worker(listen, upstream));
                } else {
                    runtime.block_on(worker(listen, upstream));
                }
            })
        })
        .collect();
    let server = if axum { "axum::serve" } else { "hyper http1" };
    println!("bare proxy on {listen} to {upstream}, {workers} workers, {server}");
    for t in threads {
        let _ = t.join();
    }
}

/// Where requests go.
#[derive(Clone)]
struct Upstream {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
}

impl Upstream {
    fn new(scheme: Scheme, authority: Authority) -> Upstream {
        let host = HeaderValue::from_str(authority.as_str()).expect("authority is a header value");
        Upstream { scheme, authority, host }
    }

    /// The request to the upstream: the same method, path, query, headers
    /// and body, with the upstream's `Host`.
    fn request<B>(&self, req: Request<B>) -> Request<B> {
        let (mut parts, body) = req.into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri).expect("upstream URI");
        parts.headers.insert(http::header::HOST, self.host.clone());
        Request::from_parts(parts, body)
    }
}

/// A worker's pooled client, sending request bodies of type `B`.
fn client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector)
}

fn listener(listen: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.set_reuseport(true).expect("SO_REUSEPORT");
    socket.bind(listen).expect("bind");
    socket.listen(1024).expect("listen")
}

fn bad_gateway<B: Default>() -> Response<B> {
    let mut r = Response::new(B::default());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

async fn worker(listen: SocketAddr, upstream: Upstream) {
    let (listener, client) = (listener(listen), client::<Incoming>());
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    Ok::<_, Infallible>(match client.request(upstream.request(req)).await {
                        Ok(response) => response.map(BodyExt::boxed),
                        Err(_) => {
                            bad_gateway::<Empty<Bytes>>().map(|b| b.map_err(|never| match never {}).boxed())
                        }
                    })
                }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn axum_worker(listen: SocketAddr, upstream: Upstream) {
    // The request body goes on as axum gives it.
    let client = client::<axum::body::Body>();
    let router = axum::Router::new().fallback(move |req: Request<axum::body::Body>| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move {
            match client.request(upstream.request(req)).await {
                Ok(response) => response.map(axum::body::Body::new),
                Err(_) => bad_gateway(),
            }
        }
    });
    let listener = axum::serve::ListenerExt::tap_io(listener(listen), |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let _ = axum::serve(listener, router).await;
}
