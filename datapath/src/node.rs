//! The node: the state root, its lock and identity, and the resources on it.
//! `marsd` owns exactly one; the control API and the frontends call into it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::control::pb;
use crate::frontend::ExportTable;
use crate::quota::{self, LogQuota};
use crate::resource::{self, Resource, Role, Settings, VolumeHandle};
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("another marsd holds the lock on state root {0}: only one marsd per root")]
    Locked(PathBuf),
    #[error(
        "state root {root} belongs to node '{found}', not '{wanted}': use --node {found} or another root"
    )]
    WrongNode {
        root: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("invalid node name '{0}': use 1-64 letters, digits, '-', '_' or '.'")]
    BadNodeName(String),
    #[error("state root {root}: {what}: {source}")]
    Io {
        root: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub root: PathBuf,
    pub node: String,
    pub logfile_size: u64,
    pub overlay_limit: u64,
    /// `None`: 16 GiB or half the free space of the root, whichever is smaller.
    pub log_quota: Option<u64>,
}

pub struct Node {
    cfg: NodeConfig,
    storage: Arc<dyn Storage>,
    quota: Arc<LogQuota>,
    resources: RwLock<BTreeMap<String, Arc<Resource>>>,
    /// Resources that could not be loaded, with the reason (shown by `view`).
    broken: RwLock<BTreeMap<String, String>>,
    /// Serialises create-resource, so that two with one name cannot both pass the checks.
    create_lock: std::sync::Mutex<()>,
    _lock: std::fs::File,
}

pub const LOCK_FILE: &str = "marsd.lock";
pub const NODE_FILE: &str = "node";
pub const SOCKET_FILE: &str = "marsd.sock";

impl Node {
    /// Takes the root's lock, checks the node's identity and loads every
    /// resource (recovery before anything is served).
    pub fn open(cfg: NodeConfig, storage: Arc<dyn Storage>) -> Result<Node, Error> {
        let root = cfg.root.clone();
        resource::validate_name(&cfg.node).map_err(|_| Error::BadNodeName(cfg.node.clone()))?;
        let io = |what| {
            let root = root.clone();
            move |source| Error::Io { root, what, source }
        };
        storage.create_dir_all(&root).map_err(io("creating it"))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_FILE))
            .map_err(io("opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked(root)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking")(e)),
        }
        let node_file = root.join(NODE_FILE);
        if storage.exists(&node_file) {
            let found = String::from_utf8_lossy(
                &storage
                    .read_file(&node_file)
                    .map_err(io("reading the node name"))?,
            )
            .trim()
            .to_string();
            if found != cfg.node {
                return Err(Error::WrongNode {
                    root,
                    found,
                    wanted: cfg.node.clone(),
                });
            }
        } else {
            storage
                .write_atomic(&node_file, format!("{}\n", cfg.node).as_bytes())
                .map_err(io("writing the node name"))?;
        }
        let limit = match cfg.log_quota {
            Some(q) => q,
            None => quota::default_quota(
                storage
                    .available_space(&root)
                    .map_err(io("reading free space"))?,
            ),
        };
        let node = Node {
            quota: Arc::new(LogQuota::new(limit)),
            storage,
            resources: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            create_lock: std::sync::Mutex::new(()),
            _lock: lock,
            cfg,
        };
        tracing::info!(node = %node.cfg.node, root = %root.display(), log_quota = limit, "node opened");
        node.load_all().map_err(io("listing resources"))?;
        Ok(node)
    }

    fn settings(&self) -> Settings {
        Settings {
            node: self.cfg.node.clone(),
            logfile_size: self.cfg.logfile_size,
            overlay_limit: self.cfg.overlay_limit,
        }
    }

    fn load_all(&self) -> std::io::Result<()> {
        for entry in self.storage.list_dir(&self.cfg.root)? {
            if entry.starts_with(resource::DELETING_PREFIX) {
                // A delete-resource that a crash interrupted: finish it.
                self.storage.remove_dir_all(&self.cfg.root.join(&entry))?;
                continue;
            }
            let Some(name) = entry.strip_prefix("resource-") else {
                continue;
            };
            let dir = self.cfg.root.join(&entry);
            match Resource::load(
                Arc::clone(&self.storage),
                &dir,
                self.settings(),
                Arc::clone(&self.quota),
            ) {
                Ok(r) => {
                    tracing::info!(
                        resource = name,
                        role = r.meta().role.as_str(),
                        "resource restored"
                    );
                    self.resources
                        .write()
                        .expect("resources lock")
                        .insert(name.to_string(), r);
                }
                Err(e) => {
                    tracing::error!(resource = name, error = %e, "resource could not be restored");
                    self.broken
                        .write()
                        .expect("broken lock")
                        .insert(name.to_string(), e.to_string());
                }
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.cfg.node
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    pub fn resource(&self, name: &str) -> resource::Result<Arc<Resource>> {
        self.resources
            .read()
            .expect("resources lock")
            .get(name)
            .cloned()
            .ok_or_else(
                || match self.broken.read().expect("broken lock").get(name) {
                    Some(why) => resource::Error::InvalidArgument(format!(
                        "resource {name} failed to load: {why}"
                    )),
                    None => resource::Error::NotFound(name.into()),
                },
            )
    }

    pub fn create_resource(&self, name: &str, path: &Path, size: u64) -> resource::Result<()> {
        let _creating = self.create_lock.lock().expect("create lock");
        if self
            .resources
            .read()
            .expect("resources lock")
            .contains_key(name)
            || self.broken.read().expect("broken lock").contains_key(name)
        {
            return Err(resource::Error::AlreadyExists(name.into()));
        }
        let backing = self.check_backing(name, path)?;
        let r = Resource::create(
            Arc::clone(&self.storage),
            &self.cfg.root,
            self.settings(),
            Arc::clone(&self.quota),
            name,
            &backing,
            size,
        )?;
        self.resources
            .write()
            .expect("resources lock")
            .insert(name.into(), r);
        Ok(())
    }

    /// Resolves a backing path (following `.`, `..` and symlinks of its
    /// directory) and refuses marsd's own files and another resource's device.
    fn check_backing(&self, name: &str, path: &Path) -> resource::Result<PathBuf> {
        let bad = |what: String| {
            resource::Error::InvalidArgument(format!(
                "backing path {} for resource {name}: {what}",
                path.display()
            ))
        };
        let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
            return Err(bad("not a file path".into()));
        };
        let dir = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad("its directory does not exist".into()),
            _ => bad(format!("its directory: {e}")),
        })?;
        let mut canon = dir.join(file);
        if let Ok(target) = std::fs::canonicalize(&canon) {
            canon = target;
        }
        let root = std::fs::canonicalize(&self.cfg.root).unwrap_or_else(|_| self.cfg.root.clone());
        if canon.starts_with(&root) {
            return Err(bad(format!(
                "it is inside the state root {}: put volumes elsewhere",
                root.display()
            )));
        }
        let resources = self.resources.read().expect("resources lock");
        if let Some(other) = resources.values().find(|r| r.meta().backing == canon) {
            return Err(bad(format!(
                "it is already the backing device of resource {}",
                other.name()
            )));
        }
        Ok(canon)
    }

    /// Blocking (writes everything back first).
    pub fn delete_resource(&self, name: &str) -> resource::Result<()> {
        if self.broken.read().expect("broken lock").contains_key(name) {
            // A resource that failed to load (e.g. a delete cut short by a
            // crash) can still be removed.
            resource::remove_dir(&*self.storage, &self.cfg.root, name)?;
            self.broken.write().expect("broken lock").remove(name);
            return Ok(());
        }
        let r = self.resource(name)?;
        r.delete()?;
        self.resources.write().expect("resources lock").remove(name);
        Ok(())
    }

    /// Stops every resource, writing back what fits before `deadline`.
    pub fn shutdown(&self, deadline: Instant) {
        let all: Vec<_> = self
            .resources
            .read()
            .expect("resources lock")
            .values()
            .cloned()
            .collect();
        for r in all {
            r.shutdown(deadline);
        }
    }

    /// Status of one resource, or of all when `name` is empty.
    pub fn view(&self, name: &str) -> resource::Result<pb::ViewReply> {
        let mut resources: Vec<pb::ResourceStatus> = self
            .resources
            .read()
            .expect("resources lock")
            .iter()
            .filter(|(n, _)| name.is_empty() || n.as_str() == name)
            .map(|(_, r)| self.status(r))
            .collect();
        for (n, why) in self.broken.read().expect("broken lock").iter() {
            if name.is_empty() || n == name {
                resources.push(pb::ResourceStatus {
                    name: n.clone(),
                    role: "none".into(),
                    disk_state: "Detached".into(),
                    error: Some(why.clone()),
                    log: Some(pb::LogCounters::default()),
                    ..Default::default()
                });
            }
        }
        if resources.is_empty() && !name.is_empty() {
            return Err(resource::Error::NotFound(name.into()));
        }
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::ViewReply {
            node: self.cfg.node.clone(),
            resources,
        })
    }

    fn status(&self, r: &Resource) -> pb::ResourceStatus {
        let meta = r.meta();
        let c = r.counters();
        let appended = c.appended.load(Ordering::Acquire);
        let written_back = c.written_back.load(Ordering::Acquire);
        let logger = r.logger();
        let primary = logger.is_some();
        let role = if primary {
            Role::Primary
        } else {
            Role::Secondary
        };
        let size = logger
            .as_ref()
            .map_or(meta.size, |l| crate::frontend::BlockIo::size(&**l));
        let log = pb::LogCounters {
            appended,
            flushed: c.flushed.load(Ordering::Acquire),
            written_back,
            // Locally the log is its own source: everything appended is "fetched",
            // and what is on the device is "applied".
            fetched: appended,
            applied: written_back,
        };
        let me = pb::ReplicaStatus {
            node: self.cfg.node.clone(),
            role: role.as_str().into(),
            disk_state: "UpToDate".into(),
            connected: true,
            fetched: appended,
            applied: written_back,
            lag_bytes: 0,
            lag_seconds: 0.0,
        };
        pb::ResourceStatus {
            name: r.name().into(),
            size,
            role: role.as_str().into(),
            disk_state: "UpToDate".into(),
            primary: primary.then(|| self.cfg.node.clone()),
            generation: meta.generation,
            split_brain: false,
            emergency: false,
            log: Some(log),
            replicas: vec![me],
            backing: meta.backing.display().to_string(),
            log_bytes: r.log_bytes(),
            open_count: r.opens() as u32,
            error: r
                .writeback_error()
                .map(|e| format!("writeback failing: {e}")),
        }
    }
}

impl ExportTable for Node {
    type Handle = VolumeHandle;

    fn open(&self, name: &str) -> Option<VolumeHandle> {
        self.resources
            .read()
            .expect("resources lock")
            .get(name)
            .and_then(|r| r.open())
    }

    fn names(&self) -> Vec<String> {
        self.resources
            .read()
            .expect("resources lock")
            .iter()
            .filter(|(_, r)| r.logger().is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}
