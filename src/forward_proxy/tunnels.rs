//! The intercepted tunnels open now, so a stopping gateway drains them as
//! it drains base-URL requests.
//!
//! An intercepted tunnel runs in a task of its own once its `CONNECT` is
//! answered: the listener no longer counts its connection as open, so
//! without this a drain would end with the tunnel's requests in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// How many tunnels are open, and a wake-up when the last one closes.
#[derive(Default)]
pub struct Tunnels {
    open: AtomicUsize,
    closed: Notify,
}

/// Held by a tunnel's task while it runs.
pub struct Open(Arc<Tunnels>);

impl Tunnels {
    /// Count a tunnel until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::SeqCst);
        Open(self.clone())
    }

    /// How many are open.
    pub fn count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Wait until no tunnel is open.
    pub async fn idle(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_comes_when_the_last_tunnel_closes() {
        let tunnels = Arc::new(Tunnels::default());
        tokio::time::timeout(std::time::Duration::from_secs(1), tunnels.idle())
            .await
            .expect("none open: idle");
        let (a, b) = (tunnels.open(), tunnels.open());
        let waiting = tokio::spawn({
            let tunnels = tunnels.clone();
            async move { tunnels.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one is still open");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("idle once both closed")
            .unwrap();
        assert_eq!(tunnels.count(), 0);
    }
}
