//! Validation of the shared-gateway settings: clients, their keys, shares
//! and guards, and the identity mode.

use std::num::NonZeroU32;

use http::HeaderName;

use super::file::File;
use super::validate::Problems;
use crate::admission::{Class, Share};
use crate::identity::client::{needed_elsewhere, parse_sha256, Client, GuardSpec, IdentityMode, Roster};

/// Most configured clients (each is a lane in every key and a metric label).
const MAX_CLIENTS: usize = 1000;

pub(super) fn roster(file: &File, p: &mut Problems) -> Roster {
    let header =
        HeaderName::from_bytes(file.api_key_header.to_ascii_lowercase().as_bytes()).unwrap_or_else(|_| {
            p.push("api_key_header", format!("`{}` is not a header name", file.api_key_header));
            HeaderName::from_static("x-quotagate-key")
        });
    if needed_elsewhere(&header) {
        p.push(
            "api_key_header",
            format!("`{header}` is a header requests need for something else: the key header is removed from every request; pick a name of its own, such as x-quotagate-key"),
        );
    }
    let any_key = file.clients.iter().any(|c| c.key_sha256.is_some());
    let mode = match file.client_identity.as_deref() {
        None if any_key => IdentityMode::Key,
        None => IdentityMode::Anonymous,
        Some("key") => IdentityMode::Key,
        Some("app") => IdentityMode::App,
        Some("anonymous") => IdentityMode::Anonymous,
        Some(other) => {
            p.push("client_identity", format!("`{other}` is not key, app or anonymous"));
            IdentityMode::Key
        }
    };
    if mode == IdentityMode::Anonymous && !file.clients.is_empty() {
        p.push("client", "[[client]] entries are never used when client_identity is anonymous");
    }
    if mode == IdentityMode::Key && !any_key {
        p.push("client_identity", "`key` needs at least one [[client]] with a key_sha256");
    }
    if file.clients.len() > MAX_CLIENTS {
        p.push("client", format!("at most {MAX_CLIENTS} clients"));
    }
    let mut clients = Vec::new();
    let mut reserved_total = 0u32;
    for (i, c) in file.clients.iter().enumerate() {
        let field = format!("client[{i}] ({})", c.name);
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            p.push(&field, "name must be non-empty letters, digits, `-`, `_` or `.`");
        }
        if ["anonymous", "other"].contains(&c.name.as_str())
            || file.clients[..i].iter().any(|o| o.name == c.name)
        {
            p.push(&field, "another client has the same name (`anonymous` and `other` are taken)");
        }
        let key_sha256 = c.key_sha256.as_deref().and_then(|hex| {
            let parsed = parse_sha256(hex);
            if parsed.is_none() {
                p.push(&format!("{field}.key_sha256"), "must be 64 hex digits: `printf %s KEY | sha256sum`");
            }
            parsed
        });
        if key_sha256.is_some() && file.clients[..i].iter().any(|o| o.key_sha256 == c.key_sha256) {
            p.push(&format!("{field}.key_sha256"), "another client has the same key");
        }
        if mode == IdentityMode::Key && c.key_sha256.is_none() {
            p.push(&format!("{field}.key_sha256"), "is required when client_identity is key");
        }
        if c.app_id.is_some() && file.clients[..i].iter().any(|o| o.app_id == c.app_id) {
            p.push(&format!("{field}.app_id"), "another client has the same app_id");
        }
        if mode == IdentityMode::App && c.app_id.is_none() {
            p.push(&format!("{field}.app_id"), "is required when client_identity is app");
        }
        let weight = c.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            p.push(&format!("{field}.weight"), "must be between 1 and 1000");
        }
        let class = match c.priority.as_deref() {
            None => Class::Normal,
            Some(s) => Class::parse(s).unwrap_or_else(|| {
                p.push(&format!("{field}.priority"), format!("`{s}` is not interactive, normal or batch"));
                Class::Normal
            }),
        };
        if let Some(cap) = c.cap_percent {
            if !(1..=100).contains(&cap) {
                p.push(&format!("{field}.cap_percent"), "must be between 1 and 100");
            }
        }
        let reserved = c.reserved_percent.unwrap_or(0);
        if reserved > 100 {
            p.push(&format!("{field}.reserved_percent"), "must be between 0 and 100");
        }
        if c.cap_percent.is_some_and(|cap| reserved > cap) {
            p.push(&format!("{field}.reserved_percent"), "must not be more than cap_percent");
        }
        reserved_total += u32::from(reserved);
        let guard = match (c.guard_per_second, c.guard_burst) {
            (None, None) => None,
            (None, Some(_)) => {
                p.push(&format!("{field}.guard_burst"), "needs guard_per_second");
                None
            }
            (Some(rate), burst) => {
                let rate = NonZeroU32::new(rate);
                let burst = burst.map_or(rate, NonZeroU32::new);
                if rate.is_none() {
                    p.push(&format!("{field}.guard_per_second"), "must be at least 1");
                }
                if burst.is_none() {
                    p.push(&format!("{field}.guard_burst"), "must be at least 1");
                }
                rate.zip(burst).map(|(per_second, burst)| GuardSpec { per_second, burst })
            }
        };
        clients.push(Client {
            name: c.name.clone(),
            key_sha256,
            app_id: c.app_id.clone(),
            share: Share {
                client: u16::try_from(i).unwrap_or(u16::MAX),
                weight: weight.clamp(1, 1000),
                class,
                cap_percent: c.cap_percent.map(|c| c.clamp(1, 100)),
                reserved_percent: reserved.min(100),
            },
            guard,
        });
    }
    if reserved_total > 100 {
        p.push("client", format!("reserved_percent adds up to {reserved_total}, more than 100"));
    }
    Roster::new(mode, header, file.allow_priority_header, clients)
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use crate::admission::Class;
    use crate::identity::client::IdentityMode;

    const BASE: &str = r#"
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
"#;
    const UPSTREAM: &str = r#"
[[upstream]]
name = "d"
url = "http://127.0.0.1:9"
kind = "defender"
"#;

    #[test]
    fn a_key_header_may_not_take_a_name_requests_need() {
        let load = |name: &str| {
            let text = format!(
                "{BASE}api_key_header = \"{name}\"\n{UPSTREAM}\n[[client]]\nname = \"a\"\nkey_sha256 = \"{}\"\n",
                "ab".repeat(32)
            );
            Config::from_toml(&text, "t.toml")
        };
        for name in ["Authorization", "content-type", "Accept-Encoding", "host", "x-quotagate-priority", "te"]
        {
            let Err(ConfigError::Invalid { problems, .. }) = load(name) else {
                panic!("{name} was accepted as the key header");
            };
            let all = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
            let lower = name.to_ascii_lowercase();
            assert!(all.contains(&format!("api_key_header: `{lower}` is a header requests need")), "{all}");
        }
        for name in ["x-api-key", "X-Tool-Key", "x-quotagate-key", "api-key", "acceptance-key"] {
            let config = load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.clients.header.as_str(), name.to_ascii_lowercase());
        }
    }

    #[test]
    fn every_client_problem_is_reported_at_once() {
        let text = format!(
            r#"{BASE}
client_identity = "key"
api_key_header = "bad header"
{UPSTREAM}
[[client]]
name = "a"
key_sha256 = "abc"
weight = 0
priority = "urgent"
cap_percent = 10
reserved_percent = 60

[[client]]
name = "a"
app_id = "x"
guard_burst = 3

[[client]]
name = "anonymous"
key_sha256 = "{hash}"
app_id = "x"
reserved_percent = 50
guard_per_second = 0
"#,
            hash = "ab".repeat(32)
        );
        let Err(ConfigError::Invalid { problems, .. }) = Config::from_toml(&text, "t.toml") else {
            panic!("expected validation errors");
        };
        let all = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        for needle in [
            "api_key_header: `bad header` is not a header name",
            "client[0] (a).key_sha256: must be 64 hex digits",
            "client[0] (a).weight: must be between 1 and 1000",
            "client[0] (a).priority: `urgent`",
            "client[0] (a).reserved_percent: must not be more than cap_percent",
            "client[1] (a): another client has the same name",
            "client[1] (a).key_sha256: is required when client_identity is key",
            "client[1] (a).guard_burst: needs guard_per_second",
            "client[2] (anonymous): another client has the same name",
            "client[2] (anonymous).guard_per_second: must be at least 1",
            "client[2] (anonymous).app_id: another client has the same app_id",
            "client: reserved_percent adds up to 110, more than 100",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn keys_make_key_identity_the_default_and_shares_come_through() {
        let text = format!(
            "{BASE}{UPSTREAM}\n[[client]]\nname = \"soc\"\nkey_sha256 = \"{}\"\nweight = 3\npriority = \"interactive\"\ncap_percent = 80\nreserved_percent = 20\nguard_per_second = 5\n",
            "AB".repeat(32)
        );
        let config = Config::from_toml(&text, "t.toml").unwrap();
        assert_eq!(config.clients.mode, IdentityMode::Key);
        let soc = &config.clients.configured()[0];
        assert_eq!((soc.share.weight, soc.share.class), (3, Class::Interactive));
        assert_eq!((soc.share.cap_percent, soc.share.reserved_percent), (Some(80), 20));
        assert_eq!(
            soc.guard.map(|g| (g.per_second.get(), g.burst.get())),
            Some((5, 5)),
            "burst defaults to the rate"
        );
        assert!(config.describe().contains("soc"), "{}", config.describe());
    }

    #[test]
    fn clients_without_keys_or_app_identity_are_reported_as_unused() {
        let text = format!("{BASE}{UPSTREAM}\n[[client]]\nname = \"soc\"\nweight = 2\n");
        let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("[[client]] entries are never used when client_identity is anonymous"), "{err}");
    }
}
