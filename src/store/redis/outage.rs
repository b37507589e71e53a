//! The Redis store's health: noticing that Redis is down, saying so (log,
//! metrics, `/readyz`), and switching back by itself once Redis answers,
//! after adding back the admissions and running-time charges it may have
//! lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{RedisStore, PROBE_EVERY, TIMEOUT};
use crate::admission::runtime::RuntimeLimiter;
use crate::admission::Limiter;
use crate::policy::Policy;
use crate::quota::QuotaKey;
use crate::store::OnOutage;

impl RedisStore {
    fn set_up(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::SeqCst) == up {
            return;
        }
        if !up {
            self.down_since.store(self.clock.now(), Ordering::SeqCst);
        }
        self.metrics.up.set(i64::from(up));
        let local = !up && self.on_outage == OnOutage::Local;
        self.metrics.local.set(i64::from(local));
        if up {
            tracing::warn!(url = %self.url, "the redis quota store is reachable again; shared limits apply");
        } else if local {
            tracing::error!(url = %self.url, error = why, replicas = self.replicas,
                "the redis quota store is unreachable: deciding locally on limit ÷ replicas until it returns");
        } else {
            tracing::error!(url = %self.url, error = why,
                "the redis quota store is unreachable: failing closed (503) until it returns");
        }
    }

    /// A command failed. The call that ran it is decided as during an
    /// outage either way. An error Redis answered about one key's data (a
    /// value of the wrong type or form, say another program's, under the
    /// key prefix) leaves the store up for every other key: only a Redis
    /// that does not answer, or answers nothing sensible for any key, is
    /// down.
    pub(crate) fn failed(&self, e: &redis::RedisError) {
        self.metrics.errors.inc();
        if about_the_data(e) {
            // Every call of the key meets it: say so once a minute at most.
            let now = self.clock.now();
            let last = self.unreadable_logged.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= 60_000_000_000 {
                self.unreadable_logged.store(now, Ordering::Relaxed);
                tracing::error!(error = %e, "redis holds a value a quota script cannot read; \
                    the calls of its key are decided as in an outage, other keys stay shared");
            }
            return;
        }
        self.set_up(false, &e.to_string());
    }

    /// The store error a call refused over `e` (failing closed) gets.
    pub(crate) fn refusal(e: &redis::RedisError) -> crate::store::StoreError {
        if about_the_data(e) {
            crate::store::StoreError::Unreadable(e.to_string())
        } else {
            crate::store::StoreError::Redis(e.to_string())
        }
    }

    /// Whether Redis answers now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Follow the budgets of a reloaded config.
    pub(crate) fn set_charges_kept(&self, longest: std::time::Duration) {
        self.charges_kept.store(u64::try_from(longest.as_nanos()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Add the open windows' admissions (from `since`) and running-time
    /// charges of `snapshot` to Redis; false when Redis failed.
    async fn catch_up(
        &self,
        Snapshot { admissions, charges }: Snapshot,
        since: u64,
        policy_of: &impl Fn(u16) -> Option<Policy>,
    ) -> bool {
        for (key, key_id, times) in admissions {
            // The policy the key runs under now (a reload may have moved it).
            let Some(policy) = policy_of(key_id) else { continue };
            let times: Vec<u64> = times.into_iter().filter(|&t| t >= since).collect();
            if times.is_empty() {
                continue;
            }
            if let Err(e) = self.push_back(&key, &policy, &times).await {
                self.metrics.errors.inc();
                // One key's unreadable value must not keep every key local.
                if about_the_data(&e) {
                    tracing::warn!(error = %e, "could not add one key's local admissions to redis; skipped");
                    continue;
                }
                tracing::warn!(error = %e, "could not add local admissions to redis; will retry");
                return false;
            }
        }
        for (key, longest, charges) in charges {
            let charges: Vec<(u64, u64)> = charges.into_iter().filter(|&(end, _)| end >= since).collect();
            if charges.is_empty() {
                continue;
            }
            if let Err(e) = self.push_back_charges(&key, longest, &charges).await {
                self.metrics.errors.inc();
                if about_the_data(&e) {
                    tracing::warn!(error = %e, "could not add one key's local running-time charges to redis; skipped");
                    continue;
                }
                tracing::warn!(error = %e, "could not add local running-time charges to redis; will retry");
                return false;
            }
        }
        true
    }

    /// A call admitted alone (Redis was down when it asked) at clock reading
    /// `at`, now that Redis is back: add it to the shared log under the name
    /// a catch-up gives it, so either adds it once. Should Redis fail, the
    /// next catch-up starts no later than `at`.
    pub(super) async fn add_back(&self, key: &QuotaKey, policy: &Policy, at: u64) {
        if let Err(e) = self.push_back(key, policy, &[at]).await {
            self.looked.fetch_min(at, Ordering::SeqCst);
            self.failed(&e);
        }
    }

    /// The same for a running-time charge of `cost` ns ending at `end`.
    pub(super) fn add_back_charge(self: &Arc<Self>, key: QuotaKey, end: u64, cost: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            let kept = std::time::Duration::from_nanos(this.charges_kept.load(Ordering::SeqCst));
            if let Err(e) = this.push_back_charges(&key, kept, &[(end, cost)]).await {
                this.looked.fetch_min(end, Ordering::SeqCst);
                this.failed(&e);
            }
        });
    }

    /// Ready unless Redis is down and the store fails closed.
    pub fn ready(&self) -> bool {
        self.is_up() || self.on_outage == OnOutage::Local
    }

    pub fn status(&self) -> serde_json::Value {
        let up = self.is_up();
        let mode = match (up, self.on_outage) {
            (true, _) => "shared",
            (false, OnOutage::Local) => "local",
            (false, OnOutage::FailClosed) => "fail-closed",
        };
        serde_json::json!({
            "kind": "redis",
            "url": self.url,
            "reachable": up,
            "mode": mode,
            "replicas": self.replicas,
            "on_outage": match self.on_outage { OnOutage::Local => "local", OnOutage::FailClosed => "fail-closed" },
        })
    }

    /// Ping Redis while it is down, and switch back when it answers, until
    /// `stop`; `policy_of` finds a policy of the running config by key id.
    /// Before switching back, every call this replica admitted and every
    /// running time it charged in the open windows (alone, or through a
    /// Redis that may have lost it) is added to the shared logs and ledgers.
    pub async fn watch(
        self: Arc<Self>,
        limiter: &Limiter,
        runtime: &RuntimeLimiter,
        policy_of: impl Fn(u16) -> Option<Policy>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        // Redis was found to have lost its data while up, and the open
        // windows have not been given back yet.
        let mut lost_while_up = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = &mut stop => return,
            }
            // Also connect once at start, so /readyz tells the truth early.
            if self.is_up() && self.conn.initialized() {
                // A Redis that restarted empty between two calls answers the
                // next as if nothing happened (the connection is remade):
                // only its epoch tells. Until the windows are given back,
                // the store is down.
                match tokio::time::timeout(TIMEOUT * 2, self.lost_data()).await {
                    Ok(Ok(false)) => continue,
                    Ok(Ok(true)) => {
                        tracing::warn!("redis lost its data; adding back this replica's open windows");
                        lost_while_up = true;
                        self.set_up(false, "redis lost its data");
                    }
                    Ok(Err(e)) => {
                        self.set_up(false, &e.to_string());
                        continue;
                    }
                    Err(_) => {
                        self.set_up(false, "timed out");
                        continue;
                    }
                }
            }
            let ping = async {
                let mut c = self.conn().await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            };
            match tokio::time::timeout(TIMEOUT * 2, ping).await {
                Ok(Ok(_)) => {
                    // A Redis that lost its data (restarted without
                    // persistence) gets every admission of the open windows
                    // back; one that kept it, those made alone since the
                    // outage began.
                    // Redis may have lost what it admitted after the last
                    // look that found nothing lost (a snapshot taken then).
                    let looked = self.looked.load(Ordering::SeqCst);
                    let lost = match self.lost_data().await {
                        Ok(lost) => lost || lost_while_up,
                        Err(e) => {
                            self.set_up(false, &e.to_string());
                            continue;
                        }
                    };
                    // Until the windows are back, a failed pass must not
                    // forget that Redis lost them.
                    lost_while_up = lost;
                    let since = if lost { 0 } else { self.down_since.load(Ordering::SeqCst).min(looked) };
                    let pass = self.clock.now();
                    if self.catch_up(Snapshot::take(limiter, runtime), since, &policy_of).await {
                        lost_while_up = false;
                        // Calls admitted and queries settled alone since the
                        // snapshot (their waits and queries ran across it):
                        // taken with no await after switching back, so none
                        // slips between; later ones add themselves back.
                        self.set_up(true, "");
                        let late = Snapshot::take(limiter, runtime);
                        if !self.catch_up(late, pass, &policy_of).await {
                            self.looked.fetch_min(pass, Ordering::SeqCst);
                            self.set_up(
                                false,
                                "could not add back what was admitted alone during the catch-up",
                            );
                        }
                    }
                }
                Ok(Err(e)) => self.set_up(false, &e.to_string()),
                Err(_) => self.set_up(false, "timed out"),
            }
        }
    }

    /// Whether Redis lost its data since this replica last looked. Redis
    /// holds an epoch, made by the first replica to find it missing: a
    /// replica that finds another epoch than the one it saw last knows the
    /// data it saw went with the old one (Redis restarted empty, or another
    /// server took its place). Redis also holds a sequence number that every
    /// look increments: a Redis that came back from an older snapshot (or a
    /// replica of it that lagged) keeps its epoch, but answers a number no
    /// greater than one this replica was given before. Both are first read
    /// when the connection is made ([`RedisStore::conn`]).
    async fn lost_data(&self) -> Result<bool, redis::RedisError> {
        let mut c = self.conn().await?;
        let before = self.clock.now();
        let (current, seq) = self.current_epoch(&mut c).await?;
        let seen = self.epoch.swap(current, Ordering::SeqCst);
        let seen_seq = self.seq.swap(seq, Ordering::SeqCst);
        let lost = (seen != 0 && seen != current) || (seen_seq != 0 && seq <= seen_seq);
        // While down, a catch-up still has to start where a failed add-back
        // left it.
        if !lost && self.is_up() {
            self.looked.store(before, Ordering::SeqCst);
        }
        Ok(lost)
    }

    /// Redis's epoch, made now if it has none, and the next sequence
    /// number. The connection reads them first when it is made, before any
    /// admission goes through it.
    pub(super) async fn current_epoch(
        &self,
        c: &mut redis::aio::ConnectionManager,
    ) -> Result<(u64, u64), redis::RedisError> {
        let key = format!("{}:epoch", self.prefix);
        let candidate = self.nonce ^ u64::try_from(crate::store::sqlite::unix_now()).unwrap_or(0);
        let (current, seq): (u64, u64) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(candidate)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&key)
            .cmd("INCR")
            .arg(format!("{}:seq", self.prefix))
            .query_async(c)
            .await?;
        Ok((current, seq))
    }

    /// Add this replica's admissions (clock readings) to the shared log,
    /// each under the member named by its time, so those Redis still holds
    /// are left as they are.
    async fn push_back(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        times: &[u64],
    ) -> Result<(), redis::RedisError> {
        let longest = policy.longest_kept();
        let entries = times.iter().map(|&at| {
            let us = self.clock.to_unix(at) / 1000;
            (us, format!("{:x}-L{us}", self.nonce), String::new())
        });
        self.add_missing(self.key("log", key), distinct(entries), longest).await
    }

    /// Add this replica's running-time charges (`(end, cost)`: clock
    /// readings and nanoseconds) to the key's shared ledger, each under the
    /// member named by its time and cost, so a second catch-up adds nothing.
    /// A charge whose query also holds a reservation in Redis (its settle
    /// failed in the outage) counts twice until that reservation's deadline:
    /// the error is on the safe side.
    async fn push_back_charges(
        &self,
        key: &QuotaKey,
        longest: std::time::Duration,
        charges: &[(u64, u64)],
    ) -> Result<(), redis::RedisError> {
        let entries = charges.iter().map(|&(end, cost)| {
            let us = self.clock.to_unix(end) / 1000;
            (us, format!("{:x}-L{us}", self.nonce), format!(":{}", (cost / 1000).max(1)))
        });
        self.add_missing(self.key("rt-charges", key), distinct(entries), longest).await
    }

    /// Add `(score, member)` entries the sorted set `set` lacks, and keep it
    /// for `longest` plus the guard.
    async fn add_missing(
        &self,
        set: String,
        entries: impl Iterator<Item = (i64, String)>,
        longest: std::time::Duration,
    ) -> Result<(), redis::RedisError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        let zadd = pipe.cmd("ZADD").arg(&set).arg("NX");
        for (score, member) in entries {
            zadd.arg(score).arg(member);
        }
        let ttl = u64::try_from(longest.as_millis()).unwrap_or(u64::MAX) + self.guard_us / 1000 + 1;
        // Only ever lengthen: the scripts keep a log longer for a revealed
        // window, which `longest` does not know.
        pipe.cmd("EVAL").arg(EXTEND_TTL).arg(1).arg(&set).arg(ttl).ignore();
        let _: (i64,) = tokio::time::timeout(TIMEOUT * 2, pipe.query_async(&mut conn))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))??;
        Ok(())
    }
}

/// KEYS: a key. ARGV: a time to live, ms. Set it unless the key lives
/// longer already.
const EXTEND_TTL: &str = "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then \
    redis.call('PEXPIRE', KEYS[1], ARGV[1]) end return 1";

/// What this replica holds of the open windows: every key's admissions
/// (clock readings) and running-time charges.
struct Snapshot {
    admissions: Vec<(QuotaKey, u16, Vec<u64>)>,
    charges: Vec<crate::admission::runtime::KeyCharges>,
}

impl Snapshot {
    fn take(limiter: &Limiter, runtime: &RuntimeLimiter) -> Self {
        Snapshot { admissions: limiter.all_admissions(), charges: runtime.all_charges() }
    }
}

/// Whether Redis answered `e` about the data a command met (a script's
/// runtime error, WRONGTYPE, a reply of an unexpected form), rather than
/// being unreachable, timing out, loading, read-only or refusing us.
pub(super) fn about_the_data(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        // A script's runtime error (`ERR user_script:…`), not, say, `ERR
        // max number of clients reached`.
        ErrorKind::Server(ServerErrorKind::ResponseError) => e.detail().is_some_and(|d| d.contains("script")),
        ErrorKind::UnexpectedReturnType => true,
        // A code the client does not name.
        ErrorKind::Extension => e.code() == Some("WRONGTYPE"),
        _ => false,
    }
}

/// Members named by time (and cost) alone collide for the calls one script
/// run admitted together (they share its `now`): the second and later of a
/// name become `name#2`, `name#3`…, the same at every catch-up of the same
/// admissions, so a repeat still adds nothing. Each entry is `(score, name,
/// tail)`; the number goes between the name and its tail (a charge's
/// `:cost`), so the cost still ends the member, where the scripts read it.
fn distinct(entries: impl Iterator<Item = (i64, String, String)>) -> impl Iterator<Item = (i64, String)> {
    let mut seen: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    entries.map(move |(score, name, tail)| {
        let whole = format!("{name}{tail}");
        let n = seen.entry(whole.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            (score, whole)
        } else {
            (score, format!("{name}#{n}{tail}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::distinct;

    #[test]
    fn admissions_of_one_moment_keep_a_member_each() {
        let names = |times: &[i64]| -> Vec<String> {
            distinct(times.iter().map(|&t| (t, format!("n-L{t}"), String::new()))).map(|(_, m)| m).collect()
        };
        let once = names(&[5, 5, 5, 7]);
        assert_eq!(once, ["n-L5", "n-L5#2", "n-L5#3", "n-L7"]);
        assert_eq!(names(&[5, 5, 5, 7]), once, "a second catch-up names them the same");
    }

    /// Two charges of one moment and one cost: the second's number must not
    /// end the member, or `RESERVE` and `SETTLE` read no cost from it.
    #[test]
    fn charges_of_one_moment_and_cost_still_end_in_their_cost() {
        let charges = [(5, 40), (5, 40), (5, 41)];
        let names: Vec<String> =
            distinct(charges.iter().map(|&(t, c)| (t, format!("n-L{t}"), format!(":{c}"))))
                .map(|(_, m)| m)
                .collect();
        assert_eq!(names, ["n-L5:40", "n-L5#2:40", "n-L5:41"]);
    }
}
