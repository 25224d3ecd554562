//! The remote device (MARS' "remote device"): a volume used on a host that
//! has no replica of it. [`RemoteVolume`] is a [`BlockIo`] whose requests
//! travel over the peer protocol to the volume's current primary, where
//! [`serve`] runs them through that primary's logger like any local client.
//!
//! Requests are pipelined on one connection, matched by id. When the
//! connection breaks or the primary refuses because it is no longer primary
//! (a handover, a failover), the request is retried against whichever node
//! the cluster names primary now, for up to [`RETRY_FOR`]: block requests
//! in flight have no order among themselves, so re-sending one is safe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{BlockIo, IoError, libc_errno};
use crate::cluster::Cluster;
use crate::replication::proto::{self, Frame, Message, Purpose};

/// How long a request keeps trying to reach a primary before it fails.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// Requests one remote session runs at once on the primary.
const MAX_IN_FLIGHT: usize = 128;

/// What a remote request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoOp {
    Read,
    Write,
    Zero,
    Flush,
}

/// A volume served by the primary over the network.
pub struct RemoteVolume {
    cluster: Arc<Cluster>,
    resource: String,
    size: AtomicU64,
    next_id: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

type Reply = (i32, Bytes);

struct Conn {
    tx: mpsc::Sender<(Message, Bytes)>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
}

impl RemoteVolume {
    /// Connects to the primary of `resource` and learns the volume's size.
    pub async fn attach(cluster: Arc<Cluster>, resource: &str) -> Result<RemoteVolume, IoError> {
        let v = RemoteVolume {
            cluster,
            resource: resource.into(),
            size: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            conn: tokio::sync::Mutex::new(None),
        };
        v.connection().await?;
        Ok(v)
    }

    fn unreachable(&self, why: String) -> IoError {
        IoError::Io {
            resource: self.resource.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotConnected, why),
        }
    }

    /// The live connection, or a new one to the current primary.
    async fn connection(&self) -> Result<Arc<Conn>, IoError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.tx.is_closed()
        {
            return Ok(Arc::clone(c));
        }
        let primary = self
            .cluster
            .primary_of(&self.resource)
            .ok_or_else(|| self.unreachable(format!("{} has no primary", self.resource)))?;
        let addr = self
            .cluster
            .addr_of(&primary.node)
            .ok_or_else(|| self.unreachable(format!("no address for {}", primary.node)))?;
        let hello = self.cluster.hello(Purpose::Rpc);
        let (mut s, _) = proto::connect(&addr, &hello, Some(&primary.node))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let attach = Message::Attach {
            resource: self.resource.clone(),
        };
        proto::write_frame(&mut s, &attach, &[])
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let f: Frame<Message> = proto::read_frame(&mut s)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        match f.msg {
            Message::Attached { size } => self.size.store(size, Ordering::Release),
            Message::Refused { reason } => return Err(self.unreachable(reason)),
            other => return Err(self.unreachable(format!("unexpected answer {other:?}"))),
        }
        tracing::info!(resource = %self.resource, primary = %primary.node, "remote device connected");
        let conn = Arc::new(Conn::start(s));
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn drop_connection(&self, dead: &Arc<Conn>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, dead)) {
            *slot = None;
        }
    }

    /// Sends one request, retrying on other primaries as described above.
    async fn request(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        fua: bool,
        data: Bytes,
    ) -> Result<Bytes, IoError> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let outcome: Result<(), IoError> = match self.connection().await {
                Ok(conn) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let msg = Message::Io {
                        id,
                        op,
                        offset,
                        len,
                        fua,
                    };
                    match conn.call(id, msg, data.clone()).await {
                        Some((0, bytes)) => return Ok(bytes),
                        // Not primary (any more), or shutting down: find the new one.
                        Some((e, _)) if e == libc_errno::EPERM || e == libc_errno::ESHUTDOWN => {
                            self.drop_connection(&conn).await;
                            Err(self.unreachable("the primary is changing".into()))
                        }
                        Some((e, _)) => {
                            return Err(IoError::Io {
                                resource: self.resource.clone(),
                                source: std::io::Error::from_raw_os_error(e),
                            });
                        }
                        None => {
                            self.drop_connection(&conn).await;
                            Err(self.unreachable("connection to the primary lost".into()))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                if Instant::now() >= deadline {
                    return Err(e);
                }
                tracing::debug!(resource = %self.resource, error = %e, "remote request retried");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

impl Conn {
    /// Starts the reader and writer tasks of a connection.
    fn start(s: TcpStream) -> Conn {
        let (mut rd, mut wr) = s.into_split();
        let (tx, mut rx) = mpsc::channel::<(Message, Bytes)>(MAX_IN_FLIGHT);
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
        let writer = tokio::spawn(async move {
            while let Some((msg, data)) = rx.recv().await {
                if proto::write_frame(&mut wr, &msg, &data).await.is_err() {
                    break;
                }
            }
        });
        let p2 = Arc::clone(&pending);
        tokio::spawn(async move {
            loop {
                let f: Frame<Message> = match proto::read_frame(&mut rd).await {
                    Ok(f) => f,
                    Err(_) => break,
                };
                if let Message::IoDone { id, errno } = f.msg
                    && let Some(waiter) = p2.lock().expect("pending lock").remove(&id)
                {
                    let _ = waiter.send((errno, f.data));
                }
            }
            // Wakes every waiter with "connection lost" and closes the writer.
            writer.abort();
            p2.lock().expect("pending lock").clear();
        });
        Conn { tx, pending }
    }

    /// `None`: the connection broke before the answer came.
    async fn call(&self, id: u64, msg: Message, data: Bytes) -> Option<Reply> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        if self.tx.send((msg, data)).await.is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return None;
        }
        rx.await.ok()
    }
}

impl BlockIo for RemoteVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.request(IoOp::Read, offset, len as u64, false, Bytes::new())
            .await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.request(IoOp::Write, offset, len, fua, data)
            .await
            .map(|_| ())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.request(IoOp::Zero, offset, len, fua, Bytes::new())
            .await
            .map(|_| ())
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.request(IoOp::Flush, 0, 0, false, Bytes::new())
            .await
            .map(|_| ())
    }
}

/// The primary's side of a remote device session: runs each request through
/// `vol` (concurrently, at most [`MAX_IN_FLIGHT`]) and answers by id.
pub async fn serve<B: BlockIo>(s: TcpStream, vol: Arc<B>) -> proto::Result<()> {
    let (mut rd, mut wr) = s.into_split();
    let (tx, mut rx) = mpsc::channel::<(u64, i32, Bytes)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((id, errno, data)) = rx.recv().await {
            proto::write_frame(&mut wr, &Message::IoDone { id, errno }, &data).await?;
        }
        Ok::<_, proto::Error>(())
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let f: Frame<Message> = match proto::read_frame(&mut rd).await {
            Ok(f) => f,
            Err(proto::Error::Closed) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Message::Io {
            id,
            op,
            offset,
            len,
            fua,
        } = f.msg
        else {
            break Err(proto::Error::Unexpected {
                expected: "io",
                got: format!("{:?}", f.msg),
            });
        };
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (vol, tx) = (Arc::clone(&vol), tx.clone());
        tokio::spawn(async move {
            let r = match op {
                IoOp::Read => match u32::try_from(len) {
                    Ok(len) => vol.read(offset, len).await,
                    Err(_) => Err(IoError::TooLarge {
                        len,
                        max: u32::MAX as u64,
                    }),
                },
                IoOp::Write => vol.write(offset, f.data, fua).await.map(|()| Bytes::new()),
                IoOp::Zero => vol
                    .write_zeroes(offset, len, fua)
                    .await
                    .map(|()| Bytes::new()),
                IoOp::Flush => vol.flush().await.map(|()| Bytes::new()),
            };
            let (errno, data) = match r {
                Ok(d) => (0, d),
                Err(e) => (e.errno(), Bytes::new()),
            };
            let _ = tx.send((id, errno, data)).await;
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}
