//! Applies log records to a device in log order. The same in-order,
//! idempotent replay serves crash recovery on the primary (its own log from
//! the written-back position), writeback, and secondaries (fetched logs).
//! Applying a prefix of the log to a copy of the device yields exactly the
//! primary's device at that log position, and re-applying records that are
//! already applied changes nothing, since each record carries its data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::log::{self, LogStore, Record, RecordKind};
use crate::storage::{File, Storage};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying record {seq} at log position {pos} to {device}: {source}")]
    Device {
        device: PathBuf,
        pos: u64,
        seq: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "writing the record {seq} at log position {pos} would reach byte {end} of {device}, which has only {size}: grow the device first"
    )]
    BeyondDevice {
        device: PathBuf,
        pos: u64,
        seq: u64,
        end: u64,
        size: u64,
    },
    #[error(transparent)]
    Log(#[from] log::Error),
    #[error("persisting position to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("position file {path} is damaged: {what}")]
    BadPosition { path: PathBuf, what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A position in the log that some stage has reached, persisted atomically:
/// `pos` is the log position after the last applied record, `next_seq` the
/// sequence number of the record that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    pub pos: u64,
    pub next_seq: u64,
}

impl Position {
    pub fn load(storage: &dyn Storage, path: &Path) -> Result<Option<Position>> {
        if !storage.exists(path) {
            return Ok(None);
        }
        let bytes = storage.read_file(path).map_err(|source| Error::Persist {
            path: path.into(),
            source,
        })?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::BadPosition {
                path: path.into(),
                what: e.to_string(),
            })
    }

    /// Persists atomically (temp file, fsync, rename, fsync dir). Callers
    /// only ever move a position forward.
    pub fn store(&self, storage: &dyn Storage, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("position serializes");
        storage
            .write_atomic(path, &bytes)
            .map_err(|source| Error::Persist {
                path: path.into(),
                source,
            })
    }
}

/// Applies one record to the device. Idempotent.
pub fn apply_record(dev: &dyn File, device: &Path, pos: u64, rec: &Record) -> Result<()> {
    let h = &rec.header;
    let io = |source| Error::Device {
        device: device.into(),
        pos,
        seq: h.seq,
        source,
    };
    match h.kind {
        RecordKind::Write | RecordKind::Zero => {
            let size = dev.size().map_err(io)?;
            let end = h.offset + h.length;
            if end > size {
                return Err(Error::BeyondDevice {
                    device: device.into(),
                    pos,
                    seq: h.seq,
                    end,
                    size,
                });
            }
            if h.kind == RecordKind::Write {
                dev.write_all_at(&rec.payload, h.offset).map_err(io)
            } else {
                dev.write_zeroes(h.offset, h.length).map_err(io)
            }
        }
        RecordKind::Resize => {
            let size = dev.size().map_err(io)?;
            if size < h.offset {
                dev.set_len(h.offset).map_err(io)?;
            }
            Ok(())
        }
    }
}

/// Replays the log into a device from a persisted position, persisting the
/// new position after the device is synced.
pub struct Applicator {
    store: Arc<LogStore>,
    storage: Arc<dyn Storage>,
    device: Arc<dyn File>,
    device_path: PathBuf,
    position_path: PathBuf,
    position: Position,
}

impl Applicator {
    pub fn new(
        store: Arc<LogStore>,
        storage: Arc<dyn Storage>,
        device: Arc<dyn File>,
        device_path: PathBuf,
        position_path: PathBuf,
        start: Position,
    ) -> Self {
        Self {
            store,
            storage,
            device,
            device_path,
            position_path,
            position: start,
        }
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Applies records up to (not beyond) log position `limit`, at most
    /// `max_records`; then syncs the device and persists the position.
    /// Returns the number of records applied.
    pub fn apply_until(&mut self, limit: u64, max_records: usize) -> Result<usize> {
        let mut cursor = self.store.cursor(self.position.pos)?;
        let mut applied = 0;
        let mut pos = self.position;
        while applied < max_records {
            let Some((at, rec)) = cursor.next_record()? else {
                break;
            };
            let end = at + rec.header.encoded_len();
            if end > limit {
                break;
            }
            if rec.header.seq != pos.next_seq && pos.next_seq != 0 {
                return Err(log::Error::Corruption {
                    path: self.store.dir().into(),
                    offset: at,
                    what: format!(
                        "expected record {} at position {at}, found {}",
                        pos.next_seq, rec.header.seq
                    ),
                }
                .into());
            }
            apply_record(&*self.device, &self.device_path, at, &rec)?;
            pos = Position {
                pos: end,
                next_seq: rec.header.seq + 1,
            };
            applied += 1;
        }
        if applied > 0 {
            self.device.sync_data().map_err(|source| Error::Device {
                device: self.device_path.clone(),
                pos: pos.pos,
                seq: pos.next_seq,
                source,
            })?;
            pos.store(&*self.storage, &self.position_path)?;
            self.position = pos;
        }
        Ok(applied)
    }

    /// Applies everything in the log.
    pub fn apply_all(&mut self) -> Result<usize> {
        let mut total = 0;
        loop {
            let n = self.apply_until(u64::MAX, 4096)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }
}
