//! `alioth-pci`: a PCI bus for a VMM, with no virtio in it.
//!
//! [`PciBus`] is bus 0 with a host bridge at 00:00.0; guests reach it through configuration
//! mechanism #1 ([`PciConfigIo`], ports 0xCF8/0xCFC) or through an ECAM window ([`PciEcam`],
//! which the ACPI MCFG table describes). A device is a [`PciFunction`] — usually a
//! [`ConfigSpace`] with write masks and a capability list, plus whatever its BARs map. MSI-X
//! ([`MsixTable`]) delivers each vector through an irqfd routed by an [`MsiRouter`], which the VMM
//! implements over its hypervisor; masked vectors pend in the PBA.
//!
//! The bus and ECAM windows are [`alioth_mem::BusDevice`]s, so they plug into `alioth-mem`'s
//! port and MMIO buses.
//!
//! ```
//! use std::sync::Arc;
//! use alioth_mem::BusDevice;
//! use alioth_pci::{ConfigSpace, PciBus, PciEcam, PciFunction};
//!
//! struct Dummy(ConfigSpace);
//! impl PciFunction for Dummy {
//!     fn name(&self) -> &str { "dummy" }
//!     fn config_read(&self, offset: u16, data: &mut [u8]) { self.0.read(offset, data) }
//!     fn config_write(&self, _offset: u16, _data: &[u8]) {}
//! }
//!
//! let bus = Arc::new(PciBus::default());
//! let mut cfg = ConfigSpace::default();
//! cfg.set_u16(0, 0x1234); // vendor
//! let slot = bus.add(Arc::new(Dummy(cfg))).unwrap();
//! let ecam = PciEcam::new(bus);
//! let mut vendor = [0u8; 2];
//! ecam.read(u64::from(slot) << 15, &mut vendor);
//! assert_eq!(u16::from_le_bytes(vendor), 0x1234);
//! ```

mod bus;
mod config;
mod msix;

pub use bus::{
    CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_SIZE, HostBridge, PciBus, PciConfigIo, PciEcam,
    PciFunction, SLOTS,
};
pub use config::{CAP_POINTER, CAP_START, CONFIG_SPACE_SIZE, ConfigSpace, STATUS, STATUS_CAP_LIST};
pub use msix::{
    MSIX_CAP_ID, MSIX_ENTRY_SIZE, MsiRouter, MsixEntry, MsixTable, add_msix_capability, read_le,
    write_le,
};

#[cfg(test)]
#[path = "lib_test.rs"]
mod tests;
