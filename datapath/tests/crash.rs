//! Crash test of marsd: writers drive random 4 KiB writes and FLUSHes
//! through NBD while marsd is killed with SIGKILL at random moments; after
//! each restart the whole device is read back through NBD and checked
//! against what the writers observed.
//!
//! # The workload
//!
//! A small device (8 or 16 MiB) so that reading it all back is cheap. Every
//! 4 KiB block written carries a header (magic, write id, block number, a
//! CRC32C over the rest) followed by bytes derived from the id, so a block's
//! content names the write that put it there and a torn or misplaced block
//! is recognised. Several connections each keep several requests
//! outstanding (pipelined, replies matched by cookie); some writes carry
//! FUA, some requests are FLUSHes. Half of the writes go to a few hot
//! blocks so that concurrent writes to the same block are common. Now and
//! then `marsadm log-rotate` runs mid-round, and now and then marsd is
//! killed a second time while it recovers. A connection that ends before
//! the kill, or any error reply, fails the test.
//!
//! Every event is stamped under one lock with a logical clock: a request's
//! `sent` stamp is taken *before* its bytes go out, a reply's `done` stamp
//! *after* it was read. So `a.done < b.sent` implies that marsd replied to
//! `a` before it received `b`, and a FLUSH covers every write whose `done`
//! is below the FLUSH's `sent` (with NBD_FLAG_CAN_MULTI_CONN this holds
//! across connections).
//!
//! # What is checked after each restart
//!
//! Rounds are independent: the device read after round r-1 is the baseline
//! of round r, and every write of round r was sent after that read.
//!
//! (a) Integrity: every block holds either its baseline content or exactly
//!     the content of a write of this round *to that block* (header, CRC and
//!     the derived bytes all match).
//! (b) Durability: a write is *durable* if it completed with FUA or
//!     completed before the last completed FLUSH was sent. A durable write
//!     must be visible unless the block shows a write that may be ordered
//!     after it (below). Since marsd completes a write once write(2) into
//!     the log returned, and SIGKILL does not drop the page cache, the same
//!     must hold for every *completed* write; both are checked and a
//!     violation says which promise was broken.
//! (c) Prefix: the device must equal "the writes up to some cut of marsd's
//!     log applied in log order". The log order is unknown for concurrent
//!     writes, but it is a linear extension of real-time order: a write is
//!     appended between its `sent` and its `done`, so `a.done < b.sent`
//!     forces `a` before `b`. The strongest sound check is thus that the
//!     history "writes, crash, then read everything" is linearizable with
//!     every completed write taking effect and every write still in flight
//!     either taking effect (anywhere after its `sent`) or not at all. A
//!     write in flight is after nothing it could be forced behind, so
//!     leaving it out never breaks the cut, and linearizability is local
//!     (Herlihy & Wing): a total order for all blocks exists iff one exists
//!     per block. Per block that means: if the block shows write `v`, no
//!     completed write `w` to the block may have been sent after `v`
//!     completed (`v.done < w.sent`: `w` is logged after `v`, so `v` cannot
//!     be the last); if it shows its baseline, no completed write to it
//!     exists at all. Visible writes that never completed are fine: they
//!     reached the log before the kill.
//!
//! After the last round marsd gets SIGTERM (exit 0), the backing file must
//! equal the device last read through NBD, and after one more restart NBD
//! must still read the same. The backing file is also compared after every
//! restart, since recovery replays the log into it before serving I/O.
//!
//! Random choices come from one seed, printed at the start; `MARS_SEED=…`
//! replays the choices (thread timing still varies).

mod support;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use support::daemon::Daemon;
use support::nbd_client;
use support::tagged_block::{BLOCK, content, decode_any};

const RES: &str = "crash";
/// A request that gets no reply within this is treated as a dead connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// One crash scenario.
struct Scenario {
    name: &'static str,
    marsd_args: &'static [&'static str],
    device: u64,
    rounds: usize,
    connections: usize,
    /// Requests outstanding per connection.
    depth: usize,
    /// Kill this many milliseconds (uniform) after the writers are attached.
    kill_after_ms: (u64, u64),
    flush_one_in: u32,
    fua_one_in: u32,
    /// Half of the writes go to the first `hot_blocks` blocks.
    hot_blocks: u64,
    /// Now and then kill marsd once more while it recovers.
    kill_in_recovery_one_in: u32,
    /// Upper bound for the whole scenario.
    time_budget: Duration,
}

#[test]
fn sigkill_during_random_writes_and_flushes_keeps_completed_writes_and_a_log_prefix() {
    run(&Scenario {
        name: "random writes",
        marsd_args: &[],
        device: 8 << 20,
        rounds: 30,
        connections: 3,
        depth: 4,
        kill_after_ms: (5, 500),
        flush_one_in: 12,
        fua_one_in: 10,
        hot_blocks: 16,
        kill_in_recovery_one_in: 5,
        time_budget: Duration::from_secs(150),
    });
}

/// Small logfiles and a small overlay: rotation, writeback, position
/// persistence and logfile deletion all run while marsd is killed.
#[test]
fn sigkill_during_heavy_writeback_with_rotation_and_log_deletion() {
    let mut d = run(&Scenario {
        name: "heavy writeback",
        marsd_args: &["--overlay-limit", "8M", "--logfile-size", "1M"],
        device: 16 << 20,
        rounds: 6,
        connections: 3,
        depth: 8,
        kill_after_ms: (400, 1500),
        flush_one_in: 40,
        fua_one_in: 50,
        hot_blocks: 64,
        kill_in_recovery_one_in: 3,
        time_budget: Duration::from_secs(150),
    });
    // Logfile names carry a sequence number: how many were created, and
    // how many are left. (Logfiles that recovery replayed stay until
    // writeback next advances or `log-delete` runs.)
    let dir = d.root().join(format!("resource-{RES}"));
    let seqs = || -> Vec<u64> {
        std::fs::read_dir(&dir)
            .expect("resource directory")
            .filter_map(|e| {
                let name = e.expect("dir entry").file_name().into_string().ok()?;
                name.strip_prefix("log-")?.get(..9)?.parse().ok()
            })
            .collect()
    };
    let created = seqs().iter().max().copied().unwrap_or(0);
    let left = seqs().len() as u64;
    eprintln!("heavy writeback: {created} logfiles created, {left} left");
    assert!(
        created >= 5 && created - left >= 4,
        "expected logfile rotation and deletion while killing: {created} logfiles created, {left} left"
    );
    d.restart();
    d.marsadm_ok(&["log-delete", RES]);
    assert_eq!(seqs().len(), 1, "log-delete leaves the newest logfile only");
    assert!(d.term().success());
}

fn seed() -> u64 {
    match std::env::var("MARS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MARS_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

/// Runs the scenario; returns the (stopped) daemon for extra checks.
fn run(s: &Scenario) -> Daemon {
    let seed = seed();
    eprintln!(
        "{}: seed {seed} (MARS_SEED={seed} replays the random choices)",
        s.name
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut d = Daemon::start_with(s.marsd_args);
    let backing = d.path("crash.img");
    let size = s.device.to_string();
    d.marsadm_ok(&[
        "create-resource",
        RES,
        backing.to_str().expect("UTF-8 temp path"),
        "--size",
        &size,
    ]);

    let mut baseline = vec![0u8; s.device as usize];
    let mut next_id = 1;
    let mut totals = Totals::default();
    for round in 0..s.rounds {
        assert!(
            started.elapsed() < s.time_budget,
            "{} (seed {seed}): round {round} starts after {:?}, over the budget of {:?}",
            s.name,
            started.elapsed(),
            s.time_budget
        );
        let journal = Arc::new(Mutex::new(Journal::new(next_id)));
        let stop = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(s.connections + 1));
        let writers: Vec<_> = (0..s.connections)
            .map(|_| {
                let w = Writer {
                    addr: d.nbd_addr(),
                    journal: Arc::clone(&journal),
                    stop: Arc::clone(&stop),
                    barrier: Arc::clone(&barrier),
                    rng: StdRng::seed_from_u64(rng.random()),
                    depth: s.depth,
                    blocks: s.device / BLOCK as u64,
                    hot_blocks: s.hot_blocks,
                    flush_one_in: s.flush_one_in,
                    fua_one_in: s.fua_one_in,
                };
                std::thread::spawn(move || w.run())
            })
            .collect();
        barrier.wait();
        let delay = rng.random_range(s.kill_after_ms.0..s.kill_after_ms.1);
        if rng.random_ratio(1, 3) {
            // Rotate by command now and then, so kills also land next to a
            // rotation the writers did not cause.
            std::thread::sleep(Duration::from_millis(delay / 2));
            d.marsadm_ok(&["log-rotate", RES]);
            std::thread::sleep(Duration::from_millis(delay - delay / 2));
            totals.rotations += 1;
        } else {
            std::thread::sleep(Duration::from_millis(delay));
        }
        // How far writeback lags at the kill (view takes a few ms).
        let lag = {
            let v = d.resource_view(RES);
            v["log"]["appended"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(v["log"]["written_back"].as_u64().unwrap_or(0))
        };
        {
            let mut j = journal.lock().expect("journal lock");
            j.killed_at = Some(j.tick());
        }
        if let Some(status) = d.kill9() {
            panic!(
                "{} (seed {seed}): marsd exited by itself ({status}) in round {round}:\n{}",
                s.name,
                d.run_stderr()
            );
        }
        stop.store(true, Ordering::Release);
        for w in writers {
            w.join().expect("writer thread panicked");
        }
        if rng.random_ratio(1, s.kill_in_recovery_one_in) {
            d.spawn();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..80)));
            if let Some(status) = d.kill9() {
                panic!(
                    "{} (seed {seed}): marsd exited by itself ({status}) while recovering in round {round}:\n{}",
                    s.name,
                    d.run_stderr()
                );
            }
            totals.recovery_kills += 1;
        }
        d.restart();

        let image = read_device(&d, s.device);
        let j = journal.lock().expect("journal lock");
        assert!(
            j.errors.is_empty(),
            "{} (seed {seed}), round {round}: NBD errors before the kill: {:?}",
            s.name,
            j.errors
        );
        let report = check_round(&baseline, &j, &image);
        if report.in_flight == 0 {
            // Unusual with several requests outstanding: say how the writers ended.
            eprintln!(
                "{} round {round}: no write in flight at the kill (t={:?}); writers ended: {:?}",
                s.name, j.killed_at, j.exits
            );
        }
        eprintln!(
            "{} round {round:2}: kill after {delay:4} ms, writeback lag {lag:8} B; {}",
            s.name,
            report.summary()
        );
        if !report.violations.is_empty() {
            panic!(
                "{} (seed {seed}), round {round}: {} violation(s) after kill -9 and restart:\n  {}",
                s.name,
                report.violations.len(),
                report
                    .violations
                    .iter()
                    .take(12)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        let on_disk = std::fs::read(&backing).expect("reading the backing file");
        assert_images_equal(
            &on_disk,
            &image,
            &format!(
                "{} (seed {seed}), round {round}: backing file after recovery vs. NBD read",
                s.name
            ),
        );
        totals.add(&report, lag);
        next_id = j.next_id();
        drop(j);
        baseline = image;
    }

    let status = d.term();
    assert_eq!(
        status.code(),
        Some(0),
        "{} (seed {seed}): SIGTERM exit status {status}; stderr:\n{}",
        s.name,
        d.run_stderr()
    );
    let on_disk = std::fs::read(&backing).expect("reading the backing file");
    assert_images_equal(
        &on_disk,
        &baseline,
        &format!(
            "{} (seed {seed}): backing file after SIGTERM vs. last NBD read",
            s.name
        ),
    );
    d.restart();
    let v = d.resource_view(RES);
    assert_eq!(v["role"], "primary", "after restart: {v:#}");
    assert_eq!(
        v["log"]["appended"], v["log"]["written_back"],
        "a clean shutdown writes everything back: {v:#}"
    );
    let image = read_device(&d, s.device);
    assert_images_equal(
        &image,
        &baseline,
        &format!(
            "{} (seed {seed}): NBD read after clean restart vs. before",
            s.name
        ),
    );
    assert!(d.term().success(), "second SIGTERM");

    eprintln!(
        "{}: {} rounds in {:.1?}: {}",
        s.name,
        s.rounds,
        started.elapsed(),
        totals.summary()
    );
    // A run that wrote (almost) nothing proves nothing.
    assert!(
        totals.completed >= 100 * s.rounds as u64 / 4 && totals.flushes >= 1,
        "{} (seed {seed}): too little work to mean anything: {}",
        s.name,
        totals.summary()
    );
    d
}

// ---------------------------------------------------------------- content

fn describe(b: &[u8]) -> String {
    match decode_any(b) {
        Ok((id, block)) => format!("write {id} (to block {block})"),
        Err(why) => why,
    }
}

fn assert_images_equal(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    if got.len() != want.len() {
        diffs.push(format!("length {} instead of {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.chunks(BLOCK).zip(want.chunks(BLOCK)).enumerate() {
        if g != w && diffs.len() < 10 {
            diffs.push(format!(
                "block {i}: {} instead of {}",
                describe(g),
                describe(w)
            ));
        }
    }
    panic!("{what}: images differ:\n  {}", diffs.join("\n  "));
}

// ---------------------------------------------------------------- journal

struct WriteRec {
    block: u64,
    fua: bool,
    sent: u64,
    done: Option<u64>,
}

struct FlushRec {
    sent: u64,
    done: Option<u64>,
}

/// What the writers of one round did, stamped with one logical clock.
struct Journal {
    clock: u64,
    /// Id of `writes[0]`; ids are global so a block's content names its write.
    first_id: u64,
    writes: Vec<WriteRec>,
    flushes: Vec<FlushRec>,
    /// Failures that are not the kill (error replies, failed attach,
    /// connections lost before the kill).
    errors: Vec<String>,
    /// Stamp taken just before SIGKILL.
    killed_at: Option<u64>,
    /// How each writer ended: (stamp, reason).
    exits: Vec<(u64, String)>,
}

#[derive(Clone, Copy)]
enum Op {
    Write(usize),
    Flush(usize),
}

impl Journal {
    fn new(first_id: u64) -> Self {
        Journal {
            clock: 0,
            first_id,
            writes: Vec::new(),
            flushes: Vec::new(),
            errors: Vec::new(),
            killed_at: None,
            exits: Vec::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn next_id(&self) -> u64 {
        self.first_id + self.writes.len() as u64
    }

    /// Records a write about to be sent; returns its index and id.
    fn send_write(&mut self, block: u64, fua: bool) -> (usize, u64) {
        let id = self.next_id();
        let sent = self.tick();
        self.writes.push(WriteRec {
            block,
            fua,
            sent,
            done: None,
        });
        (self.writes.len() - 1, id)
    }

    fn send_flush(&mut self) -> usize {
        let sent = self.tick();
        self.flushes.push(FlushRec { sent, done: None });
        self.flushes.len() - 1
    }

    /// A writer's connection ended; before the kill that is an error.
    fn exit(&mut self, why: String) {
        let now = self.tick();
        if self.killed_at.is_none() {
            self.errors
                .push(format!("connection ended before the kill (t={now}): {why}"));
        }
        self.exits.push((now, why));
    }

    fn complete(&mut self, op: Op, errno: u32) {
        let now = self.tick();
        if errno != 0 {
            let what = match op {
                Op::Write(i) => format!(
                    "write {} to block {}",
                    self.first_id + i as u64,
                    self.writes[i].block
                ),
                Op::Flush(i) => format!("flush #{i}"),
            };
            self.errors
                .push(format!("{what} failed with errno {errno}"));
            return;
        }
        match op {
            Op::Write(i) => self.writes[i].done = Some(now),
            Op::Flush(i) => self.flushes[i].done = Some(now),
        }
    }
}

// ---------------------------------------------------------------- checker

#[derive(Default)]
struct RoundReport {
    sent: u64,
    completed: u64,
    durable: u64,
    flushes: u64,
    in_flight: u64,
    in_flight_visible: u64,
    violations: Vec<String>,
}

impl RoundReport {
    fn summary(&self) -> String {
        format!(
            "{} writes sent, {} completed ({} durable), {} flushes completed, {} in flight at the kill ({} visible after restart)",
            self.sent,
            self.completed,
            self.durable,
            self.flushes,
            self.in_flight,
            self.in_flight_visible
        )
    }
}

#[derive(Default)]
struct Totals {
    completed: u64,
    flushes: u64,
    in_flight: u64,
    in_flight_visible: u64,
    rounds_with_lag: u64,
    recovery_kills: u64,
    rotations: u64,
}

impl Totals {
    fn add(&mut self, r: &RoundReport, lag: u64) {
        self.completed += r.completed;
        self.flushes += r.flushes;
        self.in_flight += r.in_flight;
        self.in_flight_visible += r.in_flight_visible;
        self.rounds_with_lag += u64::from(lag > 0);
    }

    fn summary(&self) -> String {
        format!(
            "{} writes completed, {} flushes completed, {} writes in flight at kills ({} of them visible), {} kills with writeback behind, {} kills during recovery, {} log-rotate commands",
            self.completed,
            self.flushes,
            self.in_flight,
            self.in_flight_visible,
            self.rounds_with_lag,
            self.recovery_kills,
            self.rotations
        )
    }
}

/// What a block shows after the restart.
#[derive(Clone, Copy, PartialEq)]
enum Shown {
    /// Its content from before the round.
    Baseline,
    /// The write with this index in the journal.
    Write(usize),
}

/// Checks (a), (b) and (c) of the module docs for one round.
fn check_round(baseline: &[u8], j: &Journal, image: &[u8]) -> RoundReport {
    let mut r = RoundReport {
        sent: j.writes.len() as u64,
        flushes: j.flushes.iter().filter(|f| f.done.is_some()).count() as u64,
        ..Default::default()
    };
    // Everything that completed before the last completed FLUSH was sent.
    let horizon = j
        .flushes
        .iter()
        .filter(|f| f.done.is_some())
        .map(|f| f.sent)
        .max();
    let durable = |w: &WriteRec| {
        w.done
            .is_some_and(|d| w.fua || horizon.is_some_and(|h| d < h))
    };
    let mut per_block: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, w) in j.writes.iter().enumerate() {
        per_block.entry(w.block).or_default().push(i);
        r.completed += u64::from(w.done.is_some());
        r.durable += u64::from(durable(w));
        r.in_flight += u64::from(w.done.is_none());
    }
    let id = |i: usize| j.first_id + i as u64;
    let promise = |w: &WriteRec| {
        if durable(w) {
            if w.fua {
                "durable (FUA) write"
            } else {
                "durable (flushed) write"
            }
        } else {
            "completed write (write(2) to the log returned, which SIGKILL cannot undo)"
        }
    };

    for (b, (got, before)) in image.chunks(BLOCK).zip(baseline.chunks(BLOCK)).enumerate() {
        let b = b as u64;
        // (a) integrity
        let shown = if got == before {
            Shown::Baseline
        } else {
            match decode_any(got) {
                Err(why) => {
                    r.violations.push(format!(
                        "(a) block {b} holds neither its content from before the round ({}) nor a write to it: {why}",
                        describe(before)
                    ));
                    continue;
                }
                Ok((wid, wblock)) => {
                    let known = wid
                        .checked_sub(j.first_id)
                        .map(|i| i as usize)
                        .filter(|&i| i < j.writes.len());
                    match known {
                        Some(i) if wblock == b && j.writes[i].block == b => Shown::Write(i),
                        Some(i) => {
                            r.violations.push(format!(
                                "(a) block {b} holds write {wid}, which was sent to block {}",
                                j.writes[i].block
                            ));
                            continue;
                        }
                        None => {
                            r.violations.push(format!(
                                "(a) block {b} holds write {wid} (to block {wblock}), which is not a write of this round (ids {}..{}) and not the block's content from before ({})",
                                j.first_id,
                                j.next_id(),
                                describe(before)
                            ));
                            continue;
                        }
                    }
                }
            }
        };
        if let Shown::Write(v) = shown
            && j.writes[v].done.is_none()
        {
            r.in_flight_visible += 1;
        }
        // (b) and (c), per block
        for &w in per_block.get(&b).map(Vec::as_slice).unwrap_or(&[]) {
            let rec = &j.writes[w];
            let Some(done) = rec.done else {
                continue; // in flight at the kill: may or may not have been logged
            };
            match shown {
                Shown::Baseline => r.violations.push(format!(
                    "(b) {} {} to block {b} (sent t={}, done t={done}) is lost: the block still holds its content from before the round",
                    promise(rec),
                    id(w),
                    rec.sent
                )),
                Shown::Write(v) if v == w => {}
                Shown::Write(v) => {
                    let shown_rec = &j.writes[v];
                    if let Some(vd) = shown_rec.done
                        && vd < rec.sent
                    {
                        r.violations.push(format!(
                            "(c) block {b} shows write {} (done t={vd}), but {} {} to the same block was sent after that (t={}, done t={done}) and so is later in the log: stale data",
                            id(v),
                            promise(rec),
                            id(w),
                            rec.sent
                        ));
                    }
                }
            }
        }
    }
    r
}

// ---------------------------------------------------------------- NBD

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// Fixed-newstyle handshake with NBD_OPT_GO; returns the stream in
/// transmission. (The support client answers one request at a time; the
/// crash test needs several outstanding.)
fn attach(addr: SocketAddr, export: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if hello[..8] != NBDMAGIC.to_be_bytes() || hello[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(io::Error::other("not an NBD server"));
    }
    // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&3u32.to_be_bytes())?;
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    for _ in 0..16 {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        if len > 64 << 10 {
            return Err(io::Error::other("option reply too long"));
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            REP_ACK => return Ok(s),
            REP_INFO => {}
            _ => {
                return Err(io::Error::other(format!(
                    "NBD_OPT_GO refused ({kind:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
        }
    }
    Err(io::Error::other("no NBD_REP_ACK after 16 option replies"))
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + payload.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// One writer connection with `depth` requests outstanding. It ends when
/// the connection dies (the kill) or `stop` is set and nothing is in flight.
struct Writer {
    addr: SocketAddr,
    journal: Arc<Mutex<Journal>>,
    stop: Arc<AtomicBool>,
    barrier: Arc<Barrier>,
    rng: StdRng,
    depth: usize,
    blocks: u64,
    hot_blocks: u64,
    flush_one_in: u32,
    fua_one_in: u32,
}

impl Writer {
    fn exit(&self, why: String) {
        self.journal.lock().expect("journal lock").exit(why);
    }

    fn run(mut self) {
        let attached = attach(self.addr, RES);
        self.barrier.wait();
        let mut s = match attached {
            Ok(s) => s,
            Err(e) => {
                self.journal
                    .lock()
                    .expect("journal lock")
                    .errors
                    .push(format!("attaching to export {RES} failed: {e}"));
                return;
            }
        };
        let mut in_flight: HashMap<u64, Op> = HashMap::new();
        let mut cookie = 0u64;
        // Bounded by the kill; the cap only guards against a marsd that
        // never dies.
        for _ in 0..10_000_000u64 {
            while in_flight.len() < self.depth && !self.stop.load(Ordering::Acquire) {
                cookie += 1;
                let (op, msg) = if self.rng.random_ratio(1, self.flush_one_in) {
                    let i = self.journal.lock().expect("journal lock").send_flush();
                    (Op::Flush(i), request(CMD_FLUSH, 0, cookie, 0, &[]))
                } else {
                    let block = if self.rng.random_bool(0.5) {
                        self.rng.random_range(0..self.hot_blocks)
                    } else {
                        self.rng.random_range(0..self.blocks)
                    };
                    let fua = self.rng.random_ratio(1, self.fua_one_in);
                    let (i, id) = self
                        .journal
                        .lock()
                        .expect("journal lock")
                        .send_write(block, fua);
                    let flags = if fua { CMD_FLAG_FUA } else { 0 };
                    let data = content(id, block);
                    (
                        Op::Write(i),
                        request(CMD_WRITE, flags, cookie, block * BLOCK as u64, &data),
                    )
                };
                in_flight.insert(cookie, op);
                if let Err(e) = s.write_all(&msg) {
                    return self.exit(format!("sending: {e}"));
                }
            }
            if in_flight.is_empty() {
                return self.exit("stopped".into());
            }
            let mut reply = [0u8; 16];
            if let Err(e) = s.read_exact(&mut reply) {
                return self.exit(format!(
                    "reading a reply with {} requests in flight: {e}",
                    in_flight.len()
                ));
            }
            let magic = u32::from_be_bytes(reply[0..4].try_into().expect("4 bytes"));
            let errno = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
            let c = u64::from_be_bytes(reply[8..16].try_into().expect("8 bytes"));
            let mut j = self.journal.lock().expect("journal lock");
            match in_flight.remove(&c) {
                Some(op) if magic == SIMPLE_REPLY_MAGIC => j.complete(op, errno),
                _ => {
                    j.errors
                        .push(format!("bad reply: magic {magic:#x}, cookie {c}"));
                    return;
                }
            }
        }
    }
}

/// The whole device, read through NBD with the support client.
fn read_device(d: &Daemon, size: u64) -> Vec<u8> {
    let mut c = nbd_client::connect(d.nbd_addr(), RES)
        .unwrap_or_else(|e| panic!("attaching to {RES} after restart: {e}"));
    assert_eq!(c.size(), size, "device size after restart");
    let mut image = Vec::with_capacity(size as usize);
    const CHUNK: u64 = 1 << 20;
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off) as u32;
        image.extend(
            c.read(off, n)
                .unwrap_or_else(|e| panic!("reading {n} bytes at {off} after restart: {e}")),
        );
        off += u64::from(n);
    }
    c.disconnect().expect("NBD disconnect");
    image
}

/// The checker itself: it accepts what a correct marsd may show and flags
/// lost, stale, torn and misplaced blocks.
#[test]
fn checker_accepts_valid_outcomes_and_flags_lost_stale_torn_and_misplaced_blocks() {
    let mut j = Journal::new(100);
    let (w0, _) = j.send_write(0, false);
    j.complete(Op::Write(w0), 0);
    let (w1, _) = j.send_write(0, false); // sent after w0 completed: must win
    j.complete(Op::Write(w1), 0);
    j.send_write(1, false); // in flight at the kill
    let (w3, _) = j.send_write(2, false);
    j.complete(Op::Write(w3), 0);
    let f = j.send_flush();
    j.complete(Op::Flush(f), 0);
    let baseline = vec![0u8; 4 * BLOCK];
    let image = |blocks: [Option<(u64, u64)>; 4]| -> Vec<u8> {
        blocks
            .iter()
            .flat_map(|b| b.map_or_else(|| vec![0u8; BLOCK], |(id, at)| content(id, at)))
            .collect()
    };
    let good = image([Some((101, 0)), Some((102, 1)), Some((103, 2)), None]);
    let r = check_round(&baseline, &j, &good);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!((r.completed, r.durable, r.in_flight_visible), (3, 3, 1));
    // The write in flight may also be missing.
    let r = check_round(
        &baseline,
        &j,
        &image([Some((101, 0)), None, Some((103, 2)), None]),
    );
    assert!(r.violations.is_empty(), "{:?}", r.violations);

    let expect = |img: Vec<u8>, what: &str| {
        let r = check_round(&baseline, &j, &img);
        assert!(
            r.violations.iter().any(|v| v.contains(what)),
            "expected a violation containing {what:?}, got {:?}",
            r.violations
        );
    };
    expect(
        image([Some((100, 0)), None, Some((103, 2)), None]),
        "(c) block 0 shows write 100",
    );
    expect(
        image([Some((101, 0)), None, None, None]),
        "(b) durable (flushed) write 103 to block 2 (sent t=6, done t=7) is lost",
    );
    let mut torn = good.clone();
    torn[2 * BLOCK + 100] ^= 1;
    expect(torn, "torn: write 103 (to block 2)");
    expect(
        image([Some((101, 0)), None, Some((103, 2)), Some((103, 2))]),
        "block 3 holds write 103, which was sent to block 2",
    );
    expect(
        image([Some((101, 0)), None, Some((103, 2)), Some((7, 3))]),
        "not a write of this round",
    );
}
