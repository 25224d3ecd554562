//! One host: a network namespace with its own marsd, state root and
//! volumes in a directory of the cluster's temporary directory.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::bins::Bins;
use crate::cmd::{output_within, wait_for};
use crate::nbd_client::{self, NbdClient};
use crate::netns::Netns;

/// The replication port (`--listen`) on every host's address.
pub const PEER_PORT: u16 = 7000;
/// The NBD port (`--nbd`) on every host's address.
pub const NBD_PORT: u16 = 10809;
/// How long marsd may take to answer `marsadm view` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// marsd promises to exit within 20 s of SIGTERM; a little slack on top.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(25);
/// Any `marsadm` call without an explicit limit.
/// The file [`Host::fill_root`] fills the state root with.
const FILLER: &str = "disk-full.filler";
pub const MARSADM_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Host {
    name: String,
    ns: Arc<Netns>,
    addr: Ipv4Addr,
    dir: PathBuf,
    root: PathBuf,
    stderr_path: PathBuf,
    extra: Vec<String>,
    bins: &'static Bins,
    child: Option<Child>,
    /// The state root is a tmpfs mounted by [`Host::mount_tmpfs_root`].
    tmpfs_root: bool,
}

impl Host {
    pub(crate) fn new(
        name: &str,
        ns: Arc<Netns>,
        addr: Ipv4Addr,
        dir: PathBuf,
        extra: Vec<String>,
        bins: &'static Bins,
    ) -> Result<Host> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Host {
            name: name.to_string(),
            root: dir.join("root"),
            stderr_path: dir.join("marsd.stderr"),
            dir,
            ns,
            addr,
            extra,
            bins,
            child: None,
            tmpfs_root: false,
        })
    }

    /// Mounts a tmpfs of `mib` MiB as the state root (before marsd starts;
    /// unmounted when the host is dropped).
    pub(crate) fn mount_tmpfs_root(&mut self, mib: u64) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        crate::cmd::run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&self.root),
            Duration::from_secs(10),
        )
        .with_context(|| format!("mounting a tmpfs on {}", self.root.display()))?;
        self.tmpfs_root = true;
        Ok(())
    }

    /// Fills the state root's file system: writes `FILLER` until ENOSPC.
    /// Returns the bytes written.
    pub fn fill_root(&self) -> Result<u64> {
        use std::io::Write;
        let path = self.root.join(FILLER);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0xa5u8; 64 << 10];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
            }
        }
        Ok(n)
    }

    /// Removes what [`Host::fill_root`] wrote.
    pub fn free_root(&self) -> Result<()> {
        let path = self.root.join(FILLER);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// The node name (`--node`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `ADDR:PORT` of the replication port, as peers dial it.
    pub fn peer_addr(&self) -> String {
        format!("{}:{PEER_PORT}", self.addr)
    }

    /// `ADDR:PORT` of the NBD server (reachable inside the namespace only).
    pub fn nbd_addr(&self) -> String {
        format!("{}:{NBD_PORT}", self.addr)
    }

    /// The state root (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `file` in this host's directory (beside the root): for volumes.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The process id of the running marsd.
    pub fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("marsd on {} is not running", self.name))
    }

    /// Starts marsd in the host's namespace and waits until it answers.
    pub fn start(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready()
    }

    /// Starts marsd without waiting for it.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("marsd on {} is already running", self.name);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .with_context(|| format!("opening {}", self.stderr_path.display()))?;
        use std::io::Write;
        let _ = writeln!(&log, "===== marsd start on {} =====", self.name);
        let mut cmd = self.ns.command(&self.bins.marsd);
        cmd.env_remove("MARS_ROOT")
            .arg("--root")
            .arg(&self.root)
            .args(["--node", &self.name])
            .args(["--listen", &self.peer_addr()])
            .args(["--nbd", &self.nbd_addr()])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // If the test process dies without unwinding (SIGKILL, ^C), marsd
        // dies with it (the signal follows the spawning thread, which is the
        // test's thread owning the cluster; it survives `ip netns exec`'s
        // exec). Stale namespaces are swept by the next run.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting marsd on {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `marsadm view` succeeds (bounded by [`READY_TIMEOUT`]).
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "marsd on {} exited with {status} before it was ready; its stderr:\n{}",
                    self.name,
                    self.stderr_tail(30)
                );
            }
            if self.root.join("marsd.sock").exists() && self.marsadm(&["view"])?.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "marsd on {} did not answer within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.name,
                    self.stderr_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The exit status if marsd has exited (then it no longer counts as running).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("waiting for marsd")?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && matches!(self.try_wait(), Ok(None))
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("marsd on {} is not running", self.name))?;
        let _ = child.kill();
        child.wait().context("reaping marsd")?;
        Ok(())
    }

    /// SIGTERM and wait for the exit (bounded by [`TERM_TIMEOUT`]).
    pub fn term(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("marsd on {} is not running", self.name))?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + TERM_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "marsd on {} ignored SIGTERM for {TERM_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`, then start again and wait until it answers.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9()?;
        }
        self.start()
    }

    /// SIGSTOP, and wait until every thread of marsd is stopped (a signal
    /// is delivered asynchronously; a thread in a system call stops when
    /// it returns from it). Afterwards nothing in marsd runs until
    /// [`Host::thaw`].
    pub fn freeze(&self) -> Result<()> {
        let pid = self.pid()?;
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).context("SIGSTOP")?;
        wait_for(
            &format!("every thread of marsd {pid} on {} stopped", self.name),
            Duration::from_secs(5),
            Duration::from_millis(1),
            || all_threads_stopped(pid).map(|s| s.then_some(())),
        )
    }

    /// SIGCONT.
    pub fn thaw(&self) -> Result<()> {
        kill(Pid::from_raw(self.pid()? as i32), Signal::SIGCONT).context("SIGCONT")?;
        Ok(())
    }

    /// `marsadm --root ROOT ARGS...`, bounded by [`MARSADM_TIMEOUT`].
    pub fn marsadm(&self, args: &[&str]) -> Result<Output> {
        self.marsadm_within(args, MARSADM_TIMEOUT)
    }

    pub fn marsadm_within(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new(&self.bins.marsadm);
        cmd.env_remove("MARS_ROOT")
            .current_dir(&self.dir)
            .arg("--root")
            .arg(&self.root)
            .args(args);
        output_within(&mut cmd, timeout)
    }

    /// `marsadm ARGS...` that must exit 0; returns stdout.
    pub fn marsadm_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.marsadm(args)?;
        if !out.status.success() {
            bail!(
                "marsadm {args:?} on {} failed with {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `marsadm view --json`, parsed.
    pub fn view(&self) -> Result<Value> {
        let text = self.marsadm_ok(&["view", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("view --json is not JSON: {text}"))
    }

    /// The view of resource `name` on this host.
    pub fn resource(&self, name: &str) -> Result<Value> {
        let v = self.view()?;
        v["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow!("{} has no resource {name}: {v:#}", self.name))
    }

    /// What this host's view says about `node`'s replica of `name`.
    pub fn replica(&self, name: &str, node: &str) -> Result<Value> {
        let r = self.resource(name)?;
        r["replicas"]
            .as_array()
            .and_then(|rs| rs.iter().find(|x| x["node"] == node))
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "{}'s view of {name} has no replica {node}: {r:#}",
                    self.name
                )
            })
    }

    /// An NBD connection to export `export`, made from inside the host's
    /// namespace (retried while the server or export is not there yet, up
    /// to 10 s).
    pub fn nbd(&self, export: &str) -> Result<NbdClient> {
        let addr = self.nbd_addr();
        wait_for(
            &format!("NBD export {export} at {addr} on {}", self.name),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let c = self
                    .ns
                    .enter(|| nbd_client::connect(addr.as_str(), export))??;
                Ok(Some(c))
            },
        )
    }

    /// marsd's stderr of every run so far (runs start with a
    /// `===== marsd start on NAME =====` line).
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of marsd's stderr (all runs).
    pub fn stderr_tail(&self, lines: usize) -> String {
        let all = self.stderr();
        let v: Vec<&str> = all.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills marsd (if running); used on teardown.
    pub(crate) fn shut_down(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shut_down();
        // A failed test keeps its directory: then the root stays mounted
        // too, for inspection (`umount` it afterwards).
        if self.tmpfs_root && !std::thread::panicking() {
            let _ = crate::cmd::run_ok(
                Command::new("umount").arg("-l").arg(&self.root),
                Duration::from_secs(10),
            );
        }
    }
}

/// Whether every thread of `pid` is in state T (stopped).
fn all_threads_stopped(pid: u32) -> Result<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?;
    for t in tasks {
        let t = t?;
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "tid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        match state {
            Some('T') | Some('t') | None => {}
            Some(_) => return Ok(false),
        }
    }
    Ok(true)
}
