//! Iterating the records of one logfile, and deciding where the valid part
//! ends: a torn tail (cut off by recovery) or corruption in the middle
//! (replay stops with an error; garbage is never applied).
//!
//! A logfile may be a reused one (see `store.rs`): past its records lie
//! the bytes of the older logfile it was, records with lower sequence
//! numbers among them. They end the file's records like a torn tail does,
//! and they never vouch for anything (see [`RecordReader::synced_past`]).

use std::sync::Arc;

use bytes::Bytes;

use super::format::{
    self, DecodeError, FILE_HEADER_LEN, RECORD_HEADER_LEN, RECORD_MAGIC, Record, RecordHeader,
};
use crate::storage::File;

/// Why iteration stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The file ends exactly after the last valid record.
    Clean,
    /// Bytes after the last valid record do not form a record, and no valid
    /// record after them shows that a sync had covered them: a write torn
    /// by a crash (or a file still growing).
    TornTail { at: u64, what: String },
    /// A bad record that a sync had covered (a valid record after it says
    /// so), or a sequence gap: the log is damaged and must not be replayed
    /// past `at`.
    Corrupt { at: u64, what: String },
}

const WINDOW: usize = 1 << 20;

/// Reads records of one logfile in order, starting at a file offset.
pub struct RecordReader {
    file: Arc<dyn File>,
    /// Where reading stops: the file's size, or less where the caller
    /// knows where the records end ([`Self::up_to`]).
    file_len: u64,
    /// The file header as it was when reading began: a reader that finds
    /// another one after a read was reading a logfile that was deleted
    /// and reused meanwhile, and what it read is not this file's.
    header: [u8; FILE_HEADER_LEN],
    /// Storage for a window of the file; `buf[..filled]` holds file data.
    buf: Vec<u8>,
    filled: usize,
    /// File offset of `buf[0]`.
    buf_off: u64,
    /// File offset of the next record.
    pos: u64,
    expected_seq: Option<u64>,
    stop: Option<Stop>,
    /// Whether the records' `unsynced` claims describe this file's syncs
    /// (false for a secondary's copy: they describe the primary's).
    own_claims: bool,
}

impl RecordReader {
    /// `offset` must be a record boundary (or the end of the file header);
    /// `expected_seq`, when known, is the sequence number the next record must carry.
    pub fn new(
        file: Arc<dyn File>,
        offset: u64,
        expected_seq: Option<u64>,
    ) -> std::io::Result<Self> {
        let file_len = file.size()?;
        let mut header = [0u8; FILE_HEADER_LEN];
        file.read_exact_or_zero(&mut header, 0)?;
        Ok(Self {
            file,
            file_len,
            header,
            buf: Vec::new(),
            filled: 0,
            buf_off: offset,
            pos: offset,
            expected_seq,
            stop: None,
            own_claims: true,
        })
    }

    /// For a copy of another node's log (a secondary's): the records'
    /// `unsynced` claims tell nothing about when this copy was synced, so
    /// damage is a torn tail unless a caller knows better (the copy can be
    /// fetched again).
    pub fn copied(mut self) -> Self {
        self.own_claims = false;
        self
    }

    /// Reads no further than file offset `end`: where the caller knows the
    /// records end (a reused logfile holds older bytes past them, and a
    /// file being appended to may hold part of a record there).
    pub fn up_to(mut self, end: u64) -> Self {
        self.file_len = self.file_len.min(end);
        self
    }

    /// The file header as it was when reading began.
    pub fn file_header(&self) -> &[u8; FILE_HEADER_LEN] {
        &self.header
    }

    /// File offset just past the last record returned (the valid end so far).
    pub fn valid_end(&self) -> u64 {
        self.pos
    }

    /// The sequence number the next record must carry, if known.
    pub fn next_seq(&self) -> Option<u64> {
        self.expected_seq
    }

    /// Why the reader stopped; `None` while records remain.
    pub fn stop(&self) -> Option<&Stop> {
        self.stop.as_ref()
    }

    /// Makes `buf` hold at least `n` bytes from `pos` (fewer at end of file).
    /// The storage only grows (zeroed once when it does), so refilling it
    /// costs the read alone: this runs once per MiB a secondary applies.
    fn fill(&mut self, n: usize) -> std::io::Result<&[u8]> {
        let start = (self.pos - self.buf_off) as usize;
        debug_assert!(start <= self.filled, "the position is inside the buffer");
        if self.filled < start + n {
            let avail = (self.file_len.saturating_sub(self.pos)) as usize;
            let want = n.max(WINDOW).min(avail.max(n));
            // What is buffered past `pos` moves to the front.
            self.buf.copy_within(start..self.filled, 0);
            self.filled -= start;
            self.buf_off = self.pos;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            while self.filled < want {
                let r = self.file.read_at(
                    &mut self.buf[self.filled..want],
                    self.pos + self.filled as u64,
                )?;
                if r == 0 {
                    break;
                }
                self.filled += r;
            }
            self.check_identity()?;
        }
        let start = (self.pos - self.buf_off) as usize;
        let end = (start + n).min(self.filled);
        Ok(&self.buf[start..end])
    }

    /// Fails if the file no longer has the header it had when reading
    /// began: it was deleted and reused as a new logfile (whose header is
    /// written before any of its records), so what was just read may be
    /// the new file's records. Like reading a deleted file, that is an
    /// error of this read (`NotFound`), never records of another file.
    fn check_identity(&self) -> std::io::Result<()> {
        let mut now = [0u8; FILE_HEADER_LEN];
        self.file.read_exact_or_zero(&mut now, 0)?;
        if now != self.header {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the logfile was deleted and reused while it was read",
            ));
        }
        Ok(())
    }

    /// The next valid record and its file offset, or `None` at the end (see [`Self::stop`]).
    pub fn next_record(&mut self) -> std::io::Result<Option<(u64, Record)>> {
        Ok(self.next_raw()?.map(|(at, header, raw)| {
            let payload = Bytes::copy_from_slice(&raw[RECORD_HEADER_LEN..]);
            (at, Record { header, payload })
        }))
    }

    /// Like [`Self::next_record`], but the record as it is encoded in the
    /// file, borrowed from the read window: checked, not copied (shipping
    /// passes records on as they are).
    pub fn next_raw(&mut self) -> std::io::Result<Option<(u64, RecordHeader, &[u8])>> {
        if self.stop.is_some() {
            return Ok(None);
        }
        if self.pos >= self.file_len {
            self.stop = Some(Stop::Clean);
            return Ok(None);
        }
        let need = match format::decode_record_header(self.fill(RECORD_HEADER_LEN)?) {
            Ok(h) => h.encoded_len() as usize,
            Err(e) => return self.stop_at(e).map(|_| None),
        };
        match format::verify_record(self.fill(need)?) {
            Ok((header, _)) if self.expected_seq.is_some_and(|exp| header.seq < exp) => {
                // A record of an earlier logfile: the rest of a reused one.
                let what = format!(
                    "record {} of an earlier logfile where record {} was expected (the unwritten rest of a reused logfile)",
                    header.seq,
                    self.expected_seq.unwrap_or_default()
                );
                self.stop_at(DecodeError::Corrupt(what)).map(|_| None)
            }
            Ok((header, used)) => {
                if let Some(exp) = self.expected_seq
                    && header.seq != exp
                {
                    self.stop = Some(Stop::Corrupt {
                        at: self.pos,
                        what: format!("sequence gap: expected record {exp}, found {}", header.seq),
                    });
                    return Ok(None);
                }
                let at = self.pos;
                let start = (at - self.buf_off) as usize;
                self.pos += used as u64;
                self.expected_seq = Some(header.seq + 1);
                Ok(Some((at, header, &self.buf[start..start + used])))
            }
            Err(e) => self.stop_at(e).map(|_| None),
        }
    }

    fn stop_at(&mut self, e: DecodeError) -> std::io::Result<()> {
        let at = self.pos;
        let what = e.to_string();
        self.stop = Some(if self.synced_past(at)? {
            Stop::Corrupt { at, what }
        } else {
            Stop::TornTail { at, what }
        });
        Ok(())
    }

    /// True if a valid record after `at` was written when the log was
    /// already durable past `at`: then the damage at `at` hit bytes a sync
    /// had covered, which no power loss can tear. Without such a record
    /// the damage lies in the stretch no sync covered yet, which a power
    /// loss may tear in any order (later records surviving earlier ones):
    /// a torn tail. (A record of a log older than the `unsynced` field
    /// holds 0 there, so any valid record after damage makes it corruption,
    /// as before.) Records with lower sequence numbers than the one
    /// expected at `at` are an older logfile's, left in a reused one: what
    /// they claim is about that file.
    fn synced_past(&self, at: u64) -> std::io::Result<bool> {
        if !self.own_claims {
            return Ok(false);
        }
        let magic = RECORD_MAGIC.to_le_bytes();
        let mut off = at + 1;
        let mut chunk = vec![0u8; WINDOW + RECORD_HEADER_LEN];
        while off < self.file_len {
            let n = self.file.read_at(&mut chunk, off)?;
            if n < 8 {
                break;
            }
            for i in 0..=n - 8 {
                if chunk[i..i + 8] == magic {
                    let cand = off + i as u64;
                    if let Some(h) = self.valid_header_at(cand)?
                        && self.expected_seq.is_none_or(|exp| h.seq >= exp)
                        && cand.saturating_sub(h.unsynced as u64) > at
                    {
                        return Ok(true);
                    }
                }
            }
            off += (n - 7) as u64;
        }
        Ok(false)
    }

    /// The header of the record at `at` if a whole valid record is there.
    fn valid_header_at(&self, at: u64) -> std::io::Result<Option<format::RecordHeader>> {
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        let n = self.file.read_at(&mut hdr, at)?;
        let Ok(h) = format::decode_record_header(&hdr[..n]) else {
            return Ok(None);
        };
        let len = h.encoded_len() as usize;
        if at + len as u64 > self.file_len {
            return Ok(None);
        }
        let mut rec = vec![0u8; len];
        self.file.read_exact_or_zero(&mut rec, at)?;
        Ok(format::verify_record(&rec).ok().map(|_| h))
    }
}

/// Offset of the first record in a logfile.
pub const FIRST_RECORD: u64 = FILE_HEADER_LEN as u64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::encode_record;
    use crate::log::store::tests::record;
    use crate::storage::{OpenMode, Storage, sim::SimStorage};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Records of any size, also larger than the read window and
        /// straddling its refills, come back whole and in order, however
        /// often the buffer is reused.
        #[test]
        fn records_come_back_whole_across_window_refills(
            lens in prop::collection::vec(prop_oneof![0usize..9000, 300_000usize..1_500_000], 1..12),
        ) {
            let disk = SimStorage::new(1);
            let path = std::path::Path::new("/log");
            let file = disk.open(path, OpenMode::CreateNew).unwrap();
            let mut bytes = vec![0u8; FILE_HEADER_LEN];
            let records: Vec<Record> =
                lens.iter().enumerate().map(|(i, &l)| record(i as u64 + 5, l)).collect();
            for r in &records {
                encode_record(&r.header, &r.payload, &mut bytes);
            }
            file.write_all_at(&bytes, 0).unwrap();
            let mut reader = RecordReader::new(file, FIRST_RECORD, Some(5)).unwrap();
            for want in &records {
                let (_, got) = reader.next_record().unwrap().expect("a record");
                prop_assert_eq!(got.header, want.header);
                prop_assert!(got.payload == want.payload, "payload of record {}", want.header.seq);
            }
            prop_assert!(reader.next_record().unwrap().is_none());
            prop_assert_eq!(reader.stop(), Some(&Stop::Clean));
            prop_assert_eq!(reader.valid_end(), bytes.len() as u64);
        }
    }
}
