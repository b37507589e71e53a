//! The real gateway server, started in-process on port 0 in front of an upstream URL.

use std::net::SocketAddr;
use std::time::Duration;

use quotagate::config::Config;
use quotagate::server::{self, Running};

/// A running gateway; stopped when dropped.
pub struct TestGateway {
    running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// Extra (bound) listeners, in configured order.
    pub bound: Vec<SocketAddr>,
    /// The forward-proxy listener, when configured.
    pub forward: Option<SocketAddr>,
}

/// Config text with every upstream at `upstream`, listeners on port 0, a
/// 5 ms guard, followed by `rest` (policies, policy_defaults, listeners).
/// Top-level keys at the start of `rest`, before its first table, go to the top.
/// The quota store is memory unless `rest` has a `[store]` table, so a test
/// that runs the binary leaves no state file behind for the next one.
pub fn config_text(upstream: &str, rest: &str) -> String {
    let split = rest.find("\n[").map_or(rest.len(), |i| i + 1);
    let (top, rest) = rest.split_at(split);
    let store = if rest.contains("[store]") { "" } else { "[store]\nbackend = \"memory\"\n" };
    format!(
        r#"
{top}
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "5ms"
idle_sweep = "1s"
max_body_bytes = 1048576

[[upstream]]
name = "defender"
url = "{upstream}"
kind = "defender"
route_prefixes = ["/api/"]

[[upstream]]
name = "mde"
url = "{upstream}"
kind = "defender"

[[upstream]]
name = "graph"
url = "{upstream}"
kind = "graph"
route_prefixes = ["/v1.0/", "/beta/"]

{rest}
{store}
"#
    )
}

impl TestGateway {
    /// Start on a full config text. The quota store is memory unless the
    /// text has a `[store]` table.
    pub async fn start_with(text: &str) -> TestGateway {
        let text = if text.contains("[store]") {
            text.to_string()
        } else {
            format!("{text}\n[store]\nbackend = \"memory\"\n")
        };
        let config = Config::from_toml(&text, "test config").unwrap_or_else(|e| panic!("{e}"));
        let running = server::start(config).await.expect("gateway starts");
        TestGateway {
            proxy: running.proxy_addrs[0],
            bound: running.proxy_addrs[1..].to_vec(),
            admin: running.admin_addr,
            forward: running.forward_proxy_addr,
            running: Some(running),
        }
    }

    /// Start in front of `upstream` with `rest` appended to the standard test config.
    pub async fn start(upstream: &str, rest: &str) -> TestGateway {
        Self::start_with(&config_text(upstream, rest)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The value of a metric line that starts with `prefix` (name and labels).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl TestGateway {
    /// Stop as SIGTERM would, letting requests finish for `drain`.
    pub async fn stop_within(mut self, drain: Duration) {
        if let Some(running) = self.running.take() {
            running.stop_within(drain).await.expect("the gateway stops cleanly");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            tokio::spawn(running.stop());
        }
    }
}
