//! The x86 guest-physical memory map.

use crate::{Error, Result};

/// End of conventional memory (640 KiB).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Start of the BIOS area, where Alioth places the ACPI tables (reserved in e820).
pub const BIOS_START: u64 = 0xe_0000;
/// End of the first megabyte.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI/MMIO hole.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Start of the window PCI BARs are allocated from (the bottom of the 32-bit hole).
pub const PCI_MMIO_START: u64 = MMIO32_START;
/// End of the PCI BAR window; the ECAM window follows.
pub const PCI_MMIO_END: u64 = ECAM_BASE;
/// PCI Express enhanced configuration access (ECAM) window, bus 0 only.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// Size of the ECAM window (one bus: 32 devices x 8 functions x 4 KiB).
pub const ECAM_SIZE: u64 = 1 << 20;
/// End of the 32-bit space; RAM that did not fit below the hole continues here.
pub const RAM_ABOVE_4G: u64 = 0x1_0000_0000;
/// IOAPIC register window.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The smallest RAM size accepted: the first megabyte plus room for a kernel.
pub const MIN_RAM: u64 = 4 << 20;

/// The type of an e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Kind,
}

/// The memory map of a VM with `size` bytes of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMap {
    size: u64,
}

impl MemoryMap {
    /// Lays out `size` bytes of RAM. The size must be at least [`MIN_RAM`], a multiple of 4 KiB,
    /// and its top must fit the 52-bit physical address space.
    pub fn new(size: u64) -> Result<Self> {
        let bad = |reason: &str| Error::BadSize {
            size,
            reason: reason.to_string(),
        };
        if size < MIN_RAM {
            return Err(bad(&format!("at least {} MiB is needed", MIN_RAM >> 20)));
        }
        if !size.is_multiple_of(4096) {
            return Err(bad("must be a multiple of 4 KiB"));
        }
        let map = MemoryMap { size };
        let top = map.ram_end();
        if top > 1 << 52 {
            return Err(bad("exceeds the x86-64 physical address space"));
        }
        Ok(map)
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest-physical ranges backed by RAM, as (start, size): one from 0 up to the 32-bit
    /// hole and, for larger guests, one above 4 GiB.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        let low = self.size.min(MMIO32_START);
        let mut v = vec![(0, low)];
        if self.size > low {
            v.push((RAM_ABOVE_4G, self.size - low));
        }
        v
    }

    /// The end of the highest RAM region.
    pub fn ram_end(&self) -> u64 {
        self.ram_regions()
            .last()
            .map(|(a, s)| a + s)
            .unwrap_or_default()
    }

    /// The e820 table the firmware (here: the loader) reports to the guest.
    pub fn e820(&self) -> Vec<E820Entry> {
        let low = self.size.min(MMIO32_START);
        let mut v = vec![
            E820Entry {
                addr: 0,
                size: LOW_RAM_END,
                kind: E820Kind::Ram,
            },
            // The VGA window and the BIOS area, where the ACPI tables live. PCs (and the PVH
            // entry of Linux) reserve this whole range.
            E820Entry {
                addr: LOW_RAM_END,
                size: HIGH_RAM_START - LOW_RAM_END,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: HIGH_RAM_START,
                size: low - HIGH_RAM_START,
                kind: E820Kind::Ram,
            },
        ];
        // Firmware reserves the ECAM window; Linux uses MMCONFIG only if it is.
        v.push(E820Entry {
            addr: ECAM_BASE,
            size: ECAM_SIZE,
            kind: E820Kind::Reserved,
        });
        if self.size > low {
            v.push(E820Entry {
                addr: RAM_ABOVE_4G,
                size: self.size - low,
                kind: E820Kind::Ram,
            });
        }
        v
    }

    /// Whether `[addr, addr + len)` lies in usable RAM of one e820 entry.
    pub fn is_usable_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.e820()
            .iter()
            .any(|e| e.kind == E820Kind::Ram && addr >= e.addr && end <= e.addr + e.size)
    }
}

#[cfg(test)]
#[path = "layout_test.rs"]
mod tests;
