//! The request path across a reload, in-process: a worker not yet refreshed
//! keeps serving its configuration, clients and guards together.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use http::StatusCode;

use super::{proxy, Gateway, Worker};
use crate::config::Config;
use crate::metrics::Metrics;

/// One keyed client, `tool` (key `tool-key`), with `guard` lines; the
/// upstream is a closed port, so whatever passes the guard gets a 502.
fn config(guard: &str) -> Config {
    let text = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
client_identity = "key"

[[upstream]]
name = "defender"
url = "http://api.security.microsoft.com"
kind = "defender"
route_prefixes = ["/api/"]
connect_to = "127.0.0.1:9"

[[client]]
name = "tool"
key_sha256 = "{}"
{guard}
"#,
        sha256_hex("tool-key")
    );
    Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn request() -> Request {
    Request::builder()
        .uri("http://127.0.0.1/api/machines")
        .header("x-quotagate-key", "tool-key")
        .body(Body::empty())
        .expect("a request")
}

#[tokio::test]
async fn a_worker_not_yet_refreshed_checks_its_own_configurations_guards() {
    let gateway = Arc::new(Gateway::new(Arc::new(config("")), Arc::new(Metrics::new(1))));
    let worker = Worker::new(gateway.clone(), 0);
    // The reload gives the client a guard of one request; the worker has
    // not been refreshed yet, so it still serves the unguarded client.
    gateway.replace_config(config("guard_per_second = 1\nguard_burst = 1"));
    for _ in 0..3 {
        let status = proxy(&worker, None, request()).await.status();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "the configuration without a guard serves it");
    }
    worker.refresh();
    assert_eq!(proxy(&worker, None, request()).await.status(), StatusCode::BAD_GATEWAY);
    let refused = proxy(&worker, None, request()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "the reloaded guard holds after the refresh");
    assert!(refused.headers().contains_key(http::header::RETRY_AFTER));
}
