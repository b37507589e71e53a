//! One call's exchange with the upstream: admission, forwarding, and what
//! happens when the upstream throttles anyway or fails.
//!
//! * An upstream throttle (a 429, or a Graph 503/504 with `Retry-After`) is
//!   parsed ([`throttle::parse`]). A call-rate throttle holds the call's key
//!   until the server's time, so queued and new requests for that key wait or
//!   are told the exact remaining time; other keys are untouched. A
//!   running-time throttle on a hunting policy holds the tenant's running
//!   time instead: every app of the tenant waits for hunting. A concurrency throttle affects only this request. A lower
//!   limit revealed by the message tightens the key's windows.
//! * In queue mode, the call is retried after the server's time when that fits in its wait
//!   budget (the policy's `max_wait`, or the caller's shorter header), its
//!   body was small enough to keep (`retry_body_bytes`), and it has attempts
//!   left (`max_attempts`). Each retry is admitted like a new call and counts
//!   against the quota.
//! * Otherwise the client gets a 429 in its own error shape whose
//!   `Retry-After` is never shorter than the server's remaining time.
//! * A connection refused before anything was sent refunds the admission
//!   and answers 502; a timeout after sending keeps it spent and answers 504;
//!   garbage answers 502. Each outcome is logged once and counted.

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::request::Parts;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::{ratelimit, View, Worker};
use crate::admission::runtime::{Demand, QueryId, Reservation};
use crate::admission::{Admitted, Share};
use crate::error::{GatewayError, THROTTLED_BY};
use crate::hunting::meter;
use crate::metrics::{Failure, PolicyMetrics};
use crate::policy::{Mode, Policy, Timeouts};
use crate::quota::{QuotaKey, Window};
use crate::store::redis::Refusal;
use crate::store::RuntimeRefusal;
use crate::upstream::encoding::{self, Coding};
use crate::upstream::throttle::{self, Kind, Throttle};
use crate::upstream::{forward, ApiKind, Upstream, UpstreamError};

/// Most bytes of a throttle response read to parse it.
const THROTTLE_BODY_LIMIT: usize = 64 * 1024;

/// Forward a request no policy meters, once.
pub(super) async fn once(
    view: &View,
    upstream: &Upstream,
    metrics: &PolicyMetrics,
    req: Request,
    timeouts: &Timeouts,
    counter: &prometheus::IntCounter,
) -> Response {
    let config = &view.config;
    let client = view.clients.get(timeouts.connect);
    let started = Instant::now();
    match forward::send(client, upstream, req, timeouts, config.max_body_bytes).await {
        Ok(mut response) => {
            counter.inc();
            observe(metrics, started, response.status());
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                response.headers_mut().insert(THROTTLED_BY, HeaderValue::from_static("upstream"));
            }
            response
        }
        Err(e) => failed(view, upstream, metrics, e),
    }
}

/// What happened to a request, for its access-log line.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub decision: &'static str,
    pub waited: Duration,
    pub upstream_status: Option<u16>,
    pub attempts: u32,
    /// Hunting: the running time charged, when known by the response headers.
    pub running_time: Option<f64>,
}

/// A metered call, identified and keyed.
pub(super) struct Metered<'a> {
    pub worker: &'a Worker,
    /// The configuration the request started with.
    pub view: &'a View,
    pub upstream: &'a Upstream,
    pub policy: &'a Policy,
    pub metrics: &'a PolicyMetrics,
    pub key: QuotaKey,
    /// The running-time key of a hunting call.
    pub runtime: Option<QuotaKey>,
    /// A hunting call's query and `Timespan`, as the running-time
    /// histories name them.
    pub query: Option<QueryId>,
    pub tenant: String,
    /// The client's name, for logs.
    pub client: &'a str,
    /// How the client shares the key with others.
    pub share: Share,
    /// The wait budget: the policy's maximum wait or the caller's shorter one.
    pub max_wait: Duration,
}

impl Metered<'_> {
    pub(super) async fn run(self, req: Request, outcome: &mut Outcome) -> Response {
        let gw = &*self.worker.gateway;
        let config = &*self.view.config;
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        // Every answer to a metered call must be one the gateway can read.
        encoding::narrow_accept_encoding(&mut parts.headers);
        // A small body is kept for a replay, a larger one streamed once. It is
        // read only once the call is admitted: a queued request's body waits
        // in its connection, not in the gateway's memory. The windows count
        // the call from when it leaves (`Limiter::released`), after that read;
        // a read that outlasts the shortest window admits the call again.
        let keep = keep_for_replay(&parts, &body, config.retry_body_bytes);
        let mut stream = Some(body);
        let mut replay: Option<bytes::Bytes> = None;
        let client = self.view.clients.get(self.policy.timeouts.connect);
        let mut attempt = 0;
        loop {
            attempt += 1;
            outcome.attempts = attempt;
            // Running time first, then the call slot: a call is sent the
            // moment its slot is granted, as the call windows' guard assumes.
            let mut reservation = match self.reserve_running_time(started).await {
                Ok(r) => r,
                Err(RuntimeRefusal::Rejected(rejection)) => {
                    outcome.decision = "rejected";
                    self.metrics.rejected.inc();
                    self.metrics.rejection(rejection.reason).inc();
                    return self.fail(GatewayError::RunningTime { tenant: self.tenant.clone(), rejection });
                }
                Err(RuntimeRefusal::Down(e)) => return self.store_down(&e, outcome),
            };
            if let Some(r) = &reservation {
                outcome.waited += r.waited;
            }
            let budget = self.max_wait.saturating_sub(started.elapsed());
            let acquired = gw
                .store
                .acquire(&gw.limiter, &self.key, self.policy, &self.share, budget, &self.metrics.depth)
                .await;
            let mut admitted = match acquired {
                Ok(admitted) => admitted,
                Err(Refusal::Down(e)) => return self.store_down(&e, outcome),
                Err(Refusal::Rejected(mut rejection)) => {
                    let usage = std::mem::take(&mut rejection.usage);
                    outcome.decision = "rejected";
                    self.metrics.rejected.inc();
                    self.metrics.rejection(rejection.reason).inc();
                    tracing::debug!(policy = %self.policy.name, tenant = %self.tenant, client = self.client, reason = ?rejection.reason,
                        retry_after_ms = rejection.retry_after.as_millis() as u64, attempt, "rejected locally");
                    let mut response = self.fail(GatewayError::Throttled {
                        policy: self.policy.name.clone(),
                        tenant: self.tenant.clone(),
                        rejection,
                    });
                    ratelimit::insert(response.headers_mut(), &usage);
                    return response;
                }
            };
            if !admitted.waited.is_zero() {
                self.metrics.wait.observe(admitted.waited.as_secs_f64());
            }
            outcome.waited += admitted.waited;
            // An admission (and a hunting query's reservation) is durable
            // before its call is forwarded, so a crash cannot forget it.
            if let Err(e) = gw.store.admitted(&self.key, self.policy, &admitted, reservation.as_mut()).await {
                gw.limiter.refund(&self.key, &admitted);
                if let Some(r) = reservation.take() {
                    r.release();
                }
                gw.metrics.store.errors.inc();
                self.metrics.failed.inc();
                outcome.decision = "failed";
                tracing::error!(policy = %self.policy.name, error = %e, "the quota store did not record an admission; not forwarded");
                return self.fail(GatewayError::StoreUnavailable {
                    detail: "the admission could not be recorded".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
            let read_now = keep && replay.is_none();
            if read_now {
                let body = stream.take().unwrap_or_default();
                match Limited::new(body, limit(config.retry_body_bytes)).collect().await {
                    Ok(collected) => replay = Some(collected.to_bytes()),
                    Err(e) => {
                        // Nothing was sent: the slot is not spent.
                        self.refund(&admitted);
                        outcome.decision = "bad_request";
                        return self.fail(GatewayError::BadBody { detail: e.to_string() });
                    }
                }
            }
            if read_now && gw.limiter.outlived(&admitted) {
                // The body came so slowly that a call admitted meanwhile may
                // have counted this one's slot as aged out: admit it again,
                // its body kept, as if it had just arrived. Nothing was sent.
                self.refund(&admitted);
                if let Some(r) = reservation.take() {
                    r.release();
                }
                tracing::debug!(policy = %self.policy.name, tenant = %self.tenant, client = self.client,
                    "the body outlasted the admission's shortest window; admitting the call again");
                attempt -= 1;
                continue;
            }
            // A streamed body is sent once: only a kept one is ever retried.
            let body = replay.clone().map_or_else(|| stream.take().unwrap_or_default(), Body::from);
            // The call leaves now: a body read, a commit or the store's answer
            // on its way back since the admission must not eat into the guard.
            if gw.limiter.released(&self.key, &mut admitted) {
                gw.store.released(&self.key, self.policy, &admitted).await;
            }
            let sent = Instant::now();
            if let Some(r) = reservation.as_mut() {
                r.sent();
            }
            let mut response = match forward::send(
                client,
                self.upstream,
                rebuild(&parts, body),
                &self.policy.timeouts,
                config.max_body_bytes,
            )
            .await
            {
                Ok(response) => response,
                Err(e) => {
                    outcome.decision = "failed";
                    if let (UpstreamError::Connect(_) | UpstreamError::ClientBody(_), Some(r)) =
                        (&e, reservation.take())
                    {
                        // Nothing reached the upstream, or only a query the
                        // client never finished sending: no running time
                        // was spent.
                        r.release();
                    }
                    return self.upstream_failed(e, &admitted);
                }
            };
            observe(self.metrics, sent, response.status());
            outcome.upstream_status = Some(response.status().as_u16());
            if let Some(r) = reservation.as_mut() {
                r.answered();
            }
            let runtime_usage = reservation.as_ref().map_or(&[][..], |r| &r.usage[..]);
            ratelimit::insert_all(response.headers_mut(), &admitted.usage, runtime_usage);
            if !might_be_throttle(response.status()) {
                let waited = attempt > 1 || !admitted.waited.is_zero() || outcome.waited > Duration::ZERO;
                outcome.decision = if waited { "queued" } else { "forwarded" };
                if waited { &self.metrics.queued } else { &self.metrics.forwarded }.inc();
                let Some(r) = reservation else { return response };
                let response = self.meter(response, r).await;
                // Known now when `Stats` led the body or for Graph; else metered as it ends.
                outcome.running_time =
                    response.headers().get(meter::EXECUTION_TIME).and_then(|v| v.to_str().ok()?.parse().ok());
                return response;
            }
            let (head, body) = response.into_parts();
            // A body cut short or too long to read is not passed on, but the
            // status and headers still say whether, and how long, to wait.
            let (bytes, unread) = match Limited::new(body, THROTTLE_BODY_LIMIT).collect().await {
                Ok(collected) => (collected.to_bytes(), None),
                Err(e) => (bytes::Bytes::new(), Some(e)),
            };
            let text = encoding::decoded(Coding::of(&head.headers), &bytes, THROTTLE_BODY_LIMIT);
            let parsed = throttle::parse(head.status, &head.headers, &text, SystemTime::now());
            if let (Some(e), None) = (&unread, &parsed) {
                // Never pass on a cut error body as if it were whole.
                outcome.decision = "failed";
                let detail = format!("its {} answer could not be read: {e}", head.status.as_u16());
                return failed(self.view, self.upstream, self.metrics, UpstreamError::Protocol(detail));
            }
            if let Some(r) = reservation.take() {
                if head.status == StatusCode::TOO_MANY_REQUESTS {
                    // The service refused the query: it did not run.
                    r.release();
                } else {
                    // A 503/504 may come after the query ran for a while.
                    let cost = r.wall_time();
                    r.charge(cost);
                }
            }
            let Some(throttle) = parsed else {
                // A 503 or 504 without a time: the upstream's own answer.
                self.metrics.forwarded.inc();
                outcome.decision = "forwarded";
                return Response::from_parts(head, Body::from(bytes));
            };
            let wait = self.obey(&throttle, attempt).await;
            // A policy that rejects rather than queues never waits, so never retries.
            let fits = self.policy.mode == Mode::Queue && started.elapsed() + wait <= self.max_wait;
            if replay.is_some() && attempt < self.policy.max_attempts && fits {
                self.metrics.retries.inc();
                tracing::debug!(policy = %self.policy.name, tenant = %self.tenant, attempt,
                    wait_ms = wait.as_millis() as u64, "retrying after an upstream throttle");
                if throttle.kind == Kind::Concurrency {
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
            self.metrics.rejected.inc();
            outcome.decision = "upstream_throttled";
            // The longest of the holds a retry would meet: the call key's,
            // the tenant's running time (for hunting), and this answer's.
            let runtime_hold = self.runtime.as_ref().and_then(|k| gw.runtime.held_for(k));
            let retry_after = [gw.limiter.held_for(&self.key), runtime_hold]
                .into_iter()
                .flatten()
                .fold(wait, Duration::max);
            tracing::debug!(policy = %self.policy.name, tenant = %self.tenant, attempt, status = head.status.as_u16(),
                retry_after_ms = retry_after.as_millis() as u64, "upstream throttle passed on");
            let mut response = self.fail(GatewayError::UpstreamThrottled {
                tenant: self.tenant.clone(),
                retry_after,
                message: throttle.message.unwrap_or_default(),
            });
            ratelimit::insert(response.headers_mut(), &admitted.usage);
            return response;
        }
    }

    /// Act on an upstream throttle; returns how long to wait before the next try.
    async fn obey(&self, throttle: &Throttle, attempt: u32) -> Duration {
        let gw = &*self.worker.gateway;
        let config = &*self.view.config;
        self.metrics.throttle(throttle.kind).inc();
        let wait = throttle.retry_after.unwrap_or_else(|| {
            let jitter =
                std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), attempt);
            throttle::backoff(attempt - 1, config.backoff_base, config.backoff_cap, jitter)
        });
        match (throttle.kind, &self.runtime) {
            // Running time is the tenant's, whichever app spent it.
            (Kind::RunningTime, Some(key)) => {
                gw.runtime.hold(key, wait);
                gw.store.held(key, self.policy, gw.runtime.hold_until(key), true).await;
            }
            (Kind::RunningTime | Kind::CallRate, _) => {
                gw.limiter.hold(&self.key, wait);
                gw.store.held(&self.key, self.policy, gw.limiter.hold_until(&self.key), false).await;
            }
            (Kind::Concurrency, _) => {}
        }
        if throttle.kind != Kind::Concurrency {
            self.metrics.holds.inc();
        }
        if let Some((limit, per)) = throttle.revealed {
            let window = Window::new(std::num::NonZeroU32::new(limit).expect("parser returns non-zero"), per);
            if gw.limiter.reveal(&self.key, self.policy, window) {
                gw.store.revealed(&self.key, self.policy, window).await;
                self.metrics.revealed_limit.set(i64::from(limit));
                tracing::warn!(policy = %self.policy.name, tenant = %self.tenant, limit,
                    window_s = per.as_secs_f64(), "the upstream revealed a lower limit than configured; using it");
            }
        }
        tracing::info!(policy = %self.policy.name, tenant = %self.tenant, kind = ?throttle.kind,
            wait_ms = wait.as_millis() as u64, "upstream throttled");
        wait
    }

    /// A hunting call reserves running time from its key's ledger first,
    /// waiting (queue mode) for the exact moment the budgets have room or the
    /// upstream's running-time hold ends.
    async fn reserve_running_time(&self, started: Instant) -> Result<Option<Reservation>, RuntimeRefusal> {
        let Some(key) = &self.runtime else { return Ok(None) };
        let gw = &*self.worker.gateway;
        let h = &self.view.config.hunting;
        let budgets = gw.store.runtime_budgets(self.policy);
        let demand = Demand {
            budgets: &budgets,
            retention: h.retention,
            mode: self.policy.mode,
            max_wait: self.max_wait.saturating_sub(started.elapsed()),
            max_queue: self.policy.max_queue,
            max_concurrent: h.max_concurrent,
            estimate: &h.estimator,
            query: self.query,
        };
        let reserved = gw.runtime.reserve(key, &demand, &self.metrics.depth).await;
        let mut reserved = reserved.map_err(|r| {
            tracing::debug!(policy = %self.policy.name, tenant = %self.tenant, reason = ?r.reason,
                retry_after_ms = r.retry_after.as_millis() as u64, "running time not available");
            RuntimeRefusal::Rejected(r)
        })?;
        reserved.count_in(self.metrics.charges.clone());
        // Then in the ledger the replicas share, if there is one. Its
        // deadline covers the wait for the call slot still to come (at most
        // what is left of max_wait: the query is already read), then the
        // exchange's total timeout.
        let demand = Demand { max_wait: self.max_wait.saturating_sub(started.elapsed()), ..demand };
        let deadline = demand.max_wait + self.policy.timeouts.total + self.view.config.guard;
        if let Err(refusal) = gw.store.share_running_time(key, &mut reserved, &demand, deadline).await {
            reserved.release();
            return Err(refusal);
        }
        Ok(Some(reserved))
    }

    /// Meter a successful hunting response as it streams; any other status
    /// is charged its wall time until the headers (a query refused before it
    /// ran costs milliseconds; one that failed after running costs what it ran).
    async fn meter(&self, response: Response, reservation: Reservation) -> Response {
        let config = &self.view.config;
        if !response.status().is_success() {
            let cost = reservation.wall_time();
            reservation.charge(cost);
            return response;
        }
        match self.upstream.kind {
            ApiKind::Defender => {
                let report = meter::Report {
                    truncated: self.metrics.truncated.clone(),
                    unmetered: self.metrics.unmetered.clone(),
                    max_rows: config.hunting.max_rows,
                    policy: self.policy.name.clone(),
                    tenant: self.tenant.clone(),
                };
                // The body's own deadline: the total timeout from the send
                // (before the shared ledger's deadline for this query).
                let left = self.policy.timeouts.total.saturating_sub(reservation.wall_time());
                let deadline = tokio::time::Instant::now() + left;
                meter::defender(
                    response,
                    reservation,
                    config.hunting.stats_prefix_bytes,
                    config.hunting.max_scan_bytes,
                    report,
                    deadline,
                )
                .await
            }
            ApiKind::Graph => meter::graph(response, reservation),
        }
    }

    /// Redis is down and the config fails closed: nothing is forwarded.
    fn store_down(&self, e: &crate::store::StoreError, outcome: &mut Outcome) -> Response {
        outcome.decision = "rejected";
        self.metrics.rejected.inc();
        tracing::debug!(policy = %self.policy.name, error = %e, "quota store down: failing closed");
        let detail = match e {
            crate::store::StoreError::Unreadable(_) => {
                "the shared quota store (Redis) holds a value for this key that the gateway cannot read \
                 (the gateway's log says which); other keys are unaffected"
            }
            _ => "the shared quota store (Redis) is unreachable",
        };
        self.fail(GatewayError::StoreUnavailable {
            detail: detail.into(),
            retry_after: crate::store::redis::FAIL_CLOSED_RETRY,
        })
    }

    fn upstream_failed(&self, e: UpstreamError, admitted: &Admitted) -> Response {
        if matches!(e, UpstreamError::Connect(_)) {
            // Nothing reached the upstream: the slot is not spent.
            self.refund(admitted);
        }
        failed(self.view, self.upstream, self.metrics, e)
    }

    /// Take back an admission whose call never left, here and in the store.
    fn refund(&self, admitted: &Admitted) {
        self.worker.gateway.limiter.refund(&self.key, admitted);
        self.worker.gateway.store.refunded(&self.key, admitted);
    }

    fn fail(&self, e: GatewayError) -> Response {
        e.into_response_for(self.upstream.kind)
    }
}

/// Whether a response may be a throttle and needs its body read.
fn might_be_throttle(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 503 | 504)
}

/// A body is kept for replay when it is empty or announced and small.
fn keep_for_replay(parts: &Parts, body: &Body, limit: u64) -> bool {
    use http_body::Body as _;
    body.is_end_stream() || super::content_length(&parts.headers).is_some_and(|n| n <= limit)
}

fn limit(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// The request again, from its head and a body.
fn rebuild(parts: &Parts, body: Body) -> Request {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

fn observe(metrics: &PolicyMetrics, sent: Instant, status: StatusCode) {
    metrics.response(status.as_u16()).inc();
    metrics.duration.observe(sent.elapsed().as_secs_f64());
}

/// Count, log once and answer an exchange that produced no response.
fn failed(view: &View, upstream: &Upstream, metrics: &PolicyMetrics, e: UpstreamError) -> Response {
    metrics.failed.inc();
    let name = upstream.name.clone();
    let limit = view.config.max_body_bytes;
    let (kind, error) = match e {
        UpstreamError::BodyTooLarge => (Failure::BodyTooLarge, GatewayError::PayloadTooLarge { limit }),
        UpstreamError::Connect(detail) => {
            (Failure::Connect, GatewayError::UpstreamUnreachable { upstream: name, detail })
        }
        UpstreamError::Timeout(after) => {
            (Failure::Timeout, GatewayError::UpstreamTimeout { upstream: name, after })
        }
        UpstreamError::Protocol(detail) => {
            (Failure::Protocol, GatewayError::UpstreamFailed { upstream: name, detail })
        }
        UpstreamError::ClientBody(detail) => (Failure::BadBody, GatewayError::BadBody { detail }),
    };
    metrics.failure(kind).inc();
    tracing::warn!(upstream = %upstream.name, error = %error, "upstream exchange failed");
    error.into_response_for(upstream.kind)
}
