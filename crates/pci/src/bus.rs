//! Bus 0 with a host bridge, reached through ports 0xCF8/0xCFC and through an ECAM window.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use alioth_mem::BusDevice;

use crate::ConfigSpace;

/// Slots on bus 0.
pub const SLOTS: usize = 32;

/// One PCI function's configuration space.
pub trait PciFunction: Send + Sync {
    /// Name for logs.
    fn name(&self) -> &str;
    /// Reads `data.len()` bytes at `offset` (0-4095).
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn config_write(&self, offset: u16, data: &[u8]);
}

/// The host bridge at 00:00.0.
pub struct HostBridge {
    cfg: RwLock<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        let mut c = ConfigSpace::default();
        c.set_u16(0, 0x1b36); // Red Hat
        c.set_u16(2, 0x0008); // PCIe host bridge
        c.set(0x0b, &[0x06]); // class: bridge
        c.set(0x0a, &[0x00]); // subclass: host
        HostBridge {
            cfg: RwLock::new(c),
        }
    }
}

impl PciFunction for HostBridge {
    fn name(&self) -> &str {
        "pci-host-bridge"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn config_write(&self, _offset: u16, _data: &[u8]) {}
}

/// Bus 0: up to 32 single-function devices.
pub struct PciBus {
    slots: RwLock<Vec<Option<Arc<dyn PciFunction>>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        let bus = PciBus {
            slots: RwLock::new(vec![None; SLOTS]),
        };
        bus.slots.write().unwrap_or_else(|e| e.into_inner())[0] =
            Some(Arc::new(HostBridge::default()));
        bus
    }
}

impl PciBus {
    /// Plugs `f` into the first free slot; returns the slot, or `None` when the bus is full.
    pub fn add(&self, f: Arc<dyn PciFunction>) -> Option<u8> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.iter().position(Option::is_none)?;
        slots[slot] = Some(f);
        Some(slot as u8)
    }

    fn get(&self, bus: u8, devfn: u8) -> Option<Arc<dyn PciFunction>> {
        if bus != 0 || devfn & 7 != 0 {
            return None; // one bus, function 0 only
        }
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(devfn >> 3)).cloned().flatten()
    }

    /// Configuration read; absent functions read as all ones.
    pub fn read(&self, bus: u8, devfn: u8, offset: u16, data: &mut [u8]) {
        match self.get(bus, devfn) {
            Some(f) => f.config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write; ignored for absent functions.
    pub fn write(&self, bus: u8, devfn: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.get(bus, devfn) {
            f.config_write(offset, data);
        }
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: AtomicU32,
}

/// First port of [`PciConfigIo`].
pub const CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports covered.
pub const CONFIG_IO_LEN: u16 = 8;

impl PciConfigIo {
    /// The port interface to `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: AtomicU32::new(0),
        }
    }

    fn target(&self, port_offset: u64) -> Option<(u8, u8, u16)> {
        let a = self.address.load(Ordering::Relaxed);
        if a & (1 << 31) == 0 {
            return None;
        }
        let reg = (a & 0xfc) as u16 | ((a >> 16) & 0xf00) as u16; // extended register bits
        Some((
            (a >> 16) as u8,
            (a >> 8) as u8,
            reg + (port_offset - 4) as u16,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn name(&self) -> &str {
        "pci-config-io"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let a = self.address.load(Ordering::Relaxed).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = a.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target(offset) {
            Some((bus, devfn, reg)) => self.bus.read(bus, devfn, reg & 0xfff, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().unwrap_or_default());
            self.address.store(v, Ordering::Relaxed);
            return;
        }
        if offset >= 4
            && let Some((bus, devfn, reg)) = self.target(offset)
        {
            self.bus.write(bus, devfn, reg & 0xfff, data);
        }
    }
}

/// The ECAM window: 4 KiB of configuration space per function, bus 0 only (1 MiB).
pub struct PciEcam {
    bus: Arc<PciBus>,
}

/// Size of the ECAM window for bus 0.
pub const ECAM_SIZE: u64 = 1 << 20;

impl PciEcam {
    /// The ECAM interface to `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciEcam { bus }
    }
}

impl BusDevice for PciEcam {
    fn name(&self) -> &str {
        "pci-ecam"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let (devfn, reg) = ((offset >> 12) as u8, (offset & 0xfff) as u16);
        self.bus.read(0, devfn, reg, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (devfn, reg) = ((offset >> 12) as u8, (offset & 0xfff) as u16);
        self.bus.write(0, devfn, reg, data)
    }
}
