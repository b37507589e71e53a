//! Meter a hunting response's running time while it streams to the client.
//!
//! * **Defender** (XDR and MDE) reports `Stats.ExecutionTime`. Up to
//!   `stats_prefix_bytes` of the body are held back while the [`Scanner`]
//!   looks for `Stats`. When it is there (the service sends it first), the
//!   reservation is settled at once and the response gains
//!   [`EXECUTION_TIME`], [`ROWS`] and [`TRUNCATED`] before the body streams
//!   on, byte for byte. When it is not, the body streams anyway and the
//!   scanner, constant in memory, reads every chunk until it finds `Stats`
//!   or the body ends. A gzip or deflate body passes on compressed and is
//!   decoded for the scanner as it passes ([`crate::upstream::encoding`]).
//!   At most `max_scan_bytes` are decoded and read: a body that decodes to
//!   more (a compression bomb; the service fails results over ~124 MB)
//!   streams on unread, and its cost is unknown, so that one response
//!   cannot hold a worker's core for minutes of decoding.
//! * **Graph** has no `Stats`: the running time is the wall time from sending
//!   the query to its response headers, when the service has run it.
//!
//! A body that ends, fails or is abandoned by its client before `Stats` was
//! read leaves the cost unknown: the reservation is dropped, and charges by
//! its conservative rule ([`Reservation`]). So does one still unread at the
//! exchange's total timeout: a client that stops reading stops the body
//! (and its own deadline, which fires only when the body is read), so a
//! watchdog ends the reservation then, and a stalled reader cannot hold its
//! tenant's running time for longer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;

use super::stats::{Scanner, Stats};
use crate::admission::runtime::Reservation;
use crate::upstream::encoding::{Coding, Decoder};

/// Response header: the query's running time in seconds, as metered.
pub const EXECUTION_TIME: HeaderName = HeaderName::from_static("x-quotagate-execution-time");
/// Response header: rows in the result (`Stats.dataset_statistics`).
pub const ROWS: HeaderName = HeaderName::from_static("x-quotagate-rows");
/// Response header: `true` when the result reached the service's row cap.
pub const TRUNCATED: HeaderName = HeaderName::from_static("x-quotagate-truncated");

/// What metering a Defender response reports beside the charge, which the
/// reservation counts itself: results at the row cap, and costs unread.
#[derive(Clone)]
pub struct Report {
    /// Results at the row cap.
    pub truncated: IntCounter,
    /// Responses whose cost could not be read (charged conservatively).
    pub unmetered: IntCounter,
    pub max_rows: u64,
    pub policy: String,
    pub tenant: String,
}

impl Report {
    /// Settle `reservation` from `stats`; it comes back when they name no usable time.
    fn settle(&self, reservation: Reservation, stats: &Stats) -> Option<Reservation> {
        let Some(cost) = stats.execution_time.and_then(|s| Duration::try_from_secs_f64(s).ok()) else {
            return Some(reservation);
        };
        reservation.settle(cost);
        if self.truncated(stats) {
            self.truncated.inc();
            tracing::warn!(policy = %self.policy, tenant = %self.tenant, rows = stats.rows,
                max_rows = self.max_rows, "hunting result reached the row cap: it is probably truncated");
        }
        None
    }

    fn truncated(&self, stats: &Stats) -> bool {
        stats.rows.is_some_and(|r| r >= self.max_rows)
    }

    /// The cost is unknown: the reservation charges by its rule as it drops.
    fn unknown(&self, reservation: Reservation) {
        self.unmetered.inc();
        tracing::warn!(policy = %self.policy, tenant = %self.tenant,
            charged_s = reservation.estimate().max(reservation.wall_time()).as_secs_f64(),
            "hunting response without Stats.ExecutionTime: charged the larger of the estimate and the wall time");
        drop(reservation);
    }
}

/// The [`Scanner`], fed a body's bytes as its content coding decodes them.
struct Reader(Decoder<Sink>);

/// Where decoded bytes go: straight into the scanner, nothing kept, up to
/// `left` more bytes; past that, the write fails and decoding stops.
struct Sink {
    scanner: Scanner,
    left: u64,
}

impl std::io::Write for Sink {
    fn write(&mut self, decoded: &[u8]) -> std::io::Result<usize> {
        let n = u64::try_from(decoded.len()).unwrap_or(u64::MAX);
        if n > self.left {
            self.left = 0;
            return Err(std::io::Error::other("the body decodes to more than max_scan_bytes"));
        }
        self.left -= n;
        self.scanner.feed(decoded);
        Ok(decoded.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Reader {
    fn new(coding: Coding, max_scan_bytes: u64) -> Self {
        Reader(Decoder::new(coding, Sink { scanner: Scanner::new(), left: max_scan_bytes }))
    }

    fn feed(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    /// Whether the body's bytes are still being read: its coding is one
    /// read here, it has decoded so far, and within `max_scan_bytes`.
    fn readable(&self) -> bool {
        self.0.decoding()
    }

    /// What the scanner read, up to the end or the first byte that did not
    /// decode; nothing for a coding not read here.
    fn stats(&self) -> Stats {
        self.0.sink().map_or_else(Stats::default, |sink| sink.scanner.stats())
    }
}

/// Meter a Defender hunting response from its `Stats`. Past `deadline`
/// (the exchange's total timeout) the body cannot bring them any more.
pub async fn defender(
    response: Response,
    reservation: Reservation,
    prefix_limit: usize,
    max_scan_bytes: u64,
    report: Report,
    deadline: tokio::time::Instant,
) -> Response {
    let (mut head, mut body) = response.into_parts();
    let mut scanner = Reader::new(Coding::of(&head.headers), max_scan_bytes);
    let mut prefix = VecDeque::new();
    let mut held = 0;
    let mut failed = None;
    let mut ended = false;
    // A body in a coding not read here streams on at once, its cost unknown.
    while scanner.readable() && !scanner.stats().complete && held < prefix_limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    scanner.feed(data);
                    held += data.len();
                }
                if let Ok(data) = frame.into_data() {
                    prefix.push_back(Ok(data));
                }
            }
            Some(Err(e)) => {
                failed = Some(e);
                break;
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let stats = scanner.stats();
    let mut scanning = None;
    if stats.complete {
        let headers = &mut head.headers;
        if let Some(s) = stats.execution_time {
            headers.insert(
                EXECUTION_TIME,
                HeaderValue::from_str(&format!("{s}")).expect("a float is a valid value"),
            );
        }
        if let Some(rows) = stats.rows {
            headers.insert(ROWS, HeaderValue::from(rows));
        }
        let truncated = if report.truncated(&stats) { "true" } else { "false" };
        headers.insert(TRUNCATED, HeaderValue::from_static(truncated));
        if let Some(unsettled) = report.settle(reservation, &stats) {
            report.unknown(unsettled);
        }
    } else if let Some(e) = failed {
        // The upstream failed before `Stats`: pass on what came, then the error.
        prefix.push_back(Err(e));
        report.unknown(reservation);
    } else if ended || !scanner.readable() {
        // Ended without `Stats`, or no longer read (a coding not read
        // here, a corrupt stream, past max_scan_bytes): streams on unread.
        report.unknown(reservation);
    } else {
        scanning = Some(Scanning::new(scanner, reservation, report, deadline));
    }
    let inner = (!ended && prefix.back().is_none_or(Result::is_ok)).then_some(body);
    Response::from_parts(head, Body::new(MeterBody { prefix, inner, scanning, paused: false }))
}

/// Meter a Graph hunting response: the wall time until its headers.
pub fn graph(mut response: Response, reservation: Reservation) -> Response {
    let cost = reservation.wall_time();
    let value =
        HeaderValue::from_str(&format!("{:.3}", cost.as_secs_f64())).expect("a float is a valid value");
    response.headers_mut().insert(EXECUTION_TIME, value);
    reservation.settle(cost);
    response
}

/// Still looking for `Stats` past the prefix.
struct Scanning {
    scanner: Reader,
    /// Taken by the first of: `Stats` read, the body's end or failure, and
    /// the watchdog at the total timeout.
    reservation: Arc<Mutex<Option<Reservation>>>,
    report: Report,
    watchdog: tokio::task::AbortHandle,
}

impl Scanning {
    fn new(
        scanner: Reader,
        reservation: Reservation,
        report: Report,
        deadline: tokio::time::Instant,
    ) -> Self {
        let reservation = Arc::new(Mutex::new(Some(reservation)));
        let watchdog = tokio::spawn({
            let (reservation, report) = (reservation.clone(), report.clone());
            async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(stalled) = take(&reservation) {
                    tracing::warn!(policy = %report.policy, tenant = %report.tenant,
                        "hunting response not read as far as its Stats by the total timeout");
                    report.unknown(stalled);
                }
            }
        })
        .abort_handle();
        Scanning { scanner, reservation, report, watchdog }
    }

    /// Settle from what the scanner has read, or charge by rule; the
    /// request's access-log line went out before, so say what was charged.
    fn settle(self) {
        let Some(reservation) = take(&self.reservation) else { return };
        let stats = self.scanner.stats();
        tracing::info!(policy = %self.report.policy, tenant = %self.report.tenant,
            running_time_s = stats.execution_time, rows = stats.rows, "hunting response metered as it streamed");
        if let Some(unsettled) = self.report.settle(reservation, &stats) {
            self.report.unknown(unsettled);
        }
    }

    /// Whether the watchdog ended the reservation.
    fn watched_out(&self) -> bool {
        self.reservation.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// The upstream's body failed before `Stats`: charge by rule.
    fn failed(self) {
        if let Some(reservation) = take(&self.reservation) {
            self.report.unknown(reservation);
        }
    }
}

impl Drop for Scanning {
    /// Abandoned by the client (or ended): the watchdog has nothing left to
    /// do, and a reservation still held drops, charging by rule.
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

fn take(reservation: &Mutex<Option<Reservation>>) -> Option<Reservation> {
    reservation.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The held-back prefix, then the rest of the upstream body, metered.
struct MeterBody {
    prefix: VecDeque<Result<Bytes, axum::Error>>,
    inner: Option<Body>,
    scanning: Option<Scanning>,
    /// Whether the server had its turn to send what came before a held error.
    paused: bool,
}

impl MeterBody {
    /// The body ended: settle from what the scanner read, or charge by rule.
    fn ended(&mut self) {
        if let Some(s) = self.scanning.take() {
            s.settle();
        }
    }

    /// Settle as the last bytes go out, when nothing is left to send: the
    /// server stops polling a body of announced length after its last byte,
    /// so the end itself may never be polled.
    fn ended_if_done(&mut self) {
        if self.prefix.is_empty() && self.inner.as_ref().is_none_or(http_body::Body::is_end_stream) {
            self.ended();
        }
    }
}

impl http_body::Body for MeterBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.prefix.front().is_some_and(Result::is_err) && !this.paused {
            // The upstream failed while its body was held back. Give the
            // server one turn to flush the head and the held bytes: an error
            // polled in the same pass closes the connection with them unsent,
            // and the client would get no status at all instead of the
            // upstream's status and an aborted body.
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(next) = this.prefix.pop_front() {
            if next.is_ok() {
                this.ended_if_done();
            }
            return Poll::Ready(Some(next.map(Frame::data)));
        }
        let Some(inner) = this.inner.as_mut() else {
            this.ended();
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(data), Some(s)) = (frame.data_ref(), this.scanning.as_mut()) {
                    if s.watched_out() {
                        // Charged at the total timeout: nothing left to read for.
                        this.scanning = None;
                    } else {
                        s.scanner.feed(data);
                        if s.scanner.stats().complete || !s.scanner.readable() {
                            // Read as far as `Stats`, or no further (a
                            // corrupt stream, past max_scan_bytes).
                            this.scanning.take().expect("scanning").settle();
                        }
                    }
                }
                this.ended_if_done();
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.inner = None;
                if let Some(s) = this.scanning.take() {
                    s.failed();
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.inner = None;
                this.ended();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end early: the end is where an unsettled cost is metered.
        self.prefix.is_empty()
            && self.scanning.is_none()
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .prefix
            .iter()
            .map(|c| c.as_ref().map_or(0, |b| u64::try_from(b.len()).unwrap_or(u64::MAX)))
            .sum();
        // A prefix that ends in the upstream's error is not a whole body: its
        // length must not be announced as exact, or hyper takes the held
        // bytes for the end of the response, never polls the error, and the
        // client, told the upstream's longer Content-Length, waits for the
        // rest on a connection kept alive.
        let fails = self.prefix.iter().any(Result::is_err);
        let rest = match &self.inner {
            Some(inner) => inner.size_hint(),
            None if fails => SizeHint::new(),
            None => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(held));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(chunks: Vec<Result<Bytes, axum::Error>>) -> MeterBody {
        MeterBody { prefix: chunks.into(), inner: None, scanning: None, paused: false }
    }

    fn reset() -> axum::Error {
        axum::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    #[test]
    fn a_whole_held_body_has_an_exact_length() {
        let body = held(vec![Ok(Bytes::from_static(b"{\"Stats\":{}}"))]);
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(12));
    }

    /// Regression (found by the soak, `bench/soak.sh`): a hunting response
    /// whose upstream reset before `Stats` claimed to end after the held
    /// prefix, so hyper ended the response there and the client hung.
    #[test]
    fn a_held_body_that_fails_has_no_exact_length() {
        let body = held(vec![Ok(Bytes::from_static(&[b'x'; 1000])), Err(reset())]);
        let hint = http_body::Body::size_hint(&body);
        assert_eq!((hint.lower(), hint.upper()), (1000, None));
    }

    /// The held bytes, then one pending turn (woken at once) for the server
    /// to flush them with the head, then the upstream's error.
    #[test]
    fn a_held_error_comes_after_one_turn_to_flush() {
        let mut body = held(vec![Ok(Bytes::from_static(b"{\"Schema\"")), Err(reset())]);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = || http_body::Body::poll_frame(Pin::new(&mut body), &mut cx);
        assert!(matches!(poll(), Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.len() == 9)));
        assert!(poll().is_pending());
        assert!(matches!(poll(), Poll::Ready(Some(Err(_)))));
        assert!(matches!(poll(), Poll::Ready(None)));
    }
}
