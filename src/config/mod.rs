//! Configuration: the file's schema, the built-in defaults, and validation.
//!
//! `load` parses; [`validate`] reports every problem at once, each naming the
//! field it is about and, through [`problem`], its line in the file; and yields a [`Config`] whose values cannot be invalid
//! (non-zero limits, compiled path patterns, resolved upstream names).

mod clients;
pub mod file;
pub mod live;
pub mod problem;
mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use file::File;
pub use problem::Problem;

use crate::hunting::Hunting;
use crate::identity::client::{IdentityMode, Roster};
use crate::policy::{Policies, Timeouts};
use crate::upstream::route::Upstream;

/// The built-in defaults, a commented TOML file.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A proxy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    /// The upstream every request goes to; `None` routes by host and path.
    pub upstream: Option<usize>,
}

/// The validated `[forward_proxy]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardProxySpec {
    pub listen: SocketAddr,
    /// Where the local CA lives.
    pub ca_dir: std::path::PathBuf,
    /// Lower-case `host:port` targets allowed as blind tunnels.
    pub allow_tunnel: Vec<String>,
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listeners; the first is the base-URL listener.
    pub listeners: Vec<ListenerSpec>,
    pub admin_listen: SocketAddr,
    pub upstreams: Vec<Upstream>,
    pub policies: Policies,
    /// Timeouts for requests no policy meters.
    pub unmetered_timeouts: Timeouts,
    pub max_body_bytes: u64,
    pub guard: Duration,
    pub idle_sweep: Duration,
    /// How long a stopping gateway lets requests finish.
    pub drain: Duration,
    /// Longest a write to a proxy client may wait without progress.
    pub send_timeout: Duration,
    /// Metered bodies up to this size are kept for a retry.
    pub retry_body_bytes: u64,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// One info line per metered request.
    pub access_log: bool,
    /// Per-tenant metrics name at most this many tenants.
    pub metrics_max_tenants: usize,
    /// Advanced hunting's running time, lookback and rows.
    pub hunting: Hunting,
    /// SHA-256 (hex) of the text this was loaded from.
    pub source_hash: String,
    /// The clients sharing the gateway and how they are told apart.
    pub clients: Roster,
    /// Whether a non-loopback listener may serve without client keys.
    pub allow_anonymous_on_network: bool,
    /// TLS for every proxy listener.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The HTTPS forward proxy, when configured.
    pub forward_proxy: Option<ForwardProxySpec>,
    /// Extra CA certificates the upstream client trusts (DER), read from `trust_ca_files`.
    pub trust_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Where the quota state lives.
    pub store: crate::store::StoreConfig,
}

/// Everything wrong with a configuration, one line each, in the form
/// `FILE:LINE: field: message` that editors and CI logs link to.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// Not TOML, or not this schema (an unknown field, a wrong type).
    #[error("{}", located(origin, *line, field.as_deref(), message))]
    Parse { origin: String, line: Option<usize>, field: Option<String>, message: String },
    #[error(
        "{origin}: {} problem(s):\n{}",
        problems.len(),
        problems.iter().map(|p| located(origin, p.line, Some(&p.field()), &p.message)).collect::<Vec<_>>().join("\n")
    )]
    Invalid { origin: String, problems: Vec<Problem> },
}

/// `FILE:LINE: field: message`, leaving out what is not known.
fn located(origin: &str, line: Option<usize>, field: Option<&str>, message: &str) -> String {
    let mut out = origin.to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    out.push_str(": ");
    if let Some(field) = field {
        out.push_str(field);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

impl Config {
    /// The built-in defaults.
    pub fn builtin() -> Config {
        Config::from_toml(DEFAULT_TOML, "built-in defaults").expect("the built-in defaults are valid")
    }

    /// Parse and validate TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let file = parse(text, origin)?;
        let mut config = validate::validate(&file).map_err(|mut problems| {
            problem::locate(text, &mut problems);
            ConfigError::Invalid { origin: origin.into(), problems }
        })?;
        use sha2::Digest as _;
        config.source_hash =
            sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Ok(config)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Why these listeners may not serve as configured: a listener on a
    /// non-loopback address needs client keys unless config allows
    /// anonymous callers on the network. Checked by validation, and again
    /// after command-line overrides of the addresses.
    pub fn exposure_problem(&self) -> Option<String> {
        let proxy = self.forward_proxy.as_ref().map(|fp| fp.listen);
        exposure_problem(&self.listeners, proxy, self.clients.mode, self.allow_anonymous_on_network)
    }

    /// A human-readable table of the effective policies.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "listeners{}:", if self.tls.is_some() { " (TLS)" } else { "" });
        for l in &self.listeners {
            let to = l.upstream.map_or("routed by host and path".to_string(), |u| {
                format!("bound to {}", self.upstreams[u].name)
            });
            let _ = writeln!(out, "  {} ({to})", l.addr);
        }
        let _ = writeln!(out, "  {} (admin: health and metrics)", self.admin_listen);
        if let Some(fp) = &self.forward_proxy {
            let _ = writeln!(
                out,
                "  {} (forward proxy: CONNECT to upstream hosts; CA in {}; blind tunnels {:?})",
                fp.listen,
                fp.ca_dir.display(),
                fp.allow_tunnel
            );
        }
        let _ = writeln!(out, "upstreams:");
        for u in &self.upstreams {
            let _ = write!(
                out,
                "  {:<12} {}://{} {:?} prefixes {:?}",
                u.name, u.scheme, u.authority, u.kind, u.route_prefixes
            );
            let _ = match u.connect_to {
                Some(addr) => writeln!(out, " connect to {addr}"),
                None => writeln!(out),
            };
        }
        let _ = writeln!(out, "policies (first match wins; guard {:?}):", self.guard);
        for p in &self.policies.0 {
            let windows: Vec<String> = p
                .windows
                .iter()
                .map(|w| format!("{}/{}", w.limit, humantime::format_duration(w.per)))
                .collect();
            let methods = if p.methods.is_empty() {
                "ANY".to_string()
            } else {
                p.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
            };
            let _ = writeln!(
                out,
                "  {:<18} {methods:<6} {:<40} windows [{}] key {} mode {:?} max_wait {} max_queue {}",
                p.name,
                p.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "),
                windows.join(", "),
                p.key,
                p.mode,
                humantime::format_duration(p.max_wait),
                p.max_queue
            );
            if p.hunting {
                let budgets: Vec<String> = p
                    .budgets
                    .iter()
                    .map(|b| {
                        format!(
                            "{}/{}",
                            humantime::format_duration(b.limit),
                            humantime::format_duration(b.per)
                        )
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<18} running time [{}] per {}",
                    "",
                    budgets.join(", "),
                    if self.hunting.key == crate::quota::KeyScope::Tenant { "tenant" } else { "tenant+app" }
                );
            }
        }
        let h = &self.hunting;
        let _ = writeln!(
            out,
            "hunting: estimate {} then p{} of the last {} costs {}; lookback {:?} past {}; row cap {}",
            humantime::format_duration(h.estimator.default),
            h.estimator.percentile,
            h.estimator.samples,
            match h.estimator.by {
                crate::admission::runtime::EstimateBy::Key => "of the key".to_string(),
                crate::admission::runtime::EstimateBy::Query => format!(
                    "of the query text once it ran {} times (up to {} texts per key), else of the key",
                    h.estimator.query_runs, h.estimator.queries
                ),
            },
            h.lookback,
            humantime::format_duration(h.lookback_limit),
            h.max_rows
        );
        let _ = writeln!(out, "everything else: forwarded unmetered, counted");
        let mode = match self.clients.mode {
            IdentityMode::Key => format!("by API key in {}", self.clients.header),
            IdentityMode::App => "by the token's app id".to_string(),
            IdentityMode::Anonymous => "anonymous".to_string(),
        };
        let header = if self.clients.allow_priority_header { "allowed" } else { "ignored" };
        let _ = writeln!(out, "clients ({mode}; x-quotagate-priority {header}):");
        for c in self.clients.configured() {
            let s = &c.share;
            let _ = writeln!(
                out,
                "  {:<18} weight {} {} cap {}% reserved {}% guard {}",
                c.name,
                s.weight,
                s.class.as_str(),
                s.cap_percent.unwrap_or(100),
                s.reserved_percent,
                c.guard.map_or("none".to_string(), |g| format!("{}/s burst {}", g.per_second, g.burst))
            );
        }
        let s = &self.store;
        let _ = match &s.backend {
            crate::store::Backend::Memory => writeln!(out, "store: memory (lost on restart)"),
            crate::store::Backend::Sqlite { path } => writeln!(
                out,
                "store: sqlite file {} (sync {:?}, allow_start_empty {})",
                path.display(),
                s.sync,
                s.allow_start_empty
            ),
            crate::store::Backend::Redis { url } => writeln!(
                out,
                "store: redis {} (on outage {:?}, {} replicas)",
                crate::store::redis::redact(url),
                s.on_outage,
                s.replicas
            ),
        };
        out
    }
}

/// See [`Config::exposure_problem`]; `forward_proxy` is the forward proxy's
/// listener, which serves the same callers.
fn exposure_problem(
    listeners: &[ListenerSpec],
    forward_proxy: Option<SocketAddr>,
    mode: IdentityMode,
    allow_anonymous: bool,
) -> Option<String> {
    if mode == IdentityMode::Key || allow_anonymous {
        return None;
    }
    let named = listeners.iter().map(|l| ("listen", l.addr));
    let (name, open) = named
        .chain(forward_proxy.map(|a| ("forward_proxy.listen", a)))
        .find(|(_, a)| !a.ip().is_loopback())?;
    Some(format!(
        "{name} {open} is not loopback: configure [[client]] keys or set allow_anonymous_on_network = true"
    ))
}

/// Parse TOML into the file schema.
pub fn parse(text: &str, origin: &str) -> Result<File, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|span| span.start);
        ConfigError::Parse {
            origin: origin.into(),
            line: at.map(|at| problem::line_at(text, at)),
            field: at.and_then(|at| problem::path_at(text, at)),
            message: e.message().trim_end().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_timeout_past_a_day_is_refused() {
        // Past what tokio's timer adds to an instant without panicking, too.
        for long in ["25h", "300000000000y"] {
            let text = DEFAULT_TOML.replace("send_timeout = \"60s\"", &format!("send_timeout = \"{long}\""));
            let err = Config::from_toml(&text, "t").unwrap_err().to_string();
            assert!(err.contains("send_timeout: must be at most 24h"), "{err}");
        }
    }

    #[test]
    fn builtin_defaults_carry_the_published_limits() {
        let c = Config::builtin();
        let find = |name: &str| c.policies.0.iter().find(|p| p.name == name).unwrap();
        let limits = |name: &str| {
            find(name).windows.iter().map(|w| (w.limit.get(), w.per.as_secs())).collect::<Vec<_>>()
        };
        assert_eq!(limits("hunting"), vec![(45, 60), (1500, 3600)]);
        assert_eq!(limits("incidents"), vec![(50, 60), (1500, 3600)]);
        assert_eq!(limits("mde-entities"), vec![(100, 60), (1500, 3600)]);
        assert_eq!(limits("indicator-import"), vec![(30, 60)]);
        assert_eq!(limits("live-response"), vec![(10, 60)]);
        assert!(find("hunting").timeouts.header >= Duration::from_secs(200));
        let budgets = |name: &str| {
            find(name).budgets.iter().map(|b| (b.limit.as_secs(), b.per.as_secs())).collect::<Vec<_>>()
        };
        assert_eq!(budgets("hunting"), vec![(600, 3600), (4 * 3600, 86_400)]);
        assert_eq!(budgets("hunting-mde"), vec![(600, 3600), (3 * 3600, 86_400)]);
        assert!(budgets("incidents").is_empty());
        assert_eq!(c.hunting.max_rows, 100_000);
        assert_eq!(c.hunting.lookback_limit, Duration::from_secs(30 * 86_400));
        assert_eq!(c.hunting.key, crate::quota::KeyScope::Tenant);
        // Both hunting policies share the tenant's ledger: it keeps a day,
        // and its status shows what both allow (the MDE profile's 3 h a day).
        assert_eq!(c.hunting.retention, Duration::from_secs(86_400));
        let strictest: Vec<_> =
            c.policies.strictest_budgets().iter().map(|b| (b.limit.as_secs(), b.per.as_secs())).collect();
        assert_eq!(strictest, vec![(600, 3600), (3 * 3600, 86_400)]);
        assert!(c.listeners[0].addr.ip().is_loopback() && c.admin_listen.ip().is_loopback());
    }

    #[test]
    fn the_printed_defaults_load_back_unchanged() {
        let printed = DEFAULT_TOML;
        assert_eq!(parse(printed, "printed").unwrap(), parse(DEFAULT_TOML, "builtin").unwrap());
        assert_eq!(Config::from_toml(printed, "printed").unwrap().describe(), Config::builtin().describe());
    }

    #[test]
    fn policy_matching_on_the_defaults() {
        let c = Config::builtin();
        let name = |m: &str, up: usize, path: &str| {
            c.policies.find(&m.parse().unwrap(), up, path).map(|p| p.name.clone())
        };
        assert_eq!(name("POST", 0, "/api/advancedhunting/run").as_deref(), Some("hunting"));
        assert_eq!(name("POST", 1, "/api/advancedqueries/run").as_deref(), Some("hunting-mde"));
        assert_eq!(name("POST", 0, "/api/advancedqueries/run").as_deref(), Some("hunting"));
        assert_eq!(name("POST", 2, "/v1.0/security/runHuntingQuery").as_deref(), Some("hunting"));
        // Regression: the Graph SDKs post to the namespace-qualified action,
        // which the built-in policy missed (forwarded unmetered).
        let qualified = "/v1.0/security/microsoft.graph.security.runHuntingQuery";
        assert_eq!(name("POST", 2, qualified).as_deref(), Some("hunting"));
        let beta = "/beta/security/microsoft.graph.security.runHuntingQuery";
        assert_eq!(name("POST", 2, beta).as_deref(), Some("hunting"));
        assert_eq!(name("GET", 0, "/api/incidents/42").as_deref(), Some("incidents"));
        assert_eq!(name("POST", 1, "/api/machines/m1/runliveresponse").as_deref(), Some("live-response"));
        assert_eq!(name("GET", 1, "/api/machines/m1").as_deref(), Some("mde-entities"));
        assert_eq!(name("POST", 1, "/api/indicators/import").as_deref(), Some("indicator-import"));
        assert_eq!(name("GET", 2, "/v1.0/users"), None);
    }
}
