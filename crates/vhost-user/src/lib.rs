//! `alioth-vhost-user`: Alioth's virtio devices as vhost-user backends.
//!
//! The other direction, [`VhostUserFrontend`], lets a VMM hand a device's queues to an external
//! backend; it is an `alioth_virtio::DeviceRunner`, so a transport drives it like a worker.
//!
//! A [`VhostUserDevice`] speaks the vhost-user protocol (through rust-vmm's `vhost` crate) to a
//! frontend — QEMU, Cloud Hypervisor, Linux's `virtio_uml`, Alioth's own VMM — and runs an
//! unchanged Alioth device on an unchanged worker: the frontend's memory table becomes the
//! worker's guest memory, its kick eventfds take the place of ioeventfds and its call eventfds
//! that of irqfds, so the io_uring and epoll backends serve it as they serve a virtio-pci device.
//!
//! Protocol features: MQ, CONFIG, REPLY_ACK, BACKEND_REQ and RESET_DEVICE. Rings start when they have an
//! address, a kick eventfd and (with protocol features) are enabled; GET_VRING_BASE stops the
//! device's worker after every request in flight has completed and reports where the ring
//! stopped, so a frontend can reconnect and continue. [`serve`] accepts one frontend at a time
//! on a Unix socket and takes the next one when it disconnects.
//!
//! ```no_run
//! use alioth_devices::virtio::rng::VirtioRng;
//! use alioth_vhost_user::{VhostUserDevice, bind, serve};
//! use alioth_virtio::EpollBackend;
//!
//! let listener = bind("/tmp/rng.sock".as_ref())?;
//! let dev = VhostUserDevice::new(|| Ok(VirtioRng::new("virtio-rng0")), EpollBackend::default())?;
//! serve(listener, dev, || false)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod frontend;
mod memory;
mod relay;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use alioth_queue::QueueConfig;
use alioth_virtio::{Backend, ChainHandler, DeviceInfo, IrqSender, QueueSetup, WakeEvent, Worker};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as BackendChannel, BackendReqHandler, GpuBackend, VhostUserBackendReqHandlerMut,
};
use vmm_sys_util::eventfd::EventFd;

pub use frontend::{QUEUE_SIZE, SharedRegion, VhostUserFrontend};
pub use memory::{MAX_REGIONS, Memory, Region};

/// Errors of the vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path cannot be used.
    #[error("vhost-user socket {path}: {reason}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The frontend's memory table is unusable.
    #[error("memory table: {0}")]
    MemoryTable(String),
    /// The device could not be created (e.g. its disk image cannot be opened).
    #[error("device: {0}")]
    Device(String),
    /// The protocol failed (the connection is then closed).
    #[error("vhost-user: {0}")]
    Protocol(String),
}

/// virtio's VERSION_1 feature bit.
pub(crate) const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What the frontend told us about one vring.
#[derive(Default)]
struct Vring {
    num: u16,
    /// Guest-physical addresses of descriptor table, available (driver) and used (device)
    /// areas, once translated.
    addrs: Option<(u64, u64, u64)>,
    base: u32,
    kick: Option<Arc<EventFd>>,
    err: Option<EventFd>,
    enabled: bool,
}

/// The call eventfds, shared with the worker's interrupt sender: the frontend may replace them
/// while the rings run.
type Calls = Arc<RwLock<Vec<Option<EventFd>>>>;

struct CallIrq {
    calls: Calls,
    errs: Vec<Option<EventFd>>,
}

impl IrqSender for CallIrq {
    fn queue_irq(&self, queue: u16) {
        let calls = self.calls.read().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(fd)) = calls.get(usize::from(queue))
            && let Err(e) = fd.write(1)
        {
            log::warn!("vhost-user: queue {queue}: call eventfd: {e}");
        }
    }

    fn config_irq(&self) {
        // vhost-user has no configuration interrupt without a backend channel; a device that
        // needs a reset reports it on the rings' error eventfds.
        for fd in self.errs.iter().flatten() {
            let _ = fd.write(1);
        }
    }
}

/// A device factory: a new device for every memory table (the worker owns its device).
type MakeDevice<D> = Box<dyn FnMut() -> std::io::Result<D> + Send>;

/// One Alioth device served over vhost-user.
pub struct VhostUserDevice<D: ChainHandler, B: Backend<D> + Clone> {
    info: DeviceInfo,
    make: MakeDevice<D>,
    backend: B,
    features: u64,
    memory: Option<Memory>,
    vrings: Vec<Vring>,
    calls: Calls,
    worker: Option<Worker>,
    /// The vrings the worker serves now.
    running: Vec<usize>,
    /// The channel for backend-initiated requests, if the frontend set one up.
    backend_channel: Option<BackendChannel>,
}

fn proto(e: impl ToString) -> vhost::vhost_user::Error {
    log::warn!("vhost-user: {}", e.to_string());
    vhost::vhost_user::Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

fn invalid(what: impl ToString) -> vhost::vhost_user::Error {
    log::warn!("vhost-user: {}", what.to_string());
    vhost::vhost_user::Error::InvalidParam
}

type VResult<T> = vhost::vhost_user::Result<T>;

impl<D: ChainHandler, B: Backend<D> + Clone> VhostUserDevice<D, B> {
    /// Serves the devices `make` creates (one per memory table, each moved into a worker under
    /// `backend`).
    pub fn new(
        mut make: impl FnMut() -> std::io::Result<D> + Send + 'static,
        backend: B,
    ) -> Result<Self, Error> {
        let first = make().map_err(|e| Error::Device(e.to_string()))?;
        let info = DeviceInfo::of(&first);
        drop(first);
        let n = info.max_sizes.len();
        Ok(VhostUserDevice {
            info,
            make: Box::new(make),
            backend,
            features: 0,
            memory: None,
            vrings: (0..n).map(|_| Vring::default()).collect(),
            calls: Arc::new(RwLock::new((0..n).map(|_| None).collect())),
            worker: None,
            running: Vec::new(),
            backend_channel: None,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    fn vring(&mut self, index: u32) -> VResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(format!("vring {index} (the device has {n})")))
    }

    fn protocol_features_on(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// The vrings that can run: addressed, kicked and enabled.
    fn ready(&self) -> Vec<usize> {
        let pf = self.protocol_features_on();
        self.vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.addrs.is_some() && v.kick.is_some() && (v.enabled || !pf))
            .map(|(i, _)| i)
            .collect()
    }

    /// Stops the worker (completing everything in flight) and records where each ring stopped.
    fn stop(&mut self) {
        if let Some(w) = &self.worker {
            for (q, base) in w.reset() {
                if let Some(v) = self.vrings.get_mut(usize::from(q)) {
                    v.base = base;
                }
            }
        }
        self.running.clear();
    }

    /// Brings the worker in line with the rings that are ready.
    fn update(&mut self) -> VResult<()> {
        let ready = self.ready();
        if ready == self.running {
            return Ok(());
        }
        self.stop();
        if ready.is_empty() {
            return Ok(());
        }
        let Some(mem) = &self.memory else {
            return Err(invalid("a vring started before SET_MEM_TABLE"));
        };
        if self.worker.is_none() {
            let dev = (self.make)().map_err(proto)?;
            let worker =
                Worker::spawn(dev, self.backend.clone(), mem.guest.clone()).map_err(proto)?;
            self.worker = Some(worker);
        }
        let queues = self
            .vrings
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if !ready.contains(&i) {
                    return None;
                }
                let (desc, driver, device) = v.addrs?;
                Some(QueueSetup {
                    config: QueueConfig {
                        size: v.num,
                        desc,
                        driver,
                        device,
                    },
                    ioeventfd: v.kick.clone()?,
                    base: v.base,
                })
            })
            .collect();
        let irq = Arc::new(CallIrq {
            calls: self.calls.clone(),
            errs: self
                .vrings
                .iter()
                .map(|v| v.err.as_ref().and_then(|e| e.try_clone().ok()))
                .collect(),
        });
        let features = self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if let Some(w) = &self.worker {
            w.wake(WakeEvent::Start {
                features,
                queues,
                irq,
            });
        }
        self.running = ready;
        Ok(())
    }

    /// Forgets the frontend's state: stops the worker, drops the memory table and the rings.
    fn forget(&mut self) {
        self.stop();
        self.worker = None;
        self.memory = None;
        self.backend_channel = None;
        self.features = 0;
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        for c in self
            .calls
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            *c = None;
        }
    }
}

impl<D: ChainHandler, B: Backend<D> + Clone> Drop for VhostUserDevice<D, B> {
    fn drop(&mut self) {
        self.forget();
    }
}

/// An eventfd from a file descriptor the frontend sent. (Workers make kick descriptors
/// non-blocking themselves; Linux's virtio_uml sends blocking ones.)
fn eventfd(file: File) -> EventFd {
    // SAFETY: we own the descriptor (it came in the message and nothing else holds it), and
    // EventFd only reads, writes and polls it: if the frontend sent something other than an
    // eventfd, those fail with an error, nothing worse.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl<D: ChainHandler, B: Backend<D> + Clone> VhostUserBackendReqHandlerMut
    for VhostUserDevice<D, B>
{
    fn set_owner(&mut self) -> VResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VResult<()> {
        self.forget();
        Ok(())
    }

    fn reset_device(&mut self) -> VResult<()> {
        self.forget();
        Ok(())
    }

    fn get_features(&mut self) -> VResult<u64> {
        Ok(self.info.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(invalid(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(invalid("the frontend did not accept VIRTIO_F_VERSION_1"));
        }
        if !self.running.is_empty() && features != self.features {
            return Err(invalid("features changed while rings run"));
        }
        self.features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions: Vec<Region> = ctx.iter().map(Region::from).collect();
        let memory = Memory::map(&regions, files).map_err(invalid)?;
        // The worker's memory is fixed: stop it, remember the rings' positions, start afresh.
        let was = self.running.clone();
        self.stop();
        self.worker = None;
        self.memory = Some(memory);
        if !was.is_empty() {
            self.update()?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VResult<()> {
        let max = self
            .info
            .max_sizes
            .get(index as usize)
            .copied()
            .unwrap_or(0);
        if num == 0 || num > u32::from(max) {
            return Err(invalid(format!("vring {index}: size {num} (max {max})")));
        }
        self.vring(index)?.num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VResult<()> {
        let mem = self
            .memory
            .as_ref()
            .ok_or_else(|| invalid("SET_VRING_ADDR before SET_MEM_TABLE"))?;
        // The queue checks sizes and alignment when it starts; here only that each address
        // lies in the memory table.
        let gpa = |ua: u64, what: &str| {
            mem.user_to_gpa(ua, 1).ok_or_else(|| {
                invalid(format!(
                    "vring {index}: {what} {ua:#x} is outside guest memory"
                ))
            })
        };
        let addrs = (
            gpa(descriptor, "descriptor table")?,
            gpa(available, "available ring")?,
            gpa(used, "used ring")?,
        );
        self.vring(index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VResult<()> {
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VResult<VhostUserVringState> {
        self.vring(index)?;
        // Stop the ring: complete what is in flight, record positions, and keep the others
        // running. The ring stays stopped until the frontend kicks it anew.
        self.stop();
        let v = self.vring(index)?;
        v.kick = None;
        v.enabled = false;
        let base = v.base;
        self.update()?;
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VResult<()> {
        let fd = fd.map(|f| Arc::new(eventfd(f)));
        self.vring(u32::from(index))?.kick = fd;
        self.update()
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VResult<()> {
        self.vring(u32::from(index))?;
        let mut calls = self.calls.write().unwrap_or_else(|e| e.into_inner());
        calls[usize::from(index)] = fd.map(eventfd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VResult<()> {
        self.vring(u32::from(index))?.err = fd.map(eventfd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VResult<VhostUserProtocolFeatures> {
        // BACKEND_REQ: Linux's virtio_uml allocates its interrupt line when it sets up that
        // channel, and without it uses IRQ 0 (the timer) and fails to probe.
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE)
    }

    fn set_protocol_features(&mut self, _features: u64) -> VResult<()> {
        // The vhost crate records what was acked (REPLY_ACK, CONFIG gating) and drops bits we
        // did not offer; nothing here depends on it.
        Ok(())
    }

    fn get_queue_num(&mut self) -> VResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VResult<()> {
        self.vring(index)?.enabled = enable;
        self.update()
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VResult<Vec<u8>> {
        let cfg = &self.info.config;
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .filter(|&e| e <= cfg.len())
            .ok_or_else(|| {
                invalid(format!(
                    "config {offset:#x}+{size:#x} (size {:#x})",
                    cfg.len()
                ))
            })?;
        Ok(cfg[start..end].to_vec())
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VResult<()> {
        // Alioth's devices have no writable configuration fields.
        Err(invalid(format!(
            "config write of {} bytes at {offset:#x}: read-only",
            buf.len()
        )))
    }

    fn set_backend_req_fd(&mut self, backend: BackendChannel) {
        // Kept for the connection's life; Alioth's devices have no configuration changes to
        // announce through it yet.
        self.backend_channel = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VResult<(VhostUserInflight, File)> {
        Err(invalid("INFLIGHT_SHMFD was not offered"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VResult<()> {
        Err(invalid("INFLIGHT_SHMFD was not offered"))
    }

    fn get_max_mem_slots(&mut self) -> VResult<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("CONFIGURE_MEM_SLOTS was not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VResult<()> {
        Err(invalid("CONFIGURE_MEM_SLOTS was not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VResult<Option<File>> {
        Err(invalid("DEVICE_STATE was not offered"))
    }

    fn check_device_state(&mut self) -> VResult<()> {
        Err(invalid("DEVICE_STATE was not offered"))
    }

    fn get_shmem_config(&mut self) -> VResult<VhostUserShMemConfig> {
        Err(invalid("SHMEM was not offered"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VResult<()> {
        Err(invalid("LOG_SHMFD was not offered"))
    }
}

/// Creates the listening socket at `path`. A stale socket (nobody accepts on it) is replaced;
/// a socket in use, or a path that exists and is not a socket, is an error.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::FileTypeExt;
    let err = |reason: String| Error::Socket {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err("exists and is not a socket".into()));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("is in use (another process accepts on it)".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    UnixListener::bind(path).map_err(|e| err(e.to_string()))
}

/// Serves `dev` on `listener`: one frontend at a time, each until it disconnects (the device is
/// then reset, and the next frontend may connect), until `stop()` says so after a connection
/// ends. Errors in a connection close it; they do not end serving.
pub fn serve<D, B>(
    listener: UnixListener,
    dev: VhostUserDevice<D, B>,
    mut stop: impl FnMut() -> bool,
) -> Result<(), Error>
where
    D: ChainHandler,
    B: Backend<D> + Clone,
{
    let name = dev.name().to_string();
    let dev = Arc::new(Mutex::new(dev));
    loop {
        let (stream, _) = listener
            .accept()
            .map_err(|e| Error::Protocol(e.to_string()))?;
        log::info!("{name}: vhost-user frontend connected");
        serve_connection(&dev, stream);
        if stop() {
            return Ok(());
        }
    }
}

/// Serves one frontend connection until it ends, then forgets its state (the device is reset).
fn serve_connection<D, B>(dev: &Arc<Mutex<VhostUserDevice<D, B>>>, stream: UnixStream)
where
    D: ChainHandler,
    B: Backend<D> + Clone,
{
    let name = dev
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .name()
        .to_string();
    match relay::spawn(stream) {
        Ok((inner, relay)) => {
            let mut conn = BackendReqHandler::from_stream(inner, dev.clone());
            loop {
                match conn.handle_request() {
                    Ok(()) => {}
                    Err(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    ) => {
                        log::info!("{name}: vhost-user frontend disconnected");
                        break;
                    }
                    Err(e) => {
                        log::warn!("{name}: vhost-user: {e}; closing the connection");
                        break;
                    }
                }
            }
            drop(conn);
            let _ = relay.join();
        }
        Err(e) => log::warn!("{name}: vhost-user: cannot relay the connection: {e}"),
    }
    dev.lock().unwrap_or_else(|e| e.into_inner()).forget();
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
#[path = "lib_test.rs"]
mod tests;
