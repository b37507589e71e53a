//! A request's place in a key's queue, released on drop.
//!
//! A place rides inside the request's future: when a client disconnects,
//! hyper drops the future, the place leaves the queue, and a waiter is woken
//! to re-decide who takes the slot.

use std::sync::Arc;

use prometheus::IntGauge;

use super::KeyCell;

pub(super) struct Place {
    pub cell: Arc<KeyCell>,
    pub id: u64,
    pub depth: IntGauge,
    /// Still in the queue (not yet admitted or removed).
    pub queued: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.depth.dec();
        if !self.queued {
            return;
        }
        let mut st = self.cell.lock();
        if let Some(pos) = st.queue.iter().position(|w| w.ticket.id == self.id) {
            st.queue.remove(pos);
            if st.queue.is_empty() {
                st.lanes.idle();
            }
            // It may have been the one going next: let the others re-decide.
            st.nudge();
        } else {
            // Pushed out of the queue, and gone before it was told.
            st.was_pushed_out(self.id);
        }
    }
}
