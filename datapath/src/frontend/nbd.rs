//! NBD server: fixed-newstyle handshake, simple replies, over TCP.
//!
//! Every connection is one task: a handshake, then a reader loop that parses
//! requests and runs each one as its own task (clients pipeline, so requests
//! on one connection overlap), and one writer that sends the replies, so a
//! reply header and its read payload are never interleaved with another
//! reply. Structured replies, TLS and metadata contexts are not offered: the
//! clients we care about (Linux kernel, qemu, libnbd) all fall back to simple
//! replies.
//!
//! Wire format: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{BlockIo, ExportTable, IoError, libc_errno};

// Handshake.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

// Option replies; errors have bit 31 set.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What every export offers. CAN_MULTI_CONN holds because all connections
/// write into the same log: a flush on one covers completed writes on all.
const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

// Transmission.
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;

/// Largest READ/WRITE payload; advertised as the maximum block size.
const MAX_PAYLOAD: u32 = 32 << 20;
const PREFERRED_BLOCK: u32 = 4096;
/// Option data beyond this is refused: no option we support needs more.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// The spec's limit for strings such as export names.
const MAX_NAME_LEN: usize = 4096;
/// Options per connection, so a client cannot haggle forever.
const MAX_OPTIONS: usize = 1024;
/// A client that connects and says nothing must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests per connection that are parsed but not yet answered; beyond it
/// we stop reading the socket, which pushes back on the client.
const MAX_IN_FLIGHT: usize = 64;
/// READ/WRITE payload bytes per connection held in memory at once.
const MAX_BYTES_IN_FLIGHT: usize = 2 * MAX_PAYLOAD as usize;

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client flags {0:#x} lack FIXED_NEWSTYLE: old-style clients are not supported")]
    NotFixedNewstyle(u32),
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}: not an NBD client, or out of sync")]
    BadOptionMagic(u64),
    #[error("NBD_OPT_EXPORT_NAME with {0} bytes of name, more than {MAX_NAME_LEN}")]
    NameTooLong(u32),
    #[error("NBD_OPT_EXPORT_NAME asked for export {0:?}, which is not served here")]
    UnknownExport(String),
    #[error("more than {MAX_OPTIONS} options without starting transmission")]
    TooManyOptions,
    #[error("bad request magic {0:#x}: client out of sync")]
    BadRequestMagic(u32),
}

impl Error {
    /// True when the client simply went away; that is logged as a disconnect,
    /// not as a problem.
    fn is_disconnect(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ))
    }
}

/// Serves NBD on `listener` until the returned future is dropped, which also
/// ends every connection (they live in a `JoinSet` owned by this future).
/// Returns only if accepting fails in a way that retrying cannot fix.
pub async fn serve<T: ExportTable>(listener: TcpListener, table: Arc<T>) -> io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = info_span!("nbd", %peer, export = tracing::field::Empty);
                    connections.spawn(connection(stream, table.clone()).instrument(span));
                }
                Err(e) => accept_failed(e).await?,
            },
            Some(done) = connections.join_next() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    error!(error = %e, "NBD connection task panicked");
                }
            }
        }
    }
}

/// Decides whether an accept error is worth retrying. Per-connection
/// failures are; running out of descriptors or memory is too, after a pause
/// so we do not spin; anything else means the listener itself is broken.
async fn accept_failed(e: io::Error) -> io::Result<()> {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) {
        debug!(error = %e, "accept failed for one connection");
        return Ok(());
    }
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    if matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12)) {
        warn!(error = %e, "accept failed: out of resources, retrying shortly");
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Ok(());
    }
    error!(error = %e, "NBD listener failed");
    Err(e)
}

/// One client from connect to close. Errors end only this connection: a
/// failed handshake is a warning (someone is speaking the wrong protocol),
/// a client vanishing during transmission is not.
async fn connection<T: ExportTable>(stream: TcpStream, table: Arc<T>) {
    info!("client connected");
    // Replies are small and latency-bound; do not let Nagle hold them back.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "could not set TCP_NODELAY");
    }
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut writer = BufWriter::new(w);
    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut reader, &mut writer, &*table),
    )
    .await
    .unwrap_or(Err(Error::HandshakeTimeout(HANDSHAKE_TIMEOUT)));
    let (name, handle) = match negotiated {
        Ok(Some(attached)) => attached,
        Ok(None) => {
            info!("client ended the handshake with NBD_OPT_ABORT");
            return;
        }
        Err(e) => {
            warn!(error = %e, "NBD handshake failed, closing connection");
            return;
        }
    };
    tracing::Span::current().record("export", name.as_str());
    info!(size = handle.size(), "client attached export");
    match transmit(reader, writer, handle).await {
        Ok(()) => info!("client disconnected"),
        Err(e) if e.is_disconnect() => info!(error = %e, "client went away"),
        Err(e) => warn!(error = %e, "closing NBD connection"),
    }
}

/// Runs the fixed-newstyle option haggling. Returns the export the client
/// entered transmission with, or `None` after NBD_OPT_ABORT.
async fn handshake<T, R, W>(
    r: &mut R,
    w: &mut W,
    table: &T,
) -> Result<Option<(String, T::Handle)>, Error>
where
    T: ExportTable,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_u64(NBDMAGIC).await?;
    w.write_u64(IHAVEOPT).await?;
    w.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(Error::UnknownClientFlags(client_flags));
    }
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(Error::NotFixedNewstyle(client_flags));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;

    for _ in 0..MAX_OPTIONS {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(Error::BadOptionMagic(magic));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        debug!(option, len, "option");
        // NBD_OPT_EXPORT_NAME has no error reply: all we can do is close.
        if option == OPT_EXPORT_NAME && len as usize > MAX_NAME_LEN {
            return Err(Error::NameTooLong(len));
        }
        if len > MAX_OPTION_LEN {
            discard(r, len).await?;
            option_reply(w, option, REP_ERR_TOO_BIG, b"option data too long").await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data).await?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(handle) = table.open(&name) else {
                    return Err(Error::UnknownExport(name));
                };
                w.write_u64(handle.size()).await?;
                w.write_u16(TRANSMISSION_FLAGS).await?;
                if !no_zeroes {
                    w.write_all(&[0; 124]).await?;
                }
                w.flush().await?;
                return Ok(Some((name, handle)));
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(why) => option_reply(w, option, REP_ERR_INVALID, why.as_bytes()).await?,
                Ok(name) => match table.open(name) {
                    None => {
                        info!(name, "client asked for an unknown export");
                        let msg = unknown_export_message(name);
                        option_reply(w, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    }
                    // For NBD_OPT_INFO the handle is opened only to learn
                    // the size, and dropped again.
                    Some(handle) => {
                        send_export_info(w, option, handle.size()).await?;
                        option_reply(w, option, REP_ACK, &[]).await?;
                        if option == OPT_GO {
                            w.flush().await?;
                            return Ok(Some((name.to_owned(), handle)));
                        }
                    }
                },
            },
            OPT_LIST if !data.is_empty() => {
                option_reply(w, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
            }
            OPT_LIST => {
                for name in table.names() {
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.put_u32(name.len() as u32);
                    entry.put_slice(name.as_bytes());
                    option_reply(w, option, REP_SERVER, &entry).await?;
                }
                option_reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_ABORT => {
                // The client may already be gone; nothing is lost if this fails.
                let _ = option_reply(w, option, REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            _ => option_reply(w, option, REP_ERR_UNSUP, b"option not supported").await?,
        }
        w.flush().await?;
    }
    Err(Error::TooManyOptions)
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO (u32 name length, name,
/// u16 count, count × u16 information types) into the export name. The
/// information requests are ignored: we always send size and block sizes.
fn parse_info_request(data: &[u8]) -> Result<&str, &'static str> {
    let (len, rest) = data
        .split_first_chunk::<4>()
        .ok_or("option data too short")?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_NAME_LEN {
        return Err("export name longer than 4096 bytes");
    }
    if rest.len() < len {
        return Err("export name length exceeds option data");
    }
    let (name, rest) = rest.split_at(len);
    let (count, rest) = rest
        .split_first_chunk::<2>()
        .ok_or("information request count missing")?;
    if rest.len() != 2 * usize::from(u16::from_be_bytes(*count)) {
        return Err("information request count does not match option length");
    }
    std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")
}

/// The human message for NBD_REP_ERR_UNKNOWN, short enough for the spec's
/// 4096-byte string limit whatever the client sent.
fn unknown_export_message(name: &str) -> String {
    if name.len() <= 256 {
        format!("export {name:?} is not served here")
    } else {
        "export is not served here".to_owned()
    }
}

async fn send_export_info<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    size: u64,
) -> io::Result<()> {
    let mut export = Vec::with_capacity(12);
    export.put_u16(INFO_EXPORT);
    export.put_u64(size);
    export.put_u16(TRANSMISSION_FLAGS);
    option_reply(w, option, REP_INFO, &export).await?;

    let mut block = Vec::with_capacity(14);
    block.put_u16(INFO_BLOCK_SIZE);
    block.put_u32(1);
    block.put_u32(PREFERRED_BLOCK);
    block.put_u32(MAX_PAYLOAD);
    option_reply(w, option, REP_INFO, &block).await
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut header = Vec::with_capacity(20);
    header.put_u64(OPTION_REPLY_MAGIC);
    header.put_u32(option);
    header.put_u32(kind);
    header.put_u32(data.len() as u32);
    w.write_all(&header).await?;
    w.write_all(data).await
}

/// Reads and drops `len` bytes, to stay in step with a client whose data we
/// refuse without holding it in memory.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// One parsed transmission request.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// One reply for the writer. The permits travel with it so that requests
/// and bytes count as in flight until the reply is on the wire.
struct Reply {
    cookie: u64,
    /// The read payload on success, or the errno.
    result: Result<Option<Bytes>, u32>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The transmission phase: reads requests until NBD_CMD_DISC, EOF or an
/// error, lets the requests in flight finish, sends their replies, closes.
/// The handle is dropped only after the last request is done.
async fn transmit<H, R, W>(mut reader: R, writer: W, handle: H) -> Result<(), Error>
where
    H: BlockIo,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let handle = Arc::new(handle);
    // Never full: every queued reply holds one of the MAX_IN_FLIGHT slots.
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let reading = async move {
        let mut tasks = JoinSet::new();
        let result = tokio::select! {
            result = read_requests(&mut reader, &handle, &tx, &mut tasks) => result,
            // The writer failed; its error is the one reported.
            () = tx.closed() => Ok(()),
        };
        while let Some(done) = tasks.join_next().await {
            log_panic(done);
        }
        result
    };
    let (read_result, write_result) = tokio::join!(reading, write_replies(writer, rx));
    write_result?;
    read_result
}

async fn read_requests<H, R>(
    reader: &mut R,
    handle: &Arc<H>,
    replies: &mpsc::Sender<Reply>,
    tasks: &mut JoinSet<()>,
) -> Result<(), Error>
where
    H: BlockIo,
    R: AsyncRead + Unpin,
{
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT));
    loop {
        while let Some(done) = tasks.try_join_next() {
            log_panic(done);
        }
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("request semaphore is never closed");
        let Some(req) = read_request(reader).await? else {
            info!("client closed the connection without NBD_CMD_DISC");
            return Ok(());
        };
        debug!(?req, "request");
        let payload_len = match req.kind {
            CMD_READ | CMD_WRITE if req.len <= MAX_PAYLOAD => req.len,
            _ => 0,
        };
        let bytes_permit = if payload_len > 0 {
            let permit = bytes.clone().acquire_many_owned(payload_len).await;
            Some(permit.expect("byte semaphore is never closed"))
        } else {
            None
        };
        let payload = match req.kind {
            CMD_DISC => {
                info!("client sent NBD_CMD_DISC");
                return Ok(());
            }
            CMD_WRITE if req.len > MAX_PAYLOAD => {
                discard(reader, req.len).await?;
                None
            }
            CMD_WRITE => {
                let mut data = BytesMut::zeroed(req.len as usize);
                reader.read_exact(&mut data).await?;
                Some(data.freeze())
            }
            _ => None,
        };
        let handle = handle.clone();
        let replies = replies.clone();
        tasks.spawn(async move {
            let result = execute(&*handle, req, payload).await;
            let reply = Reply {
                cookie: req.cookie,
                result,
                _slot: slot,
                _bytes: bytes_permit,
            };
            // If the writer is gone the client left; the request still ran.
            let _ = replies.send(reply).await;
        });
    }
}

/// Reads one request header; `None` at end of stream.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Request>, Error> {
    let mut buf = [0u8; 28];
    match r.read_exact(&mut buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut b = &buf[..];
    let magic = b.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(Error::BadRequestMagic(magic));
    }
    Ok(Some(Request {
        flags: b.get_u16(),
        kind: b.get_u16(),
        cookie: b.get_u64(),
        offset: b.get_u64(),
        len: b.get_u32(),
    }))
}

/// Runs one request against the volume; `Err` is the errno for the reply.
async fn execute<H: BlockIo>(
    handle: &H,
    req: Request,
    payload: Option<Bytes>,
) -> Result<Option<Bytes>, u32> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    match req.kind {
        CMD_READ | CMD_WRITE if req.len > MAX_PAYLOAD => {
            debug!(len, "request larger than the maximum payload");
            return Err(libc_errno::EOVERFLOW as u32);
        }
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
            // Checked now, not at handshake time: the volume may have grown.
            let size = handle.size();
            if req.offset.checked_add(len).is_none_or(|end| end > size) {
                let e = IoError::OutOfRange {
                    offset: req.offset,
                    len,
                    size,
                };
                debug!(error = %e, "request refused");
                return Err(e.errno() as u32);
            }
            if req.len == 0 {
                return Ok((req.kind == CMD_READ).then(Bytes::new));
            }
        }
        CMD_FLUSH => {}
        other => {
            debug!(kind = other, "unknown command");
            return Err(libc_errno::EINVAL as u32);
        }
    }
    let result = match req.kind {
        CMD_READ => match handle.read(req.offset, req.len).await {
            Ok(data) if data.len() == req.len as usize => Ok(Some(data)),
            Ok(data) => {
                // Sending it would desynchronise the client's stream.
                error!(
                    len,
                    got = data.len(),
                    "volume returned a read of the wrong length"
                );
                return Err(libc_errno::EIO as u32);
            }
            Err(e) => Err(e),
        },
        CMD_WRITE => handle
            .write(req.offset, payload.unwrap_or_default(), fua)
            .await
            .map(|()| None),
        CMD_FLUSH => handle.flush().await.map(|()| None),
        _ => handle
            .write_zeroes(req.offset, len, fua)
            .await
            .map(|()| None),
    };
    result.map_err(|e| {
        debug!(error = %e, kind = req.kind, offset = req.offset, len, "request failed");
        e.errno() as u32
    })
}

/// Sends replies in the order they complete, flushing once no more are
/// waiting, and closes the write side when every sender is gone.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    while let Some(reply) = rx.recv().await {
        // A volume that shut down (e.g. handed over to another node) ends
        // the connection after telling the client why.
        let mut gone = reply.result == Err(libc_errno::ESHUTDOWN as u32);
        write_reply(&mut w, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            gone |= reply.result == Err(libc_errno::ESHUTDOWN as u32);
            write_reply(&mut w, reply).await?;
        }
        w.flush().await?;
        if gone {
            info!("volume shut down: disconnecting the client");
            break;
        }
    }
    w.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: Reply) -> io::Result<()> {
    let mut header = [0u8; 16];
    let mut h = &mut header[..];
    h.put_u32(SIMPLE_REPLY_MAGIC);
    h.put_u32(*reply.result.as_ref().err().unwrap_or(&0));
    h.put_u64(reply.cookie);
    w.write_all(&header).await?;
    if let Ok(Some(data)) = &reply.result {
        w.write_all(data).await?;
    }
    Ok(())
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!(error = %e, "NBD request task panicked");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    use super::*;

    /// In-memory volumes; counts open handles so tests can see them dropped.
    #[derive(Default)]
    struct MemTable {
        volumes: BTreeMap<String, Arc<Mutex<Vec<u8>>>>,
        open: Arc<AtomicUsize>,
        write_delay: Duration,
    }

    impl MemTable {
        fn with(exports: &[(&str, usize)]) -> Self {
            let volumes = exports
                .iter()
                .map(|&(name, size)| (name.to_owned(), Arc::new(Mutex::new(vec![0; size]))))
                .collect();
            MemTable {
                volumes,
                ..Default::default()
            }
        }

        fn data(&self, name: &str) -> Vec<u8> {
            self.volumes[name].lock().unwrap().clone()
        }
    }

    struct MemHandle {
        data: Arc<Mutex<Vec<u8>>>,
        open: Arc<AtomicUsize>,
        write_delay: Duration,
    }

    impl Drop for MemHandle {
        fn drop(&mut self) {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl BlockIo for MemHandle {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }

        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
            let data = self.data.lock().unwrap();
            let start = offset as usize;
            Ok(Bytes::copy_from_slice(&data[start..start + len as usize]))
        }

        async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
            tokio::time::sleep(self.write_delay).await;
            let start = offset as usize;
            self.data.lock().unwrap()[start..start + data.len()].copy_from_slice(&data);
            Ok(())
        }

        async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
            let start = offset as usize;
            self.data.lock().unwrap()[start..start + len as usize].fill(0);
            Ok(())
        }

        async fn flush(&self) -> Result<(), IoError> {
            Ok(())
        }
    }

    impl ExportTable for MemTable {
        type Handle = MemHandle;

        fn open(&self, name: &str) -> Option<MemHandle> {
            let data = self.volumes.get(name)?.clone();
            self.open.fetch_add(1, Ordering::SeqCst);
            Some(MemHandle {
                data,
                open: self.open.clone(),
                write_delay: self.write_delay,
            })
        }

        fn names(&self) -> Vec<String> {
            self.volumes.keys().cloned().collect()
        }
    }

    async fn start(table: MemTable) -> (SocketAddr, Arc<MemTable>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = Arc::new(table);
        tokio::spawn(serve(listener, table.clone()));
        (addr, table)
    }

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("test timed out")
    }

    /// Polls `cond` until it holds (the server finishes some work after replying).
    async fn eventually(mut cond: impl FnMut() -> bool) {
        within(async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// A raw-protocol client, just enough to drive the server.
    struct Client {
        r: BufReader<OwnedReadHalf>,
        w: OwnedWriteHalf,
        size: u64,
        flags: u16,
        cookie: u64,
    }

    /// Reads the greeting and sends client flags; the stream is then in
    /// option haggling.
    async fn greet(addr: SocketAddr) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        assert_eq!(r.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(r.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            r.read_u16().await.unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        w.write_u32(u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            .await
            .unwrap();
        (r, w)
    }

    async fn send_option(w: &mut OwnedWriteHalf, option: u32, data: &[u8]) {
        let mut msg = Vec::new();
        msg.put_u64(IHAVEOPT);
        msg.put_u32(option);
        msg.put_u32(data.len() as u32);
        msg.put_slice(data);
        w.write_all(&msg).await.unwrap();
    }

    /// Returns (reply type, data) of one option reply to `option`.
    async fn option_reply(r: &mut BufReader<OwnedReadHalf>, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(r.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        assert_eq!(r.read_u32().await.unwrap(), option);
        let kind = r.read_u32().await.unwrap();
        let mut data = vec![0; r.read_u32().await.unwrap() as usize];
        r.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        data.put_u32(name.len() as u32);
        data.put_slice(name.as_bytes());
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        data
    }

    impl Client {
        /// Handshake with NBD_OPT_GO; `Err` carries the error reply.
        async fn connect(addr: SocketAddr, name: &str) -> Result<Client, (u32, String)> {
            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_GO, &go_data(name)).await;
            let (mut size, mut flags) = (None, None);
            loop {
                match option_reply(&mut r, OPT_GO).await {
                    (REP_INFO, data) => {
                        let mut d = &data[..];
                        if d.get_u16() == INFO_EXPORT {
                            size = Some(d.get_u64());
                            flags = Some(d.get_u16());
                        }
                    }
                    (REP_ACK, _) => break,
                    (kind, msg) => return Err((kind, String::from_utf8(msg).unwrap())),
                }
            }
            Ok(Client {
                r,
                w,
                size: size.unwrap(),
                flags: flags.unwrap(),
                cookie: 0,
            })
        }

        async fn send(
            &mut self,
            kind: u16,
            flags: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> u64 {
            self.cookie += 1;
            let mut msg = Vec::new();
            msg.put_u32(REQUEST_MAGIC);
            msg.put_u16(flags);
            msg.put_u16(kind);
            msg.put_u64(self.cookie);
            msg.put_u64(offset);
            msg.put_u32(len);
            msg.put_slice(payload);
            self.w.write_all(&msg).await.unwrap();
            self.cookie
        }

        /// Reads one reply; a payload of `read_len` follows only on success.
        async fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
            assert_eq!(self.r.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
            let error = self.r.read_u32().await.unwrap();
            let cookie = self.r.read_u64().await.unwrap();
            let mut data = vec![0; if error == 0 { read_len } else { 0 }];
            self.r.read_exact(&mut data).await.unwrap();
            (cookie, error, data)
        }

        async fn call(
            &mut self,
            kind: u16,
            flags: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> u32 {
            let cookie = self.send(kind, flags, offset, len, payload).await;
            let (got, error, _) = self.reply(0).await;
            assert_eq!(got, cookie);
            error
        }

        async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
            self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
                .await
        }

        async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
            let cookie = self.send(CMD_READ, 0, offset, len, &[]).await;
            let (got, error, data) = self.reply(len as usize).await;
            assert_eq!(got, cookie);
            if error == 0 { Ok(data) } else { Err(error) }
        }

        async fn disconnect(mut self) {
            self.send(CMD_DISC, 0, 0, 0, &[]).await;
            let mut rest = Vec::new();
            self.r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "no reply to NBD_CMD_DISC");
        }
    }

    const EINVAL: u32 = libc_errno::EINVAL as u32;

    #[tokio::test]
    async fn go_reports_size_and_transmission_flags() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 1 << 20)])).await;
            let client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.size, 1 << 20);
            assert_eq!(client.flags, TRANSMISSION_FLAGS);
            assert_ne!(client.flags & TFLAG_CAN_MULTI_CONN, 0);
            client.disconnect().await;
        })
        .await
    }

    #[tokio::test]
    async fn info_sends_export_and_block_sizes_then_allows_go() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 8192)])).await;
            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_INFO, &go_data("vol")).await;
            let (kind, export) = option_reply(&mut r, OPT_INFO).await;
            assert_eq!(kind, REP_INFO);
            assert_eq!(
                export,
                [
                    &[0, 0][..],
                    &8192u64.to_be_bytes(),
                    &TRANSMISSION_FLAGS.to_be_bytes()
                ]
                .concat()
            );
            let (kind, block) = option_reply(&mut r, OPT_INFO).await;
            assert_eq!(kind, REP_INFO);
            let expected = [
                &3u16.to_be_bytes()[..],
                &1u32.to_be_bytes(),
                &4096u32.to_be_bytes(),
                &(32u32 << 20).to_be_bytes(),
            ];
            assert_eq!(block, expected.concat());
            assert_eq!(option_reply(&mut r, OPT_INFO).await.0, REP_ACK);
            send_option(&mut w, OPT_GO, &go_data("vol")).await;
            for _ in 0..2 {
                assert_eq!(option_reply(&mut r, OPT_GO).await.0, REP_INFO);
            }
            assert_eq!(option_reply(&mut r, OPT_GO).await.0, REP_ACK);
        })
        .await
    }

    #[tokio::test]
    async fn export_name_option_enters_transmission() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 4096)])).await;
            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_EXPORT_NAME, b"vol").await;
            assert_eq!(r.read_u64().await.unwrap(), 4096);
            assert_eq!(r.read_u16().await.unwrap(), TRANSMISSION_FLAGS);
            let mut client = Client {
                r,
                w,
                size: 4096,
                flags: TRANSMISSION_FLAGS,
                cookie: 0,
            };
            assert_eq!(client.write(0, b"hello").await, 0);
            assert_eq!(&table.data("vol")[..5], b"hello");
        })
        .await
    }

    #[tokio::test]
    async fn write_then_read_returns_the_same_bytes() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 1 << 20)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            assert_eq!(client.write(4096, &data).await, 0);
            assert_eq!(client.read(4096, data.len() as u32).await.unwrap(), data);
            assert_eq!(&table.data("vol")[4096..4096 + data.len()], &data[..]);
            assert_eq!(client.call(CMD_WRITE, CMD_FLAG_FUA, 0, 3, b"fua").await, 0);
            assert_eq!(client.read(0, 3).await.unwrap(), b"fua");
            client.disconnect().await;
        })
        .await
    }

    #[tokio::test]
    async fn flush_succeeds() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 4096)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        })
        .await
    }

    #[tokio::test]
    async fn write_zeroes_and_trim_read_back_as_zeroes() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 16384)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.write(0, &[0xab; 16384]).await, 0);
            assert_eq!(client.call(CMD_WRITE_ZEROES, 0, 1000, 3000, &[]).await, 0);
            assert_eq!(
                client.call(CMD_TRIM, CMD_FLAG_FUA, 8192, 4096, &[]).await,
                0
            );
            let data = client.read(0, 16384).await.unwrap();
            let zeroed = |i: usize| (1000..4000).contains(&i) || (8192..12288).contains(&i);
            for (i, byte) in data.iter().enumerate() {
                assert_eq!(*byte, if zeroed(i) { 0 } else { 0xab }, "byte {i}");
            }
        })
        .await
    }

    #[tokio::test]
    async fn requests_beyond_the_end_get_einval() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 4096)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.read(4000, 200).await, Err(EINVAL));
            assert_eq!(client.read(u64::MAX - 10, 100).await, Err(EINVAL));
            assert_eq!(client.write(4095, b"ab").await, EINVAL);
            assert_eq!(client.call(CMD_WRITE_ZEROES, 0, 4096, 1, &[]).await, EINVAL);
            assert_eq!(client.call(CMD_TRIM, 0, 0, 4097, &[]).await, EINVAL);
            // The connection is still in step after refusing a write payload.
            assert_eq!(client.read(4095, 1).await, Ok(vec![0]));
        })
        .await
    }

    #[tokio::test]
    async fn a_grown_volume_accepts_requests_up_to_its_new_size() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 4096)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            table.volumes["vol"].lock().unwrap().resize(8192, 0);
            assert_eq!(client.write(8000, b"grown").await, 0);
            assert_eq!(client.read(8000, 5).await.unwrap(), b"grown");
        })
        .await
    }

    #[tokio::test]
    async fn oversized_and_unknown_requests_are_refused_and_the_stream_stays_in_step() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 64 << 20)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            let big = vec![7u8; (MAX_PAYLOAD + 1) as usize];
            let eoverflow = libc_errno::EOVERFLOW as u32;
            assert_eq!(client.write(0, &big).await, eoverflow);
            assert_eq!(client.read(0, MAX_PAYLOAD + 1).await, Err(eoverflow));
            assert_eq!(client.call(42, 0, 0, 0, &[]).await, EINVAL);
            assert_eq!(client.read(0, 4).await.unwrap(), [0; 4]);
        })
        .await
    }

    #[tokio::test]
    async fn pipelined_requests_all_get_their_replies() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 1 << 20)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            let mut expected = BTreeMap::new();
            for i in 0..100u64 {
                let cookie = client
                    .send(CMD_WRITE, 0, i * 4096, 4096, &[i as u8; 4096])
                    .await;
                expected.insert(cookie, i);
            }
            for _ in 0..100 {
                let (cookie, error, _) = client.reply(0).await;
                assert_eq!(error, 0);
                assert!(
                    expected.remove(&cookie).is_some(),
                    "unexpected cookie {cookie}"
                );
            }
            for i in 0..100u64 {
                let cookie = client.send(CMD_READ, 0, i * 4096, 4096, &[]).await;
                expected.insert(cookie, i);
            }
            for _ in 0..100 {
                let (cookie, error, data) = client.reply(4096).await;
                assert_eq!(error, 0);
                let i = expected.remove(&cookie).unwrap();
                assert_eq!(data, [i as u8; 4096]);
            }
        })
        .await
    }

    #[tokio::test]
    async fn unknown_export_gets_err_unknown_with_a_message() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 4096)])).await;
            let Err((kind, msg)) = Client::connect(addr, "nope").await else {
                panic!("connected to an unknown export");
            };
            assert_eq!(kind, REP_ERR_UNKNOWN);
            assert_eq!(msg, "export \"nope\" is not served here");
            assert_eq!(table.open.load(Ordering::SeqCst), 0);
        })
        .await
    }

    #[tokio::test]
    async fn list_names_every_export() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("alpha", 4096), ("beta", 4096)])).await;
            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_LIST, &[]).await;
            let mut names = Vec::new();
            loop {
                match option_reply(&mut r, OPT_LIST).await {
                    (REP_SERVER, data) => {
                        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
                    }
                    (kind, _) => {
                        assert_eq!(kind, REP_ACK);
                        break;
                    }
                }
            }
            assert_eq!(names, ["alpha", "beta"]);
        })
        .await
    }

    #[tokio::test]
    async fn unsupported_options_get_err_unsup_and_abort_is_acked() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 4096)])).await;
            let (mut r, mut w) = greet(addr).await;
            for option in [5, 8, 10, 11, 999] {
                send_option(&mut w, option, &[]).await;
                assert_eq!(option_reply(&mut r, option).await.0, REP_ERR_UNSUP);
            }
            send_option(&mut w, OPT_LIST, b"junk").await;
            assert_eq!(option_reply(&mut r, OPT_LIST).await.0, REP_ERR_INVALID);
            send_option(&mut w, OPT_GO, &[0, 0, 0, 9, b'v']).await;
            assert_eq!(option_reply(&mut r, OPT_GO).await.0, REP_ERR_INVALID);
            send_option(&mut w, OPT_INFO, &vec![0; (MAX_OPTION_LEN + 1) as usize]).await;
            assert_eq!(option_reply(&mut r, OPT_INFO).await.0, REP_ERR_TOO_BIG);
            send_option(&mut w, OPT_ABORT, &[]).await;
            assert_eq!(option_reply(&mut r, OPT_ABORT).await.0, REP_ACK);
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        })
        .await
    }

    #[tokio::test]
    async fn malformed_handshakes_do_not_stop_the_server() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 4096)])).await;
            // Early close.
            drop(TcpStream::connect(addr).await.unwrap());
            // Random bytes instead of client flags.
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).await.unwrap();
            // Old-style client: no FIXED_NEWSTYLE.
            let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
            w.write_u32(0).await.unwrap();
            BufReader::new(r).read_to_end(&mut sink).await.unwrap();
            // Wrong option magic.
            let (mut r, mut w) = greet(addr).await;
            w.write_all(&[0xde; 16]).await.unwrap();
            r.read_to_end(&mut sink).await.unwrap();
            // Truncated option.
            let (_, mut w) = greet(addr).await;
            w.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
            drop(w);
            // Unknown name with NBD_OPT_EXPORT_NAME: the server can only close.
            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_EXPORT_NAME, b"nope").await;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());

            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.write(0, b"still here").await, 0);
            assert_eq!(client.read(0, 10).await.unwrap(), b"still here");
        })
        .await
    }

    #[tokio::test]
    async fn endless_option_haggling_and_huge_names_are_cut_off() {
        within(async {
            let (addr, _) = start(MemTable::with(&[("vol", 4096)])).await;
            let (mut r, mut w) = greet(addr).await;
            for _ in 0..MAX_OPTIONS {
                send_option(&mut w, 999, &[]).await;
                assert_eq!(option_reply(&mut r, 999).await.0, REP_ERR_UNSUP);
            }
            send_option(&mut w, 999, &[]).await;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());

            let (mut r, mut w) = greet(addr).await;
            send_option(&mut w, OPT_EXPORT_NAME, &[b'v'; MAX_NAME_LEN + 1]).await;
            r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());

            assert!(Client::connect(addr, "vol").await.is_ok());
        })
        .await
    }

    #[tokio::test]
    async fn bad_request_magic_closes_only_that_connection() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 4096)])).await;
            let mut client = Client::connect(addr, "vol").await.unwrap();
            client.w.write_all(&[0x55; 28]).await.unwrap();
            let mut rest = Vec::new();
            client.r.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            eventually(|| table.open.load(Ordering::SeqCst) == 0).await;
            let mut other = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(other.read(0, 1).await, Ok(vec![0]));
        })
        .await
    }

    #[tokio::test]
    async fn a_client_leaving_mid_request_is_harmless_and_its_writes_land() {
        within(async {
            let mut table = MemTable::with(&[("vol", 1 << 20)]);
            table.write_delay = Duration::from_millis(50);
            let (addr, table) = start(table).await;

            // Half a write payload, then gone.
            let mut client = Client::connect(addr, "vol").await.unwrap();
            let mut header = Vec::new();
            header.put_u32(REQUEST_MAGIC);
            header.put_u16(0);
            header.put_u16(CMD_WRITE);
            header.put_u64(1);
            header.put_u64(0);
            header.put_u32(65536);
            client.w.write_all(&header).await.unwrap();
            client.w.write_all(&[1; 30000]).await.unwrap();
            drop(client);

            // Complete writes, then gone before the (delayed) replies.
            let mut client = Client::connect(addr, "vol").await.unwrap();
            client.send(CMD_WRITE, 0, 4096, 4, b"kept").await;
            client.send(CMD_READ, 0, 0, 65536, &[]).await;
            drop(client);

            eventually(|| table.open.load(Ordering::SeqCst) == 0).await;
            assert_eq!(&table.data("vol")[4096..4100], b"kept");
            assert!(table.data("vol")[..4096].iter().all(|&b| b == 0));
            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.read(4096, 4).await.unwrap(), b"kept");
        })
        .await
    }

    #[tokio::test]
    async fn the_handle_is_dropped_when_the_client_disconnects() {
        within(async {
            let (addr, table) = start(MemTable::with(&[("vol", 4096)])).await;
            let client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(table.open.load(Ordering::SeqCst), 1);
            client.disconnect().await;
            eventually(|| table.open.load(Ordering::SeqCst) == 0).await;
        })
        .await
    }

    #[tokio::test]
    async fn dropping_serve_ends_every_connection() {
        within(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let table = Arc::new(MemTable::with(&[("vol", 4096)]));
            let server = tokio::spawn(serve(listener, table.clone()));
            let mut client = Client::connect(addr, "vol").await.unwrap();
            assert_eq!(client.write(0, b"x").await, 0);
            server.abort();
            let mut rest = Vec::new();
            client.r.read_to_end(&mut rest).await.unwrap();
            eventually(|| table.open.load(Ordering::SeqCst) == 0).await;
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_clients_each_see_their_own_writes() {
        within(async {
            const CLIENTS: u64 = 24;
            const BLOCKS: u64 = 32;
            let (addr, table) = start(MemTable::with(&[(
                "vol",
                (CLIENTS * BLOCKS * 4096) as usize,
            )]))
            .await;
            let mut clients = JoinSet::new();
            for c in 0..CLIENTS {
                clients.spawn(async move {
                    let mut client = Client::connect(addr, "vol").await.unwrap();
                    let base = c * BLOCKS * 4096;
                    for b in 0..BLOCKS {
                        client
                            .send(CMD_WRITE, 0, base + b * 4096, 4096, &[(c + b) as u8; 4096])
                            .await;
                    }
                    for _ in 0..BLOCKS {
                        assert_eq!(client.reply(0).await.1, 0);
                    }
                    assert_eq!(client.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
                    for b in 0..BLOCKS {
                        let data = client.read(base + b * 4096, 4096).await.unwrap();
                        assert_eq!(data, [(c + b) as u8; 4096]);
                    }
                    client.disconnect().await;
                });
            }
            while let Some(done) = clients.join_next().await {
                done.unwrap();
            }
            let data = table.data("vol");
            for (i, chunk) in data.chunks(4096).enumerate() {
                let (c, b) = (i as u64 / BLOCKS, i as u64 % BLOCKS);
                assert!(chunk.iter().all(|&x| x == (c + b) as u8), "block {i}");
            }
            eventually(|| table.open.load(Ordering::SeqCst) == 0).await;
        })
        .await
    }
}
