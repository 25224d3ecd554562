//! The overlay: logged extents that are not yet written back to the backing
//! device, so that reads see every completed write. Pieces never overlap; a
//! newer write trims or replaces older pieces. Each piece remembers the log
//! position of the record it came from, so writeback removes exactly what it
//! wrote and nothing newer.

use std::collections::BTreeMap;

use bytes::Bytes;

#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    /// Log position of the record this data came from.
    pos: u64,
    /// `None` means zeroes (a discard or write-zeroes record).
    data: Option<Bytes>,
}

impl Piece {
    /// The part of this piece (which starts at `start`) from `from` to `to`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Piece {
        Piece {
            end: to,
            pos: self.pos,
            data: self
                .data
                .as_ref()
                .map(|d| d.slice((from - start) as usize..(to - start) as usize)),
        }
    }
}

/// A read result segment: `len` bytes at `offset` come from the overlay
/// (`Some(data)`, or `None` = zeroes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub offset: u64,
    pub len: u64,
    pub data: Option<Bytes>,
}

#[derive(Debug, Default)]
pub struct Overlay {
    pieces: BTreeMap<u64, Piece>,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Cuts existing pieces so that nothing overlaps `[start, end)`; returns
    /// the removed parts (with their starts).
    fn carve(&mut self, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let mut removed = Vec::new();
        // The piece that begins before `start` may reach into the range.
        if let Some((&s, p)) = self.pieces.range(..start).next_back()
            && p.end > start
        {
            let p = p.clone();
            self.pieces.insert(s, p.slice(s, s, start));
            if p.end > end {
                self.pieces.insert(end, p.slice(s, end, p.end));
            }
            removed.push((start, p.slice(s, start, p.end.min(end))));
        }
        let inside: Vec<u64> = self.pieces.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let p = self.pieces.remove(&s).expect("key just listed");
            if p.end > end {
                self.pieces.insert(end, p.slice(s, end, p.end));
                removed.push((s, p.slice(s, s, end)));
            } else {
                removed.push((s, p));
            }
        }
        removed
    }

    /// Records that `[offset, offset+len)` now holds `data` (or zeroes),
    /// written by the record at log position `pos`.
    pub fn insert(&mut self, offset: u64, len: u64, pos: u64, data: Option<Bytes>) {
        if len == 0 {
            return;
        }
        self.carve(offset, offset + len);
        self.pieces.insert(
            offset,
            Piece {
                end: offset + len,
                pos,
                data,
            },
        );
    }

    /// Forgets what the record at `pos` wrote to `[offset, offset+len)`, once
    /// it is on the backing device. Newer pieces stay.
    pub fn remove(&mut self, offset: u64, len: u64, pos: u64) {
        let end = offset + len;
        let removed = self.carve(offset, end);
        for (s, p) in removed {
            if p.pos != pos {
                self.pieces.insert(s, p);
            }
        }
    }

    /// What the overlay holds of `[offset, offset+len)`, in offset order.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Hit> {
        let end = offset + len;
        let mut hits = Vec::new();
        let first = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(_, p)| p.end > offset);
        for (&s, p) in first.into_iter().chain(self.pieces.range(offset..end)) {
            let from = s.max(offset);
            let to = p.end.min(end);
            let part = p.slice(s, from, to);
            hits.push(Hit {
                offset: from,
                len: to - from,
                data: part.data,
            });
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Applies the overlay to a base image, as a read would.
    fn read(o: &Overlay, base: &[u8]) -> Vec<u8> {
        let mut out = base.to_vec();
        for h in o.lookup(0, base.len() as u64) {
            let r = h.offset as usize..(h.offset + h.len) as usize;
            match h.data {
                Some(d) => out[r].copy_from_slice(&d),
                None => out[r].fill(0),
            }
        }
        out
    }

    #[test]
    fn newer_write_wins_over_older_overlap() {
        let mut o = Overlay::new();
        o.insert(0, 8, 1, Some(Bytes::from(vec![1u8; 8])));
        o.insert(2, 4, 2, Some(Bytes::from(vec![2u8; 4])));
        assert_eq!(read(&o, &[9u8; 10]), vec![1, 1, 2, 2, 2, 2, 1, 1, 9, 9]);
        o.remove(0, 8, 1);
        assert_eq!(read(&o, &[9u8; 10]), vec![9, 9, 2, 2, 2, 2, 9, 9, 9, 9]);
    }

    proptest! {
        /// Model: writes land in the overlay, writeback moves them (in log
        /// order) to the base; reads through the overlay always equal the
        /// model device with every write applied.
        #[test]
        fn reads_see_every_write_while_writeback_drains(
            ops in proptest::collection::vec((0u64..60, 1u64..20, any::<u8>(), any::<bool>()), 1..60),
            drain_every in 1usize..8,
        ) {
            let mut o = Overlay::new();
            let mut model = vec![0u8; 100];
            let mut base = vec![0u8; 100];
            let mut pending: std::collections::VecDeque<(u64, u64, u64, Option<Vec<u8>>)> = Default::default();
            for (i, (off, len, byte, zero)) in ops.into_iter().enumerate() {
                let pos = i as u64;
                let data = (!zero).then(|| vec![byte; len as usize]);
                o.insert(off, len, pos, data.clone().map(Bytes::from));
                let r = off as usize..(off + len) as usize;
                match &data { Some(d) => model[r].copy_from_slice(d), None => model[r].fill(0) }
                pending.push_back((off, len, pos, data));
                if i % drain_every == 0 {
                    let (off, len, pos, data) = pending.pop_front().unwrap();
                    let r = off as usize..(off + len) as usize;
                    match &data { Some(d) => base[r].copy_from_slice(d), None => base[r].fill(0) }
                    o.remove(off, len, pos);
                }
                prop_assert_eq!(read(&o, &base), model.clone());
            }
            while let Some((off, len, pos, data)) = pending.pop_front() {
                let r = off as usize..(off + len) as usize;
                match &data { Some(d) => base[r].copy_from_slice(d), None => base[r].fill(0) }
                o.remove(off, len, pos);
            }
            prop_assert!(o.is_empty());
            prop_assert_eq!(base, model);
        }
    }
}
