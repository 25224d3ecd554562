//! Gossip links: this node keeps one outgoing connection to every other
//! member and sends its whole replicated state once per heartbeat. Peers
//! mark us connected when they hear from us; we mark them when we hear from
//! them (on their links to us). Dropped links are redialled with a backoff
//! capped at a few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::proto::{self, Message, Purpose};
use crate::cluster::{Cluster, HEARTBEAT};

pub async fn run(cluster: Arc<Cluster>) {
    let mut links: BTreeMap<String, (String, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    loop {
        let peers = cluster.peers();
        links.retain(|node, (addr, task)| {
            let keep = peers.iter().any(|(n, a)| n == node && a == addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for (node, addr) in peers {
            links.entry(node.clone()).or_insert_with(|| {
                let task = tokio::spawn(link(Arc::clone(&cluster), node, addr.clone()));
                (addr, task)
            });
        }
        // Biased: a fixed order of polls (a seed replays a simulation).
        tokio::select! {
            biased;
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = cluster.changed.notified() => {}
        }
    }
}

async fn link(cluster: Arc<Cluster>, node: String, addr: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match keep_link(&cluster, &node, &addr).await {
            Ok(()) => {}
            Err(e) => tracing::debug!(peer = %node, %addr, error = %e, "gossip link down"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn keep_link(cluster: &Arc<Cluster>, node: &str, addr: &str) -> proto::Result<()> {
    let (mut s, _) = proto::connect(
        &*cluster.net,
        addr,
        &cluster.hello(Purpose::Link),
        Some(node),
    )
    .await?;
    tracing::info!(peer = %node, %addr, "gossip link up");
    loop {
        let msg = Message::Gossip {
            state: Box::new(cluster.state()),
        };
        tokio::time::timeout(HEARTBEAT * 3, proto::write_frame(&mut s, &msg, &[]))
            .await
            .map_err(|_| {
                proto::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "send stalled",
                ))
            })??;
        // Biased: a fixed order of polls (a seed replays a simulation).
        tokio::select! {
            biased;
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = cluster.changed.notified() => {}
        }
    }
}

/// Pushes our state to every reachable member and waits for their
/// acknowledgements (bounded): used before a command that changed
/// membership returns.
pub async fn push_to_all(cluster: &Arc<Cluster>) -> Vec<String> {
    let hello = cluster.hello(Purpose::Rpc);
    let state = cluster.state();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, addr) in cluster.peers() {
        let (hello, msg) = (
            hello.clone(),
            Message::Gossip {
                state: Box::new(state.clone()),
            },
        );
        let net = Arc::clone(&cluster.net);
        tasks.spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                proto::call(&*net, &addr, &hello, Some(&node), &msg, &[]),
            )
            .await;
            (node, matches!(r, Ok(Ok(_))))
        });
    }
    let mut reached = Vec::new();
    while let Some(Ok((node, ok))) = tasks.join_next().await {
        if ok {
            reached.push(node);
        }
    }
    reached
}
