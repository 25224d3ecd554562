//! The real file system.

use std::fs;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;

use super::{File, OpenMode, Storage};

/// Files and block devices through the kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

struct RealFile {
    file: fs::File,
    block_device: bool,
}

const ZERO_CHUNK: usize = 1 << 20;

impl File for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // At most IOV_MAX slices per call; a short write resumes where it stopped.
        const IOV_MAX: usize = 1024;
        let mut bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        let mut first = 0;
        let mut offset = offset;
        while first < bufs.len() {
            let iov: Vec<io::IoSlice<'_>> = bufs[first..bufs.len().min(first + IOV_MAX)]
                .iter()
                .map(|b| io::IoSlice::new(b))
                .collect();
            // SAFETY: iov points to live slices for the duration of the call.
            let n = unsafe {
                nix::libc::pwritev(
                    self.file.as_raw_fd(),
                    iov.as_ptr().cast(),
                    iov.len() as nix::libc::c_int,
                    offset as nix::libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            offset += n as u64;
            let mut n = n as usize;
            while n > 0 {
                let b = bufs[first];
                if n >= b.len() {
                    n -= b.len();
                    first += 1;
                } else {
                    bufs[first] = &b[n..];
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        if self.block_device {
            // st_size is 0 for block devices; the end offset is the capacity.
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot be resized by mars: grow it first (e.g. lvextend)",
            ));
        }
        self.file.set_len(len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.block_device && len > 0 {
            use nix::fcntl::{FallocateFlags, fallocate};
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if fallocate(&self.file, flags, offset as i64, len as i64).is_ok() {
                return Ok(());
            }
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl Storage for RealStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut o = fs::OpenOptions::new();
        o.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                o.write(true);
            }
            OpenMode::Create => {
                o.write(true).create(true);
            }
            OpenMode::CreateNew => {
                o.write(true).create_new(true);
            }
        }
        let file = o.open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Arc::new(RealFile { file, block_device }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        fs::File::open(path)?.sync_all()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn available_space(&self, path: &Path) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_write_lands_like_the_concatenation_of_its_slices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = RealStorage.open(&path, OpenMode::Create).unwrap();
        // More slices than one pwritev takes, empty ones among them.
        let data: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![i as u8; (i % 7) as usize])
            .collect();
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        f.write_all_vectored_at(&slices, 100).unwrap();
        let want = slices.concat();
        let mut got = vec![0u8; want.len()];
        f.read_exact_or_zero(&mut got, 100).unwrap();
        assert_eq!(got, want);
        assert_eq!(f.size().unwrap(), 100 + want.len() as u64);
    }
}
