//! The soak's clients: mixed metered traffic at over-demand, every answer
//! checked against what the README promises a client sees, and clients that
//! walk away on purpose (while waiting, and while a response streams).
//!
//! Every request ends in exactly one of: an answer (a status and a body that
//! is whole, or cut because the upstream reset mid-body), a deliberate
//! abandonment, or no answer (a transport error before the status line, or
//! the client's own 30 s timeout). The last is what the soak must never see.
//!
//! A call goes by one of two [`Route`]s: to the proxy listener's address
//! (base-URL mode, over HTTPS with `--tls`), or, with `--forward-proxy`, to
//! the Microsoft hosts through the forward proxy, as a script with
//! `HTTPS_PROXY` and the local CA trusted sends it.

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

/// Where a client sends its calls, and through which HTTP client.
#[derive(Clone)]
pub struct Route {
    pub name: &'static str,
    http: reqwest::Client,
    /// Where Defender paths (and unmetered downloads) go.
    defender: String,
    /// Where Graph paths go.
    graph: String,
}

impl Route {
    /// Base-URL mode: every path to the proxy listener at `base`.
    pub fn base_url(http: reqwest::Client, base: String) -> Route {
        Route { name: "base URL", http, defender: base.clone(), graph: base }
    }

    /// Through the forward proxy: `https://api.security.microsoft.com` and
    /// `https://graph.microsoft.com`, with `http` sending `CONNECT` to the
    /// proxy and trusting its local CA.
    pub fn forward_proxy(http: reqwest::Client) -> Route {
        Route {
            name: "forward proxy",
            http,
            defender: format!("https://{}", crate::gateway::DEFENDER_HOST),
            graph: format!("https://{}", crate::gateway::GRAPH_HOST),
        }
    }
}

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

    pub fn request(&self, route: &Route, auth: &str) -> reqwest::RequestBuilder {
        let (http, base) = (&route.http, &route.defender);
        let hunt = |url: String, query: String| {
            http.post(url)
                .header("content-type", "application/json")
                .body(serde_json::json!({ "Query": query }).to_string())
        };
        let query = |cost: f64, extra: &str| format!("DeviceProcessEvents | take 10 // cost={cost} {extra}");
        let req = match self {
            Call::Incidents => http.get(format!("{base}{INCIDENTS}?$top=10")),
            Call::Hunt { cost, bytes, stats_first } => {
                let stats = if *stats_first { "" } else { "stats=last" };
                hunt(format!("{base}{HUNT}"), query(*cost, &format!("bytes={bytes} {stats}")))
            }
            Call::GraphHunt { cost } => hunt(format!("{}{GRAPH_HUNT}", route.graph), query(*cost, "")),
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
            503 => {
                // The quota store is unavailable (a Redis outage failing closed).
                json()?["error"]["message"].as_str().ok_or("503 without a message")?;
                let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
                retry_after.map(drop).ok_or("503 without a Retry-After in seconds".into())
            }
            502 | 504 => {
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
    /// The same, per route.
    pub by_route: BTreeMap<(&'static str, Ending), u64>,
    /// When each 503 (quota store unavailable) was answered, in seconds
    /// since the start.
    pub unavailable: Vec<f64>,
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
    /// The route of the calls recorded through this copy.
    route: &'static str,
}

impl Recorder {
    pub fn new(start: Instant) -> Recorder {
        Recorder { start, tally: Arc::default(), route: "" }
    }

    /// This recorder, for calls sent by `route`.
    pub fn via(&self, route: &Route) -> Recorder {
        Recorder { route: route.name, ..self.clone() }
    }

    pub fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap())
    }

    fn sent(&self) {
        let second = self.start.elapsed().as_secs();
        *self.tally.lock().unwrap().sent_per_second.entry(second).or_default() += 1;
    }

    fn ended(&self, ending: Ending, note: Option<String>) {
        let at = self.start.elapsed().as_secs_f64();
        let mut t = self.tally.lock().unwrap();
        *t.by_route.entry((self.route, ending)).or_default() += 1;
        if ending == Ending::Answered(503) {
            t.unavailable.push(at);
        }
        let n = t.endings.entry(ending).or_default();
        *n += 1;
        if let (Some(note), true) = (note, *n <= 5) {
            let route = self.route;
            t.samples.push(format!("at {at:.1} s, {ending:?} ({route}): {note}"));
        }
    }

    fn upstream_throttled(&self) {
        self.tally.lock().unwrap().upstream_throttled += 1;
    }
}

/// Send `call` and read the whole answer.
pub async fn one(route: Route, auth: String, call: Call, rec: Recorder) {
    rec.sent();
    let response = match call.request(&route, &auth).send().await {
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
pub async fn impatient(route: Route, auth: String, call: Call, patience: Duration, rec: Recorder) {
    rec.sent();
    let response = match tokio::time::timeout(patience, call.request(&route, &auth).send()).await {
        Err(_) => return rec.ended(Ending::AbandonedWaiting, None),
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return rec.ended(Ending::NoAnswer, Some(format!("{call:?}: {e:#}"))),
    };
    finish(&call, response, &rec).await;
}

/// Send `call` (a large result) and drop the response after its first
/// chunk; an answer that is not a 200 is read and checked like [`one`].
pub async fn drop_mid_stream(route: Route, auth: String, call: Call, rec: Recorder) {
    rec.sent();
    let mut response = match call.request(&route, &auth).send().await {
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
/// unmetered download). With a second route (the forward proxy), every
/// third call goes by it. Returns when every call has ended.
pub async fn client(i: usize, routes: Vec<Route>, rate: f64, until: Instant, rec: Recorder) {
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
        let route = routes[if n % 3 == 1 { routes.len() - 1 } else { 0 }].clone();
        let (auth, rec) = (auth.clone(), rec.via(&route));
        if n % 20 == 0 {
            let call = if rng.chance(50) {
                Call::Incidents
            } else {
                Call::Hunt { cost: 0.2, bytes: 0, stats_first: true }
            };
            let patience = Duration::from_millis(100 + rng.next() % 1400);
            calls.spawn(impatient(route, auth, call, patience, rec));
        } else if n % 50 == 25 {
            let call = if rng.chance(50) {
                Call::Hunt { cost: 0.02, bytes: 4_000_000, stats_first: false }
            } else {
                Call::Bytes(8_000_000)
            };
            calls.spawn(drop_mid_stream(route, auth, call, rec));
        } else {
            calls.spawn(one(route, auth, Call::draw(&mut rng), rec));
        }
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}
