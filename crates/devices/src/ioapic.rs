//! The I/O APIC, in userspace (KVM's split irqchip: the local APICs stay in the kernel).
//!
//! The guest programs one redirection table entry (RTE) per pin through the IOREGSEL/IOWIN
//! window at the MMIO base the MADT names. Each unmasked entry becomes the MSI message it
//! describes — destination, vector, delivery mode — and the VMM routes the pin's GSI to that
//! message, so a device's irqfd on GSI `pin` interrupts the guest without a userspace exit;
//! a masked entry removes the route. Pins are edge-triggered, which is what the ISA devices
//! behind it (COM1) are; an entry programmed level-triggered is delivered as edges (with a
//! warning), since no device here drives a level line.

use std::sync::{Arc, Mutex};

use alioth_mem::BusDevice;

/// Pins (GSIs 0-23).
pub const PINS: usize = 24;
/// Bytes of MMIO the device decodes (IOREGSEL at 0x00, IOWIN at 0x10).
pub const MMIO_LEN: u64 = 0x20;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VER: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_RTE0: u32 = 0x10;
/// Version 0x11 (the 82093AA), with the highest redirection entry in bits 16-23.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
/// Bits the guest may write (the delivery status and remote IRR bits are read-only).
const RTE_WRITABLE: u64 = !((1 << 12) | (1 << 14));

/// Routes pin `pin` to an MSI (address, data), or nowhere (`None`: masked).
pub type PinRouter = Arc<dyn Fn(u32, Option<(u64, u32)>) -> std::io::Result<()> + Send + Sync>;

struct State {
    select: u32,
    id: u32,
    rte: [u64; PINS],
    warned_level: bool,
}

/// The I/O APIC.
pub struct IoApic {
    state: Mutex<State>,
    route: PinRouter,
}

/// The MSI message an unmasked redirection entry describes (Intel SDM vol. 3, "MSI message
/// address/data register format"; 82093AA datasheet, redirection table).
pub fn rte_to_msi(rte: u64) -> (u64, u32) {
    let vector = (rte & 0xff) as u32;
    let delivery_mode = ((rte >> 8) & 0x7) as u32;
    let logical = (rte >> 11) & 1;
    let dest = (rte >> 56) & 0xff;
    let addr = 0xfee0_0000 | (dest << 12) | (logical << 2);
    (addr, vector | (delivery_mode << 8))
}

impl IoApic {
    /// An I/O APIC with every pin masked, delivering through `route`.
    pub fn new(route: PinRouter) -> Self {
        IoApic {
            state: Mutex::new(State {
                select: 0,
                id: 0,
                rte: [RTE_MASKED; PINS],
                warned_level: false,
            }),
            route,
        }
    }

    /// The registers for a snapshot: (register select, ID, redirection entries).
    pub fn save(&self) -> (u32, u32, Vec<u64>) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.select, s.id, s.rte.to_vec())
    }

    /// Puts back registers from [`IoApic::save`] and routes every unmasked pin again. Fails
    /// (changing nothing) if the entry count is not [`PINS`].
    pub fn restore(&self, select: u32, id: u32, rte: &[u64]) -> std::io::Result<()> {
        let Ok(rte): Result<[u64; PINS], _> = rte.try_into() else {
            return Err(std::io::Error::other(format!(
                "ioapic: {} redirection entries saved, {PINS} expected",
                rte.len()
            )));
        };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.select = select;
        s.id = id & 0x0f00_0000;
        s.rte = rte;
        for (pin, &e) in rte.iter().enumerate() {
            let msi = (e & RTE_MASKED == 0).then(|| rte_to_msi(e));
            (self.route)(pin as u32, msi)?;
        }
        Ok(())
    }

    /// The redirection entry of `pin`.
    pub fn rte(&self, pin: usize) -> Option<u64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.rte.get(pin).copied()
    }

    fn read_reg(s: &State, reg: u32) -> u32 {
        match reg {
            REG_ID => s.id,
            REG_VER => VERSION,
            REG_ARB => s.id,
            r if (REG_RTE0..REG_RTE0 + 2 * PINS as u32).contains(&r) => {
                let rte = s.rte[((r - REG_RTE0) / 2) as usize];
                if r % 2 == 0 {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&self, s: &mut State, reg: u32, v: u32) {
        match reg {
            REG_ID => s.id = v & 0x0f00_0000,
            r if (REG_RTE0..REG_RTE0 + 2 * PINS as u32).contains(&r) => {
                let pin = ((r - REG_RTE0) / 2) as usize;
                let old = s.rte[pin];
                let new = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let new = (new & RTE_WRITABLE) | (old & !RTE_WRITABLE);
                s.rte[pin] = new;
                if new == old {
                    return;
                }
                if new & (RTE_LEVEL | RTE_MASKED) == RTE_LEVEL && !s.warned_level {
                    s.warned_level = true;
                    log::warn!(
                        "ioapic: pin {pin} programmed level-triggered; delivered as edges (no level device here)"
                    );
                }
                let msi = (new & RTE_MASKED == 0).then(|| rte_to_msi(new));
                if let Err(e) = (self.route)(pin as u32, msi) {
                    log::error!("ioapic: routing pin {pin}: {e}");
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for IoApic {
    fn name(&self) -> &str {
        "ioapic"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let v = match offset {
            IOREGSEL => s.select,
            IOWIN => Self::read_reg(&s, s.select),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // The registers are 32 bits wide; narrower writes are taken as the low bytes.
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u32::from_le_bytes(b);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            IOREGSEL => s.select = v & 0xff,
            IOWIN => {
                let reg = s.select;
                self.write_reg(&mut s, reg, v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "ioapic_test.rs"]
mod tests;
