//! The randomized fault campaign (issue 5, real processes): from a seed, a
//! 3-host cluster (one marsd per network namespace) is driven through a
//! schedule of faults while NBD writers write verifiable blocks on the
//! primary, and an oracle of every acknowledged write judges what the
//! devices show.
//!
//! * [`history`]: block format, the history of writes/flushes, the checks
//!   (lost write, non-prefix, divergent tail) and their unit tests.
//! * [`writers`]: the workload (several NBD connections, FUA, FLUSH,
//!   verifying reads).
//! * [`schedule`]: seed → steps; the named scenarios.
//! * [`runner`]: executes the steps and checks after each.
//!
//! Entry points: [`run_or_skip`] (used by `e2e/tests/chaos.rs`) and the
//! script `e2e/chaos/run`. A failure prints the seed and the command that
//! replays the schedule ([`Config::replay_command`]).

pub mod history;
pub mod runner;
pub mod schedule;
pub mod writers;

use std::collections::BTreeMap;
use std::time::Instant;

use crate::cluster::{Options, start_with_or_skip};
pub use schedule::{SCENARIOS, Scenario, Step, schedule};
pub use writers::WriterOpts;

#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Steps of the random campaign (named scenarios have their own).
    pub steps: usize,
    pub scenario: Scenario,
    pub size_mib: u64,
    pub writer: WriterOpts,
}

impl Config {
    pub fn new(scenario: Scenario, seed: u64, steps: usize) -> Config {
        Config {
            seed,
            steps,
            scenario,
            size_mib: 16,
            writer: WriterOpts::default(),
        }
    }

    /// The command that replays this run's schedule.
    pub fn replay_command(&self) -> String {
        format!(
            "MARS_SEED={} e2e/chaos/run --scenario {} --steps {}   \
             (or: MARS_SEED={} MARS_CHAOS_SCENARIO={} MARS_CHAOS_STEPS={} \
             cargo test -p mars-e2e --test chaos replay -- --ignored --nocapture)",
            self.seed,
            self.scenario.name(),
            self.steps,
            self.seed,
            self.scenario.name(),
            self.steps
        )
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub steps: u64,
    /// Faults injected per kind, counted where each one happens (a step
    /// may inject several: a handover with a kill in its middle counts one
    /// of each; a skipped step none).
    pub faults: BTreeMap<&'static str, u64>,
    pub skipped: u64,
    pub samples: u64,
    pub complete_checks: u64,
    pub invalidations: u64,
    pub writer_errors: u64,
    /// Seconds each quiescence took to converge.
    pub quiesces: Vec<f64>,
    pub max_rss_kib: BTreeMap<String, u64>,
    pub history: String,
    pub violations: Vec<String>,
    pub seconds: f64,
}

impl Report {
    fn new(cfg: &Config) -> Report {
        Report {
            scenario: cfg.scenario.name().to_string(),
            seed: cfg.seed,
            ..Default::default()
        }
    }

    /// Injected faults of every kind.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }

    /// Adds `other`'s fault counts to this report's.
    pub fn add_faults(&mut self, other: &Report) {
        for (k, n) in &other.faults {
            *self.faults.entry(k).or_default() += n;
        }
    }

    /// `faults injected: kill=3, cut=2, …, total=N`.
    pub fn fault_line(&self) -> String {
        let kinds: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        format!(
            "faults injected: {}{}total={}",
            kinds.join(", "),
            if kinds.is_empty() { "" } else { ", " },
            self.fault_count()
        )
    }

    pub fn summary(&self) -> String {
        let conv: Vec<String> = self.quiesces.iter().map(|s| format!("{s:.1}")).collect();
        format!(
            "chaos {} seed {}: {} steps in {:.1} s, {}, {} steps skipped; {}; \
             {} prefix samples, {} completeness checks, {} invalidations, {} writer ends by error; \
             converged in [{}] s; max VmRSS KiB {:?}; {} violations",
            self.scenario,
            self.seed,
            self.steps,
            self.seconds,
            self.fault_line(),
            self.skipped,
            self.history,
            self.samples,
            self.complete_checks,
            self.invalidations,
            self.writer_errors,
            conv.join(", "),
            self.max_rss_kib,
            self.violations.len()
        )
    }
}

/// Every host's state root is a tmpfs this large, for the disk-full
/// fault (marsd's log quota is half of it; the backing files live outside).
pub const TMPFS_ROOT_MIB: u64 = 128;

/// marsd options for the campaign: small logfiles (rotation and deletion
/// all the time), a short startup wait, a small overlay.
pub fn marsd_args() -> Vec<String> {
    [
        "--logfile-size",
        "1M",
        "--startup-wait",
        "2",
        "--overlay-limit",
        "32M",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs every config at once, each on its own cluster in its own thread
/// (the campaign mostly waits, so this buys faults per second of wall
/// time, not CPU); the reports, or `None` if this machine cannot run
/// multi-host tests. A run that fails panics with its seed and replay
/// command, after the others finished.
pub fn run_all_or_skip(cfgs: Vec<Config>) -> Option<Vec<Report>> {
    std::thread::scope(|s| {
        let runs: Vec<_> = cfgs
            .into_iter()
            .map(|cfg| s.spawn(move || run_or_skip(cfg)))
            .collect();
        let reports: Vec<Option<Report>> = runs
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        reports.into_iter().collect()
    })
}

/// Runs `cfg` on a fresh cluster; `None` (after printing `skipped: …`)
/// when this machine cannot run multi-host tests. Panics with the seed
/// and the replay command on a violation or a harness error.
pub fn run_or_skip(cfg: Config) -> Option<Report> {
    let opts = Options {
        marsd_args: marsd_args(),
        tmpfs_root_mib: Some(TMPFS_ROOT_MIB),
        proxy: true,
        ..Default::default()
    };
    let mut c = start_with_or_skip(&runner::HOSTS, opts)?;
    let steps = schedule(cfg.scenario, cfg.seed, cfg.steps, c.has_nft());
    eprintln!(
        "chaos {} seed {} ({} steps): replay with\n  {}\nschedule:",
        cfg.scenario.name(),
        cfg.seed,
        steps.len(),
        cfg.replay_command()
    );
    for (i, s) in steps.iter().enumerate() {
        eprintln!("  {i:3} {s}");
    }
    let started = Instant::now();
    let replay = cfg.replay_command();
    let mut campaign = runner::Campaign::new(&mut c, cfg);
    let result = campaign.run(&steps);
    let mut report = std::mem::take(&mut campaign.report);
    drop(campaign);
    report.seconds = started.elapsed().as_secs_f64();
    eprintln!("{}", report.summary());
    eprintln!(
        "chaos {} seed {}: {}",
        report.scenario,
        report.seed,
        report.fault_line()
    );
    if let Err(e) = result {
        panic!(
            "chaos run aborted: {e:#}\n{} violations before that:\n{}\nreplay: {replay}",
            report.violations.len(),
            report.violations.join("\n")
        );
    }
    if !report.violations.is_empty() {
        panic!(
            "chaos run found {} violations:\n{}\nreplay: {replay}",
            report.violations.len(),
            report.violations.join("\n")
        );
    }
    drop(c);
    Some(report)
}
