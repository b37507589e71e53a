//! Queue behaviour under tokio's paused clock: no real sleeps, exact times.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;

use super::*;
use crate::policy::{Mode, Policy, Timeouts};
use crate::quota::{KeyScope, Window};

pub(super) fn policy(
    mode: Mode,
    limit: u32,
    per: Duration,
    max_queue: usize,
    max_wait: Duration,
) -> Arc<Policy> {
    let windows = vec![Window::new(NonZeroU32::new(limit).unwrap(), per)];
    Arc::new(Policy {
        id: 0,
        key_id: 0,
        name: "p".into(),
        methods: vec![],
        upstreams: vec![],
        paths: vec![],
        kept: windows.clone(),
        windows,
        key: KeyScope::TenantAppPolicy,
        mode,
        max_wait,
        max_queue,
        max_attempts: 1,
        hunting: false,
        budgets: vec![],
        timeouts: Timeouts {
            connect: Duration::from_secs(1),
            header: Duration::from_secs(1),
            total: Duration::from_secs(1),
        },
    })
}

pub(super) fn key(tenant: &str) -> QuotaKey {
    QuotaKey { policy: Some(0), tenant: tenant.into(), app: Some("a".into()) }
}

pub(super) fn gauge() -> IntGauge {
    IntGauge::new("depth", "queue depth").unwrap()
}

#[tokio::test(start_paused = true)]
async fn reject_mode_gives_the_exact_time_until_a_slot_frees() {
    let limiter = Limiter::new(Duration::ZERO);
    let p = policy(Mode::Reject, 2, Duration::from_secs(10), 0, Duration::ZERO);
    let g = gauge();
    assert_eq!(limiter.acquire(&key("t"), &p, p.max_wait, &g).await.map(|a| a.waited), Ok(Duration::ZERO));
    tokio::time::advance(Duration::from_millis(2500)).await;
    assert_eq!(limiter.acquire(&key("t"), &p, p.max_wait, &g).await.map(|a| a.waited), Ok(Duration::ZERO));
    tokio::time::advance(Duration::from_millis(500)).await;
    let r = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap_err();
    assert_eq!(r.reason, Reason::NoSlot);
    assert_eq!(r.retry_after, Duration::from_secs(7));
    tokio::time::advance(Duration::from_millis(6999)).await;
    assert!(limiter.acquire(&key("t"), &p, p.max_wait, &g).await.is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(limiter.acquire(&key("t"), &p, p.max_wait, &g).await.map(|a| a.waited), Ok(Duration::ZERO));
    // Another tenant is untouched by the first one's full window.
    assert_eq!(limiter.acquire(&key("u"), &p, p.max_wait, &g).await.map(|a| a.waited), Ok(Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn waiters_go_in_fifo_order_at_the_exact_moment_their_slot_frees() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 2, Duration::from_secs(1), 10, Duration::from_secs(5));
    let g = gauge();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tasks.push(tokio::spawn(async move {
            limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
            (i, t0.elapsed())
        }));
        tokio::task::yield_now().await;
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let secs: Vec<u128> = done.iter().map(|(_, d)| d.as_millis()).collect();
    assert_eq!(secs, vec![0, 0, 1000, 1000, 2000, 2000]);
    assert_eq!(g.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_and_a_too_long_wait_are_rejected_at_once() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(1), 2, Duration::from_secs(5));
    let g = gauge();
    limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        waiters.push(tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &g).await }));
        tokio::task::yield_now().await;
    }
    assert_eq!(g.get(), 2);
    let full = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap_err();
    assert_eq!((full.reason, full.retry_after), (Reason::QueueFull, Duration::from_secs(3)));
    // A caller that will wait only 1.5 s cannot get the slot 3 s away (and
    // is told so, full queue or not).
    let p2 = policy(Mode::Queue, 1, Duration::from_secs(1), 5, Duration::from_millis(2500));
    let short = limiter.acquire(&key("t"), &p2, Duration::from_millis(1500), &g).await.unwrap_err();
    assert_eq!((short.reason, short.retry_after), (Reason::WaitTooLong, Duration::from_secs(3)));
    for w in waiters {
        assert!(w.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_makes_room_for_another_client_by_pushing_out_the_floods_last() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(1), 3, Duration::from_secs(10));
    let g = gauge();
    let (flood, light) = (Share { client: 1, ..Share::default() }, Share { client: 2, ..Share::default() });
    limiter.acquire_as(&key("t"), &p, &flood, p.max_wait, &g).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        waiters.push(tokio::spawn(
            async move { limiter.acquire_as(&key("t"), &p, &flood, p.max_wait, &g).await },
        ));
        tokio::task::yield_now().await;
    }
    assert_eq!(g.get(), 3, "the flood filled the queue");
    let again = limiter.acquire_as(&key("t"), &p, &flood, p.max_wait, &g).await.unwrap_err();
    assert_eq!(again.reason, Reason::QueueFull, "the flood cannot push out its own");
    let t0 = Instant::now();
    let light_call = {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tokio::spawn(async move { limiter.acquire_as(&key("t"), &p, &light, p.max_wait, &g).await })
    };
    tokio::task::yield_now().await;
    let last = waiters.pop().unwrap().await.unwrap().unwrap_err();
    assert_eq!(last.reason, Reason::QueueFull, "the flood's latest waiter was pushed out");
    assert_eq!(last.retry_after, Duration::from_secs(4), "the slot after the light call and its own two");
    assert_eq!(g.get(), 3);
    light_call.await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1), "the light call took the next slot");
    for w in waiters {
        assert!(w.await.unwrap().is_ok(), "the others stayed queued and went");
    }
    assert_eq!(g.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_frees_its_place_and_its_slot() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(1), 1, Duration::from_secs(10));
    let g = gauge();
    let t0 = Instant::now();
    limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    let first = {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &g).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(g.get(), 1);
    first.abort();
    let _ = first.await;
    assert_eq!(g.get(), 0);
    // The place is free again, and the slot at 1 s goes to the next waiter.
    let waited = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap().waited;
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(waited, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_freed_once_their_windows_empty() {
    let limiter = Limiter::new(Duration::from_millis(5));
    let p = policy(Mode::Reject, 3, Duration::from_secs(1), 0, Duration::ZERO);
    let g = gauge();
    for t in 0..100 {
        limiter.acquire(&key(&t.to_string()), &p, p.max_wait, &g).await.unwrap();
    }
    assert_eq!(limiter.sweep(), 100);
    tokio::time::advance(Duration::from_millis(1004)).await;
    assert_eq!(limiter.sweep(), 100);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(limiter.sweep(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_hold_pauses_the_key_and_its_waiters_but_no_other_key() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 100, Duration::from_secs(1), 10, Duration::from_secs(10));
    let g = gauge();
    let t0 = Instant::now();
    limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    limiter.hold(&key("t"), Duration::from_secs(4));
    assert_eq!(limiter.held_for(&key("t")), Some(Duration::from_secs(4)));
    assert_eq!(limiter.held_for(&key("u")), None);
    // Another key is untouched.
    assert_eq!(limiter.acquire(&key("u"), &p, p.max_wait, &g).await.map(|a| a.waited), Ok(Duration::ZERO));
    // A caller that will not wait is told the exact remaining hold.
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap_err();
    assert_eq!((r.reason, r.retry_after, r.window), (Reason::WaitTooLong, Duration::from_secs(3), None));
    // A waiter goes the moment the hold ends, not before; a shorter hold does not shorten it.
    limiter.hold(&key("t"), Duration::from_secs(1));
    let waited = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap().waited;
    assert_eq!(waited, Duration::from_secs(3));
    assert_eq!(t0.elapsed(), Duration::from_secs(4));
    assert_eq!(limiter.held_for(&key("t")), None);
}

#[tokio::test(start_paused = true)]
async fn a_hold_placed_while_a_waiter_sleeps_delays_it() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(1), 10, Duration::from_secs(10));
    let g = gauge();
    let t0 = Instant::now();
    limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    let waiter = {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &g).await })
    };
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(500)).await;
    limiter.hold(&key("t"), Duration::from_secs(2));
    assert_eq!(waiter.await.unwrap().map(|a| a.waited), Ok(Duration::from_millis(2500)));
    assert_eq!(t0.elapsed(), Duration::from_millis(2500));
}

#[tokio::test(start_paused = true)]
async fn a_refund_gives_the_slot_to_the_next_waiter() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(10), 10, Duration::from_secs(20));
    let g = gauge();
    let t0 = Instant::now();
    let first = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    let waiter = {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &g).await })
    };
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    limiter.refund(&key("t"), &first);
    assert!(waiter.await.unwrap().is_ok());
    assert_eq!(t0.elapsed(), Duration::from_secs(1), "the waiter took the refunded slot at once");
}

#[tokio::test(start_paused = true)]
async fn a_revealed_lower_limit_applies_to_its_key_only() {
    let limiter = Limiter::new(Duration::ZERO);
    let p = policy(Mode::Reject, 10, Duration::from_secs(1), 0, Duration::ZERO);
    let g = gauge();
    let lower = Window::new(NonZeroU32::new(2).unwrap(), Duration::from_secs(1));
    assert!(limiter.reveal(&key("t"), &p, lower));
    assert!(!limiter.reveal(&key("t"), &p, Window::new(NonZeroU32::new(5).unwrap(), Duration::from_secs(1))));
    for _ in 0..2 {
        limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap();
    }
    let r = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap_err();
    assert_eq!(r.window, Some(lower));
    for _ in 0..10 {
        limiter.acquire(&key("u"), &p, Duration::ZERO, &g).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn limits_revealed_for_two_window_lengths_both_hold() {
    let limiter = Limiter::new(Duration::ZERO);
    let p = policy(Mode::Reject, 10, Duration::from_secs(1), 0, Duration::ZERO);
    let g = gauge();
    let per_second = Window::new(NonZeroU32::new(2).unwrap(), Duration::from_secs(1));
    let per_hour = Window::new(NonZeroU32::new(1000).unwrap(), Duration::from_secs(3600));
    assert!(limiter.reveal(&key("t"), &p, per_second));
    assert!(limiter.reveal(&key("t"), &p, per_hour), "a window the policy lacks");
    for _ in 0..2 {
        limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap();
    }
    let r = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap_err();
    assert_eq!(r.window, Some(per_second), "the hour's reveal did not replace the second's");
}

#[tokio::test(start_paused = true)]
async fn draining_turns_away_at_once_only_the_waiters_whose_slot_comes_too_late() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(10), 10, Duration::from_secs(60));
    let g = gauge();
    assert!(limiter.acquire(&key("t"), &p, p.max_wait, &g).await.is_ok());
    let waiter = |limiter: Arc<Limiter>, p: Arc<Policy>| {
        tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &gauge()).await })
    };
    // Slots at 10 s and 20 s; the drain ends at 15 s.
    let (first, second) = (waiter(limiter.clone(), p.clone()), waiter(limiter.clone(), p.clone()));
    tokio::task::yield_now().await;
    let started = Instant::now();
    limiter.drain(Duration::from_secs(15));
    let late = second.await.unwrap().unwrap_err();
    assert_eq!((late.reason, late.retry_after), (Reason::Draining, Duration::from_secs(20)));
    assert_eq!(started.elapsed(), Duration::ZERO, "answered at once");
    assert_eq!(first.await.unwrap().map(|a| a.waited), Ok(Duration::from_secs(10)));
    // A new call whose slot comes after the drain is turned away too.
    let r = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap_err();
    assert_eq!(r.reason, Reason::Draining);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_has_not_left_within_its_shortest_window_has_outlived_its_admission() {
    let limiter = Limiter::new(Duration::from_millis(50));
    let mut p = policy(Mode::Queue, 10, Duration::from_secs(60), 10, Duration::from_secs(60));
    Arc::get_mut(&mut p)
        .unwrap()
        .windows
        .push(Window::new(NonZeroU32::new(1).unwrap(), Duration::from_secs(2)));
    let g = gauge();
    let admitted = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    tokio::time::advance(Duration::from_millis(1_999)).await;
    assert!(!limiter.outlived(&admitted), "within the 2 s window of its admission");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(limiter.outlived(&admitted), "the shortest window, not the minute, bounds it");
    // Refunded, it is admitted again at once: its own entry is gone.
    limiter.refund(&key("t"), &admitted);
    let again = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap();
    assert!(!limiter.outlived(&again));
}

#[tokio::test(start_paused = true)]
async fn a_call_released_late_is_aged_from_its_release() {
    let limiter = Arc::new(Limiter::new(Duration::ZERO));
    let p = policy(Mode::Queue, 1, Duration::from_secs(10), 10, Duration::from_secs(60));
    let g = gauge();
    let t0 = Instant::now();
    let mut first = limiter.acquire(&key("t"), &p, p.max_wait, &g).await.unwrap();
    // A waiter queues for the slot, due at 10 s as things stand.
    let waiter = {
        let (limiter, p, g) = (limiter.clone(), p.clone(), g.clone());
        tokio::spawn(async move { limiter.acquire(&key("t"), &p, p.max_wait, &g).await })
    };
    tokio::task::yield_now().await;
    // The first call leaves 3 s after its admission (its body came slowly).
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(limiter.released(&key("t"), &mut first), "it left late");
    assert_eq!(first.stamp() - first.at(), 3_000_000_000);
    let mut second = waiter.await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(13), "the window ages the first call from its release");
    assert_eq!(second.waited, Duration::from_secs(13));
    // The second leaves 1 s late too; then it is refunded (its connection
    // failed): the refund finds it where it was moved, and frees the slot.
    tokio::time::advance(Duration::from_secs(1)).await;
    limiter.released(&key("t"), &mut second);
    let refused = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap_err();
    assert_eq!(
        refused.retry_after,
        Duration::from_secs(10),
        "10 s from its release, not 9 from its admission"
    );
    limiter.refund(&key("t"), &second);
    let mut third = limiter.acquire(&key("t"), &p, Duration::ZERO, &g).await.unwrap();
    assert_eq!(third.waited, Duration::ZERO);
    // A call that leaves within the slack keeps its admission time.
    assert!(!limiter.released(&key("t"), &mut third), "it left at once");
    assert_eq!(third.stamp(), third.at());
}

/// A shared store's admission is late from when this replica heard of it,
/// whatever the store's clock said; its local copy moves with it.
#[tokio::test(start_paused = true)]
async fn a_shared_admission_is_late_from_when_its_answer_came() {
    let limiter = Limiter::new(Duration::ZERO);
    let p = policy(Mode::Queue, 1, Duration::from_secs(10), 10, Duration::from_secs(60));
    let now = limiter.clock.now();
    // The store's clock is 5 s behind this replica's; its answer came just now.
    let at = now - 5_000_000_000;
    limiter.record(&key("t"), &p, at);
    let mut early = Admitted::shared(at, now, 7, Duration::ZERO, Vec::new());
    assert!(!limiter.released(&key("t"), &mut early), "not late: it leaves as the answer comes");
    tokio::time::advance(Duration::from_millis(300)).await;
    let mut late = Admitted::shared(at, now, 7, Duration::ZERO, Vec::new());
    assert!(limiter.released(&key("t"), &mut late), "300 ms after the answer");
    assert_eq!(late.stamp(), now + 300_000_000, "the local copy moved to the departure");
    // A shared admission with no local copy is late all the same, and its
    // stamp is the departure the store moves it to, where a refund looks.
    let mut unknown = Admitted::shared(at, now, 8, Duration::ZERO, Vec::new());
    assert!(limiter.released(&key("u"), &mut unknown));
    assert_eq!(unknown.stamp(), now + 300_000_000);
}
