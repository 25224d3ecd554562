//! This node's membership in a cluster: the replicated state (persisted in
//! `ROOT/cluster.json`), when each peer was last heard from, and the hello
//! this node sends.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's: simulated time in a simulation, else the real clock.
use tokio::time::Instant;

use crate::membership::{ClusterState, Member, Membership};
use crate::replication::proto::{Hello, PROTOCOL_VERSION, Purpose};
use crate::storage::Storage;

/// A peer is connected if heard from within this time.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often links send their state (a heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

pub const CLUSTER_FILE: &str = "cluster.json";
/// A merge that changed only replica positions is saved at most this often:
/// every replica re-sends its positions with each heartbeat, and a save
/// (temp file, fsync, rename, fsync dir) per gossip message would put
/// syncs on the gossip path and on the disk the log shares.
const POSITIONS_SAVE_INTERVAL: Duration = Duration::from_secs(2);

pub struct Cluster {
    pub node: String,
    pub advertise: String,
    /// What this node sends compressed, and so offers in its hellos
    /// (`--ship-compression`).
    pub compression: crate::replication::proto::Compression,
    /// How this node dials its peers (real TCP but in simulations).
    pub net: Arc<dyn crate::net::Network>,
    storage: Arc<dyn Storage>,
    path: PathBuf,
    membership: Mutex<Membership>,
    heard: Mutex<HashMap<String, Instant>>,
    persist_lock: Mutex<()>,
    /// When the state was last saved, and whether it changed since.
    saved: Mutex<(Instant, bool)>,
    /// Wakes whoever waits for a state change (links, resources).
    pub changed: tokio::sync::Notify,
    /// A local replica's position moved (its applier persisted): wakes the
    /// reconcile loop, which publishes it, so that peers see positions
    /// within milliseconds rather than at the next heartbeat.
    pub progress: tokio::sync::Notify,
}

fn random_id(node: &str) -> String {
    let mut b = [0u8; 16];
    if crate::exec::simulated() {
        // A seed replays a simulation: unique enough there.
        b.copy_from_slice(&blake3::hash(node.as_bytes()).as_bytes()[..16]);
    } else if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Cluster {
    /// Loads the cluster state of this root, or starts a new one-node
    /// cluster. The node's own member entry always carries `advertise`.
    pub fn open(
        storage: Arc<dyn Storage>,
        root: &std::path::Path,
        node: &str,
        advertise: &str,
    ) -> std::io::Result<Cluster> {
        let path = root.join(CLUSTER_FILE);
        let state: ClusterState = if storage.exists(&path) {
            serde_json::from_slice(&storage.read_file(&path)?)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?
        } else {
            ClusterState {
                cluster_id: random_id(node),
                ..Default::default()
            }
        };
        let mut m = Membership::new(node, state);
        let current = m.state.members.get(node).and_then(|e| e.value.clone());
        if current.as_ref().map(|c| c.addr.as_str()) != Some(advertise) {
            m.set_member(
                node,
                Some(Member {
                    addr: advertise.to_string(),
                }),
            );
        }
        let c = Cluster {
            node: node.into(),
            advertise: advertise.into(),
            compression: Default::default(),
            net: Arc::new(crate::net::Tcp),
            storage,
            path,
            membership: Mutex::new(m),
            heard: Mutex::new(HashMap::new()),
            persist_lock: Mutex::new(()),
            saved: Mutex::new((Instant::now(), false)),
            changed: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
        };
        c.persist();
        Ok(c)
    }

    pub fn cluster_id(&self) -> String {
        self.membership
            .lock()
            .expect("membership lock")
            .state
            .cluster_id
            .clone()
    }

    pub fn hello(&self, purpose: Purpose) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            cluster: self.cluster_id(),
            node: self.node.clone(),
            advertise: self.advertise.clone(),
            purpose,
            compression: self.compression.offer(),
        }
    }

    /// A copy of the replicated state.
    pub fn state(&self) -> ClusterState {
        self.membership
            .lock()
            .expect("membership lock")
            .state
            .clone()
    }

    fn persist(&self) {
        // One save at a time, state taken inside: concurrent saves would share
        // the temporary file, and an older state could overwrite a newer one.
        let _saving = self.persist_lock.lock().expect("persist lock");
        *self.saved.lock().expect("saved lock") = (Instant::now(), false);
        let bytes =
            serde_json::to_vec_pretty(&self.membership.lock().expect("membership lock").state)
                .expect("state serializes");
        if let Err(e) = self.storage.write_atomic(&self.path, &bytes) {
            tracing::error!(error = %e, file = %self.path.display(), "persisting cluster state failed");
        }
    }

    /// Changes our state (and persists it if `durable`).
    pub fn update<T>(&self, durable: bool, f: impl FnOnce(&mut Membership) -> T) -> T {
        let r = f(&mut self.membership.lock().expect("membership lock"));
        if durable {
            self.persist();
        }
        self.changed.notify_waiters();
        r
    }

    /// Merges a peer's state; wakes waiters if it changed and persists it,
    /// at once if more than positions changed, else at most every
    /// [`POSITIONS_SAVE_INTERVAL`] (see [`Cluster::save_if_due`]).
    pub fn merge(&self, other: &ClusterState) -> bool {
        let changes = {
            let mut m = self.membership.lock().expect("membership lock");
            if m.state.cluster_id != other.cluster_id {
                return false;
            }
            m.merge(other)
        };
        if changes.structural {
            self.persist();
        } else if changes.any {
            self.saved.lock().expect("saved lock").1 = true;
            self.save_if_due();
        }
        if changes.any {
            self.changed.notify_waiters();
        }
        changes.any
    }

    /// Saves merged positions that are not saved yet, if the last save is
    /// older than [`POSITIONS_SAVE_INTERVAL`].
    pub fn save_if_due(&self) {
        let due = {
            let s = self.saved.lock().expect("saved lock");
            s.1 && s.0.elapsed() >= POSITIONS_SAVE_INTERVAL
        };
        if due {
            self.persist();
        }
    }

    /// Becomes a member of another cluster (join-cluster): its id and state.
    pub fn adopt(&self, other: ClusterState) {
        {
            let mut m = self.membership.lock().expect("membership lock");
            *m = Membership::new(&self.node, other);
            m.set_member(
                &self.node.clone(),
                Some(Member {
                    addr: self.advertise.clone(),
                }),
            );
        }
        self.persist();
        self.changed.notify_waiters();
    }

    /// The designated primary of a resource, as known here.
    pub fn primary_of(&self, resource: &str) -> Option<crate::membership::PrimaryInfo> {
        self.membership
            .lock()
            .expect("membership lock")
            .state
            .resource(resource)
            .and_then(|r| r.primary())
            .cloned()
    }

    pub fn heard_from(&self, node: &str) {
        self.heard
            .lock()
            .expect("heard lock")
            .insert(node.to_string(), Instant::now());
    }

    /// Heard from within [`PEER_TIMEOUT`] (ourselves: always).
    pub fn connected(&self, node: &str) -> bool {
        node == self.node
            || self
                .heard
                .lock()
                .expect("heard lock")
                .get(node)
                .is_some_and(|t| t.elapsed() < PEER_TIMEOUT)
    }

    /// Other members and their addresses.
    pub fn peers(&self) -> Vec<(String, String)> {
        self.membership
            .lock()
            .expect("membership lock")
            .state
            .members()
            .filter(|(n, _)| **n != self.node)
            .map(|(n, m)| (n.clone(), m.addr.clone()))
            .collect()
    }

    pub fn addr_of(&self, node: &str) -> Option<String> {
        self.membership
            .lock()
            .expect("membership lock")
            .state
            .members()
            .find(|(n, _)| *n == node)
            .map(|(_, m)| m.addr.clone())
    }
}
