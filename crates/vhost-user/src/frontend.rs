//! The VMM side: a device whose queues an external vhost-user backend serves (our own
//! `alioth vhost-user`, qemu-storage-daemon, SPDK, ...).
//!
//! The transport stays the VMM's own (virtio-pci): at DRIVER_OK the frontend hands the backend
//! the guest's memory (memfd regions), the rings' addresses in that memory, the queues'
//! ioeventfds as kick descriptors (so KVM signals the backend directly: a notification never
//! passes through the VMM) and one call eventfd per queue. Interrupts come back on those call
//! eventfds and go out through the transport's interrupt sender, which honours MSI-X masking.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use alioth_virtio::{DeviceId, DeviceInfo, DeviceRunner, IrqSender, QueueSetup, QueueState};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend as _};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, VIRTIO_F_VERSION_1, VhostUserProtocolFeatures, VhostUserVirtioFeatures};

/// A region of guest RAM the backend maps: where it is for the guest, in this process, and in
/// which file at which offset.
#[derive(Debug)]
pub struct SharedRegion {
    /// Guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Its address in this process.
    pub host_addr: u64,
    /// The file that backs it (a duplicate: the frontend keeps it open).
    pub file: OwnedFd,
    /// Its offset in the file.
    pub offset: u64,
}

/// The queue size offered to the driver (vhost-user has no way to ask the backend).
pub const QUEUE_SIZE: u16 = 256;

/// Bytes of device configuration each device type has.
fn config_len(id: DeviceId) -> u32 {
    match id {
        DeviceId::Block => 60,
        DeviceId::Net => 12,
        DeviceId::Console => 12,
        DeviceId::Vsock => 8,
        _ => 0,
    }
}

struct Running {
    queues: Vec<usize>,
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

/// A device served by an external vhost-user backend.
pub struct VhostUserFrontend {
    name: String,
    conn: Mutex<Frontend>,
    regions: Vec<SharedRegion>,
    running: Mutex<Option<Running>>,
    broken: Arc<AtomicBool>,
}

fn vu(name: &str, what: &str) -> impl FnOnce(vhost::Error) -> Error {
    let msg = format!("{name}: {what}");
    move |e| Error::Protocol(format!("{msg}: {e}"))
}

impl VhostUserFrontend {
    /// Connects to the backend at `socket` for a device of type `id`, negotiates the protocol
    /// and reads what the transport needs (features, queues, configuration). `regions` is the
    /// guest RAM the backend will map.
    pub fn connect(
        socket: &Path,
        name: &str,
        id: DeviceId,
        regions: Vec<SharedRegion>,
    ) -> Result<(Self, DeviceInfo), Error> {
        let mut conn = Frontend::connect(socket, 64).map_err(|e| Error::Socket {
            path: socket.to_path_buf(),
            reason: format!("cannot connect: {e}"),
        })?;
        conn.set_owner().map_err(vu(name, "SET_OWNER"))?;
        let features = conn.get_features().map_err(vu(name, "GET_FEATURES"))?;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & VIRTIO_F_VERSION_1 == 0 || features & pf_bit == 0 {
            return Err(Error::Protocol(format!(
                "{name}: the backend offers features {features:#x}: VERSION_1 and PROTOCOL_FEATURES are required"
            )));
        }
        // The vhost crate's frontend sends GET/SET_PROTOCOL_FEATURES only after it has acked
        // PROTOCOL_FEATURES; the driver's features replace these at DRIVER_OK.
        conn.set_features(VIRTIO_F_VERSION_1 | pf_bit)
            .map_err(vu(name, "SET_FEATURES"))?;
        let offered = conn
            .get_protocol_features()
            .map_err(vu(name, "GET_PROTOCOL_FEATURES"))?;
        let protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        conn.set_protocol_features(protocol)
            .map_err(vu(name, "SET_PROTOCOL_FEATURES"))?;
        let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            conn.get_queue_num().map_err(vu(name, "GET_QUEUE_NUM"))?
        } else {
            1
        };
        if queues == 0 || queues > 64 {
            return Err(Error::Protocol(format!(
                "{name}: the backend has {queues} queues"
            )));
        }
        let len = config_len(id);
        let config = if len > 0 && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, c) = conn
                .get_config(
                    0,
                    len,
                    VhostUserConfigFlags::WRITABLE,
                    &vec![0; len as usize],
                )
                .map_err(vu(name, "GET_CONFIG"))?;
            c
        } else {
            vec![0; len as usize]
        };
        let info = DeviceInfo {
            name: name.to_string(),
            id,
            features: features & !pf_bit,
            max_sizes: vec![QUEUE_SIZE; queues as usize],
            config,
        };
        let fe = VhostUserFrontend {
            name: name.to_string(),
            conn: Mutex::new(conn),
            regions,
            running: Mutex::new(None),
            broken: Arc::new(AtomicBool::new(false)),
        };
        Ok((fe, info))
    }

    /// The address in this process of guest range `gpa..gpa+len`.
    fn host(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = gpa.checked_sub(r.gpa)?;
            (off.checked_add(len)? <= r.size).then(|| r.host_addr + off)
        })
    }

    fn try_start(
        &self,
        features: u64,
        queues: &[Option<QueueSetup>],
        calls: &[Option<EventFd>],
    ) -> Result<Vec<usize>, Error> {
        let name = &self.name;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.set_features(features | pf_bit)
            .map_err(vu(name, "SET_FEATURES"))?;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.offset,
                mmap_handle: r.file.as_raw_fd(),
            })
            .collect();
        conn.set_mem_table(&table)
            .map_err(vu(name, "SET_MEM_TABLE"))?;
        let mut started = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            let (Some(q), Some(call)) = (q, &calls[i]) else {
                continue;
            };
            let c = q.config;
            let n = u64::from(c.size);
            let packed = features & (1 << 34) != 0;
            let (desc_len, avail_len, used_len) = if packed {
                (16 * n, 4, 4)
            } else {
                (16 * n, 6 + 2 * n, 6 + 8 * n)
            };
            let (Some(desc), Some(avail), Some(used)) = (
                self.host(c.desc, desc_len),
                self.host(c.driver, avail_len),
                self.host(c.device, used_len),
            ) else {
                return Err(Error::Protocol(format!(
                    "{name}: queue {i} is not inside guest RAM"
                )));
            };
            conn.set_vring_num(i, c.size)
                .map_err(vu(name, "SET_VRING_NUM"))?;
            conn.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: c.size,
                    flags: 0,
                    desc_table_addr: desc,
                    used_ring_addr: used,
                    avail_ring_addr: avail,
                    log_addr: None,
                },
            )
            .map_err(vu(name, "SET_VRING_ADDR"))?;
            conn.set_vring_base(i, q.base as u16)
                .map_err(vu(name, "SET_VRING_BASE"))?;
            conn.set_vring_call(i, call)
                .map_err(vu(name, "SET_VRING_CALL"))?;
            conn.set_vring_kick(i, &q.ioeventfd)
                .map_err(vu(name, "SET_VRING_KICK"))?;
            conn.set_vring_enable(i, true)
                .map_err(vu(name, "SET_VRING_ENABLE"))?;
            started.push(i);
        }
        Ok(started)
    }
}

/// Forwards the backend's call eventfds to the transport's interrupt sender until `stop`.
fn forward_interrupts(
    name: String,
    calls: Vec<(u16, EventFd)>,
    stop: Arc<EventFd>,
    irq: Arc<dyn IrqSender>,
) {
    let mut fds: Vec<libc::pollfd> = calls
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .chain(std::iter::once(stop.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("{name}: polling the backend's interrupts: {e}");
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (p, (q, fd)) in fds.iter().zip(&calls) {
            if p.revents != 0 && fd.read().is_ok() {
                irq.queue_irq(*q);
            }
        }
    }
}

impl DeviceRunner for VhostUserFrontend {
    fn start(&self, features: u64, queues: Vec<Option<QueueSetup>>, irq: Arc<dyn IrqSender>) {
        let calls: Vec<Option<EventFd>> = queues
            .iter()
            .map(|q| {
                q.as_ref()
                    .and_then(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
            })
            .collect();
        let started = match self.try_start(features, &queues, &calls) {
            Ok(s) => s,
            Err(e) => {
                log::error!("{e}; the device needs a reset");
                self.broken.store(true, Ordering::Release);
                irq.config_irq();
                return;
            }
        };
        let stop = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                log::error!("{}: eventfd: {e}", self.name);
                self.broken.store(true, Ordering::Release);
                return;
            }
        };
        let forwarded: Vec<(u16, EventFd)> = calls
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i as u16, c?)))
            .collect();
        let (name, s) = (self.name.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{}-irq", self.name))
            .spawn(move || forward_interrupts(name, forwarded, s, irq));
        match thread {
            Ok(thread) => {
                *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
                    queues: started,
                    stop,
                    thread,
                })
            }
            Err(e) => {
                log::error!("{}: interrupt thread: {e}", self.name);
                self.broken.store(true, Ordering::Release);
            }
        }
    }

    fn reset(&self) -> Vec<QueueState> {
        self.broken.store(false, Ordering::Release);
        let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Vec::new();
        };
        let mut states = Vec::new();
        {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            for &i in &r.queues {
                // GET_VRING_BASE stops the ring after the backend completed what it had in
                // flight, so nothing acknowledged is lost across the reset.
                match conn.get_vring_base(i) {
                    Ok(base) => states.push((i as u16, base)),
                    Err(e) => log::warn!("{}: GET_VRING_BASE {i}: {e}", self.name),
                }
            }
        }
        let _ = r.stop.write(1);
        let _ = r.thread.join();
        states
    }

    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn stop(&self) {
        let _ = DeviceRunner::reset(self);
    }
}

impl Drop for VhostUserFrontend {
    fn drop(&mut self) {
        DeviceRunner::stop(self);
    }
}
