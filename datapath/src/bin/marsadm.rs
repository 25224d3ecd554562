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
    DeleteResource { name: String },
    /// Make this node primary for the resource.
    Primary { name: String },
    /// Make this node secondary for the resource (refused while in use).
    Secondary { name: String },
    /// Grow the resource to SIZE.
    Resize { name: String, size: String },
    /// Start a new logfile.
    LogRotate { name: String },
    /// Delete logfiles that are written back.
    LogDelete { name: String },
    /// Show resources, as a table or as JSON.
    View {
        name: Option<String>,
        #[arg(long)]
        json: bool,
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
        Command::DeleteResource { name } => c.delete_resource(pb::ResourceRequest { name }).await?,
        Command::Primary { name } => c.primary(pb::ResourceRequest { name }).await?,
        Command::Secondary { name } => c.secondary(pb::ResourceRequest { name }).await?,
        Command::Resize { name, .. } => {
            c.resize(pb::ResizeRequest {
                name,
                size: request.expect("size parsed above"),
            })
            .await?
        }
        Command::LogRotate { name } => c.log_rotate(pb::ResourceRequest { name }).await?,
        Command::LogDelete { name } => c.log_delete(pb::ResourceRequest { name }).await?,
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
        if let Some(e) = &r.error {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    if v.resources.is_empty() {
        out.push_str("(no resources)\n");
    }
    out
}
