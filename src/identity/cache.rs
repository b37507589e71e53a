//! Decoded identities, per worker, so a client that reuses its token (for
//! the hour it is valid) costs one map lookup instead of a base64 and JSON
//! decode per request.
//!
//! Keyed by the token's payload, which alone decides the identity; the
//! signature is never read. Bounded: when `capacity` payloads are held the
//! map is emptied and refills with the tokens in use. Memory only, never
//! logged. Hashed with foldhash (randomly seeded per process): a payload
//! is a kilobyte or so, and SipHash over it was a few percent of a
//! proxied request's instructions.

use std::collections::HashMap;
use std::sync::Mutex;

use http::HeaderMap;

use super::jwt::{bearer_token, identity_from_token};
use super::{Identity, TokenError};

/// A worker's decoded identities.
pub struct IdentityCache {
    map: Mutex<HashMap<Box<str>, Identity, foldhash::fast::RandomState>>,
    capacity: usize,
}

impl IdentityCache {
    pub fn new(capacity: usize) -> Self {
        IdentityCache { map: Mutex::new(HashMap::default()), capacity }
    }

    /// The identity of a request's bearer token, as [`super::identity_from_headers`] reads it.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Identity, TokenError> {
        let token = bearer_token(headers)?;
        // Only a token of three parts is a JWT: one that merely shares a
        // cached token's payload (`h.p`, `h.p.s.x`) is refused as it would be uncached.
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return identity_from_token(token);
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(who) = map.get(payload) {
            return Ok(who.clone());
        }
        // Only well-formed tokens are kept; errors are decoded afresh.
        let who = identity_from_token(token)?;
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(payload.into(), who.clone());
        Ok(who)
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use http::header::AUTHORIZATION;

    use super::*;

    fn headers(payload: &str) -> HeaderMap {
        let token = format!("h.{}.s", URL_SAFE_NO_PAD.encode(payload));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn cached_identities_equal_decoded_ones_and_stay_bounded() {
        let cache = IdentityCache::new(2);
        for round in 0..2 {
            for i in 0..3 {
                let h = headers(&format!(r#"{{"tid":"t{i}","appid":"a{i}"}}"#));
                assert_eq!(cache.identify(&h), super::super::identity_from_headers(&h), "round {round}");
                assert!(cache.map.lock().unwrap().len() <= 2);
            }
        }
        // A bad token is an error every time, and never cached.
        let bad = headers(r#"{"appid":"a"}"#);
        assert_eq!(cache.identify(&bad), Err(TokenError::MissingClaim("tid")));
        assert_eq!(cache.identify(&bad), Err(TokenError::MissingClaim("tid")));
        assert_eq!(cache.identify(&HeaderMap::new()), Err(TokenError::Missing));
    }

    /// Regression (found by the `jwt` fuzz target): a token that only shared
    /// a cached token's payload (`h.p`, `h.p.s.extra`) was taken as that
    /// token, where the decoder refuses it as not a JWT.
    #[test]
    fn a_cached_payload_does_not_make_a_malformed_token_valid() {
        let cache = IdentityCache::new(4);
        let payload = URL_SAFE_NO_PAD.encode(r#"{"tid":"t","appid":"a"}"#);
        let bearer = |token: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
            h
        };
        assert!(cache.identify(&bearer(&format!("h.{payload}.s"))).is_ok());
        assert_eq!(cache.identify(&bearer(&format!("h.{payload}.s.extra"))), Err(TokenError::NotJwt));
        assert_eq!(cache.identify(&bearer(&format!("h.{payload}"))), Err(TokenError::NotJwt));
    }
}
