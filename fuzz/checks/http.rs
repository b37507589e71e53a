//! The HTTP request path: raw bytes, as a client would send them, into the
//! gateway's own services in-process, in front of the upstream emulator.
//!
//! Input: a mode byte, then the bytes of the connection (one or more
//! requests, well-formed or not). `{decoy}` in them becomes the address of a
//! listener that is no upstream. The mode byte picks:
//! - bits 0-1, the listener: the base-URL one, one bound to the `mde`
//!   upstream, or the forward proxy (`CONNECT`, absolute-form requests);
//! - bit 2, anonymous clients or one API-keyed client (`x-quotagate-key:
//!   fuzz-key`) with a runaway-loop guard;
//! - bits 3-4, a transport fault the emulator plays (none, garbage, a reset
//!   mid-body).
//!
//! The runtime's clock is paused, and moves on by itself to the next timer
//! whenever every task waits: the gateway's guard, backoffs, queue waits and
//! timeouts, and the emulator's slow answers, take no wall time. On the
//! real clock an input spent about half its time asleep, and which timer
//! or socket woke first varied from run to run; on the paused one the same
//! inputs replay about three times as fast, and reach the same edges more
//! often (docs/fuzzing.md, "Stable coverage"). The connections to the
//! emulator are real loopback sockets, whose data is nearly always ready by
//! the time the runtime looks for it again; when it is not, the clock moves
//! on to the next timer first, one source of the variation that remains.
//! A connection that nothing will ever move on reaches the deadline at once
//! instead of after 10 s of wall time.
//!
//! Every input gets a fresh gateway and emulator. The two configs (one per
//! client mode) are parsed once and pointed at each input's emulator, and
//! the metrics registry is shared, as a reloaded gateway shares its metrics:
//! building them was about 43% of an input's time. The connection is served
//! by hyper's auto (HTTP/1.1 and h2c) server with upgrades, as `axum::serve`
//! does, over an in-memory pipe; the client half-closes after its bytes, so
//! the server answers what it got and then closes.
//!
//! Properties:
//! - no panic, and every connection is answered and closed within 10 s
//!   (of the paused clock) for each request line it carries, and 10 s more;
//! - what comes back is a sequence of well-formed HTTP/1.x responses (a
//!   body may end early only where the upstream's did, or at the end);
//! - every error with a body is in the error JSON shape
//!   (`{"error":{"code","message",...}}`); a 500 only comes from the
//!   emulator's own test endpoint; every 429 and every throttling 503 carries
//!   `Retry-After: N` (whole seconds, at least 1) and says who throttled, and
//!   its message ends with "You can send requests again in N seconds.";
//! - nothing ever reaches the decoy, every request the emulator sees is
//!   addressed to a configured upstream host, and no request carries the
//!   gateway's own headers (any `x-quotagate-*`: the client's key, its
//!   priority or wait) or a proxy credential upstream.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::util::BoxCloneService;
use tower::ServiceExt as _;

use quotagate::app::{proxy_service, Gateway, Worker};
use quotagate::config::Config;
use quotagate::forward_proxy::{self, ForwardProxy};
use quotagate::metrics::Metrics;

use super::emulator::{Emulator, EmulatorConfig, Fault, QuotaRule};

/// The configured upstream hosts: the only ones the emulator may see.
const HOSTS: [&str; 3] =
    ["api.security.microsoft.com", "api.securitycenter.microsoft.com", "graph.microsoft.com"];
/// The SHA-256 of the keyed client's API key, `fuzz-key`.
const KEY_SHA256: &str = "231e9b2f757db8d48ecd0711b60135e1cc57a3a807be9dc12638856f17a7872c";
/// Longest a connection may take to be answered and closed, per request it
/// carries (pipelined requests are answered one after another, and each may
/// wait out an upstream timeout), on the runtime's paused clock (which
/// stands still while the process is paused or starved, so only the
/// gateway's own timers count against it).
const DEADLINE: Duration = Duration::from_secs(10);
/// Response bytes kept at most; the rest is read and dropped.
const READ_CAP: usize = 1 << 20;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Env {
    runtime: tokio::runtime::Runtime,
    decoy: TcpListener,
    decoy_addr: SocketAddr,
    forward: Arc<ForwardProxy>,
    /// The gateway's config for anonymous clients (`[0]`) and for the keyed
    /// client (`[1]`), each input's emulator set as every upstream's address.
    configs: [Config; 2],
    metrics: Arc<Metrics>,
    /// Never read: while it lives, SIGPIPE is caught instead of ending the
    /// process. A fuzz target runs under libFuzzer's `main`, which, unlike
    /// Rust's, does not ignore it, and a `writev` to a connection the other
    /// side has closed (the upstream that resets mid-body) raises it.
    _sigpipe: tokio::signal::unix::Signal,
}

thread_local! {
    static IN_CHECK: Cell<bool> = const { Cell::new(false) };
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // A panic in a task the runtime catches (a connection's, a
        // forwarding's) would otherwise go unnoticed.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CHECK.with(Cell::get) {
                PANICKED.with(|p| p.set(true));
            }
            previous(info)
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let decoy = TcpListener::bind("127.0.0.1:0").expect("decoy");
        decoy.set_nonblocking(true).expect("non-blocking decoy");
        let decoy_addr = decoy.local_addr().expect("decoy address");
        let dir = tempfile::tempdir().expect("a CA directory");
        let ca_dir = dir.path().display().to_string();
        // The forward proxy's CA lives in memory in `forward` (the directory
        // is gone once it was made).
        let config = config(&ca_dir, false);
        let forward = ForwardProxy::new(&config).expect("the forward proxy's CA").expect("configured");
        drop(dir);
        let configs = [config, self::config(&ca_dir, true)];
        let metrics = Arc::new(Metrics::new(1));
        let _sigpipe = runtime
            .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::pipe()) })
            .expect("a SIGPIPE handler");
        Env { runtime, decoy, decoy_addr, forward: Arc::new(forward), configs, metrics, _sigpipe }
    })
}

/// The gateway's config, its upstreams' `connect_to` a placeholder for the
/// emulator's address.
fn config(ca_dir: &str, keyed: bool) -> Config {
    let emulator = "127.0.0.1:9";
    let clients = if keyed {
        format!(
            r#"client_identity = "key"
allow_priority_header = true

[[client]]
name = "fuzz"
key_sha256 = "{KEY_SHA256}"
priority = "batch"
guard_per_second = 20
guard_burst = 3
"#
        )
    } else {
        String::new()
    };
    let upstream = |name: &str, host: &str, kind: &str, prefixes: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\nurl = \"http://{host}\"\nkind = \"{kind}\"\nroute_prefixes = {prefixes}\nconnect_to = \"{emulator}\"\n"
        )
    };
    let text = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "5ms"
max_body_bytes = 65536
retry_body_bytes = 4096
backoff_base = "10ms"
backoff_cap = "50ms"
access_log = false
{clients}
{}
{}
{}
[forward_proxy]
listen = "127.0.0.1:0"
ca_dir = "{ca_dir}"

[store]
backend = "memory"

[hunting]
budgets = [{{ limit = "2s", per = "1h" }}]
estimate = "100ms"
max_concurrent = 2
stats_prefix_bytes = 4096
lookback = "{lookback}"

[policy_defaults]
max_wait = "200ms"
max_queue = 4
max_attempts = 2
connect_timeout = "1s"
header_timeout = "1s"
total_timeout = "2s"

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run", "/api/advancedqueries/run", "/v1.0/security/runHuntingQuery",
         "/v1.0/security/microsoft.graph.security.runHuntingQuery"]
windows = [{{ limit = 3, per = "1m" }}]
hunting = true

[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{{ limit = 2, per = "1m" }}]
mode = "reject"

[[policy]]
name = "machines"
paths = ["/api/machines", "/api/machines/**", "/api/test/**", "/v1.0/test/**"]
windows = [{{ limit = 50, per = "1m" }}]
"#,
        upstream("defender", HOSTS[0], "defender", r#"["/api/"]"#),
        upstream("mde", HOSTS[1], "defender", "[]"),
        upstream("graph", HOSTS[2], "graph", r#"["/v1.0/", "/beta/"]"#),
        lookback = if keyed { "reject" } else { "warn" },
    );
    Config::from_toml(&text, "fuzz config").unwrap_or_else(|e| panic!("{e}"))
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let env = env();
    let decoy = env.decoy_addr.to_string();
    let input = replace(rest, b"{decoy}", decoy.as_bytes());
    IN_CHECK.with(|c| c.set(true));
    PANICKED.with(|p| p.set(false));
    let (out, seen) = env.runtime.block_on(exchange(env, mode, &input));
    IN_CHECK.with(|c| c.set(false));
    assert!(!PANICKED.with(Cell::get), "a task panicked");

    match env.decoy.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the decoy: {other:?}"),
    }
    for r in &seen {
        let host = r.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
        assert!(host.is_some_and(|h| HOSTS.contains(&h)), "forwarded to host {host:?}: {r:?}");
        for name in r.headers.keys() {
            let name = name.as_str();
            assert!(
                !name.starts_with("x-quotagate-") && name != "proxy-authorization",
                "forwarded `{name}`: {r:?}"
            );
        }
    }
    if !input.starts_with(H2_PREFACE) {
        responses(&input, &out, mode & 3 == 2);
    }
}

/// One connection: serve `input` and return what came back and what the emulator saw.
async fn exchange(env: &Env, mode: u8, input: &[u8]) -> (Vec<u8>, Vec<super::emulator::SeenRequest>) {
    let fault = match (mode >> 3) & 3 {
        2 => Fault::Garbage,
        3 => Fault::ResetMidBody,
        _ => Fault::None,
    };
    let emulator = Emulator::start(
        EmulatorConfig::new()
            .quota(QuotaRule::new("machines", &["/api/machines"], &[(2, Duration::from_secs(60))]))
            .running_time(Duration::from_secs(1), Duration::from_secs(3600)),
    )
    .await;
    emulator.set_fault(fault);
    let mut config = env.configs[usize::from(mode & 4 != 0)].clone();
    for upstream in &mut config.upstreams {
        upstream.connect_to = Some(emulator.addr());
    }
    let gateway = Arc::new(Gateway::new(Arc::new(config), env.metrics.clone()));
    let worker = Arc::new(Worker::new(gateway, 0));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let service: BoxCloneService<Request, Response, Infallible> = match mode & 3 {
        1 => BoxCloneService::new(proxy_service(worker, Some(1))),
        2 => BoxCloneService::new(forward_proxy::service(worker, env.forward.clone(), stopped)),
        _ => BoxCloneService::new(proxy_service(worker, None)),
    };
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        service.clone().oneshot(req.map(Body::new))
    });

    let (client, server) = tokio::io::duplex(64 * 1024);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);
    let serve = async {
        let _ = builder.serve_connection_with_upgrades(TokioIo::new(server), service).await;
    };
    let (mut reader, mut writer) = tokio::io::split(client);
    let write = async {
        let _ = writer.write_all(input).await;
        let _ = writer.shutdown().await;
    };
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // Past READ_CAP the rest is read and dropped: a client that
                // stopped reading would hold the connection open itself.
                Ok(n) => out.extend_from_slice(&buf[..n.min(READ_CAP.saturating_sub(out.len()))]),
            }
        }
        out
    };
    // Request lines bound the requests: one more for whatever else came.
    let requests = input.windows(7).filter(|w| w == b" HTTP/1").count() + 1;
    let deadline = DEADLINE * u32::try_from(requests).unwrap_or(u32::MAX);
    let ((), (), out) = tokio::time::timeout(deadline, async { tokio::join!(serve, write, read) })
        .await
        .unwrap_or_else(|_| panic!("the connection was not answered and closed within {deadline:?}"));
    (out, emulator.requests())
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// One response as read off the connection.
struct Answer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Read the responses off `out` and check each.
fn responses(input: &[u8], out: &[u8], forward: bool) {
    let capped = out.len() >= READ_CAP;
    let first_method = input.iter().position(|&b| b != b'\r' && b != b'\n').map(|i| &input[i..]);
    let first_is_head = first_method.is_some_and(|m| m.starts_with(b"HEAD "));
    let any_head = input.windows(5).any(|w| w == b"HEAD ");
    let mut rest = out;
    let mut index = 0;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut headers);
        let n = match head.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if capped => return,
            other => panic!(
                "not an HTTP response ({other:?}) at {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(200)])
            ),
        };
        let status = head.code.expect("a complete head has a status");
        assert!((100..600).contains(&status), "status {status}");
        let headers: Vec<(String, Vec<u8>)> =
            head.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
        rest = &rest[n..];
        if (100..200).contains(&status) {
            continue;
        }
        let is_head = if index == 0 { first_is_head } else { any_head };
        if index > 0 && any_head {
            // Which answers are to HEAD (and so have no body) is not known here.
            return;
        }
        let value = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let chunked = value("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length =
            value("content-length").map(|v| v.trim().parse::<usize>().expect("a numeric Content-Length"));
        let (body, whole) = if is_head || status == 204 || status == 304 {
            (Vec::new(), true)
        } else if forward && status == 200 && !chunked && length.is_none() {
            // `200 Connection established`: the rest is the tunnel's.
            return;
        } else if chunked {
            let (body, used, whole) = dechunk(rest);
            rest = &rest[used..];
            (body, whole)
        } else if let Some(len) = length {
            let take = len.min(rest.len());
            let body = rest[..take].to_vec();
            rest = &rest[take..];
            (body, take == len)
        } else {
            let body = rest.to_vec();
            rest = &[];
            (body, true)
        };
        let answer = Answer { status, headers, body };
        if whole {
            check_answer(&answer, is_head);
        } else {
            // A body cut short ends the connection: nothing may follow it.
            assert!(rest.is_empty());
            return;
        }
        index += 1;
    }
}

/// A chunked body: (data, bytes used, whether it ended properly).
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, usize, bool) {
    let start = rest.len();
    let mut body = Vec::new();
    loop {
        let Ok(httparse::Status::Complete((n, size))) = httparse::parse_chunk_size(rest) else {
            return (body, start - rest.len(), false);
        };
        rest = &rest[n..];
        let Ok(size) = usize::try_from(size) else { return (body, start - rest.len(), false) };
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return (body, start - rest.len(), false);
                };
                let line_empty = end == 0;
                rest = &rest[end + 2..];
                if line_empty {
                    return (body, start - rest.len(), true);
                }
            }
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (body, start, false);
        }
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "a chunk ends with CRLF");
        rest = &rest[size + 2..];
    }
}

fn check_answer(a: &Answer, is_head: bool) {
    let from_emulator = a.header("x-emulator-status").is_some();
    assert!(a.status != 500 || from_emulator, "an internal error: {}", String::from_utf8_lossy(&a.body));
    if a.status < 400 || is_head {
        return;
    }
    if a.body.is_empty() {
        // hyper's own answer to a request it could not parse: the app never saw it.
        assert!(matches!(a.status, 400 | 413 | 414 | 431 | 501 | 505), "an empty {}", a.status);
        return;
    }
    let error: Value = match a.header("content-encoding") {
        Some(_) => return,
        None => serde_json::from_slice(&a.body).unwrap_or_else(|e| {
            panic!("a {} body that is not JSON ({e}): {}", a.status, String::from_utf8_lossy(&a.body))
        }),
    };
    let code = error.pointer("/error/code").and_then(Value::as_str);
    let message = error.pointer("/error/message").and_then(Value::as_str);
    let (Some(_), Some(message)) = (code, message) else {
        panic!("a {} body not in the error shape: {error}", a.status)
    };
    let throttled_by = a.header("x-quotagate-throttled-by");
    if a.status == 429 || (a.status == 503 && throttled_by.is_some()) {
        assert!(
            matches!(throttled_by, Some("gateway" | "guard" | "upstream")),
            "throttled by {throttled_by:?}"
        );
        let n: u64 = a.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            panic!("a {} without whole-second Retry-After: {:?}", a.status, a.header("retry-after"))
        });
        assert!(n >= 1, "Retry-After: {n}");
        let tail = format!("You can send requests again in {n} seconds.");
        assert!(message.ends_with(&tail), "{message:?} does not end with {tail:?}");
        let shaped = error.pointer("/error/target").is_some_and(Value::is_string)
            || error.pointer("/error/innerError").is_some_and(Value::is_object);
        assert!(shaped, "neither the Defender nor the Graph shape: {error}");
    }
}
