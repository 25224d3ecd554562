//! File I/O behind a small trait, so that the log, writeback and the
//! applicator run over a simulated disk in power-loss tests
//! ([`sim::SimStorage`]: a crash drops every write not covered by a
//! completed sync). Only `bin/` and the daemon's wiring pick the real
//! implementation, [`fs::RealStorage`].

pub mod fs;
pub mod sim;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; create the file if it is missing.
    Create,
    /// Read and write; fail if the file exists.
    CreateNew,
}

/// One open file (or block device). Positional I/O only: handles are shared
/// between threads and never use a file cursor.
pub trait File: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; a short read means end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` one after another from `offset`, like one
    /// `write_all_at` of their concatenation (which is what this default
    /// does; the real file system writes them in place with pwritev).
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_all_at(&bufs.concat(), offset)
    }
    /// Makes every completed write of this file durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Size in bytes (for a block device: its capacity).
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends a regular file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset` (hole punching where possible).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// True if this is a block device rather than a regular file.
    fn is_block_device(&self) -> bool;

    /// Reads exactly `buf.len()` bytes, zero-filling what lies past the end.
    fn read_exact_or_zero(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

/// A file system: the state root and the backing devices live on one.
pub trait Storage: Send + Sync + 'static {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// fsync of a directory, so that created, renamed or removed entries survive a crash.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Free bytes for unprivileged use on the file system holding `path`.
    fn available_space(&self, path: &Path) -> io::Result<u64>;

    /// Writes `data` to `path` atomically: temp file, fsync, rename, fsync directory.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = PathBuf::from(path);
        tmp.as_mut_os_string().push(".tmp");
        let f = self.open(&tmp, OpenMode::Create)?;
        f.set_len(0)?;
        f.write_all_at(data, 0)?;
        f.sync_data()?;
        drop(f);
        self.rename(&tmp, path)?;
        self.sync_dir(dir)
    }

    /// Reads a whole (small) file.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let len = f.size()? as usize;
        let mut buf = vec![0; len];
        let mut done = 0;
        while done < len {
            let n = f.read_at(&mut buf[done..], done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }
}
