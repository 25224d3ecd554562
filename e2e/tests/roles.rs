//! Role changes and log space between hosts (network namespaces, real
//! marsd processes): a planned handover (`marsadm primary` on a secondary)
//! while the old primary is writing and a third host is cut off, and
//! emergency mode (the primary gives a paused replica's logfiles up when
//! its log quota runs out) followed by the replica's resync.
//!
//! Each test skips (prints "skipped: <reason>") without root or `ip netns`.
//! A failing run prints its seed; `MARS_SEED=<seed>` replays the writes.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use mars_e2e::check::same;
use mars_e2e::cluster::{Options, start_with_or_skip};
use mars_e2e::cmd::wait_for;
use mars_e2e::nbd_client::NbdClient;
use mars_e2e::workload::{BLOCK, RandomOpts, RandomWriter, seed};
use mars_e2e::{Cluster, run, start_or_skip};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const R: &str = "r1";

/// Creates R on `primary` and joins the others to the cluster and to R.
fn set_up(c: &Cluster, primary: &str, secondaries: &[&str], size: &str) -> Result<()> {
    c.create_resource(primary, R, size)?;
    for h in secondaries {
        c.join_cluster(h, primary)?;
        c.join_resource(h, R)?;
    }
    Ok(())
}

/// `wait` on `host` must succeed within `secs`.
fn wait_ok(c: &Cluster, host: &str, secs: u64) -> Result<()> {
    let took = c.wait_ok(host, R, secs)?;
    eprintln!("wait on {host}: {:.1} s", took.as_secs_f64());
    Ok(())
}

// ---- a writer that keeps its model when the connection fails ---------------

/// The request that failed: its range, the bytes it would have written
/// (zeros for a WRITE_ZEROES) and the error. Whether it reached the device
/// is unknown, so both the old and the new content are acceptable there.
struct Failed {
    request: u64,
    range: Range<usize>,
    new: Vec<u8>,
    error: io::Error,
}

/// What [`SurvivingWriter`] hands back: the model of every completed
/// write, the number of completed writes, and the failure if any (then the
/// client is gone).
struct WriterEnd {
    model: Vec<u8>,
    completed: u64,
    client: Option<NbdClient>,
    failed: Option<Failed>,
}

/// Like the harness's [`RandomWriter`] (same mix: 4 KiB and 1 MiB writes,
/// FUA, WRITE_ZEROES, FLUSH), but a failed request ends the thread with the
/// model intact: it holds exactly the completed writes, and the failed one
/// is reported beside it.
struct SurvivingWriter {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    handle: Option<JoinHandle<WriterEnd>>,
}

impl SurvivingWriter {
    fn start(mut c: NbdClient, mut model: Vec<u8>, opts: RandomOpts) -> SurvivingWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let (stop2, completed2) = (Arc::clone(&stop), Arc::clone(&completed));
        let handle = std::thread::Builder::new()
            .name("surviving-writer".into())
            .spawn(move || {
                let mut rng = StdRng::seed_from_u64(opts.seed);
                let size = model.len() as u64;
                let (blocks, big_blocks) = (size / BLOCK, size >> 20);
                let started = Instant::now();
                let (mut done, mut sent) = (0u64, 0u64);
                let mut buf = vec![0u8; 1 << 20];
                let end = |model, done, client, failed| WriterEnd {
                    model,
                    completed: done,
                    client,
                    failed,
                };
                while !stop2.load(Ordering::Acquire) {
                    let n = done + 1;
                    let (off, len) = if n.is_multiple_of(opts.big_every) && big_blocks > 0 {
                        (rng.random_range(0..big_blocks) << 20, 1u64 << 20)
                    } else {
                        (rng.random_range(0..blocks) * BLOCK, BLOCK)
                    };
                    let range = off as usize..(off + len) as usize;
                    let zero = n.is_multiple_of(opts.zero_every);
                    let data = &mut buf[..len as usize];
                    let res = if zero {
                        data.fill(0);
                        c.write_zeroes(off, len as u32, false)
                    } else {
                        rng.fill(&mut data[..]);
                        c.write(off, data, n.is_multiple_of(opts.fua_every))
                    };
                    if let Err(error) = res {
                        let new = data.to_vec();
                        return end(
                            model,
                            done,
                            None,
                            Some(Failed {
                                request: n,
                                range,
                                new,
                                error,
                            }),
                        );
                    }
                    model[range].copy_from_slice(data);
                    done = n;
                    sent += len;
                    completed2.store(done, Ordering::Release);
                    if n.is_multiple_of(opts.flush_every)
                        && let Err(error) = c.flush()
                    {
                        // A FLUSH changes nothing: the model stays exact.
                        return end(
                            model,
                            done,
                            None,
                            Some(Failed {
                                request: n,
                                range: 0..0,
                                new: Vec::new(),
                                error,
                            }),
                        );
                    }
                    let due = Duration::from_secs_f64(sent as f64 / opts.bytes_per_sec as f64);
                    let until = Instant::now() + due.saturating_sub(started.elapsed());
                    while Instant::now() < until && !stop2.load(Ordering::Acquire) {
                        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
                    }
                }
                match c.flush() {
                    Ok(()) => end(model, done, Some(c), None),
                    Err(error) => end(
                        model,
                        done,
                        None,
                        Some(Failed {
                            request: done,
                            range: 0..0,
                            new: Vec::new(),
                            error,
                        }),
                    ),
                }
            })
            .expect("spawning the writer");
        SurvivingWriter {
            stop,
            completed,
            handle: Some(handle),
        }
    }

    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops (or collects a writer that already ended) within `limit`.
    fn end(mut self, limit: Duration) -> Result<WriterEnd> {
        self.stop.store(true, Ordering::Release);
        let h = self.handle.take().expect("ended once");
        let deadline = Instant::now() + limit;
        while !h.is_finished() {
            if Instant::now() >= deadline {
                bail!("the writer did not end within {limit:?} (an NBD request without reply?)");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().map_err(|_| anyhow!("the writer panicked"))
    }
}

impl Drop for SurvivingWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Not joined: a request without reply ends with the cluster's teardown.
    }
}

fn role_summary(v: &Value) -> String {
    format!(
        "role {}, primary {}, generation {}, disk_state {}",
        v["role"], v["primary"], v["generation"], v["disk_state"]
    )
}

#[test]
fn handover_under_load_loses_no_completed_write() {
    let Some(mut c) = start_or_skip(&["a", "b", "c"]) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 32 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        set_up(c, "a", &["b", "c"], "32M")?;
        // `primary` needs an UpToDate target; c should be UpToDate too
        // before it is cut off.
        wait_ok(c, "a", 30)?;
        let opts = RandomOpts {
            seed,
            ..Default::default()
        };
        let w = SurvivingWriter::start(c.host("a").nbd(R)?, vec![0; SIZE as usize], opts.clone());
        std::thread::sleep(Duration::from_secs(2));
        ensure!(!w.finished(), "the writer on a ended before the handover");
        c.cut("c")?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(!w.finished(), "the writer on a ended before the handover");

        let before = w.completed();
        let t = Instant::now();
        let out = c.host("b").marsadm(&["primary", R])?;
        let took = t.elapsed();
        let at_return = w.completed();
        eprintln!(
            "`primary {R}` on b: {} after {:.2} s; a's writer had completed {before} writes before, {at_return} when it returned",
            out.status,
            took.as_secs_f64()
        );
        ensure!(
            out.status.success(),
            "`marsadm primary {R}` on b failed ({}) after {:.1} s: {}",
            out.status,
            took.as_secs_f64(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // The old primary's NBD clients got an error before `primary`
        // returned; allow a moment for the writer thread to notice.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !w.finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let still_writing = !w.finished();
        let end = w.end(Duration::from_secs(10))?;
        let Some(failed) = end.failed else {
            if let Some(nbd) = end.client {
                let _ = nbd.disconnect();
            }
            bail!(
                "a's NBD client still completed writes after `primary {R}` on b returned \
                 ({at_return} at the return, {} at the stop, writer alive 3 s later: {still_writing}); \
                 a still takes writes after the handover",
                end.completed
            );
        };
        eprintln!(
            "a's writer failed at request #{} ({} completed, {} after `primary` returned): {} (raw os error {:?})",
            failed.request,
            end.completed,
            end.completed.saturating_sub(at_return),
            failed.error,
            failed.error.raw_os_error()
        );
        let mut model = end.model;

        let b_view = c.host("b").resource(R)?;
        ensure!(
            b_view["role"] == "primary",
            "b is not primary after `primary {R}`: {b_view:#}"
        );
        // b's device: every completed write of a; the failed request's range
        // either untouched or fully written (its reply was an error or
        // never came).
        let dev = c.device("b", R, SIZE)?;
        let r = failed.range.clone();
        let old = model[r.clone()].to_vec();
        let got = &dev[r.clone()];
        let outcome = if got == old.as_slice() {
            "not on b"
        } else if got == failed.new.as_slice() {
            model[r.clone()].copy_from_slice(&failed.new);
            "on b"
        } else {
            "neither old nor new content on b"
        };
        eprintln!(
            "the failed request ({} bytes at {}): {outcome}",
            r.len(),
            r.start
        );
        same(
            "b's device right after the handover against a's completed writes",
            &model,
            &dev,
        )?;

        // The model stays valid: continue on b.
        let mut w = RandomWriter::start(
            c.host("b").nbd(R)?,
            model,
            RandomOpts {
                seed: seed ^ 1,
                ..opts
            },
        );
        w.keep_writing(Duration::from_secs(2))?;
        let writes_b = w.writes();
        let (nbd, model) = w.stop()?;
        nbd.disconnect()?;
        eprintln!("{writes_b} writes on b");

        c.restore("c")?;
        wait_ok(c, "b", 45)?;
        let dev = c.device("b", R, SIZE)?;
        same("b's device against all completed writes", &model, &dev)?;
        for h in ["a", "c"] {
            same(
                &format!("{h}'s backing file against b's device"),
                &dev,
                &c.backing(h, R, SIZE)?,
            )?;
        }
        for h in ["a", "c"] {
            let v = c.host(h).resource(R)?;
            eprintln!("{h}: {}", role_summary(&v));
            ensure!(
                v["role"] == "secondary" && v["primary"] == "b",
                "{h} should be a secondary following b: {v:#}"
            );
        }
        let v = c.host("b").resource(R)?;
        eprintln!("b: {}", role_summary(&v));
        Ok(())
    });
}

#[test]
fn emergency_mode_gives_up_a_paused_replica_and_resyncs_it() {
    let opts = Options {
        host_args: vec![(
            "a".into(),
            ["--log-quota", "8M", "--logfile-size", "1M"]
                .map(String::from)
                .to_vec(),
        )],
        ..Default::default()
    };
    let Some(mut c) = start_with_or_skip(&["a", "b"], opts) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 64 << 20;
        const WRITE: u64 = 40 << 20;
        let seed = seed();
        eprintln!("seed {seed}");
        set_up(c, "a", &["b"], "64M")?;
        wait_ok(c, "a", 30)?;
        c.host("b").marsadm_ok(&["pause-fetch", R])?;

        // 40 MiB of 1 MiB writes (random content) at the start of the device,
        // five times the log quota: the primary must keep serving them.
        let mut nbd = c.host("a").nbd(R)?;
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(seed);
        rng.fill(&mut model[..WRITE as usize]);
        let data = model[..WRITE as usize].to_vec();
        let progress = Arc::new(AtomicU64::new(0));
        let p2 = Arc::clone(&progress);
        let t = Instant::now();
        let h = std::thread::spawn(move || -> Result<NbdClient> {
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                nbd.write((i as u64) << 20, chunk, false)
                    .with_context(|| format!("1 MiB write #{i}"))?;
                p2.store(i as u64 + 1, Ordering::Release);
            }
            nbd.flush().context("the final flush")?;
            Ok(nbd)
        });
        while !h.is_finished() {
            if t.elapsed() > Duration::from_secs(20) {
                let v = c.host("a").resource(R)?;
                bail!(
                    "the primary stopped serving writes: {} of 40 MiB written after {:.1} s \
                     (b paused; a with --log-quota 8M); a's view: {v:#}",
                    progress.load(Ordering::Acquire),
                    t.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let nbd = h.join().map_err(|_| anyhow!("the writer panicked"))??;
        nbd.disconnect()?;
        eprintln!("40 MiB written on a in {:.1} s", t.elapsed().as_secs_f64());

        let v = c.host("a").resource(R)?;
        let b_on_a = c.host("a").replica(R, "b")?;
        eprintln!(
            "a's view after the writes: emergency {}, b {} (lag {} bytes), log_bytes {}",
            v["emergency"], b_on_a["disk_state"], b_on_a["lag_bytes"], v["log_bytes"]
        );
        ensure!(
            v["emergency"] == true && b_on_a["disk_state"] == "Outdated",
            "a should be in emergency mode with b Outdated: {v:#}"
        );

        // The resync copies the 40 MiB that differ; unthrottled it takes
        // ~0.3 s, too short to be sure to see b Inconsistent in a view.
        // At 100 Mbit/s it takes ~3.5 s.
        c.rate_limit("b", "100mbit")?;
        // Still paused: b must not have started its resync by itself.
        let b_self = c.host("b").replica(R, "b")?;
        let b_on_a = c.host("a").replica(R, "b")?;
        eprintln!(
            "before resume-fetch: b {} in a's view, {} in its own",
            b_on_a["disk_state"], b_self["disk_state"]
        );
        ensure!(
            b_on_a["disk_state"] == "Outdated" && b_self["disk_state"] != "UpToDate",
            "b resynced while its fetching was paused: {} in a's view, {} in its own",
            b_on_a["disk_state"],
            b_self["disk_state"]
        );
        let states = || -> Result<String> {
            Ok(format!(
                "{} in a's view, {} in b's own",
                c.host("a").replica(R, "b")?["disk_state"],
                c.host("b").replica(R, "b")?["disk_state"]
            ))
        };
        c.host("b").marsadm_ok(&["resume-fetch", R])?;
        let resumed = Instant::now();
        let just_after = states()?;
        eprintln!("right after resume-fetch: b {just_after}");
        wait_ok(c, "a", 30)?;
        let waited = resumed.elapsed();
        let after_wait = states()?;
        let dev = c.device("a", R, SIZE)?;
        same("a's device against the writes", &model, &dev)?;
        let b_dev = c.backing("b", R, SIZE)?;
        if let Some(diff) = mars_e2e::check::differences(&dev, &b_dev) {
            // Does b get there later (i.e. `wait` returned too early)?
            let later = wait_for(
                "b's backing file identical to a's device",
                Duration::from_secs(30),
                Duration::from_millis(100),
                || Ok((c.backing("b", R, SIZE)? == dev).then(|| resumed.elapsed())),
            );
            let syncs = c.log_lines("full sync");
            bail!(
                "`wait {R}` on a succeeded {:.2} s after resume-fetch on b, but b's backing file \
                 differs from a's device: {diff}\n\
                 b right after resume-fetch: {just_after}; right after the wait: {after_wait}\n\
                 b's backing file identical to a's device {}\n\
                 full-sync lines of the logs:\n{}",
                waited.as_secs_f64(),
                match later {
                    Ok(t) => format!("{:.2} s after resume-fetch", t.as_secs_f64()),
                    Err(e) => format!("not within 30 s more: {e:#}"),
                },
                syncs.join("\n")
            );
        }
        eprintln!(
            "b identical to a's device {:.2} s after resume-fetch (b {after_wait})",
            waited.as_secs_f64()
        );
        c.clear_rate_limit("b")?;
        wait_ok(c, "b", 30)?;
        let v = c.host("a").resource(R)?;
        eprintln!(
            "a's view at the end: emergency {}, b {}",
            v["emergency"],
            c.host("a").replica(R, "b")?["disk_state"]
        );
        Ok(())
    });
}
