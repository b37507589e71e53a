//! The real binary's logs at trace level: one access line per metered
//! request, and never a token, an API key or a query's text.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use support::emulator::{Emulator, EmulatorConfig, QuotaRule};
use support::gateway::config_text;

/// The one configured client's API key, which must never be logged.
const API_KEY: &str = "API-KEY-THAT-MUST-NOT-LEAK";

fn sha256_hex(key: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_trace_level_hold_no_token_and_no_query() {
    let rule =
        QuotaRule::new("hunting", &["/api/advancedhunting/run"], &[(1, std::time::Duration::from_secs(1))]);
    let emu = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(
            &emu.url(),
            r#"
[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run"]
windows = [{ limit = 5, per = "1s" }]
max_wait = "3s"
hunting = true

[[client]]
name = "logs-tool"
key_sha256 = "KEY_HASH"

[hunting]
lookback = "reject"
"#
            .replace("KEY_HASH", &sha256_hex(API_KEY))
            .as_str(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .current_dir(config.parent().unwrap())
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Only the first line is read, then stdout is closed: the gateway must go
    // on (it once panicked printing its admin address to a closed stdout).
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let proxy = line.rsplit("http://").next().unwrap().to_string();
    // Drain the logs as they come, so a full pipe never blocks the gateway.
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).unwrap();
        logs
    });

    let token = support::token("tenant-logs", "app-logs").replace(".sig", ".SIGNATURE-THAT-MUST-NOT-LEAK");
    let query = "DeviceProcessEvents | where ProcessCommandLine has 'QUERY-TEXT-THAT-MUST-NOT-LEAK'";
    let http = support::client();
    for _ in 0..3 {
        // The second call in the same second is throttled by the emulator and retried.
        let r = http
            .post(format!("http://{proxy}/api/advancedhunting/run"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-quotagate-key", API_KEY)
            .json(&serde_json::json!({ "Query": query }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A lookback refused at info level: its message names the date, not the query.
    let far_back = "DeviceEvents | where Timestamp > datetime(2001-01-01 LOOKBACK-TEXT-THAT-MUST-NOT-LEAK)";
    let r = http
        .post(format!("http://{proxy}/api/advancedhunting/run"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-quotagate-key", API_KEY)
        .json(&serde_json::json!({ "Query": far_back }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("datetime(2001-01-01)"));
    let bad = http
        .post(format!("http://{proxy}/api/advancedhunting/run"))
        .header("authorization", "Bearer BROKEN-TOKEN-THAT-MUST-NOT-LEAK")
        .header("x-quotagate-key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let wrong_key = http
        .post(format!("http://{proxy}/api/advancedhunting/run"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-quotagate-key", "WRONG-KEY-THAT-MUST-NOT-LEAK")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_key.status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = drain.join().unwrap();

    assert!(logs.lines().count() > 20, "trace logging is on:\n{logs}");
    let payload = token.split('.').nth(1).unwrap();
    for secret in [
        payload,
        "SIGNATURE-THAT-MUST-NOT-LEAK",
        "QUERY-TEXT-THAT-MUST-NOT-LEAK",
        "LOOKBACK-TEXT-THAT-MUST-NOT-LEAK",
        "BROKEN-TOKEN-THAT-MUST-NOT-LEAK",
        API_KEY,
        "WRONG-KEY-THAT-MUST-NOT-LEAK",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request")
        .collect();
    assert_eq!(access.len(), 3, "one access line per admitted metered request");
    assert_eq!(access[0]["fields"]["tenant"], "tenant-logs");
    assert_eq!(access[0]["fields"]["policy"], "hunting");
    assert_eq!(access[0]["fields"]["client"], "logs-tool", "the client's name, never its key");
    assert_eq!(access[0]["fields"]["status"], 200);
    // The emulator's Stats come first: the running time charged is on the line.
    assert_eq!(access[0]["fields"]["running_time_s"], 0.01, "{:?}", access[0]);
    assert!(access.iter().any(|a| a["fields"]["attempts"] == 2), "a retried call says so: {access:?}");
}

/// Text logs written to a pipe or a file carry no terminal colour codes,
/// which would otherwise litter files and journals.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // The built-in defaults, on ports of its own (its state file in `dir`).
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("STATE_DIRECTORY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("admin listening"));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut logs = String::new();
    child.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(listening, "the gateway did not start:\n{logs}");
    assert!(logs.contains("admin listening"), "the startup lines are logged:\n{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in:\n{logs:?}");
}
