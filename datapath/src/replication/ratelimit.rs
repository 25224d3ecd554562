//! Per-link bandwidth limits (`--ship-rate-limit`): a token bucket per peer,
//! shared by every connection that sends log or full-sync data to it.
//!
//! A sender reserves the bytes of a frame before writing it; when the bucket
//! runs dry it sleeps (no polling) until the reservation is paid for. The
//! balance may go negative, so a frame larger than the burst still passes,
//! and concurrent senders to one peer wait in turn: over any stretch, a link
//! carries at most `rate` bytes/s plus one burst.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The most a bucket holds: a tenth of a second of traffic, at least 64 KiB.
fn burst_of(rate: u64) -> u64 {
    (rate / 10).max(64 << 10)
}

pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    burst: u64,
    /// Bytes available (negative: owed) as of `at`.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1);
        let burst = burst_of(rate);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst as f64, Instant::now())),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// How long the caller must wait before sending `bytes`; the bytes
    /// count as sent from now on.
    fn reserve(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate as f64;
        s.0 = (s.0 + refill).min(self.burst as f64) - bytes as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate as f64)
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The buckets of all links of a node (none without a limit).
#[derive(Default)]
pub struct Limits {
    rate: Option<u64>,
    links: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

impl Limits {
    pub fn new(rate: Option<u64>) -> Limits {
        Limits {
            rate,
            links: Mutex::new(HashMap::new()),
        }
    }

    /// The bucket of the link to `peer`, if sending is limited.
    pub fn link(&self, peer: &str) -> Option<Arc<TokenBucket>> {
        let rate = self.rate?;
        let mut links = self.links.lock().expect("links lock");
        Some(Arc::clone(
            links
                .entry(peer.to_string())
                .or_insert_with(|| Arc::new(TokenBucket::new(rate))),
        ))
    }
}

/// Waits for `bytes` on `link`, if there is a limit.
pub async fn take(link: Option<&TokenBucket>, bytes: u64) {
    if let Some(b) = link {
        b.take(bytes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bucket_holds_senders_to_its_rate() {
        let rate = 4 << 20;
        let b = TokenBucket::new(rate);
        let started = std::time::Instant::now();
        let total: u64 = 2 << 20;
        for _ in 0..total / (256 << 10) {
            b.take(256 << 10).await;
        }
        // Everything beyond the initial burst is paid for at `rate`.
        let least = (total - burst_of(rate)) as f64 / rate as f64;
        let took = started.elapsed().as_secs_f64();
        assert!(
            took >= least * 0.95,
            "{total} bytes in {took:.3} s at {rate} B/s"
        );
    }

    #[tokio::test]
    async fn concurrent_senders_share_one_link() {
        let rate = 8 << 20;
        let limits = Arc::new(Limits::new(Some(rate)));
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let l = Arc::clone(&limits);
            tasks.push(tokio::spawn(async move {
                let link = l.link("b").expect("limited");
                for _ in 0..4 {
                    link.take(256 << 10).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
        let total = 4 * 4 * (256u64 << 10);
        let least = (total - burst_of(rate)) as f64 / rate as f64;
        let took = started.elapsed().as_secs_f64();
        assert!(
            took >= least * 0.95,
            "{total} bytes in {took:.3} s at {rate} B/s"
        );
    }

    #[test]
    fn links_are_per_peer_and_absent_without_a_limit() {
        assert!(Limits::new(None).link("b").is_none());
        let l = Limits::new(Some(1 << 20));
        let b1 = l.link("b").expect("limited");
        assert!(Arc::ptr_eq(&b1, &l.link("b").expect("limited")));
        assert!(!Arc::ptr_eq(&b1, &l.link("c").expect("limited")));
        assert_eq!(b1.rate(), 1 << 20);
    }
}
