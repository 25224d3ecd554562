//! One resource on this node: its persisted metadata, its log, its backing
//! device, and (while primary) its logger. Loading a resource recovers the
//! log and replays it into the device before any I/O is served.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::applicator::{self, Applicator, Position};
use crate::frontend::{BlockIo, IoError};
use crate::log::{self, Lineage, LogStore};
use crate::logger::{Counters, Logger, LoggerConfig, StartPoint};
use crate::membership::PrimaryInfo;
use crate::quota::LogQuota;
use crate::storage::{File, OpenMode, Storage};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("resource {0} does not exist on this node")]
    NotFound(String),
    #[error("resource {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("resource {resource} is not primary on this node{hint}")]
    NotPrimary {
        resource: String,
        hint: &'static str,
    },
    #[error(
        "resource {resource} is in use ({opens} open handles, e.g. NBD clients): disconnect them first"
    )]
    InUse { resource: String, opens: usize },
    #[error("backing device {path} of resource {resource}: {source}")]
    Backing {
        resource: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resource {resource}: {what}: {source}")]
    Io {
        resource: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("resource {resource}: {source}")]
    Log {
        resource: String,
        #[source]
        source: log::Error,
    },
    #[error("resource {resource}: {source}")]
    Apply {
        resource: String,
        #[source]
        source: applicator::Error,
    },
    #[error(transparent)]
    Volume(#[from] IoError),
    #[error(transparent)]
    Device(#[from] crate::frontend::ublk::Error),
    /// A cluster operation was refused or a peer could not be reached.
    #[error("{0}")]
    Cluster(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Local role of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// What is persisted in `resource-NAME/resource.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub size: u64,
    pub backing: PathBuf,
    pub role: Role,
    /// The primary period: bumped each time this node becomes primary.
    pub generation: u64,
    #[serde(default)]
    pub disk_state: DiskState,
    /// Set while a full sync runs (or its replay has not passed its end).
    #[serde(default)]
    pub sync: Option<SyncMeta>,
    /// Steering, persisted across restarts: no fetching / no applying /
    /// no peer links for this resource.
    #[serde(default)]
    pub fetch_paused: bool,
    #[serde(default)]
    pub replay_paused: bool,
    #[serde(default)]
    pub disconnected: bool,
    /// This node kept writing in a deposed generation: its data diverges
    /// from the current primary's past `divergent_from` until `invalidate`.
    #[serde(default)]
    pub split_brain: bool,
    #[serde(default)]
    pub divergent_bytes: u64,
}

/// Where a joining replica starts: the primary's log position when its full
/// sync began, the sequence number of the record there (0: unknown, learnt
/// from the first record), and the primary's generation.
#[derive(Debug, Clone, Copy)]
pub struct JoinPoint {
    pub start_pos: u64,
    pub next_seq: u64,
    pub generation: u64,
}

/// The state of this replica's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DiskState {
    /// Consistent and following the current history (it may lag).
    #[default]
    UpToDate,
    /// A full sync is in progress: not usable.
    Inconsistent,
    /// Consistent but unable to follow; needs a full sync.
    Outdated,
    /// No backing device.
    Detached,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Detached => "Detached",
        }
    }
}

/// A full sync of this replica: it started at log position `start_pos`;
/// once the copy is done, `target` is the primary's log position at its end,
/// which replay must pass before the replica is UpToDate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMeta {
    pub start_pos: u64,
    pub target: Option<u64>,
}

/// Settings every resource of a node shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub logfile_size: u64,
    pub overlay_limit: u64,
    /// Nice value of the primary's writeback thread (see `LoggerConfig`).
    pub writeback_nice: i32,
}

const META_FILE: &str = "resource.json";
/// Writeback a primary does while it steps down for a handover.
const HANDOVER_WRITEBACK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a full sync's start position is kept without the replica's
/// own entry confirming it.
const PIN_TIME: std::time::Duration = std::time::Duration::from_secs(120);
/// A resource directory being deleted is first renamed to this prefix, so
/// that a crash in the middle leaves nothing that looks like a resource.
pub const DELETING_PREFIX: &str = ".deleting-resource-";
const POSITION_FILE: &str = "written-back.json";

pub fn resource_dir(root: &Path, name: &str) -> PathBuf {
    root.join(format!("resource-{name}"))
}

/// Resource names become directory and export names: keep them plain.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid resource name '{name}': use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

struct State {
    meta: Meta,
    logger: Option<Arc<Logger>>,
}

pub struct Resource {
    name: String,
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    settings: Settings,
    quota: Arc<LogQuota>,
    store: Arc<LogStore>,
    backing: Arc<dyn File>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    opens: AtomicUsize,
    /// Held across a whole role change (which may wait for writeback), so
    /// that role changes, delete and shutdown never overlap.
    role_change: Mutex<()>,
    /// While secondary: the fetcher, full sync and applier.
    pub(crate) secondary: Mutex<Option<crate::secondary::Runtime>>,
    /// Log positions promised to replicas that are starting a full sync,
    /// until their own entry reaches us: logfiles from there on are kept.
    pins: Mutex<Vec<(String, u64, tokio::time::Instant)>>,
    /// Why replication of this resource is degraded right now, for `view`.
    pub(crate) repl_error: Mutex<Option<String>>,
    /// Full sync progress: bytes done, total bytes, start time.
    pub(crate) sync_progress: Mutex<Option<(u64, u64, tokio::time::Instant)>>,
    /// Held by the applier while it writes to the device, so that
    /// pause-replay returns only once nothing more is written.
    pub(crate) apply_lock: Mutex<()>,
    /// A background role action (demotion, truncation) is under way.
    pub(crate) acting: std::sync::atomic::AtomicBool,
    /// The resource leaves this node or marsd stops: no secondary runtime
    /// may start any more (checked under the `secondary` lock).
    pub(crate) retired: std::sync::atomic::AtomicBool,
    /// The primary no longer has the log from this replica's position on
    /// (the fetcher was told so): only a full sync brings it back.
    pub(crate) log_gone: std::sync::atomic::AtomicBool,
    /// A background fdatasync of the fetched log copy failed (perhaps after
    /// its fetcher stopped): the copy past the durable end is in doubt and
    /// is cut back before anything is appended again.
    pub(crate) copy_sync_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Resource {
    fn err_log(&self) -> impl FnOnce(log::Error) -> Error + '_ {
        |source| Error::Log {
            resource: self.name.clone(),
            source,
        }
    }

    /// Creates a new resource with this node as primary.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        storage: Arc<dyn Storage>,
        root: &Path,
        settings: Settings,
        quota: Arc<LogQuota>,
        name: &str,
        backing: &Path,
        size: u64,
        join: Option<JoinPoint>,
    ) -> Result<Arc<Resource>> {
        validate_name(name)?;
        if size == 0 {
            return Err(Error::InvalidArgument(
                "invalid size 0: a resource needs at least one byte".into(),
            ));
        }
        let dir = resource_dir(root, name);
        if storage.exists(&dir) {
            return Err(Error::AlreadyExists(name.into()));
        }
        if !backing.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "backing path {} must be absolute",
                backing.display()
            )));
        }
        let parent_ok = backing.parent().is_some_and(|p| storage.exists(p));
        if !parent_ok {
            return Err(Error::Backing {
                resource: name.into(),
                path: backing.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "its directory does not exist",
                ),
            });
        }
        let bad = |source| Error::Backing {
            resource: name.into(),
            path: backing.into(),
            source,
        };
        let existed = storage.exists(backing);
        let file = storage.open(backing, OpenMode::Create).map_err(bad)?;
        let have = file.size().map_err(bad)?;
        if have < size {
            if file.is_block_device() {
                return Err(Error::InvalidArgument(format!(
                    "block device {} has {have} bytes, less than the requested size {size}",
                    backing.display()
                )));
            }
            file.set_len(size).map_err(bad)?;
            file.sync_data().map_err(bad)?;
        }
        drop(file);
        if !existed {
            // A new image file's name must survive a power loss too (found
            // by the power-loss tests: recovery then had no backing file).
            if let Some(parent) = backing.parent() {
                storage.sync_dir(parent).map_err(bad)?;
            }
        }
        let io = |what| {
            move |source| Error::Io {
                resource: name.into(),
                what,
                source,
            }
        };
        storage
            .create_dir_all(&dir)
            .map_err(io("creating the resource directory"))?;
        let meta = Meta {
            name: name.into(),
            size,
            backing: backing.into(),
            role: if join.is_some() {
                Role::Secondary
            } else {
                Role::Primary
            },
            generation: join.map_or(1, |j| j.generation),
            disk_state: if join.is_some() {
                DiskState::Inconsistent
            } else {
                DiskState::UpToDate
            },
            split_brain: false,
            divergent_bytes: 0,
            fetch_paused: false,
            replay_paused: false,
            disconnected: false,
            sync: join.map(|j| SyncMeta {
                start_pos: j.start_pos,
                target: None,
            }),
        };
        // A joining replica applies the log from where its full sync starts.
        match join {
            Some(j) => Position {
                pos: j.start_pos,
                next_seq: j.next_seq,
            },
            None => Position {
                pos: 0,
                next_seq: 1,
            },
        }
        .store(&*storage, &dir.join(POSITION_FILE))
        .map_err(|source| Error::Apply {
            resource: name.into(),
            source,
        })?;
        write_meta(&*storage, &dir, &meta)?;
        if let Some(root_dir) = dir.parent() {
            storage
                .sync_dir(root_dir)
                .map_err(io("syncing the state root"))?;
        }
        tracing::info!(resource = name, backing = %backing.display(), size, "created resource");
        Self::load(storage, &dir, settings, quota)
    }

    /// Loads a resource from its directory: recovers the log, replays it
    /// into the device from the written-back position, then (if primary)
    /// starts the logger.
    pub fn load(
        storage: Arc<dyn Storage>,
        dir: &Path,
        settings: Settings,
        quota: Arc<LogQuota>,
    ) -> Result<Arc<Resource>> {
        let meta: Meta = {
            let path = dir.join(META_FILE);
            let bytes = storage.read_file(&path).map_err(|source| Error::Io {
                resource: dir.display().to_string(),
                what: "reading resource.json",
                source,
            })?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?
        };
        let name = meta.name.clone();
        let written_back = Position::load(&*storage, &dir.join(POSITION_FILE))
            .map_err(|source| Error::Apply {
                resource: name.clone(),
                source,
            })?
            .unwrap_or_default();
        let durable =
            LogStore::durable_floor(&*storage, dir, written_back.pos).map_err(|source| {
                Error::Log {
                    resource: name.clone(),
                    source,
                }
            })?;
        let copied = meta.role != Role::Primary;
        let (store, _recovered) =
            LogStore::open_durable(Arc::clone(&storage), dir, durable, copied).map_err(
                |source| Error::Log {
                    resource: name.clone(),
                    source,
                },
            )?;
        // What lies past the durable floor may be readable without being on
        // disk (a failed fdatasync before a restart): written again here.
        store.rewrite_from(durable).map_err(|source| Error::Log {
            resource: name.clone(),
            source,
        })?;
        let store = Arc::new(store);
        quota.charge_existing(store.bytes());
        let backing = storage
            .open(&meta.backing, OpenMode::ReadWrite)
            .map_err(|source| Error::Backing {
                resource: name.clone(),
                path: meta.backing.clone(),
                source,
            })?;
        let res = Arc::new(Resource {
            name,
            dir: dir.to_path_buf(),
            storage,
            settings,
            quota,
            store,
            backing,
            counters: Arc::new(Counters::default()),
            state: Mutex::new(State { meta, logger: None }),
            opens: AtomicUsize::new(0),
            role_change: Mutex::new(()),
            secondary: Mutex::new(None),
            pins: Mutex::new(Vec::new()),
            repl_error: Mutex::new(None),
            sync_progress: Mutex::new(None),
            apply_lock: Mutex::new(()),
            acting: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            log_gone: std::sync::atomic::AtomicBool::new(false),
            copy_sync_failed: Arc::default(),
        });
        res.replay(written_back)?;
        if res.state.lock().expect("state lock").meta.role == Role::Primary {
            res.start_logger(false)?;
        }
        Ok(res)
    }

    /// Replays the log from the written-back position `start` (as loaded
    /// from the position file) into the device.
    fn replay(&self, start: Position) -> Result<()> {
        let pos_path = self.dir.join(POSITION_FILE);
        let apply_err = |source| Error::Apply {
            resource: self.name.clone(),
            source,
        };
        let end = self
            .store
            .files()
            .last()
            .map(|f| f.end_pos)
            .unwrap_or(start.pos);
        let backing_path = self.state.lock().expect("state lock").meta.backing.clone();
        let mut app = Applicator::new(
            Arc::clone(&self.store),
            Arc::clone(&self.storage),
            Arc::clone(&self.backing),
            backing_path,
            pos_path,
            start,
        );
        if end > start.pos {
            let t = Instant::now();
            let n = app.apply_all().map_err(apply_err)?;
            tracing::info!(resource = %self.name, from = start.pos, to = app.position().pos, records = n, ms = t.elapsed().as_millis() as u64, "recovery replayed the log into the device");
        }
        let pos = app.position().pos;
        self.counters
            .appended
            .store(end.max(pos), Ordering::Release);
        self.counters.set_flushed(end.max(pos));
        self.counters.written_back.store(pos, Ordering::Release);
        Ok(())
    }

    /// Starts the logger. `new_period` starts a new logfile (a new primary
    /// generation); otherwise appending resumes in the last logfile.
    fn start_logger(&self, new_period: bool) -> Result<()> {
        let mut st = self.state.lock().expect("state lock");
        let files = self.store.files();
        let last = files.last();
        let written_back = self.counters.written_back.load(Ordering::Acquire);
        let appender = match last {
            Some(f) if !new_period && f.header.generation == st.meta.generation => {
                self.store.resume_last().map_err(self.err_log())?
            }
            _ => None,
        };
        let pos_seq = Position::load(&*self.storage, &self.dir.join(POSITION_FILE))
            .map_err(|source| Error::Apply {
                resource: self.name.clone(),
                source,
            })?
            .unwrap_or(Position {
                pos: 0,
                next_seq: 1,
            });
        let start = StartPoint {
            appender,
            next_file_seq: last.map_or(1, |f| f.file_seq + 1),
            end_pos: last.map_or(pos_seq.pos, |f| f.end_pos),
            next_seq: last.map_or(pos_seq.next_seq, |f| f.end_seq),
            written_back,
        };
        let cfg = LoggerConfig {
            resource: self.name.clone(),
            node: self.settings.node.clone(),
            generation: st.meta.generation,
            logfile_size: self.settings.logfile_size,
            overlay_limit: self.settings.overlay_limit,
            writeback_nice: self.settings.writeback_nice,
            backing_path: st.meta.backing.clone(),
            position_path: self.dir.join(POSITION_FILE),
        };
        let logger = Logger::start(
            cfg,
            Arc::clone(&self.storage),
            Arc::clone(&self.store),
            Arc::clone(&self.backing),
            Arc::clone(&self.quota),
            Arc::clone(&self.counters),
            st.meta.size,
            start,
        )?;
        st.logger = Some(logger);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn store(&self) -> &Arc<LogStore> {
        &self.store
    }

    pub(crate) fn backing(&self) -> &Arc<dyn File> {
        &self.backing
    }

    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(crate) fn quota(&self) -> &Arc<LogQuota> {
        &self.quota
    }

    pub(crate) fn position_path(&self) -> PathBuf {
        self.dir.join(POSITION_FILE)
    }

    /// Changes and persists the metadata.
    pub(crate) fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<()> {
        let mut st = self.state.lock().expect("state lock");
        f(&mut st.meta);
        write_meta(&*self.storage, &self.dir, &st.meta)
    }

    /// Keeps the log from `pos` on for `node`, which starts a full sync.
    pub(crate) fn pin(&self, node: &str, pos: u64) {
        let mut pins = self.pins.lock().expect("pins lock");
        pins.retain(|(n, _, t)| n != node && t.elapsed() < PIN_TIME);
        pins.push((node.to_string(), pos, tokio::time::Instant::now()));
    }

    /// Drops the pin of a replica that was given up.
    pub(crate) fn unpin(&self, node: &str) {
        self.pins
            .lock()
            .expect("pins lock")
            .retain(|(n, _, _)| n != node);
    }

    /// Sets where log deletion must stop for the other replicas: the
    /// lowest position any of them (or a pending full sync) still needs
    /// (`None`: none does). Until it is first set, nothing is deleted.
    pub fn set_delete_floor(&self, replicas_need: Option<u64>) {
        let mut pins = self.pins.lock().expect("pins lock");
        pins.retain(|(_, _, t)| t.elapsed() < PIN_TIME);
        let floor = pins
            .iter()
            .map(|(_, p, _)| *p)
            .chain(replicas_need)
            .min()
            .unwrap_or(u64::MAX);
        self.counters.delete_floor.store(floor, Ordering::Release);
    }

    pub fn meta(&self) -> Meta {
        self.state.lock().expect("state lock").meta.clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn opens(&self) -> usize {
        self.opens.load(Ordering::Acquire)
    }

    pub fn log_bytes(&self) -> u64 {
        self.store.bytes()
    }

    pub fn writeback_error(&self) -> Option<String> {
        self.logger().and_then(|l| l.writeback_error())
    }

    pub fn logger(&self) -> Option<Arc<Logger>> {
        self.state.lock().expect("state lock").logger.clone()
    }

    fn primary_logger(&self, hint: &'static str) -> Result<Arc<Logger>> {
        self.logger().ok_or_else(|| Error::NotPrimary {
            resource: self.name.clone(),
            hint,
        })
    }

    /// Opens the volume for a client (an NBD connection). Only a primary
    /// serves I/O.
    pub fn open(self: &Arc<Self>) -> Option<VolumeHandle> {
        let st = self.state.lock().expect("state lock");
        let logger = st.logger.clone()?;
        self.opens.fetch_add(1, Ordering::AcqRel);
        Some(VolumeHandle {
            resource: Arc::clone(self),
            logger,
        })
    }

    /// Makes this node primary (a new generation). Idempotent.
    /// `at_least` is the lowest generation the new period may have (one
    /// past the highest the cluster knows).
    pub fn make_primary(&self, at_least: u64) -> Result<()> {
        let _changing = self.role_change.lock().expect("role lock");
        if self.state.lock().expect("state lock").meta.disk_state != DiskState::UpToDate {
            return Err(Error::Cluster(format!(
                "{} is {} on this node: only an UpToDate replica can become primary",
                self.name,
                self.meta().disk_state.as_str()
            )));
        }
        // A secondary stops fetching and applying first: the device must
        // hold everything up to the end of the local log. The runtime lock
        // is held until the logger runs: a runtime the reconcile loop
        // started in between would apply this node's own log under the
        // logger and delete logfiles the other replicas still need.
        let mut runtime = self.secondary.lock().expect("secondary lock");
        if let Some(rt) = runtime.take() {
            rt.stop();
        }
        self.repl_error.lock().expect("error lock").take();
        {
            let mut st = self.state.lock().expect("state lock");
            if st.meta.role == Role::Primary && st.logger.is_some() {
                return Ok(());
            }
            let applied = self.counters.written_back.load(Ordering::Acquire);
            let end = self.store.files().last().map_or(applied, |f| f.end_pos);
            if applied < end {
                return Err(Error::Cluster(format!(
                    "{}: this replica has applied up to {applied} of its log, which reaches {end}: retry when it has caught up",
                    self.name
                )));
            }
            st.meta.role = Role::Primary;
            st.meta.generation = (st.meta.generation + 1).max(at_least);
            write_meta(&*self.storage, &self.dir, &st.meta)?;
            tracing::info!(resource = %self.name, generation = st.meta.generation, "became primary");
        }
        self.start_logger(true)
    }

    /// Gives up the primary role: refuses while the volume is open; else
    /// stops I/O and writes everything back. Blocking. Idempotent.
    pub fn make_secondary(&self) -> Result<()> {
        let _changing = self.role_change.lock().expect("role lock");
        self.secondary_locked()
    }

    fn secondary_locked(&self) -> Result<()> {
        if let Some(rt) = self.secondary.lock().expect("secondary lock").take() {
            rt.stop();
        }
        let logger = {
            let mut st = self.state.lock().expect("state lock");
            let opens = self.opens();
            if opens > 0 {
                return Err(Error::InUse {
                    resource: self.name.clone(),
                    opens,
                });
            }
            st.meta.role = Role::Secondary;
            write_meta(&*self.storage, &self.dir, &st.meta)?;
            st.logger.take()
        };
        if let Some(l) = logger {
            l.stop(None);
            tracing::info!(resource = %self.name, "became secondary");
        }
        Ok(())
    }

    /// Before a forced promotion: stops fetching and applying, makes the
    /// local log durable and applies every complete record in it.
    /// Returns where the log ends. Blocking.
    pub(crate) fn apply_everything_fetched(&self) -> Result<u64> {
        if let Some(rt) = self.secondary.lock().expect("secondary lock").take() {
            rt.stop();
        }
        let _changing = self.role_change.lock().expect("role lock");
        if let Some(a) = self.store.resume_last().map_err(self.err_log())? {
            a.sync().map_err(|source| Error::Io {
                resource: self.name.clone(),
                what: "syncing the log",
                source,
            })?;
        }
        let apply_err = |source| Error::Apply {
            resource: self.name.clone(),
            source,
        };
        let start = Position::load(&*self.storage, &self.position_path())
            .map_err(apply_err)?
            .unwrap_or_default();
        let mut app = Applicator::new(
            Arc::clone(&self.store),
            Arc::clone(&self.storage),
            Arc::clone(&self.backing),
            self.meta().backing,
            self.position_path(),
            start,
        );
        if !self.store.files().is_empty() {
            app.apply_all().map_err(apply_err)?;
        }
        let pos = app.position().pos;
        self.counters.written_back.store(pos, Ordering::Release);
        self.counters.set_flushed(pos);
        self.counters.appended.store(pos, Ordering::Release);
        Ok(self.store.files().last().map_or(pos, |f| f.end_pos))
    }

    /// The end of the local log (or the applied position without logfiles).
    /// How far the device may hold records of the log (see
    /// [`Counters::device_end`]).
    pub(crate) fn device_end(&self) -> u64 {
        let c = &self.counters;
        c.written_back
            .load(Ordering::Acquire)
            .max(c.device_end.load(Ordering::Acquire))
    }

    pub(crate) fn log_end(&self) -> u64 {
        self.store
            .files()
            .last()
            .map_or(self.counters.written_back.load(Ordering::Acquire), |f| {
                f.end_pos
            })
    }

    /// Where this replica's log leaves the history of primary `p`, if it
    /// holds anything past that point. A history is a generation *and* the
    /// node that started it (a logfile's origin): two partitions may each
    /// force a primary into the same next generation. Records of an older
    /// generation past `p`'s start are not `p`'s, nor is a logfile of `p`'s
    /// generation written by another node. Logfiles of a newer generation
    /// than `p` are not judged (gossip about that primary is still on its
    /// way).
    ///
    /// The logfiles are asked, and so is the lineage: it still knows the
    /// histories whose logfiles are gone (written back and deleted, or
    /// given up in emergency mode), so that the fork and the divergent
    /// tail's size are where the history was left, not where the oldest
    /// kept logfile begins.
    pub(crate) fn fork_from(&self, p: &PrimaryInfo) -> Option<u64> {
        let end = self.log_end();
        let files = self.store.files();
        let lineage = self.store.lineage();
        let epochs = lineage.epochs();
        let in_files = files.iter().map(|f| Span {
            generation: f.header.generation,
            origin: &f.origin,
            start: f.header.start_pos,
            end: f.end_pos,
        });
        let in_lineage = epochs.iter().enumerate().map(|(i, e)| Span {
            generation: e.generation,
            origin: &e.origin,
            start: e.start_pos,
            end: epochs.get(i + 1).map_or(end, |next| next.start_pos),
        });
        let fork = in_files
            .chain(in_lineage)
            .filter_map(|s| s.leaves(p))
            .min()?;
        (end > fork).then_some(fork)
    }

    /// Records that this replica holds `divergent_bytes` of a deposed
    /// history: split brain, Outdated until `invalidate`.
    pub(crate) fn record_split_brain(&self, divergent_bytes: u64) -> Result<()> {
        self.update_meta(|m| {
            m.split_brain = true;
            m.divergent_bytes = divergent_bytes;
            m.disk_state = DiskState::Outdated;
        })
    }

    /// Cuts the local log back to the fork point of a new history (only
    /// records that were fetched, never applied, are cut).
    pub(crate) fn truncate_log(&self, pos: u64) -> Result<()> {
        if let Some(rt) = self.secondary.lock().expect("secondary lock").take() {
            rt.stop();
        }
        let freed = self.store.truncate_to(pos).map_err(self.err_log())?;
        self.quota.release(freed);
        // The floor may claim more than the log now holds: records past
        // `pos` are another history's, and the device holds none of them.
        self.store.persist_durable(pos).map_err(self.err_log())?;
        self.counters.device_end.store(pos, Ordering::Release);
        self.counters.appended.store(pos, Ordering::Release);
        self.counters.set_flushed(pos);
        Ok(())
    }

    /// Starts over as a replica that needs a full sync from `start_pos` of
    /// the current primary's log (invalidate): forgets the local log and
    /// any split brain, and takes `lineage`, the primary's. The device
    /// keeps its data: the fast full sync sends only chunks that differ.
    pub(crate) fn reset_for_full_sync(&self, start: JoinPoint, lineage: Lineage) -> Result<()> {
        let JoinPoint {
            start_pos,
            next_seq,
            generation,
        } = start;
        let _changing = self.role_change.lock().expect("role lock");
        // Held until the full sync is recorded: a runtime the reconcile loop
        // started in between would have no full sync, and its applier would
        // wait for one for ever (Inconsistent for good).
        let mut runtime = self.secondary.lock().expect("secondary lock");
        if let Some(rt) = runtime.take() {
            rt.stop();
        }
        if self.logger().is_some() {
            return Err(Error::Cluster(format!(
                "{} is primary here: invalidate needs a secondary",
                self.name
            )));
        }
        let freed = self.store.delete_all().map_err(self.err_log())?;
        self.store
            .persist_durable(start_pos)
            .map_err(self.err_log())?;
        self.quota.release(freed);
        // At once, under the role lock: until then the old lineage would
        // show a fork from the current primary's history (`fork_from`).
        self.store.adopt_lineage(lineage);
        Position {
            pos: start_pos,
            next_seq,
        }
        .store(&*self.storage, &self.position_path())
        .map_err(|source| Error::Apply {
            resource: self.name.clone(),
            source,
        })?;
        for c in [
            &self.counters.appended,
            &self.counters.flushed,
            &self.counters.written_back,
            &self.counters.device_end,
        ] {
            c.store(start_pos, Ordering::Release);
        }
        self.update_meta(|m| {
            m.role = Role::Secondary;
            m.generation = generation;
            m.disk_state = DiskState::Inconsistent;
            m.split_brain = false;
            m.divergent_bytes = 0;
            m.sync = Some(SyncMeta {
                start_pos,
                target: None,
            });
        })
    }

    /// Gives up the primary role for a planned handover: unlike `secondary`,
    /// open NBD clients do not block it (their I/O fails from now on).
    /// Blocking; idempotent.
    pub fn stop_for_handover(&self) -> Result<()> {
        let _changing = self.role_change.lock().expect("role lock");
        let logger = {
            let mut st = self.state.lock().expect("state lock");
            st.meta.role = Role::Secondary;
            write_meta(&*self.storage, &self.dir, &st.meta)?;
            st.logger.take()
        };
        if let Some(l) = logger {
            // Only the log must be durable for the new primary; what is not
            // written back yet is replayed by this node's applier as a
            // secondary (from the same persisted position), so a large
            // backlog does not hold the handover up.
            l.stop(Some(HANDOVER_WRITEBACK));
        }
        Ok(())
    }

    /// Stops I/O for a daemon shutdown, writing back what fits before the
    /// deadline (the rest stays in the log). The role stays as it is.
    pub fn shutdown(&self, deadline: Instant) {
        self.retired.store(true, Ordering::Release);
        let _changing = self.role_change.lock().expect("role lock");
        let rt = self.secondary.lock().expect("secondary lock").take();
        if let Some(rt) = rt {
            rt.stop_and_wait();
        }
        let logger = self.state.lock().expect("state lock").logger.take();
        if let Some(l) = logger {
            l.stop(Some(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// Grows the device (primary only).
    pub async fn resize(&self, size: u64) -> Result<()> {
        let logger = self.primary_logger(": resize on the primary")?;
        let current = logger.size();
        if size < current {
            return Err(Error::InvalidArgument(format!(
                "resource {} is {current} bytes; shrinking to {size} is not supported",
                self.name
            )));
        }
        if size == current {
            return Ok(());
        }
        let backing_err = |source| Error::Backing {
            resource: self.name.clone(),
            path: self.meta().backing,
            source,
        };
        let have = self.backing.size().map_err(backing_err)?;
        if self.backing.is_block_device() {
            if have < size {
                return Err(Error::InvalidArgument(format!(
                    "backing block device of {} has only {have} bytes: grow it (e.g. lvextend) before resizing to {size}",
                    self.name
                )));
            }
        } else if have < size {
            // Grow the file before the resize is logged: a size the file
            // cannot reach must be refused now, not fail in writeback later.
            self.backing.set_len(size).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot grow the backing file of {} to {size} bytes: {e}",
                    self.name
                ))
            })?;
        }
        logger.resize(size).await?;
        let mut st = self.state.lock().expect("state lock");
        st.meta.size = st.meta.size.max(size);
        write_meta(&*self.storage, &self.dir, &st.meta)?;
        tracing::info!(resource = %self.name, size, "resized");
        Ok(())
    }

    /// Starts a new logfile; `false` if the current one is still empty.
    pub async fn log_rotate(&self) -> Result<bool> {
        let logger = self.primary_logger(": log-rotate on the primary")?;
        Ok(logger.rotate().await?)
    }

    /// Deletes logfiles that are written back here and applied by every
    /// other replica. Returns bytes freed.
    pub fn log_delete(&self) -> Result<u64> {
        let pos = self.counters.deletable_before();
        let freed = self.store.delete_before(pos).map_err(self.err_log())?;
        self.quota.release(freed);
        Ok(freed)
    }

    /// Removes the resource from this node: writes everything back first and
    /// keeps the backing device (it holds the volume). Refuses while open.
    pub fn delete(&self) -> Result<()> {
        let _changing = self.role_change.lock().expect("role lock");
        self.secondary_locked()?;
        let freed = self.store.bytes();
        let root = self.dir.parent().unwrap_or(Path::new("/"));
        remove_dir(&*self.storage, root, &self.name)?;
        self.quota.release(freed);
        tracing::info!(resource = %self.name, "deleted resource (backing device kept)");
        Ok(())
    }
}

/// Removes a resource directory crash-safely: rename it out of the way
/// (durably), then delete it.
pub fn remove_dir(storage: &dyn Storage, root: &Path, name: &str) -> Result<()> {
    let io = |what| {
        move |source| Error::Io {
            resource: name.into(),
            what,
            source,
        }
    };
    let doomed = root.join(format!("{DELETING_PREFIX}{name}"));
    storage
        .rename(&resource_dir(root, name), &doomed)
        .map_err(io("renaming the resource directory for deletion"))?;
    storage
        .sync_dir(root)
        .map_err(io("syncing the state root"))?;
    storage
        .remove_dir_all(&doomed)
        .map_err(io("removing the resource directory"))
}

fn write_meta(storage: &dyn Storage, dir: &Path, meta: &Meta) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(meta).expect("meta serializes");
    storage
        .write_atomic(&dir.join(META_FILE), &bytes)
        .map_err(|source| Error::Io {
            resource: meta.name.clone(),
            what: "writing resource.json",
            source,
        })
}

/// One client's open volume. While any exists the resource is "in use".
pub struct VolumeHandle {
    resource: Arc<Resource>,
    logger: Arc<Logger>,
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.resource.opens.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BlockIo for VolumeHandle {
    fn size(&self) -> u64 {
        self.logger.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.logger.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.logger.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.logger.write_zeroes(offset, len, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.logger.flush().await
    }
}

/// A stretch of log written in one history: a logfile, or an epoch of
/// the lineage.
pub(crate) struct Span<'a> {
    pub generation: u64,
    pub origin: &'a str,
    pub start: u64,
    pub end: u64,
}

impl Span<'_> {
    /// Where this stretch leaves the history of primary `p` (see
    /// [`Resource::fork_from`]), if it holds records that are not `p`'s.
    pub(crate) fn leaves(&self, p: &PrimaryInfo) -> Option<u64> {
        if self.generation < p.generation && self.end > p.start_pos {
            Some(p.start_pos.max(self.start))
        } else if self.generation == p.generation && self.origin != p.node {
            Some(self.start)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::RealStorage;

    fn setup(tmp: &Path, logfile_size: u64, overlay_limit: u64, quota: u64) -> Arc<Resource> {
        let settings = Settings {
            node: "n1".into(),
            logfile_size,
            overlay_limit,
            writeback_nice: 0,
        };
        let r = Resource::create(
            Arc::new(RealStorage),
            &tmp.join("root"),
            settings,
            Arc::new(LogQuota::new(quota)),
            "r1",
            &tmp.join("r1.img"),
            16 << 20,
            None,
        )
        .unwrap();
        // No other replica: everything written back may be deleted.
        r.set_delete_floor(None);
        r
    }

    fn pattern(i: u64, len: usize) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|j| (i.wrapping_mul(131) + j as u64 / 512) as u8)
                .collect::<Vec<_>>(),
        )
    }

    /// Writes 64 KiB blocks round-robin over the device, `total` bytes in all,
    /// with `concurrency` writers; returns the expected device image.
    async fn write_many(h: &Arc<VolumeHandle>, total: u64, concurrency: usize) -> Vec<u8> {
        let block = 64 << 10;
        let blocks = total / block;
        let dev_blocks = (16 << 20) / block;
        let mut expect = vec![0u8; 16 << 20];
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..concurrency as u64 {
            let h = Arc::clone(h);
            tasks.spawn(async move {
                let mut i = w;
                while i < blocks {
                    h.write((i % dev_blocks) * block, pattern(i, block as usize), false)
                        .await
                        .unwrap();
                    i += concurrency as u64;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // Blocks are written by disjoint writers in rounds; the last write of each block wins.
        for i in 0..blocks {
            let off = ((i % dev_blocks) * block) as usize;
            if i + dev_blocks >= blocks {
                expect[off..off + block as usize].copy_from_slice(&pattern(i, block as usize));
            }
        }
        expect
    }

    async fn read_all(h: &VolumeHandle) -> Vec<u8> {
        let mut out = Vec::new();
        for off in (0..16u64 << 20).step_by(1 << 20) {
            out.extend_from_slice(&h.read(off, 1 << 20).await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_are_readable_at_once_and_on_the_backing_file_after_secondary() {
        let tmp = tempfile::tempdir().unwrap();
        let r = setup(tmp.path(), 256 << 20, 64 << 20, 1 << 30);
        let h = Arc::new(r.open().unwrap());
        let expect = write_many(&h, 4 << 20, 4).await;
        h.flush().await.unwrap();
        assert_eq!(read_all(&h).await, expect);
        assert!(matches!(
            r.make_secondary(),
            Err(Error::InUse { opens: 1, .. })
        ));
        drop(h);
        tokio::task::spawn_blocking({
            let r = Arc::clone(&r);
            move || r.make_secondary()
        })
        .await
        .unwrap()
        .unwrap();
        assert!(r.open().is_none(), "a secondary serves no I/O");
        assert_eq!(std::fs::read(tmp.path().join("r1.img")).unwrap(), expect);
        let c = r.counters();
        assert_eq!(
            c.written_back.load(Ordering::Acquire),
            c.appended.load(Ordering::Acquire)
        );
    }

    /// A ublk queue thread holds the writes its tasks start (`hold_sends`)
    /// and appends them itself when the hold ends, unless they need a new
    /// logfile (the logger thread rotates). In a simulation the logger
    /// thread is a task of this thread's runtime, which cannot run while
    /// the test polls: a write that is complete right after the hold ended
    /// was appended by this thread.
    #[test]
    fn writes_held_on_a_thread_are_appended_there_when_the_hold_ends() {
        use std::task::{Context, Poll, Waker};
        let sim = crate::exec::Sim::install();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Like a queue thread: in the runtime's context, not in a task (whose
        // cooperative budget would make some writes wait for no reason).
        let enter = rt.enter();
        let tmp = tempfile::tempdir().unwrap();
        // 1 MiB logfiles for 2 MiB of writes: some batches need a new one.
        let r = setup(tmp.path(), 1 << 20, 64 << 20, 1 << 30);
        let h = r.open().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut expect = std::collections::BTreeMap::new();
        let (mut here, mut elsewhere) = (0, 0);
        for round in 0..64u64 {
            let held = crate::logger::hold_sends();
            let mut writes: Vec<_> = (0..8u64)
                .map(|i| {
                    let n = round * 8 + i;
                    // Scattered 4 KiB blocks, some written twice.
                    let off = (n * 7919 % 3000) * 4096;
                    let data = pattern(n, 4096);
                    expect.insert(off, data.clone());
                    Box::pin(h.write(off, data, false))
                })
                .collect();
            for w in &mut writes {
                assert!(w.as_mut().poll(&mut cx).is_pending(), "held, not sent");
            }
            drop(held);
            let mut pending = Vec::new();
            for mut w in writes {
                match w.as_mut().poll(&mut cx) {
                    Poll::Ready(res) => {
                        res.unwrap();
                        here += 1;
                    }
                    Poll::Pending => pending.push(w),
                }
            }
            // Only now may the logger task run.
            for w in pending {
                rt.block_on(w).unwrap();
                elsewhere += 1;
            }
        }
        assert!(
            here >= 8 * 60 && elsewhere >= 8,
            "{here} writes appended by the holding thread, {elsewhere} by the logger thread"
        );
        assert!(r.store.files().len() > 1, "the log rotated in between");
        // Every block reads back from the overlay (or, once written back,
        // from the backing file).
        let logger = r.logger().unwrap();
        let image = tmp.path().join("r1.img");
        for (off, data) in &expect {
            let hits = logger.overlay_hits(*off, 4096).unwrap();
            let got = match hits.as_slice() {
                [hit] if hit.len == 4096 => hit.data.clone().unwrap(),
                _ => {
                    let f = std::fs::read(&image).unwrap();
                    Bytes::copy_from_slice(&f[*off as usize..*off as usize + 4096])
                }
            };
            assert_eq!(&got, data, "block at {off}");
        }
        drop((h, logger, r, enter));
        drop(rt);
        sim.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_overlay_makes_writers_wait_and_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        // 1 MiB of overlay for 24 MiB of writes: writers must wait for writeback.
        let r = setup(tmp.path(), 4 << 20, 1 << 20, 1 << 30);
        let h = Arc::new(r.open().unwrap());
        let expect = write_many(&h, 24 << 20, 8).await;
        let peak = r.counters().overlay_peak.load(Ordering::Acquire);
        assert!(peak > 512 << 10, "the overlay was used ({peak} bytes)");
        assert!(
            peak <= 1 << 20,
            "overlay holds {peak} bytes, more than its limit"
        );
        assert_eq!(read_all(&h).await, expect);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_space_stays_within_the_quota_by_rotation_and_deletion() {
        let tmp = tempfile::tempdir().unwrap();
        // 2 MiB of quota, 512 KiB logfiles, 20 MiB written.
        let r = setup(tmp.path(), 512 << 10, 8 << 20, 2 << 20);
        let h = Arc::new(r.open().unwrap());
        let expect = write_many(&h, 20 << 20, 4).await;
        assert!(
            r.log_bytes() <= 2 << 20,
            "log holds {} bytes",
            r.log_bytes()
        );
        assert_eq!(read_all(&h).await, expect);
        let first = r.store.first_pos().unwrap();
        assert!(first > 0, "old logfiles were deleted");
    }

    /// Which stretches of log are not the history of a primary that began
    /// at 100 in generation 2 on "c": an older generation's records past
    /// 100, and generation 2 written by another node.
    #[test]
    fn a_span_leaves_a_history_where_it_holds_records_that_are_not_its() {
        let p = PrimaryInfo {
            node: "c".into(),
            generation: 2,
            start_pos: 100,
        };
        let span = |generation, origin, start, end| Span {
            generation,
            origin,
            start,
            end,
        };
        assert_eq!(span(1, "a", 0, 100).leaves(&p), None, "up to the start");
        assert_eq!(span(1, "a", 0, 101).leaves(&p), Some(100));
        assert_eq!(span(1, "a", 150, 200).leaves(&p), Some(150));
        assert_eq!(span(2, "c", 100, 900).leaves(&p), None, "its own");
        assert_eq!(
            span(2, "b", 100, 900).leaves(&p),
            Some(100),
            "a rival of the same generation"
        );
        assert_eq!(span(3, "b", 500, 900).leaves(&p), None, "newer: not judged");
    }

    /// A deposed primary whose older logfiles are deleted (written back)
    /// still forks where the new primary's history began: the lineage
    /// remembers what the files no longer show, so the divergent tail's
    /// size is not understated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fork_is_where_the_history_was_left_even_when_its_logfiles_are_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let r = setup(tmp.path(), 512 << 10, 8 << 20, 1 << 30);
        let h = Arc::new(r.open().unwrap());
        write_many(&h, 4 << 20, 2).await;
        h.flush().await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while r.store.first_pos().unwrap() < 2 << 20 {
            assert!(Instant::now() < deadline, "old logfiles were never deleted");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let p = PrimaryInfo {
            node: "n2".into(),
            generation: r.meta().generation + 1,
            start_pos: 1 << 20,
        };
        assert_eq!(r.fork_from(&p), Some(1 << 20));
        let same_history = PrimaryInfo {
            node: "n1".into(),
            generation: r.meta().generation,
            start_pos: 0,
        };
        assert_eq!(r.fork_from(&same_history), None);
        let past_our_end = PrimaryInfo {
            start_pos: r.log_end(),
            ..p
        };
        assert_eq!(r.fork_from(&past_our_end), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_after_stop_keeps_role_data_and_positions() {
        let tmp = tempfile::tempdir().unwrap();
        let r = setup(tmp.path(), 1 << 20, 8 << 20, 1 << 30);
        let h = Arc::new(r.open().unwrap());
        let expect = write_many(&h, 3 << 20, 2).await;
        r.resize(32 << 20).await.unwrap();
        assert!(matches!(
            r.resize(1 << 20).await,
            Err(Error::InvalidArgument(_))
        ));
        drop(h);
        let appended = r.counters().appended.load(Ordering::Acquire);
        tokio::task::spawn_blocking({
            let r = Arc::clone(&r);
            move || r.shutdown(Instant::now() + std::time::Duration::from_secs(10))
        })
        .await
        .unwrap();
        drop(r);
        let settings = Settings {
            node: "n1".into(),
            logfile_size: 1 << 20,
            overlay_limit: 8 << 20,
            writeback_nice: 0,
        };
        let dir = resource_dir(&tmp.path().join("root"), "r1");
        let r = Resource::load(
            Arc::new(RealStorage),
            &dir,
            settings,
            Arc::new(LogQuota::new(1 << 30)),
        )
        .unwrap();
        assert_eq!(r.meta().role, Role::Primary);
        assert_eq!(r.meta().size, 32 << 20);
        assert_eq!(r.counters().written_back.load(Ordering::Acquire), appended);
        let h = r.open().unwrap();
        assert_eq!(h.size(), 32 << 20);
        assert_eq!(&read_all(&h).await[..], &expect[..]);
        assert_eq!(
            std::fs::metadata(tmp.path().join("r1.img")).unwrap().len(),
            32 << 20
        );
    }
}
