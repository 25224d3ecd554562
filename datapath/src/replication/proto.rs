//! The peer protocol between marsd instances: one byte format, versioned.
//!
//! A connection starts with a [`Hello`] from each side (cluster id, node
//! name, protocol version, what the connection is for); anything unexpected
//! closes it. Then typed frames:
//!
//! ```text
//!  0 magic u16 0x4d50 ("MP")   4 meta_len u32    12 meta (JSON of Message)
//!  2 version u16               8 data_len u32    12+meta_len data (raw bytes)
//!  then crc32c u32 over everything before it
//! ```
//!
//! Control messages travel as JSON (small, easy to evolve and to read in a
//! packet capture); bulk data (log bytes, sync chunks) as raw bytes beside it.
//! Every length is bounded before anything is allocated and the checksum is
//! verified before a frame is trusted.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PROTOCOL_VERSION: u16 = 1;
const MAGIC: u16 = 0x4d50;
const HEADER_LEN: usize = 12;
pub const MAX_META: u32 = 4 << 20;
pub const MAX_DATA: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from peer: {0}")]
    BadFrame(String),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("unexpected message from peer: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Heartbeats and metadata gossip, both ways, for as long as both live.
    Link,
    /// One request, one (possibly streamed) answer.
    Rpc,
}

/// The first frame each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    /// Empty when a fresh node asks to join.
    pub cluster: String,
    pub node: String,
    /// Where this node's replication port can be reached.
    pub advertise: String,
    pub purpose: Purpose,
}

/// One frame: a message and the raw bytes it carries (if any).
#[derive(Debug, Clone)]
pub struct Frame<M> {
    pub msg: M,
    pub data: Bytes,
}

pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    msg: &M,
    data: &[u8],
) -> Result<()> {
    let meta = serde_json::to_vec(msg).map_err(|e| Error::BadFrame(format!("encoding: {e}")))?;
    if meta.len() > MAX_META as usize || data.len() > MAX_DATA as usize {
        return Err(Error::BadFrame(format!(
            "frame too large: {} + {} bytes",
            meta.len(),
            data.len()
        )));
    }
    let mut head = BytesMut::with_capacity(HEADER_LEN + meta.len());
    head.put_u16_le(MAGIC);
    head.put_u16_le(PROTOCOL_VERSION);
    head.put_u32_le(meta.len() as u32);
    head.put_u32_le(data.len() as u32);
    head.put_slice(&meta);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), data);
    w.write_all(&head).await?;
    w.write_all(data).await?;
    w.write_all(&crc.to_le_bytes()).await?;
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin, M: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Frame<M>> {
    let mut head = [0u8; HEADER_LEN];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(Error::Closed),
        Err(e) => return Err(e.into()),
    }
    let magic = u16::from_le_bytes([head[0], head[1]]);
    let version = u16::from_le_bytes([head[2], head[3]]);
    let meta_len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let data_len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(Error::BadFrame(format!(
            "bad magic {magic:#06x}: not a mars peer"
        )));
    }
    if version != PROTOCOL_VERSION {
        return Err(Error::BadFrame(format!(
            "protocol version {version}, this node speaks {PROTOCOL_VERSION}"
        )));
    }
    if meta_len > MAX_META || data_len > MAX_DATA {
        return Err(Error::BadFrame(format!(
            "frame too large: {meta_len} + {data_len} bytes"
        )));
    }
    let mut body = vec![0u8; meta_len as usize + data_len as usize + 4];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io(e),
    })?;
    let n = body.len() - 4;
    let crc = u32::from_le_bytes(body[n..].try_into().expect("4 bytes"));
    if crc32c::crc32c_append(crc32c::crc32c(&head), &body[..n]) != crc {
        return Err(Error::BadFrame("checksum mismatch".into()));
    }
    let msg = serde_json::from_slice(&body[..meta_len as usize])
        .map_err(|e| Error::BadFrame(format!("undecodable message: {e}")))?;
    body.truncate(n);
    let data = Bytes::from(body).slice(meta_len as usize..);
    Ok(Frame { msg, data })
}

/// Every message of the peer protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    /// The other side refuses the connection or the request.
    Refused {
        reason: String,
    },
    /// Link: our whole replicated state (also a heartbeat).
    Gossip {
        state: Box<ClusterState>,
    },
    /// Rpc: acknowledges a pushed `Gossip`.
    GossipAck,
    /// Rpc: a fresh node asks to become a member.
    JoinCluster {
        node: String,
        addr: String,
    },
    Joined {
        state: Box<ClusterState>,
    },
    /// Rpc: what is known of a resource (asked by `join-resource`).
    GetResource {
        name: String,
    },
    ResourceIs {
        state: Box<ClusterState>,
    },
    /// Rpc, to the primary: a new replica starts a full sync; the primary
    /// keeps its logs from the returned position on.
    SyncStart {
        resource: String,
        node: String,
    },
    SyncStarted {
        start_pos: u64,
        size: u64,
        generation: u64,
        /// Sequence number of the record at `start_pos`, so that the
        /// replica's log continues the history's numbering even if it
        /// becomes primary before it has seen a record. 0 (from older
        /// peers): learnt from the first record.
        #[serde(default)]
        next_seq: u64,
    },
    /// Rpc, to the primary: digests of `count` chunks of `chunk` bytes from `offset`.
    Checksums {
        resource: String,
        offset: u64,
        chunk: u32,
        count: u32,
    },
    ChecksumList {
        digests: Vec<String>,
    },
    /// Rpc, to the primary: the device's data (what reads return); data follows.
    ReadChunk {
        resource: String,
        offset: u64,
        len: u32,
    },
    Chunk,
    /// Rpc, to the primary: how far its log is.
    Position {
        resource: String,
    },
    PositionIs {
        appended: u64,
        flushed: u64,
    },
    /// Rpc: stream logfiles of `resource` from `from_pos` on, for as long as
    /// the connection lives. `file_seq` is the logfile the fetcher appends
    /// to; `None` (no local logfile yet) starts at the beginning of the
    /// logfile holding `from_pos`.
    Fetch {
        resource: String,
        from_pos: u64,
        file_seq: Option<u64>,
    },
    /// Rpc, to the primary: planned handover to node `to`. The primary stops
    /// taking writes (its clients get errors), makes its log durable and
    /// answers with where the log ends; `to` catches up to there and takes over.
    Handover {
        resource: String,
        to: String,
    },
    HandedOver {
        end_pos: u64,
        generation: u64,
    },
    /// A logfile starts; data holds its encoded header.
    LogFile {
        file_seq: u64,
        origin: String,
    },
    /// Whole records for the current logfile at log position `pos`; data holds them.
    LogData {
        pos: u64,
        records: u64,
    },
    /// Nothing new (a heartbeat on an idle fetch).
    Idle {
        flushed: u64,
    },
    /// Rpc, to the primary: a remote device session for `resource`. After
    /// `Attached`, the connection carries `Io` requests and `IoDone`
    /// answers (see `frontend::remote`) for as long as it lives.
    Attach {
        resource: String,
    },
    Attached {
        size: u64,
        /// The history the primary writes in (so that a remote device can
        /// tell whether a new primary holds the writes it acknowledged).
        #[serde(default)]
        history: Option<crate::membership::PrimaryInfo>,
    },
    /// One block request; a write's data follows.
    Io {
        id: u64,
        op: crate::frontend::remote::IoOp,
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// Its answer: 0 or a positive errno; a read's data follows.
    IoDone {
        id: u64,
        errno: i32,
        /// For a write, zeroing or flush: the end of the primary's log once
        /// it completed (at least the end of the request's records).
        #[serde(default)]
        pos: u64,
    },
}

use crate::membership::ClusterState;

/// Connects to a peer and exchanges hellos. The peer's hello is checked:
/// same cluster (unless we join), the expected node (if known), not ourselves.
pub async fn connect(
    addr: &str,
    ours: &Hello,
    expect_node: Option<&str>,
) -> Result<(tokio::net::TcpStream, Hello)> {
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to {addr} timed out"),
        ))
    })??;
    s.set_nodelay(true)?;
    write_frame(&mut s, &Message::Hello(ours.clone()), &[]).await?;
    let f: Frame<Message> =
        tokio::time::timeout(std::time::Duration::from_secs(5), read_frame(&mut s))
            .await
            .map_err(|_| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no hello from {addr}"),
                ))
            })??;
    let theirs = match f.msg {
        Message::Hello(h) => h,
        Message::Refused { reason } => return Err(Error::Refused(reason)),
        other => {
            return Err(Error::Unexpected {
                expected: "hello",
                got: format!("{other:?}"),
            });
        }
    };
    check_hello(ours, &theirs, expect_node)?;
    Ok((s, theirs))
}

/// The checks both sides apply to the other's hello.
pub fn check_hello(ours: &Hello, theirs: &Hello, expect_node: Option<&str>) -> Result<()> {
    if theirs.protocol != PROTOCOL_VERSION {
        return Err(Error::Refused(format!(
            "peer speaks protocol {}, we speak {PROTOCOL_VERSION}",
            theirs.protocol
        )));
    }
    if theirs.node == ours.node {
        return Err(Error::Refused(format!(
            "peer has our own node name {}: node names must be unique",
            ours.node
        )));
    }
    if !ours.cluster.is_empty() && !theirs.cluster.is_empty() && theirs.cluster != ours.cluster {
        return Err(Error::Refused(format!(
            "peer {} belongs to cluster {}, we to {}",
            theirs.node, theirs.cluster, ours.cluster
        )));
    }
    if let Some(n) = expect_node
        && n != theirs.node
    {
        return Err(Error::Refused(format!(
            "expected node {n} at that address, found {}",
            theirs.node
        )));
    }
    Ok(())
}

/// One request, one answer, on a fresh Rpc connection.
pub async fn call(
    addr: &str,
    ours: &Hello,
    expect_node: Option<&str>,
    req: &Message,
    data: &[u8],
) -> Result<Frame<Message>> {
    let (mut s, _) = connect(addr, ours, expect_node).await?;
    write_frame(&mut s, req, data).await?;
    let f: Frame<Message> =
        tokio::time::timeout(std::time::Duration::from_secs(30), read_frame(&mut s))
            .await
            .map_err(|_| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from {addr}"),
                ))
            })??;
    if let Message::Refused { reason } = f.msg {
        return Err(Error::Refused(reason));
    }
    Ok(f)
}
