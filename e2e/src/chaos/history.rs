//! The oracle of the chaos campaign: every write and flush the workload
//! issued, stamped with one logical clock, and the checks that judge a
//! device image against them.
//!
//! # Blocks
//!
//! Every write is one 4 KiB block whose content names the write: a header
//! (magic, write id, block number, CRC32C of the rest) and bytes derived
//! from id and block. So a block read anywhere (a primary's NBD export, a
//! secondary's backing file) shows either zeros (never written) or exactly
//! one write to that very block; anything else is torn, misplaced or
//! foreign data.
//!
//! # The history
//!
//! A request's `sent` stamp is taken before its bytes go out, its `done`
//! stamp after the reply was read (under one lock, as in
//! `datapath/tests/crash.rs`), so `a.done < b.sent` means marsd logged `a`
//! before it received `b`. A request that failed (connection reset by a
//! kill or a handover) keeps `done = None`: it may or may not be in the
//! log. Each writer owns a disjoint set of blocks and has one request in
//! flight at a time, so the writes to one block are totally ordered: the
//! block's list in [`History`] is its order in the log.
//!
//! One lineage survives: a forced failover ([`History::fork`]) cuts every
//! block's list after what the new primary shows; the rest, and every later
//! write of the deposed primary's writers (an older epoch), is *divergent*
//! and must never appear on the new primary or a replica following it.
//!
//! # The checks
//!
//! * [`History::check_complete`] (invariant 1): after a planned handover, a
//!   restart of the primary's marsd or at the end, the primary's device
//!   holds every completed write (SIGKILL keeps the page cache, a handover
//!   ships the whole log; flushed and FUA writes are named as such).
//! * [`History::check_prefix`] (invariant 2): a replica's image equals the
//!   history applied up to some log position. With `T` the latest `sent`
//!   of a write the image shows, every write completed before `T` is in
//!   that prefix, so its block must show it or a later write to the block.
//!   (Real-time order is an interval order, so this closes transitively.)
//! * Both flag torn/foreign blocks and divergent writes (invariant 3).

use std::collections::BTreeMap;

pub use crate::tagged_block::{BLOCK, Shown, content as block_content, decode};

#[derive(Clone, Debug)]
pub struct WriteRec {
    pub block: u64,
    pub fua: bool,
    pub sent: u64,
    pub done: Option<u64>,
    /// The writer set's epoch (forced failovers start a new one).
    pub epoch: u32,
    /// Not in the surviving lineage (cut off by a forced failover).
    pub divergent: bool,
    /// The host the write was sent to.
    pub host: String,
}

#[derive(Clone, Debug)]
pub struct FlushRec {
    pub sent: u64,
    pub done: Option<u64>,
}

/// What [`History::fork`] cut off.
#[derive(Clone, Debug, Default)]
pub struct ForkReport {
    /// Writes of the old lineage that are not on the new primary.
    pub divergent: u64,
    /// Of these, completed ones: the deposed primary logged past the fork.
    pub divergent_completed: u64,
}

/// Every write and flush of a campaign (write id = index in `writes`).
#[derive(Debug)]
pub struct History {
    clock: u64,
    blocks: u64,
    pub writes: Vec<WriteRec>,
    pub flushes: Vec<FlushRec>,
    /// The surviving lineage per block, in log order (write ids).
    per_block: Vec<Vec<u64>>,
    epoch: u32,
    /// Violations found while the workload ran (reads).
    pub violations: Vec<String>,
    pub reads_verified: u64,
}

impl History {
    /// An empty history of a device of `blocks` 4 KiB blocks, all zeros.
    pub fn new(blocks: u64) -> History {
        History {
            clock: 0,
            blocks,
            writes: Vec::new(),
            flushes: Vec::new(),
            per_block: vec![Vec::new(); blocks as usize],
            epoch: 0,
            violations: Vec::new(),
            reads_verified: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The current epoch (writers of older ones write divergent data).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Records a write about to be sent; returns its id.
    pub fn send_write(&mut self, block: u64, fua: bool, epoch: u32, host: &str) -> u64 {
        let id = self.writes.len() as u64;
        let sent = self.tick();
        let divergent = epoch < self.epoch;
        self.writes.push(WriteRec {
            block,
            fua,
            sent,
            done: None,
            epoch,
            divergent,
            host: host.to_string(),
        });
        if !divergent {
            self.per_block[block as usize].push(id);
        }
        id
    }

    pub fn complete_write(&mut self, id: u64) {
        let now = self.tick();
        self.writes[id as usize].done = Some(now);
    }

    pub fn send_flush(&mut self) -> usize {
        let sent = self.tick();
        self.flushes.push(FlushRec { sent, done: None });
        self.flushes.len() - 1
    }

    pub fn complete_flush(&mut self, i: usize) {
        let now = self.tick();
        self.flushes[i].done = Some(now);
    }

    /// Completed writes and flushes so far.
    pub fn completed(&self) -> (u64, u64) {
        (
            self.writes.iter().filter(|w| w.done.is_some()).count() as u64,
            self.flushes.iter().filter(|f| f.done.is_some()).count() as u64,
        )
    }

    /// What block `b` may show on the primary now: the last completed write
    /// of the surviving lineage and every later one (not completed: in
    /// flight, or failed with unknown outcome); zeros if none completed.
    pub fn acceptable(&self, b: u64) -> Vec<Shown> {
        let list = &self.per_block[b as usize];
        let last_done = list
            .iter()
            .rposition(|&id| self.writes[id as usize].done.is_some());
        let mut ok: Vec<Shown> = match last_done {
            Some(i) => list[i..].iter().map(|&id| Shown::Write(id)).collect(),
            None => list.iter().map(|&id| Shown::Write(id)).collect(),
        };
        if last_done.is_none() {
            ok.insert(0, Shown::Zero);
        }
        ok
    }

    /// Why write `id` had to be kept: durable (FUA, or completed before a
    /// completed FLUSH was sent) or merely completed.
    fn promise(&self, id: u64) -> &'static str {
        let w = &self.writes[id as usize];
        let Some(done) = w.done else {
            return "write in flight";
        };
        if w.fua {
            "durable (FUA) write"
        } else if self
            .flushes
            .iter()
            .any(|f| f.done.is_some() && f.sent > done)
        {
            "durable (flushed) write"
        } else {
            "completed write"
        }
    }

    /// Decodes every block of `image` and checks that each is zeros or a
    /// write of the surviving lineage to that block; returns the positions
    /// in the blocks' lists (`None`: zeros) and the violations.
    fn positions(&self, image: &[u8], what: &str) -> (Vec<Option<usize>>, Vec<String>) {
        let mut pos = Vec::with_capacity(self.blocks as usize);
        let mut v = Vec::new();
        for (b, chunk) in image.chunks(BLOCK).enumerate().take(self.blocks as usize) {
            let b64 = b as u64;
            match decode(chunk, b64) {
                Shown::Zero => pos.push(None),
                Shown::Bad(why) => {
                    v.push(format!("(a) {what}: block {b} holds no write to it: {why}"));
                    pos.push(None);
                }
                Shown::Write(id) => {
                    let Some(w) = self.writes.get(id as usize) else {
                        v.push(format!(
                            "(a) {what}: block {b} holds write {id}, which was never sent"
                        ));
                        pos.push(None);
                        continue;
                    };
                    if w.divergent {
                        v.push(format!(
                            "(3) {what}: block {b} holds write {id}, written on {} in epoch {} and not in the surviving history (a deposed primary's divergent tail, or a deleted incarnation of the resource)",
                            w.host, w.epoch
                        ));
                        pos.push(None);
                        continue;
                    }
                    let p = self.per_block[b]
                        .iter()
                        .position(|&x| x == id)
                        .expect("a surviving write is in its block's list");
                    pos.push(Some(p));
                }
            }
        }
        if image.len() < self.blocks as usize * BLOCK {
            v.push(format!(
                "(a) {what}: image of {} bytes, expected {}",
                image.len(),
                self.blocks as usize * BLOCK
            ));
        }
        (pos, v)
    }

    /// Invariant 1: `image` (a primary's device) holds every completed write.
    pub fn check_complete(&self, image: &[u8], what: &str) -> Vec<String> {
        let (pos, mut v) = self.positions(image, what);
        for (b, p) in pos.iter().enumerate() {
            let list = &self.per_block[b];
            let Some(last) = list
                .iter()
                .rposition(|&id| self.writes[id as usize].done.is_some())
            else {
                continue;
            };
            if p.is_none_or(|p| p < last) {
                let id = list[last];
                let w = &self.writes[id as usize];
                v.push(format!(
                    "(1) {what}: {} {id} to block {b} (on {}, sent t={}, done t={}) is lost: the block shows {}",
                    self.promise(id),
                    w.host,
                    w.sent,
                    w.done.unwrap_or(0),
                    p.map_or("zeros".to_string(), |p| format!("the older write {}", list[p]))
                ));
            }
        }
        v
    }

    /// Invariant 2: `image` is the history applied up to some log
    /// position. Returns `T` (the latest `sent` of a shown write, 0 for
    /// none) or the violations.
    pub fn check_prefix(&self, image: &[u8], what: &str) -> Result<u64, Vec<String>> {
        let (pos, mut v) = self.positions(image, what);
        // The shown write sent last, and when.
        let latest = pos
            .iter()
            .enumerate()
            .filter_map(|(b, p)| p.map(|p| self.per_block[b][p]))
            .max_by_key(|&id| self.writes[id as usize].sent);
        let t = latest.map_or(0, |id| self.writes[id as usize].sent);
        for (b, p) in pos.iter().enumerate() {
            let list = &self.per_block[b];
            // The last write to b that completed before `t`: it is in the prefix.
            let Some(need) = list
                .iter()
                .rposition(|&id| self.writes[id as usize].done.is_some_and(|d| d < t))
            else {
                continue;
            };
            if p.is_none_or(|p| p < need) {
                let id = list[need];
                let w = &self.writes[id as usize];
                let l = latest.expect("t > 0 means a write is shown");
                v.push(format!(
                    "(2) {what} is no prefix of the history: it shows write {l} (to block {}, sent t={t}), \
                     so write {id} to block {b} (done t={}) must be there, but the block shows {}",
                    self.writes[l as usize].block,
                    w.done.unwrap_or(0),
                    p.map_or("zeros".to_string(), |p| format!("the older write {}", list[p]))
                ));
            }
            if v.len() > 20 {
                break;
            }
        }
        if v.is_empty() { Ok(t) } else { Err(v) }
    }

    /// A forced failover: `image` is the new primary's device as it took
    /// over. Checks it is a prefix, cuts every block's list after what it
    /// shows and starts a new epoch.
    pub fn fork(&mut self, image: &[u8], what: &str) -> (ForkReport, Vec<String>) {
        let violations = self.check_prefix(image, what).err().unwrap_or_default();
        let (pos, _) = self.positions(image, what);
        let mut r = ForkReport::default();
        for (b, p) in pos.iter().enumerate() {
            let keep = p.map_or(0, |p| p + 1);
            let cut: Vec<u64> = self.per_block[b].drain(keep..).collect();
            for id in cut {
                let w = &mut self.writes[id as usize];
                w.divergent = true;
                r.divergent += 1;
                r.divergent_completed += u64::from(w.done.is_some());
            }
        }
        self.epoch += 1;
        (r, violations)
    }

    /// Writes per epoch and host, for the report.
    pub fn summary(&self) -> String {
        let mut by: BTreeMap<(u32, &str), (u64, u64)> = BTreeMap::new();
        for w in &self.writes {
            let e = by.entry((w.epoch, w.host.as_str())).or_default();
            e.0 += 1;
            e.1 += u64::from(w.done.is_some());
        }
        let (w, f) = self.completed();
        let parts: Vec<String> = by
            .iter()
            .map(|((e, h), (s, d))| format!("epoch {e} on {h}: {d}/{s}"))
            .collect();
        let divergent = self.writes.iter().filter(|w| w.divergent).count();
        format!(
            "{w} writes and {f} flushes completed ({} sent, {divergent} divergent; {}), {} reads verified",
            self.writes.len(),
            parts.join(", "),
            self.reads_verified
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image with the given (block, write id) pairs, zeros elsewhere.
    fn image(h: &History, shown: &[(u64, u64)]) -> Vec<u8> {
        let mut img = vec![0u8; h.blocks() as usize * BLOCK];
        for &(b, id) in shown {
            let at = b as usize * BLOCK;
            img[at..at + BLOCK].copy_from_slice(&block_content(id, b));
        }
        img
    }

    /// Sends and completes a write; returns its id.
    fn write(h: &mut History, block: u64) -> u64 {
        let id = h.send_write(block, false, h.epoch(), "a");
        h.complete_write(id);
        id
    }

    #[test]
    fn blocks_name_their_write_and_damage_is_seen() {
        let b = block_content(7, 3);
        assert_eq!(decode(&b, 3), Shown::Write(7));
        assert!(matches!(decode(&b, 4), Shown::Bad(w) if w.contains("misplaced")));
        let mut torn = b.clone();
        torn[2000] ^= 1;
        assert!(matches!(decode(&torn, 3), Shown::Bad(w) if w.contains("torn")));
        assert_eq!(decode(&[0u8; BLOCK], 3), Shown::Zero);
    }

    #[test]
    fn a_device_with_every_completed_write_passes_and_a_lost_write_fails() {
        let mut h = History::new(4);
        let w0 = write(&mut h, 0);
        let w1 = write(&mut h, 1);
        let w2 = write(&mut h, 0);
        let f = h.send_flush();
        h.complete_flush(f);
        assert!(
            h.check_complete(&image(&h, &[(0, w2), (1, w1)]), "ok")
                .is_empty()
        );
        // Block 0 lost the flushed write w2.
        let v = h.check_complete(&image(&h, &[(0, w0), (1, w1)]), "lost");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("(1)") && v[0].contains("durable (flushed) write"),
            "{v:?}"
        );
        // Block 1 lost w1 entirely.
        let v = h.check_complete(&image(&h, &[(0, w2)]), "zeros");
        assert!(v.iter().any(|x| x.contains("block 1")), "{v:?}");
    }

    #[test]
    fn a_write_in_flight_may_or_may_not_be_there() {
        let mut h = History::new(2);
        let w0 = write(&mut h, 0);
        let w1 = h.send_write(0, true, 0, "a"); // never completed
        assert!(
            h.check_complete(&image(&h, &[(0, w0)]), "without")
                .is_empty()
        );
        assert!(h.check_complete(&image(&h, &[(0, w1)]), "with").is_empty());
        assert_eq!(h.acceptable(0), vec![Shown::Write(w0), Shown::Write(w1)]);
        assert_eq!(h.acceptable(1), vec![Shown::Zero]);
    }

    #[test]
    fn every_prefix_passes_and_a_gap_is_no_prefix() {
        let mut h = History::new(3);
        let ids: Vec<u64> = (0..9).map(|i| write(&mut h, i % 3)).collect();
        // Every prefix 0..=k applied.
        for k in 0..ids.len() {
            let mut last = BTreeMap::new();
            for &id in &ids[..=k] {
                last.insert(h.writes[id as usize].block, id);
            }
            let shown: Vec<(u64, u64)> = last.into_iter().collect();
            let t = h.check_prefix(&image(&h, &shown), "prefix").unwrap();
            assert_eq!(t, h.writes[ids[k] as usize].sent);
        }
        assert_eq!(h.check_prefix(&image(&h, &[]), "empty").unwrap(), 0);
        // Write 7 (block 1) applied, but write 5 (block 2), completed before
        // 7 was sent, is missing: block 2 shows write 2.
        let v = h
            .check_prefix(&image(&h, &[(0, 6), (1, 7), (2, 2)]), "gap")
            .unwrap_err();
        assert!(
            v[0].contains("(2)") && v[0].contains("write 5 to block 2"),
            "{v:?}"
        );
        // Block 2 never written although writes 0..=7 applied elsewhere.
        assert!(
            h.check_prefix(&image(&h, &[(0, 6), (1, 7)]), "zeros")
                .is_err()
        );
    }

    #[test]
    fn concurrent_writes_may_be_applied_in_either_order() {
        let mut h = History::new(2);
        let a = h.send_write(0, false, 0, "a");
        let b = h.send_write(1, false, 0, "a");
        h.complete_write(b);
        h.complete_write(a);
        // Either one alone is a prefix: they overlapped in time.
        assert!(h.check_prefix(&image(&h, &[(0, a)]), "a only").is_ok());
        assert!(h.check_prefix(&image(&h, &[(1, b)]), "b only").is_ok());
        let c = write(&mut h, 0);
        // c was sent after both completed: both must be there.
        assert!(
            h.check_prefix(&image(&h, &[(0, c)]), "c without b")
                .is_err()
        );
        assert!(h.check_prefix(&image(&h, &[(0, c), (1, b)]), "c").is_ok());
    }

    #[test]
    fn foreign_and_torn_blocks_fail_both_checks() {
        let mut h = History::new(2);
        let w = write(&mut h, 0);
        let mut img = image(&h, &[(0, w)]);
        img[BLOCK + 5] = 1;
        assert!(h.check_prefix(&img, "junk").is_err());
        assert!(!h.check_complete(&img, "junk").is_empty());
        // A write that was never sent.
        let img = image(&h, &[(0, w), (1, 99)]);
        assert!(h.check_prefix(&img, "unsent").is_err());
    }

    #[test]
    fn after_a_fork_the_divergent_tail_must_not_appear() {
        let mut h = History::new(2);
        let a = write(&mut h, 0);
        let b = write(&mut h, 0); // the new primary never got this one
        let c = write(&mut h, 1);
        let fork_image = image(&h, &[(0, a)]);
        let (r, v) = h.fork(&fork_image, "new primary");
        assert!(v.is_empty(), "{v:?}");
        assert_eq!((r.divergent, r.divergent_completed), (2, 2));
        // The deposed primary's writers keep going in the old epoch.
        let d = h.send_write(1, false, 0, "a");
        h.complete_write(d);
        let e = h.send_write(1, false, 1, "b");
        h.complete_write(e);
        assert!(
            h.check_complete(&image(&h, &[(0, a), (1, e)]), "ok")
                .is_empty()
        );
        for (blk, bad) in [(0, b), (1, c), (1, d)] {
            let img = image(&h, &[(0, a), (blk, bad)]);
            let v = h.check_complete(&img, "new primary");
            assert!(v.iter().any(|x| x.starts_with("(3)")), "{bad}: {v:?}");
            assert!(h.check_prefix(&img, "replica").is_err());
        }
    }

    #[test]
    fn a_fork_from_a_non_prefix_is_reported() {
        let mut h = History::new(2);
        let _a = write(&mut h, 1);
        let b = write(&mut h, 0);
        let (_, v) = h.fork(&image(&h, &[(0, b)]), "new primary");
        assert!(!v.is_empty());
    }
}
