//! What a node does as a cluster member: joining a cluster and resources,
//! answering joiners, and the reconcile loop that publishes this node's
//! replica positions, keeps secondaries fetching and tells primaries which
//! logfiles other replicas still need.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::membership::{ClusterState, Member, PrimaryInfo, ReplicaInfo, ResourceConfig};
use crate::node::Node;
use crate::replication::proto::{self, Message, Purpose};
use crate::replication::{links, server};
use crate::resource::{self, Error, JoinPoint, Resource, Role};
use crate::secondary;

fn unix_now() -> f64 {
    crate::exec::unix_now().as_secs_f64()
}

/// Locks `m` unless someone holds it. For a task: a role change holds
/// the secondary runtime while it waits for the runtime's workers, which
/// in a simulation run on the same thread as the task (`crate::exec`).
fn try_lock<T>(m: &std::sync::Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::WouldBlock) => None,
        Err(std::sync::TryLockError::Poisoned(e)) => panic!("poisoned lock: {e}"),
    }
}

/// How often resources that failed to load are tried again.
const RETRY_BROKEN: Duration = Duration::from_secs(5);

impl Node {
    /// Starts the peer server on `listener` (a `tokio::net::TcpListener` in
    /// marsd; see `crate::net`), the gossip links and the reconcile loop.
    /// Needs a tokio runtime (marsd's is multi-threaded; the simulation
    /// runs each node on a current-thread one).
    pub fn start_replication(self: &Arc<Self>, listener: impl crate::net::Listener) {
        tokio::spawn(server::serve(Box::new(listener), Arc::clone(self)));
        tokio::spawn(links::run(Arc::clone(&self.cluster)));
        // Resources that failed to load are tried again now and then.
        let node = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETRY_BROKEN).await;
                if node.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                if node.has_broken() {
                    let n = Arc::clone(&node);
                    let _ = crate::exec::blocking(move || n.retry_broken()).await;
                }
            }
        });
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut caught_up = HashMap::new();
            loop {
                if node.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                node.reconcile(&mut caught_up);
                // Biased: a fixed order of polls (a seed replays a simulation).
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = node.cluster.changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
                    _ = node.cluster.progress.notified() => {}
                }
            }
        });
    }

    /// Publishes what this node has just done to a resource, durably, and
    /// pushes it to every reachable member.
    pub(crate) async fn announce(
        self: &Arc<Self>,
        f: impl FnOnce(&mut crate::membership::Membership),
    ) {
        self.cluster.update(true, f);
        links::push_to_all(&self.cluster).await;
    }

    /// Records a new resource created here (this node primary).
    pub async fn announce_created(self: &Arc<Self>, name: &str, size: u64) {
        let node = self.name().to_string();
        self.announce(|m| {
            m.set_config(name, Some(ResourceConfig { size }));
            m.set_primary(
                name,
                Some(PrimaryInfo {
                    node,
                    generation: 1,
                    start_pos: 0,
                }),
            );
            m.set_replica(
                name,
                Some(ReplicaInfo {
                    disk_state: "UpToDate".into(),
                    caught_up_at: unix_now(),
                    ..Default::default()
                }),
            );
        })
        .await;
    }

    /// `join-cluster ADDR`: becomes a member of the cluster of the node at ADDR.
    pub async fn join_cluster(self: &Arc<Self>, addr: &str) -> resource::Result<String> {
        let local: Vec<String> = self
            .resources
            .read()
            .expect("resources lock")
            .keys()
            .cloned()
            .collect();
        if !local.is_empty() {
            return Err(Error::Cluster(format!(
                "join-cluster needs a node without resources; {} has {}",
                self.name(),
                local.join(", ")
            )));
        }
        let mut hello = self.cluster.hello(Purpose::Rpc);
        hello.cluster.clear();
        let req = Message::JoinCluster {
            node: self.name().into(),
            addr: self.cluster.advertise.clone(),
        };
        let f = proto::call(&*self.cluster.net, addr, &hello, None, &req, &[])
            .await
            .map_err(|e| Error::Cluster(format!("joining the cluster at {addr}: {e}")))?;
        let Message::Joined { state } = f.msg else {
            return Err(Error::Cluster(format!(
                "joining the cluster at {addr}: unexpected answer"
            )));
        };
        let id = state.cluster_id.clone();
        self.cluster.adopt(*state);
        links::push_to_all(&self.cluster).await;
        let members = self.cluster.state().members().count();
        tracing::info!(cluster = %id, via = addr, members, "joined the cluster");
        Ok(format!(
            "{} joined cluster {id} through {addr}: {members} members",
            self.name()
        ))
    }

    /// Answers a fresh node that asks to join: adds it and makes sure every
    /// reachable member knows before answering.
    pub async fn accept_member(
        self: &Arc<Self>,
        joiner: &str,
        addr: &str,
    ) -> Result<ClusterState, String> {
        if joiner == self.name() {
            return Err(format!(
                "{joiner} is this node's own name: node names must be unique"
            ));
        }
        if let Some(existing) = self.cluster.addr_of(joiner)
            && existing != addr
            && self.cluster.connected(joiner)
        {
            return Err(format!("node {joiner} is already a member, at {existing}"));
        }
        let (joiner, addr) = (joiner.to_string(), addr.to_string());
        self.announce(|m| m.set_member(&joiner, Some(Member { addr: addr.clone() })))
            .await;
        tracing::info!(node = %joiner, %addr, "new cluster member");
        Ok(self.cluster.state())
    }

    /// `join-resource NAME PATH`: asks the cluster for the resource and its
    /// primary, creates the local replica and starts its full sync.
    pub async fn join_resource(
        self: &Arc<Self>,
        name: &str,
        path: &Path,
    ) -> resource::Result<String> {
        resource::validate_name(name)?;
        if self.resource(name).is_ok() {
            return Err(Error::AlreadyExists(name.into()));
        }
        // Ask every reachable member (not waiting for gossip).
        let hello = self.cluster.hello(Purpose::Rpc);
        let mut asks = tokio::task::JoinSet::new();
        for (node, addr) in self.cluster.peers() {
            let (hello, req) = (hello.clone(), Message::GetResource { name: name.into() });
            let net = Arc::clone(&self.cluster.net);
            asks.spawn(
                async move { proto::call(&*net, &addr, &hello, Some(&node), &req, &[]).await },
            );
        }
        let asked = asks.len();
        while let Some(r) = asks.join_next().await {
            if let Ok(Ok(f)) = r
                && let Message::ResourceIs { state } = f.msg
            {
                self.cluster.merge(&state);
            }
        }
        let state = self.cluster.state();
        let primary = state
            .resource(name)
            .and_then(|r| r.primary())
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{name} (asked {asked} cluster members)")))?;
        if primary.node == self.name() {
            return Err(Error::Cluster(format!(
                "{name}: the cluster names this node as primary, but it has no replica"
            )));
        }
        let addr = self.cluster.addr_of(&primary.node).ok_or_else(|| {
            Error::Cluster(format!(
                "{name}: no address known for its primary {}",
                primary.node
            ))
        })?;
        let backing = self.check_backing(name, path)?;
        let (join, size, lineage) = self.sync_start(name, &primary.node, &addr).await?;
        let start_pos = join.start_pos;
        let res = {
            let node = Arc::clone(self);
            let (name, backing) = (name.to_string(), backing.clone());
            crate::exec::blocking(move || {
                let _creating = node.create_lock.lock().expect("create lock");
                let r = Resource::create(
                    Arc::clone(&node.storage),
                    &node.cfg.root,
                    node.settings(),
                    Arc::clone(&node.quota),
                    &name,
                    &backing,
                    size,
                    Some(join),
                )?;
                r.store().adopt_lineage(lineage);
                node.resources
                    .write()
                    .expect("resources lock")
                    .insert(name, Arc::clone(&r));
                Ok::<_, Error>(r)
            })
            .await
            .map_err(|e| Error::Cluster(format!("join task failed: {e}")))??
        };
        let info = ReplicaInfo {
            disk_state: "Inconsistent".into(),
            applied: start_pos,
            fetched: 0,
            ..Default::default()
        };
        self.announce(|m| m.set_replica(name, Some(info))).await;
        self.ensure_secondary_runtime(&res);
        tracing::info!(resource = name, primary = %primary.node, pos = start_pos, "joined resource; full sync started");
        Ok(format!(
            "{name}: {} joined as a secondary of {}; full sync started at log position {start_pos}",
            self.name(),
            primary.node
        ))
    }

    /// `leave-resource NAME`: removes the local (secondary) replica; the
    /// backing device keeps its data. Blocking.
    pub fn leave_resource(&self, name: &str) -> resource::Result<String> {
        let res = self.resource(name)?;
        if res.logger().is_some() {
            return Err(Error::Cluster(format!(
                "{name} is primary on {}: hand the primary role to another replica first, or use delete-resource",
                self.name()
            )));
        }
        // Before the runtime is taken: the reconcile loop must not start a
        // new one on the directory removed below.
        res.retired.store(true, Ordering::Release);
        if let Some(rt) = res.secondary.lock().expect("secondary lock").take() {
            rt.stop();
        }
        resource::remove_dir(&*self.storage, &self.cfg.root, name)?;
        self.quota.release(res.log_bytes());
        self.resources.write().expect("resources lock").remove(name);
        self.cluster.update(true, |m| m.set_replica(name, None));
        tracing::info!(resource = name, "left resource");
        Ok(format!(
            "{} left {name}; its backing device is kept",
            self.name()
        ))
    }

    /// Publishes this node's replica positions, keeps secondaries running and
    /// tells primaries how far the other replicas have applied.
    fn reconcile(self: &Arc<Self>, caught_up: &mut HashMap<String, f64>) {
        self.cluster.save_if_due();
        let state = self.cluster.state();
        let now = unix_now();
        let resources: Vec<Arc<Resource>> = self
            .resources
            .read()
            .expect("resources lock")
            .values()
            .cloned()
            .collect();
        for res in resources {
            let name = res.name().to_string();
            let meta = res.meta();
            let c = res.counters();
            let primary_here = res.logger().is_some();
            let rstate = state.resource(&name);
            if let Some(p) = rstate.and_then(|r| r.primary())
                && p.node != self.cfg.node
                && self.follow_new_history(&res, p, primary_here)
            {
                continue;
            }
            let dropped = rstate.map(|r| r.dropped()).unwrap_or_default();
            if primary_here {
                self.keep_logs_for_replicas(&res, rstate, dropped);
            } else if meta.role == Role::Secondary {
                // A secondary keeps the logfiles the other replicas still
                // need too: after a handover it is the primary they fetch
                // from (design invariant 6).
                let need = rstate
                    .into_iter()
                    .flat_map(|r| r.replicas())
                    .filter(|(n, _)| **n != self.cfg.node && !dropped.contains_key(*n))
                    .map(|(_, i)| i.applied)
                    .min();
                res.set_delete_floor(need);
                if let Some(size) = rstate.and_then(|r| r.config()).map(|c| c.size)
                    && size > meta.size
                    && let Err(e) = res.update_meta(|m| m.size = size)
                {
                    tracing::warn!(resource = %name, error = %e, "recording the new size failed");
                }
                // A full sync copies the device of the primary it started
                // from: if another took over before the sync ended, the copy
                // may hold the deposed one's divergent tail. Start over from
                // the new primary (cheap: only differing chunks travel).
                let sync_deposed = meta.sync.is_some()
                    && rstate.and_then(|r| r.primary()).is_some_and(|p| {
                        p.node != self.cfg.node && p.generation != meta.generation
                    });
                // Given up when it had applied up to d: resync, unless it has
                // moved past d since (a full sync starts past it).
                let applied = c.written_back.load(Ordering::Acquire);
                let log_gone = res.log_gone.load(Ordering::Acquire);
                if (sync_deposed
                    || log_gone
                    || dropped.get(&self.cfg.node).is_some_and(|&d| applied <= d))
                    && !meta.fetch_paused
                    && !meta.disconnected
                    && !res.acting.swap(true, Ordering::AcqRel)
                {
                    // Resync by full sync (the log says which of the three).
                    let (node, res2) = (Arc::clone(self), Arc::clone(&res));
                    tokio::spawn(async move {
                        if sync_deposed {
                            tracing::warn!(resource = %res2.name(), "the primary changed during the full sync: starting it over");
                        } else if log_gone {
                            tracing::warn!(resource = %res2.name(), "the primary no longer has the log from this replica's position: full sync");
                        } else {
                            tracing::warn!(resource = %res2.name(), "the primary gave up our logfiles (emergency mode): full sync");
                        }
                        match node.invalidate(res2.name()).await {
                            Ok(_) => res2.log_gone.store(false, Ordering::Release),
                            Err(e) => {
                                *res2.repl_error.lock().expect("error lock") =
                                    Some(format!("resync: {e}"))
                            }
                        }
                        res2.acting.store(false, Ordering::Release);
                    });
                    continue;
                }
                // Busy: a role change holds it (and may be waiting for the
                // old runtime's workers): not now, the next round will.
                if let Some(mut rt) = try_lock(&res.secondary)
                    && rt.is_none()
                    && !res.retired.load(Ordering::Acquire)
                    && res.logger().is_none()
                    && !meta.split_brain
                    && meta.disk_state != resource::DiskState::Outdated
                    && rstate
                        .and_then(|r| r.primary())
                        .is_some_and(|p| p.node != self.cfg.node)
                {
                    *rt = Some(secondary::Runtime::start(
                        Arc::clone(&res),
                        Arc::clone(&self.cluster),
                    ));
                }
            }
            let applied = c.written_back.load(Ordering::Acquire);
            let primary_end = rstate.and_then(|r| {
                let p = r.primary()?;
                r.replicas()
                    .find(|(n, _)| **n == p.node)
                    .map(|(_, i)| i.fetched)
            });
            let behind = !primary_here && primary_end.is_none_or(|e| applied < e);
            let last = caught_up.entry(name.clone()).or_insert(now);
            if !behind {
                *last = now;
            }
            // Behind: the device is the primary's as of the moment it logged
            // the first record not applied here, if that record is fetched
            // (else: since we last saw ourselves caught up).
            let fetched = c.flushed.load(Ordering::Acquire);
            let current_as_of = if behind && fetched > applied {
                secondary::logged_at(&res, applied).unwrap_or(*last)
            } else {
                *last
            };
            let progress =
                res.sync_progress
                    .lock()
                    .expect("progress lock")
                    .map(|(done, total, t)| {
                        let secs = t.elapsed().as_secs_f64().max(0.001);
                        (
                            done as f64 / total.max(1) as f64,
                            (done as f64 / secs) as u64,
                        )
                    });
            let info = ReplicaInfo {
                split_brain: meta.split_brain,
                divergent_bytes: meta.divergent_bytes,
                disk_state: meta.disk_state.as_str().into(),
                fetched,
                applied,
                sync_target: meta.sync.and_then(|s| s.target),
                sync_progress: progress.map(|p| p.0),
                sync_rate_bytes: progress.map(|p| p.1),
                caught_up_at: current_as_of,
            };
            let published = rstate
                .and_then(|r| r.replicas.get(&self.cfg.node))
                .and_then(|e| e.value.clone());
            let stale = match &published {
                None => true,
                Some(p) => {
                    let mut p2 = p.clone();
                    p2.caught_up_at = info.caught_up_at;
                    p2 != info || (!behind && now - p.caught_up_at > 5.0)
                }
            };
            if stale {
                self.cluster
                    .update(false, |m| m.set_replica(&name, Some(info)));
            }
        }
    }
}

impl Node {
    /// `primary NAME`: this node takes the primary role, in a new generation.
    /// Refused while another node is the designated primary (planned
    /// handover comes with the next milestone) and while any replica reports
    /// more of the log than this one has applied.
    pub async fn make_primary(self: &Arc<Self>, name: &str) -> resource::Result<String> {
        let res = self.resource(name)?;
        let state = self.cluster.state();
        let rstate = state.resource(name);
        if let Some(p) = rstate.and_then(|r| r.primary())
            && p.node != self.cfg.node
        {
            return self.take_over(&res, &p.node).await;
        }
        let applied = res.counters().written_back.load(Ordering::Acquire);
        if res.logger().is_none()
            && let Some((node, ahead)) = rstate
                .into_iter()
                .flat_map(|r| r.replicas())
                .filter(|(n, _)| **n != self.cfg.node)
                .map(|(n, i)| (n.clone(), i.fetched.max(i.applied)))
                .find(|(_, pos)| *pos > applied)
        {
            return Err(Error::Cluster(format!(
                "{name}: replica {node} has the log up to {ahead}, this one only up to {applied}: wait until it has caught up"
            )));
        }
        let generation = {
            let res = Arc::clone(&res);
            let known = rstate.and_then(|r| r.primary()).map_or(0, |p| p.generation);
            crate::exec::blocking(move || {
                res.make_primary(known + 1)?;
                Ok::<_, Error>(res.meta().generation)
            })
            .await
            .map_err(|e| Error::Cluster(format!("role change failed: {e}")))??
        };
        let start_pos = res.counters().appended.load(Ordering::Acquire);
        let note = self.became_primary(name, generation, start_pos).await;
        Ok(format!(
            "{name} is primary on {} (generation {generation}){note}",
            self.cfg.node
        ))
    }

    /// `secondary NAME`: gives up the primary role (refused while in use).
    pub async fn make_secondary(self: &Arc<Self>, name: &str) -> resource::Result<String> {
        let res = self.resource(name)?;
        let was_primary = res.logger().is_some();
        {
            let node = Arc::clone(self);
            let n2 = name.to_string();
            crate::exec::blocking(move || node.release_device(&n2))
                .await
                .map_err(|e| Error::Cluster(format!("role change failed: {e}")))??;
        }
        {
            let res = Arc::clone(&res);
            crate::exec::blocking(move || res.make_secondary())
                .await
                .map_err(|e| Error::Cluster(format!("role change failed: {e}")))??;
        }
        let designated = self
            .cluster
            .state()
            .resource(name)
            .and_then(|r| r.primary())
            .is_some_and(|p| p.node == self.cfg.node);
        if was_primary || designated {
            self.announce(|m| m.set_primary(name, None)).await;
        }
        Ok(format!("{name} is secondary on {}", self.cfg.node))
    }
}

/// How long a handover target may take to catch up with the old primary.
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(120);

impl Node {
    /// Planned handover, on the target: asks the current primary to stop,
    /// catches up to where its log ends, then becomes primary.
    async fn take_over(
        self: &Arc<Self>,
        res: &Arc<Resource>,
        old: &str,
    ) -> resource::Result<String> {
        let name = res.name().to_string();
        if res.meta().disk_state != resource::DiskState::UpToDate {
            return Err(Error::Cluster(format!(
                "{name} is {} on {}: only an UpToDate replica can become primary",
                res.meta().disk_state.as_str(),
                self.cfg.node
            )));
        }
        // It could never catch up: the primary no longer has the log from
        // its position (a full sync comes first). Refused before the primary
        // is asked to stop (a handover waited its full time for it,
        // sim_cluster seed 106813077626699214).
        if res.log_gone.load(Ordering::Acquire) {
            return Err(Error::Cluster(format!(
                "{name} on {} needs a full sync first ({old} no longer has the log from its position): not taking over",
                self.cfg.node
            )));
        }
        let addr = self.cluster.addr_of(old).ok_or_else(|| {
            Error::Cluster(format!("{name}: no address known for its primary {old}"))
        })?;
        if !self.cluster.connected(old) {
            return Err(Error::Cluster(format!(
                "{name}: its primary {old} is unreachable; a planned handover needs it (forced failover: primary --force)"
            )));
        }
        let req = Message::Handover {
            resource: name.clone(),
            to: self.cfg.node.clone(),
        };
        let f = proto::call(
            &*self.cluster.net,
            &addr,
            &self.cluster.hello(Purpose::Rpc),
            Some(old),
            &req,
            &[],
        )
        .await
        .map_err(|e| match e {
            proto::Error::Io(e) => Error::Cluster(format!(
                "{name}: its primary {old} is unreachable ({e}): a planned handover needs it; `marsadm primary {name} --force` fails over without it"
            )),
            e => Error::Cluster(format!("{name}: handover from {old}: {e}")),
        })?;
        let Message::HandedOver { end_pos, .. } = f.msg else {
            return Err(Error::Cluster(format!(
                "{name}: unexpected answer from {old}"
            )));
        };
        tracing::info!(resource = %name, from = old, end_pos, "primary stopped for handover; catching up");
        let deadline = tokio::time::Instant::now() + HANDOVER_CATCH_UP;
        loop {
            if res.counters().written_back.load(Ordering::Acquire) >= end_pos {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Cluster(format!(
                    "{name}: {old} stopped at log position {end_pos}, but this node applied only {} within {}s; run `marsadm primary {name}` again",
                    res.counters().written_back.load(Ordering::Acquire),
                    HANDOVER_CATCH_UP.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let known = self
            .cluster
            .state()
            .resource(&name)
            .and_then(|r| r.primary())
            .map_or(0, |p| p.generation);
        let generation = {
            let res = Arc::clone(res);
            crate::exec::blocking(move || {
                res.make_primary(known + 1)?;
                Ok::<_, Error>(res.meta().generation)
            })
            .await
            .map_err(|e| Error::Cluster(format!("role change failed: {e}")))??
        };
        let note = self.became_primary(&name, generation, end_pos).await;
        tracing::info!(resource = %name, from = old, generation, "handover complete: primary here");
        Ok(format!(
            "{name} is primary on {} (generation {generation}), handed over from {old}{note}",
            self.cfg.node
        ))
    }

    /// Planned handover, on the old primary: stop taking writes (clients get
    /// errors and are disconnected), make the log durable, become secondary.
    /// Returns where the log ends.
    pub async fn hand_over(self: &Arc<Self>, name: &str, to: &str) -> resource::Result<(u64, u64)> {
        let res = self.resource(name)?;
        let r2 = Arc::clone(&res);
        let node = Arc::clone(self);
        let n2 = name.to_string();
        crate::exec::blocking(move || {
            node.release_device(&n2)?;
            r2.stop_for_handover()
        })
        .await
        .map_err(|e| Error::Cluster(format!("handover failed: {e}")))??;
        let end = res.counters().flushed.load(Ordering::Acquire);
        tracing::info!(
            resource = name,
            to,
            end_pos = end,
            "handing over: stopped taking writes"
        );
        Ok((end, res.meta().generation))
    }
}

impl Node {
    /// After any promotion here (`primary`, handover, `--force`): tells the
    /// cluster this node is primary of `name` from `start_pos` in
    /// `generation`, then brings the ublk device up if `--ublk` wants it.
    /// Returns the device note for the command's reply.
    async fn became_primary(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
        start_pos: u64,
    ) -> String {
        let node = self.cfg.node.clone();
        self.announce(|m| {
            m.set_primary(
                name,
                Some(PrimaryInfo {
                    node,
                    generation,
                    start_pos,
                }),
            )
        })
        .await;
        let me = Arc::clone(self);
        let n2 = name.to_string();
        crate::exec::blocking(move || me.auto_device(&n2))
            .await
            .unwrap_or_default()
    }
}

/// Steering commands: synchronous, idempotent, persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    PauseFetch,
    ResumeFetch,
    PauseReplay,
    ResumeReplay,
    Disconnect,
    Connect,
}

impl Node {
    pub async fn steer(self: &Arc<Self>, name: &str, what: Steer) -> resource::Result<String> {
        let res = self.resource(name)?;
        res.update_meta(|m| match what {
            Steer::PauseFetch => m.fetch_paused = true,
            Steer::ResumeFetch => m.fetch_paused = false,
            Steer::PauseReplay => m.replay_paused = true,
            Steer::ResumeReplay => m.replay_paused = false,
            Steer::Disconnect => m.disconnected = true,
            Steer::Connect => m.disconnected = false,
        })?;
        match what {
            Steer::PauseFetch | Steer::Disconnect => {
                let fetcher = res
                    .secondary
                    .lock()
                    .expect("secondary lock")
                    .as_mut()
                    .and_then(|rt| rt.take_fetcher());
                if let Some(f) = fetcher {
                    f.abort();
                    let _ = f.await;
                }
            }
            Steer::ResumeFetch | Steer::Connect => {
                if let Some(rt) = res.secondary.lock().expect("secondary lock").as_mut() {
                    rt.resume_fetch(Arc::clone(&res), Arc::clone(&self.cluster));
                }
            }
            Steer::PauseReplay => {
                // Wait for a batch being applied right now.
                let r = Arc::clone(&res);
                let _ = crate::exec::blocking(move || drop(r.apply_lock.lock())).await;
            }
            Steer::ResumeReplay => {}
        }
        let m = res.meta();
        Ok(format!(
            "{name}: fetch {}, replay {}, links {}",
            if m.fetch_paused { "paused" } else { "on" },
            if m.replay_paused { "paused" } else { "on" },
            if m.disconnected {
                "disconnected"
            } else {
                "connected"
            }
        ))
    }
}

impl Node {
    /// Reacts to a designated primary elsewhere in a newer generation than
    /// this replica's log: a deposed primary stops taking writes (and is in
    /// split brain if it logged past the fork point); a secondary that
    /// fetched records of the deposed history cuts them off, or, if it
    /// applied them, is Outdated until `invalidate`. Returns true while an
    /// action runs (the resource is skipped this round).
    fn follow_new_history(
        self: &Arc<Self>,
        res: &Arc<Resource>,
        p: &PrimaryInfo,
        primary_here: bool,
    ) -> bool {
        let meta = res.meta();
        // `p` is another node: in our generation too it was forced primary
        // concurrently, and the cluster state chose it.
        let deposed = primary_here && meta.generation <= p.generation;
        let fork = res.fork_from(p);
        let end = res.log_end();
        let stale_tail = !primary_here && !meta.split_brain && fork.is_some();
        if !deposed && !stale_tail {
            return res.acting.load(Ordering::Acquire);
        }
        if res.acting.swap(true, Ordering::AcqRel) {
            return true;
        }
        let (res, p) = (Arc::clone(res), p.clone());
        let name = res.name().to_string();
        let node = Arc::clone(self);
        crate::exec::blocking(move || {
            if deposed && let Some(fork) = fork {
                // It holds records past the fork already: split brain, said
                // before its role turns secondary (stopping the logger may
                // take a while), so that it never shows as a consistent
                // secondary meanwhile (sim_cluster seeds 274, 382).
                if let Err(e) = res.record_split_brain(end - fork) {
                    tracing::error!(resource = %name, error = %e, "recording the split brain failed");
                }
            }
            let result = if deposed {
                tracing::warn!(resource = %name, new_primary = %p.node, generation = p.generation, "a newer primary exists: this node stops taking writes");
                // Its device goes unless something holds it (then its I/O fails
                // from now on, and `down` removes it once released).
                if let Err(e) = node.release_device(&name) {
                    tracing::warn!(resource = %name, error = %e, "ublk device kept");
                }
                res.stop_for_handover().map(|()| res.log_end())
            } else {
                Ok(end)
            };
            let outcome = result.and_then(|end| {
                // The applier runs ahead of its persisted position
                // (`written_back`): stop it first, so that the position
                // compared with the fork is all the device holds.
                if !deposed
                    && let Some(rt) = res.secondary.lock().expect("secondary lock").take()
                {
                    rt.stop();
                }
                // Not the persisted position alone: a failed persist
                // leaves it behind what the device holds.
                let applied = res.device_end();
                // Asked again now that writes have stopped.
                let Some(fork) = res.fork_from(&p) else {
                    return Ok(());
                };
                if end <= fork {
                    Ok(())
                } else if !deposed && applied <= fork {
                    tracing::warn!(resource = %name, fork, end, "fetched records of a deposed history: cutting them off");
                    res.truncate_log(fork)
                } else {
                    tracing::error!(resource = %name, fork, end, new_primary = %p.node, "SPLIT BRAIN: this replica holds {} bytes of a deposed history; run `marsadm invalidate {name}` here (or leave-resource)", end - fork);
                    res.record_split_brain(end - fork)
                }
            });
            if let Err(e) = outcome {
                tracing::error!(resource = %name, error = %e, "following the new primary failed");
                *res.repl_error.lock().expect("error lock") = Some(e.to_string());
            }
            res.acting.store(false, Ordering::Release);
        });
        true
    }

    /// `primary NAME --force`: on a secondary whose primary is gone, applies
    /// every complete record it has and starts a new generation there.
    pub async fn force_primary(self: &Arc<Self>, name: &str) -> resource::Result<String> {
        let res = self.resource(name)?;
        if res.logger().is_some() {
            return Ok(format!("{name} is already primary on {}", self.cfg.node));
        }
        let meta = res.meta();
        if meta.disk_state != resource::DiskState::UpToDate || meta.split_brain {
            return Err(Error::Cluster(format!(
                "{name} is {}{} on {}: refusing to force it primary",
                meta.disk_state.as_str(),
                if meta.split_brain {
                    " (split brain)"
                } else {
                    ""
                },
                self.cfg.node
            )));
        }
        let known = self
            .cluster
            .primary_of(name)
            .map_or(meta.generation, |p| p.generation.max(meta.generation));
        let r2 = Arc::clone(&res);
        let (end, generation) = crate::exec::blocking(move || {
            let end = r2.apply_everything_fetched()?;
            r2.make_primary(known + 1)?;
            Ok::<_, Error>((end, r2.meta().generation))
        })
        .await
        .map_err(|e| Error::Cluster(format!("role change failed: {e}")))??;
        let note = self.became_primary(name, generation, end).await;
        tracing::warn!(
            resource = name,
            generation,
            pos = end,
            "FORCED primary: a new history starts here"
        );
        Ok(format!(
            "{name} is primary on {} by force (generation {generation}, from log position {end}){note}",
            self.cfg.node
        ))
    }

    /// `invalidate NAME`: a non-primary replica (a split-brained old primary
    /// included) discards its log and resyncs from the current primary by
    /// fast full sync.
    pub async fn invalidate(self: &Arc<Self>, name: &str) -> resource::Result<String> {
        let res = self.resource(name)?;
        if res.logger().is_some() {
            return Err(Error::Cluster(format!(
                "{name} is primary on {}: invalidate works on other replicas",
                self.cfg.node
            )));
        }
        let p = self
            .cluster
            .primary_of(name)
            .filter(|p| p.node != self.cfg.node)
            .ok_or_else(|| {
                Error::Cluster(format!("{name}: no other node is primary to resync from"))
            })?;
        let addr = self
            .cluster
            .addr_of(&p.node)
            .ok_or_else(|| Error::Cluster(format!("{name}: no address for {}", p.node)))?;
        let (join, _, lineage) = self.sync_start(name, &p.node, &addr).await?;
        let start_pos = join.start_pos;
        let r2 = Arc::clone(&res);
        crate::exec::blocking(move || r2.reset_for_full_sync(join, lineage))
            .await
            .map_err(|e| Error::Cluster(format!("invalidate failed: {e}")))??;
        let info = ReplicaInfo {
            disk_state: "Inconsistent".into(),
            applied: start_pos,
            ..Default::default()
        };
        self.announce(|m| m.set_replica(name, Some(info))).await;
        self.ensure_secondary_runtime(&res);
        Ok(format!(
            "{name}: {} discards its log and resyncs from {} (full sync from log position {start_pos})",
            self.cfg.node, p.node
        ))
    }
}

impl Node {
    /// Starts the fetcher and applier of a secondary unless they run.
    /// If a role change holds the runtime now, the reconcile loop starts it
    /// later.
    fn ensure_secondary_runtime(&self, res: &Arc<Resource>) {
        let Some(mut rt) = try_lock(&res.secondary) else {
            return;
        };
        if rt.is_none() && !res.retired.load(Ordering::Acquire) && res.logger().is_none() {
            *rt = Some(secondary::Runtime::start(
                Arc::clone(res),
                Arc::clone(&self.cluster),
            ));
        }
    }
}

impl Node {
    /// On the primary: logfiles stay until every other replica has applied
    /// them. Emergency mode: when writers wait for log space that a lagging
    /// replica holds, the primary gives that replica's logfiles up (it then
    /// needs a full sync, visibly) rather than stop serving writes.
    fn keep_logs_for_replicas(
        &self,
        res: &Arc<Resource>,
        rstate: Option<&crate::membership::ResourceState>,
        mut dropped: std::collections::BTreeMap<String, u64>,
    ) {
        let name = res.name().to_string();
        // A given-up replica that reports a position past the one it was
        // given up at has started its full sync (the pin of that sync keeps
        // its logfiles now): it is back.
        let resynced: Vec<String> = rstate
            .into_iter()
            .flat_map(|r| r.replicas())
            .filter(|(n, i)| dropped.get(*n).is_some_and(|&d| i.applied > d))
            .map(|(n, _)| n.clone())
            .collect();
        if !resynced.is_empty() {
            for n in &resynced {
                dropped.remove(n);
            }
            let d = dropped.clone();
            self.cluster.update(true, |m| m.set_dropped(&name, d));
        }
        let others: Vec<(String, u64)> = rstate
            .into_iter()
            .flat_map(|r| r.replicas())
            .filter(|(n, _)| **n != self.cfg.node && !dropped.contains_key(*n))
            .map(|(n, i)| (n.clone(), i.applied))
            .collect();
        let need = others.iter().map(|(_, a)| *a).min();
        res.set_delete_floor(need);
        let written_back = res.counters().written_back.load(Ordering::Acquire);
        if self.quota.waiting() == 0 {
            return;
        }
        // Writers wait for log space: free what may go now.
        if let Err(e) = res.log_delete() {
            tracing::warn!(resource = %name, error = %e, "deleting logfiles for waiting writers failed");
        }
        if need.is_none_or(|n| n >= written_back) {
            return;
        }
        let Some((laggard, applied)) = others.iter().min_by_key(|(_, a)| *a).cloned() else {
            return;
        };
        tracing::error!(
            resource = %name, replica = %laggard, applied, written_back,
            "EMERGENCY: log space is exhausted; giving up the logfiles replica {laggard} still needs: it will need a full sync"
        );
        res.unpin(&laggard);
        let need = others
            .iter()
            .filter(|(n, _)| *n != laggard)
            .map(|(_, a)| *a)
            .min();
        dropped.insert(laggard, applied);
        self.cluster.update(true, |m| m.set_dropped(&name, dropped));
        res.set_delete_floor(need);
        if let Err(e) = res.log_delete() {
            tracing::warn!(resource = %name, error = %e, "deleting given-up logfiles failed");
        }
    }
}

impl Node {
    /// Asks the primary to start a full sync for this node: it pins its log
    /// there. Returns where the sync starts, the device size and the
    /// lineage of the primary's log up to there.
    async fn sync_start(
        &self,
        name: &str,
        primary: &str,
        addr: &str,
    ) -> resource::Result<(JoinPoint, u64, crate::log::Lineage)> {
        let req = Message::SyncStart {
            resource: name.into(),
            node: self.cfg.node.clone(),
        };
        let f = proto::call(
            &*self.cluster.net,
            addr,
            &self.cluster.hello(Purpose::Rpc),
            Some(primary),
            &req,
            &[],
        )
        .await
        .map_err(|e| {
            Error::Cluster(format!(
                "{name}: asking its primary {primary} at {addr}: {e}"
            ))
        })?;
        match f.msg {
            Message::SyncStarted {
                start_pos,
                size,
                generation,
                next_seq,
                lineage,
            } => Ok((
                JoinPoint {
                    start_pos,
                    next_seq,
                    generation,
                },
                size,
                crate::log::Lineage::new(lineage),
            )),
            _ => Err(Error::Cluster(format!(
                "{name}: unexpected answer from its primary {primary}"
            ))),
        }
    }
}
