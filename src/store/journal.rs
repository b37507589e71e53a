//! The SQLite journal behind [`Store`]: opening the file (or starting empty
//! when allowed), restoring what it holds into the limiters, and the handle
//! that sends events to its writer thread ([`sqlite::run`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::sqlite::{self, Event, Job};
use super::{PolicyNames, Store, StoreError};
use crate::admission::runtime::{ChargeJournal, RuntimeLimiter};
use crate::admission::Limiter;
use crate::config::Config;
use crate::quota::{Clock, QuotaKey, Window};

/// The SQLite journal: a sender to the writer thread and the clock it converts with.
pub struct Journal {
    tx: Mutex<mpsc::Sender<Job>>,
    clock: Clock,
    pub(super) next_pending: AtomicU64,
    /// How long past its window an admission still counts.
    pub(super) guard: Duration,
    /// How long a charge counts (longest budget of the running config +
    /// guard); a reload that lengthens a budget lengthens it.
    charge_horizon: AtomicI64,
    names: Arc<PolicyNames>,
}

impl Journal {
    pub(super) fn send(&self, events: Vec<Event>, ack: Option<oneshot::Sender<Result<(), String>>>) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(Job { events, ack }).is_ok()
    }

    pub(super) fn unix(&self, at: u64) -> i64 {
        self.clock.to_unix(at)
    }

    /// How long a running-time charge made now counts.
    pub(super) fn charge_horizon(&self) -> i64 {
        self.charge_horizon.load(Ordering::Relaxed)
    }

    /// Follow the budgets of a reloaded config.
    pub(super) fn set_charge_horizon(&self, policies: &crate::policy::Policies) {
        self.charge_horizon.store(horizon(policies, self.guard), Ordering::Relaxed);
    }
}

/// How long a charge counts: the longest budget of `policies`, and the guard.
fn horizon(policies: &crate::policy::Policies, guard: Duration) -> i64 {
    nanos(policies.longest_budget() + guard)
}

impl ChargeJournal for Journal {
    fn charged(&self, key: &QuotaKey, pending: Option<u64>, end: u64, cost: u64) {
        let end = self.unix(end);
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        let expires = end.saturating_add(self.charge_horizon());
        self.send(vec![Event::Charge { pending, key: self.names.encode(key), end, cost, expires }], None);
    }

    fn released(&self, pending: u64) {
        self.send(vec![Event::Release { pending }], None);
    }
}

pub(super) fn open(
    config: &Config,
    path: &std::path::Path,
    names: Arc<PolicyNames>,
    limiter: &Limiter,
    runtime: &RuntimeLimiter,
    metrics: &crate::metrics::Metrics,
) -> Result<Store, StoreError> {
    let opened = match sqlite::open(path, config.store.sync) {
        Err(StoreError::Corrupt { path: p, detail }) if config.store.allow_start_empty => {
            let aside = sqlite::set_aside(path)
                .map_err(|e| StoreError::Unwritable { path: p.clone(), detail: e.to_string() })?;
            tracing::error!(path = %p, error = %detail, moved_to = %aside.display(),
                "THE STATE FILE IS CORRUPT: starting EMPTY (allow_start_empty = true); usage recorded before is forgotten and the upstream may throttle");
            sqlite::open(path, config.store.sync)
                .map(|c| (c, Some(format!("started empty: the old file was corrupt ({detail})"))))
        }
        other => other.map(|c| (c, None)),
    };
    let (mut conn, degraded) = match opened {
        Ok(ok) => ok,
        Err(e @ StoreError::Unwritable { .. }) if config.store.allow_start_empty => {
            tracing::error!(error = %e,
                "THE STATE FILE CANNOT BE WRITTEN: running on memory only (allow_start_empty = true); usage will not survive a restart");
            let mut store = Store::memory();
            store.names = names;
            store.degraded = Some(format!("running in memory: {e}"));
            store.path = Some(path.to_path_buf());
            return Ok(store);
        }
        Err(e) => return Err(e),
    };
    let clock = limiter.clock();
    // The longest a hunting query may run: the gateway gives up on it at
    // its policy's total timeout.
    let longest_run = config.policies.0.iter().filter(|p| p.hunting).map(|p| p.timeouts.total).max();
    let guard = config.guard;
    let charge_horizon = horizon(&config.policies, guard);
    let now = sqlite::unix_now();
    sqlite::charge_pending(&mut conn, now, nanos(longest_run.unwrap_or_default()), charge_horizon)
        .map_err(|e| StoreError::Unwritable { path: path.display().to_string(), detail: e.to_string() })?;
    let contents = sqlite::load(&conn, now)
        .map_err(|e| StoreError::Corrupt { path: path.display().to_string(), detail: e.to_string() })?;
    let restored = restore(config, &names, &contents, clock, limiter, runtime);
    tracing::info!(path = %path.display(), admissions = restored.0, charges = restored.1, holds = restored.2,
        "restored quota state from the state file");
    let (tx, rx) = mpsc::channel();
    let observer = metrics.store_observer();
    let prune_every = config.idle_sweep;
    std::thread::Builder::new()
        .name("quotagate-store".into())
        .spawn(move || sqlite::run(conn, rx, prune_every, observer))
        .map_err(|e| StoreError::Unwritable { path: path.display().to_string(), detail: e.to_string() })?;
    let journal = Arc::new(Journal {
        tx: Mutex::new(tx),
        clock,
        next_pending: AtomicU64::new(u64::try_from(sqlite::unix_now()).unwrap_or(1)),
        guard,
        charge_horizon: AtomicI64::new(charge_horizon),
        names: names.clone(),
    });
    runtime.set_journal(journal.clone());
    Ok(Store {
        kind: "sqlite",
        journal: Some(journal),
        path: Some(path.to_path_buf()),
        degraded,
        redis: None,
        names,
    })
}

pub(super) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Put the file's contents into the limiters; returns how many admissions,
/// charges and holds were restored.
fn restore(
    config: &Config,
    names: &PolicyNames,
    c: &sqlite::Contents,
    clock: Clock,
    limiter: &Limiter,
    runtime: &RuntimeLimiter,
) -> (usize, usize, usize) {
    let policies = &config.policies.0;
    // Rows name their policy; its keys take the id it runs under now.
    let policy = |name: &str| {
        let id = names.id(name, &config.policies)?;
        policies.iter().find(|p| p.key_id == id)
    };
    let decode = |key: &str| names.decode(key, &config.policies);
    let hunting_budgets = policies.iter().find(|p| p.hunting).map(|p| p.budgets.clone()).unwrap_or_default();
    let retention = config.hunting.retention;
    let mut n = (0, 0, 0);
    // Admissions, grouped by key (the rows come sorted by key).
    let mut i = 0;
    while i < c.admissions.len() {
        let (key, pid, _) = &c.admissions[i];
        let j = i + c.admissions[i..].iter().take_while(|(k, _, _)| k == key).count();
        let times: Vec<u64> = c.admissions[i..j].iter().map(|(_, _, at)| clock.from_unix(*at)).collect();
        if let (Some(qk), Some(p)) = (decode(key), policy(pid)) {
            // Every limit revealed for the key, of whatever window length.
            let revealed = revealed_windows(c.reveals.iter().filter(|(k, _, _, _)| k == key));
            limiter.restore(&qk, p, &times, 0, &revealed);
            n.0 += times.len();
        }
        i = j;
    }
    let mut i = 0;
    while i < c.charges.len() {
        let key = &c.charges[i].0;
        let j = i + c.charges[i..].iter().take_while(|(k, _, _)| k == key).count();
        let charges: Vec<(u64, u64)> = c.charges[i..j]
            .iter()
            .map(|(_, end, cost)| (clock.from_unix(*end), u64::try_from(*cost).unwrap_or(0)))
            .collect();
        if let Some(qk) = decode(key) {
            runtime.restore(&qk, &hunting_budgets, retention, &charges, 0);
            n.1 += charges.len();
        }
        i = j;
    }
    for (scope, key, pid, until) in &c.holds {
        let (Some(qk), until) = (decode(key), clock.from_unix(*until)) else { continue };
        match (scope.as_str(), policy(pid)) {
            ("runtime", _) => runtime.restore(&qk, &hunting_budgets, retention, &[], until),
            (_, Some(p)) => limiter.restore(&qk, p, &[], until, &[]),
            _ => continue,
        }
        n.2 += 1;
    }
    n
}

/// The windows of reveal rows `(key, policy, per, limit)`; a row that is
/// not a window (zero limit, negative length) is left out.
fn revealed_windows<'a>(rows: impl Iterator<Item = &'a (String, String, i64, u32)>) -> Vec<Window> {
    rows.filter_map(|(_, _, per, lim)| {
        Some(Window::new(NonZeroU32::new(*lim)?, Duration::from_nanos(u64::try_from(*per).ok()?)))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::IntGauge;

    use super::*;
    use crate::admission::runtime::Demand;
    use crate::metrics::Metrics;

    fn config(path: &std::path::Path) -> Config {
        let text = format!(
            r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "10ms"
[[upstream]]
name = "defender"
url = "http://127.0.0.1:9"
kind = "defender"
[store]
backend = "sqlite"
path = {:?}
[hunting]
budgets = [{{ limit = "1h", per = "24h" }}]
[[policy]]
name = "hunting"
paths = ["/api/advancedhunting/run"]
windows = [{{ limit = 45, per = "1m" }}]
hunting = true
"#,
            path.to_str().unwrap()
        );
        Config::from_toml(&text, "test").unwrap()
    }

    /// What a restart restores: the admissions, the metered charge of a
    /// settled query, the estimate of a query still in flight, and holds.
    #[tokio::test]
    async fn a_restart_restores_admissions_charges_reservations_and_holds() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir.path().join("state.db"));
        let policy = &config.policies.0[0];
        let key = QuotaKey { policy: Some(0), tenant: "t".into(), app: Some("a".into()) };
        let tenant = QuotaKey { policy: None, tenant: "t".into(), app: None };
        let depth = IntGauge::new("d", "d").unwrap();
        let demand = Demand {
            budgets: &policy.budgets,
            retention: config.hunting.retention,
            mode: crate::policy::Mode::Queue,
            max_wait: Duration::from_secs(1),
            max_queue: 10,
            max_concurrent: None,
            estimate: &config.hunting.estimator,
            query: None,
        };
        {
            let (limiter, runtime) =
                (Limiter::new(config.guard), RuntimeLimiter::new(config.guard, config.hunting.estimator));
            let store = Store::open(&config, &limiter, &runtime, &Metrics::default()).unwrap();
            for _ in 0..2 {
                let mut r = runtime.reserve(&tenant, &demand, &depth).await.unwrap();
                let admitted = limiter.acquire(&key, policy, Duration::ZERO, &depth).await.unwrap();
                store.admitted(&key, policy, &admitted, Some(&mut r)).await.unwrap();
                r.sent();
                // The first query is metered; the second is in flight when the process dies.
                if runtime.snapshot(&[])[0].in_flight == 2 {
                    std::mem::forget(r);
                } else {
                    r.settle(Duration::from_secs(30));
                }
            }
            limiter.hold(&key, Duration::from_secs(60));
            store.held(&key, policy, limiter.hold_until(&key), false).await;
            // A last admission, awaited, so everything queued before it is on disk.
            let admitted = limiter.acquire(&key, policy, Duration::ZERO, &depth).await;
            assert!(admitted.is_err(), "held");
            let other = QuotaKey { tenant: "u".into(), ..key.clone() };
            let admitted = limiter.acquire(&other, policy, Duration::ZERO, &depth).await.unwrap();
            store.admitted(&other, policy, &admitted, None).await.unwrap();
        }
        let (limiter, runtime) =
            (Limiter::new(config.guard), RuntimeLimiter::new(config.guard, config.hunting.estimator));
        let _store = Store::open(&config, &limiter, &runtime, &Metrics::default()).unwrap();
        assert_eq!(limiter.admissions(&key).len(), 2);
        let held = limiter.held_for(&key).expect("the hold survives");
        assert!(held > Duration::from_secs(55), "{held:?}");
        let status = runtime.snapshot(&[]);
        let charged = status[0].budgets[0].charged;
        // 30 s metered, plus the estimate the query in flight reserved (30 s,
        // learnt from the first).
        assert_eq!(charged, Duration::from_secs(60), "{status:?}");
    }
}
