//! `GET /quota`: every key's windows, queue and upstream hold, as JSON.
//!
//! Grouped by tenant; each key names its policy and app, and each window its
//! limit, length, use, remaining calls and the seconds until the oldest
//! counted call stops counting. `running_time` lists each tenant's hunting
//! ledger: per budget window its limit, charged, reserved and remaining
//! seconds, and the queries in flight.

use serde_json::{json, Value};

use crate::admission::runtime::RuntimeStatus;
use crate::admission::KeyStatus;

pub fn report(keys: &[KeyStatus], runtime: &[RuntimeStatus]) -> Value {
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
    let running_time: Vec<Value> = runtime
        .iter()
        .map(|k| {
            json!({
                "tenant": &*k.key.tenant,
                "app": k.key.app.as_deref(),
                "budgets": k.budgets.iter().map(|b| json!({
                    "limit_seconds": b.budget.limit.as_secs_f64(),
                    "window_seconds": b.budget.per.as_secs_f64(),
                    "charged_seconds": b.charged.as_secs_f64(),
                    "reserved_seconds": b.reserved.as_secs_f64(),
                    "remaining_seconds": b.remaining().as_secs_f64(),
                    "reset_seconds": b.reset.as_secs_f64(),
                })).collect::<Vec<_>>(),
                "in_flight": k.in_flight,
                "queued": k.queued,
                "estimate_seconds": k.estimate.as_secs_f64(),
                "held_for_seconds": k.held_for.map(|d| d.as_secs_f64()),
            })
        })
        .collect();
    json!({ "tenants": tenants, "running_time": running_time })
}
