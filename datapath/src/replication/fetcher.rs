//! The fetcher of a secondary: copies the primary's logfiles, byte for byte,
//! into the local log, resuming after any disconnect at the end of its last
//! valid record (no gap, no duplicate). Records are checked before they are
//! stored; the local copy is fdatasync'd before the applier may use it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::proto::{self, Frame, Message, Purpose};
use crate::cluster::{Cluster, PEER_TIMEOUT};
use crate::log::format::{self, FileHeader};
use crate::log::{Appender, LogStore};
use crate::resource::Resource;

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
    // The source sends a logfile's header with its first records, so a
    // newest file without records is dropped and fetched anew: its number
    // may belong to another file there (a new primary's first logfile).
    let (dropped_at, mut appender) = tokio::task::block_in_place(|| {
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
    let (mut conn, _) =
        proto::connect(&addr, &cluster.hello(Purpose::Rpc), Some(&primary.node)).await?;
    let req = Message::Fetch {
        resource: res.name().into(),
        from_pos,
        file_seq,
    };
    proto::write_frame(&mut conn, &req, &[]).await?;
    let counters = res.counters();
    let mut last_sync = Instant::now();
    loop {
        let frame: Frame<Message> =
            tokio::time::timeout(PEER_TIMEOUT, proto::read_frame(&mut conn))
                .await
                .map_err(|_| FetchError::Silent(PEER_TIMEOUT))??;
        cluster.heard_from(&primary.node);
        let now_designated = cluster.primary_of(res.name()).map(|p| p.node);
        if now_designated != designated {
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
                    sync(a, &store, counters)?;
                }
                let a = tokio::task::block_in_place(|| store.create_file(&origin, header))
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
                tokio::task::block_in_place(|| a.append(&data, records))
                    .map_err(|e| FetchError::Local(e.to_string()))?;
                store.note_append(a.start_pos(), a.end_pos(), a.next_seq());
                counters.appended.store(a.end_pos(), Ordering::Release);
                if last_sync.elapsed() >= SYNC_INTERVAL {
                    sync(a, &store, counters)?;
                    last_sync = Instant::now();
                }
                res.repl_error.lock().expect("error lock").take();
            }
            Message::Idle { .. } => {
                if let Some(a) = &appender {
                    sync(a, &store, counters)?;
                    last_sync = Instant::now();
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
            Message::Refused { reason } => return Err(proto::Error::Refused(reason).into()),
            other => return Err(FetchError::Bad(format!("an unexpected {other:?}"))),
        }
    }
}

fn sync(
    a: &Appender,
    store: &LogStore,
    counters: &crate::logger::Counters,
) -> Result<(), FetchError> {
    let flushed = counters.flushed.load(Ordering::Acquire);
    if flushed < a.end_pos() {
        if let Err(e) = tokio::task::block_in_place(|| a.sync()) {
            // Linux marks the pages of a failed writeback clean: what was
            // fetched since the last good sync may be lost on disk, and a
            // later sync would not say so. Cut the copy back to what is
            // durable; the next fetch writes the rest again.
            let cut = tokio::task::block_in_place(|| store.truncate_to(flushed));
            counters.appended.store(flushed, Ordering::Release);
            return Err(FetchError::Local(match cut {
                Ok(_) => {
                    format!("syncing the log copy failed ({e}); cut back to position {flushed}")
                }
                Err(c) => format!(
                    "syncing the log copy failed ({e}), and cutting it back to position {flushed} failed too: {c}"
                ),
            }));
        }
        counters.set_flushed(a.end_pos());
    }
    Ok(())
}

/// Every record decodes, checksums match and sequence numbers continue ours.
fn check_records(data: &[u8], records: u64, mut next_seq: u64) -> Result<(), FetchError> {
    let mut at = 0;
    for _ in 0..records {
        let (rec, used) = format::decode_record(&data[at..]).map_err(|e| {
            FetchError::Bad(format!("a damaged record at byte {at} of a chunk: {e}"))
        })?;
        if rec.header.seq != next_seq {
            return Err(FetchError::Bad(format!(
                "record {} where {next_seq} was due",
                rec.header.seq
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
