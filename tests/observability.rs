//! What operators see: `/quota` and the per-tenant quota metrics, bounded.

mod support;

use support::emulator::{Emulator, EmulatorConfig};
use support::gateway::TestGateway;
use support::{bearer, client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_status_and_per_tenant_metrics_match_the_traffic() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(
        &emu.url(),
        r#"
metrics_max_tenants = 2

[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{ limit = 5, per = "20s" }, { limit = 100, per = "60s" }]
"#,
    )
    .await;
    let http = client();
    for tenant in ["a", "a", "b", "c", "d"] {
        let r = http
            .get(gw.url("/api/incidents"))
            .header("authorization", bearer(tenant, "app"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let quota: serde_json::Value =
        http.get(gw.admin_url("/quota")).send().await.unwrap().json().await.unwrap();
    let tenants = quota["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 4);
    assert_eq!(tenants[0]["tenant"], "a");
    let key = &tenants[0]["keys"][0];
    assert_eq!((key["policy"].as_str(), key["app"].as_str()), (Some("incidents"), Some("app")));
    let w = &key["windows"][0];
    assert_eq!(
        (w["limit"].as_u64(), w["used"].as_u64(), w["remaining"].as_u64()),
        (Some(5), Some(2), Some(3))
    );
    assert_eq!(w["window_seconds"].as_f64(), Some(20.0));
    let reset = w["reset_seconds"].as_f64().unwrap();
    assert!(reset > 19.0 && reset <= 20.1, "{reset}");
    assert_eq!(key["queued"], 0);
    assert!(key["held_for_seconds"].is_null());

    let used = |tenant: &str| {
        format!("quotagate_quota_used{{policy=\"incidents\",tenant=\"{tenant}\",window=\"20s\"}}")
    };
    assert_eq!(gw.metric(&used("a")).await, 2.0);
    assert_eq!(gw.metric(&used("b")).await, 1.0);
    assert_eq!(gw.metric(&used("other")).await, 2.0, "c and d are folded into other");
    let text = http.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("tenant=\"c\"") && !text.contains("tenant=\"d\""), "tenant labels are bounded");
    assert_eq!(
        gw.metric("quotagate_quota_remaining{policy=\"incidents\",tenant=\"a\",window=\"60s\"}").await,
        98.0
    );
    assert_eq!(
        gw.metric("quotagate_quota_limit{policy=\"incidents\",tenant=\"other\",window=\"20s\"}").await,
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_each_upstream_and_fails_when_one_cannot_resolve() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), "").await;
    let r = client().get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["upstreams"].as_array().unwrap().len(), 3);

    let text = support::gateway::config_text(&emu.url(), "").replace(
        &format!("name = \"mde\"\nurl = \"{}\"", emu.url()),
        "name = \"mde\"\nurl = \"http://no-such-host.invalid\"",
    );
    assert!(text.contains("no-such-host.invalid"));
    let gw = TestGateway::start_with(&text).await;
    let r = client().get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["ready"], false);
    let mde = body["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == "mde").unwrap();
    assert_eq!(mde["resolvable"], false);
}

/// One raw HTTP/1.1 GET with the given `Host`, as a browser page whose name
/// was rebound to 127.0.0.1 would send it: the status and the body.
async fn get_with_host(addr: std::net::SocketAddr, path: &str, host: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_admin_listener_refuses_requests_addressed_to_other_names() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), "").await;
    let port = gw.admin.port();
    for path in ["/quota", "/metrics", "/", "/healthz"] {
        let (status, body) = get_with_host(gw.admin, path, &format!("rebind.example:{port}")).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("`rebind.example:") && body.contains("DNS rebinding"), "{body}");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")] {
        let (status, body) = get_with_host(gw.admin, "/quota", &host).await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains("\"tenants\""), "{body}");
    }

    // Exposed on purpose (all addresses, as in a container), it answers any name.
    let text = support::gateway::config_text(&emu.url(), "")
        .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"0.0.0.0:0\"");
    let exposed = TestGateway::start_with(&text).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], exposed.admin.port()));
    let (status, body) = get_with_host(addr, "/quota", "quotagate.monitoring.svc:7481").await;
    assert_eq!(status, 200, "{body}");
}
