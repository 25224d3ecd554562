//! `marsd` as a real child process, for tests that crash, restart and steer
//! it through `marsadm`.
//!
//! Each [`Daemon`] owns a temporary directory: the state root lives in
//! `DIR/root`, backing files go beside it (see [`Daemon::path`]), and marsd's
//! stderr of every run is appended to `DIR/marsd.stderr`. The ports are free
//! loopback ports found once and kept across restarts. The process is killed
//! (SIGKILL) when the `Daemon` is dropped; if the test is panicking, the tail
//! of marsd's stderr is printed to help find out why.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

pub const MARSD: &str = env!("CARGO_BIN_EXE_marsd");
pub const MARSADM: &str = env!("CARGO_BIN_EXE_marsadm");

/// How long marsd may take to answer `marsadm view` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// marsd promises to exit within 20 s of SIGTERM; a little slack on top.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(25);
/// Any single `marsadm` call (some block while writing back).
pub const MARSADM_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
}

/// Runs `cmd` to completion with its output captured; kills it and panics
/// after `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on them.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let err = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {timeout:?}");
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// One marsd on its own temporary state root.
pub struct Daemon {
    dir: tempfile::TempDir,
    root: PathBuf,
    node: String,
    listen: SocketAddr,
    nbd: SocketAddr,
    extra: Vec<String>,
    child: Option<Child>,
    stderr_path: PathBuf,
    /// Where the current run's stderr starts in `stderr_path`.
    run_start: u64,
}

impl Daemon {
    /// Starts marsd with default settings and waits until it answers.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts marsd with `extra` arguments (e.g. `["--logfile-size", "1M"]`)
    /// and waits until it answers.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let mut d = Self::new(extra);
        d.restart();
        d
    }

    /// Starts marsd as node `node` (for clusters of several daemons).
    pub fn start_named(node: &str, extra: &[&str]) -> Daemon {
        let mut d = Self::new(extra);
        d.node = node.into();
        d.restart();
        d
    }

    /// A daemon that is not running yet (call [`Daemon::restart`] or
    /// [`Daemon::spawn`]).
    pub fn new(extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("marsd-test-")
            .tempdir()
            .expect("creating a temporary directory");
        let root = dir.path().join("root");
        let stderr_path = dir.path().join("marsd.stderr");
        Daemon {
            root,
            stderr_path,
            dir,
            node: "n1".into(),
            listen: free_addr(),
            nbd: free_addr(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            run_start: 0,
        }
    }

    /// The state root (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `name` inside the daemon's temporary directory (beside the root).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The NBD address (`--nbd`).
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd
    }

    /// The replication address (`--listen`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The process id of the running marsd.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("marsd is running").id()
    }

    /// A `marsd` command for this root and ports, with the extra arguments.
    pub fn marsd_command(&self) -> Command {
        let mut cmd = Command::new(MARSD);
        cmd.env_remove("MARS_ROOT")
            .arg("--root")
            .arg(&self.root)
            .args(["--node", &self.node])
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--nbd")
            .arg(self.nbd.to_string())
            .args(&self.extra);
        cmd
    }

    /// Starts marsd without waiting for it to be ready.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "marsd is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("opening marsd's stderr file");
        self.run_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = self
            .marsd_command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MARSD}: {e}"));
        self.child = Some(child);
    }

    /// Starts marsd (stopping it with SIGKILL first if it runs) and waits
    /// until `marsadm view` succeeds.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
        self.wait_ready();
    }

    /// Waits until `marsadm view` succeeds; panics with marsd's stderr if
    /// marsd exits or does not answer within [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "marsd exited with {status} before it was ready; its stderr:\n{}",
                    self.run_stderr()
                );
            }
            if self.root.join("marsd.sock").exists() && self.marsadm(&["view"]).status.success() {
                return;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "marsd did not answer `marsadm view` within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.run_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if marsd has exited (it is then no longer running).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait().expect("waiting for marsd") {
            Some(status) => {
                self.child = None;
                Some(status)
            }
            None => None,
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGKILL and reap. Returns the exit status if marsd had already
    /// exited on its own (then it was not killed), `None` if it was killed.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("marsd was started");
        if let Some(status) = child.try_wait().expect("waiting for marsd") {
            return Some(status);
        }
        child.kill().expect("SIGKILL to marsd");
        child.wait().expect("reaping marsd");
        None
    }

    /// SIGTERM, then waits for the exit (at most [`TERM_TIMEOUT`], else
    /// SIGKILL and panic).
    pub fn term(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("marsd was started");
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait().expect("waiting for marsd").is_none() {
            kill(pid, Signal::SIGTERM).expect("SIGTERM to marsd");
        }
        let deadline = Instant::now() + TERM_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for marsd") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "marsd did not exit within {TERM_TIMEOUT:?} of SIGTERM; its stderr:\n{}",
                    self.run_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `marsadm --root ROOT ARGS...` (bounded by [`MARSADM_TIMEOUT`]).
    pub fn marsadm(&self, args: &[&str]) -> Output {
        self.marsadm_in(self.dir.path(), args)
    }

    /// Like [`Daemon::marsadm`], from working directory `cwd`.
    pub fn marsadm_in(&self, cwd: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(MARSADM);
        cmd.env_remove("MARS_ROOT")
            .current_dir(cwd)
            .arg("--root")
            .arg(&self.root)
            .args(args);
        output_within(&mut cmd, MARSADM_TIMEOUT)
    }

    /// Runs marsadm and panics (with its stderr) unless it exits 0; returns stdout.
    pub fn marsadm_ok(&self, args: &[&str]) -> String {
        let out = self.marsadm(args);
        assert!(
            out.status.success(),
            "marsadm {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `marsadm view --json`, parsed.
    pub fn view_json(&self) -> Value {
        let text = self.marsadm_ok(&["view", "--json"]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("view --json is not JSON ({e}): {text}"))
    }

    /// The `view --json` entry of resource `name`.
    pub fn resource_view(&self, name: &str) -> Value {
        let v = self.view_json();
        v["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("resource {name} missing from view: {v:#}"))
    }

    /// marsd's stderr of every run so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// marsd's stderr of the current (or last) run.
    pub fn run_stderr(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.stderr_path) {
            let _ = f.read_to_end(&mut buf);
        }
        let start = (self.run_start as usize).min(buf.len());
        String::from_utf8_lossy(&buf[start..]).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let all = self.stderr();
            let lines: Vec<&str> = all.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} lines of marsd's stderr ({}) ---\n{}",
                tail.len(),
                self.stderr_path.display(),
                tail.join("\n")
            );
        }
    }
}
