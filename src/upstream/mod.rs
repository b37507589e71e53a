//! Forwarding to the upstream APIs: route selection, the pooled TLS client
//! and its resolver,
//! header hygiene and streaming with timeouts.

pub mod client;
pub mod deadline;
pub mod encoding;
pub mod forward;
pub mod resolve;
pub mod route;
pub mod throttle;

pub use client::Clients;
pub use forward::UpstreamError;
pub use route::{ApiKind, Upstream};
