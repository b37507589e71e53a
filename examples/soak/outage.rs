//! The Redis store's outages (`--store redis`), one a minute: at 40 s of
//! each minute the soak's `redis-server` is killed (SIGKILL, so it loses
//! every key it held) and started again, empty, 4 s later.
//!
//! What the gateway should do (docs/store.md, "When Redis is unreachable"):
//! mark the store down at its first failed call, answer as `on_outage`
//! says while it is down (`fail-closed`: 503 with `Retry-After` at once,
//! nothing forwarded; `local`: decide alone on its share), and switch back
//! by itself once Redis answers its pings again, adding back what it
//! admitted meanwhile. `/readyz`'s `store.mode` shows it: `shared`, then
//! `fail-closed` or `local`, then `shared` again.

use std::time::{Duration, Instant};

use crate::faults::wait_until;
use crate::gateway::Admin;
use crate::redis_server::RedisServer;

/// Seconds into each minute at which Redis is killed.
const AT: f64 = 40.0;
/// How long Redis stays down.
const DOWN: Duration = Duration::from_secs(4);
/// How long the store may take to come back once Redis answers again.
pub const RECOVERY: Duration = Duration::from_secs(15);

/// One outage, as played and as `/readyz` reported it.
#[derive(Debug)]
pub struct Outage {
    pub killed: Instant,
    /// When Redis answered `PING` again (or the restart gave up).
    pub restarted: Instant,
    pub restart_error: Option<String>,
    /// The first `/readyz` seen while Redis was down whose store was not
    /// `shared`: its status and `store.mode`.
    pub seen_down: Option<(u16, String)>,
    /// When `/readyz` first reported the store `shared` and reachable again.
    pub recovered: Option<Instant>,
}

/// Whether `/readyz` has the Redis store shared and reachable; and its mode.
async fn mode(admin: &Admin) -> Option<(u16, String, bool)> {
    let (status, store) = admin.store().await?;
    let mode = store["mode"].as_str().unwrap_or("?").to_string();
    let shared = mode == "shared" && store["reachable"] == true;
    Some((status, mode, shared))
}

/// Play an outage every minute from `start` until `until`.
pub async fn play(redis: &mut RedisServer, admin: &Admin, start: Instant, until: Instant) -> Vec<Outage> {
    let mut outages = Vec::new();
    let mut cycle = 0u64;
    while wait_until(start + Duration::from_secs(60 * cycle) + Duration::from_secs_f64(AT), until).await {
        cycle += 1;
        let killed = Instant::now();
        redis.kill();
        let mut seen_down = None;
        while killed.elapsed() < DOWN {
            if seen_down.is_none() {
                if let Some((status, mode, false)) = mode(admin).await {
                    seen_down = Some((status, mode));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restart_error = redis.restart().await.err();
        let restarted = Instant::now();
        let mut recovered = None;
        while restart_error.is_none() && restarted.elapsed() < RECOVERY {
            if let Some((_, _, true)) = mode(admin).await {
                recovered = Some(Instant::now());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        outages.push(Outage { killed, restarted, restart_error, seen_down, recovered });
    }
    outages
}
