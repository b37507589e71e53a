//! The hunting running-time ledger in Redis, shared by every replica.
//!
//! It is [`crate::quota::Ledger`] in two sorted sets per running-time key:
//! **charges** (score: the moment the cost was learnt, on Redis's clock;
//! the member names the cost) and **reservations** of queries in flight
//! (score: a deadline after which a reservation whose replica died, or
//! whose settle has not come, is charged its estimate as of that deadline;
//! the member names the estimate). The reservations' set outlives its
//! latest deadline by the longest budget, so a reservation past its
//! deadline is still charged by whichever replica reserves next, however
//! late, while its charge could count. A settle that comes after that
//! replaces the estimate's charge with the cost ([`SETTLE`]). [`RESERVE`] checks
//! every budget exactly as `Ledger::fit` does (charges still counted plus
//! every replica's reservations plus this estimate, within each budget) and
//! records the reservation in the same atomic step, or answers when the
//! budgets have room, or that only a completion can make room. The running-
//! time hold of the key is read in the same step, so an upstream
//! "processing resources" 429 on one replica holds the tenant for all.
//!
//! A replica reserves locally first (its queue, its estimate, its cap on
//! queries in flight), then in Redis; the settle, charge or release of its
//! [`Reservation`] replaces the shared reservation by the charge
//! ([`SETTLE`]), and publishes the key's name on the store's channel.
//!
//! Waiting: when the budgets free room at a known moment (charges ageing
//! out, a hold ending), the head waiter sleeps until then. When only a
//! completion can free room, which may happen on any replica, it waits for
//! the channel to name its key ([`RedisStore::listen`] subscribes every
//! replica), and asks again then. Should a message be lost (the subscription
//! reconnecting), it asks again after [`UNHEARD_RETRY`] all the same; while
//! no subscription is up, every [`UNKNOWN_RETRY`].

use std::sync::Arc;
use std::time::Duration;

use super::RedisStore;
use crate::admission::runtime::{ChargeJournal, Demand, Reservation, RuntimeRejection};
use crate::admission::Reason;
use crate::policy::Mode;
use crate::quota::ledger::longest;
use crate::quota::{Budget, QuotaKey};

/// How often a query waiting for a completion asks again while this replica
/// hears no completions (its subscription is down).
pub const UNKNOWN_RETRY: Duration = Duration::from_millis(250);
/// How long a query waiting for a completion waits for word of one before
/// it asks again anyway.
pub const UNHEARD_RETRY: Duration = Duration::from_secs(2);

/// KEYS: charges, reservations, hold. ARGV: guard µs, estimate µs,
/// reservation deadline µs, member, budget count, then limit and length µs
/// per budget, then the retention µs (charges are kept at least that long
/// past their end, for the policies sharing the key with longer windows).
/// Returns `{1, now}`, `{0, at, budget, now}` (1-based; -1 for
/// the hold) or `{2, 0, budget}` when only a completion can make room.
pub(super) const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local guard = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
local n = tonumber(ARGV[5])
-- A charge's member ends in `:cost` (one written by an earlier version may
-- have `#n` after it).
local function cost(m) return tonumber(string.match(m, ':(%d+)#?%d*$')) end
local hold = tonumber(redis.call('GET', KEYS[3]) or '0')
if hold > now then return {0, hold, -1, now} end
local longest = tonumber(ARGV[6 + 2 * n]) + guard
for i = 1, n do
  local per = tonumber(ARGV[5 + 2 * i])
  if per + guard > longest then longest = per + guard end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES')
for j = 1, #expired, 2 do
  redis.call('ZADD', KEYS[1], expired[j + 1], expired[j])
end
if #expired > 0 and redis.call('PTTL', KEYS[1]) < math.floor(longest / 1000) + 1 then
  redis.call('PEXPIRE', KEYS[1], math.floor(longest / 1000) + 1)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do reserved = reserved + cost(m) end
local at = now
local decided = 0
for i = 1, n do
  local limit = tonumber(ARGV[4 + 2 * i])
  local per = tonumber(ARGV[5 + 2 * i])
  local room = limit - reserved - est
  if room < 0 then return {2, 0, i} end
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now - per - guard), '+inf', 'WITHSCORES')
  local sum = 0
  for j = 1, #live, 2 do sum = sum + cost(live[j]) end
  local j = 1
  while sum > room and j <= #live do
    sum = sum - cost(live[j])
    local free = tonumber(live[j + 1]) + per + guard
    if free > at then at = free; decided = i end
    j = j + 2
  end
end
if at > now then return {0, at, decided, now} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - longest))
redis.call('PEXPIRE', KEYS[1], math.floor(longest / 1000) + 1)
local keep = math.floor((tonumber(ARGV[3]) + longest) / 1000) + 1
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
return {1, now}
";

/// KEYS: charges, reservations. ARGV: the reservation's member, the
/// charge's member (empty: no charge), the charges' TTL in ms, the channel
/// and the key's name to publish on it. A reservation already past its
/// deadline was moved into the charges, at its estimate, by [`RESERVE`]:
/// the charge replaces that one, so a late settle never charges twice.
pub(super) const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// A shared reservation, until its query ends.
pub(super) struct Shared {
    key: QuotaKey,
    member: String,
    /// The charges' TTL, ms.
    ttl_ms: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// Reserve `reservation`'s estimate for `key` in the shared ledger, as
    /// `demand` allows waiting; a reservation not settled within `deadline`
    /// is charged its estimate by the next replica that looks. `Err` only
    /// when Redis failed.
    pub async fn reserve_runtime(
        &self,
        key: &QuotaKey,
        reservation: &mut Reservation,
        demand: &Demand<'_>,
        deadline: Duration,
    ) -> Result<Result<(), RuntimeRejection>, redis::RedisError> {
        let started = tokio::time::Instant::now();
        let guard = self.guard_us;
        let estimate = micros(reservation.estimate());
        let longest = longest(demand.budgets).max(demand.retention);
        let ttl_ms = u64::try_from(longest.as_millis()).unwrap_or(u64::MAX) + guard / 1000 + 1;
        let name = self.names.encode(key);
        for attempt in 0.. {
            // Listen for completions before asking, so none is missed between.
            let settled = self.settled.entry(name.clone()).or_default().clone();
            let completion = settled.notified();
            tokio::pin!(completion);
            completion.as_mut().enable();
            let drain_started = self.drain.started();
            let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let member = format!("{:x}-R{id}:{estimate}", self.nonce);
            let mut call = self.reserve.key(self.named("rt-charges", &name));
            call.key(self.named("rt-reserved", &name)).key(self.named("rt-hold", &name));
            call.arg(guard).arg(estimate).arg(micros(deadline)).arg(&member).arg(demand.budgets.len());
            for b in demand.budgets {
                call.arg(micros(b.limit)).arg(micros(b.per));
            }
            call.arg(micros(demand.retention));
            let reply: Vec<i64> = self.invoke(&call).await?;
            let get = |i: usize| reply.get(i).copied().unwrap_or(0);
            let budget: Option<Budget> = usize::try_from(get(2))
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| demand.budgets.get(i).copied());
            let waited = started.elapsed();
            let left = demand.max_wait.saturating_sub(waited);
            let (wait, known) = match get(0) {
                1 => {
                    reservation.set_pending(id);
                    self.ledger.insert(id, Shared { key: key.clone(), member, ttl_ms });
                    return Ok(Ok(()));
                }
                0 => (Duration::from_micros(u64::try_from(get(1) - get(3)).unwrap_or(0)), true),
                _ if self.listening() => (UNHEARD_RETRY.min(left), false),
                _ => (UNKNOWN_RETRY.min(left), false),
            };
            // Draining, a query that cannot start by the drain's end (or
            // nobody knows when) is turned away, as the local ledger does.
            let reason = if demand.mode == Mode::Reject {
                Some(Reason::NoSlot)
            } else if self.drain.on() && (!known || self.past_drain(wait)) {
                Some(Reason::Draining)
            } else if left.is_zero() || (known && wait > left) {
                Some(if attempt == 0 { Reason::WaitTooLong } else { Reason::Expired })
            } else {
                None
            };
            if let Some(reason) = reason {
                let retry_after = if known { wait } else { demand.max_wait };
                return Ok(Err(RuntimeRejection { reason, retry_after, budget, held: get(2) == -1 }));
            }
            if known {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = drain_started => {}
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = completion => {}
                    _ = drain_started => {}
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Hold `key`'s running time for every replica for `wait` from now.
    pub async fn hold_runtime(&self, key: &QuotaKey, wait: Duration) {
        self.set_hold(self.key("rt-hold", key), wait).await;
    }

    fn settle(self: &Arc<Self>, id: u64, cost: Option<u64>) {
        let Some((_, shared)) = self.ledger.remove(&id) else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let charge = cost.map_or(String::new(), |c| format!("{:x}-C{id}:{c}", this.nonce));
            let mut call = this.settle.key(this.key("rt-charges", &shared.key));
            call.key(this.key("rt-reserved", &shared.key)).arg(&shared.member).arg(charge).arg(shared.ttl_ms);
            call.arg(this.channel()).arg(this.names.encode(&shared.key));
            if let Err(e) = this.invoke::<i64>(&call).await {
                // The reservation stays until its deadline, then is charged
                // its estimate: conservative.
                this.failed(&e);
            }
        });
    }
}

impl RedisStore {
    /// The channel completions are published on.
    fn channel(&self) -> String {
        format!("{}:rt-settled", self.prefix)
    }

    /// Whether this replica hears completions now.
    fn listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hear every replica's completions and wake this replica's waiters of
    /// each key named, until `stop`; resubscribe after a lost connection.
    pub async fn listen(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        use futures_util::StreamExt as _;
        use std::sync::atomic::Ordering;
        tokio::pin!(stop);
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                s = tokio::time::timeout(super::TIMEOUT * 2, subscribed) => s,
                _ = &mut stop => return,
            };
            if let Ok(Ok(pubsub)) = pubsub {
                self.listening.store(true, Ordering::SeqCst);
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        m = messages.next() => m,
                        _ = &mut stop => return,
                    };
                    let Some(message) = message else { break };
                    let Ok(name) = message.get_payload::<String>() else { continue };
                    if let Some(waiters) = self.settled.get(&name) {
                        waiters.notify_waiters();
                    }
                }
                self.listening.store(false, Ordering::SeqCst);
            }
            tokio::select! {
                _ = tokio::time::sleep(super::PROBE_EVERY) => {}
                _ = &mut stop => return,
            }
        }
    }
}

/// Ends shared reservations when their queries end.
pub struct LedgerJournal(pub Arc<RedisStore>);

impl ChargeJournal for LedgerJournal {
    fn charged(&self, key: &QuotaKey, pending: Option<u64>, end: u64, cost: u64) {
        match pending {
            Some(id) => self.0.settle(id, Some((cost / 1000).max(1))),
            // Reserved while Redis was down and settled since it came back:
            // the catch-up may have passed it by, so it goes itself.
            None if self.0.is_up() => self.0.add_back_charge(key.clone(), end, cost),
            // The catch-up adds it when Redis returns.
            None => {}
        }
    }

    fn released(&self, pending: u64) {
        self.0.settle(pending, None);
    }
}
