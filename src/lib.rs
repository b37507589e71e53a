//! quotagate: a rate-limiting reverse proxy for the Microsoft Defender XDR,
//! Defender for Endpoint and Graph security APIs.
//!
//! One request's path through the gateway, module by module:
//!
//! 1. [`server`] accepts it on a proxy listener (over TLS when configured),
//!    or [`forward_proxy`] takes it out of a `CONNECT` tunnel; [`app`] runs
//!    the steps below.
//! 2. [`upstream::route`] picks the upstream by listener, host or path prefix.
//! 3. [`policy`] finds the policy that meters it by method, upstream and path.
//! 4. [`identity::client`] names the client (API key, app id or anonymous);
//!    [`admission::guard`] cuts a client's runaway loop before any queue.
//! 5. [`identity`] reads the tenant and app from the bearer token.
//! 6. [`admission`] admits it now, queues it until the exact moment a slot
//!    of every window ([`quota`]) frees, or rejects it with the exact
//!    `Retry-After`; [`admission::fair`] decides which client goes next.
//! 7. [`upstream`] forwards it, streaming both ways.
//! 8. [`error`] is the one place where a failure becomes a status and a body.
//!
//! [`config`] holds the schema and built-in defaults; [`admin`] serves health
//! and metrics apart from proxy traffic; [`metrics`] defines every metric;
//! [`store`] keeps the quota state durable (SQLite) or shared (Redis).

pub mod admin;
pub mod admission;
pub mod app;
pub mod config;
pub mod error;
pub mod forward_proxy;
pub mod hunting;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod quota;
pub mod server;
pub mod store;
pub mod upstream;
