//! The proxy's request path, in one place: keep a body read to its end
//! whatever answers early ([`linger`]), route, match a policy, refuse a
//! body too large, name the client (401 for a missing or unknown key, before
//! any quota is touched), stop a client's flood at its guard (429), then
//! identify the tenant and app, admit and forward ([`exchange`]).

mod exchange;
pub mod hunting;
mod linger;
pub mod ratelimit;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use axum::extract::Request;
use axum::response::Response;
use http::header::CONTENT_LENGTH;
use http::HeaderMap;

use crate::admission::guard::Guards;
use crate::admission::runtime::{QueryText, RuntimeLimiter};
use crate::admission::Limiter;
use crate::config::live::Live;
use crate::config::Config;
use crate::error::GatewayError;
use crate::forward_proxy::credential::ClientCredential;
use crate::identity::IdentityCache;
use crate::metrics::{ClientMetrics, Metrics, PolicyMetrics};
use crate::quota::{Clock, QuotaKey};
use crate::store::{Store, StoreError};
use crate::upstream::{route, ApiKind, Clients};

/// Request header with which a caller shortens its own maximum queue wait,
/// in seconds (fractions allowed). It can only shorten the policy's wait.
pub const MAX_WAIT_HEADER: http::HeaderName = crate::upstream::forward::GATEWAY_ONLY;

/// Distinct tokens each worker keeps decoded.
const IDENTITY_CACHE: usize = 4096;

/// Everything a request needs that all workers share.
pub struct Gateway {
    current: Live<Current>,
    pub limiter: Limiter,
    /// Hunting running time.
    pub runtime: RuntimeLimiter,
    pub metrics: Arc<Metrics>,
    /// Which configuration runs (changed only by a reload).
    pub loaded: std::sync::Mutex<Loaded>,
    /// Where the quota state is made durable or shared.
    pub store: Store,
    /// The key ids of policies a reload removed, by name: a policy that
    /// comes back takes its id (and its keys' state) again, and no other
    /// policy is ever given it.
    retired: std::sync::Mutex<std::collections::HashMap<String, u16>>,
    /// The forward proxy's intercepted tunnels open now, which a stopping
    /// gateway drains with its listeners.
    pub tunnels: Arc<crate::forward_proxy::tunnels::Tunnels>,
}

/// The configuration and its clients' runaway-loop guards, replaced as one,
/// so a request never checks one configuration's client (by its index)
/// against another configuration's guards.
struct Current {
    config: Arc<Config>,
    guards: Arc<Guards>,
}

impl Current {
    fn new(config: Arc<Config>) -> Arc<Self> {
        let guards = Arc::new(Guards::new(config.clients.all()));
        Arc::new(Current { config, guards })
    }
}

/// A configuration as loaded: which one, and from what text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// 1 at start, one more per applied reload.
    pub generation: u64,
    /// SHA-256 of the configuration's text (the file, or the built-in defaults).
    pub hash: String,
}

impl Gateway {
    /// A gateway whose quota state lives in memory only.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Self {
        let clock = Clock::default();
        Gateway {
            limiter: Limiter::with_clock(config.guard, clock),
            runtime: RuntimeLimiter::with_clock(config.guard, config.hunting.estimator, clock),
            loaded: std::sync::Mutex::new(Loaded { generation: 1, hash: config.source_hash.clone() }),
            metrics,
            current: Live::new(Current::new(config)),
            store: Store::memory(),
            retired: std::sync::Mutex::default(),
            tunnels: Arc::default(),
        }
    }

    /// A gateway on its configured store, with what the store holds restored.
    pub fn open(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let mut gw = Gateway::new(config, metrics);
        gw.store = Store::open(&gw.config(), &gw.limiter, &gw.runtime, &gw.metrics)?;
        Ok(gw)
    }

    /// The configuration now (a reload may replace it).
    pub fn config(&self) -> Arc<Config> {
        self.current.get().config.clone()
    }

    /// Take a reloaded configuration. Quota state is kept: each policy keeps
    /// the key id its name had, so its keys' admissions, queues and holds
    /// carry on under new limits; a name a reload removed and a later one
    /// brings back takes its id again; a new name gets an id no policy had. Clients' guards
    /// start afresh, with the configuration that names them: a request on a
    /// worker not yet refreshed checks the guards of its own configuration.
    /// Callers refresh the workers after. The store stays the one the
    /// gateway started with.
    pub fn replace_config(&self, mut config: Config) {
        let old = self.config();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let known = old.policies.0.iter().map(|p| (p.name.as_str(), p.key_id));
        let known: std::collections::HashMap<&str, u16> =
            known.chain(retired.iter().map(|(n, id)| (n.as_str(), *id))).collect();
        let mut next = known.values().max().map_or(0, |m| m.saturating_add(1));
        for p in &mut config.policies.0 {
            p.key_id = match known.get(p.name.as_str()) {
                Some(&id) => id,
                None => {
                    next = next.saturating_add(1);
                    next - 1
                }
            };
        }
        for o in &old.policies.0 {
            retired.insert(o.name.clone(), o.key_id);
        }
        retired.retain(|name, _| config.policies.0.iter().all(|p| &p.name != name));
        drop(retired);
        self.store.set_policies(&config.policies);
        self.current.set(Current::new(Arc::new(config)));
    }
}

impl Gateway {
    /// The same configuration with the certificate of `[tls]` read again
    /// (a reload of unchanged text after the files were rotated): new
    /// handshakes use it; nothing else changes, clients' guards included.
    pub fn replace_tls(&self, tls: Arc<rustls::ServerConfig>) {
        let current = self.current.get();
        let mut config = (*current.config).clone();
        config.tls = Some(tls);
        self.current.set(Arc::new(Current { config: Arc::new(config), guards: current.guards.clone() }));
    }
}

/// What one worker thread's listeners share: its own connection pools and
/// metric handles, so a request touches no other core's cache lines.
pub struct Worker {
    gateway: Arc<Gateway>,
    index: usize,
    identities: IdentityCache,
    view: Live<View>,
}

/// A worker's side of one configuration: what a request resolves once.
pub struct View {
    pub config: Arc<Config>,
    /// The guards of `config`'s clients.
    guards: Arc<Guards>,
    clients: Clients,
    /// Per policy id, then one more for unmetered requests.
    metrics: Vec<PolicyMetrics>,
    /// Per client index, then one more (`unknown`) for refused keys.
    client_metrics: Vec<ClientMetrics>,
}

impl View {
    fn new(gateway: &Gateway, index: usize) -> Self {
        let Current { config, guards } = &*gateway.current.get();
        let (config, guards) = (config.clone(), guards.clone());
        let mut timeouts: Vec<Duration> = config.policies.0.iter().map(|p| p.timeouts.connect).collect();
        timeouts.push(config.unmetered_timeouts.connect);
        timeouts.sort();
        timeouts.dedup();
        let mut metrics: Vec<PolicyMetrics> =
            config.policies.0.iter().map(|p| gateway.metrics.policy(index, &p.name)).collect();
        metrics.push(gateway.metrics.policy(index, "unmetered"));
        let mut client_metrics: Vec<ClientMetrics> =
            config.clients.all().iter().map(|c| gateway.metrics.client(index, &c.name)).collect();
        client_metrics.push(gateway.metrics.client(index, "unknown"));
        View { clients: Clients::new(timeouts, &config), metrics, client_metrics, config, guards }
    }
}

impl Worker {
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn new(gateway: Arc<Gateway>, index: usize) -> Self {
        let view = Live::new(Arc::new(View::new(&gateway, index)));
        Worker { index, identities: IdentityCache::new(IDENTITY_CACHE), view, gateway }
    }

    /// The configuration this worker serves now, with its pools and metrics.
    pub fn view(&self) -> Arc<View> {
        self.view.get()
    }

    /// Follow the gateway's configuration after a reload.
    pub fn refresh(&self) {
        self.view.set(Arc::new(View::new(&self.gateway, self.index)));
    }
}

/// The service of one proxy listener; `upstream` binds it to one upstream.
pub fn proxy_service(
    worker: Arc<Worker>,
    upstream: Option<usize>,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send {
    tower::service_fn(move |req: Request| {
        let worker = worker.clone();
        async move { Ok(proxy(&worker, upstream, req).await) }
    })
}

/// One request through the gateway; `bound` fixes its upstream (a bound
/// listener, or the target of a forward-proxy `CONNECT`).
pub(crate) async fn proxy(worker: &Worker, bound: Option<usize>, req: Request) -> Response {
    // Whatever answers early, the rest of the body is read, so the answer arrives.
    let mut req = req.map(linger::Linger::wrap);
    // This request keeps the configuration it started with, across a reload.
    let view = worker.view();
    let config = &*view.config;
    let Some(up) = route::select(&config.upstreams, bound, req.uri(), req.headers()) else {
        let kind = guess_kind(req.uri().path());
        return GatewayError::NoRoute { path: req.uri().path().to_string() }.into_response_for(kind);
    };
    let upstream = &config.upstreams[up];
    let policy = config.policies.find(req.method(), up, req.uri().path());
    let metrics = &view.metrics[policy.map_or(config.policies.0.len(), |p| usize::from(p.id))];
    let fail = |e: GatewayError| e.into_response_for(upstream.kind);

    if content_length(req.headers()).is_some_and(|n| n > config.max_body_bytes) {
        return fail(GatewayError::PayloadTooLarge { limit: config.max_body_bytes });
    }
    let roster = &config.clients;
    // A forward-proxy client's key came in `Proxy-Authorization` on its
    // `CONNECT`: it stands for the API-key header of base-URL mode.
    if let Some(credential) = req.extensions_mut().remove::<ClientCredential>() {
        if !req.headers().contains_key(&roster.header) {
            if let Ok(key) = http::HeaderValue::from_str(&credential.key) {
                req.headers_mut().insert(roster.header.clone(), key);
            }
        }
    }
    let token = worker.identities.identify(req.headers());
    let client = match roster.identify(req.headers(), token.as_ref().ok().map(|who| who.app.as_str())) {
        Ok(client) => client,
        Err(e) => {
            view.client_metrics[roster.all().len()].count("unauthorized");
            tracing::debug!(error = %e, "unknown client");
            return fail(e.into());
        }
    };
    let client_metrics = &view.client_metrics[usize::from(client.share.client)];
    if let Err(retry_after) = view.guards.check(client.share.client) {
        client_metrics.count("guarded");
        tracing::debug!(client = %client.name, retry_after_ms = retry_after.as_millis() as u64, "guard");
        let guard = client.guard.expect("only a client with a guard is refused by it");
        return fail(GatewayError::Guarded { client: client.name.clone(), guard, retry_after });
    }
    let share = roster.share(client, req.headers());
    // Said to the gateway, never to the upstream (the `x-quotagate-*`
    // headers, priority included, are removed where every call is sent).
    roster.strip_key_headers(req.headers_mut());
    let Some(policy) = policy else {
        client_metrics.count("unmetered");
        let timeouts = config.unmetered_timeouts;
        return exchange::once(&view, upstream, metrics, req, &timeouts, &metrics.forwarded).await;
    };
    let started = tokio::time::Instant::now();
    let who = match token {
        Ok(who) => who,
        Err(e) => {
            metrics.unauthorized.inc();
            client_metrics.count("unauthorized");
            tracing::debug!(policy = %policy.name, client = %client.name, error = %e, "unauthorized");
            return fail(e.into());
        }
    };
    let (req, lookback, asked) = if policy.hunting {
        match hunting::inspect(req, config).await {
            Ok(i) => {
                let text = QueryText { query: &i.asked.query, timespan: i.asked.timespan.as_deref() };
                (i.req, i.lookback, Some(worker.gateway.runtime.query_id(text)))
            }
            Err(e) => {
                metrics.invalid.inc();
                if matches!(e, GatewayError::LookbackTooLong { .. }) {
                    metrics.lookback_rejected.inc();
                }
                tracing::info!(policy = %policy.name, tenant = %who.tenant, error = %e, "hunting request refused locally");
                return fail(e);
            }
        }
    } else {
        (req, None, None)
    };
    if let Some(lb) = &lookback {
        metrics.lookback_warned.inc();
        tracing::warn!(policy = %policy.name, tenant = %who.tenant, reach_days = lb.reach.as_secs() / 86_400,
            "hunting query reaches further back than the service keeps data; forwarded with a warning");
    }
    let max_wait = caller_max_wait(req.headers()).map_or(policy.max_wait, |w| w.min(policy.max_wait));
    let call = exchange::Metered {
        worker,
        view: &view,
        upstream,
        policy,
        metrics,
        key: QuotaKey::new(policy.key, policy.key_id, &who),
        runtime: policy.hunting.then(|| QuotaKey::new(config.hunting.key, policy.key_id, &who)),
        query: asked,
        tenant: who.tenant.clone(),
        client: &client.name,
        share,
        max_wait,
    };
    let mut outcome = exchange::Outcome::default();
    let mut response = call.run(req, &mut outcome).await;
    client_metrics.count(outcome.decision);
    if let Some(lb) = &lookback {
        response.headers_mut().insert(hunting::LOOKBACK_WARNING, hunting::warning(lb, config));
    }
    if config.access_log {
        // One line per metered request; never the token, the key, the query string or the body.
        tracing::info!(
            tenant = %who.tenant,
            app = %who.app,
            client = %client.name,
            priority = share.class.as_str(),
            policy = %policy.name,
            decision = outcome.decision,
            queue_wait_ms = outcome.waited.as_millis() as u64,
            upstream_status = outcome.upstream_status,
            attempts = outcome.attempts,
            running_time_s = outcome.running_time,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    response
}

/// The announced body length, when there is a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The caller's own maximum wait from [`MAX_WAIT_HEADER`], if it sent a valid one.
fn caller_max_wait(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers.get(MAX_WAIT_HEADER)?.to_str().ok()?.trim().parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// The error shape for a request that reached no upstream.
fn guess_kind(path: &str) -> ApiKind {
    let p = path.to_ascii_lowercase();
    if p.starts_with("/v1.0/") || p.starts_with("/beta/") {
        ApiKind::Graph
    } else {
        ApiKind::Defender
    }
}
