//! The ACPI power-management registers of a hardware-reduced platform: sleep control/status,
//! the reset register and the 32-bit PM timer, at the I/O ports the FADT names.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use alioth_mem::BusDevice;

use crate::{EventSink, VmEvent};

/// Base port: sleep control at +0, sleep status at +1, reset at +2, PM timer at +4..+8.
pub const BASE_PORT: u16 = 0x3c0;
/// Offset of the PM timer from [`BASE_PORT`].
pub const TIMER_OFFSET: u16 = 4;
/// Number of ports.
pub const LEN: u16 = 8;
/// The PM timer's frequency (ACPI 6.5 §4.8.3.3).
pub const TIMER_HZ: u64 = 3_579_545;
/// The value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 1;
/// The SLP_TYP the DSDT's `_S5` object names.
pub const S5_SLP_TYP: u8 = 5;

const SLP_EN: u8 = 1 << 5;

/// The ACPI PM device.
pub struct AcpiPm {
    sink: EventSink,
    status: AtomicU8,
    start: Instant,
}

impl AcpiPm {
    /// A device that reports power-off and reset to `sink`.
    pub fn new(sink: EventSink) -> Self {
        AcpiPm {
            sink,
            status: AtomicU8::new(0),
            start: Instant::now(),
        }
    }
}

impl BusDevice for AcpiPm {
    fn name(&self) -> &str {
        "acpi-pm"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let timer = u64::from(TIMER_OFFSET);
        if (timer..timer + 4).contains(&offset) {
            // The free-running 32-bit counter (TMR_VAL_EXT), read whole or in parts.
            let ticks = self.start.elapsed().as_nanos() * u128::from(TIMER_HZ) / 1_000_000_000;
            let bytes = (ticks as u32).to_le_bytes();
            let from = (offset - timer) as usize;
            for (i, d) in data.iter_mut().enumerate() {
                *d = bytes.get(from + i).copied().unwrap_or(0);
            }
            return;
        }
        let v = match offset {
            1 => self.status.load(Ordering::Relaxed),
            _ => 0,
        };
        crate::put_byte(data, v);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 => {
                let typ = (v >> 2) & 0x7;
                if typ == S5_SLP_TYP {
                    (self.sink)(VmEvent::PowerOff);
                } else {
                    log::warn!("acpi-pm: sleep type {typ} is not supported; ignoring");
                }
            }
            1 => {
                // Write-one-to-clear.
                self.status.fetch_and(!v, Ordering::Relaxed);
            }
            2 if v == RESET_VALUE => (self.sink)(VmEvent::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "acpi_pm_test.rs"]
mod tests;
