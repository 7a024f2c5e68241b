//! The test exit device: a guest write ends the VM with the written value as exit status.

use alioth_mem::BusDevice;

use crate::{EventSink, VmEvent, le_value};

/// Default port of the exit device (the one QEMU's `isa-debug-exit` uses).
pub const DEFAULT_PORT: u16 = 0xf4;

/// Ends the VM when written: the low byte of the value becomes `alioth`'s exit status.
pub struct ExitDevice {
    sink: EventSink,
}

impl ExitDevice {
    /// A device that reports to `sink`.
    pub fn new(sink: EventSink) -> Self {
        ExitDevice { sink }
    }
}

impl BusDevice for ExitDevice {
    fn name(&self) -> &str {
        "exit"
    }

    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        (self.sink)(VmEvent::Exit(le_value(data) as u8));
    }
}
