//! The admin listener: liveness, readiness and Prometheus metrics, served
//! apart from proxy traffic.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use http::header::CONTENT_TYPE;

use crate::app::Gateway;

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
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
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], gw.metrics.render())
}
