//! The soak's tables: the gateway over time, what the clients saw, and the
//! criteria with PASS or FAIL.

use std::process::ExitStatus;
use std::time::Instant;

use crate::emulator::SeenRequest;
use crate::faults::Played;
use crate::outage::{Outage, RECOVERY};
use crate::traffic::{Ending, Tally};
use crate::{Residue, Sample, Settings};

/// How much RSS may grow after warm-up: the trend's rise over the rest of
/// the run, as a share of where it starts.
const RSS_FLAT: f64 = 0.10;

/// The least-squares line through `points` (time, value): its rise from the
/// first point's time to the last's, and its value at the first.
fn trend(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (0.0, 0.0);
    }
    let (mt, mv) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let slope = if var > 0.0 { cov / var } else { 0.0 };
    let (first, last) = (points[0].0, points[points.len() - 1].0);
    (slope * (last - first), mv + slope * (first - mt))
}

/// The length of a row of the table, and of a window whose RSS peak is
/// compared: a minute, the period of the fault schedule, so every window
/// holds every fault once.
const WINDOW: f64 = 60.0;

pub struct Run<'a> {
    pub s: &'a Settings,
    pub start: Instant,
    /// Seconds from the start until the last client call ended.
    pub traffic_ended: f64,
    pub samples: Vec<Sample>,
    pub tally: Tally,
    /// Every request the upstream received.
    pub upstream: Vec<SeenRequest>,
    pub played: Played,
    pub residue: Residue,
    /// `quotagate_config_reloads_total{result="refused"}` at the end.
    pub refused_reloads: f64,
    /// The Redis outages played (`--store redis`).
    pub outages: Vec<Outage>,
    /// `quotagate_forward_proxy_connects_total` at the end: intercepted,
    /// tunnelled, refused, failed.
    pub connects: [f64; 4],
    /// The routes the clients sent by.
    pub routes: Vec<&'static str>,
    pub exit: Option<ExitStatus>,
    pub log: String,
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

impl Run<'_> {
    /// Seconds from the start at which `r` reached the upstream.
    fn upstream_at(&self, r: &SeenRequest) -> f64 {
        r.at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Print every table; true when every criterion passed.
    pub fn print(&self) -> bool {
        self.over_time();
        self.endings();
        self.faults();
        self.criteria()
    }

    /// The RSS samples with `from <= at < to`.
    fn rss_between(&self, from: f64, to: f64) -> Vec<u64> {
        let mut v: Vec<u64> =
            self.samples.iter().filter(|x| x.at >= from && x.at < to).map(|x| x.rss).collect();
        v.sort_unstable();
        v
    }

    /// One row per minute.
    fn over_time(&self) {
        let total = self.s.duration().as_secs_f64();
        let step = WINDOW;
        println!();
        println!(
            "| Time | RSS low | RSS median | RSS peak | Calls sent | Upstream requests | Upstream 429s | Queued, median | Queued, peak |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut from = 0.0;
        while from < total - 1e-9 {
            let to = (from + step).min(total);
            let sent: u64 = self
                .tally
                .sent_per_second
                .range((from as u64)..(to.ceil() as u64).max(from as u64 + 1))
                .map(|(_, n)| n)
                .sum();
            let inside = |r: &&SeenRequest| (from..to).contains(&self.upstream_at(r));
            let upstream = self.upstream.iter().filter(inside).count();
            let throttled = self.upstream.iter().filter(inside).filter(|r| r.status == 429).count();
            let rss = self.rss_between(from, to);
            let show = |b: Option<&u64>| b.map_or("-".to_string(), |b| format!("{:.1} MB", mb(*b)));
            let mut queued: Vec<f64> =
                self.samples.iter().filter(|x| x.at >= from && x.at < to).map(|x| x.queued).collect();
            queued.sort_by(f64::total_cmp);
            let q_median = queued.get(queued.len() / 2).copied().unwrap_or(0.0);
            let q_peak = queued.last().copied().unwrap_or(0.0);
            println!(
                "| {from:.0}–{to:.0} s | {} | {} | {} | {sent} | {upstream} | {throttled} | {q_median:.0} | {q_peak:.0} |",
                show(rss.first()),
                show(rss.get(rss.len() / 2)),
                show(rss.last()),
            );
            from = to;
        }
        if let Some(x) = self.samples.last() {
            println!(
                "| after the traffic ({:.0} s) | | {:.1} MB | | | | | {:.0} | |",
                x.at,
                mb(x.rss),
                x.queued
            );
        }
    }

    fn endings(&self) {
        println!();
        // One column per route when there are several.
        let several = self.routes.len() > 1;
        if several {
            println!("| How requests ended | Count | {} |", self.routes.join(" | "));
            println!("|---|---|{}", "---|".repeat(self.routes.len()));
        } else {
            println!("| How requests ended | Count |");
            println!("|---|---|");
        }
        for (ending, n) in &self.tally.endings {
            let name = match ending {
                Ending::Answered(status) => format!("answered {status}"),
                Ending::Cut => "2xx body cut by an upstream reset".into(),
                Ending::Malformed => "malformed answer".into(),
                Ending::AbandonedWaiting => "abandoned by the client before the status line".into(),
                Ending::AbandonedStreaming => "abandoned by the client mid-stream".into(),
                Ending::NoAnswer => "no answer (transport error)".into(),
                Ending::Hung => "no answer within 30 s".into(),
            };
            if several {
                let by: Vec<String> = self
                    .routes
                    .iter()
                    .map(|r| self.tally.by_route.get(&(*r, *ending)).copied().unwrap_or(0).to_string())
                    .collect();
                println!("| {name} | {n} | {} |", by.join(" | "));
            } else {
                println!("| {name} | {n} |");
            }
        }
        println!("| (of the answers) 429s passed on from the upstream | {} |", self.tally.upstream_throttled);
        if !self.tally.samples.is_empty() {
            println!();
            println!("First problems seen by the clients:");
            for line in &self.tally.samples {
                println!("  {line}");
            }
        }
    }

    fn faults(&self) {
        println!();
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for (_, what) in &self.played.events {
            let kind = what.split(&[':', '(']).next().unwrap_or(what).trim().to_string();
            *kinds.entry(kind).or_default() += 1;
        }
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        println!("Faults played: {}", list.join("; "));
        if self.outages.is_empty() {
            return;
        }
        println!();
        println!("| Redis outage | Killed at | Up again at | `/readyz` while down | Store `shared` again | 503s answered |");
        println!("|---|---|---|---|---|---|");
        for (i, o) in self.outages.iter().enumerate() {
            let (from, to) = self.outage_window(o);
            let down =
                o.seen_down.as_ref().map_or("not seen".into(), |(st, mode)| format!("{st}, mode {mode}"));
            let back = match (&o.restart_error, o.recovered) {
                (Some(e), _) => format!("restart failed: {e}"),
                (None, Some(t)) => {
                    format!("{:.1} s after", t.saturating_duration_since(o.restarted).as_secs_f64())
                }
                (None, None) => format!("not within {} s", RECOVERY.as_secs()),
            };
            let unavailable = self.tally.unavailable.iter().filter(|t| (from..=to).contains(*t)).count();
            println!(
                "| {} | {:.1} s | {:.1} s | {down} | {back} | {unavailable} |",
                i + 1,
                self.since_start(o.killed),
                self.since_start(o.restarted),
            );
        }
    }

    fn since_start(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// The seconds since the start during which an answer may say the
    /// store is unavailable: from the kill until 2 s after the store was
    /// `shared` again (an answer is recorded once its body is read).
    fn outage_window(&self, o: &Outage) -> (f64, f64) {
        let back = o.recovered.unwrap_or(o.restarted + RECOVERY);
        (self.since_start(o.killed), self.since_start(back) + 2.0)
    }

    fn count(&self, pred: impl Fn(&Ending) -> bool) -> u64 {
        self.tally.endings.iter().filter(|(e, _)| pred(e)).map(|(_, n)| n).sum()
    }

    /// The Redis outages: answered as `on_outage` documents, and the store
    /// back to `shared` by itself after each.
    fn redis_rows(&self, rows: &mut Vec<(&str, String, bool)>) {
        let fail_closed = self.s.on_outage == "fail-closed";
        let unavailable = &self.tally.unavailable;
        let outside = unavailable
            .iter()
            .filter(|t| {
                !self.outages.iter().any(|o| {
                    let (from, to) = self.outage_window(o);
                    (from..=to).contains(*t)
                })
            })
            .count();
        let expected_mode = if fail_closed { "fail-closed" } else { "local" };
        let reported = self
            .outages
            .iter()
            .filter(|o| {
                o.seen_down.as_ref().is_some_and(|(status, mode)| {
                    mode == expected_mode && *status == if fail_closed { 503 } else { 200 }
                })
            })
            .count();
        let (measured, ok) = if fail_closed {
            (
                format!(
                    "{} answers 503 with Retry-After, {outside} of them outside an outage; /readyz 503 `fail-closed` in {reported} of {} outages",
                    unavailable.len(),
                    self.outages.len()
                ),
                !unavailable.is_empty() && outside == 0,
            )
        } else {
            (
                format!(
                    "{} answers 503; /readyz 200 `local` in {reported} of {} outages",
                    unavailable.len(),
                    self.outages.len()
                ),
                unavailable.is_empty(),
            )
        };
        rows.push((
            "Redis outages answered as documented",
            measured,
            ok && !self.outages.is_empty() && reported == self.outages.len(),
        ));
        let recovery: Vec<f64> = self
            .outages
            .iter()
            .filter(|o| o.restart_error.is_none())
            .filter_map(|o| Some(o.recovered?.saturating_duration_since(o.restarted).as_secs_f64()))
            .collect();
        let slowest = recovery.iter().copied().fold(0.0, f64::max);
        rows.push((
            "Store recovered after each Redis fault",
            format!(
                "`shared` again after {} of {} restarts, at most {slowest:.1} s after Redis answered (limit {} s)",
                recovery.len(),
                self.outages.len(),
                RECOVERY.as_secs()
            ),
            !self.outages.is_empty() && recovery.len() == self.outages.len(),
        ));
    }

    fn criteria(&self) -> bool {
        let mut rows: Vec<(&str, String, bool)> = Vec::new();

        // RSS after warm-up: the least-squares trend through every sample,
        // with each whole minute's median for the record.
        let total = self.s.duration().as_secs_f64();
        let warm = total * self.s.warmup_percent / 100.0;
        let mut medians = Vec::new();
        let mut from = warm;
        // Whole windows only: a shorter one holds fewer faults.
        while from + WINDOW <= total + 1e-9 {
            let v = self.rss_between(from, from + WINDOW);
            medians.extend(v.get(v.len() / 2).map(|m| format!("{:.1}", mb(*m))));
            from += WINDOW;
        }
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|x| x.at >= warm && x.at <= total + 0.5)
            .map(|x| (x.at, x.rss as f64))
            .collect();
        let (rise, start) = trend(&points);
        let growth = if start > 0.0 { rise / start } else { f64::INFINITY };
        rows.push((
            "RSS flat after warm-up",
            format!(
                "trend of {} samples after {warm:.0} s: {:.1} MB {:+.1} MB over {:.0} s, {:+.1}% (limit +{:.0}%); minute medians {} MB",
                points.len(),
                start / 1_048_576.0,
                rise / 1_048_576.0,
                total - warm,
                growth * 100.0,
                RSS_FLAT * 100.0,
                medians.join(", "),
            ),
            points.len() >= 2 && growth <= RSS_FLAT,
        ));

        // Back to zero.
        let r = self.residue;
        let when =
            r.zero_after.map_or("not within 20 s".to_string(), |t| format!("{t:.1} s after the last call"));
        rows.push((
            "Queue entries back to zero",
            format!(
                "/metrics queue depth {:.0}, /quota queued {} + {} for running time; {when}",
                r.metrics.0, r.quota.0, r.quota.1
            ),
            r.metrics.0 == 0.0 && r.quota.0 == 0 && r.quota.1 == 0,
        ));
        rows.push((
            "Reservations back to zero",
            format!(
                "running time reserved {:.3} s (/metrics) {:.3} s (/quota), hunting in flight {:.0} / {}",
                r.metrics.2, r.quota.3, r.metrics.1, r.quota.2
            ),
            r.metrics.1 == 0.0 && r.metrics.2 == 0.0 && r.quota.2 == 0 && r.quota.3 == 0.0,
        ));

        // Every request answered.
        let sent: u64 = self.tally.sent_per_second.values().sum();
        let answered = self.count(|e| matches!(e, Ending::Answered(_) | Ending::Cut | Ending::Malformed));
        let abandoned = self.count(|e| matches!(e, Ending::AbandonedWaiting | Ending::AbandonedStreaming));
        let unanswered = self.count(|e| matches!(e, Ending::NoAnswer | Ending::Hung));
        rows.push((
            "Every request answered",
            format!("{sent} sent: {answered} answered, {abandoned} abandoned on purpose, {unanswered} without an answer"),
            unanswered == 0 && sent == answered + abandoned && sent > 0,
        ));
        let malformed = self.count(|e| *e == Ending::Malformed);
        rows.push(("No malformed answer", format!("{malformed} malformed"), malformed == 0));
        let reset_met = self
            .upstream
            .iter()
            .filter(|r| r.status == 0 && self.played.resets.iter().any(|(a, b)| r.at >= *a && r.at <= *b))
            .count() as u64;
        let cut = self.count(|e| *e == Ending::Cut);
        rows.push((
            "Bodies cut only by upstream resets",
            format!("{cut} cut bodies, {reset_met} requests met a reset upstream"),
            cut <= reset_met,
        ));

        // The faults played and met requests.
        let status = |code: u16| self.count(|e| *e == Ending::Answered(code));
        let upstream_429 = self.upstream.iter().filter(|r| r.status == 429).count();
        let waiting = self.count(|e| *e == Ending::AbandonedWaiting);
        let streaming = self.count(|e| *e == Ending::AbandonedStreaming);
        rows.push((
            "Every fault met requests",
            format!(
                "resets met {reset_met}, 504s (stalls) {}, 502s (garbage) {}, upstream 429s {upstream_429}, clients gone while waiting {waiting} and mid-stream {streaming}",
                status(504),
                status(502)
            ),
            reset_met > 0 && status(504) > 0 && status(502) > 0 && upstream_429 > 0 && waiting > 0 && streaming > 0,
        ));
        if self.s.redis {
            self.redis_rows(&mut rows);
        }
        if self.s.forward_proxy {
            let [intercepted, tunnelled, refused, failed] = self.connects;
            let answered = |route: &str| -> u64 {
                let ended = self.tally.by_route.iter().filter(|((r, _), _)| *r == route);
                ended.filter(|((_, e), _)| matches!(e, Ending::Answered(_))).map(|(_, n)| n).sum()
            };
            let counts: Vec<String> = self.routes.iter().map(|r| format!("{r} {}", answered(r))).collect();
            rows.push((
                "Forward proxy intercepted every CONNECT",
                format!(
                    "CONNECTs intercepted {intercepted:.0}, tunnelled {tunnelled:.0}, refused {refused:.0}, failed {failed:.0}; answers by route: {}",
                    counts.join(", ")
                ),
                intercepted > 0.0
                    && tunnelled == 0.0
                    && refused == 0.0
                    && failed == 0.0
                    && self.routes.iter().all(|r| answered(r) > 0),
            ));
        }
        let reloads = &self.played.reloads;
        let applied = reloads.iter().filter(|(_, ok)| *ok).count();
        let hup = reloads.iter().filter(|(t, _)| *t == "SIGHUP").count();
        rows.push((
            "Every reload applied",
            format!(
                "{applied} of {} ({} on a file change, {hup} on SIGHUP); {:.0} refused",
                reloads.len(),
                reloads.len() - hup,
                self.refused_reloads
            ),
            !reloads.is_empty() && applied == reloads.len() && self.refused_reloads == 0.0,
        ));

        // The log and the exit.
        let log = plain(&self.log);
        let panics = log.lines().filter(|l| l.contains("panicked")).count();
        let level = |lvl: &str| log.lines().filter(|l| l.contains(lvl)).count();
        rows.push((
            "No panic in the log",
            format!(
                "{panics} panics; {} log lines, {} WARN, {} ERROR",
                log.lines().count(),
                level(" WARN "),
                level(" ERROR ")
            ),
            panics == 0,
        ));
        let exit = self.exit.map_or("still running 15 s after SIGTERM".into(), |e| e.to_string());
        rows.push(("Clean stop on SIGTERM", exit, self.exit.is_some_and(|e| e.success())));

        println!();
        println!(
            "Run of {:.1} min; the traffic stopped and every call had ended at {:.0} s.",
            self.s.minutes, self.traffic_ended
        );
        println!();
        println!("| Criterion | Measured | Result |");
        println!("|---|---|---|");
        for (name, measured, ok) in &rows {
            println!("| {name} | {measured} | {} |", if *ok { "PASS" } else { "FAIL" });
        }
        rows.iter().all(|(_, _, ok)| *ok)
    }
}
