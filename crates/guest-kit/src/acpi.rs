//! The few ACPI facts the kit needs: where the ECAM window is (MCFG), the PM timer, and how to
//! power off (FADT sleep control register or PM1a control with the DSDT's `\_S5`).
//!
//! Tables are found through the RSDP the loader names (PVH `start_info.rsdp_paddr`, the Linux
//! zero page's `acpi_rsdp_addr`) or, failing that, the BIOS areas (EBDA, 0xE0000-0xFFFFF).
//! Every table is checked (signature, length, checksum) before it is used.

use crate::PVH_MAGIC;

/// An ACPI Generic Address Structure: I/O port or memory register.
#[derive(Debug, Clone, Copy)]
pub enum Reg {
    /// System I/O space.
    Port(u16),
    /// System memory (below 4 GiB or mapped by `mm`).
    Mem(u64),
}

/// A PCI Express ECAM window from the MCFG.
#[derive(Debug, Clone, Copy)]
pub struct Ecam {
    /// Physical base, as the MCFG gives it: where bus 0 would be (bus `b` is at `base + (b << 20)`).
    pub base: u64,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// What the kit found in the tables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Acpi {
    /// The RSDP's address, if any.
    pub rsdp: Option<u64>,
    /// Segment 0's ECAM window.
    pub ecam: Option<Ecam>,
    /// The PM timer and whether it is 32 bits wide (else 24).
    pub pm_timer: Option<(Reg, bool)>,
    /// The hardware-reduced sleep control register.
    pub sleep_control: Option<Reg>,
    /// PM1a control block.
    pub pm1a_control: Option<Reg>,
    /// `\_S5`'s SLP_TYPa from the DSDT.
    pub s5_slp_typ: Option<u8>,
}

fn r8(a: u64) -> u8 {
    // SAFETY: callers pass addresses of ACPI tables in RAM below 4 GiB (identity-mapped), after
    // checking they lie inside a table whose length was read first.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

fn r16(a: u64) -> u16 {
    u16::from(r8(a)) | (u16::from(r8(a + 1)) << 8)
}

fn r32(a: u64) -> u32 {
    u32::from(r16(a)) | (u32::from(r16(a + 2)) << 16)
}

fn r64(a: u64) -> u64 {
    u64::from(r32(a)) | (u64::from(r32(a + 4)) << 32)
}

/// Tables must lie in the identity-mapped, cached first GiB (where RAM and firmware are).
fn readable(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|e| e <= 1 << 30)
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(r8(addr + i))) == 0
}

/// A checked table at `addr`: (address, length) if its signature is `sig` (or any when None).
fn table(addr: u64, sig: Option<&[u8; 4]>) -> Option<(u64, u64)> {
    if !readable(addr, 36) {
        return None;
    }
    if let Some(sig) = sig
        && (0..4).any(|i| r8(addr + i as u64) != sig[i])
    {
        return None;
    }
    let len = u64::from(r32(addr + 4));
    if !(36..=1 << 20).contains(&len) || !readable(addr, len) || !checksum_ok(addr, len) {
        return None;
    }
    Some((addr, len))
}

fn rsdp_at(addr: u64) -> bool {
    readable(addr, 20)
        && (0..8).all(|i| r8(addr + i) == b"RSD PTR "[i as usize])
        && checksum_ok(addr, 20)
}

fn scan_rsdp(from: u64, to: u64) -> Option<u64> {
    (from..to).step_by(16).find(|a| rsdp_at(*a))
}

/// The RSDP: from the boot structure at `boot_info`, or the BIOS areas.
fn find_rsdp(boot_info: u64) -> Option<u64> {
    let named = if r32(boot_info) == PVH_MAGIC {
        // hvm_start_info.rsdp_paddr.
        r64(boot_info + 32)
    } else {
        // boot_params.acpi_rsdp_addr.
        r64(boot_info + 0x70)
    };
    if rsdp_at(named) {
        return Some(named);
    }
    let ebda = u64::from(r16(0x40e)) << 4;
    if (0x8_0000..0xa_0000).contains(&ebda)
        && let Some(a) = scan_rsdp(ebda, ebda + 1024)
    {
        return Some(a);
    }
    scan_rsdp(0xe_0000, 0x10_0000)
}

/// A GAS at `a`: system memory or I/O, else none.
fn gas(a: u64) -> Option<Reg> {
    let addr = r64(a + 4);
    if addr == 0 {
        return None;
    }
    match r8(a) {
        0 => Some(Reg::Mem(addr)),
        1 => u16::try_from(addr).ok().map(Reg::Port),
        _ => None,
    }
}

/// `\_S5`'s first package element in the AML of the DSDT at (`addr`, `len`).
fn s5(addr: u64, len: u64) -> Option<u8> {
    let body = addr + 36;
    let end = addr + len;
    let mut at = body;
    while at + 8 < end {
        if r8(at) == b'_' && r8(at + 1) == b'S' && r8(at + 2) == b'5' && r8(at + 3) == b'_' {
            let mut p = at + 4;
            if r8(p) != 0x12 {
                at += 1;
                continue; // not a Name(_S5_, Package ...)
            }
            p += 1;
            // PkgLength: the top two bits of the lead byte count the extra bytes.
            p += 1 + u64::from(r8(p) >> 6);
            p += 1; // NumElements
            if p >= end {
                return None;
            }
            return match r8(p) {
                0x0a => Some(r8(p + 1)), // BytePrefix
                0x00 => Some(0),         // ZeroOp
                0x01 => Some(1),         // OneOp
                v => Some(v),
            };
        }
        at += 1;
    }
    None
}

/// Reads what the kit needs from the ACPI tables, if there are any.
pub fn discover(boot_info: u64) -> Acpi {
    let mut acpi = Acpi::default();
    let Some(rsdp) = find_rsdp(boot_info) else {
        return acpi;
    };
    acpi.rsdp = Some(rsdp);
    // XSDT (revision 2+, 64-bit entries) or RSDT (32-bit entries).
    let (root, entry) = match table(r64(rsdp + 24), Some(b"XSDT")) {
        Some(t) if r8(rsdp + 15) >= 2 => (t, 8),
        _ => match table(u64::from(r32(rsdp + 16)), Some(b"RSDT")) {
            Some(t) => (t, 4),
            None => return acpi,
        },
    };
    let n = (root.1 - 36) / entry;
    for i in 0..n {
        let at = root.0 + 36 + i * entry;
        let addr = if entry == 8 {
            r64(at)
        } else {
            u64::from(r32(at))
        };
        if let Some(t) = table(addr, Some(b"MCFG")) {
            if t.1 >= 44 + 16 && acpi.ecam.is_none() {
                let e = t.0 + 44;
                if r16(e + 8) == 0 {
                    acpi.ecam = Some(Ecam {
                        base: r64(e),
                        start_bus: r8(e + 10),
                        end_bus: r8(e + 11),
                    });
                }
            }
        } else if let Some(t) = table(addr, Some(b"FACP")) {
            fadt(&mut acpi, t);
        }
    }
    acpi
}

fn fadt(acpi: &mut Acpi, (f, len): (u64, u64)) {
    let has = |off: u64, size: u64| off + size <= len;
    let flags = if has(112, 4) { r32(f + 112) } else { 0 };
    let ext_timer = flags & (1 << 8) != 0;
    // X_PM_TMR_BLK, else PM_TMR_BLK.
    acpi.pm_timer = has(208, 12)
        .then(|| gas(f + 208))
        .flatten()
        .or_else(|| {
            let port = r32(f + 76);
            (has(76, 4) && port != 0)
                .then(|| u16::try_from(port).ok().map(Reg::Port))
                .flatten()
        })
        .map(|r| (r, ext_timer));
    acpi.sleep_control = if has(244, 12) { gas(f + 244) } else { None };
    acpi.pm1a_control = has(172, 12).then(|| gas(f + 172)).flatten().or_else(|| {
        let port = r32(f + 64);
        (has(64, 4) && port != 0)
            .then(|| u16::try_from(port).ok().map(Reg::Port))
            .flatten()
    });
    // X_DSDT, else DSDT.
    let dsdt = match has(140, 8).then(|| r64(f + 140)) {
        Some(a) if a != 0 => a,
        _ => u64::from(r32(f + 40)),
    };
    if let Some(t) = table(dsdt, Some(b"DSDT")) {
        acpi.s5_slp_typ = s5(t.0, t.1);
    }
}
