//! Memory of many active keys with full windows.
//!
//! `cargo bench --bench keys_rss [-- KEYS...]` (default 10,000;
//! `-- 10000 100000` for both scale points)
//!
//! For each count, a fresh process (this bench again) fills KEYS keys of the
//! built-in hunting policy (45/minute, 1,500/hour) until each key's hour
//! window holds 1,500 admissions, then reads its resident set size; a table
//! row per count is printed. Fails if 10,000 keys need 256 MB or more.

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

/// Set in the child process that measures one count.
const CHILD: &str = "KEYS_RSS_CHILD";

fn main() {
    if let Some(keys) = std::env::var(CHILD).ok().and_then(|v| v.parse().ok()) {
        measure(keys);
        return;
    }
    let mut counts: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-')).filter_map(|a| a.parse().ok()).collect();
    if counts.is_empty() {
        counts.push(10_000);
    }
    let me = std::env::current_exe().expect("the bench's own path");
    let mb = |b: u64| b as f64 / 1_048_576.0;
    println!("| Keys | Admissions held | RSS before | RSS after | Per key | Fill time |");
    println!("|---|---|---|---|---|---|");
    let mut failed = false;
    for keys in counts {
        let out =
            std::process::Command::new(&me).env(CHILD, keys.to_string()).output().expect("run the bench");
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [before, after, secs] = v[..] else {
            eprintln!("{keys} keys: the measuring process failed: {}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        };
        let (before, after) = (before as u64, after as u64);
        println!(
            "| {keys} | {} | {:.1} MB | {:.1} MB | {:.1} KB | {secs:.0} s |",
            keys * 1500,
            mb(before),
            mb(after),
            after.saturating_sub(before) as f64 / keys as f64 / 1024.0
        );
        if keys <= 10_000 && after >= 256 * 1_048_576 {
            eprintln!("FAIL: {keys} keys need {:.1} MB, the budget is 256 MB", mb(after));
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// Fill `keys` keys and print `RSS-before RSS-after seconds` for the parent.
fn measure(keys: usize) {
    let started = std::time::Instant::now();
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
    assert_eq!(limiter.keys(), keys);
    println!("{before} {after} {:.1}", started.elapsed().as_secs_f64());
}
