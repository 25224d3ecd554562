//! Checks on device contents: equality with a readable summary of the
//! differences, and the prefix checker of the numbered writes.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::workload::{BLOCK, NUMBERED_MAGIC, numbered_block};

/// The first `len` bytes of `path` (zeros past its end, like a sparse
/// image that was never written there).
pub fn read_file(path: &Path, len: u64) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::with_capacity(len as usize);
    (&mut f)
        .take(len)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    buf.resize(len as usize, 0);
    Ok(buf)
}

/// `None` if equal, else how they differ: the number of differing 4 KiB
/// blocks and the first few offsets.
pub fn differences(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected == actual {
        return None;
    }
    if expected.len() != actual.len() {
        return Some(format!(
            "lengths differ: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        ));
    }
    let bad: Vec<usize> = expected
        .chunks(BLOCK as usize)
        .zip(actual.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let first: Vec<String> = bad
        .iter()
        .take(8)
        .map(|b| format!("{:#x}", *b as u64 * BLOCK))
        .collect();
    Some(format!(
        "{} of {} 4 KiB blocks differ; first at offsets {}",
        bad.len(),
        expected.len() / BLOCK as usize,
        first.join(", ")
    ))
}

/// Fails with `what` and the differences unless equal.
pub fn same(what: &str, expected: &[u8], actual: &[u8]) -> Result<()> {
    match differences(expected, actual) {
        None => Ok(()),
        Some(d) => bail!("{what}: {d}"),
    }
}

/// Which numbered write block `b` of a snapshot holds (`None`: never
/// written, all zeros); fails if the block is neither zeros nor exactly
/// one numbered write for this block.
fn number_in(block: &[u8], b: u64, k: u64) -> Result<Option<u64>> {
    if block.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if &block[..8] != NUMBERED_MAGIC {
        bail!("block {b} is neither zeros nor a numbered write (torn or foreign data)");
    }
    let i = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes"));
    if i % k != b {
        bail!(
            "block {b} holds write {i}, which belongs to block {}",
            i % k
        );
    }
    if block != numbered_block(i).as_slice() {
        bail!("block {b} has the header of write {i} but not its content (torn)");
    }
    Ok(Some(i))
}

/// The `j` for which `snapshot` (the first `k` blocks of a device) is
/// exactly "numbered writes 0..=j applied, nothing after" (`None`: no
/// write applied), or why it is no such prefix.
pub fn numbered_prefix(snapshot: &[u8], k: u64) -> Result<Option<u64>> {
    let mut held = Vec::with_capacity(k as usize);
    for (b, block) in snapshot.chunks(BLOCK as usize).take(k as usize).enumerate() {
        held.push(number_in(block, b as u64, k)?);
    }
    let Some(j) = held.iter().flatten().copied().max() else {
        return Ok(None);
    };
    for (b, have) in held.iter().enumerate() {
        let b = b as u64;
        // The last write to block b among 0..=j.
        let want = (b <= j).then(|| b + k * ((j - b) / k));
        if *have != want {
            let show = |x: &Option<u64>| x.map_or("nothing".to_string(), |i| format!("write {i}"));
            bail!(
                "not a prefix: write {j} is applied, so block {b} must hold {}, but it holds {}",
                show(&want),
                show(have)
            );
        }
    }
    Ok(Some(j))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(k: u64, writes: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut s = vec![0u8; (k * BLOCK) as usize];
        for i in writes {
            let at = ((i % k) * BLOCK) as usize;
            s[at..at + BLOCK as usize].copy_from_slice(&numbered_block(i));
        }
        s
    }

    #[test]
    fn every_prefix_is_recognised_with_its_length() {
        let k = 8;
        assert_eq!(numbered_prefix(&snapshot(k, []), k).unwrap(), None);
        for j in 0..30 {
            assert_eq!(numbered_prefix(&snapshot(k, 0..=j), k).unwrap(), Some(j));
        }
    }

    #[test]
    fn a_gap_in_the_applied_writes_is_not_a_prefix() {
        let k = 8;
        // 0..=20 except write 13 (block 5 keeps write 5).
        let s = snapshot(k, (0..=20).filter(|&i| i != 13));
        let e = numbered_prefix(&s, k).unwrap_err().to_string();
        assert!(e.contains("block 5 must hold write 13"), "{e}");
        // A later write applied before an earlier one, in a fresh region.
        let s = snapshot(k, [0, 1, 3]);
        assert!(numbered_prefix(&s, k).is_err());
    }

    #[test]
    fn a_torn_block_is_not_a_prefix() {
        let k = 4;
        let mut s = snapshot(k, 0..=9);
        s[(BLOCK + 100) as usize] ^= 1;
        assert!(
            numbered_prefix(&s, k)
                .unwrap_err()
                .to_string()
                .contains("torn")
        );
    }

    #[test]
    fn differences_name_the_first_blocks() {
        let a = vec![0u8; 4 * BLOCK as usize];
        let mut b = a.clone();
        b[(2 * BLOCK + 7) as usize] = 1;
        assert_eq!(differences(&a, &a), None);
        let d = differences(&a, &b).unwrap();
        assert!(
            d.starts_with("1 of 4 4 KiB blocks differ; first at offsets 0x2000"),
            "{d}"
        );
    }
}
