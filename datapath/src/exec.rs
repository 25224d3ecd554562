//! Where the datapath's background work runs: the seam that lets a
//! simulation run a node deterministically (style.md section 4).
//!
//! - Workers (the logger, syncer and writeback of a primary; the applier
//!   and persister of a secondary) are async loops that wait on tokio
//!   primitives and tokio time. marsd runs each on its own named OS thread
//!   with a current-thread runtime ([`spawn_worker`]), as before: blocking
//!   disk I/O inside them stalls nobody else.
//! - Blocking sections of async code (role changes, which stop workers and
//!   wait for them) go through [`blocking`]: `spawn_blocking` in marsd.
//! - The wall clock (record timestamps, gossip times) is [`unix_now`].
//!
//! A simulation installs a [`Sim`] on its thread ([`Sim::install`]). Then
//! workers are tasks on the host's (turmoil's) runtime and see simulated
//! time; blocking sections run one at a time on one executor thread that
//! only runs while the simulation thread waits for it ([`Sim::settle`],
//! after each simulation step): a section that waits for a worker parks,
//! and is resumed between steps once the worker has ended. So nothing runs
//! beside the simulation, and a seed replays the same run.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

thread_local! {
    static SIM: RefCell<Option<Arc<Sim>>> = const { RefCell::new(None) };
}

fn current_sim() -> Option<Arc<Sim>> {
    SIM.with(|s| s.borrow().clone())
}

/// Whether this thread runs simulated node code.
pub fn simulated() -> bool {
    SIM.with(|s| s.borrow().is_some())
}

/// Seconds since the unix epoch: real time, or in a simulation a fixed
/// epoch plus the simulated time (see [`Sim::set_time`]).
pub fn unix_now() -> Duration {
    match current_sim() {
        Some(s) => SIM_EPOCH + Duration::from_nanos(s.now_ns.load(Ordering::Acquire)),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    }
}

/// Where simulated unix time starts (2026-01-01).
const SIM_EPOCH: Duration = Duration::from_secs(1_767_225_600);

/// A background worker: an OS thread (marsd) or a task (simulation).
pub struct Worker(WorkerKind);

enum WorkerKind {
    Thread(std::thread::JoinHandle<()>),
    Task {
        done: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    },
}

/// Sets `done` when the worker's future ends or is dropped (its runtime
/// went down with a crashed host).
struct DoneOnDrop(Arc<AtomicBool>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Starts `fut` as a worker named `name`: on its own OS thread with a
/// current-thread runtime, or in a simulation as a task on the current
/// runtime.
pub fn spawn_worker(name: String, fut: impl Future<Output = ()> + Send + 'static) -> Worker {
    spawn_background_worker(name, 0, fut)
}

/// Like [`spawn_worker`], for work that may wait while the CPUs are busy:
/// its thread runs at nice value `nice` (0: normal; a simulation ignores
/// it). Writeback uses this, so that under a CPU-bound burst the writers,
/// whose requests wait for them, get the CPUs and the log absorbs the burst,
/// as the MARS design intends; the overlay's limit still paces the writers
/// by writeback, which then has the CPUs to itself.
pub fn spawn_background_worker(
    name: String,
    nice: i32,
    fut: impl Future<Output = ()> + Send + 'static,
) -> Worker {
    if simulated() {
        let done = Arc::new(AtomicBool::new(false));
        let guard = DoneOnDrop(Arc::clone(&done));
        let task = tokio::spawn(async move {
            let _guard = guard;
            fut.await
        });
        return Worker(WorkerKind::Task { done, task });
    }
    let t = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if nice != 0 {
                set_thread_nice(nice);
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("worker runtime")
                .block_on(fut)
        })
        .expect("spawn worker thread");
    Worker(WorkerKind::Thread(t))
}

/// Sets the calling thread's nice value (on Linux `setpriority` with
/// `PRIO_PROCESS` and 0 names the calling thread, not the process). A
/// failure (a negative value without the privilege) leaves the thread as it
/// was, with a warning.
fn set_thread_nice(nice: i32) {
    // SAFETY: a plain syscall on the calling thread; no memory is passed.
    let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "cannot set a worker thread's nice value");
    }
}

impl Worker {
    /// Waits until the worker has ended. Blocking: from a blocking section
    /// (in a simulation: one run by [`blocking`]), never from a task.
    pub fn join(self) {
        match self.0 {
            WorkerKind::Thread(t) => {
                let _ = t.join();
            }
            WorkerKind::Task { done, task: _task } => {
                park_until(move || done.load(Ordering::Acquire))
            }
        }
    }

    /// Waits until the worker has ended, from another worker.
    pub async fn wait(self) {
        match self.0 {
            // A worker's own thread: blocking is fine there.
            WorkerKind::Thread(t) => {
                let _ = t.join();
            }
            WorkerKind::Task { task, .. } => {
                let _ = task.await;
            }
        }
    }
}

/// A blocking section that did not complete (it panicked, or its runtime
/// went down).
#[derive(Debug, thiserror::Error)]
#[error("blocking task failed: {0}")]
pub struct BlockingError(String);

/// Runs blocking `f` off the async tasks: `spawn_blocking`, or in a
/// simulation on its executor thread, one section at a time, while the
/// simulation waits. Starts at once (awaiting is optional, as with
/// `spawn_blocking`).
pub fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Blocking<R> {
    let Some(sim) = current_sim() else {
        return Blocking(BlockingKind::Pool(tokio::task::spawn_blocking(f)));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    let job: Job = Box::new(move || {
        let _rt = handle.enter();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.map_err(|p| {
            BlockingError(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into()),
            )
        }));
    });
    sim.submit(job);
    Blocking(BlockingKind::Sim(rx))
}

/// Blocking disk I/O from a task: on a blocking thread, or in a
/// simulation (an in-memory disk) inline, now. Starts at once.
pub fn io<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Blocking<R> {
    if simulated() {
        return Blocking(BlockingKind::Ready(Some(f())));
    }
    Blocking(BlockingKind::Pool(tokio::task::spawn_blocking(f)))
}

/// The outcome of [`blocking`] or [`io`].
pub struct Blocking<R>(BlockingKind<R>);

enum BlockingKind<R> {
    Pool(tokio::task::JoinHandle<R>),
    Sim(tokio::sync::oneshot::Receiver<Result<R, BlockingError>>),
    Ready(Option<R>),
}

impl<R> Blocking<R> {
    /// Whether awaiting it would not wait.
    pub fn is_finished(&self) -> bool {
        match &self.0 {
            BlockingKind::Pool(h) => h.is_finished(),
            BlockingKind::Sim(rx) => !rx.is_empty() || rx.is_terminated(),
            BlockingKind::Ready(_) => true,
        }
    }
}

// `R` is only ever moved out, never pinned.
impl<R> Unpin for Blocking<R> {}

impl<R> Future for Blocking<R> {
    type Output = Result<R, BlockingError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            BlockingKind::Pool(h) => Pin::new(h)
                .poll(cx)
                .map(|r| r.map_err(|e| BlockingError(e.to_string()))),
            BlockingKind::Sim(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(BlockingError("the simulated executor dropped it".into())))
            }),
            BlockingKind::Ready(r) => Poll::Ready(Ok(r.take().expect("polled after completion"))),
        }
    }
}

/// In a blocking section: waits until `cond` holds. In a simulation the
/// section parks, and the simulation thread resumes it between steps once
/// `cond` holds (`cond` must not block).
pub fn park_until(cond: impl Fn() -> bool + Send + 'static) {
    match current_sim() {
        Some(sim) if sim.on_executor() => sim.park(Box::new(cond)),
        Some(_) => assert!(
            cond(),
            "a simulated blocking wait outside exec::blocking would deadlock"
        ),
        None => {
            // Not used by marsd's own paths (threads are joined); for a
            // task joined from a plain thread.
            while !cond() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;
type Cond = Box<dyn Fn() -> bool + Send>;

/// The deterministic executor of a simulation (see the module doc).
pub struct Sim {
    state: Mutex<SimState>,
    cv: Condvar,
    now_ns: AtomicU64,
}

#[derive(Default)]
struct SimState {
    /// Blocking sections not started yet, in the order submitted.
    queue: VecDeque<Job>,
    /// The section to start on the executor thread.
    start: Option<Job>,
    /// A section is under way on the executor (running or parked).
    busy: bool,
    /// What the parked section waits for.
    parked: Option<Cond>,
    /// The executor thread holds the baton (else the simulation does).
    executor_turn: bool,
    executor_started: bool,
    closed: bool,
}

impl Sim {
    /// Makes this thread simulate: workers become tasks, blocking sections
    /// go to the executor. Call [`Sim::settle`] after every simulation step
    /// and [`Sim::close`] at the end.
    pub fn install() -> Arc<Sim> {
        let sim = Arc::new(Sim {
            state: Mutex::new(SimState::default()),
            cv: Condvar::new(),
            now_ns: AtomicU64::new(0),
        });
        SIM.with(|s| *s.borrow_mut() = Some(Arc::clone(&sim)));
        sim
    }

    /// The simulated time since the start, for [`unix_now`].
    pub fn set_time(&self, elapsed: Duration) {
        self.now_ns
            .store(elapsed.as_nanos() as u64, Ordering::Release);
    }

    /// Runs the blocking sections that can go on (new ones, parked ones
    /// whose condition holds) until none can.
    pub fn settle(self: &Arc<Self>) {
        let mut st = self.state.lock().expect("sim lock");
        loop {
            if st.busy {
                if !st.parked.as_ref().is_some_and(|c| c()) {
                    return;
                }
                st.parked = None;
            } else if let Some(job) = st.queue.pop_front() {
                st.start = Some(job);
                st.busy = true;
                if !st.executor_started {
                    st.executor_started = true;
                    let sim = Arc::clone(self);
                    std::thread::Builder::new()
                        .name("sim-blocking".into())
                        .spawn(move || sim.executor())
                        .expect("spawn the simulated executor");
                }
            } else {
                return;
            }
            st.executor_turn = true;
            self.cv.notify_all();
            while st.executor_turn {
                st = self.cv.wait(st).expect("sim lock");
            }
        }
    }

    /// Ends the executor thread (once idle) and this thread's simulation
    /// (if it is this one).
    pub fn close(self: &Arc<Self>) {
        let mut st = self.state.lock().expect("sim lock");
        st.closed = true;
        self.cv.notify_all();
        drop(st);
        SIM.with(|s| {
            let mut s = s.borrow_mut();
            if s.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, self)) {
                s.take();
            }
        });
    }

    fn submit(&self, job: Job) {
        self.state.lock().expect("sim lock").queue.push_back(job);
    }

    fn on_executor(&self) -> bool {
        std::thread::current().name() == Some("sim-blocking")
    }

    fn executor(self: Arc<Self>) {
        SIM.with(|s| *s.borrow_mut() = Some(Arc::clone(&self)));
        loop {
            let job = {
                let mut st = self.state.lock().expect("sim lock");
                while !st.executor_turn && !st.closed {
                    st = self.cv.wait(st).expect("sim lock");
                }
                if !st.executor_turn {
                    return;
                }
                st.start.take().expect("a section to start")
            };
            job();
            let mut st = self.state.lock().expect("sim lock");
            st.busy = false;
            st.executor_turn = false;
            self.cv.notify_all();
        }
    }

    fn park(&self, cond: Cond) {
        let mut st = self.state.lock().expect("sim lock");
        st.parked = Some(cond);
        st.executor_turn = false;
        self.cv.notify_all();
        while !st.executor_turn {
            st = self.cv.wait(st).expect("sim lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_section_that_joins_a_worker_parks_until_the_worker_has_ended() {
        let sim = Sim::install();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let go = Arc::new(tokio::sync::Notify::new());
        let section = {
            let _rt = rt.enter();
            let (l, g) = (Arc::clone(&log), Arc::clone(&go));
            let w = spawn_worker("w".into(), async move {
                g.notified().await;
                l.lock().unwrap().push("worker ended");
            });
            let l = Arc::clone(&log);
            blocking(move || {
                w.join();
                l.lock().unwrap().push("section ended");
                7
            })
        };
        let run =
            |d| rt.block_on(async move { tokio::time::sleep(Duration::from_millis(d)).await });
        // Nothing runs beside the simulation: the section starts in
        // `settle` and parks there, its worker still running.
        run(1);
        sim.settle();
        assert!(log.lock().unwrap().is_empty());
        go.notify_one();
        run(1);
        assert_eq!(*log.lock().unwrap(), ["worker ended"]);
        // Resumed between steps only.
        sim.settle();
        assert_eq!(*log.lock().unwrap(), ["worker ended", "section ended"]);
        assert_eq!(rt.block_on(section).unwrap(), 7);
        sim.close();
        assert!(!simulated());
    }

    #[test]
    fn workers_run_on_their_own_threads_without_a_simulation() {
        let w = spawn_worker("exec-test-worker".into(), async {
            assert_eq!(
                std::thread::current().name(),
                Some("exec-test-worker"),
                "a worker runs on its own named thread"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        });
        w.join();
    }
}
