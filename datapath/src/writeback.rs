//! Writeback: applies logged records to the backing device in log order,
//! never beyond the log position that is durable *with evidence recovery
//! can see* (a later durable record's `unsynced` claim, a newer logfile or
//! the durable floor file; see `Shared::vouched`), so the device is always
//! a prefix of what the log keeps after a power loss, also when recovery
//! must cut damage it cannot tell from a torn write. Then it syncs the
//! device, persists the written-back position and deletes logfiles that
//! are no longer needed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::applicator::{KnownSize, Position, apply_record};
use crate::logger::{Pending, Shared};

/// Persist the position at least this often while writing back.
const PERSIST_INTERVAL: Duration = Duration::from_millis(500);
/// ... or after this many bytes.
const PERSIST_BYTES: u64 = 64 << 20;
/// One batch between checks of the queue and of a shutdown deadline.
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: u64 = 16 << 20;
/// How long logged records may wait before writeback asks for a log sync.
const SYNC_DELAY: Duration = Duration::from_millis(20);

pub(crate) async fn run(shared: Arc<Shared>) {
    let resource = shared.cfg.resource.clone();
    let mut written = Position {
        pos: shared.counters.written_back.load(Ordering::Acquire),
        next_seq: 0,
    };
    let mut persisted = written.pos;
    let mut last_persist = Instant::now();
    // Since when writeback has been waiting for the log to become durable.
    let mut waiting_since: Option<Instant> = None;
    let mut size = KnownSize::default();
    loop {
        let batch = loop {
            let next = next_step(
                &shared,
                &mut waiting_since,
                written.pos > persisted && last_persist.elapsed() >= PERSIST_INTERVAL,
            );
            match next {
                Next::Batch(b) => break b,
                Next::Nap(nap) => {
                    // Woken by a notification since the last look (kept as
                    // a permit), or when the nap is over.
                    let _ = tokio::time::timeout(nap, shared.wb_wake.notified()).await;
                }
                Next::Vouch(flushed) => vouch_with_floor(&shared, flushed, &resource).await,
                Next::Stop => {
                    persist(&shared, &mut written, &mut persisted, &resource);
                    if !shared.wb.lock().expect("wb lock").queue.is_empty() {
                        tracing::warn!(%resource, pos = written.pos, "shutdown deadline reached: the rest stays in the log for the next start");
                    }
                    return;
                }
            }
        };
        // Write the batch back, then drop what was written from the overlay
        // under one lock (reads meanwhile get the same bytes from it).
        let mut applied = 0;
        while applied < batch.len()
            && apply_with_retry(&shared, &batch[applied], &resource, &mut size).await
        {
            applied += 1;
        }
        if let Some(last) = batch[..applied].last() {
            let mut overlay = shared.overlay.lock().expect("overlay lock");
            let mut bytes = 0;
            for p in &batch[..applied] {
                let h = &p.record.header;
                overlay.remove(h.offset, h.length, p.pos);
                bytes += h.payload_len as u64;
            }
            drop(overlay);
            shared
                .counters
                .overlay_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            written = Position {
                pos: last.end(),
                next_seq: last.record.header.seq + 1,
            };
        }
        if applied < batch.len() {
            // Shutting down with a failing device: the rest stays in the log.
            persist(&shared, &mut written, &mut persisted, &resource);
            return;
        }
        drop(batch);
        // Not after every batch: each persist syncs the device and renames a
        // file, which at low queue depth would double the cost of a write.
        if written.pos > persisted
            && (written.pos - persisted >= PERSIST_BYTES
                || last_persist.elapsed() >= PERSIST_INTERVAL)
        {
            persist(&shared, &mut written, &mut persisted, &resource);
            last_persist = Instant::now();
        }
    }
}

/// What writeback does next.
enum Next {
    /// Write back these records (none: only persist the position).
    Batch(Vec<Pending>),
    /// Wait for a notification, at most this long.
    Nap(Duration),
    /// Vouch for the durable position with the floor file.
    Vouch(u64),
    /// Stopping: persist and end.
    Stop,
}

/// Looks at the queue once (under its lock; the caller waits outside it).
fn next_step(shared: &Shared, waiting_since: &mut Option<Instant>, persist_due: bool) -> Next {
    let overlay_pressure = shared.cfg.overlay_limit / 4;
    let mut wb = shared.wb.lock().expect("wb lock");
    let vouched = shared.vouched();
    let ready = wb.queue.front().is_some_and(|p| p.end() <= vouched);
    if !ready {
        if let Some(deadline) = wb.stop {
            let logger_done = shared.log_done.load(Ordering::Acquire);
            if (wb.queue.is_empty() && logger_done) || Instant::now() >= deadline {
                return Next::Stop;
            }
        }
        if !wb.queue.is_empty() {
            // Let writes accumulate a little so that one log sync covers
            // many (FLUSH/FUA sync anyway); hurry when the overlay fills up.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let stopping = wb.stop.is_some();
            if stopping
                || since.elapsed() >= SYNC_DELAY
                || shared.counters.overlay_bytes.load(Ordering::Relaxed) >= overlay_pressure
            {
                let flushed = shared.flushed();
                let front_durable = wb.queue.front().is_some_and(|p| p.end() <= flushed);
                if shared.appended() > flushed && !stopping {
                    // The next sync makes the front durable, or makes
                    // durable a record that vouches for it.
                    shared.want_sync();
                } else if front_durable {
                    // Nothing newer will vouch for it (the log went quiet,
                    // or is closing): the floor file does.
                    return Next::Vouch(flushed);
                }
            }
        } else if persist_due {
            return Next::Batch(Vec::new());
        }
        return Next::Nap(if wb.queue.is_empty() {
            Duration::from_millis(100)
        } else {
            SYNC_DELAY
        });
    }
    *waiting_since = None;
    let mut batch: Vec<Pending> = Vec::new();
    let mut bytes = 0;
    while batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
        match wb.queue.front() {
            Some(p) if p.end() <= vouched => {
                bytes += p.record.header.encoded_len();
                batch.push(wb.queue.pop_front().expect("front exists"))
            }
            _ => break,
        }
    }
    Next::Batch(batch)
}

/// Persists that the log is durable up to `flushed` (the durable floor
/// file), so that writeback may pass what records vouch for.
async fn vouch_with_floor(shared: &Shared, flushed: u64, resource: &str) {
    match shared.store.persist_durable(flushed) {
        Ok(()) => shared.vouch(flushed),
        Err(e) => {
            tracing::error!(%resource, error = %e, "persisting the durable floor of the log failed; writeback waits");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Writing back must not skip a record: on error, retry (the overlay keeps
/// serving reads meanwhile) and report the error in `view`.
async fn apply_with_retry(
    shared: &Shared,
    p: &Pending,
    resource: &str,
    size: &mut KnownSize,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match apply_record(
            &*shared.backing,
            &shared.cfg.backing_path,
            p.pos,
            &p.record,
            size,
        ) {
            Ok(()) => {
                if !shared.device_failed.load(Ordering::Acquire) {
                    shared.wb_error.lock().expect("wb error lock").take();
                }
                return true;
            }
            Err(e) => {
                tracing::error!(%resource, pos = p.pos, error = %e, "writeback failed; retrying");
                *shared.wb_error.lock().expect("wb error lock") = Some(e.to_string());
                let deadline = shared.wb.lock().expect("wb lock").stop;
                if deadline.is_some_and(|d| Instant::now() + delay >= d) {
                    // Leave it in the log: the next start replays it.
                    return false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Syncs the device, persists the written-back position, deletes logfiles
/// that are entirely written back and returns their space to the quota.
fn persist(shared: &Shared, written: &mut Position, persisted: &mut u64, resource: &str) {
    if written.pos <= *persisted || shared.device_failed.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = shared.backing.sync_data() {
        // Linux marks the pages of a failed writeback clean: a later sync
        // that succeeds would not cover what this one lost. So the position
        // stays here and the log keeps every record after it; a restart
        // writes them back again (the log is the truth).
        shared.device_failed.store(true, Ordering::Release);
        let msg = format!(
            "syncing the backing device failed ({e}); the written-back position stays at {} until marsd restarts (the log keeps every record after it)",
            *persisted
        );
        tracing::error!(%resource, "{msg}");
        *shared.wb_error.lock().expect("wb error lock") = Some(msg);
        return;
    }
    if let Err(e) = written.store(&*shared.storage, &shared.cfg.position_path) {
        tracing::error!(%resource, error = %e, "persisting the written-back position failed");
        return;
    }
    *persisted = written.pos;
    shared
        .counters
        .written_back
        .store(written.pos, Ordering::Release);
    match shared
        .store
        .delete_before(shared.counters.deletable_before())
    {
        Ok(freed) => shared.quota.release(freed),
        Err(e) => tracing::warn!(%resource, error = %e, "deleting written-back logfiles failed"),
    }
}
