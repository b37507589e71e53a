//! How the store names a quota key: by its policy's *name*, never by the
//! key id a process gave the policy.
//!
//! Key ids are per process: the first config's policies get their positions,
//! and a reload keeps the id of every name it keeps and gives new names new
//! ids. Two replicas (one reloaded, one freshly started), or one process
//! before and after a restart, may therefore give one policy different ids.
//! Rows of the state file and Redis keys outlive a process and are shared by
//! replicas, so they name the policy: `["hunting","tenant","app"]`, or
//! `[null,"tenant",…]` for a key that no policy scopes.
//!
//! Files written before names were used name a policy by its position in
//! the config of that time; such a name reads as `#<position>` and is
//! resolved against the config the gateway starts with, which is what those
//! files meant.

use std::sync::{Arc, RwLock};

use crate::policy::Policies;
use crate::quota::QuotaKey;

/// The running config's policy names by key id, kept current by reloads.
#[derive(Debug, Default)]
pub struct PolicyNames(RwLock<Vec<(u16, Arc<str>)>>);

impl PolicyNames {
    pub fn new(policies: &Policies) -> Self {
        let names = PolicyNames::default();
        names.set(policies);
        names
    }

    /// Take the names of a new config (after a reload).
    pub fn set(&self, policies: &Policies) {
        let table = policies.0.iter().map(|p| (p.key_id, Arc::from(p.name.as_str()))).collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// The name of the policy with key id `id`; a policy a reload removed
    /// while its keys live on keeps a name no policy has (`#<id>!`).
    pub fn name(&self, id: u16) -> Arc<str> {
        let table = self.0.read().unwrap_or_else(|e| e.into_inner());
        match table.iter().find(|(k, _)| *k == id) {
            Some((_, name)) => name.clone(),
            None => Arc::from(format!("#{id}!")),
        }
    }

    /// The key id of the policy a stored name means, if it still exists.
    pub fn id(&self, name: &str, policies: &Policies) -> Option<u16> {
        let by_name = policies.0.iter().find(|p| p.name == name);
        // A file of the earlier format: the policy at that position.
        let by_position = || policies.0.get(name.strip_prefix('#')?.parse::<usize>().ok()?);
        by_name.or_else(by_position).map(|p| p.key_id)
    }

    /// `key` as rows and Redis keys name it.
    pub fn encode(&self, key: &QuotaKey) -> String {
        let policy = key.policy.map(|id| self.name(id));
        serde_json::json!([policy.as_deref(), &*key.tenant, key.app.as_deref()]).to_string()
    }

    /// The key a stored name means under `policies`; `None` for a row this
    /// version cannot read, or whose policy no longer exists.
    pub fn decode(&self, text: &str, policies: &Policies) -> Option<QuotaKey> {
        let (policy, tenant, app): (serde_json::Value, String, Option<String>) =
            serde_json::from_str(text).ok()?;
        let policy = match policy {
            serde_json::Value::Null => None,
            serde_json::Value::String(name) => Some(self.id(&name, policies)?),
            // The earlier format: the policy's position.
            serde_json::Value::Number(n) => Some(self.id(&format!("#{n}"), policies)?),
            _ => return None,
        };
        Some(QuotaKey { policy, tenant: tenant.into(), app: app.map(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policies(order: &[&str]) -> Policies {
        let mut p = Config::builtin().policies;
        p.0.truncate(order.len());
        for (i, (policy, name)) in p.0.iter_mut().zip(order).enumerate() {
            policy.name = (*name).to_string();
            policy.key_id = u16::try_from(i).unwrap();
        }
        p
    }

    #[test]
    fn keys_name_their_policy_so_another_process_reads_them_as_the_same_policy() {
        let here = policies(&["hunting", "incidents"]);
        let names = PolicyNames::new(&here);
        let key = QuotaKey { policy: Some(1), tenant: "t|\"x".into(), app: Some("a".into()) };
        let text = names.encode(&key);
        assert_eq!(text, r#"["incidents","t|\"x","a"]"#);
        // A process whose config lists the policies the other way round.
        let there = policies(&["incidents", "hunting"]);
        let other = PolicyNames::new(&there);
        assert_eq!(other.decode(&text, &there), Some(QuotaKey { policy: Some(0), ..key.clone() }));
        assert_eq!(other.encode(&QuotaKey { policy: Some(0), ..key }), text, "the same name in both");
        let tenant = QuotaKey { policy: None, tenant: "t".into(), app: None };
        assert_eq!(other.decode(&names.encode(&tenant), &there), Some(tenant));
    }

    #[test]
    fn earlier_positions_removed_policies_and_garbage() {
        let p = policies(&["hunting", "incidents"]);
        let names = PolicyNames::new(&p);
        let legacy = names.decode(r#"[1,"t","a"]"#, &p).unwrap();
        assert_eq!(legacy.policy, Some(1), "a position in a file of the earlier format");
        assert_eq!(names.decode(r#"[7,"t","a"]"#, &p), None, "no policy at that position");
        assert_eq!(names.decode(r#"["gone","t","a"]"#, &p), None, "a policy no longer configured");
        assert_eq!(names.decode("nonsense", &p), None);
        assert_eq!(&*names.name(9), "#9!", "a removed policy's id names no policy");
        assert_eq!(names.id("#9!", &p), None);
    }
}
