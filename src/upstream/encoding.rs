//! The content codings the gateway reads in an upstream's answer: gzip and
//! deflate, beside identity.
//!
//! The gateway reads two bodies: a hunting result's `Stats` (its running
//! time) and a throttle's message (which quota, and until when). A client
//! that accepts compressed answers (Python's `requests` and `httpx`, the
//! Graph SDKs) lets the service compress them. The compressed bytes go to
//! the client unchanged; the gateway reads a decoded copy as they pass,
//! in constant memory.
//!
//! So that every answer to a metered call is one it can read, the call's
//! `Accept-Encoding` keeps only the codings decoded here
//! ([`narrow_accept_encoding`]): `br` or `zstd` are dropped from the list,
//! and a list left with none of them asks for `identity`. An answer in a
//! coding the gateway cannot read anyway is passed on and left unread: its
//! running time is charged by the reservation's conservative rule.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::write::{GzDecoder, ZlibDecoder};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use http::{HeaderMap, HeaderValue};

/// A body's content coding, from its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: a zlib stream (RFC 9110, 8.4.1.2).
    Deflate,
    /// Another coding, or several: not read here.
    Other,
}

impl Coding {
    pub fn of(headers: &HeaderMap) -> Coding {
        let mut values = headers.get_all(CONTENT_ENCODING).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return if headers.contains_key(CONTENT_ENCODING) { Coding::Other } else { Coding::Identity };
        };
        let Ok(value) = value.to_str() else { return Coding::Other };
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("identity") {
            Coding::Identity
        } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
            Coding::Gzip
        } else if value.eq_ignore_ascii_case("deflate") {
            Coding::Deflate
        } else {
            Coding::Other
        }
    }
}

/// Whether a coding named in `Accept-Encoding` is one the gateway decodes.
fn readable(coding: &str) -> bool {
    ["gzip", "x-gzip", "deflate", "identity"].iter().any(|c| coding.eq_ignore_ascii_case(c))
}

/// Whether an `Accept-Encoding` item carries the weight 0 (`q=0`, `q=0.000`).
fn refused(item: &str) -> bool {
    item.split(';').skip(1).filter_map(|p| p.split_once('=')).any(|(name, value)| {
        name.trim().eq_ignore_ascii_case("q") && value.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
    })
}

/// Keep in `Accept-Encoding` only the codings [`Decoder`] reads, with their
/// weights; `identity` when none is left. A request without the header is
/// left without it. Where a coding was dropped and no coding it accepts is
/// left, a refusal of the plain body (`identity;q=0`, `*;q=0`) is dropped too: the
/// client may then get the plain body, which every client reads, rather
/// than no acceptable answer. Where one is left, its refusal stands.
pub fn narrow_accept_encoding(headers: &mut HeaderMap) {
    if !headers.contains_key(ACCEPT_ENCODING) {
        return;
    }
    let mut kept = Vec::new();
    let mut dropped = false;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else {
            dropped = true;
            continue;
        };
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let coding = item.split(';').next().unwrap_or_default().trim();
            // `*;q=0` refuses what is not listed: it never widens the answer.
            if readable(coding) || (coding == "*" && refused(item)) {
                kept.push(item.to_string());
            } else {
                dropped = true;
            }
        }
    }
    if !dropped {
        return;
    }
    // `identity` and `*` speak for the plain body.
    let plain = |item: &str| {
        let coding = item.split(';').next().unwrap_or_default().trim();
        coding == "*" || coding.eq_ignore_ascii_case("identity")
    };
    if !kept.iter().any(|item| !plain(item) && !refused(item)) {
        kept.retain(|item| !(plain(item) && refused(item)));
    }
    let value = if kept.is_empty() { "identity".to_string() } else { kept.join(", ") };
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(&value).expect("kept from valid values"));
}

/// A streaming decoder that writes what it decodes into `W`, in constant memory.
pub struct Decoder<W: Write> {
    inner: Inner<W>,
    /// The stream failed to decode: nothing more is fed, and what was
    /// decoded before the failure stays in the sink.
    failed: bool,
}

enum Inner<W: Write> {
    Identity(W),
    Gzip(Box<GzDecoder<W>>),
    Deflate(Box<ZlibDecoder<W>>),
    /// A coding not read here.
    Unreadable,
}

impl<W: Write> Decoder<W> {
    pub fn new(coding: Coding, sink: W) -> Self {
        let inner = match coding {
            Coding::Identity => Inner::Identity(sink),
            Coding::Gzip => Inner::Gzip(Box::new(GzDecoder::new(sink))),
            Coding::Deflate => Inner::Deflate(Box::new(ZlibDecoder::new(sink))),
            Coding::Other => Inner::Unreadable,
        };
        Decoder { inner, failed: false }
    }

    /// Decode `data` into the sink, all that it yields (a flate2 writer
    /// keeps decoded bytes back until flushed). A corrupt stream, or bytes
    /// after the end of a compressed one, stop the decoding; what was
    /// decoded before them stays readable.
    pub fn write(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        let result = match &mut self.inner {
            Inner::Identity(sink) => sink.write_all(data),
            Inner::Gzip(d) => {
                let wrote = d.write_all(data);
                wrote.and(d.flush())
            }
            Inner::Deflate(d) => {
                let wrote = d.write_all(data);
                wrote.and(d.flush())
            }
            Inner::Unreadable => Ok(()),
        };
        self.failed = result.is_err();
    }

    /// Whether bytes written from now on are still decoded.
    pub fn decoding(&self) -> bool {
        !self.failed && !matches!(self.inner, Inner::Unreadable)
    }

    /// What was decoded into; `None` for a coding not read here.
    pub fn sink(&self) -> Option<&W> {
        match &self.inner {
            Inner::Identity(sink) => Some(sink),
            Inner::Gzip(d) => Some(d.get_ref()),
            Inner::Deflate(d) => Some(d.get_ref()),
            Inner::Unreadable => None,
        }
    }
}

/// A whole (small) body as read for a throttle's message: at most `limit`
/// decoded bytes of a compressed one; an identity body, or one that cannot
/// be decoded, as it came.
pub fn decoded(coding: Coding, body: &[u8], limit: usize) -> Cow<'_, [u8]> {
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    let mut out = Vec::new();
    let read = match coding {
        Coding::Identity | Coding::Other => return Cow::Borrowed(body),
        Coding::Gzip => flate2::read::GzDecoder::new(body).take(limit).read_to_end(&mut out),
        Coding::Deflate => flate2::read::ZlibDecoder::new(body).take(limit).read_to_end(&mut out),
    };
    // A body cut short still yields what was decoded before the cut.
    match read {
        Ok(_) => Cow::Owned(out),
        Err(_) if !out.is_empty() => Cow::Owned(out),
        Err(_) => Cow::Borrowed(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: http::HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn narrowed(values: &[&str]) -> Vec<String> {
        let mut h = headers(ACCEPT_ENCODING, values);
        narrow_accept_encoding(&mut h);
        h.get_all(ACCEPT_ENCODING).iter().map(|v| v.to_str().unwrap().to_string()).collect()
    }

    #[test]
    fn accept_encoding_keeps_only_the_codings_read_here() {
        assert_eq!(narrowed(&["gzip, deflate, br, zstd"]), ["gzip, deflate"]);
        assert_eq!(narrowed(&["br;q=1.0, gzip;q=0.8, *;q=0.1"]), ["gzip;q=0.8"]);
        assert_eq!(narrowed(&["br", "zstd"]), ["identity"]);
        assert_eq!(narrowed(&["GZIP"]), ["GZIP"], "already readable: untouched");
        assert_eq!(narrowed(&["gzip", "deflate"]), ["gzip", "deflate"], "two lines, both readable");
        assert!(narrowed(&[]).is_empty(), "no header stays no header");
        assert_eq!(narrowed(&["br, identity;q=0"]), ["identity"], "the plain body, not none at all");
        assert_eq!(
            narrowed(&["br, gzip, identity; q=0.0"]),
            ["gzip, identity; q=0.0"],
            "gzip is left, so the refusal of a plain body stands"
        );
        assert_eq!(
            narrowed(&["br, gzip;q=0, identity;q=0"]),
            ["gzip;q=0"],
            "no accepted coding left: a plain body, which no longer refused is acceptable"
        );
        assert_eq!(narrowed(&["gzip, identity;q=0"]), ["gzip, identity;q=0"], "nothing dropped: untouched");
        assert_eq!(narrowed(&["br, identity;q=0.5"]), ["identity;q=0.5"]);
        assert_eq!(narrowed(&["gzip, br, *;q=0"]), ["gzip, *;q=0"], "a refusal of the rest stands");
        assert_eq!(narrowed(&["br, *;q=0"]), ["identity"], "no accepted coding left");
    }

    #[test]
    fn content_encoding_names_one_coding_or_other() {
        assert_eq!(Coding::of(&HeaderMap::new()), Coding::Identity);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &[" gzip "])), Coding::Gzip);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &["x-gzip"])), Coding::Gzip);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &["deflate"])), Coding::Deflate);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &["br"])), Coding::Other);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &["gzip, br"])), Coding::Other);
        assert_eq!(Coding::of(&headers(CONTENT_ENCODING, &["gzip", "gzip"])), Coding::Other);
    }

    #[test]
    fn a_gzip_stream_decodes_the_same_in_any_chunks() {
        let plain: Vec<u8> = (0..50_000u32).flat_map(|i| format!("{i},").into_bytes()).collect();
        let packed = gzip(&plain);
        for size in [1, 7, 512, packed.len()] {
            let mut d = Decoder::new(Coding::Gzip, Vec::new());
            for chunk in packed.chunks(size) {
                d.write(chunk);
            }
            assert_eq!(d.sink().expect("readable"), &plain, "chunks of {size}");
        }
    }

    #[test]
    fn a_corrupt_stream_stops_decoding() {
        let mut d = Decoder::new(Coding::Gzip, Vec::new());
        d.write(b"this is not gzip at all");
        assert!(!d.decoding());
        assert!(d.sink().expect("gzip is read here").is_empty());
        assert!(Decoder::new(Coding::Other, Vec::new()).sink().is_none());
    }

    #[test]
    fn bytes_after_the_end_keep_what_was_decoded() {
        let plain = br#"{"Stats":{"ExecutionTime":1.5}}"#;
        let mut packed = gzip(plain);
        packed.extend_from_slice(b"trailing bytes that are no gzip member");
        let mut d = Decoder::new(Coding::Gzip, Vec::new());
        d.write(&packed);
        assert!(!d.decoding(), "the trailing bytes stop the decoding");
        assert_eq!(d.sink().expect("decoded before the failure"), plain);
        d.write(b"more");
        assert_eq!(d.sink().unwrap(), plain, "nothing more is fed");
    }

    #[test]
    fn a_small_compressed_body_is_read_whole_up_to_the_limit() {
        let packed = gzip(br#"{"error":{"message":"You can run queries again in 00:05:00."}}"#);
        assert!(decoded(Coding::Gzip, &packed, 1024).starts_with(br#"{"error""#));
        assert_eq!(decoded(Coding::Gzip, &packed, 8).as_ref(), br#"{"error""#);
        assert_eq!(decoded(Coding::Identity, b"plain", 2).as_ref(), b"plain");
        assert_eq!(decoded(Coding::Gzip, b"not gzip", 64).as_ref(), b"not gzip");
    }
}
