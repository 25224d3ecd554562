//! The ublk frontend: a primary volume as a kernel block device,
//! `/dev/ublkbN`, served by marsd itself through `libublk`.
//!
//! Threads: libublk runs one thread per hardware queue; each tag of a queue
//! is a small async task on that thread's local executor (FETCH → handle →
//! COMMIT_AND_FETCH). A request is handed to the tokio runtime, where the
//! logger does the work exactly as for NBD (a write completes once it is in
//! the logfile), so a queue thread never blocks on the log, the disk or the
//! network. The tokio side reports back through a oneshot channel and wakes
//! the queue's io_uring through an eventfd, which one extra task per queue
//! keeps a read pending on.
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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData, sys};

use super::{BlockIo, IoError};

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
    pub queues: u16,
    pub depth: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            logical_block_size: 512,
            queues: 1,
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
    /// previous marsd) and returns once `/dev/ublkbN` exists.
    pub fn start<B: BlockIo>(
        resource: &str,
        io: Arc<B>,
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
                let tgt_init = move |dev: &mut UblkDev| {
                    set_params(dev, size, lbs);
                    Ok(())
                };
                let keep3 = Arc::clone(&keep2);
                let q_fn = move |qid: u16, dev: &UblkDev| {
                    serve_queue(qid, dev, Arc::clone(&io), rt.clone(), Arc::clone(&keep3))
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
    let dev_flags = if let Some(id) = recover {
        let old = UblkCtrl::new_simple(id as i32).map_err(err("opening the device to recover"))?;
        old.start_user_recover()
            .map_err(err("starting user recovery"))?;
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    UblkCtrlBuilder::default()
        .name(resource)
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(opts.queues)
        .depth(opts.depth)
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

fn set_params(dev: &mut UblkDev, size: u64, lbs: u32) {
    let shift = lbs.trailing_zeros() as u8;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
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
}

/// One queue's thread: a task per tag plus the eventfd pump, on a local
/// executor driven by the queue's io_uring.
fn serve_queue<B: BlockIo>(
    qid: u16,
    dev: &UblkDev,
    io: Arc<B>,
    rt: tokio::runtime::Handle,
    keep: Arc<AtomicBool>,
) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    // SAFETY: eventfd returns a new descriptor we own (or -1).
    let efd = unsafe { nix::libc::eventfd(0, nix::libc::EFD_CLOEXEC) };
    if efd < 0 {
        tracing::error!(qid, "eventfd failed: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: efd is a fresh descriptor owned from here on.
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tags = Vec::new();
    for tag in q.tags() {
        let (q, io, rt, efd, keep) = (
            Rc::clone(&q),
            Arc::clone(&io),
            rt.clone(),
            Arc::clone(&efd),
            Arc::clone(&keep),
        );
        tags.push(exe.spawn(async move {
            match serve_tag(&q, tag, io, rt, efd, keep).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(tag, error = %e, "ublk tag task failed"),
            }
        }));
    }
    let pump_fd = efd.as_raw_fd();
    exe.spawn(pump_wakeups(pump_fd)).detach();
    let exe2 = Rc::clone(&exe);
    smol::block_on(exe.run(async {
        let run_ops = || while exe2.try_tick() {};
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await
            && !matches!(e, UblkError::QueueIsDown)
        {
            tracing::error!(qid, error = %e, "ublk queue stopped");
        }
    }));
}

/// Keeps a read pending on the eventfd so that completions from the tokio
/// side wake the queue's io_uring wait.
async fn pump_wakeups(efd: RawFd) {
    let mut counter = Box::new(0u64);
    loop {
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fd(efd),
            (&mut *counter as *mut u64).cast::<u8>(),
            8,
        )
        .build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 || r == -4 => {}
            _ => return,
        }
    }
}

/// One tag: fetch a request, serve it, commit the result, fetch the next.
async fn serve_tag<B: BlockIo>(
    q: &UblkQueue<'_>,
    tag: u16,
    io: Arc<B>,
    rt: tokio::runtime::Handle,
    efd: Arc<OwnedFd>,
    keep: Arc<AtomicBool>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = serve_request(&iod, buf.as_mut_slice(), &io, &rt, &efd, &keep).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Serves one request; returns what the completion carries (bytes done or
/// a negative errno).
async fn serve_request<B: BlockIo>(
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    io: &Arc<B>,
    rt: &tokio::runtime::Handle,
    efd: &Arc<OwnedFd>,
    keep: &Arc<AtomicBool>,
) -> i32 {
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let req = match op {
        // A flush carries no meaningful sector: never range-check it.
        sys::UBLK_IO_OP_FLUSH => Request::Flush,
        sys::UBLK_IO_OP_READ if len <= buf.len() => Request::Read(offset, len as u32),
        sys::UBLK_IO_OP_WRITE if len <= buf.len() => {
            Request::Write(offset, Bytes::copy_from_slice(&buf[..len]), fua)
        }
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            Request::Zero(offset, len as u64, fua)
        }
        _ => return -super::libc_errno::EINVAL,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (io, efd2) = (Arc::clone(io), Arc::clone(efd));
    rt.spawn(async move {
        let r = req.run(&*io).await;
        let _ = tx.send(r);
        wake(&efd2);
    });
    match rx.await {
        Ok(Ok(Some(data))) => {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            n as i32
        }
        Ok(Ok(None)) => len as i32,
        Ok(Err(IoError::ShuttingDown(_))) if keep.load(Ordering::Acquire) => {
            // Left for recovery: never complete; the kernel reissues it.
            std::future::pending::<()>().await;
            unreachable!()
        }
        Ok(Err(e)) => -e.errno(),
        Err(_) => -super::libc_errno::EIO,
    }
}

fn wake(efd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a live buffer to our eventfd.
    unsafe { nix::libc::write(efd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

enum Request {
    Read(u64, u32),
    Write(u64, Bytes, bool),
    Zero(u64, u64, bool),
    Flush,
}

impl Request {
    /// Runs on the tokio runtime; a read returns its data.
    async fn run<B: BlockIo>(self, io: &B) -> Result<Option<Bytes>, IoError> {
        match self {
            Request::Read(off, len) => io.read(off, len).await.map(Some),
            Request::Write(off, data, fua) => io.write(off, data, fua).await.map(|()| None),
            Request::Zero(off, len, fua) => io.write_zeroes(off, len, fua).await.map(|()| None),
            Request::Flush => io.flush().await.map(|()| None),
        }
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
}
