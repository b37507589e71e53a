//! Memory of many active keys with full windows.
//!
//! `cargo bench --bench keys_rss [-- KEYS]` (default 10,000)
//!
//! Fills KEYS keys of the built-in hunting policy (45/minute, 1,500/hour)
//! until each key's hour window holds 1,500 admissions, then prints the
//! process's resident set size. Fails if 10,000 keys need 256 MB or more.

use std::time::Duration;

use prometheus::IntGauge;
use quotagate::admission::Limiter;
use quotagate::config::Config;
use quotagate::identity::Identity;
use quotagate::policy::Mode;
use quotagate::quota::QuotaKey;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let keys: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let config = Config::builtin();
    let mut policy = config.policies.0.iter().find(|p| p.name == "hunting").unwrap().clone();
    policy.mode = Mode::Reject;
    let limiter = Limiter::new(config.guard);
    let depth = IntGauge::new("d", "d").unwrap();
    let before = rss_bytes();
    rt.block_on(async {
        // Every key gets 45 admissions per scaled minute, 34 minutes long:
        // 1,500 admissions in each key's hour window.
        let mut filled = vec![0usize; keys];
        while filled.iter().any(|&n| n < 1500) {
            for (i, n) in filled.iter_mut().enumerate() {
                let who = Identity { tenant: format!("tenant-{i:06}"), app: "app".into() };
                while *n < 1500 {
                    let key = QuotaKey::new(policy.key, policy.key_id, &who);
                    match limiter.acquire(&key, &policy, Duration::ZERO, &depth).await {
                        Ok(_) => *n += 1,
                        Err(_) => break,
                    }
                }
            }
            tokio::time::advance(Duration::from_secs(61)).await;
        }
    });
    let after = rss_bytes();
    let mb = |b: u64| b as f64 / 1_048_576.0;
    println!(
        "keys {keys}  admissions held {}  RSS before {:.1} MB  after {:.1} MB  per key {:.1} KB",
        keys * 1500,
        mb(before),
        mb(after),
        (after.saturating_sub(before)) as f64 / keys as f64 / 1024.0
    );
    assert_eq!(limiter.keys(), keys);
    if keys <= 10_000 && after >= 256 * 1_048_576 {
        eprintln!("FAIL: {keys} keys need {:.1} MB, the budget is 256 MB", mb(after));
        std::process::exit(1);
    }
}
