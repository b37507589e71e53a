//! A large hunting result through the gateway, against a direct transfer.
//!
//! `cargo bench --bench hunting_stream [-- MEGABYTES]` (default 100)
//!
//! Serves one Defender hunting response of MEGABYTES (with `Stats` first, as
//! the service sends it) from an upstream process on loopback, then fetches it
//! with curl alternately straight from the upstream and through the release
//! gateway binary (metering it: `Stats` read from the held-back prefix, the
//! headers added, the rest streamed), five times each. Three processes, as in
//! production: upstream, gateway, client. Prints the median throughput
//! of both, their ratio, and how much the gateway's resident memory grew
//! while carrying the transfers. Fails if the ratio is below 0.8 or the
//! growth reaches 32 MB.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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

/// Fetch `url` as a hunting query with curl, discarding the body; MB/s.
fn fetch(url: &str, expect: usize) -> (f64, bool) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}\n",
            "-X",
            "POST",
        ])
        .args(["-H", &format!("Authorization: Bearer {}", token()), "-H", "Content-Type: application/json"])
        .args(["--data", r#"{"Query":"DeviceEvents | take 100000"}"#, url])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let metered = text.to_ascii_lowercase().contains("x-quotagate-execution-time: 1.5");
    let last = text.lines().last().unwrap_or_default();
    let mut parts = last.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
    let (size, speed) = (parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0));
    assert_eq!(size as usize, expect, "whole body");
    (speed / 1e6, metered)
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

/// The upstream: serve one hunting response of `megabytes` on loopback, print the port.
fn serve(megabytes: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let data = hunting_body(megabytes * 1_000_000);
        let size = data.len();
        let app = axum::Router::new().fallback(move || {
            let data = data.clone();
            async move {
                let chunks: Vec<Result<Bytes, Infallible>> = (0..size)
                    .step_by(64 * 1024)
                    .map(|i| Ok(data.slice(i..(i + 64 * 1024).min(size))))
                    .collect();
                let mut r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                r.headers_mut().insert("content-length", size.into());
                r
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{} {size}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

/// Start a child process and read its first line that `pick` accepts. The
/// caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
fn start(cmd: &mut Command, pick: impl Fn(&str) -> Option<String>) -> (std::process::Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("child starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("child announces").unwrap();
        if let Some(found) = pick(&line) {
            return (child, found);
        }
    }
}

fn main() {
    let megabytes: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(100);
    if std::env::var_os("HUNTING_STREAM_UPSTREAM").is_some() {
        return serve(megabytes);
    }
    let me = std::env::current_exe().unwrap();
    let (mut upstream_proc, announced) =
        start(Command::new(&me).arg(megabytes.to_string()).env("HUNTING_STREAM_UPSTREAM", "1"), |l| {
            Some(l.to_string())
        });
    let (upstream, size) = announced.split_once(' ').unwrap();
    let size: usize = size.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    let text = quotagate::config::DEFAULT_TOML
        .replace("https://api.security.microsoft.com", &format!("http://{upstream}"))
        .replace("listen = \"127.0.0.1:7480\"", "listen = \"127.0.0.1:0\"")
        .replace("admin_listen = \"127.0.0.1:7481\"", "admin_listen = \"127.0.0.1:0\"")
        .replace("access_log = true", "access_log = false");
    std::fs::write(&config, text).unwrap();
    let (mut gateway, proxy) = start(
        Command::new(env!("CARGO_BIN_EXE_quotagate"))
            .args(["--config", config.to_str().unwrap(), "--workers", "1"])
            // The built-in store is a state file: keep it in the temporary directory.
            .env("STATE_DIRECTORY", dir.path()),
        |l| l.strip_prefix("quotagate: proxy listening on ").map(str::to_string),
    );
    let pid = gateway.id();
    let direct_url = format!("http://{upstream}/api/advancedhunting/run");
    let gateway_url = format!("{proxy}/api/advancedhunting/run");
    let rss_before = kb("VmRSS:", pid);
    // Warm up both paths, then measure, alternating.
    fetch(&direct_url, size);
    let (_, metered) = fetch(&gateway_url, size);
    assert!(metered, "the gateway metered the response");
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        direct.push(fetch(&direct_url, size).0);
        via.push(fetch(&gateway_url, size).0);
    }
    let peak = kb("VmHWM:", pid);
    for child in [&mut gateway, &mut upstream_proc] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (direct, via) = (median(direct), median(via));
    let ratio = via / direct;
    let growth_mb = peak.saturating_sub(rss_before) as f64 / 1024.0;
    println!("| Response | Direct (median of {RUNS}) | Through the gateway | Ratio | Gateway RSS at start | Peak RSS growth |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.1} MB, Stats first | {direct:.0} MB/s | {via:.0} MB/s | {ratio:.2} | {:.1} MB | {growth_mb:.1} MB |",
        size as f64 / 1e6,
        rss_before as f64 / 1024.0
    );
    assert!(ratio >= 0.8, "throughput through the gateway is {ratio:.2}× the direct transfer");
    assert!(growth_mb < 32.0, "the gateway's RSS grew {growth_mb:.1} MB");
}
