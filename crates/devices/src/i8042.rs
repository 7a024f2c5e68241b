//! The i8042 keyboard controller, just enough for its CPU-reset command.

use std::sync::Mutex;

use alioth_mem::BusDevice;
use vm_superio::Trigger;

use crate::{EventSink, VmEvent};

/// Base port (data at 0x60, command/status at 0x64).
pub const BASE_PORT: u16 = 0x60;
/// Ports covered: 0x60-0x64.
pub const LEN: u16 = 5;

struct ResetTrigger(EventSink);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(VmEvent::Reset);
        Ok(())
    }
}

/// The i8042 on ports 0x60-0x64, built on vm-superio's `I8042Device`.
pub struct I8042 {
    dev: Mutex<vm_superio::I8042Device<ResetTrigger>>,
}

impl I8042 {
    /// A controller whose reset command reports [`VmEvent::Reset`] to `sink`.
    pub fn new(sink: EventSink) -> Self {
        I8042 {
            dev: Mutex::new(vm_superio::I8042Device::new(ResetTrigger(sink))),
        }
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &str {
        "i8042"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        crate::put_byte(data, dev.read(offset as u8));
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        // vm-superio numbers the command port as offset 4 from 0x60.
        let _ = dev.write(offset as u8, v);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn reset_command_reports_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let dev = I8042::new(Arc::new(move |e| log.lock().unwrap().push(e)));
        dev.write(0, &[0xfe]); // to the data port: not a command
        dev.write(4, &[0xaa]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![VmEvent::Reset]);
    }
}
