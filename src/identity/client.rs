//! Which configured client sends a request: by API key, by the token's app
//! id, or nobody in particular (anonymous).
//!
//! Keys are configured only as SHA-256 hashes. A presented key is hashed and
//! compared with every configured hash in constant time (`subtle`), all of
//! them, so neither the timing nor the order of the clients tells an
//! attacker how close a guess came. Errors never echo the key.
//!
//! The client set is bounded: configured clients, `anonymous`, and `other`
//! for an app id no client names, so client names are safe metric labels.

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::{Class, Share};
use crate::upstream::forward;

/// The header with which a request picks its priority class, when allowed.
pub const PRIORITY_HEADER: HeaderName = HeaderName::from_static("x-quotagate-priority");

/// Header names a key header may not take, besides the hop-by-hop ones and
/// the gateway's own: the request needs them upstream, or HTTP does.
/// Stripping one from every request (and, after a reload, until a restart)
/// would break every call.
const NOT_KEY_HEADERS: &[&str] = &[
    "accept",
    "authorization",
    "host",
    "cookie",
    "expect",
    "range",
    "cache-control",
    "pragma",
    "forwarded",
    "via",
    "user-agent",
    "prefer",
    "consistencylevel",
    "client-request-id",
    "return-client-request-id",
    "odata-version",
    "odata-maxversion",
    "traceparent",
    "tracestate",
];
/// Prefixes of such names.
const NOT_KEY_PREFIXES: &[&str] = &["content-", "accept-", "if-", "x-forwarded-", "x-ms-"];

/// Whether a request may need `name` for something else than a key.
pub fn needed_elsewhere(name: &HeaderName) -> bool {
    let text = name.as_str();
    forward::is_hop_by_hop(name)
        || *name == PRIORITY_HEADER
        || *name == forward::GATEWAY_ONLY
        || NOT_KEY_HEADERS.contains(&text)
        || NOT_KEY_PREFIXES.iter().any(|prefix| text.starts_with(prefix))
}

/// How callers are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// By an API key in a header; a request without a known key gets a 401.
    Key,
    /// By the app id of the bearer token (not a credential: the token is not verified here).
    App,
    /// Everyone is `anonymous`.
    Anonymous,
}

/// A runaway-loop guard: sustained rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSpec {
    pub per_second: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
}

/// One client, as validated from config.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub key_sha256: Option<[u8; 32]>,
    pub app_id: Option<String>,
    /// Its lane in every key (`share.client` is its index here).
    pub share: Share,
    pub guard: Option<GuardSpec>,
}

/// Why a request names no client. The message goes back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the request has no `{0}` header; this gateway serves only its configured clients: send `{0}: <your API key>`")]
    MissingKey(HeaderName),
    #[error("the `{0}` header holds no API key this gateway knows; ask the gateway's operator for a key")]
    UnknownKey(HeaderName),
}

/// Every client of the gateway and how to recognise them.
#[derive(Debug, Clone)]
pub struct Roster {
    pub mode: IdentityMode,
    pub header: HeaderName,
    pub allow_priority_header: bool,
    /// Key header names this process read before a reload renamed them,
    /// newest first: still removed from every request, never read.
    former_headers: Vec<HeaderName>,
    /// Configured clients, then `anonymous`, then `other`.
    clients: Vec<Client>,
}

/// Most former key header names remembered (a reload per rename).
const MAX_FORMER_HEADERS: usize = 32;

impl Roster {
    /// `configured` clients get indices 0..n in order; `anonymous` and
    /// `other` are appended.
    pub fn new(
        mode: IdentityMode,
        header: HeaderName,
        allow_priority_header: bool,
        configured: Vec<Client>,
    ) -> Self {
        let mut clients = configured;
        for name in ["anonymous", "other"] {
            let client = u16::try_from(clients.len()).unwrap_or(u16::MAX);
            clients.push(Client {
                name: name.into(),
                key_sha256: None,
                app_id: None,
                share: Share { client, ..Share::default() },
                guard: None,
            });
        }
        Roster { mode, header, allow_priority_header, former_headers: Vec::new(), clients }
    }

    /// Carry over from the roster a reload replaces the key header names it
    /// read keys from, so that a client still sending its key under an old
    /// name does not have it forwarded. Names under `x-quotagate-` need not
    /// be kept (every such header is removed anyway).
    pub fn inherit_headers(&mut self, old: &Roster) {
        let read = (old.mode == IdentityMode::Key).then_some(&old.header);
        for name in read.into_iter().chain(&old.former_headers) {
            if *name != self.header
                && !name.as_str().starts_with(forward::GATEWAY_PREFIX)
                && !self.former_headers.contains(name)
                && self.former_headers.len() < MAX_FORMER_HEADERS
            {
                self.former_headers.push(name.clone());
            }
        }
    }

    /// Remove the key from a request about to be forwarded: the key header,
    /// any name a reload renamed it from, and, in key mode, every other
    /// header whose value is the presented key (a name the next reload will
    /// give it, say), unless the request may need that header for
    /// something else (a weak key could equal a `content-length`).
    pub fn strip_key_headers(&self, headers: &mut HeaderMap) {
        let key = headers.remove(&self.header);
        if let (IdentityMode::Key, Some(key)) = (self.mode, key) {
            let copies: Vec<HeaderName> = headers
                .iter()
                .filter(|(name, v)| **v == key && !needed_elsewhere(name))
                .map(|(name, _)| name.clone())
                .collect();
            for name in copies {
                headers.remove(name);
            }
        }
        for name in &self.former_headers {
            headers.remove(name);
        }
    }

    /// Every client, configured first, then `anonymous` and `other`.
    pub fn all(&self) -> &[Client] {
        &self.clients
    }

    /// Configured clients only.
    pub fn configured(&self) -> &[Client] {
        &self.clients[..self.clients.len() - 2]
    }

    fn anonymous(&self) -> &Client {
        &self.clients[self.clients.len() - 2]
    }

    fn other(&self) -> &Client {
        &self.clients[self.clients.len() - 1]
    }

    /// The client that sends a request with these headers; `app` is the
    /// token's app id when it has one.
    pub fn identify(&self, headers: &HeaderMap, app: Option<&str>) -> Result<&Client, ClientError> {
        match self.mode {
            IdentityMode::Anonymous => Ok(self.anonymous()),
            IdentityMode::App => Ok(app
                .and_then(|app| self.configured().iter().find(|c| c.app_id.as_deref() == Some(app)))
                .unwrap_or(self.other())),
            IdentityMode::Key => {
                let key = headers.get(&self.header).ok_or(ClientError::MissingKey(self.header.clone()))?;
                let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                let mut found = None;
                for c in self.configured() {
                    if let Some(hash) = &c.key_sha256 {
                        let equal: bool = hash.ct_eq(&digest).into();
                        if equal && found.is_none() {
                            found = Some(c);
                        }
                    }
                }
                found.ok_or(ClientError::UnknownKey(self.header.clone()))
            }
        }
    }

    /// The request's share: the client's, with the class from
    /// [`PRIORITY_HEADER`] when config allows it and the value is valid.
    pub fn share(&self, client: &Client, headers: &HeaderMap) -> Share {
        let asked = self
            .allow_priority_header
            .then(|| headers.get(PRIORITY_HEADER)?.to_str().ok().and_then(Class::parse))
            .flatten();
        Share { class: asked.unwrap_or(client.share.class), ..client.share }
    }
}

/// Parse a hex SHA-256 (64 hex digits, either case).
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: HeaderName = HeaderName::from_static("x-quotagate-key");

    fn client(name: &str, key: &str, index: u16) -> Client {
        let hash = format!("{:x}", Sha256::digest(key.as_bytes()));
        Client {
            name: name.into(),
            key_sha256: parse_sha256(&hash),
            app_id: Some(format!("app-{name}")),
            share: Share { client: index, ..Share::default() },
            guard: None,
        }
    }

    fn roster(mode: IdentityMode) -> Roster {
        Roster::new(mode, HEADER, false, vec![client("soc", "k1", 0), client("etl", "k2", 1)])
    }

    fn with_key(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, key.parse().unwrap());
        h
    }

    #[test]
    fn keys_name_their_client_and_others_are_refused() {
        let r = roster(IdentityMode::Key);
        assert_eq!(r.identify(&with_key("k2"), None).unwrap().name, "etl");
        assert_eq!(r.identify(&with_key("k1"), None).unwrap().name, "soc");
        assert_eq!(r.identify(&with_key("k3"), None).unwrap_err(), ClientError::UnknownKey(HEADER));
        assert_eq!(r.identify(&HeaderMap::new(), None).unwrap_err(), ClientError::MissingKey(HEADER));
        assert!(!r.identify(&with_key("secret"), None).unwrap_err().to_string().contains("secret"));
    }

    #[test]
    fn app_ids_and_anonymous_stay_a_bounded_set() {
        let r = roster(IdentityMode::App);
        assert_eq!(r.identify(&HeaderMap::new(), Some("app-etl")).unwrap().name, "etl");
        assert_eq!(r.identify(&HeaderMap::new(), Some("app-x")).unwrap().name, "other");
        assert_eq!(
            roster(IdentityMode::Anonymous).identify(&with_key("k1"), None).unwrap().name,
            "anonymous"
        );
        assert_eq!(r.all().len(), 4);
    }

    #[test]
    fn the_priority_header_counts_only_when_allowed() {
        let mut h = HeaderMap::new();
        h.insert(PRIORITY_HEADER, "interactive".parse().unwrap());
        let r = roster(IdentityMode::Anonymous);
        let c = r.identify(&h, None).unwrap().clone();
        assert_eq!(r.share(&c, &h).class, Class::Normal);
        let r = Roster { allow_priority_header: true, ..r };
        assert_eq!(r.share(&c, &h).class, Class::Interactive);
    }

    #[test]
    fn key_header_names_a_reload_renamed_are_still_stripped() {
        let named = |name: &'static str| {
            Roster::new(IdentityMode::Key, HeaderName::from_static(name), false, vec![client("soc", "k1", 0)])
        };
        let sent = |names: &[&'static str]| {
            let mut h = HeaderMap::new();
            for n in names {
                h.insert(HeaderName::from_static(n), format!("key-in-{n}").parse().unwrap());
            }
            h.insert("x-kept", "1".parse().unwrap());
            h
        };
        let left = |h: &HeaderMap| {
            let mut names: Vec<String> = h.keys().map(|k| k.to_string()).collect();
            names.sort();
            names
        };
        let all = ["x-tool-key", "x-team-key", "x-quotagate-key", "x-api-key"];

        // x-tool-key, then x-team-key, then x-quotagate-key, then back to x-tool-key.
        let mut r = named("x-team-key");
        r.inherit_headers(&named("x-tool-key"));
        let mut h = sent(&all);
        r.strip_key_headers(&mut h);
        assert_eq!(left(&h), ["x-api-key", "x-kept", "x-quotagate-key"]);
        let old = r;
        let mut r = named("x-quotagate-key");
        r.inherit_headers(&old);
        let old = r;
        let mut r = named("x-tool-key");
        r.inherit_headers(&old);
        // x-quotagate-key is left to the prefix rule; x-tool-key is the current name.
        assert_eq!(r.former_headers, [HeaderName::from_static("x-team-key")]);
        assert_eq!(
            r.identify(&sent(&["x-team-key"]), None).unwrap_err(),
            ClientError::MissingKey(r.header.clone())
        );
        let mut h = sent(&all);
        r.strip_key_headers(&mut h);
        assert_eq!(left(&h), ["x-api-key", "x-kept", "x-quotagate-key"]);

        // The memory is bounded; the newest names are the ones kept.
        let mut r = named("x-tool-key");
        for i in 0..100 {
            let mut next = Roster::new(
                IdentityMode::Key,
                HeaderName::from_bytes(format!("x-key-{i}").as_bytes()).unwrap(),
                false,
                vec![client("soc", "k1", 0)],
            );
            next.inherit_headers(&r);
            r = next;
        }
        assert_eq!(r.former_headers.len(), MAX_FORMER_HEADERS);
        assert_eq!(r.former_headers[0], "x-key-98");
        assert_eq!(r.former_headers[MAX_FORMER_HEADERS - 1], "x-key-67");

        // A name only an app or anonymous config had was never read: not carried.
        let mut r = named("x-team-key");
        r.inherit_headers(&Roster { mode: IdentityMode::App, ..named("x-tool-key") });
        assert!(r.former_headers.is_empty());
    }

    #[test]
    fn the_presented_key_is_stripped_under_any_name() {
        let r = Roster::new(
            IdentityMode::Key,
            HeaderName::from_static("x-team-key"),
            false,
            vec![client("soc", "k1", 0)],
        );
        let mut h = HeaderMap::new();
        h.insert("x-team-key", "k1".parse().unwrap());
        h.insert("x-next-key", "k1".parse().unwrap());
        h.append("x-other", "k10".parse().unwrap());
        // A header the request needs is kept, whatever its value.
        h.insert("consistencylevel", "k1".parse().unwrap());
        r.strip_key_headers(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-other"], "k10");
        assert_eq!(h["consistencylevel"], "k1");
        // Outside key mode the header is not a key: only its name is removed.
        let r = Roster { mode: IdentityMode::Anonymous, ..r };
        let mut h = HeaderMap::new();
        h.insert("x-team-key", "k1".parse().unwrap());
        h.insert("x-next-key", "k1".parse().unwrap());
        r.strip_key_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn hashes_parse_from_hex() {
        assert!(parse_sha256(&"ab".repeat(32)).is_some());
        assert!(parse_sha256("abc").is_none());
        assert!(parse_sha256(&"zz".repeat(32)).is_none());
    }
}
