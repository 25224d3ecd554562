//! The peer server on `--listen`: checks each connection's hello, then
//! receives gossip on links and answers requests (join, full sync, fetch).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

// tokio's: simulated time in a simulation, else the real clock.
use tokio::time::Instant;

use tokio::task::JoinSet;

use super::proto::{self, Frame, Hello, Message, Purpose};
use super::{fullsync, ratelimit};
use crate::cluster::{HEARTBEAT, PEER_TIMEOUT};
use crate::frontend::BlockIo;
use crate::log::{LogStore, RecordBefore};
use crate::net::{BoxStream, Listener};
use crate::node::Node;

/// Bytes of records per LogData frame.
const SHIP_BYTES: usize = 1 << 20;

pub async fn serve(mut listener: Box<dyn Listener>, node: Arc<Node>) {
    let mut conns = JoinSet::new();
    loop {
        // Biased: a fixed order of polls (a seed replays a simulation).
        tokio::select! {
            biased;
            accepted = listener.accept() => match accepted {
                Ok((s, addr)) => {
                    let node = Arc::clone(&node);
                    conns.spawn(async move {
                        if let Err(e) = handle(s, node).await {
                            tracing::debug!(%addr, error = %e, "peer connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn refuse(s: &mut BoxStream, reason: String) -> proto::Result<()> {
    proto::write_frame(
        s,
        &Message::Refused {
            reason: reason.clone(),
        },
        &[],
    )
    .await?;
    Err(proto::Error::Refused(reason))
}

async fn handle(mut s: BoxStream, node: Arc<Node>) -> proto::Result<()> {
    let f: Frame<Message> = tokio::time::timeout(PEER_TIMEOUT, proto::read_frame(&mut s))
        .await
        .map_err(|_| proto::Error::BadFrame("no hello".into()))??;
    let Message::Hello(theirs) = f.msg else {
        return refuse(&mut s, "the first frame must be a hello".into()).await;
    };
    let ours = node.cluster().hello(theirs.purpose);
    if let Err(e) = proto::check_hello(&ours, &theirs, None) {
        return refuse(&mut s, e.to_string()).await;
    }
    proto::write_frame(&mut s, &Message::Hello(ours), &[]).await?;
    match theirs.purpose {
        Purpose::Link => {
            if theirs.cluster.is_empty() {
                return refuse(&mut s, "join the cluster first".into()).await;
            }
            loop {
                let f: Frame<Message> =
                    tokio::time::timeout(2 * PEER_TIMEOUT, proto::read_frame(&mut s))
                        .await
                        .map_err(|_| proto::Error::BadFrame("link silent".into()))??;
                node.cluster().heard_from(&theirs.node);
                if let Message::Gossip { state } = f.msg {
                    node.cluster().merge(&state);
                }
            }
        }
        Purpose::Rpc => {
            let f: Frame<Message> = tokio::time::timeout(PEER_TIMEOUT, proto::read_frame(&mut s))
                .await
                .map_err(|_| proto::Error::BadFrame("no request".into()))??;
            if theirs.cluster.is_empty() && !matches!(f.msg, Message::JoinCluster { .. }) {
                return refuse(&mut s, "join the cluster first".into()).await;
            }
            node.cluster().heard_from(&theirs.node);
            if let Message::Attach { resource } = f.msg {
                return attach(s, &node, &resource).await;
            }
            rpc(&mut s, &node, &theirs, f.msg).await
        }
    }
}

/// A remote device session: served by this node while it is primary.
async fn attach(mut s: BoxStream, node: &Arc<Node>, resource: &str) -> proto::Result<()> {
    let opened = node
        .resource(resource)
        .ok()
        .and_then(|r| Some((r.open()?, r)));
    let Some((handle, res)) = opened else {
        return refuse(
            &mut s,
            format!("{} is not primary of {resource}", node.name()),
        )
        .await;
    };
    let size = handle.size();
    let history = node
        .cluster()
        .primary_of(resource)
        .filter(|p| p.node == node.name());
    let attached = Message::Attached {
        size,
        history,
        lineage: res.store().lineage().epochs().to_vec(),
    };
    proto::write_frame(&mut s, &attached, &[]).await?;
    tracing::info!(resource, "remote device session started");
    let log_end = move || {
        res.counters()
            .appended
            .load(std::sync::atomic::Ordering::Acquire)
    };
    crate::frontend::remote::serve(s, Arc::new(handle), log_end).await
}

async fn rpc(s: &mut BoxStream, node: &Arc<Node>, peer: &Hello, req: Message) -> proto::Result<()> {
    let answer = match req {
        Message::Gossip { state } => {
            node.cluster().merge(&state);
            Message::GossipAck
        }
        Message::JoinCluster { node: joiner, addr } => {
            match node.accept_member(&joiner, &addr).await {
                Ok(state) => Message::Joined {
                    state: Box::new(state),
                },
                Err(e) => return refuse(s, e).await,
            }
        }
        Message::GetResource { .. } => Message::ResourceIs {
            state: Box::new(node.cluster().state()),
        },
        Message::SyncStart {
            resource,
            node: joiner,
        } => {
            let Some((res, logger)) = node.primary_of(&resource) else {
                return refuse(s, format!("{} is not primary of {resource}", node.name())).await;
            };
            // Position and sequence number of one moment: the end of
            // what the log store has noted (every record before it is in
            // the overlay or on the device, so the copy holds it).
            let Some((start_pos, next_seq)) = res.store().end() else {
                return refuse(s, format!("{resource} has no log on {}", node.name())).await;
            };
            res.pin(&joiner, start_pos);
            tracing::info!(resource = %resource, node = %joiner, pos = start_pos, "replica starts a full sync");
            Message::SyncStarted {
                start_pos,
                size: logger.size(),
                generation: res.meta().generation,
                next_seq,
                lineage: res.store().lineage().epochs().to_vec(),
            }
        }
        Message::Checksums {
            resource,
            offset,
            chunk,
            count,
        } => {
            let Some((_, logger)) = node.primary_of(&resource) else {
                return refuse(s, format!("{} is not primary of {resource}", node.name())).await;
            };
            if chunk == 0 || chunk > fullsync::CHUNK * 4 || count > 1024 {
                return refuse(
                    s,
                    format!("bad checksum request: {count} chunks of {chunk} bytes"),
                )
                .await;
            }
            match fullsync::checksums(&*logger, offset, chunk, count).await {
                Ok(digests) => Message::ChecksumList { digests },
                Err(e) => return refuse(s, e.to_string()).await,
            }
        }
        Message::ReadChunk {
            resource,
            offset,
            len,
        } => {
            let Some((res, logger)) = node.primary_of(&resource) else {
                return refuse(s, format!("{} is not primary of {resource}", node.name())).await;
            };
            if len > fullsync::CHUNK * 4 {
                return refuse(s, format!("chunk of {len} bytes is too large")).await;
            }
            match logger.read(offset, len).await {
                Ok(data) => {
                    let link = node.ship_limits.link(&peer.node);
                    let mut enc = proto::Encoder::new(node.cluster().compression.towards(peer))?;
                    let (encoding, wire) = crate::net::block_in_place(|| enc.encode(&data));
                    let msg = Message::Chunk { encoding };
                    ratelimit::take(link.as_deref(), wire.len() as u64).await;
                    let sent = proto::write_frame_len(s, &msg, &wire).await?;
                    let c = res.counters();
                    c.shipped_bytes.fetch_add(data.len() as u64, Relaxed);
                    c.shipped_wire_bytes.fetch_add(sent, Relaxed);
                    return Ok(());
                }
                Err(e) => return refuse(s, e.to_string()).await,
            }
        }
        Message::Position { resource } => {
            let Ok(res) = node.resource(&resource) else {
                return refuse(s, format!("no resource {resource} on {}", node.name())).await;
            };
            let c = res.counters();
            use std::sync::atomic::Ordering::Acquire;
            Message::PositionIs {
                appended: c.appended.load(Acquire),
                flushed: c.flushed.load(Acquire),
            }
        }
        Message::Handover { resource, to } => match node.hand_over(&resource, &to).await {
            Ok((end_pos, generation)) => Message::HandedOver {
                end_pos,
                generation,
            },
            Err(e) => return refuse(s, e.to_string()).await,
        },
        Message::Fetch {
            resource,
            from_pos,
            file_seq,
            before,
        } => {
            let from = Resume {
                pos: from_pos,
                file_seq,
                before,
            };
            return ship(s, node, peer, &resource, from).await;
        }
        other => return refuse(s, format!("unexpected request {other:?}")).await,
    };
    proto::write_frame(s, &answer, &[]).await
}

/// Ends a refusal to ship because the log from the asked position on is
/// gone here (the fetcher of a replica refused so by its primary resyncs).
pub const LOG_GONE: &str = "a full sync is needed";

/// Begins a refusal to ship onto a copy of the log that holds another
/// history than this log under the same name.
pub const DIVERGED: &str = "the logs diverged";

/// Where a fetcher's copy of the log ends (see [`Message::Fetch`]).
struct Resume {
    pos: u64,
    file_seq: Option<u64>,
    before: Option<u32>,
}

/// Streams logfiles from `from.pos` on, up to what is durable here, and
/// keeps streaming as the log grows. Only whole, checked records travel,
/// and only onto a copy that ends in the same record as this log there.
async fn ship(
    s: &mut BoxStream,
    node: &Arc<Node>,
    peer: &Hello,
    resource: &str,
    from: Resume,
) -> proto::Result<()> {
    let Resume {
        pos: from_pos,
        file_seq: mut client_file,
        before: mut unchecked,
    } = from;
    let Ok(res) = node.resource(resource) else {
        return refuse(s, format!("no resource {resource} on {}", node.name())).await;
    };
    if res.meta().disconnected {
        return refuse(s, format!("{resource} is disconnected on {}", node.name())).await;
    }
    // A replica that serves in the primary's stead must be on its history
    // (it may hold a deposed one it has not yet been told of).
    if res.logger().is_none()
        && let Some(p) = node.cluster().primary_of(resource)
        && let Some(fork) = res.fork_from(&p)
    {
        return refuse(
            s,
            format!(
                "the log of {resource} on {} leaves the history of {} at position {fork}",
                node.name(),
                p.node
            ),
        )
        .await;
    }
    let store = Arc::clone(res.store());
    let files = store.files();
    let mut pos = from_pos;
    if client_file.is_none() {
        // A new replica takes the whole logfile holding its start position.
        match files.iter().rev().find(|f| f.header.start_pos <= from_pos) {
            Some(f) => pos = f.header.start_pos,
            None => {
                return refuse(
                    s,
                    format!(
                        "log position {from_pos} of {resource} is not available on {}: {LOG_GONE}",
                        node.name()
                    ),
                )
                .await;
            }
        }
    }
    if files.first().is_some_and(|f| pos < f.header.start_pos) {
        return refuse(
            s,
            format!(
                "log position {pos} of {resource} was deleted on {}: {LOG_GONE}",
                node.name()
            ),
        )
        .await;
    }
    let compression = node.cluster().compression.towards(peer);
    let mut enc = proto::Encoder::new(compression)?;
    let link = node.ship_limits.link(&peer.node);
    // Under a tight limit, smaller frames: each passes within a fraction of
    // a second, so that the peer never mistakes the wait for silence.
    let frame_bytes = link.as_ref().map_or(SHIP_BYTES, |l| {
        SHIP_BYTES.min((l.rate() / 4).max(64 << 10) as usize)
    });
    tracing::info!(%resource, peer = %peer.node, pos, ?compression, rate_limit = link.as_ref().map(|l| l.rate()), "shipping log");
    let mut last_sent = Instant::now();
    // An `Idle` is sent as soon as the peer has everything durable here:
    // it syncs its copy then, instead of holding the last records back
    // from its applier until the next heartbeat.
    let mut caught_up_told = true;
    let counters = res.counters();
    // One buffer for every batch read for this peer.
    let mut batch = Vec::new();
    loop {
        if res.meta().disconnected {
            return refuse(s, format!("{resource} was disconnected on {}", node.name())).await;
        }
        // Registered before `flushed` is read, so that no sync in between
        // goes unnoticed: new records are shipped as soon as they are durable.
        let changed = counters.flushed_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let limit = counters.flushed.load(std::sync::atomic::Ordering::Acquire);
        // Checked once this log reaches the fetcher's end (a source that
        // lags behind its fetcher may get there later).
        if let Some(theirs) = unchecked
            && limit >= from_pos
        {
            if let Err(reason) = same_record_before(&store, from_pos, theirs) {
                tracing::error!(%resource, peer = %peer.node, pos = from_pos, %reason, "not shipping onto a diverged copy of the log");
                return refuse(s, reason).await;
            }
            unchecked = None;
        }
        let raw =
            crate::net::block_in_place(|| store.read_records(pos, limit, frame_bytes, &mut batch))
                .map_err(|e| proto::Error::Io(std::io::Error::other(e.to_string())))?;
        match raw {
            Some(raw) if raw.records > 0 => {
                if client_file != Some(raw.file.file_seq) {
                    let msg = Message::LogFile {
                        file_seq: raw.file.file_seq,
                        origin: raw.file.origin.clone(),
                    };
                    proto::write_frame(s, &msg, &raw.file.header.encode()).await?;
                    client_file = Some(raw.file.file_seq);
                }
                let (encoding, wire) = crate::net::block_in_place(|| enc.encode(&batch));
                let msg = Message::LogData {
                    pos,
                    records: raw.records,
                    encoding,
                };
                ratelimit::take(link.as_deref(), wire.len() as u64).await;
                let sent = proto::write_frame_len(s, &msg, &wire).await?;
                counters
                    .shipped_bytes
                    .fetch_add(batch.len() as u64, Relaxed);
                counters.shipped_wire_bytes.fetch_add(sent, Relaxed);
                pos += batch.len() as u64;
                if batch.capacity() > 4 * frame_bytes {
                    // A batch grown for one huge record is not kept.
                    batch = Vec::new();
                }
                last_sent = Instant::now();
                caught_up_told = false;
            }
            _ => {
                if !caught_up_told || last_sent.elapsed() >= HEARTBEAT {
                    proto::write_frame(s, &Message::Idle { flushed: limit }, &[]).await?;
                    last_sent = Instant::now();
                    caught_up_told = true;
                }
                // A bounded wait: `disconnected` and the heartbeat are
                // checked at least this often.
                let _ = tokio::time::timeout(Duration::from_millis(250), changed).await;
            }
        }
    }
}

/// Whether this log's record before `pos` is the fetcher's, whose
/// checksum is `theirs`; the refusal's reason if not.
fn same_record_before(store: &LogStore, pos: u64, theirs: u32) -> Result<(), String> {
    let ours = match crate::net::block_in_place(|| store.record_before(pos)) {
        Ok(ours) => ours,
        Err(e) => {
            // Damage at rest in a record that was shipped long ago must not
            // stop the stream from here on (which reads only later records):
            // the check is skipped, and said.
            tracing::warn!(pos, error = %e, "the record before the fetcher's end is unreadable here: not compared");
            return Ok(());
        }
    };
    let diverged = |what: &str| {
        format!(
            "{DIVERGED} at position {pos}: {what}; invalidate the fetching replica to resync it"
        )
    };
    match ours {
        RecordBefore::Ends(crc) if crc == theirs => Ok(()),
        RecordBefore::Ends(crc) => Err(diverged(&format!(
            "the record ending there has checksum {crc:08x} here, {theirs:08x} there"
        ))),
        RecordBefore::NoBoundary => Err(diverged("no record ends there here")),
        // Deleted here once every replica had it: nothing to compare.
        RecordBefore::NotKept => Ok(()),
    }
}
