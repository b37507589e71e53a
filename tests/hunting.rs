//! Hunting running time end to end: the real gateway on port 0 in front of
//! the emulator, which runs each query for the cost its text names, reports
//! `Stats` like the service and enforces per-tenant running-time budgets with
//! the service's 429. Windows are scaled: an "hour" of a few seconds.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::emulator::{Emulator, EmulatorConfig, Fault};
use support::gateway::TestGateway;
use support::hunt::{self, body, query};
use support::{bearer, client};

const HUNT: &str = "/api/advancedhunting/run";
const GRAPH_HUNT: &str = "/v1.0/security/runHuntingQuery";

/// A hunting policy with call windows that never bind, and `[hunting]` settings.
fn hunting_config(budgets: &str, extra: &str) -> String {
    format!(
        r#"
[hunting]
budgets = {budgets}
estimate = "40ms"
estimate_percentile = 95
{extra}

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["{HUNT}", "{GRAPH_HUNT}"]
windows = [{{ limit = 100000, per = "1s" }}]
hunting = true
max_wait = "30s"
"#
    )
}

/// A tiny deterministic generator, so costs are mixed but reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// POST a Defender hunting query for tenant `t` as a client that accepts
/// `accept_encoding`.
async fn post_accepting(gw: &TestGateway, accept_encoding: &str, q: &str) -> reqwest::Response {
    client()
        .post(gw.url(HUNT))
        .header("authorization", bearer("t", "a"))
        .header("accept-encoding", accept_encoding)
        .body(body(q))
        .send()
        .await
        .unwrap()
}

/// A gzip body, decompressed.
fn gunzip(packed: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(packed), &mut plain).unwrap();
    plain
}

/// POST a hunting body for `tenant` to `path` on the gateway.
async fn post(
    gw: &TestGateway,
    path: &str,
    tenant: &str,
    sent: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client().post(gw.url(path)).header("authorization", bearer(tenant, "a")).body(sent).send().await.unwrap()
}

async fn quota(gw: &TestGateway) -> Value {
    reqwest::get(gw.admin_url("/quota")).await.unwrap().json().await.unwrap()
}

/// The running-time entry of `/quota` for a tenant.
fn ledger<'a>(q: &'a Value, tenant: &str) -> &'a Value {
    q["running_time"].as_array().unwrap().iter().find(|k| k["tenant"] == tenant).expect("tenant ledger")
}

/// Saturate one tenant with `clients` loops of mixed-cost queries until `until`.
fn saturate(
    gw: &TestGateway,
    tenant: &str,
    clients: u64,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..clients)
        .map(|c| {
            let (http, url, auth) = (client(), gw.url(HUNT), bearer(tenant, &format!("tool-{c}")));
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c + 1) * 0x1234_5678));
                let mut statuses = Vec::new();
                while Instant::now() < until {
                    // Costs the gateway cannot predict query by query.
                    let cost = [0.01, 0.02, 0.04][(rng.next() % 3) as usize];
                    let r = http
                        .post(&url)
                        .header("authorization", &auth)
                        .body(body(&query(cost, "")))
                        .send()
                        .await;
                    let Ok(r) = r else { continue };
                    statuses.push(r.status().as_u16());
                    let _ = r.bytes().await;
                }
                statuses
            })
        })
        .collect()
}

/// Issue #3, case 1: over-demand for three scaled hours with queries of
/// mixed cost: the upstream never throttles, no interval of an hour holds
/// more than the budget, and each full hour uses at least 95% of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_demand_for_three_hours_uses_the_budget_without_upstream_429s() {
    let _one_at_a_time = support::timing_exclusive().await;
    let hour = Duration::from_secs(4);
    let budget = Duration::from_millis(1600);
    let emu = Emulator::start(
        EmulatorConfig::new()
            .running_time(budget, hour)
            .running_time(Duration::from_secs(16), Duration::from_secs(96)),
    )
    .await;
    let gw = TestGateway::start(
        &emu.url(),
        &hunting_config(r#"[{ limit = "1600ms", per = "4s" }, { limit = "16s", per = "96s" }]"#, ""),
    )
    .await;
    let start = Instant::now();
    let until = start + 3 * hour + Duration::from_millis(300);
    let mut statuses = Vec::new();
    for t in saturate(&gw, "tenant-1", 6, until) {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(emu.throttled(), 0, "the upstream must never throttle running time");
    assert!(statuses.iter().all(|&s| s == 200), "every query is admitted in time: {statuses:?}");
    let charges = emu.charges("tenant-1");
    let most = charges.max_in_any(hour);
    assert!(most <= budget + Duration::from_millis(1), "{most:?} in one hour, budget {budget:?}");
    for h in 0..3 {
        let from = start + h * hour;
        let used = charges.between(from, from + hour);
        eprintln!("hour {h}: {used:?} of {budget:?}");
        assert!(used.as_secs_f64() >= 0.95 * budget.as_secs_f64(), "hour {h}: used {used:?} of {budget:?}");
    }
    // The gateway's own view agrees: it metered every query's Stats.
    let q = quota(&gw).await;
    let l = ledger(&q, "tenant-1");
    assert!(l["budgets"][0]["charged_seconds"].as_f64().unwrap() <= budget.as_secs_f64());
    assert_eq!(l["in_flight"], 0);
}

/// A query whose responses never carry `Stats` is charged its wall time,
/// and that cost, above its estimate, is what its next run reserves: the
/// second run waits for room instead of carrying the tenant past its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_without_stats_reserves_what_it_was_charged() {
    let _one_at_a_time = support::timing_exclusive().await;
    let hour = Duration::from_secs(3);
    let budget = Duration::from_secs(1);
    let emu = Emulator::start(EmulatorConfig::new().running_time(budget, hour)).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "1s", per = "3s" }]"#, "")).await;
    let q = query(0.8, "stats=none");
    for _ in 0..2 {
        let r = post(&gw, HUNT, "t", body(&q)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let charges = emu.charges("t");
    assert!(charges.max_in_any(hour) <= budget, "{:?} in one window", charges.max_in_any(hour));
    assert_eq!(emu.throttled(), 0);
    let estimate = ledger(&quota(&gw).await, "t")["estimate_seconds"].as_f64().unwrap();
    assert!(estimate >= 0.8, "the estimate learnt the 0.8 s charge: {estimate}");
}

/// A response of announced length without `Stats`, read to its end, is
/// counted as unmetered and charged by rule as its last bytes go: the
/// server never polls such a body past its last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sized_response_without_stats_is_reported_unmetered() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    for (i, extra) in ["bytes=400000 stats=none", "stats=none"].into_iter().enumerate() {
        let r = post(&gw, HUNT, "t", body(&query(0.05, extra))).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let want = (i + 1) as f64;
        while gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await < want {
            assert!(Instant::now() < deadline, "{extra}: never counted as unmetered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(gw.metric("quotagate_runtime_in_flight{tenant=\"t\"}").await, 0.0);
}

/// A hunting query streamed in chunks whose framing breaks never ran: the
/// client gets a 400, and no running time is reserved or charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_whose_streamed_body_breaks_is_not_charged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    let mut conn = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST {HUNT} HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        bearer("t", "a")
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(b"9\r\n{\"Query\":\r\nZZ\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The query is read whole before anything is reserved: nothing is.
    let l = quota(&gw).await;
    assert!(!l["running_time"].as_array().unwrap().iter().any(|k| k["tenant"] == "t"), "{l}");
    assert_eq!(gw.metric("quotagate_hunting_charged_seconds_total{policy=\"hunting\"}").await, 0.0);
    assert!(emu.requests().is_empty(), "nothing reached the upstream");
}

/// Issue #3, case 2: several tenants at once, each inside its own budget,
/// and a light tenant is not slowed by the saturated ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tenants_each_keep_their_own_budget() {
    let _one_at_a_time = support::timing_exclusive().await;
    let hour = Duration::from_secs(2);
    let budget = Duration::from_millis(500);
    let emu = Emulator::start(EmulatorConfig::new().running_time(budget, hour)).await;
    let gw =
        TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "500ms", per = "2s" }]"#, "")).await;
    let start = Instant::now();
    let until = start + 2 * hour + Duration::from_millis(200);
    let mut heavy = saturate(&gw, "tenant-a", 3, until);
    heavy.extend(saturate(&gw, "tenant-b", 3, until));
    // A light tenant runs one query per half hour, each admitted at once.
    let http = client();
    let mut light_waits = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        let r = http
            .post(gw.url(HUNT))
            .header("authorization", bearer("tenant-c", "tool"))
            .body(body(&query(0.02, "")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        light_waits.push(sent.elapsed());
        tokio::time::sleep(hour / 2).await;
    }
    for t in heavy {
        assert!(t.await.unwrap().iter().all(|&s| s == 200));
    }
    assert_eq!(emu.throttled(), 0);
    for tenant in ["tenant-a", "tenant-b"] {
        let charges = emu.charges(tenant);
        assert!(charges.max_in_any(hour) <= budget + Duration::from_millis(1), "{tenant}");
        for h in 0..2 {
            let from = start + h * hour;
            let used = charges.between(from, from + hour).as_secs_f64();
            assert!(used >= 0.9 * budget.as_secs_f64(), "{tenant} hour {h}: used {used}");
        }
    }
    assert!(
        light_waits.iter().all(|w| *w < Duration::from_millis(300)),
        "light tenant waited: {light_waits:?}"
    );
}

/// Run `text` with no patience (`x-quotagate-max-wait: 0`): its status and
/// `Retry-After` in seconds, if any.
async fn run_at_once(gw: &TestGateway, text: &str) -> (u16, Option<u64>) {
    let r = client()
        .post(gw.url(HUNT))
        .header("authorization", bearer("t", "a"))
        .header("x-quotagate-max-wait", "0")
        .body(body(text))
        .send()
        .await
        .unwrap();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, retry)
}

/// A scheduled query the tenant has run before reserves its own costs, not
/// the tenant's dearest: it runs in room where a query of unknown cost may
/// not (`estimate_by = "query"`, the default), and the upstream still never
/// throttles. Estimating by key, the same room stays unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_cheap_query_runs_in_room_too_small_for_the_tenants_dearest() {
    let (cheap, dear) = (query(0.05, "scheduled"), query(0.3, "dear"));
    for by in ["query", "key"] {
        let hour = Duration::from_secs(60);
        let emu = Emulator::start(EmulatorConfig::new().running_time(Duration::from_secs(1), hour)).await;
        let extra = format!("estimate_by = \"{by}\"");
        let gw =
            TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "1s", per = "60s" }]"#, &extra))
                .await;
        // 3 × 50 ms and 2 × 300 ms: 750 ms of the 1 s spent; the tenant's
        // 95th percentile is 300 ms, more than the 250 ms left.
        for text in [&cheap, &cheap, &cheap, &dear, &dear] {
            assert_eq!(run_at_once(&gw, text).await.0, 200, "{by}: while learning");
        }
        for text in [&dear, &query(0.05, "never run before")] {
            let (status, retry) = run_at_once(&gw, text).await;
            assert_eq!(status, 429, "{by}: {text}");
            assert!(retry.is_some_and(|s| (50..=60).contains(&s)), "{by}: Retry-After {retry:?}");
        }
        let mut ran = 0;
        let refused = loop {
            match run_at_once(&gw, &cheap).await {
                (200, _) => ran += 1,
                other => break other,
            }
            assert!(ran <= 5, "{by}: more than the budget admitted");
        };
        assert_eq!(refused.0, 429, "{by}: the gateway turned the query away");
        match by {
            // 250 ms left: five more 50 ms runs, give or take rounding.
            "query" => assert!((4..=5).contains(&ran), "by query: {ran} more cheap runs"),
            _ => assert_eq!(ran, 0, "by key, the cheap query reserves 300 ms too"),
        }
        assert_eq!(emu.throttled(), 0, "{by}");
        let used = emu.charges("t").max_in_any(hour);
        assert!(used <= Duration::from_secs(1), "{by}: {used:?} charged upstream");
        // Two queries cost more than they reserved, both while learning:
        // the first (50 ms against the 40 ms default) and the first dear
        // one (300 ms against the tenant's 50 ms then).
        assert_eq!(gw.metric("quotagate_hunting_overruns_total{policy=\"hunting\"}").await, 2.0, "{by}");
        let over = gw.metric("quotagate_hunting_overrun_seconds_total{policy=\"hunting\"}").await;
        assert!((over - 0.26).abs() < 1e-6, "{by}: {over} s beyond the reservations");
    }
}

/// Issue #3, case 3: a client that disconnects mid-query. The upstream
/// request is cancelled, and the ledger ends as documented: nothing in
/// flight or reserved, and the larger of the estimate and the time the query
/// ran is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_query_is_charged_by_the_documented_rule() {
    let emu =
        Emulator::start(EmulatorConfig::new().running_time(Duration::from_secs(60), Duration::from_secs(60)))
            .await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "60s", per = "60s" }]"#, "")).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let r = impatient
        .post(gw.url(HUNT))
        .header("authorization", bearer("t", "a"))
        .body(body(&query(2.0, "")))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up before the query ended");
    // The gateway notices the disconnect at once; give the drop a moment to run.
    let mut charged = 0.0;
    for _ in 0..50 {
        let q = quota(&gw).await;
        let l = ledger(&q, "t");
        charged = l["budgets"][0]["charged_seconds"].as_f64().unwrap();
        if charged > 0.0 {
            assert_eq!(l["in_flight"], 0);
            assert_eq!(l["budgets"][0]["reserved_seconds"].as_f64().unwrap(), 0.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // max(estimate 40 ms, ~300 ms sent until the client left)
    assert!((0.25..1.0).contains(&charged), "charged {charged}");
    // The metrics count the charge by rule as the ledger does, and the
    // time beyond the 40 ms the query reserved as an overrun.
    let metric = |name: &'static str| gw.metric(name);
    let counted = metric("quotagate_hunting_charged_seconds_total{policy=\"hunting\"}").await;
    assert!((counted - charged).abs() < 1e-6, "metric {counted}, ledger {charged}");
    assert_eq!(metric("quotagate_hunting_overruns_total{policy=\"hunting\"}").await, 1.0);
    let over = metric("quotagate_hunting_overrun_seconds_total{policy=\"hunting\"}").await;
    assert!((over - (charged - 0.04)).abs() < 1e-6, "overrun {over}, charged {charged}");
    // The upstream query was cancelled too: it ran about as long.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ran: Duration = emu.charges("t").0.iter().map(|c| c.1).sum();
    assert!(ran < Duration::from_secs(1), "the upstream query ran {ran:?}");
    assert!((ran.as_secs_f64() - charged).abs() < 0.2, "ledger {charged} vs upstream {ran:?}");
}

/// A client that stops reading a result before its `Stats` (past the
/// prefix) stops the body, and with it the body's own deadline. At the
/// total timeout the reservation still ends, charged by rule, so the
/// tenant's next query runs instead of waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_before_stats_holds_no_running_time_past_the_total_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let config = format!(
        r#"
[hunting]
budgets = [{{ limit = "60s", per = "60s" }}]
estimate = "40ms"
max_concurrent = 1

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["{HUNT}"]
windows = [{{ limit = 100000, per = "1s" }}]
hunting = true
max_wait = "10s"
header_timeout = "1s"
total_timeout = "1s"
"#
    );
    let gw = TestGateway::start(&emu.url(), &config).await;

    // 64 MB with `Stats` last: more than every buffer between the emulator
    // and a client that reads 1 KB and then nothing can hold (its own
    // receive buffer is fixed small, so the kernel does not grow it).
    let sent = body(&query(0.05, "bytes=67108864 stats=last"));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let t0 = Instant::now();
    let mut stalled = socket.connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST {HUNT} HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        bearer("t", "a"),
        sent.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(sent.as_bytes()).await.unwrap();
    let mut first = [0u8; 1024];
    stalled.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..64]));
    // The stalled query's headers came before this: its wall time is less.
    let headers_within = t0.elapsed();
    let l = quota(&gw).await;
    assert_eq!(ledger(&l, "t")["in_flight"], 1, "{l}");

    // The tenant's next query waits for the one in flight (at most one)...
    let next = post(&gw, HUNT, "t", body(&query(0.01, ""))).await;
    let answered = t0.elapsed();
    // ...until the total timeout (1 s from the stalled one's send) ends it,
    // not for its max_wait (10 s).
    assert_eq!(next.status(), 200, "{:?}", next.text().await);
    assert!(answered >= Duration::from_secs(1), "it did not wait for the stalled one: {answered:?}");
    assert!(answered < Duration::from_secs(5), "the next query was answered after {answered:?}");
    let l = quota(&gw).await;
    let t = ledger(&l, "t");
    assert_eq!(t["in_flight"], 0, "{l}");
    // The stalled one by rule: the larger of the estimate (40 ms) and its
    // wall time until its headers (its 50 ms cost, and the emulator's time
    // to build 64 MB, longer on a busy machine); the next from its Stats:
    // 10 ms.
    let charged = t["budgets"][0]["charged_seconds"].as_f64().unwrap();
    let most = headers_within.as_secs_f64() + 0.01;
    assert!(charged >= 0.059 && charged <= most, "charged {charged}, at most {most}");
    assert_eq!(gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await, 1.0);
    drop(stalled);
}

/// Issue #3, case 4: a 50 MB result with `Stats` first gets the metering
/// headers before it streams, and arrives byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_result_with_stats_first_streams_byte_identical_with_headers() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    let q = query(0.25, "rows=4321 bytes=52428800");
    let r = post(&gw, HUNT, "t", body(&q)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quotagate-execution-time"], "0.25");
    assert_eq!(r.headers()["x-quotagate-rows"], "4321");
    assert_eq!(r.headers()["x-quotagate-truncated"], "false");
    let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_string();
    assert!(policy.contains("\"running-time-per-hour\";q=600;w=3600;qu=\"seconds\""), "{policy}");
    let got = r.bytes().await.unwrap();
    let expected = hunt::response_body(&q, false);
    assert!(expected.len() >= 50 * 1024 * 1024);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the body must be byte-identical");
    let l = quota(&gw).await;
    assert_eq!(ledger(&l, "t")["budgets"][0]["charged_seconds"].as_f64().unwrap(), 0.25);
}

/// Issue #3, case 5: `Stats` last, after a result larger than the held-back
/// prefix: streamed at once, still metered from `Stats` at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_last_is_still_metered() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    let q = query(0.3, "bytes=400000 stats=last");
    let r = post(&gw, HUNT, "t", body(&q)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-quotagate-execution-time").is_none(), "Stats came after the prefix");
    assert_eq!(r.bytes().await.unwrap(), hunt::response_body(&q, false));
    let l = quota(&gw).await;
    let charged = ledger(&l, "t")["budgets"][0]["charged_seconds"].as_f64().unwrap();
    assert_eq!(charged, 0.3, "metered from Stats, not estimated");
    assert_eq!(gw.metric("quotagate_hunting_charged_seconds_total{policy=\"hunting\"}").await, 0.3);
    assert_eq!(gw.metric("quotagate_runtime_charged_seconds{tenant=\"t\",window=\"3600s\"}").await, 0.3);
    assert_eq!(gw.metric("quotagate_runtime_remaining_seconds{tenant=\"t\",window=\"3600s\"}").await, 599.7);
    assert_eq!(gw.metric("quotagate_runtime_in_flight{tenant=\"t\"}").await, 0.0);

    // Stats last in a small body still fits in the prefix: the headers come too.
    let q = query(0.1, "stats=last");
    let r = post(&gw, HUNT, "t", body(&q)).await;
    assert_eq!(r.headers()["x-quotagate-execution-time"], "0.1");
    // Graph has no Stats: its wall time is charged.
    let r = post(&gw, GRAPH_HUNT, "g", body(&query(0.2, ""))).await;
    let wall: f64 = r.headers()["x-quotagate-execution-time"].to_str().unwrap().parse().unwrap();
    assert!((0.2..0.5).contains(&wall), "{wall}");
    let l = quota(&gw).await;
    let charged = ledger(&l, "g")["budgets"][0]["charged_seconds"].as_f64().unwrap();
    assert!((charged - wall).abs() < 0.001, "charged {charged}, header {wall}");
}

/// A client that accepts gzip (Python's `requests` and `httpx`, the Graph
/// SDKs) gets the service's compressed result byte for byte, and the gateway
/// meters it from the `Stats` it decodes as the body passes. The upstream
/// is asked only for codings the gateway reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_result_passes_compressed_and_is_metered_from_its_stats() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(
        &emu.url(),
        &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "stats_prefix_bytes = 1024"),
    )
    .await;
    // Stats first: found in the held-back prefix, so the headers say it.
    let q = query(0.25, "");
    let r = post_accepting(&gw, "br, gzip", &q).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["x-quotagate-execution-time"], "0.25", "Stats read from the decoded body");
    assert_eq!(gunzip(&r.bytes().await.unwrap()), hunt::response_body(&q, false));
    // Stats last, after 400 KB that compress to about 200 KB, far past the
    // 1 KB held back: metered as the compressed body streams on.
    let q = query(0.3, "bytes=400000 stats=last pad=random");
    let r = post_accepting(&gw, "br, gzip", &q).await;
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(
        !r.headers().contains_key("x-quotagate-execution-time"),
        "Stats were not in the held-back prefix, so the headers cannot say them"
    );
    assert_eq!(gunzip(&r.bytes().await.unwrap()), hunt::response_body(&q, false));
    let l = quota(&gw).await;
    let charged = ledger(&l, "t")["budgets"][0]["charged_seconds"].as_f64().unwrap();
    assert!((charged - 0.55).abs() < 1e-9, "metered from both Stats, not estimated: {charged}");
    assert_eq!(gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await, 0.0);
    let asked: Vec<_> = emu.requests().iter().map(|r| r.headers["accept-encoding"].clone()).collect();
    assert!(asked.iter().all(|a| a == "gzip"), "br is not asked of the upstream: {asked:?}");
}

/// A compressed result that decodes to more than `max_scan_bytes` (a
/// compression bomb, say) is read no further: it still reaches the client
/// byte for byte, and its running time is charged by rule. One within the
/// limit is metered from its `Stats` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_decodes_past_max_scan_bytes_is_charged_by_rule_and_streams_whole() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(
        &emu.url(),
        &hunting_config(
            r#"[{ limit = "10m", per = "1h" }]"#,
            "stats_prefix_bytes = 1024\nmax_scan_bytes = 1048576",
        ),
    )
    .await;
    // 8 MB that compress to a small fraction, `Stats` last: past the 1 MiB read.
    let big = query(0.01, "bytes=8000000 stats=last");
    let r = post_accepting(&gw, "gzip", &big).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let packed = r.bytes().await.unwrap();
    assert!(packed.len() < 4_000_000, "the test needs a body that compresses: {} bytes", packed.len());
    assert_eq!(gunzip(&packed), hunt::response_body(&big, false), "streamed whole, as it came");
    assert_eq!(gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await, 1.0);
    let l = quota(&gw).await;
    let charged = ledger(&l, "t")["budgets"][0]["charged_seconds"].as_f64().unwrap();
    assert!(charged >= 0.04, "by rule (at least the 40 ms estimate), not the 10 ms of its Stats: {charged}");
    assert_eq!(ledger(&l, "t")["in_flight"], 0, "{l}");

    // Within the limit: metered from its Stats.
    let small = query(0.3, "bytes=400000 stats=last");
    let r = post_accepting(&gw, "gzip", &small).await;
    assert_eq!(gunzip(&r.bytes().await.unwrap()), hunt::response_body(&small, false));
    let l = quota(&gw).await;
    let after = ledger(&l, "t")["budgets"][0]["charged_seconds"].as_f64().unwrap();
    assert!((after - charged - 0.3).abs() < 1e-9, "metered from Stats: {charged} then {after}");
    assert_eq!(gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await, 1.0);
}

/// An upstream that resets before `Stats` aborts the client's transfer at
/// once, and the reservation ends by the documented rule. Regression (found
/// by the soak, `bench/soak.sh`): the held-back prefix and the error were
/// replayed by a body that claimed to end after the prefix, so hyper ended
/// the response there and the client, told the upstream's Content-Length,
/// waited for the rest until its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_before_stats_aborts_the_transfer() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    emu.set_fault(Fault::ResetMidBody);
    // The timeout only bounds a hang; an aborted transfer fails at once.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let r = http
        .post(gw.url(HUNT))
        .header("authorization", bearer("t", "a"))
        .body(body(&query(0.01, "")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the upstream's status, sent before its reset");
    let err = r.bytes().await.expect_err("an aborted body, never a whole one");
    assert!(!err.is_timeout(), "the transfer hung instead of aborting: {err:#}");
    let l = quota(&gw).await;
    let l = ledger(&l, "t");
    assert_eq!(l["in_flight"], 0);
    assert_eq!(l["budgets"][0]["reserved_seconds"].as_f64().unwrap(), 0.0);
    assert_eq!(l["budgets"][0]["charged_seconds"].as_f64().unwrap(), 0.04, "the estimate, by rule");
    assert_eq!(gw.metric("quotagate_hunting_unmetered_total{policy=\"hunting\"}").await, 1.0);
    assert_eq!(gw.metric("quotagate_hunting_charged_seconds_total{policy=\"hunting\"}").await, 0.04);
    assert_eq!(
        gw.metric("quotagate_hunting_overruns_total{policy=\"hunting\"}").await,
        0.0,
        "no more than it reserved"
    );
}

/// Issue #3, case 6: the 30-day lookback, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookbacks_past_30_days_are_flagged_or_refused() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let warn =
        TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    let old = serde_json::json!({"Query": "DeviceEvents | where Timestamp > ago(45d)"}).to_string();
    let r = post(&warn, HUNT, "t", old.clone()).await;
    assert_eq!(r.status(), 200, "warn mode forwards");
    let warning = r.headers()["x-quotagate-lookback-warning"].to_str().unwrap().to_string();
    assert!(warning.contains("45 days") && warning.contains("30 days"), "{warning}");
    let span = serde_json::json!({"Query": "DeviceEvents | take 1", "Timespan": "P90D"}).to_string();
    let r = post(&warn, GRAPH_HUNT, "t", span).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["x-quotagate-lookback-warning"].to_str().unwrap().contains("90 days"));
    let recent = body("DeviceEvents | where Timestamp > ago(7d)");
    let r = post(&warn, HUNT, "t", recent).await;
    assert!(r.headers().get("x-quotagate-lookback-warning").is_none());
    assert_eq!(
        warn.metric("quotagate_hunting_lookback_total{action=\"warned\",policy=\"hunting\"}").await,
        2.0
    );
    assert_eq!(emu.count(), 3);

    let reject = TestGateway::start(
        &emu.url(),
        &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "lookback = \"reject\""),
    )
    .await;
    let r = post(&reject, HUNT, "t", old).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "BadRequest");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("45 days") && message.contains("past 30 days"), "{message}");
    assert_eq!(emu.count(), 3, "a refused query is never forwarded");
    let q = quota(&reject).await;
    assert!(
        q["running_time"].as_array().unwrap().is_empty() && q["tenants"].as_array().unwrap().is_empty(),
        "{q}"
    );
}

/// Issue #3, case 7: a result at the 100,000-row cap is flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_at_the_row_cap_are_flagged_truncated() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    let ask = |rows: u64| post(&gw, HUNT, "t", body(&query(0.01, &format!("rows={rows}"))));
    let r = ask(100_000).await;
    assert_eq!(r.headers()["x-quotagate-truncated"], "true");
    assert_eq!(r.headers()["x-quotagate-rows"], "100000");
    let r = ask(99_999).await;
    assert_eq!(r.headers()["x-quotagate-truncated"], "false");
    assert_eq!(gw.metric("quotagate_hunting_truncated_total{policy=\"hunting\"}").await, 1.0);
}

/// Issue #3, case 8: invalid hunting bodies get a local 400 in the client's
/// shape, are never forwarded, and spend nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_hunting_bodies_are_answered_locally() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let gw = TestGateway::start(&emu.url(), &hunting_config(r#"[{ limit = "10m", per = "1h" }]"#, "")).await;
    for (path, sent, says) in [
        (HUNT, "Query=DeviceEvents", "not valid JSON"),
        (HUNT, "", "empty"),
        (HUNT, r#"["DeviceEvents"]"#, "JSON object"),
        (HUNT, r#"{"Querry": "DeviceEvents"}"#, "no `Query`"),
        (HUNT, r#"{"Query": "   "}"#, "`Query` is empty"),
        (GRAPH_HUNT, r#"{"Query": 42}"#, "must be a string"),
    ] {
        let r = post(&gw, path, "t", sent).await;
        assert_eq!(r.status(), 400, "{sent}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "BadRequest");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{sent}: {message}");
        if path == GRAPH_HUNT {
            assert!(e["error"]["innerError"]["request-id"].is_string(), "Graph shape: {e}");
        } else {
            assert!(e["error"]["target"].is_string(), "Defender shape: {e}");
        }
    }
    assert_eq!(emu.count(), 0, "nothing invalid is forwarded");
    let q = quota(&gw).await;
    assert!(
        q["running_time"].as_array().unwrap().is_empty() && q["tenants"].as_array().unwrap().is_empty(),
        "{q}"
    );
    // The key matches case-insensitively, as Graph's beta examples write it.
    let r = post(&gw, GRAPH_HUNT, "t", r#"{"query": "DeviceEvents | take 1"}"#).await;
    assert_eq!(r.status(), 200);
}
