//! Transparent forwarding, local errors and upstream failures, end to end.

mod support;

use std::time::Duration;

use support::emulator::{bytes_pattern, gzip_payload, Emulator, EmulatorConfig, QuotaRule};
use support::gateway::TestGateway;
use support::{bearer, client, ClosedPort};

const POLICIES: &str = r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{ limit = 50, per = "1s" }]

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run", "/v1.0/security/runHuntingQuery"]
windows = [{ limit = 45, per = "1s" }]

[[policy]]
name = "slow"
paths = ["/api/test/slow/**"]
windows = [{ limit = 50, per = "1s" }]
header_timeout = "300ms"
total_timeout = "1s"
"#;

fn upstream() -> EmulatorConfig {
    EmulatorConfig::new().quota(QuotaRule::new(
        "incidents",
        &["/api/incidents"],
        &[(50, Duration::from_secs(1))],
    ))
}

/// Headers that legitimately differ between two responses or hops.
fn comparable(headers: &reqwest::header::HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "date" | "connection" | "keep-alive" | "transfer-encoding"))
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    v.sort();
    v
}

/// Issue #2, case 5: unmetered paths come through byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmetered_responses_come_through_byte_identical() {
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let http = client();
    for path in [
        "/api/test/status/200",
        "/api/test/status/404",
        "/api/test/status/418",
        "/api/test/status/500",
        "/api/test/status/503",
        "/api/test/gzip",
        "/api/test/bytes/5000000",
        "/v1.0/test/status/400",
    ] {
        let direct = http.get(format!("{}{path}", emu.url())).send().await.unwrap();
        let proxied = http.get(gw.url(path)).send().await.unwrap();
        assert_eq!(direct.status(), proxied.status(), "{path}");
        assert_eq!(comparable(direct.headers()), comparable(proxied.headers()), "{path}");
        assert!(proxied.headers().get("x-quotagate-throttled-by").is_none());
        let (a, b) = (direct.bytes().await.unwrap(), proxied.bytes().await.unwrap());
        assert!(a == b, "{path}: bodies differ ({} vs {} bytes)", a.len(), b.len());
    }
    // The gateway's own headers from an upstream are not passed on as its own.
    let r = http.get(gw.url("/api/test/status/200?gateway_headers")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-quotagate-throttled-by").is_none());
    assert!(r.headers().get("x-quotagate-execution-time").is_none());
    assert_eq!(r.headers()["x-emulator-status"], "200", "the upstream's other headers are");
    let gz = http.get(gw.url("/api/test/gzip")).send().await.unwrap();
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    assert_eq!(gz.bytes().await.unwrap(), gzip_payload(), "compressed bodies pass untouched");
    let big = http.get(gw.url("/api/test/bytes/5000000")).send().await.unwrap();
    assert!(big.headers().get("content-length").is_none(), "streamed, not buffered into a sized body");
    assert_eq!(big.bytes().await.unwrap(), bytes_pattern(5_000_000));
    assert_eq!(
        gw.metric("quotagate_requests_total{decision=\"forwarded\",policy=\"unmetered\"}").await,
        11.0
    );
}

/// The upstream sees the request as the client sent it, with `Host` set to
/// the upstream and hop-by-hop headers gone; a streamed upload arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_upstream_unchanged_but_for_hop_by_hop_headers() {
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let http = client();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(10_000).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .request(reqwest::Method::PATCH, gw.url("/api/test/echo?$filter=status%20eq%20%27Active%27&x=1"))
        .header("x-custom", "kept")
        .header("x-quotagate-max-wait", "5")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "dropped")
        .header("host", "evil.example.com")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = &emu.requests()[0];
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.path_and_query, "/api/test/echo?$filter=status%20eq%20%27Active%27&x=1");
    assert_eq!(seen.headers["x-custom"], "kept");
    assert!(seen.headers.get("x-private").is_none());
    assert!(seen.headers.get("x-quotagate-max-wait").is_none(), "the gateway's own header stays here");
    assert_eq!(seen.headers["host"], emu.addr().to_string(), "Host is the upstream's, never the client's");
    assert_eq!(seen.body, body, "a streamed upload arrives byte for byte");
}

/// Issue #2, case 6: a metered request without a usable token is answered
/// locally with a 401 that says what is wrong, and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_tokens_get_a_local_401_and_nothing_is_forwarded() {
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let http = client();
    let cases = [
        (None, "no Authorization header"),
        (Some("Basic dXNlcjpwYXNz"), "not a bearer token"),
        (Some("Bearer not-a-jwt"), "not a JWT"),
        (Some("Bearer a.%%%.c"), "not base64url-encoded JSON"),
        (Some("Bearer eyJhbGciOiJub25lIn0.eyJhcHBpZCI6ImEifQ.s"), "no `tid` claim"),
    ];
    for (auth, expected) in cases {
        let mut req = http.get(gw.url("/api/incidents"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Unauthorized");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message:?} should say {expected:?}");
        assert!(body["error"]["target"].is_string());
    }
    let graph = http.post(gw.url("/v1.0/security/runHuntingQuery")).body("{}").send().await.unwrap();
    assert_eq!(graph.status(), 401);
    let body: serde_json::Value = graph.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized");
    assert!(body["error"]["innerError"]["request-id"].is_string(), "Graph envelope: {body}");
    assert_eq!(emu.count(), 0, "the upstream saw nothing");
    assert_eq!(
        gw.metric("quotagate_requests_total{decision=\"unauthorized\",policy=\"incidents\"}").await,
        5.0
    );
}

/// Issue #2, case 7: an upstream that is down gives a clear 502; one that
/// is too slow gives a 504; neither hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_502_and_upstream_slow_is_a_504() {
    let closed = ClosedPort::hold();
    let gw = TestGateway::start(&closed.url(), POLICIES).await;
    let http = client();
    let r =
        http.get(gw.url("/api/incidents")).header("authorization", bearer("t", "a")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "BadGateway");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("could not reach upstream `defender`"),
        "{body}"
    );
    let g = http.get(gw.url("/v1.0/users")).send().await.unwrap();
    assert_eq!(g.status(), 502);
    let body: serde_json::Value = g.json().await.unwrap();
    assert!(body["error"]["innerError"].is_object(), "Graph paths get the Graph envelope: {body}");

    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let started = std::time::Instant::now();
    let r = http
        .get(gw.url("/api/test/slow/3000"))
        .header("authorization", bearer("t", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "GatewayTimeout");
    assert!(body["error"]["message"].as_str().unwrap().contains("did not answer within 300ms"), "{body}");
    assert_eq!(gw.metric("quotagate_upstream_failures_total{kind=\"timeout\",policy=\"slow\"}").await, 1.0);
}

/// A streamed upload whose chunk framing breaks is the client's error: a
/// 400 in the upstream's error shape that says so, not an upstream failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_streamed_body_is_the_clients_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let mut conn = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    conn.write_all(
        b"POST /api/test/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "BadRequest", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("request body"), "{body}");
    assert_eq!(
        gw.metric("quotagate_upstream_failures_total{kind=\"protocol\",policy=\"unmetered\"}").await,
        0.0
    );
    assert_eq!(
        gw.metric("quotagate_upstream_failures_total{kind=\"bad_body\",policy=\"unmetered\"}").await,
        1.0
    );
}

/// A client that stops reading a response is disconnected once a write to
/// it has waited `send_timeout`, and the upstream transfer feeding it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), &format!("send_timeout = \"1s\"\n{POLICIES}")).await;
    // 64 MB: more than every buffer between the emulator and a client that
    // reads 1 KB and then nothing (its receive buffer is fixed small).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.proxy).await.unwrap();
    stalled.write_all(b"GET /api/test/bytes/67108864 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut first = [0u8; 1024];
    stalled.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..64]));
    let stopped = std::time::Instant::now();

    // Not before the timeout...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(emu.cut_bodies(), 0, "the transfer was cut before the send timeout");
    // ...but once it has passed, the upstream transfer ends.
    while emu.cut_bodies() == 0 {
        assert!(stopped.elapsed() < Duration::from_secs(10), "the upstream transfer still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped.elapsed() >= Duration::from_secs(1), "cut after {:?}", stopped.elapsed());
    // The client reads what was already on its way, then the end of the connection.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest)).await;
    let read = read.expect("the connection was closed, not left open");
    assert!(
        read.is_ok() || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    assert!(rest.len() < 32 << 20, "{} bytes came after the stall", rest.len());

    // The gateway serves on.
    let r = client().get(gw.url("/api/test/status/200")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A client slower than the upstream, but never silent for `send_timeout`,
/// gets the whole body, however long that takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_gets_the_whole_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), &format!("send_timeout = \"1s\"\n{POLICIES}")).await;
    let n = 10_000_000;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(65536).unwrap();
    let mut slow = socket.connect(gw.proxy).await.unwrap();
    // HTTP/1.0: the body runs to the end of the connection, no chunk framing.
    slow.write_all(format!("GET /api/test/bytes/{n} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = slow.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
        // About 4 MB/s: slower than the gateway can send.
        let due = started + Duration::from_secs_f64(got.len() as f64 / 4e6);
        tokio::time::sleep_until(due.into()).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2), "{:?}", started.elapsed());
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    assert!(got.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&got[..64]));
    assert!(got[head_end..] == bytes_pattern(n), "{} body bytes", got.len() - head_end);
    assert_eq!(emu.cut_bodies(), 0);
}

/// A body over the limit is a 413, whether announced or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_a_413() {
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let http = client();
    let big = vec![b'x'; 2 * 1024 * 1024];
    let r = http
        .post(gw.url("/api/advancedhunting/run"))
        .header("authorization", bearer("t", "a"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("1048576 bytes"), "{body}");
    assert_eq!(emu.count(), 0, "an announced oversized body is refused before anything is forwarded");

    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .post(gw.url("/api/test/echo"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

/// A client that sends the whole of an oversized body before it reads
/// (as most HTTP clients do) still gets the 413: the gateway reads the rest
/// of the body after answering, instead of closing on unread bytes, which
/// makes the kernel reset the connection under the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_oversized_body_reads_the_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(upstream()).await;
    let gw = TestGateway::start(&emu.url(), POLICIES).await;
    let size = 16 * 1024 * 1024;
    let mut conn = tokio::net::TcpStream::connect(gw.url("").trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /api/test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b'x'; size]).await.expect("the whole body is taken");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("the answer arrives");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("1048576 bytes"), "{answer}");
    assert_eq!(emu.count(), 0);
}

/// Base-URL mode routes by path; a configured host selects its upstream;
/// an unknown path prefix gets a clear 404 and is not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_path_host_and_bound_listener() {
    let defender = Emulator::start(upstream()).await;
    let graph = Emulator::start(EmulatorConfig::new()).await;
    let mde = Emulator::start(EmulatorConfig::new()).await;
    let text = format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "5ms"
[[listener]]
listen = "127.0.0.1:0"
upstream = "mde"
[[upstream]]
name = "defender"
url = "{}"
kind = "defender"
route_prefixes = ["/api/"]
[[upstream]]
name = "mde"
url = "http://localhost:{}"
kind = "defender"
[[upstream]]
name = "graph"
url = "{}"
kind = "graph"
route_prefixes = ["/v1.0/", "/beta/"]
"#,
        defender.url(),
        mde.addr().port(),
        graph.url()
    );
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    assert_eq!(http.get(gw.url("/api/test/status/200")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(gw.url("/v1.0/test/status/200")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(gw.url("/BETA/test/status/200")).send().await.unwrap().status(), 200);
    let by_host = http
        .get(gw.url("/api/test/status/200"))
        .header("host", format!("localhost:{}", mde.addr().port()))
        .send()
        .await
        .unwrap();
    assert_eq!(by_host.status(), 200);
    let bound = http.get(format!("http://{}/api/test/status/200", gw.bound[0])).send().await.unwrap();
    assert_eq!(bound.status(), 200);
    assert_eq!((defender.count(), graph.count(), mde.count()), (1, 2, 2));

    let nowhere =
        http.get(gw.url("/somewhere/else")).header("host", "evil.example.com").send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    let body: serde_json::Value = nowhere.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("no configured upstream"), "{body}");
    assert_eq!(defender.count() + graph.count() + mde.count(), 5);
}
