//! Advanced hunting specifics: the running-time settings, what a request
//! asks ([`request`]), how far back a query reaches ([`lookback`]), and what
//! a response says it cost ([`stats`], [`meter`]).

pub mod lookback;
pub mod meter;
pub mod request;
pub mod stats;

use std::time::Duration;

use crate::admission::runtime::Estimator;
use crate::quota::KeyScope;

/// What to do with a query that reaches further back than the service keeps data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookbackMode {
    /// Forward it with a warning header, a log line and a metric.
    Warn,
    /// Answer 400 locally, spending no quota.
    Reject,
    /// Do not check.
    Off,
}

/// The gateway-wide hunting settings (`[hunting]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hunting {
    /// `Tenant` or `TenantApp`.
    pub key: KeyScope,
    pub estimator: Estimator,
    pub max_concurrent: Option<usize>,
    pub stats_prefix_bytes: usize,
    /// Most decoded bytes of one response the `Stats` scanner reads.
    pub max_scan_bytes: u64,
    pub lookback: LookbackMode,
    pub lookback_limit: Duration,
    pub max_rows: u64,
    /// How long a running-time key keeps its charges: the longest window of
    /// any policy's budgets ([`crate::policy::Policies::longest_budget`]).
    pub retention: Duration,
}
