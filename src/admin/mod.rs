//! The admin listener: the status page, liveness, readiness, quota status
//! and Prometheus metrics, served apart from proxy traffic.

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
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/quota", get(quota_status))
        .with_state(gateway)
}

async fn ready(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "ready": true,
        "policies": gw.config.policies.0.len(),
        "upstreams": gw.config.upstreams.iter().map(|u| &u.name).collect::<Vec<_>>(),
        "keys": gw.limiter.keys(),
    }))
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let keys = gw.limiter.snapshot(&gw.config.policies);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], gw.metrics.render(&keys, gw.config.metrics_max_tenants))
}

async fn quota_status(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    axum::Json(quota::report(&gw.limiter.snapshot(&gw.config.policies)))
}
