//! Named network namespaces (`ip netns`), entering one from a thread, and
//! the prerequisites of the multi-host tests.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use crate::cmd::{output_within, run_ok};

/// Prefix of every namespace this harness creates:
/// `mars-e2e-<pid>-<cluster>-<host>`.
pub const PREFIX: &str = "mars-e2e-";
/// Any single `ip`, `tc` or `nft` call.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// One named network namespace; deleted on drop.
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        run_ok(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)?;
        Ok(Netns {
            name: name.to_string(),
            deleted: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            IP_TIMEOUT,
        )
    }

    /// `ip netns exec NAME PROGRAM`, to add arguments to and spawn.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `PROGRAM ARGS...` inside the namespace; returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_ok(self.command(program).args(args), IP_TIMEOUT)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets `f`
    /// creates stay in the namespace and may be used from any thread.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new("/run/netns").join(&self.name);
        let fd = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                setns(&fd, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {}", self.name))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("a thread in namespace {} panicked", self.name))?
        })
    }

    /// Kills what still runs in the namespace and deletes it. Idempotent.
    pub fn delete(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        kill_all_in(&self.name);
        if let Err(e) = run_ok(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        ) {
            eprintln!("warning: deleting network namespace {}: {e:#}", self.name);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// SIGKILLs, by pid, the processes left in namespace `name` (all of them
/// were started by this harness).
fn kill_all_in(name: &str) {
    let Ok(out) = output_within(Command::new("ip").args(["netns", "pids", name]), IP_TIMEOUT)
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Deletes namespaces left behind by earlier test processes that died
/// without cleaning up (their pid no longer exists).
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("note: removing stale network namespace {name} (its test process {pid} is gone)");
        Netns {
            name,
            deleted: false,
        }
        .delete();
    }
}

/// Why the multi-host tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces)".into());
    }
    match output_within(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT) {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => {
            return Some(format!(
                "`ip netns` is unavailable ({e:#}); apt-get install iproute2"
            ));
        }
    }
    if !Path::new("/sys/class/net").exists() {
        return Some("no /sys/class/net".into());
    }
    None
}

/// Whether `nft` (nftables) can be run.
pub fn have_nft() -> bool {
    output_within(Command::new("nft").arg("--version"), IP_TIMEOUT)
        .is_ok_and(|o| o.status.success())
}
