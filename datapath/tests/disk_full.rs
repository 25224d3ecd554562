//! The state root's file system runs full: writes fail with an I/O error
//! (ENOSPC), nothing completed is lost or corrupted, and writes work again
//! once space is freed. Needs root (mounts a small tmpfs); skips otherwise.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use datapath::frontend::{BlockIo, IoError};
use datapath::quota::LogQuota;
use datapath::resource::{Resource, Settings};
use datapath::storage::fs::RealStorage;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_path_buf()))
}

fn block(i: u64) -> Bytes {
    Bytes::from(vec![(i % 251) as u8 + 1; 64 << 10])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_root_fails_writes_cleanly_and_recovers_when_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let Some(_mount) = mount_tmpfs(&root, "4m") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    // Leave about 1 MiB free: a filler file takes the rest.
    let filler = root.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
    let settings = Settings {
        node: "n1".into(),
        logfile_size: 64 << 20,
        overlay_limit: 64 << 20,
        writeback_nice: 0,
    };
    let r = Resource::create(
        Arc::new(RealStorage),
        &root,
        settings,
        Arc::new(LogQuota::new(1 << 30)),
        "r1",
        &tmp.path().join("r1.img"),
        8 << 20,
        None,
    )
    .unwrap();
    let h = r.open().unwrap();
    // The backing device lives elsewhere, so writeback never frees log space
    // here: the current logfile is never deleted. Write until the disk is full.
    let mut completed = Vec::new();
    let mut failure = None;
    for i in 0..64u64 {
        match h.write(i * (64 << 10), block(i), false).await {
            Ok(()) => completed.push(i),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the 1 MiB left on the state root must run out");
    assert!(matches!(failure, IoError::NoSpace { .. }), "{failure:?}");
    assert_eq!(failure.errno(), 28, "NBD/ublk report ENOSPC");
    assert!(failure.to_string().contains("r1"), "{failure}");
    assert!(!completed.is_empty());
    // Completed writes are intact.
    for &i in &completed {
        assert_eq!(h.read(i * (64 << 10), 64 << 10).await.unwrap(), block(i));
    }
    h.flush().await.unwrap();
    // Free space: writes work again, and nothing before was damaged.
    std::fs::remove_file(&filler).unwrap();
    let next = completed.len() as u64;
    h.write(next * (64 << 10), block(next), true).await.unwrap();
    for &i in completed.iter().chain([next].iter()) {
        assert_eq!(h.read(i * (64 << 10), 64 << 10).await.unwrap(), block(i));
    }
}
