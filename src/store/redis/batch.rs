//! The first asks of one key go to Redis together.
//!
//! While nobody on this replica waits for a key, its requests ask Redis at
//! once ([`super::queue`]). One script run per request costs a busy key a
//! round trip and a run of [`super::ADMIT`] each, in Redis and here.
//! Instead, the asks of one key form batches: the first ask starts a driver
//! task, which runs the script for every ask pending at that moment; asks
//! that arrive while it runs go in its next run. Nothing waits to fill a
//! batch: a lone ask is sent at once, as it was before batching.
//!
//! A run admits its members in asking order, each by the rule of a single
//! admission, so the guarantee is the script's: no interval of `W` holds
//! more than `N` admissions. A member refused and every member after it
//! learn the earliest time the first of them could go.
//!
//! The driver is a task of its own, so a client that goes away does not
//! strand the asks batched with it. An admission whose request has gone by
//! the time it is answered is taken back from Redis (`ZREM`), as a refund
//! is. Should the driver end without answering (the runtime stopping), the
//! asks it held fail as a Redis error would, and the next ask starts a new
//! driver.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::queue::KeyQueue;
use super::{Answer, RedisStore};
use crate::quota::{QuotaKey, Window};

/// The most members one script run takes (Lua's `unpack` has a limit).
const MAX_BATCH: usize = 128;

/// One key's asks not yet sent, and whether a driver is sending them.
#[derive(Default)]
pub(super) struct Batch(Mutex<Pending>);

#[derive(Default)]
struct Pending {
    asks: Vec<Ask>,
    driving: bool,
}

struct Ask {
    number: u64,
    windows: Vec<Window>,
    /// How long the key's log is kept ([`crate::policy::Policy::longest_kept`]).
    kept: Duration,
    reply: oneshot::Sender<Result<Answer, redis::RedisError>>,
}

impl Batch {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the next run's asks: those with the first ask's windows (a key
    /// shared by policies of other windows waits for a run of its own), up
    /// to [`MAX_BATCH`], in asking order. `None`, and the driver stops, when
    /// nothing is pending.
    fn next_run(&self) -> Option<Vec<Ask>> {
        let mut st = self.lock();
        if st.asks.is_empty() {
            st.driving = false;
            return None;
        }
        let (windows, kept) = (st.asks[0].windows.clone(), st.asks[0].kept);
        let mut run = Vec::new();
        let mut rest = Vec::new();
        for ask in st.asks.drain(..) {
            if run.len() < MAX_BATCH && ask.windows == windows && ask.kept == kept {
                run.push(ask);
            } else {
                rest.push(ask);
            }
        }
        st.asks = rest;
        Some(run)
    }
}

/// Ends a driver: unless it stopped by finding nothing pending, the asks
/// still pending fail (their replies dropped) and the next ask starts anew.
struct Driving<'a> {
    batch: &'a Batch,
    done: bool,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.batch.lock();
            st.asks.clear();
            st.driving = false;
        }
    }
}

impl RedisStore {
    /// Ask Redis for call `number` of `key`, in a batch with the other asks
    /// of the key pending now.
    pub(super) async fn ask_batched(
        self: &Arc<Self>,
        queue: &Arc<KeyQueue>,
        key: &QuotaKey,
        windows: &[Window],
        kept: Duration,
        number: u64,
    ) -> Result<Answer, redis::RedisError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut st = queue.batch.lock();
            st.asks.push(Ask { number, windows: windows.to_vec(), kept, reply });
            !std::mem::replace(&mut st.driving, true)
        };
        if start {
            tokio::spawn(self.clone().drive(queue.clone(), key.clone()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((redis::ErrorKind::Io, "the batch of Redis asks ended unanswered")))
        })
    }

    /// Send `key`'s pending asks, a run at a time, until none is pending.
    async fn drive(self: Arc<Self>, queue: Arc<KeyQueue>, key: QuotaKey) {
        let name = self.names.encode(&key);
        let mut driving = Driving { batch: &queue.batch, done: false };
        loop {
            let Some(run) = queue.batch.next_run() else {
                driving.done = true;
                return;
            };
            let numbers: Vec<u64> = run.iter().map(|a| a.number).collect();
            match self.ask_many(&name, &run[0].windows, run[0].kept, &numbers).await {
                Ok(outcome) => {
                    let mut gone = Vec::new();
                    for (j, ask) in run.into_iter().enumerate() {
                        let answer = outcome.answer(j, &ask.windows);
                        if let Err(Ok(Answer::Admitted { .. })) = ask.reply.send(Ok(answer)) {
                            gone.push(self.member(ask.number));
                        }
                    }
                    if !gone.is_empty() {
                        self.take_back(self.named("log", &name), gone);
                    }
                }
                Err(e) => {
                    for ask in run {
                        let _ = ask.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}
