//! The logfiles of one resource directory: names, recovery, rotation,
//! deletion, and reading records from any log position.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::format::{FILE_HEADER_LEN, FileHeader, Record};
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
                Err(e) if n < FILE_HEADER_LEN && file_seq_is_last(&storage, dir, file_seq) => {
                    // A logfile created but never completed by a crash: drop it.
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
            let (end_pos, end_seq) = scan_file(&*storage, &files[i], last)?;
            files[i].end_pos = end_pos;
            files[i].end_seq = end_seq;
            if i > 0 {
                let (prev, cur) = (&files[i - 1], &files[i]);
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
        let store = Self {
            storage,
            dir: dir.to_path_buf(),
            files: Mutex::new(files),
        };
        Ok((store, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A snapshot of the logfiles, oldest first.
    pub fn files(&self) -> Vec<LogFileInfo> {
        self.files.lock().expect("log store lock").clone()
    }

    /// Bytes the logfiles occupy.
    pub fn bytes(&self) -> u64 {
        self.files()
            .iter()
            .map(|f| f.end_pos - f.header.start_pos + FILE_HEADER_LEN as u64)
            .sum()
    }

    /// Position of the oldest record still in the log.
    pub fn first_pos(&self) -> Option<u64> {
        self.files().first().map(|f| f.header.start_pos)
    }

    /// Creates the next logfile and returns an appender for it. The previous
    /// file must be synced by the caller first (rotation does that).
    pub fn create_file(&self, origin: &str, header: FileHeader) -> Result<Appender> {
        let path = self.dir.join(file_name(header.file_seq, origin));
        let file = self
            .storage
            .open(&path, OpenMode::CreateNew)
            .map_err(Error::io(&path))?;
        file.write_all_at(&header.encode(), 0)
            .map_err(Error::io(&path))?;
        file.sync_data().map_err(Error::io(&path))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(Error::io(&self.dir))?;
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
        Ok(Appender {
            file,
            path,
            start_pos: header.start_pos,
            end_pos: header.start_pos,
            next_seq: header.first_seq,
        })
    }

    /// An appender positioned at the end of the last (recovered) logfile.
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

    /// Deletes logfiles that end at or before `pos`, never the newest one.
    /// Returns how many bytes were freed.
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
        let mut freed = 0;
        for f in &doomed {
            self.storage
                .remove_file(&f.path)
                .map_err(Error::io(&f.path))?;
            freed += f.end_pos - f.header.start_pos + FILE_HEADER_LEN as u64;
            tracing::info!(file = %f.path.display(), end = f.end_pos, "deleted logfile");
        }
        if !doomed.is_empty() {
            self.storage
                .sync_dir(&self.dir)
                .map_err(Error::io(&self.dir))?;
            let mut files = self.files.lock().expect("log store lock");
            files.retain(|f| !doomed.iter().any(|d| d.file_seq == f.file_seq));
        }
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
/// off; damage anywhere else is an error.
fn scan_file(storage: &dyn Storage, info: &LogFileInfo, last: bool) -> Result<(u64, u64)> {
    let file = storage
        .open(&info.path, OpenMode::ReadWrite)
        .map_err(Error::io(&info.path))?;
    let mut reader =
        RecordReader::new(Arc::clone(&file), FIRST_RECORD, Some(info.header.first_seq))
            .map_err(Error::io(&info.path))?;
    while reader
        .next_record()
        .map_err(Error::io(&info.path))?
        .is_some()
    {}
    let valid_end = reader.valid_end();
    let end_seq = reader.next_seq().unwrap_or(info.header.first_seq);
    match reader.stop().cloned().unwrap_or(Stop::Clean) {
        Stop::Clean => {}
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

/// Appends encoded records to the newest logfile.
pub struct Appender {
    file: Arc<dyn File>,
    path: PathBuf,
    start_pos: u64,
    end_pos: u64,
    next_seq: u64,
}

impl Appender {
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
        let off = self.end_pos - self.start_pos + FIRST_RECORD;
        if let Err(e) = self.file.write_all_at(bytes, off) {
            let _ = self.file.set_len(off);
            return Err(e);
        }
        self.end_pos += bytes.len() as u64;
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
                let off = self.pos - f.header.start_pos + FIRST_RECORD;
                let reader = RecordReader::new(file, off, None).map_err(Error::io(&f.path))?;
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
            match reader.next_record().map_err(|e| Error::Io {
                path: PathBuf::new(),
                source: e,
            })? {
                Some((off, rec)) => {
                    let pos = *start + off - FIRST_RECORD;
                    self.pos = pos + rec.header.encoded_len();
                    return Ok(Some((pos, rec)));
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
