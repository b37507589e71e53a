//! Advanced hunting specifics: how far back a query reaches.
//!
//! Groundwork for metering hunting running time; the request path does not
//! use it yet.

pub mod lookback;
