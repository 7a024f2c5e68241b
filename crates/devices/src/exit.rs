//! The test exit device: a guest write ends the VM with the written value as exit status; a
//! read answers [`SIGNATURE`], so a guest can tell the device is there before using it.

use alioth_mem::BusDevice;

use crate::{EventSink, VmEvent, le_value};

/// Default port of the exit device (the one QEMU's `isa-debug-exit` uses).
pub const DEFAULT_PORT: u16 = 0xf4;

/// What a read of the exit device returns (a port with no device reads as 0xff or 0 elsewhere).
pub const SIGNATURE: u8 = 0xa1;

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
        data.fill(SIGNATURE);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        (self.sink)(VmEvent::Exit(le_value(data) as u8));
    }
}
