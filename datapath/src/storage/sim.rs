//! A simulated disk for power-loss tests.
//!
//! A process kill keeps the page cache, so it never tests durability. This
//! in-memory [`Storage`] remembers which writes a completed sync covers and,
//! at a simulated power loss ([`SimStorage::crash`]), builds the disk a
//! machine would find on reboot:
//!
//! * file contents: what the last completed `sync_data` of each file
//!   covered; every later write, zeroing or resize is dropped
//!   ([`CrashMode::DropUnsynced`]) or, like a disk with a volatile cache that
//!   reorders and tears, each one is kept, dropped or kept only in some of
//!   its 512-byte sectors ([`CrashMode::Torn`]);
//! * names: strict POSIX. A file or directory created, renamed or removed
//!   is durable only once its parent directory was synced (`sync_dir`);
//!   until then the crash image shows the name as it was at the last sync.
//!
//! Faults ([`Faults`]) make a fraction of reads, writes and syncs fail with
//! EIO, or silently flip a bit in what a read returns (which the log's
//! checksums must catch). Every random choice comes from the disk's own
//! seeded generator, so one seed gives one sequence of choices for one
//! sequence of operations.
//!
//! The crash image is an independent disk: the "crashed" process may keep
//! running against the old one without touching the image.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{File, OpenMode, Storage};

/// Sector size of the simulated disk: the unit a torn write is cut into.
pub const SECTOR: usize = 512;

/// What happens to writes no completed sync covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write, zeroing and resize is lost.
    DropUnsynced,
    /// Each unsynced operation is independently kept, lost, or (writes)
    /// kept in a random subset of its sectors.
    Torn,
}

/// Fault probabilities, each in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// A read fails with EIO.
    pub read_eio: f64,
    /// A read returns its bytes with one bit flipped (silent corruption).
    pub read_bitflip: f64,
    /// A write fails with EIO (nothing is written).
    pub write_eio: f64,
    /// A sync fails with EIO (nothing becomes durable).
    pub sync_eio: f64,
}

/// How many faults of each kind a disk has injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub read_eio: u64,
    pub read_bitflip: u64,
    pub write_eio: u64,
    pub sync_eio: u64,
}

/// An unsynced change to a file, replayed or dropped at a crash.
#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What reads return now.
    live: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Changes since the last completed sync, oldest first.
    unsynced: Vec<Change>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A directory, with an identity of its own so that a renamed
    /// directory keeps its (durable) content.
    Dir(u64),
    File(u64),
}

impl Entry {
    fn is_dir(self) -> bool {
        matches!(self, Entry::Dir(_))
    }
}

#[derive(Debug)]
struct Disk {
    inodes: HashMap<u64, Inode>,
    /// The names as the running system sees them.
    live: BTreeMap<PathBuf, Entry>,
    /// The names that survive a crash.
    durable: BTreeMap<PathBuf, Entry>,
    next_ino: u64,
    rng: StdRng,
    faults: Faults,
    injected: Injected,
    /// Mutating operations so far (writes, zeroings, resizes, syncs and
    /// name changes): the crash points a test can count.
    ops: u64,
    /// Total size limit of all live files, if any (a full disk).
    capacity: Option<u64>,
    /// The operation count at which the power goes: every mutating
    /// operation from there on fails and changes nothing.
    power_off_at: Option<u64>,
}

/// The simulated disk. Cloning gives another handle to the same disk.
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
}

struct SimFile {
    disk: Arc<Mutex<Disk>>,
    ino: u64,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO on {what}"))
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

/// `path` without `.` components and trailing slashes; `..` is refused by
/// the callers' paths anyway (they are built with `join`).
fn normal(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn apply(data: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, data: d } => {
            let end = *offset as usize + d.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(d);
        }
        Change::Zero { offset, len } => {
            let start = (*offset as usize).min(data.len());
            let end = (*offset as usize + *len as usize).min(data.len());
            data[start..end].fill(0);
        }
        Change::SetLen(len) => data.resize(*len as usize, 0),
    }
}

impl Disk {
    /// Counts one mutating operation, or refuses it once the power is off.
    fn tick(&mut self) -> io::Result<()> {
        if self.power_off_at.is_some_and(|at| self.ops >= at) {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        self.ops += 1;
        Ok(())
    }

    fn roll(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }

    /// Rolls for a fault of probability `p`, counting it if it happens.
    fn inject(&mut self, p: f64, kind: fn(&mut Injected) -> &mut u64) -> bool {
        let hit = self.roll(p);
        if hit {
            *kind(&mut self.injected) += 1;
        }
        hit
    }

    fn used(&self) -> u64 {
        let live_inodes: std::collections::HashSet<u64> = self
            .live
            .values()
            .filter_map(|e| match e {
                Entry::File(ino) => Some(*ino),
                Entry::Dir(_) => None,
            })
            .collect();
        live_inodes
            .iter()
            .map(|ino| self.inodes[ino].live.len() as u64)
            .sum()
    }

    /// ENOSPC if growing a file by `grow` bytes would pass the capacity.
    fn check_space(&self, grow: u64) -> io::Result<()> {
        match self.capacity {
            Some(cap) if grow > 0 && self.used() + grow > cap => {
                Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
            }
            _ => Ok(()),
        }
    }

    fn parent_is_dir(&self, path: &Path) -> bool {
        match path.parent() {
            None => true,
            Some(p) if p.as_os_str().is_empty() => true,
            Some(p) => self.live.get(p).is_some_and(|e| e.is_dir()),
        }
    }

    fn durable_image(&mut self, mode: CrashMode) -> Disk {
        let mut inodes = HashMap::new();
        let referenced: Vec<u64> = self
            .durable
            .values()
            .filter_map(|e| match e {
                Entry::File(ino) => Some(*ino),
                Entry::Dir(_) => None,
            })
            .collect();
        for ino in referenced {
            let inode = &self.inodes[&ino];
            let mut data = inode.durable.clone();
            let unsynced = inode.unsynced.clone();
            for change in &unsynced {
                match mode {
                    CrashMode::DropUnsynced => {}
                    CrashMode::Torn => match self.rng.random_range(0..3) {
                        0 => {}
                        1 => apply(&mut data, change),
                        _ => match change {
                            Change::Write { offset, data: d } => {
                                // Keep a random subset of the sectors the write touches.
                                let mut at = 0usize;
                                while at < d.len() {
                                    let sector_end = ((*offset as usize + at) / SECTOR + 1)
                                        * SECTOR
                                        - *offset as usize;
                                    let end = sector_end.min(d.len());
                                    if self.rng.random::<bool>() {
                                        apply(
                                            &mut data,
                                            &Change::Write {
                                                offset: offset + at as u64,
                                                data: d[at..end].to_vec(),
                                            },
                                        );
                                    }
                                    at = end;
                                }
                            }
                            other => apply(&mut data, other),
                        },
                    },
                }
            }
            inodes.insert(
                ino,
                Inode {
                    live: data.clone(),
                    durable: data,
                    unsynced: Vec::new(),
                },
            );
        }
        Disk {
            inodes,
            live: self.durable.clone(),
            durable: self.durable.clone(),
            next_ino: self.next_ino,
            rng: StdRng::seed_from_u64(self.rng.random()),
            faults: Faults::default(),
            injected: Injected::default(),
            ops: 0,
            capacity: self.capacity,
            power_off_at: None,
        }
    }
}

impl SimStorage {
    /// An empty disk holding only the directory `/`, durable.
    pub fn new(seed: u64) -> SimStorage {
        let mut root = BTreeMap::new();
        root.insert(PathBuf::from("/"), Entry::Dir(0));
        SimStorage {
            disk: Arc::new(Mutex::new(Disk {
                inodes: HashMap::new(),
                live: root.clone(),
                durable: root,
                next_ino: 1,
                rng: StdRng::seed_from_u64(seed),
                faults: Faults::default(),
                injected: Injected::default(),
                ops: 0,
                capacity: None,
                power_off_at: None,
            })),
        }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A panic while holding the lock leaves a consistent disk: every
        // method changes it only after all checks passed.
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the fault probabilities from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.disk().faults = faults;
    }

    /// Limits the total size of all files (ENOSPC beyond), or lifts the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.disk().capacity = bytes;
    }

    /// Cuts the power after `ops` more mutating operations: from then on
    /// every write, sync and name change fails (EIO) and changes nothing,
    /// so that [`SimStorage::crash`] afterwards gives the image of a crash
    /// at exactly that point. Deterministic crash points for code that
    /// does the same operations each time (recovery).
    pub fn crash_after(&self, ops: u64) {
        let mut d = self.disk();
        d.power_off_at = Some(d.ops + ops);
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.disk().ops
    }

    /// The faults injected so far (a crash image starts from zero).
    pub fn injected(&self) -> Injected {
        self.disk().injected
    }

    /// The disk as a machine would find it after a power loss now. The
    /// image has no faults set; `self` is unchanged (apart from its
    /// generator having moved on).
    pub fn crash(&self, mode: CrashMode) -> SimStorage {
        let image = self.disk().durable_image(mode);
        SimStorage {
            disk: Arc::new(Mutex::new(image)),
        }
    }

    /// Creates `path` and its parents and makes them durable at once (test
    /// setup: the machine's own directories).
    pub fn mkdir_durable(&self, path: &Path) {
        let mut d = self.disk();
        for a in normal(path).ancestors() {
            if a.as_os_str().is_empty() {
                continue;
            }
            if d.live.contains_key(a) {
                continue;
            }
            let id = d.next_ino;
            d.next_ino += 1;
            d.live.insert(a.to_path_buf(), Entry::Dir(id));
            d.durable.insert(a.to_path_buf(), Entry::Dir(id));
        }
    }

    /// The current content of a file (what a read of all of it returns).
    pub fn contents(&self, path: &Path) -> io::Result<Vec<u8>> {
        let d = self.disk();
        match d.live.get(&normal(path)) {
            Some(Entry::File(ino)) => Ok(d.inodes[ino].live.clone()),
            _ => Err(not_found(path)),
        }
    }

    /// Flips bit `bit` of byte `offset` of a file, in its current and its
    /// durable content (damage at rest, as bit rot would do it).
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> io::Result<()> {
        let mut d = self.disk();
        let Some(Entry::File(ino)) = d.live.get(&normal(path)).copied() else {
            return Err(not_found(path));
        };
        let inode = d.inodes.get_mut(&ino).expect("inode of a live name");
        for data in [&mut inode.live, &mut inode.durable] {
            if let Some(b) = data.get_mut(offset as usize) {
                *b ^= 1 << (bit % 8);
            }
        }
        Ok(())
    }
}

impl File for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let faults = d.faults;
        if d.inject(faults.read_eio, |i| &mut i.read_eio) {
            return Err(eio("read"));
        }
        let data = &d.inodes[&self.ino].live;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        if n > 0 && d.inject(faults.read_bitflip, |i| &mut i.read_bitflip) {
            let at = d.rng.random_range(0..n);
            let bit = d.rng.random_range(0..8);
            buf[at] ^= 1 << bit;
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let faults = d.faults;
        if d.inject(faults.write_eio, |i| &mut i.write_eio) {
            return Err(eio("write"));
        }
        let len = d.inodes[&self.ino].live.len() as u64;
        d.check_space((offset + buf.len() as u64).saturating_sub(len))?;
        d.tick()?;
        let change = Change::Write {
            offset,
            data: buf.to_vec(),
        };
        let inode = d.inodes.get_mut(&self.ino).expect("open inode");
        apply(&mut inode.live, &change);
        inode.unsynced.push(change);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let faults = d.faults;
        if d.inject(faults.sync_eio, |i| &mut i.sync_eio) {
            // As Linux does after a failed writeback, the pages count as
            // clean: each unsynced change reached the disk or is lost for
            // good, although reads still return it (a later sync that
            // succeeds does not bring it back).
            let changes =
                std::mem::take(&mut d.inodes.get_mut(&self.ino).expect("open inode").unsynced);
            let kept: Vec<Change> = changes
                .into_iter()
                .filter(|_| d.rng.random::<bool>())
                .collect();
            let inode = d.inodes.get_mut(&self.ino).expect("open inode");
            for c in &kept {
                apply(&mut inode.durable, c);
            }
            return Err(eio("sync"));
        }
        d.tick()?;
        let inode = d.inodes.get_mut(&self.ino).expect("open inode");
        for c in std::mem::take(&mut inode.unsynced) {
            apply(&mut inode.durable, &c);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        Ok(d.inodes[&self.ino].live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let have = d.inodes[&self.ino].live.len() as u64;
        d.check_space(len.saturating_sub(have))?;
        d.tick()?;
        let inode = d.inodes.get_mut(&self.ino).expect("open inode");
        apply(&mut inode.live, &Change::SetLen(len));
        inode.unsynced.push(Change::SetLen(len));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let faults = d.faults;
        if d.inject(faults.write_eio, |i| &mut i.write_eio) {
            return Err(eio("write"));
        }
        d.tick()?;
        let change = Change::Zero { offset, len };
        let inode = d.inodes.get_mut(&self.ino).expect("open inode");
        apply(&mut inode.live, &change);
        inode.unsynced.push(change);
        Ok(())
    }

    fn is_block_device(&self) -> bool {
        false
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let path = normal(path);
        let mut d = self.disk();
        let ino = match (d.live.get(&path).copied(), mode) {
            (Some(Entry::Dir(_)), _) => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{}: is a directory", path.display()),
                ));
            }
            (Some(Entry::File(_)), OpenMode::CreateNew) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: file exists", path.display()),
                ));
            }
            (Some(Entry::File(ino)), _) => ino,
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found(&path)),
            (None, OpenMode::Create | OpenMode::CreateNew) => {
                if !d.parent_is_dir(&path) {
                    return Err(not_found(&path));
                }
                d.tick()?;
                let ino = d.next_ino;
                d.next_ino += 1;
                d.inodes.insert(ino, Inode::default());
                d.live.insert(path, Entry::File(ino));
                ino
            }
        };
        Ok(Arc::new(SimFile {
            disk: Arc::clone(&self.disk),
            ino,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut d = self.disk();
        match d.live.get(&path) {
            Some(Entry::File(_)) => {
                d.tick()?;
                d.live.remove(&path);
                Ok(())
            }
            Some(Entry::Dir(_)) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{}: is a directory", path.display()),
            )),
            None => Err(not_found(&path)),
        }
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut d = self.disk();
        if !d.live.get(&path).is_some_and(|e| e.is_dir()) {
            return Err(not_found(&path));
        }
        d.tick()?;
        d.live.retain(|p, _| !p.starts_with(&path));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normal(from), normal(to));
        let mut d = self.disk();
        let Some(entry) = d.live.get(&from).copied() else {
            return Err(not_found(&from));
        };
        if !d.parent_is_dir(&to) {
            return Err(not_found(&to));
        }
        d.tick()?;
        let moved: Vec<(PathBuf, Entry)> = d
            .live
            .iter()
            .filter(|(p, _)| p.starts_with(&from))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        if entry.is_dir() {
            d.live.retain(|p, _| !p.starts_with(&to));
        }
        for (p, e) in moved {
            d.live.remove(&p);
            let rest = p.strip_prefix(&from).expect("filtered by prefix");
            let dest = if rest.as_os_str().is_empty() {
                to.clone()
            } else {
                to.join(rest)
            };
            d.live.insert(dest, e);
        }
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normal(path);
        let mut d = self.disk();
        for a in path.ancestors() {
            if a.as_os_str().is_empty() {
                continue;
            }
            match d.live.get(a) {
                Some(Entry::File(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{}: not a directory", a.display()),
                    ));
                }
                Some(Entry::Dir(_)) => break,
                None => {
                    d.tick()?;
                    let id = d.next_ino;
                    d.next_ino += 1;
                    d.live.insert(a.to_path_buf(), Entry::Dir(id));
                }
            }
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let dir = normal(path);
        let mut d = self.disk();
        if !d.live.get(&dir).is_some_and(|e| e.is_dir()) {
            return Err(not_found(&dir));
        }
        let faults = d.faults;
        if d.inject(faults.sync_eio, |i| &mut i.sync_eio) {
            return Err(eio("directory sync"));
        }
        d.tick()?;
        // The names directly in `dir` become what they are now. A directory
        // that arrives under a new name (a rename) brings its durable
        // content along; what lies below a name that went away goes with it.
        let child = |p: &Path| p.parent() == Some(dir.as_path());
        let now: Vec<(PathBuf, Entry)> = d
            .live
            .iter()
            .filter(|(p, _)| child(p))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        let mut carried: Vec<(PathBuf, Entry)> = Vec::new();
        for (p, e) in &now {
            if d.durable.get(p) == Some(e) || !e.is_dir() {
                continue;
            }
            if let Some(old) = d
                .durable
                .iter()
                .find(|(_, de)| *de == e)
                .map(|(q, _)| q.clone())
            {
                for (q, qe) in d
                    .durable
                    .iter()
                    .filter(|(q, _)| q.starts_with(&old) && **q != old)
                {
                    let rest = q.strip_prefix(&old).expect("filtered by prefix");
                    carried.push((p.join(rest), *qe));
                }
            }
        }
        let gone: Vec<PathBuf> = d
            .durable
            .iter()
            .filter(|(p, e)| child(p) && d.live.get(*p) != Some(*e))
            .map(|(p, _)| p.clone())
            .collect();
        for g in gone {
            d.durable.retain(|p, _| !p.starts_with(&g));
        }
        for (p, e) in now {
            d.durable.insert(p, e);
        }
        d.durable.extend(carried);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let dir = normal(path);
        let d = self.disk();
        if !d.live.get(&dir).is_some_and(|e| e.is_dir()) {
            return Err(not_found(&dir));
        }
        let mut names: Vec<String> = d
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir.as_path()))
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        self.disk().live.contains_key(&normal(path))
    }

    fn available_space(&self, _path: &Path) -> io::Result<u64> {
        let d = self.disk();
        Ok(match d.capacity {
            Some(cap) => cap.saturating_sub(d.used()),
            None => 1 << 40,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> SimStorage {
        let s = SimStorage::new(7);
        s.mkdir_durable(Path::new("/d"));
        s
    }

    #[test]
    fn a_crash_keeps_exactly_what_a_sync_covered() {
        let s = disk();
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"HELLO world", 0).unwrap();
        let img = s.crash(CrashMode::DropUnsynced);
        assert_eq!(img.contents(Path::new("/d/f")).unwrap(), b"hello");
        assert_eq!(s.contents(Path::new("/d/f")).unwrap(), b"HELLO world");
    }

    #[test]
    fn a_name_is_durable_only_after_its_directory_is_synced() {
        let s = disk();
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.sync_data().unwrap();
        assert!(!s.crash(CrashMode::DropUnsynced).exists(Path::new("/d/f")));
        s.sync_dir(Path::new("/d")).unwrap();
        assert!(s.crash(CrashMode::DropUnsynced).exists(Path::new("/d/f")));
        s.remove_file(Path::new("/d/f")).unwrap();
        assert!(s.crash(CrashMode::DropUnsynced).exists(Path::new("/d/f")));
        s.sync_dir(Path::new("/d")).unwrap();
        assert!(!s.crash(CrashMode::DropUnsynced).exists(Path::new("/d/f")));
    }

    #[test]
    fn write_atomic_survives_a_crash_old_or_new_never_torn() {
        let s = disk();
        let p = Path::new("/d/meta.json");
        s.write_atomic(p, b"old").unwrap();
        for i in 0..200 {
            let f = s
                .open(Path::new("/d/meta.json.tmp"), OpenMode::Create)
                .unwrap();
            f.set_len(0).unwrap();
            f.write_all_at(b"new content", 0).unwrap();
            let img = s.crash(CrashMode::Torn);
            let got = img.read_file(p).unwrap();
            assert_eq!(got, b"old", "round {i}");
            drop(f);
            s.remove_file(Path::new("/d/meta.json.tmp")).unwrap();
        }
        s.write_atomic(p, b"new").unwrap();
        assert_eq!(s.crash(CrashMode::Torn).read_file(p).unwrap(), b"new");
    }

    #[test]
    fn a_renamed_directory_keeps_its_durable_content() {
        let s = disk();
        s.create_dir_all(Path::new("/d/r")).unwrap();
        s.write_atomic(Path::new("/d/r/m"), b"m").unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        s.rename(Path::new("/d/r"), Path::new("/d/.gone-r"))
            .unwrap();
        let img = s.crash(CrashMode::DropUnsynced);
        assert_eq!(img.read_file(Path::new("/d/r/m")).unwrap(), b"m");
        assert!(!img.exists(Path::new("/d/.gone-r")));
        s.sync_dir(Path::new("/d")).unwrap();
        let img = s.crash(CrashMode::DropUnsynced);
        assert_eq!(img.read_file(Path::new("/d/.gone-r/m")).unwrap(), b"m");
        assert!(!img.exists(Path::new("/d/r")));
        assert_eq!(img.list_dir(Path::new("/d")).unwrap(), vec![".gone-r"]);
    }

    #[test]
    fn torn_mode_keeps_only_whole_sectors_of_unsynced_writes() {
        let s = disk();
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        f.set_len(4 * SECTOR as u64).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&vec![0xAB; 4 * SECTOR], 0).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let img = s
                .crash(CrashMode::Torn)
                .contents(Path::new("/d/f"))
                .unwrap();
            assert_eq!(img.len(), 4 * SECTOR);
            let sectors: Vec<bool> = img
                .chunks(SECTOR)
                .map(|c| {
                    let all = c[0];
                    assert!(c.iter().all(|b| *b == all), "a sector torn inside");
                    all == 0xAB
                })
                .collect();
            seen.insert(sectors);
        }
        // Dropped, kept and partly kept images all occur.
        assert!(seen.contains(&vec![false; 4]));
        assert!(seen.contains(&vec![true; 4]));
        assert!(seen.len() > 4, "only {} patterns", seen.len());
    }

    #[test]
    fn faults_fail_operations_and_a_failed_sync_makes_nothing_durable() {
        let s = disk();
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b"data", 0).unwrap();
        s.set_faults(Faults {
            sync_eio: 1.0,
            ..Faults::default()
        });
        assert!(f.sync_data().is_err());
        s.set_faults(Faults::default());
        assert_eq!(
            s.crash(CrashMode::DropUnsynced)
                .contents(Path::new("/d/f"))
                .unwrap(),
            b""
        );
        s.set_faults(Faults {
            read_bitflip: 1.0,
            ..Faults::default()
        });
        let mut buf = [0u8; 4];
        f.read_at(&mut buf, 0).unwrap();
        assert_ne!(&buf, b"data");
        assert_eq!(
            s.injected(),
            Injected {
                sync_eio: 1,
                read_bitflip: 1,
                ..Injected::default()
            }
        );
    }

    #[test]
    fn after_the_power_is_cut_nothing_changes() {
        let s = disk();
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        s.crash_after(2);
        f.write_all_at(b"ab", 0).unwrap();
        f.sync_data().unwrap();
        assert!(f.write_all_at(b"cd", 2).is_err());
        assert!(f.sync_data().is_err());
        assert!(s.open(Path::new("/d/g"), OpenMode::CreateNew).is_err());
        assert_eq!(
            s.crash(CrashMode::Torn)
                .contents(Path::new("/d/f"))
                .unwrap(),
            b"ab"
        );
    }

    #[test]
    fn a_full_disk_refuses_growth_with_enospc() {
        let s = disk();
        s.set_capacity(Some(10));
        let f = s.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        f.write_all_at(b"0123456789", 0).unwrap();
        let e = f.write_all_at(b"x", 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC));
        f.write_all_at(b"ab", 0).unwrap();
        assert_eq!(s.available_space(Path::new("/d")).unwrap(), 0);
    }
}
