//! The client credential a forward-proxy client sends in `Proxy-Authorization`.
//!
//! Scripts that honour `HTTPS_PROXY=http://name:key@host:port` send
//! `Proxy-Authorization: Basic base64(name:key)` with their `CONNECT` (or with
//! each absolute-form request); others can send `Bearer key`. The credential
//! is read here, carried with every request of the connection as a request
//! extension, and never forwarded upstream (it is a hop-by-hop header, which
//! [`crate::upstream::forward`] strips). It is not verified here: it is the
//! proxy-mode spelling of the client API key of base-URL mode, and
//! [`crate::identity::client`] verifies both against the configured keys.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;

/// A client credential, as the client sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredential {
    /// The user name of `Basic`; `None` for `Bearer`.
    pub name: Option<String>,
    /// The secret: the password of `Basic`, the token of `Bearer`.
    pub key: String,
}

// Never print the key, not even at trace level.
impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredential").field("name", &self.name).field("key", &"<redacted>").finish()
    }
}

impl ClientCredential {
    /// The credential in a request's `Proxy-Authorization`, if it holds a usable one.
    pub fn from_headers(headers: &HeaderMap) -> Option<ClientCredential> {
        let value = headers.get(PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, rest) = value.split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = String::from_utf8(STANDARD.decode(rest).ok()?).ok()?;
            let (name, key) = decoded.split_once(':')?;
            (!key.is_empty()).then(|| ClientCredential {
                name: (!name.is_empty()).then(|| name.to_string()),
                key: key.to_string(),
            })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            (!rest.is_empty()).then(|| ClientCredential { name: None, key: rest.to_string() })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(value: &str) -> Option<ClientCredential> {
        let mut h = HeaderMap::new();
        h.insert(PROXY_AUTHORIZATION, value.parse().unwrap());
        ClientCredential::from_headers(&h)
    }

    #[test]
    fn basic_and_bearer_credentials_are_read() {
        // base64("soc-team:s3cr3t:with:colons")
        let basic = from(&format!("Basic {}", STANDARD.encode("soc-team:s3cr3t:with:colons"))).unwrap();
        assert_eq!(basic.name.as_deref(), Some("soc-team"));
        assert_eq!(basic.key, "s3cr3t:with:colons", "only the first colon separates the name");
        let lower = from(&format!("basic {}", STANDARD.encode(":keyonly"))).unwrap();
        assert_eq!((lower.name, lower.key.as_str()), (None, "keyonly"));
        let bearer = from("Bearer qg_0123456789").unwrap();
        assert_eq!((bearer.name, bearer.key.as_str()), (None, "qg_0123456789"));
    }

    #[test]
    fn unusable_credentials_are_none_and_the_key_is_never_printed() {
        assert_eq!(from("Basic !!!notbase64"), None);
        assert_eq!(from(&format!("Basic {}", STANDARD.encode("no-colon"))), None);
        assert_eq!(from(&format!("Basic {}", STANDARD.encode("name:"))), None);
        assert_eq!(from("Bearer "), None);
        assert_eq!(from("Negotiate abc"), None);
        assert_eq!(ClientCredential::from_headers(&HeaderMap::new()), None);
        let shown = format!("{:?}", from("Bearer topsecret").unwrap());
        assert!(!shown.contains("topsecret"), "{shown}");
    }
}
