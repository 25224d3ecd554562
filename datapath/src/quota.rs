//! The node's log space quota, shared by all its resources: bytes of
//! logfiles. A writer reserves the bytes of its record before it is logged
//! and waits while the quota is used up; deleting logfiles gives bytes back.

use std::sync::Mutex;

use tokio::sync::Semaphore;

/// Permits are bytes. Tokio semaphores take at most `u32` permits per call,
/// which bounds one reservation to 4 GiB (records are at most 32 MiB).
pub struct LogQuota {
    limit: u64,
    sem: Semaphore,
    /// Bytes in use beyond the limit (logs found at start-up): repaid first.
    debt: Mutex<u64>,
    /// Writers waiting for space right now (emergency mode looks at it).
    waiting: std::sync::atomic::AtomicUsize,
}

impl LogQuota {
    pub fn new(limit: u64) -> Self {
        let permits = limit.min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            limit,
            sem: Semaphore::new(permits),
            debt: Mutex::new(0),
            waiting: Default::default(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64
    }

    /// Accounts for logfiles that already exist (found at start-up).
    pub fn charge_existing(&self, bytes: u64) {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(u32::MAX as u64) as u32;
            match self.sem.try_acquire_many(n) {
                Ok(p) => {
                    p.forget();
                    left -= n as u64;
                }
                Err(_) => {
                    let avail = self.sem.available_permits() as u32;
                    if avail > 0
                        && let Ok(p) = self.sem.try_acquire_many(avail.min(n))
                    {
                        left -= p.num_permits() as u64;
                        p.forget();
                        continue;
                    }
                    *self.debt.lock().expect("quota lock") += left;
                    return;
                }
            }
        }
    }

    /// Tries to reserve without waiting.
    pub fn try_reserve(&self, bytes: u32) -> bool {
        match self.sem.try_acquire_many(bytes) {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Reserves `bytes`, waiting while the quota is used up.
    pub async fn reserve(&self, bytes: u32) {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _done = scopeguard(|| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        });
        if let Ok(p) = self.sem.acquire_many(bytes).await {
            p.forget();
        }
    }

    /// Writers waiting for log space right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Gives back bytes of deleted logfiles (or of records never logged).
    pub fn release(&self, bytes: u64) {
        let mut left = bytes;
        {
            let mut debt = self.debt.lock().expect("quota lock");
            let repay = left.min(*debt);
            *debt -= repay;
            left -= repay;
        }
        if left > 0 {
            self.sem.add_permits(left as usize);
        }
    }
}

/// The default quota: 16 GiB or half the free space of the state root,
/// whichever is smaller.
pub fn default_quota(free_bytes: u64) -> u64 {
    (16u64 << 30).min(free_bytes / 2)
}

/// Runs `f` when dropped (also when a waiting future is cancelled).
fn scopeguard<F: FnMut()>(f: F) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    Guard(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_logs_beyond_the_limit_are_repaid_before_space_frees_up() {
        let q = LogQuota::new(100);
        q.charge_existing(150);
        assert_eq!(q.available(), 0);
        q.release(40);
        assert_eq!(q.available(), 0);
        q.release(30);
        assert_eq!(q.available(), 20);
        assert!(q.try_reserve(20));
        assert!(!q.try_reserve(1));
    }
}
