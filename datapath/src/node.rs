//! The node: the state root, its lock and identity, and the resources on it.
//! `marsd` owns exactly one; the control API and the frontends call into it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::cluster::Cluster;
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
    /// Nice value of each primary's writeback thread (`--writeback-nice`).
    pub writeback_nice: i32,
    /// `None`: 16 GiB or half the free space of the root, whichever is smaller.
    pub log_quota: Option<u64>,
    /// Where peers reach this node's replication port.
    pub advertise: String,
    /// ublk devices (`--ublk`, block size).
    pub devices: crate::devices::DeviceConfig,
    /// Compression of log and full-sync data sent to peers that accept it.
    pub ship_compression: crate::replication::proto::Compression,
    /// Bytes/s this node sends to each peer (`None`: no limit).
    pub ship_rate_limit: Option<u64>,
}

pub struct Node {
    pub(crate) cfg: NodeConfig,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) quota: Arc<LogQuota>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) resources: RwLock<BTreeMap<String, Arc<Resource>>>,
    /// Resources that could not be loaded, with the reason (shown by `view`).
    broken: RwLock<BTreeMap<String, String>>,
    /// Serialises create-resource, so that two with one name cannot both pass the checks.
    pub(crate) create_lock: std::sync::Mutex<()>,
    /// Set once shutdown began: nothing is restarted any more.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    pub(crate) devices: crate::devices::Devices,
    pub(crate) device_cfg: crate::devices::DeviceConfig,
    /// The bandwidth limit of each link (`--ship-rate-limit`).
    pub(crate) ship_limits: crate::replication::ratelimit::Limits,
    _lock: std::fs::File,
}

pub const LOCK_FILE: &str = "marsd.lock";
pub const NODE_FILE: &str = "node";
pub const SOCKET_FILE: &str = "marsd.sock";

impl Node {
    /// Takes the root's lock, checks the node's identity and loads every
    /// resource (recovery before anything is served).
    pub fn open(cfg: NodeConfig, storage: Arc<dyn Storage>) -> Result<Node, Error> {
        Node::open_with_network(cfg, storage, Arc::new(crate::net::Tcp))
    }

    /// [`Node::open`] with peers dialled through `net` (a simulated network
    /// in tests; see `crate::net`).
    pub fn open_with_network(
        cfg: NodeConfig,
        storage: Arc<dyn Storage>,
        net: Arc<dyn crate::net::Network>,
    ) -> Result<Node, Error> {
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
        let mut cluster = Cluster::open(Arc::clone(&storage), &root, &cfg.node, &cfg.advertise)
            .map_err(io("reading the cluster state"))?;
        cluster.compression = cfg.ship_compression;
        cluster.net = net;
        let node = Node {
            cluster: Arc::new(cluster),
            quota: Arc::new(LogQuota::new(limit)),
            storage,
            resources: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            create_lock: std::sync::Mutex::new(()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            devices: Default::default(),
            device_cfg: cfg.devices,
            ship_limits: crate::replication::ratelimit::Limits::new(cfg.ship_rate_limit),
            _lock: lock,
            cfg,
        };
        tracing::info!(node = %node.cfg.node, root = %root.display(), log_quota = limit, "node opened");
        node.load_all().map_err(io("listing resources"))?;
        Ok(node)
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The resource and its logger, if this node is its primary.
    pub fn primary_of(&self, name: &str) -> Option<(Arc<Resource>, Arc<crate::logger::Logger>)> {
        let r = self.resource(name).ok()?;
        let l = r.logger()?;
        Some((r, l))
    }

    pub(crate) fn settings(&self) -> Settings {
        Settings {
            node: self.cfg.node.clone(),
            logfile_size: self.cfg.logfile_size,
            overlay_limit: self.cfg.overlay_limit,
            writeback_nice: self.cfg.writeback_nice,
        }
    }

    /// Loads resource `name` from its directory in the state root.
    fn load_resource(&self, name: &str) -> resource::Result<Arc<Resource>> {
        Resource::load(
            Arc::clone(&self.storage),
            &self.cfg.root.join(format!("resource-{name}")),
            self.settings(),
            Arc::clone(&self.quota),
        )
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
            match self.load_resource(name) {
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

    /// Tries again to load the resources that failed to (a state root
    /// that was full or failing at start-up may have recovered since).
    /// Blocking: a load replays the log.
    pub(crate) fn retry_broken(&self) {
        let names: Vec<(String, String)> = self
            .broken
            .read()
            .expect("broken lock")
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, why) in names {
            let _creating = self.create_lock.lock().expect("create lock");
            if !self.broken.read().expect("broken lock").contains_key(&name) {
                continue; // deleted meanwhile
            }
            match self.load_resource(&name) {
                Ok(r) => {
                    tracing::info!(resource = %name, role = r.meta().role.as_str(), "resource restored after an earlier failure");
                    self.resources
                        .write()
                        .expect("resources lock")
                        .insert(name.clone(), r);
                    self.broken.write().expect("broken lock").remove(&name);
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != why {
                        tracing::error!(resource = %name, error = %e, "resource could still not be restored");
                        self.broken.write().expect("broken lock").insert(name, e);
                    }
                }
            }
        }
    }

    pub(crate) fn has_broken(&self) -> bool {
        !self.broken.read().expect("broken lock").is_empty()
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
            None,
        )?;
        self.resources
            .write()
            .expect("resources lock")
            .insert(name.into(), r);
        Ok(())
    }

    /// Resolves a backing path (following `.`, `..` and symlinks of its
    /// directory) and refuses marsd's own files and another resource's device.
    pub(crate) fn check_backing(&self, name: &str, path: &Path) -> resource::Result<PathBuf> {
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
        let others: Vec<String> = self
            .cluster
            .state()
            .resource(name)
            .map(|s| {
                s.replicas()
                    .filter(|(n, _)| **n != self.cfg.node)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        if !others.is_empty() {
            return Err(resource::Error::Cluster(format!(
                "{name} has replicas on {}: run leave-resource there first",
                others.join(", ")
            )));
        }
        self.release_device(name)?;
        r.delete()?;
        self.resources.write().expect("resources lock").remove(name);
        self.cluster.update(true, |m| {
            m.set_replica(name, None);
            m.set_primary(name, None);
            m.set_config(name, None);
        });
        Ok(())
    }

    /// Stops every resource, writing back what fits before `deadline`.
    pub fn shutdown(&self, deadline: Instant) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown_devices();
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
        // One copy of the cluster state for all resources shown.
        let state = self.cluster.state();
        let mut resources: Vec<pb::ResourceStatus> = self
            .resources
            .read()
            .expect("resources lock")
            .iter()
            .filter(|(n, _)| name.is_empty() || n.as_str() == name)
            .map(|(_, r)| self.status(r, &state))
            .collect();
        // Remote devices: volumes used here without a replica.
        for (n, device) in self.devices.list() {
            if (name.is_empty() || n == name) && self.resource(&n).is_err() {
                resources.push(pb::ResourceStatus {
                    primary: state
                        .resource(&n)
                        .and_then(|s| s.primary())
                        .map(|p| p.node.clone()),
                    size: state
                        .resource(&n)
                        .and_then(|s| s.config())
                        .map_or(0, |c| c.size),
                    name: n,
                    role: "none".into(),
                    disk_state: "Detached".into(),
                    device: Some(device),
                    log: Some(pb::LogCounters::default()),
                    ..Default::default()
                });
            }
        }
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

    /// The fork from the current primary's history, on a secondary whose
    /// device holds records past it: it is in split brain from the moment
    /// it knows of that primary, not only once the reconcile loop has
    /// recorded it (`follow_new_history`), so that `view` never shows it
    /// UpToDate meanwhile.
    fn left_behind(
        &self,
        r: &Resource,
        rstate: Option<&crate::membership::ResourceState>,
    ) -> Option<u64> {
        if r.logger().is_some() || r.meta().split_brain {
            return None;
        }
        let p = rstate?.primary().filter(|p| p.node != self.cfg.node)?;
        r.fork_from(p).filter(|&fork| r.device_end() > fork)
    }

    fn status(&self, r: &Resource, state: &crate::membership::ClusterState) -> pb::ResourceStatus {
        let meta = r.meta();
        let c = r.counters();
        let appended = c.appended.load(Ordering::Acquire);
        let flushed = c.flushed.load(Ordering::Acquire);
        let written_back = c.written_back.load(Ordering::Acquire);
        let logger = r.logger();
        let primary_here = logger.is_some();
        let role = if primary_here {
            Role::Primary
        } else {
            Role::Secondary
        };
        let size = logger
            .as_ref()
            .map_or(meta.size, |l| crate::frontend::BlockIo::size(&**l));
        let log = pb::LogCounters {
            appended,
            flushed,
            written_back,
            // On a primary its own log is the source: what is durable counts as
            // fetched, what is on the device as applied. On a secondary: the
            // durable local copy, and what the applier has replayed.
            fetched: flushed,
            applied: written_back,
            shipped_bytes: c.shipped_bytes.load(Ordering::Relaxed),
            shipped_wire_bytes: c.shipped_wire_bytes.load(Ordering::Relaxed),
            received_bytes: c.received_bytes.load(Ordering::Relaxed),
            received_wire_bytes: c.received_wire_bytes.load(Ordering::Relaxed),
        };
        let rstate = state.resource(r.name());
        let primary_node = rstate.and_then(|s| s.primary()).map(|p| p.node.clone());
        let (split_brain, divergent_bytes, disk_state) = match self.left_behind(r, rstate) {
            Some(fork) => (
                true,
                r.log_end().saturating_sub(fork),
                resource::DiskState::Outdated,
            ),
            None => (meta.split_brain, meta.divergent_bytes, meta.disk_state),
        };
        let dropped = rstate.map(|s| s.dropped()).unwrap_or_default();
        // A replica given up in emergency mode is Outdated until its full sync starts.
        let state_of = |node: &str, reported: &str, applied: u64| {
            if dropped.get(node).is_some_and(|&d| applied <= d) {
                "Outdated".to_string()
            } else {
                reported.to_string()
            }
        };
        let primary_end = rstate
            .and_then(|s| {
                primary_node
                    .as_ref()
                    .and_then(|p| s.replicas().find(|(n, _)| *n == p))
            })
            .map(|(_, i)| i.fetched)
            .unwrap_or(0)
            .max(if primary_here { flushed } else { 0 });
        let now = crate::exec::unix_now().as_secs_f64();
        let progress = r
            .sync_progress
            .lock()
            .expect("progress lock")
            .map(|(done, total, t)| {
                let rate = done as f64 / t.elapsed().as_secs_f64().max(0.001);
                (
                    done as f64 / total.max(1) as f64,
                    rate as u64,
                    (total - done) as f64 / rate.max(1.0),
                )
            });
        let mut replicas = vec![pb::ReplicaStatus {
            split_brain,
            divergent_bytes,
            node: self.cfg.node.clone(),
            role: role.as_str().into(),
            disk_state: state_of(&self.cfg.node, disk_state.as_str(), written_back),
            connected: true,
            fetched: flushed,
            applied: written_back,
            // The primary's own writeback backlog is not replication lag.
            lag_bytes: if primary_here {
                0
            } else {
                primary_end.saturating_sub(written_back)
            },
            lag_seconds: 0.0,
            sync_progress: progress.map(|p| p.0),
            sync_rate_bytes: progress.map(|p| p.1),
            eta_seconds: progress.map(|p| p.2),
        }];
        for (node, info) in rstate.into_iter().flat_map(|s| s.replicas()) {
            if *node == self.cfg.node {
                continue;
            }
            let lag_bytes = primary_end.saturating_sub(info.applied);
            let is_primary = primary_node.as_deref() == Some(node.as_str());
            replicas.push(pb::ReplicaStatus {
                split_brain: info.split_brain,
                divergent_bytes: info.divergent_bytes,
                node: node.clone(),
                role: if is_primary { "primary" } else { "secondary" }.into(),
                disk_state: state_of(node, &info.disk_state, info.applied),
                connected: self.cluster.connected(node),
                fetched: info.fetched,
                applied: info.applied,
                lag_bytes,
                lag_seconds: if lag_bytes == 0 {
                    0.0
                } else {
                    crate::secondary::lag_seconds(r, info.applied, info.caught_up_at, now)
                },
                sync_progress: info.sync_progress,
                sync_rate_bytes: info.sync_rate_bytes,
                eta_seconds: info
                    .sync_progress
                    .zip(info.sync_rate_bytes)
                    .map(|(p, rate)| (1.0 - p) * meta.size as f64 / (rate.max(1)) as f64),
            });
        }
        if !primary_here && replicas[0].lag_bytes > 0 {
            let me = rstate
                .and_then(|s| s.replicas().find(|(n, _)| **n == self.cfg.node))
                .map(|(_, i)| i.caught_up_at);
            replicas[0].lag_seconds = me.map_or(0.0, |t| {
                crate::secondary::lag_seconds(r, written_back, t, now)
            });
        }
        let error = r
            .writeback_error()
            .map(|e| format!("writeback failing: {e}"))
            .or_else(|| r.repl_error.lock().expect("error lock").clone());
        pb::ResourceStatus {
            name: r.name().into(),
            size,
            role: role.as_str().into(),
            disk_state: disk_state.as_str().into(),
            primary: primary_node,
            // The current primary period, as far as this replica follows it
            // (a split-brained node keeps showing its own, deposed one).
            generation: if meta.split_brain {
                meta.generation
            } else {
                meta.generation
                    .max(rstate.and_then(|s| s.primary()).map_or(0, |p| p.generation))
            },
            split_brain,
            emergency: !dropped.is_empty()
                && (primary_here || dropped.contains_key(&self.cfg.node)),
            log: Some(log),
            replicas,
            backing: meta.backing.display().to_string(),
            log_bytes: r.log_bytes(),
            open_count: r.opens() as u32,
            error,
            device: self.devices.path_of(r.name()),
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
