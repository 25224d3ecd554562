//! Full sync of a joining replica: copy the primary's logical device (what
//! reads return, overlay included) while the primary keeps writing. Fast:
//! both sides hash chunks and only chunks whose digests differ travel.
//! Correctness: the copy starts after the primary pinned its log at the
//! sync's start position S, every chunk read reflects the device at some
//! position ≥ S, and the end position E is taken after the last read; so
//! replaying the log from S over the copy gives the primary's device at
//! every position ≥ E. Until replay passes E the replica is Inconsistent.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

// tokio's: simulated time in a simulation, else the real clock.
use tokio::time::Instant;

use super::proto::{self, Message, Purpose};
use crate::cluster::Cluster;
use crate::frontend::{BlockIo, IoError};
use crate::resource::Resource;

pub const CHUNK: u32 = 1 << 20;
/// Chunks whose digests one request asks for.
const BATCH: u32 = 32;

/// Digest of one chunk, as hex.
pub fn digest(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Primary side: digests of `count` chunks from `offset`.
pub async fn checksums(
    dev: &impl BlockIo,
    offset: u64,
    chunk: u32,
    count: u32,
) -> Result<Vec<String>, IoError> {
    let size = dev.size();
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as u64 {
        let off = offset + i * chunk as u64;
        if off >= size {
            break;
        }
        let len = (size - off).min(chunk as u64) as u32;
        out.push(digest(&dev.read(off, len).await?));
    }
    Ok(out)
}

pub async fn run(res: Arc<Resource>, cluster: Arc<Cluster>) {
    let name = res.name().to_string();
    let mut backoff = Duration::from_millis(200);
    loop {
        match copy(&res, &cluster).await {
            Ok(target) => {
                if let Err(e) = res.update_meta(|m| {
                    if let Some(s) = m.sync.as_mut() {
                        s.target = Some(target);
                    }
                }) {
                    tracing::error!(resource = %name, error = %e, "recording the end of the full sync failed");
                } else {
                    tracing::info!(resource = %name, target, "full sync copy done; replaying the log to its end");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(resource = %name, error = %e, "full sync interrupted; retrying");
                *res.repl_error.lock().expect("error lock") = Some(format!("full sync: {e}"));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

async fn copy(res: &Arc<Resource>, cluster: &Arc<Cluster>) -> Result<u64, String> {
    let state = cluster.state();
    let primary = state
        .resource(res.name())
        .and_then(|r| r.primary())
        .cloned()
        .ok_or("no primary known")?;
    // The copy is of the primary the sync started from (its generation):
    // another one's device may hold a divergent tail. The reconcile loop
    // starts the sync over from the new primary.
    let generation = res.meta().generation;
    if primary.generation != generation {
        return Err(format!(
            "the primary changed since this full sync started (generation {generation}, now {} on {})",
            primary.generation, primary.node
        ));
    }
    let addr = cluster
        .addr_of(&primary.node)
        .ok_or_else(|| format!("no address for {}", primary.node))?;
    let hello = cluster.hello(Purpose::Rpc);
    let node = Some(primary.node.as_str());
    let size = res.meta().size;
    let started = Instant::now();
    *res.sync_progress.lock().expect("progress lock") = Some((0, size, started));
    let mut offset = 0u64;
    let mut sent = 0u64;
    while offset < size {
        let req = Message::Checksums {
            resource: res.name().into(),
            offset,
            chunk: CHUNK,
            count: BATCH,
        };
        let remote = match proto::call(&*cluster.net, &addr, &hello, node, &req, &[])
            .await
            .map_err(|e| e.to_string())?
            .msg
        {
            Message::ChecksumList { digests } => digests,
            other => return Err(format!("unexpected answer {other:?}")),
        };
        for (i, theirs) in remote.iter().enumerate() {
            let off = offset + i as u64 * CHUNK as u64;
            let len = (size - off).min(CHUNK as u64) as usize;
            let mut local = vec![0u8; len];
            crate::net::block_in_place(|| res.backing().read_exact_or_zero(&mut local, off))
                .map_err(|e| e.to_string())?;
            if digest(&local) == *theirs {
                continue;
            }
            let req = Message::ReadChunk {
                resource: res.name().into(),
                offset: off,
                len: len as u32,
            };
            let f = proto::call(&*cluster.net, &addr, &hello, node, &req, &[])
                .await
                .map_err(|e| e.to_string())?;
            let Message::Chunk { encoding } = f.msg else {
                return Err(format!("unexpected answer {:?}", f.msg));
            };
            let wire_len = f.wire_len;
            let data =
                proto::decode(f.data, encoding, len).map_err(|e| format!("chunk at {off}: {e}"))?;
            if data.len() != len {
                return Err(format!(
                    "chunk at {off}: {} bytes instead of {len}",
                    data.len()
                ));
            }
            crate::net::block_in_place(|| res.backing().write_all_at(&data, off))
                .map_err(|e| e.to_string())?;
            let c = res.counters();
            c.received_bytes.fetch_add(len as u64, Relaxed);
            c.received_wire_bytes.fetch_add(wire_len, Relaxed);
            sent += len as u64;
        }
        offset += BATCH as u64 * CHUNK as u64;
        *res.sync_progress.lock().expect("progress lock") = Some((offset.min(size), size, started));
    }
    crate::net::block_in_place(|| res.backing().sync_data()).map_err(|e| e.to_string())?;
    let end = match proto::call(
        &*cluster.net,
        &addr,
        &hello,
        node,
        &Message::Position {
            resource: res.name().into(),
        },
        &[],
    )
    .await
    .map_err(|e| e.to_string())?
    .msg
    {
        Message::PositionIs { appended, .. } => appended,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    if cluster.primary_of(res.name()).as_ref() != Some(&primary) {
        return Err(format!(
            "{} was deposed during the copy; starting over from the new primary",
            primary.node
        ));
    }
    tracing::info!(resource = %res.name(), bytes = size, sent, secs = started.elapsed().as_secs_f64(), "full sync copied the device");
    *res.sync_progress.lock().expect("progress lock") = None;
    Ok(end)
}
