//! The Redis store (placeholder until it is wired).

use crate::config::Config;

use super::StoreError;

pub struct RedisStore;

impl RedisStore {
    pub fn new(_config: &Config, _url: &str, _metrics: &crate::metrics::Metrics) -> Result<Self, StoreError> {
        Err(StoreError::Redis("not built yet".into()))
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({"kind": "redis"})
    }

    pub fn ready(&self) -> bool {
        true
    }
}

/// A Redis URL with its password replaced, for logs and status.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
