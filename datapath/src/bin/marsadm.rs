//! marsadm: a thin client of marsd's control socket. One-line errors on
//! stderr; exit 0 on success, 1 when marsd refused (precondition, not
//! found, …), 2 for usage errors or when marsd cannot be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use datapath::control::{client, pb};
use datapath::size::{format_size, parse_size};
use tonic::Code;

#[derive(Parser, Debug)]
#[command(
    name = "marsadm",
    version,
    about = "Steer the mars daemon (marsd) of this host"
)]
struct Cli {
    /// State root of the marsd to talk to (its socket is ROOT/marsd.sock).
    #[arg(
        long,
        env = "MARS_ROOT",
        default_value = "/var/lib/mars",
        global = true
    )]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a resource on backing PATH (a file is created or extended) with this node as primary.
    CreateResource {
        name: String,
        path: PathBuf,
        /// Size in bytes or with K/M/G/T (powers of 1024).
        #[arg(long)]
        size: String,
    },
    /// Remove a resource from this node (its backing device is kept).
    DeleteResource {
        name: String,
    },
    /// Make this node primary for the resource: a planned handover from the
    /// current primary, or with --force a failover when it is unreachable.
    Primary {
        name: String,
        /// Take over although the primary is unreachable (its unshipped writes are lost to this history).
        #[arg(long)]
        force: bool,
    },
    /// Discard this replica's log and resync it from the primary (after split brain).
    Invalidate {
        name: String,
    },
    /// Make this node secondary for the resource (refused while in use).
    Secondary {
        name: String,
    },
    /// Grow the resource to SIZE.
    Resize {
        name: String,
        size: String,
    },
    /// Start a new logfile.
    LogRotate {
        name: String,
    },
    /// Delete logfiles that are written back.
    LogDelete {
        name: String,
    },
    /// Show resources, as a table or as JSON.
    View {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make this (fresh) node a member of the cluster of the node at PEER (ADDR:PORT).
    JoinCluster {
        peer: String,
    },
    /// Add a replica of cluster resource NAME on backing PATH here and start its full sync.
    JoinResource {
        name: String,
        path: PathBuf,
    },
    /// Remove this node's secondary replica of NAME (the backing device is kept).
    LeaveResource {
        name: String,
    },
    /// Stop fetching logfiles (after it returns, no further byte is fetched).
    PauseFetch {
        name: String,
    },
    ResumeFetch {
        name: String,
    },
    /// Stop applying (after it returns, the backing device holds a prefix state).
    PauseReplay {
        name: String,
    },
    ResumeReplay {
        name: String,
    },
    /// Drop this resource's peer links (no fetching, no shipping).
    Disconnect {
        name: String,
    },
    /// Restore this resource's peer links.
    Connect {
        name: String,
    },
    /// Expose the primary volume NAME as a ublk block device (/dev/ublkbN); idempotent.
    Up {
        name: String,
    },
    /// Remove NAME's ublk device (refused while it is mounted or open); idempotent.
    Down {
        name: String,
    },
    /// Use NAME on this host without a replica: a ublk device served by its primary over the network.
    Attach {
        name: String,
        /// Required: the device is served by the remote primary (a local primary uses `up`).
        #[arg(long)]
        remote: bool,
    },
    /// Remove NAME's remote device (same as `down`).
    Detach {
        name: String,
    },
    /// Wait until every replica of NAME is UpToDate and has applied all the
    /// primary had logged when the command started.
    Wait {
        name: String,
        /// Give up after this many seconds (exit 1, naming the replicas behind).
        #[arg(long)]
        timeout: Option<f64>,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            Code::Internal | Code::Unknown | Code::Unavailable | Code::Unimplemented => 2,
            _ => 1,
        };
        Failure {
            code,
            message: s.message().replace('\n', " "),
        }
    }
}

fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message without its usage block.
            let text = e.render().to_string();
            let msg = text.split("Usage:").next().unwrap_or(&text);
            let msg = msg
                .trim()
                .trim_start_matches("error:")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("marsadm: {msg} (see marsadm --help)");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("marsadm: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("marsadm: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|d| d.join(path))
        .map_err(|e| usage(format!("cannot resolve {}: {e}", path.display())))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let sock = cli.root.join(datapath::node::SOCKET_FILE);
    // Check arguments before talking to marsd.
    let size_arg = |s: &str| parse_size(s).map_err(usage);
    let request = match &cli.command {
        Command::CreateResource { size, .. } | Command::Resize { size, .. } => {
            Some(size_arg(size)?)
        }
        _ => None,
    };
    let mut c = client::connect(&sock).await.map_err(|e| Failure {
        code: 2,
        message: format!(
            "cannot reach marsd at {}: {} (is marsd running with --root {}?)",
            sock.display(),
            std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()),
            cli.root.display()
        ),
    })?;
    let msg = match cli.command {
        Command::CreateResource { name, path, .. } => {
            let path = absolute(&path)?.display().to_string();
            let size = request.expect("size parsed above");
            c.create_resource(pb::CreateResourceRequest { name, path, size })
                .await?
        }
        Command::DeleteResource { name } => {
            c.delete_resource(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::Primary { name, force } => c.primary(pb::ResourceRequest { name, force }).await?,
        Command::Invalidate { name } => {
            c.invalidate(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::Secondary { name } => {
            c.secondary(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::Resize { name, .. } => {
            c.resize(pb::ResizeRequest {
                name,
                size: request.expect("size parsed above"),
            })
            .await?
        }
        Command::JoinCluster { peer } => {
            c.join_cluster(pb::JoinClusterRequest { addr: peer })
                .await?
        }
        Command::JoinResource { name, path } => {
            let path = absolute(&path)?.display().to_string();
            c.join_resource(pb::JoinResourceRequest { name, path })
                .await?
        }
        Command::LeaveResource { name } => {
            c.leave_resource(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::PauseFetch { name } => c.steer(steer(name, "pause-fetch")).await?,
        Command::ResumeFetch { name } => c.steer(steer(name, "resume-fetch")).await?,
        Command::PauseReplay { name } => c.steer(steer(name, "pause-replay")).await?,
        Command::ResumeReplay { name } => c.steer(steer(name, "resume-replay")).await?,
        Command::Disconnect { name } => c.steer(steer(name, "disconnect")).await?,
        Command::Connect { name } => c.steer(steer(name, "connect")).await?,
        Command::Wait { name, timeout } => return wait(&mut c, &name, timeout).await,
        Command::Up { name } => {
            let r = c
                .up(pb::ResourceRequest { name, force: false })
                .await?
                .into_inner();
            println!("{}", r.message);
            return Ok(());
        }
        Command::Down { name } | Command::Detach { name } => {
            c.down(pb::ResourceRequest { name, force: false }).await?
        }
        Command::Attach { name, remote } => {
            if !remote {
                return Err(usage(format!(
                    "attach needs --remote (a local primary is exposed with `marsadm up {name}`)"
                )));
            }
            let r = c
                .attach(pb::ResourceRequest { name, force: false })
                .await?
                .into_inner();
            println!("{}", r.message);
            return Ok(());
        }
        Command::LogRotate { name } => {
            c.log_rotate(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::LogDelete { name } => {
            c.log_delete(pb::ResourceRequest { name, force: false })
                .await?
        }
        Command::View { name, json } => {
            let v = c
                .view(pb::ViewRequest {
                    name: name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("view serializes")
                );
            } else {
                print!("{}", table(&v));
            }
            return Ok(());
        }
    };
    let text = msg.into_inner().message;
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}

/// The readable `view`: one line per resource, one per replica under it.
fn table(v: &pb::ViewReply) -> String {
    let mut rows = vec![
        [
            "RESOURCE",
            "ROLE",
            "DISK",
            "SIZE",
            "PRIMARY",
            "GEN",
            "APPENDED",
            "FLUSHED",
            "WRITTEN-BACK",
            "LOG",
            "OPEN",
            "DEVICE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in &v.resources {
        let log = r.log.unwrap_or_default();
        rows.push(vec![
            r.name.clone(),
            r.role.clone(),
            r.disk_state.clone(),
            format_size(r.size),
            r.primary.clone().unwrap_or_else(|| "-".into()),
            r.generation.to_string(),
            log.appended.to_string(),
            log.flushed.to_string(),
            log.written_back.to_string(),
            format_size(r.log_bytes),
            r.open_count.to_string(),
            r.device.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!("node {}\n", v.node);
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            continue;
        }
        let r = &v.resources[i - 1];
        for rep in &r.replicas {
            out.push_str(&format!(
                "  replica {} {} {} {} fetched {} applied {} lag {} ({:.1} s)\n",
                rep.node,
                rep.role,
                rep.disk_state,
                if rep.connected {
                    "connected"
                } else {
                    "disconnected"
                },
                rep.fetched,
                rep.applied,
                format_size(rep.lag_bytes),
                rep.lag_seconds
            ));
        }
        if r.emergency {
            out.push_str(
                "  EMERGENCY: log space ran out; replicas shown Outdated had their logfiles given up and resync by full sync\n",
            );
        }
        if r.split_brain {
            out.push_str(&format!(
                "  SPLIT BRAIN: this node wrote past the fork of a newer primary; `marsadm invalidate {}` resyncs it\n",
                r.name
            ));
        }
        for rep in r.replicas.iter().filter(|x| x.split_brain) {
            out.push_str(&format!(
                "  split brain on {}: {} of divergent log past the fork point\n",
                rep.node,
                format_size(rep.divergent_bytes)
            ));
        }
        if let Some(e) = &r.error {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    if v.resources.is_empty() {
        out.push_str("(no resources)\n");
    }
    out
}

/// Polls `view` until every replica is UpToDate and has applied what the
/// primary had logged when the wait began.
async fn wait(
    c: &mut pb::marsd_client::MarsdClient<tonic::transport::Channel>,
    name: &str,
    timeout: Option<f64>,
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let view = |c: &mut pb::marsd_client::MarsdClient<tonic::transport::Channel>| {
        let req = pb::ViewRequest {
            name: name.to_string(),
        };
        let mut c = c.clone();
        async move { c.view(req).await.map(|r| r.into_inner()) }
    };
    let first = view(c).await?;
    let r = first.resources.first().ok_or_else(|| Failure {
        code: 1,
        message: format!("resource {name} not found"),
    })?;
    // With a primary: what it had logged. Between `secondary` and `primary`
    // (no primary designated): the furthest any replica has the log.
    let target = match &r.primary {
        Some(p) => r
            .replicas
            .iter()
            .find(|x| &x.node == p)
            .map_or(0, |x| x.fetched),
        None => r
            .replicas
            .iter()
            .map(|x| x.fetched.max(x.applied))
            .max()
            .unwrap_or(0),
    };
    let tty = std::io::stderr().is_terminal();
    loop {
        let v = view(c).await?;
        let r = v.resources.first().ok_or_else(|| Failure {
            code: 1,
            message: format!("resource {name} not found"),
        })?;
        let behind: Vec<String> = r
            .replicas
            .iter()
            .filter(|x| x.disk_state != "UpToDate" || x.applied < target)
            .map(|x| {
                let pct = x
                    .sync_progress
                    .map(|p| format!(", sync {:.0}%", p * 100.0))
                    .unwrap_or_default();
                format!(
                    "{} ({}, applied {} of {target}{pct})",
                    x.node, x.disk_state, x.applied
                )
            })
            .collect();
        if behind.is_empty() {
            if tty {
                eprintln!();
            }
            println!("{name}: every replica is UpToDate at log position {target} or later");
            return Ok(());
        }
        if timeout.is_some_and(|t| started.elapsed().as_secs_f64() >= t) {
            return Err(Failure {
                code: 1,
                message: format!("{name}: timed out; behind: {}", behind.join(", ")),
            });
        }
        if tty {
            eprint!("\r\x1b[2Kwaiting for {}", behind.join(", "));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn steer(name: String, action: &str) -> pb::SteerRequest {
    pb::SteerRequest {
        name,
        action: action.into(),
    }
}
