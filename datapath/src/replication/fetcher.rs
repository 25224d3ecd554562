//! The fetcher of a secondary: copies the primary's logfiles, byte for byte,
//! into the local log, resuming after any disconnect at the end of its last
//! valid record (no gap, no duplicate). Records are checked before they are
//! stored; the local copy is fdatasync'd before the applier may use it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

// tokio's: simulated time in a simulation, else the real clock.
use tokio::time::Instant;

use super::proto::{self, Frame, Message, Purpose};
use crate::cluster::{Cluster, PEER_TIMEOUT};
use crate::log::format::{self, FileHeader};
use crate::log::{Appender, LogStore, RecordBefore};
use crate::resource::{DiskState, Resource};

/// Sync the local copy at least this often while records arrive.
const SYNC_INTERVAL: Duration = Duration::from_millis(50);

pub async fn run(res: Arc<Resource>, cluster: Arc<Cluster>) {
    let name = res.name().to_string();
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        match fetch_once(&res, &cluster).await {
            Ok(()) => backoff = Duration::from_millis(100),
            // The primary no longer has our next record: only a full sync
            // brings this replica back (the reconcile loop starts it).
            Err(FetchError::Gone(why)) => {
                if !res.log_gone.swap(true, Ordering::AcqRel) {
                    tracing::warn!(resource = %name, reason = %why, "the primary no longer has the log this replica needs: full sync");
                }
                *res.repl_error.lock().expect("error lock") = Some(format!("fetch: {why}"));
            }
            // Not UpToDate from now on: the device is a prefix of a history
            // that is not the primary's (until `invalidate`).
            Err(FetchError::Diverged(why)) => {
                if res.meta().disk_state != DiskState::Outdated {
                    tracing::error!(resource = %name, reason = %why, "our log holds another history than the primary's: Outdated until `marsadm invalidate {name}`");
                    if let Err(e) = res.update_meta(|m| m.disk_state = DiskState::Outdated) {
                        tracing::error!(resource = %name, error = %e, "recording Outdated failed");
                    }
                }
                *res.repl_error.lock().expect("error lock") = Some(format!("fetch: {why}"));
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    tracing::warn!(resource = %name, error = %msg, "fetch interrupted; retrying");
                    last_error = msg.clone();
                }
                *res.repl_error.lock().expect("error lock") = Some(format!("fetch: {msg}"));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no primary known for this resource")]
    NoPrimary,
    #[error("primary {0} has no known address")]
    NoAddress(String),
    #[error(transparent)]
    Proto(#[from] proto::Error),
    #[error("primary sent {0}")]
    Bad(String),
    #[error("local log: {0}")]
    Local(String),
    #[error("no data from the primary for {0:?}")]
    Silent(Duration),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Diverged(String),
}

async fn fetch_once(res: &Arc<Resource>, cluster: &Arc<Cluster>) -> Result<(), FetchError> {
    let (source, designated) = source(res, cluster)?;
    // Records of another history must not be continued with the primary's:
    // the reconcile loop cuts them off or reports split brain first.
    if let Some(p) = cluster.primary_of(res.name())
        && let Some(fork) = res.fork_from(&p)
    {
        return Err(FetchError::Bad(format!(
            "our log leaves the history of {} (generation {}) at position {fork}",
            p.node, p.generation
        )));
    }
    let addr = cluster
        .addr_of(&source)
        .ok_or_else(|| FetchError::NoAddress(source.clone()))?;
    if designated.as_deref() != Some(source.as_str()) {
        tracing::info!(resource = %res.name(), from = %source, "fetching from another replica (the primary is unreachable or none is designated)");
    }
    let primary = crate::membership::PrimaryInfo {
        node: source,
        generation: 0,
        start_pos: 0,
    };
    let store = Arc::clone(res.store());
    let counters = res.counters();
    let mut syncs = CopySync::new(Arc::clone(&res.copy_sync_failed));
    syncs.recover(&store, counters)?;
    // The source sends a logfile's header with its first records, so a
    // newest file without records is dropped and fetched anew: its number
    // may belong to another file there (a new primary's first logfile).
    let (dropped_at, mut appender) = crate::net::block_in_place(|| {
        let dropped_at = store.drop_empty_tail()?;
        Ok::<_, crate::log::Error>((dropped_at, store.resume_last()?))
    })
    .map_err(|e| FetchError::Local(e.to_string()))?;
    let (from_pos, file_seq) = match &appender {
        Some(a) => (a.end_pos(), store.files().last().map(|f| f.file_seq)),
        None => (
            res.meta()
                .sync
                .map(|s| s.start_pos)
                .or(dropped_at)
                .unwrap_or(0),
            None,
        ),
    };
    // The source compares its record before `from_pos` with ours.
    let before = match &appender {
        Some(_) => match crate::net::block_in_place(|| store.record_before(from_pos)) {
            Ok(RecordBefore::Ends(crc)) => Some(crc),
            Ok(RecordBefore::NotKept | RecordBefore::NoBoundary) => None,
            // Damage at rest in a record applied long ago: the fetch goes
            // on from the end (it reads nothing before it), unchecked.
            Err(e) => {
                tracing::warn!(resource = %res.name(), error = %e, "our record before the resume point is unreadable: not compared with the source's");
                None
            }
        },
        None => None,
    };
    let (mut conn, _) = proto::connect(
        &*cluster.net,
        &addr,
        &cluster.hello(Purpose::Rpc),
        Some(&primary.node),
    )
    .await?;
    let req = Message::Fetch {
        resource: res.name().into(),
        from_pos,
        file_seq,
        before,
    };
    proto::write_frame(&mut conn, &req, &[]).await?;
    let streamed: Result<(), FetchError> = async {
        loop {
            let frame: Frame<Message> =
                tokio::time::timeout(PEER_TIMEOUT, proto::read_frame(&mut conn))
                    .await
                    .map_err(|_| FetchError::Silent(PEER_TIMEOUT))??;
            cluster.heard_from(&primary.node);
            let now_primary = cluster.primary_of(res.name());
            if now_primary.as_ref().map(|p| &p.node) != designated.as_ref() {
                return Err(FetchError::Bad(
                    "a stream from before a change of primary; switching".into(),
                ));
            }
            if designated
                .as_ref()
                .is_some_and(|d| *d != primary.node && cluster.connected(d))
            {
                return Err(FetchError::Bad(
                    "the primary is reachable again; switching back to it".into(),
                ));
            }
            match frame.msg {
                Message::LogFile { file_seq, origin } => {
                    let header = FileHeader::decode(&frame.data)
                        .map_err(|e| FetchError::Bad(format!("a bad logfile header: {e}")))?;
                    if header.file_seq != file_seq {
                        return Err(FetchError::Bad(format!(
                            "logfile {file_seq} with a header for {}",
                            header.file_seq
                        )));
                    }
                    if let Some(a) = &appender {
                        if header.start_pos != a.end_pos() || header.first_seq != a.next_seq() {
                            return Err(FetchError::Bad(format!(
                                "logfile {file_seq} starting at {} (record {}), but our log ends at {} (record {})",
                                header.start_pos,
                                header.first_seq,
                                a.end_pos(),
                                a.next_seq()
                            )));
                        }
                        // The previous file is complete: make it durable before the next begins.
                        syncs.now(a, &store, counters).await?;
                    }
                    let a = crate::net::block_in_place(|| store.create_file(&origin, header))
                        .map_err(|e| FetchError::Local(e.to_string()))?;
                    counters.appended.store(a.end_pos(), Ordering::Release);
                    appender = Some(a);
                }
                Message::LogData {
                    pos,
                    records,
                    encoding,
                } => {
                    let a = appender
                        .as_mut()
                        .ok_or_else(|| FetchError::Bad("records before any logfile".into()))?;
                    let wire_len = frame.wire_len;
                    let data = proto::decode(frame.data, encoding, proto::MAX_DATA as usize)?;
                    counters
                        .received_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    counters
                        .received_wire_bytes
                        .fetch_add(wire_len, Ordering::Relaxed);
                    if pos != a.end_pos() {
                        return Err(FetchError::Bad(format!(
                            "records at position {pos}, but our log ends at {}",
                            a.end_pos()
                        )));
                    }
                    check_records(&data, records, a.next_seq())?;
                    // Another replica may serve a deposed history (it is in
                    // split brain and not yet told so): nothing of it past
                    // the current primary's start is taken (sim_cluster
                    // seed 8872582947007633645).
                    if let Some(p) = &now_primary {
                        let span = crate::resource::Span {
                            generation: a.generation(),
                            origin: a.origin(),
                            start: a.start_pos(),
                            end: pos + data.len() as u64,
                        };
                        if let Some(fork) = span.leaves(p) {
                            return Err(FetchError::Bad(format!(
                                "{} sent records of another history than {}'s (generation {} of {}) past log position {fork}",
                                primary.node,
                                p.node,
                                a.generation(),
                                a.origin()
                            )));
                        }
                    }
                    crate::net::block_in_place(|| a.append(&data, records))
                        .map_err(|e| FetchError::Local(e.to_string()))?;
                    store.note_append(a.start_pos(), a.end_pos(), a.next_seq());
                    counters.appended.store(a.end_pos(), Ordering::Release);
                    syncs.tick(a, &store, counters).await?;
                    res.repl_error.lock().expect("error lock").take();
                }
                Message::Idle { .. } => {
                    if let Some(a) = &appender {
                        syncs.now(a, &store, counters).await?;
                    }
                }
                // Only the designated primary's word counts: another replica
                // may have deleted what the primary still has.
                Message::Refused { reason }
                    if reason.contains(super::server::LOG_GONE)
                        && designated.as_deref() == Some(primary.node.as_str()) =>
                {
                    return Err(FetchError::Gone(reason));
                }
                // Our copy holds another history than the primary's under
                // the same name: never continued with the primary's records.
                Message::Refused { reason }
                    if reason.contains(super::server::DIVERGED)
                        && designated.as_deref() == Some(primary.node.as_str()) =>
                {
                    return Err(FetchError::Diverged(reason));
                }
                Message::Refused { reason } => return Err(proto::Error::Refused(reason).into()),
                other => return Err(FetchError::Bad(format!("an unexpected {other:?}"))),
            }
        }
    }
    .await;
    // Every way out waits for a running sync: its failure must cut the copy
    // back before anyone appends to it again.
    let settled = syncs.finish(&store, counters).await;
    settled.and(streamed)
}

/// The fdatasync of the local log copy, run beside the fetch loop: receiving
/// and appending go on while the disk flushes (a sync inline stalled the
/// stream for the whole flush every `SYNC_INTERVAL`). At most one runs; the
/// durable end moves only once it succeeded. A failure is also noted on the
/// resource, because the fetcher may be stopped (pause, a role change)
/// before it learns of it: the next one cuts the copy back first.
struct CopySync {
    failed: Arc<std::sync::atomic::AtomicBool>,
    running: Option<(u64, crate::exec::Blocking<std::io::Result<()>>)>,
    last: Instant,
}

impl CopySync {
    fn new(failed: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self {
            failed,
            running: None,
            last: Instant::now(),
        }
    }

    /// Collects a finished sync and starts the next one once
    /// `SYNC_INTERVAL` passed since the last began.
    async fn tick(
        &mut self,
        a: &Appender,
        store: &LogStore,
        counters: &crate::logger::Counters,
    ) -> Result<(), FetchError> {
        if self.running.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            self.finish(store, counters).await?;
        }
        if self.running.is_none() && self.last.elapsed() >= SYNC_INTERVAL {
            self.start(a, counters);
        }
        Ok(())
    }

    /// Makes everything appended to `a` durable before it returns.
    async fn now(
        &mut self,
        a: &Appender,
        store: &LogStore,
        counters: &crate::logger::Counters,
    ) -> Result<(), FetchError> {
        self.finish(store, counters).await?;
        self.start(a, counters);
        self.finish(store, counters).await
    }

    fn start(&mut self, a: &Appender, counters: &crate::logger::Counters) {
        self.last = Instant::now();
        if counters.flushed.load(Ordering::Acquire) >= a.end_pos() {
            return;
        }
        let file = Arc::clone(a.file());
        let failed = Arc::clone(&self.failed);
        let handle = crate::exec::io(move || {
            let r = file.sync_data();
            if r.is_err() {
                failed.store(true, Ordering::Release);
            }
            r
        });
        self.running = Some((a.end_pos(), handle));
    }

    /// Waits for the running sync, if any; on its failure (or an earlier
    /// one's) cuts the copy back to its durable end.
    async fn finish(
        &mut self,
        store: &LogStore,
        counters: &crate::logger::Counters,
    ) -> Result<(), FetchError> {
        let result = match self.running.take() {
            Some((end, handle)) => match handle.await {
                Ok(Ok(())) => {
                    counters.advance_flushed(end);
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(std::io::Error::other(e)),
            },
            None => Ok(()),
        };
        if let Err(e) = result {
            self.failed.store(true, Ordering::Release);
            return Err(self.cut_back(store, counters, &e.to_string()));
        }
        // A sync of a stopped fetcher may have failed meanwhile: the
        // appender in use is then stale.
        if self.failed.load(Ordering::Acquire) {
            return Err(self.cut_back(store, counters, "in an earlier fetch"));
        }
        Ok(())
    }

    /// Before a fetch resumes the copy: cuts it back if a sync failed while
    /// no fetcher was waiting for it.
    fn recover(
        &self,
        store: &LogStore,
        counters: &crate::logger::Counters,
    ) -> Result<(), FetchError> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let e = self.cut_back(store, counters, "in an earlier fetch");
        if self.failed.load(Ordering::Acquire) {
            return Err(e);
        }
        tracing::warn!(resource = %store.dir().display(), "{e}");
        Ok(())
    }

    /// Linux marks the pages of a failed writeback clean: what was fetched
    /// since the last good sync may be lost on disk, and a later sync would
    /// not say so. Cuts the copy back to what is durable (the next fetch
    /// writes the rest again); only a cut that succeeded clears the doubt.
    fn cut_back(
        &self,
        store: &LogStore,
        counters: &crate::logger::Counters,
        why: &str,
    ) -> FetchError {
        let flushed = counters.flushed.load(Ordering::Acquire);
        let cut = crate::net::block_in_place(|| store.truncate_to(flushed));
        counters.appended.store(flushed, Ordering::Release);
        FetchError::Local(match cut {
            Ok(_) => {
                self.failed.store(false, Ordering::Release);
                format!("syncing the log copy failed ({why}); cut back to position {flushed}")
            }
            Err(c) => format!(
                "syncing the log copy failed ({why}), and cutting it back to position {flushed} failed too: {c}"
            ),
        })
    }
}

/// Every record decodes, checksums match and sequence numbers continue ours.
fn check_records(data: &[u8], records: u64, mut next_seq: u64) -> Result<(), FetchError> {
    let mut at = 0;
    for _ in 0..records {
        let (header, used) = format::verify_record(&data[at..]).map_err(|e| {
            FetchError::Bad(format!("a damaged record at byte {at} of a chunk: {e}"))
        })?;
        if header.seq != next_seq {
            return Err(FetchError::Bad(format!(
                "record {} where {next_seq} was due",
                header.seq
            )));
        }
        next_seq += 1;
        at += used;
    }
    if at != data.len() {
        return Err(FetchError::Bad(format!(
            "{} bytes after {records} records",
            data.len() - at
        )));
    }
    Ok(())
}

/// Where to fetch from: the designated primary; while none is designated
/// (between `secondary` and `primary` of a manual handover), the replica
/// that has the most of the log, so that this one can catch up with it.
/// Returns (source, designated primary).
fn source(res: &Resource, cluster: &Cluster) -> Result<(String, Option<String>), FetchError> {
    let state = cluster.state();
    let r = state.resource(res.name()).ok_or(FetchError::NoPrimary)?;
    let ours = res.counters().flushed.load(Ordering::Acquire);
    // Another replica of the same history that has more of the log than
    // we do and can be reached (never one in split brain or resyncing).
    let best_other = |exclude: Option<&str>| {
        r.replicas()
            .filter(|(n, i)| {
                **n != cluster.node
                    && Some(n.as_str()) != exclude
                    && !i.split_brain
                    && i.disk_state == "UpToDate"
                    && cluster.connected(n)
            })
            .max_by_key(|(_, i)| i.fetched)
            .filter(|(_, i)| i.fetched > ours)
            .map(|(n, _)| n.clone())
    };
    match r.primary() {
        Some(p) if p.node == cluster.node => Err(FetchError::NoPrimary),
        Some(p) if cluster.connected(&p.node) => Ok((p.node.clone(), Some(p.node.clone()))),
        Some(p) => Ok((
            best_other(Some(&p.node)).unwrap_or_else(|| p.node.clone()),
            Some(p.node.clone()),
        )),
        None => best_other(None)
            .map(|n| (n, None))
            .ok_or(FetchError::NoPrimary),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::log::format::{RecordHeader, RecordKind, encode_record};
    use crate::logger::Counters;
    use crate::storage::sim::{CrashMode, Faults, SimStorage};

    const DIR: &str = "/log";

    /// `n` encoded records from `seq` on, 1 KiB each.
    fn records(seq: u64, n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for s in seq..seq + n {
            let payload = vec![s as u8; 1024];
            let h = RecordHeader {
                kind: RecordKind::Write,
                unsynced: 0,
                seq: s,
                generation: 1,
                offset: s * 4096,
                length: 1024,
                timestamp_ns: s,
                payload_len: 1024,
            };
            encode_record(&h, &payload, &mut buf);
        }
        buf
    }

    /// Appends as the fetcher does (the store learns the new end).
    fn append(store: &LogStore, app: &mut Appender, seq: u64, n: u64) {
        app.append(&records(seq, n), n).unwrap();
        store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
    }

    fn setup(disk: &SimStorage) -> (LogStore, Appender) {
        disk.mkdir_durable(Path::new(DIR));
        let (store, _) = LogStore::open(Arc::new(disk.clone()), Path::new(DIR)).unwrap();
        let header = FileHeader {
            file_seq: 1,
            start_pos: 0,
            first_seq: 1,
            generation: 1,
        };
        let app = store.create_file("a", header).unwrap();
        (store, app)
    }

    fn failing_syncs(disk: &SimStorage, on: bool) {
        disk.set_faults(Faults {
            sync_eio: if on { 1.0 } else { 0.0 },
            ..Faults::default()
        });
    }

    /// The records that survive a power cut of `disk`.
    fn durable_end(disk: &SimStorage) -> u64 {
        let img = disk.crash(CrashMode::DropUnsynced);
        let (store, _) = LogStore::open(Arc::new(img), Path::new(DIR)).unwrap();
        store.end().map_or(0, |(end, _)| end)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_cuts_the_copy_back_to_its_durable_end() {
        let disk = SimStorage::new(1);
        let (store, mut app) = setup(&disk);
        let counters = Counters::default();
        let mut syncs = CopySync::new(Arc::default());
        append(&store, &mut app, 1, 3);
        syncs.now(&app, &store, &counters).await.unwrap();
        let good = app.end_pos();
        assert_eq!(counters.flushed.load(Ordering::Acquire), good);

        append(&store, &mut app, 4, 2);
        failing_syncs(&disk, true);
        let e = syncs.now(&app, &store, &counters).await.unwrap_err();
        // The cut itself needs a sync, which fails too: the doubt stays.
        assert!(e.to_string().contains("failed too"), "{e}");
        assert_eq!(counters.flushed.load(Ordering::Acquire), good);
        failing_syncs(&disk, false);
        syncs.recover(&store, &counters).unwrap();
        assert_eq!(store.end().map(|(end, _)| end), Some(good));
        assert_eq!(counters.appended.load(Ordering::Acquire), good);
        // Nothing more is in doubt.
        syncs.recover(&store, &counters).unwrap();
        assert_eq!(durable_end(&disk), good);
    }

    /// A fetcher stopped (pause, role change) while its sync runs: the
    /// failure is found by the next one, which cuts back before it appends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_that_fails_after_its_fetcher_stopped_is_cut_back_by_the_next() {
        let disk = SimStorage::new(2);
        let (store, mut app) = setup(&disk);
        let counters = Counters::default();
        let failed = Arc::new(AtomicBool::new(false));
        let mut syncs = CopySync::new(Arc::clone(&failed));
        append(&store, &mut app, 1, 2);
        syncs.now(&app, &store, &counters).await.unwrap();
        let good = app.end_pos();

        append(&store, &mut app, 3, 4);
        failing_syncs(&disk, true);
        tokio::time::sleep(SYNC_INTERVAL).await;
        syncs.tick(&app, &store, &counters).await.unwrap();
        assert!(syncs.running.is_some(), "a background sync was started");
        drop(syncs);
        for _ in 0..500 {
            if failed.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(failed.load(Ordering::Acquire), "the failure was noted");
        assert_eq!(counters.flushed.load(Ordering::Acquire), good);

        failing_syncs(&disk, false);
        let next = CopySync::new(Arc::clone(&failed));
        next.recover(&store, &counters).unwrap();
        assert!(!failed.load(Ordering::Acquire));
        assert_eq!(store.end().map(|(end, _)| end), Some(good));
        assert_eq!(durable_end(&disk), good);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_syncs_move_the_durable_end_while_appends_go_on() {
        let disk = SimStorage::new(3);
        let (store, mut app) = setup(&disk);
        let counters = Counters::default();
        let mut syncs = CopySync::new(Arc::default());
        let mut seq = 1;
        for _ in 0..5 {
            append(&store, &mut app, seq, 2);
            seq += 2;
            tokio::time::sleep(SYNC_INTERVAL).await;
            syncs.tick(&app, &store, &counters).await.unwrap();
        }
        syncs.finish(&store, &counters).await.unwrap();
        let flushed = counters.flushed.load(Ordering::Acquire);
        assert!(flushed > 0 && flushed <= app.end_pos());
        assert!(durable_end(&disk) >= flushed);
    }
}
