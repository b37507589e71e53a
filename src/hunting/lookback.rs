//! Does a hunting query reach further back than the service keeps data?
//!
//! Advanced hunting only holds the past 30 days; a query that asks for more
//! silently gets less. This looks for the usual ways a query says how far
//! back it reaches: `ago(<timespan>)` literals (`ago(45d)`, `ago(1000h)`),
//! `datetime(...)` literals older than the limit, and Graph's ISO 8601
//! `Timespan` (`P90D`). It reads text only: it does not parse KQL, so a
//! lookback built at run time (`ago(n * 1d)`) is not seen. Never panics.

use std::time::{Duration, SystemTime};

/// What reaches past the limit, and how far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookback {
    /// The text that says so, e.g. `ago(45d)` or `Timespan P90D`.
    pub found: String,
    pub reach: Duration,
}

const DAY: u64 = 86_400;

/// The longest lookback over `limit` in a query and its Graph `Timespan`.
pub fn beyond(query: &str, timespan: Option<&str>, limit: Duration, now: SystemTime) -> Option<Lookback> {
    let mut worst: Option<Lookback> = None;
    let mut consider = |found: String, reach: Duration| {
        if reach > limit && worst.as_ref().is_none_or(|w| reach > w.reach) {
            worst = Some(Lookback { found, reach });
        }
    };
    let lower = query.to_ascii_lowercase();
    for (at, _) in lower.match_indices("ago(") {
        let inner = argument(&lower[at + 4..]);
        if let Some(reach) = timespan_literal(inner.trim()) {
            consider(format!("ago({})", inner.trim()), reach);
        }
    }
    for (at, _) in lower.match_indices("datetime(") {
        let inner = argument(&query[at + 9..]).trim();
        if let Some(when) = date(inner) {
            if let Ok(reach) = now.duration_since(when) {
                // Only what was read as a date and time: the rest of the
                // query's text never reaches a message or the logs.
                let timestamp = inner.chars().all(|c| c.is_ascii_digit() || "-:.TZ+ ".contains(c));
                let shown = if timestamp { inner } else { &inner[..10] };
                consider(format!("datetime({shown})"), reach);
            }
        }
    }
    if let Some(reach) = timespan.and_then(iso_duration) {
        consider(format!("Timespan {}", timespan.unwrap_or_default()), reach);
    }
    worst
}

/// The text up to the closing parenthesis, at most 40 bytes, cut on a
/// character boundary.
fn argument(text: &str) -> &str {
    let end = text.find(')').unwrap_or(text.len()).min(40);
    let end = (0..=end).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    &text[..end]
}

/// A KQL timespan literal: a number and a unit (`d`, `h`, `m`/`min`, `s`, `ms`).
fn timespan_literal(text: &str) -> Option<Duration> {
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let n: f64 = text[..end].parse().ok()?;
    let secs = match text[end..].trim() {
        "d" | "day" | "days" => n * DAY as f64,
        "h" | "hr" | "hrs" | "hour" | "hours" => n * 3600.0,
        "m" | "min" | "minute" | "minutes" => n * 60.0,
        "s" | "sec" | "second" | "seconds" => n,
        "ms" | "milli" | "millisecond" | "milliseconds" => n / 1000.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// `yyyy-mm-dd`, optionally followed by a time, as midnight UTC of that day
/// (the day is what matters against a limit of days).
fn date(text: &str) -> Option<SystemTime> {
    let day = text.get(..10)?;
    let mut parts = day.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(days).ok()? * DAY))
}

/// An ISO 8601 duration such as `P30D`, `PT720H`, `P2W`, `P1M` (30 days), `P1Y` (365 days).
fn iso_duration(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_uppercase();
    let rest = text.strip_prefix('P')?;
    let (date_part, time_part) = rest.split_once('T').unwrap_or((rest, ""));
    let mut secs = 0f64;
    for (part, units) in [
        (
            date_part,
            &[
                ('Y', 365.0 * DAY as f64),
                ('M', 30.0 * DAY as f64),
                ('W', 7.0 * DAY as f64),
                ('D', DAY as f64),
            ][..],
        ),
        (time_part, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)][..]),
    ] {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
            } else {
                let scale = units.iter().find(|(u, _)| *u == c)?.1;
                secs += number.parse::<f64>().ok()? * scale;
                number.clear();
            }
        }
        if !number.is_empty() {
            return None;
        }
    }
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: Duration = Duration::from_secs(30 * DAY);

    fn now() -> SystemTime {
        date("2026-11-27").unwrap()
    }

    #[test]
    fn ago_literals_past_the_limit() {
        let q = |s: &str| beyond(s, None, LIMIT, now());
        assert_eq!(q("DeviceEvents | where Timestamp > ago(7d)"), None);
        assert_eq!(q("DeviceEvents | where Timestamp > ago(30d)"), None);
        let hit = q("DeviceEvents | where Timestamp > ago(45d) and Timestamp < ago(7d)").unwrap();
        assert_eq!((hit.found.as_str(), hit.reach), ("ago(45d)", Duration::from_secs(45 * DAY)));
        assert_eq!(q("T | where Timestamp > AGO( 1000h )").unwrap().found, "ago(1000h)");
        assert_eq!(q("T | where Timestamp > ago(719h)"), None);
        assert_eq!(q("T | where Timestamp > ago(n * 1d)"), None, "computed lookbacks are not seen");
    }

    #[test]
    fn datetime_literals_older_than_the_limit() {
        let q = |s: &str| beyond(s, None, LIMIT, now());
        assert!(q("T | where Timestamp > datetime(2026-11-01)").is_none());
        let hit = q("T | where Timestamp between (datetime(2026-09-01T00:00:00Z) .. datetime(2026-11-01))")
            .unwrap();
        assert_eq!(hit.found, "datetime(2026-09-01T00:00:00Z)");
        assert_eq!(hit.reach, Duration::from_secs(87 * DAY));
        assert!(q("T | where Timestamp > datetime(not a date)").is_none());
        let hit = q("T | where Timestamp > datetime(2026-09-01 and the rest of a secret query)").unwrap();
        assert_eq!(hit.found, "datetime(2026-09-01)", "only the date is repeated");
    }

    #[test]
    fn graph_timespans() {
        let t = |s: &str| beyond("DeviceEvents", Some(s), LIMIT, now());
        assert_eq!(t("P30D"), None);
        assert_eq!(t("P90D").unwrap().reach, Duration::from_secs(90 * DAY));
        assert_eq!(t("PT720H"), None);
        assert_eq!(t("PT721H").unwrap().found, "Timespan PT721H");
        assert_eq!(t("P2M").unwrap().reach, Duration::from_secs(60 * DAY));
        assert_eq!(t("P5W").unwrap().reach, Duration::from_secs(35 * DAY));
        assert_eq!(t("nonsense"), None);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(date("1970-01-01"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            date("2000-03-01").unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            951_868_800
        );
        assert_eq!(date("2026-13-01"), None);
    }

    /// Regression: a multi-byte character at the 40-byte cut made it panic
    /// (found by the property test below).
    #[test]
    fn a_cut_inside_a_character_is_safe() {
        let q = format!("ago( {}", "𝔗".repeat(20));
        assert_eq!(beyond(&q, None, LIMIT, now()), None);
    }

    proptest! {
        #[test]
        fn no_query_makes_it_panic(query in "\\PC{0,300}", ts in "\\PC{0,20}", tail in "\\PC{0,40}") {
            let _ = beyond(&query, Some(&ts), LIMIT, now());
            for head in ["ago(", "datetime(", "AGO( ", "datetime(2026-"] {
                let _ = beyond(&format!("{head}{tail}"), Some(&format!("P{tail}")), LIMIT, now());
            }
        }
    }
}
