//! The randomized fault campaign on real processes (issue 5, first half):
//! a CI-sized random campaign and the named scenarios, each from a fixed
//! seed (`MARS_SEED` overrides it). A failure prints the seed and the
//! command that replays the schedule. See `mars_e2e::chaos`.
//!
//! `e2e/chaos/run` runs one campaign of any size (the `replay` test) or
//! the long campaign (`long_campaign`, many fresh seeds); both are
//! `#[ignore]`d here so that `cargo test --workspace` stays bounded.
//!
//! Each test skips (prints "skipped: <reason>") without root or `ip netns`.

use mars_e2e::chaos::{Config, Report, Scenario, run_all_or_skip, run_or_skip};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn seed_or(default: u64) -> u64 {
    env_u64("MARS_SEED").unwrap_or(default)
}

fn run(scenario: Scenario, seed: u64, steps: usize) -> Option<Report> {
    run_or_skip(Config::new(scenario, seed_or(seed), steps))
}

/// Random campaigns at once in the CI campaign, each on its own cluster.
const CI_RUNS: u64 = 3;
/// Faults the CI campaign must inject on real processes (issue 5).
const CI_FAULTS: u64 = 200;

/// The CI campaign: three random campaigns of 90 steps at once (seeds 12,
/// 13, 14; `MARS_SEED` replaces the first, the others follow it), at
/// least 200 injected faults in all, each run printing its faults per
/// kind and the total at the end. Seeds 12, 100 and 200 found bugs now
/// fixed (tests in replication_bugs.rs).
#[test]
fn random_campaign_keeps_every_invariant() {
    let steps = env_u64("MARS_CHAOS_STEPS").unwrap_or(90) as usize;
    let first = seed_or(12);
    let cfgs = (0..CI_RUNS)
        .map(|i| Config::new(Scenario::Random, first + i, steps))
        .collect();
    let Some(reports) = run_all_or_skip(cfgs) else {
        return;
    };
    let mut all = Report::default();
    for r in &reports {
        all.add_faults(r);
    }
    eprintln!("CI campaign ({CI_RUNS} runs): {}", all.fault_line());
    assert!(
        all.fault_count() >= CI_FAULTS,
        "only {} faults injected (want {CI_FAULTS}): {}",
        all.fault_count(),
        all.fault_line()
    );
}

#[test]
fn rejoin_after_clean_shutdown_or_outage_is_never_uptodate_while_different() {
    run(Scenario::Rejoin, 2, 0);
}

#[test]
fn a_full_sync_never_takes_a_stale_replica_as_its_source() {
    run(Scenario::StaleSource, 3, 0);
}

#[test]
fn growing_to_three_replicas_and_rejoining_under_heavy_writes() {
    run(Scenario::Grow, 4, 0);
}

#[test]
fn two_of_three_nodes_down_for_long_then_back() {
    run(Scenario::TwoDown, 5, 0);
}

#[test]
fn promote_while_the_old_primary_keeps_writing_then_resolve() {
    run(Scenario::PromoteWhileWriting, 6, 0);
}

#[test]
fn delete_and_recreate_while_a_replica_is_offline_never_resurrects_old_data() {
    run(Scenario::Recreate, 7, 0);
}

/// One run as `e2e/chaos/run` asks for it: `MARS_CHAOS_SCENARIO`,
/// `MARS_SEED` (else fresh), `MARS_CHAOS_STEPS`.
#[test]
#[ignore = "run by e2e/chaos/run"]
fn replay() {
    let name = std::env::var("MARS_CHAOS_SCENARIO").unwrap_or_else(|_| "random".into());
    let scenario = Scenario::parse(&name).unwrap_or_else(|| panic!("no scenario {name}"));
    let seed = env_u64("MARS_SEED").unwrap_or_else(rand::random);
    let steps = env_u64("MARS_CHAOS_STEPS").unwrap_or(60) as usize;
    run_or_skip(Config::new(scenario, seed, steps));
}

/// The long campaign: random campaigns of `MARS_CHAOS_STEPS` (default
/// 120) steps with fresh seeds, three at once, until `MARS_CHAOS_FAULTS`
/// (default 1000) faults were injected, then every named scenario with a
/// fresh seed.
#[test]
#[ignore = "run by e2e/chaos/run --long"]
fn long_campaign() {
    let want = env_u64("MARS_CHAOS_FAULTS").unwrap_or(1000);
    let steps = env_u64("MARS_CHAOS_STEPS").unwrap_or(120) as usize;
    let mut all = Report::default();
    let mut runs = 0;
    while all.fault_count() < want {
        let cfgs = (0..CI_RUNS)
            .map(|_| Config::new(Scenario::Random, rand::random(), steps))
            .collect();
        let Some(reports) = run_all_or_skip(cfgs) else {
            return;
        };
        for r in &reports {
            all.add_faults(r);
            runs += 1;
        }
        eprintln!("long campaign so far ({runs} runs): {}", all.fault_line());
    }
    for (_, s) in mars_e2e::chaos::SCENARIOS.iter().skip(1) {
        if let Some(r) = run_or_skip(Config::new(*s, rand::random(), 0)) {
            all.add_faults(&r);
        }
    }
    eprintln!(
        "long campaign: {runs} random runs and every named scenario, no violation; {}",
        all.fault_line()
    );
    assert!(all.fault_count() >= want);
}
