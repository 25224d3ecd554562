//! Where `marsd` and `marsadm` come from.
//!
//! `MARS_BIN_DIR` names a directory that holds both (nothing is built).
//! Otherwise they are the ones in the profile directory this test binary
//! runs from (`target/debug`), rebuilt once per test process with
//! `cargo build -p mars-datapath --bins` (unless `MARS_E2E_NO_BUILD` is
//! set) so that a test never runs stale daemons. If that build fails but
//! binaries exist, they are used with a warning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::cmd::output_within;

pub struct Bins {
    pub marsd: PathBuf,
    pub marsadm: PathBuf,
}

/// A first build of the whole datapath may take a while on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();

/// The binaries, or why there are none (a reason to skip).
pub fn bins() -> Result<&'static Bins, String> {
    BINS.get_or_init(locate).as_ref().map_err(Clone::clone)
}

fn in_dir(dir: &Path) -> Result<Bins, String> {
    let b = Bins {
        marsd: dir.join("marsd"),
        marsadm: dir.join("marsadm"),
    };
    for p in [&b.marsd, &b.marsadm] {
        if !p.is_file() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(b)
}

fn locate() -> Result<Bins, String> {
    if let Some(dir) = std::env::var_os("MARS_BIN_DIR").filter(|d| !d.is_empty()) {
        return in_dir(Path::new(&dir));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?
        .to_path_buf();
    if std::env::var_os("MARS_E2E_NO_BUILD").is_none()
        && let Some(cargo) = std::env::var_os("CARGO")
    {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "mars-datapath", "--bins", "--profile", &profile]);
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        match output_within(&mut cmd, BUILD_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: building marsd failed; using the binaries in {} if present:\n{}",
                profile_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: building marsd: {e:#}"),
        }
    }
    in_dir(&profile_dir)
        .map_err(|e| format!("{e} (run `cargo build -p mars-datapath` or set MARS_BIN_DIR)"))
}
