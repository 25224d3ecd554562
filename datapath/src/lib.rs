//! mars datapath: a transaction log per resource, the logger that appends
//! writes to it, writeback to the backing device, the applicator that
//! replays logs in order, frontends (NBD, ublk), and the control API of `marsd`.

pub mod applicator;
pub mod cluster;
pub mod cluster_ops;
pub mod control;
pub mod devices;
pub mod exec;
pub mod frontend;
mod group_commit;
mod held;
pub mod log;
pub mod logger;
pub mod membership;
pub mod net;
pub mod node;
pub mod overlay;
pub mod quota;
pub mod replication;
pub mod resource;
pub mod secondary;
pub mod size;
pub mod storage;
mod writeback;
