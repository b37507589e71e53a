//! Path patterns: `/api/incidents/*`, `/api/machines/**`.
//!
//! Matching is by segment and ignores ASCII case, because the service
//! accepts any case and a script that writes `/api/AdvancedHunting/run`
//! must not slip past its quota. `*` matches exactly one segment; a final
//! `**` matches any number of segments, none included. A trailing slash on
//! the request path is ignored.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Compile a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!("path pattern `{pattern}` must start with `/`"));
        };
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(format!("path pattern `{pattern}`: `**` may only be the last segment")),
                "*" => Segment::One,
                "" => return Err(format!("path pattern `{pattern}` has an empty segment")),
                p if p.contains('*') => {
                    return Err(format!("path pattern `{pattern}`: `*` must be a whole segment"))
                }
                p => Segment::Literal(p.to_ascii_lowercase()),
            });
        }
        Ok(PathPattern { source: pattern.to_string(), segments })
    }

    /// Whether a request path (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path).trim_end_matches('/');
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => match parts.next() {
                    Some(p) if p.eq_ignore_ascii_case(lit) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn literal_paths_match_in_any_case() {
        assert!(p("/api/advancedhunting/run").matches("/api/AdvancedHunting/run"));
        assert!(p("/v1.0/security/runHuntingQuery").matches("/v1.0/security/runhuntingquery/"));
        assert!(!p("/api/incidents").matches("/api/incidents/1"));
        assert!(!p("/api/incidents").matches("/api/incident"));
    }

    #[test]
    fn wildcards() {
        assert!(p("/api/machines/*/runliveresponse").matches("/api/machines/abc/runLiveResponse"));
        assert!(!p("/api/machines/*/runliveresponse").matches("/api/machines/runliveresponse"));
        assert!(p("/api/machines/**").matches("/api/machines"));
        assert!(p("/api/machines/**").matches("/api/machines/a/b/c"));
        assert!(!p("/api/machines/**").matches("/api/machineactions"));
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(PathPattern::parse("api/x").unwrap_err().contains("must start with `/`"));
        assert!(PathPattern::parse("/api/**/x").unwrap_err().contains("last segment"));
        assert!(PathPattern::parse("/api/x*").unwrap_err().contains("whole segment"));
        assert!(PathPattern::parse("/api//x").unwrap_err().contains("empty segment"));
    }
}
