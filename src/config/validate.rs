//! From the file's text values to runtime types, with every problem at once.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::{Method, Uri};

use super::file::{File, PolicyFile};
use super::{Config, ListenerSpec};
use crate::policy::{Mode, PathPattern, Policies, Policy, Timeouts};
use crate::quota::{KeyScope, Window};
use crate::upstream::route::{ApiKind, Upstream};

/// Collects problems, each prefixed with the field it is about.
#[derive(Default)]
pub(super) struct Problems(Vec<String>);

impl Problems {
    pub(super) fn push(&mut self, field: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }

    fn duration(&mut self, field: &str, value: &str) -> Duration {
        match humantime::parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.push(field, "must be longer than zero");
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.push(
                    field,
                    format!("`{value}` is not a duration such as \"250ms\", \"1m\" or \"1h\" ({e})"),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn addr(&mut self, field: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.push(field, format!("`{value}` is not an address such as \"127.0.0.1:7480\""));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }
}

/// Validate a parsed file into a [`Config`], or list every problem.
pub fn validate(file: &File) -> Result<Config, Vec<String>> {
    let mut p = Problems::default();
    let listen = p.addr("listen", &file.listen);
    let admin_listen = p.addr("admin_listen", &file.admin_listen);
    let guard = humantime::parse_duration(&file.guard).unwrap_or_else(|e| {
        p.push("guard", format!("`{}` is not a duration ({e})", file.guard));
        Duration::ZERO
    });
    let idle_sweep = p.duration("idle_sweep", &file.idle_sweep);
    let backoff_base = p.duration("backoff_base", &file.backoff_base);
    let backoff_cap = p.duration("backoff_cap", &file.backoff_cap);
    if backoff_cap < backoff_base {
        p.push("backoff_cap", "must not be shorter than backoff_base");
    }
    if file.max_body_bytes == 0 {
        p.push("max_body_bytes", "must be more than zero");
    }

    let upstreams = upstreams(file, &mut p);
    let upstream_index = |name: &str| upstreams.iter().position(|u| u.name == name);

    let mut listeners = vec![ListenerSpec { addr: listen, upstream: None }];
    for (i, l) in file.listeners.iter().enumerate() {
        let field = format!("listener[{i}]");
        let addr = p.addr(&format!("{field}.listen"), &l.listen);
        let upstream = upstream_index(&l.upstream);
        if upstream.is_none() {
            p.push(&format!("{field}.upstream"), format!("no upstream is named `{}`", l.upstream));
        }
        listeners.push(ListenerSpec { addr, upstream });
    }
    let mut seen = vec![admin_listen];
    for l in &listeners {
        if l.addr.port() != 0 && seen.contains(&l.addr) {
            p.push("listen", format!("{} is used by two listeners", l.addr));
        }
        seen.push(l.addr);
    }

    let d = &file.policy_defaults;
    let defaults = PolicyFile {
        name: "policy_defaults".into(),
        methods: vec![],
        upstreams: vec![],
        paths: vec![],
        windows: vec![],
        key: Some(d.key.clone().unwrap_or_else(|| "tenant+app+policy".into())),
        max_attempts: Some(d.max_attempts.unwrap_or(3)),
        hunting: false,
        mode: Some(d.mode.clone().unwrap_or_else(|| "queue".into())),
        max_wait: Some(d.max_wait.clone().unwrap_or_else(|| "60s".into())),
        max_queue: Some(d.max_queue.unwrap_or(500)),
        connect_timeout: Some(d.connect_timeout.clone().unwrap_or_else(|| "10s".into())),
        header_timeout: Some(d.header_timeout.clone().unwrap_or_else(|| "60s".into())),
        total_timeout: Some(d.total_timeout.clone().unwrap_or_else(|| "300s".into())),
    };
    let unmetered_timeouts = timeouts("policy_defaults", &defaults, &defaults, &mut p);

    let mut policies = Vec::new();
    for (i, pf) in file.policies.iter().enumerate() {
        let field = format!("policy[{i}] ({})", pf.name);
        if file.policies[..i].iter().any(|o| o.name == pf.name) {
            p.push(&field, "another policy has the same name");
        }
        if pf.name.is_empty() {
            p.push(&field, "name must not be empty");
        }
        let methods = pf
            .methods
            .iter()
            .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    p.push(&format!("{field}.methods"), format!("`{m}` is not an HTTP method"));
                    None
                }
            })
            .collect();
        let mut ups = Vec::new();
        for name in &pf.upstreams {
            match upstream_index(name) {
                Some(u) => ups.push(u),
                None => p.push(&format!("{field}.upstreams"), format!("no upstream is named `{name}`")),
            }
        }
        if pf.paths.is_empty() {
            p.push(&format!("{field}.paths"), "must list at least one path pattern");
        }
        let paths = pf
            .paths
            .iter()
            .filter_map(|s| PathPattern::parse(s).map_err(|e| p.push(&format!("{field}.paths"), e)).ok())
            .collect();
        if pf.windows.is_empty() {
            p.push(&format!("{field}.windows"), "must list at least one window");
        }
        let mut windows = Vec::new();
        for (j, w) in pf.windows.iter().enumerate() {
            let wf = format!("{field}.windows[{j}]");
            let per = p.duration(&format!("{wf}.per"), &w.per);
            match u32::try_from(w.limit).ok().and_then(NonZeroU32::new) {
                Some(limit) => windows.push(Window::new(limit, per)),
                None => p.push(&format!("{wf}.limit"), format!("must be between 1 and {}", u32::MAX)),
            }
        }
        let key = pf.key.as_ref().or(defaults.key.as_ref()).expect("default key");
        let key = key.parse::<KeyScope>().unwrap_or_else(|_| {
            p.push(
                &format!("{field}.key"),
                format!("`{key}` is not one of tenant, tenant+app, tenant+app+policy"),
            );
            KeyScope::TenantAppPolicy
        });
        let mode = match pf.mode.as_ref().or(defaults.mode.as_ref()).map(String::as_str) {
            Some("queue") => Mode::Queue,
            Some("reject") => Mode::Reject,
            other => {
                p.push(&format!("{field}.mode"), format!("`{}` is not queue or reject", other.unwrap_or("")));
                Mode::Reject
            }
        };
        let max_wait = p.duration(
            &format!("{field}.max_wait"),
            pf.max_wait.as_ref().or(defaults.max_wait.as_ref()).expect("default"),
        );
        let max_queue = pf.max_queue.or(defaults.max_queue).expect("default");
        let max_attempts = pf.max_attempts.or(defaults.max_attempts).expect("default");
        if max_attempts == 0 {
            p.push(&format!("{field}.max_attempts"), "must be at least 1 (the first attempt)");
        }
        let timeouts = timeouts(&field, pf, &defaults, &mut p);
        policies.push(Policy {
            id: u16::try_from(i).unwrap_or(u16::MAX),
            name: pf.name.clone(),
            methods,
            upstreams: ups,
            paths,
            windows,
            key,
            mode,
            max_wait,
            max_queue,
            max_attempts: max_attempts.max(1),
            hunting: pf.hunting,
            timeouts,
        });
    }
    if file.policies.len() >= usize::from(u16::MAX) {
        p.push("policy", "too many policies");
    }

    let clients = super::clients::roster(file, &mut p);
    let tls = file.tls.as_ref().and_then(|t| super::tls::server_config(t, &mut p));
    if let Some(problem) = super::exposure_problem(&listeners, clients.mode, file.allow_anonymous_on_network)
    {
        p.0.push(problem);
    }

    if p.0.is_empty() {
        Ok(Config {
            listeners,
            admin_listen,
            upstreams,
            policies: Policies(policies),
            unmetered_timeouts,
            max_body_bytes: file.max_body_bytes,
            guard,
            idle_sweep,
            retry_body_bytes: file.retry_body_bytes,
            backoff_base,
            backoff_cap,
            metrics_max_tenants: file.metrics_max_tenants,
            access_log: file.access_log,
            clients,
            allow_anonymous_on_network: file.allow_anonymous_on_network,
            tls,
        })
    } else {
        Err(p.0)
    }
}

fn upstreams(file: &File, p: &mut Problems) -> Vec<Upstream> {
    if file.upstreams.is_empty() {
        p.push("upstream", "at least one upstream is required");
    }
    let mut out = Vec::new();
    for (i, u) in file.upstreams.iter().enumerate() {
        let field = format!("upstream[{i}] ({})", u.name);
        if file.upstreams[..i].iter().any(|o| o.name == u.name) {
            p.push(&field, "another upstream has the same name");
        }
        let kind = match u.kind.as_str() {
            "defender" => ApiKind::Defender,
            "graph" => ApiKind::Graph,
            other => {
                p.push(&format!("{field}.kind"), format!("`{other}` is not defender or graph"));
                ApiKind::Defender
            }
        };
        for prefix in &u.route_prefixes {
            if !prefix.starts_with('/') {
                p.push(&format!("{field}.route_prefixes"), format!("`{prefix}` must start with `/`"));
            }
        }
        let uri: Result<Uri, _> = u.url.parse();
        let parts = uri.ok().and_then(|uri| {
            let ok_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
            match (uri.scheme(), uri.authority()) {
                (Some(s), Some(a))
                    if ok_path && (s == &http::uri::Scheme::HTTP || s == &http::uri::Scheme::HTTPS) =>
                {
                    Some((s.clone(), a.clone()))
                }
                _ => None,
            }
        });
        match parts {
            Some((scheme, authority)) => out.push(Upstream {
                name: u.name.clone(),
                scheme,
                authority,
                kind,
                route_prefixes: u.route_prefixes.iter().map(|p| p.to_ascii_lowercase()).collect(),
            }),
            None => p.push(
                &format!("{field}.url"),
                format!("`{}` must be an http:// or https:// URL with a host and no path", u.url),
            ),
        }
    }
    out
}

fn timeouts(field: &str, pf: &PolicyFile, d: &PolicyFile, p: &mut Problems) -> Timeouts {
    let get = |own: &Option<String>, def: &Option<String>| own.clone().or(def.clone()).expect("default");
    let t = Timeouts {
        connect: p
            .duration(&format!("{field}.connect_timeout"), &get(&pf.connect_timeout, &d.connect_timeout)),
        header: p.duration(&format!("{field}.header_timeout"), &get(&pf.header_timeout, &d.header_timeout)),
        total: p.duration(&format!("{field}.total_timeout"), &get(&pf.total_timeout, &d.total_timeout)),
    };
    if t.header > t.total {
        p.push(&format!("{field}.header_timeout"), "must not be longer than total_timeout");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
listen = "nowhere"
admin_listen = "127.0.0.1:1"
guard = "soon"
[[upstream]]
name = "d"
url = "ftp://x"
kind = "other"
[[listener]]
listen = "127.0.0.1:2"
upstream = "missing"
[[policy]]
name = "p"
methods = ["G ET"]
paths = ["no-slash"]
windows = [{ limit = 0, per = "1m" }, { limit = 5, per = "0s" }]
mode = "sometimes"
key = "everyone"
"#;
        let Err(ConfigError::Invalid { problems, .. }) = Config::from_toml(text, "t.toml") else {
            panic!("expected validation errors");
        };
        let all = problems.join("\n");
        for needle in [
            "listen: `nowhere`",
            "guard: `soon`",
            "upstream[0] (d).url",
            "upstream[0] (d).kind",
            "listener[0].upstream: no upstream is named `missing`",
            "policy[0] (p).methods",
            "policy[0] (p).paths",
            "policy[0] (p).windows[0].limit",
            "policy[0] (p).windows[1].per: must be longer than zero",
            "policy[0] (p).mode",
            "policy[0] (p).key",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let text = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\nlisten_port = 3\n";
        let err = Config::from_toml(text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("listen_port") && err.contains("line 3"), "{err}");
    }
}
