//! Graceful shutdown of the real binary: SIGTERM with requests in flight and
//! in the queue. Every client gets a complete response or a 503 with
//! `Retry-After` in its error shape, and the process exits within its drain time.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::emulator::{Emulator, EmulatorConfig, DELAY_HEADER};
use support::gateway::config_text;
use support::{bearer, client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_what_fits_in_the_drain_and_answers_the_rest_503() {
    drain_then_stop("").await;
}

/// The same on Redis, whose waiters ask Redis for their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_what_fits_in_the_drain_and_answers_the_rest_503_on_redis() {
    let redis = support::process::Redis::start();
    drain_then_stop(&format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url())).await;
}

/// SIGTERM with two calls in flight and five queued; `store` is the
/// gateway's `[store]` table (none: memory).
async fn drain_then_stop(store: &str) {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quotagate.toml");
    let rest = format!(
        r#"drain = "1500ms"

[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{{ limit = 2, per = "1s" }}]
max_wait = "10s"

{store}"#
    );
    let text = config_text(&emu.url(), &rest);
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let proxy = lines.next().unwrap().unwrap().rsplit("http://").next().unwrap().to_string();

    // Two calls in flight for 600 ms; two queued for the slots that free at
    // 1 s, inside the drain; three queued for the slots at 2 s and 3 s, after it.
    let http = client();
    let call = |delay_ms: u64| {
        let req = http
            .get(format!("http://{proxy}/api/incidents"))
            .header("authorization", bearer("tenant-stop", "app"))
            .header(DELAY_HEADER, delay_ms.to_string());
        tokio::spawn(async move {
            let r = req.send().await.expect("every client gets an answer");
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = r.json().await.expect("a complete JSON body");
            (status, retry_after, body, Instant::now())
        })
    };
    let started = Instant::now();
    let mut calls = vec![call(600), call(600)];
    tokio::time::sleep(Duration::from_millis(50)).await;
    calls.extend([call(0), call(0), call(0), call(0), call(0)]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let stopped = Instant::now();

    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "the gateway exits cleanly: {status:?}");
    assert!(stopped.elapsed() < Duration::from_millis(1500 + 1000), "it stopped within its drain time");

    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(ok, 4, "the two in flight and the two whose slots came within the drain: {answers:?}");
    assert_eq!(refused.len(), 3, "{answers:?}");
    for (_, retry_after, body, answered) in refused {
        // Answered once its slot is known to come too late, well before
        // the drain's end (1.5 s after the signal), not held until then.
        let after = answered.duration_since(stopped);
        assert!(after < Duration::from_millis(1100), "a refused call waited {after:?} after the signal");
        let secs: u64 = retry_after.as_deref().expect("Retry-After").parse().unwrap();
        assert!((1..=3).contains(&secs), "the time until its slot: {secs}");
        assert_eq!(body["error"]["code"], "ServiceUnavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("shutting down") && message.ends_with(&format!("again in {secs} seconds.")));
    }
    // The queued calls past the drain were answered at once, not at its end.
    assert!(started.elapsed() >= Duration::from_millis(1000), "two queued calls waited for their slots");
    assert_eq!(emu.count(), 4, "only admitted calls reached the upstream");
}
