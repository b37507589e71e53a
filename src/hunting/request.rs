//! What a hunting request asks: its query and, for Graph, its `Timespan`.
//!
//! The services take `{"Query": "<KQL>"}` (Graph also `{"Query", "Timespan"}`,
//! and its beta examples write `query`), so member names match
//! case-insensitively. A body the service would refuse anyway (not JSON, not
//! an object, no query, an empty one) is refused here, before any quota is
//! spent, with a message that says what is wrong.

use serde_json::Value;

/// A hunting request's parts the gateway looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HuntingRequest {
    pub query: String,
    pub timespan: Option<String>,
}

/// Read a hunting request body, or say what is wrong with it.
pub fn parse(body: &[u8]) -> Result<HuntingRequest, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        if body.iter().all(u8::is_ascii_whitespace) {
            "the body is empty; a hunting request is a JSON object such as {\"Query\": \"DeviceEvents | take 10\"}"
                .to_string()
        } else {
            format!("the body is not valid JSON ({e})")
        }
    })?;
    let Value::Object(members) = value else {
        return Err("the body must be a JSON object such as {\"Query\": \"DeviceEvents | take 10\"}".into());
    };
    let member = |name: &str| members.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
    let query = match member("query") {
        None => return Err("the body has no `Query` member".into()),
        Some(Value::String(q)) if q.trim().is_empty() => return Err("`Query` is empty".into()),
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err("`Query` must be a string".into()),
    };
    let timespan = match member("timespan") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err("`Timespan` must be an ISO 8601 duration string such as \"P30D\"".into()),
    };
    Ok(HuntingRequest { query, timespan })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_timespan_match_any_case() {
        let r = parse(br#"{"query": "T | take 1", "TIMESPAN": "P7D", "other": 1}"#).unwrap();
        assert_eq!(r, HuntingRequest { query: "T | take 1".into(), timespan: Some("P7D".into()) });
        assert_eq!(parse(br#"{"Query":"x"}"#).unwrap().timespan, None);
    }

    #[test]
    fn invalid_bodies_say_what_is_wrong() {
        let e = |b: &[u8]| parse(b).unwrap_err();
        assert!(e(b"").contains("empty"), "{}", e(b""));
        assert!(e(b"Query=x").contains("not valid JSON"));
        assert!(e(b"[1]").contains("JSON object"));
        assert!(e(br#"{"Querry": "x"}"#).contains("no `Query`"));
        assert!(e(br#"{"Query": "  "}"#).contains("empty"));
        assert!(e(br#"{"Query": 5}"#).contains("must be a string"));
        assert!(e(br#"{"Query": "x", "Timespan": 30}"#).contains("Timespan"));
    }
}
