//! COM1 output by port I/O.

use crate::cpu;

/// The first serial port, written without waiting (Alioth's UART accepts every byte at once).
pub struct Com1;

impl core::fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // SAFETY: port I/O to COM1's transmit register.
            unsafe { cpu::outb(0x3f8, b) };
        }
        Ok(())
    }
}
