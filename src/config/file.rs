//! The configuration file as written: serde structs that mirror the TOML.
//!
//! Nothing here is checked beyond its syntax; [`super::validate`] turns a
//! [`File`] into a runtime [`super::Config`] and reports every problem at once.
//! Durations stay strings here so that validation can name the field of a bad one.

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Proxy listener for base-URL mode.
    pub listen: String,
    /// Admin listener: health and metrics.
    pub admin_listen: String,
    /// Largest request body forwarded, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Extra time every admission holds its slot beyond the window's length.
    #[serde(default = "default_guard")]
    pub guard: String,
    /// Period of the sweep that frees idle keys.
    #[serde(default = "default_idle_sweep")]
    pub idle_sweep: String,
    /// Proxy listeners bound to a single upstream.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
    /// The upstream APIs.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamFile>,
    /// Settings every policy inherits.
    #[serde(default)]
    pub policy_defaults: PolicyDefaultsFile,
    /// Policies, first match wins.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyFile>,
}

fn default_max_body() -> u64 {
    16 * 1024 * 1024
}
fn default_guard() -> String {
    "250ms".into()
}
fn default_idle_sweep() -> String {
    "30s".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub listen: String,
    /// Name of the upstream every request on this listener goes to.
    pub upstream: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub name: String,
    /// Scheme and authority, for example `https://api.security.microsoft.com`.
    pub url: String,
    /// `defender` or `graph`: decides the error shape clients expect.
    pub kind: String,
    /// Path prefixes that route a base-URL request here.
    #[serde(default)]
    pub route_prefixes: Vec<String>,
}

/// Every field is optional: an unset one falls back to the built-in value.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyDefaultsFile {
    pub key: Option<String>,
    pub mode: Option<String>,
    pub max_wait: Option<String>,
    pub max_queue: Option<usize>,
    pub connect_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub total_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub name: String,
    /// HTTP methods this policy meters; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Upstream names this policy applies to; empty means any.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Path patterns.
    pub paths: Vec<String>,
    /// Call windows: at most `limit` calls in any interval of length `per`.
    pub windows: Vec<WindowFile>,
    pub key: Option<String>,
    pub mode: Option<String>,
    pub max_wait: Option<String>,
    pub max_queue: Option<usize>,
    pub connect_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub total_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    pub limit: u64,
    pub per: String,
}
