//! Fair sharing of a key between clients, under tokio's paused clock: who
//! gets each slot, and exactly when.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::tests::{gauge, key, policy};
use super::*;
use crate::policy::Mode;

const SEC: Duration = Duration::from_secs(1);

/// Admissions as (client name, milliseconds since the start), in order.
type Log = Arc<Mutex<Vec<(&'static str, u128)>>>;

struct Run {
    limiter: Arc<Limiter>,
    policy: Arc<Policy>,
    t0: Instant,
    log: Log,
}

impl Run {
    fn new(limit: u32) -> Run {
        Run {
            limiter: Arc::new(Limiter::new(Duration::ZERO)),
            policy: policy(Mode::Queue, limit, SEC, 100, Duration::from_secs(30)),
            t0: Instant::now(),
            log: Arc::default(),
        }
    }

    /// Queue one request of `name` with `share`; it records its admission.
    async fn send(&self, name: &'static str, share: Share) -> JoinHandle<()> {
        let (limiter, p, log, t0) = (self.limiter.clone(), self.policy.clone(), self.log.clone(), self.t0);
        let task = tokio::spawn(async move {
            limiter.acquire_as(&key("t"), &p, &share, p.max_wait, &gauge()).await.unwrap();
            log.lock().unwrap().push((name, t0.elapsed().as_millis()));
        });
        tokio::task::yield_now().await;
        task
    }

    async fn send_n(&self, n: usize, name: &'static str, share: Share) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for _ in 0..n {
            tasks.push(self.send(name, share).await);
        }
        tasks
    }

    fn admitted(&self) -> Vec<(&'static str, u128)> {
        self.log.lock().unwrap().clone()
    }
}

fn share(client: u16) -> Share {
    Share { client, ..Share::default() }
}

async fn all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_light_client_takes_the_next_slot_past_a_heavy_backlog() {
    let run = Run::new(2);
    let heavy = run.send_n(10, "heavy", share(0)).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let light = run.send(LIGHT, share(1)).await;
    light.await.unwrap();
    all(heavy).await;
    let log = run.admitted();
    assert_eq!(log.iter().position(|(n, _)| *n == LIGHT), Some(2), "{log:?}");
    assert_eq!(log[2].1, 1000, "the light client went at the first slot after the burst");
}

const LIGHT: &str = "light";

#[tokio::test(start_paused = true)]
async fn weights_three_to_one_get_three_to_one_of_a_saturated_key() {
    let run = Run::new(4);
    let fill = run.send_n(4, "fill", share(2)).await;
    let a = run.send_n(30, "a", Share { weight: 3, ..share(0) }).await;
    let b = run.send_n(30, "b", Share { weight: 1, ..share(1) }).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let log = run.admitted();
    let count = |name| log.iter().filter(|(n, _)| *n == name).count();
    assert_eq!((count("fill"), count("a"), count("b")), (4, 12, 4), "{log:?}");
    for t in fill.into_iter().chain(a).chain(b) {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_capped_client_keeps_to_its_cap_and_leaves_the_rest_to_others() {
    let run = Run::new(4);
    let capped = run.send_n(6, "capped", Share { cap_percent: Some(50), ..share(0) }).await;
    tokio::time::advance(Duration::from_millis(500)).await;
    let other = run.send_n(2, "other", share(1)).await;
    all(other).await;
    all(capped).await;
    let log = run.admitted();
    let times = |name| log.iter().filter(|(n, _)| *n == name).map(|(_, t)| *t).collect::<Vec<_>>();
    assert_eq!(times("capped"), vec![0, 0, 1000, 1000, 2000, 2000], "{log:?}");
    assert_eq!(times("other"), vec![500, 500], "the other client did not wait behind the capped one");
}

#[tokio::test(start_paused = true)]
async fn a_reserved_minimum_goes_before_a_heavier_client() {
    let run = Run::new(4);
    let hog = run.send_n(16, "hog", Share { weight: 10, ..share(0) }).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let reserved = run.send_n(2, "reserved", Share { reserved_percent: 50, ..share(1) }).await;
    all(reserved).await;
    let log = run.admitted();
    let times: Vec<_> = log.iter().filter(|(n, _)| *n == "reserved").map(|(_, t)| *t).collect();
    assert_eq!(times, vec![1000, 1000], "{log:?}");
    assert_eq!(log.iter().position(|(n, _)| *n == "reserved"), Some(4), "{log:?}");
    for t in hog {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn an_interactive_request_overtakes_queued_batch_ones() {
    let run = Run::new(1);
    let batch = run.send_n(4, "batch", Share { class: Class::Batch, ..share(0) }).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let urgent = run.send("interactive", Share { class: Class::Interactive, ..share(1) }).await;
    urgent.await.unwrap();
    all(batch).await;
    let names: Vec<_> = run.admitted().iter().map(|(n, t)| (*n, *t)).collect();
    assert_eq!(
        names,
        vec![("batch", 0), ("interactive", 1000), ("batch", 2000), ("batch", 3000), ("batch", 4000)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_capped_client_is_told_when_its_cap_frees() {
    let limiter = Limiter::new(Duration::ZERO);
    let p = policy(Mode::Reject, 4, SEC, 0, Duration::ZERO);
    let capped = Share { cap_percent: Some(25), ..share(0) };
    limiter.acquire_as(&key("t"), &p, &capped, Duration::ZERO, &gauge()).await.unwrap();
    tokio::time::advance(Duration::from_millis(300)).await;
    let r = limiter.acquire_as(&key("t"), &p, &capped, Duration::ZERO, &gauge()).await.unwrap_err();
    assert_eq!((r.reason, r.retry_after), (Reason::NoSlot, Duration::from_millis(700)));
    assert!(r.capped, "the wait is the cap's, not the key's");
    assert_eq!(r.window.map(|w| (w.limit.get(), w.per)), Some((1, SEC)), "25% of 4 per second");
    assert!(limiter.acquire_as(&key("t"), &p, &share(1), Duration::ZERO, &gauge()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_capped_backlog_does_not_push_others_past_their_wait() {
    // Regression: an interactive client capped at 1 per second queues ten
    // calls, ranked before any normal one. A normal call that gets a slot
    // at 1 s was projected behind all nine waiting (3 s away) and turned
    // away for a 1.5 s wait.
    let run = Run::new(4);
    let capped = Share { cap_percent: Some(25), class: Class::Interactive, ..share(0) };
    let backlog = run.send_n(10, "capped", capped).await;
    all(run.send_n(3, "fill", share(2)).await).await;
    let p = policy(Mode::Queue, 4, SEC, 100, Duration::from_millis(1500));
    let waited = run.limiter.acquire_as(&key("t"), &p, &share(1), p.max_wait, &gauge()).await.unwrap().waited;
    assert_eq!(waited, SEC, "it took a slot that freed at 1 s");
    for t in backlog {
        t.abort();
    }
}

mod property {
    //! The fair queue driven by a plain event loop (no runtime): whatever
    //! the clients and their arrivals, the key's windows and every cap hold,
    //! and every request is admitted.

    use std::num::NonZeroU32;

    use proptest::prelude::*;

    use super::super::fair::{Lanes, Ticket};
    use super::super::{Class, Share};
    use crate::quota::{AdmissionLog, Retention, Window};

    const MS: u64 = 1_000_000;

    /// How many of `times` fall in the busiest half-open interval of `per` nanoseconds.
    fn busiest(times: &[u64], per: u64) -> usize {
        (0..times.len())
            .map(|i| times[i..].iter().take_while(|&&t| t < times[i] + per).count())
            .max()
            .unwrap_or(0)
    }

    proptest! {
        #[test]
        fn windows_and_caps_hold_and_everyone_is_served(
            clients in prop::collection::vec((1u32..5, 0usize..3, prop::option::of(10u8..=100), 0u8..=30), 1..4),
            arrivals in prop::collection::vec((0usize..4, 0u64..3000), 1..60),
            limit in 1u32..8,
        ) {
            let per = 1000 * MS;
            let windows = [Window::new(NonZeroU32::new(limit).unwrap(), std::time::Duration::from_nanos(per))];
            let guard = std::time::Duration::ZERO;
            let retention = Retention::for_windows(&windows, guard);
            let classes = [Class::Interactive, Class::Normal, Class::Batch];
            let shares: Vec<Share> = clients
                .iter()
                .enumerate()
                .map(|(i, &(weight, class, cap, reserved))| Share {
                    client: i as u16,
                    weight,
                    class: classes[class],
                    cap_percent: cap,
                    reserved_percent: reserved,
                })
                .collect();
            let mut arrivals: Vec<(u64, Share)> =
                arrivals.iter().map(|&(c, ms)| (ms * MS, shares[c % shares.len()])).collect();
            arrivals.sort_by_key(|a| a.0);

            let (mut lanes, mut log) = (Lanes::default(), AdmissionLog::new());
            let (mut queue, mut admitted, mut next, mut now, mut id) = (Vec::<Ticket>::new(), vec![], 0, 0, 0);
            while next < arrivals.len() || !queue.is_empty() {
                while next < arrivals.len() && arrivals[next].0 <= now {
                    let share = arrivals[next].1;
                    id += 1;
                    let (start, _) = lanes.tag(&share);
                    queue.push(Ticket { id, client: share.client, class: share.class, start });
                    next += 1;
                }
                let upcoming = arrivals.get(next).map_or(u64::MAX, |a| a.0);
                log.prune(retention, now);
                lanes.prune(retention, now);
                let slot = log.next_free(&windows, guard, now).at;
                match lanes.pick(&queue, &windows, guard, slot) {
                    Some((chosen, at)) if at <= upcoming => {
                        prop_assert!(at >= now);
                        now = at;
                        let i = queue.iter().position(|t| t.id == chosen).unwrap();
                        let t = queue.remove(i);
                        log.record(now, retention);
                        lanes.admitted(t.client, t.start, now, retention);
                        admitted.push((t.client, now));
                    }
                    _ => now = upcoming,
                }
            }
            prop_assert_eq!(admitted.len(), arrivals.len(), "everyone is served");
            let all: Vec<u64> = admitted.iter().map(|a| a.1).collect();
            prop_assert!(busiest(&all, per) <= limit as usize);
            for s in &shares {
                if let Some(cap) = s.cap_percent {
                    let cap_n = (limit as usize * cap as usize / 100).max(1);
                    let mine: Vec<u64> = admitted.iter().filter(|a| a.0 == s.client).map(|a| a.1).collect();
                    prop_assert!(busiest(&mine, per) <= cap_n, "client {} over its cap {}", s.client, cap_n);
                }
            }
        }
    }
}

/// Two policies share the tenant's key, 10 and 100 calls a minute, and a
/// client capped at 10% (and interactive, so it ranks first) has a call
/// queued under the first (its cap is one
/// call a minute there). Another client's call under the second policy goes
/// at once: the waiters rank and cap by the windows of every policy of the
/// key, so they agree that the capped one is not next (before, each judged
/// by its own policy's windows, and the two woke each other in turn until
/// the cap freed).
#[tokio::test]
async fn policies_sharing_a_key_agree_on_who_is_capped() {
    let minute = Duration::from_secs(60);
    let shared = |limit: u32| {
        let mut p = (*policy(Mode::Queue, limit, minute, 10, Duration::from_secs(120))).clone();
        p.key = crate::quota::KeyScope::Tenant;
        p.kept = vec![
            Window::new(std::num::NonZeroU32::new(10).unwrap(), minute),
            Window::new(std::num::NonZeroU32::new(100).unwrap(), minute),
        ];
        Arc::new(p)
    };
    let (few, many) = (shared(10), shared(100));
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let capped =
        Share { client: 1, cap_percent: Some(10), class: fair::Class::Interactive, ..Share::default() };
    limiter.acquire_as(&key("t"), &few, &capped, few.max_wait, &gauge()).await.unwrap();
    let queued = {
        let (limiter, few) = (limiter.clone(), few.clone());
        tokio::spawn(
            async move { limiter.acquire_as(&key("t"), &few, &capped, few.max_wait, &gauge()).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(2),
        limiter.acquire_as(&key("t"), &many, &share(2), many.max_wait, &gauge()),
    )
    .await
    .expect("the other client's call waited on the capped one");
    assert!(other.unwrap().waited < Duration::from_millis(100));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(!queued.is_finished(), "the capped call still waits for its cap");
    queued.abort();
}
