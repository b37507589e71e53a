//! The admission decision for a key whose hour window holds 1,500 admissions.
//!
//! `cargo bench --bench admission`
//!
//! * `log/admit_full_hour`: the quota maths alone. A log holding 1,500
//!   admissions within the hour; the clock advances by one slot interval
//!   (3600 s / 1500) per iteration, so every decision admits one call and
//!   retires the oldest: `next_free` + `record` + `prune` at steady state.
//! * `limiter/reject_full_hour`: the whole decision through [`Limiter`]
//!   (key lookup, lock, prune, projection) for a key whose hour window is
//!   full, answered with a rejection and its exact wait.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use prometheus::IntGauge;
use quotagate::admission::Limiter;
use quotagate::config::Config;
use quotagate::identity::Identity;
use quotagate::policy::Mode;
use quotagate::quota::{AdmissionLog, QuotaKey, Retention, Window};

const SEC: u64 = 1_000_000_000;

fn windows() -> [Window; 2] {
    [
        Window::new(NonZeroU32::new(45).unwrap(), Duration::from_secs(60)),
        Window::new(NonZeroU32::new(1500).unwrap(), Duration::from_secs(3600)),
    ]
}

fn log_admit(c: &mut Criterion) {
    let windows = windows();
    let guard = Duration::from_millis(250);
    let retention = Retention::for_windows(&windows, guard);
    let step = 3600 * SEC / 1500 + SEC;
    let mut log = AdmissionLog::new();
    let mut now = 0;
    for _ in 0..1500 {
        now = log.next_free(&windows, guard, now).at;
        log.record(now, retention);
    }
    assert_eq!(log.len(), 1500);
    // Start where the oldest admission leaves the hour window.
    now = log.next_free(&windows, guard, now).at - step;
    c.bench_function("log/admit_full_hour", |b| {
        b.iter(|| {
            now += step;
            log.prune(retention, now);
            let free = log.next_free(black_box(&windows), guard, now);
            assert!(free.at <= now);
            log.record(now, retention);
        })
    });
}

fn limiter_reject(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let config = Config::builtin();
    let mut policy = config.policies.0.iter().find(|p| p.name == "hunting").unwrap().clone();
    policy.mode = Mode::Reject;
    let limiter = Limiter::new(config.guard);
    let depth = IntGauge::new("d", "d").unwrap();
    let who = Identity { tenant: "11111111-2222-3333-4444-555555555555".into(), app: "app".into() };
    let key = || QuotaKey::new(policy.key, policy.key_id, &who);
    rt.block_on(async {
        // 1,500 admissions in the hour: 45 per minute for 33⅓ minutes.
        let mut admitted = 0;
        while admitted < 1500 {
            match limiter.acquire(&key(), &policy, Duration::ZERO, &depth).await {
                Ok(_) => admitted += 1,
                Err(r) => tokio::time::advance(r.retry_after).await,
            }
        }
        let r = limiter.acquire(&key(), &policy, Duration::ZERO, &depth).await.unwrap_err();
        assert!(r.retry_after > Duration::from_secs(1000), "the hour window is what is full");
    });
    c.bench_function("limiter/reject_full_hour", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(limiter.acquire(&key(), &policy, Duration::ZERO, &depth).await) })
        })
    });
}

criterion_group!(benches, log_admit, limiter_reject);
criterion_main!(benches);
