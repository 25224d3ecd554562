//! The lineage of a log: which histories its records came from, oldest
//! first. A history (an epoch here) is a primary period: a generation, the
//! node that started it and the log position where it took over. The
//! logfile headers say the same, but logfiles are deleted once written
//! back, and a remote device that was away during two failovers must still
//! learn where the current history left the one its writes were
//! acknowledged in (`frontend::remote`). So the lineage is kept in a small
//! file of its own, updated whenever a logfile of another history begins.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::Storage;

/// File in the log directory holding the lineage.
pub const LINEAGE_FILE: &str = "lineage.json";

/// At most this many epochs are kept (the oldest go first). Each is a
/// primary change, so this covers years of handovers; a device whose
/// history is older than what is kept cannot be vouched for.
const KEEP: usize = 1024;

/// One history of a log: records from `start_pos` on (up to the next
/// epoch's start) were written by `origin` in `generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    pub generation: u64,
    pub origin: String,
    pub start_pos: u64,
}

impl Epoch {
    fn same_history(&self, other: &Epoch) -> bool {
        self.generation == other.generation && self.origin == other.origin
    }
}

/// The epochs of one log, in log order; starts increase strictly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    epochs: Vec<Epoch>,
}

impl Lineage {
    pub fn new(epochs: Vec<Epoch>) -> Lineage {
        let mut l = Lineage::default();
        for e in epochs {
            l.note(e);
        }
        l
    }

    pub fn epochs(&self) -> &[Epoch] {
        &self.epochs
    }

    /// A logfile of history `e` begins at `e.start_pos`: it replaces every
    /// epoch that started there or later (a log cut back to a fork goes on
    /// in another history) and starts a new epoch unless it continues the
    /// last one (a rotation). Returns whether anything changed.
    pub fn note(&mut self, e: Epoch) -> bool {
        let before = self.epochs.clone();
        self.epochs.retain(|x| x.start_pos < e.start_pos);
        if self.epochs.last().is_none_or(|last| !last.same_history(&e)) {
            self.epochs.push(e);
        }
        if self.epochs.len() > KEEP {
            self.epochs.drain(..self.epochs.len() - KEEP);
        }
        self.epochs != before
    }

    /// The log was cut back to `pos`: epochs that started at or after it
    /// hold no record any more. Returns whether anything changed.
    pub fn cut(&mut self, pos: u64) -> bool {
        let before = self.epochs.len();
        self.epochs.retain(|x| x.start_pos < pos);
        self.epochs.len() != before
    }

    /// Drops the epochs `keep` says no to (recovery: epochs whose logfile
    /// a crash took).
    pub fn cut_unless(&mut self, keep: impl Fn(&Epoch) -> bool) {
        self.epochs.retain(keep);
    }

    /// Where this lineage leaves history `(generation, origin)`: `Ok(None)`
    /// if it is the newest epoch (never left), `Ok(Some(pos))` the start of
    /// the epoch that followed it. `Err` if the history is not in the
    /// lineage at all (a divergent history, or older than what is kept).
    pub fn leaves(&self, generation: u64, origin: &str) -> Result<Option<u64>, NotInLineage> {
        let i = self
            .epochs
            .iter()
            .rposition(|e| e.generation == generation && e.origin == origin)
            .ok_or(NotInLineage)?;
        Ok(self.epochs.get(i + 1).map(|next| next.start_pos))
    }

    /// Loads the lineage of the log in `dir`; `None` if it was never
    /// written (a log from before lineages were kept).
    pub fn load(storage: &dyn Storage, dir: &Path) -> super::Result<Option<Lineage>> {
        let path = dir.join(LINEAGE_FILE);
        if !storage.exists(&path) {
            return Ok(None);
        }
        let bytes = storage.read_file(&path).map_err(super::Error::io(&path))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| super::Error::Corruption {
                path,
                offset: 0,
                what: format!("not a lineage: {e}"),
            })
    }

    /// Persists (atomically) the lineage of the log in `dir`.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> super::Result<()> {
        let path = dir.join(LINEAGE_FILE);
        let bytes = serde_json::to_vec(self).expect("a lineage serializes");
        storage
            .write_atomic(&path, &bytes)
            .map_err(super::Error::io(&path))
    }
}

/// A history that a lineage does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotInLineage;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(generation: u64, origin: &str, start_pos: u64) -> Epoch {
        Epoch {
            generation,
            origin: origin.into(),
            start_pos,
        }
    }

    #[test]
    fn rotations_continue_an_epoch_and_a_new_primary_starts_one() {
        let mut l = Lineage::default();
        assert!(l.note(e(1, "a", 0)));
        assert!(!l.note(e(1, "a", 4096)), "a rotation");
        assert!(l.note(e(2, "b", 9000)));
        assert!(!l.note(e(2, "b", 9000)), "the same file again");
        assert_eq!(l.epochs(), &[e(1, "a", 0), e(2, "b", 9000)]);
        assert_eq!(l.leaves(1, "a"), Ok(Some(9000)));
        assert_eq!(l.leaves(2, "b"), Ok(None));
        assert_eq!(
            l.leaves(2, "c"),
            Err(NotInLineage),
            "same generation, other node"
        );
    }

    #[test]
    fn a_log_cut_back_to_a_fork_goes_on_in_the_other_history() {
        let mut l = Lineage::new(vec![e(1, "a", 0), e(2, "b", 100)]);
        // c forced generation 2 at 50, before b's epoch began here: b's
        // records are cut off and c's file begins at 50.
        assert!(l.note(e(2, "c", 50)));
        assert_eq!(l.epochs(), &[e(1, "a", 0), e(2, "c", 50)]);
        assert!(l.cut(50));
        assert_eq!(l.epochs(), &[e(1, "a", 0)]);
        assert!(!l.cut(50));
    }

    #[test]
    fn only_the_newest_epochs_are_kept() {
        let mut l = Lineage::default();
        for g in 0..(KEEP as u64 + 10) {
            l.note(e(g, "a", g * 10));
        }
        assert_eq!(l.epochs().len(), KEEP);
        assert_eq!(l.epochs()[0], e(10, "a", 100));
        assert_eq!(l.leaves(3, "a"), Err(NotInLineage));
    }

    proptest! {
        /// Whatever the order of notes and cuts: starts increase strictly,
        /// no two neighbours are the same history, and the last note is the
        /// newest epoch.
        #[test]
        fn epochs_stay_ordered(ops in proptest::collection::vec((0u64..4, 0u8..3, 0u64..50, any::<bool>()), 1..60)) {
            let mut l = Lineage::default();
            for (g, o, pos, cut) in ops {
                let origin = ["a", "b", "c"][o as usize];
                if cut {
                    l.cut(pos);
                } else {
                    l.note(e(g, origin, pos));
                    let last = l.epochs().last().unwrap();
                    prop_assert!(last.generation == g && last.origin == origin);
                }
                for w in l.epochs().windows(2) {
                    prop_assert!(w[0].start_pos < w[1].start_pos);
                    prop_assert!(!w[0].same_history(&w[1]));
                }
            }
        }
    }
}
