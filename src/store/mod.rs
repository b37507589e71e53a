//! The quota store: where admissions, running-time charges, upstream holds
//! and revealed limits live, so that they outlive the process (SQLite) or
//! are shared by several replicas (Redis).
//!
//! The quota maths does not change with the backend. With `memory` and
//! `sqlite` the limiters in [`crate::admission`] decide in memory, exactly as
//! their module docs prove; `sqlite` adds a journal of every fact they
//! decide on ([`sqlite`]), which is read back into them at startup. The
//! request path awaits the journal only where the guarantee needs it: an
//! admission (and the running time a hunting query reserves) is on disk
//! before its request is forwarded. Refunds, charges, holds and revealed
//! limits are queued for the next group commit (a few milliseconds): losing
//! a refund only over-counts, and a charge replaces a reservation that is
//! already on disk, so a crash before it lands charges the estimate instead.
//!
//! With `redis` the decision itself moves into Redis ([`redis`]).

mod journal;
mod names;
pub mod redis;
pub mod sqlite;

pub use journal::Journal;
pub use names::PolicyNames;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::admission::runtime::{Reservation, RuntimeLimiter};
use crate::admission::{Admitted, Limiter, Share};
use crate::config::Config;
use crate::policy::Policy;
use crate::quota::{QuotaKey, Window};
use journal::nanos;
use sqlite::Event;

/// How long a limit the upstream revealed is kept after it was last seen:
/// the service's limits change rarely, and forgetting one walks into its
/// throttle again.
pub const REVEALED_FOR: Duration = Duration::from_secs(24 * 3600);

/// Which backend holds the quota state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In memory only: lost on restart. For tests and explicit opt-in.
    Memory,
    /// An embedded SQLite file: survives restarts and `kill -9`.
    Sqlite { path: PathBuf },
    /// A Redis server shared by several replicas.
    Redis { url: String },
}

/// How hard each group commit of the SQLite file is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync every commit (`synchronous = FULL`): survives a power loss.
    Full,
    /// Hand every commit to the OS before the call goes, fsync at
    /// checkpoints (`synchronous = NORMAL` in WAL mode): survives the
    /// process dying (`kill -9`), may lose the last commits to a power loss.
    Normal,
}

/// What a replica does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOutage {
    /// Answer metered calls 503 with `Retry-After` until Redis is back.
    FailClosed,
    /// Decide locally, each replica with `limit ÷ replicas` of every window.
    Local,
}

/// The validated `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub backend: Backend,
    /// Start empty (and say so loudly) when the file is corrupt or unwritable.
    pub allow_start_empty: bool,
    /// How hard each group commit of the SQLite file is pushed to disk.
    pub sync: Durability,
    pub on_outage: OnOutage,
    /// Replicas sharing the Redis store; the local share during an outage.
    pub replicas: NonZeroU32,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// PEM CA certificates for a `rediss://` Redis; `None`: the Web PKI roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Memory,
            allow_start_empty: false,
            sync: Durability::Full,
            on_outage: OnOutage::FailClosed,
            replicas: NonZeroU32::MIN,
            key_prefix: "quotagate".into(),
            ca_pem: None,
        }
    }
}

/// The state file's default path: `$STATE_DIRECTORY/quotagate-state.db`
/// when systemd (or the container image) names a state directory, else
/// `quotagate-state.db` in the working directory.
pub fn default_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories, separated by colons.
        Some(dirs) => {
            let first = dirs.to_string_lossy().split(':').next().unwrap_or_default().to_string();
            PathBuf::from(first).join("quotagate-state.db")
        }
        None => PathBuf::from("quotagate-state.db"),
    }
}

/// Why the store cannot start or cannot record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state file {path} is corrupt ({detail}); move it away to start without the usage it held, or set [store] allow_start_empty = true to do that automatically")]
    Corrupt { path: String, detail: String },
    #[error("the state file {path} cannot be opened for writing ({detail}); give the gateway a writable [store] path, or set [store] allow_start_empty = true to run without durable state")]
    Unwritable { path: String, detail: String },
    #[error("the state file did not record the admission: {0}")]
    Write(String),
    #[error("redis store: {0}")]
    Redis(String),
    /// Redis answers, but holds a value under this key's name that its
    /// script cannot read (another program's, say); other keys are shared.
    #[error("redis store: a value under this key cannot be read: {0}")]
    Unreadable(String),
}

/// Why a hunting query's shared running time was not reserved.
#[derive(Debug)]
pub enum RuntimeRefusal {
    /// The shared budgets said no (or not in time).
    Rejected(crate::admission::runtime::RuntimeRejection),
    /// Redis is down and the config fails closed.
    Down(StoreError),
}

/// The gateway's store.
pub struct Store {
    kind: &'static str,
    journal: Option<Arc<Journal>>,
    path: Option<PathBuf>,
    /// Why the store runs without what it should have (started empty).
    degraded: Option<String>,
    redis: Option<Arc<redis::RedisStore>>,
    /// What rows and Redis keys call each policy ([`names`]).
    names: Arc<PolicyNames>,
}

impl Store {
    /// A reload changed the policies: name their keys, and keep charges,
    /// by the new config.
    pub fn set_policies(&self, policies: &crate::policy::Policies) {
        self.names.set(policies);
        if let Some(j) = &self.journal {
            j.set_charge_horizon(policies);
        }
        if let Some(r) = &self.redis {
            r.set_charges_kept(policies.longest_budget());
        }
    }

    /// The gateway is stopping: requests waiting on a shared store (Redis)
    /// are turned away when their slot comes later than `within` from now.
    pub fn drain(&self, within: Duration) {
        if let Some(r) = &self.redis {
            r.drain(within);
        }
    }

    /// Wait until everything journalled so far is committed to the state
    /// file (a no-op without one). The gateway calls it as it stops.
    pub async fn flush(&self) {
        let Some(j) = &self.journal else { return };
        let (ack, done) = oneshot::channel();
        if j.send(Vec::new(), Some(ack)) {
            match done.await {
                Ok(Ok(())) => tracing::info!("the state file is flushed"),
                Ok(Err(e)) => tracing::error!(error = %e, "the state file could not be flushed"),
                Err(_) => tracing::error!("the state file's writer is gone: nothing more can be flushed"),
            }
        }
    }

    /// No store: state lives in the limiters only.
    pub fn memory() -> Store {
        Store {
            kind: "memory",
            journal: None,
            path: None,
            degraded: None,
            redis: None,
            names: Arc::new(PolicyNames::default()),
        }
    }

    /// Open the configured store and restore into the limiters what it holds.
    pub fn open(
        config: &Config,
        limiter: &Limiter,
        runtime: &RuntimeLimiter,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Store, StoreError> {
        let names = Arc::new(PolicyNames::new(&config.policies));
        match &config.store.backend {
            Backend::Memory => Ok(Store::memory()),
            Backend::Sqlite { path } => journal::open(config, path, names, limiter, runtime, metrics),
            Backend::Redis { url } => {
                let redis =
                    Arc::new(redis::RedisStore::new(config, url, names.clone(), limiter.clock(), metrics)?);
                runtime.set_journal(Arc::new(redis::LedgerJournal(redis.clone())));
                Ok(Store {
                    kind: "redis",
                    journal: None,
                    path: None,
                    degraded: None,
                    redis: Some(redis),
                    names,
                })
            }
        }
    }

    /// The Redis store, when that is the backend.
    pub fn redis(&self) -> Option<&Arc<redis::RedisStore>> {
        self.redis.as_ref()
    }

    /// Admit a call for `key` under `policy`, waiting at most `max_wait`:
    /// in memory by the limiter, or shared through Redis.
    pub async fn acquire(
        &self,
        limiter: &Limiter,
        key: &QuotaKey,
        policy: &Policy,
        share: &Share,
        max_wait: Duration,
        depth: &prometheus::IntGauge,
    ) -> Result<Admitted, redis::Refusal> {
        match &self.redis {
            // Replicas share the key's log in Redis; each orders its own waiters fairly.
            Some(r) => r.acquire(limiter, key, policy, share, max_wait, depth).await,
            None => limiter
                .acquire_as(key, policy, share, max_wait, depth)
                .await
                .map_err(redis::Refusal::Rejected),
        }
    }

    /// The running-time budgets a hunting query of `policy` reserves
    /// against on this replica: the policy's, or its share of them while a
    /// Redis store is down and the config falls back to local limits.
    pub fn runtime_budgets<'a>(&self, policy: &'a Policy) -> std::borrow::Cow<'a, [crate::quota::Budget]> {
        self.budgets_now(&policy.budgets)
    }

    /// `budgets` as this replica applies them now: whole, or its share
    /// while a Redis outage has it admit alone.
    pub fn budgets_now<'a>(
        &self,
        budgets: &'a [crate::quota::Budget],
    ) -> std::borrow::Cow<'a, [crate::quota::Budget]> {
        match &self.redis {
            Some(r) if !r.is_up() && r.on_outage() == OnOutage::Local => std::borrow::Cow::Owned(
                budgets
                    .iter()
                    .map(|b| crate::quota::Budget { limit: b.limit / r.replicas(), per: b.per })
                    .collect(),
            ),
            _ => std::borrow::Cow::Borrowed(budgets),
        }
    }

    /// Reserve a hunting query's running time in the shared ledger too
    /// (Redis), after the local reservation; nothing to do for other stores.
    pub async fn share_running_time(
        &self,
        key: &QuotaKey,
        reservation: &mut Reservation,
        demand: &crate::admission::runtime::Demand<'_>,
        deadline: Duration,
    ) -> Result<(), RuntimeRefusal> {
        let Some(r) = &self.redis else { return Ok(()) };
        if !r.is_up() {
            return match r.on_outage() {
                OnOutage::Local => Ok(()),
                OnOutage::FailClosed => Err(RuntimeRefusal::Down(StoreError::Redis("unreachable".into()))),
            };
        }
        match r.reserve_runtime(key, reservation, demand, deadline).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(rejection)) => Err(RuntimeRefusal::Rejected(rejection)),
            Err(e) => {
                r.failed(&e);
                match r.on_outage() {
                    OnOutage::Local => Ok(()),
                    OnOutage::FailClosed => Err(RuntimeRefusal::Down(redis::RedisStore::refusal(&e))),
                }
            }
        }
    }

    /// Drop idle bookkeeping.
    pub fn sweep(&self) {
        if let Some(r) = &self.redis {
            r.sweep();
        }
    }

    /// Make an admission (and a hunting query's reservation) durable; the
    /// request must not be forwarded before this returns `Ok`.
    pub async fn admitted(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        admitted: &Admitted,
        reservation: Option<&mut Reservation>,
    ) -> Result<(), StoreError> {
        let Some(j) = &self.journal else { return Ok(()) };
        let at = j.unix(admitted.at());
        let horizon = call_horizon(policy, admitted, j.guard);
        let mut events = vec![Event::Admit {
            key: self.names.encode(key),
            policy: policy.name.clone(),
            at,
            expires: at.saturating_add(horizon),
        }];
        if let Some(r) = reservation {
            if let Some(rkey) = r.journal_key() {
                let id = j.next_pending.fetch_add(1, Ordering::Relaxed);
                let estimate = i64::try_from(r.estimate().as_nanos()).unwrap_or(i64::MAX);
                events.push(Event::Pending {
                    id,
                    key: self.names.encode(rkey),
                    sent: at,
                    estimate,
                    expires: at.saturating_add(j.charge_horizon()),
                });
                r.set_pending(id);
            }
        }
        let (ack, done) = oneshot::channel();
        if !j.send(events, Some(ack)) {
            return Err(StoreError::Write("the writer thread has stopped".into()));
        }
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Write(e)),
            Err(_) => Err(StoreError::Write("the writer thread has stopped".into())),
        }
    }

    /// The call of `admitted` left late, and [`Limiter::released`] moved
    /// its local entry: move the stored one too. Redis is told before the
    /// call goes, since other replicas decide on it; the state file is told
    /// in the next group commit, not waited for, since only a restart reads
    /// it (a crash before that commit restores the admission time, the
    /// earlier and so less conservative one, by at most the call's delay).
    ///
    /// [`Limiter::released`]: crate::admission::Limiter::released
    pub async fn released(&self, key: &QuotaKey, policy: &Policy, admitted: &Admitted) {
        if let Some(r) = &self.redis {
            r.released(key, policy, admitted).await;
        }
        if let Some(j) = &self.journal {
            if admitted.stamp() != admitted.at() {
                let horizon = call_horizon(policy, admitted, j.guard);
                let to = j.unix(admitted.stamp());
                let (key, at) = (self.names.encode(key), j.unix(admitted.at()));
                j.send(vec![Event::Restamp { key, at, to, expires: to.saturating_add(horizon) }], None);
            }
        }
    }

    /// The admission never reached the upstream.
    pub fn refunded(&self, key: &QuotaKey, admitted: &Admitted) {
        if let Some(r) = &self.redis {
            r.refund(key, admitted);
        }
        if let Some(j) = &self.journal {
            // Where the file has it: moved to its departure if it left late.
            j.send(vec![Event::Refund { key: self.names.encode(key), at: j.unix(admitted.stamp()) }], None);
        }
    }

    /// The upstream holds `key` until clock reading `until`.
    pub async fn held(&self, key: &QuotaKey, policy: &Policy, until: u64, runtime: bool) {
        if let Some(r) = &self.redis {
            r.hold_until(key, until, runtime).await;
        }
        if let Some(j) = &self.journal {
            let scope = if runtime { "runtime" } else { "call" };
            let (key, policy, until) = (self.names.encode(key), policy.name.clone(), j.unix(until));
            j.send(vec![Event::Hold { scope, key, policy, until }], None);
        }
    }

    /// The upstream revealed a lower limit for `key`.
    pub async fn revealed(&self, key: &QuotaKey, policy: &Policy, window: Window) {
        if let Some(r) = &self.redis {
            r.reveal(key, policy, window).await;
        }
        if let Some(j) = &self.journal {
            let now = sqlite::unix_now();
            let per = nanos(window.per);
            let horizon = nanos((policy.longest_kept() + j.guard).max(REVEALED_FOR)).max(per);
            j.send(
                vec![Event::Reveal {
                    key: self.names.encode(key),
                    policy: policy.name.clone(),
                    per,
                    limit: window.limit.get(),
                    expires: now.saturating_add(horizon),
                    keep: nanos(window.per + j.guard),
                }],
                None,
            );
        }
    }

    /// The store's part of `/readyz`: its kind, whether it answers, where it is.
    pub fn status(&self) -> serde_json::Value {
        if let Some(r) = &self.redis {
            return r.status();
        }
        serde_json::json!({
            "kind": self.kind,
            "reachable": true,
            "durable": self.journal.is_some(),
            "path": self.path.as_ref().map(|p| p.display().to_string()),
            "degraded": self.degraded,
        })
    }

    /// Whether the store answers (always, except Redis failing closed while down).
    pub fn ready(&self) -> bool {
        self.redis.as_ref().is_none_or(|r| r.ready())
    }
}

/// How long an admission under `policy` counts after its call: the longest
/// window of the policies that may share its key, or of the windows it was
/// admitted under (a limit the upstream revealed may be of a longer one),
/// and the guard, in nanoseconds.
fn call_horizon(policy: &Policy, admitted: &Admitted, guard: Duration) -> i64 {
    let revealed = admitted.usage.iter().map(|u| u.window.per).max().unwrap_or_default();
    nanos(policy.longest_kept().max(revealed) + guard)
}
