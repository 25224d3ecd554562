//! The node's ublk devices: which primary volume is exposed as which
//! `/dev/ublkbN`, created by `marsadm up` (or on becoming primary with
//! `marsd --ublk`), torn down by `down` and before any role change, and
//! recovered after a marsd crash from the id kept in the resource directory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::frontend::ublk::{self, DEVICE_FILE, Device, LocalReads, Persisted};
use crate::frontend::{BlockIo, IoError};
use crate::node::Node;
use crate::resource::{self, Error, resource_dir};

/// ublk settings of a node (marsd flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceConfig {
    /// Bring a device up whenever a volume becomes primary here.
    pub auto: bool,
    pub options: ublk::Options,
}

/// The live devices of a node, by resource name.
#[derive(Default)]
pub struct Devices {
    live: Mutex<BTreeMap<String, Device>>,
}

impl Devices {
    pub fn path_of(&self, name: &str) -> Option<String> {
        self.live
            .lock()
            .expect("devices lock")
            .get(name)
            .map(|d| d.path().to_string())
    }

    /// Every live device: (resource, device path).
    pub fn list(&self) -> Vec<(String, String)> {
        self.live
            .lock()
            .expect("devices lock")
            .iter()
            .map(|(n, d)| (n.clone(), d.path().to_string()))
            .collect()
    }
}

/// Prefix of the files in the state root that remember remote devices.
const REMOTE_PREFIX: &str = "remote-";
const REMOTE_SUFFIX: &str = ".ublk.json";

impl Node {
    /// Where a device's id is kept: in the resource directory, or (remote
    /// devices, which have no resource here) in the state root.
    fn device_file(&self, name: &str) -> std::path::PathBuf {
        if self.resource(name).is_ok() {
            resource_dir(&self.cfg.root, name).join(DEVICE_FILE)
        } else {
            self.cfg
                .root
                .join(format!("{REMOTE_PREFIX}{name}{REMOTE_SUFFIX}"))
        }
    }

    /// `attach NAME --remote`: a ublk device here whose I/O the volume's
    /// current primary serves over the network. Idempotent. Blocking.
    pub fn attach_remote(&self, name: &str) -> resource::Result<String> {
        self.attach_remote_from(name, None)
    }

    fn attach_remote_from(&self, name: &str, recover: Option<u32>) -> resource::Result<String> {
        if let Ok(r) = self.resource(name) {
            if r.logger().is_some() {
                return self.device_up(name);
            }
            return Err(Error::Cluster(format!(
                "{name} has a replica on this node: use it locally (make this node primary and run `marsadm up {name}`)"
            )));
        }
        let mut live = self.devices.live.lock().expect("devices lock");
        if let Some(d) = live.get(name) {
            return Ok(d.path().to_string());
        }
        if self.cluster.primary_of(name).is_none() {
            return Err(Error::Cluster(format!(
                "the cluster knows no primary of {name}: nothing to attach to"
            )));
        }
        let vol = runtime()?.block_on(crate::frontend::remote::RemoteVolume::attach(
            Arc::clone(&self.cluster),
            name,
        ))?;
        self.install(&mut live, name, Arc::new(vol), None, recover)
    }

    /// Starts (or recovers) the device of `name` over `io`, remembers its id
    /// and adds it to the live devices. Returns its path.
    fn install<B: BlockIo>(
        &self,
        live: &mut BTreeMap<String, Device>,
        name: &str,
        io: Arc<B>,
        local: Option<LocalReads>,
        recover: Option<u32>,
    ) -> resource::Result<String> {
        let dev = Device::start(
            name,
            io,
            local,
            runtime()?,
            self.device_cfg.options,
            recover,
        )?;
        self.persist_device(name, dev.id())?;
        let path = dev.path().to_string();
        live.insert(name.into(), dev);
        Ok(path)
    }

    fn persist_device(&self, name: &str, id: u32) -> resource::Result<()> {
        let bytes = serde_json::to_vec(&Persisted { id }).expect("serializes");
        self.storage
            .write_atomic(&self.device_file(name), &bytes)
            .map_err(|source| Error::Io {
                resource: name.into(),
                what: "remembering the ublk device id",
                source,
            })
    }

    fn persisted_device(&self, name: &str) -> Option<Persisted> {
        let bytes = self.storage.read_file(&self.device_file(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// `up NAME`: exposes the primary volume as a ublk device (idempotent).
    /// Returns the device path. Blocking.
    pub fn device_up(&self, name: &str) -> resource::Result<String> {
        self.device_up_from(name, None)
    }

    fn device_up_from(&self, name: &str, recover: Option<u32>) -> resource::Result<String> {
        let res = self.resource(name)?;
        let mut live = self.devices.live.lock().expect("devices lock");
        if let Some(d) = live.get(name) {
            return Ok(d.path().to_string());
        }
        let logger = res.logger();
        let handle = res.open().ok_or_else(|| Error::NotPrimary {
            resource: name.into(),
            hint: ": `up` works on the primary",
        })?;
        // Reads straight from the backing device, if the handle's logger is
        // surely the one we have (no role change in between).
        let local = match (logger, res.logger()) {
            (Some(a), Some(b)) if Arc::ptr_eq(&a, &b) => match LocalReads::open(a) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(resource = name, error = %e, "cannot open the backing device for reading: ublk reads go through the logger");
                    None
                }
            },
            _ => None,
        };
        self.install(&mut live, name, Arc::new(handle), local, recover)
    }

    /// `down NAME`: removes the volume's ublk device (idempotent); refused
    /// while it is mounted or open. Blocking.
    pub fn device_down(&self, name: &str) -> resource::Result<Option<String>> {
        let mut live = self.devices.live.lock().expect("devices lock");
        let Some(dev) = live.get_mut(name) else {
            // A device a previous marsd left behind (not recovered) goes too.
            if let Some(p) = self.persisted_device(name) {
                ublk::remove_stale(name, p.id)?;
                let _ = self.storage.remove_file(&self.device_file(name));
            }
            return Ok(None);
        };
        let path = dev.path().to_string();
        dev.stop()?;
        live.remove(name);
        let _ = self.storage.remove_file(&self.device_file(name));
        Ok(Some(path))
    }

    /// Before the volume stops being primary here (secondary, handover,
    /// delete): its device must go, and cannot while it is in use.
    pub(crate) fn release_device(&self, name: &str) -> resource::Result<()> {
        self.device_down(name).map(|_| ())
    }

    /// After this node became primary: with `--ublk`, bring the device up.
    /// Returns a note for the command's reply.
    pub(crate) fn auto_device(&self, name: &str) -> String {
        if !self.device_cfg.auto {
            return String::new();
        }
        match self.device_up(name) {
            Ok(path) => format!("; device {path}"),
            Err(e) => {
                tracing::error!(resource = name, error = %e, "ublk device could not be created");
                format!("; no ublk device: {e}")
            }
        }
    }

    /// At start-up, after the role is settled: resume the devices a
    /// previous marsd left (ublk user recovery), create the ones `--ublk`
    /// wants, and remove those of volumes no longer primary here.
    pub fn restore_devices(&self) {
        let names: Vec<String> = self
            .resources
            .read()
            .expect("resources lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let primary = self.resource(&name).is_ok_and(|r| r.logger().is_some());
            let persisted = self.persisted_device(&name);
            let outcome = match (primary, persisted) {
                (true, Some(p)) if ublk::recoverable(p.id) => {
                    self.device_up_from(&name, Some(p.id)).map(Some)
                }
                (true, Some(_)) => self.device_up(&name).map(Some),
                (true, None) if self.device_cfg.auto => self.device_up(&name).map(Some),
                (false, Some(p)) => match self.device_down(&name) {
                    Err(Error::Device(ublk::Error::InUse { .. })) if ublk::recoverable(p.id) => {
                        self.serve_errors(&name, p.id).map(Some)
                    }
                    other => other.map(|_| None),
                },
                _ => Ok(None),
            };
            match outcome {
                Ok(Some(path)) => {
                    tracing::info!(resource = %name, device = %path, "ublk device restored")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "ublk device could not be restored")
                }
            }
        }
        // Remote devices.
        let remotes: Vec<String> = self
            .storage
            .list_dir(&self.cfg.root)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                f.strip_prefix(REMOTE_PREFIX)
                    .and_then(|f| f.strip_suffix(REMOTE_SUFFIX))
                    .map(String::from)
            })
            .collect();
        for name in remotes {
            let recover = self
                .persisted_device(&name)
                .map(|p| p.id)
                .filter(|&id| ublk::recoverable(id));
            match self.attach_remote_from(&name, recover) {
                Ok(path) => {
                    tracing::info!(resource = %name, device = %path, "remote device restored")
                }
                Err(e) => {
                    tracing::error!(resource = %name, error = %e, "remote device could not be restored")
                }
            }
        }
    }

    /// A device left by a crashed primary that is no longer primary here
    /// (a failover happened meanwhile) but is still mounted: it is resumed
    /// with every request failing, so that its holder gets errors instead of
    /// hanging forever and can unmount it; `down` then removes it.
    fn serve_errors(&self, name: &str, id: u32) -> resource::Result<String> {
        let res = self.resource(name)?;
        let dead = Arc::new(Deposed {
            name: name.into(),
            size: res.meta().size,
        });
        let mut live = self.devices.live.lock().expect("devices lock");
        let path = self.install(&mut live, name, dead, None, Some(id))?;
        tracing::warn!(resource = name, device = %path, "this node is no longer primary: its device, still in use, fails every request until it is released (`marsadm down`)");
        Ok(path)
    }

    /// Grows the live device after a resize, where the kernel can.
    pub(crate) fn resize_device(&self, name: &str, size: u64) -> String {
        let live = self.devices.live.lock().expect("devices lock");
        let Some(dev) = live.get(name) else {
            return String::new();
        };
        if !ublk::can_resize_online() {
            return format!(
                "; {} keeps its old size until `marsadm down {name}` and `up {name}` (this kernel cannot resize a live ublk device)",
                dev.path()
            );
        }
        match dev.update_size(size) {
            Ok(()) => format!("; {} resized", dev.path()),
            Err(e) => format!("; {} not resized: {e}", dev.path()),
        }
    }

    /// For a daemon shutdown: idle devices are removed, busy ones are left
    /// to the kernel for the next marsd to recover.
    pub(crate) fn shutdown_devices(&self) {
        let all = std::mem::take(&mut *self.devices.live.lock().expect("devices lock"));
        for (name, dev) in all {
            if !dev.shutdown() {
                let _ = self.storage.remove_file(&self.device_file(&name));
            }
        }
    }
}

/// The runtime the devices' requests run on (devices are made from blocking
/// tasks of marsd's runtime).
fn runtime() -> resource::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|e| Error::Cluster(format!("no runtime for the ublk device: {e}")))
}

/// The volume behind a device whose node is no longer primary: every
/// request fails as "not primary".
struct Deposed {
    name: String,
    size: u64,
}

impl BlockIo for Deposed {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, _: u64, _: u32) -> Result<Bytes, IoError> {
        Err(IoError::NotPrimary(self.name.clone()))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), IoError> {
        Err(IoError::NotPrimary(self.name.clone()))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), IoError> {
        Err(IoError::NotPrimary(self.name.clone()))
    }
    async fn flush(&self) -> Result<(), IoError> {
        Err(IoError::NotPrimary(self.name.clone()))
    }
}
