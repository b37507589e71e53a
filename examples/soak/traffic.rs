//! The soak's clients: mixed metered traffic at over-demand, every answer
//! checked against what the README promises a client sees, and clients that
//! walk away on purpose (while waiting, and while a response streams).
//!
//! Every request ends in exactly one of: an answer (a status and a body that
//! is whole, or cut because the upstream reset mid-body), a deliberate
//! abandonment, or no answer (a transport error before the status line, or
//! the client's own 30 s timeout). The last is what the soak must never see.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

pub const INCIDENTS: &str = "/api/incidents";
pub const HUNT: &str = "/api/advancedhunting/run";
pub const GRAPH_HUNT: &str = "/v1.0/security/runHuntingQuery";
/// Unmetered: the emulator streams exactly N pattern bytes.
const BYTES: &str = "/api/test/bytes";

/// Tenants, and apps per tenant: one client per (tenant, app).
pub const TENANTS: usize = 3;
pub const APPS: usize = 2;
/// A client's patience: past this the request counts as unanswered.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// An unsigned v1.0 token.
pub fn bearer(tenant: &str, app: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"tid":"{tenant}","appid":"{app}","ver":"1.0"}}"#));
    format!("Bearer {header}.{payload}.sig")
}

pub fn tenant(i: usize) -> String {
    format!("tenant-{}", i % TENANTS)
}

pub fn app(i: usize) -> String {
    format!("app-{}", i / TENANTS % APPS)
}

/// A small deterministic generator, so every run offers the same mix.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// One call and what a whole answer to it looks like.
#[derive(Clone, Debug)]
pub enum Call {
    Incidents,
    /// Defender hunting: cost in seconds, padded size, `Stats` first or last.
    Hunt {
        cost: f64,
        bytes: usize,
        stats_first: bool,
    },
    /// Graph hunting (no `Stats`; metered by wall time).
    GraphHunt {
        cost: f64,
    },
    /// Unmetered bytes.
    Bytes(usize),
}

impl Call {
    /// The mix: 45% incidents, 35% Defender hunting (a tenth of it large
    /// results, a fifth with `Stats` last), 12% Graph hunting, 8% unmetered
    /// downloads.
    pub fn draw(rng: &mut Rng) -> Call {
        let cost = rng.pick(&[0.01, 0.02, 0.05, 0.1, 0.2]);
        match rng.next() % 100 {
            0..45 => Call::Incidents,
            45..80 => {
                let large = rng.chance(10);
                Call::Hunt { cost, bytes: if large { 2_000_000 } else { 0 }, stats_first: !rng.chance(20) }
            }
            80..92 => Call::GraphHunt { cost },
            _ => Call::Bytes(rng.pick(&[10_000, 200_000, 1_000_000])),
        }
    }

    pub fn request(&self, http: &reqwest::Client, base: &str, auth: &str) -> reqwest::RequestBuilder {
        let hunt = |path: &str, query: String| {
            http.post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(serde_json::json!({ "Query": query }).to_string())
        };
        let query = |cost: f64, extra: &str| format!("DeviceProcessEvents | take 10 // cost={cost} {extra}");
        let req = match self {
            Call::Incidents => http.get(format!("{base}{INCIDENTS}?$top=10")),
            Call::Hunt { cost, bytes, stats_first } => {
                let stats = if *stats_first { "" } else { "stats=last" };
                hunt(HUNT, query(*cost, &format!("bytes={bytes} {stats}")))
            }
            Call::GraphHunt { cost } => hunt(GRAPH_HUNT, query(*cost, "")),
            Call::Bytes(n) => http.get(format!("{base}{BYTES}/{n}")),
        };
        req.header("authorization", auth).timeout(CLIENT_TIMEOUT)
    }

    /// Whether `body`, complete, is a valid answer with `status` and `headers`.
    pub fn check(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
        let json =
            || serde_json::from_slice::<Value>(body).map_err(|e| format!("{status}: body not JSON: {e}"));
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        match status.as_u16() {
            200 => match self {
                Call::Incidents => {
                    json()?["value"].as_array().map(drop).ok_or("200 incidents without value".into())
                }
                Call::Hunt { bytes, stats_first, .. } => {
                    let v = json()?;
                    if !v["Results"].is_array() || !v["Stats"].is_object() {
                        return Err("200 hunting without Results and Stats".into());
                    }
                    if body.len() < *bytes {
                        return Err(format!("200 hunting of {} bytes, asked for {bytes}", body.len()));
                    }
                    if *stats_first && header("x-quotagate-execution-time").is_none() {
                        return Err("200 hunting with Stats first but no x-quotagate-execution-time".into());
                    }
                    Ok(())
                }
                Call::GraphHunt { .. } => {
                    if !json()?["results"].is_array() {
                        return Err("200 Graph hunting without results".into());
                    }
                    header("x-quotagate-execution-time").map(drop).ok_or("200 Graph hunting unmetered".into())
                }
                Call::Bytes(n) => {
                    let pattern = body.iter().enumerate().all(|(i, b)| usize::from(*b) == i % 251);
                    if body.len() == *n && pattern {
                        Ok(())
                    } else {
                        Err(format!(
                            "200 bytes: {} bytes, asked for {n}, pattern intact {pattern}",
                            body.len()
                        ))
                    }
                }
            },
            429 => {
                let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
                let by = header("x-quotagate-throttled-by");
                let message = json()?["error"]["message"].as_str().map(str::to_string);
                match (retry_after, by.as_deref(), message) {
                    (Some(_), Some("gateway" | "upstream"), Some(_)) => Ok(()),
                    (ra, by, m) => {
                        Err(format!("429 with Retry-After {ra:?}, throttled-by {by:?}, message {m:?}"))
                    }
                }
            }
            502..=504 => {
                json()?["error"]["message"].as_str().map(drop).ok_or(format!("{status} without a message"))
            }
            _ => Err(format!("unexpected status {status}")),
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ending {
    /// A status and a whole, valid body.
    Answered(u16),
    /// A 2xx whose body broke off with an error (the upstream reset mid-body).
    Cut,
    /// A status and a body, but not what the README promises.
    Malformed,
    /// The client gave up on purpose before the status line.
    AbandonedWaiting,
    /// The client dropped the response after its first bytes.
    AbandonedStreaming,
    /// A transport error before the status line, other than by the client.
    NoAnswer,
    /// The client's timeout passed: the request hung.
    Hung,
}

/// Everything the clients saw.
#[derive(Default)]
pub struct Tally {
    pub endings: BTreeMap<Ending, u64>,
    /// Requests sent per second of the run.
    pub sent_per_second: BTreeMap<u64, u64>,
    pub upstream_throttled: u64,
    /// The first few problems of each kind, to print.
    pub samples: Vec<String>,
}

#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    tally: Arc<Mutex<Tally>>,
}

impl Recorder {
    pub fn new(start: Instant) -> Recorder {
        Recorder { start, tally: Arc::default() }
    }

    pub fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap())
    }

    fn sent(&self) {
        let second = self.start.elapsed().as_secs();
        *self.tally.lock().unwrap().sent_per_second.entry(second).or_default() += 1;
    }

    fn ended(&self, ending: Ending, note: Option<String>) {
        let mut t = self.tally.lock().unwrap();
        let n = t.endings.entry(ending).or_default();
        *n += 1;
        if let (Some(note), true) = (note, *n <= 5) {
            let at = self.start.elapsed().as_secs_f64();
            t.samples.push(format!("at {at:.1} s, {ending:?}: {note}"));
        }
    }

    fn upstream_throttled(&self) {
        self.tally.lock().unwrap().upstream_throttled += 1;
    }
}

/// Send `call` and read the whole answer.
pub async fn one(http: reqwest::Client, base: String, auth: String, call: Call, rec: Recorder) {
    rec.sent();
    let response = match call.request(&http, &base, &auth).send().await {
        Ok(r) => r,
        Err(e) => {
            let ending = if e.is_timeout() { Ending::Hung } else { Ending::NoAnswer };
            return rec.ended(ending, Some(format!("{call:?}: {e:#}")));
        }
    };
    if response.headers().get("x-quotagate-throttled-by").is_some_and(|v| v == "upstream") {
        rec.upstream_throttled();
    }
    finish(&call, response, &rec).await;
}

/// Read the rest of an answer whose status line came, and check it.
async fn finish(call: &Call, response: reqwest::Response, rec: &Recorder) {
    let (status, headers) = (response.status(), response.headers().clone());
    match response.bytes().await {
        Ok(body) => match call.check(status, &headers, &body) {
            Ok(()) => rec.ended(Ending::Answered(status.as_u16()), None),
            Err(problem) => rec.ended(Ending::Malformed, Some(format!("{call:?}: {problem}"))),
        },
        Err(e) if e.is_timeout() => {
            rec.ended(Ending::Hung, Some(format!("{call:?}: {status}, then the body: {e:#}")))
        }
        Err(e) if status.is_success() => rec.ended(Ending::Cut, Some(format!("{call:?}: {e:#}"))),
        Err(e) => rec.ended(Ending::Malformed, Some(format!("{call:?}: {status} body broke off: {e:#}"))),
    }
}

/// Send `call` and walk away after `patience` unless the status line came
/// first; then read the answer like [`one`].
pub async fn impatient(
    http: reqwest::Client,
    base: String,
    auth: String,
    call: Call,
    patience: Duration,
    rec: Recorder,
) {
    rec.sent();
    let response = match tokio::time::timeout(patience, call.request(&http, &base, &auth).send()).await {
        Err(_) => return rec.ended(Ending::AbandonedWaiting, None),
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return rec.ended(Ending::NoAnswer, Some(format!("{call:?}: {e:#}"))),
    };
    finish(&call, response, &rec).await;
}

/// Send `call` (a large result) and drop the response after its first
/// chunk; an answer that is not a 200 is read and checked like [`one`].
pub async fn drop_mid_stream(http: reqwest::Client, base: String, auth: String, call: Call, rec: Recorder) {
    rec.sent();
    let mut response = match call.request(&http, &base, &auth).send().await {
        Ok(r) => r,
        Err(e) => {
            let ending = if e.is_timeout() { Ending::Hung } else { Ending::NoAnswer };
            return rec.ended(ending, Some(format!("{call:?}: {e:#}")));
        }
    };
    if response.status() != StatusCode::OK {
        return finish(&call, response, &rec).await;
    }
    match response.chunk().await {
        // The first bytes came: the rest is never read.
        Ok(Some(_)) => rec.ended(Ending::AbandonedStreaming, None),
        Ok(None) => rec.ended(Ending::Malformed, Some(format!("{call:?}: 200 with an empty body"))),
        Err(e) if e.is_timeout() => {
            rec.ended(Ending::Hung, Some(format!("{call:?}: 200, then the first bytes: {e:#}")))
        }
        Err(e) => rec.ended(Ending::Cut, Some(format!("{call:?}: {e:#}"))),
    }
}

/// One client (tenant `i % TENANTS`, its own app): `rate` calls a second
/// until `until`, each in its own task so a queued call holds back no other.
/// Every 20th call gives up after 0.1–1.5 s unless answered by then (most
/// are queued at that point), every 50th drops a large result after its
/// first bytes (a Defender hunting result metered as it streams, or an
/// unmetered download). Returns when every call has ended.
pub async fn client(i: usize, http: reqwest::Client, base: String, rate: f64, until: Instant, rec: Recorder) {
    let auth = bearer(&tenant(i), &app(i));
    let mut rng = Rng::new(i as u64 + 1);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now() + interval.mul_f64(i as f64 / (TENANTS * APPS) as f64);
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        n += 1;
        let (http, base, auth, rec) = (http.clone(), base.clone(), auth.clone(), rec.clone());
        if n % 20 == 0 {
            let call = if rng.chance(50) {
                Call::Incidents
            } else {
                Call::Hunt { cost: 0.2, bytes: 0, stats_first: true }
            };
            let patience = Duration::from_millis(100 + rng.next() % 1400);
            calls.spawn(impatient(http, base, auth, call, patience, rec));
        } else if n % 50 == 25 {
            let call = if rng.chance(50) {
                Call::Hunt { cost: 0.02, bytes: 4_000_000, stats_first: false }
            } else {
                Call::Bytes(8_000_000)
            };
            calls.spawn(drop_mid_stream(http, base, auth, call, rec));
        } else {
            calls.spawn(one(http, base, auth, Call::draw(&mut rng), rec));
        }
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}
