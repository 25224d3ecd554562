//! The campaign's workload: a set of NBD writers on the primary, each on
//! its own connection and thread, writing verifiable blocks (see
//! [`super::history`]) to the blocks it owns (`block % writers == i`), with
//! FUA and FLUSH at random and reads that must return what the writer last
//! wrote there. Every request is recorded in the shared [`History`].
//!
//! A writer ends at its first error (a killed marsd, a handover): the
//! failed request stays "in flight" in the history (its outcome is
//! unknown). The runner starts a new set on the current primary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{BLOCK, History, Shown, block_content, decode};
use crate::host::Host;
use crate::nbd_client::NbdClient;

#[derive(Clone, Debug)]
pub struct WriterOpts {
    pub writers: u64,
    /// One request in `flush_one_in` is a FLUSH.
    pub flush_one_in: u32,
    /// One write in `fua_one_in` has FUA.
    pub fua_one_in: u32,
    /// One request in `read_one_in` is a verifying read.
    pub read_one_in: u32,
    /// Half of a writer's writes go to its first `hot` blocks.
    pub hot: u64,
    /// At most this many requests per second per writer.
    pub rate: u32,
}

impl Default for WriterOpts {
    fn default() -> Self {
        WriterOpts {
            writers: 3,
            flush_one_in: 15,
            fua_one_in: 10,
            read_one_in: 6,
            hot: 8,
            rate: 150,
        }
    }
}

/// A running set of writers on one host.
pub struct Writers {
    pub host: String,
    pub epoch: u32,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Option<String>>>,
}

/// A request without reply for this long is a finding.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

impl Writers {
    /// Connects `opts.writers` clients to `resource` on `host` and starts
    /// them in the history's current epoch.
    pub fn start(
        host: &Host,
        resource: &str,
        history: &Arc<Mutex<History>>,
        opts: &WriterOpts,
        seed: u64,
    ) -> Result<Writers> {
        let epoch = history.lock().expect("history lock").epoch();
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for i in 0..opts.writers {
            let client = host.nbd(resource)?;
            // What its blocks may show, fixed now: a later fork of the
            // history must not change what this writer's lineage holds.
            let expect = {
                let h = history.lock().expect("history lock");
                (i..h.blocks())
                    .step_by(opts.writers as usize)
                    .map(|b| (b, h.acceptable(b)))
                    .collect()
            };
            let w = Writer {
                index: i,
                count: opts.writers,
                host: host.name().to_string(),
                epoch,
                history: Arc::clone(history),
                opts: opts.clone(),
                rng: StdRng::seed_from_u64(seed.wrapping_add(i)),
                expect,
            };
            let (stop, ops) = (Arc::clone(&stop), Arc::clone(&ops));
            handles.push(
                std::thread::Builder::new()
                    .name(format!("chaos-writer-{i}"))
                    .spawn(move || w.run(client, &stop, &ops))
                    .expect("spawning a writer"),
            );
        }
        Ok(Writers {
            host: host.name().to_string(),
            epoch,
            stop,
            ops,
            handles,
        })
    }

    /// Requests completed by this set.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// How many writers have ended (by an error).
    pub fn ended(&self) -> usize {
        self.handles.iter().filter(|h| h.is_finished()).count()
    }

    /// Stops every writer after its request in flight; returns why each
    /// ended early (errors), or fails if one gets no reply within
    /// [`STOP_LIMIT`].
    pub fn stop(mut self) -> Result<Vec<String>> {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_LIMIT;
        let mut errors = Vec::new();
        for h in std::mem::take(&mut self.handles) {
            while !h.is_finished() {
                if Instant::now() >= deadline {
                    return Err(anyhow!(
                        "a writer on {} got no reply within {STOP_LIMIT:?} (an NBD request hangs)",
                        self.host
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(e) = h.join().map_err(|_| anyhow!("a writer panicked"))? {
                errors.push(e);
            }
        }
        Ok(errors)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Writer {
    index: u64,
    count: u64,
    host: String,
    epoch: u32,
    history: Arc<Mutex<History>>,
    opts: WriterOpts,
    rng: StdRng,
    /// What each of its blocks may show (see [`History::acceptable`], as
    /// of the writer's start), kept up to date by its own writes.
    expect: std::collections::HashMap<u64, Vec<Shown>>,
}

impl Writer {
    fn run(mut self, mut c: NbdClient, stop: &AtomicBool, ops: &AtomicU64) -> Option<String> {
        let blocks = self.history.lock().expect("history lock").blocks();
        let mine = (blocks - self.index).div_ceil(self.count);
        let pace = Duration::from_secs_f64(1.0 / f64::from(self.opts.rate.max(1)));
        while !stop.load(Ordering::Acquire) {
            let started = Instant::now();
            let k = if self.rng.random_bool(0.5) {
                self.rng.random_range(0..self.opts.hot.min(mine))
            } else {
                self.rng.random_range(0..mine)
            };
            let block = self.index + k * self.count;
            let res = if self.rng.random_ratio(1, self.opts.flush_one_in) {
                self.flush(&mut c)
            } else if self.rng.random_ratio(1, self.opts.read_one_in) {
                self.read(&mut c, block)
            } else {
                let fua = self.rng.random_ratio(1, self.opts.fua_one_in);
                self.write(&mut c, block, fua)
            };
            if let Err(e) = res {
                return Some(format!("writer {} on {}: {e}", self.index, self.host));
            }
            ops.fetch_add(1, Ordering::Relaxed);
            if let Some(left) = pace.checked_sub(started.elapsed()) {
                std::thread::sleep(left);
            }
        }
        let _ = c.disconnect();
        None
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().expect("history lock")
    }

    fn expected(&mut self, block: u64) -> &mut Vec<Shown> {
        self.expect
            .get_mut(&block)
            .expect("a writer only touches its own blocks")
    }

    fn write(&mut self, c: &mut NbdClient, block: u64, fua: bool) -> std::io::Result<()> {
        let id = self
            .history()
            .send_write(block, fua, self.epoch, &self.host);
        let data = block_content(id, block);
        // Until it completes, the block may show the old or the new content.
        self.expected(block).push(Shown::Write(id));
        c.write(block * BLOCK as u64, &data, fua)?;
        self.history().complete_write(id);
        *self.expected(block) = vec![Shown::Write(id)];
        Ok(())
    }

    fn flush(&mut self, c: &mut NbdClient) -> std::io::Result<()> {
        let i = self.history().send_flush();
        c.flush()?;
        self.history().complete_flush(i);
        Ok(())
    }

    fn read(&mut self, c: &mut NbdClient, block: u64) -> std::io::Result<()> {
        let data = c.read(block * BLOCK as u64, BLOCK as u32)?;
        let got = decode(&data, block);
        let ok = self.expected(block).clone();
        let mut h = self.history();
        if ok.contains(&got) {
            h.reads_verified += 1;
            drop(h);
            // An earlier write in flight turned out to be there (or not).
            *self.expected(block) = vec![got];
        } else {
            h.violations.push(format!(
                "(read) a read of block {block} on {} at {} UTC returned {}, expected one of {:?}",
                self.host,
                utc_now(),
                got.describe(),
                ok.iter().map(Shown::describe).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

/// HH:MM:SS.mmm (UTC), to match marsd's log lines.
pub fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (s, ms) = (t.as_secs() % 86400, t.subsec_millis());
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60)
}
