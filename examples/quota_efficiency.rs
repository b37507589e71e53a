//! Quota-efficiency benchmark: how much of the tenant's upstream quota the
//! gateway turns into answered calls, and at what cost to clients, against two
//! references run in the same process on the same machine.
//!
//! N clients (10 by default) share one tenant and app and offer F times (5 by
//! default) the call quota, half incident listings and half hunting queries
//! whose cost the client cannot predict. Each hunting query is one of five
//! texts, as scheduled detections are, whose cost varies from run to run
//! within its range (5–10, 10–20, 25–50, 50–100 and 100–200 ms), or with
//! probability `--adhoc` (0.2) an ad hoc text never sent before, its cost
//! drawn from one of those ranges at random. The
//! upstream is the test emulator with the built-in profile's shape, scaled: a
//! "minute" of 1 s and an "hour" of 12 s (`--hour-secs`), 10 calls per minute
//! and 60 per hour for each API, and 2 s of hunting running time per hour
//! (10 minutes in 60, scaled). Four modes, one after the other, each for H
//! scaled hours (3 by default):
//!
//! - `gateway`: clients -> quotagate (queue, `max_wait` 2 s) -> emulator;
//! - `gateway-key`: the same with `estimate_by = "key"`: every query
//!   reserves the tenant's estimate, not its own text's;
//! - `direct`: clients -> emulator, with a Graph-SDK-style retry loop;
//! - `nginx`: clients -> nginx `limit_req` at the hour's average rate (5 r/s
//!   per API, burst 10 delayed, 429 on overflow) -> emulator.
//!
//! Every client handles a 429 like the Graph SDKs: sleep `Retry-After` (or,
//! without one, 0.25 s doubling) and retry up to 3 times, then give up.
//!
//! Per scaled hour it prints: the share of each call quota the upstream
//! accepted, the share of the running-time budget charged, upstream 429s,
//! 429s the clients saw, calls they gave up on, answered calls, and the
//! latency of answered calls (including queueing and retry sleeps).
//!
//! `--modes gateway,gateway-key,direct,nginx` picks the modes (all four by
//! default).
//! `--probe MS` samples the gateway's running-time ledger (`/quota`) every MS
//! milliseconds and prints, per scaled hour, where the budget was: charged,
//! reserved for queries in flight, or free, and whether a query was waiting
//! while it was free; then the metered costs' distribution and the upstream
//! 429s by cause. `--percentile P` sets the gateway's `estimate_percentile`.
//! `--costs C,C,...` replaces the hunting texts' costs (in scaled seconds,
//! each `S` or a range `A..B`; by default
//! 0.005..0.01,0.01..0.02,0.025..0.05,0.05..0.1,0.1..0.2, the largest a
//! tenth of the budget). `--adhoc P` sets the share of ad hoc texts.
//!
//! Run with `bench/quota-efficiency.sh` (it passes arguments through; it
//! builds the release gateway, which runs as a process of its own). What
//! this does not measure: proxy throughput or overhead (see
//! `docs/benchmarks.md`); the clients and the emulator share one process,
//! and everything shares two cores.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

// The integration tests' emulator, their gateway config text and their
// gateway child process; `emulator` finds `hunt` as its `super::hunt`.
#[allow(dead_code)]
#[path = "../tests/support/emulator.rs"]
mod emulator;
#[allow(dead_code)]
#[path = "../tests/support/gateway.rs"]
mod gateway;
#[allow(dead_code)]
#[path = "../tests/support/hunt.rs"]
mod hunt;
#[allow(dead_code)]
#[path = "../tests/support/process.rs"]
mod process;

use emulator::{Emulator, EmulatorConfig, QuotaRule};
use process::GatewayProcess;

const INCIDENTS: &str = "/api/incidents";
const HUNT: &str = "/api/advancedhunting/run";
const PER_MINUTE: u32 = 10;
const PER_HOUR: u32 = 60;
/// Running time per hour, as a share of the hour (10 minutes in 60).
const RUNTIME_SHARE: f64 = 1.0 / 6.0;
const TENANT: &str = "tenant-bench";
/// The gateway's guard: 0.4% of the scaled hour, 5% of the scaled minute.
const GUARD: Duration = Duration::from_millis(50);

#[derive(Clone, Copy)]
struct Settings {
    clients: usize,
    factor: f64,
    hours: u32,
    hour: Duration,
    /// The hunting texts' costs in seconds (`S` or `A..B`), one text drawn
    /// at random per query.
    costs: &'static [String],
    /// The share of hunting queries whose text was never sent before.
    adhoc: f64,
}

/// Which modes run, in order, and how often the gateway's running-time
/// ledger is sampled (`--probe MS`, gateway mode only).
struct Plan {
    modes: Vec<String>,
    probe: Option<Duration>,
    /// The gateway's `[hunting] estimate_percentile`, when not the default.
    percentile: Option<u8>,
}

impl Settings {
    fn minute(&self) -> Duration {
        self.hour / 12
    }

    fn runtime_budget(&self) -> Duration {
        self.hour.mul_f64(RUNTIME_SHARE)
    }

    fn from_args() -> (Settings, Plan) {
        let mut s = Settings {
            clients: 10,
            factor: 5.0,
            hours: 3,
            hour: Duration::from_secs(12),
            costs: Box::leak(
                ["0.005..0.01", "0.01..0.02", "0.025..0.05", "0.05..0.1", "0.1..0.2"]
                    .map(String::from)
                    .into(),
            ),
            adhoc: 0.2,
        };
        let mut plan = Plan {
            modes: vec!["gateway".into(), "gateway-key".into(), "direct".into(), "nginx".into()],
            probe: None,
            percentile: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        for pair in args.chunks(2) {
            let value = pair.get(1).map(String::as_str).unwrap_or("");
            match pair[0].as_str() {
                "--clients" => s.clients = value.parse().expect("--clients N"),
                "--factor" => s.factor = value.parse().expect("--factor F"),
                "--hours" => s.hours = value.parse().expect("--hours H"),
                "--hour-secs" => s.hour = Duration::from_secs_f64(value.parse().expect("--hour-secs S")),
                "--modes" => plan.modes = value.split(',').map(str::to_string).collect(),
                "--probe" => plan.probe = Some(Duration::from_millis(value.parse().expect("--probe MS"))),
                "--percentile" => plan.percentile = Some(value.parse().expect("--percentile P")),
                "--costs" => {
                    let costs: Vec<String> = value.split(',').map(str::to_string).collect();
                    for c in &costs {
                        let ok = match c.split_once("..") {
                            Some((a, b)) => a.parse::<f64>().is_ok() && b.parse::<f64>().is_ok(),
                            None => c.parse::<f64>().is_ok(),
                        };
                        assert!(ok, "--costs C,C,...: `{c}` is not S or A..B");
                    }
                    s.costs = Box::leak(costs.into_boxed_slice());
                }
                "--adhoc" => s.adhoc = value.parse().expect("--adhoc P"),
                other => panic!(
                    "unknown argument {other}: --clients N --factor F --hours H --hour-secs S --modes gateway,gateway-key,direct,nginx --probe MS --percentile P --costs C,C,... --adhoc P"
                ),
            }
        }
        (s, plan)
    }
}

/// An unsigned v1.0 token for the benchmark's tenant and app.
fn bearer() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"tid":"{TENANT}","appid":"soc-app","ver":"1.0"}}"#));
    format!("Bearer {header}.{payload}.sig")
}

/// A tiny deterministic generator: the same mix in every mode.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What a client saw.
#[derive(Default)]
struct Seen {
    /// (answered at, latency from first attempt) per answered call.
    answered: Vec<(Instant, Duration)>,
    /// Times a client was answered 429.
    throttled: Vec<Instant>,
    /// Times a client gave up on a call (4 attempts, or another error).
    gave_up: Vec<Instant>,
    /// Times a call was offered (its first attempt).
    offered: Vec<Instant>,
    /// Calls still unanswered when the run ended (sleeping before a retry, or queued).
    unfinished: usize,
}

/// One client: offers its calls on a fixed schedule, each call in its own
/// task, so a hunting query held back does not hold back its incident calls.
async fn client_loop(base: String, id: u64, s: Settings, until: Instant, seen: Arc<Mutex<Seen>>) {
    let http = reqwest::Client::builder().pool_max_idle_per_host(16).build().expect("client");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id + 1) * 0x1234_5678));
    // Offered rate: factor × (both APIs' hourly quota), spread over the clients.
    let quota_rate = 2.0 * f64::from(PER_HOUR) / s.hour.as_secs_f64();
    let interval = Duration::from_secs_f64(s.clients as f64 / (s.factor * quota_rate));
    let mut next = Instant::now() + interval.mul_f64((id as f64) / s.clients as f64);
    let mut calls = Vec::new();
    let mut adhoc = 0u64;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let hunt = rng.next() % 2 == 0;
        let i = (rng.next() % s.costs.len() as u64) as usize;
        let text = if ((rng.next() % 1_000_000) as f64) < s.adhoc * 1e6 {
            adhoc += 1;
            format!("DeviceProcessEvents | take 10 // ad hoc {id}-{adhoc} cost={}", s.costs[i])
        } else {
            format!("DeviceProcessEvents | take 10 // detection {i} cost={}", s.costs[i])
        };
        calls.push(tokio::spawn(one_call(
            http.clone(),
            base.clone(),
            hunt,
            text,
            until + s.hour,
            seen.clone(),
        )));
    }
    for c in calls {
        let _ = c.await;
    }
}

/// One call with the Graph SDKs' retry policy: on 429 sleep `Retry-After`
/// (else 0.25 s doubling) and retry up to 3 times.
async fn one_call(
    http: reqwest::Client,
    base: String,
    hunt: bool,
    query: String,
    end: Instant,
    seen: Arc<Mutex<Seen>>,
) {
    let auth = bearer();
    let started = Instant::now();
    seen.lock().unwrap().offered.push(started);
    let mut attempt = 0u32;
    loop {
        let req = if hunt {
            http.post(format!("{base}{HUNT}")).body(serde_json::json!({ "Query": query }).to_string())
        } else {
            http.get(format!("{base}{INCIDENTS}?$top=100"))
        };
        let r = req.header("authorization", &auth).header("content-type", "application/json").send().await;
        let Ok(r) = r else {
            seen.lock().unwrap().gave_up.push(Instant::now());
            return;
        };
        let status = r.status().as_u16();
        let retry_after =
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok());
        let _ = r.bytes().await;
        let at = Instant::now();
        if status == 200 {
            seen.lock().unwrap().answered.push((at, at - started));
            return;
        }
        let give_up = status != 429 || attempt == 3;
        {
            let mut seen = seen.lock().unwrap();
            if status == 429 {
                seen.throttled.push(at);
            }
            if give_up {
                seen.gave_up.push(at);
            }
        }
        let delay = Duration::from_secs_f64(retry_after.unwrap_or(0.25 * f64::from(1u32 << attempt)));
        if give_up {
            return;
        }
        if at + delay >= end {
            return; // the run is over before the retry would go: unfinished
        }
        attempt += 1;
        tokio::time::sleep(delay).await;
    }
}

fn emulator_config(s: &Settings) -> EmulatorConfig {
    let windows = [(PER_MINUTE, s.minute()), (PER_HOUR, s.hour)];
    EmulatorConfig::new()
        .quota(QuotaRule::new("incidents", &[INCIDENTS], &windows))
        .quota(QuotaRule::new("hunting", &[HUNT], &windows))
        .running_time(s.runtime_budget(), s.hour)
}

fn gateway_rest(s: &Settings, percentile: Option<u8>, estimate_by: &str) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let (minute, hour, budget) = (ms(s.minute()), ms(s.hour), ms(s.runtime_budget()));
    let percentile = percentile.map_or(String::new(), |p| format!("estimate_percentile = {p}"));
    format!(
        r#"
[hunting]
budgets = [{{ limit = "{budget}", per = "{hour}" }}]
estimate = "100ms"
estimate_by = "{estimate_by}"
{percentile}

[[policy]]
name = "incidents"
paths = ["{INCIDENTS}", "{INCIDENTS}/**"]
windows = [{{ limit = {PER_MINUTE}, per = "{minute}" }}, {{ limit = {PER_HOUR}, per = "{hour}" }}]
mode = "queue"
max_wait = "2s"

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["{HUNT}"]
windows = [{{ limit = {PER_MINUTE}, per = "{minute}" }}, {{ limit = {PER_HOUR}, per = "{hour}" }}]
hunting = true
mode = "queue"
max_wait = "2s"
"#
    )
}

/// nginx with `limit_req` per Authorization at the hour's average rate.
fn start_nginx(dir: &Path, upstream: &str, port: u16, s: &Settings) -> Child {
    let per_minute = (f64::from(PER_HOUR) * 60.0 / s.hour.as_secs_f64()).round() as u64;
    let zone =
        |name: &str| format!("limit_req_zone $http_authorization zone={name}:1m rate={per_minute}r/m;");
    let conf = format!(
        r#"worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {inc}
  {hunt}
  limit_req_status 429;
  upstream emulator {{ server {upstream}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location /api/incidents {{
      limit_req zone=incidents burst={PER_MINUTE};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://emulator;
    }}
    location /api/advancedhunting/ {{
      limit_req zone=hunting burst={PER_MINUTE};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://emulator;
    }}
  }}
}}
"#,
        dir = dir.display(),
        inc = zone("incidents"),
        hunt = zone("hunting"),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx starts (apt-get install nginx)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// One mode's run: clients against `base` for the configured hours.
async fn drive(base: &str, s: Settings) -> (Instant, Seen) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let start = Instant::now();
    let until = start + s.hour * s.hours;
    let tasks: Vec<_> = (0..s.clients as u64)
        .map(|id| tokio::spawn(client_loop(base.to_string(), id, s, until, seen.clone())))
        .collect();
    for t in tasks {
        // A client still waiting after the last hour is not counted further.
        let _ = tokio::time::timeout_at((until + s.hour).into(), t).await;
    }
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    // Neither answered nor given up: queued, or sleeping before a retry.
    seen.unfinished = seen.offered.len().saturating_sub(seen.answered.len() + seen.gave_up.len());
    (start, seen)
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The gateway's own count of queries that cost more than their estimate:
/// (queries, seconds beyond, seconds charged), from its `/metrics`.
async fn estimate_overruns(admin: &str) -> (f64, f64, f64) {
    let text =
        reqwest::get(format!("{admin}/metrics")).await.expect("metrics").text().await.expect("metrics text");
    let value = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("policy=\"hunting\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        value("quotagate_hunting_overruns_total"),
        value("quotagate_hunting_overrun_seconds_total"),
        value("quotagate_hunting_charged_seconds_total"),
    )
}

fn report(mode: &str, emu: &Emulator, start: Instant, seen: &Seen, s: &Settings) {
    let requests = emu.requests();
    let charges = emu.charges(TENANT);
    for h in 0..s.hours {
        let from = start + s.hour * h;
        let to = from + s.hour;
        let inside = |t: Instant| t >= from && t < to;
        let accepted = |prefix: &str| {
            requests
                .iter()
                .filter(|r| inside(r.at) && r.status == 200 && r.path_and_query.starts_with(prefix))
                .count()
        };
        let upstream_429 = requests.iter().filter(|r| inside(r.at) && r.status == 429).count();
        let runtime = charges.between(from, to).as_secs_f64() / s.runtime_budget().as_secs_f64();
        let answered: Vec<Duration> =
            seen.answered.iter().filter(|(t, _)| inside(*t)).map(|(_, d)| *d).collect();
        let mean = if answered.is_empty() {
            0.0
        } else {
            answered.iter().map(Duration::as_secs_f64).sum::<f64>() / answered.len() as f64
        };
        println!(
            "| {mode} | {h} | {} | {:.0}% | {:.0}% | {:.1}% | {upstream_429} | {} | {} | {} | {:.2} s | {:.2} s |",
            seen.offered.iter().filter(|t| inside(**t)).count(),
            100.0 * accepted(INCIDENTS) as f64 / f64::from(PER_HOUR),
            100.0 * accepted(HUNT) as f64 / f64::from(PER_HOUR),
            100.0 * runtime,
            seen.throttled.iter().filter(|t| inside(**t)).count(),
            seen.gave_up.iter().filter(|t| inside(**t)).count(),
            answered.len(),
            mean,
            percentile(answered, 0.95).as_secs_f64(),
        );
    }
    let upstream_429 = requests.iter().filter(|r| r.status == 429).count();
    println!(
        "| {mode} | all | {} | | | max {:.2}% in any hour | {upstream_429} | {} | {} | {} (+{} unfinished at the end) | | |",
        seen.offered.len(),
        100.0 * charges.max_in_any(s.hour).as_secs_f64() / s.runtime_budget().as_secs_f64(),
        seen.throttled.len(),
        seen.gave_up.len(),
        seen.answered.len(),
        seen.unfinished,
    );
}

/// One reading of the gateway's running-time ledger for the benchmark's tenant.
struct Sample {
    at: Instant,
    /// Metered running time counted in the window, in seconds.
    charged: f64,
    /// Estimates of queries in flight, in seconds.
    reserved: f64,
    in_flight: u64,
    queued: u64,
    /// What the next query would reserve, in seconds.
    estimate: f64,
}

/// Read `/quota` every `every` until `until`.
async fn probe(admin: String, every: Duration, until: Instant) -> Vec<Sample> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        let Ok(r) = http.get(format!("{admin}/quota")).send().await else { continue };
        let Ok(v) = r.json::<serde_json::Value>().await else { continue };
        let at = Instant::now();
        let Some(k) = v["running_time"].as_array().and_then(|a| a.iter().find(|k| k["tenant"] == TENANT))
        else {
            continue;
        };
        let b = &k["budgets"][0];
        out.push(Sample {
            at,
            charged: b["charged_seconds"].as_f64().unwrap_or(0.0),
            reserved: b["reserved_seconds"].as_f64().unwrap_or(0.0),
            in_flight: k["in_flight"].as_u64().unwrap_or(0),
            queued: k["queued"].as_u64().unwrap_or(0),
            estimate: k["estimate_seconds"].as_f64().unwrap_or(0.0),
        });
    }
    out
}

/// Where each hour's running time went, from the probe's samples (each
/// weighs the same): the budget's share charged, reserved and free; how
/// often a query was queued, and how often one was queued while the free
/// room held the estimate (a query that should have started).
fn report_probe(
    samples: &[Sample],
    charges: &emulator::Charges,
    refused: (usize, usize, usize),
    start: Instant,
    s: &Settings,
) {
    let budget = s.runtime_budget().as_secs_f64();
    let costs: Vec<f64> = charges.0.iter().map(|(_, c)| c.as_secs_f64()).collect();
    let mean_cost = costs.iter().sum::<f64>() / costs.len().max(1) as f64;
    println!();
    println!("| Hour | Samples | Charged | Reserved | In flight (mean) | Free | Free, queue waiting | Queue empty | Queued, estimate fits | Estimate | Upstream level at the samples |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for h in 0..s.hours {
        let from = start + s.hour * h;
        let to = from + s.hour;
        let in_hour: Vec<&Sample> = samples.iter().filter(|x| x.at >= from && x.at < to).collect();
        let n = in_hour.len().max(1) as f64;
        let pct = |f: &dyn Fn(&Sample) -> f64| 100.0 * in_hour.iter().map(|x| f(x)).sum::<f64>() / n / budget;
        let share = |f: &dyn Fn(&Sample) -> bool| 100.0 * in_hour.iter().filter(|x| f(x)).count() as f64 / n;
        let free = |x: &Sample| (budget - x.charged - x.reserved).max(0.0);
        let waiting: Vec<&&Sample> = in_hour.iter().filter(|x| x.queued > 0).collect();
        let free_waiting =
            100.0 * waiting.iter().map(|x| free(x)).sum::<f64>() / waiting.len().max(1) as f64 / budget;
        // The upstream's own trailing-hour level at the sample times.
        let level = 100.0
            * in_hour.iter().map(|x| charges.in_window(x.at, s.hour).as_secs_f64()).sum::<f64>()
            / n
            / budget;
        println!(
            "| {h} | {} | {:.1}% | {:.1}% | {:.2} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.0} ms | {:.1}% |",
            in_hour.len(),
            pct(&|x| x.charged),
            pct(&|x| x.reserved),
            in_hour.iter().map(|x| x.in_flight as f64).sum::<f64>() / n,
            pct(&free),
            free_waiting,
            share(&|x| x.queued == 0),
            share(&|x| x.queued > 0 && free(x) + 1e-9 >= x.estimate),
            1000.0 * in_hour.iter().map(|x| x.estimate).sum::<f64>() / n,
            level,
        );
    }
    println!();
    println!(
        "Upstream 429s: {} on incidents; on hunting {} for the call rate, {} for running time",
        refused.0, refused.1, refused.2
    );
    let mut sorted = costs.clone();
    sorted.sort_by(f64::total_cmp);
    let q =
        |p: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0);
    println!();
    println!(
        "Metered costs: {} queries, mean {:.0} ms, p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        costs.len(),
        1000.0 * mean_cost,
        1000.0 * q(0.5),
        1000.0 * q(0.95),
        1000.0 * q(1.0),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (s, plan) = Settings::from_args();
    println!(
        "{} clients, {}x the call quota, {} scaled hours of {:?} (minute {:?}); per API {PER_MINUTE}/minute and {PER_HOUR}/hour; running time {:?}/hour",
        s.clients,
        s.factor,
        s.hours,
        s.hour,
        s.minute(),
        s.runtime_budget()
    );
    println!();
    println!("| Mode | Hour | Calls offered | Incident calls used | Hunting calls used | Running time used | Upstream 429s | Client 429s | Gave up | Answered | Mean latency | p95 latency |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut probed = None;
    let mut overruns = Vec::new();
    for mode in &plan.modes {
        match mode.as_str() {
            // The gateway.
            "gateway" | "gateway-key" => {
                let estimate_by = if mode == "gateway" { "query" } else { "key" };
                let emu = Emulator::start(emulator_config(&s)).await;
                // The release binary in a process of its own, as deployed
                // ($QUOTAGATE_BIN, which the script builds). The guard covers
                // the time from admission to the upstream's count; the
                // clients and the emulator share one process on a busy
                // machine, so 5 ms is too little.
                let text = gateway::config_text(&emu.url(), &gateway_rest(&s, plan.percentile, estimate_by))
                    .replace("guard = \"5ms\"", &format!("guard = \"{}ms\"", GUARD.as_millis()));
                let dir = tempfile::tempdir().expect("tempdir");
                let config = dir.path().join("quotagate.toml");
                std::fs::write(&config, text).expect("write the gateway's config");
                let gw = GatewayProcess::start(&config, dir.path())
                    .unwrap_or_else(|e| panic!("the gateway did not start: {e}"));
                let sampler = plan.probe.map(|every| {
                    let until = Instant::now() + s.hour * s.hours;
                    tokio::spawn(probe(format!("http://{}", gw.admin), every, until))
                });
                let (start, seen) = drive(&format!("http://{}", gw.proxy), s).await;
                report(mode, &emu, start, &seen, &s);
                overruns.push((mode.clone(), estimate_overruns(&format!("http://{}", gw.admin)).await));
                if let Some(sampler) = sampler {
                    let requests = emu.requests();
                    // A hunting call its call rule admitted and still refused: running time.
                    let refused = |p: &str, admitted: bool| {
                        requests
                            .iter()
                            .filter(|r| {
                                r.status == 429 && r.path_and_query.starts_with(p) && r.admitted == admitted
                            })
                            .count()
                    };
                    let refused = (refused(INCIDENTS, false), refused(HUNT, false), refused(HUNT, true));
                    probed = Some((mode, sampler.await.expect("probe"), emu.charges(TENANT), refused, start));
                }
                drop(gw);
            }
            // Direct, with the SDK-style retry loop.
            "direct" => {
                let emu = Emulator::start(emulator_config(&s)).await;
                let (start, seen) = drive(&emu.url(), s).await;
                report("direct", &emu, start, &seen, &s);
            }
            // nginx limit_req.
            "nginx" => {
                let emu = Emulator::start(emulator_config(&s)).await;
                let dir = tempfile::tempdir().expect("tempdir");
                let port = free_port();
                let mut nginx = start_nginx(dir.path(), &emu.addr().to_string(), port, &s);
                wait_for_port(port).await;
                let (start, seen) = drive(&format!("http://127.0.0.1:{port}"), s).await;
                report("nginx", &emu, start, &seen, &s);
                // SIGTERM, not SIGKILL: the master then stops its worker too.
                let _ = Command::new("kill").arg("-TERM").arg(nginx.id().to_string()).status();
                let _ = nginx.wait();
            }
            other => panic!("unknown mode {other}: gateway, gateway-key, direct or nginx"),
        }
    }
    for (mode, (queries, seconds, charged)) in overruns {
        println!(
            "\n`{mode}`: {queries} hunting queries cost more than they reserved, {:.0} ms beyond in all ({:.2}% of the {:.2} s charged)",
            1000.0 * seconds,
            100.0 * seconds / charged.max(f64::MIN_POSITIVE),
            charged
        );
    }
    if let Some((mode, samples, charges, refused, start)) = probed {
        println!();
        println!("Probe of the `{mode}` run (the last gateway mode):");
        report_probe(&samples, &charges, refused, start, &s);
    }
}
