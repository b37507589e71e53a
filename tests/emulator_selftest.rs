//! Tests of the upstream emulator itself, driven directly with `reqwest`.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::emulator::*;

const TENANT_A: &str = "11111111-1111-1111-1111-111111111111";
const TENANT_B: &str = "22222222-2222-2222-2222-222222222222";
const APP_1: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const APP_2: &str = "aaaaaaaa-0000-0000-0000-000000000002";

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// An unsigned JWT carrying the given claims.
fn token_with(claims: Value) -> String {
    format!("{}.{}.sig", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims))
}

/// A v1.0 token for `tid` and `appid`.
fn token(tid: &str, appid: &str) -> String {
    token_with(json!({"tid": tid, "appid": appid, "ver": "1.0"}))
}

async fn call(em: &Emulator, method: reqwest::Method, path: &str, tok: Option<&str>) -> reqwest::Response {
    let mut rb = reqwest::Client::new().request(method, format!("{}{path}", em.url()));
    if let Some(t) = tok {
        rb = rb.bearer_auth(t);
    }
    rb.json(&json!({"Query": "DeviceInfo | take 1"})).send().await.expect("request")
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

#[tokio::test]
async fn defender_quota_throttles_then_recovers() {
    let rule = QuotaRule::new("hunt", &["/api/advancedhunting/"], &[(3, Duration::from_secs(1))])
        .methods(&[http::Method::POST]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let tok = token(TENANT_A, APP_1);
    for _ in 0..3 {
        let r = call(&em, reqwest::Method::POST, "/api/AdvancedHunting/run", Some(&tok)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert!(v["Results"][0]["x"].as_str().unwrap().starts_with("row-00000000-"));
        assert_eq!(v["Stats"]["dataset_statistics"][0]["table_row_count"], 1);
    }
    let r = call(&em, reqwest::Method::POST, "/api/advancedhunting/run", Some(&tok)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, "retry-after"), "1");
    let v: Value = r.json().await.unwrap();
    let expected = "API calls quota exceeded! Maximum allowed 3 per 00:00:01 for the key \
                    Destination+TenantID+AppID. You can send requests again in 1 seconds.";
    assert_eq!(v, json!({"error": {"code": "429", "message": expected, "target": TENANT_A}}));

    // A GET is not covered by the POST-only rule.
    let r = call(&em, reqwest::Method::GET, "/api/advancedhunting/run", Some(&tok)).await;
    assert_eq!(r.status(), StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(1050)).await;
    let r = call(&em, reqwest::Method::POST, "/api/advancedhunting/run", Some(&tok)).await;
    assert_eq!(r.status(), StatusCode::OK);

    assert_eq!(em.count(), 6);
    assert_eq!(em.throttled(), 1);
    assert_eq!(em.accepted("hunt"), 4);
    let times = em.accepted_times("hunt", TENANT_A);
    assert_eq!(times.len(), 4);
    assert_eq!(max_in_any_interval(&times, Duration::from_secs(1)), 3);
    let seen = em.requests();
    let statuses: Vec<u16> = seen.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 200, 200]);
    assert_eq!(seen[3].rule.as_deref(), Some("hunt"));
    assert!(!seen[3].admitted);
    assert_eq!(seen[4].rule, None);
    assert_eq!(seen[0].tenant.as_deref(), Some(TENANT_A));
    assert_eq!(seen[0].app.as_deref(), Some(APP_1));
    assert_eq!(&seen[0].body[..], br#"{"Query":"DeviceInfo | take 1"}"#);
    assert!(seen.windows(2).all(|w| w[0].at <= w[1].at));
}

#[tokio::test]
async fn graph_quota_uses_graph_envelope() {
    let rule =
        QuotaRule::new("graph", &["/v1.0/security/", "/beta/security/"], &[(3, Duration::from_secs(1))]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let tok = token(TENANT_A, APP_1);
    for path in
        ["/v1.0/security/runHuntingQuery", "/beta/security/runHuntingQuery", "/v1.0/security/alerts_v2"]
    {
        let r = call(&em, reqwest::Method::POST, path, Some(&tok)).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = call(&em, reqwest::Method::POST, "/v1.0/security/runHuntingQuery", Some(&tok)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "content-type"), "application/json");
    let ra = header(&r, "retry-after").to_string();
    let (whole, frac) = ra.split_once('.').expect("fractional Retry-After");
    assert!(whole.chars().all(|c| c.is_ascii_digit()) && frac.len() == 3, "{ra}");
    let secs: f64 = ra.parse().unwrap();
    assert!(secs > 0.0 && secs <= 1.0, "{ra}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "TooManyRequests");
    assert_eq!(v["error"]["message"], "Please retry again later.");
    let inner = &v["error"]["innerError"];
    assert_eq!(inner["code"], "429");
    assert_eq!(inner["status"], "429");
    assert_eq!(inner["message"], "Please retry after");
    assert_eq!(inner["date"].as_str().unwrap().len(), 19);
    assert_eq!(inner["request-id"].as_str().unwrap().len(), 36);

    tokio::time::sleep(Duration::from_secs_f64(secs) + Duration::from_millis(20)).await;
    let r = call(&em, reqwest::Method::POST, "/v1.0/security/runHuntingQuery", Some(&tok)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert!(v["results"][0]["x"].as_str().unwrap().starts_with("row-00000000-"));
    assert!(v["@odata.context"].is_string());
}

#[tokio::test]
async fn keys_separate_tenants_and_apps() {
    let long = Duration::from_secs(60);
    let cfg = EmulatorConfig::new()
        .quota(QuotaRule::new("incidents", &["/api/incidents"], &[(5, long), (1, long)]))
        .quota(QuotaRule::new("alerts", &["/api/alerts"], &[(1, long)]).key(KeyScope::Tenant));
    let em = Emulator::start(cfg).await;
    let get = reqwest::Method::GET;
    let (a1, a2, b1) = (token(TENANT_A, APP_1), token(TENANT_A, APP_2), token(TENANT_B, APP_1));

    let r = call(&em, get.clone(), "/api/incidents?$top=10", Some(&a1)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["value"][0]["status"], "Active");
    let r = call(&em, get.clone(), "/api/incidents", Some(&a1)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((59..=60).contains(&wait));
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("Maximum allowed 1 per 00:01:00"), "{msg}");
    assert!(msg.ends_with(&format!("again in {wait} seconds.")), "{msg}");
    assert_eq!(call(&em, get.clone(), "/api/incidents", Some(&a2)).await.status(), StatusCode::OK);
    assert_eq!(call(&em, get.clone(), "/api/incidents", Some(&b1)).await.status(), StatusCode::OK);

    // Tenant-scoped: another app of the same tenant shares the budget, another tenant does not.
    assert_eq!(call(&em, get.clone(), "/api/alerts", Some(&a1)).await.status(), StatusCode::OK);
    assert_eq!(
        call(&em, get.clone(), "/api/alerts", Some(&a2)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(call(&em, get.clone(), "/api/alerts", Some(&b1)).await.status(), StatusCode::OK);

    assert_eq!(em.accepted("incidents"), 3);
    assert_eq!(em.accepted_times("incidents", TENANT_A).len(), 2);
    assert_eq!(em.accepted_times("alerts", TENANT_B).len(), 1);
    assert_eq!(em.throttled(), 2);
}

#[tokio::test]
async fn identity_from_tokens() {
    let rule = QuotaRule::new("any", &["/api/"], &[(100, Duration::from_secs(1))]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let post = reqwest::Method::POST;

    let r = call(&em, post.clone(), "/api/machines", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "Unauthorized");
    assert_eq!(
        call(&em, post.clone(), "/api/machines", Some("not-a-jwt")).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // v2.0 tokens name the app in `azp`; padded base64url is accepted too.
    let v2 = token_with(json!({"tid": TENANT_B, "azp": APP_2, "appid": "ignored", "ver": "2.0"}));
    assert_eq!(call(&em, post.clone(), "/api/machines", Some(&v2)).await.status(), StatusCode::OK);
    let claims = json!({"tid": TENANT_A, "azp": APP_1}).to_string();
    let padded = format!("e30.{}.sig", base64::engine::general_purpose::URL_SAFE.encode(claims));
    assert_eq!(call(&em, post.clone(), "/api/machines", Some(&padded)).await.status(), StatusCode::OK);
    // Unmetered paths need no token.
    assert_eq!(call(&em, post.clone(), "/v1.0/security/alerts", None).await.status(), StatusCode::OK);

    let seen = em.requests();
    assert_eq!((seen[2].tenant.as_deref(), seen[2].app.as_deref()), (Some(TENANT_B), Some(APP_2)));
    assert_eq!((seen[3].tenant.as_deref(), seen[3].app.as_deref()), (Some(TENANT_A), Some(APP_1)));
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [401, 401, 200, 200, 200]);
    assert_eq!(em.accepted("any"), 2);
}

#[tokio::test]
async fn test_endpoints() {
    let em = Emulator::start(EmulatorConfig::new()).await;
    let client = reqwest::Client::new();

    let n = 300_000;
    let r = client.get(format!("{}/api/test/bytes/{n}", em.url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert!(r.headers().get("content-length").is_none());
    assert_eq!(header(&r, "transfer-encoding"), "chunked");
    assert_eq!(r.bytes().await.unwrap().to_vec(), bytes_pattern(n));
    // Past the largest body it makes up (and past what memory holds): a 400, not a panic.
    for n in ["67108865", "15503280078736851043"] {
        let r = client.get(format!("{}/api/test/bytes/{n}", em.url())).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{n}");
    }

    let r = client.get(format!("{}/api/test/gzip", em.url())).send().await.unwrap();
    assert_eq!(header(&r, "content-encoding"), "gzip");
    assert_eq!(header(&r, "content-type"), "application/json");
    let raw = r.bytes().await.unwrap();
    assert_eq!(raw.to_vec(), gzip_payload());
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut plain).unwrap();
    assert_eq!(plain, GZIP_PLAIN);

    let r = client
        .patch(format!("{}/api/test/echo?a=1&b=%20", em.url()))
        .header("x-one", "1")
        .header("x-two", "2")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "PATCH");
    assert_eq!(v["uri"], "/api/test/echo?a=1&b=%20");
    assert_eq!((v["body_len"].as_u64(), v["body"].as_str()), (Some(5), Some("hello")));
    let names: Vec<&str> = v["headers"].as_array().unwrap().iter().map(|h| h[0].as_str().unwrap()).collect();
    let (one, two) = (names.iter().position(|n| *n == "x-one"), names.iter().position(|n| *n == "x-two"));
    assert!(one.unwrap() < two.unwrap(), "{names:?}");

    let r = client.delete(format!("{}/api/test/status/503", em.url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "x-emulator-status"), "503");
    assert_eq!(header(&r, "set-cookie"), "a=b; Path=/");
    assert_eq!(header(&r, "cache-control"), "no-store");
    assert_eq!(header(&r, "content-type"), "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"error": {"code": "Status503", "message": "status 503"}}));

    let start = Instant::now();
    let r = client.get(format!("{}/api/test/slow/80", em.url())).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"value":[]}"#);
    assert!(start.elapsed() >= Duration::from_millis(80));

    let r = client.get(format!("{}/v1.0/test/status/418", em.url())).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 418);

    // A flaky endpoint's made-up failure is marked like status/{code}'s;
    // once it has failed as often as asked, its success is not.
    let flaky = format!("{}/api/test/flaky/500/1", em.url());
    let r = client.get(&flaky).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(header(&r, "x-emulator-status"), "500");
    let r = client.get(&flaky).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-emulator-status").is_none());

    assert_eq!(em.count(), 10);
    assert_eq!(em.requests()[5].status, 503);
    assert_eq!(em.throttled(), 0);
}

#[test]
fn max_in_any_interval_by_hand() {
    let t0 = Instant::now();
    let times: Vec<Instant> =
        [1050, 0, 100, 200, 900, 1000].iter().map(|ms| t0 + Duration::from_millis(*ms)).collect();
    // [100, 1100) holds 100, 200, 900, 1000, 1050.
    assert_eq!(max_in_any_interval(&times, Duration::from_secs(1)), 5);
    // Half-open: 0 and 100 do not share a 100 ms interval; 1000 and 1050 do.
    assert_eq!(max_in_any_interval(&times, Duration::from_millis(100)), 2);
    assert_eq!(max_in_any_interval(&times, Duration::from_millis(50)), 1);
    assert_eq!(max_in_any_interval(&times, Duration::from_secs(2)), 6);
    assert_eq!(max_in_any_interval(&[], Duration::from_secs(1)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_burst_admits_exactly_the_limit() {
    let rule = QuotaRule::new("burst", &["/api/alerts"], &[(3, Duration::from_secs(5))]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let tok = token(TENANT_A, APP_1);
    let calls = (0..20).map(|_| call(&em, reqwest::Method::GET, "/api/alerts", Some(&tok)));
    let statuses: Vec<u16> =
        futures_util::future::join_all(calls).await.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 17);
    assert_eq!((em.accepted("burst"), em.throttled(), em.count()), (3, 17, 20));
}

#[tokio::test]
async fn throttle_styles_and_running_time_wording() {
    use ThrottleStyle::*;
    let timed = "API calls quota exceeded! Maximum allowed 1 per 00:01:00 for the key \
                 Destination+TenantID+AppID. You can send requests again in 60 seconds.";
    let untimed = "API calls quota exceeded! maximum allowed 1 per 00:01:00";
    let cpu_timed = "You have exceeded processing resources allocated to this tenant. \
                     You can run queries again in 00:01:00.";
    let cpu_untimed = "You have exceeded processing resources allocated to this tenant.";
    // (path, style, running time, Retry-After, Defender message)
    let cases = [
        ("/api/calls/both", HeaderAndBody, false, Some("60"), timed),
        ("/api/calls/header", HeaderOnly, false, Some("60"), untimed),
        ("/api/calls/body", BodyOnly, false, None, timed),
        ("/api/calls/neither", Neither, false, None, untimed),
        ("/api/cpu/both", HeaderAndBody, true, Some("60"), cpu_timed),
        ("/api/cpu/header", HeaderOnly, true, Some("60"), cpu_untimed),
        ("/api/cpu/body", BodyOnly, true, None, cpu_timed),
        ("/api/cpu/neither", Neither, true, None, cpu_untimed),
    ];
    let graph = [
        ("/v1.0/security/both", HeaderAndBody, false),
        ("/v1.0/security/header", HeaderOnly, false),
        ("/beta/security/body", BodyOnly, false),
        ("/v1.0/security/neither", Neither, false),
        ("/v1.0/security/cpu", HeaderAndBody, true),
        ("/beta/security/cpu-neither", Neither, true),
    ];
    let minute = [(1, Duration::from_secs(60))];
    let mut cfg = EmulatorConfig::new();
    for (path, style, cpu) in cases.iter().map(|c| (c.0, c.1, c.2)).chain(graph) {
        let rule = QuotaRule::new(path, &[path], &minute).style(style);
        cfg = cfg.quota(if cpu { rule.running_time() } else { rule });
    }
    let em = Emulator::start(cfg).await;
    let tok = token(TENANT_A, APP_1);
    let post = reqwest::Method::POST;

    for (path, style, cpu, retry_after, message) in cases {
        assert_eq!(call(&em, post.clone(), path, Some(&tok)).await.status(), StatusCode::OK, "{path}");
        let r = call(&em, post.clone(), path, Some(&tok)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(header(&r, "content-type"), "application/json", "{path}");
        assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap()), retry_after, "{path}");
        let v: Value = r.json().await.unwrap();
        let expected = json!({"error": {"code": "429", "message": message, "target": TENANT_A}});
        assert_eq!(v, expected, "{path} {style:?} running time {cpu}");
    }

    for (path, style, _) in graph {
        assert_eq!(call(&em, post.clone(), path, Some(&tok)).await.status(), StatusCode::OK, "{path}");
        let r = call(&em, post.clone(), path, Some(&tok)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        let ra = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        if matches!(style, HeaderAndBody | HeaderOnly) {
            let ra = ra.unwrap_or_else(|| panic!("{path}: Retry-After expected"));
            assert_eq!(ra.split_once('.').map(|(_, frac)| frac.len()), Some(3), "{path}: {ra}");
            let secs: f64 = ra.parse().unwrap();
            assert!(secs > 59.0 && secs <= 60.0, "{path}: {ra}");
        } else {
            assert_eq!(ra, None, "{path}");
        }
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "TooManyRequests", "{path}");
        assert_eq!(v["error"]["message"], "Please retry again later.", "{path}");
        assert_eq!(v["error"]["innerError"]["status"], "429", "{path}");
    }
    assert_eq!(em.throttled(), cases.len() + graph.len());
}

#[tokio::test]
async fn spend_uses_the_budget_like_another_tool() {
    let minute = Duration::from_secs(60);
    let cfg = EmulatorConfig::new()
        .quota(QuotaRule::new("hunt", &["/api/advancedhunting/"], &[(3, minute)]))
        .quota(QuotaRule::new("alerts", &["/api/alerts"], &[(2, minute)]).key(KeyScope::Tenant));
    let em = Emulator::start(cfg).await;
    let (a1, a2, b1) = (token(TENANT_A, APP_1), token(TENANT_A, APP_2), token(TENANT_B, APP_1));
    let (post, get) = (reqwest::Method::POST, reqwest::Method::GET);
    let hunt = "/api/advancedhunting/run";

    em.spend("hunt", TENANT_A, APP_1, 2);
    assert_eq!(call(&em, post.clone(), hunt, Some(&a1)).await.status(), StatusCode::OK);
    let r = call(&em, post.clone(), hunt, Some(&a1)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "60");
    // Another app of the tenant has its own budget under a tenant+app rule.
    assert_eq!(call(&em, post.clone(), hunt, Some(&a2)).await.status(), StatusCode::OK);

    // Under a tenant rule, whatever app the other tool used, the tenant's budget is spent.
    em.spend("alerts", TENANT_A, "some-other-tool", 2);
    assert_eq!(
        call(&em, get.clone(), "/api/alerts", Some(&a1)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(call(&em, get.clone(), "/api/alerts", Some(&b1)).await.status(), StatusCode::OK);

    // Spent arrivals are not requests the emulator received.
    assert_eq!(em.count(), 5);
    assert_eq!((em.accepted("hunt"), em.accepted("alerts"), em.throttled()), (2, 1, 2));
}

#[tokio::test]
async fn faults_as_a_client_sees_them() {
    let rule = QuotaRule::new("any", &["/api/"], &[(100, Duration::from_secs(60))]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let tok = token(TENANT_A, APP_1);
    let url = format!("{}/api/alerts", em.url());
    // One client throughout: its pooled, kept-alive connection meets the faults too.
    let client = reqwest::Client::new();
    let r = client.get(&url).bearer_auth(&tok).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"value":[]}"#);

    em.set_fault(Fault::Garbage);
    let err = client.get(&url).bearer_auth(&tok).send().await.unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");

    em.set_fault(Fault::ResetMidBody);
    let r = client.get(&url).bearer_auth(&tok).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, "content-length"), "100000");
    assert!(r.bytes().await.is_err(), "the body must not complete");

    em.set_fault(Fault::Stall);
    let start = Instant::now();
    let body = json!({"Query": "DeviceInfo | take 1"});
    let send = client.post(&url).bearer_auth(&tok).json(&body).timeout(Duration::from_millis(300)).send();
    let err = send.await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(300));

    em.set_fault(Fault::None);
    let r = reqwest::Client::new().get(&url).bearer_auth(&tok).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let seen = em.requests();
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 0, 0, 0, 200]);
    assert_eq!(seen.iter().map(|r| r.admitted).collect::<Vec<_>>(), [true, false, false, false, true]);
    assert_eq!(seen[3].rule.as_deref(), Some("any"));
    assert_eq!(seen[3].tenant.as_deref(), Some(TENANT_A));
    assert_eq!(&seen[3].body[..], br#"{"Query":"DeviceInfo | take 1"}"#, "a stalled request is read whole");
    assert_eq!((em.accepted("any"), em.throttled()), (2, 0));
}

/// Reads until `s` closes cleanly or fails; returns what came and the error, if any.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut got)).await {
            Ok(Ok(0)) => return (got, None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return (got, Some(e)),
            Err(_) => panic!("the connection stayed open: {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

#[tokio::test]
async fn faults_on_the_wire() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;
    let em = Emulator::start(EmulatorConfig::new()).await;
    let get = b"GET /api/alerts HTTP/1.1\r\nHost: upstream\r\n\r\n";

    // A fault set between two requests on one kept-alive connection meets the second.
    let mut s = TcpStream::connect(em.addr()).await.unwrap();
    s.write_all(get).await.unwrap();
    let mut first = Vec::new();
    while !first.ends_with(br#"{"value":[]}"#) {
        assert_ne!(s.read_buf(&mut first).await.unwrap(), 0, "closed early");
    }
    assert!(first.starts_with(b"HTTP/1.1 200 OK\r\n"));
    em.set_fault(Fault::Garbage);
    s.write_all(get).await.unwrap();
    let (got, err) = read_to_close(&mut s).await;
    assert_eq!((&got[..], err.map(|e| e.kind())), (&b"this is not HTTP at all\r\n\r\n"[..], None));

    // A truncated response, then a reset rather than a clean close.
    em.set_fault(Fault::ResetMidBody);
    let mut s = TcpStream::connect(em.addr()).await.unwrap();
    s.write_all(get).await.unwrap();
    let (got, err) = read_to_close(&mut s).await;
    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::ConnectionReset));
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 100000\r\n"), "{head}");
    assert_eq!(got.len() - head_end, 1000);

    // A stalled connection answers nothing, and closes when the fault is cleared...
    em.set_fault(Fault::Stall);
    let post = b"POST /api/alerts HTTP/1.1\r\nHost: upstream\r\nContent-Length: 5\r\n\r\nhello";
    let mut s = TcpStream::connect(em.addr()).await.unwrap();
    s.write_all(post).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await.is_err());
    em.set_fault(Fault::None);
    assert_eq!(read_to_close(&mut s).await.0, b"");
    // ...or when the emulator is dropped.
    em.set_fault(Fault::Stall);
    let mut s = TcpStream::connect(em.addr()).await.unwrap();
    s.write_all(post).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await.is_err());

    let seen = em.requests();
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 0, 0, 0, 0]);
    assert_eq!(&seen[3].body[..], b"hello");
    drop(em);
    assert_eq!(read_to_close(&mut s).await.0, b"");
}

#[tokio::test]
async fn delay_header_holds_the_answer_not_the_decision() {
    let rule = QuotaRule::new("hunt", &["/api/advancedhunting/"], &[(1, Duration::from_secs(60))]);
    let em = Emulator::start(EmulatorConfig::new().quota(rule)).await;
    let url = format!("{}/api/advancedhunting/run", em.url());
    let tok = token(TENANT_A, APP_1);
    let client = reqwest::Client::new();

    let start = Instant::now();
    let hunt = json!({"Query": "DeviceInfo | take 1"});
    let r = client.post(&url).bearer_auth(&tok).header(DELAY_HEADER, "150").json(&hunt).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));

    // The client gives up first; the verdict (429) was taken, and recorded, on arrival.
    let slow = client.post(&url).bearer_auth(&tok).header(DELAY_HEADER, "2000");
    let err = slow.timeout(Duration::from_millis(100)).send().await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(em.requests().iter().map(|r| r.status).collect::<Vec<_>>(), [200, 429]);
    assert_eq!(em.accepted("hunt"), 1);
}

/// Running-time budgets: a query arriving while the tenant's trailing window
/// holds its budget gets the service's running-time 429, other tenants do not.
#[tokio::test]
async fn running_time_budgets_throttle_a_spent_tenant() {
    let em = Emulator::start(
        EmulatorConfig::new().running_time(Duration::from_millis(100), Duration::from_secs(2)),
    )
    .await;
    let url = format!("{}/api/advancedhunting/run", em.url());
    let client = reqwest::Client::new();
    let run = |tok: String, cost: f64| {
        client
            .post(&url)
            .bearer_auth(tok)
            .json(&json!({"Query": format!("T | take 1 // cost={cost}")}))
            .send()
    };
    let started = Instant::now();
    let r = run(token(TENANT_A, APP_1), 0.15).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150), "the query runs for its cost");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["Stats"]["ExecutionTime"], 0.15);
    let r = run(token(TENANT_A, APP_1), 0.01).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "2");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().starts_with("You have exceeded processing resources"),
        "{v}"
    );
    assert_eq!(run(token(TENANT_B, APP_1), 0.01).await.unwrap().status(), StatusCode::OK);
    assert_eq!(em.charges(TENANT_A).0.len(), 1);
    assert_eq!(em.throttled(), 1);
}

/// `cost=A..B`: the same query text costs a different amount each run,
/// within the range, and reports and charges what it ran.
#[tokio::test]
async fn a_cost_range_draws_each_runs_cost() {
    let em = Emulator::start(EmulatorConfig::new()).await;
    let url = format!("{}/api/advancedhunting/run", em.url());
    let client = reqwest::Client::new();
    let mut costs = Vec::new();
    for _ in 0..8 {
        let r = client
            .post(&url)
            .bearer_auth(token(TENANT_A, APP_1))
            .json(&json!({"Query": "T | take 1 // cost=0.01..0.05"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        costs.push(v["Stats"]["ExecutionTime"].as_f64().unwrap());
    }
    assert!(costs.iter().all(|c| (0.01..=0.05).contains(c)), "{costs:?}");
    assert!(costs.iter().any(|c| *c != costs[0]), "the cost is drawn each run: {costs:?}");
    let charged: f64 = em.charges(TENANT_A).0.iter().map(|c| c.1.as_secs_f64()).sum();
    assert!((charged - costs.iter().sum::<f64>()).abs() < 1e-6, "charged {charged}, reported {costs:?}");
}
