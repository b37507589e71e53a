//! The Redis store in-process, against a real `redis-server` of its own:
//! many requests of one key asking at once go to Redis in few script runs,
//! and still admit exactly what the quota allows; draining, a key's late
//! waiters are turned away in one ask; a hunting query settled after its
//! shared reservation's deadline is charged once.

mod support;

use std::sync::Arc;
use std::time::Duration;

use quotagate::admission::runtime::{Demand, Estimator, RuntimeLimiter};
use quotagate::admission::{Limiter, Share};
use quotagate::config::Config;
use quotagate::metrics::Metrics;
use quotagate::policy::Mode;
use quotagate::quota::{Budget, QuotaKey};
use quotagate::store::redis::Refusal;
use quotagate::store::{Store, StoreError};
use support::process::Redis;

/// A Redis store in-process, with one policy `incidents` (its `rules`), and
/// one key to ask for.
struct Fixture {
    store: Arc<Store>,
    limiter: Arc<Limiter>,
    policy: Arc<quotagate::policy::Policy>,
    key: QuotaKey,
    depth: prometheus::IntGauge,
    /// A connection of its own, to read Redis's statistics.
    stats: redis::Connection,
    /// The running-time limiter whose charges the store shares.
    runtime: RuntimeLimiter,
}

impl Fixture {
    fn open(redis: &Redis, guard: &str, rules: &str) -> Self {
        let text = format!(
            r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "{guard}"

[[upstream]]
name = "defender"
url = "http://127.0.0.1:9"
kind = "defender"
route_prefixes = ["/api/"]

[store]
backend = "redis"
url = "{}"

[[policy]]
name = "incidents"
paths = ["/api/incidents"]
{rules}
"#,
            redis.url()
        );
        let config = Config::from_toml(&text, "test").unwrap();
        let limiter = Arc::new(Limiter::new(config.guard));
        let runtime = RuntimeLimiter::new(config.guard, estimator());
        let metrics = Metrics::new(1);
        let store = Arc::new(Store::open(&config, &limiter, &runtime, &metrics).unwrap());
        let policy = Arc::new(config.policies.0.iter().find(|p| p.name == "incidents").unwrap().clone());
        Fixture {
            store,
            limiter,
            policy,
            key: QuotaKey { policy: None, tenant: "tenant-1".into(), app: Some("app-1".into()) },
            depth: prometheus::IntGauge::new("depth", "queued").unwrap(),
            stats: redis::Client::open(redis.url()).unwrap().get_connection().unwrap(),
            runtime,
        }
    }
}

/// Every running-time demand here estimates 1 s before any history.
fn estimator() -> Estimator {
    Estimator::by_key(Duration::from_secs(1), 95, 10)
}

/// A hunting query's demand on `budgets`, its queue holding 10.
fn demand<'a>(
    budgets: &'a [Budget],
    estimator: &'a Estimator,
    retention: Duration,
    mode: Mode,
    max_wait: Duration,
) -> Demand<'a> {
    Demand {
        budgets,
        retention,
        mode,
        max_wait,
        max_queue: 10,
        max_concurrent: None,
        estimate: estimator,
        query: None,
    }
}

fn evalsha_calls(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_key_is_admitted_exactly_in_few_script_runs() {
    const ASKS: usize = 300;
    let redis = Redis::start();
    let Fixture { store, limiter, policy, key, depth, mut stats, .. } = Fixture::open(
        &redis,
        "50ms",
        r#"mode = "reject"
windows = [{ limit = 60, per = "30s" }, { limit = 25, per = "10s" }]"#,
    );

    let started = tokio::time::Instant::now();
    let asks: Vec<_> = (0..ASKS)
        .map(|_| {
            let (store, limiter, policy, key, depth) =
                (store.clone(), limiter.clone(), policy.clone(), key.clone(), depth.clone());
            tokio::spawn(async move {
                store.acquire(&limiter, &key, &policy, &Share::default(), Duration::ZERO, &depth).await
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for ask in asks {
        match ask.await.unwrap() {
            Ok(a) => admitted.push(a),
            Err(Refusal::Rejected(r)) => refused.push(r),
            Err(Refusal::Down(e)) => panic!("redis counted as down: {e}"),
        }
    }
    let elapsed = started.elapsed();

    // Exactly the 10 s window's 25, whatever the batching.
    assert_eq!(admitted.len(), 25, "admitted");
    assert_eq!(refused.len(), ASKS - 25);
    // The rate-limit headers count each admission in its window: 1 to 25, once each.
    let mut used: Vec<u32> = admitted.iter().map(|a| a.usage[1].used).collect();
    used.sort_unstable();
    assert_eq!(used, (1..=25).collect::<Vec<u32>>());
    // Every refusal names the 10 s window and the time its first slot
    // frees: 10 s and the guard after the burst, less the time spent since.
    for r in &refused {
        assert_eq!(r.window.map(|w| w.per), Some(Duration::from_secs(10)), "{r:?}");
        assert!(r.retry_after <= Duration::from_millis(10_050), "{r:?}");
        assert!(r.retry_after + elapsed >= Duration::from_millis(10_050), "{r:?} after {elapsed:?}");
    }
    let log: u64 = redis::cmd("EVAL")
        .arg("local n = 0 for _, k in ipairs(redis.call('KEYS', 'quotagate:log:*')) do n = n + redis.call('ZCARD', k) end return n")
        .arg(0)
        .query(&mut stats)
        .unwrap();
    assert_eq!(log, 25, "the shared log holds the admissions");
    // Asks pending together share a script run.
    let runs = evalsha_calls(&mut stats);
    assert!(runs * 4 <= ASKS as u64, "{runs} script runs for {ASKS} asks");
}

/// Draining, the first waiter told its slot comes after the drain turns
/// away every waiter of the key at once: one ask of Redis, not one each,
/// and each refusal names the window that set the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_turns_away_a_keys_late_waiters_in_one_ask() {
    const WAITERS: usize = 20;
    let redis = Redis::start();
    let Fixture { store, limiter, policy, key, depth, mut stats, .. } = Fixture::open(
        &redis,
        "10ms",
        r#"windows = [{ limit = 1, per = "5s" }]
max_wait = "30s""#,
    );
    let max_wait = Duration::from_secs(30);

    // The window's one call; every later one waits about 5 s for the next slot.
    let first = store.acquire(&limiter, &key, &policy, &Share::default(), max_wait, &depth).await;
    assert!(first.is_ok(), "the first call is admitted");
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (store, limiter, policy, key, depth) =
                (store.clone(), limiter.clone(), policy.clone(), key.clone(), depth.clone());
            tokio::spawn(async move {
                let r = store.acquire(&limiter, &key, &policy, &Share::default(), max_wait, &depth).await;
                (r, tokio::time::Instant::now())
            })
        })
        .collect();
    let queued = tokio::time::Instant::now();
    while depth.get() < WAITERS as i64 {
        assert!(queued.elapsed() < Duration::from_secs(5), "only {} queued", depth.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the head's first ask settle: it sleeps until its slot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = evalsha_calls(&mut stats);

    let drained = tokio::time::Instant::now();
    store.drain(Duration::from_secs(1));
    for w in waiters {
        let (r, answered) = w.await.unwrap();
        match r {
            Err(Refusal::Rejected(r)) => {
                assert_eq!(r.reason, quotagate::admission::Reason::Draining, "{r:?}");
                assert_eq!(r.window.map(|w| w.per), Some(Duration::from_secs(5)), "{r:?}");
                assert!(r.retry_after > Duration::from_secs(1), "the slot comes after the drain: {r:?}");
            }
            other => panic!("a waiter past the drain must be turned away: {:?}", other.map(|_| ())),
        }
        assert!(
            answered - drained < Duration::from_millis(500),
            "answered {:?} after the drain",
            answered - drained
        );
    }
    let asks = evalsha_calls(&mut stats) - before;
    assert!(asks <= 2, "{asks} asks of Redis to turn away {WAITERS} waiters");
}

/// The running time the shared ledger charges, in µs: the sum over every
/// charge member (`…:<µs>`) of every key.
fn shared_charges(c: &mut redis::Connection) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*rt-charges*").query(c).unwrap();
    let mut total = 0;
    for k in keys {
        let members: Vec<String> = redis::cmd("ZRANGE").arg(&k).arg(0).arg(-1).query(c).unwrap();
        total += members.iter().map(|m| m.rsplit(':').next().unwrap().parse::<u64>().unwrap()).sum::<u64>();
    }
    total
}

/// The members and scores of the one sorted set named `*<what>*`.
fn scores(c: &mut redis::Connection, what: &str) -> Vec<(String, String)> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{what}*")).query(c).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    redis::cmd("ZRANGE").arg(&keys[0]).arg(0).arg(-1).arg("WITHSCORES").query(c).unwrap()
}

/// A hunting query settled after its shared reservation's deadline (its
/// call slot took long, say, or its replica died) is charged its estimate
/// as of that deadline by the next replica to reserve, however late; and
/// when its settle comes after all, the metered cost replaces the
/// estimate instead of adding to it. (The reservations' set used to expire
/// at the newest deadline, so an older reservation past it was never
/// charged; and a late settle charged twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_settled_past_its_shared_deadline_is_charged_once() {
    let redis = Redis::start();
    let f = Fixture::open(&redis, "5ms", r#"windows = [{ limit = 100, per = "1s" }]"#);
    let mut stats = f.stats;
    let budgets = [Budget { limit: Duration::from_secs(30), per: Duration::from_secs(60) }];
    let estimator = estimator();
    let demand = demand(&budgets, &estimator, Duration::from_secs(60), Mode::Queue, Duration::from_secs(1));
    let reserve = |deadline: Duration| {
        let (store, runtime, key, depth, demand) = (&f.store, &f.runtime, &f.key, &f.depth, &demand);
        async move {
            let mut r = runtime.reserve(key, demand, depth).await.unwrap();
            store.share_running_time(key, &mut r, demand, deadline).await.unwrap();
            r.sent();
            r
        }
    };

    let late = reserve(Duration::from_millis(50)).await;
    let deadline = scores(&mut stats, "rt-reserved");
    assert_eq!(deadline.len(), 1);
    // Wait well past the 50 ms deadline on Redis's clock (and past the
    // set's expiry, before it outlived its deadline).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next query to reserve moves the late one into the charges, at its
    // estimate, as of its deadline.
    let next = reserve(Duration::from_secs(60)).await;
    assert_eq!(shared_charges(&mut stats), 1_000_000, "the late reservation charged its estimate");
    assert_eq!(scores(&mut stats, "rt-charges"), deadline, "charged as of its deadline");

    late.settle(Duration::from_millis(300));
    next.release();
    // Both go to Redis in the background.
    let asked = tokio::time::Instant::now();
    while shared_charges(&mut stats) != 300_000 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the shared ledger charges {} µs, not the 300,000 metered",
            shared_charges(&mut stats)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two policies share a tenant's running-time ledger in Redis, one with a
/// window of 3 s, the other of 300 ms. A query of the second, reserved
/// after its own window has passed, must not trim the charge the first
/// still counts, nor shorten its expiry. (Redis trimmed by the reserving
/// policy's longest window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_with_shorter_windows_keeps_the_shared_charges_a_sharing_policy_counts() {
    let redis = Redis::start();
    let f = Fixture::open(&redis, "5ms", r#"windows = [{ limit = 100, per = "1s" }]"#);
    let mut stats = f.stats;
    let long = [Budget { limit: Duration::from_secs(1), per: Duration::from_secs(3) }];
    let short = [Budget { limit: Duration::from_secs(5), per: Duration::from_millis(300) }];
    let estimator = estimator();
    let demand = |budgets| demand(budgets, &estimator, Duration::from_secs(3), Mode::Reject, Duration::ZERO);
    let (long, short) = (demand(&long), demand(&short));
    let reserve = |demand| {
        let (store, runtime, key, depth) = (&f.store, &f.runtime, &f.key, &f.depth);
        async move {
            let mut r = runtime.reserve(key, demand, depth).await.unwrap();
            store.share_running_time(key, &mut r, demand, Duration::from_secs(10)).await.unwrap();
            r.sent();
            r
        }
    };
    let until_charged = |stats: &mut redis::Connection, micros: u64| {
        let asked = std::time::Instant::now();
        while shared_charges(stats) != micros {
            assert!(asked.elapsed() < Duration::from_secs(5), "{} µs charged", shared_charges(stats));
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    reserve(&long).await.settle(Duration::from_millis(900));
    until_charged(&mut stats, 900_000);
    // Past the short window: a query of the short policy reserves (and trims).
    tokio::time::sleep(Duration::from_millis(400)).await;
    reserve(&short).await.release();
    assert_eq!(shared_charges(&mut stats), 900_000, "the 3 s window still counts the charge");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*rt-charges*").query(&mut stats).unwrap();
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut stats).unwrap();
    assert!(ttl > 2_000, "the charges expire in {ttl} ms, before the 3 s window is done with them");
}

/// Charges added back after an outage share a member name when they ended
/// at one moment with one cost, and the second gets a number: the shared
/// ledger must still read its cost and count it. (The number used to end
/// the member, after the cost, and every reservation of the key then
/// failed as if Redis were down.) Members written that older way count too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_charges_count_their_cost() {
    let redis = Redis::start();
    let f = Fixture::open(&redis, "5ms", r#"windows = [{ limit = 100, per = "1s" }]"#);
    let mut stats = f.stats;
    let budgets = [Budget { limit: Duration::from_secs(3), per: Duration::from_secs(60) }];
    let estimator = estimator();
    let demand = demand(&budgets, &estimator, Duration::from_secs(60), Mode::Reject, Duration::ZERO);
    let reserve = || {
        let (store, runtime, key, depth, demand) = (&f.store, &f.runtime, &f.key, &f.depth, &demand);
        async move {
            let mut r = runtime.reserve(key, demand, depth).await.unwrap();
            store.share_running_time(key, &mut r, demand, Duration::from_secs(10)).await.map(|()| r)
        }
    };
    // One charge of its own makes the key's set: 300 ms.
    let first = reserve().await.unwrap_or_else(|_| panic!("the first query fits"));
    first.settle(Duration::from_millis(300));
    let asked = std::time::Instant::now();
    while shared_charges(&mut stats) != 300_000 {
        assert!(asked.elapsed() < Duration::from_secs(5), "{} µs charged", shared_charges(&mut stats));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("*rt-charges*").query(&mut stats).unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut stats).unwrap();
    let now = secs * 1_000_000 + micros;
    let add = |stats: &mut redis::Connection, member: &str| {
        let _: i64 = redis::cmd("ZADD").arg(&keys[0]).arg(now).arg(member).query(stats).unwrap();
    };
    // As a catch-up names two charges of one moment and cost now, and as it
    // named the second before.
    add(&mut stats, "a-L5:600000");
    add(&mut stats, "a-L5#2:600000");
    // 1.5 s charged: a query fits the 3 s budget (its estimate is at most
    // the 1 s default).
    let fits = reserve().await.unwrap_or_else(|_| panic!("1.5 s charged and at most 1 s estimated fit 3 s"));
    fits.release();
    add(&mut stats, "a-L6:1500000#2");
    // 3 s charged: it no longer fits, and says so as a budget, not an outage.
    match reserve().await {
        Err(quotagate::store::RuntimeRefusal::Rejected(_)) => {}
        Err(quotagate::store::RuntimeRefusal::Down(e)) => panic!("refused as an outage: {e}"),
        Ok(_) => panic!("admitted over the budget"),
    }
}

/// A value of another form under one key's name (another program's, under
/// the key prefix) fails that key's script: that call is refused as in an
/// outage (failing closed), but the store stays up for every other key.
/// (It was marked down for all, and every tenant got 503s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_value_under_one_key_leaves_the_others_shared() {
    let redis = Redis::start();
    let Fixture { store, limiter, policy, key, depth, mut stats, .. } =
        Fixture::open(&redis, "5ms", "mode = \"reject\"\nwindows = [{ limit = 10, per = \"10s\" }]");
    let ask = |key: QuotaKey| {
        let (store, limiter, policy, depth) = (store.clone(), limiter.clone(), policy.clone(), depth.clone());
        async move { store.acquire(&limiter, &key, &policy, &Share::default(), Duration::ZERO, &depth).await }
    };
    assert!(ask(key.clone()).await.is_ok());
    let logs: Vec<String> = redis::cmd("KEYS").arg("quotagate:log:*").query(&mut stats).unwrap();
    assert_eq!(logs.len(), 1);
    let hold = logs[0].replacen(":log:", ":hold:", 1);
    let _: () = redis::cmd("SET").arg(&hold).arg("not a time").query(&mut stats).unwrap();

    match ask(key.clone()).await {
        Err(Refusal::Down(e)) => assert!(matches!(e, StoreError::Unreadable(_)), "{e}"),
        other => {
            panic!("the broken key's call was not refused as in an outage: {:?}", other.map(|a| a.usage))
        }
    }
    let other = QuotaKey { policy: None, tenant: "tenant-2".into(), app: Some("app-1".into()) };
    for _ in 0..3 {
        match ask(other.clone()).await {
            Ok(_) => {}
            Err(Refusal::Down(e)) => panic!("another tenant refused as in an outage: {e}"),
            Err(Refusal::Rejected(r)) => panic!("another tenant rejected: {r:?}"),
        }
    }
    assert_eq!(store.status()["reachable"], true);
}
