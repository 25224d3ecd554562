//! marsd: the daemon that owns the volumes of one host. It parses, wires and
//! exits; the work is in the library.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use datapath::control::pb::marsd_server::MarsdServer;
use datapath::control::service::Service;
use datapath::frontend::nbd;
use datapath::node::{Node, NodeConfig, SOCKET_FILE};
use datapath::replication::proto::Compression;
use datapath::size::parse_size;
use datapath::storage::fs::RealStorage;
use tokio::signal::unix::{SignalKind, signal};

/// Time SIGTERM leaves for writeback before exiting (the rest stays in the log).
const SHUTDOWN_WRITEBACK: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(
    name = "marsd",
    version,
    about = "mars daemon: transaction-logged block volumes of one host"
)]
struct Args {
    /// State root: logfiles, positions and resource metadata live here.
    #[arg(long, env = "MARS_ROOT", default_value = "/var/lib/mars")]
    root: PathBuf,
    /// This node's unique name (remembered in the root; a root keeps its name).
    #[arg(long)]
    node: String,
    /// Replication port for peers, ADDR:PORT.
    #[arg(long)]
    listen: SocketAddr,
    /// Seconds a restarting node waits to hear from its peers before it
    /// exports volumes (to learn of a failover that happened meanwhile).
    #[arg(long, default_value_t = 5.0)]
    startup_wait: f64,
    /// Address peers use to reach --listen (needed when it is 0.0.0.0) [default: --listen].
    #[arg(long)]
    advertise: Option<String>,
    /// Serve NBD on ADDR:PORT (no NBD server without it).
    #[arg(long)]
    nbd: Option<SocketAddr>,
    /// Rotate logfiles at this size (K/M/G/T suffixes, powers of 1024).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    logfile_size: u64,
    /// Log space for all resources of this node [default: 16G or half the
    /// free space of the root, whichever is smaller].
    #[arg(long, value_parser = parse_size)]
    log_quota: Option<u64>,
    /// Memory for not-yet-written-back data, per resource; writers wait when it is full.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    overlay_limit: u64,
    /// Nice value (0..=19) of each primary's writeback thread. Writeback
    /// runs behind the writers: while they keep the CPUs busy, the log
    /// absorbs their writes and writeback catches up when the CPUs are free
    /// (or when the overlay is full and the writers wait for it). 0 gives
    /// writeback an equal share.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    writeback_nice: i32,
    /// Expose every volume that becomes primary here as a ublk block device
    /// (/dev/ublkbN); without it, `marsadm up NAME` does so per volume.
    #[arg(long)]
    ublk: bool,
    /// Logical block size of ublk devices.
    #[arg(long, default_value_t = 512)]
    ublk_block_size: u32,
    /// Hardware queues of each ublk device, each served by its own thread
    /// [default: one per CPU, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    ublk_queues: Option<u16>,
    /// Requests in flight per ublk queue, each holding a 512 KiB buffer
    /// [default: 64].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    ublk_depth: Option<u16>,
    /// Compression of log and full-sync data sent to peers: off, zstd or
    /// zstd:LEVEL (1-19). Used on a link only if the peer accepts it (peers
    /// with `off` or older versions get raw data).
    #[arg(long, default_value = "zstd:1", value_parser = Compression::parse)]
    ship_compression: Compression,
    /// Bytes per second this node sends to each peer (log shipping and full
    /// sync; K/M/G suffixes, powers of 1024), e.g. 50M [default: no limit].
    #[arg(long, value_parser = parse_rate)]
    ship_rate_limit: Option<u64>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("--ship-rate-limit must be above 0".into()),
        n => Ok(n),
    }
}

fn main() -> ExitCode {
    // Before any other thread exists (unshare(CLONE_NEWNS) needs a
    // single-threaded process): the process serving ublk devices must not
    // see mounts of them (libublk's rule), so it gets its own private mount
    // namespace. Mounts made elsewhere later (e.g. of our devices) stay out.
    let mount_ns = datapath::frontend::ublk::private_mount_namespace();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = mount_ns {
        if args.ublk {
            eprintln!("marsd: --ublk needs a private mount namespace: {e} (run as root)");
            return ExitCode::from(2);
        }
        tracing::warn!(error = %e, "no private mount namespace: `marsadm up` may deadlock if this process sees mounts of its devices");
    }
    if args.ublk_block_size != 512 && args.ublk_block_size != 4096 {
        eprintln!("marsd: --ublk-block-size must be 512 or 4096");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("marsd: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("marsd: {e:#}");
            ExitCode::from(1)
        }
    };
    // `run` has stopped what must stop (logs synced, devices handed back);
    // the process ends here with the runtime as it is. Tearing the runtime
    // down would race its own workers: one coming back from
    // `block_in_place` runs tasks again after the timer has shut down, and
    // the first timer it polls panics ("A Tokio 1.x context was found, but
    // it is being shutdown"; seen in chaos seed 13 after a SIGTERM).
    std::mem::forget(rt);
    code
}

async fn run(args: Args) -> Result<()> {
    let cfg = NodeConfig {
        root: args.root.clone(),
        node: args.node.clone(),
        logfile_size: args.logfile_size,
        overlay_limit: args.overlay_limit,
        writeback_nice: args.writeback_nice,
        log_quota: args.log_quota,
        advertise: args
            .advertise
            .clone()
            .unwrap_or_else(|| args.listen.to_string()),
        devices: datapath::devices::DeviceConfig {
            auto: args.ublk,
            options: {
                let default = datapath::frontend::ublk::Options::default();
                datapath::frontend::ublk::Options {
                    logical_block_size: args.ublk_block_size,
                    queues: args.ublk_queues.unwrap_or(default.queues),
                    depth: args.ublk_depth.unwrap_or(default.depth),
                }
            },
        },
        ship_compression: args.ship_compression,
        ship_rate_limit: args.ship_rate_limit,
    };
    let node = Arc::new(
        tokio::task::spawn_blocking(move || Node::open(cfg, Arc::new(RealStorage))).await??,
    );

    // The replication port: bound now so that conflicts show at start-up;
    // the peer protocol comes with replication.
    let peers = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    node.start_replication(peers);
    // A restarting primary first tries to hear from the other members, so
    // that it learns of a newer generation (a failover while it was down)
    // before it exports anything.
    let deadline = Instant::now() + Duration::from_secs_f64(args.startup_wait);
    while Instant::now() < deadline
        && !node
            .cluster()
            .peers()
            .iter()
            .all(|(n, _)| node.cluster().connected(n))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a demotion that this triggered take effect before exporting.
    tokio::time::sleep(Duration::from_millis(
        if node.cluster().peers().is_empty() {
            0
        } else {
            1200
        },
    ))
    .await;

    let nbd_task = match args.nbd {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--nbd)"))?;
            tracing::info!(%addr, "NBD server listening");
            let table = Arc::clone(&node);
            Some(tokio::spawn(async move {
                if let Err(e) = nbd::serve(l, table).await {
                    tracing::error!(error = %e, "NBD server stopped");
                }
            }))
        }
        None => None,
    };

    // Resume ublk devices a previous marsd left, create those --ublk wants.
    {
        let n = Arc::clone(&node);
        tokio::task::spawn_blocking(move || n.restore_devices()).await?;
    }

    let sock = args.root.join(SOCKET_FILE);
    // We hold the root's lock, so a socket file left here is stale.
    if sock.exists() {
        std::fs::remove_file(&sock)
            .with_context(|| format!("removing stale {}", sock.display()))?;
    }
    let uds = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MarsdServer::new(Service::new(Arc::clone(&node))))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(uds),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    tracing::info!(node = %node.name(), socket = %sock.display(), listen = %args.listen, "marsd ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    // Stop taking I/O and commands first, then write back what fits.
    if let Some(t) = nbd_task {
        t.abort();
        let _ = t.await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    let deadline = Instant::now() + SHUTDOWN_WRITEBACK;
    let n = Arc::clone(&node);
    tokio::task::spawn_blocking(move || n.shutdown(deadline)).await?;
    let _ = std::fs::remove_file(&sock);
    tracing::info!("marsd stopped");
    Ok(())
}
