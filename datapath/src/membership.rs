//! Cluster and resource metadata, replicated among all members without a
//! central server. Every entry is a last-writer-wins register stamped with a
//! Lamport clock (ties broken by node name): merging two states takes the
//! higher stamp per entry, which is commutative, associative and idempotent,
//! so gossip converges after any partition or restart. Entries about one
//! replica are written only by the node that holds it; removal leaves a
//! tombstone so that an old copy cannot bring an entry back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A Lamport timestamp; the higher one wins, ties broken by node name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Stamp {
    pub clock: u64,
    pub node: String,
}

/// A last-writer-wins register; `value: None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry<T> {
    pub stamp: Stamp,
    pub value: Option<T>,
}

impl<T: Clone> Entry<T> {
    /// Takes `other` if it is newer. Returns whether anything changed.
    fn merge(&mut self, other: &Entry<T>) -> bool {
        if other.stamp > self.stamp {
            *self = other.clone();
            true
        } else {
            false
        }
    }
}

fn merge_map<T: Clone>(
    mine: &mut BTreeMap<String, Entry<T>>,
    theirs: &BTreeMap<String, Entry<T>>,
) -> bool {
    let mut changed = false;
    for (k, e) in theirs {
        match mine.get_mut(k) {
            Some(m) => changed |= m.merge(e),
            None => {
                mine.insert(k.clone(), e.clone());
                changed = true;
            }
        }
    }
    changed
}

/// A cluster member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where its replication port is reached (`--advertise`, else `--listen`).
    pub addr: String,
}

/// Cluster-wide facts of a resource, written by its primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceConfig {
    pub size: u64,
}

/// The designated primary and its period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryInfo {
    pub node: String,
    pub generation: u64,
    /// Log position where this generation's history starts.
    pub start_pos: u64,
}

/// What one replica reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ReplicaInfo {
    /// "UpToDate" | "Inconsistent" | "Outdated" | "Detached"
    pub disk_state: String,
    /// End of the log it has (primary: appended and durable).
    pub fetched: u64,
    /// Everything before this log position is on its device; also the
    /// position from which it still needs logfiles.
    pub applied: u64,
    /// The log position its device must reach to be UpToDate after a full sync.
    pub sync_target: Option<u64>,
    /// Full sync progress 0..1 and rate, while a sync runs.
    pub sync_progress: Option<f64>,
    pub sync_rate_bytes: Option<u64>,
    /// Unix time (s) when it last applied everything it had fetched from the
    /// primary, for lag in seconds.
    pub caught_up_at: f64,
    /// This replica holds records of a deposed history past the fork point
    /// (an old primary that kept writing after a forced failover).
    #[serde(default)]
    pub split_brain: bool,
    /// How many log bytes past the fork point it holds.
    #[serde(default)]
    pub divergent_bytes: u64,
}

impl ReplicaInfo {
    /// Equal but for the positions and progress figures, which every
    /// replica re-sends at each heartbeat (no need to save them at once).
    fn same_but_positions(&self, other: &ReplicaInfo) -> bool {
        let strip = |i: &ReplicaInfo| ReplicaInfo {
            fetched: 0,
            applied: 0,
            caught_up_at: 0.0,
            sync_progress: None,
            sync_rate_bytes: None,
            ..i.clone()
        };
        strip(self) == strip(other)
    }
}

/// What a merge changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub any: bool,
    /// Something besides replica positions and progress changed (members,
    /// primary, config, a replica's state, added or removed).
    pub structural: bool,
}

impl Changes {
    fn add(&mut self, changed: bool, structural: bool) {
        self.any |= changed;
        self.structural |= changed && structural;
    }
}

/// Everything the cluster knows about one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResourceState {
    pub config: Option<Entry<ResourceConfig>>,
    pub primary: Option<Entry<PrimaryInfo>>,
    pub replicas: BTreeMap<String, Entry<ReplicaInfo>>,
    /// Emergency mode, written by the primary: replicas whose logfiles it
    /// gave up (node → the position they had applied). They need a full sync.
    #[serde(default)]
    pub dropped: Option<Entry<BTreeMap<String, u64>>>,
}

impl ResourceState {
    fn merge(&mut self, other: &ResourceState) -> Changes {
        let mut ch = Changes::default();
        ch.add(merge_opt(&mut self.config, &other.config), true);
        ch.add(merge_opt(&mut self.primary, &other.primary), true);
        ch.add(merge_opt(&mut self.dropped, &other.dropped), true);
        for (k, e) in &other.replicas {
            match self.replicas.get_mut(k) {
                Some(m) => {
                    let before = m.value.clone();
                    if m.merge(e) {
                        let positions_only = match (&before, &m.value) {
                            (Some(a), Some(b)) => a.same_but_positions(b),
                            (None, None) => true,
                            _ => false,
                        };
                        ch.add(true, !positions_only);
                    }
                }
                None => {
                    self.replicas.insert(k.clone(), e.clone());
                    ch.add(true, true);
                }
            }
        }
        ch
    }

    pub fn config(&self) -> Option<&ResourceConfig> {
        self.config.as_ref().and_then(|e| e.value.as_ref())
    }

    /// Replicas given up in emergency mode.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        self.dropped
            .as_ref()
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    }

    pub fn primary(&self) -> Option<&PrimaryInfo> {
        self.primary.as_ref().and_then(|e| e.value.as_ref())
    }

    /// Live replicas (without tombstones).
    pub fn replicas(&self) -> impl Iterator<Item = (&String, &ReplicaInfo)> {
        self.replicas
            .iter()
            .filter_map(|(n, e)| e.value.as_ref().map(|v| (n, v)))
    }
}

fn merge_opt<T: Clone>(mine: &mut Option<Entry<T>>, theirs: &Option<Entry<T>>) -> bool {
    match (mine.as_mut(), theirs) {
        (_, None) => false,
        (None, Some(t)) => {
            *mine = Some(t.clone());
            true
        }
        (Some(m), Some(t)) => m.merge(t),
    }
}

/// The replicated state of the whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub cluster_id: String,
    pub members: BTreeMap<String, Entry<Member>>,
    pub resources: BTreeMap<String, ResourceState>,
}

impl ClusterState {
    /// Merges a peer's state into ours. Returns what changed.
    /// States of different clusters never merge (the caller checks ids).
    pub fn merge(&mut self, other: &ClusterState) -> Changes {
        let mut ch = Changes::default();
        ch.add(merge_map(&mut self.members, &other.members), true);
        for (name, r) in &other.resources {
            let c = self.resources.entry(name.clone()).or_default().merge(r);
            ch.add(c.any, c.structural);
        }
        ch
    }

    /// The highest clock seen in this state, to advance our Lamport clock.
    pub fn max_clock(&self) -> u64 {
        let mut m = self
            .members
            .values()
            .map(|e| e.stamp.clock)
            .max()
            .unwrap_or(0);
        for r in self.resources.values() {
            for c in [
                r.config.as_ref().map(|e| e.stamp.clock),
                r.primary.as_ref().map(|e| e.stamp.clock),
            ]
            .into_iter()
            .flatten()
            {
                m = m.max(c);
            }
            m = m.max(
                r.replicas
                    .values()
                    .map(|e| e.stamp.clock)
                    .max()
                    .unwrap_or(0),
            );
        }
        m
    }

    pub fn members(&self) -> impl Iterator<Item = (&String, &Member)> {
        self.members
            .iter()
            .filter_map(|(n, e)| e.value.as_ref().map(|v| (n, v)))
    }

    pub fn resource(&self, name: &str) -> Option<&ResourceState> {
        self.resources.get(name)
    }
}

/// Our node's view and writer of the cluster state: a Lamport clock plus the state.
#[derive(Debug, Clone)]
pub struct Membership {
    pub node: String,
    clock: u64,
    pub state: ClusterState,
}

impl Membership {
    pub fn new(node: &str, state: ClusterState) -> Self {
        let clock = state.max_clock();
        Self {
            node: node.to_string(),
            clock,
            state,
        }
    }

    fn stamp(&mut self) -> Stamp {
        self.clock += 1;
        Stamp {
            clock: self.clock,
            node: self.node.clone(),
        }
    }

    fn entry<T>(&mut self, value: Option<T>) -> Entry<T> {
        Entry {
            stamp: self.stamp(),
            value,
        }
    }

    /// Merges a peer's state; our clock jumps past everything seen.
    pub fn merge(&mut self, other: &ClusterState) -> Changes {
        self.clock = self.clock.max(other.max_clock());
        self.state.merge(other)
    }

    pub fn set_member(&mut self, node: &str, member: Option<Member>) {
        let e = self.entry(member);
        self.state.members.insert(node.to_string(), e);
    }

    pub fn set_config(&mut self, resource: &str, config: Option<ResourceConfig>) {
        let e = self.entry(config);
        self.state
            .resources
            .entry(resource.to_string())
            .or_default()
            .config = Some(e);
    }

    pub fn set_primary(&mut self, resource: &str, primary: Option<PrimaryInfo>) {
        let e = self.entry(primary);
        self.state
            .resources
            .entry(resource.to_string())
            .or_default()
            .primary = Some(e);
    }

    /// The primary's list of replicas given up in emergency mode.
    pub fn set_dropped(&mut self, resource: &str, dropped: BTreeMap<String, u64>) {
        let e = self.entry(Some(dropped));
        self.state
            .resources
            .entry(resource.to_string())
            .or_default()
            .dropped = Some(e);
    }

    /// Our own replica's entry (only we write it); `None` removes it.
    pub fn set_replica(&mut self, resource: &str, info: Option<ReplicaInfo>) {
        let node = self.node.clone();
        let e = self.entry(info);
        self.state
            .resources
            .entry(resource.to_string())
            .or_default()
            .replicas
            .insert(node, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(n: u8) -> Option<Member> {
        Some(Member {
            addr: format!("10.0.0.{n}:7777"),
        })
    }

    /// Random updates on three nodes, exchanged in random order and
    /// repeatedly: every order of merging ends in the same state.
    #[derive(Debug, Clone)]
    enum Op {
        SetMember { by: usize, who: u8 },
        DelMember { by: usize, who: u8 },
        Replica { by: usize, applied: u64 },
        Primary { by: usize, generation: u64 },
        Gossip { from: usize, to: usize },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3, 0u8..4).prop_map(|(by, who)| Op::SetMember { by, who }),
            (0usize..3, 0u8..4).prop_map(|(by, who)| Op::DelMember { by, who }),
            (0usize..3, any::<u64>()).prop_map(|(by, applied)| Op::Replica { by, applied }),
            (0usize..3, 1u64..5).prop_map(|(by, generation)| Op::Primary { by, generation }),
            (0usize..3, 0usize..3).prop_map(|(from, to)| Op::Gossip { from, to }),
        ]
    }

    proptest! {
        #[test]
        fn gossip_converges_whatever_the_order(ops in proptest::collection::vec(arb_op(), 0..60)) {
            let mut nodes: Vec<Membership> = (0..3).map(|i| Membership::new(&format!("n{i}"), ClusterState::default())).collect();
            for op in ops {
                match op {
                    Op::SetMember { by, who } => nodes[by].set_member(&format!("m{who}"), member(who)),
                    Op::DelMember { by, who } => nodes[by].set_member(&format!("m{who}"), None),
                    Op::Replica { by, applied } => nodes[by].set_replica("r", Some(ReplicaInfo { applied, ..Default::default() })),
                    Op::Primary { by, generation } => {
                        let node = nodes[by].node.clone();
                        nodes[by].set_primary("r", Some(PrimaryInfo { node, generation, start_pos: 0 }))
                    }
                    Op::Gossip { from, to } => {
                        let s = nodes[from].state.clone();
                        nodes[to].merge(&s);
                    }
                }
            }
            // Full exchange, twice around: everyone ends equal.
            for _ in 0..2 {
                for from in 0..3 {
                    for to in 0..3 {
                        let s = nodes[from].state.clone();
                        nodes[to].merge(&s);
                    }
                }
            }
            prop_assert_eq!(&nodes[0].state, &nodes[1].state);
            prop_assert_eq!(&nodes[1].state, &nodes[2].state);
        }
    }

    #[test]
    fn a_tombstone_is_not_undone_by_an_older_copy() {
        let mut a = Membership::new("a", ClusterState::default());
        a.set_member("x", member(1));
        let old = a.state.clone();
        a.set_member("x", None);
        a.merge(&old);
        assert_eq!(a.state.members().count(), 0);
    }

    #[test]
    fn a_write_after_merging_wins_over_what_was_merged() {
        let mut a = Membership::new("a", ClusterState::default());
        let mut b = Membership::new("b", ClusterState::default());
        for _ in 0..10 {
            b.set_member("x", member(2));
        }
        a.merge(&b.state);
        a.set_member("x", member(1));
        b.merge(&a.state);
        assert_eq!(
            b.state.members().next().map(|(_, m)| m.addr.clone()),
            member(1).map(|m| m.addr)
        );
    }
}
