//! The epoll backend: ioeventfds in an epoll set, I/O performed synchronously on the worker
//! thread. The fallback where io_uring is unavailable (e.g. blocked by a seccomp profile).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use alioth_queue::VirtQueue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ChainHandler, IoOp};
use crate::irq::IrqSender;
use crate::poll::PollWindow;
use crate::worker::{ActiveBackend, ActiveQueue, Backend, device_io, process_queue};
use crate::{Error, Result};

const NOTIFIER: u64 = u64::MAX;
/// The timer that ends throttles.
const TIMER: u64 = u64::MAX - 1;
/// Tokens from here on are the device's event fds: `EVENT + queue slot`.
const EVENT: u64 = 1 << 32;

/// The epoll backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct EpollBackend {
    poll_us: u32,
}

impl EpollBackend {
    /// A backend that polls its rings for up to `poll_us` microseconds (self-tuning, see
    /// [`PollWindow`]) before it sleeps; 0 never polls.
    pub fn polling(poll_us: u32) -> Self {
        EpollBackend { poll_us }
    }
}

/// How a queue came to be served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Its notification eventfd fired.
    Kicked,
    /// Polling saw chains.
    Polled,
    /// One of the device's event fds is readable.
    Event,
}

/// A running epoll loop.
pub struct ActiveEpoll {
    epfd: OwnedFd,
    queues: Vec<ActiveQueue>,
    irq: Arc<dyn IrqSender>,
    mem: GuestMemoryMmap,
    fresh: bool,
    poller: Option<PollWindow>,
    /// Armed for the earliest throttle's end ([`crate::BufferAction::Throttle`]).
    timer: crate::worker::ThrottleTimer,
}

fn epoll_add(epfd: &OwnedFd, fd: i32, token: u64, edge: bool) -> Result<()> {
    let mut events = libc::EPOLLIN as u32;
    if edge {
        events |= libc::EPOLLET as u32;
    }
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid epoll and target descriptors; `ev` is a valid event.
    if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(Error::Io {
            what: "epoll_ctl".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl<D: ChainHandler> Backend<D> for EpollBackend {
    type Active = ActiveEpoll;

    fn activate(
        &mut self,
        dev: &mut D,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn IrqSender>,
        mem: GuestMemoryMmap,
        notifier: Arc<EventFd>,
    ) -> Result<ActiveEpoll> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io {
                what: "epoll_create1".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor we own.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        epoll_add(&epfd, notifier.as_raw_fd(), NOTIFIER, false)?;
        for (i, q) in queues.iter().enumerate() {
            epoll_add(&epfd, q.ioeventfd.as_raw_fd(), i as u64, false)?;
        }
        // Edge-triggered: the device reads until the descriptor would block or it has no
        // buffers left; in the latter case the driver's next notification resumes it.
        for (fd, queue) in dev.event_fds() {
            if let Some(slot) = queues.iter().position(|q| q.index == queue) {
                epoll_add(&epfd, fd, EVENT + slot as u64, true)?;
            }
        }
        let timer = crate::worker::ThrottleTimer::new()?;
        epoll_add(&epfd, timer.as_raw_fd(), TIMER, false)?;
        Ok(ActiveEpoll {
            epfd,
            queues,
            irq,
            mem,
            fresh: true,
            poller: PollWindow::new(self.poll_us),
            timer,
        })
    }
}

impl ActiveEpoll {
    /// Serves queue `slot` after its notification, a poll that saw chains, or one of its event
    /// fds.
    fn serve<D: ChainHandler>(&mut self, dev: &mut D, slot: usize, why: Why) -> Result<()> {
        let polling = self.poller.is_some();
        let Some(aq) = self.queues.get_mut(slot) else {
            return Ok(());
        };
        let done = match why {
            Why::Kicked => {
                let _ = aq.ioeventfd.read();
                process_queue(dev, aq, &self.mem, polling, &mut execute_sync)?
            }
            Why::Polled => process_queue(dev, aq, &self.mem, polling, &mut execute_sync)?,
            Why::Event => device_io(dev, aq, &self.mem, &mut execute_sync)?,
        };
        if done {
            let wants = aq
                .queue
                .needs_interrupt(&self.mem)
                .map_err(|source| Error::Queue {
                    dev: dev.name().to_string(),
                    queue: aq.index,
                    source,
                })?;
            if wants {
                self.irq.queue_irq(aq.index);
            }
        }
        Ok(())
    }
}

impl ActiveEpoll {
    /// One polling round, if polling is on: returns whether a queue has chains (its
    /// notifications are then still suppressed; serving it re-enables them).
    fn poll<D: ChainHandler>(&mut self, dev: &D) -> Result<bool> {
        let Some(mut poller) = self.poller.take() else {
            return Ok(false);
        };
        let qerr = |q: u16| {
            move |source| Error::Queue {
                dev: dev.name().to_string(),
                queue: q,
                source,
            }
        };
        for aq in &mut self.queues {
            aq.queue
                .disable_notification(&self.mem)
                .map_err(qerr(aq.index))?;
        }
        let (queues, mem) = (&self.queues, &self.mem);
        // A ring that cannot be read counts as work: serving it reports the error. A
        // throttled queue waits for its timer, not for its ring.
        let mut found = poller.poll(|| {
            queues
                .iter()
                .any(|q| q.throttled.is_none() && q.queue.has_available(mem).unwrap_or(true))
        });
        if !found {
            for aq in &mut self.queues {
                found |= aq
                    .queue
                    .enable_notification(&self.mem)
                    .map_err(qerr(aq.index))?;
            }
        }
        self.poller = Some(poller);
        Ok(found)
    }
}

impl<D: ChainHandler> ActiveBackend<D> for ActiveEpoll {
    fn run(&mut self, dev: &mut D) -> Result<()> {
        if self.fresh {
            // Chains the driver queued before DRIVER_OK, without a notification.
            self.fresh = false;
            for slot in 0..self.queues.len() {
                self.serve(dev, slot, Why::Kicked)?;
            }
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            // A queue throttled since the last sleep gets its wake-up first.
            self.timer.arm(&self.queues)?;
            // Poll the rings (notifications suppressed) before sleeping; with work found, only
            // collect what epoll has without waiting, then serve every queue.
            let polled = self.poll(dev)?;
            let timeout = if polled { 0 } else { -1 };
            // SAFETY: `events` is a valid buffer of 16 entries.
            let n = unsafe {
                libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), 16, timeout)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io {
                    what: "epoll_wait".into(),
                    source: e,
                });
            }
            let mut notified = false;
            for ev in &events[..n as usize] {
                // (epoll_event is packed: copy the token out.)
                let token = ev.u64;
                match token {
                    NOTIFIER => notified = true,
                    TIMER => {
                        self.timer.fired();
                        for slot in 0..self.queues.len() {
                            if self.queues[slot].throttled.is_some() {
                                self.serve(dev, slot, Why::Polled)?;
                            }
                        }
                    }
                    t if t >= EVENT => self.serve(dev, (t - EVENT) as usize, Why::Event)?,
                    slot => self.serve(dev, slot as usize, Why::Kicked)?,
                }
            }
            if polled {
                for slot in 0..self.queues.len() {
                    self.serve(dev, slot, Why::Polled)?;
                }
            }
            if notified {
                return Ok(());
            }
        }
    }

    fn queues(&self) -> &[ActiveQueue] {
        &self.queues
    }

    fn drain(&mut self, _dev: &mut D) -> Result<()> {
        // Every chain completes before `serve` returns: nothing is ever in flight.
        Ok(())
    }

    fn resume(&mut self, _dev: &mut D) {
        // Look at every queue and the device's own I/O, as after DRIVER_OK.
        self.fresh = true;
    }
}

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Buffer lists up to this long are passed to the kernel from the stack.
const SMALL_IOVS: usize = 16;

/// `iovs` as an iovec array: in `small` when it fits (no allocation per request), else in `big`.
fn iovec_array<'a>(
    iovs: &[alioth_queue::Iov],
    small: &'a mut [libc::iovec; SMALL_IOVS],
    big: &'a mut Vec<libc::iovec>,
) -> &'a mut [libc::iovec] {
    if iovs.len() <= SMALL_IOVS {
        for (v, i) in small.iter_mut().zip(iovs) {
            *v = i.as_iovec();
        }
        &mut small[..iovs.len()]
    } else {
        big.extend(iovs.iter().map(|i| i.as_iovec()));
        big
    }
}

/// Performs an [`IoOp`] with blocking syscalls. Reads and writes are continued until complete;
/// a read that reaches the end of the file returns the shorter count.
pub fn execute_sync(op: &IoOp) -> std::io::Result<usize> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    };
    match op {
        IoOp::Readv { fd, iovs, offset } | IoOp::Writev { fd, iovs, offset } => {
            let write = matches!(op, IoOp::Writev { .. });
            let (mut small, mut big) = ([EMPTY_IOVEC; SMALL_IOVS], Vec::new());
            let vecs = iovec_array(iovs, &mut small, &mut big);
            let total: usize = vecs.iter().map(|v| v.iov_len).sum();
            let mut done = 0usize;
            let mut first = 0usize;
            while done < total {
                let rest = &vecs[first..];
                let off = (*offset + done as u64) as libc::off_t;
                // SAFETY: the iovecs point into guest RAM buffers that the chain owns while the
                // operation runs; `rest` is a valid array.
                let r = unsafe {
                    if write {
                        libc::pwritev(*fd, rest.as_ptr(), rest.len() as i32, off)
                    } else {
                        libc::preadv(*fd, rest.as_ptr(), rest.len() as i32, off)
                    }
                };
                let n = match check(r as libc::c_long) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                done += n;
                // Skip what was transferred.
                let mut left = n;
                while left > 0 && first < vecs.len() {
                    let v = &mut vecs[first];
                    if left >= v.iov_len {
                        left -= v.iov_len;
                        first += 1;
                    } else {
                        // SAFETY: advancing within the same buffer.
                        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left).cast() };
                        v.iov_len -= left;
                        left = 0;
                    }
                }
            }
            Ok(done)
        }
        IoOp::Send { fd, iovs } | IoOp::Recv { fd, iovs } => {
            let (mut small, mut big) = ([EMPTY_IOVEC; SMALL_IOVS], Vec::new());
            let vecs = iovec_array(iovs, &mut small, &mut big);
            let n = vecs.len().min(libc::c_int::MAX as usize) as libc::c_int;
            loop {
                // SAFETY: the iovecs point into guest RAM buffers that the chains own while the
                // operation runs; `vecs` is a valid array of `n` entries.
                let r = unsafe {
                    if matches!(op, IoOp::Send { .. }) {
                        libc::writev(*fd, vecs.as_ptr(), n)
                    } else {
                        libc::readv(*fd, vecs.as_ptr(), n)
                    }
                };
                match check(r as libc::c_long) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => return r,
                }
            }
        }
        IoOp::Fsync { fd, datasync } => {
            // SAFETY: plain syscalls on a descriptor the device owns.
            let r = unsafe {
                if *datasync {
                    libc::fdatasync(*fd)
                } else {
                    libc::fsync(*fd)
                }
            };
            check(r as libc::c_long)
        }
        IoOp::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => {
            // SAFETY: plain syscall on a descriptor the device owns.
            let r = unsafe { libc::fallocate(*fd, *mode, *offset as i64, *len as i64) };
            check(r as libc::c_long).map(|_| 0)
        }
        IoOp::Nop => Ok(0),
    }
}
