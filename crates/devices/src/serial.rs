//! A 16550A UART (vm-superio) with its interrupt on an irqfd and an input pump.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use alioth_mem::BusDevice;
use vm_superio::Trigger;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::{EventSink, VmEvent};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// Ports per UART.
pub const LEN: u16 = 8;

/// The console escape character (Ctrl-A); Ctrl-A then `x` quits, Ctrl-A twice sends one Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the input pump when the guest has drained the receive FIFO, and reports lost output
/// (once as a warning: the guest can make every byte fail, e.g. on a full disk).
struct InputSpace {
    space: Arc<EventFd>,
    name: String,
    lost: std::sync::atomic::AtomicU64,
}

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        let n = self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            log::warn!(
                "{}: guest output cannot be written to the console's destination; further losses are logged at debug level",
                self.name
            );
        } else {
            log::debug!("{}: output byte lost ({} so far)", self.name, n + 1);
        }
    }
    fn in_buffer_empty(&self) {
        let _ = self.space.write(1);
    }
}

/// The 16550A's receive FIFO (vm-superio's, which it does not export).
const UART_FIFO: usize = 64;

type Uart = vm_superio::Serial<IrqTrigger, InputSpace, Box<dyn Write + Send>>;

/// A 16550A UART.
pub struct Serial {
    name: String,
    uart: Mutex<Uart>,
    space: Arc<EventFd>,
}

impl Serial {
    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> vm_superio::serial::SerialState {
        self.uart.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Puts back registers from [`Serial::save`], keeping this UART's interrupt and output.
    pub fn restore(&self, state: &vm_superio::serial::SerialState) -> std::io::Result<()> {
        // What `from_state` refuses, refused before the output is handed over to it.
        if state.in_buffer.len() > UART_FIFO {
            return Err(std::io::Error::other(format!(
                "{}: {} bytes in a saved FIFO of {}",
                self.name,
                state.in_buffer.len(),
                UART_FIFO
            )));
        }
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let trigger = IrqTrigger(uart.interrupt_evt().0.try_clone()?);
        let events = InputSpace {
            space: self.space.clone(),
            name: self.name.clone(),
            lost: std::sync::atomic::AtomicU64::new(0),
        };
        let out = std::mem::replace(uart.writer_mut(), Box::new(std::io::sink()));
        match vm_superio::Serial::from_state(state, trigger, events, out) {
            Ok(u) => {
                *uart = u;
                Ok(())
            }
            Err(e) => Err(std::io::Error::other(format!(
                "{}: restoring the UART: {e:?}",
                self.name
            ))),
        }
    }

    /// A UART named `name` (for logs) that raises `irq` and writes what the guest sends to `out`.
    pub fn new(name: &str, irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let space = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Serial {
            name: name.to_string(),
            uart: Mutex::new(vm_superio::Serial::with_events(
                IrqTrigger(irq),
                InputSpace {
                    space: space.clone(),
                    name: name.to_string(),
                    lost: std::sync::atomic::AtomicU64::new(0),
                },
                out,
            )),
            space,
        })
    }

    /// Queues as many of `bytes` as the receive FIFO takes; returns how many.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        if uart.fifo_capacity() == 0 {
            return 0;
        }
        match uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{}: cannot queue input: {e:?}", self.name);
                0
            }
        }
    }

    /// Starts a thread that feeds `input` to the guest until `stop` is signalled or the input
    /// ends. With `escape`, Ctrl-A `x` reports [`VmEvent::UserQuit`] to `sink` instead.
    pub fn spawn_input<R>(
        self: &Arc<Self>,
        input: R,
        escape: bool,
        sink: EventSink,
        stop: Arc<EventFd>,
    ) -> std::io::Result<JoinHandle<()>>
    where
        R: Read + AsFd + Send + 'static,
    {
        let serial = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-input", self.name))
            .spawn(move || serial.run_input(input, escape, sink, &stop))
    }

    /// Feeds `input` to the guest on the calling thread until `stop` is signalled or the input
    /// ends; see [`Serial::spawn_input`].
    pub fn run_input<R: Read + AsFd>(
        &self,
        mut input: R,
        escape: bool,
        sink: EventSink,
        stop: &EventFd,
    ) {
        let mut pending: Vec<u8> = Vec::new();
        let mut saw_escape = false;
        let mut buf = [0u8; 64];
        loop {
            while !pending.is_empty() {
                let n = self.enqueue(&pending);
                pending.drain(..n);
                if pending.is_empty() {
                    break;
                }
                // Wait for the guest to drain the FIFO (or for the VM to stop).
                match wait_readable(&[self.space.as_raw_fd(), stop.as_raw_fd()]) {
                    Some(0) => {
                        let _ = self.space.read();
                    }
                    _ => return,
                }
            }
            match wait_readable(&[input.as_fd().as_raw_fd(), stop.as_raw_fd()]) {
                Some(0) => {}
                _ => return,
            }
            let n = match input.read(&mut buf) {
                Ok(0) => return, // end of input: the guest simply gets no more
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("{}: input read failed: {e}", self.name);
                    return;
                }
            };
            for &b in &buf[..n] {
                if !escape {
                    pending.push(b);
                } else if saw_escape {
                    saw_escape = false;
                    match b {
                        b'x' | b'X' => {
                            // Hand over what was typed before the escape, then quit.
                            self.enqueue(&pending);
                            sink(VmEvent::UserQuit);
                            return;
                        }
                        ESCAPE => pending.push(ESCAPE),
                        other => pending.extend_from_slice(&[ESCAPE, other]),
                    }
                } else if b == ESCAPE {
                    saw_escape = true;
                } else {
                    pending.push(b);
                }
            }
        }
    }
}

/// Polls `fds` for input; returns the index of the first readable one, None on error or hangup
/// of every descriptor.
fn wait_readable(fds: &[i32]) -> Option<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        return pfds
            .iter()
            .position(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0);
    }
}

impl BusDevice for Serial {
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        crate::put_byte(data, uart.read(offset as u8));
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = uart.write(offset as u8, v) {
            log::debug!("{}: write to register {offset}: {e:?}", self.name);
        }
    }
}

#[cfg(test)]
#[path = "serial_test.rs"]
mod tests;
