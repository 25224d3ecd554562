//! NBD writers for the tests: a random writer that keeps a model of the
//! device, and the numbered writer of the prefix test. Each request waits
//! for its reply before the next is sent, so the order of completion is the
//! order of the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nbd_client::NbdClient;

pub const BLOCK: u64 = 4096;

/// The seed for this run: `MARS_SEED` if set, else fresh (printed by the
/// caller so that a failure can be replayed).
pub fn seed() -> u64 {
    std::env::var("MARS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[derive(Clone, Debug)]
pub struct RandomOpts {
    pub seed: u64,
    /// Every `big_every`-th write is 1 MiB (aligned); the others 4 KiB.
    pub big_every: u64,
    /// FLUSH after every `flush_every` writes.
    pub flush_every: u64,
    /// Every `fua_every`-th write has FUA set.
    pub fua_every: u64,
    /// Every `zero_every`-th request is a WRITE_ZEROES (of the size the
    /// write would have had) instead of a write.
    pub zero_every: u64,
    /// Pace to at most this many bytes per second.
    pub bytes_per_sec: u64,
}

impl Default for RandomOpts {
    fn default() -> Self {
        RandomOpts {
            seed: 0,
            big_every: 64,
            flush_every: 128,
            fua_every: 37,
            zero_every: 53,
            bytes_per_sec: 4 << 20,
        }
    }
}

/// A writer on its own thread: random writes (4 KiB and 1 MiB, some with
/// FUA, some WRITE_ZEROES, FLUSH now and then) over the whole device until
/// stopped. `model` is the device content it expects (it starts from the
/// content the caller knows, e.g. zeros or a device read).
pub struct RandomWriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<ClientAndModel>>>,
}

/// What a stopped [`RandomWriter`] hands back: its client and its model.
pub type ClientAndModel = (NbdClient, Vec<u8>);

impl RandomWriter {
    pub fn start(client: NbdClient, model: Vec<u8>, opts: RandomOpts) -> RandomWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, writes, bytes) =
                (Arc::clone(&stop), Arc::clone(&writes), Arc::clone(&bytes));
            std::thread::Builder::new()
                .name("nbd-writer".into())
                .spawn(move || random_writes(client, model, opts, &stop, &writes, &bytes))
                .expect("spawning the writer")
        };
        RandomWriter {
            stop,
            writes,
            bytes,
            handle: Some(handle),
        }
    }

    /// Completed writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Bytes of completed writes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Lets the writer write for `d`; fails with the writer's error as
    /// soon as it stops on its own.
    pub fn keep_writing(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        loop {
            if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                let why = match self.handle.take().map(|h| h.join()) {
                    Some(Ok(Err(e))) => format!("{e:#}"),
                    Some(Err(_)) => "it panicked".into(),
                    _ => "it was stopped".into(),
                };
                return Err(anyhow!(
                    "the writer stopped after {} writes: {why}",
                    self.writes()
                ));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Stops after the write in flight; returns the client (after a final
    /// FLUSH) and the model. Fails if the writer does not stop within
    /// [`STOP_TIMEOUT`] (a request without reply).
    pub fn stop(mut self) -> Result<ClientAndModel> {
        self.stop.store(true, Ordering::Release);
        let h = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("the writer had already stopped"))?;
        join_within(h, "the random writer")
    }
}

impl Drop for RandomWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = join_within(h, "the random writer");
        }
    }
}

/// How long a writer may take to notice it should stop (its request in
/// flight must be answered first).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Joins `h` if it finishes within [`STOP_TIMEOUT`]; otherwise leaves it
/// (it ends when the cluster's teardown kills marsd and its socket closes).
fn join_within<T>(h: JoinHandle<Result<T>>, what: &str) -> Result<T> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !h.is_finished() {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "{what} did not stop within {STOP_TIMEOUT:?} (an NBD request without reply?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().map_err(|_| anyhow!("{what} panicked"))?
}

fn random_writes(
    mut c: NbdClient,
    mut model: Vec<u8>,
    opts: RandomOpts,
    stop: &AtomicBool,
    writes: &AtomicU64,
    bytes: &AtomicU64,
) -> Result<(NbdClient, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let size = model.len() as u64;
    let blocks = size / BLOCK;
    let big_blocks = size >> 20;
    let started = Instant::now();
    let mut done = 0u64;
    let mut sent_bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::Acquire) {
        done += 1;
        let (off, len) =
            if opts.big_every > 0 && done.is_multiple_of(opts.big_every) && big_blocks > 0 {
                (rng.random_range(0..big_blocks) << 20, 1u64 << 20)
            } else {
                (rng.random_range(0..blocks) * BLOCK, BLOCK)
            };
        let range = off as usize..(off + len) as usize;
        if opts.zero_every > 0 && done.is_multiple_of(opts.zero_every) {
            c.write_zeroes(off, len as u32, false)
                .with_context(|| format!("write_zeroes #{done} of {len} bytes at {off}"))?;
            model[range].fill(0);
        } else {
            let data = &mut buf[..len as usize];
            rng.fill(&mut data[..]);
            let fua = opts.fua_every > 0 && done.is_multiple_of(opts.fua_every);
            c.write(off, data, fua)
                .with_context(|| format!("write #{done} of {len} bytes at {off} (FUA {fua})"))?;
            model[range].copy_from_slice(data);
        }
        sent_bytes += len;
        writes.store(done, Ordering::Relaxed);
        bytes.store(sent_bytes, Ordering::Relaxed);
        if opts.flush_every > 0 && done.is_multiple_of(opts.flush_every) {
            c.flush()
                .with_context(|| format!("flush after write #{done}"))?;
        }
        if opts.bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(sent_bytes as f64 / opts.bytes_per_sec as f64);
            let ahead = due.saturating_sub(started.elapsed());
            // Sleep in slices so that stop is noticed promptly.
            let until = Instant::now() + ahead;
            while Instant::now() < until && !stop.load(Ordering::Acquire) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
            }
        }
    }
    c.flush().context("the final flush")?;
    Ok((c, model))
}

/// Reads `len` bytes from `offset` in 1 MiB requests.
pub fn read_all(c: &mut NbdClient, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(1 << 20) as u32;
        out.extend_from_slice(
            &c.read(at, n)
                .with_context(|| format!("NBD read of {n} bytes at {at}"))?,
        );
        at += n as u64;
    }
    Ok(out)
}

// ---- the numbered writer of the prefix test --------------------------------

/// Write `i` writes block `i mod k` (of a region starting at 0) with
/// [`numbered_block`]`(i)`: one 4 KiB NBD write, one log record.
pub struct NumberedWriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<(NbdClient, u64)>>>,
}

impl NumberedWriter {
    /// Starts writing numbers 0, 1, 2, … with `k` blocks, `pause` between
    /// writes (zero: as fast as replies come).
    pub fn start(mut c: NbdClient, k: u64, pause: Duration) -> NumberedWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
            std::thread::Builder::new()
                .name("numbered-writer".into())
                .spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let block = numbered_block(i);
                        c.write((i % k) * BLOCK, &block, false)
                            .with_context(|| format!("numbered write {i}"))?;
                        i += 1;
                        writes.store(i, Ordering::Release);
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                    c.flush().context("the final flush")?;
                    Ok((c, i))
                })
                .expect("spawning the writer")
        };
        NumberedWriter {
            stop,
            writes,
            handle: Some(handle),
        }
    }

    /// Writes completed so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Stops; returns the client and the number of completed writes.
    /// Fails if the writer does not stop within [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> Result<(NbdClient, u64)> {
        self.stop.store(true, Ordering::Release);
        join_within(
            self.handle.take().expect("stopped once"),
            "the numbered writer",
        )
    }
}

impl Drop for NumberedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = join_within(h, "the numbered writer");
        }
    }
}

pub const NUMBERED_MAGIC: &[u8; 8] = b"MARSNUM1";

/// The content of numbered write `i`: magic, `i` (little endian), then
/// words derived from `i`, so a torn or mixed block is recognised.
pub fn numbered_block(i: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK as usize);
    b.extend_from_slice(NUMBERED_MAGIC);
    b.extend_from_slice(&i.to_le_bytes());
    let mut x = i ^ 0x9e37_79b9_7f4a_7c15;
    while b.len() < BLOCK as usize {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        b.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    b
}
