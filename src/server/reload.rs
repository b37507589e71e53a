//! Apply a new configuration to a running gateway, keeping its quota state.
//!
//! The new configuration is validated before it gets here. What a reload
//! cannot change without a restart (listener addresses, TLS, the forward
//! proxy, the quota store, the upstream table that bound listeners point
//! into, the listeners' `send_timeout`) makes it
//! refuse the whole file, with every such change listed; the old
//! configuration keeps running. Otherwise every policy keeps the key id its
//! name had ([`Gateway::replace_config`]), so its keys' admissions, queues
//! and holds carry on under the new limits, and each worker switches its
//! pools and metric handles. Requests already queued or in flight keep the
//! configuration they started with.

use std::sync::Arc;

use crate::app::{Gateway, Loaded, Worker};
use crate::config::Config;

/// What a reload needs: the gateway and every worker.
#[derive(Clone)]
pub struct Reloader {
    gateway: Arc<Gateway>,
    workers: Vec<Arc<Worker>>,
}

impl Reloader {
    pub(super) fn new(gateway: Arc<Gateway>, workers: Vec<Arc<Worker>>) -> Self {
        Reloader { gateway, workers }
    }

    /// Apply `config`, or say why not. The same text again changes nothing
    /// but the certificate, read again from `[tls]`'s files (rotated in place).
    pub fn apply(&self, mut config: Config) -> Result<Loaded, Vec<String>> {
        let mut loaded = self.gateway.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.hash == config.source_hash {
            if let (Some(tls), true) = (config.tls.take(), self.gateway.config().tls.is_some()) {
                self.gateway.replace_tls(tls);
            }
            return Ok(loaded.clone());
        }
        let hash = config.source_hash.clone();
        let old = self.gateway.config();
        let problems = restart_only(&old, &config);
        if !problems.is_empty() {
            self.gateway.metrics.reload("refused");
            return Err(problems);
        }
        // A key header renamed by this reload is still removed from requests.
        config.clients.inherit_headers(&old.clients);
        self.gateway.replace_config(config);
        for worker in &self.workers {
            worker.refresh();
        }
        *loaded = Loaded { generation: loaded.generation + 1, hash };
        self.gateway.metrics.reload("applied");
        self.gateway.metrics.config_loaded(loaded.generation);
        Ok(loaded.clone())
    }

    /// Count a file that did not load (every problem already listed by the caller).
    pub fn refused(&self) {
        self.gateway.metrics.reload("refused");
    }
}

/// Changes a reload cannot apply, one line each.
fn restart_only(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |what: &str, same: bool| {
        if !same {
            out.push(format!("{what} changed: restart the gateway to apply it"));
        }
    };
    differs("listen / [[listener]]", old.listeners == new.listeners);
    differs("admin_listen", old.admin_listen == new.admin_listen);
    differs("send_timeout", old.send_timeout == new.send_timeout);
    differs(
        "[tls] (adding or removing it; its files are read again)",
        old.tls.is_some() == new.tls.is_some(),
    );
    // The limiters and the sweep are built with these.
    differs("guard", old.guard == new.guard);
    differs("idle_sweep", old.idle_sweep == new.idle_sweep);
    differs("[forward_proxy]", old.forward_proxy == new.forward_proxy);
    differs("[store]", old.store == new.store);
    let names = |c: &Config| c.upstreams.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
    differs("the names or order of [[upstream]]", names(old) == names(new));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_TOML;

    /// The built-in configuration with `edits` (`from`, `to`) made to its text.
    fn config(edits: &[(&str, &str)]) -> Config {
        let text = edits.iter().fold(DEFAULT_TOML.to_string(), |text, (from, to)| {
            assert!(text.contains(from), "{from}");
            text.replace(from, to)
        });
        Config::from_toml(&text, "test").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn what_needs_new_sockets_is_refused_and_named_the_rest_applies() {
        let old = config(&[]);
        assert_eq!(
            restart_only(&old, &config(&[("drain = \"30s\"", "drain = \"5s\"")])),
            Vec::<String>::new()
        );
        let new = config(&[
            ("admin_listen = \"127.0.0.1:7481\"", "admin_listen = \"127.0.0.1:7491\""),
            ("send_timeout = \"60s\"", "send_timeout = \"5s\""),
            ("guard = \"250ms\"", "guard = \"1s\""),
            ("idle_sweep = \"30s\"", "idle_sweep = \"5s\""),
        ]);
        assert_eq!(
            restart_only(&old, &new),
            [
                "admin_listen changed: restart the gateway to apply it",
                "send_timeout changed: restart the gateway to apply it",
                "guard changed: restart the gateway to apply it",
                "idle_sweep changed: restart the gateway to apply it"
            ]
        );
    }
}
