//! The proxy's request path, in one place: route, match a policy, identify,
//! then admit and forward ([`exchange`]).

mod exchange;
pub mod hunting;
pub mod ratelimit;

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use axum::extract::Request;
use axum::response::Response;
use http::header::CONTENT_LENGTH;
use http::HeaderMap;

use crate::admission::runtime::RuntimeLimiter;
use crate::admission::Limiter;
use crate::config::Config;
use crate::error::GatewayError;
use crate::identity::identity_from_headers;
use crate::metrics::{Metrics, PolicyMetrics};
use crate::quota::{Clock, QuotaKey};
use crate::store::{Store, StoreError};
use crate::upstream::{route, ApiKind, Clients};

/// Request header with which a caller shortens its own maximum queue wait,
/// in seconds (fractions allowed). It can only shorten the policy's wait.
pub const MAX_WAIT_HEADER: http::HeaderName = crate::upstream::forward::GATEWAY_ONLY;

/// Everything a request needs that all workers share.
pub struct Gateway {
    pub config: Arc<Config>,
    pub limiter: Limiter,
    /// Hunting running time.
    pub runtime: RuntimeLimiter,
    pub metrics: Arc<Metrics>,
    /// Where the quota state is made durable or shared.
    pub store: Store,
}

impl Gateway {
    /// A gateway whose quota state lives in memory only.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Self {
        let clock = Clock::default();
        Gateway {
            limiter: Limiter::with_clock(config.guard, clock),
            runtime: RuntimeLimiter::with_clock(config.guard, config.hunting.estimator.clone(), clock),
            metrics,
            config,
            store: Store::memory(),
        }
    }

    /// A gateway on its configured store, with what the store holds restored.
    pub fn open(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let mut gw = Gateway::new(config, metrics);
        gw.store = Store::open(&gw.config, &gw.limiter, &gw.runtime, &gw.metrics)?;
        Ok(gw)
    }
}

/// What one worker thread's listeners share: its own connection pools and
/// metric handles, so a request touches no other core's cache lines.
pub struct Worker {
    gateway: Arc<Gateway>,
    clients: Clients,
    /// Per policy id, then one more for unmetered requests.
    metrics: Vec<PolicyMetrics>,
}

impl Worker {
    pub fn new(gateway: Arc<Gateway>, index: usize) -> Self {
        let config = &gateway.config;
        let mut timeouts: Vec<Duration> = config.policies.0.iter().map(|p| p.timeouts.connect).collect();
        timeouts.push(config.unmetered_timeouts.connect);
        timeouts.sort();
        timeouts.dedup();
        let mut metrics: Vec<PolicyMetrics> =
            config.policies.0.iter().map(|p| gateway.metrics.policy(index, &p.name)).collect();
        metrics.push(gateway.metrics.policy(index, "unmetered"));
        Worker { clients: Clients::new(timeouts), metrics, gateway }
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

async fn proxy(worker: &Worker, bound: Option<usize>, req: Request) -> Response {
    let gw = &*worker.gateway;
    let config = &*gw.config;
    let Some(up) = route::select(&config.upstreams, bound, req.uri(), req.headers()) else {
        let kind = guess_kind(req.uri().path());
        return GatewayError::NoRoute { path: req.uri().path().to_string() }.into_response_for(kind);
    };
    let upstream = &config.upstreams[up];
    let policy = config.policies.find(req.method(), up, req.uri().path());
    let metrics = &worker.metrics[policy.map_or(config.policies.0.len(), |p| usize::from(p.id))];
    let fail = |e: GatewayError| e.into_response_for(upstream.kind);

    if content_length(req.headers()).is_some_and(|n| n > config.max_body_bytes) {
        return fail(GatewayError::PayloadTooLarge { limit: config.max_body_bytes });
    }
    let Some(policy) = policy else {
        let timeouts = config.unmetered_timeouts;
        return exchange::once(worker, upstream, metrics, req, &timeouts, &metrics.forwarded).await;
    };
    let started = tokio::time::Instant::now();
    let who = match identity_from_headers(req.headers()) {
        Ok(who) => who,
        Err(e) => {
            metrics.unauthorized.inc();
            tracing::debug!(policy = %policy.name, error = %e, "unauthorized");
            return fail(e.into());
        }
    };
    let (req, lookback) = if policy.hunting {
        match hunting::inspect(req, config).await {
            Ok(inspected) => inspected,
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
        (req, None)
    };
    if let Some(lb) = &lookback {
        metrics.lookback_warned.inc();
        tracing::warn!(policy = %policy.name, tenant = %who.tenant, reach_days = lb.reach.as_secs() / 86_400,
            "hunting query reaches further back than the service keeps data; forwarded with a warning");
    }
    let max_wait = caller_max_wait(req.headers()).map_or(policy.max_wait, |w| w.min(policy.max_wait));
    let call = exchange::Metered {
        worker,
        upstream,
        policy,
        metrics,
        key: QuotaKey::new(policy.key, policy.id, &who),
        runtime: policy.hunting.then(|| QuotaKey::new(config.hunting.key, policy.id, &who)),
        tenant: who.tenant.clone(),
        max_wait,
    };
    let mut outcome = exchange::Outcome::default();
    let mut response = call.run(req, &mut outcome).await;
    if let Some(lb) = &lookback {
        response.headers_mut().insert(hunting::LOOKBACK_WARNING, hunting::warning(lb, config));
    }
    if config.access_log {
        // One line per metered request; never the token, the query string or the body.
        tracing::info!(
            tenant = %who.tenant,
            app = %who.app,
            client = "anonymous",
            policy = %policy.name,
            decision = outcome.decision,
            queue_wait_ms = outcome.waited.as_millis() as u64,
            upstream_status = outcome.upstream_status,
            attempts = outcome.attempts,
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
