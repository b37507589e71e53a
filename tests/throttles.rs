//! Upstream throttles and failures end to end: the gateway obeys the
//! server's time, holds the key, retries within the caller's wait, and never
//! answers a failure with a silent or truncated success.

mod support;

use std::time::{Duration, Instant};

use support::emulator::{Emulator, EmulatorConfig, Fault, QuotaRule, ThrottleStyle};
use support::gateway::TestGateway;
use support::{bearer, client, ClosedPort};

const POLICY: &str = r#"
backoff_base = "300ms"
backoff_cap = "2s"

[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{ limit = 5, per = "2s" }]
max_wait = "6s"
header_timeout = "500ms"
total_timeout = "2s"

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run", "/v1.0/security/runHuntingQuery"]
windows = [{ limit = 5, per = "2s" }]
max_wait = "6s"
hunting = true
"#;

fn upstream(rule: QuotaRule) -> EmulatorConfig {
    EmulatorConfig::new().quota(rule)
}

fn incidents(style: ThrottleStyle) -> QuotaRule {
    QuotaRule::new("incidents", &["/api/incidents"], &[(5, Duration::from_secs(2))]).style(style)
}

/// After the upstream's 429, the next request the upstream sees for that key
/// comes no sooner than the time the server gave.
fn assert_obeyed(emu: &Emulator, server_time: Duration) {
    let seen = emu.requests();
    let first = seen.iter().position(|r| r.status == 429).expect("one upstream throttle");
    let after: Vec<_> = seen[first + 1..].iter().collect();
    assert!(!after.is_empty(), "the call was retried");
    for r in after {
        let gap = r.at - seen[first].at;
        assert!(
            gap + Duration::from_millis(5) >= server_time,
            "request {gap:?} after the throttle, before {server_time:?}"
        );
    }
}

/// Another tool spent the quota: every throttle style is obeyed and the
/// client, with enough patience, just gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_in_any_style_is_waited_out_and_retried() {
    for (style, server_time) in [
        (ThrottleStyle::HeaderAndBody, Duration::from_secs(1)),
        (ThrottleStyle::HeaderOnly, Duration::from_secs(1)),
        (ThrottleStyle::BodyOnly, Duration::from_secs(1)),
    ] {
        let emu = Emulator::start(upstream(incidents(style))).await;
        let gw = TestGateway::start(&emu.url(), POLICY).await;
        emu.spend("incidents", "t", "a", 5);
        let started = Instant::now();
        let r = client()
            .get(gw.url("/api/incidents"))
            .header("authorization", bearer("t", "a"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{style:?}");
        assert!(started.elapsed() >= server_time, "{style:?}");
        assert_eq!(emu.throttled(), 1, "{style:?}: no 429 storm");
        assert_obeyed(&emu, server_time);
        assert_eq!(gw.metric("quotagate_upstream_retries_total{policy=\"incidents\"}").await, 1.0);
        assert_eq!(
            gw.metric("quotagate_upstream_throttles_total{kind=\"call_rate\",policy=\"incidents\"}").await,
            1.0
        );
    }
}

/// A throttle with no usable time: capped exponential back-off with jitter,
/// a bounded number of attempts, then an honest 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_without_a_time_backs_off_exponentially() {
    let emu = Emulator::start(upstream(incidents(ThrottleStyle::Neither))).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("incidents", "t", "a", 5);
    let r = client()
        .get(gw.url("/api/incidents"))
        .header("authorization", bearer("t", "a"))
        .send()
        .await
        .unwrap();
    // Back-off of 0.15–0.3 s, then 0.3–0.6 s: all three attempts fall inside the spent 2 s window.
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "upstream");
    let seen = emu.requests();
    assert_eq!(seen.len(), 3, "max_attempts bounds the attempts");
    let (g1, g2) = (seen[1].at - seen[0].at, seen[2].at - seen[1].at);
    assert!(g1 >= Duration::from_millis(150) && g1 < Duration::from_millis(450), "{g1:?}");
    assert!(g2 >= Duration::from_millis(300) && g2 < Duration::from_millis(750), "{g2:?}");
}

/// Graph's fractional Retry-After is obeyed to the millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphs_fractional_retry_after_is_obeyed() {
    let rule = QuotaRule::new("graph", &["/v1.0/security/runHuntingQuery"], &[(5, Duration::from_secs(2))]);
    let emu = Emulator::start(upstream(rule)).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("graph", "t", "a", 5);
    let r = client()
        .post(gw.url("/v1.0/security/runHuntingQuery"))
        .header("authorization", bearer("t", "a"))
        .json(&serde_json::json!({"Query": "DeviceEvents | take 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = emu.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, seen[0].body, "the replay carries the same body");
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(1900), "{:?}", seen[1].at - seen[0].at);
}

/// While a key is held, its other requests wait for the server's time and
/// other keys are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_the_whole_key_away_from_the_upstream_and_no_other_key() {
    let emu = Emulator::start(upstream(incidents(ThrottleStyle::HeaderAndBody))).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("incidents", "t", "a", 5);
    let http = client();
    let mut same_key = Vec::new();
    for _ in 0..3 {
        let req = http.get(gw.url("/api/incidents")).header("authorization", bearer("t", "a"));
        same_key.push(tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let other = Instant::now();
    let r = http
        .get(gw.url("/api/incidents"))
        .header("authorization", bearer("other", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(other.elapsed() < Duration::from_millis(300), "another tenant is not held");
    for t in same_key {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(
        emu.throttled(),
        1,
        "after the first throttle, nothing reached the upstream before the server's time"
    );
    let held: Vec<_> = emu.requests().into_iter().filter(|r| r.tenant.as_deref() == Some("t")).collect();
    let throttled_at = held[0].at;
    assert!(held[1..].iter().all(|r| r.at - throttled_at >= Duration::from_millis(995)));
}

/// When the server's time does not fit the caller's wait, the client gets a
/// 429 in its own shape, never shorter than the server's remaining time, and
/// the next call is held locally without reaching the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_does_not_fit_is_an_honest_429() {
    let emu = Emulator::start(upstream(incidents(ThrottleStyle::HeaderOnly))).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("incidents", "t", "a", 5);
    let http = client();
    let get = || http.get(gw.url("/api/incidents")).header("authorization", bearer("t", "a"));
    let r = get().header("x-quotagate-max-wait", "0.2").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "upstream");
    let n: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(n, 2, "the emulator's Retry-After was 2 s (rounded up from the window)");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TooManyRequests");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("API calls quota exceeded!"), "{message}");
    assert!(message.ends_with(&format!("You can send requests again in {n} seconds.")), "{message}");

    let r = get().header("x-quotagate-max-wait", "0").send().await.unwrap();
    assert_eq!(r.status(), 429, "held locally");
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    let m: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&m), "the remaining hold, {m}");
    assert_eq!(emu.count(), 1, "the held call never reached the upstream");
}

/// A running-time throttle holds the tenant's running time: every app of
/// the tenant waits for hunting, while its other APIs go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_time_throttle_holds_the_tenants_hunting() {
    running_time_throttle_holds_the_tenant(None).await;
}

/// The same when the client accepts gzip, as Python's `requests` and the
/// Graph SDKs do: the service then compresses its 429, and the gateway
/// reads the decoded message to tell a running-time throttle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_running_time_throttle_holds_the_tenants_hunting() {
    running_time_throttle_holds_the_tenant(Some("gzip, deflate, br")).await;
}

async fn running_time_throttle_holds_the_tenant(accept_encoding: Option<&str>) {
    let rule = QuotaRule::new("hunting", &["/api/advancedhunting/run"], &[(5, Duration::from_secs(2))])
        .running_time();
    let emu = Emulator::start(upstream(rule)).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("hunting", "t", "a", 5);
    let http = client();
    let hunt = |app: &str| {
        let mut req = http
            .post(gw.url("/api/advancedhunting/run"))
            .header("authorization", bearer("t", app))
            .json(&serde_json::json!({"Query": "DeviceEvents | take 1"}));
        if let Some(accept) = accept_encoding {
            req = req.header("accept-encoding", accept);
        }
        req.send()
    };
    let first = tokio::spawn(hunt("a"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let incidents_started = Instant::now();
    let r =
        http.get(gw.url("/api/incidents")).header("authorization", bearer("t", "a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(incidents_started.elapsed() < Duration::from_millis(300), "other APIs are not held");
    assert_eq!(hunt("b").await.unwrap().status(), 200, "another app of the tenant waits, then goes");
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(emu.throttled(), 1);
    let seen = emu.requests();
    let throttled_at = seen.iter().find(|r| r.status == 429).unwrap().at;
    let app_b = seen.iter().find(|r| r.app.as_deref() == Some("b")).unwrap();
    assert!(app_b.at - throttled_at >= Duration::from_millis(995), "app b waited out the tenant's hold");
    assert_eq!(
        gw.metric("quotagate_upstream_throttles_total{kind=\"running_time\",policy=\"hunting\"}").await,
        1.0
    );
}

/// The upstream's limit is lower than configured: its message reveals it,
/// and the gateway keeps to the lower limit from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_hidden_limit_is_learnt_from_the_message() {
    let rule = QuotaRule::new("incidents", &["/api/incidents"], &[(3, Duration::from_secs(1))]);
    let emu = Emulator::start(upstream(rule)).await;
    let gw = TestGateway::start(
        &emu.url(),
        r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{ limit = 10, per = "1s" }]
max_wait = "10s"
max_queue = 100
"#,
    )
    .await;
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..15 {
        let req = http.get(gw.url("/api/incidents")).header("authorization", bearer("t", "a"));
        tasks.push(tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert!(emu.throttled() <= 2, "learnt after the first throttle, got {}", emu.throttled());
    assert_eq!(gw.metric("quotagate_upstream_revealed_limit{policy=\"incidents\"}").await, 3.0);
}

/// Failures are never silent: refused (refunded) is a 502, a stall after
/// sending is a 504 (spent), a reset mid-body is an aborted body, and
/// garbage is a 502 that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_answered_and_accounted() {
    let one_per_10s = r#"
[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{ limit = 1, per = "10s" }]
mode = "reject"
header_timeout = "500ms"
total_timeout = "2s"
"#;
    let http = client();
    // Refused: the admission is refunded, so the next call is not throttled locally.
    let closed = ClosedPort::hold();
    let gw = TestGateway::start(&closed.url(), one_per_10s).await;
    for _ in 0..2 {
        let r = http
            .get(gw.url("/api/incidents"))
            .header("authorization", bearer("t", "a"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "refunded, so not a local 429");
    }

    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), one_per_10s).await;
    let get =
        |tenant: &str| http.get(gw.url("/api/incidents")).header("authorization", bearer(tenant, "a")).send();
    // Stall after the request was sent: a 504, and the slot stays spent.
    emu.set_fault(Fault::Stall);
    let r = get("stall").await.unwrap();
    assert_eq!(r.status(), 504);
    emu.set_fault(Fault::None);
    assert_eq!(get("stall").await.unwrap().status(), 429, "the stalled call's admission stays spent");

    // Garbage: a 502 that says what happened.
    emu.set_fault(Fault::Garbage);
    let r = get("garbage").await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("upstream `defender` failed"), "{body}");

    // A reset mid-body: the client's read fails; it never sees a short "success".
    emu.set_fault(Fault::ResetMidBody);
    let r = get("reset").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "an aborted body, not a truncated one");
    assert_eq!(
        gw.metric("quotagate_upstream_failures_total{kind=\"timeout\",policy=\"incidents\"}").await,
        1.0
    );
    assert_eq!(
        gw.metric("quotagate_upstream_failures_total{kind=\"protocol\",policy=\"incidents\"}").await,
        1.0
    );
}

/// A body too large to keep for a replay is sent once and never retried:
/// the client gets the honest 429 instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_keep_is_not_retried() {
    let rule = QuotaRule::new("hunting", &["/api/advancedhunting/run"], &[(5, Duration::from_secs(2))]);
    let emu = Emulator::start(upstream(rule)).await;
    let gw = TestGateway::start(&emu.url(), &format!("retry_body_bytes = 100\n{POLICY}")).await;
    emu.spend("hunting", "t", "a", 5);
    let query = format!("DeviceEvents | where DeviceName has '{}'", "x".repeat(200));
    let r = client()
        .post(gw.url("/api/advancedhunting/run"))
        .header("authorization", bearer("t", "a"))
        .json(&serde_json::json!({ "Query": query }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "upstream");
    assert_eq!(emu.count(), 1, "not retried");
    assert!(emu.requests()[0].body.len() > 200, "the body was streamed through whole");
}

/// A policy in reject mode never waits, so an upstream throttle comes back at
/// once as an honest 429, and the key is held for the next caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_passes_an_upstream_throttle_on_at_once() {
    let emu = Emulator::start(upstream(incidents(ThrottleStyle::HeaderAndBody))).await;
    let gw = TestGateway::start(&emu.url(), &POLICY.replace("max_wait = \"6s\"", "mode = \"reject\"")).await;
    emu.spend("incidents", "t", "a", 5);
    let get = || client().get(gw.url("/api/incidents")).header("authorization", bearer("t", "a")).send();
    let started = Instant::now();
    let r = get().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "upstream");
    assert_eq!(r.headers()["retry-after"], "2");
    let held = get().await.unwrap();
    assert_eq!(
        (held.status().as_u16(), &held.headers()["x-quotagate-throttled-by"]),
        (429, &"gateway".parse().unwrap())
    );
    assert_eq!(emu.count(), 1);
}

const FLAKY: &str = r#"
[[policy]]
name = "flaky"
paths = ["/api/test/flaky/**", "/api/test/status/**", "/v1.0/test/flaky/**"]
windows = [{ limit = 100, per = "1s" }]
max_wait = "6s"
"#;

/// Graph 503 and 504 with `Retry-After` are waited out and retried, as the
/// Graph SDKs do; without `Retry-After` they are the upstream's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_503_and_504_with_retry_after_are_retried() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), FLAKY).await;
    let http = client();
    for (path, server_time) in [
        ("/v1.0/test/flaky/503/1?retry_after=1", Duration::from_secs(1)),
        ("/v1.0/test/flaky/504/2?retry_after=0.4", Duration::from_millis(400)),
    ] {
        let started = Instant::now();
        let r = http.get(gw.url(path)).header("authorization", bearer("t", "a")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(started.elapsed() >= server_time, "{path}");
    }
    let seen = emu.requests();
    assert_eq!(seen.len(), 2 + 3);
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(995));
    assert!(
        seen[3].at - seen[2].at >= Duration::from_millis(395)
            && seen[4].at - seen[3].at >= Duration::from_millis(395)
    );

    let r = http
        .get(gw.url("/v1.0/test/flaky/503/5"))
        .header("authorization", bearer("t", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "a 503 without a time is passed on");
    assert_eq!(emu.count(), 6, "and not retried");
}

/// A concurrency throttle (live response sessions) waits and retries only
/// the request that got it; the key is not held for anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_throttle_affects_only_its_request() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), FLAKY).await;
    let http = client();
    let busy = http
        .post(gw.url("/api/test/flaky/429/1?retry_after=1&message=Maximum%20concurrent%20live%20response%20sessions%20reached"))
        .header("authorization", bearer("t", "a"));
    let started = Instant::now();
    let busy = tokio::spawn(async move { busy.send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = http
        .get(gw.url("/api/test/status/200"))
        .header("authorization", bearer("t", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(700), "the same key is not held");
    assert_eq!(busy.await.unwrap().unwrap(), 200, "the throttled request itself is retried");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        gw.metric("quotagate_upstream_throttles_total{kind=\"concurrency\",policy=\"flaky\"}").await,
        1.0
    );
    assert_eq!(gw.metric("quotagate_upstream_holds_total{policy=\"flaky\"}").await, 0.0);
}

/// A 429 whose body is too long to read is still a throttle: the status
/// and `Retry-After` say how long to wait, the key is held, and the client
/// gets a 429 it can read, not a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_an_unreadable_body_still_holds_the_key() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), FLAKY).await;
    let http = client();
    let r = http
        .get(gw.url("/api/test/flaky/429/1?retry_after=3&pad=100000"))
        .header("authorization", bearer("t", "a"))
        .header("x-quotagate-max-wait", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "upstream");
    let n: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3..=4).contains(&n), "the upstream's Retry-After: {n}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TooManyRequests", "{body}");
    let held = http
        .get(gw.url("/api/test/status/200"))
        .header("authorization", bearer("t", "a"))
        .header("x-quotagate-max-wait", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (held.status().as_u16(), &held.headers()["x-quotagate-throttled-by"]),
        (429, &"gateway".parse().unwrap())
    );
    assert_eq!(emu.count(), 1, "the held call never reached the upstream");
    assert_eq!(gw.metric("quotagate_upstream_holds_total{policy=\"flaky\"}").await, 1.0);
}

/// A hold in force shows in `/quota` and in the metrics while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_in_force_is_visible_to_operators() {
    let emu = Emulator::start(upstream(incidents(ThrottleStyle::HeaderAndBody))).await;
    let gw = TestGateway::start(&emu.url(), POLICY).await;
    emu.spend("incidents", "t", "a", 5);
    let r = client()
        .get(gw.url("/api/incidents"))
        .header("authorization", bearer("t", "a"))
        .header("x-quotagate-max-wait", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(gw.metric("quotagate_upstream_holds_active{policy=\"incidents\"}").await, 1.0);
    let quota: serde_json::Value =
        client().get(gw.admin_url("/quota")).send().await.unwrap().json().await.unwrap();
    let held = quota["tenants"][0]["keys"][0]["held_for_seconds"].as_f64().unwrap();
    assert!(held > 1.0 && held <= 2.0, "{held}");
}
