//! Who is calling: the tenant and app named by the bearer token ([`jwt`]),
//! and which of the gateway's clients sends the request ([`client`]).
//!
//! The gateway never verifies the token (the upstream does); it only reads
//! the claims that decide which quota a call spends. It never logs the token
//! or an API key.

pub mod cache;
pub mod client;
pub mod jwt;

pub use cache::IdentityCache;
pub use jwt::{identity_from_headers, TokenError};

/// The tenant and application a call is made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub app: String,
}
