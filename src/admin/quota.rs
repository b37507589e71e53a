//! `GET /quota`: every key's windows, queue and upstream hold, as JSON.
//!
//! Grouped by tenant; each key names its policy and app, and each window its
//! limit, length, use, remaining calls and the seconds until the oldest
//! counted call stops counting.

use serde_json::{json, Value};

use crate::admission::KeyStatus;

pub fn report(keys: &[KeyStatus]) -> Value {
    let mut tenants: Vec<Value> = Vec::new();
    let mut current: Option<(&str, Vec<Value>)> = None;
    for k in keys {
        let entry = json!({
            "policy": k.policy,
            "app": k.key.app.as_deref(),
            "windows": k.windows.iter().map(|w| json!({
                "limit": w.window.limit.get(),
                "window_seconds": w.window.per.as_secs_f64(),
                "used": w.used,
                "remaining": w.remaining(),
                "reset_seconds": w.reset.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "queued": k.queued,
            "held_for_seconds": k.held_for.map(|d| d.as_secs_f64()),
        });
        match &mut current {
            Some((tenant, list)) if *tenant == &*k.key.tenant => list.push(entry),
            _ => {
                if let Some((tenant, list)) = current.take() {
                    tenants.push(json!({"tenant": tenant, "keys": list}));
                }
                current = Some((&k.key.tenant, vec![entry]));
            }
        }
    }
    if let Some((tenant, list)) = current {
        tenants.push(json!({"tenant": tenant, "keys": list}));
    }
    json!({ "tenants": tenants })
}
