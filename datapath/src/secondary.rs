//! A secondary replica at work: the fetcher copies the primary's logfiles,
//! a full sync (when joining) copies its device, and the applier replays
//! fetched records into the backing device, in order, never beyond what is
//! durable in the local log copy. Between records the device is the
//! primary's device at some earlier log position.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::applicator::{Applicator, Position};
use crate::cluster::Cluster;
use crate::replication::{fetcher, fullsync};
use crate::resource::{DiskState, Resource};

/// The tasks of one secondary resource.
pub struct Runtime {
    stop: Arc<AtomicBool>,
    applier: Option<JoinHandle<()>>,
    fetcher: Option<tokio::task::JoinHandle<()>>,
    fullsync: Option<tokio::task::JoinHandle<()>>,
}

impl Runtime {
    /// Starts fetching (unless paused) and applying, and a full sync if one
    /// is pending. Needs a tokio runtime.
    pub fn start(res: Arc<Resource>, cluster: Arc<Cluster>) -> Runtime {
        let stop = Arc::new(AtomicBool::new(false));
        let meta = res.meta();
        let fullsync = meta
            .sync
            .is_some_and(|s| s.target.is_none())
            .then(|| tokio::spawn(fullsync::run(Arc::clone(&res), Arc::clone(&cluster))));
        let applier = {
            let (res, stop) = (Arc::clone(&res), Arc::clone(&stop));
            std::thread::Builder::new()
                .name(format!("apply-{}", res.name()))
                .spawn(move || apply_loop(res, stop))
                .expect("spawn applier")
        };
        let mut rt = Runtime {
            stop,
            applier: Some(applier),
            fetcher: None,
            fullsync,
        };
        rt.resume_fetch(res, cluster);
        rt
    }

    /// Starts the fetcher unless it runs, or fetching is paused or the
    /// resource is disconnected.
    pub fn resume_fetch(&mut self, res: Arc<Resource>, cluster: Arc<Cluster>) {
        let meta = res.meta();
        if self.fetcher.is_none() && !meta.fetch_paused && !meta.disconnected {
            self.fetcher = Some(tokio::spawn(fetcher::run(res, cluster)));
        }
    }

    /// Takes the fetcher out; the caller aborts and awaits it, after which
    /// no further byte is fetched.
    pub fn take_fetcher(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.fetcher.take()
    }

    /// Stops everything; returns once no more byte is fetched or applied. Blocking.
    pub fn stop(mut self) {
        for t in self.fetcher.iter().chain(self.fullsync.iter()) {
            t.abort();
        }
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.applier.take() {
            let _ = a.join();
        }
    }
}

fn apply_loop(res: Arc<Resource>, stop: Arc<AtomicBool>) {
    let name = res.name().to_string();
    let start = Position::load(&**res.storage(), &res.position_path())
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut app = Applicator::new(
        Arc::clone(res.store()),
        Arc::clone(res.storage()),
        Arc::clone(res.backing()),
        res.meta().backing,
        res.position_path(),
        start,
    );
    res.counters()
        .written_back
        .store(start.pos, Ordering::Release);
    while !stop.load(Ordering::Acquire) {
        let meta = res.meta();
        let pos = app.position().pos;
        // A full sync is done once replay has passed the position at the
        // end of the copy (it may already be there).
        if let Some(s) = meta.sync
            && s.target.is_some_and(|t| pos >= t)
        {
            match res.update_meta(|m| {
                m.disk_state = DiskState::UpToDate;
                m.sync = None;
            }) {
                Ok(()) => tracing::info!(resource = %name, pos, "full sync complete: UpToDate"),
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "recording UpToDate failed")
                }
            }
            continue;
        }
        let copying = meta.sync.is_some_and(|s| s.target.is_none());
        let limit = res.counters().flushed.load(Ordering::Acquire);
        if copying || meta.replay_paused || limit <= pos || res.store().files().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let _applying = res.apply_lock.lock().expect("apply lock");
        if res.meta().replay_paused {
            continue;
        }
        match app.apply_until(limit, 64) {
            Ok(0) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {
                let applied = app.position().pos;
                res.counters()
                    .written_back
                    .store(applied, Ordering::Release);
                match res.store().delete_before(applied) {
                    Ok(freed) => res.quota().release(freed),
                    Err(e) => {
                        tracing::warn!(resource = %name, error = %e, "deleting applied logfiles failed")
                    }
                }
                res.repl_error.lock().expect("error lock").take();
            }
            Err(e) => {
                tracing::error!(resource = %name, error = %e, "applying the log failed; retrying");
                *res.repl_error.lock().expect("error lock") = Some(format!("apply: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
