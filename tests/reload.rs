//! Hot reload of the real binary, under load: on SIGHUP and on a changed
//! file. A valid file applies with the quota state kept; an invalid one is
//! refused with its problems logged while the old one keeps running; no
//! request fails across any of it.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::emulator::{Emulator, EmulatorConfig};
use support::gateway::config_text;
use support::process::GatewayProcess;
use support::{bearer, client};

fn policy(limit: u32) -> String {
    format!(
        r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{{ limit = {limit}, per = "60s" }}]
mode = "reject"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_quota_state_refuse_bad_files_and_fail_no_request() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotagate.toml");
    std::fs::write(&path, config_text(&emu.url(), &policy(3))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args(["--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    while out.matches('\n').count() < 2 {
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the gateway announces its listeners");
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let addr = |what: &str| {
        out.lines().find(|l| l.contains(what)).unwrap().rsplit("http://").next().unwrap().to_string()
    };
    let (proxy, admin) = (addr("proxy"), addr("admin"));
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let http = client();

    // Load throughout: unmetered calls that must all succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (http, url, stop, sent, failed) = (
            http.clone(),
            format!("http://{proxy}/api/test/status/200"),
            stop.clone(),
            sent.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = http.get(&url).send().await.is_ok_and(|r| r.status() == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let call = || {
        let http = http.clone();
        let url = format!("http://{proxy}/api/incidents");
        async move {
            http.get(url)
                .header("authorization", bearer("tenant-reload", "app"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let admitted = |n: usize| async move {
        let mut ok = 0;
        for _ in 0..n {
            if call().await == 200 {
                ok += 1;
            }
        }
        ok
    };
    let generation = || {
        let http = http.clone();
        let url = format!("http://{admin}/readyz");
        async move {
            let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            v["config"]["generation"].as_u64().unwrap()
        }
    };
    let hup =
        |pid: u32| assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    let wait_for_generation = |want: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        while generation().await != want {
            assert!(Instant::now() < deadline, "generation {want} never came");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    assert_eq!(generation().await, 1);
    assert_eq!(admitted(5).await, 3, "3 per minute");

    // A valid file on SIGHUP: 5 per minute, and the 3 admitted still count.
    std::fs::write(&path, config_text(&emu.url(), &policy(5))).unwrap();
    hup(child.id());
    wait_for_generation(2).await;
    assert_eq!(admitted(5).await, 2, "the window kept its admissions under the new limit");

    // An invalid file on SIGHUP: refused, the old configuration keeps running.
    let broken = config_text(&emu.url(), &policy(5)).replace("per = \"60s\"", "per = \"soon\"");
    std::fs::write(&path, &broken).unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(generation().await, 2, "a bad file is not applied");
    assert_eq!(admitted(2).await, 0, "the old limit of 5 still holds");

    // A changed file without a signal: 7 per minute.
    std::fs::write(&path, config_text(&emu.url(), &policy(7))).unwrap();
    wait_for_generation(3).await;
    assert_eq!(admitted(5).await, 2);

    let metrics = http.get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("quotagate_config_generation 3"), "{metrics}");
    assert!(metrics.contains("quotagate_config_reloads_total{result=\"applied\"} 2"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("quotagate_config_reloads_total{result=\"refused\"}")));

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(sent.load(Ordering::Relaxed) > 20, "load ran throughout");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across the reloads");
    assert_eq!(emu.requests().iter().filter(|r| r.path_and_query == "/api/incidents").count(), 7);

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    child.wait().unwrap();
    let logs = logs.join().unwrap();
    assert!(logs.contains("configuration refused"), "{logs}");
    assert!(logs.contains("policy[0] (incidents).windows[0].per"), "every problem is named: {logs}");
}

/// The config of a gateway whose one client sends its key in `header`.
fn keyed(upstream: &str, header: &str) -> String {
    // sha256("s3cret-tool-k3y")
    let hash = "eb24d1fb20bff9574f720a4c9134d6719111df275b2fe7965ca9a455e705dfa5";
    config_text(
        upstream,
        &format!(
            "api_key_header = \"{header}\"\n\n[[client]]\nname = \"tool\"\nkey_sha256 = \"{hash}\"\n{}",
            policy(100)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_header_renamed_by_a_reload_is_still_never_forwarded() {
    const KEY: &str = "s3cret-tool-k3y";
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotagate.toml");
    std::fs::write(&path, keyed(&emu.url(), "x-tool-key")).unwrap();
    let gateway = GatewayProcess::start(&path, dir.path()).unwrap();
    let http = client();
    // An unmetered path, and a metered one (it needs the tenant's token).
    let call = |path: &'static str, names: &'static [&'static str]| {
        let mut req = http.get(gateway.url(path)).header("authorization", bearer("tenant-rename", "app"));
        for name in names {
            req = req.header(*name, KEY);
        }
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(call("/api/test/status/200", &["x-tool-key"]).await, 200);
    assert_eq!(call("/api/test/status/200", &["x-team-key"]).await, 401, "not yet the key header");
    // A script updated before the reload sends its key under both names.
    assert_eq!(call("/api/incidents", &["x-tool-key", "x-team-key"]).await, 200);

    std::fs::write(&path, keyed(&emu.url(), "x-team-key")).unwrap();
    gateway.reload();
    gateway.until_generation(2).await;
    // A script not yet updated sends its key under both names, or the old one alone.
    assert_eq!(call("/api/incidents", &["x-team-key", "x-tool-key"]).await, 200);
    assert_eq!(call("/api/test/status/200", &["x-team-key", "x-tool-key"]).await, 200);
    assert_eq!(call("/api/test/status/200", &["x-tool-key"]).await, 401, "the old name no longer identifies");
    // The old name holding another (an older) key is removed by its name.
    let old = http
        .get(gateway.url("/api/test/status/200"))
        .header("x-team-key", KEY)
        .header("x-tool-key", "0lder-k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 200);

    let seen = emu.requests();
    assert_eq!(seen.len(), 5, "the five calls with a key went upstream");
    assert_eq!(seen.iter().filter(|r| r.path_and_query == "/api/incidents").count(), 2);
    for r in &seen {
        assert!(!r.headers.iter().any(|(_, v)| v == KEY), "the key reached the upstream: {:?}", r.headers);
        assert!(
            !r.headers.contains_key("x-tool-key"),
            "the old key header reached the upstream: {:?}",
            r.headers
        );
    }
}

/// A policy's key id follows its name across reloads: a policy a reload
/// removes and a later one brings back finds its calls still counted, and
/// a new policy never takes over a removed one's calls. (A new name took
/// the next id after the largest one running, so it could inherit a
/// removed policy's keys, and a policy brought back started afresh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_removed_and_brought_back_by_reloads_keeps_its_calls() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotagate.toml");
    let policies = |names: &[&str]| {
        let text: String = names
            .iter()
            .map(|n| {
                format!(
                    "\n[[policy]]\nname = \"{n}\"\npaths = [\"/api/{n}\"]\n\
                     windows = [{{ limit = 2, per = \"60s\" }}]\nmode = \"reject\"\n"
                )
            })
            .collect();
        config_text(&emu.url(), &text)
    };
    std::fs::write(&path, policies(&["incidents", "machines"])).unwrap();
    let gateway = GatewayProcess::start(&path, dir.path()).unwrap();
    let http = client();
    let call = |name: &str| {
        let req = http.get(gateway.url(&format!("/api/{name}"))).header("authorization", bearer("t", "a"));
        async move {
            let r = req.send().await.unwrap();
            let by = r.headers().get("x-quotagate-throttled-by").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), by)
        }
    };
    for _ in 0..2 {
        assert_eq!(call("machines").await.0, 200);
    }
    let mut generation = 1;
    let mut reload = |names: &'static [&'static str]| {
        std::fs::write(&path, policies(names)).unwrap();
        gateway.reload();
        generation += 1;
        gateway.until_generation(generation)
    };
    reload(&["incidents"]).await;
    reload(&["incidents", "alerts"]).await;
    assert_eq!(call("alerts").await, (200, None), "a new policy starts with its own calls");
    reload(&["incidents", "alerts", "machines"]).await;
    assert_eq!(
        call("machines").await,
        (429, Some("gateway".to_string())),
        "machines' two calls of the minute still count"
    );
}

/// A certificate rotated on disk (here: the files rewritten in place) is
/// served after a reload; the listener kept the one it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_rotated_certificate() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let mint = || {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap()
    };
    let first = mint();
    let text = config_text(
        &emu.url(),
        &format!(
            "\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n{}",
            cert_path.to_str().unwrap(),
            key_path.to_str().unwrap(),
            policy(100)
        ),
    );
    let path = dir.path().join("quotagate.toml");
    std::fs::write(&path, &text).unwrap();
    let gateway = GatewayProcess::start(&path, dir.path()).unwrap();
    let port = gateway.proxy.rsplit(':').next().unwrap().to_string();
    let trusting = |ca: reqwest::Certificate| {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
            .build()
            .unwrap();
        let url = format!("https://localhost:{port}/api/test/status/200");
        async move { http.get(url).header("authorization", bearer("t", "a")).send().await.map(|r| r.status()) }
    };
    assert_eq!(trusting(first.clone()).await.unwrap(), 200);

    // The same text: the generation stays, the certificate is read again.
    let second = mint();
    gateway.reload();
    let asked = std::time::Instant::now();
    while trusting(second.clone()).await.is_err() {
        assert!(asked.elapsed() < Duration::from_secs(10), "the rotated certificate is never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(trusting(first).await.is_err(), "the old certificate is not served any more");
}
