//! The admin listener: the status page, liveness, readiness, quota status
//! and Prometheus metrics, served apart from proxy traffic.

mod host;
pub mod probe;
mod quota;

/// The status page: bars of every tenant's windows from `/quota`,
/// refreshing by itself, with no external assets.
const PAGE: &str = include_str!("page.html");

use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use http::header::CONTENT_TYPE;

use crate::app::Gateway;

pub fn router(gateway: Arc<Gateway>) -> Router {
    let loopback = gateway.config().admin_listen.ip().is_loopback();
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/quota", get(quota_status))
        .with_state(gateway);
    // `admin_listen` needs a restart to change, so this holds for the process.
    if loopback {
        router.layer(axum::middleware::from_fn(host::guard))
    } else {
        router
    }
}

/// Ready when the config is loaded (it is, or the process would not be
/// serving), the quota store answers (memory and SQLite: always, once
/// opened; Redis: unless it is down and the config fails closed) and every
/// upstream host resolves (an upstream with `connect_to` needs no lookup).
/// 503 with the same body otherwise.
async fn ready(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let mut upstreams = Vec::new();
    for u in &gw.config().upstreams {
        let lookup = tokio::net::lookup_host((u.host(), u.port()));
        let resolvable = u.connect_to.is_some()
            || match tokio::time::timeout(std::time::Duration::from_secs(2), lookup).await {
                Ok(Ok(mut addrs)) => addrs.next().is_some(),
                _ => false,
            };
        upstreams.push(serde_json::json!({"name": u.name, "host": u.host(), "resolvable": resolvable}));
    }
    let ready = upstreams.iter().all(|u| u["resolvable"] == true) && gw.store.ready();
    let status = if ready { http::StatusCode::OK } else { http::StatusCode::SERVICE_UNAVAILABLE };
    let loaded = gw.loaded.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let body = serde_json::json!({
        "ready": ready,
        "config": {"loaded": true, "generation": loaded.generation, "hash": loaded.hash,
            "policies": gw.config().policies.0.len()},
        "store": gw.store.status(),
        "upstreams": upstreams,
        "keys": gw.limiter.keys(),
    });
    (status, axum::Json(body))
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let keys = gw.limiter.snapshot(&gw.config().policies);
    let runtime = runtime_status(&gw);
    let text = gw.metrics.render(&keys, &runtime, gw.config().metrics_max_tenants);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn quota_status(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    axum::Json(quota::report(&gw.limiter.snapshot(&gw.config().policies), &runtime_status(&gw)))
}

/// Every running-time key, reported against what every hunting policy allows.
fn runtime_status(gw: &Gateway) -> Vec<crate::admission::runtime::RuntimeStatus> {
    let strictest = gw.config().policies.strictest_budgets();
    gw.runtime.snapshot(&gw.store.budgets_now(&strictest))
}
