//! Advanced hunting specifics: how far back a query reaches, and what a
//! response says it cost.
//!
//! Groundwork for metering hunting running time; the request path does not
//! use it yet.

pub mod lookback;
pub mod stats;
