//! An in-process emulator of the upstream Defender XDR / Defender for Endpoint / Graph security
//! APIs, for integration tests. It is written independently of the `quotagate` crate.
//!
//! What it does:
//! - serves plain HTTP/1.1 on `127.0.0.1:<random port>` until the [`Emulator`] is dropped;
//! - reads tenant and app from the bearer token's payload (`tid`; `appid`, or `azp` for `ver` 2.0)
//!   without verifying the signature, and answers 401 on a metered path without a usable token;
//! - meters requests against configured [`QuotaRule`]s with a strict sliding window by arrival
//!   time (the decision is taken when the request head arrives; throttled calls are not counted)
//!   and answers 429 with the exact Defender or Graph body and `Retry-After`, in the rule's
//!   [`ThrottleStyle`] (header and/or a body naming the wait, or neither) and, with
//!   [`QuotaRule::running_time`], the running-time wording; on Graph paths the body is always
//!   the Graph envelope, which never names the wait;
//! - lets a test play another consumer of the same budget ([`Emulator::spend`]);
//! - answers canned success bodies (hunting, incidents, `{"value":[]}`) and offers test
//!   endpoints under `/api/test/` (and `/v1.0/test/`): `status/{code}`, `flaky/{code}/{n}`
//!   (the answers these two make up carry `x-emulator-status: {code}`),
//!   `bytes/{n}` (n at most [`super::hunt::MAX_BYTES`]), `gzip`,
//!   `echo`, `slow/{ms}`; any request carrying [`DELAY_HEADER`] (`x-emulator-delay-ms: N`) is
//!   answered N ms late (the metering decision still falls on arrival);
//! - plays transport [`Fault`]s switched at run time with [`Emulator::set_fault`];
//! - records every request it receives, with the status it answered (0 for a faulted request).
//!
//! How faults reach kept-alive connections: the emulator runs its own accept loop and serves
//! each connection with hyper's HTTP/1.1 server on the axum router, so a pooled connection from
//! a proxy is handled request by request. The handler reads the fault when a request arrives; if
//! one is set it records the request, reads its body, and sends the fault to its connection task
//! (a channel carried in the request's extensions). That task stops polling hyper, takes the
//! `TcpStream` back with `Connection::into_parts` (which drops the waiting handler) and acts the
//! fault out on the raw socket: hold it open (`Stall`), write a truncated response then reset
//! it with `SO_LINGER` 0 (`ResetMidBody`), or write garbage and close (`Garbage`). So the very
//! next request meets the fault, on a new or a reused connection, and a fault never leaks into a
//! response already under way. HTTP/2 (h2c) is not served.
//!
//! - runs hunting queries for the cost their text names ([`super::hunt`]: `cost=S`, `rows=N`,
//!   `bytes=N`, `stats=last|none`), reports `Stats` like the service (Defender) or nothing
//!   (Graph), and with [`EmulatorConfig::running_time`] enforces per-tenant running-time
//!   budgets: a query arriving while a budget's trailing window holds its limit or more gets the
//!   service's running-time 429; each query is charged at its end ([`Emulator::charges`]).
//!
//! - with [`Emulator::start_tls`], serves HTTPS instead (HTTP/1.1 and HTTP/2 by ALPN) with a
//!   certificate for the Microsoft API hosts signed by a test CA ([`Emulator::ca_pem`]), so a
//!   gateway that trusts that CA and connects to [`Emulator::addr`] in place of the real host
//!   reaches it as `https://api.security.microsoft.com`. Faults are not played over TLS.
//!
//! What it does not do: faults over TLS, signature or audience checks, KQL, OData query options, or Graph's
//! habit of counting calls made while throttled.

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
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

pub use super::hunt::Charges;
use super::hunt::HuntSpec;

/// What a quota counts per.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyScope {
    /// `Destination+TenantID+AppID`, as the service names it.
    #[default]
    TenantApp,
    /// Destination and tenant only.
    Tenant,
}

/// How a quota rule's 429 tells the client when to come back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThrottleStyle {
    /// `Retry-After` and a Defender body that names the wait (`... again in N seconds.`).
    #[default]
    HeaderAndBody,
    /// `Retry-After`; the Defender body is the older form without a time.
    HeaderOnly,
    /// No `Retry-After`; the Defender body names the wait.
    BodyOnly,
    /// No `Retry-After`, and the older Defender body without a time.
    Neither,
}

impl ThrottleStyle {
    fn header(self) -> bool {
        matches!(self, ThrottleStyle::HeaderAndBody | ThrottleStyle::HeaderOnly)
    }

    fn timed_body(self) -> bool {
        matches!(self, ThrottleStyle::HeaderAndBody | ThrottleStyle::BodyOnly)
    }
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
    /// Whether the 429 carries `Retry-After` and whether its body names the wait.
    pub style: ThrottleStyle,
    /// Throttle with the running-time ("processing resources") wording; still counts calls.
    pub running_time: bool,
}

impl QuotaRule {
    pub fn new(name: &str, path_prefixes: &[&str], windows: &[(u32, Duration)]) -> Self {
        QuotaRule {
            name: name.to_string(),
            methods: Vec::new(),
            path_prefixes: path_prefixes.iter().map(|p| p.to_string()).collect(),
            windows: windows.to_vec(),
            key: KeyScope::TenantApp,
            style: ThrottleStyle::HeaderAndBody,
            running_time: false,
        }
    }

    pub fn style(mut self, s: ThrottleStyle) -> Self {
        self.style = s;
        self
    }

    /// Throttle with the running-time wording (`You have exceeded processing resources ...`)
    /// instead of the call-quota one. The rule still meters calls, not CPU time.
    pub fn running_time(mut self) -> Self {
        self.running_time = true;
        self
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

    /// The key its arrivals are counted under.
    fn key_for(&self, tid: &str, app: Option<&str>) -> String {
        match self.key {
            KeyScope::TenantApp => format!("{}|{tid}|{}", self.name, app.unwrap_or("")),
            KeyScope::Tenant => format!("{}|{tid}", self.name),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct EmulatorConfig {
    pub quotas: Vec<QuotaRule>,
    /// Per-tenant running-time budgets: `(limit, window)`.
    pub running_time: Vec<(Duration, Duration)>,
}

impl EmulatorConfig {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn quota(mut self, r: QuotaRule) -> Self {
        self.quotas.push(r);
        self
    }

    /// Enforce at most `limit` of hunting running time per tenant in any `window`.
    pub fn running_time(mut self, limit: Duration, window: Duration) -> Self {
        self.running_time.push((limit, window));
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
    /// The status answered; 0 when a [`Fault`] met the request.
    pub status: u16,
    /// True when `rule` is set and the rule admitted (counted) the request.
    pub admitted: bool,
}

#[derive(Default)]
struct Inner {
    seen: Vec<SeenRequest>,
    /// Accepted arrival times per quota key, oldest first.
    arrivals: HashMap<String, VecDeque<Instant>>,
    /// Requests seen per flaky path and query.
    flaky: HashMap<String, usize>,
    /// Hunting running time charged per tenant.
    charges: HashMap<String, Charges>,
}

struct Shared {
    cfg: EmulatorConfig,
    inner: Mutex<Inner>,
    /// The fault every request arriving from now on meets.
    fault: watch::Sender<Fault>,
    /// Set once, when the [`Emulator`] is dropped.
    stop: watch::Sender<bool>,
    /// Streamed response bodies dropped before their last byte went out.
    cut: AtomicU64,
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
    /// The test CA's certificate (PEM), when serving TLS.
    ca_pem: Option<String>,
}

/// The host names the TLS emulator's certificate is valid for.
pub const TLS_HOSTS: [&str; 3] =
    ["api.security.microsoft.com", "api.securitycenter.microsoft.com", "graph.microsoft.com"];

impl Emulator {
    pub async fn start(cfg: EmulatorConfig) -> Emulator {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind emulator");
        let addr = listener.local_addr().expect("emulator address");
        let shared = Arc::new(Shared {
            cfg,
            inner: Mutex::new(Inner::default()),
            fault: watch::Sender::new(Fault::None),
            stop: watch::Sender::new(false),
            cut: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(accept_loop(listener, app, shared.clone()));
        Emulator { addr, shared, ca_pem: None }
    }

    /// Like [`Emulator::start`], but serving HTTPS with a certificate for [`TLS_HOSTS`] signed by
    /// a fresh test CA, whose certificate [`Emulator::ca_pem`] returns.
    pub async fn start_tls(cfg: EmulatorConfig) -> Emulator {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind emulator");
        let addr = listener.local_addr().expect("emulator address");
        let shared = Arc::new(Shared {
            cfg,
            inner: Mutex::new(Inner::default()),
            fault: watch::Sender::new(Fault::None),
            stop: watch::Sender::new(false),
            cut: AtomicU64::new(0),
        });
        let (ca_pem, tls) = test_tls();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(accept_loop_tls(listener, app, shared.clone(), tls));
        Emulator { addr, shared, ca_pem: Some(ca_pem) }
    }

    /// The test CA certificate (PEM) of an emulator started with [`Emulator::start_tls`].
    pub fn ca_pem(&self) -> &str {
        self.ca_pem.as_deref().expect("a TLS emulator")
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

    /// An outside consumer: records `n` accepted arrivals now on the rule's key for `tenant` and
    /// `app` (ignored by a tenant-scoped rule), as if another tool had called. They use up the
    /// budget like real calls but appear in neither [`requests`](Self::requests) nor
    /// [`accepted`](Self::accepted). Panics if no rule has that name.
    pub fn spend(&self, rule: &str, tenant: &str, app: &str, n: usize) {
        let r = self.shared.cfg.quotas.iter().find(|r| r.name == rule);
        let key = r.unwrap_or_else(|| panic!("no quota rule named {rule:?}")).key_for(tenant, Some(app));
        let mut inner = self.shared.lock();
        let now = Instant::now();
        inner.arrivals.entry(key).or_default().extend(std::iter::repeat_n(now, n));
    }

    /// The hunting running time charged to `tenant`, each query at its end (which may lie in
    /// the future for a query still running).
    pub fn charges(&self, tenant: &str) -> Charges {
        self.shared.lock().charges.get(tenant).cloned().unwrap_or_default()
    }

    /// Streamed responses (`bytes/{n}`, hunting results) whose transfer ended before their
    /// last byte was sent: the peer closed the connection or stopped reading the body.
    pub fn cut_bodies(&self) -> u64 {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Switches the fault that requests arriving from now on meet, on new and kept-alive
    /// connections alike; [`Fault::None`] restores normal service. See [`Fault`].
    pub fn set_fault(&self, f: Fault) {
        self.shared.fault.send_replace(f);
    }

    fn admitted_by(&self, rule: &str) -> Vec<SeenRequest> {
        let inner = self.shared.lock();
        inner.seen.iter().filter(|r| r.admitted && r.rule.as_deref() == Some(rule)).cloned().collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
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

/// Like the service, a hunting result or a 429 is gzip-compressed when the
/// request accepts gzip (`Accept-Encoding`, a weight above 0).
async fn gzip_if_accepted(request: &HeaderMap, r: Response) -> Response {
    let accepts = request.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let zero = parts.filter_map(|p| p.split_once('=')).any(|(name, q)| {
                name.trim().eq_ignore_ascii_case("q") && q.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
            });
            coding.eq_ignore_ascii_case("gzip") && !zero
        })
    });
    if !accepts || r.headers().contains_key(header::CONTENT_ENCODING) {
        return r;
    }
    let (mut head, body) = r.into_parts();
    let plain = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).expect("gzip");
    let packed = enc.finish().expect("gzip");
    head.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(packed.len()));
    Response::from_parts(head, Body::from(packed))
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

const INCIDENTS: &str = r#"{"@odata.context":"https://api.security.microsoft.com/api/$metadata#Incidents","value":[{"incidentId":1,"status":"Active"}]}"#;
const EMPTY: &str = r#"{"value":[]}"#;

/// What the request asks for, once admitted.
enum Route {
    Status(u16),
    Bytes(usize),
    Gzip,
    Echo,
    Slow(u64),
    /// `flaky/{status}/{n}`: the first n requests to the exact path and query answer `status`
    /// (with `?retry_after=S` as `Retry-After`, `&message=M` in the error body, and `&pad=N`
    /// adding N bytes (at most 1 MiB) of padding to it), then 200.
    Flaky(u16, usize),
    BadTest,
    /// A hunting query: Graph's or Defender's.
    Hunt {
        graph: bool,
    },
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
                "bytes" => match arg.parse() {
                    Ok(n) if n <= super::hunt::MAX_BYTES => Route::Bytes(n),
                    _ => Route::BadTest,
                },
                "slow" => arg.parse().map_or(Route::BadTest, Route::Slow),
                "flaky" => match arg.split_once('/').map(|(s, n)| (s.parse::<u16>(), n.parse::<usize>())) {
                    Some((Ok(s), Ok(n))) if (400..600).contains(&s) => Route::Flaky(s, n),
                    _ => Route::BadTest,
                },
                "gzip" => Route::Gzip,
                "echo" => Route::Echo,
                _ => Route::BadTest,
            };
        }
        let lower = lower.trim_end_matches('/');
        Route::Canned(match lower {
            "/api/advancedhunting/run" | "/api/advancedqueries/run" | "/api/v1.0/advancedqueries/run" => {
                return Route::Hunt { graph: false }
            }
            // The Graph SDKs call the action by its namespace-qualified name.
            "/v1.0/security/runhuntingquery"
            | "/beta/security/runhuntingquery"
            | "/v1.0/security/microsoft.graph.security.runhuntingquery"
            | "/beta/security/microsoft.graph.security.runhuntingquery" => {
                return Route::Hunt { graph: true }
            }
            _ if lower == "/api/incidents" || lower.starts_with("/api/incidents/") => INCIDENTS,
            _ => EMPTY,
        })
    }

    fn status(&self) -> u16 {
        match self {
            Route::Status(c) | Route::Flaky(c, _) => *c,
            Route::BadTest => 400,
            _ => 200,
        }
    }
}

/// The verdict taken when the request head arrives.
enum Verdict {
    Pass,
    Unauthorized,
    Throttled {
        limit: u32,
        window: Duration,
        wait: Duration,
    },
    /// A fault was set: the request is not metered and is handed to the fault.
    Fault(Fault),
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
    let fault = *shared.fault.borrow();
    let conn = req.extensions().get::<ConnHandle>().cloned();
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
            _ if fault != Fault::None => Verdict::Fault(fault),
            (None, _) => Verdict::Pass,
            (Some(_), None) => Verdict::Unauthorized,
            (Some(r), Some((tid, app))) => meter(&mut inner, r, r.key_for(tid, app.as_deref()), now),
        };
        let flaky_fails = match route {
            Route::Flaky(_, first) if matches!(verdict, Verdict::Pass) => {
                let seen = inner.flaky.entry(path_and_query.clone()).or_insert(0);
                *seen += 1;
                *seen <= first
            }
            _ => false,
        };
        let status = match verdict {
            Verdict::Pass if matches!(route, Route::Flaky(..)) => {
                if flaky_fails {
                    route.status()
                } else {
                    200
                }
            }
            Verdict::Pass => route.status(),
            Verdict::Unauthorized => 401,
            Verdict::Throttled { .. } => 429,
            Verdict::Fault(_) => 0,
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
        (inner.seen.len() - 1, (verdict, flaky_fails))
    };
    let (verdict, flaky_fails) = verdict;

    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    shared.lock().seen[idx].body = body.clone();

    let delay = parts.headers.get(DELAY_HEADER).and_then(|v| v.to_str().ok()?.trim().parse().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let graph = {
        let lower = path.to_ascii_lowercase();
        lower.starts_with("/v1.0/") || lower.starts_with("/beta/")
    };
    match verdict {
        Verdict::Unauthorized => {
            let msg = "Authorization header is missing or its bearer token has no tenant.";
            json_response(401, json!({"error": {"code": "Unauthorized", "message": msg, "target": path}}))
        }
        Verdict::Throttled { limit, window, wait } => {
            let rule = rule.expect("only a rule throttles");
            let r = throttled(rule, graph, limit, window, wait, &tid.unwrap_or_default());
            gzip_if_accepted(&parts.headers, r).await
        }
        Verdict::Fault(f) => {
            // The connection task takes the socket back from hyper and drops this future.
            if let Some(conn) = conn {
                conn.take_over(f);
            }
            std::future::pending().await
        }
        Verdict::Pass if matches!(route, Route::Flaky(..)) => flaky(&route, flaky_fails, graph, &parts.uri),
        Verdict::Pass if matches!(route, Route::Hunt { .. }) => {
            let r = hunt(&shared, idx, graph, &body, tid.as_deref().unwrap_or_default()).await;
            gzip_if_accepted(&parts.headers, r).await
        }
        Verdict::Pass => respond(&shared, route, &parts.method, &path_and_query, &parts.headers, body).await,
    }
}

/// Run a hunting query: refuse it while its tenant's running time is spent, else charge its
/// cost at its end, take that long, and answer like the service.
async fn hunt(shared: &Arc<Shared>, idx: usize, graph: bool, body: &[u8], tid: &str) -> Response {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let query = value
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("query")))
        .and_then(|(_, v)| v.as_str())
        .map(str::to_string);
    let Some(query) = query else {
        let msg = "Query is missing or not a string.";
        return json_response(400, json!({"error": {"code": "BadRequest", "message": msg, "target": tid}}));
    };
    let spec = HuntSpec::of(&query);
    let started = {
        let mut inner = shared.lock();
        let now = Instant::now();
        let charges = inner.charges.entry(tid.to_string()).or_default();
        let wait = shared
            .cfg
            .running_time
            .iter()
            .filter_map(|&(limit, window)| charges.wait(now, limit, window))
            .max();
        if let Some(wait) = wait {
            inner.seen[idx].status = 429;
            return running_time_exhausted(graph, wait, tid);
        }
        match spec.cost {
            Some(cost) => charges.0.push((now + cost, cost)),
            None => charges.0.push((now, Duration::from_millis(10))),
        }
        now
    };
    if let Some(cost) = spec.cost {
        // A caller that goes away cancels the query: it is charged what it ran.
        let mut running = Running { shared, tid, started, cost, done: false };
        tokio::time::sleep(cost).await;
        running.done = true;
    }
    let data = super::hunt::response_of(&spec, graph);
    let n = data.len();
    let mut r = Response::new(streamed(shared, data));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    with_header(r, "content-type", "application/json")
}

/// `data` as a body of 64 KiB chunks; dropped before its end, it counts in
/// [`Emulator::cut_bodies`].
fn streamed(shared: &Arc<Shared>, data: Bytes) -> Body {
    struct Sending {
        data: Bytes,
        sent: usize,
        shared: Arc<Shared>,
    }
    impl futures_util::Stream for Sending {
        type Item = Result<Bytes, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            let (from, n) = (self.sent, self.data.len());
            if from >= n {
                return std::task::Poll::Ready(None);
            }
            self.sent = (from + 64 * 1024).min(n);
            std::task::Poll::Ready(Some(Ok(self.data.slice(from..self.sent))))
        }
    }
    impl Drop for Sending {
        fn drop(&mut self) {
            if self.sent < self.data.len() {
                self.shared.cut.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    Body::from_stream(Sending { data, sent: 0, shared: shared.clone() })
}

/// A query running in [`hunt`]; dropped early, it rewrites its charge to the time it ran.
struct Running<'a> {
    shared: &'a Shared,
    tid: &'a str,
    started: Instant,
    cost: Duration,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let ran = self.started.elapsed();
        let mut inner = self.shared.lock();
        if let Some(c) = inner.charges.get_mut(self.tid) {
            if let Some(pos) =
                c.0.iter().rposition(|&(end, cost)| cost == self.cost && end == self.started + self.cost)
            {
                c.0[pos] = (Instant::now(), ran);
            }
        }
    }
}

/// The service's 429 for spent running time, in Defender's or Graph's shape, with `Retry-After`.
fn running_time_exhausted(graph: bool, wait: Duration, tid: &str) -> Response {
    let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
    let r = if graph {
        json_response(
            429,
            json!({"error": {"code": "TooManyRequests", "innerError": {
            "code": "429", "date": utc_now(), "message": "Please retry after",
            "request-id": request_id(), "status": "429"}, "message": "Please retry again later."}}),
        )
    } else {
        let message = format!(
            "{RUNNING_TIME_EXCEEDED} You can run queries again in {}.",
            timespan(Duration::from_secs(secs as u64))
        );
        json_response(429, json!({"error": {"code": "429", "message": message, "target": tid}}))
    };
    with_header(r, "retry-after", &secs.to_string())
}

/// The answer of a `flaky/{status}/{n}` request: its error while it fails, then 200.
fn flaky(route: &Route, fails: bool, graph: bool, uri: &http::Uri) -> Response {
    let Route::Flaky(status, _) = *route else { unreachable!("only flaky routes") };
    if !fails {
        return json_response(200, json!({"value": []}));
    }
    let param = |name: &str| {
        uri.query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(|v| v.replace('+', " ").replace("%20", " ").replace("%27", "'"))
    };
    let message = param("message").unwrap_or_else(|| format!("status {status}"));
    let code = if status == 429 { "TooManyRequests" } else { "ServiceUnavailable" };
    let mut body = if graph {
        json!({"error": {"code": code, "innerError": {"code": status.to_string(), "date": utc_now(),
            "message": message, "request-id": request_id(), "status": status.to_string()}, "message": message}})
    } else {
        json!({"error": {"code": status.to_string(), "message": message, "target": "flaky"}})
    };
    if let Some(pad) = param("pad").and_then(|n| n.parse::<usize>().ok()) {
        body["padding"] = "x".repeat(pad.min(1 << 20)).into();
    }
    // Marked as made up by a test endpoint, as `status/{code}`'s answers are.
    let response = with_header(json_response(status, body), "x-emulator-status", &status.to_string());
    match param("retry_after") {
        Some(s) => with_header(response, "retry-after", &s),
        None => response,
    }
}

const RUNNING_TIME_EXCEEDED: &str = "You have exceeded processing resources allocated to this tenant.";

/// The 429 for a rule's verdict, in the rule's style and wording.
fn throttled(
    rule: &QuotaRule,
    graph: bool,
    limit: u32,
    window: Duration,
    wait: Duration,
    tid: &str,
) -> Response {
    let header = rule.style.header();
    if graph {
        // The Graph envelope never names the wait; only the (fractional) header can.
        let ms = wait.as_micros().div_ceil(1000).max(1);
        let body = json!({"error": {"code": "TooManyRequests", "innerError": {
            "code": "429", "date": utc_now(), "message": "Please retry after",
            "request-id": request_id(), "status": "429"}, "message": "Please retry again later."}});
        let r = json_response(429, body);
        return if header {
            with_header(r, "retry-after", &format!("{}.{:03}", ms / 1000, ms % 1000))
        } else {
            r
        };
    }
    let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
    let message = match (rule.running_time, rule.style.timed_body()) {
        (false, true) => format!(
            "API calls quota exceeded! Maximum allowed {limit} per {} for the key \
             Destination+TenantID+AppID. You can send requests again in {secs} seconds.",
            timespan(window)
        ),
        (false, false) => {
            format!("API calls quota exceeded! maximum allowed {limit} per {}", timespan(window))
        }
        (true, true) => format!(
            "{RUNNING_TIME_EXCEEDED} You can run queries again in {}.",
            timespan(Duration::from_secs(secs as u64))
        ),
        (true, false) => RUNNING_TIME_EXCEEDED.to_string(),
    };
    let r = json_response(429, json!({"error": {"code": "429", "message": message, "target": tid}}));
    if header {
        with_header(r, "retry-after", &secs.to_string())
    } else {
        r
    }
}

async fn respond(
    shared: &Arc<Shared>,
    route: Route,
    method: &Method,
    pq: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    match route {
        Route::Flaky(..) => unreachable!("flaky routes are answered by flaky()"),
        Route::Hunt { .. } => unreachable!("hunting is answered by hunt()"),
        Route::Status(code) => {
            let err =
                json!({"error": {"code": format!("Status{code}"), "message": format!("status {code}")}});
            let r = json_response(code, err);
            let r = with_header(r, "x-emulator-status", &code.to_string());
            let r = with_header(r, "set-cookie", "a=b; Path=/");
            let r = with_header(r, "cache-control", "no-store");
            if pq.contains("gateway_headers") {
                // Headers in the gateway's own namespace, which it must
                // never pass on as if it had said them.
                let r = with_header(r, "x-quotagate-throttled-by", "gateway");
                with_header(r, "x-quotagate-execution-time", "999")
            } else {
                r
            }
        }
        Route::Bytes(n) => {
            let r = Response::new(streamed(shared, Bytes::from(bytes_pattern(n))));
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

/// The request header that delays any answer by that many milliseconds.
pub const DELAY_HEADER: &str = "x-emulator-delay-ms";

/// A transport fault that every request meets while it is set (see [`Emulator::set_fault`]).
///
/// A faulted request is still recorded in [`Emulator::requests`], with `status` 0 and
/// `admitted` false (it is not metered), once its head and body have been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Normal service.
    None,
    /// Read the request, then never answer: the connection stays open until the fault is
    /// changed, the emulator is dropped or the client closes it.
    Stall,
    /// Answer `200 OK` announcing `Content-Length: 100000`, send 1,000 bytes of body, then abort
    /// the connection with a TCP reset.
    ResetMidBody,
    /// Answer `this is not HTTP at all\r\n\r\n` and close.
    Garbage,
}

/// What a request handler uses to hand its connection over to a fault.
#[derive(Clone)]
struct ConnHandle(mpsc::UnboundedSender<Fault>);

impl ConnHandle {
    fn take_over(&self, f: Fault) {
        let _ = self.0.send(f);
    }
}

/// Waits until the watched value satisfies `f` (or its sender is gone).
async fn until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(f).await;
}

/// Accepts connections until the emulator is dropped, then drops the listener.
async fn accept_loop(listener: TcpListener, app: Router, shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = until(&mut stop, |s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(stream, app.clone(), shared.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

/// A test CA and a server config presenting a leaf it signed for [`TLS_HOSTS`].
fn test_tls() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "emulator test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(TLS_HOSTS.map(String::from).to_vec()).expect("names");
    leaf.use_authority_key_identifier_extension = true;
    let leaf = leaf.signed_by(&key, &ca, &ca_key).expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TLS connections until the emulator is dropped; each is served with HTTP/1.1 or
/// HTTP/2 (by ALPN) on the same router, without faults.
async fn accept_loop_tls(
    listener: TcpListener,
    app: Router,
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        let (stream, _) = tokio::select! {
            _ = until(&mut stop, |s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => { tokio::time::sleep(Duration::from_millis(5)).await; continue }
            },
        };
        let _ = stream.set_nodelay(true);
        let (tls, app, mut stop) = (tls.clone(), app.clone(), shared.stop.subscribe());
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(stream).await else { return };
            let service =
                service_fn(move |req: http::Request<Incoming>| app.clone().oneshot(req.map(Body::new)));
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = until(&mut stop, |s| *s) => {}
            }
        });
    }
}

/// Serves one connection with hyper's HTTP/1.1 server until a request handler meets a fault;
/// then takes the socket back from hyper (dropping that handler) and acts the fault out on it.
async fn serve_connection(stream: TcpStream, app: Router, shared: Arc<Shared>) {
    let (tx, mut faults) = mpsc::unbounded_channel();
    let handle = ConnHandle(tx);
    let service = service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(handle.clone());
        app.clone().oneshot(req.map(Body::new))
    });
    let mut conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut stop = shared.stop.subscribe();
    let mut draining = false;
    let fault = loop {
        tokio::select! {
            _ = &mut conn => return,
            Some(f) = faults.recv() => break f,
            // Like a graceful shutdown: finish the request in flight, close idle connections.
            _ = until(&mut stop, |s| *s), if !draining => {
                std::pin::Pin::new(&mut conn).graceful_shutdown();
                draining = true;
            }
        }
    };
    let stream = conn.into_parts().io.into_inner();
    act_out(stream, fault, &shared).await;
}

/// The bytes [`Fault::Garbage`] answers.
const GARBAGE: &[u8] = b"this is not HTTP at all\r\n\r\n";

/// Plays a fault on a connection whose request has been read.
async fn act_out(mut stream: TcpStream, fault: Fault, shared: &Shared) {
    match fault {
        Fault::None => {}
        Fault::Stall => {
            let (mut fault, mut stop) = (shared.fault.subscribe(), shared.stop.subscribe());
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    r = stream.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                    _ = until(&mut fault, |f| *f != Fault::Stall) => return,
                    _ = until(&mut stop, |s| *s) => return,
                }
            }
        }
        Fault::Garbage => {
            let _ = stream.write_all(GARBAGE).await;
            let _ = stream.shutdown().await;
        }
        Fault::ResetMidBody => {
            let mut out =
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                    .to_vec();
            let mut body = br#"{"value":["#.to_vec();
            while body.len() < 1000 {
                body.extend_from_slice(br#"{"id":"cut"},"#);
            }
            out.extend_from_slice(&body[..1000]);
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
            // Let the client read the head and the first bytes before the reset.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.set_zero_linger();
            drop(stream); // SO_LINGER 0: close sends RST, not FIN
        }
    }
}
