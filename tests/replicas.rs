//! Several gateway processes on one real Redis (issue #7, cases 2 to 4):
//! one exact quota between them, upstream holds shared, and Redis outages
//! handled as configured. Each test starts its own `redis-server` on a free
//! port.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::emulator::{max_in_any_interval, Emulator, EmulatorConfig, QuotaRule};
use support::process::{GatewayProcess, Redis};
use support::{bearer, client};

/// One config file for every replica: the emulator upstream, Redis, `policy`.
fn config(dir: &Path, upstream: &str, redis: &str, store: &str, policy: &str) -> PathBuf {
    let path = dir.join("replica.toml");
    let text = format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
# Covers the hop to Redis and the loopback hop to the upstream.
guard = "50ms"
idle_sweep = "1s"
access_log = false

[[upstream]]
name = "defender"
url = "{upstream}"
kind = "defender"
route_prefixes = ["/api/"]

[store]
backend = "redis"
url = "{redis}"
{store}

[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
{policy}
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The parts of a replica test: a fresh Redis, an emulator that holds the
/// tenant's incidents to `limit` per `per` when given, and a config for the
/// replicas in a temporary directory, with `store` and `policy` added.
struct Setup {
    redis: Redis,
    emu: Emulator,
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

async fn setup(quota: Option<(u32, Duration)>, store: &str, policy: &str) -> Setup {
    let redis = Redis::start();
    let mut upstream = EmulatorConfig::new();
    if let Some(window) = quota {
        upstream = upstream.quota(QuotaRule::new("incidents", &["/api/incidents"], &[window]));
    }
    let emu = Emulator::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &emu.url(), &redis.url(), store, policy);
    Setup { redis, emu, dir, cfg }
}

/// A config file for hunting replicas: the emulator upstream, Redis with
/// `store` added, the `[hunting]` table's `hunting`, and one hunting policy
/// with `policy` added.
fn hunting_config(
    dir: &Path,
    upstream: &str,
    redis: &str,
    store: &str,
    hunting: &str,
    policy: &str,
) -> PathBuf {
    let path = dir.join("hunting.toml");
    let text = format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
guard = "50ms"
access_log = false

[[upstream]]
name = "defender"
url = "{upstream}"
kind = "defender"
route_prefixes = ["/api/"]

[store]
backend = "redis"
url = "{redis}"
{store}

[hunting]
{hunting}

[[policy]]
name = "hunting"
methods = ["POST"]
paths = ["/api/advancedhunting/run"]
hunting = true
{policy}
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn replicas(n: usize, config: &Path, dir: &Path) -> Vec<GatewayProcess> {
    (0..n).map(|_| GatewayProcess::start(config, dir).unwrap()).collect()
}

async fn get(url: String) -> reqwest::Response {
    client().get(url).header("authorization", bearer("tenant-1", "app-1")).send().await.unwrap()
}

async fn ready(gw: &GatewayProcess) -> (u16, serde_json::Value) {
    let r = client().get(gw.admin_url("/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn metric(gw: &GatewayProcess, name: &str) -> f64 {
    let text = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Wait (bounded) until `/readyz` of `gw` reports the store's `mode`.
async fn until_mode(gw: &GatewayProcess, mode: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = ready(gw).await;
        if body["store"]["mode"] == mode {
            return body;
        }
        assert!(Instant::now() < deadline, "the store never reported mode {mode}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue #7, case 2: three gateway processes on one Redis under 5× the
/// quota: no upstream 429, never more than N in any window, and at least
/// 95% of what the quota allows is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_five_times_the_quota_share_one_exact_quota() {
    let _one_at_a_time = support::timing_exclusive().await;
    const LIMIT: u32 = 20;
    const WINDOW: Duration = Duration::from_secs(1);
    let Setup { redis: _redis, emu, dir, cfg } = setup(
        Some((LIMIT, WINDOW)),
        "replicas = 3",
        "windows = [{ limit = 20, per = \"1s\" }]\nmax_wait = \"1500ms\"\nmax_queue = 1000",
    )
    .await;
    let gws = replicas(3, &cfg, dir.path());
    let rate = 5.0 * f64::from(LIMIT) / WINDOW.as_secs_f64();
    let total = (rate * 5.0) as usize;
    let start = tokio::time::Instant::now();
    let mut load = Vec::new();
    for i in 0..total {
        let url = gws[i % gws.len()].url("/api/incidents");
        load.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            get(url).await.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in load {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(emu.throttled(), 0, "the upstream never throttles");
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    let times = emu.accepted_times("incidents", "tenant-1");
    assert!(max_in_any_interval(&times, WINDOW) <= LIMIT as usize);
    let first = times[0];
    let in_four = times.iter().filter(|&&t| t < first + 4 * WINDOW).count();
    let best = 4 * LIMIT as usize;
    assert!(in_four as f64 >= 0.95 * best as f64, "admitted {in_four} of {best} possible in four windows");
}

/// Issue #7, case 3: an upstream 429 that one replica sees holds the key on
/// the others: they answer locally and send nothing upstream until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_on_one_replica_holds_the_key_on_the_others() {
    let _one_at_a_time = support::timing_exclusive().await;
    let redis = Redis::start();
    let emu = Emulator::start(EmulatorConfig::new().quota(QuotaRule::new(
        "incidents",
        &["/api/incidents"],
        &[(5, Duration::from_secs(10))],
    )))
    .await;
    // Another tool spent the tenant's quota behind the gateways' backs.
    emu.spend("incidents", "tenant-1", "app-1", 5);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "",
        "windows = [{ limit = 5, per = \"10s\" }]\nmode = \"reject\"",
    );
    let gws = replicas(2, &cfg, dir.path());
    let first = get(gws[0].url("/api/incidents")).await;
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["x-quotagate-throttled-by"], "upstream");
    assert_eq!(emu.count(), 1);

    // The hold is in Redis before the throttle is answered: the other
    // replica's very next call is refused locally, with the hold's time.
    let other = get(gws[1].url("/api/incidents")).await;
    assert_eq!(other.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!(other.status(), 429);
    let retry: u64 = other.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(emu.throttled(), 1, "only the first call met the upstream's throttle");
}

/// Issue #7, case 4, failing closed: with Redis killed mid-run, metered
/// calls get a prompt 503 with `Retry-After` and a clear body (never a hang
/// past the wait, never a call upstream), `/readyz` and the metrics show it,
/// and the store recovers by itself when Redis returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_then_recovers_by_itself() {
    let Setup { mut redis, emu, dir, cfg } = setup(
        None,
        "on_outage = \"fail-closed\"",
        "windows = [{ limit = 100, per = \"1s\" }]\nmax_wait = \"2s\"",
    )
    .await;
    let gw = GatewayProcess::start(&cfg, dir.path()).unwrap();
    assert_eq!(get(gw.url("/api/incidents")).await.status(), 200);
    assert_eq!(until_mode(&gw, "shared").await["store"]["reachable"], true);

    redis.kill();
    let asked = Instant::now();
    let r = get(gw.url("/api/incidents")).await;
    assert!(asked.elapsed() < Duration::from_secs(3), "answered within the wait: {:?}", asked.elapsed());
    assert_eq!(r.status(), 503);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("quota store") && message.contains("unreachable"), "{message}");
    assert_eq!(emu.count(), 1, "nothing was forwarded while failing closed");
    let (status, body) = ready(&gw).await;
    assert_eq!((status, &body["store"]["mode"]), (503, &serde_json::json!("fail-closed")), "{body}");
    assert_eq!(metric(&gw, "quotagate_store_up").await, 0.0);

    redis.restart();
    until_mode(&gw, "shared").await;
    assert_eq!(ready(&gw).await.0, 200);
    assert_eq!(metric(&gw, "quotagate_store_up").await, 1.0);
    assert_eq!(get(gw.url("/api/incidents")).await.status(), 200);
    assert_eq!(emu.count(), 2);
}

/// Issue #7, case 4, falling back to local limits: with Redis down, each of
/// two replicas admits at most half of the limit on its own, counting what
/// it admitted through Redis before; the upstream never throttles, and when
/// Redis returns (empty: it keeps nothing) the replicas add back what they
/// admitted, so the window still holds every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_a_local_share_then_recovers() {
    let Setup { mut redis, emu, dir, cfg } = setup(
        Some((10, Duration::from_secs(8))),
        "on_outage = \"local\"\nreplicas = 2",
        "windows = [{ limit = 10, per = \"8s\" }]\nmode = \"reject\"",
    )
    .await;
    let gws = replicas(2, &cfg, dir.path());
    for gw in &gws {
        until_mode(gw, "shared").await;
    }
    for i in 0..4 {
        assert_eq!(get(gws[i % 2].url("/api/incidents")).await.status(), 200);
    }
    redis.kill();
    let mut admitted = 0;
    for i in 0..16 {
        let asked = Instant::now();
        let status = get(gws[i % 2].url("/api/incidents")).await.status().as_u16();
        assert!(asked.elapsed() < Duration::from_secs(3), "no hang while Redis is down");
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 6, "each replica admits up to its share, 10 ÷ 2, counting its 2 before");
    assert_eq!(emu.throttled(), 0);
    for gw in &gws {
        let (status, body) = ready(gw).await;
        assert_eq!((status, &body["store"]["mode"]), (200, &serde_json::json!("local")), "{body}");
        assert_eq!(metric(gw, "quotagate_store_local_fallback").await, 1.0);
    }

    redis.restart();
    for gw in &gws {
        until_mode(gw, "shared").await;
        assert_eq!(metric(gw, "quotagate_store_local_fallback").await, 0.0);
    }
    // Back on a Redis that lost everything, the window still holds all ten calls.
    let r = get(gws[0].url("/api/incidents")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!((emu.accepted("incidents"), emu.throttled()), (10, 0));
}

/// A Redis that restarts empty between two calls is noticed though no
/// call failed (the next one would find a fresh connection and an empty
/// log): the replica adds back the window's admissions before it admits
/// again, so the window still holds every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_empty_between_calls_gets_the_window_back() {
    let Setup { mut redis, emu, dir, cfg } = setup(
        Some((10, Duration::from_secs(8))),
        "",
        "windows = [{ limit = 10, per = \"8s\" }]\nmode = \"reject\"",
    )
    .await;
    let gws = replicas(1, &cfg, dir.path());
    until_mode(&gws[0], "shared").await;
    // Together, so script runs admit several at one moment: each must come
    // back as its own entry.
    let calls: Vec<_> = (0..10).map(|_| tokio::spawn(get(gws[0].url("/api/incidents")))).collect();
    for call in calls {
        assert_eq!(call.await.unwrap().status(), 200);
    }
    redis.kill();
    redis.restart();
    // No call meanwhile; the replica looks at Redis's epoch every 500 ms
    // (several looks, so a loaded machine has time to notice).
    tokio::time::sleep(Duration::from_secs(3)).await;
    until_mode(&gws[0], "shared").await;
    let r = get(gws[0].url("/api/incidents")).await;
    assert_eq!(r.status(), 429, "the window still holds the ten calls");
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!((emu.accepted("incidents"), emu.throttled()), (10, 0));
}

/// A Redis that comes back from an older snapshot (a crash after its last
/// save, or a lagging replica promoted) keeps its epoch but not the calls
/// admitted since the snapshot: the replica notices by the sequence
/// number it was given before, and adds its window back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_from_an_older_snapshot_gets_the_window_back() {
    let data = tempfile::tempdir().unwrap();
    let mut redis = Redis::start_in(data.path());
    let emu = Emulator::start(EmulatorConfig::new().quota(QuotaRule::new(
        "incidents",
        &["/api/incidents"],
        &[(10, Duration::from_secs(8))],
    )))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "",
        "windows = [{ limit = 10, per = \"8s\" }]\nmode = \"reject\"",
    );
    let gws = replicas(1, &cfg, dir.path());
    until_mode(&gws[0], "shared").await;
    for _ in 0..4 {
        assert_eq!(get(gws[0].url("/api/incidents")).await.status(), 200);
    }
    redis.save();
    for _ in 0..6 {
        assert_eq!(get(gws[0].url("/api/incidents")).await.status(), 200);
    }
    // The replica looks at Redis again after the six calls (every 500 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.kill();
    redis.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    until_mode(&gws[0], "shared").await;
    let r = get(gws[0].url("/api/incidents")).await;
    assert_eq!(r.status(), 429, "the window still holds the ten calls, not the snapshot's four");
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!((emu.accepted("incidents"), emu.throttled()), (10, 0));
}

/// A value another program left under one key's name in Redis: that
/// key's calls are answered 503 saying so (failing closed), and every
/// other tenant's calls go on, shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_value_under_one_key_fails_only_that_key() {
    let Setup { redis, emu, dir, cfg } =
        setup(None, "", "windows = [{ limit = 10, per = \"10s\" }]\nmode = \"reject\"").await;
    let gws = replicas(1, &cfg, dir.path());
    until_mode(&gws[0], "shared").await;
    let call = |tenant: &str| {
        client().get(gws[0].url("/api/incidents")).header("authorization", bearer(tenant, "app")).send()
    };
    assert_eq!(call("tenant-a").await.unwrap().status(), 200);
    let mut c = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let logs: Vec<String> = redis::cmd("KEYS").arg("*:log:*").query(&mut c).unwrap();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let _: () = redis::cmd("SET").arg(logs[0].replacen(":log:", ":hold:", 1)).arg("x").query(&mut c).unwrap();

    let r = call("tenant-a").await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("cannot read") && body.contains("other keys are unaffected"), "{body}");
    for _ in 0..3 {
        assert_eq!(call("tenant-b").await.unwrap().status(), 200, "another tenant is still shared");
    }
    assert_eq!(ready(&gws[0]).await.1["store"]["mode"], "shared");
    assert_eq!(emu.requests().len(), 4, "the refused call was not forwarded");
}

/// Two policies share the tenant's key, one counting 3 calls per 10 s and
/// one 100 per second: a call under the second must not make Redis forget
/// (trim or expire) what the first still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_shared_by_two_policies_keeps_what_the_longer_window_counts() {
    let Setup { redis: _redis, emu, dir, cfg } = setup(
        Some((3, Duration::from_secs(10))),
        "",
        r#"windows = [{ limit = 3, per = "10s" }]
mode = "reject"
key = "tenant"

[[policy]]
name = "machines"
paths = ["/api/machines"]
windows = [{ limit = 100, per = "1s" }]
mode = "reject"
key = "tenant""#,
    )
    .await;
    let gws = replicas(1, &cfg, dir.path());
    until_mode(&gws[0], "shared").await;
    for _ in 0..3 {
        assert_eq!(get(gws[0].url("/api/incidents")).await.status(), 200);
    }
    let other = get(gws[0].url("/api/machines")).await;
    assert!(other.headers().get("x-quotagate-throttled-by").is_none(), "the machines call went");
    // Past the machines policy's second, well inside the incidents' ten.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = get(gws[0].url("/api/incidents")).await;
    assert_eq!(r.status(), 429, "the three incidents calls still count");
    assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!(emu.throttled(), 0);
}

/// The hunting running-time ledger lives in Redis too: two replicas
/// saturating one tenant's running time never carry it past its budget,
/// which one replica alone would spend whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_running_time_budget() {
    let _one_at_a_time = support::timing_exclusive().await;
    use support::hunt::{body, query};
    let hour = Duration::from_secs(4);
    let budget = Duration::from_millis(1000);
    let redis = Redis::start();
    let emu = Emulator::start(EmulatorConfig::new().running_time(budget, hour)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = hunting_config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "replicas = 2",
        "budgets = [{ limit = \"1000ms\", per = \"4s\" }]\nestimate = \"40ms\"",
        "windows = [{ limit = 100000, per = \"1s\" }]\nmax_wait = \"30s\"",
    );
    let gws = replicas(2, &path, dir.path());
    let until = Instant::now() + 2 * hour;
    let mut clients = Vec::new();
    for c in 0..6u64 {
        let url = gws[(c % 2) as usize].url("/api/advancedhunting/run");
        clients.push(tokio::spawn(async move {
            let (http, auth) = (client(), bearer("tenant-1", &format!("tool-{c}")));
            let mut statuses = Vec::new();
            let mut i = c;
            while Instant::now() < until {
                i += 1;
                let cost = [0.02, 0.04, 0.06][(i % 3) as usize];
                let r =
                    http.post(&url).header("authorization", &auth).body(body(&query(cost, ""))).send().await;
                let Ok(r) = r else { continue };
                statuses.push(r.status().as_u16());
                let _ = r.bytes().await;
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }
    assert_eq!(emu.throttled(), 0, "the upstream never throttles running time");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let charges = emu.charges("tenant-1");
    let most = charges.max_in_any(hour);
    assert!(most <= budget + Duration::from_millis(1), "{most:?} in one hour, budget {budget:?}");
    assert!(most.as_secs_f64() >= 0.8 * budget.as_secs_f64(), "the budget is used: {most:?}");
}

/// A Redis that requires a password works with the password in the URL,
/// which never shows in `/readyz`; a wrong one leaves the store down, and
/// a store that fails closed answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_redis_url_works_and_stays_secret() {
    let redis = Redis::start_with(Some("s3cret-pw"));
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = "windows = [{ limit = 100, per = \"1s\" }]";
    let cfg = config(dir.path(), &emu.url(), &redis.url(), "", policy);
    let gw = GatewayProcess::start(&cfg, dir.path()).unwrap();
    assert_eq!(get(gw.url("/api/incidents")).await.status(), 200);
    let body = until_mode(&gw, "shared").await;
    assert_eq!(body["store"]["url"], format!("redis://***@127.0.0.1:{}", redis.port));
    assert!(!body.to_string().contains("s3cret-pw"));
    drop(gw);

    let wrong = redis.url().replace("s3cret-pw", "wrong");
    let cfg = config(dir.path(), &emu.url(), &wrong, "", policy);
    let gw = GatewayProcess::start(&cfg, dir.path()).unwrap();
    assert_eq!(get(gw.url("/api/incidents")).await.status(), 503);
    until_mode(&gw, "fail-closed").await;
    assert_eq!(emu.count(), 1);
}

/// A Redis behind TLS (`rediss://`), its certificate signed by a private CA
/// that `[store] ca_file` names: the gateway shares its quota there; without
/// the CA, the certificate is refused and the store fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_works_with_its_ca_and_is_refused_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("redis.pem"), dir.path().join("redis.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = std::process::Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(&cert_path)
        .arg("--tls-key-file")
        .arg(&key_path)
        .arg("--tls-ca-cert-file")
        .arg(&cert_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed (.ci/run installs it)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server never listened on its TLS port");
        std::thread::sleep(Duration::from_millis(20));
    }
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let url = format!("rediss://127.0.0.1:{port}");
    let policy = "windows = [{ limit = 100, per = \"1s\" }]";
    let ca = format!("ca_file = \"{}\"", cert_path.display());
    let gw = GatewayProcess::start(&config(dir.path(), &emu.url(), &url, &ca, policy), dir.path()).unwrap();
    assert_eq!(get(gw.url("/api/incidents")).await.status(), 200);
    until_mode(&gw, "shared").await;
    drop(gw);

    let untrusted =
        GatewayProcess::start(&config(dir.path(), &emu.url(), &url, "", policy), dir.path()).unwrap();
    assert_eq!(get(untrusted.url("/api/incidents")).await.status(), 503, "an unverified Redis is not used");
    assert_eq!(emu.count(), 1);
}

/// Replicas agree on a key whatever their policies' places: one replica
/// reloaded with a new policy ahead of `incidents`, the other started on
/// that config (so the two number the policies differently), still share
/// one `incidents` quota in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_and_a_fresh_replica_share_one_key_whatever_the_policy_order() {
    let Setup { redis: _redis, emu, dir, cfg } =
        setup(None, "", "windows = [{ limit = 3, per = \"60s\" }]\nmode = \"reject\"").await;
    let reloaded = GatewayProcess::start(&cfg, dir.path()).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[[policy]]\nname = \"incidents\"",
        "[[policy]]\nname = \"machines\"\npaths = [\"/api/machines\"]\nwindows = [{ limit = 9, per = \"60s\" }]\n\n\
         [[policy]]\nname = \"incidents\"",
    );
    std::fs::write(&cfg, text).unwrap();
    reloaded.reload();
    reloaded.until_generation(2).await;
    let fresh = GatewayProcess::start(&cfg, dir.path()).unwrap();

    for gw in [&reloaded, &fresh, &reloaded] {
        assert_eq!(get(gw.url("/api/incidents")).await.status(), 200);
    }
    for gw in [&fresh, &reloaded] {
        let r = get(gw.url("/api/incidents")).await;
        assert_eq!(r.status(), 429, "the three calls between them spent the shared quota");
        assert_eq!(r.headers()["x-quotagate-throttled-by"], "gateway");
    }
    assert_eq!(emu.count(), 3);
}

/// A hunting query that only a completion on another replica can make room
/// for is woken by that completion (published through Redis), not by asking
/// again on a timer: it starts right after, and Redis sees only a couple of
/// its asks while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_waiting_on_another_replicas_completion_is_woken_by_it() {
    let _one_at_a_time = support::timing_exclusive().await;
    use support::hunt::{body, query};
    let redis = Redis::start();
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    // In flight, two estimates (1.6 s each) overflow the 3 s budget; once
    // the first query is charged its 1.2 s, the second fits.
    let path = hunting_config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "replicas = 2",
        "budgets = [{ limit = \"3s\", per = \"60s\" }]\nestimate = \"1600ms\"",
        "windows = [{ limit = 100, per = \"1s\" }]\nmax_wait = \"10s\"",
    );
    let gws = replicas(2, &path, dir.path());
    let mut stats = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let evalsha_calls = |c: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let hunt = |gw: &GatewayProcess, cost: f64| {
        let request = client()
            .post(gw.url("/api/advancedhunting/run"))
            .header("authorization", bearer("tenant-1", "app-1"))
            .body(body(&query(cost, "")));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            (status, Instant::now())
        }
    };
    let first = tokio::spawn(hunt(&gws[0], 1.2));
    // The first query is running upstream, its estimate reserved in Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while emu.requests().is_empty() {
        assert!(Instant::now() < deadline, "the first query never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut stats).unwrap();
    let (second, second_done) = hunt(&gws[1], 0.05).await;
    let (first, first_done) = first.await.unwrap();
    assert_eq!((first, second), (200, 200));
    let after = second_done.duration_since(first_done);
    assert!(after < Duration::from_millis(400), "the second query ran {after:?} after the first ended");
    let asks = evalsha_calls(&mut stats);
    // Its call admission, its asks (one before, one after the completion),
    // and both settles; asking every 250 ms through the first query's 1.2 s
    // would add four or five more.
    assert!(asks <= 6, "{asks} scripts ran while the second query waited");
    assert_eq!(emu.throttled(), 0);
}

/// Running time a replica charged alone while Redis was down reaches the
/// shared ledger when Redis returns (empty, here): another replica, which
/// never saw that query, then refuses a query the budget has no room for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_time_charged_during_an_outage_is_added_back_to_redis() {
    let _one_at_a_time = support::timing_exclusive().await;
    use support::hunt::{body, query};
    let mut redis = Redis::start();
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    // Each replica's share in an outage is 0.5 s: a query estimated at
    // 0.45 s is admitted alone, and runs 0.7 s.
    let path = hunting_config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "replicas = 2\non_outage = \"local\"",
        "budgets = [{ limit = \"1s\", per = \"60s\" }]\nestimate = \"450ms\"",
        "windows = [{ limit = 100, per = \"1s\" }]\nmode = \"reject\"",
    );
    let gws = replicas(2, &path, dir.path());
    for gw in &gws {
        until_mode(gw, "shared").await;
    }
    let hunt = |gw: &GatewayProcess, cost: f64| {
        client()
            .post(gw.url("/api/advancedhunting/run"))
            .header("authorization", bearer("tenant-1", "app-1"))
            .body(body(&query(cost, "")))
            .send()
    };
    redis.kill();
    let alone = hunt(&gws[0], 0.7).await.unwrap();
    assert_eq!(alone.status(), 200, "admitted on the local share");
    let _ = alone.bytes().await;
    until_mode(&gws[0], "local").await;

    redis.restart();
    // Both replicas may have seen the outage (the other through its
    // subscription); each is back once its watcher has caught up.
    for gw in &gws {
        until_mode(gw, "shared").await;
    }
    // 0.7 s charged plus the next query's 0.45 s estimate exceed the 1 s budget.
    let refused = hunt(&gws[1], 0.05).await.unwrap();
    assert_eq!(refused.status(), 429, "the other replica knows the running time spent alone");
    assert_eq!(refused.headers()["x-quotagate-throttled-by"], "gateway");
    let retry: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=61).contains(&retry), "until the 0.7 s charge leaves the minute: {retry}");
    assert_eq!(emu.requests().len(), 1, "only the query run alone reached the upstream");
}

/// A query a replica admitted alone while Redis was down, still running
/// when Redis returns and the catch-up passes, is charged in the shared
/// ledger when it ends. (Its charge stayed local: the catch-up had gone by,
/// and it had no shared reservation to settle.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_run_alone_that_ends_after_redis_returns_is_charged_in_redis() {
    let _one_at_a_time = support::timing_exclusive().await;
    use support::hunt::{body, query};
    let mut redis = Redis::start();
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = hunting_config(
        dir.path(),
        &emu.url(),
        &redis.url(),
        "replicas = 2\non_outage = \"local\"",
        "budgets = [{ limit = \"1s\", per = \"60s\" }]\nestimate = \"450ms\"",
        "windows = [{ limit = 100, per = \"1s\" }]\nmode = \"reject\"",
    );
    let gws = replicas(2, &path, dir.path());
    for gw in &gws {
        until_mode(gw, "shared").await;
    }
    let hunt = |gw: &GatewayProcess, cost: f64| {
        client()
            .post(gw.url("/api/advancedhunting/run"))
            .header("authorization", bearer("tenant-1", "app-1"))
            .body(body(&query(cost, "")))
            .send()
    };
    redis.kill();
    let alone = tokio::spawn(hunt(&gws[0], 3.0));
    until_mode(&gws[0], "local").await;
    redis.restart();
    for gw in &gws {
        until_mode(gw, "shared").await;
    }
    assert!(!alone.is_finished(), "the query still runs after the catch-up");
    let alone = alone.await.unwrap().unwrap();
    assert_eq!(alone.status(), 200, "admitted on the local share");
    let _ = alone.bytes().await;
    // The charge goes to Redis in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = hunt(&gws[1], 0.05).await.unwrap();
    assert_eq!(refused.status(), 429, "the other replica knows the 3 s run alone");
    assert_eq!(refused.headers()["x-quotagate-throttled-by"], "gateway");
    assert_eq!(emu.requests().len(), 1, "only the query run alone reached the upstream");
}

/// A lower limit one replica learns from the upstream's 429 message binds
/// every replica: the upstream's 3 a second (the config says 10) is kept
/// from the first throttle on, whichever replica the calls reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_revealed_to_one_replica_binds_the_others() {
    let _one_at_a_time = support::timing_exclusive().await;
    let Setup { redis: _redis, emu, dir, cfg } = setup(
        Some((3, Duration::from_secs(1))),
        "",
        "windows = [{ limit = 10, per = \"1s\" }]\nmax_wait = \"10s\"\nmax_queue = 100",
    )
    .await;
    let gws = replicas(2, &cfg, dir.path());
    // 50 ms apart: the replica that meets the 429 writes what it learnt to
    // Redis before the next call is admitted, even on a loaded machine (at
    // 20 ms apart, a run beside a build saw the next call admitted on the
    // other replica while that write was on its way, and throttled too).
    let mut calls = Vec::new();
    for i in 0..15 {
        calls.push(tokio::spawn(get(gws[i % 2].url("/api/incidents"))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap().status(), 200);
    }
    let seen: Vec<_> = emu.requests().iter().map(|r| (r.at, r.status)).collect();
    let t0 = seen[0].0;
    let seen: Vec<_> = seen.iter().map(|(t, s)| (t.duration_since(t0).as_millis(), s)).collect();
    assert!(
        emu.throttled() <= 1,
        "learnt once for both replicas, throttled {} times: {seen:?}",
        emu.throttled()
    );
    let times = emu.accepted_times("incidents", "tenant-1");
    assert!(max_in_any_interval(&times, Duration::from_secs(1)) <= 3);
}

/// A call whose body comes slowly leaves one replica well after Redis
/// admitted it. The upstream counts it when it arrives, so a waiter on the
/// other replica must wait for the window to age from its departure, which
/// the first replica writes to Redis before the call goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_body_comes_slowly_holds_the_other_replicas_from_when_it_leaves() {
    let _one_at_a_time = support::timing_exclusive().await;
    const SEC: Duration = Duration::from_secs(1);
    let Setup { redis: _redis, emu, dir, cfg } =
        setup(Some((1, SEC)), "", "windows = [{ limit = 1, per = \"1s\" }]\nmax_wait = \"5s\"").await;
    let gws = replicas(2, &cfg, dir.path());
    // The slow client, on the first replica: its head now, the rest of its
    // 10-byte body 400 ms later.
    let slow = support::SlowPost::start(&gws[0].proxy, "/api/incidents", &bearer("tenant-1", "app-1")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A call on the second replica waits for the slot meanwhile.
    let next = tokio::spawn(get(gws[1].url("/api/incidents")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = slow.finish().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(next.await.unwrap().status(), 200);

    let times = emu.accepted_times("incidents", "tenant-1");
    assert_eq!(emu.throttled(), 0, "the upstream never counted two calls in one second");
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    assert!(gap >= SEC, "the second call arrived {gap:?} after the first");
    assert!(
        gap < SEC + Duration::from_millis(250),
        "and went once the window aged from the first's departure: {gap:?}"
    );
}
