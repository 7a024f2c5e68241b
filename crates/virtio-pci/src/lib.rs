//! `alioth-virtio-pci`: the virtio-pci modern transport (virtio 1.2 §4.1), where `alioth-virtio`
//! (devices and workers, no PCI) meets `alioth-pci` (the bus, no virtio).
//!
//! BAR0 (64-bit memory, [`BAR_SIZE`]) holds the common configuration at 0x0000, the ISR at
//! 0x1000, the device configuration at 0x2000, the notification area at 0x3000 (queue `i`
//! notifies at 0x3000 + 4·i, each address backed by an ioeventfd so a notification never exits
//! to userspace), the MSI-X table at 0x4000 and its pending-bit array at 0x5000.
//!
//! Interrupts go out through one irqfd per MSI-X vector, routed by the vector's address/data.
//! A masked vector (or a masked function) records the interrupt in the PBA instead, and it fires
//! when unmasked. The VM-side plumbing — GSI routes, irqfd and ioeventfd registration — is
//! behind [`MsiRouter`] and [`IoeventRegistry`], which the VMM implements over KVM.

use std::sync::{Arc, Mutex, Weak};

use alioth_mem::{Bus, BusDevice};
use alioth_pci::{ConfigSpace, MsixTable, PciFunction, add_msix_capability, read_le, write_le};
use alioth_queue::QueueConfig;
#[cfg(doc)]
use alioth_virtio::Worker;
use alioth_virtio::{
    DeviceId, DeviceInfo, DeviceRunner, DeviceStatus, IrqSender, QueueSetup, StatusBits,
    StatusChange,
};
use vmm_sys_util::eventfd::EventFd;

pub use alioth_pci::MsiRouter;

/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x1_0000;
/// Common configuration.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure.
pub const COMMON_LEN: u64 = 0x3c;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between queue notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// "No vector".
pub const NO_VECTOR: u16 = 0xffff;

const PCI_COMMAND_MEMORY: u16 = 1 << 1;

/// Registers ioeventfds on guest-physical MMIO addresses.
pub trait IoeventRegistry: Send + Sync {
    /// `fd` fires on any write to `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Undoes [`IoeventRegistry::register`].
    fn deregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

struct Common {
    status: DeviceStatus,
    dev_feature_select: u32,
    drv_feature_select: u32,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

struct State {
    name: String,
    max_sizes: Vec<u16>,
    device_config: Vec<u8>,
    runner: Box<dyn DeviceRunner>,
    common: Mutex<Common>,
    msix: Mutex<MsixTable>,
    /// Offset of the MSI-X capability in configuration space.
    msix_cap: u16,
    ioeventfds: Vec<Arc<EventFd>>,
    cfg: Mutex<ConfigSpace>,
    mapped: Mutex<Option<u64>>,
    // Weak: the bus holds this device, so a strong reference would be a cycle.
    mmio: Weak<Bus>,
    ioevents: Arc<dyn IoeventRegistry>,
    /// Rate limit for what the driver can make us log over and over.
    log: alioth_virtio::LogLimiter,
}

/// What a snapshot keeps of a virtio-pci function: its configuration space (BAR address,
/// command register, MSI-X control), the common configuration, the MSI-X vectors, and where
/// each running queue's ring stands.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Device name (checked on restore).
    pub name: String,
    config_space: Vec<u8>,
    status: u8,
    driver_features: u64,
    dev_feature_select: u32,
    drv_feature_select: u32,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    msix: Vec<(u64, u32, bool, bool)>,
    positions: Vec<(u16, u32)>,
}

/// Errors restoring a transport.
#[derive(Debug)]
pub struct RestoreError(pub String);

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RestoreError {}

/// Interrupts of a virtio-pci device: queue and config vectors chosen by the driver.
struct PciIrq {
    state: Weak<State>,
}

impl IrqSender for PciIrq {
    fn queue_irq(&self, queue: u16) {
        let Some(s) = self.state.upgrade() else {
            return;
        };
        let v = {
            let c = s.common.lock().unwrap_or_else(|e| e.into_inner());
            c.queues.get(usize::from(queue)).map(|q| q.vector)
        };
        if let Some(v) = v.filter(|v| *v != NO_VECTOR) {
            s.msix.lock().unwrap_or_else(|e| e.into_inner()).fire(v);
        }
    }

    fn config_irq(&self) {
        let Some(s) = self.state.upgrade() else {
            return;
        };
        let v = s
            .common
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_vector;
        if v != NO_VECTOR {
            s.msix.lock().unwrap_or_else(|e| e.into_inner()).fire(v);
        }
    }
}

/// A virtio device behind the virtio-pci transport: its configuration space (a
/// [`PciFunction`]) and its BAR0 (a [`BusDevice`] mapped on the MMIO bus while the guest has
/// memory decoding enabled).
#[derive(Clone)]
pub struct VirtioPci {
    state: Arc<State>,
}

impl VirtioPci {
    /// Wraps the device described by `dev`, whose queues `runner` serves (its [`Worker`], or a
    /// vhost-user backend), at BAR0 address
    /// `bar_addr`. `mmio` is the bus BAR0 is mapped on once the guest enables memory decoding.
    pub fn new(
        dev: DeviceInfo,
        runner: impl DeviceRunner + 'static,
        bar_addr: u64,
        mmio: Arc<Bus>,
        ioevents: Arc<dyn IoeventRegistry>,
        router: Arc<dyn MsiRouter>,
    ) -> std::io::Result<Self> {
        let max_sizes = dev.max_sizes.clone();
        let nq = max_sizes.len();
        let nvec = u16::try_from(nq + 1)
            .map_err(|_| std::io::Error::other(format!("{}: too many queues", dev.name)))?;
        let msix = MsixTable::new(&dev.name, nvec, router)?;
        let ioeventfds = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (cfg, msix_cap) = Self::build_config(dev.id, dev.config.len(), nvec, bar_addr)
            .ok_or_else(|| {
                std::io::Error::other(format!("{}: capabilities do not fit", dev.name))
            })?;
        let state = Arc::new(State {
            name: dev.name,
            max_sizes: max_sizes.clone(),
            device_config: dev.config,
            runner: Box::new(runner),
            common: Mutex::new(Common {
                status: DeviceStatus::new(dev.features),
                dev_feature_select: 0,
                drv_feature_select: 0,
                config_vector: NO_VECTOR,
                queue_select: 0,
                queues: max_sizes
                    .iter()
                    .map(|&m| QueueRegs {
                        size: m,
                        vector: NO_VECTOR,
                        ..Default::default()
                    })
                    .collect(),
            }),
            msix: Mutex::new(msix),
            msix_cap,
            ioeventfds,
            cfg: Mutex::new(cfg),
            mapped: Mutex::new(None),
            mmio: Arc::downgrade(&mmio),
            ioevents,
            log: alioth_virtio::LogLimiter::new(),
        });
        Ok(VirtioPci { state })
    }

    /// The configuration space, and the offset of its MSI-X capability.
    fn build_config(
        id: DeviceId,
        dev_cfg_len: usize,
        nvec: u16,
        bar: u64,
    ) -> Option<(ConfigSpace, u16)> {
        let mut c = ConfigSpace::default();
        c.set_u16(0x00, 0x1af4); // Red Hat / virtio
        c.set_u16(0x02, 0x1040 + id as u16);
        c.set(0x08, &[1]); // revision 1: modern
        let class: u32 = match id {
            DeviceId::Block => 0x01_8000,
            DeviceId::Net => 0x02_0000,
            DeviceId::Console => 0x07_8000,
            _ => 0xff_0000,
        };
        c.set(0x09, &class.to_le_bytes()[..3]);
        c.set_u16(0x2c, 0x1af4);
        c.set_u16(0x2e, 0x40);
        // Command: memory space enable and bus master are the driver's to set.
        c.set_wmask(0x04, &(PCI_COMMAND_MEMORY | (1 << 2)).to_le_bytes());
        // BAR0: 64-bit memory BAR of BAR_SIZE.
        c.set_u32(0x10, (bar as u32 & !0xf) | 0x4);
        c.set_u32(0x14, (bar >> 32) as u32);
        c.set_wmask(0x10, &(!(BAR_SIZE as u32 - 1) & !0xf).to_le_bytes());
        c.set_wmask(0x14, &[0xff; 4]);
        // Vendor capabilities (virtio 1.2 §4.1.4): cap_len, cfg_type, bar, id, padding,
        // offset, length[, notify_off_multiplier].
        let dev_len = (dev_cfg_len as u32).max(4);
        let caps: [(u8, u64, u32); 4] = [
            (1, COMMON_OFFSET, COMMON_LEN as u32),
            (3, ISR_OFFSET, 1),
            (4, DEVICE_OFFSET, dev_len),
            (2, NOTIFY_OFFSET, 0x1000),
        ];
        for (typ, off, len) in caps {
            let cap_len: u8 = if typ == 2 { 20 } else { 16 };
            let mut body = vec![cap_len, typ, 0, 0, 0, 0];
            body.extend_from_slice(&(off as u32).to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            if typ == 2 {
                body.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
            }
            c.add_capability(0x09, &body)?;
        }
        let msix = add_msix_capability(
            &mut c,
            nvec,
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        )?;
        Some((c, msix as u16))
    }

    /// Stops the device's worker after its in-flight requests complete.
    pub fn shutdown(&self) {
        self.state.runner.stop();
    }

    /// Pauses the device: what is in flight completes, then its queues are not served until
    /// [`VirtioPci::resume`]. False if its runner cannot pause (a vhost-user backend).
    pub fn pause(&self) -> bool {
        self.state.runner.pause()
    }

    /// Serves the queues again after [`VirtioPci::pause`].
    pub fn resume(&self) {
        self.state.runner.resume()
    }

    /// The device's name (`virtio-blk0`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The transport's state for a snapshot. The device must be paused
    /// ([`VirtioPci::pause`]): its ring positions come from its runner, which must be able to
    /// say (`None` otherwise: a vhost-user backend).
    pub fn save(&self) -> Option<TransportState> {
        let s = &self.state;
        let running = s
            .common
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status
            .driver_ok();
        let positions = if running {
            s.runner.positions()?
        } else {
            Vec::new()
        };
        let c = s.common.lock().unwrap_or_else(|e| e.into_inner());
        let msix = s
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save()
            .into_iter()
            .map(|e| (e.addr, e.data, e.masked, e.pending))
            .collect();
        Some(TransportState {
            name: s.name.clone(),
            config_space: s
                .cfg
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bytes()
                .to_vec(),
            status: c.status.status(),
            driver_features: c.status.driver_features(),
            dev_feature_select: c.dev_feature_select,
            drv_feature_select: c.drv_feature_select,
            config_vector: c.config_vector,
            queue_select: c.queue_select,
            queues: c.queues.clone(),
            msix,
            positions,
        })
    }

    /// Gives a freshly built transport of the same device the state `t`: configuration space
    /// (BAR0 is mapped again where the guest put it), common configuration, MSI-X vectors and
    /// routes; a device the driver had started is started again with its rings where they
    /// stood. Checked first: name, queue count, vector count, sizes within the maxima.
    pub fn restore(&self, t: &TransportState) -> Result<(), RestoreError> {
        let s = &self.state;
        let bad = |why: String| Err(RestoreError(format!("{}: {why}", s.name)));
        if t.name != s.name {
            return bad(format!("the snapshot has {} in this place", t.name));
        }
        if t.queues.len() != s.max_sizes.len() {
            return bad(format!(
                "{} queues saved, the device has {}",
                t.queues.len(),
                s.max_sizes.len()
            ));
        }
        if let Some((i, q)) = t
            .queues
            .iter()
            .enumerate()
            .find(|(i, q)| q.size > s.max_sizes[*i] || (q.size == 0 && q.enabled))
        {
            return bad(format!("queue {i} has size {}", q.size));
        }
        if t.positions
            .iter()
            .any(|(q, _)| usize::from(*q) >= t.queues.len())
        {
            return bad("a ring position names no queue".into());
        }
        {
            let mut cfg = s.cfg.lock().unwrap_or_else(|e| e.into_inner());
            if !cfg.restore_bytes(&t.config_space) {
                return bad("the configuration space is not 4096 bytes".into());
            }
        }
        let ctrl = s
            .cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .u16_at(usize::from(s.msix_cap) + 2);
        let entries: Vec<alioth_pci::MsixEntry> = t
            .msix
            .iter()
            .map(|&(addr, data, masked, pending)| alioth_pci::MsixEntry {
                addr,
                data,
                masked,
                pending,
            })
            .collect();
        s.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&entries, ctrl)
            .map_err(|e| RestoreError(format!("{}: MSI-X: {e}", s.name)))?;
        self.update_mapping();
        let features = {
            let mut c = s.common.lock().unwrap_or_else(|e| e.into_inner());
            c.status.restore(t.status, t.driver_features);
            c.dev_feature_select = t.dev_feature_select;
            c.drv_feature_select = t.drv_feature_select;
            c.config_vector = t.config_vector;
            c.queue_select = t.queue_select;
            c.queues = t.queues.clone();
            c.status.driver_ok().then(|| c.status.driver_features())
        };
        if let Some(features) = features {
            self.start_runner(features, |i| {
                t.positions
                    .iter()
                    .find(|(qi, _)| usize::from(*qi) == i)
                    .map_or(0, |p| p.1)
            });
            s.runner.restored();
        }
        Ok(())
    }

    /// The offset of the MSI-X capability in configuration space.
    fn msix_cap(&self) -> u16 {
        self.state.msix_cap
    }

    /// The BAR0 device to place on the MMIO bus.
    fn bar_device(&self) -> Arc<dyn BusDevice> {
        Arc::new(self.clone())
    }

    /// Maps or unmaps BAR0 (and its notification ioeventfds) to follow the guest's BAR and
    /// command register.
    fn update_mapping(&self) {
        let s = &self.state;
        let want = {
            let c = s.cfg.lock().unwrap_or_else(|e| e.into_inner());
            let lo = u64::from(c.u32_at(0x10) & !0xf);
            let hi = u64::from(c.u32_at(0x14));
            let addr = lo | (hi << 32);
            let enabled = c.u16_at(0x04) & PCI_COMMAND_MEMORY != 0;
            (enabled && addr != 0 && addr.checked_add(BAR_SIZE).is_some()).then_some(addr)
        };
        let mut mapped = s.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if *mapped == want {
            return;
        }
        let Some(mmio) = s.mmio.upgrade() else {
            return;
        };
        if let Some(old) = mapped.take() {
            mmio.remove(old);
            for (i, fd) in s.ioeventfds.iter().enumerate() {
                let a = old + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = s.ioevents.deregister(fd, a) {
                    log::warn!("{}: ioeventfd at {a:#x}: {e}", s.name);
                }
            }
        }
        if let Some(new) = want {
            if let Err(e) = mmio.insert(new, BAR_SIZE, self.bar_device()) {
                log::warn!("{}: cannot map BAR0 at {new:#x}: {e}", s.name);
                return;
            }
            for (i, fd) in s.ioeventfds.iter().enumerate() {
                let a = new + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = s.ioevents.register(fd, a) {
                    log::warn!("{}: ioeventfd at {a:#x}: {e}", s.name);
                }
            }
            *mapped = Some(new);
        }
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let s = &self.state;
        let c = s.common.lock().unwrap_or_else(|e| e.into_inner());
        let q = c.queues.get(usize::from(c.queue_select)).copied();
        let qv = |f: fn(&QueueRegs) -> u64| q.as_ref().map(f).unwrap_or(0);
        let v: u64 = match off {
            0x00 => u64::from(c.dev_feature_select),
            0x04 => u64::from(c.status.device_features_word(c.dev_feature_select)),
            0x08 => u64::from(c.drv_feature_select),
            0x0c => match c.drv_feature_select {
                0 => c.status.driver_features() & 0xffff_ffff,
                1 => c.status.driver_features() >> 32,
                _ => 0,
            },
            0x10 => u64::from(c.config_vector),
            0x12 => c.queues.len() as u64,
            0x14 => {
                let mut st = c.status.status();
                if s.runner.needs_reset() && c.status.driver_ok() {
                    st |= StatusBits::NEEDS_RESET;
                }
                u64::from(st)
            }
            0x15 => 0, // config_generation: the config space never changes
            0x16 => u64::from(c.queue_select),
            0x18 => qv(|q| u64::from(q.size)),
            0x1a => q
                .map(|q| u64::from(q.vector))
                .unwrap_or(u64::from(NO_VECTOR)),
            0x1c => qv(|q| u64::from(q.enabled)),
            0x1e => u64::from(c.queue_select), // queue_notify_off
            0x20 => qv(|q| q.desc),
            0x24 => qv(|q| q.desc >> 32),
            0x28 => qv(|q| q.driver),
            0x2c => qv(|q| q.driver >> 32),
            0x30 => qv(|q| q.device),
            0x34 => qv(|q| q.device >> 32),
            _ => 0,
        };
        write_le(data, v);
    }

    fn common_write(&self, off: u64, data: &[u8]) {
        let s = &self.state;
        let v = read_le(data);
        let mut c = s.common.lock().unwrap_or_else(|e| e.into_inner());
        let nvec = s.msix.lock().unwrap_or_else(|e| e.into_inner()).len() as u16;
        let sel = usize::from(c.queue_select);
        let before_ok = c.status.driver_ok();
        let set_q = |c: &mut Common, f: &dyn Fn(&mut QueueRegs)| {
            if before_ok {
                s.log.warn(format_args!(
                    "{}: queue register written after DRIVER_OK; ignored",
                    s.name
                ));
                return;
            }
            if let Some(q) = c.queues.get_mut(sel) {
                f(q)
            }
        };
        match off {
            0x00 => c.dev_feature_select = v as u32,
            0x08 => c.drv_feature_select = v as u32,
            0x0c => {
                let sel = c.drv_feature_select;
                c.status.set_driver_features_word(sel, v as u32)
            }
            0x10 => {
                c.config_vector = if (v as u16) < nvec {
                    v as u16
                } else {
                    NO_VECTOR
                }
            }
            0x14 => {
                let change = c.status.write(v as u8);
                drop(c);
                self.status_change(change);
            }
            0x16 => c.queue_select = v as u16,
            0x18 => set_q(&mut c, &|q| q.size = v as u16),
            0x1a => {
                let vec = if (v as u16) < nvec {
                    v as u16
                } else {
                    NO_VECTOR
                };
                if let Some(q) = c.queues.get_mut(sel) {
                    q.vector = vec;
                }
            }
            0x1c => set_q(&mut c, &|q| q.enabled = v & 1 == 1),
            0x20 => set_q(&mut c, &|q| {
                q.desc = (q.desc & !0xffff_ffff) | (v & 0xffff_ffff)
            }),
            0x24 => set_q(&mut c, &|q| q.desc = (q.desc & 0xffff_ffff) | (v << 32)),
            0x28 => set_q(&mut c, &|q| {
                q.driver = (q.driver & !0xffff_ffff) | (v & 0xffff_ffff)
            }),
            0x2c => set_q(&mut c, &|q| q.driver = (q.driver & 0xffff_ffff) | (v << 32)),
            0x30 => set_q(&mut c, &|q| {
                q.device = (q.device & !0xffff_ffff) | (v & 0xffff_ffff)
            }),
            0x34 => set_q(&mut c, &|q| q.device = (q.device & 0xffff_ffff) | (v << 32)),
            _ => {}
        }
    }

    /// Hands the enabled queues to the runner with `features`, each ring continuing at
    /// `base(queue index)`.
    fn start_runner(&self, features: u64, base: impl Fn(usize) -> u32) {
        let s = &self.state;
        let queues = {
            let c = s.common.lock().unwrap_or_else(|e| e.into_inner());
            c.queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    q.enabled.then(|| QueueSetup {
                        config: QueueConfig {
                            size: q.size,
                            desc: q.desc,
                            driver: q.driver,
                            device: q.device,
                        },
                        ioeventfd: s.ioeventfds[i].clone(),
                        base: base(i),
                    })
                })
                .collect()
        };
        let irq = Arc::new(PciIrq {
            state: Arc::downgrade(&self.state),
        });
        s.runner.start(features, queues, irq);
    }

    fn status_change(&self, change: StatusChange) {
        let s = &self.state;
        match change {
            StatusChange::Activate(features) => {
                self.start_runner(features, |_| 0);
            }
            StatusChange::Reset => {
                let _ = s.runner.reset();
                let mut c = s.common.lock().unwrap_or_else(|e| e.into_inner());
                c.config_vector = NO_VECTOR;
                c.queue_select = 0;
                for (q, &m) in c.queues.iter_mut().zip(&s.max_sizes) {
                    *q = QueueRegs {
                        size: m,
                        vector: NO_VECTOR,
                        ..Default::default()
                    };
                }
            }
            StatusChange::FeaturesRejected | StatusChange::None => {}
        }
    }

    fn msix_read(&self, off: u64, data: &mut [u8]) {
        let m = self.state.msix.lock().unwrap_or_else(|e| e.into_inner());
        if off >= MSIX_PBA_OFFSET {
            m.pba_read(off - MSIX_PBA_OFFSET, data);
        } else {
            m.table_read(off - MSIX_TABLE_OFFSET, data);
        }
    }

    fn msix_write(&self, off: u64, data: &[u8]) {
        if off >= MSIX_PBA_OFFSET {
            return; // read-only
        }
        let mut m = self.state.msix.lock().unwrap_or_else(|e| e.into_inner());
        m.table_write(off - MSIX_TABLE_OFFSET, data);
    }

    fn msix_control_written(&self) {
        let ctrl = {
            let c = self.state.cfg.lock().unwrap_or_else(|e| e.into_inner());
            c.u16_at(usize::from(self.msix_cap()) + 2)
        };
        let mut m = self.state.msix.lock().unwrap_or_else(|e| e.into_inner());
        m.set_control(ctrl);
    }
}

impl PciFunction for VirtioPci {
    fn name(&self) -> &str {
        &self.state.name
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.state
            .cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        self.state
            .cfg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
        let end = offset + data.len() as u16;
        if offset < 0x18 && end > 0x04 {
            self.update_mapping(); // command register or BAR0
        }
        let ctrl = self.msix_cap() + 2;
        if offset < ctrl + 2 && end > ctrl {
            self.msix_control_written();
        }
    }
}

impl BusDevice for VirtioPci {
    fn name(&self) -> &str {
        &self.state.name
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o, data),
            ISR_OFFSET => data.fill(0),
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                let rel = (o - DEVICE_OFFSET) as usize;
                let cfg = &self.state.device_config;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get(rel + i).copied().unwrap_or(0);
                }
            }
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.msix_read(o, data),
            _ => data.fill(0),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o, data),
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reaches here only where no ioeventfd is registered (e.g. tests).
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.state.ioeventfds.get(q) {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.msix_write(o, data),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "lib_test.rs"]
mod tests;
