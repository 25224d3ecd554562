//! How log and full-sync data travel between hosts: zstd compression
//! negotiated per link (`--ship-compression`) and the per-link bandwidth
//! limit (`--ship-rate-limit`). Replicas must end byte-identical either way,
//! and the fetched logfiles must be the primary's, byte for byte.
//!
//! Each test skips (prints "skipped: <reason>") without root or `ip netns`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mars_e2e::check::same;
use mars_e2e::cluster::{Options, start_with_or_skip};
use mars_e2e::cmd::wait_for;
use mars_e2e::{Cluster, run};
use serde_json::Value;

const R: &str = "r1";

fn log_counter(c: &Cluster, host: &str, key: &str) -> Result<u64> {
    let v: Value = c.host(host).resource(R)?;
    v["log"][key]
        .as_u64()
        .with_context(|| format!("{host}'s view has no log.{key}: {v}"))
}

fn set_up(c: &Cluster, primary: &str, secondaries: &[&str], size: &str) -> Result<()> {
    c.create_resource(primary, R, size)?;
    for h in secondaries {
        c.join_cluster(h, primary)?;
        c.join_resource(h, R)?;
    }
    Ok(())
}

/// Text-like data, as log payloads of a database or of text files often
/// are: compresses several times over, but not to nothing.
fn compressible_block(i: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut j = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            format!(
                "row {i:06}.{j:04}: status=ok value={} note=replicated\n",
                i * 31 + j % 7
            )
            .as_bytes(),
        );
        j += 1;
    }
    v.truncate(len);
    v
}

/// Pseudo-random bytes: what zstd cannot shrink.
fn random_block(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `blocks` blocks of `len` bytes from offset 0 on `host`'s NBD
/// export (then FLUSH), updating `model`.
fn write_blocks(
    c: &Cluster,
    host: &str,
    model: &mut [u8],
    blocks: u64,
    len: usize,
    make: impl Fn(u64, usize) -> Vec<u8>,
) -> Result<()> {
    let mut n = c.host(host).nbd(R)?;
    for i in 0..blocks {
        let data = make(i, len);
        let off = i * len as u64;
        n.write(off, &data, false)
            .with_context(|| format!("NBD write of {len} bytes at {off}"))?;
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    n.flush().context("NBD flush")?;
    n.disconnect().context("NBD disconnect")?;
    Ok(())
}

/// The logfiles of R on `host`: name → path.
fn logfiles(c: &Cluster, host: &str) -> Result<Vec<(String, PathBuf)>> {
    fn walk(dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() {
                walk(&e.path(), out)?;
            } else if name.starts_with("log-") {
                out.push((name, e.path()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    let dir = c.host(host).root().join(format!("resource-{R}"));
    walk(&dir, &mut out).with_context(|| format!("listing {}", dir.display()))?;
    out.sort();
    Ok(out)
}

/// Every logfile `secondary` holds that `primary` still has is the
/// primary's, byte for byte (compression is only on the wire).
fn same_logfiles(c: &Cluster, primary: &str, secondary: &str) -> Result<usize> {
    let theirs = logfiles(c, primary)?;
    let mut compared = 0;
    for (name, path) in logfiles(c, secondary)? {
        let Some((_, p)) = theirs.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let (a, b) = (std::fs::read(p)?, std::fs::read(&path)?);
        same(
            &format!("{secondary}'s logfile {name} against {primary}'s"),
            &a,
            &b,
        )?;
        compared += 1;
    }
    Ok(compared)
}

/// Three hosts; C turns compression off. A→B is compressed (both accept
/// zstd), A→C is raw (C offers nothing). Both end byte-identical, their
/// logfiles are A's, and B's wire bytes are a fraction of its log bytes.
#[test]
fn compression_is_negotiated_per_link_and_replicas_end_identical() {
    let opts = Options {
        host_args: vec![("c".into(), vec!["--ship-compression".into(), "off".into()])],
        ..Default::default()
    };
    let Some(mut c) = start_with_or_skip(&["a", "b", "c"], opts) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 32 << 20;
        set_up(c, "a", &["b", "c"], "32M")?;
        c.wait_ok("a", R, 60)?;
        let mut model = vec![0u8; SIZE as usize];
        // 16 MiB of text-like data, then 4 MiB that does not compress.
        write_blocks(c, "a", &mut model, 256, 64 << 10, compressible_block)?;
        let mut tail = vec![0u8; 4 << 20];
        let mut n = c.host("a").nbd(R)?;
        for i in 0..4u64 {
            let data = random_block(i + 1, 1 << 20);
            let off = (16 << 20) + (i << 20);
            n.write(off, &data, false)?;
            tail[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&data);
        }
        n.flush()?;
        n.disconnect()?;
        model[16 << 20..20 << 20].copy_from_slice(&tail);
        c.wait_ok("a", R, 120)?;

        let dev = c.device("a", R, SIZE)?;
        same("a's device against the writes", &model, &dev)?;
        for h in ["b", "c"] {
            same(
                &format!("{h}'s backing file against a's device"),
                &dev,
                &c.backing(h, R, SIZE)?,
            )?;
            let n = same_logfiles(c, "a", h)?;
            ensure!(n > 0, "no logfile of a's to compare on {h}");
        }

        let figures = |h: &str| -> Result<(u64, u64)> {
            Ok((
                log_counter(c, h, "received_bytes")?,
                log_counter(c, h, "received_wire_bytes")?,
            ))
        };
        let (b_log, b_wire) = figures("b")?;
        let (c_log, c_wire) = figures("c")?;
        let (a_log, a_wire) = (
            log_counter(c, "a", "shipped_bytes")?,
            log_counter(c, "a", "shipped_wire_bytes")?,
        );
        eprintln!(
            "figure: b (zstd) received {b_log} log bytes in {b_wire} wire bytes ({:.2}x); \
             c (off) {c_log} in {c_wire} ({:.2}x); a shipped {a_log} in {a_wire}",
            b_log as f64 / b_wire.max(1) as f64,
            c_log as f64 / c_wire.max(1) as f64,
        );
        ensure!(
            b_log >= 20 << 20 && c_log >= 20 << 20,
            "b and c should each have received the 20 MiB written: {b_log}, {c_log}"
        );
        ensure!(
            b_log == c_log,
            "b and c received different logs: {b_log} vs {c_log}"
        );
        // 16 of the 20 MiB compress several times over; the 4 MiB of noise
        // travel raw: well under half the log bytes on the wire.
        ensure!(
            b_wire * 2 < b_log,
            "compressed link a→b carried {b_wire} wire bytes for {b_log} log bytes"
        );
        ensure!(
            c_wire >= c_log,
            "link a→c (compression off on c) carried {c_wire} wire bytes for {c_log} log bytes: it was compressed"
        );
        ensure!(
            a_log >= b_log + c_log,
            "a shipped {a_log}, b and c received {b_log} + {c_log}"
        );
        ensure!(
            a_wire >= b_wire + c_wire,
            "a's wire bytes {a_wire}, b's and c's {b_wire} + {c_wire}"
        );
        Ok(())
    });
}

/// A with `--ship-rate-limit 2M`: a full sync of 6 MiB of noise (what
/// compression cannot shrink) and then 6 MiB of new log to B each take at
/// least what the limit allows, and B ends byte-identical.
#[test]
fn the_rate_limit_holds_for_full_sync_and_log_shipping() {
    const RATE: u64 = 2 << 20;
    let opts = Options {
        host_args: vec![("a".into(), vec!["--ship-rate-limit".into(), "2M".into()])],
        ..Default::default()
    };
    let Some(mut c) = start_with_or_skip(&["a", "b"], opts) else {
        return;
    };
    run(&mut c, |c| {
        const SIZE: u64 = 16 << 20;
        const BYTES: u64 = 6 << 20;
        // What may pass before the limit bites: one burst (a tenth of a
        // second of traffic, at least 64 KiB).
        let least =
            Duration::from_secs_f64((BYTES - (RATE / 10).max(64 << 10)) as f64 / RATE as f64);
        c.create_resource("a", R, "16M")?;
        let mut model = vec![0u8; SIZE as usize];
        write_blocks(c, "a", &mut model, 6, 1 << 20, |i, len| {
            random_block(i + 100, len)
        })?;

        // Full sync: B's backing file is zeros, so all 6 MiB of noise travel.
        c.join_cluster("b", "a")?;
        let started = Instant::now();
        c.join_resource("b", R)?;
        c.wait_ok("a", R, 120)?;
        let took = started.elapsed();
        eprintln!(
            "figure: full sync of {BYTES} bytes at --ship-rate-limit {RATE}: {:.1} s (at least {:.1} s)",
            took.as_secs_f64(),
            least.as_secs_f64()
        );
        ensure!(
            took >= least,
            "the full sync of {BYTES} bytes took {:.2} s, less than the {RATE} B/s limit allows ({:.2} s)",
            took.as_secs_f64(),
            least.as_secs_f64()
        );
        same(
            "b's backing file after the full sync",
            &model,
            &c.backing("b", R, SIZE)?,
        )?;

        // Log shipping: 6 MiB of new noise.
        let fetched0 = log_counter(c, "b", "fetched")?;
        let started = Instant::now();
        write_blocks(c, "a", &mut model, 6, 1 << 20, |i, len| {
            random_block(i + 200, len)
        })?;
        let end = log_counter(c, "a", "flushed")?;
        ensure!(
            end >= fetched0 + BYTES,
            "a's log grew from {fetched0} to {end} only"
        );
        wait_for(
            "b to fetch a's new log",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || Ok((log_counter(c, "b", "fetched")? >= end).then_some(())),
        )?;
        let took = started.elapsed();
        eprintln!(
            "figure: shipping {} log bytes at --ship-rate-limit {RATE}: {:.1} s (at least {:.1} s)",
            end - fetched0,
            took.as_secs_f64(),
            least.as_secs_f64()
        );
        ensure!(
            took >= least,
            "shipping {} log bytes took {:.2} s, less than the {RATE} B/s limit allows ({:.2} s)",
            end - fetched0,
            took.as_secs_f64(),
            least.as_secs_f64()
        );
        c.wait_ok("a", R, 60)?;
        let dev = c.device("a", R, SIZE)?;
        same("a's device against the writes", &model, &dev)?;
        same(
            "b's backing file after shipping",
            &dev,
            &c.backing("b", R, SIZE)?,
        )?;
        ensure!(
            same_logfiles(c, "a", "b")? > 0,
            "no logfile of a's to compare on b"
        );
        Ok(())
    });
}
