//! A device's own edge-triggered epoll: the one event fd of a device that multiplexes many host
//! descriptors whose set changes while it runs (vsock connections, a console's socket client).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An edge-triggered epoll set. Registering asks for readability, writability and hangups;
/// the device keeps its own readiness flags and reads or writes until `WouldBlock`.
#[derive(Debug)]
pub struct EventSet(OwnedFd);

impl EventSet {
    /// A new, empty set.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(EventSet(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` (input, output, hangup; edge-triggered), reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: a valid epoll descriptor and event; a bad `fd` only makes the call fail.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (harmless if it was not watched).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: as in `add`; failure is ignored.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Calls `f(token, events)` for everything that happened since the last call, without
    /// waiting.
    pub fn drain(&self, mut f: impl FnMut(u64, u32)) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        loop {
            // SAFETY: `events` is a valid buffer of 32 entries.
            let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 32, 0) };
            if n <= 0 {
                return;
            }
            for ev in &events[..n as usize] {
                // (epoll_event is packed: copy the fields out.)
                let (token, bits) = (ev.u64, ev.events);
                f(token, bits);
            }
            if (n as usize) < events.len() {
                return;
            }
        }
    }
}

impl AsRawFd for EventSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Readable or hung up: worth a read.
pub const READABLE: u32 =
    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
/// Writable.
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
/// The peer hung up or the descriptor failed.
pub const HANGUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

#[cfg(test)]
#[path = "event_set_test.rs"]
mod tests;
