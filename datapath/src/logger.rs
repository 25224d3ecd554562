//! The primary's logger: accepts writes, appends them as records to the
//! current logfile, and completes them once write(2) returned (so a crash of
//! `marsd` never loses a completed write). FLUSH and FUA wait for an
//! fdatasync of the log; one sync serves every waiter that arrived before it
//! started (group commit). Completed writes are visible to reads through the
//! overlay until writeback has put them on the backing device.
//!
//! Workers (`exec::spawn_worker`: each on its own thread in marsd, tasks in
//! a simulation): the logger appends; the syncer runs fdatasync so that
//! appends go on during a sync; writeback (see `writeback.rs`). Async
//! callers talk to them through channels and oneshots. A ublk queue thread
//! may append its own batch instead of handing it to the logger thread
//! (see [`hold_sends`]); whoever appends holds the log's [`Tail`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::exec::Worker;
use crate::group_commit::GroupCommit;
use tokio::sync::mpsc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::frontend::{BlockIo, IoError};
use crate::log::format::{
    FILE_HEADER_LEN, FileHeader, MAX_PAYLOAD, RECORD_HEADER_LEN, encode_record_header,
};
use crate::log::{Appender, LogStore, Record, RecordHeader, RecordKind};
use crate::overlay::Overlay;
use crate::quota::LogQuota;
use crate::storage::{File, Storage};
use crate::writeback;

/// Progress counters of one resource, in log positions. Read by `view`
/// (and later by `/metrics`).
#[derive(Debug)]
pub struct Counters {
    /// End of the last record appended to the log.
    pub appended: AtomicU64,
    /// End of the last record known durable (fdatasync'd). Change it with
    /// [`Counters::set_flushed`] / [`Counters::advance_flushed`], which wake
    /// the peers' log shippers waiting in [`Counters::flushed_changed`].
    pub flushed: AtomicU64,
    /// Notified whenever `flushed` changes.
    pub flushed_changed: tokio::sync::Notify,
    /// End of the last record written back and persisted as such.
    pub written_back: AtomicU64,
    /// On a secondary: how far the device may hold records. The applier
    /// runs ahead of `written_back` (persisted now and then, and a failed
    /// persist leaves it behind for good), and after a restart whatever
    /// the last run applied is unknown, up to the log's durable floor
    /// (the applier never passes it). Whether the device holds records of
    /// a deposed history is judged by it, never by `written_back` alone.
    pub device_end: AtomicU64,
    /// Bytes of record payload held in the overlay.
    pub overlay_bytes: AtomicU64,
    /// The most the overlay ever held.
    pub overlay_peak: AtomicU64,
    /// Other replicas still need the log from this position on: logfiles
    /// are deleted only before it (`u64::MAX`: no other replica). It starts
    /// at 0 (delete nothing) until the node has learnt what replicas need.
    pub delete_floor: AtomicU64,
    /// Log and full-sync bytes this node sent to peers (since it started),
    /// and what the frames carrying them took on the wire (compressed).
    pub shipped_bytes: AtomicU64,
    pub shipped_wire_bytes: AtomicU64,
    /// The same for what this node fetched from peers.
    pub received_bytes: AtomicU64,
    pub received_wire_bytes: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            appended: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flushed_changed: tokio::sync::Notify::new(),
            written_back: AtomicU64::new(0),
            device_end: AtomicU64::new(0),
            overlay_bytes: AtomicU64::new(0),
            overlay_peak: AtomicU64::new(0),
            delete_floor: AtomicU64::new(0),
            shipped_bytes: AtomicU64::new(0),
            shipped_wire_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            received_wire_bytes: AtomicU64::new(0),
        }
    }
}

impl Counters {
    /// Sets the durable end of the log (it may move back: truncation).
    pub fn set_flushed(&self, pos: u64) {
        self.flushed.store(pos, Ordering::Release);
        self.flushed_changed.notify_waiters();
    }

    /// Moves the durable end of the log forward to `pos` (if it is further).
    pub fn advance_flushed(&self, pos: u64) {
        if self.flushed.fetch_max(pos, Ordering::AcqRel) < pos {
            self.flushed_changed.notify_waiters();
        }
    }

    /// Where logfile deletion may go up to, given what is written back here.
    pub fn deletable_before(&self) -> u64 {
        self.written_back
            .load(Ordering::Acquire)
            .min(self.delete_floor.load(Ordering::Acquire))
    }
}

/// Settings of one logger.
#[derive(Debug, Clone)]
pub struct LoggerConfig {
    pub resource: String,
    pub node: String,
    pub generation: u64,
    /// Rotate to a new logfile when the current one would exceed this.
    pub logfile_size: u64,
    /// Bytes of not-yet-written-back data held in memory at most.
    pub overlay_limit: u64,
    /// Nice value of the writeback thread (0: as the others); see
    /// `exec::spawn_background_worker`.
    pub writeback_nice: i32,
    /// Backing device and where its written-back position is persisted.
    pub backing_path: PathBuf,
    pub position_path: PathBuf,
}

pub(crate) enum LogReq {
    Write {
        offset: u64,
        len: u64,
        /// `None` for zeroes.
        data: Option<Bytes>,
        fua: bool,
        quota: u64,
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<(), IoError>>,
    },
    Resize {
        size: u64,
        reply: oneshot::Sender<Result<(), IoError>>,
    },
    /// Start a new logfile (from `log-rotate`, or when the quota runs short).
    /// Replies whether a new logfile was started (not if the current one is empty).
    Rotate {
        reply: Option<oneshot::Sender<Result<bool, IoError>>>,
    },
    /// Requests held back on one thread and sent together (see [`hold_sends`]).
    Batch(Vec<LogReq>),
}

/// The end of the log, where appends go: one appender at a time holds it.
struct Tail {
    appender: Appender,
    file_seq: u64,
    /// Record headers of the batch being appended (reused).
    buf: Vec<u8>,
    /// The logger thread has made the log durable and ended: nothing more
    /// may be appended.
    ended: bool,
}

/// Requests for one logger held back on this thread.
pub(crate) struct Held {
    logger: *const Logger,
    tx: mpsc::UnboundedSender<LogReq>,
    shared: Arc<Shared>,
    reqs: Vec<LogReq>,
}

thread_local! {
    static HELD_SENDS: crate::held::Slot<Held> = const { std::cell::RefCell::new(None) };
}

/// Holds back the requests this thread sends to loggers until the returned
/// guard is dropped, then appends each logger's requests right here if its
/// log is free (no other thread appending) and they need no new logfile,
/// or else sends them to its logger thread as one message.
/// For a ublk queue thread, which starts many writes in one go: its writes
/// complete without waking another thread and being woken back (two
/// context switches per batch, a large share of a small write's CPU); at
/// worst the logger thread is woken once for them instead of once per write.
pub(crate) fn hold_sends() -> crate::held::Guard<Held> {
    crate::held::hold(&HELD_SENDS, |held| {
        for h in held {
            let reqs = append_here(&h.shared, h.reqs);
            if reqs.is_empty() {
                continue;
            }
            if let Err(mpsc::error::SendError(LogReq::Batch(reqs))) = h.tx.send(LogReq::Batch(reqs))
            {
                // The logger ended meanwhile: the writers see their reply
                // channel dropped (shutting down); return their quota.
                for r in reqs {
                    if let LogReq::Write { quota, .. } = r {
                        h.shared.quota.release(quota);
                    }
                }
            }
        }
    })
}

/// A logged record waiting for writeback. Dropping it returns its overlay
/// budget.
pub(crate) struct Pending {
    pub pos: u64,
    pub record: Record,
    pub _permit: Option<OwnedSemaphorePermit>,
}

impl Pending {
    pub fn end(&self) -> u64 {
        self.pos + self.record.header.encoded_len()
    }
}

/// Answers one FLUSH or FUA write once the log is durable.
type SyncReply = oneshot::Sender<Result<(), IoError>>;

/// The file being appended to and how far; the syncer reads both together.
struct Active {
    file: Arc<dyn File>,
    appended: u64,
}

pub(crate) struct WbState {
    pub queue: VecDeque<Pending>,
    /// Stop once the queue is empty, or at the deadline.
    pub stop: Option<tokio::time::Instant>,
}

/// State shared by the logger's threads and its async callers.
pub(crate) struct Shared {
    pub cfg: LoggerConfig,
    pub storage: Arc<dyn Storage>,
    pub store: Arc<LogStore>,
    pub backing: Arc<dyn File>,
    pub quota: Arc<LogQuota>,
    pub counters: Arc<Counters>,
    pub overlay: Mutex<Overlay>,
    pub size: AtomicU64,
    budget: Arc<Semaphore>,
    budget_max: u32,
    group: GroupCommit<SyncReply>,
    active: Mutex<Active>,
    pub wb: Mutex<WbState>,
    /// Wakes writeback (its only waiter) after a change of `wb` or of the
    /// durable position.
    pub wb_wake: tokio::sync::Notify,
    /// Set after an fdatasync of the log failed: the page cache may have
    /// dropped completed writes, so nothing more is accepted.
    failed: AtomicBool,
    closed: AtomicBool,
    /// The logger thread has ended: nothing more will be appended.
    pub log_done: AtomicBool,
    /// Last writeback error, for `view`.
    pub wb_error: Mutex<Option<String>>,
    /// A sync of the backing device failed: the written-back position
    /// stays where it is until a restart (see writeback.rs `persist`).
    pub device_failed: AtomicBool,
    /// How far the log is durable *with evidence a recovery can see*: a
    /// durable record whose `unsynced` claim reaches here, a newer logfile
    /// (created only after a sync of the previous one) or the durable floor
    /// file. Writeback never passes it, so that damage recovery takes for a
    /// torn tail (no evidence that a sync covered it) never lies under data
    /// already written back.
    vouched: AtomicU64,
    /// (end of a committed batch, the durable position it claims), oldest
    /// first: once a sync covers the batch, its claim is vouched for.
    claims: Mutex<VecDeque<(u64, u64)>>,
    tail: Mutex<Tail>,
}

impl Shared {
    fn io_err(&self, source: std::io::Error) -> IoError {
        if source.raw_os_error() == Some(crate::frontend::libc_errno::ENOSPC) {
            IoError::NoSpace {
                resource: self.cfg.resource.clone(),
                source,
            }
        } else {
            IoError::Io {
                resource: self.cfg.resource.clone(),
                source,
            }
        }
    }

    /// An fdatasync of the log through `sync`. Once one failed, none counts
    /// any more: Linux marks the pages of a failed writeback clean, so a
    /// later fdatasync that succeeds says nothing about them (they are lost
    /// on disk while reads still return them).
    fn sync_log(&self, sync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "an earlier fdatasync of the log failed; restart marsd to recover",
            ));
        }
        sync().inspect_err(|e| {
            tracing::error!(resource = %self.cfg.resource, error = %e, "fdatasync of the log failed; refusing further writes and flushes");
            self.failed.store(true, Ordering::Release);
        })
    }

    /// Asks the syncer to make the log durable up to what is appended now.
    pub fn want_sync(&self) {
        self.group.want_sync();
    }

    pub fn flushed(&self) -> u64 {
        self.counters.flushed.load(Ordering::Acquire)
    }

    /// See [`Shared::vouched`](field@Shared::vouched).
    pub fn vouched(&self) -> u64 {
        self.vouched.load(Ordering::Acquire)
    }

    pub fn appended(&self) -> u64 {
        self.counters.appended.load(Ordering::Acquire)
    }

    /// The log is durable up to `end`: every committed batch up to there
    /// now vouches for the position it claims.
    fn synced_to(&self, end: u64) {
        self.counters.advance_flushed(end);
        let mut claims = self.claims.lock().expect("claims lock");
        let mut best = None;
        while claims.front().is_some_and(|(e, _)| *e <= end) {
            best = claims.pop_front().map(|(_, c)| c);
        }
        drop(claims);
        if let Some(c) = best {
            self.vouched.fetch_max(c, Ordering::AcqRel);
        }
    }

    /// Vouches for `pos` without a record: the durable floor file (for a
    /// log that went quiet, or a writeback that must drain), or the start
    /// of a newer logfile.
    pub fn vouch(&self, pos: u64) {
        self.vouched.fetch_max(pos, Ordering::AcqRel);
    }
}

/// The logger of one primary resource.
pub struct Logger {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::UnboundedSender<LogReq>>>,
    threads: Mutex<Vec<Worker>>,
}

/// Where the log stands when a logger starts.
pub struct StartPoint {
    /// An appender at the end of the current logfile, or `None` to start a new one.
    pub appender: Option<Appender>,
    pub next_file_seq: u64,
    pub end_pos: u64,
    pub next_seq: u64,
    /// Persisted written-back position (everything before it is on the device).
    pub written_back: u64,
}

impl Logger {
    /// Starts the logger's workers. The device must already hold everything up
    /// to `start.end_pos` (recovery replays the log first).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: LoggerConfig,
        storage: Arc<dyn Storage>,
        store: Arc<LogStore>,
        backing: Arc<dyn File>,
        quota: Arc<LogQuota>,
        counters: Arc<Counters>,
        size: u64,
        start: StartPoint,
    ) -> Result<Arc<Logger>, IoError> {
        let io = |e: crate::log::Error| IoError::Io {
            resource: cfg.resource.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        // A new primary period (or a log without files) starts a new logfile.
        let (appender, file_seq) = match start.appender {
            Some(a) => (a, start.next_file_seq - 1),
            None => {
                let header = FileHeader {
                    file_seq: start.next_file_seq,
                    start_pos: start.end_pos,
                    first_seq: start.next_seq,
                    generation: cfg.generation,
                };
                (
                    store.create_file(&cfg.node, header).map_err(io)?,
                    start.next_file_seq,
                )
            }
        };
        counters
            .appended
            .store(appender.end_pos(), Ordering::Release);
        counters.set_flushed(appender.end_pos());
        counters
            .written_back
            .store(start.written_back, Ordering::Release);
        // A write larger than the whole budget takes all of it (and waits for an empty overlay).
        let budget_max = cfg.overlay_limit.clamp(1 << 20, u32::MAX as u64) as u32;
        let shared = Arc::new(Shared {
            storage,
            store,
            backing,
            quota,
            counters,
            overlay: Mutex::new(Overlay::new()),
            size: AtomicU64::new(size),
            budget: Arc::new(Semaphore::new(budget_max as usize)),
            budget_max,
            group: GroupCommit::new(),
            active: Mutex::new(Active {
                file: Arc::clone(appender.file()),
                appended: appender.end_pos(),
            }),
            wb: Mutex::new(WbState {
                queue: VecDeque::new(),
                stop: None,
            }),
            wb_wake: tokio::sync::Notify::new(),
            failed: AtomicBool::new(false),
            device_failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            log_done: AtomicBool::new(false),
            wb_error: Mutex::new(None),
            // Everything recovery found is written back already.
            vouched: AtomicU64::new(appender.end_pos()),
            claims: Mutex::new(VecDeque::new()),
            tail: Mutex::new(Tail {
                appender,
                file_seq,
                buf: Vec::with_capacity(1 << 20),
                ended: false,
            }),
            cfg,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let name = &shared.cfg.resource;
        use crate::exec::spawn_worker as spawn;
        let threads = vec![
            spawn(format!("log-{name}"), log_loop(Arc::clone(&shared), rx)),
            spawn(format!("sync-{name}"), sync_loop(Arc::clone(&shared))),
            crate::exec::spawn_background_worker(
                format!("wb-{name}"),
                shared.cfg.writeback_nice,
                writeback::run(Arc::clone(&shared)),
            ),
        ];
        Ok(Arc::new(Logger {
            shared,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        }))
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn resource(&self) -> &str {
        &self.shared.cfg.resource
    }

    /// The backing device, for a frontend that reads it itself (ublk).
    pub fn backing_path(&self) -> &std::path::Path {
        &self.shared.cfg.backing_path
    }

    /// For a frontend that reads the backing device itself (ublk): checks
    /// the range like `read` and returns what the overlay holds of it.
    /// Reading the backing device after this call and laying these hits
    /// over it gives what `read` returns: a range not in the overlay now is
    /// already on the device (writeback drops a piece only after writing it).
    pub fn overlay_hits(&self, offset: u64, len: u32) -> Result<Vec<crate::overlay::Hit>, IoError> {
        self.check(offset, len as u64)?;
        Ok(self
            .shared
            .overlay
            .lock()
            .expect("overlay lock")
            .lookup(offset, len as u64))
    }

    /// Last writeback error, if writeback is currently failing.
    pub fn writeback_error(&self) -> Option<String> {
        self.shared.wb_error.lock().expect("wb error lock").clone()
    }

    fn send(&self, req: LogReq) -> Result<(), IoError> {
        let tx = self.tx.lock().expect("tx lock");
        match tx.as_ref() {
            Some(tx) if !self.shared.closed.load(Ordering::Acquire) => match self.hold(tx, req) {
                None => Ok(()),
                Some(req) => tx
                    .send(req)
                    .map_err(|_| IoError::ShuttingDown(self.resource().into())),
            },
            _ => Err(IoError::ShuttingDown(self.resource().into())),
        }
    }

    /// Keeps `req` back if this thread holds its sends (see [`hold_sends`]);
    /// else gives it back.
    fn hold(&self, tx: &mpsc::UnboundedSender<LogReq>, req: LogReq) -> Option<LogReq> {
        let mut req = Some(req);
        crate::held::with_held(&HELD_SENDS, |held| {
            let me: *const Logger = self;
            let i = match held.iter().position(|h| h.logger == me) {
                Some(i) => i,
                None => {
                    held.push(Held {
                        logger: me,
                        tx: tx.clone(),
                        shared: Arc::clone(&self.shared),
                        reqs: Vec::new(),
                    });
                    held.len() - 1
                }
            };
            held[i].reqs.extend(req.take());
        });
        req
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), IoError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(IoError::ShuttingDown(self.resource().into()));
        }
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(IoError::Io {
                resource: self.resource().into(),
                source: std::io::Error::other(
                    "an earlier fdatasync of the log failed; restart marsd to recover",
                ),
            });
        }
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    async fn submit(
        &self,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), IoError> {
        self.check(offset, len)?;
        let payload = data.as_ref().map_or(0, |d| d.len() as u64);
        let records = len.div_ceil(MAX_PAYLOAD as u64).max(1);
        let quota = payload + records * RECORD_HEADER_LEN as u64;
        // Overlay budget: payload bytes plus a little per record, so that
        // many tiny zero records are bounded too.
        let cost = (quota.min(self.shared.budget_max as u64)) as u32;
        let permit = Arc::clone(&self.shared.budget)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))?;
        // A large write reserves at most a quarter of the quota (and is
        // charged the rest as debt): the newest logfile is never deleted,
        // so waiting for more could last forever.
        let reserve = quota
            .min(self.shared.quota.limit() / 4)
            .min(u32::MAX as u64) as u32;
        if !self.shared.quota.try_reserve(reserve) {
            tracing::warn!(resource = %self.resource(), bytes = quota, "log quota exhausted: writer waits for writeback and log deletion");
            self.send(LogReq::Rotate { reply: None })?;
            self.shared.want_sync();
            self.shared.quota.reserve(reserve).await;
        }
        if (reserve as u64) < quota {
            self.shared.quota.charge_existing(quota - reserve as u64);
        }
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.send(LogReq::Write {
            offset,
            len,
            data,
            fua,
            quota,
            permit,
            reply,
        }) {
            self.shared.quota.release(quota);
            return Err(e);
        }
        rx.await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))?
    }

    /// Grows the device: a resize record in the log, durable before it returns.
    pub async fn resize(&self, size: u64) -> Result<(), IoError> {
        let (reply, rx) = oneshot::channel();
        self.send(LogReq::Resize { size, reply })?;
        rx.await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))?
    }

    /// Starts a new logfile, unless the current one holds no record yet;
    /// returns whether it did.
    pub async fn rotate(&self) -> Result<bool, IoError> {
        let (reply, rx) = oneshot::channel();
        self.send(LogReq::Rotate { reply: Some(reply) })?;
        rx.await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))?
    }

    /// Stops taking I/O, makes the log durable and writes back what it can
    /// in the time `left` (everything if `None`; time as the workers see it,
    /// simulated in a simulation). What is not written back stays in the
    /// log for the next start. Blocking: call from a blocking context
    /// (`exec::blocking`).
    pub fn stop(&self, left: Option<Duration>) {
        let left = left.unwrap_or(Duration::from_secs(365 * 86400));
        self.shared.closed.store(true, Ordering::Release);
        // Writers waiting for overlay space give up instead of waiting forever.
        self.shared.budget.close();
        // Dropping the sender ends the logger thread once its queue is empty.
        self.tx.lock().expect("tx lock").take();
        {
            let mut wb = self.shared.wb.lock().expect("wb lock");
            wb.stop = Some(tokio::time::Instant::now() + left);
            self.shared.wb_wake.notify_one();
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for t in threads {
            t.join();
        }
    }

    /// Records that are logged but not yet written back.
    pub fn backlog(&self) -> usize {
        self.shared.wb.lock().expect("wb lock").queue.len()
    }
}

impl BlockIo for Logger {
    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.check(offset, len as u64)?;
        let hits = self
            .shared
            .overlay
            .lock()
            .expect("overlay lock")
            .lookup(offset, len as u64);
        let mut buf = vec![0u8; len as usize];
        let covered: u64 = hits.iter().map(|h| h.len).sum();
        if covered < len as u64 {
            let backing = Arc::clone(&self.shared.backing);
            let shared = Arc::clone(&self.shared);
            buf = crate::exec::io(move || {
                backing
                    .read_exact_or_zero(&mut buf, offset)
                    .map(|_| buf)
                    .map_err(|e| shared.io_err(e))
            })
            .await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))??;
        }
        for h in hits {
            let r = (h.offset - offset) as usize..(h.offset - offset + h.len) as usize;
            match h.data {
                Some(d) => buf[r].copy_from_slice(&d),
                None => buf[r].fill(0),
            }
        }
        Ok(Bytes::from(buf))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.submit(offset, len, Some(data), fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.submit(offset, len, None, fua).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        let target = self.shared.active.lock().expect("active lock").appended;
        if target <= self.shared.flushed() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.shared.group.wait_for([(target, reply)]);
        rx.await
            .map_err(|_| IoError::ShuttingDown(self.resource().into()))?
    }
}

fn now_ns() -> u64 {
    crate::exec::unix_now().as_nanos() as u64
}

/// A write being turned into records.
struct Staged {
    records: Vec<(u64, Record)>,
    fua: bool,
    quota: u64,
    permit: OwnedSemaphorePermit,
    reply: oneshot::Sender<Result<(), IoError>>,
}

async fn log_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<LogReq>) {
    let mut writes: Vec<Staged> = Vec::new();
    let push = |reqs: &mut Vec<LogReq>, r| match r {
        LogReq::Batch(batch) => reqs.extend(batch),
        r => reqs.push(r),
    };
    let tail = || shared.tail.lock().expect("tail lock");
    while let Some(first) = rx.recv().await {
        let mut reqs = Vec::new();
        push(&mut reqs, first);
        while reqs.len() < 512 {
            match rx.try_recv() {
                Ok(r) => push(&mut reqs, r),
                Err(_) => break,
            }
        }
        for req in reqs {
            match req {
                LogReq::Rotate { reply } => {
                    let mut tail = tail();
                    commit(&shared, &mut tail, &mut writes);
                    let res = if tail.appender.file_bytes() > FILE_HEADER_LEN as u64 {
                        let Tail {
                            appender, file_seq, ..
                        } = &mut *tail;
                        rotate(&shared, appender, file_seq).map(|()| true)
                    } else {
                        Ok(false)
                    };
                    if let Some(r) = reply {
                        let _ = r.send(res);
                    }
                }
                LogReq::Batch(_) => unreachable!("batches are taken apart on receipt"),
                req => writes.extend(stage(&shared, req)),
            }
        }
        commit(&shared, &mut tail(), &mut writes);
    }
    // Closing: make everything appended durable for writeback.
    let mut tail = tail();
    match shared.sync_log(|| tail.appender.sync()) {
        Ok(()) => shared.synced_to(tail.appender.end_pos()),
        Err(e) => {
            tracing::error!(resource = %shared.cfg.resource, error = %e, "final sync of the log failed")
        }
    }
    tail.ended = true;
    drop(tail);
    shared.log_done.store(true, Ordering::Release);
    shared.group.stop();
    shared.wb_wake.notify_one();
}

/// Turns a write or resize request into records to append (`None` for
/// other requests).
fn stage(shared: &Shared, req: LogReq) -> Option<Staged> {
    match req {
        LogReq::Write {
            offset,
            len,
            data,
            fua,
            quota,
            permit,
            reply,
        } => Some(Staged {
            records: split_write(shared, RecordKind::Write, offset, len, data),
            fua,
            quota,
            permit,
            reply,
        }),
        LogReq::Resize { size, reply } => {
            // Holds no data, so it borrows no overlay budget.
            let permit = Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("fresh semaphore has a permit");
            Some(Staged {
                records: split_write(shared, RecordKind::Resize, size, 0, None),
                fua: true,
                quota: 0,
                permit,
                reply,
            })
        }
        LogReq::Rotate { .. } | LogReq::Batch(_) => None,
    }
}

/// Appends `reqs` on the calling thread if they are all writes, no other
/// thread is appending, and they fit in the current logfile (rotating
/// syncs the log, which a ublk queue thread must not wait for). Returns
/// what it did not append, for the logger thread.
fn append_here(shared: &Shared, reqs: Vec<LogReq>) -> Vec<LogReq> {
    // A write's quota is the log bytes of its records; `None` if any
    // request is not a write.
    let bytes: Option<u64> = reqs
        .iter()
        .map(|r| match r {
            LogReq::Write { quota, .. } => Some(*quota),
            _ => None,
        })
        .sum();
    let Some(bytes) = bytes else {
        return reqs;
    };
    let Ok(mut tail) = shared.tail.try_lock() else {
        return reqs;
    };
    if tail.ended || needs_rotation(shared, &tail.appender, bytes) {
        return reqs;
    }
    let mut writes: Vec<Staged> = reqs.into_iter().filter_map(|r| stage(shared, r)).collect();
    commit(shared, &mut tail, &mut writes);
    Vec::new()
}

/// Whether a batch of `bytes` must start a new logfile first.
fn needs_rotation(shared: &Shared, appender: &Appender, bytes: u64) -> bool {
    appender.file_bytes() > FILE_HEADER_LEN as u64
        && appender.file_bytes() + bytes > shared.cfg.logfile_size
}

/// Turns a request into records of at most `MAX_PAYLOAD` bytes (sequence
/// numbers and positions are assigned at commit). For a resize, `offset` is
/// the new size.
fn split_write(
    shared: &Shared,
    kind: RecordKind,
    offset: u64,
    len: u64,
    data: Option<Bytes>,
) -> Vec<(u64, Record)> {
    let ts = now_ns();
    let header = |kind, offset, length, payload_len| RecordHeader {
        kind,
        unsynced: 0,
        seq: 0,
        generation: shared.cfg.generation,
        offset,
        length,
        timestamp_ns: ts,
        payload_len,
    };
    if kind == RecordKind::Resize {
        return vec![(
            0,
            Record {
                header: header(kind, offset, 0, 0),
                payload: Bytes::new(),
            },
        )];
    }
    let mut out = Vec::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(MAX_PAYLOAD as u64);
        let (kind, payload) = match &data {
            Some(d) => (
                RecordKind::Write,
                d.slice(done as usize..(done + n) as usize),
            ),
            None => (RecordKind::Zero, Bytes::new()),
        };
        out.push((
            0,
            Record {
                header: header(kind, offset + done, n, payload.len() as u32),
                payload,
            },
        ));
        done += n;
    }
    out
}

fn fail_all(shared: &Shared, writes: &mut Vec<Staged>, err: impl Fn() -> IoError) {
    for w in writes.drain(..) {
        shared.quota.release(w.quota);
        let _ = w.reply.send(Err(err()));
    }
}

/// Appends the staged writes as one batch and completes them.
fn commit(shared: &Shared, tail: &mut Tail, writes: &mut Vec<Staged>) {
    if writes.is_empty() {
        return;
    }
    let Tail {
        appender,
        file_seq,
        buf,
        ..
    } = tail;
    let batch_bytes: u64 = writes
        .iter()
        .flat_map(|w| &w.records)
        .map(|(_, r)| r.header.encoded_len())
        .sum();
    if needs_rotation(shared, appender, batch_bytes)
        && let Err(e) = rotate(shared, appender, file_seq)
    {
        let msg = e.to_string();
        fail_all(shared, writes, || IoError::Io {
            resource: shared.cfg.resource.clone(),
            source: std::io::Error::other(msg.clone()),
        });
        return;
    }
    buf.clear();
    let mut pos = appender.end_pos();
    let mut seq = appender.next_seq();
    let mut count = 0;
    // Whatever lies between the durable end and a record may be torn by a
    // power loss; the record says how far back that goes (see format.rs).
    let durable = shared.flushed();
    // Only the headers go to `buf`; payloads are written from where they
    // are (one copy less of every byte on the log thread).
    for w in writes.iter_mut() {
        for (p, rec) in w.records.iter_mut() {
            rec.header.seq = seq;
            rec.header.unsynced = pos.saturating_sub(durable).min(u32::MAX as u64) as u32;
            *p = pos;
            buf.extend_from_slice(&encode_record_header(&rec.header, &rec.payload));
            pos += rec.header.encoded_len();
            seq += 1;
            count += 1;
        }
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * count as usize);
    let headers = buf.chunks_exact(RECORD_HEADER_LEN);
    for (header, (_, rec)) in headers.zip(writes.iter().flat_map(|w| &w.records)) {
        parts.push(header);
        parts.push(&rec.payload);
    }
    let appended = appender.append_vectored(&parts, count);
    drop(parts);
    if let Err(e) = appended {
        tracing::error!(resource = %shared.cfg.resource, error = %e, "appending to the log failed");
        fail_all(shared, writes, || shared.io_err(clone_io(&e)));
        return;
    }
    let end = appender.end_pos();
    {
        let mut overlay = shared.overlay.lock().expect("overlay lock");
        for (p, rec) in writes.iter().flat_map(|w| &w.records) {
            let h = &rec.header;
            match h.kind {
                // The device grows once the record is in the log.
                RecordKind::Resize => {
                    shared.size.fetch_max(h.offset, Ordering::AcqRel);
                }
                RecordKind::Write => {
                    overlay.insert(h.offset, h.length, *p, Some(rec.payload.clone()))
                }
                RecordKind::Zero => overlay.insert(h.offset, h.length, *p, None),
            }
            let held = shared
                .counters
                .overlay_bytes
                .fetch_add(h.payload_len as u64, Ordering::Relaxed);
            shared
                .counters
                .overlay_peak
                .fetch_max(held + h.payload_len as u64, Ordering::Relaxed);
        }
    }
    {
        let mut claims = shared.claims.lock().expect("claims lock");
        if claims.back().is_none_or(|(_, c)| *c < durable) {
            claims.push_back((end, durable));
        } else if let Some(last) = claims.back_mut() {
            // Same claim: the later end is what must be durable for it.
            last.0 = end;
        }
    }
    shared.active.lock().expect("active lock").appended = end;
    shared.counters.appended.store(end, Ordering::Release);
    shared
        .store
        .note_append(appender.start_pos(), end, appender.next_seq());
    let mut durable_waiters = Vec::new();
    // One wakeup per ublk queue for all the writes completed here.
    let held_kicks = crate::frontend::ublk::hold_kicks();
    {
        let mut wb = shared.wb.lock().expect("wb lock");
        // Writeback waits for the log to become durable (the syncer wakes
        // it), or naps longer while it has nothing: wake it only when it
        // gets work after having none, or when the overlay fills up, not on
        // every commit (a thread wakeup per commit is dear).
        let wake_writeback = wb.queue.is_empty()
            || shared.counters.overlay_bytes.load(Ordering::Relaxed)
                >= shared.cfg.overlay_limit / 4;
        for w in writes.drain(..) {
            let last_end = w
                .records
                .last()
                .map(|(p, r)| p + r.header.encoded_len())
                .unwrap_or(end);
            let n = w.records.len();
            let mut permit = Some(w.permit);
            for (i, (p, record)) in w.records.into_iter().enumerate() {
                // The budget returns when the write's last record is written back.
                let permit = if i + 1 == n { permit.take() } else { None };
                wb.queue.push_back(Pending {
                    pos: p,
                    record,
                    _permit: permit,
                });
            }
            if w.fua {
                durable_waiters.push((last_end, w.reply));
            } else {
                let _ = w.reply.send(Ok(()));
            }
        }
        if wake_writeback {
            shared.wb_wake.notify_one();
        }
    }
    drop(held_kicks);
    shared.group.wait_for(durable_waiters);
}

/// Makes the current logfile durable and starts the next one.
fn rotate(shared: &Shared, appender: &mut Appender, file_seq: &mut u64) -> Result<(), IoError> {
    shared
        .sync_log(|| appender.sync())
        .map_err(|e| shared.io_err(e))?;
    shared.synced_to(appender.end_pos());
    let header = FileHeader {
        file_seq: *file_seq + 1,
        start_pos: appender.end_pos(),
        first_seq: appender.next_seq(),
        generation: shared.cfg.generation,
    };
    let next = shared
        .store
        .create_file(&shared.cfg.node, header)
        .map_err(|e| IoError::Io {
            resource: shared.cfg.resource.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    // The new file exists durably only after the old one was synced:
    // recovery treats damage in a file that is not the newest as corruption.
    shared.vouch(header.start_pos);
    *appender = next;
    *file_seq += 1;
    shared.active.lock().expect("active lock").file = Arc::clone(appender.file());
    shared.wb_wake.notify_one();
    Ok(())
}

/// The syncer (see group_commit.rs).
async fn sync_loop(shared: Arc<Shared>) {
    shared
        .group
        .run(
            || {
                let (file, target) = {
                    let a = shared.active.lock().expect("active lock");
                    (Arc::clone(&a.file), a.appended)
                };
                if target > shared.flushed() {
                    shared.sync_log(|| file.sync_data())?;
                }
                shared.synced_to(target);
                shared.wb_wake.notify_one();
                Ok(target)
            },
            |replies, r| {
                // One wakeup per ublk queue for all the writes answered here.
                let _held_kicks = crate::frontend::ublk::hold_kicks();
                for reply in replies {
                    let _ = reply.send(r.map_err(|e| shared.io_err(clone_io(e))));
                }
            },
        )
        .await;
}

/// An io::Error for each waiter of a failed operation, keeping the errno.
fn clone_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}
