//! mars multi-host tests: every host is a network namespace with its own
//! `marsd`, state root and file-backed volumes; the hosts are joined by
//! veth pairs to a bridge in a "switch" namespace, so links can be cut,
//! made lossy or slow one host at a time.
//!
//! ```text
//!   mars-e2e-<pid>-<n>-switch:  br0 ── p-a ── p-b ── p-c        (bridge ports)
//!                                        │      │      │        (veth pairs)
//!   mars-e2e-<pid>-<n>-a: eth0 10.213.0.1   -b: 10.213.0.2   -c: 10.213.0.3
//! ```
//!
//! * [`cluster::Cluster`] builds that network (no address outside the
//!   namespaces it creates), starts one marsd per host through
//!   `ip netns exec` (`--listen 10.213.0.N:7000 --nbd 10.213.0.N:10809`) and
//!   tears everything down on `Drop`, also when a test panics: marsd killed,
//!   namespaces deleted, the temporary directory removed (kept, with the
//!   tail of every marsd's stderr printed, when the test failed).
//! * [`host::Host`] is one host: marsd start / `kill -9` / SIGTERM /
//!   SIGSTOP / SIGCONT, `marsadm` from the test's own namespace (it only
//!   needs the unix socket under `--root`), `view --json`.
//! * NBD: marsd serves NBD on the host's address inside its namespace. The
//!   test reaches it with [`netns::Netns::enter`]: a short-lived thread
//!   enters the namespace (`setns`), connects, and hands back the client;
//!   a socket stays in the namespace it was created in, so the test uses it
//!   from any thread afterwards. No route from the test's namespace needed.
//! * Faults: [`cluster::Cluster::cut`] / `restore` (the host's bridge port
//!   down/up: its eth0 loses carrier, like a pulled cable), loss and
//!   one-way drop with nftables (`numgen random mod 100 < N drop`, skipped
//!   when `nft` is missing), rate limits with `tc … tbf` on both ends of the
//!   host's link (this kernel has no sch_netem).
//! * [`workload`]: NBD writers with a model of the expected device;
//!   [`check`]: comparison of devices and the prefix checker.
//!
//! Tests first call [`cluster::start_or_skip`], which prints
//! `skipped: <reason>` and returns `None` without root, `ip netns` or the
//! marsd binaries, then run their body with [`cluster::run`] so that a
//! failure panics while the cluster is alive. Every wait is bounded.
//!
//! Environment:
//! * `MARS_SEED=N` replays the writes of a failed run (tests print the seed).
//! * `MARS_E2E_KEEP=1` keeps the temporary directory (roots, volumes,
//!   `marsd.stderr` per host) also when the test passes; a failed test
//!   always keeps it and prints where.
//! * The binaries are (re)built once per test process with
//!   `cargo build -p mars-datapath --bins` into the test's own target
//!   directory; `MARS_E2E_NO_BUILD=1` skips that, `MARS_BIN_DIR=DIR` uses
//!   `DIR/marsd` and `DIR/marsadm` instead.
//!
//! Needs root, iproute2 (`ip`, `tc`) and, for loss and one-way drops,
//! nftables (`nft`; those steps are skipped with a note without it).
//! A test process killed without unwinding leaves its namespaces behind;
//! its marsd processes die with it (parent-death signal) and the next run
//! deletes the namespaces of test processes that no longer exist.

pub mod bins;
pub mod chaos;
pub mod check;
pub mod cluster;
pub mod cmd;
pub mod host;
pub mod netns;
pub mod proxy;
pub mod workload;

/// The sync NBD client shared with the datapath's tests.
#[path = "../../datapath/tests/support/nbd_client.rs"]
pub mod nbd_client;
#[path = "../../datapath/tests/support/tagged_block.rs"]
pub mod tagged_block;

pub use cluster::{Cluster, run, start_or_skip};
pub use host::Host;
