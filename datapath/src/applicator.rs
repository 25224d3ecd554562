//! Applies log records to a device in log order. The same in-order,
//! idempotent replay serves crash recovery on the primary (its own log from
//! the written-back position), writeback, and secondaries (fetched logs).
//! Applying a prefix of the log to a copy of the device yields exactly the
//! primary's device at that log position, and re-applying records that are
//! already applied changes nothing, since each record carries its data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::log::{self, LogStore, Record, RecordHeader, RecordKind};
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

/// The device's size as last seen. A record must not reach past the
/// device, and asking the kernel for each 4 KiB record doubled the system
/// calls of writing back. The size only grows (Resize records), so a
/// cached size that looks too small is read again before a record counts
/// as beyond the device.
#[derive(Debug, Default, Clone, Copy)]
pub struct KnownSize(u64);

/// Applies one record to the device. Idempotent.
pub fn apply_record(
    dev: &dyn File,
    device: &Path,
    pos: u64,
    rec: &Record,
    size: &mut KnownSize,
) -> Result<()> {
    apply_parts(dev, device, pos, &rec.header, &rec.payload, size)
}

/// [`apply_record`] of a record given as its header and payload, e.g.
/// borrowed from a log reader's window.
pub fn apply_parts(
    dev: &dyn File,
    device: &Path,
    pos: u64,
    h: &RecordHeader,
    payload: &[u8],
    size: &mut KnownSize,
) -> Result<()> {
    let io = |source| Error::Device {
        device: device.into(),
        pos,
        seq: h.seq,
        source,
    };
    match h.kind {
        RecordKind::Write | RecordKind::Zero => {
            let end = h.offset + h.length;
            if end > size.0 {
                size.0 = dev.size().map_err(io)?;
            }
            if end > size.0 {
                return Err(Error::BeyondDevice {
                    device: device.into(),
                    pos,
                    seq: h.seq,
                    end,
                    size: size.0,
                });
            }
            if h.kind == RecordKind::Write {
                dev.write_all_at(payload, h.offset).map_err(io)
            } else {
                dev.write_zeroes(h.offset, h.length).map_err(io)
            }
        }
        RecordKind::Resize => {
            size.0 = dev.size().map_err(io)?;
            if size.0 < h.offset {
                dev.set_len(h.offset).map_err(io)?;
                size.0 = h.offset;
            }
            Ok(())
        }
    }
}

/// What persisting an applied position needs: the device to sync and where
/// the position goes. Cloned into a thread that persists while the applier
/// goes on applying.
#[derive(Clone)]
pub struct Persister {
    storage: Arc<dyn Storage>,
    device: Arc<dyn File>,
    device_path: PathBuf,
    position_path: PathBuf,
    /// A sync of the device failed: no position is persisted any more.
    failed: Arc<AtomicBool>,
}

impl Persister {
    /// Whether a sync of the device failed: nothing is persisted from
    /// then on, and the applier must start over from the persisted
    /// position (see `secondary::apply_loop`).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Syncs the device, then stores `pos`: everything before `pos` must
    /// have been written to the device before this call. Never call it
    /// with a position behind one already persisted.
    ///
    /// After a failed sync it refuses for good (the applier starts over
    /// and writes the log from the persisted position again): Linux marks
    /// the pages of a failed writeback clean, so a later sync that
    /// succeeds would not cover them.
    pub fn persist(&self, pos: Position) -> Result<()> {
        let failed = |source| Error::Device {
            device: self.device_path.clone(),
            pos: pos.pos,
            seq: pos.next_seq,
            source,
        };
        if self.failed.load(Ordering::Acquire) {
            return Err(failed(std::io::Error::other(
                "an earlier sync of the device failed; applying again from the persisted position",
            )));
        }
        self.device.sync_data().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            failed(e)
        })?;
        pos.store(&*self.storage, &self.position_path)
    }
}

/// Replays the log into a device from a persisted position. Applying and
/// persisting are separate steps: [`Applicator::apply_records`] only writes
/// to the device, [`Persister::persist`] makes a position durable, so that a
/// caller may batch syncs (or run them beside further applying).
pub struct Applicator {
    store: Arc<LogStore>,
    persister: Persister,
    /// Persisted by [`Applicator::apply_until`].
    position: Position,
    /// Written to the device (maybe not yet synced).
    applied: Position,
    size: KnownSize,
}

/// What [`Applicator::apply_records`] did with one record it read.
enum Visit {
    /// Applied; the record ends at `end`.
    Applied { end: u64 },
    /// It ends past the limit: left for the next call.
    PastLimit,
}

/// One call of [`Applicator::apply_records`] writes at most this many bytes.
const APPLY_BATCH_BYTES: u64 = 16 << 20;

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
            persister: Persister {
                storage,
                device,
                device_path,
                position_path,
                failed: Arc::default(),
            },
            position: start,
            applied: start,
            size: KnownSize::default(),
        }
    }

    /// The position persisted by [`Applicator::apply_until`].
    pub fn position(&self) -> Position {
        self.position
    }

    /// The position written to the device, synced or not.
    pub fn applied(&self) -> Position {
        self.applied
    }

    pub fn persister(&self) -> Persister {
        self.persister.clone()
    }

    /// Writes records to the device up to (not beyond) log position
    /// `limit`, at most `max_records` and about [`APPLY_BATCH_BYTES`],
    /// without syncing. Returns the number of records applied.
    pub fn apply_records(&mut self, limit: u64, max_records: usize) -> Result<usize> {
        let mut cursor = self.store.cursor(self.applied.pos)?;
        let mut applied = 0;
        let mut pos = self.applied;
        let start = pos.pos;
        // Nothing at or past `limit` is read: the record there may still be
        // being appended (reading it would find it incomplete).
        while applied < max_records && pos.pos - start < APPLY_BATCH_BYTES && pos.pos < limit {
            // Applied straight from the reader's window: no copy of the payload.
            let (p, size, dir) = (&self.persister, &mut self.size, self.store.dir());
            let visited = cursor.next_visit(|at, h, payload| {
                let end = at + h.encoded_len();
                if end > limit {
                    return Ok(Visit::PastLimit);
                }
                if h.seq != pos.next_seq && pos.next_seq != 0 {
                    return Err(Error::from(log::Error::Corruption {
                        path: dir.into(),
                        offset: at,
                        what: format!(
                            "expected record {} at position {at}, found {}",
                            pos.next_seq, h.seq
                        ),
                    }));
                }
                apply_parts(&*p.device, &p.device_path, at, h, payload, size)?;
                Ok(Visit::Applied { end })
            })?;
            // `None`: the end of the log.
            let Some((_, header, visit)) = visited else {
                break;
            };
            let Visit::Applied { end } = visit? else {
                break;
            };
            pos = Position {
                pos: end,
                next_seq: header.seq + 1,
            };
            self.applied = pos;
            applied += 1;
        }
        Ok(applied)
    }

    /// Applies records up to (not beyond) log position `limit`, at most
    /// `max_records`; then syncs the device and persists the position.
    /// Returns the number of records applied.
    pub fn apply_until(&mut self, limit: u64, max_records: usize) -> Result<usize> {
        let applied = self.apply_records(limit, max_records)?;
        if self.applied.pos > self.position.pos {
            self.persister.persist(self.applied)?;
            self.position = self.applied;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{FileHeader, RecordHeader, encode_record};
    use crate::storage::OpenMode;
    use crate::storage::fs::RealStorage;
    use proptest::prelude::*;

    const DEV: u64 = 64 * 1024;

    fn rec(kind: RecordKind, offset: u64, length: u64, payload: &[u8]) -> Record {
        Record {
            header: RecordHeader {
                kind,
                unsynced: 0,
                seq: 1,
                generation: 1,
                offset,
                length,
                timestamp_ns: 0,
                payload_len: payload.len() as u32,
            },
            payload: bytes::Bytes::copy_from_slice(payload),
        }
    }

    /// The cached size never lets a record past the device, and never
    /// refuses one the device has room for (grown by a Resize record or
    /// behind the cache's back).
    #[test]
    fn a_cached_device_size_refuses_only_records_past_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dev");
        let dev = RealStorage.open(&path, OpenMode::Create).unwrap();
        dev.set_len(8192).unwrap();
        let mut size = KnownSize::default();
        let write = |at: u64| rec(RecordKind::Write, at, 4096, &[7; 4096]);
        apply_record(&*dev, &path, 0, &write(4096), &mut size).unwrap();
        let e = apply_record(&*dev, &path, 0, &write(8192), &mut size).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BeyondDevice {
                    end: 12288,
                    size: 8192,
                    ..
                }
            ),
            "{e}"
        );
        apply_record(
            &*dev,
            &path,
            0,
            &rec(RecordKind::Resize, 16384, 0, &[]),
            &mut size,
        )
        .unwrap();
        apply_record(&*dev, &path, 0, &write(12288), &mut size).unwrap();
        dev.set_len(20480).unwrap();
        apply_record(&*dev, &path, 0, &write(16384), &mut size).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 20480);
        let mut buf = vec![0; 4096];
        dev.read_exact_or_zero(&mut buf, 16384).unwrap();
        assert_eq!(buf, vec![7; 4096]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: u64, byte: u8 },
        Zero { offset: u64, len: u64 },
        Grow { by: u64 },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..DEV - 1, 1u64..9000, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write { offset, len: len.min(DEV - offset), byte }),
            2 => (0..DEV - 1, 1u64..20000).prop_map(|(offset, len)| Op::Zero { offset, len: len.min(DEV - offset) }),
            1 => (1u64..8192).prop_map(|by| Op::Grow { by }),
        ]
    }

    /// The model: a device as a byte vector, after each op.
    fn model_states(ops: &[Op]) -> Vec<Vec<u8>> {
        let mut dev = vec![0u8; DEV as usize];
        let mut states = vec![dev.clone()];
        for op in ops {
            match *op {
                Op::Write { offset, len, byte } => {
                    dev[offset as usize..(offset + len) as usize].fill(byte)
                }
                Op::Zero { offset, len } => dev[offset as usize..(offset + len) as usize].fill(0),
                Op::Grow { by } => dev.resize(dev.len() + by as usize, 0),
            }
            states.push(dev.clone());
        }
        states
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        storage: Arc<dyn Storage>,
        store: Arc<LogStore>,
        dev_path: PathBuf,
        pos_path: PathBuf,
        /// End position of each record, in order.
        ends: Vec<u64>,
    }

    /// Logs `ops` (rotating every few records) and creates an empty device.
    fn fixture(ops: &[Op], rotate_every: usize) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(RealStorage);
        let (store, _) = LogStore::open(Arc::clone(&storage), tmp.path()).unwrap();
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        let mut size = DEV;
        let mut ends = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if i > 0 && i % rotate_every == 0 {
                app.sync().unwrap();
                let h = FileHeader {
                    file_seq: i as u64 / rotate_every as u64 + 1,
                    start_pos: app.end_pos(),
                    first_seq: app.next_seq(),
                    generation: 1,
                };
                app = store.create_file("n1", h).unwrap();
            }
            let (kind, offset, length, payload) = match *op {
                Op::Write { offset, len, byte } => {
                    (RecordKind::Write, offset, len, vec![byte; len as usize])
                }
                Op::Zero { offset, len } => (RecordKind::Zero, offset, len, vec![]),
                Op::Grow { by } => {
                    size += by;
                    (RecordKind::Resize, size, 0, vec![])
                }
            };
            let h = RecordHeader {
                kind,
                unsynced: 0,
                seq: app.next_seq(),
                generation: 1,
                offset,
                length,
                timestamp_ns: 0,
                payload_len: payload.len() as u32,
            };
            let mut buf = Vec::new();
            encode_record(&h, &payload, &mut buf);
            app.append(&buf, 1).unwrap();
            store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
            ends.push(app.end_pos());
        }
        let dev_path = tmp.path().join("dev.img");
        storage
            .open(&dev_path, OpenMode::Create)
            .unwrap()
            .set_len(DEV)
            .unwrap();
        let pos_path = tmp.path().join("applied.json");
        Fixture {
            storage,
            store: Arc::new(store),
            dev_path,
            pos_path,
            ends,
            _tmp: tmp,
        }
    }

    impl Fixture {
        fn applicator(&self, start: Position) -> Applicator {
            let dev = self
                .storage
                .open(&self.dev_path, OpenMode::ReadWrite)
                .unwrap();
            Applicator::new(
                Arc::clone(&self.store),
                Arc::clone(&self.storage),
                dev,
                self.dev_path.clone(),
                self.pos_path.clone(),
                start,
            )
        }
        fn device(&self) -> Vec<u8> {
            std::fs::read(&self.dev_path).unwrap()
        }
    }

    const START: Position = Position {
        pos: 0,
        next_seq: 1,
    };

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Applying any prefix of the log yields the model's state at that
        /// prefix; applying the rest from there yields the final state.
        #[test]
        fn applying_a_prefix_gives_the_state_at_that_position(
            ops in proptest::collection::vec(arb_op(), 1..30),
            cut in any::<prop::sample::Index>(),
            rotate_every in 1usize..8,
        ) {
            let f = fixture(&ops, rotate_every);
            let states = model_states(&ops);
            let k = cut.index(ops.len() + 1);
            let limit = if k == 0 { 0 } else { f.ends[k - 1] };
            let mut app = f.applicator(START);
            prop_assert_eq!(app.apply_until(limit, usize::MAX).unwrap(), k);
            prop_assert_eq!(f.device(), states[k].clone());
            prop_assert_eq!(app.apply_all().unwrap(), ops.len() - k);
            prop_assert_eq!(f.device(), states[ops.len()].clone());
        }

        /// Re-applying from an earlier position changes nothing (idempotent),
        /// and a restart resumes from the persisted position.
        #[test]
        fn reapplying_is_idempotent_and_restart_resumes_from_the_persisted_position(
            ops in proptest::collection::vec(arb_op(), 1..30),
            batch in 1usize..6,
            back in any::<prop::sample::Index>(),
        ) {
            let f = fixture(&ops, 5);
            let states = model_states(&ops);
            // Apply in small batches, "crashing" (dropping the applicator) after each.
            let mut done = 0;
            loop {
                let start = Position::load(&*f.storage, &f.pos_path).unwrap().unwrap_or(START);
                let mut app = f.applicator(start);
                let n = app.apply_until(u64::MAX, batch).unwrap();
                done += n;
                prop_assert_eq!(f.device(), states[done].clone());
                if n == 0 { break; }
            }
            prop_assert_eq!(done, ops.len());
            // Replay again from an earlier record boundary: same final state.
            let j = back.index(ops.len());
            let from = if j == 0 { START } else { Position { pos: f.ends[j - 1], next_seq: j as u64 + 1 } };
            let mut app = f.applicator(from);
            prop_assert_eq!(app.apply_all().unwrap(), ops.len() - j);
            prop_assert_eq!(f.device(), states[ops.len()].clone());
        }
    }

    /// The fetcher appends while the applier applies up to what is durable.
    /// A record past the limit may be seen half-written even after the
    /// store has noted its append (the reader's read raced the write): it
    /// must not be read at all, else it looks like damage (this made the
    /// applier log an error and pause for a second under steady load).
    #[test]
    fn a_record_being_appended_past_the_limit_is_not_read() {
        let ops: Vec<Op> = (0..4u8)
            .map(|i| Op::Write {
                offset: u64::from(i) * 100,
                len: 50,
                byte: i + 1,
            })
            .collect();
        let f = fixture(&ops, 100);
        let states = model_states(&ops);
        // Half of a fifth record, as a write in progress leaves it.
        let h = RecordHeader {
            kind: RecordKind::Write,
            unsynced: 0,
            seq: 5,
            generation: 1,
            offset: 0,
            length: 4096,
            timestamp_ns: 0,
            payload_len: 4096,
        };
        let mut buf = Vec::new();
        encode_record(&h, &[9u8; 4096], &mut buf);
        let last = f.store.files().last().unwrap().clone();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&last.path)
            .unwrap();
        std::io::Write::write_all(&mut file, &buf[..buf.len() / 2]).unwrap();
        // The append is noted, but the reader sees only half of it.
        f.store
            .note_append(last.header.start_pos, f.ends[3] + buf.len() as u64, 6);
        let mut app = f.applicator(START);
        assert_eq!(app.apply_until(f.ends[3], usize::MAX).unwrap(), 4);
        assert_eq!(app.apply_until(f.ends[3], usize::MAX).unwrap(), 0);
        assert_eq!(f.device(), states[4]);
    }

    #[test]
    fn a_write_beyond_the_device_is_refused_not_half_applied() {
        let ops = [Op::Write {
            offset: 0,
            len: 10,
            byte: 1,
        }];
        let f = fixture(&ops, 10);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.dev_path)
            .unwrap()
            .set_len(5)
            .unwrap();
        let err = f.applicator(START).apply_all().unwrap_err();
        assert!(err.to_string().contains("grow the device first"), "{err}");
        assert_eq!(Position::load(&*f.storage, &f.pos_path).unwrap(), None);
    }

    /// After a failed device sync no position is persisted any more, even
    /// when a later sync would succeed: the failed one may have lost pages
    /// that a later one does not cover (the simulated disk loses them).
    #[test]
    fn a_failed_device_sync_stops_persisting_positions_for_good() {
        use crate::storage::sim::{CrashMode, Faults, SimStorage};
        let sim = SimStorage::new(7);
        sim.mkdir_durable(Path::new("/d"));
        sim.mkdir_durable(Path::new("/d/log"));
        let storage: Arc<dyn Storage> = Arc::new(sim.clone());
        let dev_path = PathBuf::from("/d/dev");
        let dev = storage.open(&dev_path, OpenMode::CreateNew).unwrap();
        storage.sync_dir(Path::new("/d")).unwrap();
        let (store, _) = LogStore::open(Arc::clone(&storage), Path::new("/d/log")).unwrap();
        let app = Applicator::new(
            Arc::new(store),
            Arc::clone(&storage),
            Arc::clone(&dev),
            dev_path.clone(),
            PathBuf::from("/d/pos"),
            START,
        );
        let p = app.persister();
        dev.write_all_at(&[1; 4096], 0).unwrap();
        p.persist(Position {
            pos: 10,
            next_seq: 2,
        })
        .unwrap();
        dev.write_all_at(&[2; 4096], 0).unwrap();
        sim.set_faults(Faults {
            sync_eio: 1.0,
            ..Faults::default()
        });
        assert!(
            p.persist(Position {
                pos: 20,
                next_seq: 3
            })
            .is_err()
        );
        sim.set_faults(Faults::default());
        let err = p
            .persist(Position {
                pos: 30,
                next_seq: 4,
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("earlier sync of the device failed"),
            "{err}"
        );
        let after = sim.crash(CrashMode::DropUnsynced);
        assert_eq!(
            Position::load(&after, Path::new("/d/pos"))
                .unwrap()
                .map(|p| p.pos),
            Some(10),
            "a position past the failed sync was persisted"
        );
    }
}
