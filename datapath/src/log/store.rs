//! The logfiles of one resource directory: names, recovery, rotation,
//! deletion, and reading records from any log position.
//!
//! Logfiles are reused: a deletion keeps one deleted logfile as the
//! directory's spare ([`SPARE_FILE`]), and the next new logfile is that
//! file, renamed, with a new header (raft-engine's log recycling does the
//! same). Appending then overwrites pages the page cache already holds
//! instead of allocating (and, with Linux' `init_on_alloc`, zeroing)
//! fresh ones and the file system's blocks for them: on tmpfs an
//! overwrite measured about 3× faster than an append to a new file. Past
//! its records a reused file holds the old file's bytes; readers stop at
//! the records' end (`RecordReader::up_to`), recovery cuts the newest
//! file there like a torn tail, and a file stops being the newest only
//! once it has been cut to its records ([`LogStore::create_file`]), so
//! every older file still ends exactly after its last record.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::format::{FILE_HEADER_LEN, FileHeader, RECORD_HEADER_LEN, Record, RecordHeader};
use super::lineage::{Epoch, Lineage};
use super::reader::{FIRST_RECORD, RecordReader, Stop};
use super::{Error, Result};
use crate::storage::{File, OpenMode, Storage};

/// One logfile of the resource.
#[derive(Debug, Clone)]
pub struct LogFileInfo {
    pub file_seq: u64,
    pub origin: String,
    pub path: PathBuf,
    pub header: FileHeader,
    /// Log position just past its last valid record (for the file being
    /// appended to: as of the last recovery or append).
    pub end_pos: u64,
    /// Sequence number of the record after its last one.
    pub end_seq: u64,
}

impl LogFileInfo {
    /// The file offset of log position `pos` (which lies in this file).
    pub fn offset_of(&self, pos: u64) -> u64 {
        pos - self.header.start_pos + FIRST_RECORD
    }

    /// Bytes of records it holds.
    pub fn record_bytes(&self) -> u64 {
        self.end_pos - self.header.start_pos
    }
}

/// What recovery found: where the log ends and what comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub end_pos: u64,
    pub next_seq: u64,
    pub next_file_seq: u64,
    pub last_generation: u64,
}

/// The set of logfiles of one resource.
pub struct LogStore {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    files: Mutex<Vec<LogFileInfo>>,
    lineage: Mutex<Lineage>,
    /// Held while the spare is made, reused or removed: a spare made while
    /// another is being reused would take its name between the new
    /// header's write and the rename, and the new logfile would be the
    /// wrong file.
    spare: Mutex<()>,
}

/// Where [`LogStore::persist_durable`] keeps the durable floor.
const DURABLE_FILE: &str = "durable.json";

/// A deleted logfile kept for reuse (at most one per log directory: it
/// costs up to a logfile of space that the log quota does not count).
pub const SPARE_FILE: &str = "spare-logfile";

/// A logfile is kept as the spare only while the file system has this
/// many times its size free.
const SPARE_ROOM: u64 = 8;

/// The content of [`DURABLE_FILE`].
#[derive(serde::Serialize, serde::Deserialize)]
struct DurableFloor {
    durable: u64,
}

/// The lineage of the log in `dir`, made to agree with its logfiles: a
/// crash may have come between a logfile's creation (or a cut) and the
/// update of the lineage file. Logs from before lineages were kept get
/// one from their headers.
fn recover_lineage(storage: &dyn Storage, dir: &Path, files: &[LogFileInfo]) -> Lineage {
    // Only remote devices' checks rely on it: a damaged one is made again
    // from the headers rather than keeping the log from opening.
    let stored = Lineage::load(storage, dir).unwrap_or_else(|e| {
        tracing::warn!(dir = %dir.display(), error = %e, "the log's lineage is unreadable; it is derived from the logfiles again");
        None
    });
    let mut lineage = stored.clone().unwrap_or_default();
    if let Some(last) = files.last() {
        let (end, last_start) = (last.end_pos, last.header.start_pos);
        lineage.cut_unless(|e| e.start_pos < end || e.start_pos == last_start);
    }
    let newest = lineage.epochs().last().map(|e| e.start_pos);
    for f in files {
        // Older files are in the lineage already; noting them again would
        // drop the epochs after them.
        if newest.is_none_or(|n| f.header.start_pos >= n) {
            lineage.note(Epoch {
                generation: f.header.generation,
                origin: f.origin.clone(),
                start_pos: f.header.start_pos,
            });
        }
    }
    if stored.as_ref() != Some(&lineage)
        && !lineage.epochs().is_empty()
        && let Err(e) = lineage.store(storage, dir)
    {
        // As in `update_lineage`: the next start derives it again (a full
        // disk must not keep the log from opening).
        tracing::warn!(dir = %dir.display(), error = %e, "persisting the log's lineage failed");
    }
    lineage
}

/// `log-000000001-node1` → (1, "node1").
pub fn parse_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("log-")?;
    let (num, origin) = rest.split_once('-')?;
    if num.len() != 9
        || !num.bytes().all(|b| b.is_ascii_digit())
        || origin.is_empty()
        || origin.ends_with(".tmp")
    {
        return None;
    }
    Some((num.parse().ok()?, origin))
}

pub fn file_name(file_seq: u64, origin: &str) -> String {
    format!("log-{file_seq:09}-{origin}")
}

impl LogStore {
    /// Opens the logfiles in `dir` and recovers them: a torn tail of the last
    /// file is cut off (and logged); damage anywhere else is an error.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<(Self, Option<Recovered>)> {
        Self::open_durable(storage, dir, 0, false)
    }

    /// [`LogStore::open`], knowing that the log was durable up to log
    /// position `durable` (the written-back or applied position: neither
    /// ever passes the durable end). Damage before it is corruption even
    /// where it looks like a torn tail: cutting there would drop records
    /// the device already holds and a sync had covered. `copied`: the
    /// records were fetched from another node (a secondary's log), so
    /// their `unsynced` claims say nothing about this copy's syncs and any
    /// damage past `durable` in the newest file is cut off as a torn tail
    /// (the fetcher fetches those records again).
    pub fn open_durable(
        storage: Arc<dyn Storage>,
        dir: &Path,
        durable: u64,
        copied: bool,
    ) -> Result<(Self, Option<Recovered>)> {
        let mut files: Vec<LogFileInfo> = Vec::new();
        for name in storage.list_dir(dir).map_err(Error::io(dir))? {
            let Some((file_seq, origin)) = parse_name(&name) else {
                continue;
            };
            let path = dir.join(&name);
            let f = storage
                .open(&path, OpenMode::ReadWrite)
                .map_err(Error::io(&path))?;
            let mut hb = [0u8; FILE_HEADER_LEN];
            let n = f.read_at(&mut hb, 0).map_err(Error::io(&path))?;
            let header = match FileHeader::decode(&hb[..n]) {
                Ok(h) => h,
                Err(e)
                    if f.size().map_err(Error::io(&path))? <= FILE_HEADER_LEN as u64
                        && file_seq_is_last(&storage, dir, file_seq) =>
                {
                    // A logfile whose creation a crash interrupted (short or
                    // unwritten header, no records): it never held data.
                    tracing::warn!(file = %path.display(), error = %e, "removing incomplete new logfile");
                    storage.remove_file(&path).map_err(Error::io(&path))?;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Corruption {
                        path,
                        offset: 0,
                        what: e.to_string(),
                    });
                }
            };
            if header.file_seq != file_seq {
                return Err(Error::Corruption {
                    path,
                    offset: 0,
                    what: format!(
                        "header says logfile {} but the name says {file_seq}",
                        header.file_seq
                    ),
                });
            }
            files.push(LogFileInfo {
                file_seq,
                origin: origin.to_string(),
                path,
                header,
                end_pos: header.start_pos,
                end_seq: header.first_seq,
            });
        }
        files.sort_by_key(|f| f.file_seq);
        let count = files.len();
        for i in 0..count {
            let last = i + 1 == count;
            let (end_pos, end_seq) = scan_file(&*storage, &files[i], last, durable, copied)?;
            files[i].end_pos = end_pos;
            files[i].end_seq = end_seq;
            if i > 0 {
                let (prev, cur) = (&files[i - 1], &files[i]);
                if i + 1 == count
                    && cur.end_pos == cur.header.start_pos
                    && cur.file_seq == prev.file_seq + 1
                    && cur.header.start_pos < prev.end_pos
                {
                    // A newest logfile without records that starts inside
                    // the previous one: a rotation that failed (its header
                    // became durable, the removal did not) after which
                    // appending went on in the previous file. It never
                    // held a record.
                    tracing::warn!(file = %cur.path.display(), start = cur.header.start_pos, previous_end = prev.end_pos, "removing the empty logfile of a failed rotation");
                    storage
                        .remove_file(&cur.path)
                        .map_err(Error::io(&cur.path))?;
                    storage.sync_dir(dir).map_err(Error::io(dir))?;
                    files.pop();
                    break;
                }
                if cur.file_seq != prev.file_seq + 1
                    || cur.header.start_pos != prev.end_pos
                    || cur.header.first_seq != prev.end_seq
                {
                    return Err(Error::Gap {
                        dir: dir.to_path_buf(),
                        what: format!(
                            "{} ends at position {} (next record {}), but {} starts at position {} (record {})",
                            prev.path.display(),
                            prev.end_pos,
                            prev.end_seq,
                            cur.path.display(),
                            cur.header.start_pos,
                            cur.header.first_seq
                        ),
                    });
                }
            }
        }
        let recovered = files.last().map(|f| Recovered {
            end_pos: f.end_pos,
            next_seq: f.end_seq,
            next_file_seq: f.file_seq + 1,
            last_generation: f.header.generation,
        });
        let lineage = recover_lineage(&*storage, dir, &files);
        let store = Self {
            storage,
            dir: dir.to_path_buf(),
            files: Mutex::new(files),
            lineage: Mutex::new(lineage),
            spare: Mutex::new(()),
        };
        Ok((store, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the log from position `from` on again, with the headers of
    /// the logfiles that start there, and syncs it. Recovery calls it for
    /// what lies past the durable floor: after a failed fdatasync, Linux
    /// (like `storage::sim`) marks the pages it did not write clean; they
    /// stay readable, so a restart finds every record, but no later sync
    /// writes them, and a power loss after records that later syncs made
    /// durable would find a hole under them. Writing them again makes the
    /// next sync cover them. Returns the bytes written.
    pub fn rewrite_from(&self, from: u64) -> Result<u64> {
        let mut total = 0;
        for f in self.files() {
            if f.end_pos <= from {
                continue;
            }
            let start = if f.header.start_pos >= from {
                0
            } else {
                f.offset_of(from)
            };
            let end = f.offset_of(f.end_pos);
            let file = self
                .storage
                .open(&f.path, OpenMode::ReadWrite)
                .map_err(Error::io(&f.path))?;
            let mut buf = vec![0u8; (1 << 20).min(end - start) as usize];
            let mut off = start;
            while off < end {
                let n = buf.len().min((end - off) as usize);
                let got = file
                    .read_at(&mut buf[..n], off)
                    .map_err(Error::io(&f.path))?;
                if got == 0 {
                    break;
                }
                file.write_all_at(&buf[..got], off)
                    .map_err(Error::io(&f.path))?;
                off += got as u64;
            }
            file.sync_data().map_err(Error::io(&f.path))?;
            total += off - start;
        }
        if total > 0 {
            self.storage
                .sync_dir(&self.dir)
                .map_err(Error::io(&self.dir))?;
        }
        Ok(total)
    }

    /// Persists (atomically) that the log is durable up to log position
    /// `pos`: recovery never cuts the log below it (see
    /// [`LogStore::open_durable`]).
    pub fn persist_durable(&self, pos: u64) -> Result<()> {
        let path = self.dir.join(DURABLE_FILE);
        let bytes =
            serde_json::to_vec(&DurableFloor { durable: pos }).expect("a number serializes");
        self.storage
            .write_atomic(&path, &bytes)
            .map_err(Error::io(&path))
    }

    /// How far the log in `dir` is known durable: the written-back (or
    /// applied) position `written_back`, which never passes the durable end
    /// of the log, or the floor persisted by [`LogStore::persist_durable`]
    /// if that is higher. Recovery never cuts the log below it.
    pub fn durable_floor(storage: &dyn Storage, dir: &Path, written_back: u64) -> Result<u64> {
        let path = dir.join(DURABLE_FILE);
        if !storage.exists(&path) {
            return Ok(written_back);
        }
        let bytes = storage.read_file(&path).map_err(Error::io(&path))?;
        serde_json::from_slice::<DurableFloor>(&bytes)
            .map(|f| f.durable.max(written_back))
            .map_err(|e| Error::Corruption {
                path,
                offset: 0,
                what: format!("not a durable floor ({{\"durable\": N}}): {e}"),
            })
    }

    /// A snapshot of the logfiles, oldest first.
    pub fn files(&self) -> Vec<LogFileInfo> {
        self.files.lock().expect("log store lock").clone()
    }

    /// Bytes of records in the logfiles (what the log quota counts).
    pub fn bytes(&self) -> u64 {
        self.files().iter().map(LogFileInfo::record_bytes).sum()
    }

    /// Position of the oldest record still in the log.
    pub fn first_pos(&self) -> Option<u64> {
        self.files().first().map(|f| f.header.start_pos)
    }

    /// Creates the next logfile and returns an appender for it. The previous
    /// file must be synced by the caller first (rotation does that).
    ///
    /// The new file is the spare if there is one (see the module's doc):
    /// its new header is written and synced before it takes its new name,
    /// so under that name it never shows the old header. The newest file
    /// so far is first cut to its records, which a reused file holds more
    /// than: only the newest file may hold bytes past its records.
    pub fn create_file(&self, origin: &str, header: FileHeader) -> Result<Appender> {
        self.cut_to_records(self.files().last().cloned())?;
        let path = self.dir.join(file_name(header.file_seq, origin));
        let spare = self.dir.join(SPARE_FILE);
        let _spare = self.spare.lock().expect("spare lock");
        // A file of that name would be replaced by the rename: let the
        // create below refuse it instead.
        let reused = if self.storage.exists(&path) {
            None
        } else {
            self.reuse_spare(&spare, &header)
        };
        let file = match reused {
            Some(file) => {
                tracing::debug!(file = %path.display(), "reusing the spare logfile");
                self.storage
                    .rename(&spare, &path)
                    .map(|()| file)
                    .map_err(Error::io(&path))?
            }
            None => {
                let file = self
                    .storage
                    .open(&path, OpenMode::CreateNew)
                    .map_err(Error::io(&path))?;
                match file
                    .write_all_at(&header.encode(), 0)
                    .and_then(|()| file.sync_data())
                {
                    Ok(()) => file,
                    Err(e) => {
                        let _ = self
                            .storage
                            .remove_file(&path)
                            .and_then(|()| self.storage.sync_dir(&self.dir));
                        return Err(Error::io(&path)(e));
                    }
                }
            }
        };
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            // Leave no half-made logfile behind: appending goes on in the
            // previous file, and recovery must not take this one for its
            // successor (it also removes such a file, should this fail).
            let _ = self
                .storage
                .remove_file(&path)
                .and_then(|()| self.storage.sync_dir(&self.dir));
            return Err(Error::io(&path)(e));
        }
        self.files
            .lock()
            .expect("log store lock")
            .push(LogFileInfo {
                file_seq: header.file_seq,
                origin: origin.to_string(),
                path: path.clone(),
                header,
                end_pos: header.start_pos,
                end_seq: header.first_seq,
            });
        tracing::info!(file = %path.display(), pos = header.start_pos, generation = header.generation, "new logfile");
        self.update_lineage(|l| {
            l.note(Epoch {
                generation: header.generation,
                origin: origin.to_string(),
                start_pos: header.start_pos,
            })
        });
        Ok(Appender {
            file,
            path,
            start_pos: header.start_pos,
            end_pos: header.start_pos,
            next_seq: header.first_seq,
            generation: header.generation,
            origin: origin.to_string(),
        })
    }

    /// The spare logfile with `header` written and synced, if there is a
    /// spare and that works; a spare that fails is removed (a new file is
    /// made instead).
    fn reuse_spare(&self, spare: &Path, header: &FileHeader) -> Option<Arc<dyn File>> {
        if !self.storage.exists(spare) {
            return None;
        }
        // The spare's name must be durable before its content changes: a
        // power loss must not find a logfile's old name on the new header.
        let reused = self.storage.sync_dir(&self.dir).and_then(|()| {
            let file = self.storage.open(spare, OpenMode::ReadWrite)?;
            file.write_all_at(&header.encode(), 0)?;
            file.sync_data()?;
            Ok(file)
        });
        match reused {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(file = %spare.display(), error = %e, "removing the spare logfile, which could not be reused");
                let _ = self.storage.remove_file(spare);
                None
            }
        }
    }

    /// Cuts logfile `f` to its records if it holds more (a reused file
    /// does), durably: it is about to stop being the newest file, and
    /// recovery cuts only the newest one.
    fn cut_to_records(&self, f: Option<LogFileInfo>) -> Result<()> {
        let Some(f) = f else {
            return Ok(());
        };
        let end = f.offset_of(f.end_pos);
        let file = self
            .storage
            .open(&f.path, OpenMode::ReadWrite)
            .map_err(Error::io(&f.path))?;
        if file.size().map_err(Error::io(&f.path))? > end {
            file.set_len(end)
                .and_then(|()| file.sync_data())
                .map_err(Error::io(&f.path))?;
        }
        Ok(())
    }

    /// An appender positioned at the end of the last (recovered) logfile.
    /// End position and next sequence number of the log, read together.
    pub fn end(&self) -> Option<(u64, u64)> {
        let files = self.files.lock().expect("log store lock");
        files.last().map(|f| (f.end_pos, f.end_seq))
    }

    /// Removes the newest logfiles while they hold no record (a header
    /// written by a rotation or by a fetch that was cut before its first
    /// records). Such a file says nothing, yet its number may be taken by
    /// a different file of a new primary, whose records would then be
    /// appended under the wrong header. Returns the start position of the
    /// earliest file removed.
    pub fn drop_empty_tail(&self) -> Result<Option<u64>> {
        let mut dropped = None;
        while let Some(last) = self
            .files()
            .last()
            .filter(|f| f.end_pos == f.header.start_pos)
            .cloned()
        {
            self.storage
                .remove_file(&last.path)
                .map_err(Error::io(&last.path))?;
            tracing::info!(file = %last.path.display(), "removed a logfile that holds no record");
            self.files
                .lock()
                .expect("log store lock")
                .retain(|f| f.path != last.path);
            dropped = Some(last.header.start_pos);
        }
        if let Some(pos) = dropped {
            self.storage
                .sync_dir(&self.dir)
                .map_err(Error::io(&self.dir))?;
            self.update_lineage(|l| l.cut(pos));
        }
        Ok(dropped)
    }

    pub fn resume_last(&self) -> Result<Option<Appender>> {
        let Some(last) = self.files().last().cloned() else {
            return Ok(None);
        };
        let file = self
            .storage
            .open(&last.path, OpenMode::ReadWrite)
            .map_err(Error::io(&last.path))?;
        Ok(Some(Appender {
            file,
            path: last.path,
            start_pos: last.header.start_pos,
            end_pos: last.end_pos,
            next_seq: last.end_seq,
            generation: last.header.generation,
            origin: last.origin,
        }))
    }

    /// Records that the file starting at `start_pos` now ends at `end_pos`.
    pub fn note_append(&self, start_pos: u64, end_pos: u64, end_seq: u64) {
        let mut files = self.files.lock().expect("log store lock");
        if let Some(f) = files
            .iter_mut()
            .rev()
            .find(|f| f.header.start_pos == start_pos)
        {
            f.end_pos = end_pos;
            f.end_seq = end_seq;
        }
    }

    /// Removes one logfile and takes it off the list at once, so that a
    /// deletion or cut that fails further on (a directory sync, the file a
    /// cut truncates) leaves a list that matches the directory: a file
    /// left listed but gone made every later resume or cut fail for ever
    /// (sim_cluster seeds 4235811102720142503, 1795293344335549936). A
    /// file already gone (an earlier try that failed further on) counts
    /// as removed. `spare`: the file is renamed to it instead (kept for
    /// reuse). Returns the bytes of records it held.
    fn remove_logfile(&self, f: &LogFileInfo, spare: Option<&Path>) -> Result<u64> {
        let removed = match spare {
            Some(spare) => self.storage.rename(&f.path, spare),
            None => self.storage.remove_file(&f.path),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&f.path)(e)),
        }
        self.files
            .lock()
            .expect("log store lock")
            .retain(|l| l.file_seq != f.file_seq);
        Ok(f.record_bytes())
    }

    /// Removes the spare logfile: the log is about to go back to a lower
    /// position (a cut, or a new start), and a spare from before that may
    /// hold records that a reused file's readers could not tell from its
    /// own (they take only records of lower sequence numbers for older).
    fn drop_spare(&self) -> Result<()> {
        let spare = self.dir.join(SPARE_FILE);
        let _spare = self.spare.lock().expect("spare lock");
        match self.storage.remove_file(&spare) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&spare)(e)),
        }
    }

    /// Deletes logfiles that end at or before `pos`, never the newest one.
    /// The largest becomes the spare if there is none (see the module's
    /// doc). Returns how many bytes of records were freed.
    pub fn delete_before(&self, pos: u64) -> Result<u64> {
        let doomed: Vec<LogFileInfo> = {
            let files = self.files.lock().expect("log store lock");
            let keep_from = files.len().saturating_sub(1);
            files[..keep_from]
                .iter()
                .filter(|f| f.end_pos <= pos)
                .cloned()
                .collect()
        };
        let spare = self.dir.join(SPARE_FILE);
        let _spare = self.spare.lock().expect("spare lock");
        let keep = if self.storage.exists(&spare) {
            None
        } else {
            // The spare is space the log quota does not count: keep one
            // only while the file system has room to spare.
            let room = self.storage.available_space(&self.dir).unwrap_or(0);
            doomed
                .iter()
                .max_by_key(|f| f.record_bytes())
                .filter(|f| room / SPARE_ROOM >= f.record_bytes())
                .map(|f| f.file_seq)
        };
        let mut freed = 0;
        for f in &doomed {
            let as_spare = keep == Some(f.file_seq);
            freed += self.remove_logfile(f, as_spare.then_some(spare.as_path()))?;
            tracing::info!(file = %f.path.display(), end = f.end_pos, spare = as_spare, "deleted logfile");
        }
        if !doomed.is_empty() {
            self.storage
                .sync_dir(&self.dir)
                .map_err(Error::io(&self.dir))?;
        }
        Ok(freed)
    }

    /// Whole records from log position `pos`, up to `limit` and about
    /// `max_bytes`, encoded as they are in the logfile (for shipping), in
    /// `bytes` (cleared first). `None` if nothing is there yet. A caller that
    /// reads batch after batch passes the same buffer each time: growing a
    /// fresh one to a MiB per batch cost a copy of every byte shipped.
    pub fn read_records(
        self: &Arc<Self>,
        pos: u64,
        limit: u64,
        max_bytes: usize,
        bytes: &mut Vec<u8>,
    ) -> Result<Option<RawRecords>> {
        bytes.clear();
        let files = self.files();
        let Some(f) = files
            .iter()
            .find(|f| f.header.start_pos <= pos && pos < f.end_pos.min(limit))
        else {
            return Ok(None);
        };
        let mut cursor = self.cursor(pos)?;
        let mut records = 0;
        let mut end = pos;
        let file_end = f.end_pos.min(limit);
        while bytes.len() < max_bytes && end < file_end {
            let before = bytes.len();
            let Some((at, header)) = cursor.next_raw_into(bytes)? else {
                break;
            };
            let rec_end = at + header.encoded_len();
            if rec_end > file_end {
                bytes.truncate(before);
                break;
            }
            records += 1;
            end = rec_end;
        }
        Ok(Some(RawRecords {
            file: f.clone(),
            pos,
            records,
        }))
    }

    /// What this log holds just before position `pos`: where two logs
    /// meet (a fetch resumes at the end of the fetcher's copy), the record
    /// that ends there must be the same on both sides, or they hold
    /// different histories under the same name (a primary restored from
    /// an old copy of its state, a bug). One logfile is read.
    pub fn record_before(&self, pos: u64) -> Result<RecordBefore> {
        let files = self.files();
        let Some(f) = files
            .iter()
            .rev()
            .find(|f| f.header.start_pos < pos && pos <= f.end_pos)
        else {
            return Ok(match files.last() {
                Some(last) if pos > last.end_pos => RecordBefore::NoBoundary,
                _ => RecordBefore::NotKept,
            });
        };
        let file = self
            .storage
            .open(&f.path, OpenMode::Read)
            .map_err(Error::io(&f.path))?;
        let read = records_up_to(f, file, pos)?;
        match read.last_crc {
            Some(crc) if read.end == pos => Ok(RecordBefore::Ends(crc)),
            _ if read.end > pos => Ok(RecordBefore::NoBoundary),
            // The records stop short of what the list says the file holds:
            // a damaged read, never an answer.
            _ => Err(Error::Corruption {
                path: f.path.clone(),
                offset: f.offset_of(read.end),
                what: format!(
                    "records read only up to log position {}, short of {pos}",
                    read.end
                ),
            }),
        }
    }

    /// Cuts the log back to `pos` (a record boundary): later logfiles are
    /// deleted, the one holding `pos` is truncated there. Used when a
    /// replica learns that records past `pos` belong to a deposed history,
    /// and when a sync of a fetched copy failed past `pos`.
    /// Returns bytes freed.
    pub fn truncate_to(&self, pos: u64) -> Result<u64> {
        let files = self.files();
        if files.last().is_some_and(|f| f.end_pos > pos) {
            self.drop_spare()?;
        }
        let mut freed = 0;
        for f in files.iter().rev() {
            if f.end_pos <= pos {
                break;
            }
            if f.header.start_pos >= pos {
                freed += self.remove_logfile(f, None)?;
                tracing::warn!(file = %f.path.display(), pos, "cutting the log back: deleted logfile");
            } else {
                let file = self
                    .storage
                    .open(&f.path, OpenMode::ReadWrite)
                    .map_err(Error::io(&f.path))?;
                let kept = records_up_to(f, Arc::clone(&file), pos)?;
                let (kept_end, end_seq) = (kept.end, kept.next_seq);
                // A read that stops short (a damaged read ends the records
                // like a torn tail) would leave `end_seq` short of the
                // records kept, and every later append would be refused
                // as out of sequence: cut nothing, the caller tries again.
                if kept_end != pos {
                    return Err(Error::Corruption {
                        path: f.path.clone(),
                        offset: f.offset_of(kept_end),
                        what: format!(
                            "records read only up to log position {kept_end}, short of the cut at {pos}; not cut"
                        ),
                    });
                }
                file.set_len(f.offset_of(pos)).map_err(Error::io(&f.path))?;
                file.sync_data().map_err(Error::io(&f.path))?;
                freed += f.end_pos - pos;
                tracing::warn!(file = %f.path.display(), pos, "cutting the log back: truncated logfile");
                let mut list = self.files.lock().expect("log store lock");
                if let Some(l) = list.iter_mut().find(|l| l.file_seq == f.file_seq) {
                    l.end_pos = pos;
                    l.end_seq = end_seq;
                }
            }
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(Error::io(&self.dir))?;
        self.files
            .lock()
            .expect("log store lock")
            .retain(|f| f.header.start_pos < pos);
        self.update_lineage(|l| l.cut(pos));
        Ok(freed)
    }

    /// The histories this log's records came from, oldest first.
    pub fn lineage(&self) -> Lineage {
        self.lineage.lock().expect("lineage lock").clone()
    }

    /// Takes the lineage of the log this one continues (a replica that
    /// starts a full sync from the primary's log position: its own log
    /// begins later, and deleted logfiles no longer tell the older part).
    pub fn adopt_lineage(&self, lineage: Lineage) {
        self.update_lineage(|l| {
            let changed = *l != lineage;
            *l = lineage;
            changed
        });
    }

    /// Applies `change` to the lineage and persists it if it changed. A
    /// failure is logged, not returned: the logfiles were changed already,
    /// and the next start derives what is missing from their headers.
    fn update_lineage(&self, change: impl FnOnce(&mut Lineage) -> bool) {
        let mut l = self.lineage.lock().expect("lineage lock");
        if change(&mut l)
            && let Err(e) = l.store(&*self.storage, &self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "persisting the log's lineage failed");
        }
    }

    /// Deletes every logfile (a replica that starts over with a full sync)
    /// and forgets the lineage: the histories it named are no longer this
    /// log's (the caller adopts the lineage of the log it follows next).
    /// Returns bytes freed.
    pub fn delete_all(&self) -> Result<u64> {
        self.drop_spare()?;
        self.update_lineage(|l| std::mem::take(l) != Lineage::default());
        let files = std::mem::take(&mut *self.files.lock().expect("log store lock"));
        let mut freed = 0;
        for f in &files {
            self.storage
                .remove_file(&f.path)
                .map_err(Error::io(&f.path))?;
            freed += f.record_bytes();
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(Error::io(&self.dir))?;
        Ok(freed)
    }

    /// A cursor over the records from log position `pos` on.
    pub fn cursor(self: &Arc<Self>, pos: u64) -> Result<LogCursor> {
        let files = self.files();
        let first = files.first().map(|f| f.header.start_pos).unwrap_or(pos);
        let end = files.last().map(|f| f.end_pos).unwrap_or(pos);
        if pos < first || pos > end {
            return Err(Error::PositionUnavailable {
                dir: self.dir.clone(),
                pos,
                first,
                end,
            });
        }
        Ok(LogCursor {
            store: Arc::clone(self),
            pos,
            reader: None,
        })
    }
}

fn file_seq_is_last(storage: &Arc<dyn Storage>, dir: &Path, file_seq: u64) -> bool {
    storage
        .list_dir(dir)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| parse_name(n))
                .all(|(s, _)| s <= file_seq)
        })
        .unwrap_or(false)
}

/// Scans one logfile to its valid end. The torn tail of the last file is cut
/// off (unless it starts before log position `durable`); damage anywhere
/// else is an error.
fn scan_file(
    storage: &dyn Storage,
    info: &LogFileInfo,
    last: bool,
    durable: u64,
    copied: bool,
) -> Result<(u64, u64)> {
    let file = storage
        .open(&info.path, OpenMode::ReadWrite)
        .map_err(Error::io(&info.path))?;
    let mut reader =
        RecordReader::new(Arc::clone(&file), FIRST_RECORD, Some(info.header.first_seq))
            .map_err(Error::io(&info.path))?;
    if copied {
        reader = reader.copied();
    }
    // Checked in place: nothing of the records is kept.
    while reader.next_raw().map_err(Error::io(&info.path))?.is_some() {}
    let valid_end = reader.valid_end();
    let end_seq = reader.next_seq().unwrap_or(info.header.first_seq);
    match reader.stop().cloned().unwrap_or(Stop::Clean) {
        Stop::Clean => {}
        Stop::TornTail { at, what }
            if last && info.header.start_pos + at.saturating_sub(FIRST_RECORD) < durable =>
        {
            return Err(Error::Corruption {
                path: info.path.clone(),
                offset: at,
                what: format!(
                    "{what}, before log position {durable} that was durable (written back)"
                ),
            });
        }
        Stop::TornTail { at, what } if last => {
            tracing::warn!(file = %info.path.display(), offset = at, %what, "cutting off torn tail of logfile");
            file.set_len(valid_end).map_err(Error::io(&info.path))?;
            file.sync_data().map_err(Error::io(&info.path))?;
        }
        Stop::TornTail { at, what } | Stop::Corrupt { at, what } => {
            return Err(Error::Corruption {
                path: info.path.clone(),
                offset: at,
                what,
            });
        }
    }
    Ok((info.header.start_pos + valid_end - FIRST_RECORD, end_seq))
}

/// The records of logfile `f` read from its start until one ends at or
/// past log position `pos` (or the records end): where the last one read
/// ends, the sequence number after it, and its checksum (`None`: none was
/// read). What a cut keeps and what precedes a resume point are both
/// found by this walk.
struct RecordsUpTo {
    end: u64,
    next_seq: u64,
    last_crc: Option<u32>,
}

fn records_up_to(f: &LogFileInfo, file: Arc<dyn File>, pos: u64) -> Result<RecordsUpTo> {
    let mut reader = RecordReader::new(file, FIRST_RECORD, Some(f.header.first_seq))
        .map_err(Error::io(&f.path))?
        .up_to(f.offset_of(f.end_pos));
    let mut read = RecordsUpTo {
        end: f.header.start_pos,
        next_seq: f.header.first_seq,
        last_crc: None,
    };
    while read.end < pos {
        let Some((off, header, raw)) = reader.next_raw().map_err(Error::io(&f.path))? else {
            break;
        };
        read = RecordsUpTo {
            end: f.header.start_pos + off - FIRST_RECORD + header.encoded_len(),
            next_seq: header.seq + 1,
            last_crc: Some(super::format::record_crc(raw)),
        };
    }
    Ok(read)
}

/// What a log holds just before a position ([`LogStore::record_before`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordBefore {
    /// A record ends there; its checksum.
    Ends(u32),
    /// The log begins there, or the logfile that held the record is gone:
    /// nothing to compare.
    NotKept,
    /// The position is inside a record, or past the end of the log.
    NoBoundary,
}

/// Where encoded records read for shipping come from (the bytes are in
/// the caller's buffer, see [`LogStore::read_records`]).
#[derive(Debug)]
pub struct RawRecords {
    /// The logfile they are in.
    pub file: LogFileInfo,
    /// Log position of the first.
    pub pos: u64,
    pub records: u64,
}

/// Appends encoded records to the newest logfile.
pub struct Appender {
    file: Arc<dyn File>,
    path: PathBuf,
    start_pos: u64,
    end_pos: u64,
    next_seq: u64,
    /// The history the logfile's records belong to (its header's
    /// generation, its name's origin).
    generation: u64,
    origin: String,
}

impl Appender {
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn end_pos(&self) -> u64 {
        self.end_pos
    }
    pub fn start_pos(&self) -> u64 {
        self.start_pos
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &Arc<dyn File> {
        &self.file
    }
    /// Bytes written to this file so far.
    pub fn file_bytes(&self) -> u64 {
        self.end_pos - self.start_pos + FILE_HEADER_LEN as u64
    }

    /// Writes `bytes` (holding `records` encoded records) at the end. On
    /// failure the file is cut back, so the log never holds a partial record
    /// that a later append would follow.
    pub fn append(&mut self, bytes: &[u8], records: u64) -> std::io::Result<()> {
        self.append_vectored(&[bytes], records)
    }

    /// Appends `records` encoded records that lie in `parts`, in order (for
    /// example each header followed by its payload where it already is).
    pub fn append_vectored(&mut self, parts: &[&[u8]], records: u64) -> std::io::Result<()> {
        let off = self.end_pos - self.start_pos + FIRST_RECORD;
        if let Err(e) = self.file.write_all_vectored_at(parts, off) {
            let _ = self.file.set_len(off);
            return Err(e);
        }
        self.end_pos += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        self.next_seq += records;
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Reads records in log order from a position on, across logfiles.
pub struct LogCursor {
    store: Arc<LogStore>,
    pos: u64,
    reader: Option<(u64, RecordReader)>,
}

impl LogCursor {
    /// Log position of the next record.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The next record and its log position; `None` at the current end of
    /// the log. Damage is an error, never a record.
    pub fn next_record(&mut self) -> Result<Option<(u64, Record)>> {
        self.next_with(|reader, _| {
            Ok(reader
                .next_record()?
                .map(|(off, rec)| (off, rec.header.encoded_len(), rec)))
        })
    }

    /// Like [`Self::next_record`], but appends the record to `out` as it is
    /// encoded in the logfile (checked, copied once) and returns its log
    /// position and header.
    pub fn next_raw_into(&mut self, out: &mut Vec<u8>) -> Result<Option<(u64, RecordHeader)>> {
        self.next_with(|reader, _| {
            Ok(reader.next_raw()?.map(|(off, header, raw)| {
                out.extend_from_slice(raw);
                (off, header.encoded_len(), header)
            }))
        })
    }

    /// Like [`Self::next_record`], but hands the record to `visit` as its
    /// log position, header and payload borrowed from the read window (no
    /// copy), and returns its log position, header and what `visit` made
    /// of it.
    pub fn next_visit<T>(
        &mut self,
        visit: impl FnOnce(u64, &RecordHeader, &[u8]) -> T,
    ) -> Result<Option<(u64, RecordHeader, T)>> {
        let mut visit = Some(visit);
        let next = self.next_with(|reader, start| {
            Ok(reader.next_raw()?.map(|(off, header, raw)| {
                let at = start + off - FIRST_RECORD;
                let visit = visit.take().expect("a record is visited once");
                let kept = visit(at, &header, &raw[RECORD_HEADER_LEN..]);
                (off, header.encoded_len(), (header, kept))
            }))
        })?;
        Ok(next.map(|(at, (header, kept))| (at, header, kept)))
    }

    /// The cursor's walk across logfiles; `read` takes the next record of
    /// one file, given the file's log start: (file offset, encoded length,
    /// what the caller keeps).
    fn next_with<T>(
        &mut self,
        mut read: impl FnMut(&mut RecordReader, u64) -> std::io::Result<Option<(u64, u64, T)>>,
    ) -> Result<Option<(u64, T)>> {
        loop {
            if self.reader.is_none() {
                let files = self.store.files();
                let Some(f) = files
                    .iter()
                    .find(|f| f.header.start_pos <= self.pos && self.pos < f.end_pos)
                else {
                    return Ok(None);
                };
                let file = self
                    .store
                    .storage
                    .open(&f.path, OpenMode::Read)
                    .map_err(Error::io(&f.path))?;
                let off = f.offset_of(self.pos);
                let end = f.offset_of(f.end_pos);
                let reader = RecordReader::new(file, off, None)
                    .map_err(Error::io(&f.path))?
                    .up_to(end);
                // The name may have been taken by another file since the
                // list was read (the file deleted, its number used again
                // after a cut).
                if FileHeader::decode(reader.file_header()).ok() != Some(f.header) {
                    return Err(Error::io(&f.path)(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the logfile was replaced while it was opened",
                    )));
                }
                self.reader = Some((f.header.start_pos, reader));
            }
            let (start, reader) = self.reader.as_mut().expect("reader set above");
            let path = || {
                self.store
                    .files()
                    .into_iter()
                    .find(|f| f.header.start_pos == *start)
                    .map(|f| f.path)
            };
            match read(reader, *start).map_err(|e| Error::Io {
                path: PathBuf::new(),
                source: e,
            })? {
                Some((off, len, kept)) => {
                    let pos = *start + off - FIRST_RECORD;
                    self.pos = pos + len;
                    return Ok(Some((pos, kept)));
                }
                None => {
                    let stop = reader.stop().cloned();
                    let start = *start;
                    let path = path().unwrap_or_default();
                    self.reader = None;
                    match stop {
                        Some(Stop::Corrupt { at, what }) => {
                            return Err(Error::Corruption {
                                path,
                                offset: at,
                                what,
                            });
                        }
                        Some(Stop::TornTail { at, what }) => {
                            // Past the recovered end this is a record still being written
                            // (or a torn tail a later recovery will cut); before it, damage.
                            let end = self
                                .store
                                .files()
                                .iter()
                                .find(|f| f.header.start_pos == start)
                                .map(|f| f.end_pos);
                            if end.is_some_and(|end| self.pos < end) {
                                return Err(Error::Corruption {
                                    path,
                                    offset: at,
                                    what,
                                });
                            }
                            return Ok(None);
                        }
                        _ => {
                            let files = self.store.files();
                            if !files.iter().any(|f| {
                                f.header.start_pos == self.pos && f.header.start_pos > start
                            }) {
                                return Ok(None);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::log::format::{RecordKind, encode_record};
    use crate::storage::fs::RealStorage;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn storage() -> Arc<dyn Storage> {
        Arc::new(RealStorage)
    }

    /// A write record of `len` bytes, its payload a function of `seq`.
    pub(in crate::log) fn record(seq: u64, len: usize) -> Record {
        let payload = Bytes::from(
            (0..len)
                .map(|i| (i as u64 * 31 + seq) as u8)
                .collect::<Vec<_>>(),
        );
        Record {
            header: RecordHeader {
                kind: RecordKind::Write,
                unsynced: 0,
                seq,
                generation: 1,
                offset: seq * 4096,
                length: len as u64,
                timestamp_ns: seq,
                payload_len: len as u32,
            },
            payload,
        }
    }

    /// Writes `lens.len()` records into a fresh logfile; returns their file offsets.
    fn write_log(dir: &Path, lens: &[usize]) -> (PathBuf, Vec<u64>) {
        write_log_synced(dir, lens, lens.len())
    }

    /// Like [`write_log`], but the records from index `synced` on say that
    /// the log was durable only up to the start of record `synced` when
    /// they were written (their `unsynced` field).
    fn write_log_synced(dir: &Path, lens: &[usize], synced: usize) -> (PathBuf, Vec<u64>) {
        let (store, rec) = LogStore::open(storage(), dir).unwrap();
        assert!(rec.is_none());
        let header = FileHeader {
            file_seq: 1,
            start_pos: 1000,
            first_seq: 1,
            generation: 1,
        };
        let mut app = store.create_file("n1", header).unwrap();
        let mut offsets = Vec::new();
        let mut durable_end = None;
        for (i, len) in lens.iter().enumerate() {
            offsets.push(app.end_pos() - 1000 + FIRST_RECORD);
            if i == synced {
                durable_end = Some(app.end_pos());
            }
            let mut r = record(i as u64 + 1, *len);
            if let Some(d) = durable_end {
                r.header.unsynced = (app.end_pos() - d) as u32;
            }
            let mut buf = Vec::new();
            encode_record(&r.header, &r.payload, &mut buf);
            app.append(&buf, 1).unwrap();
        }
        app.sync().unwrap();
        (app.path().to_path_buf(), offsets)
    }

    fn read_all(dir: &Path) -> Result<Vec<Record>> {
        let (store, rec) = LogStore::open(storage(), dir)?;
        let store = Arc::new(store);
        let mut c = store.cursor(1000)?;
        let mut out = Vec::new();
        while let Some((_, r)) = c.next_record()? {
            out.push(r);
        }
        assert_eq!(rec.map(|r| r.next_seq), Some(out.len() as u64 + 1));
        Ok(out)
    }

    /// Appends one record to a new logfile of history (`generation`,
    /// `origin`) that continues the log.
    fn new_file(store: &LogStore, generation: u64, origin: &str) -> Appender {
        let (start_pos, first_seq) = store.end().unwrap_or((0, 1));
        let file_seq = store.files().last().map_or(1, |f| f.file_seq + 1);
        let header = FileHeader {
            file_seq,
            start_pos,
            first_seq,
            generation,
        };
        let mut app = store.create_file(origin, header).unwrap();
        let r = record(first_seq, 100);
        let mut buf = Vec::new();
        encode_record(&r.header, &r.payload, &mut buf);
        app.append(&buf, 1).unwrap();
        app.sync().unwrap();
        store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
        app
    }

    fn epochs(l: &Lineage) -> Vec<(u64, &str, u64)> {
        l.epochs()
            .iter()
            .map(|e| (e.generation, e.origin.as_str(), e.start_pos))
            .collect()
    }

    /// Found by `tests/sim_cluster.rs` (seed 155, before the simulation
    /// was deterministic): a read fault while cutting a fetched copy back
    /// ended the scan for the cut's sequence number early, so the copy
    /// expected record 1976 where the primary sent 1978, for ever.
    #[test]
    fn a_cut_whose_scan_stops_short_cuts_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let ends = file_of_records(&store, 5);
        // Damage record 2: reading stops after record 1.
        let repair = damage_record_2(&store, &ends);
        let err = store.truncate_to(ends[2]).unwrap_err();
        assert!(matches!(err, Error::Corruption { .. }), "{err}");
        assert_eq!(store.end(), Some((ends[4], 6)), "nothing was cut");
        // Readable again: the cut keeps records 1-3.
        repair();
        store.truncate_to(ends[2]).unwrap();
        assert_eq!(store.end(), Some((ends[2], 4)));
    }

    /// A logfile of records 1 (see [`new_file`]) to `last`, durable and
    /// noted; returns each record's end position.
    fn file_of_records(store: &LogStore, last: u64) -> Vec<u64> {
        let mut app = new_file(store, 1, "a");
        let mut ends = vec![app.end_pos()];
        for seq in 2..=last {
            let r = record(seq, 100);
            let mut buf = Vec::new();
            encode_record(&r.header, &r.payload, &mut buf);
            app.append(&buf, 1).unwrap();
            ends.push(app.end_pos());
        }
        app.sync().unwrap();
        store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
        ends
    }

    /// Breaks record 2 of the first logfile (`ends` from
    /// [`file_of_records`]); returns what writes it back.
    fn damage_record_2(store: &LogStore, ends: &[u64]) -> impl FnOnce() {
        let path = store.files()[0].path.clone();
        let f = storage().open(&path, OpenMode::ReadWrite).unwrap();
        f.write_all_at(&[0xff; 8], FIRST_RECORD + ends[0] + 40)
            .unwrap();
        let at = FIRST_RECORD + ends[0];
        move || {
            let r = record(2, 100);
            let mut buf = Vec::new();
            encode_record(&r.header, &r.payload, &mut buf);
            f.write_all_at(&buf, at).unwrap();
        }
    }

    /// Found by `tests/sim_cluster.rs` (seed 4235811102720142503): a cut
    /// that deleted the newer logfiles and then failed at the file it was
    /// to truncate (a read fault) left them on the store's list, so every
    /// later try failed on the missing file ("no such file or directory")
    /// and the replica never fetched again.
    #[test]
    fn a_cut_that_fails_after_deleting_newer_logfiles_can_be_tried_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let ends = file_of_records(&store, 4);
        let newer_end = new_file(&store, 1, "a").end_pos();
        assert_eq!(store.files().len(), 2);
        // Record 2 of the first file damaged: its scan stops short.
        let repair = damage_record_2(&store, &ends);
        let err = store.truncate_to(ends[2]).unwrap_err();
        assert!(matches!(err, Error::Corruption { .. }), "{err}");
        assert!(newer_end > ends[3]);
        assert_eq!(
            store.files().len(),
            1,
            "the deleted logfile is off the list"
        );
        assert_eq!(store.end(), Some((ends[3], 5)));
        // Repaired, the same cut succeeds.
        repair();
        store.truncate_to(ends[2]).unwrap();
        assert_eq!(store.end(), Some((ends[2], 4)));
    }

    /// Found by `tests/sim_cluster.rs` (seed 1795293344335549936): a
    /// deletion of applied logfiles whose directory sync failed kept the
    /// deleted files on the list; the fetcher then resumed in one of them
    /// and failed on the missing file for ever.
    #[test]
    fn a_deletion_whose_directory_sync_fails_takes_the_files_off_the_list() {
        use crate::storage::sim::{Faults, SimStorage};
        let disk = SimStorage::new(7);
        let dir = Path::new("/log");
        disk.mkdir_durable(dir);
        let (store, _) = LogStore::open(Arc::new(disk.clone()), dir).unwrap();
        let first_end = new_file(&store, 1, "a").end_pos();
        new_file(&store, 1, "a");
        let newest = new_file(&store, 1, "a");
        disk.set_faults(Faults {
            sync_eio: 1.0,
            ..Faults::default()
        });
        assert!(store.delete_before(newest.start_pos()).is_err());
        disk.set_faults(Faults::default());
        let files = store.files();
        assert_eq!(files.len(), 1, "only the newest file is listed: {files:?}");
        assert!(files[0].header.start_pos > first_end);
        // The store's idea of its log is readable again: a resume works.
        let app = store.resume_last().unwrap().unwrap();
        assert_eq!(app.end_pos(), newest.end_pos());
        assert_eq!(store.delete_before(newest.end_pos()).unwrap(), 0);
    }

    /// Where two logs meet, each names the record before the meeting
    /// point by its checksum; positions inside a record or past the end
    /// name none, nor does a log that begins there.
    #[test]
    fn the_record_before_a_position_is_named_by_its_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let ends = file_of_records(&store, 3);
        let next_file_end = new_file(&store, 1, "a").end_pos();
        let crc_of = |seq: u64| {
            let r = record(seq, 100);
            let mut buf = Vec::new();
            encode_record(&r.header, &r.payload, &mut buf);
            super::super::format::record_crc(&buf)
        };
        assert_eq!(store.record_before(0).unwrap(), RecordBefore::NotKept);
        assert_eq!(
            store.record_before(ends[0]).unwrap(),
            RecordBefore::Ends(crc_of(1))
        );
        assert_eq!(
            store.record_before(ends[2]).unwrap(),
            RecordBefore::Ends(crc_of(3))
        );
        assert_ne!(crc_of(2), crc_of(3));
        // The next file begins at ends[2]; its one record is record 4.
        assert_eq!(
            store.record_before(next_file_end).unwrap(),
            RecordBefore::Ends(crc_of(4))
        );
        assert_eq!(
            store.record_before(ends[1] - 1).unwrap(),
            RecordBefore::NoBoundary
        );
        assert_eq!(
            store.record_before(next_file_end + 1).unwrap(),
            RecordBefore::NoBoundary
        );
        // Unreadable is an error, never an answer.
        let _repair = damage_record_2(&store, &ends);
        assert!(store.record_before(ends[2]).is_err());
    }

    /// The lineage outlives the logfiles that told it, follows cuts, and
    /// is derived from the headers where its file is missing.
    #[test]
    fn the_lineage_outlives_deleted_logfiles_and_follows_cuts() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        new_file(&store, 1, "a");
        new_file(&store, 1, "a");
        let b_start = new_file(&store, 2, "b").start_pos();
        let c_start = new_file(&store, 3, "c").start_pos();
        assert_eq!(
            epochs(&store.lineage()),
            vec![(1, "a", 0), (2, "b", b_start), (3, "c", c_start)]
        );
        // Cut back to c's start: another history goes on from there.
        store.truncate_to(c_start).unwrap();
        assert_eq!(epochs(&store.lineage()).len(), 2);
        let d_start = new_file(&store, 3, "d").start_pos();
        assert_eq!(d_start, c_start);
        let expect = vec![(1, "a", 0), (2, "b", b_start), (3, "d", d_start)];
        assert_eq!(epochs(&store.lineage()), expect);
        store.delete_before(d_start).unwrap();
        assert_eq!(store.files().len(), 1);
        drop(store);
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(epochs(&store.lineage()), expect, "after the files went");

        // A crash between a logfile's creation and the lineage update: the
        // next open notes the header.
        let kept = store.lineage();
        let e_start = new_file(&store, 4, "e").start_pos();
        kept.store(&*storage(), tmp.path()).unwrap();
        drop(store);
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(epochs(&store.lineage()).last(), Some(&(4, "e", e_start)));
        assert_eq!(epochs(&store.lineage()).len(), 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Shipping reads: batch after batch from any record boundary, under
        /// any size bound and position limit, gives whole records exactly as
        /// the logfiles hold them, never past the limit or a file's end.
        #[test]
        fn read_records_ships_whole_records_as_logged(
            files in proptest::collection::vec(proptest::collection::vec(0usize..5000, 1..8), 1..4),
            max_bytes in 1usize..20_000,
            limit_at in any::<prop::sample::Index>(),
            from_at in any::<prop::sample::Index>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
            let store = Arc::new(store);
            // (log position, encoded record) of every record, in order.
            let mut logged: Vec<(u64, Vec<u8>)> = Vec::new();
            for lens in &files {
                let mut app = new_file(&store, 1, "n1");
                logged.push((app.start_pos(), {
                    let mut b = Vec::new();
                    let r = record(app.next_seq() - 1, 100);
                    encode_record(&r.header, &r.payload, &mut b);
                    b
                }));
                for len in lens {
                    let r = record(app.next_seq(), *len);
                    let mut buf = Vec::new();
                    encode_record(&r.header, &r.payload, &mut buf);
                    logged.push((app.end_pos(), buf.clone()));
                    app.append(&buf, 1).unwrap();
                }
                app.sync().unwrap();
                store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
            }
            let end = store.end().unwrap().0;
            let bounds: Vec<u64> = logged.iter().map(|(p, _)| *p).chain([end]).collect();
            let limit = bounds[limit_at.index(bounds.len())];
            let mut pos = bounds[from_at.index(bounds.len())].min(limit);
            let mut got = Vec::new();
            let mut bytes = vec![7; 3];
            while let Some(raw) = store.read_records(pos, limit, max_bytes, &mut bytes).unwrap() {
                prop_assert!(raw.records > 0, "a batch at {} below the limit {} is empty", pos, limit);
                prop_assert_eq!(raw.pos, pos);
                prop_assert!(raw.file.header.start_pos <= pos && pos < raw.file.end_pos);
                let batch_end = pos + bytes.len() as u64;
                prop_assert!(batch_end <= limit.min(raw.file.end_pos));
                prop_assert!(raw.records == 1 || bytes.len() < max_bytes + 5064);
                got.extend_from_slice(&bytes);
                pos = batch_end;
            }
            prop_assert_eq!(pos, limit);
            let from = bounds[from_at.index(bounds.len())].min(limit);
            let want: Vec<u8> = logged
                .iter()
                .filter(|(p, b)| *p >= from && *p + b.len() as u64 <= limit)
                .flat_map(|(_, b)| b.clone())
                .collect();
            prop_assert!(got == want, "shipped {} bytes, logged {} in range", got.len(), want.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Recovery keeps exactly the records that are complete before the cut.
        #[test]
        fn recovery_after_truncation_keeps_exactly_the_complete_prefix(
            lens in proptest::collection::vec(0usize..3000, 1..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (path, offsets) = write_log(tmp.path(), &lens);
            let file_len = std::fs::metadata(&path).unwrap().len();
            let cut = FIRST_RECORD + cut.index((file_len - FIRST_RECORD + 1) as usize) as u64;
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
            let complete = offsets.iter().zip(&lens).filter(|(o, l)| **o + RECORD_HEADER_LEN_U64 + **l as u64 <= cut).count();
            let recs = read_all(tmp.path()).unwrap();
            prop_assert_eq!(recs.len(), complete);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r, &record(i as u64 + 1, lens[i]));
            }
            // The torn tail is cut off on disk.
            let expect_len = offsets.get(complete).copied().unwrap_or(file_len);
            prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), expect_len);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A bit flip is never replayed. A power loss tears unsynced writes
        /// in any order, so damage where no sync had reached is a torn tail
        /// (cut off) even with valid records after it, and so is damage in
        /// the last record; damage a sync had covered (a later record says
        /// so) is corruption and nothing past it is read. With `synced` at
        /// the end, every record claims all before it durable, as in a log
        /// written before the claims existed.
        #[test]
        fn damage_past_the_durable_end_is_a_torn_tail_before_it_corruption(
            lens in proptest::collection::vec(1usize..2000, 1..10),
            synced in any::<prop::sample::Index>(),
            which in any::<prop::sample::Index>(),
            bit in any::<prop::sample::Index>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let synced = synced.index(lens.len() + 1);
            let (path, offsets) = write_log_synced(tmp.path(), &lens, synced);
            let i = which.index(lens.len());
            let rec_len = RECORD_HEADER_LEN_U64 + lens[i] as u64;
            let b = bit.index((rec_len * 8) as usize) as u64;
            let at = offsets[i] + b / 8;
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at as usize] ^= 1 << (b % 8);
            std::fs::write(&path, &bytes).unwrap();
            let res = read_all(tmp.path());
            if i >= synced || i + 1 == lens.len() {
                let recs = res.unwrap();
                prop_assert_eq!(recs.len(), i);
                prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), offsets[i]);
            } else {
                match res {
                    Err(Error::Corruption { offset, .. }) => prop_assert_eq!(offset, offsets[i]),
                    other => prop_assert!(false, "expected corruption at record {}, got {:?}", i, other.map(|r| r.len())),
                }
            }
        }
    }

    /// A rotation whose new file became durable but whose removal after a
    /// failure did not, while appending went on in the previous file: the
    /// empty newer file starts inside the previous one and is dropped.
    #[test]
    fn the_empty_logfile_of_a_failed_rotation_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let (first, offsets) = write_log(tmp.path(), &[100, 200, 300]);
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let header = FileHeader {
            file_seq: 2,
            start_pos: 1000 + offsets[1] - FIRST_RECORD,
            first_seq: 2,
            generation: 1,
        };
        store.create_file("n1", header).unwrap();
        drop(store);
        let (store, rec) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(store.files().len(), 1);
        assert_eq!(rec.map(|r| r.next_seq), Some(4));
        assert!(first.exists());
        // An empty newest file that continues the previous one exactly is
        // a rotation that worked: it stays.
        let end = store.files()[0].end_pos;
        store
            .create_file(
                "n1",
                FileHeader {
                    file_seq: 2,
                    start_pos: end,
                    first_seq: 4,
                    generation: 1,
                },
            )
            .unwrap();
        drop(store);
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(store.files().len(), 2);
    }

    const RECORD_HEADER_LEN_U64: u64 = crate::log::format::RECORD_HEADER_LEN as u64;

    #[test]
    fn rotation_keeps_positions_contiguous_and_deletion_spares_the_newest_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let store = Arc::new(store);
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        let mut seq = 1;
        for file in 0..3u64 {
            for _ in 0..4 {
                let r = record(seq, 100);
                let mut buf = Vec::new();
                encode_record(&r.header, &r.payload, &mut buf);
                app.append(&buf, 1).unwrap();
                store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
                seq += 1;
            }
            if file < 2 {
                app.sync().unwrap();
                let h = FileHeader {
                    file_seq: file + 2,
                    start_pos: app.end_pos(),
                    first_seq: app.next_seq(),
                    generation: 1,
                };
                app = store.create_file("n1", h).unwrap();
            }
        }
        let end = app.end_pos();
        drop(store);
        let (store, rec) = LogStore::open(storage(), tmp.path()).unwrap();
        let rec = rec.unwrap();
        assert_eq!((rec.end_pos, rec.next_seq, rec.next_file_seq), (end, 13, 4));
        let store = Arc::new(store);
        let mut c = store.cursor(0).unwrap();
        let mut n = 0;
        while let Some((_, r)) = c.next_record().unwrap() {
            n += 1;
            assert_eq!(r.header.seq, n);
        }
        assert_eq!(n, 12);
        // Everything is "written back": all but the newest file go.
        store.delete_before(end).unwrap();
        assert_eq!(store.files().len(), 1);
        assert!(matches!(
            store.cursor(0),
            Err(Error::PositionUnavailable { .. })
        ));
    }

    #[test]
    fn only_newest_logfiles_without_records_are_dropped_as_empty_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let store = Arc::new(store);
        assert_eq!(store.drop_empty_tail().unwrap(), None);
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        let r = record(1, 100);
        let mut buf = Vec::new();
        encode_record(&r.header, &r.payload, &mut buf);
        app.append(&buf, 1).unwrap();
        store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
        let end = app.end_pos();
        for file_seq in [2, 3] {
            let h = FileHeader {
                file_seq,
                start_pos: end,
                first_seq: 2,
                generation: 1,
            };
            store.create_file("n1", h).unwrap();
        }
        assert_eq!(store.drop_empty_tail().unwrap(), Some(end));
        assert_eq!(store.files().len(), 1);
        assert_eq!(store.end(), Some((end, 2)));
        // The file with a record stays, also after a reopen.
        assert_eq!(store.drop_empty_tail().unwrap(), None);
        drop(store);
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(store.files().len(), 1);
    }

    #[test]
    fn a_missing_middle_logfile_is_a_gap_not_silently_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        for f in 2..=3 {
            let r = record(f, 10);
            let mut buf = Vec::new();
            encode_record(
                &RecordHeader {
                    seq: app.next_seq(),
                    ..r.header
                },
                &r.payload,
                &mut buf,
            );
            app.append(&buf, 1).unwrap();
            store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
            let h = FileHeader {
                file_seq: f,
                start_pos: app.end_pos(),
                first_seq: app.next_seq(),
                generation: 1,
            };
            app = store.create_file("n1", h).unwrap();
        }
        std::fs::remove_file(tmp.path().join(file_name(2, "n1"))).unwrap();
        match LogStore::open(storage(), tmp.path()) {
            Err(Error::Gap { what, .. }) => assert!(what.contains("log-000000003-n1"), "{what}"),
            other => panic!("expected a gap, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_newest_logfile_with_an_unwritten_header_is_dropped_but_an_older_one_is_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let app = store.create_file("n1", FileHeader::first(1)).unwrap();
        drop(app);
        // A crash after the directory entry but before the header reached the disk.
        std::fs::write(tmp.path().join(file_name(2, "n1")), [0u8; 64]).unwrap();
        let (store, rec) = LogStore::open(storage(), tmp.path()).unwrap();
        assert_eq!(rec.unwrap().next_file_seq, 2);
        assert_eq!(store.files().len(), 1);
        // The same damage in a file that is not the newest is corruption.
        std::fs::write(tmp.path().join(file_name(1, "n1")), [0u8; 64]).unwrap();
        std::fs::write(tmp.path().join(file_name(2, "n1")), [0u8; 64]).unwrap();
        let header = FileHeader {
            file_seq: 3,
            start_pos: 0,
            first_seq: 1,
            generation: 1,
        };
        std::fs::write(tmp.path().join(file_name(3, "n1")), header.encode()).unwrap();
        match LogStore::open(storage(), tmp.path()) {
            Err(Error::Corruption { what, .. }) => {
                assert!(what.contains("repeated byte 0x00"), "{what}")
            }
            other => panic!("expected corruption, got {:?}", other.map(|_| ())),
        }
    }

    /// Appends records `seqs` (of `len` bytes each) and notes them.
    fn append_records(
        store: &LogStore,
        app: &mut Appender,
        seqs: std::ops::Range<u64>,
        len: usize,
    ) {
        for seq in seqs {
            let r = record(seq, len);
            let mut buf = Vec::new();
            encode_record(&r.header, &r.payload, &mut buf);
            app.append(&buf, 1).unwrap();
        }
        store.note_append(app.start_pos(), app.end_pos(), app.next_seq());
    }

    /// Syncs `app` and starts the next logfile.
    fn rotate(store: &LogStore, app: &Appender) -> Appender {
        app.sync().unwrap();
        let file_seq = store.files().last().unwrap().file_seq + 1;
        let h = FileHeader {
            file_seq,
            start_pos: app.end_pos(),
            first_seq: app.next_seq(),
            generation: 1,
        };
        store.create_file("n1", h).unwrap()
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    /// The records of the log from its first position, and where it ends.
    fn records_of(dir: &Path) -> (Vec<u64>, Option<Recovered>) {
        let (store, rec) = LogStore::open(storage(), dir).unwrap();
        let store = Arc::new(store);
        let Some(first) = store.first_pos() else {
            return (Vec::new(), rec);
        };
        let mut c = store.cursor(first).unwrap();
        let mut seqs = Vec::new();
        while let Some((_, r)) = c.next_record().unwrap() {
            assert_eq!(
                r,
                record(r.header.seq, r.payload.len()),
                "record {} intact",
                r.header.seq
            );
            seqs.push(r.header.seq);
        }
        (seqs, rec)
    }

    #[test]
    fn a_deleted_logfile_is_reused_and_its_old_records_never_read_as_the_new_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        append_records(&store, &mut app, 1..41, 1000);
        let first = app.path().to_path_buf();
        let first_ino = inode(&first);
        app = rotate(&store, &app);
        append_records(&store, &mut app, 41..43, 1000);
        store.delete_before(app.start_pos()).unwrap();
        assert!(!first.exists());
        assert_eq!(inode(&tmp.path().join(SPARE_FILE)), first_ino);

        // The third logfile is the first one, holding 3 records of its
        // own and, past them, 37 of the first's.
        app = rotate(&store, &app);
        assert_eq!(inode(app.path()), first_ino, "the spare was reused");
        assert!(!tmp.path().join(SPARE_FILE).exists());
        append_records(&store, &mut app, 43..46, 1000);
        let third = app.path().to_path_buf();
        let third_end = app.file_bytes();
        assert!(std::fs::metadata(&third).unwrap().len() > third_end);
        // Live readers stop at the records' end.
        let live = Arc::new(store);
        let mut c = live.cursor(live.first_pos().unwrap()).unwrap();
        let mut seqs = Vec::new();
        while let Some((_, r)) = c.next_record().unwrap() {
            seqs.push(r.header.seq);
        }
        assert_eq!(seqs, (41..46).collect::<Vec<_>>());

        // Recovery takes the old records for a torn tail and cuts them.
        drop((app, live));
        let (seqs, rec) = records_of(tmp.path());
        assert_eq!(seqs, (41..46).collect::<Vec<_>>());
        assert_eq!(rec.unwrap().next_seq, 46);
        assert_eq!(std::fs::metadata(&third).unwrap().len(), third_end);

        // Once a reused file is not the newest, it ends at its records.
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let mut app = store.resume_last().unwrap().unwrap();
        append_records(&store, &mut app, 46..48, 1000);
        store.delete_before(app.start_pos()).unwrap();
        assert!(tmp.path().join(SPARE_FILE).exists());
        app = rotate(&store, &app);
        append_records(&store, &mut app, 48..49, 1000);
        let reused = app.path().to_path_buf();
        app = rotate(&store, &app);
        append_records(&store, &mut app, 49..50, 10);
        assert_eq!(
            std::fs::metadata(&reused).unwrap().len(),
            FIRST_RECORD + 1064,
            "cut to its one record when the next file began"
        );
        drop(app);
        let (seqs, _) = records_of(tmp.path());
        assert_eq!(seqs, (43..50).collect::<Vec<_>>());
    }

    #[test]
    fn a_deleted_logfile_is_kept_as_the_spare_only_while_space_is_plenty() {
        let disk = crate::storage::sim::SimStorage::new(7);
        let dir = Path::new("/log");
        disk.mkdir_durable(dir);
        let storage: Arc<dyn Storage> = Arc::new(disk.clone());
        let (store, _) = LogStore::open(Arc::clone(&storage), dir).unwrap();
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        append_records(&store, &mut app, 1..11, 10_000);
        app = rotate(&store, &app);
        append_records(&store, &mut app, 11..12, 10);
        // Free: less than 8 times the file to delete.
        disk.set_capacity(Some(store.bytes() + 64 * 3 + 500_000));
        store.delete_before(app.start_pos()).unwrap();
        assert!(
            !storage.exists(&dir.join(SPARE_FILE)),
            "no spare when space is short"
        );
        disk.set_capacity(None);
        app = rotate(&store, &app);
        append_records(&store, &mut app, 12..22, 10_000);
        app = rotate(&store, &app);
        store.delete_before(app.start_pos()).unwrap();
        assert!(
            storage.exists(&dir.join(SPARE_FILE)),
            "a spare when space is plenty"
        );
    }

    #[test]
    fn a_reader_of_a_logfile_that_is_reused_meanwhile_fails_rather_than_read_the_new_records() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(storage(), tmp.path()).unwrap();
        let store = Arc::new(store);
        let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
        // 3 MiB: the reader reads it in three windows.
        append_records(&store, &mut app, 1..49, 64 << 10);
        let mut c = store.cursor(0).unwrap();
        assert_eq!(c.next_record().unwrap().unwrap().1.header.seq, 1);
        app = rotate(&store, &app);
        append_records(&store, &mut app, 49..50, 100);
        store.delete_before(app.start_pos()).unwrap();
        app = rotate(&store, &app);
        append_records(&store, &mut app, 50..99, 64 << 10);
        let mut read = 1;
        let err = loop {
            match c.next_record() {
                Ok(Some((_, r))) => {
                    read += 1;
                    assert_eq!(r.header.seq, read, "only records of the file opened");
                }
                Ok(None) => panic!("the reader ended quietly after {read} records"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("deleted and reused"), "{err}");
        assert!(read < 48);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            records: u64,
            len: usize,
        },
        Rotate,
        /// Deletes the files before the newest.
        Delete,
        /// Drops the store and opens it again (recovery).
        Reopen,
        /// Cuts the log back by this many records.
        Cut(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..20, prop_oneof![0usize..200, 1000usize..20_000])
                .prop_map(|(records, len)| Op::Append { records, len }),
            2 => Just(Op::Rotate),
            2 => Just(Op::Delete),
            1 => Just(Op::Reopen),
            1 => (1u64..30).prop_map(Op::Cut),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the order of appends, rotations (onto reused files),
        /// deletions, cuts and restarts, the log holds exactly the records
        /// appended since its first file and not cut, and every file but
        /// the newest ends at its last record.
        #[test]
        fn reused_logfiles_hold_exactly_their_records(ops in prop::collection::vec(op(), 1..40)) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let (store, _) = LogStore::open(storage(), dir).unwrap();
            let mut store = Arc::new(store);
            let mut app = store.create_file("n1", FileHeader::first(1)).unwrap();
            // Records the log holds, as (seq, payload length).
            let mut held: Vec<(u64, usize)> = Vec::new();
            let mut next = 1;
            for op in ops {
                match op {
                    Op::Append { records, len } => {
                        append_records(&store, &mut app, next..next + records, len);
                        held.extend((next..next + records).map(|s| (s, len)));
                        next += records;
                    }
                    Op::Rotate => {
                        if app.end_pos() > app.start_pos() {
                            app = rotate(&store, &app);
                        }
                    }
                    Op::Delete => {
                        store.delete_before(app.start_pos()).unwrap();
                    }
                    Op::Reopen => {
                        drop(app);
                        drop(store);
                        let (s, _) = LogStore::open(storage(), dir).unwrap();
                        store = Arc::new(s);
                        app = store.resume_last().unwrap().unwrap();
                    }
                    Op::Cut(n) => {
                        let first = first_seq_of(&store);
                        let keep = held.iter().filter(|(s, _)| *s >= first).count().saturating_sub(n as usize);
                        if keep == 0 {
                            continue;
                        }
                        let cut_seq = held.iter().filter(|(s, _)| *s >= first).nth(keep).map(|(s, _)| *s);
                        let Some(cut_seq) = cut_seq else { continue };
                        let pos = position_of(&store, cut_seq);
                        drop(app);
                        store.truncate_to(pos).unwrap();
                        held.retain(|(s, _)| *s < cut_seq);
                        next = cut_seq;
                        app = store.resume_last().unwrap().unwrap();
                    }
                }
            }
            let first = first_seq_of(&store);
            let want: Vec<u64> = held.iter().map(|(s, _)| *s).filter(|s| *s >= first).collect();
            drop(app);
            let files = store.files();
            drop(store);
            for f in &files[..files.len() - 1] {
                prop_assert_eq!(
                    std::fs::metadata(&f.path).unwrap().len(),
                    f.offset_of(f.end_pos),
                    "{} ends at its records", f.path.display()
                );
            }
            let (seqs, rec) = records_of(dir);
            prop_assert_eq!(seqs, want);
            prop_assert_eq!(rec.unwrap().next_seq, next);
        }
    }

    /// Sequence number of the log's first record.
    fn first_seq_of(store: &LogStore) -> u64 {
        store.files().first().map_or(1, |f| f.header.first_seq)
    }

    /// Log position of record `seq`.
    fn position_of(store: &Arc<LogStore>, seq: u64) -> u64 {
        let mut c = store.cursor(store.first_pos().unwrap()).unwrap();
        while let Some((at, r)) = c.next_record().unwrap() {
            if r.header.seq == seq {
                return at;
            }
        }
        panic!("record {seq} is not in the log")
    }
}
