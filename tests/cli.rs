//! The `quotagate` binary: defaults, config checking, and a real run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_quotagate");

#[test]
fn printed_defaults_load_back_and_check_config_lists_the_policies() {
    let printed = Command::new(BIN).arg("--print-default-config").output().unwrap();
    assert!(printed.status.success());
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(text.starts_with("# quotagate built-in defaults."), "a commented TOML file");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let checked = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(checked.status.success());
    let out = String::from_utf8(checked.stdout).unwrap();
    for needle in [
        "hunting",
        "45/1m, 1500/1h",
        "incidents",
        "50/1m, 1500/1h",
        "live-response",
        "10/1m",
        "indicator-import",
        "30/1m",
        "mde-entities",
        "100/1m, 1500/1h",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn check_config_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nadmin_listen = \"nope\"\n[[upstream]]\nname = \"d\"\nurl = \"https://x\"\nkind = \"defender\"\n[[policy]]\nname = \"p\"\npaths = [\"/api/x\"]\nwindows = [{ limit = 0, per = \"1 fortnight\" }]\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("3 problem(s)"), "{err}");
    assert!(err.contains("admin_listen"), "{err}");
    assert!(err.contains("policy[0] (p).windows[0].limit"), "{err}");
    assert!(err.contains("policy[0] (p).windows[0].per"), "{err}");
}

#[test]
fn the_binary_serves_on_its_defaults_with_overridden_addresses() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = |what: &str| {
        let line = lines.next().unwrap().unwrap();
        assert!(line.contains(what), "{line}");
        line.rsplit("http://").next().unwrap().to_string()
    };
    let proxy = addr("proxy listening");
    let admin = addr("admin listening");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let health = reqwest::get(format!("http://{admin}/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
        let metrics = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("quotagate_build_info"));
        // The proxy listener does not serve admin routes, and a metered call without a token stays local.
        let r = reqwest::Client::new().get(format!("http://{proxy}/api/incidents")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    });
    child.kill().unwrap();
    child.wait().unwrap();
}
