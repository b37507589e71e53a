//! Which policy meters a request: method, upstream and path → [`Policy`].
//!
//! Policies are tried in configured order and the first match wins. A
//! request no policy matches is forwarded unmetered.

pub mod pattern;

use std::time::Duration;

use http::Method;

pub use pattern::PathPattern;

use crate::quota::{Budget, KeyScope, Window};

/// What a request does when its key has no free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait in a bounded FIFO queue until the exact moment a slot frees.
    Queue,
    /// Answer 429 at once with the exact `Retry-After`.
    Reject,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the response headers arrive.
    pub header: Duration,
    /// For the whole exchange, body included.
    pub total: Duration,
}

/// One metered class of calls, as validated from config.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Position in the configured order.
    pub id: u16,
    /// The policy's id in quota keys: its position when first loaded, kept
    /// by name across reloads, so a key's admissions follow its policy.
    pub key_id: u16,
    pub name: String,
    pub methods: Vec<Method>,
    /// Indices of the upstreams this policy applies to; empty means any.
    pub upstreams: Vec<usize>,
    pub paths: Vec<PathPattern>,
    /// Non-empty.
    pub windows: Vec<Window>,
    /// The windows of every policy whose calls may share a key with this
    /// one's (the same `key` scope, unless it names the policy), this
    /// one's included: a key's log keeps what the longest and largest of
    /// them still counts, whichever policy touched it last.
    pub kept: Vec<Window>,
    pub key: KeyScope,
    pub mode: Mode,
    pub max_wait: Duration,
    pub max_queue: usize,
    /// Attempts at the upstream when it throttles, the first included (≥ 1).
    pub max_attempts: u32,
    /// Advanced hunting: its queries spend running time.
    pub hunting: bool,
    /// Running-time budgets of a hunting policy (empty otherwise).
    pub budgets: Vec<Budget>,
    pub timeouts: Timeouts,
}

impl Policy {
    /// The longest window a key of this policy's must be kept for.
    pub fn longest_kept(&self) -> Duration {
        self.kept.iter().map(|w| w.per).max().unwrap_or_default()
    }

    pub fn matches(&self, method: &Method, upstream: usize, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.upstreams.is_empty() || self.upstreams.contains(&upstream))
            && self.paths.iter().any(|p| p.matches(path))
    }
}

/// The configured policies, in order.
#[derive(Debug, Clone, Default)]
pub struct Policies(pub Vec<Policy>);

impl Policies {
    /// The longest running-time window of any policy: how long a charge
    /// must be kept. Policies whose hunting key scope is the same share one
    /// ledger per tenant (or tenant and app), so each must keep what the
    /// others still count.
    pub fn longest_budget(&self) -> std::time::Duration {
        self.0.iter().map(|p| crate::quota::ledger::longest(&p.budgets)).max().unwrap_or_default()
    }

    /// What every hunting policy allows on the running-time ledger they
    /// share: for each window length, the smallest budget. A shared key's
    /// status is reported against these, whichever policy admitted last
    /// (the built-in `hunting` and `hunting-mde` allow 4 h and 3 h a day).
    pub fn strictest_budgets(&self) -> Vec<Budget> {
        let mut out: Vec<Budget> = Vec::new();
        for b in self.0.iter().filter(|p| p.hunting).flat_map(|p| &p.budgets) {
            match out.iter_mut().find(|o| o.per == b.per) {
                Some(o) => o.limit = o.limit.min(b.limit),
                None => out.push(*b),
            }
        }
        out.sort_by_key(|b| b.per);
        out
    }

    /// The first policy that meters this request, if any.
    pub fn find(&self, method: &Method, upstream: usize, path: &str) -> Option<&Policy> {
        self.0.iter().find(|p| p.matches(method, upstream, path))
    }
}
