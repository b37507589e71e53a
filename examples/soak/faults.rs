//! The faults the soak injects, on a fixed schedule repeated every minute
//! of the run (offsets within each minute):
//!
//! | At | Fault | What the gateway should do |
//! |---|---|---|
//! | 5 s | the upstream resets every connection mid-body, for 1.5 s | pass the status on, abort the body |
//! | 15 s | the upstream stalls every request, for 3 s | 504 after `header_timeout` (1 s) |
//! | 25 s | another consumer spends every key's minute at the upstream | obey the upstream's 429s: hold, retry or pass on |
//! | 35 s | the config file is replaced: incident limits 12→10 and 60→50 | reload by itself (file watcher) |
//! | 45 s | the upstream answers garbage, for 1 s | 502 |
//! | 50 s | the file is replaced with 12 and 60, modification time and length as before, then SIGHUP | reload on the signal |
//!
//! Client disconnects (while queued, and while a response streams) are
//! played by the clients themselves ([`crate::traffic::client`]); with
//! `--store redis`, Redis outages by [`crate::outage`].

use std::time::{Duration, Instant};

use crate::emulator::{Emulator, Fault};
use crate::gateway::{config_text, Admin, Gateway, Limits, NORMAL, TIGHT};
use crate::traffic::{app, tenant, APPS, TENANTS};

/// What was played, and when (seconds since the start).
#[derive(Default)]
pub struct Played {
    pub events: Vec<(f64, String)>,
    /// When the upstream was resetting connections.
    pub resets: Vec<(Instant, Instant)>,
    /// Reloads: (trigger, whether `/readyz`'s generation moved within 5 s).
    pub reloads: Vec<(&'static str, bool)>,
}

impl Played {
    fn note(&mut self, start: Instant, what: String) {
        self.events.push((start.elapsed().as_secs_f64(), what));
    }
}

/// Play the schedule from `start` until `until`.
pub async fn play(emu: &Emulator, gw: &Gateway, admin: &Admin, start: Instant, until: Instant) -> Played {
    let mut played = Played::default();
    let mut cycle = 0u32;
    loop {
        let base = start + Duration::from_secs(60 * u64::from(cycle));
        let at = |s: f64| base + Duration::from_secs_f64(s);
        if !wait_until(at(5.0), until).await {
            break;
        }
        let from = Instant::now();
        emu.set_fault(Fault::ResetMidBody);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        emu.set_fault(Fault::None);
        played.resets.push((from, Instant::now()));
        played.note(start, "upstream resets mid-body (1.5 s)".into());

        if !wait_until(at(15.0), until).await {
            break;
        }
        emu.set_fault(Fault::Stall);
        tokio::time::sleep(Duration::from_secs(3)).await;
        emu.set_fault(Fault::None);
        played.note(start, "upstream stalls (3 s)".into());

        if !wait_until(at(25.0), until).await {
            break;
        }
        for i in 0..TENANTS * APPS {
            emu.spend("incidents", &tenant(i), &app(i), NORMAL.per_minute as usize);
            emu.spend("hunting", &tenant(i), &app(i), NORMAL.per_minute as usize);
        }
        played.note(start, "another consumer spends every key's minute upstream".into());

        if !wait_until(at(35.0), until).await {
            break;
        }
        let applied = reload(gw, admin, TIGHT, false).await;
        played.reloads.push(("file changed", applied));
        played.note(
            start,
            format!(
                "config file changed: incidents {}/{} (applied: {applied})",
                TIGHT.per_minute, TIGHT.per_hour
            ),
        );

        if !wait_until(at(45.0), until).await {
            break;
        }
        emu.set_fault(Fault::Garbage);
        tokio::time::sleep(Duration::from_secs(1)).await;
        emu.set_fault(Fault::None);
        played.note(start, "upstream answers garbage (1 s)".into());

        if !wait_until(at(50.0), until).await {
            break;
        }
        let applied = reload(gw, admin, NORMAL, true).await;
        played.reloads.push(("SIGHUP", applied));
        played.note(
            start,
            format!("SIGHUP: incidents {}/{} (applied: {applied})", NORMAL.per_minute, NORMAL.per_hour),
        );
        cycle += 1;
    }
    emu.set_fault(Fault::None);
    played
}

/// Sleep until `at`; false (at once) when `at` is past `until`.
pub async fn wait_until(at: Instant, until: Instant) -> bool {
    if at >= until {
        return false;
    }
    tokio::time::sleep_until(at.into()).await;
    true
}

/// Replace the config with one of `limits`, whole (written aside, then
/// renamed over it, as a deployment tool does: the watcher never reads a
/// file half-written); with `hangup`, the new file keeps the old one's
/// modification time, so only the SIGHUP that follows can apply it.
/// Returns whether the running generation moved within 5 s.
async fn reload(gw: &Gateway, admin: &Admin, limits: Limits, hangup: bool) -> bool {
    let before = admin.generation().await.unwrap_or(0);
    let modified = std::fs::metadata(&gw.config).and_then(|m| m.modified()).ok();
    let aside = gw.config.with_extension("toml.new");
    if std::fs::write(&aside, config_text(&gw.setup, limits)).is_err() {
        return false;
    }
    if hangup {
        if let (Some(t), Ok(file)) = (modified, std::fs::File::options().write(true).open(&aside)) {
            let _ = file.set_modified(t);
        }
    }
    if std::fs::rename(&aside, &gw.config).is_err() || (hangup && !gw.signal("HUP")) {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if admin.generation().await.is_some_and(|g| g > before) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
