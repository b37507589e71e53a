//! Quota maths: exact windows over admission logs, and the keys they belong to.
//!
//! This module decides *when* a call may go; [`crate::admission`] makes
//! requests wait for that moment.

pub mod clock;
pub mod key;
pub mod window;

pub use clock::Clock;
pub use key::{KeyScope, QuotaKey};
pub use window::{tightened, AdmissionLog, Binding, Retention, Window, WindowUse};
