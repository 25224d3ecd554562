//! The on-disk byte format of logfiles: one file header, then records.
//! Everything is little-endian; every field is checked before it is trusted.
//!
//! File header (64 bytes):
//! ```text
//!  0 magic u64 "MARSLOGF"   16 file_seq u64    32 first_seq u64   48 reserved [u8; 12]
//!  8 version u16            24 start_pos u64   40 generation u64  60 crc32c u32 (bytes 0..60)
//! 10 reserved [u8; 6]
//! ```
//! Record (64-byte header + payload):
//! ```text
//!  0 magic u64 "MARSLOGR"   16 seq u64         40 length u64        60 crc32c u32 over
//!  8 version u16            24 generation u64  48 timestamp_ns u64     header 0..60 + payload
//! 10 kind u16               32 offset u64      56 payload_len u32
//! 12 unsynced u32
//! ```
//! `length` is the extent on the device (for a write it equals `payload_len`;
//! zero records carry no payload; a resize record has `offset` = new size).
//! `unsynced` is how many bytes of log before the record were not yet known
//! to be durable when it was written (capped at `u32::MAX`; logs written
//! before the field existed hold 0, the strongest claim). Recovery uses it
//! to tell a power loss, which can only tear the unsynced stretch (in any
//! order: a later record may survive an earlier torn one), from damage to
//! bytes a sync had covered.

use bytes::Bytes;

pub const FILE_MAGIC: u64 = u64::from_le_bytes(*b"MARSLOGF");
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"MARSLOGR");
pub const FORMAT_VERSION: u16 = 1;
pub const FILE_HEADER_LEN: usize = 64;
pub const RECORD_HEADER_LEN: usize = 64;
/// The largest payload one record may carry; larger writes are split.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a record does to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Data to write at `offset`.
    Write = 1,
    /// Zero `length` bytes at `offset` (discard and write-zeroes).
    Zero = 2,
    /// The device grows to `offset` bytes.
    Resize = 3,
}

impl RecordKind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Write),
            2 => Some(Self::Zero),
            3 => Some(Self::Resize),
            _ => None,
        }
    }
}

/// The decoded fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    /// Bytes of log before this record not yet durable when it was written.
    pub unsynced: u32,
    pub seq: u64,
    pub generation: u64,
    pub offset: u64,
    pub length: u64,
    pub timestamp_ns: u64,
    pub payload_len: u32,
}

impl RecordHeader {
    /// Bytes this record occupies in the log.
    pub fn encoded_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload_len as u64
    }
}

/// A whole record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    pub payload: Bytes,
}

/// The decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub file_seq: u64,
    pub start_pos: u64,
    pub first_seq: u64,
    pub generation: u64,
}

/// Why bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed (a torn tail, or a file still growing).
    #[error("incomplete: {need} bytes needed, {have} present")]
    Short { need: usize, have: usize },
    /// The bytes are not a valid header or record.
    #[error("{0}")]
    Corrupt(String),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("slice of 2"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8"))
}

/// Names a magic that is one repeated byte: garbage from zeroed or uninitialised media.
fn describe_magic(found: u64) -> String {
    let bytes = found.to_le_bytes();
    if bytes.iter().all(|b| *b == bytes[0]) {
        format!(
            "bad magic: repeated byte {:#04x} (uninitialised or zeroed space)",
            bytes[0]
        )
    } else {
        format!("bad magic {found:#018x}")
    }
}

impl FileHeader {
    /// The header of a resource's first logfile.
    pub fn first(generation: u64) -> Self {
        Self {
            file_seq: 1,
            start_pos: 0,
            first_seq: 1,
            generation,
        }
    }

    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC.to_le_bytes());
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.start_pos.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < FILE_HEADER_LEN {
            return Err(DecodeError::Short {
                need: FILE_HEADER_LEN,
                have: b.len(),
            });
        }
        let magic = u64_at(b, 0);
        if magic != FILE_MAGIC {
            return Err(DecodeError::Corrupt(format!(
                "file header: {}",
                describe_magic(magic)
            )));
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(DecodeError::Corrupt(format!(
                "file header: unsupported format version {version}"
            )));
        }
        if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return Err(DecodeError::Corrupt(
                "file header: checksum mismatch".into(),
            ));
        }
        Ok(Self {
            file_seq: u64_at(b, 16),
            start_pos: u64_at(b, 24),
            first_seq: u64_at(b, 32),
            generation: u64_at(b, 40),
        })
    }
}

/// Appends the encoding of one record to `out`.
pub fn encode_record(h: &RecordHeader, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&encode_record_header(h, payload));
    out.extend_from_slice(payload);
}

/// The 64 header bytes of a record, its checksum covering `payload`, which
/// follows them in the log: lets a writer append the payload from where it
/// lies instead of copying it behind the header first.
pub fn encode_record_header(h: &RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    debug_assert_eq!(h.payload_len as usize, payload.len());
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[0..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(h.kind as u16).to_le_bytes());
    b[12..16].copy_from_slice(&h.unsynced.to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.generation.to_le_bytes());
    b[32..40].copy_from_slice(&h.offset.to_le_bytes());
    b[40..48].copy_from_slice(&h.length.to_le_bytes());
    b[48..56].copy_from_slice(&h.timestamp_ns.to_le_bytes());
    b[56..60].copy_from_slice(&h.payload_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), payload);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks a record header without its checksum (which covers the
/// payload too): enough to know how many bytes the record claims.
pub fn decode_record_header(b: &[u8]) -> Result<RecordHeader, DecodeError> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(DecodeError::Short {
            need: RECORD_HEADER_LEN,
            have: b.len(),
        });
    }
    let magic = u64_at(b, 0);
    if magic != RECORD_MAGIC {
        return Err(DecodeError::Corrupt(describe_magic(magic)));
    }
    let version = u16_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(DecodeError::Corrupt(format!(
            "unsupported record format version {version}"
        )));
    }
    let kind_raw = u16_at(b, 10);
    let kind = RecordKind::from_u16(kind_raw)
        .ok_or_else(|| DecodeError::Corrupt(format!("unknown record kind {kind_raw}")))?;
    let h = RecordHeader {
        kind,
        unsynced: u32_at(b, 12),
        seq: u64_at(b, 16),
        generation: u64_at(b, 24),
        offset: u64_at(b, 32),
        length: u64_at(b, 40),
        timestamp_ns: u64_at(b, 48),
        payload_len: u32_at(b, 56),
    };
    if h.payload_len > MAX_PAYLOAD {
        return Err(DecodeError::Corrupt(format!(
            "payload length {} exceeds {MAX_PAYLOAD}",
            h.payload_len
        )));
    }
    let consistent = match kind {
        RecordKind::Write => h.length == h.payload_len as u64,
        RecordKind::Zero => h.payload_len == 0,
        RecordKind::Resize => h.payload_len == 0 && h.length == 0,
    };
    if !consistent || h.offset.checked_add(h.length).is_none() {
        return Err(DecodeError::Corrupt(format!(
            "inconsistent {kind:?} record: offset {} length {} payload {}",
            h.offset, h.length, h.payload_len
        )));
    }
    Ok(h)
}

/// Decodes one whole record from the start of `b`, verifying its checksum.
/// Returns the record and the number of bytes it occupies.
pub fn decode_record(b: &[u8]) -> Result<(Record, usize), DecodeError> {
    let (h, total) = verify_record(b)?;
    let payload = Bytes::copy_from_slice(&b[RECORD_HEADER_LEN..total]);
    Ok((Record { header: h, payload }, total))
}

/// The checksum a record carries (its last header field), of a record
/// [`verify_record`] accepted. Two logs that hold a record with the same
/// checksum at the same position hold the same record.
pub fn record_crc(b: &[u8]) -> u32 {
    u32_at(b, 60)
}

/// Checks the record at the start of `b` like [`decode_record`] without
/// copying its payload out: its header and encoded length. For checks of
/// data that is kept as it is (a fetched chunk goes to the log whole).
pub fn verify_record(b: &[u8]) -> Result<(RecordHeader, usize), DecodeError> {
    let h = decode_record_header(b)?;
    let total = h.encoded_len() as usize;
    if b.len() < total {
        return Err(DecodeError::Short {
            need: total,
            have: b.len(),
        });
    }
    let mut crc = crc32c::crc32c(&b[..60]);
    crc = crc32c::crc32c_append(crc, &b[RECORD_HEADER_LEN..total]);
    if crc != u32_at(b, 60) {
        return Err(DecodeError::Corrupt(format!(
            "checksum mismatch in record seq {}",
            h.seq
        )));
    }
    Ok((h, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            0u8..3,
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            0u64..1 << 40,
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(k, unsynced, seq, generation, offset, ts, data)| {
                let (kind, length, payload) = match k {
                    0 => (RecordKind::Write, data.len() as u64, data),
                    1 => (RecordKind::Zero, data.len() as u64 * 512, vec![]),
                    _ => (RecordKind::Resize, 0, vec![]),
                };
                Record {
                    header: RecordHeader {
                        kind,
                        unsynced,
                        seq,
                        generation,
                        offset,
                        length,
                        timestamp_ns: ts,
                        payload_len: payload.len() as u32,
                    },
                    payload: Bytes::from(payload),
                }
            })
    }

    fn encode(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&r.header, &r.payload, &mut out);
        out
    }

    proptest! {
        #[test]
        fn record_round_trips(r in arb_record()) {
            let bytes = encode(&r);
            let (back, used) = decode_record(&bytes).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, r);
        }

        #[test]
        fn any_single_bit_flip_is_detected(r in arb_record(), bit in any::<prop::sample::Index>()) {
            let mut bytes = encode(&r);
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            // A flip may make the record claim more bytes (Short) or be corrupt; never a valid record.
            prop_assert!(decode_record(&bytes).is_err());
        }

        #[test]
        fn any_truncation_is_incomplete_not_a_record(r in arb_record(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&r);
            let n = cut.index(bytes.len());
            let res = decode_record(&bytes[..n]);
            prop_assert!(matches!(res, Err(DecodeError::Short { .. })), "{:?}", res);
        }

        #[test]
        fn file_header_round_trips(file_seq in any::<u64>(), start_pos in any::<u64>(), first_seq in any::<u64>(), generation in any::<u64>()) {
            let h = FileHeader { file_seq, start_pos, first_seq, generation };
            prop_assert_eq!(FileHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn zeroed_space_is_named_as_such() {
        let err = decode_record_header(&[0u8; 64]).unwrap_err();
        assert!(err.to_string().contains("repeated byte 0x00"), "{err}");
    }
}
