//! The JWT claim decoder: `identity_from_token`, `identity_from_headers` and
//! the per-worker `IdentityCache`.
//!
//! Input: a raw token, then (after a NUL) `tid`, `app`, `ver`, a signature
//! and a style byte separated by NULs, from which a well-formed token is
//! minted; then a raw payload, which is base64url-encoded into a token (so
//! that the JSON inside tokens is mutated as JSON, not as base64).
//!
//! Properties:
//! - a token the gateway accepts names exactly the tenant and app that an
//!   independent decode of its payload (base64url, then any JSON object) finds:
//!   the gateway never meters a call under another tenant than the token's
//!   (payloads holding a number beyond an f64's range or a lone surrogate
//!   escape, which that decode cannot represent, are left out of the
//!   comparison);
//! - a minted token with a non-empty `tid` and app claim is accepted with
//!   exactly those values, padded or not, whatever the scheme's case and the
//!   spaces around the token; one without them is refused naming the claim;
//! - the cache answers what the decoder answers, for every token, in any order
//!   (tokens that share a payload included).

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use quotagate::identity::jwt::{identity_from_headers, identity_from_token};
use quotagate::identity::{Identity, IdentityCache, TokenError};
use serde_json::Value;

pub fn check(data: &[u8]) {
    let (raw, rest) = super::split_once(data, 0);
    let raw = String::from_utf8_lossy(raw);
    accepted_tokens_name_their_claims(&raw);
    minted_tokens_are_read_back(rest);
    cache_agrees_with_the_decoder(&raw, rest);
    let payload = rest.splitn(6, |&b| b == 0).nth(5).unwrap_or_default();
    let wrapped = format!("h.{}.s", URL_SAFE_NO_PAD.encode(payload));
    accepted_tokens_name_their_claims(&wrapped);
    cache_agrees_with_the_decoder(&wrapped, rest);
}

/// An independent reading: three dot-separated parts, the middle one
/// base64url (padding optional), a JSON object whose `tid` and app claims
/// (`appid`, or `azp` for `ver` "2.0", each falling back to the other) are
/// non-empty strings.
fn reference(token: &str) -> Option<Identity> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, payload, _] = parts[..] else { return None };
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&without_lone_surrogates(&bytes)).ok()?;
    let claim = |k: &str| claims.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let tenant = claim("tid")?;
    let (first, second) = if claims.get("ver").and_then(Value::as_str) == Some("2.0") {
        ("azp", "appid")
    } else {
        ("appid", "azp")
    };
    let app = claim(first).or_else(|| claims.get(first).is_none().then(|| claim(second)).flatten());
    // A present but empty first claim does not fall back in the gateway:
    // keep that case out of the comparison rather than guess.
    Some(Identity { tenant, app: app? })
}

fn accepted_tokens_name_their_claims(token: &str) {
    let Ok(who) = identity_from_token(token) else { return };
    assert!(!who.tenant.is_empty() && !who.app.is_empty(), "accepted an empty claim: {who:?}");
    if let Some(expected) = reference(token) {
        assert_eq!(who, expected, "the gateway read other claims than the token's payload holds");
    }
    // The decoder's tenant must be the payload's `tid`, whatever the reference thinks of the rest.
    let payload = token.split('.').nth(1).expect("an accepted token has a payload");
    let bytes =
        URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).expect("an accepted payload is base64url");
    let claims: Value = match serde_json::from_slice(&without_lone_surrogates(&bytes)) {
        Ok(claims) => claims,
        // JSON numbers have no range, but `Value` holds only an f64's: a
        // payload with a larger number (in a claim the gateway skips) is
        // valid JSON this reference cannot read, so it is left out.
        Err(e) if e.to_string().starts_with("number out of range") => return,
        Err(e) => panic!("an accepted payload is JSON: {e}"),
    };
    assert_eq!(claims.get("tid").and_then(Value::as_str), Some(who.tenant.as_str()));
}

/// `json` with every `\\uXXXX` escape of a UTF-16 surrogate that is not
/// half of a pair replaced by `\\uFFFD`. The JSON grammar allows any
/// `\\uXXXX` escape, and the gateway accepts a lone surrogate in a claim it
/// skips; `Value` holds only valid Unicode, and serde_json refuses such an
/// escape with one of two errors depending on what follows it. Everything
/// else, valid or not, is left as it is.
fn without_lone_surrogates(json: &[u8]) -> Vec<u8> {
    let hex = |at: usize| -> Option<u16> {
        let digits = json.get(at..at + 4).filter(|d| d.iter().all(u8::is_ascii_hexdigit))?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let escape = |at: usize| if json.get(at..at + 2) == Some(b"\\u") { hex(at + 2) } else { None };
    let (mut out, mut i) = (Vec::with_capacity(json.len()), 0);
    while i < json.len() {
        if json[i] != b'\\' {
            out.push(json[i]);
            i += 1;
            continue;
        }
        match escape(i) {
            Some(0xD800..=0xDBFF) if matches!(escape(i + 6), Some(0xDC00..=0xDFFF)) => {
                out.extend_from_slice(&json[i..i + 12]);
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(b"\\uFFFD");
                i += 6;
            }
            // Any other escape, or a backslash at the end: its two bytes
            // as they are, so an escaped backslash never starts an escape.
            _ => {
                out.extend_from_slice(&json[i..(i + 2).min(json.len())]);
                i += 2;
            }
        }
    }
    out
}

/// `tid`, app, `ver`, signature and a style byte from the NUL-separated fields.
fn minted(rest: &[u8]) -> (String, String, String, String, u8) {
    let mut fields = rest.split(|&b| b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
    let mut next = || fields.next().unwrap_or_default();
    let (tid, app, ver) = (next(), next(), next());
    let sig: String =
        next().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    let style = next().bytes().next().unwrap_or(0);
    (tid, app, ver, sig, style)
}

fn minted_tokens_are_read_back(rest: &[u8]) {
    let (tid, app, ver, sig, style) = minted(rest);
    let v2 = ver == "2.0";
    let app_claim = if v2 { "azp" } else { "appid" };
    let mut claims = serde_json::Map::new();
    claims.insert("tid".into(), tid.clone().into());
    claims.insert(app_claim.into(), app.clone().into());
    claims.insert("ver".into(), ver.clone().into());
    // The other app claim, which must not be read when the right one is present.
    claims.insert((if v2 { "appid" } else { "azp" }).into(), "not-this-one".into());
    let json = Value::Object(claims).to_string();
    let payload = if style & 1 == 0 { URL_SAFE_NO_PAD.encode(&json) } else { URL_SAFE.encode(&json) };
    let token = format!("{}.{payload}.{sig}", URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#));
    let expected = match (tid.is_empty(), app.is_empty()) {
        (true, _) => Err(TokenError::MissingClaim("tid")),
        // A present but empty app claim does not fall back to the other one.
        (false, true) => Err(TokenError::MissingClaim(app_claim)),
        (false, false) => Ok(Identity { tenant: tid.clone(), app: app.clone() }),
    };
    assert_eq!(identity_from_token(&token), expected, "minted token {token}");

    let scheme = ["Bearer", "bearer", "BEARER", "bEaReR"][usize::from(style >> 1) % 4];
    let spaces = " ".repeat(1 + usize::from(style >> 3) % 3);
    let value = format!("{spaces}{scheme}{spaces}{token}{spaces}");
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&value).expect("base64url and spaces are a valid value"),
    );
    assert_eq!(identity_from_headers(&headers), expected, "header {value:?}");
}

fn cache_agrees_with_the_decoder(raw: &str, rest: &[u8]) {
    let (tid, app, _, sig, _) = minted(rest);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::json!({"tid": tid, "appid": app}).to_string());
    let good = format!("h.{payload}.{sig}");
    // Tokens around the same payloads: the raw one, well-formed ones, and
    // ill-formed ones that share a well-formed token's payload.
    let mut tokens =
        vec![raw.trim().to_string(), good.clone(), format!("{good}.extra"), format!("h.{payload}")];
    if let Some(p) = raw.split('.').nth(1) {
        tokens.push(format!("h.{p}.s"));
        tokens.push(format!("h.{p}"));
    }
    let cache = IdentityCache::new(4);
    for _round in 0..2 {
        for token in &tokens {
            let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else { continue };
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            assert_eq!(cache.identify(&headers), identity_from_headers(&headers), "token {token:?}");
        }
    }
}
