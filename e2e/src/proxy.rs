//! A TCP proxy in front of a host's peer port that delays what it forwards
//! (the kernel here has no `sch_netem`). It listens in the host's network
//! namespace on [`PROXY_PORT`] and forwards every connection to the
//! host's marsd on the peer port; the host advertises the proxy's address
//! to its peers, so every connection a peer opens to it passes through.
//!
//! With a delay of `d` ms set, every chunk read in either direction waits
//! a random 0..=`d` ms before it is written on: latency and jitter, and,
//! since each connection direction waits on its own, messages on
//! different connections (fetch, gossip, handover calls) overtake each
//! other. TCP keeps the order within one connection. Delay 0 forwards at
//! once.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;

use crate::netns::Netns;

/// The port the proxy listens on, beside marsd's peer port.
pub const PROXY_PORT: u16 = 7100;

pub struct Proxy {
    delay_ms: Arc<AtomicU64>,
    /// Chunks that waited (a delay was set when they were read).
    delayed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on `addr`:[`PROXY_PORT`] in `ns` forwarding to
    /// `addr`:`port`.
    pub fn start(ns: &Arc<Netns>, addr: Ipv4Addr, port: u16) -> Result<Proxy> {
        let listen = SocketAddr::from((addr, PROXY_PORT));
        let listener = ns
            .enter(move || TcpListener::bind(listen))?
            .with_context(|| format!("proxy: binding {listen}"))?;
        listener.set_nonblocking(true)?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delayed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (ns, stop) = (Arc::clone(ns), Arc::clone(&stop));
            let delay = Delay {
                ms: Arc::clone(&delay_ms),
                delayed: Arc::clone(&delayed),
            };
            let upstream = SocketAddr::from((addr, port));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let (ns, delay, stop) =
                                (Arc::clone(&ns), delay.clone(), Arc::clone(&stop));
                            std::thread::spawn(move || {
                                let _ = connect(&ns, down, upstream, delay, stop);
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Proxy {
            delay_ms,
            delayed,
            stop,
            accept: Some(accept),
        })
    }

    /// Every forwarded chunk waits a random 0..=`ms` ms from now on.
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Chunks delayed so far.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// The delay setting shared by a proxy's connections.
#[derive(Clone)]
struct Delay {
    ms: Arc<AtomicU64>,
    delayed: Arc<AtomicU64>,
}

/// Connects to `upstream` from inside `ns` and pumps both ways.
fn connect(
    ns: &Netns,
    down: TcpStream,
    upstream: SocketAddr,
    delay: Delay,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    down.set_nonblocking(false)?;
    let up = ns.enter(move || TcpStream::connect_timeout(&upstream, Duration::from_secs(3)))??;
    for s in [&down, &up] {
        s.set_nodelay(true)?;
        // Wake up now and then to notice the proxy being stopped.
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
    }
    let (down2, up2) = (down.try_clone()?, up.try_clone()?);
    let (d2, s2) = (delay.clone(), Arc::clone(&stop));
    let t = std::thread::spawn(move || pump(up2, down2, &d2, &s2));
    pump(down, up, &delay, &stop);
    let _ = t.join();
    Ok(())
}

/// Copies `from` to `to`, each chunk delayed, until either side ends;
/// then shuts both down (so that the other direction ends too).
fn pump(mut from: TcpStream, mut to: TcpStream, delay: &Delay, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 << 10];
    let mut rng = rand::rng();
    while !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        let ms = delay.ms.load(Ordering::Relaxed);
        if ms > 0 {
            delay.delayed.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rng.random_range(0..=ms)));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
