//! Replication between marsd instances: the peer protocol, gossip links,
//! the peer server, log fetching and full sync.

pub mod fetcher;
pub mod fullsync;
pub mod links;
pub mod proto;
pub mod ratelimit;
pub mod server;
