//! Self-describing test blocks. Each 4 KiB block a test writes carries a
//! magic, its write id, its block number and a CRC32C of the rest, and the
//! rest is derived from id and block. A checker can then tell exactly which
//! write a block holds, or that it is torn, misplaced or foreign. Shared by
//! the crash and power-loss tests and by the chaos campaign (`e2e` includes
//! this file by `#[path]`).

pub const BLOCK: usize = 4096;
const MAGIC: u64 = 0x6b63_6f6c_6273_726d; // "mrsblock"

/// The content of write `id` to `block`.
pub fn content(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&id.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.rotate_left(32);
    for chunk in b[32..].chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[32..]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// (write id, block) named by a block's header, after checking that the
/// whole block is exactly that write's content; else what it is.
pub fn decode_any(b: &[u8]) -> Result<(u64, u64), String> {
    if b.iter().all(|&x| x == 0) {
        return Err("all zeroes".into());
    }
    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    if b.len() != BLOCK || word(0..8) != MAGIC {
        return Err(format!(
            "no write header (first bytes {:02x?})",
            &b[..16.min(b.len())]
        ));
    }
    let (id, block) = (word(8..16), word(16..24));
    let crc = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[32..]) != crc {
        return Err(format!("torn: write {id} (to block {block}) fails its CRC"));
    }
    if b != content(id, block).as_slice() {
        return Err(format!(
            "write {id} (to block {block}) has the right CRC but wrong bytes"
        ));
    }
    Ok((id, block))
}

/// What one block of an image holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shown {
    /// All zeros: never written.
    Zero,
    /// Exactly the content of this write (to this block).
    Write(u64),
    /// Anything else, and why.
    Bad(String),
}

impl Shown {
    pub fn describe(&self) -> String {
        match self {
            Shown::Zero => "zeros".into(),
            Shown::Write(id) => format!("write {id}"),
            Shown::Bad(why) => why.clone(),
        }
    }
}

/// Decodes block number `block` of an image.
pub fn decode(b: &[u8], block: u64) -> Shown {
    if b.iter().all(|&x| x == 0) {
        return Shown::Zero;
    }
    match decode_any(b) {
        Ok((id, to)) if to == block => Shown::Write(id),
        Ok((id, to)) => Shown::Bad(format!("misplaced: write {id} belongs to block {to}")),
        Err(why) => Shown::Bad(why),
    }
}
