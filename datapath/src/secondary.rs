//! A secondary replica at work: the fetcher copies the primary's logfiles,
//! a full sync (when joining) copies its device, and the applier replays
//! fetched records into the backing device, in order, never beyond what is
//! durable in the local log copy. Between records the device is the
//! primary's device at some earlier log position.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::applicator::{Applicator, Persister, Position};
use crate::cluster::Cluster;
use crate::exec::Worker;
use crate::log::format::{self, RECORD_HEADER_LEN};
use crate::log::reader::FIRST_RECORD;
use crate::replication::{fetcher, fullsync};
use crate::resource::{DiskState, Resource};

/// The tasks of one secondary resource.
pub struct Runtime {
    stop: Arc<AtomicBool>,
    applier: Option<Worker>,
    fetcher: Option<tokio::task::JoinHandle<()>>,
    fullsync: Option<tokio::task::JoinHandle<()>>,
}

impl Runtime {
    /// Starts fetching (unless paused) and applying, and a full sync if one
    /// is pending. Needs a tokio runtime.
    pub fn start(res: Arc<Resource>, cluster: Arc<Cluster>) -> Runtime {
        let stop = Arc::new(AtomicBool::new(false));
        let meta = res.meta();
        let fullsync = meta
            .sync
            .is_some_and(|s| s.target.is_none())
            .then(|| tokio::spawn(fullsync::run(Arc::clone(&res), Arc::clone(&cluster))));
        let applier = crate::exec::spawn_worker(
            format!("apply-{}", res.name()),
            apply_loop(Arc::clone(&res), Arc::clone(&stop), Arc::clone(&cluster)),
        );
        let mut rt = Runtime {
            stop,
            applier: Some(applier),
            fetcher: None,
            fullsync,
        };
        rt.resume_fetch(res, cluster);
        rt
    }

    /// Starts the fetcher unless it runs, or fetching is paused or the
    /// resource is disconnected.
    pub fn resume_fetch(&mut self, res: Arc<Resource>, cluster: Arc<Cluster>) {
        let meta = res.meta();
        if self.fetcher.is_none() && !meta.fetch_paused && !meta.disconnected {
            self.fetcher = Some(tokio::spawn(fetcher::run(res, cluster)));
        }
    }

    /// Takes the fetcher out; the caller aborts and awaits it, after which
    /// no further byte is fetched.
    pub fn take_fetcher(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.fetcher.take()
    }

    /// Like [`Runtime::stop`], and waits (up to 5 s) until the aborted
    /// fetcher and full sync have ended: an abort takes effect at the
    /// task's next await, and one inside `block_in_place` when marsd's tokio
    /// runtime goes down goes on to a timer and panics. For the daemon's
    /// shutdown; call from a blocking thread (`spawn_blocking`), never from
    /// a task.
    pub fn stop_and_wait(mut self) {
        let tasks: Vec<_> = self
            .fetcher
            .take()
            .into_iter()
            .chain(self.fullsync.take())
            .collect();
        for t in &tasks {
            t.abort();
        }
        if crate::exec::simulated() {
            // (Aborted tasks end at their next poll.)
            crate::exec::park_until(move || tasks.iter().all(|t| t.is_finished()));
        } else if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.block_on(async {
                for t in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                }
            });
        }
        self.stop();
    }

    /// Stops everything; returns once no more byte is fetched or applied. Blocking.
    pub fn stop(mut self) {
        for t in self.fetcher.iter().chain(self.fullsync.iter()) {
            t.abort();
        }
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.applier.take() {
            a.join();
        }
    }
}

/// The applier hands its position to the persister at most this often
/// while it applies (each persist syncs the device and the position file).
const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// Records per call of the applicator between checks of pause and stop.
const APPLY_RECORDS: usize = 256;

/// The newest applied position waiting to be persisted (latest wins).
#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    /// Wakes the persister (the only waiter; kept as a permit).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct HandoffState {
    pending: Option<Position>,
    stop: bool,
}

impl Handoff {
    fn offer(&self, pos: Position) {
        self.state.lock().expect("handoff lock").pending = Some(pos);
        self.wake.notify_one();
    }

    /// The next position to persist; `None` once stopped and drained.
    async fn take(&self) -> Option<Position> {
        loop {
            {
                let mut st = self.state.lock().expect("handoff lock");
                if st.pending.is_some() || st.stop {
                    return st.pending.take();
                }
            }
            self.wake.notified().await;
        }
    }

    fn stop(&self) {
        self.state.lock().expect("handoff lock").stop = true;
        self.wake.notify_one();
    }
}

/// Persists what the applier has written (device sync, then the position
/// file), beside it, so that applying goes on during a sync. Only then
/// does `written_back` (the replica's `applied`) move and logfiles go.
async fn persist_loop(
    res: Arc<Resource>,
    persister: Persister,
    handoff: Arc<Handoff>,
    cluster: Arc<Cluster>,
) {
    let name = res.name().to_string();
    while let Some(pos) = handoff.take().await {
        let t = Instant::now();
        match persister.persist(pos) {
            Ok(()) => {
                tracing::debug!(resource = %name, pos = pos.pos, ms = t.elapsed().as_millis() as u64, "applied position persisted");
                res.counters()
                    .written_back
                    .fetch_max(pos.pos, Ordering::AcqRel);
                cluster.progress.notify_one();
                // Not beyond what the other replicas still need (the
                // reconcile loop sets the floor).
                let floor = res.counters().delete_floor.load(Ordering::Acquire);
                match res.store().delete_before(pos.pos.min(floor)) {
                    Ok(freed) => res.quota().release(freed),
                    Err(e) => {
                        tracing::warn!(resource = %name, error = %e, "deleting applied logfiles failed")
                    }
                }
            }
            Err(e) => {
                tracing::error!(resource = %name, pos = pos.pos, error = %e, "persisting the applied position failed; retrying");
                *res.repl_error.lock().expect("error lock") = Some(format!("apply: {e}"));
                sleep(Duration::from_secs(1)).await;
                // Retry unless a newer position arrived meanwhile, or the
                // applier stopped: a failed device sync fails every persist
                // until the applier starts over, and a retry after the stop
                // would keep its join (and a shutdown) waiting for ever. The
                // log keeps what was not persisted; the next run replays it.
                let mut st = handoff.state.lock().expect("handoff lock");
                if st.pending.is_none() && !st.stop {
                    st.pending = Some(pos);
                }
            }
        }
    }
}

/// Applies the local log to the device until `stop`. A failed sync of the
/// device stops one run (no position is persisted after it); the next run
/// applies again from the persisted position, which writes every record
/// the failed sync may have lost again, instead of waiting for a restart
/// of marsd (a handover to this node waited for ever, sim_cluster seed
/// 17947113308001176731).
async fn apply_loop(res: Arc<Resource>, stop: Arc<AtomicBool>, cluster: Arc<Cluster>) {
    while apply_run(&res, &stop, &cluster).await == RunEnd::DeviceSyncFailed {
        tracing::warn!(resource = %res.name(), "a sync of the device failed: applying again from the persisted position");
        sleep(Duration::from_secs(1)).await;
        if stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Why [`apply_run`] returned.
#[derive(Debug, PartialEq, Eq)]
enum RunEnd {
    Stopped,
    DeviceSyncFailed,
}

async fn apply_run(res: &Arc<Resource>, stop: &AtomicBool, cluster: &Arc<Cluster>) -> RunEnd {
    let res = Arc::clone(res);
    let name = res.name().to_string();
    let start = Position::load(&**res.storage(), &res.position_path())
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut app = Applicator::new(
        Arc::clone(res.store()),
        Arc::clone(res.storage()),
        Arc::clone(res.backing()),
        res.meta().backing,
        res.position_path(),
        start,
    );
    res.counters()
        .written_back
        .store(start.pos, Ordering::Release);
    let handoff = Arc::new(Handoff::default());
    let persister = {
        let (res, p, h) = (Arc::clone(&res), app.persister(), Arc::clone(&handoff));
        let cluster = Arc::clone(cluster);
        crate::exec::spawn_worker(
            format!("persist-{}", res.name()),
            persist_loop(res, p, h, cluster),
        )
    };
    let mut handed = start.pos;
    let mut last_handoff = Instant::now();
    // The applier never passes the persisted durable floor of the local
    // copy: a recovery that cuts a torn tail of the copy (the primary's
    // sync claims say nothing about it) never cuts under applied data.
    let persisted_floor =
        crate::log::LogStore::durable_floor(&**res.storage(), res.store().dir(), start.pos);
    let mut floor = *persisted_floor.as_ref().unwrap_or(&start.pos);
    // What an earlier run applied past the persisted position is unknown,
    // but it never passed the floor (nor the log's end, if the floor is
    // unreadable).
    let earlier_bound = persisted_floor.unwrap_or_else(|_| res.log_end().max(start.pos));
    res.counters()
        .device_end
        .fetch_max(earlier_bound, Ordering::AcqRel);
    let sync_failed = app.persister();
    while !stop.load(Ordering::Acquire) && !sync_failed.has_failed() {
        let applied = app.applied();
        if applied.pos > handed && last_handoff.elapsed() >= PERSIST_INTERVAL {
            handoff.offer(applied);
            handed = applied.pos;
            last_handoff = Instant::now();
        }
        let meta = res.meta();
        // A full sync is done once the persisted position has passed the
        // position at the end of the copy (it may already be there).
        let durable = res.counters().written_back.load(Ordering::Acquire);
        // ... and only in the history the copy was of (else the reconcile
        // loop starts the sync over).
        if let Some(s) = meta.sync
            && s.target.is_some_and(|t| durable >= t)
            && cluster
                .primary_of(&name)
                .is_some_and(|p| p.generation == meta.generation)
        {
            match res.update_meta(|m| {
                m.disk_state = DiskState::UpToDate;
                m.sync = None;
            }) {
                Ok(()) => {
                    tracing::info!(resource = %name, pos = durable, "full sync complete: UpToDate")
                }
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "recording UpToDate failed")
                }
            }
            continue;
        }
        let copying = meta.sync.is_some_and(|s| s.target.is_none());
        let flushed = res.counters().flushed.load(Ordering::Acquire);
        if !copying && floor < flushed && applied.pos >= floor {
            match res.store().persist_durable(flushed) {
                Ok(()) => floor = flushed,
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "persisting the durable floor of the local log failed; retrying");
                    sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let limit = flushed.min(floor);
        if copying || meta.replay_paused || limit <= applied.pos || res.store().files().is_empty() {
            sleep(Duration::from_millis(10)).await;
            continue;
        }
        let nap = {
            let _applying = res.apply_lock.lock().expect("apply lock");
            if res.meta().replay_paused {
                continue;
            }
            let t = Instant::now();
            let applied = app.apply_records(limit, APPLY_RECORDS);
            // Even a failed batch may have written some of its records.
            res.counters()
                .device_end
                .fetch_max(app.applied().pos, Ordering::AcqRel);
            match applied {
                Ok(0) => Some(Duration::from_millis(10)),
                Ok(n) => {
                    tracing::debug!(resource = %name, records = n, pos = app.applied().pos, limit, us = t.elapsed().as_micros() as u64, "applied");
                    res.repl_error.lock().expect("error lock").take();
                    None
                }
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "applying the log failed; retrying");
                    *res.repl_error.lock().expect("error lock") = Some(format!("apply: {e}"));
                    Some(Duration::from_secs(1))
                }
            }
        };
        if let Some(nap) = nap {
            sleep(nap).await;
        } else if crate::exec::simulated() {
            // A task must yield between batches (a thread need not).
            tokio::task::yield_now().await;
        }
    }
    // Whatever was applied gets persisted before the runtime counts as
    // stopped: nobody else may write the position file meanwhile.
    if app.applied().pos > handed {
        handoff.offer(app.applied());
    }
    handoff.stop();
    persister.wait().await;
    if sync_failed.has_failed() {
        RunEnd::DeviceSyncFailed
    } else {
        RunEnd::Stopped
    }
}

/// When the primary logged the record at `pos` of the local log (unix
/// seconds, from the record's timestamp), if the local log holds it. A
/// replica that has applied up to `pos` is the primary's device as it was
/// just before that moment: its lag in seconds is the time since.
pub(crate) fn logged_at(res: &Resource, pos: u64) -> Option<f64> {
    let files = res.store().files();
    let f = files
        .iter()
        .find(|f| f.header.start_pos <= pos && pos < f.end_pos)?;
    let file = res
        .storage()
        .open(&f.path, crate::storage::OpenMode::Read)
        .ok()?;
    let mut buf = [0u8; RECORD_HEADER_LEN];
    let at = pos - f.header.start_pos + FIRST_RECORD;
    if file.read_at(&mut buf, at).ok()? < buf.len() {
        return None;
    }
    let h = format::decode_record_header(&buf).ok()?;
    Some(h.timestamp_ns as f64 / 1e9)
}

/// How many seconds a replica that has applied up to `applied` is behind
/// (called only when it is behind): the time since this node's log got
/// the first record it has not applied, if this node's log holds that
/// record (a primary; a secondary about itself); else the time since the
/// replica last reported itself current (`as_of`, unix seconds).
pub(crate) fn lag_seconds(res: &Resource, applied: u64, as_of: f64, now: f64) -> f64 {
    let since = logged_at(res, applied).unwrap_or(as_of);
    (now - since).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::LogQuota;
    use crate::resource::{JoinPoint, Settings};
    use crate::storage::sim::{Faults, SimStorage};
    use std::path::Path;

    /// A secondary resource "r" (1 MiB) of node "b" on a simulated disk.
    fn secondary_on_sim_disk() -> (SimStorage, Arc<Resource>, Arc<Cluster>) {
        let disk = SimStorage::new(7);
        for d in ["/state", "/disk"] {
            disk.mkdir_durable(Path::new(d));
        }
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(disk.clone());
        let settings = Settings {
            node: "b".into(),
            logfile_size: 1 << 20,
            overlay_limit: 1 << 20,
            writeback_nice: 0,
        };
        let join = JoinPoint {
            start_pos: 0,
            next_seq: 1,
            generation: 1,
        };
        let res = Resource::create(
            Arc::clone(&storage),
            Path::new("/state"),
            settings,
            Arc::new(LogQuota::new(1 << 30)),
            "r",
            Path::new("/disk/r.img"),
            1 << 20,
            Some(join),
        )
        .unwrap();
        let cluster =
            Arc::new(Cluster::open(Arc::clone(&storage), Path::new("/state"), "b", "b:1").unwrap());
        (disk, res, cluster)
    }

    /// Runs `f` on a current-thread runtime with paused time (sleeps pass
    /// at once) on a thread of its own; fails if it takes 10 s of wall time.
    fn on_paused_runtime(f: impl std::future::Future<Output = ()> + Send + 'static) {
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
                .block_on(f);
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_secs(10)).is_ok(),
            "did not end within 10 s"
        );
    }

    /// A failed sync of the device loses what it covered for good (Linux
    /// marks those pages clean). The applier starts over from the
    /// persisted position and writes it all again, without a restart:
    /// after a power loss the device holds every record.
    #[test]
    fn a_failed_device_sync_is_made_good_by_applying_again() {
        use crate::log::format::{FileHeader, RecordHeader, RecordKind, encode_record};
        let (disk, res, cluster) = secondary_on_sim_disk();
        res.update_meta(|m| m.sync = None).unwrap();
        let header = FileHeader {
            file_seq: 1,
            start_pos: 0,
            first_seq: 1,
            generation: 1,
        };
        let mut app = res.store().create_file("a", header).unwrap();
        let mut buf = Vec::new();
        for seq in 1..=8u64 {
            let h = RecordHeader {
                kind: RecordKind::Write,
                unsynced: 0,
                seq,
                generation: 1,
                offset: seq * 4096,
                length: 1024,
                timestamp_ns: seq,
                payload_len: 1024,
            };
            encode_record(&h, &vec![seq as u8; 1024], &mut buf);
        }
        app.append(&buf, 8).unwrap();
        app.sync().unwrap();
        let end = app.end_pos();
        res.store().note_append(0, end, 9);
        res.store().persist_durable(end).unwrap();
        res.counters().appended.store(end, Ordering::Release);
        res.counters().set_flushed(end);
        // Every sync fails until the first one of the device has.
        disk.set_faults(Faults {
            sync_eio: 1.0,
            ..Faults::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (d2, r2) = (disk.clone(), Arc::clone(&res));
        on_paused_runtime(async move {
            let applier = tokio::spawn(apply_loop(Arc::clone(&r2), Arc::clone(&stop), cluster));
            while d2.injected().sync_eio == 0 {
                sleep(Duration::from_millis(10)).await;
            }
            d2.set_faults(Faults::default());
            let t = Instant::now();
            while r2.counters().written_back.load(Ordering::Acquire) < end {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "the applier never persisted its position after the failed sync"
                );
                sleep(Duration::from_millis(10)).await;
            }
            stop.store(true, Ordering::Release);
            applier.await.unwrap();
        });
        let after = disk.crash(crate::storage::sim::CrashMode::DropUnsynced);
        let image = after.contents(Path::new("/disk/r.img")).unwrap();
        for seq in 1..=8usize {
            assert!(
                image[seq * 4096..seq * 4096 + 1024]
                    .iter()
                    .all(|&b| b == seq as u8),
                "record {seq} is not on the device after the power loss"
            );
        }
    }

    /// Found by `tests/sim_cluster.rs` (seed 23): once a sync of the device
    /// failed, every persist fails until a restart, and the persister put
    /// the position back for a retry even after the applier had stopped
    /// it, so the applier's join, and with it marsd's shutdown (the restart
    /// the error asks for), hung for ever.
    #[test]
    fn a_stopped_persister_ends_even_if_the_device_cannot_sync() {
        let (disk, res, cluster) = secondary_on_sim_disk();
        let storage: Arc<dyn crate::storage::Storage> = Arc::new(disk.clone());
        let app = Applicator::new(
            Arc::clone(res.store()),
            Arc::clone(&storage),
            Arc::clone(res.backing()),
            res.meta().backing,
            res.position_path(),
            Position::default(),
        );
        disk.set_faults(Faults {
            sync_eio: 1.0,
            ..Faults::default()
        });
        let handoff = Arc::new(Handoff::default());
        handoff.offer(Position {
            pos: 4096,
            next_seq: 2,
        });
        handoff.stop();
        let (p, h) = (app.persister(), Arc::clone(&handoff));
        // Fails unless the persister ends after the stop while the device
        // fails to sync.
        on_paused_runtime(persist_loop(res, p, h, cluster));
    }
}
