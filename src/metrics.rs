//! Every metric the gateway exports, created in one place and passed in.
//!
//! Labels are bounded: a configured policy name (or `unmetered`), a fixed
//! decision, reason or status class. Never a tenant id, path or token.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::admission::Reason;

/// The registry and the metric families.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    rejections: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    upstream_responses: IntCounterVec,
    upstream_throttles: IntCounterVec,
    upstream_failures: IntCounterVec,
    upstream_duration: HistogramVec,
}

/// One policy's handles, resolved once so the request path does no label lookups.
pub struct PolicyMetrics {
    pub forwarded: IntCounter,
    pub queued: IntCounter,
    pub rejected: IntCounter,
    pub unauthorized: IntCounter,
    pub failed: IntCounter,
    rejections: [IntCounter; 4],
    pub depth: IntGauge,
    pub wait: Histogram,
    responses: [IntCounter; 5],
    pub throttles: IntCounter,
    failures: IntCounterVec,
    policy: String,
    pub duration: Histogram,
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

    /// Count an upstream failure of a fixed kind.
    pub fn failure(&self, kind: &'static str) -> IntCounter {
        self.failures.with_label_values(&[self.policy.as_str(), kind])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["policy"])
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let requests = counter(
            "quotagate_requests_total",
            "Proxied requests by policy and decision (forwarded, queued then forwarded, rejected locally, unauthorized, failed).",
            &["policy", "decision"],
        );
        let rejections = counter(
            "quotagate_local_rejections_total",
            "Requests the gateway answered with its own 429, by reason.",
            &["policy", "reason"],
        );
        let queue_depth = IntGaugeVec::new(
            Opts::new("quotagate_queue_depth", "Requests waiting for a slot, by policy."),
            &["policy"],
        )
        .expect("valid metric");
        registry.register(Box::new(queue_depth.clone())).expect("unique metric");
        let queue_wait = histogram(
            "quotagate_queue_wait_seconds",
            "Time admitted requests waited for their slot.",
            vec![0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0],
        );
        let upstream_responses = counter(
            "quotagate_upstream_responses_total",
            "Upstream responses by status class.",
            &["policy", "class"],
        );
        let upstream_throttles =
            counter("quotagate_upstream_throttles_total", "429 responses from the upstream.", &["policy"]);
        let upstream_failures = counter(
            "quotagate_upstream_failures_total",
            "Upstream exchanges that failed without a response, by kind.",
            &["policy", "kind"],
        );
        let upstream_duration = histogram(
            "quotagate_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
            prometheus::exponential_buckets(0.001, 2.5, 14).expect("valid buckets"),
        );
        let build_info =
            IntGaugeVec::new(Opts::new("quotagate_build_info", "Build information; always 1."), &["version"])
                .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build_info)).expect("unique metric");
        Metrics {
            registry,
            requests,
            rejections,
            queue_depth,
            queue_wait,
            upstream_responses,
            upstream_throttles,
            upstream_failures,
            upstream_duration,
        }
    }

    /// Resolve the handles of one policy (`unmetered` for the rest).
    pub fn policy(&self, policy: &str) -> PolicyMetrics {
        let req = |d: &str| self.requests.with_label_values(&[policy, d]);
        let rej = |r: &str| self.rejections.with_label_values(&[policy, r]);
        let class = |c: &str| self.upstream_responses.with_label_values(&[policy, c]);
        PolicyMetrics {
            forwarded: req("forwarded"),
            queued: req("queued"),
            rejected: req("rejected"),
            unauthorized: req("unauthorized"),
            failed: req("failed"),
            rejections: [rej("no_slot"), rej("queue_full"), rej("wait_too_long"), rej("expired")],
            depth: self.queue_depth.with_label_values(&[policy]),
            wait: self.queue_wait.with_label_values(&[policy]),
            responses: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            throttles: self.upstream_throttles.with_label_values(&[policy]),
            failures: self.upstream_failures.clone(),
            policy: policy.to_string(),
            duration: self.upstream_duration.with_label_values(&[policy]),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}
