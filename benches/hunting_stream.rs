//! A large hunting result through the gateway, against a direct transfer.
//!
//! `cargo bench --bench hunting_stream [-- MEGABYTES]` (default 100)
//!
//! Serves one Defender hunting response of MEGABYTES (with `Stats` first, as
//! the service sends it) from an upstream on loopback, then fetches it
//! alternately straight from the upstream and through the release gateway
//! binary (metering it: `Stats` read from the held-back prefix, the headers
//! added, the rest streamed), five times each. Prints the median throughput
//! of both, their ratio, and how much the gateway's resident memory grew
//! while carrying the transfers. Fails if the ratio is below 0.8 or the
//! growth reaches 32 MB.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;

const RUNS: usize = 5;

/// A Defender hunting response of about `n` bytes, `Stats` first.
fn hunting_body(n: usize) -> Bytes {
    let mut out = String::with_capacity(n + 4096);
    out.push_str(r#"{"Stats":{"ExecutionTime":1.5,"dataset_statistics":[{"table_row_count":99000,"table_size":1}]},"Schema":[{"Name":"x","Type":"String"}],"Results":["#);
    let pad = "a".repeat(1000);
    let mut i = 0u64;
    while out.len() < n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"x":"row-{i:08}-{pad}"}}"#));
        i += 1;
    }
    out.push_str("]}");
    Bytes::from(out)
}

fn kb(field: &str, pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Fetch `url` as a hunting query, counting bytes without keeping them; MB/s.
async fn fetch(http: &reqwest::Client, url: &str, expect: usize) -> (f64, bool) {
    let started = Instant::now();
    let mut r = http
        .post(url)
        .header("authorization", format!("Bearer {}", token()))
        .body(r#"{"Query":"DeviceEvents | take 100000"}"#)
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    let metered = r.headers().contains_key("x-quotagate-execution-time");
    let mut n = 0;
    while let Some(chunk) = r.chunk().await.expect("body") {
        n += chunk.len();
    }
    assert_eq!(n, expect, "whole body");
    (n as f64 / 1e6 / started.elapsed().as_secs_f64(), metered)
}

fn token() -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        b64(r#"{"alg":"none"}"#),
        b64(r#"{"tid":"bench-tenant","appid":"bench-app","ver":"1.0"}"#)
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let megabytes: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let data = hunting_body(megabytes * 1_000_000);
        let size = data.len();
        let app = axum::Router::new().fallback(move || {
            let data = data.clone();
            async move {
                let chunks: Vec<Result<Bytes, Infallible>> =
                    (0..size).step_by(64 * 1024).map(|i| Ok(data.slice(i..(i + 64 * 1024).min(size)))).collect();
                let mut r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                r
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bench.toml");
        let text = quotagate::config::DEFAULT_TOML
            .replace("https://api.security.microsoft.com", &format!("http://{upstream}"))
            .replace("listen = \"127.0.0.1:7480\"", "listen = \"127.0.0.1:0\"")
            .replace("admin_listen = \"127.0.0.1:7481\"", "admin_listen = \"127.0.0.1:0\"")
            .replace("access_log = true", "access_log = false");
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_quotagate"))
            .args(["--config", config.to_str().unwrap(), "--workers", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway starts");
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let proxy = loop {
            let line = lines.next().expect("gateway announces").unwrap();
            if let Some(url) = line.strip_prefix("quotagate: proxy listening on ") {
                break url.to_string();
            }
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let direct_url = format!("http://{upstream}/api/advancedhunting/run");
        let gateway_url = format!("{proxy}/api/advancedhunting/run");
        let rss_before = kb("VmRSS:", pid);
        // Warm up both paths (connections, allocator), then measure.
        fetch(&http, &direct_url, size).await;
        let (_, metered) = fetch(&http, &gateway_url, size).await;
        assert!(metered, "the gateway metered the response");
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            direct.push(fetch(&http, &direct_url, size).await.0);
            via.push(fetch(&http, &gateway_url, size).await.0);
        }
        let peak = kb("VmHWM:", pid);
        let _ = child.kill();
        let _ = child.wait();
        let (direct, via) = (median(direct), median(via));
        let ratio = via / direct;
        let growth_mb = peak.saturating_sub(rss_before) as f64 / 1024.0;
        println!("| Response | Direct (median of {RUNS}) | Through the gateway | Ratio | Gateway RSS before | Peak RSS growth |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {:.1} MB, Stats first | {direct:.0} MB/s | {via:.0} MB/s | {ratio:.2} | {:.1} MB | {growth_mb:.1} MB |",
            size as f64 / 1e6,
            rss_before as f64 / 1024.0
        );
        assert!(ratio >= 0.8, "throughput through the gateway is {ratio:.2}× the direct transfer");
        assert!(growth_mb < 32.0, "the gateway's RSS grew {growth_mb:.1} MB");
    });
}
