//! Every metric the gateway exports, created in one place and passed in.
//!
//! Labels are bounded: a configured policy name (or `unmetered`), a
//! configured client name (or `anonymous`, `other`, `unknown`), a fixed
//! decision, reason or status class. Never a raw tenant id, path, token or key.
//!
//! The per-request counters and histograms live in one registry per worker
//! thread, so the request path never bounces a cache line between cores;
//! [`Metrics::render`] sums the workers' families into one exposition.
//! Gauges of shared state (queue depth) live in the shared registry.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::proto::{self, MetricFamily};
use prometheus::{
    Counter, CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::admission::runtime::RuntimeStatus;
use crate::admission::{KeyStatus, Reason};

/// The shared registry and every worker's families.
pub struct Metrics {
    shared: Registry,
    queue_depth: IntGaugeVec,
    holds: IntCounterVec,
    revealed: IntGaugeVec,
    proxy_connects: IntCounterVec,
    config_generation: IntGauge,
    config_reloads: IntCounterVec,
    /// The quota store's health and commits.
    pub store: StoreMetrics,
    workers: Vec<WorkerMetrics>,
}

/// What the forward proxy did with a `CONNECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// To an upstream host: TLS terminated, requests metered.
    Intercepted,
    /// To an `allow_tunnel` target: bytes passed through.
    Tunnelled,
    /// To any other target, or malformed: 403 or 400.
    Refused,
    /// The blind tunnel's target could not be reached, or a leaf could not be minted.
    Failed,
}

impl ConnectOutcome {
    fn label(self) -> &'static str {
        match self {
            ConnectOutcome::Intercepted => "intercepted",
            ConnectOutcome::Tunnelled => "tunnelled",
            ConnectOutcome::Refused => "refused",
            ConnectOutcome::Failed => "failed",
        }
    }
}

/// The quota store's metrics (shared registry).
#[derive(Clone)]
pub struct StoreMetrics {
    /// 1 while the store answers (Redis reachable; SQLite always), else 0.
    pub up: IntGauge,
    /// 1 while a replica decides locally because Redis is down (`on_outage = "local"`).
    pub local: IntGauge,
    /// Group commits of the state file, and how long each took.
    pub commits: IntCounter,
    pub commit_seconds: Histogram,
    /// Journal jobs (admissions, charges, ...) written.
    pub jobs: IntCounter,
    /// Store operations that failed (a commit, a Redis call).
    pub errors: IntCounter,
}

impl crate::store::sqlite::Observer for StoreMetrics {
    fn committed(&self, jobs: usize, took: Duration, ok: bool) {
        if ok {
            self.commits.inc();
            self.jobs.inc_by(jobs as u64);
            self.commit_seconds.observe(took.as_secs_f64());
        } else {
            self.errors.inc();
        }
    }
}

/// One worker's per-request families.
struct WorkerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    rejections: IntCounterVec,
    queue_wait: HistogramVec,
    upstream_responses: IntCounterVec,
    upstream_throttles: IntCounterVec,
    upstream_retries: IntCounterVec,
    upstream_failures: IntCounterVec,
    upstream_duration: HistogramVec,
    hunting_charged: CounterVec,
    hunting_overrun: CounterVec,
    hunting_overruns: IntCounterVec,
    hunting_truncated: IntCounterVec,
    hunting_unmetered: IntCounterVec,
    hunting_lookback: IntCounterVec,
    client_requests: IntCounterVec,
}

/// One policy's running-time charges: a reservation counts here whatever
/// ends it (`Stats`, wall time, or the rule for an unknown cost).
#[derive(Clone)]
pub struct Charges {
    charged: Counter,
    overrun: Counter,
    overruns: IntCounter,
}

impl Charges {
    /// A query was charged `cost` against a reservation of `estimate`.
    pub fn count(&self, cost: Duration, estimate: Duration) {
        self.charged.inc_by(cost.as_secs_f64());
        let over = cost.saturating_sub(estimate);
        if !over.is_zero() {
            self.overrun.inc_by(over.as_secs_f64());
            self.overruns.inc();
        }
    }
}

/// One policy's handles on one worker, resolved once so the request path
/// does no label lookups.
pub struct PolicyMetrics {
    pub forwarded: IntCounter,
    pub queued: IntCounter,
    pub rejected: IntCounter,
    pub unauthorized: IntCounter,
    /// Requests answered 400 locally (an invalid hunting body, a lookback refused).
    pub invalid: IntCounter,
    pub failed: IntCounter,
    rejections: [IntCounter; 5],
    pub depth: IntGauge,
    pub wait: Histogram,
    responses: [IntCounter; 5],
    throttles: [IntCounter; 3],
    pub retries: IntCounter,
    /// Holds placed on keys after an upstream throttle.
    pub holds: IntCounter,
    /// The lowest limit the upstream revealed for this policy, 0 when none.
    pub revealed_limit: IntGauge,
    failures: [IntCounter; 5],
    pub duration: Histogram,
    /// Hunting: every running-time charge, and what went beyond its estimate.
    pub charges: Charges,
    /// Hunting: results at the row cap.
    pub truncated: IntCounter,
    /// Hunting: responses whose cost could not be read, charged by rule.
    pub unmetered: IntCounter,
    /// Hunting: queries reaching past the lookback limit, forwarded with a warning.
    pub lookback_warned: IntCounter,
    /// Hunting: such queries refused locally.
    pub lookback_rejected: IntCounter,
}

/// Kinds of upstream failure, as counted.
#[derive(Debug, Clone, Copy)]
pub enum Failure {
    Connect,
    Timeout,
    Protocol,
    BodyTooLarge,
    /// The client's request body failed while it was streamed upstream.
    BadBody,
}

impl PolicyMetrics {
    pub fn rejection(&self, reason: Reason) -> &IntCounter {
        &self.rejections[reason as usize]
    }

    /// Count an upstream response by status class.
    pub fn response(&self, status: u16) -> &IntCounter {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        &self.responses[class]
    }

    /// Count an upstream throttle by kind.
    pub fn throttle(&self, kind: crate::upstream::throttle::Kind) -> &IntCounter {
        &self.throttles[kind as usize]
    }

    pub fn failure(&self, kind: Failure) -> &IntCounter {
        &self.failures[kind as usize]
    }
}

impl Metrics {
    /// What the state file's writer reports to.
    pub fn store_observer(&self) -> StoreMetrics {
        self.store.clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(1)
    }
}

impl WorkerMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        // Seconds, per policy.
        let seconds = |name: &str, help: &str| {
            let c = CounterVec::new(Opts::new(name, help), &["policy"]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["policy"])
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        WorkerMetrics {
            requests: counter(
                "quotagate_requests_total",
                "Proxied requests by policy and decision (forwarded, queued then forwarded, rejected locally, unauthorized, failed).",
                &["policy", "decision"],
            ),
            rejections: counter(
                "quotagate_local_rejections_total",
                "Requests the gateway answered with its own 429, by reason.",
                &["policy", "reason"],
            ),
            queue_wait: histogram(
                "quotagate_queue_wait_seconds",
                "Time admitted requests waited for their slot.",
                vec![0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0],
            ),
            upstream_responses: counter(
                "quotagate_upstream_responses_total",
                "Upstream responses by status class.",
                &["policy", "class"],
            ),
            upstream_throttles: counter(
                "quotagate_upstream_throttles_total",
                "Throttles from the upstream (429, or Graph 503/504 with Retry-After), by kind (call_rate, running_time, concurrency).",
                &["policy", "kind"],
            ),
            upstream_retries: counter(
                "quotagate_upstream_retries_total",
                "Requests sent again after an upstream throttle.",
                &["policy"],
            ),
            upstream_failures: counter(
                "quotagate_upstream_failures_total",
                "Upstream exchanges that failed without a response, by kind.",
                &["policy", "kind"],
            ),
            upstream_duration: histogram(
                "quotagate_upstream_duration_seconds",
                "Time until the upstream's response headers arrived.",
                prometheus::exponential_buckets(0.001, 2.5, 14).expect("valid buckets"),
            ),
            hunting_charged: seconds(
                "quotagate_hunting_charged_seconds_total",
                "Running time charged to hunting budgets: Stats.ExecutionTime, wall time for Graph and for error answers, or the larger of the estimate and the wall time when the cost is unknown.",
            ),
            hunting_overrun: seconds(
                "quotagate_hunting_overrun_seconds_total",
                "Running time charged beyond the estimates the queries reserved: what can carry a tenant past a budget.",
            ),
            hunting_overruns: counter(
                "quotagate_hunting_overruns_total",
                "Hunting queries charged more than the estimate they reserved.",
                &["policy"],
            ),
            hunting_truncated: counter(
                "quotagate_hunting_truncated_total",
                "Hunting results that reached the row cap (probably truncated by the service).",
                &["policy"],
            ),
            hunting_unmetered: counter(
                "quotagate_hunting_unmetered_total",
                "Hunting responses without a readable cost, charged max(estimate, wall time).",
                &["policy"],
            ),
            hunting_lookback: counter(
                "quotagate_hunting_lookback_total",
                "Hunting queries reaching further back than the service keeps data, by action (warned, rejected).",
                &["policy", "action"],
            ),
            client_requests: counter(
                "quotagate_client_requests_total",
                "Requests by client (a configured name, anonymous, other, or unknown for a refused key) and decision.",
                &["client", "decision"],
            ),
            registry,
        }
    }
}

/// One client's request counter on one worker.
pub struct ClientMetrics {
    requests: IntCounterVec,
    name: String,
}

impl ClientMetrics {
    /// Count a request of this client by its decision (a fixed word).
    pub fn count(&self, decision: &str) {
        self.requests.with_label_values(&[self.name.as_str(), decision]).inc();
    }
}

impl Metrics {
    /// Metrics for a gateway with `workers` worker threads.
    pub fn new(workers: usize) -> Self {
        let shared = Registry::new();
        let queue_depth = IntGaugeVec::new(
            Opts::new("quotagate_queue_depth", "Requests waiting for a slot, by policy."),
            &["policy"],
        )
        .expect("valid metric");
        shared.register(Box::new(queue_depth.clone())).expect("unique metric");
        let holds = IntCounterVec::new(
            Opts::new(
                "quotagate_upstream_holds_total",
                "Keys held until the upstream's reset after it throttled.",
            ),
            &["policy"],
        )
        .expect("valid metric");
        shared.register(Box::new(holds.clone())).expect("unique metric");
        let revealed = IntGaugeVec::new(
            Opts::new(
                "quotagate_upstream_revealed_limit",
                "The lowest call limit an upstream throttle message revealed, when lower than configured (0: none).",
            ),
            &["policy"],
        )
        .expect("valid metric");
        shared.register(Box::new(revealed.clone())).expect("unique metric");
        // CONNECTs are few (one per client connection): one shared family is enough.
        let proxy_connects = IntCounterVec::new(
            Opts::new(
                "quotagate_forward_proxy_connects_total",
                "CONNECT requests to the forward proxy, by outcome (intercepted, tunnelled, refused, failed).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        shared.register(Box::new(proxy_connects.clone())).expect("unique metric");
        let build_info =
            IntGaugeVec::new(Opts::new("quotagate_build_info", "Build information; always 1."), &["version"])
                .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        shared.register(Box::new(build_info)).expect("unique metric");
        let config_generation = IntGauge::new(
            "quotagate_config_generation",
            "The running configuration: 1 at start, one more per applied reload.",
        )
        .expect("valid metric");
        shared.register(Box::new(config_generation.clone())).expect("unique metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "quotagate_config_reloads_total",
                "Configuration reloads by result (applied, refused).",
            ),
            &["result"],
        )
        .expect("valid metric");
        shared.register(Box::new(config_reloads.clone())).expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            shared.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let up = gauge("quotagate_store_up", "1 while the quota store answers, 0 while it does not.");
        up.set(1);
        let local = gauge(
            "quotagate_store_local_fallback",
            "1 while this replica decides locally on its share of every limit because Redis is unreachable.",
        );
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            shared.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let commits = counter("quotagate_store_commits_total", "Group commits of the state file.");
        let jobs = counter(
            "quotagate_store_journal_writes_total",
            "Journal writes (admissions, charges, holds) committed to the state file.",
        );
        let errors = counter("quotagate_store_errors_total", "Quota store operations that failed.");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "quotagate_store_commit_seconds",
                "Time one group commit of the state file took.",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]),
        )
        .expect("valid metric");
        shared.register(Box::new(commit_seconds.clone())).expect("unique metric");
        let store = StoreMetrics { up, local, commits, commit_seconds, jobs, errors };
        Metrics {
            shared,
            config_generation,
            config_reloads,
            queue_depth,
            holds,
            revealed,
            proxy_connects,
            store,
            workers: (0..workers.max(1)).map(|_| WorkerMetrics::new()).collect(),
        }
    }

    /// One worker's counter for a client, by its name (from a bounded set).
    pub fn client(&self, worker: usize, name: &str) -> ClientMetrics {
        let w = &self.workers[worker % self.workers.len()];
        ClientMetrics { requests: w.client_requests.clone(), name: name.to_string() }
    }

    /// The running configuration's generation.
    pub fn config_loaded(&self, generation: u64) {
        self.config_generation.set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Count a reload: `applied` or `refused`.
    pub fn reload(&self, result: &str) {
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// Count one forward-proxy `CONNECT`.
    pub fn proxy_connect(&self, outcome: ConnectOutcome) {
        self.proxy_connects.with_label_values(&[outcome.label()]).inc();
    }

    /// Resolve one worker's handles for one policy (`unmetered` for the rest).
    pub fn policy(&self, worker: usize, policy: &str) -> PolicyMetrics {
        let w = &self.workers[worker % self.workers.len()];
        let req = |d: &str| w.requests.with_label_values(&[policy, d]);
        let rej = |r: &str| w.rejections.with_label_values(&[policy, r]);
        let class = |c: &str| w.upstream_responses.with_label_values(&[policy, c]);
        let fail = |k: &str| w.upstream_failures.with_label_values(&[policy, k]);
        PolicyMetrics {
            forwarded: req("forwarded"),
            queued: req("queued"),
            rejected: req("rejected"),
            unauthorized: req("unauthorized"),
            invalid: req("invalid"),
            failed: req("failed"),
            rejections: [
                rej("no_slot"),
                rej("queue_full"),
                rej("wait_too_long"),
                rej("expired"),
                rej("draining"),
            ],
            depth: self.queue_depth.with_label_values(&[policy]),
            wait: w.queue_wait.with_label_values(&[policy]),
            responses: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            throttles: ["call_rate", "running_time", "concurrency"]
                .map(|k| w.upstream_throttles.with_label_values(&[policy, k])),
            retries: w.upstream_retries.with_label_values(&[policy]),
            holds: self.holds.with_label_values(&[policy]),
            revealed_limit: self.revealed.with_label_values(&[policy]),
            failures: [
                fail("connect"),
                fail("timeout"),
                fail("protocol"),
                fail("body_too_large"),
                fail("bad_body"),
            ],
            duration: w.upstream_duration.with_label_values(&[policy]),
            charges: Charges {
                charged: w.hunting_charged.with_label_values(&[policy]),
                overrun: w.hunting_overrun.with_label_values(&[policy]),
                overruns: w.hunting_overruns.with_label_values(&[policy]),
            },
            truncated: w.hunting_truncated.with_label_values(&[policy]),
            unmetered: w.hunting_unmetered.with_label_values(&[policy]),
            lookback_warned: w.hunting_lookback.with_label_values(&[policy, "warned"]),
            lookback_rejected: w.hunting_lookback.with_label_values(&[policy, "rejected"]),
        }
    }

    /// The text exposition format, with the workers' families summed and
    /// the quota state of `keys` per tenant (at most `max_tenants` named).
    pub fn render(&self, keys: &[KeyStatus], runtime: &[RuntimeStatus], max_tenants: usize) -> String {
        let mut families = self.shared.gather();
        families.extend(merge(self.workers.iter().flat_map(|w| w.registry.gather())));
        families.extend(quota_families(keys, max_tenants));
        families.extend(runtime_families(runtime, max_tenants));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_default()
    }
}

/// Per tenant, policy and window: limit, used, remaining and seconds to the
/// next free slot; per policy, the keys under an upstream hold. Tenants past the first `max_tenants` (in sorted order)
/// are summed under `other`; the time to the next slot takes their soonest.
fn quota_families(keys: &[KeyStatus], max_tenants: usize) -> Vec<MetricFamily> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str| {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), &["tenant", "policy", "window"])
            .expect("valid metric");
        registry.register(Box::new(g.clone())).expect("unique metric");
        g
    };
    let limit = gauge("quotagate_quota_limit", "Calls allowed per window.");
    let used = gauge("quotagate_quota_used", "Calls counted in the window now.");
    let remaining = gauge("quotagate_quota_remaining", "Calls the window still allows now.");
    let reset =
        gauge("quotagate_quota_next_slot_seconds", "Seconds until the oldest counted call stops counting.");
    let holds = prometheus::IntGaugeVec::new(
        Opts::new("quotagate_upstream_holds_active", "Keys the upstream has asked to pause, now."),
        &["policy"],
    )
    .expect("valid metric");
    registry.register(Box::new(holds.clone())).expect("unique metric");
    let mut named = TenantLabels::new(max_tenants);
    let mut soonest: BTreeMap<[String; 3], f64> = BTreeMap::new();
    for k in keys {
        holds.with_label_values(&[k.policy.as_str()]).add(i64::from(k.held_for.is_some()));
        let tenant = named.label(&k.key.tenant);
        for w in &k.windows {
            let window = format!("{}s", w.window.per.as_secs_f64());
            let labels = [tenant, k.policy.as_str(), window.as_str()];
            limit.with_label_values(&labels).add(f64::from(w.window.limit.get()));
            used.with_label_values(&labels).add(f64::from(w.used));
            remaining.with_label_values(&labels).add(f64::from(w.remaining()));
            let secs = w.reset.as_secs_f64();
            let next = soonest.entry(labels.map(str::to_string)).or_insert(secs);
            *next = next.min(secs);
            reset.with_label_values(&labels).set(*next);
        }
    }
    registry.gather()
}

/// The `tenant` label: the first `max` tenants by name, then `other`, so
/// the number of series stays bounded.
struct TenantLabels<'a> {
    named: std::collections::BTreeSet<&'a str>,
    max: usize,
}

impl<'a> TenantLabels<'a> {
    fn new(max: usize) -> Self {
        TenantLabels { named: std::collections::BTreeSet::new(), max }
    }

    fn label(&mut self, tenant: &'a str) -> &'a str {
        if self.named.contains(tenant) || self.named.len() < self.max {
            self.named.insert(tenant);
            tenant
        } else {
            "other"
        }
    }
}

/// Per tenant and budget window: the running-time budget, what is charged
/// and reserved in it now, and what remains; per tenant, queries in flight
/// and the estimate a query with no history of its own reserves. Bounded like [`quota_families`].
fn runtime_families(keys: &[RuntimeStatus], max_tenants: usize) -> Vec<MetricFamily> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry.register(Box::new(g.clone())).expect("unique metric");
        g
    };
    let w = &["tenant", "window"];
    let limit = gauge("quotagate_runtime_limit_seconds", "Hunting running time allowed per window.", w);
    let charged =
        gauge("quotagate_runtime_charged_seconds", "Metered running time counted in the window now.", w);
    let reserved =
        gauge("quotagate_runtime_reserved_seconds", "Running time reserved by queries in flight.", w);
    let remaining =
        gauge("quotagate_runtime_remaining_seconds", "Running time the window still allows now.", w);
    let in_flight = gauge("quotagate_runtime_in_flight", "Hunting queries running now.", &["tenant"]);
    let estimate = gauge(
        "quotagate_runtime_estimate_seconds",
        "Running time a query with no history of its own reserves (learnt from the tenant's recent costs).",
        &["tenant"],
    );
    let held = gauge(
        "quotagate_runtime_held_seconds",
        "Time left on an upstream running-time throttle.",
        &["tenant"],
    );
    let mut named = TenantLabels::new(max_tenants);
    for k in keys {
        let tenant = named.label(&k.key.tenant);
        for b in &k.budgets {
            let window = format!("{}s", b.budget.per.as_secs_f64());
            let labels = [tenant, window.as_str()];
            limit.with_label_values(&labels).add(b.budget.limit.as_secs_f64());
            charged.with_label_values(&labels).add(b.charged.as_secs_f64());
            reserved.with_label_values(&labels).add(b.reserved.as_secs_f64());
            remaining.with_label_values(&labels).add(b.remaining().as_secs_f64());
        }
        in_flight.with_label_values(&[tenant]).add(k.in_flight as f64);
        let e = estimate.with_label_values(&[tenant]);
        e.set(e.get().max(k.estimate.as_secs_f64()));
        let h = held.with_label_values(&[tenant]);
        h.set(h.get().max(k.held_for.map_or(0.0, |d| d.as_secs_f64())));
    }
    registry.gather()
}

/// Sum families of the same name, metric by metric (same label values).
fn merge(families: impl Iterator<Item = MetricFamily>) -> Vec<MetricFamily> {
    let mut by_name: BTreeMap<String, (MetricFamily, BTreeMap<Vec<String>, proto::Metric>)> = BTreeMap::new();
    for mut family in families {
        let metrics = family.take_metric();
        let (_, merged) =
            by_name.entry(family.name().to_string()).or_insert_with(|| (family, BTreeMap::new()));
        for metric in metrics {
            let key: Vec<String> = metric.get_label().iter().map(|l| l.value().to_string()).collect();
            match merged.get_mut(&key) {
                None => {
                    merged.insert(key, metric);
                }
                Some(sum) => add(sum, &metric),
            }
        }
    }
    by_name
        .into_values()
        .map(|(mut family, metrics)| {
            family.set_metric(metrics.into_values().collect());
            family
        })
        .collect()
}

fn add(sum: &mut proto::Metric, other: &proto::Metric) {
    let mut counter = proto::Counter::default();
    counter.set_value(sum.get_counter().get_value() + other.get_counter().get_value());
    sum.set_counter(counter);
    let (a, b) = (sum.get_histogram(), other.get_histogram());
    let mut h = proto::Histogram::default();
    h.set_sample_count(a.get_sample_count() + b.get_sample_count());
    h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
    h.set_bucket(
        a.get_bucket()
            .iter()
            .zip(b.get_bucket())
            .map(|(x, y)| {
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(x.upper_bound());
                bucket.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                bucket
            })
            .collect(),
    );
    sum.set_histogram(h);
}

/// Whether a family is of a type [`merge`] sums (all worker families are).
#[cfg(test)]
fn summable(family: &MetricFamily) -> bool {
    use prometheus::proto::MetricType;
    matches!(family.get_field_type(), MetricType::COUNTER | MetricType::HISTOGRAM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_summed_into_one_exposition() {
        let m = Metrics::new(2);
        let (a, b) = (m.policy(0, "incidents"), m.policy(1, "incidents"));
        a.forwarded.inc();
        b.forwarded.inc_by(2);
        a.duration.observe(0.002);
        b.duration.observe(0.002);
        b.duration.observe(10.0);
        for w in &m.workers {
            assert!(w.registry.gather().iter().all(summable));
        }
        let text = m.render(&[], &[], 10);
        assert!(
            text.contains("quotagate_requests_total{decision=\"forwarded\",policy=\"incidents\"} 3"),
            "{text}"
        );
        assert!(text.contains("quotagate_upstream_duration_seconds_count{policy=\"incidents\"} 3"), "{text}");
        assert!(
            text.contains("quotagate_upstream_duration_seconds_bucket{policy=\"incidents\",le=\"0.0025\"} 2"),
            "{text}"
        );
        assert!(text.contains("quotagate_build_info{version="), "{text}");
        assert_eq!(text.matches("# TYPE quotagate_requests_total counter").count(), 1);
    }

    #[test]
    fn a_charge_beyond_its_estimate_counts_as_an_overrun() {
        let m = Metrics::new(1);
        let p = m.policy(0, "hunting");
        p.charges.count(Duration::from_secs(9), Duration::from_secs(2));
        p.charges.count(Duration::from_millis(500), Duration::from_secs(2));
        p.charges.count(Duration::from_secs(2), Duration::from_secs(2));
        let text = m.render(&[], &[], 10);
        assert!(text.contains("quotagate_hunting_charged_seconds_total{policy=\"hunting\"} 11.5"), "{text}");
        assert!(text.contains("quotagate_hunting_overruns_total{policy=\"hunting\"} 1"), "{text}");
        assert!(text.contains("quotagate_hunting_overrun_seconds_total{policy=\"hunting\"} 7"), "{text}");
    }
}
