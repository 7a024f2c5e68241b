//! `alioth-devices`: the emulated devices of an Alioth VM.
//!
//! virtio-net ([`virtio::net`]) runs on a host [`tap::Tap`]; virtio-vsock ([`virtio::vsock`])
//! and virtio-console ([`virtio::console`]) on host sockets, terminals and files.
//!
//! Legacy PC devices sit on the port-I/O [`alioth_mem::Bus`]: a 16550 [`serial::Serial`] (COM1,
//! output to stdout or a file, input from stdin), the [`i8042::I8042`] controller (its reset line
//! stops the VM), [`cmos::Cmos`] (RTC and memory size), the ACPI [`acpi_pm::AcpiPm`] device
//! (soft-off and reset registers and the PM timer the FADT points at) and the test [`exit::ExitDevice`] whose
//! written value becomes the exit status of `alioth`.
//!
//! Devices report machine-level requests (power off, reset, exit) through an [`EventSink`].
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use alioth_devices::{VmEvent, exit::{ExitDevice, SIGNATURE}};
//! use alioth_mem::BusDevice;
//!
//! let events = Arc::new(Mutex::new(Vec::new()));
//! let log = events.clone();
//! let dev = ExitDevice::new(Arc::new(move |e| log.lock().unwrap().push(e)));
//! let mut sig = [0];
//! dev.read(0, &mut sig);
//! assert_eq!(sig[0], SIGNATURE); // a guest can tell the device is there
//! dev.write(0, &[3]);
//! assert_eq!(*events.lock().unwrap(), vec![VmEvent::Exit(3)]);
//! ```

pub mod acpi_pm;
pub mod cmos;
pub mod exit;
pub mod i8042;
pub mod ioapic;
pub mod serial;
pub mod tap;
pub mod virtio;

use std::sync::Arc;

pub use alioth_virtio::LogLimiter;

/// A machine-level request from a device or the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 reset line, ACPI reset register).
    Reset,
    /// The guest wrote this status to the exit device.
    Exit(u8),
    /// The user typed the console escape sequence to quit.
    UserQuit,
}

/// Listens on the Unix socket `path` (non-blocking), replacing a socket file left by a
/// process that is gone; a socket another process serves is refused (`AddrInUse`).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::net::{UnixListener, UnixStream};
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Where devices send [`VmEvent`]s.
pub type EventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// Answers a read of a byte-wide register: `v` in the first byte, zeros in the rest.
pub(crate) fn put_byte(data: &mut [u8], v: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = v;
    }
}

/// Assembles a little-endian value from an access of 1-8 bytes.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}
