//! Replication between hosts (network namespaces, real marsd processes):
//! cuts, loss, slow links, kill -9, joins under load, manual handover, and
//! the secondary's device always being a prefix of the primary's writes.
//!
//! Each test skips (prints "skipped: <reason>") without root or `ip netns`.
//! A failing run prints its seed; `MARS_SEED=<seed>` replays the writes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mars_e2e::check::{numbered_prefix, read_file, same};
use mars_e2e::cmd::wait_for;
use mars_e2e::workload::{BLOCK, NumberedWriter, RandomOpts, RandomWriter, seed};
use mars_e2e::{Cluster, run, start_or_skip};
use serde_json::Value;

const R: &str = "r1";

fn u64_at(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// `wait` on `host` must succeed within `secs`.
fn wait_ok(c: &Cluster, host: &str, secs: u64) -> Result<()> {
    let took = c.wait_ok(host, R, secs)?;
    eprintln!("wait on {host}: {:.1} s", took.as_secs_f64());
    Ok(())
}

/// Creates R on `primary` and joins the others to the cluster and to R.
fn set_up(c: &Cluster, primary: &str, secondaries: &[&str], size: &str) -> Result<()> {
    c.create_resource(primary, R, size)?;
    for h in secondaries {
        c.join_cluster(h, primary)?;
        c.join_resource(h, R)?;
    }
    Ok(())
}

fn device(c: &Cluster, host: &str, size: u64) -> Result<Vec<u8>> {
    c.device(host, R, size)
}

fn backing(c: &Cluster, host: &str, size: u64) -> Result<Vec<u8>> {
    c.backing(host, R, size)
}

#[test]
fn three_hosts_survive_cut_loss_and_kill9() {
    let Some(mut c) = start_or_skip(&["a", "b", "c"]) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 64 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        set_up(c, "a", &["b", "c"], "64M")?;
        let a = c.host("a");
        let mut w = RandomWriter::start(
            a.nbd(R)?,
            vec![0; SIZE as usize],
            RandomOpts {
                seed,
                ..Default::default()
            },
        );
        w.keep_writing(Duration::from_secs(2))?;

        // B's cable is pulled: A sees it disconnected within the peer timeout.
        c.cut("b")?;
        let cut_at = Instant::now();
        // When the first view that shows b disconnected was asked for, and
        // the polls before it (to show if it took long).
        let mut polls = Vec::new();
        let noticed = wait_for(
            "A's view: b disconnected",
            Duration::from_secs(12),
            Duration::from_millis(100),
            || {
                let asked = cut_at.elapsed();
                let connected = c.host("a").replica(R, "b")?["connected"].as_bool();
                polls.push(format!(
                    "{:.2}..{:.2} s: {connected:?}",
                    asked.as_secs_f64(),
                    cut_at.elapsed().as_secs_f64()
                ));
                Ok((connected == Some(false)).then_some(asked))
            },
        )?;
        eprintln!(
            "a noticed the cut of b after {:.1} s",
            noticed.as_secs_f64()
        );
        // Peer timeout 5 s, plus slack for a loaded 2-core machine.
        ensure!(
            noticed <= Duration::from_secs(8),
            "a took {:.1} s to show b disconnected (peer timeout 5 s); views after the cut:\n{}",
            noticed.as_secs_f64(),
            polls.join("\n")
        );
        let lag1 = u64_at(&c.host("a").replica(R, "b")?, "lag_bytes");
        w.keep_writing(Duration::from_millis(1500))?;
        let lag2 = u64_at(&c.host("a").replica(R, "b")?, "lag_bytes");
        eprintln!("b's lag while cut: {lag1} then {lag2} bytes");
        ensure!(
            lag1 > 0 && lag2 > lag1,
            "b's lag_bytes should grow while it is cut off: {lag1} then {lag2}"
        );
        c.restore("b")?;
        let restored_at = Instant::now();
        wait_for(
            "A's view: b connected again",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                Ok(c.host("a").replica(R, "b")?["connected"]
                    .as_bool()
                    .unwrap_or(false)
                    .then_some(()))
            },
        )?;
        eprintln!(
            "b reconnected {:.1} s after the restore",
            restored_at.elapsed().as_secs_f64()
        );

        // C's link: 10 % loss each way and 8 Mbit/s, for a while.
        if c.has_nft() {
            c.loss("c", 10)?;
        } else {
            eprintln!(
                "note: nft is missing (apt-get install nftables): no loss phase, only the rate limit"
            );
        }
        c.rate_limit("c", "8mbit")?;
        w.keep_writing(Duration::from_secs(6))?;
        let lag_c = u64_at(&c.host("a").replica(R, "c")?, "lag_bytes");
        eprintln!("c's lag on a lossy 8 Mbit/s link: {lag_c} bytes");
        c.clear_filter("c")?;
        c.clear_rate_limit("c")?;

        // kill -9 C while it is applying: preferably with records fetched
        // but not applied yet, else at least lagging behind the primary.
        // Then restart it.
        let c_state = |strict: bool| -> Result<Option<String>> {
            let r = c.host("c").resource(R)?;
            let (fetched, applied) = (u64_at(&r["log"], "fetched"), u64_at(&r["log"], "applied"));
            let lag = r["replicas"][0]["lag_bytes"].as_u64().unwrap_or(0);
            Ok((fetched > applied || (!strict && lag > 0))
                .then(|| format!("fetched {fetched}, applied {applied}, lag {lag} bytes")))
        };
        let state = wait_for(
            "c with fetched records to apply",
            Duration::from_secs(5),
            Duration::from_millis(5),
            || c_state(true),
        )
        .or_else(|_| {
            wait_for(
                "c lagging",
                Duration::from_secs(10),
                Duration::from_millis(5),
                || c_state(false),
            )
        })?;
        eprintln!("kill -9 c: {state}");
        c.host_mut("c").kill9()?;
        w.keep_writing(Duration::from_secs(1))?;
        c.host_mut("c").start()?;
        w.keep_writing(Duration::from_secs(2))?;
        let writes = w.writes();
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        eprintln!("{writes} writes");

        wait_ok(c, "a", 120)?;
        let dev = device(c, "a", SIZE)?;
        same("a's device (NBD) against the writes", &model, &dev)?;
        for h in ["b", "c"] {
            same(
                &format!("{h}'s backing file against a's device"),
                &dev,
                &backing(c, h, SIZE)?,
            )?;
        }
        // A clean stop writes everything back on the primary too.
        let status = c.host_mut("a").term()?;
        ensure!(
            status.success(),
            "marsd on a exited with {status} on SIGTERM"
        );
        same(
            "a's backing file after SIGTERM against its device",
            &dev,
            &backing(c, "a", SIZE)?,
        )?;
        Ok(())
    });
}

#[test]
fn join_while_the_primary_is_writing_ends_identical() {
    let Some(mut c) = start_or_skip(&["a", "b"]) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 64 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        c.create_resource("a", R, "64M")?;
        c.join_cluster("b", "a")?;
        let mut w = RandomWriter::start(
            c.host("a").nbd(R)?,
            vec![0; SIZE as usize],
            RandomOpts {
                seed,
                ..Default::default()
            },
        );
        w.keep_writing(Duration::from_secs(1))?;
        c.join_resource("b", R)?;
        let joined_at = Instant::now();
        let mut seen_syncing = false;
        while joined_at.elapsed() < Duration::from_secs(5) {
            let me = c.host("b").replica(R, "b")?;
            seen_syncing |= me["disk_state"] != "UpToDate";
            w.keep_writing(Duration::from_millis(200))?;
        }
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        ensure!(
            seen_syncing,
            "b was never seen syncing (Inconsistent) after join-resource"
        );
        wait_ok(c, "a", 60)?;
        let dev = device(c, "a", SIZE)?;
        same("a's device (NBD) against the writes", &model, &dev)?;
        same(
            "b's backing file against a's device",
            &dev,
            &backing(c, "b", SIZE)?,
        )?;
        Ok(())
    });
}

#[test]
fn manual_handover_keeps_every_completed_write() {
    let Some(mut c) = start_or_skip(&["a", "b"]) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 32 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        set_up(c, "a", &["b"], "32M")?;
        let opts = RandomOpts {
            seed,
            ..Default::default()
        };
        let mut w = RandomWriter::start(c.host("a").nbd(R)?, vec![0; SIZE as usize], opts.clone());
        w.keep_writing(Duration::from_secs(3))?;
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;

        c.host("a").marsadm_ok(&["secondary", R])?;
        // `marsadm wait` refuses while no node is primary (see
        // wait_works_between_secondary_and_primary): poll the views.
        let a_end = u64_at(&c.host("a").resource(R)?["log"], "flushed");
        wait_for(
            "b applied all a logged",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || Ok((u64_at(&c.host("b").resource(R)?["log"], "applied") >= a_end).then_some(())),
        )?;
        c.host("b").marsadm_ok(&["primary", R])?;
        let b_view = c.host("b").resource(R)?;
        ensure!(
            b_view["role"] == "primary",
            "b is not primary after `primary {R}`: {b_view:#}"
        );
        same(
            "b's device after the handover against a's writes",
            &model,
            &device(c, "b", SIZE)?,
        )?;

        let mut w = RandomWriter::start(
            c.host("b").nbd(R)?,
            model,
            RandomOpts {
                seed: seed ^ 1,
                ..opts
            },
        );
        w.keep_writing(Duration::from_secs(2))?;
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        wait_ok(c, "b", 60)?;
        let dev = device(c, "b", SIZE)?;
        same("b's device against the writes", &model, &dev)?;
        same(
            "a's backing file against b's device",
            &dev,
            &backing(c, "a", SIZE)?,
        )?;
        let a_view = c.host("a").resource(R)?;
        ensure!(
            a_view["role"] == "secondary",
            "a should follow b as a secondary: {a_view:#}"
        );
        Ok(())
    });
}

#[test]
fn secondary_is_always_a_prefix() {
    let Some(mut c) = start_or_skip(&["a", "c"]) else {
        return;
    };
    run(&mut c, |c| {
        /// Blocks the numbered writes cycle through (1 MiB).
        const K: u64 = 256;
        set_up(c, "a", &["c"], "16M")?;
        let w = NumberedWriter::start(c.host("a").nbd(R)?, K, Duration::ZERO);
        // Until its full sync is done the replica is no prefix of anything.
        wait_for(
            "c UpToDate",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || Ok((c.host("c").replica(R, "c")?["disk_state"] == "UpToDate").then_some(())),
        )?;
        let file = c.host("c").path(&format!("{R}.img"));
        let started = Instant::now();
        let (mut snapshots, mut behind, mut last_j) = (0u32, 0u32, None::<u64>);
        let mut rng_state = 0x2545_f491_4f6c_dd1du64;
        while started.elapsed() < Duration::from_secs(12) {
            let c_host = c.host("c");
            c_host.freeze()?;
            let snap = read_file(&file, K * BLOCK);
            let completed = w.writes();
            c_host.thaw()?;
            let j = numbered_prefix(&snap?, K)
                .with_context(|| format!("snapshot {snapshots} of c's device"))?;
            ensure!(
                j >= last_j,
                "c's device went back from write {last_j:?} to {j:?}"
            );
            if j.map_or(0, |j| j + 1) < completed {
                behind += 1;
            }
            last_j = j;
            snapshots += 1;
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            std::thread::sleep(Duration::from_millis(20 + rng_state % 200));
        }
        let (nbd, n) = w.stop()?;
        nbd.disconnect()?;
        eprintln!(
            "{snapshots} snapshots, {behind} of them behind the writer; {n} writes; last prefix {last_j:?}"
        );
        ensure!(n > K, "only {n} writes");
        wait_ok(c, "a", 60)?;
        c.host("c").freeze()?;
        let snap = read_file(&file, K * BLOCK);
        c.host("c").thaw()?;
        let j = numbered_prefix(&snap?, K)?;
        ensure!(
            j == Some(n - 1),
            "after wait c's device holds writes up to {j:?}, not {}",
            n - 1
        );
        Ok(())
    });
}

/// A secondary that cannot reach the primary, while another replica can
/// reach both, keeps following through that replica: with A↔C cut (and
/// nothing else), C's applied position moves while A writes, C fetches A's
/// log from B and, after `marsadm wait` on B and before the cut is undone,
/// its backing file equals A's device. After the restore C switches back
/// to A and stays identical.
#[test]
fn a_secondary_cut_off_from_the_primary_fetches_from_another_replica() {
    let Some(mut c) = start_or_skip(&["a", "b", "c"]) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 32 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        set_up(c, "a", &["b", "c"], "32M")?;
        wait_ok(c, "a", 60)?;

        c.cut_between("a", "c")?;
        wait_for(
            "c to see a unreachable",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || Ok((c.host("c").replica(R, "a")?["connected"] == false).then_some(())),
        )?;
        let before = u64_at(&c.host("c").resource(R)?["log"], "applied");
        let mut w = RandomWriter::start(
            c.host("a").nbd(R)?,
            vec![0; SIZE as usize],
            RandomOpts {
                seed,
                ..Default::default()
            },
        );
        w.keep_writing(Duration::from_secs(2))?;
        // C keeps up while A goes on writing: its applied position moves.
        wait_for(
            "c to apply some of a's new log while a is still writing",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let applied = u64_at(&c.host("c").resource(R)?["log"], "applied");
                Ok((applied > before).then_some(applied))
            },
        )?;
        w.keep_writing(Duration::from_secs(2))?;
        let writes = w.writes();
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        let end = u64_at(&c.host("a").resource(R)?["log"], "appended");
        eprintln!("{writes} writes on a; its log ends at {end}, c had applied {before}");
        ensure!(end > before, "the writes did not grow a's log");

        // C gets all of it while A is still unreachable from C.
        let took = wait_for(
            "c to apply a's whole log without reaching a",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                let applied = u64_at(&c.host("c").resource(R)?["log"], "applied");
                Ok((applied >= end).then_some(()))
            },
        );
        let a_seen = c.host("c").replica(R, "a")?["connected"].clone();
        ensure!(
            a_seen == false,
            "a counts as connected on c during the cut: {a_seen}"
        );
        took?;
        // `wait` on B (it reaches both) while A↔C is still cut.
        wait_ok(c, "b", 60)?;
        let from_b = c.log_lines("fetching from another replica");
        ensure!(
            from_b
                .iter()
                .any(|l| l.starts_with("c: ") && l.contains("from=b")),
            "c never said it fetches from b; marsd logged:\n{}",
            from_b.join("\n")
        );
        let dev = device(c, "a", SIZE)?;
        same("a's device (NBD) against the writes", &model, &dev)?;
        same(
            "c's backing file (fetched through b) against a's device",
            &dev,
            &backing(c, "c", SIZE)?,
        )?;

        // Back to normal: C follows A again.
        c.restore_between("a", "c")?;
        let mut w = RandomWriter::start(
            c.host("a").nbd(R)?,
            model,
            RandomOpts {
                seed: seed + 1,
                ..Default::default()
            },
        );
        w.keep_writing(Duration::from_secs(2))?;
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        wait_ok(c, "a", 60)?;
        let dev = device(c, "a", SIZE)?;
        same("a's device after the restore", &model, &dev)?;
        for h in ["b", "c"] {
            same(
                &format!("{h}'s backing file after the restore"),
                &dev,
                &backing(c, h, SIZE)?,
            )?;
        }
        Ok(())
    });
}
