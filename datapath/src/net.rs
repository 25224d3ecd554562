//! The network seam of the peer protocol (style.md rule 4: all I/O goes
//! through a trait, or it cannot be simulated).
//!
//! The replication client (`replication::proto::connect`, used by the
//! fetcher, the gossip links, full sync, join and remote devices) dials
//! peers through the node's [`Network`], and the peer server accepts from a
//! [`Listener`]. marsd uses real TCP ([`Tcp`], and [`tokio::net::TcpListener`]
//! as the listener), which sets `TCP_NODELAY` on every connection as before.
//! A simulation test supplies its own implementations (`tests/sim_cluster.rs`
//! puts `turmoil`'s simulated TCP behind them) and gets the same node code
//! over a network whose loss and partitions come from a seed.
//!
//! The cost on real TCP is one boxed stream per connection and a virtual
//! call per poll, nothing per byte.

use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connected, ordered, reliable byte stream to a peer.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A stream of whatever network the node runs on.
pub type BoxStream = Box<dyn Stream>;

/// A boxed future (the traits here are object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a node dials its peers.
pub trait Network: Send + Sync + 'static {
    /// Connects to `addr` (`host:port`). No timeout here: callers bound it.
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxStream>>;
}

/// Where the peer server takes connections from.
pub trait Listener: Send + 'static {
    /// The next connection and the peer's address (for messages).
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, String)>>;
}

/// Real TCP: what marsd uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Network for Tcp {
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

impl Listener for tokio::net::TcpListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        Box::pin(async move {
            let (s, addr) = tokio::net::TcpListener::accept(self).await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s) as BoxStream, addr.to_string()))
        })
    }
}

/// Runs blocking work (disk I/O) from inside a task: on a multi-threaded
/// runtime (marsd) through `block_in_place`, so that the worker's other
/// tasks move elsewhere; on a current-thread runtime, where
/// `block_in_place` panics, inline. The simulation runs each host on a
/// current-thread runtime over an in-memory disk.
pub fn block_in_place<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => f(),
        _ => tokio::task::block_in_place(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tcp_carries_bytes_from_connect_to_accept() {
        let mut l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (dialed, accepted) = tokio::join!(Tcp.connect(&addr), Listener::accept(&mut l));
        let (mut a, mut b) = (dialed.unwrap(), accepted.unwrap().0);
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn block_in_place_runs_inline_on_a_current_thread_runtime() {
        // tokio's own block_in_place panics here.
        assert_eq!(block_in_place(|| 7), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_in_place_works_on_a_multi_threaded_runtime() {
        assert_eq!(block_in_place(|| 8), 8);
    }
}
