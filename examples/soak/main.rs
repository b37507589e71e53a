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
//! Options put more of the gateway under the same load and faults:
//!
//! - `--store redis`: the quota store is Redis, a `redis-server` the soak
//!   starts on a free port without persistence ([`redis_server`]) and kills once a
//!   minute for 4 s ([`outage`]), with `on_outage = "fail-closed"`
//!   (`--on-outage local` for the other mode). Checked besides: every 503
//!   falls within an outage and carries `Retry-After` (with `local`: no
//!   503 at all), `/readyz` reported each outage, and the store came back
//!   to `shared` by itself after each within 15 s;
//! - `--tls`: the proxy listener serves HTTPS with a self-signed
//!   certificate the clients trust ([`tls`]);
//! - `--forward-proxy`: the gateway's HTTPS forward proxy is on, and every
//!   third call goes through it to `https://api.security.microsoft.com` or
//!   `https://graph.microsoft.com` (`CONNECT`, trusting the local CA).
//!   Checked besides: every `CONNECT` was intercepted, none refused or
//!   failed, and both routes' calls ended as above.
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
mod outage;
mod redis_server;
mod report;
mod tls;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use emulator::{Emulator, EmulatorConfig, QuotaRule};
use gateway::{Admin, Gateway, Setup, NORMAL, RUNTIME_BUDGET};
use redis_server::RedisServer;
use traffic::{Recorder, Route, APPS, GRAPH_HUNT, HUNT, INCIDENTS, TENANTS};

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
    /// `--store redis`: the Redis store, with its outages.
    pub redis: bool,
    /// `--on-outage`: `fail-closed` (the default here) or `local`.
    pub on_outage: String,
    /// `--tls`: HTTPS on the proxy listener.
    pub tls: bool,
    /// `--forward-proxy`: a third of the calls through the forward proxy.
    pub forward_proxy: bool,
}

const USAGE: &str = "--minutes N --rate R --bin PATH --sample-secs S --warmup-percent P \
                     --store sqlite|redis --on-outage fail-closed|local --tls --forward-proxy";

impl Settings {
    fn from_args() -> Settings {
        let bin: PathBuf = std::env::var_os("QUOTAGATE_BIN")
            .map_or_else(|| "target/release/quotagate".into(), PathBuf::from);
        // Absolute: the gateway runs in a directory of its own.
        let bin = std::path::absolute(&bin).unwrap_or(bin);
        let mut s = Settings {
            minutes: 10.0,
            rate: 150.0,
            bin,
            sample: Duration::from_secs(2),
            warmup_percent: 20.0,
            redis: false,
            on_outage: "fail-closed".into(),
            tls: false,
            forward_proxy: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let mut value = || args.next().unwrap_or_default();
            match flag.as_str() {
                "--minutes" => s.minutes = value().parse().expect("--minutes N"),
                "--rate" => s.rate = value().parse().expect("--rate CALLS_PER_SECOND"),
                "--bin" => s.bin = value().into(),
                "--sample-secs" => {
                    s.sample = Duration::from_secs_f64(value().parse().expect("--sample-secs S"))
                }
                "--warmup-percent" => s.warmup_percent = value().parse().expect("--warmup-percent P"),
                "--store" => {
                    s.redis = match value().as_str() {
                        "redis" => true,
                        "sqlite" => false,
                        other => panic!("--store {other}: sqlite or redis"),
                    }
                }
                "--on-outage" => {
                    s.on_outage = value();
                    assert!(
                        ["fail-closed", "local"].contains(&s.on_outage.as_str()),
                        "--on-outage fail-closed|local"
                    );
                }
                "--tls" => s.tls = true,
                "--forward-proxy" => s.forward_proxy = true,
                other => panic!("unknown argument {other}: {USAGE}"),
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

/// The routes the clients send by: the proxy listener (HTTP, or HTTPS
/// trusting `cert_pem`), and the forward proxy when it is on (trusting the
/// local CA it made in `ca_dir`).
fn routes(gw: &Gateway, cert_pem: Option<&str>, ca_dir: &std::path::Path) -> Result<Vec<Route>, String> {
    let builder = || reqwest::Client::builder().pool_max_idle_per_host(64);
    let trust =
        |pem: &str| reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| format!("certificate: {e}"));
    let mut base = builder();
    if let Some(pem) = cert_pem {
        base = base.add_root_certificate(trust(pem)?);
    }
    let scheme = if cert_pem.is_some() { "https" } else { "http" };
    let base = base.build().map_err(|e| format!("client: {e}"))?;
    let mut routes = vec![Route::base_url(base, format!("{scheme}://{}", gw.proxy))];
    if let Some(forward) = &gw.forward {
        let ca = std::fs::read_to_string(ca_dir.join("ca.pem")).map_err(|e| format!("the local CA: {e}"))?;
        let proxy = reqwest::Proxy::https(format!("http://{forward}")).map_err(|e| format!("proxy: {e}"))?;
        let http = builder().proxy(proxy).add_root_certificate(trust(&ca)?).build();
        routes.push(Route::forward_proxy(http.map_err(|e| format!("client: {e}"))?));
    }
    Ok(routes)
}

/// Start Redis (when asked), write the listener's certificate (when
/// asked), start the gateway, and make the clients' routes to it.
async fn setup(
    s: &Settings,
    dir: &std::path::Path,
    emu: &Emulator,
) -> Result<(Option<RedisServer>, Gateway, Vec<Route>), String> {
    let redis = if s.redis { Some(RedisServer::start(dir).await?) } else { None };
    let cert = if s.tls { Some(tls::self_signed(dir)?) } else { None };
    let setup = Setup {
        upstream: emu.addr(),
        redis: redis.as_ref().map(|r| (r.url(), s.on_outage.clone())),
        tls: cert.as_ref().map(|c| (c.cert_file.clone(), c.key_file.clone())),
        forward_proxy: s.forward_proxy.then(|| dir.join("ca")),
    };
    let gw = Gateway::start(&s.bin, dir, setup)?;
    let routes = routes(&gw, cert.as_ref().map(|c| c.cert_pem.as_str()), &dir.join("ca"))?;
    Ok((redis, gw, routes))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let s = Settings::from_args();
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = Emulator::start(emulator_config()).await;
    let (mut redis, mut gw, routes) = match setup(&s, dir.path(), &emu).await {
        Ok(started) => started,
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
    if let Some(r) = &redis {
        let pid = r.pid().unwrap_or(0);
        println!("soak: Redis store at {} (redis-server pid {pid}), on_outage = {}", r.url(), s.on_outage);
    }
    let names: Vec<&str> = routes.iter().map(|r| r.name).collect();
    let scheme = if s.tls { "HTTPS" } else { "HTTP" };
    println!("soak: routes: {} (proxy listener over {scheme})", names.join(", "));
    let start = Instant::now();
    let until = start + s.duration();
    let rec = Recorder::new(start);
    let per_client = s.rate / (TENANTS * APPS) as f64;
    let clients: Vec<_> = (0..TENANTS * APPS)
        .map(|i| tokio::spawn(traffic::client(i, routes.clone(), per_client, until, rec.clone())))
        .collect();
    let outages = async {
        match redis.as_mut() {
            Some(r) => outage::play(r, &admin, start, until).await,
            None => Vec::new(),
        }
    };
    let (played, mut samples, outages) = tokio::join!(
        faults::play(&emu, &gw, &admin, start, until),
        sample_until(&gw, &admin, start, until, s.sample),
        outages,
    );
    for c in clients {
        let _ = c.await;
    }
    let traffic_ended = start.elapsed().as_secs_f64();
    let residue = settle(&admin).await;
    samples.extend(sample(&gw, &admin, start).await);
    let reloads_refused = r#"quotagate_config_reloads_total{result="refused""#;
    let metrics = admin.metrics().await;
    let refused = metrics.as_ref().map_or(f64::NAN, |m| m.sum(reloads_refused));
    let connects = ["intercepted", "tunnelled", "refused", "failed"].map(|outcome| {
        let series = format!(r#"quotagate_forward_proxy_connects_total{{outcome="{outcome}""#);
        metrics.as_ref().map_or(f64::NAN, |m| m.sum(&series))
    });
    let tally = rec.take();
    let upstream = emu.requests();
    let exit = gw.stop(Duration::from_secs(15));
    if let Some(r) = redis.as_mut() {
        r.kill();
    }
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
        outages,
        connects,
        routes: names,
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
