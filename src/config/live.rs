//! A value that a reload replaces while requests keep the one they started with.
//!
//! Readers take an `Arc` snapshot (a read lock held for one clone); a reload
//! swaps the `Arc`. A request holds its snapshot to the end, so a queued or
//! in-flight request keeps the policies it was admitted under.

use std::sync::{Arc, RwLock};

pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: Arc<T>) -> Self {
        Live(RwLock::new(value))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the value; readers that took the old one keep it.
    pub fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}
