//! The Grafana dashboard queries only metrics a live gateway exports, so it
//! cannot go stale when a metric is renamed.

mod support;

use std::collections::BTreeSet;

use support::emulator::{Emulator, EmulatorConfig};
use support::gateway::TestGateway;
use support::{bearer, client};

/// Metric names in a PromQL expression: `quotagate_` followed by name characters.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("quotagate_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_exists() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/quotagate-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(wanted.len() >= 10, "{wanted:?}");

    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(
        &emu.url(),
        r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{ limit = 5, per = "10s" }]

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run"]
windows = [{ limit = 5, per = "10s" }]
hunting = true
"#,
    )
    .await;
    // A hunting query, so the running-time ledger exists.
    let r = client()
        .post(gw.url("/api/advancedhunting/run"))
        .header("authorization", bearer("t", "a"))
        .body(r#"{"Query": "DeviceEvents | take 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(gw.url("/api/incidents"))
        .header("authorization", bearer("t", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let exported: BTreeSet<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(m.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics the gateway does not export: {missing:?}");
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("histogram_quantile(0.5, sum by (le) (rate(quotagate_queue_wait_seconds_bucket[5m]))) / quotagate_x"),
        vec!["quotagate_queue_wait_seconds_bucket", "quotagate_x"]
    );
}
