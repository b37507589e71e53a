//! From the file's text values to runtime types, with every problem at once.
//!
//! Each [`Problem`] names its field as a path into the file
//! (`policy[0].windows[1].per`), so [`super::problem::locate`] can add its line. A
//! policy field left unset takes `[policy_defaults]`, which is checked once:
//! a bad default is reported there, not again for every policy.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::{Method, Uri};

use super::file::{BudgetFile, File, ForwardProxyFile, HuntingFile, PolicyFile, StoreFile};
use super::problem::Problem;
use super::{Config, ForwardProxySpec, ListenerSpec};
use crate::admission::runtime::{EstimateBy, Estimator};
use crate::hunting::{Hunting, LookbackMode};
use crate::policy::{Mode, PathPattern, Policies, Policy, Timeouts};
use crate::quota::{Budget, KeyScope, Window};
use crate::store::{Backend, Durability, OnOutage, StoreConfig};
use crate::upstream::route::{ApiKind, Upstream};

/// Most query texts a running-time key keeps costs of: making room scans
/// them under the key's lock.
const MAX_ESTIMATE_QUERIES: usize = 10_000;

/// Most costs kept per key and per text, so that a key's history stays
/// under 10,000 × 1,000 × 8 bytes however it is configured (the defaults,
/// 100 texts of 50 costs, keep at most 40 KB).
const MAX_ESTIMATE_SAMPLES: usize = 1_000;

/// The longest `send_timeout`: a client silent for a day is gone, and a
/// longer clock than the runtime's timer can hold would panic.
const MAX_SEND_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Where a value sits in the file.
#[derive(Debug, Clone)]
pub(super) struct Field {
    path: String,
    name: Option<String>,
}

impl Field {
    fn top(path: &str) -> Field {
        Field { path: path.into(), name: None }
    }

    /// The `i`th `[[table]]` entry, named `name`.
    fn entry(table: &str, i: usize, name: &str) -> Field {
        Field { path: format!("{table}[{i}]"), name: (!name.is_empty()).then(|| name.into()) }
    }

    fn at(&self, sub: &str) -> Field {
        Field { path: format!("{}.{sub}", self.path), name: self.name.clone() }
    }
}

/// What a problem can be about: a [`Field`], or its written form
/// (`client[0] (name).weight`, `tls.cert_file`).
pub(super) trait AsField {
    fn field(&self) -> Field;
}

impl AsField for Field {
    fn field(&self) -> Field {
        self.clone()
    }
}

impl AsField for str {
    fn field(&self) -> Field {
        // `table[i] (name).rest`: the name is told apart from the path.
        match (self.find(" ("), self.find(')')) {
            (Some(open), Some(close)) if open < close => Field {
                path: format!("{}{}", &self[..open], &self[close + 1..]),
                name: Some(self[open + 2..close].to_string()).filter(|n| !n.is_empty()),
            },
            _ => Field::top(self),
        }
    }
}

impl AsField for String {
    fn field(&self) -> Field {
        self.as_str().field()
    }
}

/// Collects problems.
#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, field: &(impl AsField + ?Sized), message: impl std::fmt::Display) {
        let field = field.field();
        self.0.push(Problem { path: field.path, name: field.name, message: message.to_string(), line: None });
    }

    fn duration(&mut self, field: &Field, value: &str) -> Duration {
        match humantime::parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.push(field, "must be longer than zero");
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.push(
                    field,
                    format!("`{value}` is not a duration such as \"250ms\", \"1m\" or \"1h\" ({e})"),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn addr(&mut self, field: &Field, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.push(field, format!("`{value}` is not an address such as \"127.0.0.1:7480\""));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn key(&mut self, field: &Field, value: &str) -> KeyScope {
        value.parse().unwrap_or_else(|_| {
            self.push(field, format!("`{value}` is not one of tenant, tenant+app, tenant+app+policy"));
            KeyScope::TenantAppPolicy
        })
    }

    fn mode(&mut self, field: &Field, value: &str) -> Mode {
        match value {
            "queue" => Mode::Queue,
            "reject" => Mode::Reject,
            other => {
                self.push(field, format!("`{other}` is not queue or reject"));
                Mode::Reject
            }
        }
    }

    fn attempts(&mut self, field: &Field, value: u32) -> u32 {
        if value == 0 {
            self.push(field, "must be at least 1 (the first attempt)");
        }
        value.max(1)
    }
}

/// What a policy takes from `[policy_defaults]` for each field it leaves unset.
struct Inherited {
    key: KeyScope,
    mode: Mode,
    max_wait: Duration,
    max_queue: usize,
    max_attempts: u32,
    timeouts: Timeouts,
}

/// Validate a parsed file into a [`Config`], or list every problem.
pub fn validate(file: &File) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();
    let listen = p.addr(&Field::top("listen"), &file.listen);
    let admin_listen = p.addr(&Field::top("admin_listen"), &file.admin_listen);
    let guard = humantime::parse_duration(&file.guard).unwrap_or_else(|e| {
        p.push(&Field::top("guard"), format!("`{}` is not a duration ({e})", file.guard));
        Duration::ZERO
    });
    let idle_sweep = p.duration(&Field::top("idle_sweep"), &file.idle_sweep);
    let drain = p.duration(&Field::top("drain"), &file.drain);
    let send_timeout = p.duration(&Field::top("send_timeout"), &file.send_timeout);
    if send_timeout > MAX_SEND_TIMEOUT {
        p.push(&Field::top("send_timeout"), "must be at most 24h");
    }
    let backoff_base = p.duration(&Field::top("backoff_base"), &file.backoff_base);
    let backoff_cap = p.duration(&Field::top("backoff_cap"), &file.backoff_cap);
    if backoff_cap < backoff_base {
        p.push(&Field::top("backoff_cap"), "must not be shorter than backoff_base");
    }
    if file.max_body_bytes == 0 {
        p.push(&Field::top("max_body_bytes"), "must be more than zero");
    }

    let upstreams = upstreams(file, &mut p);
    let upstream_index = |name: &str| upstreams.iter().position(|u| u.name == name);

    let mut listeners = vec![ListenerSpec { addr: listen, upstream: None }];
    let mut listener_fields = vec![Field::top("listen")];
    for (i, l) in file.listeners.iter().enumerate() {
        let field = Field::top(&format!("listener[{i}]"));
        let addr = p.addr(&field.at("listen"), &l.listen);
        let upstream = upstream_index(&l.upstream);
        if upstream.is_none() {
            p.push(&field.at("upstream"), format!("no upstream is named `{}`", l.upstream));
        }
        listeners.push(ListenerSpec { addr, upstream });
        listener_fields.push(field.at("listen"));
    }
    let forward_proxy = file.forward_proxy.as_ref().map(|fp| forward_proxy(fp, &upstreams, &mut p));
    let mut seen = vec![admin_listen];
    let proxy_listen = forward_proxy.as_ref().map(|fp| (fp.listen, Field::top("forward_proxy").at("listen")));
    let all = listeners.iter().map(|l| l.addr).zip(listener_fields.iter().cloned()).chain(proxy_listen);
    for (addr, field) in all {
        if addr.port() != 0 && seen.contains(&addr) {
            p.push(&field, format!("{addr} is used by two listeners"));
        }
        seen.push(addr);
    }
    let trust_roots = trust_roots(&file.trust_ca_files, &mut p);

    let defaults = inherited(file, &mut p);
    let mut hunting = hunting(&file.hunting, &mut p);
    let default_budgets = budgets(&Field::top("hunting").at("budgets"), &file.hunting.budgets, &mut p);
    let mut policies = Vec::new();
    for (i, pf) in file.policies.iter().enumerate() {
        let field = Field::entry("policy", i, &pf.name);
        if file.policies[..i].iter().any(|o| o.name == pf.name) {
            p.push(&field.at("name"), "another policy has the same name");
        }
        if pf.name.is_empty() {
            p.push(&field.at("name"), "must not be empty");
        }
        let methods = pf
            .methods
            .iter()
            .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    p.push(&field.at("methods"), format!("`{m}` is not an HTTP method"));
                    None
                }
            })
            .collect();
        let mut ups = Vec::new();
        for name in &pf.upstreams {
            match upstream_index(name) {
                Some(u) => ups.push(u),
                None => p.push(&field.at("upstreams"), format!("no upstream is named `{name}`")),
            }
        }
        if pf.paths.is_empty() {
            p.push(&field.at("paths"), "must list at least one path pattern");
        }
        let paths = pf
            .paths
            .iter()
            .enumerate()
            .filter_map(|(j, s)| {
                PathPattern::parse(s).map_err(|e| p.push(&field.at(&format!("paths[{j}]")), e)).ok()
            })
            .collect();
        if pf.windows.is_empty() {
            p.push(&field.at("windows"), "must list at least one window");
        }
        let mut windows = Vec::new();
        for (j, w) in pf.windows.iter().enumerate() {
            let wf = field.at(&format!("windows[{j}]"));
            let per = p.duration(&wf.at("per"), &w.per);
            match u32::try_from(w.limit).ok().and_then(NonZeroU32::new) {
                Some(limit) => windows.push(Window::new(limit, per)),
                None => p.push(&wf.at("limit"), format!("must be between 1 and {}", u32::MAX)),
            }
        }
        let key = pf.key.as_ref().map_or(defaults.key, |k| p.key(&field.at("key"), k));
        let mode = pf.mode.as_ref().map_or(defaults.mode, |m| p.mode(&field.at("mode"), m));
        let max_wait =
            pf.max_wait.as_ref().map_or(defaults.max_wait, |w| p.duration(&field.at("max_wait"), w));
        let max_attempts =
            pf.max_attempts.map_or(defaults.max_attempts, |a| p.attempts(&field.at("max_attempts"), a));
        let timeouts = own_timeouts(&field, pf, defaults.timeouts, &mut p);
        let budgets = match (&pf.running_time, pf.hunting) {
            (Some(own), true) => budgets(&field.at("running_time"), own, &mut p),
            (None, true) => default_budgets.clone(),
            (Some(_), false) => {
                p.push(&field.at("running_time"), "only a policy with `hunting = true` spends running time");
                Vec::new()
            }
            (None, false) => Vec::new(),
        };
        policies.push(Policy {
            id: u16::try_from(i).unwrap_or(u16::MAX),
            key_id: u16::try_from(i).unwrap_or(u16::MAX),
            name: pf.name.clone(),
            methods,
            upstreams: ups,
            paths,
            kept: windows.clone(),
            windows,
            key,
            mode,
            max_wait,
            max_queue: pf.max_queue.unwrap_or(defaults.max_queue),
            max_attempts,
            hunting: pf.hunting,
            budgets,
            timeouts,
        });
    }
    if file.policies.len() >= usize::from(u16::MAX) {
        p.push(&Field::top("policy"), "too many policies");
    }
    let store = store(&file.store, &mut p);

    let clients = super::clients::roster(file, &mut p);
    let tls = file.tls.as_ref().and_then(|t| super::tls::server_config(t, &mut p));
    let proxy = forward_proxy.as_ref().map(|fp| fp.listen);
    if let Some(problem) =
        super::exposure_problem(&listeners, proxy, clients.mode, file.allow_anonymous_on_network)
    {
        p.push("listen", problem);
    }

    // Policies of one shared key scope keep each other's windows.
    let shared: Vec<(KeyScope, Vec<Window>)> = policies.iter().map(|p| (p.key, p.windows.clone())).collect();
    for policy in policies.iter_mut().filter(|p| p.key != KeyScope::TenantAppPolicy) {
        policy.kept =
            shared.iter().filter(|(k, _)| *k == policy.key).flat_map(|(_, w)| w.iter().copied()).collect();
    }
    let policies = Policies(policies);
    hunting.retention = policies.longest_budget();
    if p.0.is_empty() {
        Ok(Config {
            listeners,
            admin_listen,
            upstreams,
            policies,
            unmetered_timeouts: defaults.timeouts,
            max_body_bytes: file.max_body_bytes,
            guard,
            idle_sweep,
            drain,
            send_timeout,
            retry_body_bytes: file.retry_body_bytes,
            backoff_base,
            backoff_cap,
            metrics_max_tenants: file.metrics_max_tenants,
            access_log: file.access_log,
            hunting,
            source_hash: String::new(),
            clients,
            allow_anonymous_on_network: file.allow_anonymous_on_network,
            tls,
            forward_proxy,
            trust_roots,
            store,
        })
    } else {
        Err(p.0)
    }
}

/// The `[forward_proxy]` table. A blind tunnel must name a port and no
/// upstream host: those are always intercepted and metered.
fn forward_proxy(fp: &ForwardProxyFile, upstreams: &[Upstream], p: &mut Problems) -> ForwardProxySpec {
    let field = Field::top("forward_proxy");
    let listen = p.addr(&field.at("listen"), &fp.listen);
    let mut allow_tunnel = Vec::new();
    for (i, target) in fp.allow_tunnel.iter().enumerate() {
        let f = field.at(&format!("allow_tunnel[{i}]"));
        match target.parse::<http::uri::Authority>() {
            Ok(a) if a.port_u16().is_some() && !a.host().is_empty() => {
                if crate::upstream::route::by_host(upstreams, a.host()).is_some() {
                    p.push(
                        &f,
                        format!(
                            "`{target}` is an upstream host: it is intercepted and metered, never tunnelled"
                        ),
                    );
                }
                allow_tunnel.push(a.as_str().to_ascii_lowercase());
            }
            _ => {
                p.push(&f, format!("`{target}` is not a host:port such as \"login.microsoftonline.com:443\""))
            }
        }
    }
    ForwardProxySpec {
        listen,
        ca_dir: fp.ca_dir.as_ref().map_or_else(crate::forward_proxy::ca::default_dir, Into::into),
        allow_tunnel,
    }
}

/// The certificates of `trust_ca_files`, each file holding one or more PEM certificates.
fn trust_roots(files: &[String], p: &mut Problems) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let field = Field::top(&format!("trust_ca_files[{i}]"));
        let certs: Result<Vec<_>, _> = match rustls::pki_types::CertificateDer::pem_file_iter(path) {
            Ok(iter) => iter.collect(),
            Err(e) => Err(e),
        };
        match certs {
            Ok(certs) if certs.is_empty() => p.push(&field, format!("`{path}` holds no PEM certificate")),
            Ok(certs) => roots.extend(certs),
            Err(e) => p.push(&field, format!("cannot read certificates from `{path}`: {e}")),
        }
    }
    roots
}

/// The `[hunting]` table.
fn hunting(h: &HuntingFile, p: &mut Problems) -> Hunting {
    let field = Field::top("hunting");
    let key = match h.key.as_str() {
        "tenant" => KeyScope::Tenant,
        "tenant+app" => KeyScope::TenantApp,
        other => {
            p.push(&field.at("key"), format!("`{other}` is not tenant or tenant+app"));
            KeyScope::Tenant
        }
    };
    if !(1..=100).contains(&h.estimate_percentile) {
        p.push(&field.at("estimate_percentile"), "must be between 1 and 100");
    }
    if !(1..=MAX_ESTIMATE_SAMPLES).contains(&h.estimate_samples) {
        p.push(&field.at("estimate_samples"), format!("must be between 1 and {MAX_ESTIMATE_SAMPLES}"));
    }
    let by = match h.estimate_by.as_str() {
        "query" => EstimateBy::Query,
        "key" => EstimateBy::Key,
        other => {
            p.push(&field.at("estimate_by"), format!("`{other}` is not query or key"));
            EstimateBy::Query
        }
    };
    if !(1..=MAX_ESTIMATE_QUERIES).contains(&h.estimate_queries) {
        p.push(&field.at("estimate_queries"), format!("must be between 1 and {MAX_ESTIMATE_QUERIES}"));
    }
    if h.estimate_query_runs == 0 {
        p.push(&field.at("estimate_query_runs"), "must be at least 1");
    } else if h.estimate_query_runs > h.estimate_samples {
        p.push(
            &field.at("estimate_query_runs"),
            format!("must be at most estimate_samples ({}): a text keeps no more costs", h.estimate_samples),
        );
    }
    if h.stats_prefix_bytes < 1024 {
        p.push(&field.at("stats_prefix_bytes"), "must be at least 1024 bytes");
    }
    if h.max_scan_bytes < 1024 * 1024 {
        p.push(&field.at("max_scan_bytes"), "must be at least 1048576 bytes (1 MiB)");
    }
    let lookback = match h.lookback.as_str() {
        "warn" => LookbackMode::Warn,
        "reject" => LookbackMode::Reject,
        "off" => LookbackMode::Off,
        other => {
            p.push(&field.at("lookback"), format!("`{other}` is not warn, reject or off"));
            LookbackMode::Warn
        }
    };
    if h.max_rows == 0 {
        p.push(&field.at("max_rows"), "must be more than zero");
    }
    Hunting {
        key,
        estimator: Estimator {
            default: p.duration(&field.at("estimate"), &h.estimate),
            percentile: h.estimate_percentile.clamp(1, 100),
            samples: h.estimate_samples.max(1),
            by,
            queries: h.estimate_queries.max(1),
            query_runs: h.estimate_query_runs.max(1),
        },
        max_concurrent: (h.max_concurrent > 0).then_some(h.max_concurrent),
        stats_prefix_bytes: h.stats_prefix_bytes,
        max_scan_bytes: h.max_scan_bytes,
        lookback,
        lookback_limit: p.duration(&field.at("lookback_limit"), &h.lookback_limit),
        max_rows: h.max_rows,
        // Known once the policies are: see `validate`.
        retention: Duration::ZERO,
    }
}

/// The `[store]` table.
fn store(s: &StoreFile, p: &mut Problems) -> StoreConfig {
    let field = Field::top("store");
    let backend = match s.backend.as_str() {
        "memory" => Backend::Memory,
        "sqlite" => Backend::Sqlite {
            path: s
                .path
                .as_ref()
                .filter(|p| !p.is_empty())
                .map_or_else(crate::store::default_path, Into::into),
        },
        "redis" => match s.url.as_deref() {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Backend::Redis { url: url.into() }
            }
            Some(_) => {
                p.push(&field.at("url"), "must be a redis:// or rediss:// URL");
                Backend::Memory
            }
            None => {
                p.push(&field.at("url"), "the redis backend needs a url such as \"redis://127.0.0.1:6379\"");
                Backend::Memory
            }
        },
        other => {
            p.push(&field.at("backend"), format!("`{other}` is not sqlite, redis or memory"));
            Backend::Memory
        }
    };
    let on_outage = match s.on_outage.as_str() {
        "fail-closed" => OnOutage::FailClosed,
        "local" => OnOutage::Local,
        other => {
            p.push(&field.at("on_outage"), format!("`{other}` is not fail-closed or local"));
            OnOutage::FailClosed
        }
    };
    let sync = match s.sync.as_str() {
        "full" => Durability::Full,
        "normal" => Durability::Normal,
        other => {
            p.push(&field.at("sync"), format!("`{other}` is not full or normal"));
            Durability::Full
        }
    };
    let replicas = NonZeroU32::new(s.replicas).unwrap_or_else(|| {
        p.push(&field.at("replicas"), "must be at least 1");
        NonZeroU32::MIN
    });
    if s.key_prefix.is_empty() {
        p.push(&field.at("key_prefix"), "must not be empty");
    }
    let ca_pem = s.ca_file.as_ref().and_then(|path| match std::fs::read(path) {
        Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Some(pem),
        Ok(_) => {
            p.push(&field.at("ca_file"), format!("{path} holds no PEM certificate"));
            None
        }
        Err(e) => {
            p.push(&field.at("ca_file"), format!("cannot read {path}: {e}"));
            None
        }
    });
    if ca_pem.is_some() && !s.url.as_deref().is_some_and(|u| u.starts_with("rediss://")) {
        p.push(&field.at("ca_file"), "is for a rediss:// (TLS) url only");
    }
    StoreConfig {
        backend,
        allow_start_empty: s.allow_start_empty,
        sync,
        on_outage,
        replicas,
        key_prefix: s.key_prefix.clone(),
        ca_pem,
    }
}

/// Running-time budgets: at most `limit` of running time per `per`.
fn budgets(field: &Field, list: &[BudgetFile], p: &mut Problems) -> Vec<Budget> {
    if list.is_empty() {
        p.push(field, "must list at least one budget");
    }
    list.iter()
        .enumerate()
        .map(|(j, b)| {
            let entry = Field { path: format!("{}[{j}]", field.path), name: field.name.clone() };
            Budget {
                limit: p.duration(&entry.at("limit"), &b.limit),
                per: p.duration(&entry.at("per"), &b.per),
            }
        })
        .collect()
}

/// `[policy_defaults]`, each unset field taking the built-in value.
fn inherited(file: &File, p: &mut Problems) -> Inherited {
    let d = &file.policy_defaults;
    let field = Field::top("policy_defaults");
    let or = |own: &Option<String>, builtin: &str| own.clone().unwrap_or_else(|| builtin.into());
    let timeouts = Timeouts {
        connect: p.duration(&field.at("connect_timeout"), &or(&d.connect_timeout, "10s")),
        header: p.duration(&field.at("header_timeout"), &or(&d.header_timeout, "60s")),
        total: p.duration(&field.at("total_timeout"), &or(&d.total_timeout, "300s")),
    };
    if timeouts.header > timeouts.total {
        let blamed = if d.header_timeout.is_some() { "header_timeout" } else { "total_timeout" };
        p.push(&field.at(blamed), "header_timeout must not be longer than total_timeout");
    }
    Inherited {
        key: p.key(&field.at("key"), &or(&d.key, "tenant+app+policy")),
        mode: p.mode(&field.at("mode"), &or(&d.mode, "queue")),
        max_wait: p.duration(&field.at("max_wait"), &or(&d.max_wait, "60s")),
        max_queue: d.max_queue.unwrap_or(500),
        max_attempts: p.attempts(&field.at("max_attempts"), d.max_attempts.unwrap_or(3)),
        timeouts,
    }
}

/// A policy's timeouts: its own where it sets them, the defaults elsewhere.
fn own_timeouts(field: &Field, pf: &PolicyFile, d: Timeouts, p: &mut Problems) -> Timeouts {
    let mut one = |name: &str, own: &Option<String>, default: Duration| {
        own.as_ref().map_or(default, |v| p.duration(&field.at(name), v))
    };
    let t = Timeouts {
        connect: one("connect_timeout", &pf.connect_timeout, d.connect),
        header: one("header_timeout", &pf.header_timeout, d.header),
        total: one("total_timeout", &pf.total_timeout, d.total),
    };
    if t.header > t.total {
        let blamed = if pf.header_timeout.is_some() { "header_timeout" } else { "total_timeout" };
        p.push(&field.at(blamed), "header_timeout must not be longer than total_timeout");
    }
    t
}

fn upstreams(file: &File, p: &mut Problems) -> Vec<Upstream> {
    if file.upstreams.is_empty() {
        p.push(&Field::top("upstream"), "at least one upstream is required");
    }
    let mut out = Vec::new();
    for (i, u) in file.upstreams.iter().enumerate() {
        let field = Field::entry("upstream", i, &u.name);
        if file.upstreams[..i].iter().any(|o| o.name == u.name) {
            p.push(&field.at("name"), "another upstream has the same name");
        }
        let kind = match u.kind.as_str() {
            "defender" => ApiKind::Defender,
            "graph" => ApiKind::Graph,
            other => {
                p.push(&field.at("kind"), format!("`{other}` is not defender or graph"));
                ApiKind::Defender
            }
        };
        for (j, prefix) in u.route_prefixes.iter().enumerate() {
            if !prefix.starts_with('/') {
                p.push(&field.at(&format!("route_prefixes[{j}]")), format!("`{prefix}` must start with `/`"));
            }
        }
        let uri: Result<Uri, _> = u.url.parse();
        let parts = uri.ok().and_then(|uri| {
            let ok_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
            match (uri.scheme(), uri.authority()) {
                (Some(s), Some(a))
                    if ok_path && (s == &http::uri::Scheme::HTTP || s == &http::uri::Scheme::HTTPS) =>
                {
                    Some((s.clone(), a.clone()))
                }
                _ => None,
            }
        });
        let connect_to = u.connect_to.as_ref().map(|a| p.addr(&field.at("connect_to"), a));
        if let Some((_, authority)) = &parts {
            connect_to_problems(&field, connect_to, authority, &out, p);
        }
        match parts {
            Some((scheme, authority)) => out.push(Upstream::new(
                u.name.clone(),
                scheme,
                authority,
                kind,
                u.route_prefixes.iter().map(|p| p.to_ascii_lowercase()).collect(),
                connect_to,
            )),
            None => p.push(
                &field.at("url"),
                format!("`{}` must be an http:// or https:// URL with a host and no path", u.url),
            ),
        }
    }
    out
}

/// What `connect_to` cannot do: the connection keeps a port the URL names,
/// an IP address in the URL is never resolved, and a host resolves to one
/// address for every upstream that names it (the override is per host).
fn connect_to_problems(
    field: &Field,
    to: Option<SocketAddr>,
    authority: &http::uri::Authority,
    earlier: &[Upstream],
    p: &mut Problems,
) {
    let at = field.at("connect_to");
    if let Some(to) = to {
        if authority.port_u16().is_some_and(|port| port != to.port()) {
            p.push(
                &at,
                format!(
                    "port {} differs from the url's port {}: connections keep the url's port; use the same port, or leave it out of the url",
                    to.port(),
                    authority.port_u16().unwrap_or_default()
                ),
            );
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        if host.parse::<std::net::IpAddr>().is_ok() {
            p.push(
                &at,
                "has no effect: the url names an IP address, which is never resolved; put the address in url",
            );
        }
    }
    // Upstreams of one host share its override, whichever order they come in.
    let same_host = earlier.iter().filter(|u| u.host().eq_ignore_ascii_case(authority.host()));
    for other in same_host {
        let clash = match (to, other.connect_to) {
            (None, None) => None,
            (Some(_), None) => Some("without connect_to: the override is per host; give both the same one"),
            (None, Some(_)) => Some("with connect_to: the override is per host; give both the same one"),
            (Some(a), Some(b)) if a.ip() != b.ip() => {
                Some("with another address: one host has one connect_to address")
            }
            // Without a port in its url, a connection takes the override's port.
            (Some(a), Some(b))
                if a.port() != b.port()
                    && (authority.port_u16().is_none() || other.authority.port_u16().is_none()) =>
            {
                Some("with another connect_to port, and a url without a port takes the override's")
            }
            _ => None,
        };
        if let Some(clash) = clash {
            let at = if to.is_some() { at.clone() } else { field.at("url") };
            p.push(&at, format!("upstream `{}` names the same host {clash}", other.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};

    #[test]
    fn a_connect_to_the_connection_would_not_follow_is_refused() {
        let text = r#"listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
[[upstream]]
name = "a"
url = "http://api.example:8080"
kind = "defender"
connect_to = "10.0.0.7:9000"
[[upstream]]
name = "b"
url = "http://10.0.0.8"
kind = "graph"
connect_to = "10.0.0.9:80"
[[upstream]]
name = "c"
url = "https://API.example"
kind = "defender"
connect_to = "10.0.0.6:443"
[[upstream]]
name = "d"
url = "https://other.example:8443"
kind = "defender"
connect_to = "10.0.0.5:8443"
[[upstream]]
name = "e"
url = "https://other.example:9443"
kind = "graph"
connect_to = "10.0.0.5:9443"
[[upstream]]
name = "f"
url = "https://plain.example"
kind = "defender"
connect_to = "10.0.0.4:443"
[[upstream]]
name = "g"
url = "https://PLAIN.example:8443"
kind = "graph"
[[upstream]]
name = "h"
url = "https://ports.example:8443"
kind = "defender"
connect_to = "10.0.0.3:8443"
[[upstream]]
name = "i"
url = "https://ports.example"
kind = "graph"
connect_to = "10.0.0.3:443"
"#;
        let err = Config::from_toml(text, "t.toml").unwrap_err().to_string();
        for expected in [
            "t.toml:7: upstream[0] (a).connect_to: port 9000 differs from the url's port 8080",
            "t.toml:12: upstream[1] (b).connect_to: has no effect: the url names an IP address",
            "t.toml:17: upstream[2] (c).connect_to: upstream `a` names the same host with another address",
            "t.toml:35: upstream[6] (g).url: upstream `f` names the same host with connect_to",
            "t.toml:46: upstream[8] (i).connect_to: upstream `h` names the same host with another connect_to port",
        ] {
            assert!(err.contains(expected), "{expected}\n{err}");
        }
        assert!(!err.contains("(d)") && !err.contains("(e)"), "one address, each url its own port: {err}");
    }

    #[test]
    fn a_bad_default_is_reported_once_where_it_is_written() {
        let text = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[[upstream]]\nname = \"d\"\nurl = \"https://x\"\nkind = \"defender\"\n[policy_defaults]\nmax_wait = \"a while\"\n[[policy]]\nname = \"a\"\npaths = [\"/a\"]\nwindows = [{ limit = 1, per = \"1m\" }]\n[[policy]]\nname = \"b\"\npaths = [\"/b\"]\nwindows = [{ limit = 1, per = \"1m\" }]\nmax_wait = \"1m\"\nheader_timeout = \"1h\"\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::from_toml(text, "t.toml") else {
            panic!("expected validation errors");
        };
        let found: Vec<(String, Option<usize>)> = problems.iter().map(|p| (p.field(), p.line)).collect();
        assert_eq!(
            found,
            vec![
                ("policy_defaults.max_wait".to_string(), Some(8)),
                ("policy[1] (b).header_timeout".to_string(), Some(18)),
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
listen = "nowhere"
admin_listen = "127.0.0.1:1"
guard = "soon"
[[upstream]]
name = "d"
url = "ftp://x"
kind = "other"
[[listener]]
listen = "127.0.0.1:2"
upstream = "missing"
[[policy]]
name = "p"
methods = ["G ET"]
paths = ["no-slash"]
windows = [{ limit = 0, per = "1m" }, { limit = 5, per = "0s" }]
mode = "sometimes"
key = "everyone"
"#;
        let err = Config::from_toml(text, "t.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        let all = err.to_string();
        for needle in [
            "t.toml:2: listen: `nowhere`",
            "t.toml:4: guard: `soon`",
            "t.toml:7: upstream[0] (d).url",
            "t.toml:8: upstream[0] (d).kind",
            "t.toml:11: listener[0].upstream: no upstream is named `missing`",
            "t.toml:14: policy[0] (p).methods",
            "t.toml:15: policy[0] (p).paths[0]",
            "t.toml:16: policy[0] (p).windows[0].limit",
            "t.toml:16: policy[0] (p).windows[1].per: must be longer than zero",
            "t.toml:17: policy[0] (p).mode",
            "t.toml:18: policy[0] (p).key",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn estimate_settings_are_checked_together() {
        let base = r#"listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
[[upstream]]
name = "d"
url = "https://api.security.microsoft.com"
kind = "defender"
[hunting]
"#;
        let err =
            |hunting: &str| Config::from_toml(&format!("{base}{hunting}"), "t.toml").unwrap_err().to_string();
        let all = err("estimate_by = \"text\"\nestimate_queries = 0\nestimate_query_runs = 0\n");
        for needle in [
            "t.toml:8: hunting.estimate_by: `text` is not query or key",
            "t.toml:9: hunting.estimate_queries: must be between 1 and 10000",
            "t.toml:10: hunting.estimate_query_runs: must be at least 1",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let many = err("estimate_samples = 1001\n");
        assert!(many.contains("t.toml:8: hunting.estimate_samples: must be between 1 and 1000"), "{many}");
        let more = err("estimate_samples = 5\nestimate_query_runs = 6\n");
        assert!(
            more.contains("t.toml:9: hunting.estimate_query_runs: must be at most estimate_samples (5)"),
            "{more}"
        );
        let ok = Config::from_toml(&format!("{base}estimate_by = \"key\"\n"), "t.toml").unwrap();
        assert_eq!(ok.hunting.estimator.by, crate::admission::runtime::EstimateBy::Key);
        let default = Config::from_toml(base, "t.toml").unwrap();
        assert_eq!(
            (
                default.hunting.estimator.by,
                default.hunting.estimator.queries,
                default.hunting.estimator.query_runs
            ),
            (crate::admission::runtime::EstimateBy::Query, 100, 3)
        );
    }

    #[test]
    fn forward_proxy_problems_are_reported_with_the_rest() {
        let text = r#"listen = "127.0.0.1:7480"
admin_listen = "127.0.0.1:7481"
trust_ca_files = ["/nonexistent/ca.pem"]
[forward_proxy]
listen = "127.0.0.1:7480"
allow_tunnel = ["login.microsoftonline.com:443", "no-port.example", "API.security.microsoft.com:443"]
[[upstream]]
name = "d"
url = "https://api.security.microsoft.com"
kind = "defender"
connect_to = "localhost"
"#;
        let err = Config::from_toml(text, "t.toml").unwrap_err().to_string();
        for needle in [
            "t.toml:3: trust_ca_files[0]: cannot read certificates from `/nonexistent/ca.pem`",
            "t.toml:5: forward_proxy.listen: 127.0.0.1:7480 is used by two listeners",
            "t.toml:6: forward_proxy.allow_tunnel[1]: `no-port.example` is not a host:port",
            "t.toml:6: forward_proxy.allow_tunnel[2]: `API.security.microsoft.com:443` is an upstream host",
            "t.toml:11: upstream[0] (d).connect_to: `localhost` is not an address",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        assert!(!err.contains("allow_tunnel[0]"), "{err}");
    }

    #[test]
    fn a_forward_proxy_config_keeps_its_settings() {
        let text = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[forward_proxy]\nlisten = \"127.0.0.1:3\"\nca_dir = \"/tmp/qg-ca\"\nallow_tunnel = [\"Login.Example.com:443\"]\n[[upstream]]\nname = \"d\"\nurl = \"https://x.example\"\nkind = \"defender\"\nconnect_to = \"127.0.0.1:9443\"\n";
        let c = Config::from_toml(text, "t.toml").unwrap();
        let fp = c.forward_proxy.as_ref().unwrap();
        assert_eq!(fp.listen.to_string(), "127.0.0.1:3");
        assert_eq!(fp.ca_dir, std::path::PathBuf::from("/tmp/qg-ca"));
        assert_eq!(fp.allow_tunnel, vec!["login.example.com:443".to_string()]);
        assert_eq!(c.upstreams[0].connect_to, Some("127.0.0.1:9443".parse().unwrap()));
        assert!(Config::builtin().forward_proxy.is_none(), "off unless configured");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let text = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\nlisten_port = 3\n";
        let err = Config::from_toml(text, "t.toml").unwrap_err().to_string();
        assert!(err.starts_with("t.toml:3: listen_port: unknown field `listen_port`"), "{err}");
    }
}
