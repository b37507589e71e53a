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
    /// On SIGTERM or SIGINT: how long in-flight and admissible queued requests may finish.
    #[serde(default = "default_drain")]
    pub drain: String,
    /// Longest a response write may wait for a client that takes no bytes
    /// before its connection is closed.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: String,
    /// Metered request bodies up to this many bytes are kept for replay, so
    /// a call the upstream throttles can be retried; larger ones are not.
    #[serde(default = "default_retry_body")]
    pub retry_body_bytes: u64,
    /// First wait after an upstream throttle that names no time; doubles per attempt.
    #[serde(default = "default_backoff_base")]
    pub backoff_base: String,
    /// Longest such wait.
    #[serde(default = "default_backoff_cap")]
    pub backoff_cap: String,
    /// One info line per metered request (tenant, app, policy, decision, wait, status).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Per-tenant metrics name at most this many tenants; the rest are summed as `other`.
    #[serde(default = "default_metrics_max_tenants")]
    pub metrics_max_tenants: usize,
    /// How a caller is told apart: `key` (an API key in `api_key_header`),
    /// `app` (the token's app id) or `anonymous`. Unset: `key` when any
    /// `[[client]]` has a key, else `anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_identity: Option<String>,
    /// The request header that carries a client's API key.
    #[serde(default = "default_api_key_header")]
    pub api_key_header: String,
    /// Whether a request may pick its priority class with `x-quotagate-priority`.
    #[serde(default)]
    pub allow_priority_header: bool,
    /// Whether a listener on a non-loopback address may serve without client keys.
    #[serde(default)]
    pub allow_anonymous_on_network: bool,
    /// TLS for every proxy listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFile>,
    /// The clients that share the gateway.
    #[serde(default, rename = "client", skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientFile>,
    /// PEM files of extra CA certificates the upstream client trusts besides
    /// the Web PKI roots (a private upstream, a test emulator).
    #[serde(default)]
    pub trust_ca_files: Vec<String>,
    /// The HTTPS forward proxy for scripts that hard-code Microsoft hosts; off when absent.
    #[serde(default)]
    pub forward_proxy: Option<ForwardProxyFile>,
    /// Proxy listeners bound to a single upstream.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
    /// The upstream APIs.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamFile>,
    /// Settings every policy inherits.
    #[serde(default)]
    pub policy_defaults: PolicyDefaultsFile,
    /// Advanced hunting: running-time budgets, estimates, lookback and rows.
    #[serde(default)]
    pub hunting: HuntingFile,
    /// Policies, first match wins.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyFile>,
    /// Where the quota state lives: memory, an embedded SQLite file, or Redis.
    #[serde(default)]
    pub store: StoreFile,
}

/// The `[store]` table; every field has a default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreFile {
    /// `sqlite` (durable, the default), `redis` (shared by replicas) or `memory`.
    pub backend: String,
    /// The SQLite file; unset: `$STATE_DIRECTORY/quotagate-state.db`, else
    /// `quotagate-state.db` in the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Start empty, loudly, when the file is corrupt or cannot be written,
    /// instead of refusing to start.
    pub allow_start_empty: bool,
    /// `full`: every group commit is fsynced (survives power loss); `normal`:
    /// written to the OS before the call goes (survives `kill -9`), fsynced
    /// at checkpoints.
    pub sync: String,
    /// The Redis URL (`redis://` or `rediss://`, password allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// While Redis is unreachable: `fail-closed` (503) or `local` (limit ÷ replicas).
    pub on_outage: String,
    /// How many replicas share the Redis store.
    pub replicas: u32,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// For `rediss://`: a PEM file of the CA certificates Redis's
    /// certificate is checked against, instead of the Web PKI roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            backend: "sqlite".into(),
            path: None,
            allow_start_empty: false,
            sync: "full".into(),
            url: None,
            on_outage: "fail-closed".into(),
            replicas: 1,
            key_prefix: "quotagate".into(),
            ca_file: None,
        }
    }
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
fn default_drain() -> String {
    "30s".into()
}
fn default_send_timeout() -> String {
    "60s".into()
}
fn default_retry_body() -> u64 {
    1024 * 1024
}
fn default_backoff_base() -> String {
    "1s".into()
}
fn default_backoff_cap() -> String {
    "60s".into()
}
fn default_api_key_header() -> String {
    "x-quotagate-key".into()
}
fn default_true() -> bool {
    true
}
fn default_metrics_max_tenants() -> usize {
    50
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
    /// Connect to this address instead of resolving the url's host; TLS
    /// still verifies the url's host name. Its port is used unless the url names one.
    pub connect_to: Option<String>,
}

/// The `[forward_proxy]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardProxyFile {
    /// Where clients' `HTTPS_PROXY` points.
    pub listen: String,
    /// Directory of the local CA (`ca.pem`, `ca.key`); default
    /// `$STATE_DIRECTORY/ca`, else `quotagate-ca` in the working directory.
    pub ca_dir: Option<String>,
    /// `host:port` targets outside the upstream table that `CONNECT` may
    /// reach as a blind tunnel: never inspected, never metered.
    #[serde(default)]
    pub allow_tunnel: Vec<String>,
}

/// Every field is optional: an unset one falls back to the built-in value.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyDefaultsFile {
    pub key: Option<String>,
    pub max_attempts: Option<u32>,
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
    /// Attempts at the upstream, the first included, when it throttles.
    pub max_attempts: Option<u32>,
    /// Advanced hunting: its calls spend the tenant's running time, metered
    /// against the `[hunting]` budgets (or this policy's `running_time`).
    #[serde(default)]
    pub hunting: bool,
    /// Running-time budgets of this hunting policy, instead of `[hunting].budgets`.
    pub running_time: Option<Vec<BudgetFile>>,
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

/// At most `limit` of query running time in any interval of length `per`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    pub limit: String,
    pub per: String,
}

/// The `[hunting]` table; every field has a default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HuntingFile {
    /// Running-time budgets every hunting policy applies unless it sets its own.
    pub budgets: Vec<BudgetFile>,
    /// Who shares a ledger of running time: `tenant` or `tenant+app`.
    pub key: String,
    /// Running time reserved for a query before its key has any history.
    pub estimate: String,
    /// The learnt estimate: this percentile of the key's recent costs.
    pub estimate_percentile: u8,
    /// How many recent costs the estimate is learnt from.
    pub estimate_samples: usize,
    /// `query`: a query text that ran `estimate_query_runs` times reserves
    /// its own costs' percentile; `key`: every query the key's.
    pub estimate_by: String,
    /// Most query texts whose costs a key keeps (`estimate_by = "query"`).
    pub estimate_queries: usize,
    /// Runs of a query text before its own costs make its estimate.
    pub estimate_query_runs: usize,
    /// Most queries in flight at once per key; 0 for no cap.
    pub max_concurrent: usize,
    /// Most bytes of a response held back looking for `Stats`.
    pub stats_prefix_bytes: usize,
    /// Most decoded bytes of one response read looking for `Stats`.
    pub max_scan_bytes: u64,
    /// `warn`, `reject` or `off`: what to do with a query that reaches past `lookback_limit`.
    pub lookback: String,
    pub lookback_limit: String,
    /// A result with this many rows is probably truncated by the service.
    pub max_rows: u64,
}

impl Default for HuntingFile {
    fn default() -> Self {
        HuntingFile {
            budgets: vec![
                BudgetFile { limit: "10m".into(), per: "1h".into() },
                BudgetFile { limit: "4h".into(), per: "24h".into() },
            ],
            key: "tenant".into(),
            estimate: "10s".into(),
            estimate_percentile: 95,
            estimate_samples: 50,
            estimate_by: "query".into(),
            estimate_queries: 100,
            estimate_query_runs: 3,
            max_concurrent: 0,
            stats_prefix_bytes: 64 * 1024,
            max_scan_bytes: 256 * 1024 * 1024,
            lookback: "warn".into(),
            lookback_limit: "30d".into(),
            max_rows: 100_000,
        }
    }
}

/// TLS certificate and key, PEM files.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The certificate chain, leaf first.
    pub cert_file: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// One client of a shared gateway.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Shown in logs and metrics.
    pub name: String,
    /// Hex SHA-256 of the client's API key (`printf %s KEY | sha256sum`).
    pub key_sha256: Option<String>,
    /// The token app id that names this client when `client_identity = "app"`.
    pub app_id: Option<String>,
    /// Relative share among waiting clients of the same priority (default 1).
    pub weight: Option<u32>,
    /// `interactive`, `normal` (default) or `batch`.
    pub priority: Option<String>,
    /// At most this percentage of every window of a key.
    pub cap_percent: Option<u8>,
    /// This percentage of every window goes to the client first while it waits.
    pub reserved_percent: Option<u8>,
    /// Runaway-loop guard: sustained requests per second, checked before any queue.
    pub guard_per_second: Option<u32>,
    /// Runaway-loop guard: requests allowed at once beyond the rate (default: the rate).
    pub guard_burst: Option<u32>,
}
