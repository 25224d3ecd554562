//! Runs a schedule against a 3-host cluster and checks as it goes.
//!
//! After every step: every marsd that should run still runs (else a
//! violation, and it is started again), its VmRSS is recorded, and one
//! secondary is sampled (`pause-replay`, read its backing file, `resume-replay`;
//! only when its own view says UpToDate, no split brain and the current
//! primary) and must be a prefix of the history. A restart of the primary's
//! marsd and a planned handover are followed by a check that the primary
//! holds every completed write; a forced failover by the fork check (the
//! new primary is a prefix; the deposed primary's tail is divergent and
//! must never show up again, and split brain must be reported when it
//! logged past the fork). `Quiesce` (and the end of every run) heals
//! everything and waits until every replica is identical to the primary.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::history::{BLOCK, History};
use super::schedule::Step;
use super::writers::Writers;
use super::{Config, Report};
use crate::Cluster;
use crate::host::Host;

pub const R: &str = "chaos";
pub const HOSTS: [&str; 3] = ["a", "b", "c"];
/// How long replicas may take to become identical once faults stop.
pub const CONVERGE: Duration = Duration::from_secs(90);
/// How long a planned handover may take.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(90);
/// marsd's resident memory must stay below this.
pub const RSS_LIMIT_KIB: u64 = 512 * 1024;

#[derive(Clone, Debug, PartialEq)]
enum Net {
    Cut(String),
    Between(String, String),
    Filter(String),
    Rate(String),
    Delay(String),
}

pub(super) struct Campaign<'c> {
    c: &'c mut Cluster,
    cfg: Config,
    hist: Arc<Mutex<History>>,
    primary: String,
    replicas: BTreeSet<String>,
    /// Hosts whose marsd is stopped, with the steps until it starts.
    down: BTreeMap<String, u8>,
    /// Hosts that left the resource, with the steps until they rejoin.
    left: BTreeMap<String, u8>,
    paused: BTreeSet<String>,
    net: Vec<(Net, u8)>,
    /// Hosts whose state root is full, with the steps until it is freed.
    full: BTreeMap<String, u8>,
    writers: Option<Writers>,
    /// The deposed primary's writers after a forced failover by cut.
    old_writers: Option<Writers>,
    writer_starts: u64,
    rng: StdRng,
    pub(super) report: Report,
    started: Instant,
}

fn hostname(i: u8) -> String {
    HOSTS[i as usize % HOSTS.len()].to_string()
}

impl<'c> Campaign<'c> {
    pub(super) fn new(c: &'c mut Cluster, cfg: Config) -> Campaign<'c> {
        let blocks = (cfg.size_mib << 20) / BLOCK as u64;
        Campaign {
            c,
            rng: StdRng::seed_from_u64(cfg.seed ^ 0x0dd5_eed5),
            report: Report::new(&cfg),
            cfg,
            hist: Arc::new(Mutex::new(History::new(blocks))),
            primary: "a".into(),
            replicas: BTreeSet::new(),
            down: BTreeMap::new(),
            left: BTreeMap::new(),
            paused: BTreeSet::new(),
            net: Vec::new(),
            full: BTreeMap::new(),
            writers: None,
            old_writers: None,
            writer_starts: 0,
            started: Instant::now(),
        }
    }

    fn log(&self, what: impl AsRef<str>) {
        eprintln!(
            "[chaos {} {:7.2}s {}] {}",
            self.cfg.seed,
            self.started.elapsed().as_secs_f64(),
            super::writers::utc_now(),
            what.as_ref()
        );
    }

    /// Counts one injected fault of `kind` (see [`Report::faults`]).
    fn fault(&mut self, kind: &'static str) {
        *self.report.faults.entry(kind).or_default() += 1;
    }

    /// `kill -9` of marsd on `h` (counted; nothing else).
    fn kill9(&mut self, h: &str) -> Result<()> {
        self.fault("kill");
        self.c.host_mut(h).kill9()
    }

    fn violation(&mut self, v: String) {
        self.log(format!("VIOLATION {v}"));
        self.report.violations.push(v);
    }

    fn size(&self) -> u64 {
        self.cfg.size_mib << 20
    }

    // ---- setup and the main loop -------------------------------------------

    pub(super) fn run(&mut self, steps: &[Step]) -> Result<()> {
        self.set_up()?;
        for (i, step) in steps.iter().enumerate() {
            self.log(format!("step {i}: {step}"));
            self.tick_timers()?;
            self.ensure_writers()?;
            let done = self
                .exec(step)
                .with_context(|| format!("step {i}: {step}"))?;
            if !done {
                self.report.skipped += 1;
            }
            self.after_step()?;
            self.report.steps += 1;
        }
        self.log("end of schedule: heal, stop, converge");
        self.quiesce()?;
        let panics = self.c.log_lines("panicked");
        if !panics.is_empty() {
            self.violation(format!("(6) a marsd panicked:\n{}", panics.join("\n")));
        }
        let h = self.hist.lock().expect("history lock");
        self.report.history = h.summary();
        self.report.violations.extend(h.violations.iter().cloned());
        Ok(())
    }

    fn set_up(&mut self) -> Result<()> {
        let size = format!("{}M", self.cfg.size_mib);
        self.c.create_resource("a", R, &size)?;
        self.replicas.insert("a".into());
        for h in &HOSTS[1..] {
            self.c.join_cluster(h, "a")?;
        }
        for &i in self.cfg.scenario.initial_replicas() {
            let h = hostname(i);
            if h != "a" {
                self.c.join_resource(&h, R)?;
                self.replicas.insert(h);
            }
        }
        self.c.wait_ok("a", R, 60)?;
        self.log(format!(
            "set up: {R} ({size}) on a, replicas {:?}",
            self.replicas
        ));
        Ok(())
    }

    fn up_hosts(&self) -> Vec<String> {
        HOSTS
            .iter()
            .map(|h| h.to_string())
            .filter(|h| !self.down.contains_key(h))
            .collect()
    }

    /// Secondaries (replicas, up, not the primary).
    fn secondaries(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|h| **h != self.primary && !self.down.contains_key(*h))
            .cloned()
            .collect()
    }

    fn tick_timers(&mut self) -> Result<()> {
        let mut undo = Vec::new();
        self.net.retain_mut(|(n, left)| {
            *left = left.saturating_sub(1);
            if *left == 0 {
                undo.push(n.clone());
                false
            } else {
                true
            }
        });
        for n in undo {
            self.undo_net(&n)?;
        }
        for h in count_down(&mut self.full) {
            self.free_disk(&h)?;
            if h == self.primary && !self.down.contains_key(&h) {
                self.stop_writers()?;
                self.check_primary(&format!("{h}'s device after its disk was full"))?;
            }
        }
        for h in count_down(&mut self.down) {
            self.start_host(&h)?;
        }
        for h in count_down(&mut self.left) {
            if !self.down.contains_key(&h) {
                self.rejoin(&h)?;
            }
        }
        Ok(())
    }

    fn after_step(&mut self) -> Result<()> {
        for h in HOSTS {
            if self.down.contains_key(h) {
                continue;
            }
            if !self.c.host_mut(h).is_running() {
                let tail = self.c.host(h).stderr_tail(15);
                self.violation(format!("(6) marsd on {h} exited on its own:\n{tail}"));
                self.c.host_mut(h).start()?;
                continue;
            }
            if let Some(kib) = rss_kib(self.c.host(h)) {
                let m = self.report.max_rss_kib.entry(h.to_string()).or_default();
                *m = (*m).max(kib);
                if kib > RSS_LIMIT_KIB {
                    self.violation(format!(
                        "(6) marsd on {h} uses {kib} KiB resident (limit {RSS_LIMIT_KIB})"
                    ));
                }
            }
        }
        let s = self.secondaries();
        if !s.is_empty() {
            let h = s[self.rng.random_range(0..s.len())].clone();
            self.sample(&h)?;
        }
        Ok(())
    }

    // ---- steps ---------------------------------------------------------------

    /// Executes one step; `false` if it did not apply (skipped).
    fn exec(&mut self, step: &Step) -> Result<bool> {
        match *step {
            Step::Run { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
            }
            Step::Kill { pick, down } => {
                let up = self.up_hosts();
                let h = up[pick as usize % up.len()].clone();
                // At most one secondary down at a time in the random campaign.
                let down = if h == self.primary || !self.down.is_empty() {
                    0
                } else {
                    down
                };
                self.kill(&h, down)?;
            }
            Step::KillHost { host, down } => {
                let h = hostname(host);
                if self.down.contains_key(&h) {
                    return Ok(false);
                }
                let down = if h == self.primary { 0 } else { down };
                self.kill(&h, down)?;
            }
            Step::Term { pick, down } => {
                let up = self.up_hosts();
                let h = up[pick as usize % up.len()].clone();
                let primary = h == self.primary;
                self.log(format!("SIGTERM {h} (primary: {primary})"));
                self.fault("term");
                let status = self.c.host_mut(&h).term()?;
                if !status.success() {
                    let tail = self.c.host(&h).stderr_tail(10);
                    self.violation(format!(
                        "(6) marsd on {h} exited with {status} on SIGTERM:\n{tail}"
                    ));
                }
                if primary || down == 0 || !self.down.is_empty() {
                    self.start_host(&h)?;
                    if primary {
                        self.after_primary_restart("SIGTERM")?;
                    }
                } else {
                    self.down.insert(h, down);
                }
            }
            Step::Cut { pick, steps } => {
                let h = hostname(pick);
                if self.net.iter().any(|(n, _)| *n == Net::Cut(h.clone())) {
                    return Ok(false);
                }
                self.c.cut(&h)?;
                self.fault("cut");
                self.log(format!("{:?} for {steps} steps", Net::Cut(h.clone())));
                self.net.push((Net::Cut(h), steps));
            }
            Step::CutBetween { x, y, steps } => {
                let (x, y) = (hostname(x), hostname(y));
                if x == y
                    || self.net.iter().any(|(n, _)| {
                        *n == Net::Between(x.clone(), y.clone())
                            || *n == Net::Between(y.clone(), x.clone())
                    })
                {
                    return Ok(false);
                }
                self.c.cut_between(&x, &y)?;
                self.fault("path-cut");
                self.log(format!(
                    "{:?} for {steps} steps",
                    Net::Between(x.clone(), y.clone())
                ));
                self.net.push((Net::Between(x, y), steps));
            }
            Step::OneWay {
                pick,
                inbound,
                steps,
            } => {
                if !self.c.has_nft() {
                    return Ok(false);
                }
                let h = hostname(pick);
                self.net.retain(|(n, _)| *n != Net::Filter(h.clone()));
                if inbound {
                    self.c.drop_inbound(&h)?;
                } else {
                    self.c.drop_outbound(&h)?;
                }
                self.fault("one-way");
                self.log(format!("{:?} for {steps} steps", Net::Filter(h.clone())));
                self.net.push((Net::Filter(h), steps));
            }
            Step::Loss { pick, pct, steps } => {
                if !self.c.has_nft() {
                    return Ok(false);
                }
                let h = hostname(pick);
                self.net.retain(|(n, _)| *n != Net::Filter(h.clone()));
                self.c.loss(&h, u32::from(pct))?;
                self.fault("loss");
                self.log(format!("{:?} for {steps} steps", Net::Filter(h.clone())));
                self.net.push((Net::Filter(h), steps));
            }
            Step::Rate { pick, kbit, steps } => {
                let h = hostname(pick);
                self.net.retain(|(n, _)| *n != Net::Rate(h.clone()));
                self.c.rate_limit(&h, &format!("{kbit}kbit"))?;
                self.fault("rate");
                self.log(format!("{:?} for {steps} steps", Net::Rate(h.clone())));
                self.net.push((Net::Rate(h), steps));
            }
            Step::Delay { pick, ms, steps } => {
                let h = hostname(pick);
                self.net.retain(|(n, _)| *n != Net::Delay(h.clone()));
                self.c.set_delay(&h, u64::from(ms))?;
                self.fault("delay");
                self.log(format!(
                    "{:?} up to {ms} ms for {steps} steps",
                    Net::Delay(h.clone())
                ));
                self.net.push((Net::Delay(h), steps));
            }
            Step::Handover {
                pick,
                kill_ms,
                kill_pick,
            } => return self.handover(pick, kill_ms, kill_pick),
            Step::Failover {
                pick,
                by_kill,
                keep_writing_ms,
            } => return self.failover(pick, by_kill, keep_writing_ms),
            Step::Leave { pick, rejoin } => {
                let s = self.secondaries();
                if s.is_empty() {
                    return Ok(false);
                }
                let h = s[pick as usize % s.len()].clone();
                return self.leave(h, rejoin);
            }
            Step::LeaveHost { host, rejoin } => {
                let h = hostname(host);
                if h == self.primary || !self.replicas.contains(&h) || self.down.contains_key(&h) {
                    return Ok(false);
                }
                return self.leave(h, rejoin);
            }
            Step::Recreate => return self.recreate(),
            Step::Join { host, kill_ms } => {
                let h = hostname(host);
                if self.replicas.contains(&h) || self.down.contains_key(&h) {
                    return Ok(false);
                }
                let joined = self.join(&h, kill_ms)?;
                if joined {
                    self.fault("join");
                }
                return Ok(joined);
            }
            Step::LogRotate { kill } => {
                let p = self.primary.clone();
                let out = self.c.host(&p).marsadm(&["log-rotate", R])?;
                self.fault("log-rotate");
                self.log(format!("log-rotate on {p}: {}", outcome(&out)));
                if kill {
                    self.kill(&p, 0)?;
                }
            }
            Step::LogDelete => {
                let p = self.primary.clone();
                let out = self.c.host(&p).marsadm(&["log-delete", R])?;
                self.fault("log-delete");
                self.log(format!("log-delete on {p}: {}", outcome(&out)));
            }
            Step::Fetch { host, pause } => {
                let h = hostname(host);
                if !self.replicas.contains(&h) || self.down.contains_key(&h) {
                    return Ok(false);
                }
                let cmd = if pause { "pause-fetch" } else { "resume-fetch" };
                self.c.host(&h).marsadm_ok(&[cmd, R])?;
                if pause {
                    self.fault("pause-fetch");
                    self.paused.insert(h);
                } else {
                    self.paused.remove(&h);
                }
            }
            Step::Invalidate { host } => {
                let h = hostname(host);
                if h == self.primary || !self.replicas.contains(&h) || self.down.contains_key(&h) {
                    return Ok(false);
                }
                let out = self.c.host(&h).marsadm(&["invalidate", R])?;
                self.fault("invalidate");
                self.log(format!("invalidate on {h}: {}", outcome(&out)));
                self.report.invalidations += 1;
            }
            Step::Corrupt { pick, truncate, at } => return self.corrupt(pick, truncate, at),
            Step::DiskFull {
                pick,
                primary,
                steps,
            } => {
                let h = if primary {
                    self.primary.clone()
                } else {
                    hostname(pick)
                };
                if self.full.contains_key(&h) {
                    return Ok(false);
                }
                let n = self.c.host(&h).fill_root()?;
                self.fault("disk-full");
                self.log(format!(
                    "{h}'s state root is full ({} MiB filler) for {steps} steps",
                    n >> 20
                ));
                self.full.insert(h, steps);
            }
            Step::Heal => self.heal()?,
            Step::Quiesce => self.quiesce()?,
        }
        Ok(true)
    }

    /// `kill -9` of `h`; the primary is restarted at once and checked, a
    /// secondary stays down for `down` steps.
    fn kill(&mut self, h: &str, down: u8) -> Result<()> {
        let role = if h == self.primary {
            "primary"
        } else {
            "secondary"
        };
        self.log(format!("kill -9 {h} ({role}), down for {down} steps"));
        self.kill9(h)?;
        if h == self.primary {
            self.start_host(h)?;
            self.after_primary_restart("kill -9")?;
        } else if down == 0 {
            self.start_host(h)?;
        } else {
            self.down.insert(h.to_string(), down);
        }
        Ok(())
    }

    fn start_host(&mut self, h: &str) -> Result<()> {
        if self.down.remove(h).is_some() {
            self.log(format!("start {h}"));
        }
        self.c.host_mut(h).start()?;
        if self.full.contains_key(h) {
            // Started on a full disk: free it now (see free_disk).
            self.free_disk(h)?;
        }
        Ok(())
    }

    /// After the primary's marsd was restarted: its writers are gone; it
    /// must be primary again and hold every completed write.
    fn after_primary_restart(&mut self, how: &str) -> Result<()> {
        self.stop_writers()?;
        let p = self.primary.clone();
        self.check_primary(&format!("{p}'s device after {how} and restart"))
    }

    fn handover(&mut self, pick: u8, kill_ms: Option<u64>, kill_pick: u8) -> Result<bool> {
        let mut eligible = Vec::new();
        // Not to a host whose state root is full: it cannot log what it
        // fetches, and marsd waits up to 120 s for it to catch up with no
        // primary meanwhile (seed 401; an availability cost, not a bug).
        for h in self.secondaries() {
            if !self.full.contains_key(&h) && self.own_state(&h)?.is_some_and(|s| s.uptodate()) {
                eligible.push(h);
            }
        }
        if eligible.is_empty() || self.down.contains_key(&self.primary) {
            return Ok(false);
        }
        let t = eligible[pick as usize % eligible.len()].clone();
        let old = self.primary.clone();
        let started = Instant::now();
        let mut child = spawn_marsadm(self.c.host(&t), &["primary", R])?;
        self.fault("handover");
        if let Some(ms) = kill_ms {
            std::thread::sleep(Duration::from_millis(ms));
            let up = self.up_hosts();
            let victim = up[kill_pick as usize % up.len()].clone();
            self.log(format!("kill -9 {victim} {ms} ms into the handover to {t}"));
            self.kill9(&victim)?;
            self.start_host(&victim)?;
        }
        match wait_child(&mut child, HANDOVER_LIMIT) {
            Ok(out) => self.log(format!(
                "primary {R} on {t} (from {old}): {} after {:.1} s",
                outcome(&out),
                started.elapsed().as_secs_f64()
            )),
            Err(e) => {
                let views: Vec<String> = HOSTS
                    .iter()
                    .map(|h| format!("{h}: {}", self.c.host(h).resource(R).unwrap_or_default()))
                    .collect();
                self.violation(format!(
                    "(avail) `primary {R}` on {t} (handover from {old}): {e:#}; views: {}",
                    views.join("; ")
                ));
            }
        }
        self.stop_writers()?;
        self.settle_primary(&[&t, &old])?;
        let p = self.primary.clone();
        self.check_primary(&format!(
            "{p}'s device after the handover attempt {old} -> {t}"
        ))?;
        Ok(true)
    }

    fn failover(&mut self, pick: u8, by_kill: bool, keep_ms: u64) -> Result<bool> {
        self.heal()?;
        let mut eligible = Vec::new();
        for h in self.secondaries() {
            if self
                .own_state(&h)?
                .is_some_and(|s| s.uptodate() && !s.split_brain)
            {
                eligible.push(h);
            }
        }
        if eligible.is_empty() {
            return Ok(false);
        }
        let t = eligible[pick as usize % eligible.len()].clone();
        let old = self.primary.clone();
        if by_kill {
            self.kill9(&old)?;
            self.down.insert(old.clone(), u8::MAX);
            self.stop_writers()?;
        } else {
            self.c.cut(&old)?;
            self.fault("cut");
        }
        let started = Instant::now();
        let forced = loop {
            let out = self.c.host(&t).marsadm(&["primary", R, "--force"])?;
            if out.status.success() {
                break true;
            }
            if started.elapsed() > Duration::from_secs(40) {
                self.violation(format!(
                    "(avail) `primary {R} --force` on {t} failed for 40 s with {old} unreachable: {}",
                    stderr(&out)
                ));
                break false;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if !forced {
            if by_kill {
                self.start_host(&old)?;
            } else {
                self.c.restore(&old)?;
            }
            self.stop_writers()?;
            self.settle_primary(&[&old, &t])?;
            return Ok(false);
        }
        self.fault("failover");
        self.log(format!(
            "{t} took over by force after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        self.primary = t.clone();
        let image = self.c.device(&t, R, self.size())?;
        let (fork, v) = self
            .hist
            .lock()
            .expect("history lock")
            .fork(&image, &format!("{t}'s device as it took over"));
        for x in v {
            self.violation(x);
        }
        self.log(format!(
            "fork: {} writes of {old}'s lineage are divergent ({} of them completed)",
            fork.divergent, fork.divergent_completed
        ));
        self.old_writers = self.writers.take();
        self.ensure_writers()?;
        if by_kill {
            self.start_host(&old)?;
        } else {
            std::thread::sleep(Duration::from_millis(keep_ms));
            self.c.restore(&old)?;
            // The deposed primary learns of the new generation and stops.
            let since = Instant::now();
            if let Some(w) = self.old_writers.take() {
                while w.ended() < self.cfg.writer.writers as usize
                    && since.elapsed() < Duration::from_secs(20)
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if w.ended() < self.cfg.writer.writers as usize {
                    self.violation(format!(
                        "(3) the deposed primary {old} still took writes 20 s after its link came back"
                    ));
                }
                let errs = w.stop()?;
                self.log(format!(
                    "{old}'s writers ended {:.1} s after its link came back: {errs:?}",
                    since.elapsed().as_secs_f64()
                ));
            }
        }
        // Split brain must be reported when the old primary logged past the fork.
        let deadline = Instant::now() + Duration::from_secs(30);
        let reported = loop {
            let s = self.own_state(&old)?;
            if s.as_ref().is_some_and(|s| s.split_brain) {
                break true;
            }
            if fork.divergent_completed == 0 || Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        if fork.divergent_completed > 0 && !reported {
            let v = self.c.host(&old).resource(R).unwrap_or_default();
            self.violation(format!(
                "(3) {old} completed {} writes past the fork but reports no split brain 30 s after it came back: {v}",
                fork.divergent_completed
            ));
        }
        self.resolve_split_brains()?;
        Ok(true)
    }

    /// Invariant 4: damage to a fetched logfile at rest is detected and
    /// never applied. See [`Step::Corrupt`]. The secondary must either
    /// refuse to load the resource with an error naming the corruption
    /// (its backing file then unchanged; the campaign repairs it with
    /// `delete-resource` + `join-resource`, the operator's remedy), or cut
    /// the damaged tail and fetch it again, its backing file a prefix of
    /// the history once it applied past the damage.
    fn corrupt(&mut self, pick: u8, truncate: bool, at: u64) -> Result<bool> {
        let p = self.primary.clone();
        let mut eligible = Vec::new();
        for h in self.secondaries() {
            if self
                .own_state(&h)?
                .is_some_and(|s| s.uptodate() && !s.split_brain && s.primary == p)
            {
                eligible.push(h);
            }
        }
        if eligible.is_empty() {
            return Ok(false);
        }
        let h = eligible[pick as usize % eligible.len()].clone();
        if !self
            .c
            .host(&h)
            .marsadm(&["pause-replay", R])?
            .status
            .success()
        {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(300));
        let status = self.c.host_mut(&h).term()?;
        if !status.success() {
            let tail = self.c.host(&h).stderr_tail(10);
            self.violation(format!(
                "(6) marsd on {h} exited with {status} on SIGTERM:\n{tail}"
            ));
        }
        let backing = self.c.host(&h).path(&format!("{R}.img"));
        let at_rest = crate::check::read_file(&backing, self.size())?;
        let dir = resource_dir(self.c.host(&h).root());
        let Some(d) = Damage::pick(&dir, truncate, at)? else {
            self.log(format!(
                "{h} holds no fetched log past its applied position"
            ));
            self.start_host(&h)?;
            // The pause outlives the restart: lift it (left paused, a later
            // handover to `h` waited for ever; seeds 12 and 401).
            self.c.host(&h).marsadm_ok(&["resume-replay", R])?;
            return Ok(false);
        };
        d.apply()?;
        self.fault(if truncate { "truncate" } else { "bit-flip" });
        self.log(format!("{h} (stopped): {d}"));
        self.start_host(&h)?;
        // The pause is kept across restarts; refused if the log is.
        let resumed = self.c.host(&h).marsadm(&["resume-replay", R])?;
        self.log(format!("resume-replay on {h}: {}", outcome(&resumed)));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.c.host(&h).resource(R).unwrap_or_default();
            // A resource that failed to load shows as role "none" with its
            // error (a running one may show a passing fetch error there).
            if let Some(e) = v["error"].as_str().filter(|_| v["role"] == "none") {
                // Refused: nothing may have been applied.
                if !e.contains("corrupt") && !e.contains("contiguous") {
                    self.violation(format!(
                        "(4) {h} refused its damaged log ({d}) without naming the damage: {e}"
                    ));
                }
                let now = crate::check::read_file(&backing, self.size())?;
                if let Some(diff) = crate::check::differences(&at_rest, &now) {
                    self.violation(format!(
                        "(4) {h} refused its damaged log ({d}) but its backing file changed: {diff}"
                    ));
                }
                self.log(format!(
                    "{h} refused the damaged log: {e}; delete-resource + join-resource"
                ));
                let out = self.c.host(&h).marsadm(&["delete-resource", R])?;
                if !out.status.success() {
                    bail!(
                        "delete-resource of the refused {R} on {h}: {}",
                        stderr(&out)
                    );
                }
                self.replicas.remove(&h);
                self.rejoin(&h)?;
                return Ok(true);
            }
            let s = State::of(&v);
            if s.uptodate() && s.applied > d.pos {
                self.log(format!(
                    "{h} fetched the damaged part again and applied up to {}",
                    s.applied
                ));
                self.sample_any(
                    &h,
                    &format!("{h}'s backing file after applying past the damage ({d})"),
                )?;
                return Ok(true);
            }
            if Instant::now() >= deadline {
                // E.g. cut off by a network fault: the next quiescence
                // checks that it converges to the primary's bytes.
                self.log(format!(
                    "{h} neither refused nor applied past the damage within 10 s \
                     (left to the next quiescence): {v}"
                ));
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `leave-resource` on `h`, which rejoins after `rejoin` steps. False
    /// if marsadm refused (logged).
    fn leave(&mut self, h: String, rejoin: u8) -> Result<bool> {
        let out = self.c.host(&h).marsadm(&["leave-resource", R])?;
        if !out.status.success() {
            self.log(format!("leave-resource on {h} refused: {}", stderr(&out)));
            return Ok(false);
        }
        self.fault("leave");
        self.log(format!("{h} left {R}, rejoins in {rejoin} steps"));
        // Until the primary has heard of it (gossip), a kill of `h` would
        // keep the leave from it (the recreate scenario needs it known).
        let p = self.primary.clone();
        let since = Instant::now();
        while since.elapsed() < Duration::from_secs(10)
            && self.c.host(&p).resource(R).is_ok_and(|v| {
                v["replicas"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["node"] == h.as_str()))
            })
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.replicas.remove(&h);
        self.paused.remove(&h);
        self.left.insert(h, rejoin.max(1));
        Ok(true)
    }

    /// Deletes the resource on the primary and creates it again (same name,
    /// same path, a fresh all-zero file): every write so far leaves the
    /// history, as after a fork at zeros, and must never show up again.
    fn recreate(&mut self) -> Result<bool> {
        self.stop_writers()?;
        let p = self.primary.clone();
        // The primary learns of leaves by gossip: give it a moment.
        let since = Instant::now();
        let out = loop {
            let out = self.c.host(&p).marsadm(&["delete-resource", R])?;
            if out.status.success()
                || !stderr(&out).contains("has replicas")
                || since.elapsed() > Duration::from_secs(10)
            {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !out.status.success() {
            self.log(format!("delete-resource on {p} refused: {}", stderr(&out)));
            return Ok(false);
        }
        let path = self.c.host(&p).path(&format!("{R}.img"));
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        self.fault("recreate");
        self.c
            .create_resource(&p, R, &format!("{}M", self.cfg.size_mib))?;
        let zeros = vec![0u8; self.size() as usize];
        let (fork, v) = self
            .hist
            .lock()
            .expect("history lock")
            .fork(&zeros, "the re-created resource");
        for x in v {
            self.violation(x);
        }
        self.log(format!(
            "{R} deleted and re-created on {p}: {} writes of the old incarnation must never show up again",
            fork.divergent
        ));
        self.replicas = [p].into_iter().collect();
        Ok(true)
    }

    /// `join-resource` on `h`; with `kill_ms`, `kill -9` it during its sync.
    fn join(&mut self, h: &str, kill_ms: Option<u64>) -> Result<bool> {
        let path = self.c.host(h).path(&format!("{R}.img"));
        let out = self
            .c
            .host(h)
            .marsadm(&["join-resource", R, &path.to_string_lossy()])?;
        if !out.status.success() {
            self.log(format!("join-resource on {h} refused: {}", stderr(&out)));
            return Ok(false);
        }
        self.left.remove(h);
        self.replicas.insert(h.to_string());
        self.log(format!("{h} joined {R}"));
        if let Some(ms) = kill_ms {
            std::thread::sleep(Duration::from_millis(ms));
            let state = self.own_state(h)?.map(|s| s.disk_state);
            self.log(format!(
                "kill -9 {h} {ms} ms after join-resource ({state:?})"
            ));
            self.kill9(h)?;
            self.start_host(h)?;
        }
        Ok(true)
    }

    /// `join-resource` on `h`, which must come back as a replica: if the
    /// join is refused (no primary reachable, a full disk) it is tried
    /// again at the next step and at quiescence. (Before, a refused join
    /// after `delete-resource` dropped `h` from the campaign while it
    /// still counted as a replica that had to converge.)
    fn rejoin(&mut self, h: &str) -> Result<()> {
        if !self.join(h, None)? {
            self.left.insert(h.to_string(), 1);
        }
        Ok(())
    }

    /// Frees `h`'s full state root. The primary must then hold every
    /// completed write, and no resource may have been refused for it.
    fn free_disk(&mut self, h: &str) -> Result<()> {
        self.full.remove(h);
        self.c.host(h).free_root()?;
        self.log(format!("{h}'s state root freed"));
        if self.down.contains_key(h) {
            return Ok(());
        }
        // A resource refused at a restart on the full disk is loaded again
        // within seconds once space is freed (marsd retries every 5 s).
        let since = Instant::now();
        while self.refused(h).is_some() && since.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Some(e) = self.refused(h) {
            self.violation(format!("(6) {h} refuses {R} after its disk was full: {e}"));
        }
        Ok(())
    }

    /// The error of `h`'s resource if it failed to load.
    fn refused(&self, h: &str) -> Option<String> {
        let v = self.c.host(h).resource(R).ok()?;
        let e = v["error"].as_str().filter(|_| v["role"] == "none")?;
        Some(e.to_string())
    }

    /// Undoes every network fault and starts every host that is down.
    fn heal(&mut self) -> Result<()> {
        for h in self.full.keys().cloned().collect::<Vec<_>>() {
            self.free_disk(&h)?;
        }
        for (n, _) in std::mem::take(&mut self.net) {
            self.undo_net(&n)?;
        }
        let down: Vec<String> = self.down.keys().cloned().collect();
        for h in down {
            self.start_host(&h)?;
        }
        Ok(())
    }

    fn undo_net(&mut self, n: &Net) -> Result<()> {
        self.log(format!("undo {n:?}"));
        match n {
            Net::Cut(h) => self.c.restore(h),
            Net::Between(x, y) => self.c.restore_between(x, y),
            Net::Filter(h) => self.c.clear_filter(h),
            Net::Rate(h) => self.c.clear_rate_limit(h),
            Net::Delay(h) => {
                self.c.set_delay(h, 0)?;
                self.log(format!(
                    "{h}'s proxy delayed {} chunks so far",
                    self.c.delayed(h)?
                ));
                Ok(())
            }
        }
    }

    // ---- the workload ----------------------------------------------------------

    fn ensure_writers(&mut self) -> Result<()> {
        if self
            .writers
            .as_ref()
            .is_some_and(|w| w.ended() > 0 || w.host != self.primary)
        {
            self.stop_writers()?;
        }
        if self.writers.is_some() || self.down.contains_key(&self.primary) {
            return Ok(());
        }
        self.writer_starts += 1;
        let seed = self
            .cfg
            .seed
            .wrapping_mul(1000)
            .wrapping_add(self.writer_starts * 16);
        match Writers::start(
            self.c.host(&self.primary),
            R,
            &self.hist,
            &self.cfg.writer,
            seed,
        ) {
            Ok(w) => self.writers = Some(w),
            Err(e) => self.log(format!("no writers on {} this step: {e:#}", self.primary)),
        }
        Ok(())
    }

    fn stop_writers(&mut self) -> Result<()> {
        for w in [self.writers.take(), self.old_writers.take()]
            .into_iter()
            .flatten()
        {
            let (host, ops) = (w.host.clone(), w.ops());
            match w.stop() {
                Ok(errs) => {
                    self.report.writer_errors += errs.len() as u64;
                    if !errs.is_empty() {
                        self.log(format!(
                            "writers on {host} ({ops} requests) ended: {errs:?}"
                        ));
                    }
                }
                Err(e) => self.violation(format!("(avail) {e:#}")),
            }
        }
        Ok(())
    }

    // ---- checks ------------------------------------------------------------------

    /// The primary's device must hold every completed write (writers stopped).
    fn check_primary(&mut self, what: &str) -> Result<()> {
        let p = self.primary.clone();
        let image = self.c.device(&p, R, self.size())?;
        let v = self
            .hist
            .lock()
            .expect("history lock")
            .check_complete(&image, what);
        self.report.complete_checks += 1;
        for x in v.into_iter().take(10) {
            self.violation(x);
        }
        Ok(())
    }

    /// Finds the primary after a role change (the hosts in `prefer` are
    /// asked to take over if nobody is primary after 15 s).
    fn settle_primary(&mut self, prefer: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut asked = 0;
        let mut wait_until = Instant::now() + Duration::from_secs(15);
        loop {
            let mut primaries = Vec::new();
            for h in self.up_hosts() {
                if self.own_state(&h)?.is_some_and(|s| s.role == "primary") {
                    primaries.push(h);
                }
            }
            if primaries.len() == 1 {
                let p = primaries.remove(0);
                if p != self.primary {
                    self.log(format!("primary is now {p}"));
                }
                self.primary = p;
                return Ok(());
            }
            if primaries.len() > 1 {
                self.violation(format!("(3) two primaries at once: {primaries:?}"));
            }
            if Instant::now() >= deadline {
                bail!("no single primary 45 s after a role change ({primaries:?})");
            }
            if primaries.is_empty() && Instant::now() >= wait_until && asked < prefer.len() {
                let h = prefer[asked];
                asked += 1;
                wait_until = Instant::now() + Duration::from_secs(10);
                let out = self.c.host(h).marsadm(&["primary", R])?;
                self.log(format!(
                    "no primary: `primary {R}` on {h}: {}",
                    outcome(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Invalidates every replica that reports split brain.
    fn resolve_split_brains(&mut self) -> Result<()> {
        for h in self.secondaries() {
            if self.own_state(&h)?.is_some_and(|s| s.split_brain) {
                let out = self.c.host(&h).marsadm(&["invalidate", R])?;
                self.log(format!("split brain on {h}: invalidate: {}", outcome(&out)));
                self.report.invalidations += 1;
            }
        }
        Ok(())
    }

    /// A replica's own view of itself, or `None` when it has no such
    /// resource or does not answer.
    fn own_state(&self, h: &str) -> Result<Option<State>> {
        if self.down.contains_key(h) {
            return Ok(None);
        }
        Ok(self.c.host(h).resource(R).ok().map(|v| State::of(&v)))
    }

    /// Invariant 2 on `h`: its backing file, read while replay is paused
    /// and while it says it is UpToDate following the current primary, is
    /// a prefix of the history.
    fn sample(&mut self, h: &str) -> Result<()> {
        let p = self.primary.clone();
        let Some(current) = self.own_state(&p)?.map(|s| s.generation) else {
            return Ok(());
        };
        let good = |s: &Option<State>| {
            s.as_ref().is_some_and(|s| {
                s.uptodate()
                    && !s.split_brain
                    && s.role == "secondary"
                    && s.primary == p
                    && s.generation == current
            })
        };
        let host = self.c.host(h);
        if !host.marsadm(&["pause-replay", R])?.status.success() {
            return Ok(());
        }
        let before = self.own_state(h)?;
        let image = crate::check::read_file(&host.path(&format!("{R}.img")), self.size());
        let after = self.own_state(h)?;
        let resumed = host.marsadm(&["resume-replay", R])?;
        if !resumed.status.success() {
            bail!("resume-replay on {h}: {}", stderr(&resumed));
        }
        if !(good(&before) && good(&after)) {
            return Ok(());
        }
        self.report.samples += 1;
        let r = self
            .hist
            .lock()
            .expect("history lock")
            .check_prefix(&image?, &format!("{h}'s backing file (replay paused)"));
        if let Err(v) = r {
            let view = self.c.host(h).resource(R).unwrap_or_default();
            for x in v.into_iter().take(5) {
                self.violation(x);
            }
            self.log(format!("{h}'s view at that sample: {view}"));
        }
        Ok(())
    }

    /// Invariant 2 (and 4) on `h` whatever it says of itself: its backing
    /// file, read while replay is paused, is a prefix of the history.
    fn sample_any(&mut self, h: &str, what: &str) -> Result<()> {
        let host = self.c.host(h);
        if !host.marsadm(&["pause-replay", R])?.status.success() {
            return Ok(());
        }
        let image = crate::check::read_file(&host.path(&format!("{R}.img")), self.size());
        let resumed = host.marsadm(&["resume-replay", R])?;
        if !resumed.status.success() {
            bail!("resume-replay on {h}: {}", stderr(&resumed));
        }
        self.report.samples += 1;
        let r = self
            .hist
            .lock()
            .expect("history lock")
            .check_prefix(&image?, what);
        if let Err(v) = r {
            for x in v.into_iter().take(5) {
                self.violation(format!("(4) {x}"));
            }
        }
        Ok(())
    }

    /// Heals everything, stops the writers and waits until every replica
    /// is identical to the primary's device; a replica that says UpToDate
    /// and has applied the primary's whole log must be identical then.
    pub(super) fn quiesce(&mut self) -> Result<()> {
        self.heal()?;
        let left: Vec<String> = self.left.keys().cloned().collect();
        for h in left {
            // Healed: a join may still be refused for a moment (a primary
            // just elected, gossip on its way), not for long.
            let since = Instant::now();
            while !self.join(&h, None)? {
                if since.elapsed() > Duration::from_secs(30) {
                    self.violation(format!(
                        "(avail) {h} could not join {R} again within 30 s after the faults stopped"
                    ));
                    self.left.remove(&h);
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        for h in std::mem::take(&mut self.paused) {
            self.c.host(&h).marsadm_ok(&["resume-fetch", R])?;
        }
        self.stop_writers()?;
        self.resolve_split_brains()?;
        let p = self.primary.clone();
        let image = self.c.device(&p, R, self.size())?;
        let v = self
            .hist
            .lock()
            .expect("history lock")
            .check_complete(&image, &format!("{p}'s device at quiescence"));
        self.report.complete_checks += 1;
        for x in v.into_iter().take(10) {
            self.violation(x);
        }
        let end = self
            .c
            .host(&p)
            .resource(R)?
            .pointer("/log/appended")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let started = Instant::now();
        let mut pending: BTreeSet<String> = self.secondaries().into_iter().collect();
        let mut split_resolved = false;
        while !pending.is_empty() {
            for h in pending.clone() {
                let host = self.c.host(&h);
                if !host.marsadm(&["pause-replay", R])?.status.success() {
                    continue;
                }
                let s = self.own_state(&h)?;
                let caught_up = s.as_ref().is_some_and(|s| s.uptodate() && s.applied >= end);
                let backing = caught_up
                    .then(|| crate::check::read_file(&host.path(&format!("{R}.img")), self.size()))
                    .transpose();
                host.marsadm_ok(&["resume-replay", R])?;
                if let Some(b) = backing? {
                    if let Some(d) = crate::check::differences(&image, &b) {
                        self.violation(format!(
                            "(5) {h} says UpToDate and applied {} >= the primary's log end {end}, but its backing file differs from {p}'s device: {d}",
                            s.map_or(0, |s| s.applied)
                        ));
                    }
                    pending.remove(&h);
                }
            }
            if pending.is_empty() {
                break;
            }
            if !split_resolved && started.elapsed() > Duration::from_secs(20) {
                // A replica may have found its split brain only now.
                self.resolve_split_brains()?;
                split_resolved = true;
            }
            if started.elapsed() > CONVERGE {
                let mut views = Vec::new();
                for h in &pending {
                    views.push(format!(
                        "{h}: {}",
                        self.c.host(h).resource(R).unwrap_or_default()
                    ));
                }
                self.violation(format!(
                    "(5) not converged {CONVERGE:?} after the faults stopped: {}",
                    views.join("; ")
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let took = started.elapsed();
        self.report.quiesces.push(took.as_secs_f64());
        self.log(format!("converged in {:.1} s", took.as_secs_f64()));
        Ok(())
    }
}

/// A replica's own state, from `view NAME --json`.
#[derive(Clone, Debug)]
struct State {
    role: String,
    disk_state: String,
    primary: String,
    generation: u64,
    split_brain: bool,
    applied: u64,
}

impl State {
    fn of(v: &Value) -> State {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        State {
            role: s("role"),
            disk_state: s("disk_state"),
            primary: s("primary"),
            generation: v["generation"].as_u64().unwrap_or(0),
            split_brain: v["split_brain"].as_bool().unwrap_or(false),
            applied: v
                .pointer("/log/applied")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }

    fn uptodate(&self) -> bool {
        self.disk_state == "UpToDate"
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn outcome(out: &std::process::Output) -> String {
    if out.status.success() {
        format!("ok: {}", String::from_utf8_lossy(&out.stdout).trim())
    } else {
        format!("{}: {}", out.status, stderr(out))
    }
}

/// `marsadm ARGS` on `host`, running in the background.
fn spawn_marsadm(host: &Host, args: &[&str]) -> Result<Child> {
    let bins = crate::bins::bins().map_err(|e| anyhow!(e))?;
    Command::new(&bins.marsadm)
        .env_remove("MARS_ROOT")
        .arg("--root")
        .arg(host.root())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting marsadm")
}

fn wait_child(child: &mut Child, limit: Duration) -> Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("marsadm did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = std::process::Output {
        status: child.wait()?,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut out.stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut out.stderr);
    }
    Ok(out)
}

/// marsd's resident set in KiB.
fn rss_kib(h: &Host) -> Option<u64> {
    let pid = h.pid().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// One step less for every host waiting in `waits`; the hosts whose wait
/// is over now.
fn count_down(waits: &mut BTreeMap<String, u8>) -> Vec<String> {
    waits
        .iter_mut()
        .filter_map(|(h, left)| {
            *left = left.saturating_sub(1);
            (*left == 0).then(|| h.clone())
        })
        .collect()
}

/// The resource's directory under a host's state root.
fn resource_dir(root: &std::path::Path) -> std::path::PathBuf {
    root.join(format!("resource-{R}"))
}

/// Damage to one logfile at rest, past the replica's applied position.
struct Damage {
    file: std::path::PathBuf,
    /// File offset of the flipped byte, or the new length.
    offset: u64,
    /// The log position there.
    pos: u64,
    bit: Option<u8>,
}

impl Damage {
    /// Picks (from `at`) a place past the applied position in one of the
    /// logfiles of `dir`; `None` if no logfile reaches past it.
    fn pick(dir: &std::path::Path, truncate: bool, at: u64) -> Result<Option<Damage>> {
        const HEADER: u64 = 64;
        let applied = std::fs::read(dir.join("written-back.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["pos"].as_u64())
            .unwrap_or(0);
        let mut spans = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("log-") && !n.ends_with(".tmp"))
            .collect();
        names.sort();
        for n in names {
            let file = dir.join(&n);
            let bytes = std::fs::read(&file)?;
            if bytes.len() as u64 <= HEADER {
                continue;
            }
            let start = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
            let end = start + bytes.len() as u64 - HEADER;
            if end > applied {
                let from = HEADER + applied.saturating_sub(start);
                spans.push((file, start, from, bytes.len() as u64));
            }
        }
        if spans.is_empty() {
            return Ok(None);
        }
        let (file, start, from, len) = spans.swap_remove((at % spans.len() as u64) as usize);
        let offset = from + (at >> 16) % (len - from);
        Ok(Some(Damage {
            file,
            offset,
            pos: start + offset - HEADER,
            bit: (!truncate).then_some((at >> 8) as u8 % 8),
        }))
    }

    fn apply(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&self.file)?;
        match self.bit {
            Some(bit) => {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, self.offset)?;
                b[0] ^= 1 << bit;
                f.write_all_at(&b, self.offset)?;
            }
            None => f.set_len(self.offset)?,
        }
        Ok(())
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.file.file_name().unwrap_or_default().to_string_lossy();
        match self.bit {
            Some(bit) => write!(
                f,
                "bit {bit} flipped in {name} at offset {} (log position {})",
                self.offset, self.pos
            ),
            None => write!(
                f,
                "{name} truncated to {} bytes (log position {})",
                self.offset, self.pos
            ),
        }
    }
}
