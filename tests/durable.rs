//! The embedded durable store, end to end: the real binary on a SQLite file
//! in a temporary directory, in front of the emulator, killed with SIGKILL
//! under load and started again (issue #7, case 1); and a file that is
//! corrupt or cannot be written.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::emulator::{max_in_any_interval, Emulator, EmulatorConfig, QuotaRule};
use support::process::GatewayProcess as Gateway;
use support::{bearer, client};

const WINDOW: Duration = Duration::from_secs(2);
const LIMIT: u32 = 20;

fn config(dir: &Path, upstream: &str, store: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
# Covers the loopback hop on a busy machine: a call is counted from when it
# leaves, after its group commit, so the commit itself is not in the guard.
guard = "200ms"
# No pruning during the test: every admission stays in the file.
idle_sweep = "1h"
access_log = false

[[upstream]]
name = "defender"
url = "{upstream}"
kind = "defender"
route_prefixes = ["/api/"]

[store]
{store}

[[policy]]
name = "incidents"
paths = ["/api/incidents", "/api/incidents/**"]
windows = [{{ limit = {LIMIT}, per = "2s" }}]
max_wait = "1s"
max_queue = 1000
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A hunting gateway on the state file `db`: a running-time budget of
/// `limit` per `per`, a 1 s estimate, call windows that never bind.
fn write_hunting_config(cfg: &Path, upstream: &str, db: &Path, limit: &str, per: &str) {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\nguard = \"50ms\"\n\
         [[upstream]]\nname = \"defender\"\nurl = \"{upstream}\"\nkind = \"defender\"\nroute_prefixes = [\"/api/\"]\n\
         [store]\nbackend = \"sqlite\"\npath = {:?}\n\
         [hunting]\nbudgets = [{{ limit = \"{limit}\", per = \"{per}\" }}]\nestimate = \"1s\"\n\
         [[policy]]\nname = \"hunting\"\nmethods = [\"POST\"]\npaths = [\"/api/advancedhunting/run\"]\n\
         hunting = true\nwindows = [{{ limit = 100, per = \"1s\" }}]\nmode = \"reject\"\n",
        db.to_str().unwrap(),
    );
    std::fs::write(cfg, text).unwrap();
}

/// A hunting query of `cost` seconds through `gw`, read to its end: its
/// status, or 0 when the gateway went away.
fn hunt(gw: &Gateway, cost: f64) -> impl std::future::Future<Output = u16> + Send + 'static {
    use support::hunt::{body, query};
    let request = client()
        .post(gw.url("/api/advancedhunting/run"))
        .header("authorization", bearer("tenant-rt", "app"))
        .body(body(&query(cost, "")));
    async move {
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            }
            Err(_) => 0,
        }
    }
}

fn admissions_in(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT count(*) FROM admissions", [], |r| r.get(0)).unwrap()
}

/// Issue #7, case 1: killed with SIGKILL under load and restarted against
/// the same upstream, the gateway still respects every admission it made:
/// no upstream 429 in the windows that follow, and the file holds one entry
/// per call the upstream saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_then_restart_forgets_no_admission() {
    let _one_at_a_time = support::timing_exclusive().await;
    let emu = Emulator::start(EmulatorConfig::new().quota(QuotaRule::new(
        "incidents",
        &["/api/incidents"],
        &[(LIMIT, WINDOW)],
    )))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg =
        config(dir.path(), &emu.url(), &format!("backend = \"sqlite\"\npath = {:?}", db.to_str().unwrap()));
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let target = Arc::new(Mutex::new(gw.proxy.clone()));

    // 3× the quota, sustained, from before the kill until well after the restart.
    let http = client();
    let rate = 3.0 * f64::from(LIMIT) / WINDOW.as_secs_f64();
    let total = (rate * 7.0) as usize;
    let start = tokio::time::Instant::now();
    let mut load = Vec::new();
    for i in 0..total {
        let (http, target) = (http.clone(), target.clone());
        load.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            let url = format!("http://{}/api/incidents", target.lock().unwrap());
            let r = http.get(url).header("authorization", bearer("tenant-1", "app-1")).send().await;
            r.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }

    // Kill while the second window's slots are being taken (the first
    // window's 20 calls, admitted over 0.67 s, free them from 2.2 s: the
    // window and the guard), with calls queued: 15 of them admitted by then.
    tokio::time::sleep_until(start + Duration::from_millis(2700)).await;
    gw.kill();
    let seen_before = emu.accepted("incidents");
    let in_file = admissions_in(&db);
    assert!(seen_before >= LIMIT as usize, "the load filled a window before the kill ({seen_before})");
    assert!(
        in_file >= seen_before as i64,
        "every call the upstream saw was on disk first: {in_file} rows, {seen_before} calls"
    );

    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    *target.lock().unwrap() = gw.proxy.clone();
    // The restarted gateway knows the window's use at once.
    let quota: serde_json::Value =
        http.get(format!("http://{}/quota", gw.admin)).send().await.unwrap().json().await.unwrap();
    let used = quota["tenants"][0]["keys"][0]["windows"][0]["used"].as_u64().unwrap_or(0);
    assert!(used >= u64::from(LIMIT) / 2, "restored use {used} of {LIMIT}: {quota}");

    let mut statuses = Vec::new();
    for t in load {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(emu.throttled(), 0, "no upstream 429 before or after the restart");
    let times = emu.accepted_times("incidents", "tenant-1");
    assert!(max_in_any_interval(&times, WINDOW) <= LIMIT as usize);
    assert!(times.len() >= 3 * LIMIT as usize, "the quota was used after the restart too: {}", times.len());
    assert!(statuses.iter().all(|&s| s == 0 || s == 200 || s == 429), "{statuses:?}");
    let in_file = admissions_in(&db);
    assert!(in_file >= times.len() as i64, "{in_file} rows for {} calls", times.len());
    gw.kill();
}

/// A state file that is not a database stops startup with a clear error
/// naming the file; with `allow_start_empty` the gateway moves it aside,
/// starts empty and says so in its log and in `/readyz`.
#[tokio::test]
async fn a_corrupt_file_stops_startup_unless_starting_empty_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    std::fs::write(&db, vec![0x42; 16 * 1024]).unwrap();
    let store = format!("backend = \"sqlite\"\npath = {:?}", db.to_str().unwrap());
    let cfg = config(dir.path(), "http://127.0.0.1:9", &store);
    let err = Gateway::start(&cfg, dir.path()).err().expect("a corrupt file stops startup");
    assert!(err.contains("is corrupt") && err.contains("state.db"), "{err}");
    assert!(err.contains("allow_start_empty"), "the error says how to go on: {err}");
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x42; 16 * 1024], "the file is left as it was");

    let cfg = config(dir.path(), "http://127.0.0.1:9", &format!("{store}\nallow_start_empty = true"));
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let ready: serde_json::Value =
        client().get(format!("http://{}/readyz", gw.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["store"]["kind"], "sqlite");
    assert_eq!(ready["store"]["durable"], true);
    assert!(ready["store"]["degraded"].as_str().unwrap().contains("corrupt"), "{ready}");
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("state.db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside");
    assert_eq!(admissions_in(&db), 0);
    gw.kill();
}

/// A path that cannot be created stops startup; allowed to start empty, the
/// gateway runs on memory and `/readyz` says it is not durable.
#[tokio::test]
async fn an_unwritable_path_stops_startup_unless_starting_empty_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the state directory should be: not creatable, even as root.
    std::fs::write(dir.path().join("not-a-dir"), "x").unwrap();
    let db = dir.path().join("not-a-dir").join("state.db");
    let store = format!("backend = \"sqlite\"\npath = {:?}", db.to_str().unwrap());
    let cfg = config(dir.path(), "http://127.0.0.1:9", &store);
    let err = Gateway::start(&cfg, dir.path()).err().expect("an unwritable path stops startup");
    assert!(err.contains("cannot be opened for writing") && err.contains("not-a-dir"), "{err}");

    let cfg = config(dir.path(), "http://127.0.0.1:9", &format!("{store}\nallow_start_empty = true"));
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let ready: serde_json::Value =
        client().get(format!("http://{}/readyz", gw.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["store"]["durable"], false, "{ready}");
    assert!(ready["store"]["degraded"].as_str().unwrap().contains("memory"), "{ready}");
    gw.kill();
}

/// Rows name their policy, not its place in the config: after a reload that
/// puts a new policy ahead of an existing one, and a restart on that config,
/// each policy still holds exactly its own admissions.
#[tokio::test]
async fn admissions_keep_their_policy_across_a_reload_that_moves_it_and_a_restart() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg = dir.path().join("gateway.toml");
    let policy = |name: &str, path: &str, limit: u32| {
        format!(
            "[[policy]]\nname = \"{name}\"\npaths = [\"{path}\"]\nwindows = [{{ limit = {limit}, per = \"60s\" }}]\nmode = \"reject\"\n"
        )
    };
    let write = |policies: &[String]| {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\n\
             [[upstream]]\nname = \"defender\"\nurl = \"{}\"\nkind = \"defender\"\nroute_prefixes = [\"/api/\"]\n\
             [store]\nbackend = \"sqlite\"\npath = {:?}\n{}",
            emu.url(),
            db.to_str().unwrap(),
            policies.concat()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    let http = client();
    let call = |gw: &Gateway, path: &str| {
        let request = http.get(gw.url(path)).header("authorization", bearer("tenant-moved", "app"));
        async move { request.send().await.unwrap().status().as_u16() }
    };

    write(&[policy("incidents", "/api/incidents", 3)]);
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    for _ in 0..3 {
        assert_eq!(call(&gw, "/api/incidents").await, 200);
    }
    assert_eq!(call(&gw, "/api/incidents").await, 429, "incidents is spent");

    // A new policy now comes first: the positions of the two differ from
    // what the first config gave them.
    write(&[policy("machines", "/api/machines", 2), policy("incidents", "/api/incidents", 3)]);
    gw.reload();
    gw.until_generation(2).await;
    for _ in 0..2 {
        assert_eq!(call(&gw, "/api/machines").await, 200);
    }
    assert_eq!(call(&gw, "/api/machines").await, 429, "machines is spent");
    assert_eq!(call(&gw, "/api/incidents").await, 429, "incidents still is");
    gw.kill();

    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    assert_eq!(call(&gw, "/api/incidents").await, 429, "incidents' three admissions came back to incidents");
    assert_eq!(call(&gw, "/api/machines").await, 429, "machines' two came back to machines");
    assert_eq!(emu.requests().len(), 5, "the upstream saw the five admitted calls only");
}

/// A reload that lengthens a running-time budget lengthens how long the
/// state file keeps the charges made after it: a restart then still counts
/// a charge the first config's budget would have let expire.
#[tokio::test]
async fn charges_made_after_a_reload_count_for_the_reloaded_budget_across_a_restart() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg = dir.path().join("gateway.toml");
    let write = |per: &str| write_hunting_config(&cfg, &emu.url(), &db, "2s", per);
    let horizons = || -> Vec<i64> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut q = conn.prepare("SELECT expires - end_at FROM charges").unwrap();
        q.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    };

    write("1s");
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    write("60s");
    gw.reload();
    gw.until_generation(2).await;
    assert_eq!(hunt(&gw, 1.5).await, 200);
    // The charge is committed with the next group commit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while horizons().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the charge never reached the state file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(horizons(), vec![60_050_000_000], "kept for the reloaded budget and the guard");
    gw.kill();

    // Past the first config's budget of a second, the restarted gateway
    // still counts the 1.5 s: a query's 1 s estimate does not fit in the
    // 0.5 s left of the 2 s budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    assert_eq!(hunt(&gw, 1.0).await, 429, "the restored charge leaves 0.5 s");
    assert_eq!(emu.requests().len(), 1, "the upstream ran the first query only");
}

/// A query in flight when the gateway is killed ran on at the service: the
/// restarted gateway charges it the time since it was sent (up to the
/// policy's total timeout), not only its estimate.
#[tokio::test]
async fn a_query_in_flight_at_a_crash_is_charged_what_it_may_have_run() {
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg = dir.path().join("gateway.toml");
    write_hunting_config(&cfg, &emu.url(), &db, "3s", "60s");
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let long = tokio::spawn(hunt(&gw, 5.0));
    // The query is on its way (its 1 s estimate committed as in flight)...
    tokio::time::sleep(Duration::from_millis(2500)).await;
    gw.kill();
    let _ = long.await;
    // ...and ran 2.5 s or more: of the 3 s budget, less than the next
    // query's 1 s estimate is left.
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    assert_eq!(hunt(&gw, 1.0).await, 429, "the crashed query counts what it may have run");
    assert_eq!(emu.requests().len(), 1, "the upstream ran the first query only");

    // The file now holds it as a charge, as of the first restart: a second
    // restart a second later neither charges it again nor moves it later.
    let charges = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let pending: i64 = conn.query_row("SELECT count(*) FROM pending", [], |r| r.get(0)).unwrap();
        let mut q = conn.prepare("SELECT end_at, cost FROM charges").unwrap();
        let rows: Vec<(i64, i64)> =
            q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        (pending, rows)
    };
    gw.kill();
    let first = charges();
    assert_eq!((first.0, first.1.len()), (0, 1), "{first:?}");
    assert!(first.1[0].1 >= 2_500_000_000, "charged what it may have run: {first:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    assert_eq!(hunt(&gw, 1.0).await, 429);
    gw.kill();
    assert_eq!(charges(), first, "the second restart left the charge as it was");
}

/// A call whose body comes slowly is counted from when it leaves: the
/// state file moves its admission there too, so a restart restores the
/// window as the upstream counts it.
#[tokio::test]
async fn a_call_that_leaves_late_is_kept_in_the_file_at_its_departure() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let emu = Emulator::start(EmulatorConfig::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg =
        config(dir.path(), &emu.url(), &format!("backend = \"sqlite\"\npath = {:?}", db.to_str().unwrap()));
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let unix_now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    // The head now (the call is admitted at once), the rest of its body 600 ms later.
    let headed = unix_now();
    let slow = support::SlowPost::start(&gw.proxy, "/api/incidents", &bearer("tenant-1", "app-1")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let bodied = unix_now();
    let answer = slow.finish().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The move is committed with the writer's next batch, not waited for.
    let at_in_file = || -> i64 {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("SELECT at FROM admissions", [], |r| r.get(0)).unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut at = at_in_file();
    while at < headed + 500_000_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        at = at_in_file();
    }
    let ms = |ns: i64| ns as f64 / 1e6;
    assert!(
        at >= bodied - 50_000_000,
        "the file has the call {:.0} ms after its head was sent; its body came {:.0} ms after",
        ms(at - headed),
        ms(bodied - headed)
    );
    assert_eq!(admissions_in(&db), 1);
    gw.kill();
}

/// A limit the upstream revealed, of a window longer than any configured,
/// outlives a restart with the calls that window still counts, though none
/// is in a configured window any more. (The file kept a call only as long
/// as the configured windows, and restored a reveal only with a call of
/// its key, so both were gone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revealed_longer_window_and_its_calls_outlive_a_restart() {
    let _one_at_a_time = support::timing_exclusive().await;
    let emu = Emulator::start(EmulatorConfig::new().quota(QuotaRule::new(
        "incidents",
        &["/api/incidents"],
        &[(3, Duration::from_secs(2))],
    )))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\nguard = \"50ms\"\n\
             [[upstream]]\nname = \"defender\"\nurl = \"{}\"\nkind = \"defender\"\nroute_prefixes = [\"/api/\"]\n\
             [store]\nbackend = \"sqlite\"\npath = {:?}\n\
             [[policy]]\nname = \"incidents\"\npaths = [\"/api/incidents\"]\n\
             windows = [{{ limit = 100, per = \"300ms\" }}]\nmode = \"reject\"\n",
            emu.url(),
            db.to_str().unwrap()
        ),
    )
    .unwrap();
    let call = |gw: &Gateway| {
        client().get(gw.url("/api/incidents")).header("authorization", bearer("t", "a")).send()
    };

    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    for _ in 0..3 {
        assert_eq!(call(&gw).await.unwrap().status(), 200);
    }
    // The fourth meets the upstream's 3 per 2 s, which its message reveals.
    let fourth = call(&gw).await.unwrap();
    assert_eq!(fourth.headers()["x-quotagate-throttled-by"], "upstream");
    assert_eq!(emu.throttled(), 1);
    // Past the upstream's hold, three calls fill the revealed window again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for _ in 0..3 {
        assert_eq!(call(&gw).await.unwrap().status(), 200);
    }
    // Past the configured 300 ms window, and restarted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.kill();
    let gw = Gateway::start(&cfg, dir.path()).unwrap();
    let r = call(&gw).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers()["x-quotagate-throttled-by"],
        "gateway",
        "the restarted gateway knows 3 per 2 s are spent"
    );
    assert_eq!((emu.accepted("incidents"), emu.throttled()), (6, 1));

    // The file keeps every call of the key for the revealed 2 s, those made
    // before the reveal too.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let shortest: i64 = conn.query_row("SELECT min(expires - at) FROM admissions", [], |r| r.get(0)).unwrap();
    assert!(shortest >= 2_000_000_000, "a call is kept only {shortest} ns");
}
