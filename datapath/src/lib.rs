//! mars datapath: a transaction log per resource, the logger that appends
//! writes to it, writeback to the backing device, the applicator that
//! replays logs in order, frontends (NBD), and the control API of `marsd`.

pub mod frontend;
