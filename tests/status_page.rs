//! The status page in a real headless browser (Debian's `chromium`, which
//! `.ci/run` installs): its bars show the numbers `/quota` reports.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::emulator::{Emulator, EmulatorConfig};
use support::gateway::TestGateway;
use support::{bearer, client};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The `data-*` attributes of every bar element in the rendered DOM.
fn bars(dom: &str) -> Vec<BTreeMap<String, String>> {
    dom.split("<div class=\"bar ")
        .skip(1)
        .map(|rest| {
            let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
            let mut attrs = BTreeMap::new();
            attrs.insert("class".to_string(), tag.split('"').next().unwrap_or("").to_string());
            for part in tag.split("\" ") {
                if let Some((name, value)) = part.trim().split_once("=\"") {
                    if let Some(name) = name.strip_prefix("data-") {
                        attrs.insert(name.to_string(), value.trim_end_matches('"').to_string());
                    }
                }
            }
            attrs
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_quota_reports() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)"
    );
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(
        &emu.url(),
        r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{ limit = 5, per = "60s" }, { limit = 20, per = "3600s" }]
mode = "reject"

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run"]
windows = [{ limit = 5, per = "60s" }]
hunting = true
"#,
    )
    .await;
    let http = client();
    // One hunting query of 0.5 s: the light tenant's running-time ledger.
    let r = http
        .post(gw.url("/api/advancedhunting/run"))
        .header("authorization", bearer("tenant-light", "app"))
        .body(r#"{"Query": "DeviceEvents | take 1 // cost=0.5"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (tenant, calls) in [("tenant-full", 5), ("tenant-light", 1)] {
        for _ in 0..calls {
            let r = http
                .get(gw.url("/api/incidents"))
                .header("authorization", bearer(tenant, "app"))
                .send()
                .await;
            assert_eq!(r.unwrap().status(), 200);
        }
    }
    let profile = tempfile::tempdir().unwrap();
    let url = gw.admin_url("/");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                &format!("--user-data-dir={}", profile.path().display()),
                "--dump-dom",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let bars = bars(&dom);
    assert_eq!(bars.len(), 7, "two tenants, two windows each, one hunting window, two budgets; DOM:\n{dom}");

    let quota: serde_json::Value =
        http.get(gw.admin_url("/quota")).send().await.unwrap().json().await.unwrap();
    for tenant in quota["tenants"].as_array().unwrap() {
        for key in tenant["keys"].as_array().unwrap() {
            for w in key["windows"].as_array().unwrap() {
                let bar = bars
                    .iter()
                    .find(|b| {
                        b["tenant"] == tenant["tenant"].as_str().unwrap()
                            && b["policy"] == key["policy"].as_str().unwrap()
                            && b["window"].parse::<f64>().ok() == w["window_seconds"].as_f64()
                    })
                    .unwrap_or_else(|| panic!("no bar for {tenant} {w}"));
                assert_eq!(bar["used"], w["used"].to_string());
                assert_eq!(bar["limit"], w["limit"].to_string());
                assert_eq!(bar["remaining"], w["remaining"].to_string());
            }
        }
    }
    for ledger in quota["running_time"].as_array().unwrap() {
        for b in ledger["budgets"].as_array().unwrap() {
            let bar = bars
                .iter()
                .find(|x| {
                    x["tenant"] == ledger["tenant"].as_str().unwrap()
                        && x["policy"] == "running-time"
                        && x["window"].parse::<f64>().ok() == b["window_seconds"].as_f64()
                })
                .unwrap_or_else(|| panic!("no running-time bar for {b}"));
            assert_eq!(bar["used"].parse::<f64>().unwrap(), 0.5, "charged from Stats");
            let number = |k: &str| bar[k].parse::<f64>().unwrap();
            assert_eq!(number("limit"), b["limit_seconds"].as_f64().unwrap());
            assert_eq!(number("remaining"), b["remaining_seconds"].as_f64().unwrap());
        }
    }
    let full = bars.iter().find(|b| b["tenant"] == "tenant-full" && b["window"] == "60").unwrap();
    assert_eq!((full["used"].as_str(), full["class"].as_str()), ("5", "full"), "a full window is red");
    let light = bars.iter().find(|b| b["tenant"] == "tenant-light" && b["window"] == "60").unwrap();
    assert_eq!((light["used"].as_str(), light["class"].as_str()), ("1", "ok"));
}
