//! quotagate: a rate-limiting reverse proxy for the Microsoft Defender XDR,
//! Defender for Endpoint and Graph security APIs.
//!
//! One request's path through the gateway, module by module:
//!
//! 1. [`server`] accepts it on a proxy listener; [`app`] runs the steps below.
//! 2. [`upstream::route`] picks the upstream by listener, host or path prefix.
//! 3. [`policy`] finds the policy that meters it by method, upstream and path.
//! 4. [`identity`] reads the tenant and app from the bearer token.
//! 5. [`admission`] admits it now, queues it until the exact moment a slot
//!    of every window ([`quota`]) frees, or rejects it with the exact `Retry-After`.
//! 6. [`upstream`] forwards it, streaming both ways.
//! 7. [`error`] is the one place where a failure becomes a status and a body.
//!
//! [`config`] holds the schema and built-in defaults; [`admin`] serves health
//! and metrics apart from proxy traffic; [`metrics`] defines every metric;
//! [`store`] keeps the quota state durable (SQLite) or shared (Redis).

pub mod admin;
pub mod admission;
pub mod app;
pub mod config;
pub mod error;
pub mod hunting;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod quota;
pub mod server;
pub mod store;
pub mod upstream;
