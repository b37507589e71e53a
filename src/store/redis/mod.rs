//! The Redis store: several replicas share one exact quota.
//!
//! Every key's call log is a sorted set of admission times (microseconds on
//! Redis's own clock, `TIME`, so replicas on different machines share one
//! clock). One Lua script ([`ADMIT`], run with `EVALSHA`) reads the key's
//! upstream hold, finds for every window `(N, W)` the `N`-th newest
//! admission, and either records the call now or answers the earliest time
//! one could go: the check and the record of all windows of a key are one
//! atomic step. That is the maths of [`crate::quota::AdmissionLog`]: every
//! admission is at least `W + guard` after the one `N` places before it, so
//! **no interval of length `W` holds more than `N` admissions, whichever
//! replicas made them**. The set carries a TTL of its longest window plus
//! the guard, and older entries are trimmed by the script.
//! A call that leaves its replica late (its body read after the admission)
//! has its member moved to its departure first ([`RESTAMP`]), as
//! [`crate::quota::AdmissionLog::restamp`] does locally.
//!
//! Waiting: while nobody on this replica waits for a key, its requests ask
//! Redis at once; those asking together share one run of the script
//! ([`batch`]). Once some are told "not before t", they
//! wait on this replica in the order of [`crate::admission::fair`] (reserved
//! minimums, classes, weighted fair queuing, caps): only the one chosen asks
//! Redis, sleeping until the time the last answer named ([`queue`]).
//! Nobody polls: each request to Redis is at a moment a slot was due.
//!
//! Upstream holds are Redis keys too ([`HOLD`]): a 429 one replica sees
//! holds the key for all, because every admission script reads the hold.
//!
//! Outage: a failed call marks the store down (logged once, the
//! `quotagate_store_up` gauge, `/readyz`). Then, as configured, metered
//! calls are answered 503 with `Retry-After` (fail closed), or each replica
//! decides locally with `limit ÷ replicas` of every window. A watcher pings
//! Redis every half second and switches back by itself when it answers.
//!
//! A lower limit the upstream revealed (in a 429's message) is kept in Redis
//! too ([`REVEAL`]) and applied by the admission script for every replica.
//! The hunting running-time ledger is shared the same way ([`ledger`]).

mod batch;
mod ledger;
mod outage;
mod queue;

pub use ledger::LedgerJournal;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntGauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::{OnOutage, PolicyNames, StoreError};
use crate::admission::rejection::Drain;
use crate::admission::{Admitted, Limiter, Rejection, Share};
use crate::config::Config;
use crate::metrics::StoreMetrics;
use crate::policy::Policy;
use crate::quota::{KeyMap, QuotaKey, Window, WindowUse};

/// Check every window of a key and record calls, or say when one could go.
///
/// KEYS: the log (sorted set), the hold, the revealed limits (a hash of
/// window length µs to limit). ARGV: guard µs, window count `n`, how long
/// the log is kept µs (at least the longest window of any policy sharing
/// the key, plus the guard), then limit and length µs per window, then the
/// new entries' members (each unique: the replica's nonce and a counter), in
/// the order their calls asked. A
/// revealed limit lowers the window of its length, or adds one
/// ([`crate::quota::tightened`]).
///
/// The members are admitted one after another at Redis's `now`, each by the
/// rule of one admission: member `j` (0-based) goes when, in every window
/// `(N, W)`, the admission `N` places before it, which is the old entry of
/// rank `N - 1 - j` from the newest (or one of this run's own members when
/// `j >= N`), is at least `W + guard` old. The first member refused stops
/// the run; the members after it are refused with it.
///
/// Returns `{m, now, free, binding, count per window...}`: the first `m`
/// members were admitted at `now` (the counts are each window's use with
/// them); when `m` is short of the members, `free` is the earliest time the
/// next one could go, and `binding` the window that decides it (1-based;
/// past the configured ones: a revealed window), or -1 for the hold.
/// Scores and bounds are whole microseconds, printed with `%.0f`: Lua's
/// default number format keeps 14 digits, not the 16 of a time.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local guard = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local k = #ARGV - 3 - 2 * n
local wins = {}
for i = 1, n do wins[i] = {tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])} end
local revealed = redis.call('HGETALL', KEYS[3])
for j = 1, #revealed, 2 do
  local per, limit = tonumber(revealed[j]), tonumber(revealed[j + 1])
  local found = false
  for i = 1, #wins do
    if wins[i][2] == per then
      found = true
      if limit < wins[i][1] then wins[i][1] = limit end
    end
  end
  if not found then wins[#wins + 1] = {limit, per} end
end
local m = k
local free, binding = now, 0
local hold = tonumber(redis.call('GET', KEYS[2]) or '0')
if hold > now then m = 0; free = hold; binding = -1 end
local longest = tonumber(ARGV[3])
local old = {}
for i = 1, #wins do
  local limit, per = wins[i][1], wins[i][2]
  if per + guard > longest then longest = per + guard end
  local lo = math.max(limit - k, 0)
  old[i] = {lo, redis.call('ZREVRANGE', KEYS[1], lo, limit - 1, 'WITHSCORES')}
  local j = 0
  while j < m do
    local r = limit - 1 - j
    if r < 0 then break end
    local s = old[i][2][2 * (r - lo) + 2]
    if s and tonumber(s) + per + guard > now then break end
    j = j + 1
  end
  m = j
end
if m < k then
  for i = 1, #wins do
    local limit, per = wins[i][1], wins[i][2]
    local r = limit - 1 - m
    local f = now
    if r < 0 then
      f = now + per + guard
    else
      local s = old[i][2][2 * (r - old[i][1]) + 2]
      if s then f = tonumber(s) + per + guard end
    end
    if f > free then free = f; binding = i end
  end
end
local out = {m, now, free, binding}
if m == 0 then return out end
local add = {}
for j = 1, m do add[2 * j - 1] = now; add[2 * j] = ARGV[3 + 2 * n + j] end
redis.call('ZADD', KEYS[1], unpack(add))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - longest))
redis.call('PEXPIRE', KEYS[1], math.floor(longest / 1000) + 1)
for i = 1, n do
  local per = tonumber(ARGV[3 + 2 * i])
  out[4 + i] = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now - per), '+inf')
end
return out
";

/// Lower a key's limit for windows of `ARGV[1]` µs to `ARGV[2]` (never
/// raising one already lower), kept `ARGV[3]` ms. KEYS: the revealed limits.
const REVEAL: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local limit = tonumber(ARGV[2])
if cur == 0 or limit < cur then redis.call('HSET', KEYS[1], ARGV[1], limit) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
";

/// Hold a key for `ARGV[1]` µs from now (Redis's clock); a shorter hold
/// never shortens a longer one. The hold key expires with the hold.
const HOLD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + wait > cur then
  redis.call('SET', KEYS[1], now + wait, 'PX', math.floor(wait / 1000) + 1)
end
return 1
";

/// Move the member `ARGV[1]` of the call log `KEYS[1]` to now (Redis's
/// clock): its call left this replica only now. The log then lives at
/// least `ARGV[2]` ms more, its longest window and guard from the move.
/// A member already trimmed or refunded stays absent (`XX`).
const RESTAMP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local moved = redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[1])
if moved > 0 and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return moved
";

/// How long a Redis call may take before the store counts as down.
const TIMEOUT: Duration = Duration::from_millis(500);
/// How often the watcher pings Redis while it is down.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// `Retry-After` of a call refused while failing closed.
pub const FAIL_CLOSED_RETRY: Duration = Duration::from_secs(2);

/// Why a shared admission did not happen.
#[derive(Debug)]
pub enum Refusal {
    /// The quota said no (or not in time).
    Rejected(Rejection),
    /// Redis is down and the config fails closed.
    Down(StoreError),
}

pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    admit: redis::Script,
    restamp: redis::Script,
    hold: redis::Script,
    reveal: redis::Script,
    reserve: redis::Script,
    settle: redis::Script,
    /// Shared running-time reservations of this replica's queries in flight.
    ledger: DashMap<u64, ledger::Shared>,
    /// Running-time keys (by stored name) whose waiters await a completion.
    settled: DashMap<String, Arc<tokio::sync::Notify>>,
    /// Whether this replica hears completions ([`RedisStore::listen`]).
    listening: AtomicBool,
    prefix: String,
    /// Keys name their policy ([`super::names`]), so replicas agree.
    names: Arc<PolicyNames>,
    guard_us: u64,
    on_outage: OnOutage,
    replicas: u32,
    up: AtomicBool,
    queues: KeyMap<Arc<queue::KeyQueue>>,
    /// Members of the sorted sets: this replica's nonce and a counter.
    nonce: u64,
    next: AtomicU64,
    url: String,
    metrics: StoreMetrics,
    clock: crate::quota::Clock,
    /// When Redis was last found down (clock reading).
    down_since: AtomicU64,
    /// The epoch of Redis's data this replica last saw (0: none yet).
    epoch: AtomicU64,
    /// The sequence number Redis last gave this replica (0: none yet); see
    /// [`RedisStore::lost_data`].
    seq: AtomicU64,
    /// A clock reading before this replica's last look at Redis that found
    /// nothing lost: what Redis admitted before it is known to be kept.
    looked: AtomicU64,
    /// How long a running-time charge counts (ns): the longest budget of
    /// any policy, for a charge added back alone ([`LedgerJournal`]).
    ///
    /// [`LedgerJournal`]: ledger::LedgerJournal
    charges_kept: AtomicU64,
    /// When an unreadable value was last logged (clock reading; 0: never).
    unreadable_logged: AtomicU64,
    /// The gateway is stopping: requests waiting here for Redis whose slot
    /// comes after the drain are turned away, as the limiters' are.
    drain: Drain,
}

impl RedisStore {
    pub fn new(
        config: &Config,
        url: &str,
        names: Arc<PolicyNames>,
        clock: crate::quota::Clock,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, StoreError> {
        let client = match &config.store.ca_pem {
            // A private CA (rediss:// with [store] ca_file) instead of the Web PKI roots.
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
            ),
            None => redis::Client::open(url),
        }
        .map_err(|e| StoreError::Redis(format!("{}: {e}", redact(url))))?;
        let replicas = config.store.replicas.get();
        let nonce = u64::try_from(super::sqlite::unix_now()).unwrap_or(0) ^ u64::from(std::process::id());
        Ok(RedisStore {
            client,
            conn: OnceCell::new(),
            admit: redis::Script::new(ADMIT),
            restamp: redis::Script::new(RESTAMP),
            hold: redis::Script::new(HOLD),
            reveal: redis::Script::new(REVEAL),
            reserve: redis::Script::new(ledger::RESERVE),
            settle: redis::Script::new(ledger::SETTLE),
            ledger: DashMap::new(),
            settled: DashMap::new(),
            listening: AtomicBool::new(false),
            prefix: config.store.key_prefix.clone(),
            names,
            guard_us: u64::try_from(config.guard.as_micros()).unwrap_or(u64::MAX),
            on_outage: config.store.on_outage,
            replicas,
            up: AtomicBool::new(true),
            queues: KeyMap::default(),
            nonce,
            next: AtomicU64::new(1),
            url: redact(url),
            metrics: metrics.store.clone(),
            clock,
            down_since: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            looked: AtomicU64::new(0),
            unreadable_logged: AtomicU64::new(0),
            charges_kept: AtomicU64::new(
                u64::try_from(config.hunting.retention.as_nanos()).unwrap_or(u64::MAX),
            ),
            drain: Drain::default(),
        })
    }

    /// The gateway is stopping: from now on a request waiting for a slot or
    /// for running time that comes later than `within` from now is turned
    /// away ([`Reason::Draining`](crate::admission::rejection::Reason)).
    ///
    /// Only Redis knows when a key's next slot is, so a queued request
    /// learns it is too late when the waiter ahead of it asks: once the
    /// next slot Redis names comes after the drain, every waiter of that key
    /// on this replica is turned away at once. Waiters behind one whose slot
    /// comes in time wait for it to go first.
    pub fn drain(&self, within: Duration) {
        self.drain.start(self.clock.now(), within);
    }

    /// Whether a slot `wait` from now comes after the drain ends.
    fn past_drain(&self, wait: Duration) -> bool {
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.drain.past(self.clock.now().saturating_add(wait))
    }

    async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let mut c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
                // The epoch of the data this replica is about to use, so a
                // loss of it is noticed from the first admission on.
                let before = self.clock.now();
                let (epoch, seq) = self.current_epoch(&mut c).await?;
                self.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
                self.seq.store(seq, std::sync::atomic::Ordering::SeqCst);
                self.looked.store(before, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, redis::RedisError>(c)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Run a script. A connection that dropped (Redis restarted, say) is
    /// given one more try on a fresh one before it counts as an outage:
    /// every script is idempotent for its members, so a repeat whose first
    /// run did happen changes nothing.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, redis::RedisError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.conn().await?;
            match tokio::time::timeout(TIMEOUT * 2, call.invoke_async(&mut conn)).await {
                Ok(Err(e)) if tries == 1 && (e.is_connection_dropped() || e.is_io_error()) => continue,
                Ok(result) => return result,
                Err(_) => return Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
            }
        }
    }

    fn key(&self, kind: &str, key: &QuotaKey) -> String {
        self.named(kind, &self.names.encode(key))
    }

    /// The Redis key of `kind` for a quota key already encoded as `name`
    /// (a request naming several kinds encodes its key once).
    fn named(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    /// Admit a call for `key` under `policy`, waiting at most `max_wait`:
    /// shared through Redis, or as configured while Redis is down.
    pub async fn acquire(
        self: &Arc<Self>,
        limiter: &Limiter,
        key: &QuotaKey,
        policy: &Policy,
        share: &Share,
        max_wait: Duration,
        depth: &IntGauge,
    ) -> Result<Admitted, Refusal> {
        let started = tokio::time::Instant::now();
        let mut broken = None;
        if self.is_up() {
            match self.shared(limiter, key, policy, share, max_wait, depth).await {
                Ok(result) => return result.map_err(Refusal::Rejected),
                Err(e) => {
                    self.failed(&e);
                    broken = outage::about_the_data(&e).then_some(e);
                }
            }
        }
        match self.on_outage {
            OnOutage::FailClosed => Err(Refusal::Down(match broken {
                Some(e) => StoreError::Unreadable(e.to_string()),
                None => StoreError::Redis(format!("{} is unreachable", self.url)),
            })),
            OnOutage::Local => {
                // This replica's share: every window's limit ÷ replicas, those
                // its waiters are ranked and capped by too.
                let mut local = policy.clone();
                for w in local.windows.iter_mut().chain(local.kept.iter_mut()) {
                    let share = (w.limit.get() / self.replicas).max(1);
                    w.limit = std::num::NonZeroU32::new(share).unwrap_or(std::num::NonZeroU32::MIN);
                }
                let left = max_wait.saturating_sub(started.elapsed());
                let admitted =
                    limiter.acquire_as(key, &local, share, left, depth).await.map_err(Refusal::Rejected)?;
                // Redis came back while this call waited, and the catch-up
                // may have passed it by: it goes to the shared log itself.
                if self.is_up() {
                    self.add_back(key, policy, admitted.at()).await;
                }
                Ok(admitted)
            }
        }
    }

    /// A call Redis admitted at `at_us` (its clock), with each window's use.
    fn admitted(
        &self,
        limiter: &Limiter,
        key: &QuotaKey,
        policy: &Policy,
        (at_us, ticket): (i64, u64),
        counts: Vec<u32>,
        started: tokio::time::Instant,
    ) -> Admitted {
        let usage = policy
            .windows
            .iter()
            .zip(counts)
            .map(|(w, used)| WindowUse { window: *w, used, reset: Duration::ZERO })
            .collect();
        let at = self.clock.from_unix(at_us.saturating_mul(1000));
        // This replica remembers its own admissions: it decides on them while
        // Redis is down, and adds them back when Redis returns (they may have
        // been lost with it).
        limiter.record(key, policy, at);
        Admitted::shared(at, self.clock.now(), ticket, started.elapsed(), usage)
    }

    /// Run the admission script for the calls numbered `numbers` (in the
    /// order they asked) on the key encoded as `name`.
    async fn ask_many(
        &self,
        name: &str,
        windows: &[Window],
        kept: Duration,
        numbers: &[u64],
    ) -> Result<Outcome, redis::RedisError> {
        let mut call = self.admit.key(self.named("log", name));
        call.key(self.named("hold", name)).key(self.named("revealed", name));
        let kept_us = u64::try_from(kept.as_micros()).unwrap_or(u64::MAX).saturating_add(self.guard_us);
        call.arg(self.guard_us).arg(windows.len()).arg(kept_us);
        for w in windows {
            call.arg(w.limit.get()).arg(u64::try_from(w.per.as_micros()).unwrap_or(u64::MAX));
        }
        for &number in numbers {
            call.arg(self.member(number));
        }
        let reply: Vec<i64> = self.invoke(&call).await?;
        let get = |i: usize| reply.get(i).copied().unwrap_or(0);
        Ok(Outcome {
            admitted: usize::try_from(get(0)).unwrap_or(0),
            now_us: get(1),
            free_us: get(2),
            binding: get(3),
            counts: (0..windows.len()).map(|i| u32::try_from(get(4 + i)).unwrap_or(0)).collect(),
        })
    }

    /// Ask Redis for one call numbered `number`.
    async fn ask(&self, key: &QuotaKey, policy: &Policy, number: u64) -> Result<Answer, redis::RedisError> {
        let outcome =
            self.ask_many(&self.names.encode(key), &policy.windows, policy.longest_kept(), &[number]).await?;
        Ok(outcome.answer(0, &policy.windows))
    }

    /// The member of this replica's admission `ticket`.
    fn member(&self, ticket: u64) -> String {
        format!("{:x}-{ticket}", self.nonce)
    }

    /// The call of a shared admission leaves late ([`Limiter::released`]):
    /// move its entry in Redis to now before it goes, so that every replica
    /// ages it from its departure. While Redis is down, or if the move
    /// fails (the store is then marked down), the call goes anyway: its
    /// admission stands, and only the guard covers the delay.
    pub async fn released(&self, key: &QuotaKey, policy: &Policy, admitted: &Admitted) {
        if admitted.ticket() == 0 {
            return;
        }
        // This replica's count of the client's calls, for its cap or reserve,
        // moves with the call too, to the departure `Limiter::released` stamped.
        if let Some(queue) = self.queues.get(key).map(|q| q.clone()) {
            queue.restamp(admitted.client(), admitted.at(), admitted.stamp());
        }
        if !self.is_up() {
            return;
        }
        let longest = policy.longest_kept() + Duration::from_micros(self.guard_us);
        let mut call = self.restamp.key(self.key("log", key));
        call.arg(self.member(admitted.ticket()))
            .arg(u64::try_from(longest.as_millis()).unwrap_or(u64::MAX).saturating_add(1));
        if let Err(e) = self.invoke::<i64>(&call).await {
            self.failed(&e);
        }
    }

    /// Take back a shared admission whose call never reached the upstream,
    /// from Redis and from its client's count here.
    pub fn refund(self: &Arc<Self>, key: &QuotaKey, admitted: &Admitted) {
        if admitted.ticket() == 0 {
            return;
        }
        if let Some(queue) = self.queues.get(key).map(|q| q.clone()) {
            queue.refund(admitted.client(), admitted.stamp());
        }
        self.take_back(self.key("log", key), vec![self.member(admitted.ticket())]);
    }

    /// Remove `members` from the call log `log`, in the background.
    fn take_back(self: &Arc<Self>, log: String, members: Vec<String>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(mut c) = this.conn().await {
                let _: Result<i64, _> = redis::cmd("ZREM").arg(log).arg(members).query_async(&mut c).await;
            }
        });
    }

    /// Drop the waiter records of keys nobody waits on.
    pub fn sweep(&self) {
        self.queues.retain(|_, q| Arc::strong_count(q) > 1 || !q.is_idle());
        self.settled.retain(|_, n| Arc::strong_count(n) > 1);
    }

    /// Hold `key` (its running time, when `runtime`) for every replica
    /// until clock reading `until`. Returns once Redis holds it (or failed),
    /// so no other replica sends a call after the throttle is answered.
    pub async fn hold_until(&self, key: &QuotaKey, until: u64, runtime: bool) {
        let wait = Duration::from_nanos(until.saturating_sub(self.clock.now()));
        if wait.is_zero() {
            return;
        }
        if runtime {
            self.hold_runtime(key, wait).await;
        } else {
            self.hold(key, wait).await;
        }
    }

    /// What this replica does while Redis is down.
    pub fn on_outage(&self) -> OnOutage {
        self.on_outage
    }

    /// How many replicas share the store (the local share's divisor).
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Lower `key`'s limit for every replica to what the upstream revealed,
    /// for [`super::REVEALED_FOR`] (or longer, for a longer window).
    pub async fn reveal(&self, key: &QuotaKey, policy: &Policy, window: crate::quota::Window) {
        if !self.is_up() {
            return;
        }
        let longest =
            [policy.longest_kept(), window.per, super::REVEALED_FOR].into_iter().max().unwrap_or_default();
        let ttl_ms = u64::try_from(longest.as_millis()).unwrap_or(u64::MAX) + self.guard_us / 1000 + 1;
        let mut call = self.reveal.key(self.key("revealed", key));
        call.arg(u64::try_from(window.per.as_micros()).unwrap_or(u64::MAX))
            .arg(window.limit.get())
            .arg(ttl_ms);
        if let Err(e) = self.invoke::<i64>(&call).await {
            self.failed(&e);
        }
    }

    /// Hold `key` for every replica for `wait` from now.
    pub async fn hold(&self, key: &QuotaKey, wait: Duration) {
        self.set_hold(self.key("hold", key), wait).await;
    }

    async fn set_hold(&self, hold: String, wait: Duration) {
        // While Redis is down the hold lives in this replica's limiters only.
        if !self.is_up() {
            return;
        }
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        let mut call = self.hold.key(hold);
        call.arg(micros);
        if let Err(e) = self.invoke::<i64>(&call).await {
            self.failed(&e);
        }
    }
}

enum Answer {
    Admitted { at_us: i64, counts: Vec<u32> },
    NotBefore { wait: Duration, window: Option<Window> },
}

/// One run of [`ADMIT`]: the first `admitted` of its members went at
/// `now_us`; the next could go at `free_us`, decided by window `binding`.
struct Outcome {
    admitted: usize,
    now_us: i64,
    free_us: i64,
    binding: i64,
    /// Each configured window's use with the admitted members.
    counts: Vec<u32>,
}

impl Outcome {
    /// The answer for the run's member `j` (0-based, in asking order).
    fn answer(&self, j: usize, windows: &[Window]) -> Answer {
        if j < self.admitted {
            // Member j saw its window hold the members before it, not those after.
            let after = u32::try_from(self.admitted - 1 - j).unwrap_or(u32::MAX);
            let counts = self.counts.iter().map(|c| c.saturating_sub(after)).collect();
            return Answer::Admitted { at_us: self.now_us, counts };
        }
        let wait = Duration::from_micros(u64::try_from(self.free_us - self.now_us).unwrap_or(0));
        let window = usize::try_from(self.binding)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| windows.get(i).copied());
        Answer::NotBefore { wait, window }
    }
}

/// A Redis URL with its password replaced, for logs and status.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("rediss://:s3cret@redis.example:6380/0"), "rediss://***@redis.example:6380/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
