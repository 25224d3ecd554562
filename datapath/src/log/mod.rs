//! The transaction log of one resource: a totally ordered stream of records
//! in rotating logfiles `log-NNNNNNNNN-HOST`. A log position is a byte
//! offset in that stream, monotonic across rotations: a file that starts at
//! position `start_pos` holds position `start_pos + (offset - 64)` at file
//! offset `offset`.

pub mod format;
pub mod lineage;
pub mod reader;
pub mod store;

pub use format::{Record, RecordHeader, RecordKind};
pub use lineage::{Epoch, Lineage};
pub use store::{Appender, LogCursor, LogStore, RecordBefore, Recovered};

use std::path::PathBuf;

/// Errors of the log layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "corrupt log {path} at file offset {offset}: {what}; replay stops here (restore the logfile or re-sync this replica)"
    )]
    Corruption {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("log {dir} is not contiguous: {what}")]
    Gap { dir: PathBuf, what: String },
    #[error("log position {pos} is not available in {dir} (log starts at {first}, ends at {end})")]
    PositionUnavailable {
        dir: PathBuf,
        pos: u64,
        first: u64,
        end: u64,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
