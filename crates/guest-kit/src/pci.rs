//! PCI enumeration through configuration mechanism #1 (ports 0xCF8/0xCFC).

use core::fmt::Write;

use crate::cpu;

/// What a scan found.
pub struct Found {
    /// Functions present on bus 0.
    pub devices: u32,
    /// Of those, virtio-pci modern devices.
    pub virtio: u32,
}

/// Reads a configuration dword of 00:`slot`.0.
pub fn read32(slot: u8, reg: u8) -> u32 {
    let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | u32::from(reg & 0xfc);
    // SAFETY: configuration-space port I/O (IOPL=3).
    unsafe {
        cpu::outl(0xcf8, addr);
        cpu::inl(0xcfc)
    }
}

/// Writes a configuration dword of 00:`slot`.0.
pub fn write32(slot: u8, reg: u8, v: u32) {
    let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | u32::from(reg & 0xfc);
    // SAFETY: configuration-space port I/O.
    unsafe {
        cpu::outl(0xcf8, addr);
        cpu::outl(0xcfc, v);
    }
}

/// Lists bus 0 on `out`.
pub fn scan(out: &mut impl Write) -> Found {
    let mut found = Found {
        devices: 0,
        virtio: 0,
    };
    for slot in 0..32u8 {
        let id = read32(slot, 0);
        if id == 0xffff_ffff {
            continue;
        }
        found.devices += 1;
        let vendor = id & 0xffff;
        let device = id >> 16;
        let virtio = vendor == 0x1af4 && (0x1040..0x107f).contains(&device);
        if virtio {
            found.virtio += 1;
        }
        let class = read32(slot, 8) >> 8;
        let _ = writeln!(
            out,
            "ALIOTH-KIT pci 00:{slot:02x}.0 {vendor:04x}:{device:04x} class {class:06x}{}",
            if virtio { " virtio" } else { "" }
        );
    }
    found
}
