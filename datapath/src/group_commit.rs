//! Group commit: writers that need the log durable (FLUSH, FUA) register a
//! target position and wait; one syncer (a worker, see `exec.rs`) takes every waiter
//! registered so far, makes the log durable up to at least what was
//! appended when it started, and answers them all with one fdatasync.
//!
//! The one rule that makes this correct: the syncer takes the waiters
//! *before* it reads how far the log is appended, so that every waiter it
//! answers registered a target at or below what the sync covered. The
//! state machine is kept apart from the logger so that `shuttle` can
//! explore its interleavings (`cargo test --features shuttle group_commit`).

#[cfg(not(feature = "shuttle"))]
use std::sync::Mutex;

#[cfg(feature = "shuttle")]
use shuttle::sync::Mutex;

use tokio::sync::Notify;

struct State<R> {
    /// (target position, how to answer), in the order registered.
    waiters: Vec<(u64, R)>,
    /// Someone (writeback) wants a sync without waiting for it.
    wanted: bool,
    stop: bool,
}

/// The waiters and the syncer's wake-up; `R` answers one waiter.
pub(crate) struct GroupCommit<R> {
    state: Mutex<State<R>>,
    /// Wakes the syncer (the only waiter; a wake-up before it waits is
    /// kept as a permit, so none is lost).
    wake: Notify,
}

impl<R> GroupCommit<R> {
    pub fn new() -> Self {
        GroupCommit {
            state: Mutex::new(State {
                waiters: Vec::new(),
                wanted: false,
                stop: false,
            }),
            wake: Notify::new(),
        }
    }

    /// Registers waiters: each is answered once the log is durable up to
    /// its target (or the sync failed).
    pub fn wait_for(&self, waiters: impl IntoIterator<Item = (u64, R)>) {
        let mut s = self.state.lock().expect("group commit lock");
        let before = s.waiters.len();
        s.waiters.extend(waiters);
        if s.waiters.len() > before {
            self.wake.notify_one();
        }
    }

    /// Asks for a sync up to what is appended now, without waiting.
    pub fn want_sync(&self) {
        let mut s = self.state.lock().expect("group commit lock");
        s.wanted = true;
        self.wake.notify_one();
    }

    /// Ends [`GroupCommit::run`] once every waiter registered is answered.
    pub fn stop(&self) {
        let mut s = self.state.lock().expect("group commit lock");
        s.stop = true;
        self.wake.notify_one();
    }

    /// The syncer. `sync` makes the log durable up to at least what is
    /// appended when it is called and returns that position; `answer`
    /// answers the waiters of one sync with its outcome. Returns after
    /// [`GroupCommit::stop`] once no waiter is left.
    pub async fn run<E>(
        &self,
        mut sync: impl FnMut() -> Result<u64, E>,
        mut answer: impl FnMut(Vec<R>, Result<(), &E>),
    ) {
        loop {
            let taken = {
                let mut s = self.state.lock().expect("group commit lock");
                if s.waiters.is_empty() && !s.wanted && !s.stop {
                    None
                } else if s.stop && s.waiters.is_empty() {
                    return;
                } else {
                    s.wanted = false;
                    Some(std::mem::take(&mut s.waiters))
                }
            };
            let Some(waiters) = taken else {
                self.wake.notified().await;
                continue;
            };
            // Only now: every waiter taken registered before this point.
            let result = sync();
            if let Ok(durable) = &result {
                for (target, _) in &waiters {
                    debug_assert!(target <= durable, "waiter {target} past sync {durable}");
                }
            }
            let replies = waiters.into_iter().map(|(_, r)| r).collect();
            answer(replies, result.as_ref().map(|_| ()));
        }
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod tests {
    use super::*;
    use shuttle::sync::atomic::{AtomicU64, Ordering};
    use shuttle::sync::{Arc, mpsc};
    use shuttle::thread;

    /// Writers append and flush while the syncer runs; a flush answered
    /// Ok must find its target durable, and every flush is answered (a
    /// lost wake-up would deadlock, which shuttle reports).
    fn flushes_are_durable_when_answered(failing_sync: Option<u64>) {
        let gc = Arc::new(GroupCommit::<mpsc::Sender<bool>>::new());
        let appended = Arc::new(Mutex::new(0u64));
        let durable = Arc::new(AtomicU64::new(0));
        let syncer = {
            let (gc, appended, durable) = (gc.clone(), appended.clone(), durable.clone());
            thread::spawn(move || {
                let mut syncs = 0;
                shuttle::future::block_on(gc.run(
                    || {
                        syncs += 1;
                        if Some(syncs) == failing_sync {
                            return Err("EIO");
                        }
                        let end = *appended.lock().unwrap();
                        durable.fetch_max(end, Ordering::SeqCst);
                        Ok(end)
                    },
                    |replies: Vec<mpsc::Sender<bool>>, r| {
                        for reply in replies {
                            let _ = reply.send(r.is_ok());
                        }
                    },
                ))
            })
        };
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let (gc, appended, durable) = (gc.clone(), appended.clone(), durable.clone());
                thread::spawn(move || {
                    for _ in 0..2 {
                        let target = {
                            let mut a = appended.lock().unwrap();
                            *a += 1;
                            *a
                        };
                        let (tx, rx) = mpsc::channel();
                        gc.wait_for([(target, tx)]);
                        if rx.recv().unwrap() {
                            assert!(durable.load(Ordering::SeqCst) >= target);
                        }
                    }
                })
            })
            .collect();
        let wanter = {
            let gc = gc.clone();
            thread::spawn(move || gc.want_sync())
        };
        for w in writers {
            w.join().unwrap();
        }
        wanter.join().unwrap();
        gc.stop();
        syncer.join().unwrap();
    }

    #[test]
    fn group_commit_random_interleavings() {
        shuttle::check_random(|| flushes_are_durable_when_answered(None), 20_000);
    }

    #[test]
    fn group_commit_with_a_failed_sync_random_interleavings() {
        shuttle::check_random(|| flushes_are_durable_when_answered(Some(2)), 20_000);
    }

    #[test]
    fn group_commit_pct() {
        shuttle::check_pct(|| flushes_are_durable_when_answered(None), 20_000, 3);
    }
}
