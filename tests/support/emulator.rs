//! An in-process emulator of the upstream Defender XDR / Defender for Endpoint / Graph security
//! APIs, for integration tests. It is written independently of the `quotagate` crate.
//!
//! What it does:
//! - serves plain HTTP on `127.0.0.1:<random port>` until the [`Emulator`] is dropped;
//! - reads tenant and app from the bearer token's payload (`tid`; `appid`, or `azp` for `ver` 2.0)
//!   without verifying the signature, and answers 401 on a metered path without a usable token;
//! - meters requests against configured [`QuotaRule`]s with a strict sliding window by arrival
//!   time (the decision is taken when the request head arrives; throttled calls are not counted)
//!   and answers 429 with the exact Defender or Graph body and `Retry-After`;
//! - answers canned success bodies (hunting, incidents, `{"value":[]}`) and offers test
//!   endpoints under `/api/test/` (and `/v1.0/test/`): `status/{code}`, `bytes/{n}`, `gzip`,
//!   `echo`, `slow/{ms}`;
//! - records every request it receives, with the status it answered.
//!
//! What it does not do: TLS, signature or audience checks, KQL, OData query options, running-time
//! (CPU) budgets, or Graph's habit of counting calls made while throttled.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// What a quota counts per.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyScope {
    /// `Destination+TenantID+AppID`, as the service names it.
    #[default]
    TenantApp,
    /// Destination and tenant only.
    Tenant,
}

/// A call quota: requests whose method and path match are limited in every window at once.
#[derive(Clone, Debug)]
pub struct QuotaRule {
    pub name: String,
    /// Empty means any method.
    pub methods: Vec<Method>,
    /// Case-insensitive prefixes of the path.
    pub path_prefixes: Vec<String>,
    /// `(limit, window length)` pairs.
    pub windows: Vec<(u32, Duration)>,
    pub key: KeyScope,
}

impl QuotaRule {
    pub fn new(name: &str, path_prefixes: &[&str], windows: &[(u32, Duration)]) -> Self {
        QuotaRule {
            name: name.to_string(),
            methods: Vec::new(),
            path_prefixes: path_prefixes.iter().map(|p| p.to_string()).collect(),
            windows: windows.to_vec(),
            key: KeyScope::TenantApp,
        }
    }

    pub fn methods(mut self, m: &[Method]) -> Self {
        self.methods = m.to_vec();
        self
    }

    pub fn key(mut self, k: KeyScope) -> Self {
        self.key = k;
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        let path = path.to_ascii_lowercase();
        (self.methods.is_empty() || self.methods.contains(method))
            && self.path_prefixes.iter().any(|p| path.starts_with(&p.to_ascii_lowercase()))
    }
}

#[derive(Clone, Debug, Default)]
pub struct EmulatorConfig {
    pub quotas: Vec<QuotaRule>,
}

impl EmulatorConfig {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn quota(mut self, r: QuotaRule) -> Self {
        self.quotas.push(r);
        self
    }
}

/// One request as the emulator received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub at: Instant,
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub tenant: Option<String>,
    pub app: Option<String>,
    /// The first quota rule the request matched, if any.
    pub rule: Option<String>,
    pub status: u16,
    /// True when `rule` is set and the rule admitted (counted) the request.
    pub admitted: bool,
}

#[derive(Default)]
struct Inner {
    seen: Vec<SeenRequest>,
    /// Accepted arrival times per quota key, oldest first.
    arrivals: HashMap<String, VecDeque<Instant>>,
}

struct Shared {
    cfg: EmulatorConfig,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running emulator; the server stops when this is dropped.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Emulator {
    pub async fn start(cfg: EmulatorConfig) -> Emulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind emulator");
        let addr = listener.local_addr().expect("emulator address");
        let shared = Arc::new(Shared { cfg, inner: Mutex::new(Inner::default()) });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Emulator { addr, shared, shutdown: Some(tx) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.lock().seen.clone()
    }

    pub fn count(&self) -> usize {
        self.shared.lock().seen.len()
    }

    /// Number of 429 answers sent (quota or `/test/status/429`).
    pub fn throttled(&self) -> usize {
        self.shared.lock().seen.iter().filter(|r| r.status == 429).count()
    }

    /// Requests the rule admitted.
    pub fn accepted(&self, rule: &str) -> usize {
        self.admitted_by(rule).len()
    }

    /// Arrival times of the requests the rule admitted for a tenant (any app), in order.
    pub fn accepted_times(&self, rule: &str, tenant: &str) -> Vec<Instant> {
        self.admitted_by(rule).iter().filter(|r| r.tenant.as_deref() == Some(tenant)).map(|r| r.at).collect()
    }

    fn admitted_by(&self, rule: &str) -> Vec<SeenRequest> {
        let inner = self.shared.lock();
        inner.seen.iter().filter(|r| r.admitted && r.rule.as_deref() == Some(rule)).cloned().collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The exact bytes `/api/test/bytes/{n}` sends (period 251, so chunk seams show).
pub fn bytes_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// The JSON document that [`gzip_payload`] compresses.
pub const GZIP_PLAIN: &str =
    r#"{"value":[{"id":"gzip-1","title":"compressed"},{"id":"gzip-2","title":"compressed"}]}"#;

/// The exact gzip-compressed bytes `/api/test/gzip` sends.
pub fn gzip_payload() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(GZIP_PLAIN.as_bytes()).expect("gzip");
    enc.finish().expect("gzip")
}

/// The largest number of `times` inside any half-open interval `[s, s + window)`.
pub fn max_in_any_interval(times: &[Instant], window: Duration) -> usize {
    let mut t = times.to_vec();
    t.sort();
    let (mut best, mut j) = (0, 0);
    for i in 0..t.len() {
        j = j.max(i);
        while j < t.len() && t[j].duration_since(t[i]) < window {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

const DEFENDER_HUNT: &str = r#"{"Stats":{"ExecutionTime":0.01,"resource_usage":{"cache":{"memory":{"hits":1,"misses":0,"total":1},"disk":{"hits":0,"misses":0,"total":0}},"cpu":{"user":"00:00:00.0100000","kernel":"00:00:00","total cpu":"00:00:00.0100000"},"memory":{"peak_per_node":1024}},"dataset_statistics":[{"table_row_count":1,"table_size":10}]},"Schema":[{"Name":"x","Type":"String"}],"Results":[{"x":"y"}]}"#;
const GRAPH_HUNT: &str = r#"{"@odata.context":"https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.security.huntingQueryResults","schema":[{"name":"x","type":"String"}],"results":[{"x":"y"}]}"#;
const INCIDENTS: &str = r#"{"@odata.context":"https://api.security.microsoft.com/api/$metadata#Incidents","value":[{"incidentId":1,"status":"Active"}]}"#;
const EMPTY: &str = r#"{"value":[]}"#;

/// What the request asks for, once admitted.
enum Route {
    Status(u16),
    Bytes(usize),
    Gzip,
    Echo,
    Slow(u64),
    BadTest,
    /// A fixed JSON body with status 200.
    Canned(&'static str),
}

impl Route {
    fn parse(path: &str) -> Route {
        let lower = path.to_ascii_lowercase();
        if let Some(t) = lower.strip_prefix("/api/test/").or_else(|| lower.strip_prefix("/v1.0/test/")) {
            let (what, arg) = t.split_once('/').unwrap_or((t, ""));
            return match what {
                "status" => match arg.parse::<u16>() {
                    Ok(c) if (200..600).contains(&c) => Route::Status(c),
                    _ => Route::BadTest,
                },
                "bytes" => arg.parse().map_or(Route::BadTest, Route::Bytes),
                "slow" => arg.parse().map_or(Route::BadTest, Route::Slow),
                "gzip" => Route::Gzip,
                "echo" => Route::Echo,
                _ => Route::BadTest,
            };
        }
        let lower = lower.trim_end_matches('/');
        Route::Canned(match lower {
            "/api/advancedhunting/run" | "/api/advancedqueries/run" | "/api/v1.0/advancedqueries/run" => {
                DEFENDER_HUNT
            }
            "/v1.0/security/runhuntingquery" | "/beta/security/runhuntingquery" => GRAPH_HUNT,
            _ if lower == "/api/incidents" || lower.starts_with("/api/incidents/") => INCIDENTS,
            _ => EMPTY,
        })
    }

    fn status(&self) -> u16 {
        match self {
            Route::Status(c) => *c,
            Route::BadTest => 400,
            _ => 200,
        }
    }
}

/// The verdict taken when the request head arrives.
enum Verdict {
    Pass,
    Unauthorized,
    Throttled { limit: u32, window: Duration, wait: Duration },
}

/// `(tid, app)` from the bearer token's payload.
fn identity(headers: &HeaderMap) -> Option<(String, Option<String>)> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut parts = token.trim().split('.');
    let payload = parts.nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&raw).ok()?;
    let claim = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
    let tid = claim("tid")?;
    let (first, second) =
        if claim("ver").as_deref() == Some("2.0") { ("azp", "appid") } else { ("appid", "azp") };
    Some((tid, claim(first).or_else(|| claim(second))))
}

/// Applies the rule to one arrival at `now`; records it when admitted.
fn meter(inner: &mut Inner, rule: &QuotaRule, key: String, now: Instant) -> Verdict {
    let q = inner.arrivals.entry(key).or_default();
    let longest = rule.windows.iter().map(|w| w.1).max().unwrap_or_default();
    while q.front().is_some_and(|t| now.duration_since(*t) >= longest) {
        q.pop_front();
    }
    let mut worst: Option<(u32, Duration, Duration)> = None;
    for &(limit, window) in &rule.windows {
        let inside: Vec<Instant> = q.iter().copied().filter(|t| now.duration_since(*t) < window).collect();
        if inside.len() >= limit as usize {
            // The arrival whose departure brings the count below the limit.
            let wait = match inside.len().checked_sub(limit as usize).and_then(|k| inside.get(k)) {
                Some(t) => window.saturating_sub(now.duration_since(*t)),
                None => window, // a zero limit never admits anything
            };
            match worst {
                Some((_, _, w)) if w >= wait => {}
                _ => worst = Some((limit, window, wait)),
            }
        }
    }
    match worst {
        Some((limit, window, wait)) => Verdict::Throttled { limit, window, wait },
        None => {
            q.push_back(now);
            Verdict::Pass
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let path_and_query = parts.uri.path_and_query().map_or(path.clone(), |p| p.as_str().to_string());
    let ident = identity(&parts.headers);
    let rule = shared.cfg.quotas.iter().find(|r| r.matches(&parts.method, &path));
    let route = Route::parse(&path);
    let tid = ident.as_ref().map(|i| i.0.clone());
    let app = ident.as_ref().and_then(|i| i.1.clone());

    let (idx, verdict) = {
        let mut inner = shared.lock();
        let now = Instant::now();
        let verdict = match (rule, &ident) {
            (None, _) => Verdict::Pass,
            (Some(_), None) => Verdict::Unauthorized,
            (Some(r), Some((tid, app))) => {
                let key = match r.key {
                    KeyScope::TenantApp => format!("{}|{tid}|{}", r.name, app.as_deref().unwrap_or("")),
                    KeyScope::Tenant => format!("{}|{tid}", r.name),
                };
                meter(&mut inner, r, key, now)
            }
        };
        let status = match verdict {
            Verdict::Pass => route.status(),
            Verdict::Unauthorized => 401,
            Verdict::Throttled { .. } => 429,
        };
        inner.seen.push(SeenRequest {
            at: now,
            method: parts.method.clone(),
            path_and_query: path_and_query.clone(),
            headers: parts.headers.clone(),
            body: Bytes::new(),
            tenant: tid.clone(),
            app,
            rule: rule.map(|r| r.name.clone()),
            status,
            admitted: rule.is_some() && matches!(verdict, Verdict::Pass),
        });
        (inner.seen.len() - 1, verdict)
    };

    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    shared.lock().seen[idx].body = body.clone();

    let graph = {
        let lower = path.to_ascii_lowercase();
        lower.starts_with("/v1.0/") || lower.starts_with("/beta/")
    };
    match verdict {
        Verdict::Unauthorized => {
            let msg = "Authorization header is missing or its bearer token has no tenant.";
            json_response(401, json!({"error": {"code": "Unauthorized", "message": msg, "target": path}}))
        }
        Verdict::Throttled { wait, .. } if graph => {
            let ms = wait.as_micros().div_ceil(1000).max(1);
            let body = json!({"error": {"code": "TooManyRequests", "innerError": {
                "code": "429", "date": utc_now(), "message": "Please retry after",
                "request-id": request_id(), "status": "429"}, "message": "Please retry again later."}});
            with_header(json_response(429, body), "retry-after", &format!("{}.{:03}", ms / 1000, ms % 1000))
        }
        Verdict::Throttled { limit, window, wait } => {
            let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
            let message = format!(
                "API calls quota exceeded! Maximum allowed {limit} per {} for the key \
                 Destination+TenantID+AppID. You can send requests again in {secs} seconds.",
                timespan(window)
            );
            let target = tid.unwrap_or_default();
            let body = json!({"error": {"code": "429", "message": message, "target": target}});
            with_header(json_response(429, body), "retry-after", &secs.to_string())
        }
        Verdict::Pass => respond(route, &parts.method, &path_and_query, &parts.headers, body).await,
    }
}

async fn respond(route: Route, method: &Method, pq: &str, headers: &HeaderMap, body: Bytes) -> Response {
    match route {
        Route::Status(code) => {
            let err =
                json!({"error": {"code": format!("Status{code}"), "message": format!("status {code}")}});
            let r = json_response(code, err);
            let r = with_header(r, "x-emulator-status", &code.to_string());
            let r = with_header(r, "set-cookie", "a=b; Path=/");
            with_header(r, "cache-control", "no-store")
        }
        Route::Bytes(n) => {
            let data = Bytes::from(bytes_pattern(n));
            let chunks: Vec<Result<Bytes, Infallible>> =
                (0..n).step_by(64 * 1024).map(|i| Ok(data.slice(i..(i + 64 * 1024).min(n)))).collect();
            let r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            with_header(r, "content-type", "application/octet-stream")
        }
        Route::Gzip => {
            let r = raw_json(200, Bytes::from(gzip_payload()));
            with_header(r, "content-encoding", "gzip")
        }
        Route::Echo => {
            let hs: Vec<[String; 2]> = headers
                .iter()
                .map(|(k, v)| [k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()])
                .collect();
            let echo = json!({"method": method.as_str(), "uri": pq, "headers": hs,
                "body_len": body.len(), "body": String::from_utf8_lossy(&body)});
            json_response(200, echo)
        }
        Route::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            raw_json(200, Bytes::from_static(EMPTY.as_bytes()))
        }
        Route::BadTest => {
            json_response(400, json!({"error": {"code": "BadRequest", "message": "bad test path"}}))
        }
        Route::Canned(body) => raw_json(200, Bytes::from_static(body.as_bytes())),
    }
}

fn raw_json(status: u16, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    with_header(r, "content-type", "application/json")
}

fn json_response(status: u16, v: Value) -> Response {
    raw_json(status, Bytes::from(v.to_string()))
}

fn with_header(mut r: Response, name: &'static str, value: &str) -> Response {
    let value = HeaderValue::from_str(value).expect("header value");
    r.headers_mut().append(name, value);
    r
}

/// A .NET TimeSpan rendering: `hh:mm:ss`, `d.hh:mm:ss`, with `.fffffff` when sub-second.
fn timespan(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    let mut out = if days > 0 { format!("{days}.") } else { String::new() };
    out.push_str(&format!("{h:02}:{m:02}:{sec:02}"));
    if d.subsec_nanos() > 0 {
        out.push_str(&format!(".{:07}", d.subsec_nanos() / 100));
    }
    out
}

/// Current UTC time as `YYYY-MM-DDThh:mm:ss` (Graph's `innerError.date`).
fn utc_now() -> String {
    let s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    // Days to civil date (Howard Hinnant's algorithm).
    let z = s / 86_400 + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let t = s % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", t / 3600, t % 3600 / 60, t % 60)
}

/// A unique, UUID-shaped request id.
fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let hex = format!("{nanos:016x}{n:016x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}
