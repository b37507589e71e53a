#![allow(dead_code)]
//! Shared parts of the integration tests: the upstream emulator, a gateway
//! started in-process on port 0 in front of it, and token minting.

pub mod emulator;
pub mod gateway;
pub mod hunt;
pub mod process;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// A v1.0 access token for a tenant and app (unsigned: the gateway never verifies).
pub fn token(tenant: &str, app: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"tid": tenant, "appid": app, "ver": "1.0", "aud": "https://api.security.microsoft.com"})
            .to_string(),
    );
    format!("{header}.{payload}.sig")
}

/// `Authorization` header value for a tenant and app.
pub fn bearer(tenant: &str, app: &str) -> String {
    format!("Bearer {}", token(tenant, app))
}

/// A plain-HTTP client without automatic decompression or redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}
