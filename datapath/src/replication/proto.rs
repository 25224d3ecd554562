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
//!
//! Bulk data may travel zstd-compressed ([`Encoding`]): each side lists the
//! codecs it accepts in its hello (`compression`), and a sender compresses
//! only for a peer that listed the codec (peers that predate it list none and
//! get raw data). Each frame is compressed on its own (memory stays bounded
//! by the frame size); a frame that does not shrink by 1/8 travels raw. The frame
//! checksum covers the bytes on the wire; what decompresses is bounded by
//! the raw length the message announces and must match it exactly.

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
    /// Codecs this node accepts for bulk data, e.g. `["zstd"]`. Absent in
    /// the hellos of older nodes: they get raw data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compression: Vec<String>,
}

/// The codec name of zstd in hellos.
pub const ZSTD: &str = "zstd";

/// How a frame's data travels when it is not raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "snake_case")]
pub enum Encoding {
    /// One zstd frame that decompresses to exactly `raw_len` bytes.
    Zstd { raw_len: u32 },
}

/// What this node sends compressed: off, or zstd at a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Off,
    Zstd { level: i32 },
}

impl Compression {
    /// The default: zstd at level 1 (fast; log data rarely gains from more).
    pub const DEFAULT: Compression = Compression::Zstd { level: 1 };

    /// Parses `off`, `zstd` or `zstd:LEVEL` (1-19).
    pub fn parse(s: &str) -> std::result::Result<Compression, String> {
        let bad = || format!("invalid compression '{s}': use off, zstd or zstd:LEVEL (LEVEL 1-19)");
        match s.trim() {
            "off" | "none" => Ok(Compression::Off),
            "zstd" => Ok(Compression::DEFAULT),
            t => {
                let level = t.strip_prefix("zstd:").ok_or_else(bad)?;
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(1..=19).contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd { level })
            }
        }
    }

    /// The codecs to list in our hello.
    pub fn offer(self) -> Vec<String> {
        match self {
            Compression::Off => Vec::new(),
            Compression::Zstd { .. } => vec![ZSTD.to_string()],
        }
    }

    /// What we send to a peer whose hello is `theirs`: compressed only if
    /// we want to and it accepts zstd.
    pub fn towards(self, theirs: &Hello) -> Compression {
        match self {
            Compression::Zstd { .. } if theirs.compression.iter().any(|c| c == ZSTD) => self,
            _ => Compression::Off,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::DEFAULT
    }
}

/// Compresses frame data for one link (one zstd context, reused).
pub struct Encoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Frames still to send raw without trying (after frames that did not
    /// compress: a stream of incompressible data costs no CPU).
    skip: u32,
    /// Frames to skip after the next one that does not compress; doubles
    /// up to [`MAX_SKIP`], back to 0 when one compresses.
    backoff: u32,
}

/// At most this many frames (of up to 1 MiB) go raw between two tries.
const MAX_SKIP: u32 = 64;

impl Encoder {
    pub fn new(c: Compression) -> Result<Encoder> {
        let zstd = match c {
            Compression::Off => None,
            Compression::Zstd { level } => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::BadFrame(format!("zstd level {level}: {e}")))?,
            ),
        };
        Ok(Encoder {
            zstd,
            skip: 0,
            backoff: 0,
        })
    }

    /// The data to send and its encoding: compressed when that saves at
    /// least 1/8 of it, else raw (`None`). Less is not worth the CPU: on a
    /// fast link, compressing data that barely shrinks slows shipping down.
    /// After a frame that did not compress, the next 1, 2, 4 … 64 frames
    /// travel raw without a try.
    pub fn encode<'a>(&mut self, raw: &'a [u8]) -> (Option<Encoding>, std::borrow::Cow<'a, [u8]>) {
        use std::borrow::Cow;
        let Some(z) = self.zstd.as_mut() else {
            return (None, Cow::Borrowed(raw));
        };
        if raw.len() < 64 || raw.len() > MAX_DATA as usize {
            return (None, Cow::Borrowed(raw));
        }
        if self.skip > 0 {
            self.skip -= 1;
            return (None, Cow::Borrowed(raw));
        }
        match z.compress(raw) {
            Ok(packed) if packed.len() <= raw.len() - raw.len() / 8 => {
                self.backoff = 0;
                (
                    Some(Encoding::Zstd {
                        raw_len: raw.len() as u32,
                    }),
                    Cow::Owned(packed),
                )
            }
            _ => {
                self.backoff = (self.backoff * 2).clamp(1, MAX_SKIP);
                self.skip = self.backoff;
                (None, Cow::Borrowed(raw))
            }
        }
    }
}

/// The raw data of a frame whose data travelled as `enc`. A raw length
/// beyond `max` or data that does not decompress to exactly the announced
/// length is a [`Error::BadFrame`].
pub fn decode(data: Bytes, enc: Option<Encoding>, max: usize) -> Result<Bytes> {
    let Some(Encoding::Zstd { raw_len }) = enc else {
        return Ok(data);
    };
    let raw_len = raw_len as usize;
    if raw_len > max.min(MAX_DATA as usize) {
        return Err(Error::BadFrame(format!(
            "compressed data announces {raw_len} bytes, more than the {max} allowed"
        )));
    }
    let raw = zstd::bulk::decompress(&data, raw_len).map_err(|e| {
        Error::BadFrame(format!(
            "zstd data of {} bytes does not decompress: {e}",
            data.len()
        ))
    })?;
    if raw.len() != raw_len {
        return Err(Error::BadFrame(format!(
            "zstd data decompressed to {} bytes, {raw_len} were announced",
            raw.len()
        )));
    }
    Ok(Bytes::from(raw))
}

/// One frame: a message and the raw bytes it carries (if any).
#[derive(Debug, Clone)]
pub struct Frame<M> {
    pub msg: M,
    pub data: Bytes,
    /// Bytes the whole frame took on the wire.
    pub wire_len: u64,
}

pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    msg: &M,
    data: &[u8],
) -> Result<()> {
    write_frame_len(w, msg, data).await.map(|_| ())
}

/// [`write_frame`], returning how many bytes the frame took on the wire.
pub async fn write_frame_len<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    msg: &M,
    data: &[u8],
) -> Result<u64> {
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
    Ok((head.len() + data.len() + 4) as u64)
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
    // Read into uninitialized capacity: zeroing a buffer of up to a MiB per
    // frame first was a measurable share of a secondary's catch-up CPU.
    let len = meta_len as usize + data_len as usize + 4;
    let mut body = bytes::BytesMut::with_capacity(len);
    let mut rest = (&mut *r).take(len as u64);
    while body.len() < len {
        if rest.read_buf(&mut body).await? == 0 {
            return Err(Error::Closed);
        }
    }
    let n = body.len() - 4;
    let crc = u32::from_le_bytes(body[n..].try_into().expect("4 bytes"));
    if crc32c::crc32c_append(crc32c::crc32c(&head), &body[..n]) != crc {
        return Err(Error::BadFrame("checksum mismatch".into()));
    }
    let msg = serde_json::from_slice(&body[..meta_len as usize])
        .map_err(|e| Error::BadFrame(format!("undecodable message: {e}")))?;
    body.truncate(n);
    let wire_len = (HEADER_LEN + body.len() + 4) as u64;
    let data = body.freeze().slice(meta_len as usize..);
    Ok(Frame {
        msg,
        data,
        wire_len,
    })
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
        /// The histories of the primary's log up to `start_pos` (the
        /// replica's log begins there; see `log::lineage`). Empty from
        /// older peers.
        #[serde(default)]
        lineage: Vec<crate::log::Epoch>,
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
    Chunk {
        /// How the chunk travels (absent: raw).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
    },
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
    /// logfile holding `from_pos`. `before` is the checksum of the
    /// fetcher's record that ends at `from_pos`: the source ships nothing
    /// unless its own record there is the same (the two logs are one
    /// history). Absent when the fetcher holds no such record.
    Fetch {
        resource: String,
        from_pos: u64,
        file_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u32>,
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
        /// How the records travel (absent: raw).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
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
        /// The histories of the primary's log, oldest first: where it left
        /// the history of a device's last acknowledged write. Empty from
        /// older peers.
        #[serde(default)]
        lineage: Vec<crate::log::Epoch>,
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
    net: &dyn crate::net::Network,
    addr: &str,
    ours: &Hello,
    expect_node: Option<&str>,
) -> Result<(crate::net::BoxStream, Hello)> {
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(3), net.connect(addr))
        .await
        .map_err(|_| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            ))
        })??;
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
    net: &dyn crate::net::Network,
    addr: &str,
    ours: &Hello,
    expect_node: Option<&str>,
    req: &Message,
    data: &[u8],
) -> Result<Frame<Message>> {
    let (mut s, _) = connect(net, addr, ours, expect_node).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Log-like data: repeated text with a counter, compresses well.
    fn compressible(len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        let mut i = 0u64;
        while v.len() < len {
            v.extend_from_slice(format!("record {i:08} of a compressible workload; ").as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    fn incompressible(len: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn send_and_receive(enc: &mut Encoder, raw: &[u8]) -> (Option<Encoding>, u64, Bytes) {
        let (encoding, wire) = enc.encode(raw);
        let msg = Message::LogData {
            pos: 7,
            records: 1,
            encoding,
        };
        let mut buf = Vec::new();
        let sent = write_frame_len(&mut buf, &msg, &wire).await.unwrap();
        assert_eq!(sent, buf.len() as u64);
        let f: Frame<Message> = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(f.wire_len, sent);
        let Message::LogData { encoding: got, .. } = f.msg else {
            panic!("not log data: {:?}", f.msg);
        };
        assert_eq!(got, encoding);
        (
            encoding,
            sent,
            decode(f.data, got, MAX_DATA as usize).unwrap(),
        )
    }

    #[tokio::test]
    async fn compressed_frames_roundtrip_to_the_same_bytes_and_take_less_wire() {
        let mut enc = Encoder::new(Compression::DEFAULT).unwrap();
        let raw = compressible(1 << 20);
        let (encoding, sent, back) = send_and_receive(&mut enc, &raw).await;
        assert_eq!(encoding, Some(Encoding::Zstd { raw_len: 1 << 20 }));
        assert_eq!(&back[..], &raw[..]);
        assert!(sent < raw.len() as u64 / 4, "{sent} bytes on the wire");
        // The context is reused: a second frame works the same.
        let raw2 = compressible(300_000);
        let (_, _, back2) = send_and_receive(&mut enc, &raw2).await;
        assert_eq!(&back2[..], &raw2[..]);
    }

    #[tokio::test]
    async fn incompressible_data_travels_raw() {
        let mut enc = Encoder::new(Compression::Zstd { level: 3 }).unwrap();
        let raw = incompressible(1 << 20);
        let (encoding, sent, back) = send_and_receive(&mut enc, &raw).await;
        assert_eq!(encoding, None);
        assert_eq!(&back[..], &raw[..]);
        assert!(sent > raw.len() as u64);
        // Tiny frames are not worth a zstd frame either.
        assert_eq!(enc.encode(b"short").0, None);
    }

    #[test]
    fn after_incompressible_frames_the_encoder_tries_less_often() {
        let mut enc = Encoder::new(Compression::DEFAULT).unwrap();
        let noise = incompressible(1 << 16);
        let text = compressible(1 << 16);
        // Noise, then text: the frame right after the noise goes raw untried.
        assert_eq!(enc.encode(&noise).0, None);
        assert_eq!(enc.encode(&text).0, None);
        assert!(enc.encode(&text).0.is_some());
        // Noise after noise: the untried stretch doubles, up to MAX_SKIP.
        let mut tried = 0;
        for _ in 0..400 {
            if enc.skip == 0 {
                tried += 1;
            }
            assert_eq!(enc.encode(&noise).0, None);
        }
        assert!(tried < 20, "{tried} tries on 400 incompressible frames");
        assert!(enc.skip <= MAX_SKIP);
        // Text again: compressed once the stretch is over, at most MAX_SKIP frames on.
        let raw_first = (0..=MAX_SKIP)
            .take_while(|_| enc.encode(&text).0.is_none())
            .count();
        assert!(raw_first <= MAX_SKIP as usize, "{raw_first}");
        assert!(enc.encode(&text).0.is_some());
    }

    /// Data that shrinks by less than 1/8 is not worth compressing.
    #[test]
    fn barely_compressible_data_travels_raw() {
        let mut enc = Encoder::new(Compression::DEFAULT).unwrap();
        // 95 % noise, 5 % zeros: zstd saves about 5 %.
        let mut raw = incompressible(1 << 20);
        raw[..50_000].fill(0);
        assert_eq!(enc.encode(&raw).0, None);
    }

    #[tokio::test]
    async fn compression_off_sends_raw() {
        let mut enc = Encoder::new(Compression::Off).unwrap();
        let raw = compressible(1 << 16);
        let (encoding, _, back) = send_and_receive(&mut enc, &raw).await;
        assert_eq!(encoding, None);
        assert_eq!(&back[..], &raw[..]);
    }

    #[test]
    fn decompression_is_bounded_by_the_announced_length() {
        let raw = compressible(1 << 20);
        let packed = Bytes::from(zstd::bulk::compress(&raw, 1).unwrap());
        // More than the receiver allows: refused before decompressing.
        let e = decode(
            packed.clone(),
            Some(Encoding::Zstd { raw_len: 1 << 20 }),
            1 << 19,
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // Less than what the data holds: refused, not a larger buffer.
        let e = decode(
            packed.clone(),
            Some(Encoding::Zstd { raw_len: 1 << 19 }),
            MAX_DATA as usize,
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadFrame(_)), "{e}");
        // More than what the data holds: the lengths disagree.
        let e = decode(
            packed,
            Some(Encoding::Zstd {
                raw_len: (1 << 20) + 1,
            }),
            MAX_DATA as usize,
        )
        .unwrap_err();
        assert!(e.to_string().contains("announced"), "{e}");
        // Beyond any frame: refused whatever the caller allows.
        let e = decode(
            Bytes::new(),
            Some(Encoding::Zstd { raw_len: u32::MAX }),
            usize::MAX,
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[tokio::test]
    async fn a_corrupted_compressed_frame_is_a_clear_error() {
        let raw = compressible(1 << 18);
        let mut packed = zstd::bulk::compress(&raw, 1).unwrap();
        let encoding = Some(Encoding::Zstd {
            raw_len: raw.len() as u32,
        });
        // Damaged on the wire: the frame checksum catches it.
        let mut buf = Vec::new();
        let msg = Message::LogData {
            pos: 0,
            records: 1,
            encoding,
        };
        write_frame(&mut buf, &msg, &packed).await.unwrap();
        let n = buf.len();
        buf[n - 100] ^= 0x40;
        let e = read_frame::<_, Message>(&mut buf.as_slice())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // Damaged before it was framed (the checksum matches): decoding
        // fails with a reason, whichever byte it is.
        for at in [0, 5, packed.len() / 2, packed.len() - 1] {
            packed[at] ^= 0xff;
            let e = decode(Bytes::from(packed.clone()), encoding, MAX_DATA as usize);
            packed[at] ^= 0xff;
            match e {
                Err(Error::BadFrame(why)) => assert!(why.contains("zstd"), "{why}"),
                // A flip in a literal can decompress to other bytes of the
                // right length; the records' own checksums catch that.
                Ok(b) => assert_ne!(&b[..], &raw[..], "byte {at}"),
                Err(e) => panic!("byte {at}: {e}"),
            }
        }
        let e = decode(
            Bytes::from_static(b"not zstd at all"),
            encoding,
            MAX_DATA as usize,
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not decompress"), "{e}");
    }

    #[test]
    fn compression_is_used_only_when_both_sides_want_it() {
        let hello = |compression: Compression| Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "c".into(),
            node: "b".into(),
            advertise: "b:1".into(),
            purpose: Purpose::Rpc,
            compression: compression.offer(),
        };
        let zstd3 = Compression::Zstd { level: 3 };
        assert_eq!(zstd3.towards(&hello(Compression::DEFAULT)), zstd3);
        assert_eq!(zstd3.towards(&hello(Compression::Off)), Compression::Off);
        assert_eq!(
            Compression::Off.towards(&hello(Compression::DEFAULT)),
            Compression::Off
        );
        // A node that predates compression sends a hello without the field.
        let old = r#"{"type":"hello","protocol":1,"cluster":"c","node":"b","advertise":"b:1","purpose":"rpc"}"#;
        let Message::Hello(h) = serde_json::from_str(old).unwrap() else {
            panic!("not a hello");
        };
        assert!(h.compression.is_empty());
        assert_eq!(zstd3.towards(&h), Compression::Off);
        // ... and its raw data messages still parse.
        let m: Message =
            serde_json::from_str(r#"{"type":"log_data","pos":1,"records":2}"#).unwrap();
        assert!(matches!(m, Message::LogData { encoding: None, .. }));
        let m: Message = serde_json::from_str(r#"{"type":"chunk"}"#).unwrap();
        assert!(matches!(m, Message::Chunk { encoding: None }));
        // Raw messages look to it as they always did.
        let raw = serde_json::to_string(&Message::Chunk { encoding: None }).unwrap();
        assert_eq!(raw, r#"{"type":"chunk"}"#);
    }

    proptest::proptest! {
        /// Any data, compressible (a repeated pattern) or not, comes back
        /// as it was sent, and the wire never carries more than raw would.
        #[test]
        fn any_data_decodes_to_what_was_encoded(
            pattern in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300),
            reps in 0usize..3000,
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            level in 1i32..6,
        ) {
            let mut raw = pattern.repeat(reps);
            raw.extend_from_slice(&noise);
            let mut enc = Encoder::new(Compression::Zstd { level }).unwrap();
            let (encoding, wire) = enc.encode(&raw);
            proptest::prop_assert!(wire.len() <= raw.len());
            let back = decode(Bytes::copy_from_slice(&wire), encoding, raw.len()).unwrap();
            proptest::prop_assert_eq!(&back[..], &raw[..]);
        }
    }

    #[test]
    fn compression_settings_parse() {
        assert_eq!(Compression::parse("off").unwrap(), Compression::Off);
        assert_eq!(Compression::parse("zstd").unwrap(), Compression::DEFAULT);
        assert_eq!(
            Compression::parse("zstd:9").unwrap(),
            Compression::Zstd { level: 9 }
        );
        for bad in ["", "gzip", "zstd:", "zstd:0", "zstd:20", "zstd:x"] {
            let e = Compression::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid compression"), "{bad}: {e}");
        }
    }
}
