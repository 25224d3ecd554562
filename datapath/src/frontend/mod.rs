//! Frontends: the ways clients reach a volume's data (NBD today, ublk and the
//! remote device later). Every frontend goes through [`BlockIo`], so a write
//! completes only once the logger has put it into the log.

pub mod nbd;
pub mod remote;
pub mod ublk;

use std::future::Future;

use bytes::Bytes;

/// Why a block request failed. Frontends map it to an errno with
/// [`IoError::errno`] (NBD replies and, later, ublk completions use the same).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(
        "request at offset {offset} length {len} goes beyond the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request too large: {len} bytes (at most {max})")]
    TooLarge { len: u64, max: u64 },
    #[error("volume {0} is not primary on this node: writes are refused")]
    NotPrimary(String),
    #[error("volume {0} is shutting down")]
    ShuttingDown(String),
    #[error("no space left for the transaction log of {resource}: {source}")]
    NoSpace {
        resource: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on {resource}: {source}")]
    Io {
        resource: String,
        #[source]
        source: std::io::Error,
    },
}

impl IoError {
    /// The positive errno a block protocol reports for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { .. } | IoError::TooLarge { .. } => libc_errno::EINVAL,
            IoError::NotPrimary(_) => libc_errno::EPERM,
            IoError::ShuttingDown(_) => libc_errno::ESHUTDOWN,
            IoError::NoSpace { .. } => libc_errno::ENOSPC,
            IoError::Io { source, .. } => source.raw_os_error().unwrap_or(libc_errno::EIO),
        }
    }
}

/// The errno values we report (Linux numbers; NBD uses the same ones).
pub mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EOVERFLOW: i32 = 75;
    pub const ENOTSUP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
}

/// Block I/O on one opened volume. Completion means: a write is in the log
/// (write(2) returned) and visible to later reads; a `flush` (or a write with
/// `fua`) returns once every write completed before it is durable.
pub trait BlockIo: Send + Sync + 'static {
    /// Current size in bytes (it may grow while the volume is open).
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, IoError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Zero a range (NBD WRITE_ZEROES and TRIM both land here: a trimmed
    /// range reads back as zeroes).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;
}

/// The set of volumes a frontend may export, by name.
pub trait ExportTable: Send + Sync + 'static {
    /// One client's open handle; the volume counts as "in use" until it is dropped.
    type Handle: BlockIo;
    /// Opens export `name`, or `None` if no such export is served here.
    fn open(&self, name: &str) -> Option<Self::Handle>;
    /// Names of the exports served here, for NBD_OPT_LIST.
    fn names(&self) -> Vec<String>;
}
