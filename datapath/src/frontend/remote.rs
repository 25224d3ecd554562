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
//!
//! Replication is asynchronous, so a forced failover may lose writes the
//! old primary acknowledged. A file system on this device would then go on
//! over data that changed under it. So the device remembers how far in the
//! log its acknowledged writes reached (and in which history); a new
//! primary whose log left that history before that point (its lineage says
//! where, across any number of primary changes the device did not see)
//! fails every further request with EIO until the device is detached and
//! attached again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::BoxStream;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{BlockIo, IoError, libc_errno};
use crate::cluster::Cluster;
use crate::log::lineage::{Lineage, NotInLineage};
use crate::membership::PrimaryInfo;
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
    /// The history of the last acknowledged write, zeroing or flush and
    /// the primary's log end when it completed.
    acked: Mutex<Option<(PrimaryInfo, u64)>>,
    /// Why this device fails every request (acknowledged writes may be lost).
    lost: Mutex<Option<String>>,
}

/// Why a primary in history `new`, whose log came from the histories in
/// `lineage`, may lack the writes a device acknowledged up to log position
/// `acked` in history `old`. Its log holds `old`'s records up to where its
/// lineage left that history, which may be long before `new` began: two
/// failovers while the device was away (`new` alone would not tell).
fn lost_writes(
    old: &PrimaryInfo,
    acked: u64,
    new: &PrimaryInfo,
    lineage: &Lineage,
) -> Option<String> {
    if old.generation == new.generation && old.node == new.node {
        return None;
    }
    let acked_in = |fork: u64, how: &str| {
        (fork < acked).then(|| {
            format!(
                "the new primary {} (generation {}) {how} at log position {fork}, \
                 but writes this device acknowledged reached position {acked} on {} (generation {})",
                new.node, new.generation, old.node, old.generation
            )
        })
    };
    if lineage.epochs().is_empty() {
        // An older peer: only its own history's start is known.
        return acked_in(new.start_pos, "continues the log");
    }
    match lineage.leaves(old.generation, &old.node) {
        Ok(Some(fork)) => acked_in(fork, "holds a log that left that history"),
        // Its newest logfile is still of that history.
        Ok(None) => acked_in(new.start_pos, "continues the log"),
        Err(NotInLineage) => Some(format!(
            "the log of the new primary {} (generation {}) does not come from the history \
             (generation {} of {}) in which this device's writes up to position {acked} were acknowledged",
            new.node, new.generation, old.generation, old.node
        )),
    }
}

/// errno, data, log end.
type Reply = (i32, Bytes, u64);

struct Conn {
    tx: mpsc::Sender<(Message, Bytes)>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    /// The history the primary of this connection writes in (None from
    /// older peers: not checked).
    history: Option<PrimaryInfo>,
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
            acked: Mutex::new(None),
            lost: Mutex::new(None),
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
        let (mut s, _) = proto::connect(&*self.cluster.net, &addr, &hello, Some(&primary.node))
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
        let (history, lineage) = match f.msg {
            Message::Attached {
                size,
                history,
                lineage,
            } => {
                self.size.store(size, Ordering::Release);
                (history, Lineage::new(lineage))
            }
            Message::Refused { reason } => return Err(self.unreachable(reason)),
            other => return Err(self.unreachable(format!("unexpected answer {other:?}"))),
        };
        if let Some(why) = self.check_history(history.as_ref(), &lineage) {
            tracing::error!(resource = %self.resource, "{why}");
            *self.lost.lock().expect("lost lock") = Some(why);
            return Err(self
                .lost_error()
                .unwrap_or_else(|| self.unreachable("lost".into())));
        }
        tracing::info!(resource = %self.resource, primary = %primary.node, "remote device connected");
        let conn = Arc::new(Conn::start(s, history));
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Why `new` (the history of a primary just connected to, whose log
    /// came from the histories in `lineage`) may lack writes this device
    /// acknowledged, if it may.
    fn check_history(&self, new: Option<&PrimaryInfo>, lineage: &Lineage) -> Option<String> {
        let new = new?;
        let acked = self.acked.lock().expect("acked lock");
        let (old, pos) = acked.as_ref()?;
        lost_writes(old, *pos, new, lineage).map(|why| {
            format!(
                "{}: {why}: they may be lost; the device fails every request until it is \
                 detached and attached again (check the file system before using it again)",
                self.resource
            )
        })
    }

    fn lost_error(&self) -> Option<IoError> {
        let why = self.lost.lock().expect("lost lock").clone()?;
        Some(IoError::Io {
            resource: self.resource.clone(),
            source: std::io::Error::other(why),
        })
    }

    /// Notes an acknowledged write, zeroing or flush of connection `conn`.
    fn note_acked(&self, conn: &Conn, pos: u64) {
        let Some(h) = &conn.history else {
            return;
        };
        let mut acked = self.acked.lock().expect("acked lock");
        match acked.as_mut() {
            Some((old, p)) if old == h => *p = (*p).max(pos),
            _ => *acked = Some((h.clone(), pos)),
        }
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
            if let Some(e) = self.lost_error() {
                return Err(e);
            }
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
                        Some((0, bytes, pos)) => {
                            if op != IoOp::Read {
                                self.note_acked(&conn, pos);
                            }
                            return Ok(bytes);
                        }
                        // Not primary (any more), or shutting down: find the new one.
                        Some((e, _, _)) if e == libc_errno::EPERM || e == libc_errno::ESHUTDOWN => {
                            self.drop_connection(&conn).await;
                            Err(self.unreachable("the primary is changing".into()))
                        }
                        Some((e, _, _)) => {
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
    fn start(s: BoxStream, history: Option<PrimaryInfo>) -> Conn {
        let (mut rd, mut wr) = tokio::io::split(s);
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
                if let Message::IoDone { id, errno, pos } = f.msg
                    && let Some(waiter) = p2.lock().expect("pending lock").remove(&id)
                {
                    let _ = waiter.send((errno, f.data, pos));
                }
            }
            // Wakes every waiter with "connection lost" and closes the writer.
            writer.abort();
            p2.lock().expect("pending lock").clear();
        });
        Conn {
            tx,
            pending,
            history,
        }
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
/// `vol` (concurrently, at most [`MAX_IN_FLIGHT`]) and answers by id, with
/// `log_end()` read after each completion.
pub async fn serve<B: BlockIo>(
    s: BoxStream,
    vol: Arc<B>,
    log_end: impl Fn() -> u64 + Send + Sync + 'static,
) -> proto::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = mpsc::channel::<(u64, i32, Bytes)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((id, errno, data)) = rx.recv().await {
            let pos = log_end();
            proto::write_frame(&mut wr, &Message::IoDone { id, errno, pos }, &data).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Epoch;

    fn h(generation: u64, node: &str, start_pos: u64) -> PrimaryInfo {
        PrimaryInfo {
            node: node.into(),
            generation,
            start_pos,
        }
    }

    fn lineage(epochs: &[(u64, &str, u64)]) -> Lineage {
        Lineage::new(
            epochs
                .iter()
                .map(|&(generation, origin, start_pos)| Epoch {
                    generation,
                    origin: origin.into(),
                    start_pos,
                })
                .collect(),
        )
    }

    #[test]
    fn the_same_history_loses_nothing() {
        let l = lineage(&[(1, "a", 0)]);
        assert_eq!(lost_writes(&h(1, "a", 0), 500, &h(1, "a", 0), &l), None);
    }

    /// The device acknowledged writes up to 200 on a; b forced its way in
    /// at 100 (losing them), then handed over to c at 300. c's own start
    /// says nothing is lost; its lineage says where a's history was left.
    #[test]
    fn two_failovers_while_the_device_was_away_are_seen_in_the_lineage() {
        let old = h(1, "a", 0);
        let new = h(3, "c", 300);
        let l = lineage(&[(1, "a", 0), (2, "b", 100), (3, "c", 300)]);
        let why = lost_writes(&old, 200, &new, &l).expect("writes after 100 are lost");
        assert!(
            why.contains("position 100") && why.contains("position 200"),
            "{why}"
        );
        // What an older primary (no lineage) allows: only c's start counts.
        assert_eq!(lost_writes(&old, 200, &new, &Lineage::default()), None);
        // b took over after the acknowledged writes: nothing lost.
        let l = lineage(&[(1, "a", 0), (2, "b", 250), (3, "c", 300)]);
        assert_eq!(lost_writes(&old, 200, &new, &l), None);
    }

    #[test]
    fn a_new_primary_without_a_logfile_of_its_own_yet_counts_from_its_start() {
        let l = lineage(&[(1, "a", 0)]);
        assert!(lost_writes(&h(1, "a", 0), 200, &h(2, "b", 150), &l).is_some());
        assert_eq!(lost_writes(&h(1, "a", 0), 100, &h(2, "b", 150), &l), None);
    }

    /// a deposed history (or one older than the lineage keeps): nothing
    /// vouches for the device's writes.
    #[test]
    fn a_history_the_new_primary_never_had_is_lost() {
        let l = lineage(&[(1, "a", 0), (2, "c", 100)]);
        let why = lost_writes(&h(2, "b", 100), 150, &h(2, "c", 100), &l).unwrap();
        assert!(why.contains("does not come from the history"), "{why}");
    }
}
