//! Quota maths: exact windows over admission logs, exact budgets of running
//! time over ledgers of charges, and the keys they belong to.
//!
//! This module decides *when* a call may go; [`crate::admission`] makes
//! requests wait for that moment.

pub mod clock;
pub mod key;
pub mod ledger;
pub mod window;

pub use clock::Clock;
pub use key::{KeyMap, KeyScope, QuotaKey};
pub use ledger::{Budget, BudgetUse, Fit, Ledger};
pub use window::{tightened, AdmissionLog, Binding, Retention, Window, WindowUse};
