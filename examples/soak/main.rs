//! Soak: the release gateway binary under mixed load with injected faults
//! for 10 minutes (`--minutes N`), then checked for leaks, hangs and panics.
//!
//! The upstream is the integration tests' emulator (`tests/support/`) with
//! the built-in profile's shape on scaled windows: a "minute" of 1 s, an
//! "hour" of 12 s; for incidents and for hunting 12 calls per minute and 60
//! per hour per tenant and app; 2 s of hunting running time per tenant per
//! hour. The gateway ([`gateway::config_text`]) has the same windows, queues
//! for at most 2 s, and keeps its state in the default durable SQLite store
//! in a temporary state directory.
//!
//! Six clients (three tenants, two apps each) offer 150 calls a second in all
//! (`--rate`), about twice the incident quota and many times the hunting
//! running time, so requests queue and are rejected: incident listings,
//! Defender hunting queries of random cost (some large results, some with
//! `Stats` last), Graph hunting, unmetered downloads; some clients walk away
//! while queued or while a response streams ([`traffic`]). Faults come on a
//! schedule every minute ([`faults`]): upstream resets, stalls, garbage,
//! upstream 429s, a config reload by file change and one by SIGHUP.
//!
//! Every 2 s (`--sample-secs`) it reads the gateway's RSS from
//! `/proc/PID/status` and its queue depth from `/metrics`.
//! When the traffic stops it waits for every client's call to end, then
//! checks, and prints as PASS/FAIL:
//!
//! - RSS flat after warm-up. Warm-up is the first 20% of the run
//!   (`--warmup-percent`; 2 minutes of 10). Through every sample after it,
//!   the least-squares line rises by at most 10% of its starting value over
//!   the rest of the run. A trend, not single samples or minutes: RSS
//!   follows the connections and large bodies in flight and the queues'
//!   depth, and the allocator hands freed pages back in bursts (dips of a
//!   third for a few seconds), so a minute's median moves by up to ±10%
//!   with the load's phases (each minute's median is printed too); a leak
//!   shows as a rising trend;
//! - queue entries, running-time reservations and queries in flight back
//!   to zero (`/metrics` and `/quota`) within 20 s;
//! - every request sent got an answer, or was abandoned by its client on
//!   purpose; no answer was malformed; a 2xx body broke off only where the
//!   upstream reset one;
//! - every fault played and met requests, and every reload applied (none
//!   refused);
//! - no panic in the gateway's log, and a clean exit on SIGTERM.
//!
//! It exits 1 when a criterion fails, keeping the temporary directory
//! (config, state file, log) for a look. Run it with `bench/soak.sh`.

// The integration tests' emulator; it finds `hunt` as its `super::hunt`.
#[allow(dead_code)]
#[path = "../../tests/support/emulator.rs"]
mod emulator;
#[allow(dead_code)]
#[path = "../../tests/support/hunt.rs"]
mod hunt;

mod faults;
mod gateway;
mod report;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use emulator::{Emulator, EmulatorConfig, QuotaRule};
use gateway::{Admin, Gateway, NORMAL, RUNTIME_BUDGET};
use traffic::{Recorder, APPS, GRAPH_HUNT, HUNT, INCIDENTS, TENANTS};

/// The scaled clock.
mod scale {
    use std::time::Duration;

    pub const MINUTE: Duration = Duration::from_secs(1);
    pub const HOUR: Duration = Duration::from_secs(12);
}

pub struct Settings {
    pub minutes: f64,
    pub rate: f64,
    pub bin: PathBuf,
    pub sample: Duration,
    pub warmup_percent: f64,
}

impl Settings {
    fn from_args() -> Settings {
        let bin = std::env::var_os("QUOTAGATE_BIN")
            .map_or_else(|| "target/release/quotagate".into(), PathBuf::from);
        let mut s = Settings {
            minutes: 10.0,
            rate: 150.0,
            bin,
            sample: Duration::from_secs(2),
            warmup_percent: 20.0,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        for pair in args.chunks(2) {
            let value = pair.get(1).map(String::as_str).unwrap_or("");
            match pair[0].as_str() {
                "--minutes" => s.minutes = value.parse().expect("--minutes N"),
                "--rate" => s.rate = value.parse().expect("--rate CALLS_PER_SECOND"),
                "--bin" => s.bin = value.into(),
                "--sample-secs" => s.sample = Duration::from_secs_f64(value.parse().expect("--sample-secs S")),
                "--warmup-percent" => s.warmup_percent = value.parse().expect("--warmup-percent P"),
                other => panic!(
                    "unknown argument {other}: --minutes N --rate R --bin PATH --sample-secs S --warmup-percent P"
                ),
            }
        }
        s
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.minutes * 60.0)
    }
}

/// One reading of the gateway.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the start.
    pub at: f64,
    pub rss: u64,
    /// `quotagate_queue_depth`, every policy: calls waiting for a slot or
    /// for running time.
    pub queued: f64,
}

async fn sample(gw: &Gateway, admin: &Admin, start: Instant) -> Option<Sample> {
    let rss = gw.rss()?;
    let m = admin.metrics().await?;
    Some(Sample { at: start.elapsed().as_secs_f64(), rss, queued: m.sum("quotagate_queue_depth") })
}

async fn sample_until(
    gw: &Gateway,
    admin: &Admin,
    start: Instant,
    until: Instant,
    every: Duration,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut next = start;
    while next <= until {
        tokio::time::sleep_until(next.into()).await;
        out.extend(sample(gw, admin, start).await);
        next += every;
    }
    out
}

/// What is left in the gateway once traffic has stopped.
#[derive(Debug, Default, Clone, Copy)]
pub struct Residue {
    /// `/metrics`: queue depth, hunting queries in flight, reserved seconds.
    pub metrics: (f64, f64, f64),
    /// `/quota`: queued for a slot, queued for running time, in flight, reserved seconds.
    pub quota: (u64, u64, u64, f64),
    /// Seconds after the last call ended when both first read zero.
    pub zero_after: Option<f64>,
}

impl Residue {
    fn is_zero(&self) -> bool {
        let (q, f, r) = self.metrics;
        let (kq, rq, kf, kr) = self.quota;
        q == 0.0 && f == 0.0 && r == 0.0 && kq == 0 && rq == 0 && kf == 0 && kr == 0.0
    }
}

/// Poll `/metrics` and `/quota` for up to 20 s until nothing is queued,
/// reserved or in flight.
async fn settle(admin: &Admin) -> Residue {
    let from = Instant::now();
    let mut last = Residue::default();
    while from.elapsed() < Duration::from_secs(20) {
        if let (Some(m), Some(q)) = (admin.metrics().await, admin.quota().await) {
            last = Residue {
                metrics: (
                    m.sum("quotagate_queue_depth"),
                    m.sum("quotagate_runtime_in_flight"),
                    m.sum("quotagate_runtime_reserved_seconds"),
                ),
                quota: gateway::quota_residue(&q),
                zero_after: None,
            };
            if last.is_zero() {
                last.zero_after = Some(from.elapsed().as_secs_f64());
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last
}

fn emulator_config() -> EmulatorConfig {
    let windows = [(NORMAL.per_minute, scale::MINUTE), (NORMAL.per_hour, scale::HOUR)];
    EmulatorConfig::new()
        .quota(QuotaRule::new("incidents", &[INCIDENTS], &windows))
        .quota(QuotaRule::new("hunting", &[HUNT, GRAPH_HUNT], &windows))
        .running_time(RUNTIME_BUDGET, scale::HOUR)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let s = Settings::from_args();
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = Emulator::start(emulator_config()).await;
    let mut gw = match Gateway::start(&s.bin, dir.path(), &gateway::config_text(&emu.url(), NORMAL)) {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let admin = Admin::new(&gw.admin);
    println!(
        "soak: {} for {} min, {} calls/s from {} clients; gateway pid {} on {}, state in {}",
        s.bin.display(),
        s.minutes,
        s.rate,
        TENANTS * APPS,
        gw.pid(),
        gw.proxy,
        dir.path().display()
    );
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("client");
    let start = Instant::now();
    let until = start + s.duration();
    let rec = Recorder::new(start);
    let base = format!("http://{}", gw.proxy);
    let per_client = s.rate / (TENANTS * APPS) as f64;
    let clients: Vec<_> = (0..TENANTS * APPS)
        .map(|i| tokio::spawn(traffic::client(i, http.clone(), base.clone(), per_client, until, rec.clone())))
        .collect();
    let (played, mut samples) = tokio::join!(
        faults::play(&emu, &gw, &admin, start, until),
        sample_until(&gw, &admin, start, until, s.sample),
    );
    for c in clients {
        let _ = c.await;
    }
    let traffic_ended = start.elapsed().as_secs_f64();
    let residue = settle(&admin).await;
    samples.extend(sample(&gw, &admin, start).await);
    let reloads_refused = r#"quotagate_config_reloads_total{result="refused""#;
    let refused = admin.metrics().await.map_or(f64::NAN, |m| m.sum(reloads_refused));
    let tally = rec.take();
    let upstream = emu.requests();
    let exit = gw.stop(Duration::from_secs(15));
    let log = std::fs::read_to_string(&gw.log).unwrap_or_default();
    let run = report::Run {
        s: &s,
        start,
        traffic_ended,
        samples,
        tally,
        upstream,
        played,
        residue,
        refused_reloads: refused,
        exit,
        log,
    };
    let passed = run.print();
    if passed {
        ExitCode::SUCCESS
    } else {
        println!("soak: FAILED; config, state and log kept in {}", dir.keep().display());
        ExitCode::FAILURE
    }
}
