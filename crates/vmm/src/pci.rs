//! The VM side of the virtio-pci transport: MSI routes, irqfds and ioeventfds over KVM, and the
//! assembly of virtio devices on the PCI bus.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use alioth_hv::{DataMatch, EventFd, GsiRoute, IoEventAddress, Vm};
use alioth_io_uring::{IoUringBackend, io_uring_available};
use alioth_mem::Bus;
use alioth_pci::{MsiRouter, PciBus};
use alioth_virtio::{ChainHandler, DeviceInfo, DeviceRunner, EpollBackend, Worker};
use alioth_virtio_pci::{BAR_SIZE, IoeventRegistry, VirtioPci};
use vm_memory::GuestMemoryMmap;

use crate::config::IoBackend;
use crate::{Error, Result};

/// The first GSI above the I/O APIC's pins (GSIs 0-23 are its pins, routed by the userspace
/// I/O APIC).
const FIRST_MSI_GSI: u32 = alioth_hv::IOAPIC_PINS;
/// io_uring submission ring size per device.
pub const IO_URING_ENTRIES: u32 = 256;

/// MSI routes over KVM's GSI routing table (which is replaced whole on every change).
pub struct KvmMsi {
    vm: Arc<Vm>,
    next: AtomicU32,
    routes: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl KvmMsi {
    pub fn new(vm: Arc<Vm>) -> Self {
        KvmMsi {
            vm,
            next: AtomicU32::new(FIRST_MSI_GSI),
            routes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Routes `gsi` to an MSI message, or removes its route (`None`), and installs the table.
    pub fn update(&self, gsi: u32, route: Option<(u64, u32)>) -> std::io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        match route {
            Some(r) => routes.insert(gsi, r),
            None => routes.remove(&gsi),
        };
        let table: Vec<GsiRoute> = routes
            .iter()
            .map(|(&gsi, &(addr, data))| GsiRoute::Msi { gsi, addr, data })
            .collect();
        self.vm.set_gsi_routing(&table).map_err(hv_io)
    }
}

fn hv_io(e: alioth_hv::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl MsiRouter for KvmMsi {
    fn alloc_gsi(&self) -> std::io::Result<u32> {
        Ok(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        self.update(gsi, Some((addr, data)))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(hv_io)
    }
}

/// MMIO ioeventfds over KVM.
pub struct KvmIoevents {
    vm: Arc<Vm>,
}

impl KvmIoevents {
    pub fn new(vm: Arc<Vm>) -> Self {
        KvmIoevents { vm }
    }
}

impl IoeventRegistry for KvmIoevents {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.vm
            .register_ioeventfd(fd, IoEventAddress::Mmio(addr), DataMatch::Any)
            .map_err(hv_io)
    }

    fn deregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.vm
            .deregister_ioeventfd(fd, IoEventAddress::Mmio(addr), DataMatch::Any)
            .map_err(hv_io)
    }
}

/// Whether `backend` means io_uring for device `name`: `auto` falls back to epoll (with a log
/// line) where io_uring is unavailable, `io_uring` there is an error.
pub fn use_io_uring(name: &str, backend: IoBackend) -> Result<bool> {
    Ok(match backend {
        IoBackend::Epoll => false,
        IoBackend::IoUring => {
            if !io_uring_available() {
                return Err(Error::Device(format!(
                    "{name}: io_uring is not available here (blocked or unsupported); use backend = \"epoll\" or \"auto\""
                )));
            }
            true
        }
        IoBackend::Auto => {
            let ok = io_uring_available();
            if !ok {
                log::warn!("{name}: io_uring is not available; using the epoll backend");
            }
            ok
        }
    })
}

/// What the machine does when a device's worker panics: (device, message).
pub type OnFailure = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Places virtio devices on the PCI bus, one BAR window each.
pub struct VirtioPlacer {
    pub pci: Arc<PciBus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub msi: Arc<KvmMsi>,
    pub ioevents: Arc<KvmIoevents>,
    pub next_bar: u64,
    pub bar_end: u64,
    pub devices: Vec<VirtioPci>,
    /// Told when a device's worker panics (the machine then stops with the reason).
    pub on_failure: OnFailure,
    /// The workers' seccomp filters.
    pub seccomp: crate::sandbox::SeccompMode,
}

impl VirtioPlacer {
    /// Plugs a device served by `runner` (described by `info`) into the next PCI slot.
    pub fn add_runner(
        &mut self,
        info: DeviceInfo,
        runner: impl DeviceRunner + 'static,
        what: &str,
    ) -> Result<()> {
        let name = info.name.clone();
        let bar = self.next_bar;
        if bar + BAR_SIZE > self.bar_end {
            return Err(Error::Config("the PCI BAR window is full".into()));
        }
        self.next_bar += BAR_SIZE;
        let pci = VirtioPci::new(
            info,
            runner,
            bar,
            self.mmio.clone(),
            self.ioevents.clone(),
            self.msi.clone(),
        )
        .map_err(|source| Error::Io {
            what: format!("{name}: interrupt setup"),
            source,
        })?;
        let slot = self
            .pci
            .add(Arc::new(pci.clone()))
            .ok_or_else(|| Error::Config("no free PCI slot".into()))?;
        log::info!("{name}: PCI 00:{slot:02x}.0, BAR0 {bar:#x}, {what}");
        self.devices.push(pci);
        Ok(())
    }

    /// Spawns `dev`'s worker under `backend` and plugs it into the next PCI slot.
    pub fn add<D: ChainHandler>(&mut self, dev: D, backend: IoBackend, poll_us: u32) -> Result<()> {
        let info = DeviceInfo::of(&dev);
        let name = info.name.clone();
        let use_uring = use_io_uring(&name, backend)?;
        // The worker's seccomp filter goes on before it serves a queue.
        let mode = self.seccomp;
        let init = move || {
            crate::sandbox::install(crate::sandbox::ThreadKind::Worker, mode)
                .map_err(|e| e.to_string())
        };
        let worker = if use_uring {
            let b = IoUringBackend::new(IO_URING_ENTRIES).with_poll(poll_us);
            Worker::spawn_with(dev, b, self.mem.clone(), init)
        } else {
            Worker::spawn_with(dev, EpollBackend::polling(poll_us), self.mem.clone(), init)
        }
        .map_err(|e| Error::Thread {
            thread: name.clone(),
            reason: e.to_string(),
        })?;
        let on_failure = self.on_failure.clone();
        worker.on_failure(move |dev, msg| on_failure(dev, msg));
        let what = if use_uring {
            "io_uring backend"
        } else {
            "epoll backend"
        };
        self.add_runner(info, worker, what)
    }
}
