//! Real client libraries against the real gateway: each test starts the
//! emulator and the gateway in-process on port 0 and runs a published client
//! library (installed by `.ci/run` from `tests/clients/requirements.txt`)
//! as a subprocess pointed at the gateway's base URL, then asserts on the
//! JSON the script prints and on what the upstream saw.
//!
//! What this does not cover: clients that hard-code Microsoft's host names
//! (they reach the gateway as an HTTPS proxy, see `tests/forward_proxy.rs`).

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::emulator::{Emulator, EmulatorConfig, QuotaRule};
use support::gateway::TestGateway;
use support::token;

/// Where the Graph SDKs post a hunting query: the namespace-qualified action.
const SDK_HUNT: &str = "/v1.0/security/microsoft.graph.security.runHuntingQuery";

/// A command with no proxy settings inherited from the machine, so the
/// client talks to the gateway on loopback directly.
fn clean(program: &str) -> Command {
    let mut c = Command::new(program);
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        c.env_remove(var);
    }
    c.env("NO_PROXY", "*");
    c
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("python3 runs")).await.unwrap()
}

/// Issue #10, case 1: the Microsoft Graph Python SDK (msgraph-sdk) runs
/// hunting queries through the gateway. It parses an admitted call's rows;
/// with its retry handler off, the gateway's local 429 surfaces as an
/// ODataError with status 429, `Retry-After` and Graph's `TooManyRequests`
/// code; with its default retry handler it honours `Retry-After` and the
/// call succeeds. The upstream, holding the same quota, never throttles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_python_sdk_parses_results_and_handles_the_gateways_429() {
    let window = Duration::from_secs(2);
    let emu = Emulator::start(EmulatorConfig::new().quota(QuotaRule::new(
        "graph-hunting",
        &["/v1.0/security/"],
        &[(1, window)],
    )))
    .await;
    let gw = TestGateway::start(
        &emu.url(),
        &format!(
            r#"
[[policy]]
name = "graph-hunting"
methods = ["POST"]
paths = ["/v1.0/security/runHuntingQuery", "{SDK_HUNT}"]
windows = [{{ limit = 1, per = "2s" }}]
hunting = true
mode = "reject"
"#
        ),
    )
    .await;

    let mut python = clean("python3");
    python
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/graph_sdk.py"))
        .env("GATEWAY", format!("http://{}", gw.proxy))
        .env("TOKEN", token("tenant-sdk", "app-sdk"))
        .env("QUERY", "DeviceProcessEvents | take 10 // cost=0.05 bytes=2500");
    let out = run(python).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the script failed (is msgraph-sdk installed? .ci/run installs tests/clients/requirements.txt):\n{stderr}"
    );
    let calls: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));

    eprintln!("{calls}");
    // An admitted call: the SDK deserialised the emulator's Graph answer.
    let first = &calls["first"];
    assert_eq!(first["outcome"], "ok", "{calls}");
    assert_eq!(first["rows"], 3, "bytes=2500 pads the result to three rows: {calls}");
    assert_eq!(first["first_x"], "row-00000000-", "{calls}");
    assert_eq!(first["schema"], serde_json::json!(["x"]), "{calls}");

    // Retries off: the gateway's 429 is an APIError the caller can inspect.
    let refused = &calls["no_retry"];
    assert_eq!(refused["outcome"], "error", "{calls}");
    assert_eq!(refused["error_type"], "ODataError", "{calls}");
    assert_eq!(refused["status"], 429, "{calls}");
    assert_eq!(refused["code"], "TooManyRequests", "Graph's error code: {calls}");
    assert_eq!(refused["throttled_by"], "gateway", "{calls}");
    let retry_after: u64 = refused["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "whole seconds within the 2 s window: {calls}");
    assert!(refused["seconds"].as_f64().unwrap() < 1.0, "rejected at once, not queued: {calls}");

    // Default retry handler: it slept Retry-After and its retry was admitted.
    let retried = &calls["retried"];
    assert_eq!(retried["outcome"], "ok", "{calls}");
    assert_eq!(retried["rows"], 3, "{calls}");
    let waited = retried["seconds"].as_f64().unwrap();
    assert!(waited >= 1.0, "the SDK waited for Retry-After before retrying, waited {waited}: {calls}");

    assert_eq!(emu.throttled(), 0, "the upstream never throttled");
    // Regression: the SDK's namespace-qualified path was not recognised as
    // hunting (by the built-in policy or the emulator) and went unmetered.
    let hunts = emu.requests().into_iter().filter(|r| r.path_and_query == SDK_HUNT).count();
    assert_eq!(hunts, 2, "the first call and the retried one");
    assert_eq!(
        gw.metric("quotagate_requests_total{decision=\"rejected\",policy=\"graph-hunting\"}").await,
        2.0,
        "the no-retry call and the retry handler's first attempt"
    );
}
