//! PCI: configuration space through the ECAM window of the ACPI MCFG when there is one, else
//! configuration mechanism #1 (ports 0xCF8/0xCFC); bus 0 and every bus behind a bridge, all
//! functions; BAR decoding. Registers are accessed at their own width (a VMM may accept only
//! 16-bit accesses to the command register or the MSI-X message control).

use core::fmt::Write;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::acpi::Ecam;
use crate::{cpu, mm};

/// A function's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0-31).
    pub dev: u8,
    /// Function (0-7).
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// ECAM base (0: use the ports) and its bus range.
static ECAM_BASE: AtomicU64 = AtomicU64::new(0);
static ECAM_START: AtomicU8 = AtomicU8::new(0);
static ECAM_END: AtomicU8 = AtomicU8::new(0);

/// Uses the ECAM window `ecam` for configuration accesses (if it can be mapped).
pub fn use_ecam(ecam: Ecam) -> bool {
    let first = ecam.base + (u64::from(ecam.start_bus) << 20);
    let len = (u64::from(ecam.end_bus.saturating_sub(ecam.start_bus)) + 1) << 20;
    if ecam.base == 0 || ecam.end_bus < ecam.start_bus || mm::map(first, len).is_err() {
        return false;
    }
    ECAM_START.store(ecam.start_bus, Ordering::Relaxed);
    ECAM_END.store(ecam.end_bus, Ordering::Relaxed);
    ECAM_BASE.store(ecam.base, Ordering::Relaxed);
    true
}

/// How configuration space is reached.
pub fn mechanism() -> &'static str {
    if ECAM_BASE.load(Ordering::Relaxed) != 0 {
        "ecam"
    } else {
        "cf8"
    }
}

fn ecam_addr(bdf: Bdf, reg: u16) -> Option<usize> {
    let base = ECAM_BASE.load(Ordering::Relaxed);
    if base == 0
        || bdf.bus < ECAM_START.load(Ordering::Relaxed)
        || bdf.bus > ECAM_END.load(Ordering::Relaxed)
    {
        return None;
    }
    let off = (u64::from(bdf.bus) << 20)
        | (u64::from(bdf.dev & 31) << 15)
        | (u64::from(bdf.func & 7) << 12)
        | u64::from(reg & 0xfff);
    Some((base + off) as usize)
}

fn cf8(bdf: Bdf, reg: u16) -> u32 {
    0x8000_0000
        | (u32::from(bdf.bus) << 16)
        | (u32::from(bdf.dev & 31) << 11)
        | (u32::from(bdf.func & 7) << 8)
        | u32::from(reg & 0xfc)
}

/// Reads a configuration dword (`reg` 4-aligned).
pub fn read32(bdf: Bdf, reg: u16) -> u32 {
    if let Some(a) = ecam_addr(bdf, reg & !3) {
        // SAFETY: inside the mapped ECAM window.
        return unsafe { core::ptr::read_volatile(a as *const u32) };
    }
    if reg >= 256 {
        return u32::MAX;
    }
    // SAFETY: configuration-space port I/O.
    unsafe {
        cpu::outl(0xcf8, cf8(bdf, reg));
        cpu::inl(0xcfc)
    }
}

/// Reads a configuration word (`reg` 2-aligned).
pub fn read16(bdf: Bdf, reg: u16) -> u16 {
    (read32(bdf, reg & !3) >> ((reg & 2) * 8)) as u16
}

/// Reads a configuration byte.
pub fn read8(bdf: Bdf, reg: u16) -> u8 {
    (read32(bdf, reg & !3) >> ((reg & 3) * 8)) as u8
}

/// Writes a configuration word (`reg` 2-aligned) with a 16-bit access.
pub fn write16(bdf: Bdf, reg: u16, v: u16) {
    if let Some(a) = ecam_addr(bdf, reg & !1) {
        // SAFETY: inside the mapped ECAM window.
        unsafe { core::ptr::write_volatile(a as *mut u16, v) };
        return;
    }
    // SAFETY: configuration-space port I/O; the data port's low bits select the word.
    unsafe {
        cpu::outl(0xcf8, cf8(bdf, reg));
        cpu::outw(0xcfc + (reg & 2), v);
    }
}

/// Calls `f` for every function present on bus 0 and behind its bridges (depth-first).
pub fn for_each(mut f: impl FnMut(Bdf)) {
    let mut buses = [0u8; 32];
    let mut pending = 1;
    let mut seen = [false; 256];
    seen[0] = true;
    while pending > 0 {
        pending -= 1;
        let bus = buses[pending];
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf { bus, dev, func };
                let id = read32(bdf, 0);
                if id & 0xffff == 0xffff || id == 0 {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                f(bdf);
                let header = read8(bdf, 0x0e);
                // A PCI-to-PCI bridge: scan its secondary bus too.
                if header & 0x7f == 1 {
                    let secondary = read8(bdf, 0x19);
                    if secondary != 0 && !seen[usize::from(secondary)] && pending < buses.len() {
                        seen[usize::from(secondary)] = true;
                        buses[pending] = secondary;
                        pending += 1;
                    }
                }
                if func == 0 && header & 0x80 == 0 {
                    break; // single-function device
                }
            }
        }
    }
}

/// A memory BAR's address and whether it is 64-bit; None for I/O or unassigned BARs.
pub fn bar(bdf: Bdf, index: u8) -> Option<(u64, bool)> {
    if index > 5 {
        return None;
    }
    let reg = 0x10 + 4 * u16::from(index);
    let lo = read32(bdf, reg);
    if lo & 1 != 0 {
        return None; // I/O space
    }
    let wide = (lo >> 1) & 3 == 2;
    let hi = if wide && index < 5 {
        read32(bdf, reg + 4)
    } else {
        0
    };
    let addr = u64::from(lo & !0xf) | (u64::from(hi) << 32);
    (addr != 0).then_some((addr, wide))
}

/// What a scan found.
pub struct Found {
    /// Functions present.
    pub devices: u32,
    /// Of those, virtio-pci modern devices.
    pub virtio: u32,
}

/// Whether `id` (vendor | device << 16) is a modern virtio-pci device.
pub fn is_virtio(id: u32) -> bool {
    id & 0xffff == 0x1af4 && (0x1040..0x107f).contains(&(id >> 16))
}

/// Lists every function on `out`.
pub fn scan(out: &mut impl Write) -> Found {
    let mut found = Found {
        devices: 0,
        virtio: 0,
    };
    for_each(|bdf| {
        let id = read32(bdf, 0);
        found.devices += 1;
        let virtio = is_virtio(id);
        if virtio {
            found.virtio += 1;
        }
        let class = read32(bdf, 8) >> 8;
        let _ = write!(
            out,
            "ALIOTH-KIT pci {bdf} {:04x}:{:04x} class {class:06x}{}",
            id & 0xffff,
            id >> 16,
            if virtio { " virtio" } else { "" }
        );
        if virtio {
            print_caps(out, bdf);
        }
        let _ = writeln!(out);
    });
    found
}

/// Where a virtio function's structures live: ` common@bar0 notify@bar2(64-bit) ... msix@bar1`.
fn print_caps(out: &mut impl Write, bdf: Bdf) {
    if read16(bdf, 0x06) & (1 << 4) == 0 {
        return;
    }
    let mut at = u16::from(read8(bdf, 0x34) & 0xfc);
    let mut guard = 0;
    while at >= 0x40 && guard < 48 {
        guard += 1;
        let (id, next) = (read8(bdf, at), u16::from(read8(bdf, at + 1) & 0xfc));
        let (name, index) = match id {
            0x09 => {
                let name = match read8(bdf, at + 3) {
                    1 => "common",
                    2 => "notify",
                    3 => "isr",
                    4 => "device",
                    5 => "pci-cfg",
                    8 => "shm",
                    _ => "other",
                };
                (name, read8(bdf, at + 4))
            }
            0x11 => ("msix", (read32(bdf, at + 4) & 7) as u8),
            _ => ("", 0),
        };
        if !name.is_empty() {
            let width = match bar(bdf, index) {
                Some((_, true)) => "(64-bit)",
                Some((_, false)) => "",
                None => "(unassigned)",
            };
            let _ = write!(out, " {name}@bar{index}{width}");
        }
        at = next;
    }
}
