//! One gateway shared by several tools (issue #6), end to end: the real
//! gateway on port 0 in front of the emulator, with scaled windows. Every
//! client uses its own app id in the token, so the emulator can tell whose
//! call it admitted; the gateway's key is the tenant, so they all share it.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use support::emulator::{max_in_any_interval, Emulator, EmulatorConfig, QuotaRule, SeenRequest};
use support::gateway::{config_text, TestGateway};
use support::{bearer, client};
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);
const KEY_HEADER: &str = "x-quotagate-key";

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A `[[client]]` whose key is `key-<name>`, with `extra` TOML lines.
fn client_toml(name: &str, extra: &str) -> String {
    format!(
        "[[client]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}\n",
        sha256_hex(&format!("key-{name}"))
    )
}

/// An emulator that counts the tenant's incident calls (a looser limit than
/// the gateway's, so a throttle there would show a gateway bug).
fn upstream(limit: u32, per: Duration) -> EmulatorConfig {
    EmulatorConfig::new().quota(
        QuotaRule::new("incidents", &["/api/incidents"], &[(limit, per)])
            .key(support::emulator::KeyScope::Tenant),
    )
}

/// The shared tenant-wide policy, then the clients.
fn gateway_toml(top: &str, limit: u32, per: &str, max_wait: &str, clients: &str) -> String {
    format!(
        r#"{top}
[[policy]]
name = "incidents"
paths = ["/api/incidents"]
windows = [{{ limit = {limit}, per = "{per}" }}]
key = "tenant"
max_wait = "{max_wait}"
max_queue = 1000

{clients}"#
    )
}

/// The `[store]` table of a gateway whose quota is in `redis`.
fn redis_store(redis: &support::process::Redis) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url())
}

/// A call as client `name` (key `key-<name>`, app `app-<name>`): status and latency.
async fn call(http: &reqwest::Client, gw_url: &str, name: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = http
        .get(format!("{gw_url}/api/incidents"))
        .header("authorization", bearer("tenant-1", &format!("app-{name}")))
        .header(KEY_HEADER, format!("key-{name}"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    (status, started.elapsed())
}

fn arrivals<'a>(seen: &'a [SeenRequest], name: &str) -> Vec<&'a SeenRequest> {
    let app = format!("app-{name}");
    seen.iter().filter(|r| r.admitted && r.app.as_deref() == Some(app.as_str())).collect()
}

/// Issue #6, case 1: a heavy client at 10× the quota and a light one at one
/// request per window: the light one goes at the next slot that frees, and
/// the heavy one gets every other slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_client_is_never_stuck_behind_a_heavy_one() {
    let _one_at_a_time = support::timing_exclusive().await;
    light_behind_heavy("").await;
}

/// The same with the quota in Redis: the replica orders its own waiters
/// the same way, while Redis says when each slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_client_is_never_stuck_behind_a_heavy_one_on_redis() {
    let _one_at_a_time = support::timing_exclusive().await;
    let redis = support::process::Redis::start();
    light_behind_heavy(&redis_store(&redis)).await;
}

async fn light_behind_heavy(store: &str) {
    let emu = Emulator::start(upstream(10, SEC)).await;
    let clients = client_toml("heavy", "") + &client_toml("light", "");
    // A 50 ms guard covers the jitter between admission and arrival, as in tests/quota.rs.
    let text = config_text(&emu.url(), &gateway_toml("", 10, "1s", "2s", &(clients + store)))
        .replace("guard = \"5ms\"", "guard = \"50ms\"");
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let start = Instant::now();
    let mut heavy = Vec::new();
    for i in 0..300u32 {
        let (http, url) = (http.clone(), url.clone());
        heavy.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_millis(u64::from(i) * 10)).await;
            call(&http, &url, "heavy").await
        }));
    }
    let mut light = Vec::new();
    for i in 0..3u64 {
        let (http, url) = (http.clone(), url.clone());
        light.push(tokio::spawn(async move {
            let at = start + Duration::from_millis(500 + 1000 * i);
            tokio::time::sleep_until(at).await;
            let sent = std::time::Instant::now();
            (sent, call(&http, &url, "light").await)
        }));
    }
    let mut light_done = Vec::new();
    for t in light {
        light_done.push(t.await.unwrap());
    }
    let heavy_statuses: Vec<u16> = futures_join(heavy).await.into_iter().map(|(s, _)| s).collect();
    let seen = emu.requests();
    assert_eq!(emu.throttled(), 0, "the upstream never throttles");
    let heavy_at: Vec<_> = arrivals(&seen, "heavy").iter().map(|r| r.at).collect();
    let light_at: Vec<_> = arrivals(&seen, "light").iter().map(|r| r.at).collect();
    for (sent, (status, waited)) in &light_done {
        assert_eq!(*status, 200, "the light client is always served");
        let arrived = light_at.iter().copied().find(|at| at > sent).expect("its call arrived");
        // It goes at the next slot that frees: no heavy call is admitted between.
        let overtaken =
            heavy_at.iter().filter(|&&h| h > *sent && h + Duration::from_millis(5) < arrived).count();
        assert!(overtaken <= 1, "{overtaken} heavy calls went before the light one (waited {waited:?})");
        assert!(*waited < Duration::from_millis(1300), "the light client waited {waited:?}");
    }
    let all: Vec<_> = heavy_at.iter().chain(&light_at).copied().collect();
    assert!(max_in_any_interval(&all, SEC) <= 10);
    let first = all.iter().min().copied().unwrap();
    let in_three = all.iter().filter(|&&t| t < first + 3 * SEC).count();
    assert!(in_three >= 27, "only {in_three} of 30 slots were used in three windows");
    assert_eq!(heavy_at.len() + light_at.len(), heavy_statuses.iter().filter(|&&s| s == 200).count() + 3);
    assert!(heavy_statuses.iter().all(|&s| s == 200 || s == 429), "{heavy_statuses:?}");
}

/// A client that fills the key's queue cannot keep another out: the
/// newcomer takes the place of the flood's latest waiter, which is answered
/// at once with a 429, and goes at its fair turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_that_fills_the_queue_cannot_keep_another_client_out() {
    let _one_at_a_time = support::timing_exclusive().await;
    flood_fills_the_queue("").await;
}

/// The same with the quota in Redis, whose replica keeps its own queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_that_fills_the_queue_cannot_keep_another_client_out_on_redis() {
    let _one_at_a_time = support::timing_exclusive().await;
    let redis = support::process::Redis::start();
    flood_fills_the_queue(&redis_store(&redis)).await;
}

async fn flood_fills_the_queue(store: &str) {
    // A window of 2 s: the queue stays full until the first slot frees.
    let emu = Emulator::start(upstream(2, 2 * SEC)).await;
    let clients = client_toml("heavy", "") + &client_toml("light", "");
    let text = config_text(&emu.url(), &gateway_toml("", 2, "2s", "10s", &(clients + store)))
        .replace("guard = \"5ms\"", "guard = \"50ms\"")
        .replace("max_queue = 1000", "max_queue = 5");
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    // Each heavy call's status and the moment its answer came.
    let heavy: Vec<_> = (0..12)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { (call(&http, &url, "heavy").await.0, Instant::now()) })
        })
        .collect();
    // Two went at once, five queued, five were refused (and have their
    // answers): the queue is full.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric("quotagate_queue_depth{policy=\"incidents\"}").await < 5.0
        || heavy.iter().filter(|h| h.is_finished()).count() < 7
    {
        assert!(Instant::now() < deadline, "the heavy calls never filled the queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let light_sent = Instant::now();
    let (status, waited) = call(&http, &url, "light").await;
    assert_eq!(status, 200, "the light client got a place in the full queue");
    assert!(waited < Duration::from_millis(2500), "and went at the next slot: {waited:?}");
    let heavy: Vec<(u16, Instant)> = futures_join(heavy).await;
    let served = heavy.iter().filter(|(s, _)| *s == 200).count();
    let refused = heavy.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(served + refused, 12, "every heavy call was answered: {heavy:?}");
    // Two went at once and five queued; the light call pushed one of those out.
    assert_eq!(served, 6, "{heavy:?}");
    let pushed_out = heavy.iter().filter(|(s, at)| *s == 429 && *at >= light_sent).count();
    assert_eq!(pushed_out, 1, "one queued heavy call was answered when the light one came: {heavy:?}");
    assert_eq!(emu.throttled(), 0);
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Issue #6, case 2: weights 3:1 under saturation share the slots 3:1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_share_a_saturated_key_three_to_one() {
    let _one_at_a_time = support::timing_exclusive().await;
    // Exactness is case 1's and tests/quota.rs's business: here an upstream
    // throttle (arrival jitter of 260 concurrent calls on a loaded machine)
    // would only hold the key and blur the ratio, so the emulator allows more.
    let emu = Emulator::start(upstream(1000, SEC)).await;
    let clients = client_toml("three", "weight = 3") + &client_toml("one", "weight = 1");
    let gw = TestGateway::start(&emu.url(), &gateway_toml("", 40, "1s", "10s", &clients)).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let mut tasks = Vec::new();
    for i in 0..260 {
        let name = if i % 2 == 0 { "three" } else { "one" };
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move { call(&http, &url, name).await }));
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let seen = emu.requests();
    // The first window's 40 are admitted as calls arrive; the next three
    // windows' 120 go while both clients still have a backlog.
    let queued: Vec<_> = seen.iter().filter(|r| r.admitted).skip(40).take(120).collect();
    let count =
        |name: &str| queued.iter().filter(|r| r.app.as_deref() == Some(&*format!("app-{name}"))).count();
    let (three, one) = (count("three"), count("one"));
    let ratio = three as f64 / one as f64;
    assert!((2.7..=3.3).contains(&ratio), "admitted {three}:{one} = {ratio:.2}");
    assert_eq!(three + one, 120, "the key stayed saturated for three windows");
    for t in tasks {
        t.abort();
    }
}

/// Issue #6, case 3a: a client capped at 50% never has more than half of a
/// window, even alone, and another client finds the rest free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_and_leaves_the_rest_to_others() {
    let _one_at_a_time = support::timing_exclusive().await;
    // The emulator allows more than the gateway, so arrival jitter on a loaded
    // machine never turns into an upstream hold; the cap is checked on arrivals.
    let emu = Emulator::start(upstream(16, SEC)).await;
    let clients = client_toml("capped", "cap_percent = 50") + &client_toml("free", "");
    let text = config_text(&emu.url(), &gateway_toml("", 8, "1s", "5s", &clients))
        .replace("guard = \"5ms\"", "guard = \"50ms\"");
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let mut capped = Vec::new();
    for _ in 0..12 {
        let (http, url) = (http.clone(), url.clone());
        capped.push(tokio::spawn(async move { call(&http, &url, "capped").await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut free = Vec::new();
    for _ in 0..4 {
        let (http, url) = (http.clone(), url.clone());
        free.push(tokio::spawn(async move { call(&http, &url, "free").await }));
    }
    for (status, waited) in futures_join(free).await {
        assert_eq!(status, 200);
        assert!(waited < Duration::from_millis(300), "the free client waited {waited:?} behind a capped one");
    }
    let capped = futures_join(capped).await;
    assert!(capped.iter().all(|(s, _)| *s == 200), "{capped:?}");
    let seen = emu.requests();
    let times: Vec<_> = arrivals(&seen, "capped").iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 12);
    assert_eq!(max_in_any_interval(&times, SEC), 4, "the cap is 4 per second, and used");
}

/// A capped client's call whose body comes slowly leaves well after it was
/// admitted; the upstream counts it when it arrives, so the client's next
/// call must wait for its cap to free from that departure, not from the
/// admission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_clients_slow_call_counts_against_its_cap_from_its_departure() {
    let _one_at_a_time = support::timing_exclusive().await;
    slow_call_under_a_cap("").await;
}

/// The same with the quota in Redis, where the replica keeps the client's
/// count apart from Redis's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_clients_slow_call_counts_against_its_cap_from_its_departure_on_redis() {
    let _one_at_a_time = support::timing_exclusive().await;
    let redis = support::process::Redis::start();
    slow_call_under_a_cap(&redis_store(&redis)).await;
}

async fn slow_call_under_a_cap(store: &str) {
    let emu = Emulator::start(upstream(16, SEC)).await;
    // A cap of 25% of 4 a second: one call a second for this client.
    let clients = client_toml("capped", "cap_percent = 25");
    let text = config_text(&emu.url(), &gateway_toml("", 4, "1s", "5s", &(clients + store)))
        .replace("guard = \"5ms\"", "guard = \"50ms\"");
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    // Its head now, the rest of its body 400 ms later.
    let slow = support::SlowPost::start_with(
        &gw.proxy.to_string(),
        "/api/incidents",
        &[("Authorization", &bearer("tenant-1", "app-capped")), (KEY_HEADER, "key-capped")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The client's next call waits for its cap meanwhile.
    let next = tokio::spawn(async move { call(&http, &url, "capped").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = slow.finish().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(next.await.unwrap().0, 200);

    let seen = emu.requests();
    let times: Vec<_> = arrivals(&seen, "capped").iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 2);
    let gap = times[1].duration_since(times[0]);
    assert!(gap >= SEC, "the client's second call arrived {gap:?} after its first, within its cap's second");
    assert!(
        gap < SEC + Duration::from_millis(300),
        "and went once the cap freed from the departure: {gap:?}"
    );
}

/// A capped client's call that never reached the upstream (it refused the
/// connection) is taken back from the client's cap as well as from the
/// quota: the client's next call goes, and is not turned away by its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_clients_refused_call_is_given_back_to_its_cap() {
    refused_call_under_a_cap("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_clients_refused_call_is_given_back_to_its_cap_on_redis() {
    let redis = support::process::Redis::start();
    refused_call_under_a_cap(&redis_store(&redis)).await;
}

async fn refused_call_under_a_cap(store: &str) {
    let down = support::ClosedPort::hold();
    // A cap of 25% of 4 calls in 10 s: one call in 10 s for this client.
    // (The quota has room for all three calls even before Redis takes
    // them back, which it does in the background.)
    let clients = client_toml("capped", "cap_percent = 25");
    let gw = TestGateway::start_with(&config_text(
        &down.url(),
        &gateway_toml("", 4, "10s", "2s", &(clients + store)),
    ))
    .await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    for attempt in 0..3 {
        let (status, _) = call(&http, &url, "capped").await;
        assert_eq!(status, 502, "attempt {attempt}: refused upstream, not the cap's 429");
    }
}

/// Issue #6, case 3b: a reserved minimum is served before a much heavier
/// client's backlog while it has demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_minimum_holds_against_a_heavier_client() {
    let _one_at_a_time = support::timing_exclusive().await;
    let emu = Emulator::start(upstream(8, SEC)).await;
    let clients = client_toml("hog", "weight = 10") + &client_toml("reserved", "reserved_percent = 50");
    let text = config_text(&emu.url(), &gateway_toml("", 4, "1s", "8s", &clients))
        .replace("guard = \"5ms\"", "guard = \"50ms\"");
    let gw = TestGateway::start_with(&text).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let mut hog = Vec::new();
    for _ in 0..20 {
        let (http, url) = (http.clone(), url.clone());
        hog.push(tokio::spawn(async move { call(&http, &url, "hog").await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = std::time::Instant::now();
    let mut reserved = Vec::new();
    for _ in 0..2 {
        let (http, url) = (http.clone(), url.clone());
        reserved.push(tokio::spawn(async move { call(&http, &url, "reserved").await }));
    }
    for (status, waited) in futures_join(reserved).await {
        assert_eq!(status, 200);
        // Its two calls take two of the four slots that free at about 1 s.
        assert!(waited < Duration::from_millis(1300), "the reserved client waited {waited:?}");
    }
    let seen = emu.requests();
    let last = arrivals(&seen, "reserved").iter().map(|r| r.at).max().unwrap();
    let hog_between = arrivals(&seen, "hog").iter().filter(|r| r.at > sent && r.at < last).count();
    assert!(hog_between <= 2, "{hog_between} hog calls went first");
    for t in hog {
        t.abort();
    }
}

/// Issue #6, case 4: interactive requests overtake queued batch ones, by the
/// client's class and by the per-request header config allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_requests_overtake_queued_batch_ones() {
    let _one_at_a_time = support::timing_exclusive().await;
    let emu = Emulator::start(upstream(1, Duration::from_millis(500))).await;
    let clients =
        client_toml("batch", "priority = \"batch\"") + &client_toml("ui", "priority = \"interactive\"");
    let gw = TestGateway::start(
        &emu.url(),
        &gateway_toml("allow_priority_header = true\n", 1, "500ms", "5s", &clients),
    )
    .await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let mut batch = Vec::new();
    for _ in 0..4 {
        let (http, url) = (http.clone(), url.clone());
        batch.push(tokio::spawn(async move { call(&http, &url, "batch").await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ui = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move { call(&http, &url, "ui").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A batch client's own request, marked urgent.
    let urgent = http
        .get(format!("{url}/api/incidents?urgent"))
        .header("authorization", bearer("tenant-1", "app-batch"))
        .header(KEY_HEADER, "key-batch")
        .header("x-quotagate-priority", "interactive")
        // A key header the running config does not read (renamed by a reload).
        .header("x-quotagate-old-key", "key-batch")
        .send();
    let (urgent, ui) = tokio::join!(urgent, ui);
    assert_eq!(urgent.unwrap().status(), 200);
    let (status, waited) = ui.unwrap();
    assert_eq!(status, 200);
    assert!(waited < Duration::from_millis(600), "the interactive call waited {waited:?}");
    futures_join(batch).await;
    let order: Vec<String> = emu
        .requests()
        .iter()
        .map(|r| if r.path_and_query.ends_with("urgent") { "urgent".into() } else { r.app.clone().unwrap() })
        .collect();
    assert_eq!(order, ["app-batch", "app-ui", "urgent", "app-batch", "app-batch", "app-batch"]);
    assert!(
        emu.requests().iter().all(|r| r.headers.keys().all(|k| !k.as_str().starts_with("x-quotagate-"))),
        "gateway-only headers never reach the upstream"
    );
}

/// Issue #6, case 5: a client's flood is cut by its guard before any queue,
/// with an honest `Retry-After`; another client is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_cut_by_its_guard_and_others_are_unaffected() {
    let _one_at_a_time = support::timing_exclusive().await;
    let emu = Emulator::start(upstream(1000, SEC)).await;
    let clients = client_toml("looping", "guard_per_second = 5\nguard_burst = 5") + &client_toml("calm", "");
    let gw = TestGateway::start(&emu.url(), &gateway_toml("", 100, "1s", "5s", &clients)).await;
    let http = client();
    let url = format!("http://{}", gw.proxy);
    let mut flood = Vec::new();
    for _ in 0..30 {
        let (http, url) = (http.clone(), url.clone());
        flood.push(tokio::spawn(async move {
            http.get(format!("{url}/api/incidents"))
                .header("authorization", bearer("tenant-1", "app-looping"))
                .header(KEY_HEADER, "key-looping")
                .send()
                .await
                .unwrap()
        }));
    }
    let mut cut = None;
    let mut passed = 0;
    for t in flood {
        let r = t.await.unwrap();
        match r.status().as_u16() {
            200 => passed += 1,
            429 => cut = Some(r),
            s => panic!("unexpected status {s}"),
        }
    }
    assert!((5..=6).contains(&passed), "{passed} of the flood passed a burst of 5");
    let cut = cut.expect("the flood was cut");
    assert_eq!(cut.headers()["x-quotagate-throttled-by"], "guard");
    let retry_after: u64 = cut.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "the next call is allowed within 200 ms, rounded up");
    let body: serde_json::Value = cut.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("runaway-loop guard") && message.contains("'looping'"), "{message}");
    assert!(message.ends_with("You can send requests again in 1 seconds."), "{message}");
    assert_eq!(
        arrivals(&emu.requests(), "looping").len(),
        passed,
        "the cut calls never reached the upstream"
    );

    // The other client is untouched, and the looping one passes again after Retry-After.
    for _ in 0..10 {
        let (status, waited) = call(&http, &url, "calm").await;
        assert_eq!(status, 200);
        assert!(waited < Duration::from_millis(300));
    }
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(call(&http, &url, "looping").await.0, 200, "Retry-After was honest");
    let guarded = gw.metric("quotagate_client_requests_total{client=\"looping\",decision=\"guarded\"}").await;
    assert_eq!(guarded as usize, 30 - passed);
}

/// Issue #6, case 6: missing, wrong and right keys; the 401 comes in the
/// client's error shape before any quota is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_known_key_passes() {
    let emu = Emulator::start(upstream(100, SEC)).await;
    let gw =
        TestGateway::start(&emu.url(), &gateway_toml("", 100, "1s", "5s", &client_toml("soc", ""))).await;
    let http = client();
    let get = |path: &str, key: Option<&str>| {
        let mut req = http.get(gw.url(path)).header("authorization", bearer("tenant-1", "app-soc"));
        if let Some(key) = key {
            req = req.header(KEY_HEADER, key);
        }
        req.send()
    };
    for key in [None, Some("key-wrong"), Some("")] {
        let r = get("/api/incidents", key).await.unwrap();
        assert_eq!(r.status(), 401, "key {key:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Unauthorized");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(KEY_HEADER), "{message}");
        assert!(!message.contains("key-wrong"), "the key is never echoed");
    }
    // Unmetered paths and Graph too: the gateway is no open relay.
    let graph = get("/v1.0/users", None).await.unwrap();
    assert_eq!(graph.status(), 401);
    let body: serde_json::Value = graph.json().await.unwrap();
    assert_eq!(body["error"]["innerError"]["status"], "401", "{body}");
    assert_eq!(emu.count(), 0, "nothing was forwarded and no quota was touched");
    assert_eq!(get("/api/incidents", Some("key-soc")).await.unwrap().status(), 200);
    assert_eq!(emu.count(), 1);
    let unknown =
        gw.metric("quotagate_client_requests_total{client=\"unknown\",decision=\"unauthorized\"}").await;
    assert_eq!(unknown, 4.0);
    assert_eq!(
        gw.metric("quotagate_client_requests_total{client=\"soc\",decision=\"forwarded\"}").await,
        1.0
    );
}

/// Issue #6, case 6: a listener beyond loopback without client keys is
/// refused at startup, in config and on the command line.
#[test]
fn a_network_listener_without_keys_is_refused_at_startup() {
    let text = |top: &str, listen: &str, clients: &str| {
        config_text("http://127.0.0.1:9", &format!("{top}\n{clients}"))
            .replace("listen = \"127.0.0.1:0\"\nadmin", &format!("listen = \"{listen}\"\nadmin"))
    };
    let err = quotagate::config::Config::from_toml(&text("", "0.0.0.0:7480", ""), "t.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "listen 0.0.0.0:7480 is not loopback: configure [[client]] keys or set allow_anonymous_on_network = true"
        ),
        "{err}"
    );
    // The forward proxy serves the same callers: its listener counts too.
    let proxy = text("\n[forward_proxy]\nlisten = \"0.0.0.0:7484\"\n", "127.0.0.1:7480", "");
    let err = quotagate::config::Config::from_toml(&proxy, "t.toml").unwrap_err().to_string();
    assert!(err.contains("forward_proxy.listen 0.0.0.0:7484 is not loopback"), "{err}");
    let explicit = text("allow_anonymous_on_network = true", "0.0.0.0:7480", "");
    assert!(quotagate::config::Config::from_toml(&explicit, "t.toml").is_ok());
    let keyed = text("", "0.0.0.0:7480", &client_toml("soc", ""));
    assert!(quotagate::config::Config::from_toml(&keyed, "t.toml").is_ok());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotagate"))
        .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not loopback: configure [[client]] keys"), "{stderr}");
}

/// Issue #6, case 7: a TLS listener serves a real client (curl) that
/// trusts only the test's own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_serves_curl() {
    let emu = Emulator::start(upstream(100, SEC)).await;
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let tls =
        format!("[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert_path.display(), key_path.display());
    let gw =
        TestGateway::start(&emu.url(), &gateway_toml("", 100, "1s", "5s", &(tls + &client_toml("soc", ""))))
            .await;
    let port = gw.proxy.port();
    let curl = move |extra: &[&str]| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(["-H", &format!("authorization: {}", bearer("tenant-1", "app-soc"))])
            .args(extra)
            .arg(format!("https://localhost:{port}/api/incidents"))
            .output()
            .unwrap()
    };
    let ca = cert_path.display().to_string();
    let ok = tokio::task::spawn_blocking(move || {
        curl(&["--cacert", &ca, "-H", "x-quotagate-key: key-soc", "-w", "\n%{http_code} %{http_version}"])
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "curl failed: {}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.contains("\n200 "), "{out}");
    assert_eq!(emu.count(), 1);
    // Without the test's CA, curl refuses the certificate; plain HTTP gets no answer.
    let untrusted = tokio::task::spawn_blocking(move || curl(&[])).await.unwrap();
    assert!(!untrusted.status.success());
    let plain = client().get(gw.url("/api/incidents")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    assert_eq!(emu.count(), 1);
}

/// With `client_identity = "app"`, the token's app id names the client; an
/// app no client names counts as `other`, so the label set stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_ids_name_clients_when_configured_so() {
    let emu = Emulator::start(upstream(100, SEC)).await;
    let clients = "[[client]]\nname = \"etl\"\napp_id = \"app-etl\"\nweight = 2\n";
    let gw = TestGateway::start(
        &emu.url(),
        &gateway_toml("client_identity = \"app\"\n", 100, "1s", "5s", clients),
    )
    .await;
    let http = client();
    for app in ["app-etl", "app-etl", "app-unknown-1", "app-unknown-2"] {
        let r =
            http.get(gw.url("/api/incidents")).header("authorization", bearer("tenant-1", app)).send().await;
        assert_eq!(r.unwrap().status(), 200, "no key is needed in app mode");
    }
    let metric = |client: &str| {
        format!("quotagate_client_requests_total{{client=\"{client}\",decision=\"forwarded\"}}")
    };
    assert_eq!(gw.metric(&metric("etl")).await, 2.0);
    assert_eq!(gw.metric(&metric("other")).await, 2.0);
}
