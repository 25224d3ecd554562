//! The ublk frontend: a primary volume as a kernel block device,
//! `/dev/ublkbN`, served by marsd itself through `libublk`.
//!
//! Threads: libublk runs one thread per hardware queue; each tag of a queue
//! is a small async task on that thread's local executor (FETCH → handle →
//! COMMIT_AND_FETCH). Writes, zeroes and flushes go to the logger exactly
//! as for NBD (a write completes once it is in the logfile); their futures
//! are polled on the queue thread itself (the tokio runtime entered there),
//! never blocking it on the log, the disk or the network. Whoever completes
//! such a future on another thread (the logger's threads, tokio's reactor)
//! wakes the queue's io_uring through an eventfd, which one extra task per
//! queue keeps a read pending on; wakeups are coalesced, so one logger
//! commit that completes many writes wakes the queue once.
//!
//! Reads of a local volume ([`LocalReads`]) are served like a loop device:
//! an io_uring read of the backing device on the queue's own ring, with the
//! overlay (logged, not yet written back) laid over it.
//!
//! Crash recovery: devices are created with `UBLK_F_USER_RECOVERY` (and
//! `_REISSUE`) when the driver offers them, so when marsd dies the kernel
//! keeps the device and queues its I/O; the next marsd finds the id in the
//! resource directory ([`DEVICE_FILE`]) and resumes the same device with
//! `START_USER_RECOVERY`.
//!
//! The mount-namespace rule (libublk README): the process serving a ublk
//! device must not share its mount namespace with mounts of that device, or
//! its exit can wait on a flush it can no longer serve. marsd therefore calls
//! [`private_mount_namespace`] first thing in `main`.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData, sys};

use super::{BlockIo, IoError};
use crate::logger::Logger;

/// File in the resource directory that remembers the device id, so that a
/// restarted marsd recovers the same `/dev/ublkbN`.
pub const DEVICE_FILE: &str = "ublk.json";

/// How long creating or recovering a device may take before we give up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ublk is not available on this host ({0}): load the kernel module with `modprobe ublk_drv`"
    )]
    Unavailable(String),
    #[error(
        "logical block size {block_size} is not possible for {resource}: its size {size} must be a multiple of it (and it must be 512 or 4096)"
    )]
    BlockSize {
        resource: String,
        block_size: u32,
        size: u64,
    },
    #[error(
        "ublk device {path} of {resource} is in use (mounted or held open): unmount or close it first"
    )]
    InUse { resource: String, path: String },
    #[error("ublk {what} for {resource} failed: {source}")]
    Ublk {
        resource: String,
        what: &'static str,
        #[source]
        source: UblkError,
    },
    #[error("ublk device for {resource} did not come up within {}s", START_TIMEOUT.as_secs())]
    Timeout { resource: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Device settings (marsd flags).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Hardware queues, each served by its own thread.
    pub queues: u16,
    /// Requests in flight per queue; each holds a buffer of the largest
    /// request (512 KiB), so memory is queues × depth × 512 KiB at most.
    pub depth: u16,
}

/// At most this many queues by default (one per CPU up to it).
const MAX_DEFAULT_QUEUES: usize = 4;

impl Default for Options {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Options {
            logical_block_size: 512,
            queues: cpus.min(MAX_DEFAULT_QUEUES) as u16,
            depth: 64,
        }
    }
}

/// What a device persists in [`DEVICE_FILE`].
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    pub id: u32,
}

/// The driver's feature bits, or why ublk cannot be used here.
pub fn features() -> Result<u64> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(Error::Unavailable("/dev/ublk-control is missing".into()));
    }
    UblkCtrl::get_features()
        .ok_or_else(|| Error::Unavailable("the driver does not report its features".into()))
}

/// Whether the kernel can resize a live device (`UBLK_U_CMD_UPDATE_SIZE`).
pub fn can_resize_online() -> bool {
    features().is_ok_and(|f| f & sys::UBLK_F_UPDATE_SIZE as u64 != 0)
}

/// Unshares this process's mount namespace and makes every mount in it
/// private, so mounts of our devices elsewhere never appear here (the
/// libublk rule above). A marsd restarted while its devices are mounted
/// (crash recovery) inherits copies of those mounts: they are detached here,
/// in this namespace only. `unshare(CLONE_NEWNS)` applies to the calling
/// thread only and needs a single-threaded process: call it first thing in
/// `main`.
pub fn private_mount_namespace() -> std::io::Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    for target in ublk_mount_points(&mounts) {
        // Best effort: a mount we cannot detach is reported by the caller's logs.
        let _ = umount2(target.as_str(), MntFlags::MNT_DETACH);
    }
    Ok(())
}

/// Mount points of ublk block devices in a `/proc/self/mounts` text.
fn ublk_mount_points(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (src, target) = (f.next()?, f.next()?);
            src.starts_with("/dev/ublkb")
                .then(|| target.replace("\\040", " "))
        })
        .collect()
}

/// True when the block device at `path` is mounted or held open by someone
/// (ublk keeps no open count; an exclusive open fails with EBUSY then).
pub fn device_busy(path: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(path)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(nix::libc::EBUSY),
    }
}

/// One live ublk device serving one volume.
pub struct Device {
    resource: String,
    id: u32,
    path: String,
    /// Set before the process leaves a busy device behind for recovery:
    /// requests then wait (the kernel reissues them to the next marsd)
    /// instead of failing with "shutting down".
    keep: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Device {
    /// Creates a device for `io` (or resumes device `recover` left by a
    /// previous marsd) and returns once `/dev/ublkbN` exists. With `local`
    /// (a volume whose logger runs here), reads are served by it instead
    /// of `io`.
    pub fn start<B: BlockIo>(
        resource: &str,
        io: Arc<B>,
        local: Option<LocalReads>,
        rt: tokio::runtime::Handle,
        opts: Options,
        recover: Option<u32>,
    ) -> Result<Device> {
        let features = features()?;
        let lbs = opts.logical_block_size;
        let size = io.size();
        if !(lbs == 512 || lbs == 4096) || !size.is_multiple_of(lbs as u64) {
            return Err(Error::BlockSize {
                resource: resource.into(),
                block_size: lbs,
                size,
            });
        }
        let ctrl_flags =
            features & (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        let keep = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<(u32, String)>>();
        let name = resource.to_string();
        let keep2 = Arc::clone(&keep);
        let thread = std::thread::Builder::new()
            .name(format!("ublk-{resource}"))
            .spawn(move || {
                // libublk's control ring is per thread: the control object
                // is made on the thread that runs the device.
                let ctrl = match build_ctrl(&name, opts, ctrl_flags, recover) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let local = local.map(Arc::new);
                let backing_fd = local.as_ref().map(|l| l.file.as_raw_fd());
                let tgt_init = move |dev: &mut UblkDev| set_params(dev, size, lbs, backing_fd);
                let keep3 = Arc::clone(&keep2);
                let q_fn = move |qid: u16, dev: &UblkDev| {
                    serve_queue(
                        qid,
                        dev,
                        Arc::clone(&io),
                        local.clone(),
                        rt.clone(),
                        Arc::clone(&keep3),
                    )
                };
                let ready = move |c: &UblkCtrl| {
                    let _ = tx.send(Ok((c.dev_info().dev_id, c.get_bdev_path())));
                };
                if let Err(e) = ctrl.run_target(tgt_init, q_fn, ready) {
                    tracing::error!(resource = %name, error = %e, "ublk device failed");
                }
                if keep2.load(Ordering::Acquire) {
                    // Left for the next marsd to recover.
                    ctrl.disown();
                } else if let Err(e) = ctrl.del_dev() {
                    tracing::warn!(resource = %name, error = %e, "removing the ublk device failed");
                }
            })
            .expect("spawning a thread");
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Ok(Ok((id, path))) => {
                tracing::info!(resource, device = %path, id, recovered = recover.is_some(), "ublk device up");
                Ok(Device {
                    resource: resource.into(),
                    id,
                    path,
                    keep,
                    thread: Some(thread),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                Err(Error::Ublk {
                    resource: resource.into(),
                    what: "starting the device",
                    source: UblkError::OtherError(-5),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout {
                resource: resource.into(),
            }),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn busy(&self) -> bool {
        device_busy(&self.path)
    }

    /// Grows the live device (kernel ≥ 6.16).
    pub fn update_size(&self, size: u64) -> Result<()> {
        let err = |what| {
            move |source| Error::Ublk {
                resource: self.resource.clone(),
                what,
                source,
            }
        };
        let ctrl = UblkCtrl::new_simple(self.id as i32).map_err(err("opening the device"))?;
        ctrl.update_size(size).map_err(err("resizing the device"))?;
        Ok(())
    }

    /// Removes the device; refused while it is mounted or open (then
    /// nothing changes).
    pub fn stop(&mut self) -> Result<()> {
        if self.busy() {
            return Err(Error::InUse {
                resource: self.resource.clone(),
                path: self.path.clone(),
            });
        }
        self.kill();
        tracing::info!(resource = %self.resource, device = %self.path, "ublk device removed");
        Ok(())
    }

    /// For a daemon shutdown: a device nobody holds is removed; a busy one
    /// is left to the kernel, its I/O waiting for the next marsd to recover
    /// it. Returns whether it was left.
    pub fn shutdown(mut self) -> bool {
        if self.busy() {
            self.keep.store(true, Ordering::Release);
            tracing::warn!(resource = %self.resource, device = %self.path, "ublk device is in use: left for recovery by the next marsd");
            self.thread.take();
            true
        } else {
            self.kill();
            false
        }
    }

    fn kill(&mut self) {
        match UblkCtrl::new_simple(self.id as i32) {
            Ok(c) => {
                let _ = c.kill_dev();
            }
            Err(e) => {
                tracing::warn!(resource = %self.resource, error = %e, "cannot stop the ublk device")
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes the control object of a new device, or of device `recover` left by
/// a previous marsd (after `START_USER_RECOVERY`).
fn build_ctrl(
    resource: &str,
    opts: Options,
    ctrl_flags: u64,
    recover: Option<u32>,
) -> Result<UblkCtrl> {
    let err = |what| {
        move |source| Error::Ublk {
            resource: resource.to_string(),
            what,
            source,
        }
    };
    let (dev_flags, queues, depth) = if let Some(id) = recover {
        let old = UblkCtrl::new_simple(id as i32).map_err(err("opening the device to recover"))?;
        old.start_user_recover()
            .map_err(err("starting user recovery"))?;
        // The device keeps the queues it was made with (an older marsd,
        // or another CPU count, may have chosen others).
        let info = old.dev_info();
        (
            UblkFlags::UBLK_DEV_F_RECOVER_DEV,
            info.nr_hw_queues,
            info.queue_depth,
        )
    } else {
        (UblkFlags::UBLK_DEV_F_ADD_DEV, opts.queues, opts.depth)
    };
    UblkCtrlBuilder::default()
        .name(resource)
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(queues)
        .depth(depth)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(err(if recover.is_some() {
            "recovering the device"
        } else {
            "adding a device"
        }))
}

/// Removes a device left by a previous marsd that is not to be recovered
/// (e.g. the volume is no longer primary here). Refused while it is busy.
pub fn remove_stale(resource: &str, id: u32) -> Result<()> {
    let ctrl = match UblkCtrl::new_simple(id as i32) {
        Ok(c) => c,
        Err(_) => return Ok(()),
    };
    let path = ctrl.get_bdev_path();
    if device_busy(&path) {
        return Err(Error::InUse {
            resource: resource.into(),
            path,
        });
    }
    let _ = ctrl.kill_dev();
    ctrl.del_dev().map_err(|source| Error::Ublk {
        resource: resource.into(),
        what: "removing a stale device",
        source,
    })?;
    Ok(())
}

/// Whether device `id` exists and waits for a server (recoverable).
pub fn recoverable(id: u32) -> bool {
    UblkCtrl::new_simple(id as i32).is_ok_and(|c| {
        let state = c.dev_info().state as u32;
        state == sys::UBLK_S_DEV_QUIESCED || state == sys::UBLK_S_DEV_LIVE
    })
}

/// Device parameters; `backing_fd` (local reads) becomes registered file
/// [`BACKING_FIXED_FD`] of every queue's ring.
fn set_params(
    dev: &mut UblkDev,
    size: u64,
    lbs: u32,
    backing_fd: Option<RawFd>,
) -> Result<(), UblkError> {
    let shift = lbs.trailing_zeros() as u8;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    if let Some(fd) = backing_fd {
        // libublk registers the char device alone, as file 0.
        if dev.tgt.nr_fds as u32 != BACKING_FIXED_FD {
            return Err(UblkError::OtherError(-super::libc_errno::EINVAL));
        }
        dev.tgt.fds[BACKING_FIXED_FD as usize] = fd;
        dev.tgt.nr_fds += 1;
    }
    // Room for every tag's command, a backing read per tag and the eventfd
    // read, so completions never overflow the ring.
    let depth = dev.dev_info.queue_depth;
    dev.tgt.sq_depth = depth.saturating_mul(2).saturating_add(2);
    dev.tgt.cq_depth = depth.saturating_mul(2).saturating_add(2);
    dev.tgt.dev_size = size;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // A volatile cache: the kernel sends FLUSH, and FUA writes.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift,
            physical_bs_shift: 12.max(shift),
            io_opt_shift: 12.max(shift),
            io_min_shift: shift,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: lbs,
            max_discard_sectors: 1 << 22,
            max_write_zeroes_sectors: 1 << 22,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(())
}

/// One queue's thread: a task per tag plus the eventfd pump, on a local
/// executor driven by the queue's io_uring. The tokio runtime is entered
/// for the thread's life, so the volume's futures (tokio channels,
/// semaphores, sockets, timers) are polled right here.
fn serve_queue<B: BlockIo>(
    qid: u16,
    dev: &UblkDev,
    io: Arc<B>,
    local: Option<Arc<LocalReads>>,
    rt: tokio::runtime::Handle,
    keep: Arc<AtomicBool>,
) {
    let _rt = rt.enter();
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let kick = match Kick::new() {
        Ok(k) => Arc::new(k),
        Err(e) => {
            tracing::error!(qid, "eventfd failed: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tags = Vec::new();
    for tag in q.tags() {
        let tag_ctx = TagCtx {
            io: Arc::clone(&io),
            local: local.clone(),
            keep: Arc::clone(&keep),
            bridge: Bridge::new(Arc::clone(&kick)),
        };
        let q = Rc::clone(&q);
        tags.push(exe.spawn(async move {
            match serve_tag(&q, tag, tag_ctx).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(tag, error = %e, "ublk tag task failed"),
            }
        }));
    }
    exe.spawn(pump_wakeups(kick)).detach();
    let exe2 = Rc::clone(&exe);
    smol::block_on(exe.run(async {
        // The writes the tasks start in one go reach the logger together,
        // and are mostly appended right here when the hold ends; that
        // completes tasks of this queue, so run again until none is ready.
        let run_ops = || loop {
            let held = crate::logger::hold_sends();
            let ran = exe2.try_tick();
            while exe2.try_tick() {}
            drop(held);
            if !ran {
                break;
            }
        };
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await
            && !matches!(e, UblkError::QueueIsDown)
        {
            tracing::error!(qid, error = %e, "ublk queue stopped");
        }
    }));
}

/// Wakes a queue thread sleeping in its io_uring wait: an eventfd that
/// [`pump_wakeups`] keeps a read pending on. Wakeups are coalesced: while
/// one is on its way (`pending`), more cost nothing, so a logger commit
/// that completes many writes wakes the queue once.
pub(crate) struct Kick {
    efd: OwnedFd,
    pending: AtomicBool,
}

impl Kick {
    fn new() -> std::io::Result<Kick> {
        // SAFETY: eventfd returns a new descriptor we own (or -1).
        let efd = unsafe { nix::libc::eventfd(0, nix::libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Kick {
            // SAFETY: efd is a fresh descriptor owned from here on.
            efd: unsafe { OwnedFd::from_raw_fd(efd) },
            pending: AtomicBool::new(false),
        })
    }

    fn kick(self: &Arc<Self>) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        // Inside `hold_kicks`, the write waits for its end (`pending` keeps
        // this the only one until then).
        if crate::held::with_held(&HELD_KICKS, |held| held.push(Arc::clone(self))).is_none() {
            self.write();
        }
    }

    fn write(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our eventfd.
        unsafe { nix::libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

thread_local! {
    /// Queue wakeups held back on this thread (see [`hold_kicks`]).
    static HELD_KICKS: crate::held::Slot<Arc<Kick>> = const { std::cell::RefCell::new(None) };
}

/// Holds back the queue wakeups that completing requests on this thread
/// causes until the returned guard is dropped, then wakes each queue once.
/// For a thread that completes many requests in a row (the logger's commit):
/// a queue thread woken by the first completion would otherwise serve it,
/// sleep, and be woken again for the next one, a syscall and a context
/// switch each time.
pub(crate) fn hold_kicks() -> crate::held::Guard<Arc<Kick>> {
    crate::held::hold(&HELD_KICKS, |kicks| {
        for kick in kicks {
            kick.write();
        }
    })
}

/// Keeps a read pending on the eventfd so that wakeups from other threads
/// end the queue's io_uring wait. The read's target outlives the ring (it
/// may still be pending when this task is dropped at queue exit): 8 bytes
/// leaked per queue.
async fn pump_wakeups(kick: Arc<Kick>) {
    let counter: &'static mut u64 = Box::leak(Box::new(0u64));
    let counter: *mut u64 = counter;
    loop {
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fd(kick.efd.as_raw_fd()),
            counter.cast::<u8>(),
            8,
        )
        .build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 || r == -nix::libc::EINTR => {
                // Acquire: every task woken before this kick is queued in
                // the executor, which runs them all before the next wait.
                kick.pending.swap(false, Ordering::AcqRel);
            }
            _ => return,
        }
    }
}

/// The waker a tag's requests are polled with: it wakes the tag's task
/// (queues it on the local executor) and then the queue thread.
struct TagWake {
    task: std::sync::OnceLock<Waker>,
    kick: Arc<Kick>,
}

impl Wake for TagWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(w) = self.task.get() {
            w.wake_by_ref();
        }
        self.kick.kick();
    }
}

/// Polls futures on the queue thread with a tag's [`TagWake`], so that
/// whatever completes them on another thread (the logger, tokio's
/// reactor) also ends the queue's io_uring wait.
struct Bridge {
    wake: Arc<TagWake>,
    waker: Waker,
}

impl Bridge {
    fn new(kick: Arc<Kick>) -> Bridge {
        let wake = Arc::new(TagWake {
            task: std::sync::OnceLock::new(),
            kick,
        });
        let waker = Waker::from(Arc::clone(&wake));
        Bridge { wake, waker }
    }

    async fn run<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            // A task's waker is the same for its whole life.
            self.wake.task.get_or_init(|| cx.waker().clone());
            fut.as_mut().poll(&mut Context::from_waker(&self.waker))
        })
        .await
    }
}

/// Everything a tag task needs besides its queue.
struct TagCtx<B> {
    io: Arc<B>,
    local: Option<Arc<LocalReads>>,
    keep: Arc<AtomicBool>,
    bridge: Bridge,
}

/// One tag: fetch a request, serve it, commit the result, fetch the next.
async fn serve_tag<B: BlockIo>(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: TagCtx<B>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = match serve_request(q, &iod, buf.as_mut_slice(), &ctx).await {
            Ok(n) => n,
            Err(IoError::ShuttingDown(_)) if ctx.keep.load(Ordering::Acquire) => {
                // Left for recovery: never complete; the kernel reissues it.
                std::future::pending::<()>().await;
                unreachable!()
            }
            Err(e) => -e.errno(),
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Serves one request; returns the byte count the completion carries.
async fn serve_request<B: BlockIo>(
    q: &UblkQueue<'_>,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    ctx: &TagCtx<B>,
) -> Result<i32, IoError> {
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let io = &*ctx.io;
    let max = buf.len() as u64;
    let too_large = || IoError::TooLarge {
        len: len as u64,
        max,
    };
    match op {
        // A flush carries no meaningful sector: never range-check it.
        sys::UBLK_IO_OP_FLUSH => ctx.bridge.run(io.flush()).await?,
        sys::UBLK_IO_OP_READ => {
            let buf = buf.get_mut(..len).ok_or_else(too_large)?;
            match &ctx.local {
                Some(local) => local.read(q, offset, buf).await?,
                None => {
                    let data = ctx.bridge.run(io.read(offset, len as u32)).await?;
                    let n = data.len().min(len);
                    buf[..n].copy_from_slice(&data[..n]);
                    return Ok(n as i32);
                }
            }
        }
        sys::UBLK_IO_OP_WRITE => {
            // The overlay keeps the data until writeback: one copy.
            let data = Bytes::copy_from_slice(buf.get(..len).ok_or_else(too_large)?);
            ctx.bridge.run(io.write(offset, data, fua)).await?
        }
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            ctx.bridge
                .run(io.write_zeroes(offset, len as u64, fua))
                .await?
        }
        _ => return Ok(-super::libc_errno::EINVAL),
    }
    Ok(len as i32)
}

/// Reads served on the queue thread, like a loop device: what the overlay
/// holds of a range (logged, not yet written back) laid over an io_uring
/// read of the backing device, without a trip through the runtime. The
/// backing device is opened a second time, read-only and buffered, so it
/// shares the page cache writeback writes into.
pub struct LocalReads {
    logger: Arc<Logger>,
    file: std::fs::File,
}

/// Index of the backing device among the queue ring's registered files
/// (0 is the ublk char device).
const BACKING_FIXED_FD: u32 = 1;

impl LocalReads {
    pub fn open(logger: Arc<Logger>) -> std::io::Result<LocalReads> {
        let file = std::fs::File::open(logger.backing_path())?;
        Ok(LocalReads { logger, file })
    }

    fn io_err(&self, errno: i32) -> IoError {
        IoError::Io {
            resource: self.logger.resource().into(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Fills `buf` with the volume's bytes at `offset`.
    async fn read(&self, q: &UblkQueue<'_>, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len();
        // Taken before the device is read: see `Logger::overlay_hits`.
        let hits = self.logger.overlay_hits(offset, len as u32)?;
        let covered: u64 = hits.iter().map(|h| h.len).sum();
        if covered < len as u64 {
            let mut done = 0;
            while done < len {
                let rest = &mut buf[done..];
                let sqe = io_uring::opcode::Read::new(
                    io_uring::types::Fixed(BACKING_FIXED_FD),
                    rest.as_mut_ptr(),
                    rest.len() as u32,
                )
                .offset(offset + done as u64)
                .build();
                // The buffer stays put until the read completes: this tag
                // task neither moves nor ends while it awaits.
                let r = q.ublk_submit_sqe(sqe).await;
                match r {
                    0 => {
                        // Past the end of the backing file: zeroes.
                        rest.fill(0);
                        break;
                    }
                    n if n > 0 => done += n as usize,
                    e if e == -nix::libc::EINTR || e == -nix::libc::EAGAIN => {}
                    e => return Err(self.io_err(-e)),
                }
            }
        }
        for h in hits {
            let r = (h.offset - offset) as usize..(h.offset - offset + h.len) as usize;
            match h.data {
                Some(d) => buf[r].copy_from_slice(&d),
                None => buf[r].fill(0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ublk_mounts_are_detached_in_the_private_namespace() {
        let mounts = "/dev/vda1 / ext4 rw 0 0\n\
                      /dev/ublkb0 /mnt/a\\040b ext4 rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n\
                      /dev/ublkb12 /var/lib/kubelet/x xfs rw 0 0\n";
        assert_eq!(
            ublk_mount_points(mounts),
            vec!["/mnt/a b".to_string(), "/var/lib/kubelet/x".to_string()]
        );
    }

    /// Counts how often a task was woken.
    struct CountingTask(std::sync::atomic::AtomicUsize);

    impl Wake for CountingTask {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What the eventfd holds (0 if nothing was written), read without blocking.
    fn drain(kick: &Kick) -> u64 {
        let mut v = 0u64;
        let fd = kick.efd.as_raw_fd();
        // SAFETY: an 8-byte read into a live u64 from our eventfd, after
        // making it non-blocking.
        unsafe {
            nix::libc::fcntl(fd, nix::libc::F_SETFL, nix::libc::O_NONBLOCK);
            if nix::libc::read(fd, (&mut v as *mut u64).cast(), 8) != 8 {
                return 0;
            }
        }
        v
    }

    #[test]
    fn completions_from_another_thread_wake_the_task_and_kick_the_queue_once() {
        let kick = Arc::new(Kick::new().expect("eventfd"));
        let task = Arc::new(CountingTask(Default::default()));
        let task_waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&task_waker);
        let bridges: Vec<Bridge> = (0..3).map(|_| Bridge::new(Arc::clone(&kick))).collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| tokio::sync::oneshot::channel()).unzip();
        let mut futs: Vec<_> = bridges
            .iter()
            .zip(rxs)
            .map(|(b, rx)| Box::pin(b.run(rx)))
            .collect();
        for f in &mut futs {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        // Three completions on another thread, before the queue thread runs.
        std::thread::spawn(move || {
            for (i, tx) in txs.into_iter().enumerate() {
                tx.send(i).expect("receiver alive");
            }
        })
        .join()
        .expect("sender thread");
        assert_eq!(task.0.load(Ordering::SeqCst), 3);
        assert_eq!(drain(&kick), 1, "one eventfd write for the three wakeups");
        for (i, f) in futs.iter_mut().enumerate() {
            assert!(matches!(f.as_mut().poll(&mut cx), std::task::Poll::Ready(Ok(v)) if v == i));
        }
        // Once the pump has consumed the kick, the next wakeup kicks again.
        kick.pending.swap(false, Ordering::AcqRel);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut f = Box::pin(bridges[0].run(rx));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        std::thread::spawn(move || tx.send(()).expect("receiver alive"))
            .join()
            .expect("sender thread");
        assert_eq!(drain(&kick), 1);
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn held_kicks_wake_each_queue_once_when_the_guard_drops() {
        let kicks: Vec<Arc<Kick>> = (0..2)
            .map(|_| Arc::new(Kick::new().expect("eventfd")))
            .collect();
        let k = kicks.clone();
        std::thread::spawn(move || {
            let held = hold_kicks();
            {
                // Nested: the outer guard sends.
                let _inner = hold_kicks();
                k[0].kick();
            }
            k[0].kick();
            k[1].kick();
            for kick in &k {
                assert_eq!(drain(kick), 0, "nothing written while held");
            }
            drop(held);
            // Not held any more: a kick after the pump consumed one writes at once.
            assert_eq!(drain(&k[0]), 1);
            k[0].pending.swap(false, Ordering::AcqRel);
            k[0].kick();
            assert_eq!(drain(&k[0]), 1);
        })
        .join()
        .expect("kicking thread");
        assert_eq!(drain(&kicks[1]), 1);
    }
}
