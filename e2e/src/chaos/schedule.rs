//! Seed → schedule. A schedule is a list of abstract steps fixed by the
//! seed alone (same seed, same list, printed at the start of a run); the
//! runner maps each step's host picks onto the cluster as it finds it
//! (e.g. "a secondary that is up"), so a step whose target does not exist
//! at that moment is skipped and said so.
//!
//! The named scenarios of issue 5 are fixed step lists with seeded
//! parameters (durations, which host, when to kill).

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One step. `pick` values choose among the eligible hosts at run time
/// (`pick % eligible.len()`); hosts by index are `a`, `b`, `c`.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Let the workload run.
    Run { ms: u64 },
    /// `kill -9` marsd on any host (`pick` over all hosts that are up);
    /// a secondary stays down for `down` steps (0: restarted at once).
    Kill { pick: u8, down: u8 },
    /// `kill -9` host `host` (by index) and keep it down for `down` steps.
    KillHost { host: u8, down: u8 },
    /// SIGTERM (must exit 0) and start again after `down` steps.
    Term { pick: u8, down: u8 },
    /// Pull a host's cable for `steps` steps.
    Cut { pick: u8, steps: u8 },
    /// Blackhole the path between two hosts.
    CutBetween { x: u8, y: u8, steps: u8 },
    /// nftables: drop everything one way.
    OneWay { pick: u8, inbound: bool, steps: u8 },
    /// nftables: random loss both ways.
    Loss { pick: u8, pct: u8, steps: u8 },
    /// tbf on both ends of a host's link.
    Rate { pick: u8, kbit: u32, steps: u8 },
    /// Every chunk on every peer connection to a host waits a random
    /// 0..=`ms` ms in its proxy (delay, jitter, reordering across
    /// connections).
    Delay { pick: u8, ms: u32, steps: u8 },
    /// `marsadm primary` on a secondary; with `kill_ms`, `kill -9` one of
    /// the hosts (`kill_pick` over all) that many ms into the handover.
    Handover {
        pick: u8,
        kill_ms: Option<u64>,
        kill_pick: u8,
    },
    /// Forced failover to a secondary: the primary is killed (`by_kill`) or
    /// cut off while its writers keep writing for `keep_writing_ms`; then
    /// it comes back, must report split brain if it logged past the fork,
    /// and is invalidated.
    Failover {
        pick: u8,
        by_kill: bool,
        keep_writing_ms: u64,
    },
    /// `leave-resource` on a secondary; it joins again after `rejoin` steps.
    Leave { pick: u8, rejoin: u8 },
    /// `leave-resource` on host `host` (by index), rejoining after `rejoin` steps.
    LeaveHost { host: u8, rejoin: u8 },
    /// Stop the writers, `delete-resource` on the primary (refused while
    /// other replicas exist), remove its backing file and create the
    /// resource again under the same name: a new, all-zero history.
    Recreate,
    /// `join-resource` of a host that is no replica (by index); with
    /// `kill_ms`, `kill -9` it that many ms into its full sync.
    Join { host: u8, kill_ms: Option<u64> },
    /// `log-rotate` on the primary, optionally `kill -9` of it right after.
    LogRotate { kill: bool },
    /// `log-delete` on the primary.
    LogDelete,
    /// `pause-fetch`/`resume-fetch` on a host by index.
    Fetch { host: u8, pause: bool },
    /// `invalidate` on host `host` (by index): discard its log, full sync.
    Invalidate { host: u8 },
    /// Damage a logfile at rest on an UpToDate secondary (`pick`): replay
    /// paused a moment so that it has fetched past what it applied, a clean
    /// stop, then one bit flipped (or the file truncated, `truncate`) at a
    /// place past the applied position chosen by `at`; it starts again and
    /// must refuse the log (naming the damage) or fetch it again, and never
    /// apply the damaged part.
    Corrupt { pick: u8, truncate: bool, at: u64 },
    /// Fill the state root (a small tmpfs) of the primary (`primary`) or
    /// of any host (`pick`) for `steps` steps while the writers go on;
    /// then free it. A full primary may fail writes or wait, never lose a
    /// completed one.
    DiskFull { pick: u8, primary: bool, steps: u8 },
    /// Undo every network fault, start every host that is down.
    Heal,
    /// Stop the writers, heal, and wait until every replica is identical
    /// to the primary, checking that none claims UpToDate while it differs.
    Quiesce,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The named scenarios (issue 5's list) and the random campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Random,
    /// A replica that rejoins after a clean shutdown or a short outage is
    /// never UpToDate while it differs (LINBIT/drbd#145).
    Rejoin,
    /// A full sync never takes a stale replica as its source (longhorn#6472).
    StaleSource,
    /// 1 → 3 replicas and leave/re-join under heavy writes (linstor-server#485).
    Grow,
    /// Two of three nodes down for a long time, then back (mayastor#1713).
    TwoDown,
    /// Promote a secondary while the old primary keeps writing, then
    /// resolve (rbd-mirror split brain).
    PromoteWhileWriting,
    /// Delete and re-create a resource of the same name while a replica
    /// that held it is offline: its old data never comes back
    /// (linstor-server#133).
    Recreate,
}

pub const SCENARIOS: [(&str, Scenario); 7] = [
    ("random", Scenario::Random),
    ("rejoin", Scenario::Rejoin),
    ("stale-source", Scenario::StaleSource),
    ("grow", Scenario::Grow),
    ("two-down", Scenario::TwoDown),
    ("promote-while-writing", Scenario::PromoteWhileWriting),
    ("recreate", Scenario::Recreate),
];

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        SCENARIOS.iter().find(|(n, _)| *n == s).map(|(_, x)| *x)
    }

    pub fn name(self) -> &'static str {
        SCENARIOS
            .iter()
            .find(|(_, x)| *x == self)
            .map(|(n, _)| *n)
            .expect("every scenario has a name")
    }

    /// Hosts (by index) that hold a replica at the start; `a` is primary.
    pub fn initial_replicas(self) -> &'static [u8] {
        match self {
            Scenario::Grow => &[0],
            _ => &[0, 1, 2],
        }
    }
}

/// The schedule of `scenario` for `seed` (`steps` only for the random one).
pub fn schedule(scenario: Scenario, seed: u64, steps: usize, nft: bool) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_c4a0_5c4e_d01e);
    let run = |rng: &mut StdRng, lo: u64, hi: u64| Step::Run {
        ms: rng.random_range(lo..hi),
    };
    match scenario {
        Scenario::Random => random(&mut rng, steps, nft),
        Scenario::Rejoin => {
            let mut s = vec![run(&mut rng, 500, 1500)];
            // A clean shutdown of b for a while, c cut off for a while.
            s.push(Step::Term { pick: 1, down: 2 });
            s.push(run(&mut rng, 1000, 2500));
            s.push(Step::Cut { pick: 2, steps: 2 });
            s.push(run(&mut rng, 1000, 2500));
            s.push(run(&mut rng, 500, 1500));
            s.push(Step::Quiesce);
            // Again, both at once, shorter, with a kill in between.
            s.push(Step::Term { pick: 1, down: 1 });
            s.push(Step::KillHost { host: 2, down: 1 });
            s.push(run(&mut rng, 500, 1500));
            s.push(Step::Heal);
            s.push(Step::Quiesce);
            s
        }
        Scenario::StaleSource => vec![
            // b goes stale (fetch paused); c resyncs (invalidate) over a
            // slow link and is cut off from a in the middle of it: the
            // stale b is the only replica it reaches.
            run(&mut rng, 500, 1000),
            Step::Fetch {
                host: 1,
                pause: true,
            },
            run(&mut rng, 1500, 3000),
            Step::Rate {
                pick: 2,
                kbit: 16_000,
                steps: 6,
            },
            Step::Invalidate { host: 2 },
            run(&mut rng, 500, 2500),
            Step::CutBetween {
                x: 0,
                y: 2,
                steps: 4,
            },
            run(&mut rng, 1500, 2500),
            run(&mut rng, 1000, 2000),
            run(&mut rng, 1000, 2000),
            Step::Fetch {
                host: 1,
                pause: false,
            },
            run(&mut rng, 1000, 2000),
            Step::Quiesce,
        ],
        Scenario::Grow => vec![
            run(&mut rng, 500, 1000),
            Step::Join {
                host: 1,
                kill_ms: None,
            },
            run(&mut rng, 500, 1500),
            Step::Join {
                host: 2,
                kill_ms: Some(rng.random_range(100..1500)),
            },
            run(&mut rng, 1500, 3000),
            Step::Leave {
                pick: rng.random(),
                rejoin: 2,
            },
            run(&mut rng, 1000, 2000),
            run(&mut rng, 1000, 2000),
            run(&mut rng, 1000, 2000),
            Step::Quiesce,
        ],
        Scenario::TwoDown => vec![
            run(&mut rng, 500, 1500),
            Step::KillHost { host: 1, down: 4 },
            Step::KillHost { host: 2, down: 4 },
            run(&mut rng, 2000, 3000),
            run(&mut rng, 2000, 3000),
            Step::LogRotate { kill: false },
            run(&mut rng, 2000, 3000),
            run(&mut rng, 500, 1000),
            Step::Quiesce,
        ],
        Scenario::Recreate => vec![
            run(&mut rng, 1000, 2000),
            // b leaves and goes offline with the old data on its disk.
            Step::LeaveHost { host: 1, rejoin: 5 },
            Step::KillHost { host: 1, down: 3 },
            Step::LeaveHost { host: 2, rejoin: 3 },
            Step::Recreate,
            run(&mut rng, 1000, 2000),
            // b comes back (step 5), both rejoin the new resource (step 6).
            run(&mut rng, 500, 1500),
            run(&mut rng, 1000, 2000),
            run(&mut rng, 1000, 2000),
            Step::Quiesce,
        ],
        Scenario::PromoteWhileWriting => vec![
            run(&mut rng, 1000, 2000),
            Step::Failover {
                pick: rng.random(),
                by_kill: false,
                keep_writing_ms: rng.random_range(1000..3000),
            },
            run(&mut rng, 1000, 2000),
            Step::Quiesce,
        ],
    }
}

fn random(rng: &mut StdRng, steps: usize, nft: bool) -> Vec<Step> {
    let mut s = Vec::with_capacity(steps + 1);
    // Weights per kind; nftables kinds only with nft.
    let kinds: &[(u32, u8)] = &[
        (2, 0),  // run
        (5, 1),  // kill -9
        (2, 2),  // sigterm
        (3, 3),  // cut
        (2, 4),  // path cut
        (2, 5),  // one-way
        (2, 6),  // loss
        (2, 7),  // rate
        (3, 8),  // handover
        (1, 9),  // forced failover
        (2, 10), // leave (+ join later)
        (2, 11), // log-rotate
        (1, 12), // log-delete
        (1, 13), // heal
        (3, 14), // logfile damage at rest
        (2, 15), // disk full
        (2, 16), // proxy delay
    ];
    let total: u32 = kinds.iter().map(|k| k.0).sum();
    while s.len() < steps {
        let mut x = rng.random_range(0..total);
        let kind = kinds
            .iter()
            .find(|(w, _)| {
                if x < *w {
                    true
                } else {
                    x -= w;
                    false
                }
            })
            .map(|k| k.1)
            .expect("x < total");
        let pick: u8 = rng.random();
        let steps_: u8 = rng.random_range(1..4);
        let step = match kind {
            0 => Step::Run {
                ms: rng.random_range(200..1000),
            },
            1 => Step::Kill {
                pick,
                down: if rng.random_bool(0.6) {
                    0
                } else {
                    rng.random_range(1..4)
                },
            },
            2 => Step::Term {
                pick,
                down: rng.random_range(0..3),
            },
            3 => Step::Cut {
                pick,
                steps: steps_,
            },
            4 => Step::CutBetween {
                x: rng.random_range(0..3),
                y: rng.random_range(0..3),
                steps: steps_,
            },
            5 | 6 if !nft => Step::Rate {
                pick,
                kbit: rng.random_range(2_000..50_000),
                steps: steps_,
            },
            5 => Step::OneWay {
                pick,
                inbound: rng.random(),
                steps: steps_,
            },
            6 => Step::Loss {
                pick,
                pct: rng.random_range(5..31),
                steps: steps_,
            },
            7 => Step::Rate {
                pick,
                kbit: rng.random_range(2_000..50_000),
                steps: steps_,
            },
            8 => Step::Handover {
                pick,
                kill_ms: rng.random_bool(0.3).then(|| rng.random_range(0..1500)),
                kill_pick: rng.random(),
            },
            9 => Step::Failover {
                pick,
                by_kill: rng.random(),
                keep_writing_ms: rng.random_range(300..2000),
            },
            10 => Step::Leave {
                pick,
                rejoin: rng.random_range(1..4),
            },
            11 => Step::LogRotate {
                kill: rng.random_bool(0.3),
            },
            12 => Step::LogDelete,
            16 => Step::Delay {
                pick,
                ms: rng.random_range(5..300),
                steps: steps_,
            },
            15 => Step::DiskFull {
                pick,
                primary: rng.random_bool(0.6),
                steps: rng.random_range(1..3),
            },
            14 => Step::Corrupt {
                pick,
                truncate: rng.random_bool(0.3),
                at: rng.random(),
            },
            _ => Step::Heal,
        };
        s.push(step);
        // Now and then a full stop and comparison.
        if rng.random_ratio(1, 12) {
            s.push(Step::Quiesce);
        }
    }
    s.truncate(steps);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        for sc in SCENARIOS.map(|(_, s)| s) {
            assert_eq!(schedule(sc, 42, 50, true), schedule(sc, 42, 50, true));
        }
        assert_ne!(
            schedule(Scenario::Random, 1, 50, true),
            schedule(Scenario::Random, 2, 50, true)
        );
        assert_eq!(schedule(Scenario::Random, 7, 37, false).len(), 37);
        assert!(
            !schedule(Scenario::Random, 7, 200, false)
                .iter()
                .any(|s| matches!(s, Step::Loss { .. } | Step::OneWay { .. }))
        );
    }

    #[test]
    fn scenario_names_round_trip() {
        for (n, s) in SCENARIOS {
            assert_eq!(Scenario::parse(n), Some(s));
            assert_eq!(s.name(), n);
        }
    }
}
