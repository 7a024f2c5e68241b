//! `alioth-io-uring`: the io_uring backend for Alioth's virtio workers.
//!
//! Each queue's ioeventfd and the worker's notifier are watched with multishot `PollAdd`s. A
//! kick pops the queue's chains; the device turns each into an [`IoOp`], which becomes an SQE
//! (read, write, readv, writev, fsync, fallocate) and stays in flight — its chain keeping its ring slot —
//! until its CQE arrives. `user_data` encodes what a completion is: a queue kick, the notifier,
//! or a chain (queue index and in-flight slot).
//!
//! The ring is budgeted: each queue has one reserved in-flight slot and the rest is shared, so a
//! busy queue cannot starve another. When the budget is spent the queue stops pulling chains
//! (they stay in the available ring, none is dropped) and resumes as completions free slots.
//! Completions are batched: after a batch of CQEs each touched queue checks once whether the
//! driver wants an interrupt. A reset or shutdown first waits for every chain in flight.
//!
//! ```no_run
//! use alioth_io_uring::IoUringBackend;
//! # fn spawn<D: alioth_virtio::ChainHandler>(dev: D, mem: vm_memory::GuestMemoryMmap) {
//! let worker = alioth_virtio::Worker::spawn(dev, IoUringBackend::new(256), mem).unwrap();
//! # }
//! ```

use std::os::fd::AsRawFd;
use std::sync::Arc;

use alioth_queue::{DescChain, Iov, VirtQueue};
use alioth_virtio::PollWindow;
use alioth_virtio::{
    ActiveBackend, ActiveQueue, Backend, BufferAction, ChainHandler, Error, IoOp, IrqSender, Result,
};
use io_uring::register::Restriction;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const KIND_SHIFT: u32 = 62;
const KIND_QUEUE: u64 = 1;
const KIND_NOTIFIER: u64 = 2;
const KIND_CHAIN: u64 = 3;
const KIND_EVENT: u64 = 0;

fn token(kind: u64, queue: usize, slot: usize) -> u64 {
    (kind << KIND_SHIFT) | ((queue as u64) << 32) | slot as u64
}

fn untoken(t: u64) -> (u64, usize, usize) {
    (
        t >> KIND_SHIFT,
        ((t >> 32) & 0x3fff_ffff) as usize,
        (t & 0xffff_ffff) as usize,
    )
}

/// A read or write SQE (readv or writev for more than one buffer) for `iovs` at `offset`, with the iovec array it points at (which
/// must live until the completion), built in `v` (a slot's reused array).
fn rw(
    fd: i32,
    iovs: &[Iov],
    offset: u64,
    write: bool,
    mut v: Vec<libc::iovec>,
) -> (squeue::Entry, Vec<libc::iovec>) {
    v.clear();
    if let [one] = iovs {
        // One buffer (most requests): a plain read or write, without an iovec array for the
        // kernel to import.
        let (ptr, len) = (one.host_ptr(), one.len());
        let sqe = if write {
            opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .build()
        };
        return (sqe, v);
    }
    v.extend(iovs.iter().map(|i| i.as_iovec()));
    let sqe = if write {
        opcode::Writev::new(types::Fd(fd), v.as_ptr(), v.len() as u32)
            .offset(offset)
            .build()
    } else {
        opcode::Readv::new(types::Fd(fd), v.as_ptr(), v.len() as u32)
            .offset(offset)
            .build()
    };
    (sqe, v)
}

/// The only operations a worker's ring accepts: seccomp cannot see what an io_uring executes,
/// so the ring itself is restricted (IORING_REGISTER_RESTRICTIONS) to what the backend submits.
const ALLOWED_OPS: [u8; 8] = [
    opcode::PollAdd::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::AsyncCancel::CODE,
];

/// A worker's ring: created disabled, restricted to [`ALLOWED_OPS`] (and no further
/// `io_uring_register` calls), then enabled. Only the worker thread submits (SINGLE_ISSUER) and
/// it needs no interrupt to run completion work (COOP_TASKRUN); kernels without those (before
/// 6.0) get a restricted ring without them, and kernels without restrictions (before 5.10) a
/// plain one, with a warning.
pub(crate) fn restricted_ring(entries: u32) -> std::io::Result<IoUring> {
    let build = |fast: bool| {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries * 4).setup_r_disabled();
        if fast {
            b.setup_single_issuer()
                .setup_coop_taskrun()
                .setup_taskrun_flag();
        }
        b.build(entries)
    };
    let ring = match build(true).or_else(|_| build(false)) {
        Ok(ring) => ring,
        Err(_) => {
            log::warn!(
                "io_uring: this kernel cannot restrict a ring's operations; the worker's ring is unrestricted"
            );
            return IoUring::builder().setup_cqsize(entries * 4).build(entries);
        }
    };
    let mut allowed: Vec<Restriction> = ALLOWED_OPS
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    ring.submitter().register_restrictions(&mut allowed)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// Whether io_uring can be used here (it may be compiled out or blocked by seccomp).
pub fn io_uring_available() -> bool {
    IoUring::new(2).is_ok()
}

/// The io_uring backend; `entries` is the submission ring size.
#[derive(Debug, Clone, Copy)]
pub struct IoUringBackend {
    entries: u32,
    poll_us: u32,
}

impl IoUringBackend {
    /// A backend whose rings have `entries` submission slots (rounded up to a power of two).
    pub fn new(entries: u32) -> Self {
        IoUringBackend {
            entries: entries.max(4).next_power_of_two(),
            poll_us: 0,
        }
    }

    /// Polls the virtqueues and the completion ring for up to `poll_us` microseconds
    /// (self-tuning, see [`PollWindow`]) before sleeping; 0 never polls.
    pub fn with_poll(mut self, poll_us: u32) -> Self {
        self.poll_us = poll_us;
        self
    }
}

/// A slot's spare iovec array (empty between operations; its pointers are stale then and never
/// read).
struct IovArray(Vec<libc::iovec>);

// SAFETY: the array holds only addresses into guest RAM (shared with every device thread) and
// is read by nothing but the kernel during this ring's operations.
unsafe impl Send for IovArray {}

struct InFlight {
    queue: usize,
    /// The chain the operation is for; `None` for the device's own I/O (`poll_io`).
    chain: Option<DescChain>,
    // Kept alive until the CQE: the kernel reads the iovec array during the operation. It goes
    // back to the slot's `iov_arrays` entry afterwards.
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest RAM, shared with every device thread anyway.
unsafe impl Send for InFlight {}

/// A running io_uring loop.
pub struct ActiveIoUring {
    ring: IoUring,
    queues: Vec<ActiveQueue>,
    irq: Arc<dyn IrqSender>,
    mem: GuestMemoryMmap,
    notifier: Arc<EventFd>,
    slots: Vec<Option<InFlight>>,
    /// Per slot, the iovec array of its last operation, reused by the next.
    iov_arrays: Vec<IovArray>,
    free: Vec<usize>,
    per_queue: Vec<usize>,
    capacity: usize,
    paused: Vec<bool>,
    fresh: bool,
    // Reused every wake-up, so that the loop allocates nothing.
    cqes: Vec<(u64, i32, u32)>,
    touched: Vec<bool>,
    kicked: Vec<bool>,
    /// Per queue: the device's event fds, whether its own I/O would block (it then waits for
    /// them), whether a poll on them is armed, and whether `poll_io` should run again.
    event_fds: Vec<Vec<i32>>,
    blocked: Vec<bool>,
    armed: Vec<bool>,
    poke: Vec<bool>,
    used: Vec<(DescChain, u32)>,
    poller: Option<PollWindow>,
    /// Armed for the earliest throttle's end ([`BufferAction::Throttle`]); polled with the
    /// notifier's kind and slot 1.
    timer: alioth_virtio::ThrottleTimer,
}

/// The timer's token: the notifier's kind, slot 1.
const TIMER_SLOT: usize = 1;

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

impl<D: ChainHandler> Backend<D> for IoUringBackend {
    type Active = ActiveIoUring;

    fn activate(
        &mut self,
        dev: &mut D,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn IrqSender>,
        mem: GuestMemoryMmap,
        notifier: Arc<EventFd>,
    ) -> Result<ActiveIoUring> {
        let ring = restricted_ring(self.entries).map_err(io_err("io_uring setup"))?;
        // Polls are multishot and re-armed only when they end, so chains get everything else.
        let capacity = (self.entries as usize)
            .saturating_sub(queues.len() + 1)
            .max(queues.len());
        let n = queues.len();
        let mut event_fds = vec![Vec::new(); n];
        for (fd, queue) in dev.event_fds() {
            if let Some(slot) = queues.iter().position(|q| q.index == queue) {
                event_fds[slot].push(fd);
            }
        }
        let mut a = ActiveIoUring {
            ring,
            queues,
            irq,
            mem,
            notifier,
            slots: (0..capacity).map(|_| None).collect(),
            iov_arrays: (0..capacity).map(|_| IovArray(Vec::new())).collect(),
            free: (0..capacity).rev().collect(),
            per_queue: vec![0; n],
            capacity,
            paused: vec![false; n],
            fresh: true,
            cqes: Vec::with_capacity(self.entries as usize * 4),
            touched: vec![false; n],
            kicked: vec![false; n],
            event_fds,
            blocked: vec![false; n],
            armed: vec![false; n],
            poke: vec![false; n],
            used: Vec::new(),
            poller: PollWindow::new(self.poll_us),
            timer: alioth_virtio::ThrottleTimer::new()?,
        };
        a.arm_notifier()?;
        a.watch_timer()?;
        for q in 0..n {
            a.arm_queue(q)?;
        }
        Ok(a)
    }
}

impl ActiveIoUring {
    fn push(&mut self, sqe: squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every SQE's buffers (iovec arrays, guest memory) outlive the operation:
            // iovecs live in `slots` until the CQE, guest RAM for the VM's life.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(io_err("io_uring submit"))?;
        }
    }

    fn arm_queue(&mut self, q: usize) -> Result<()> {
        let fd = self.queues[q].ioeventfd.as_raw_fd();
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(token(KIND_QUEUE, q, 0));
        self.push(sqe)
    }

    fn arm_notifier(&mut self) -> Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(self.notifier.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(token(KIND_NOTIFIER, 0, 0));
        self.push(sqe)
    }

    fn watch_timer(&mut self) -> Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(self.timer.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(token(KIND_NOTIFIER, 0, TIMER_SLOT));
        self.push(sqe)
    }

    fn in_flight(&self) -> usize {
        self.capacity - self.free.len()
    }

    /// Queue `q` may take a slot: its reserved one if it has none in flight, else a shared one.
    fn may_take(&self, q: usize) -> bool {
        if self.free.is_empty() {
            return false;
        }
        if self.per_queue[q] == 0 {
            return true;
        }
        // Keep one slot for each other queue that has nothing in flight.
        let reserved = self
            .per_queue
            .iter()
            .enumerate()
            .filter(|&(i, &n)| i != q && n == 0)
            .count();
        self.free.len() > reserved
    }

    fn qerr(dev: &str, q: u16) -> impl FnOnce(alioth_queue::QueueError) -> Error + '_ {
        move |source| Error::Queue {
            dev: dev.to_string(),
            queue: q,
            source,
        }
    }

    /// Returns `chain` to the driver on queue `q` with `len` bytes written.
    fn give_back(&mut self, name: &str, q: usize, chain: DescChain, len: u32) -> Result<()> {
        let aq = &mut self.queues[q];
        aq.queue
            .push_used(&self.mem, &chain, len)
            .map_err(Self::qerr(name, aq.index))?;
        aq.queue.recycle(chain);
        Ok(())
    }

    /// Pops and starts chains of queue `q` until it is empty or out of budget. Returns whether
    /// any chain was completed synchronously (used ring touched).
    fn pull<D: ChainHandler>(&mut self, dev: &mut D, q: usize) -> Result<bool> {
        let index = self.queues[q].index;
        let mut touched = false;
        if self.queues[q].is_throttled() {
            // Its chains wait in the ring until the timer ends the throttle.
            return Ok(false);
        }
        self.paused[q] = false;
        self.queues[q]
            .queue
            .disable_notification(&self.mem)
            .map_err(Self::qerr(dev.name(), index))?;
        loop {
            while self.may_take(q) {
                let Some(chain) = self.queues[q]
                    .queue
                    .pop(&self.mem)
                    .map_err(Self::qerr(dev.name(), index))?
                else {
                    break;
                };
                match dev.handle(index, &chain, &self.mem) {
                    BufferAction::Hold => {}
                    BufferAction::Throttle(wait) => {
                        let aq = &mut self.queues[q];
                        aq.queue
                            .unpop(chain)
                            .map_err(Self::qerr(dev.name(), index))?;
                        aq.throttled = Some(std::time::Instant::now() + wait);
                        return Ok(touched);
                    }
                    BufferAction::Written(n) => {
                        self.give_back(dev.name(), q, chain, n)?;
                        touched = true;
                    }
                    BufferAction::Io(IoOp::Nop) => {
                        // Nothing for the kernel to do: finish it now.
                        let n = dev.complete(index, &chain, &self.mem, Ok(0));
                        self.give_back(dev.name(), q, chain, n)?;
                        touched = true;
                    }
                    BufferAction::Io(op) => self.submit(dev, q, Some(chain), op)?,
                    BufferAction::Invalid(reason) => {
                        return Err(Error::Protocol {
                            dev: dev.name().to_string(),
                            queue: index,
                            reason,
                        });
                    }
                }
            }
            if !self.may_take(q) {
                // Out of budget: leave the rest in the ring; completions resume this queue.
                self.paused[q] = true;
                break;
            }
            if self.poller.is_some() {
                // The poll that comes next watches the ring with notifications suppressed and
                // enables them (and looks again) when its window ends: enabling them here let
                // the driver kick for its next request (40 % of the requests at QD1).
                break;
            }
            let more = self.queues[q]
                .queue
                .enable_notification(&self.mem)
                .map_err(Self::qerr(dev.name(), index))?;
            if !more {
                break;
            }
        }
        touched |= self.device_io(dev, q)?;
        Ok(touched)
    }

    /// Starts the device's own I/O on queue `q` ([`ChainHandler::poll_io`]) while it has some,
    /// its last read did not block, and the budget allows. Returns whether a chain completed
    /// (only chains the device filled itself, [`IoOp::Nop`]: the rest complete later).
    fn device_io<D: ChainHandler>(&mut self, dev: &mut D, q: usize) -> Result<bool> {
        self.poke[q] = false;
        let index = self.queues[q].index;
        let mut touched = false;
        if self.queues[q].is_throttled() {
            return Ok(false);
        }
        while !self.blocked[q] {
            if !self.may_take(q) {
                self.paused[q] = true;
                break;
            }
            let Some(op) = dev.poll_io(index, &self.mem) else {
                if let Some(wait) = dev.io_throttle(index) {
                    // A rate limit: the timer brings the queue back.
                    self.queues[q].throttled = Some(std::time::Instant::now() + wait);
                } else if dev.event_driven() {
                    // A device that drains its event fds itself waits for them now.
                    self.arm_events(q)?;
                }
                break;
            };
            if matches!(op, IoOp::Nop) {
                // Filled by the device itself: return the chains now.
                let mut used = std::mem::take(&mut self.used);
                dev.io_done(index, &self.mem, Ok(0), &mut used);
                for (chain, len) in used.drain(..) {
                    self.give_back(dev.name(), q, chain, len)?;
                    touched = true;
                }
                self.used = used;
                continue;
            }
            self.submit(dev, q, None, op)?;
        }
        Ok(touched)
    }

    /// Waits (oneshot polls) for queue `q`'s event fds after its device I/O would block.
    fn arm_events(&mut self, q: usize) -> Result<()> {
        if self.armed[q] {
            return Ok(());
        }
        self.armed[q] = true;
        for i in 0..self.event_fds[q].len() {
            let fd = self.event_fds[q][i];
            let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(token(KIND_EVENT, q, i));
            self.push(sqe)?;
        }
        Ok(())
    }

    fn submit<D: ChainHandler>(
        &mut self,
        dev: &mut D,
        q: usize,
        chain: Option<DescChain>,
        op: IoOp,
    ) -> Result<()> {
        let Some(slot) = self.free.pop() else {
            unreachable!("may_take checked for a free slot");
        };
        let user = token(KIND_CHAIN, q, slot);
        // The slot's iovec array from its last use: no allocation per request.
        let v = std::mem::take(&mut self.iov_arrays[slot].0);
        let (sqe, iovecs) = match &op {
            IoOp::Readv { fd, iovs, offset } => rw(*fd, iovs, *offset, false, v),
            IoOp::Writev { fd, iovs, offset } => rw(*fd, iovs, *offset, true, v),
            // Packet descriptors (taps): at the current position, which io_uring spells -1.
            IoOp::Recv { fd, iovs } => rw(*fd, iovs, u64::MAX, false, v),
            IoOp::Send { fd, iovs } => rw(*fd, iovs, u64::MAX, true, v),
            IoOp::Fsync { fd, datasync } => {
                let mut f = opcode::Fsync::new(types::Fd(*fd));
                if *datasync {
                    f = f.flags(types::FsyncFlags::DATASYNC);
                }
                (f.build(), v)
            }
            // `pull` and `device_io` finish these without the kernel. Should one get here, the
            // restricted ring refuses the opcode and the chain completes with that error.
            IoOp::Nop => (opcode::Nop::new().build(), v),
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => (
                opcode::Fallocate::new(types::Fd(*fd), *len)
                    .offset(*offset)
                    .mode(*mode)
                    .build(),
                v,
            ),
        };
        // The kernel reads the slot's iovec array, not the device's list: give that back.
        if let Some(iovs) = op.into_iovs() {
            dev.recycle_iovs(iovs);
        }
        self.slots[slot] = Some(InFlight {
            queue: q,
            chain,
            iovecs,
        });
        self.per_queue[q] += 1;
        self.push(sqe.user_data(user))
    }

    fn complete<D: ChainHandler>(&mut self, dev: &mut D, slot: usize, res: i32) -> Result<usize> {
        let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Err(Error::Io {
                what: "io_uring completion".into(),
                source: std::io::Error::other(format!("completion for empty slot {slot}")),
            });
        };
        self.free.push(slot);
        self.per_queue[f.queue] -= 1;
        self.iov_arrays[slot] = IovArray(f.iovecs);
        let index = self.queues[f.queue].index;
        let result = if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        };
        let q = f.queue;
        let Some(chain) = f.chain else {
            // The device's own I/O: it says which held chains are now filled.
            let blocked = matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            let mut used = std::mem::take(&mut self.used);
            dev.io_done(index, &self.mem, result, &mut used);
            for (chain, len) in used.drain(..) {
                self.queues[q]
                    .queue
                    .push_used(&self.mem, &chain, len)
                    .map_err(Self::qerr(dev.name(), index))?;
            }
            self.used = used;
            if blocked {
                self.blocked[q] = true;
                self.arm_events(q)?;
            } else {
                self.poke[q] = true;
            }
            return Ok(q);
        };
        let written = dev.complete(index, &chain, &self.mem, result);
        self.give_back(dev.name(), q, chain, written)?;
        Ok(q)
    }

    fn interrupt(&mut self, name: &str, touched: &[bool]) -> Result<()> {
        for (q, &t) in touched.iter().enumerate() {
            if !t {
                continue;
            }
            let aq = &mut self.queues[q];
            if aq
                .queue
                .needs_interrupt(&self.mem)
                .map_err(Self::qerr(name, aq.index))?
            {
                self.irq.queue_irq(aq.index);
            }
        }
        Ok(())
    }

    /// One polling round, if polling is on: watches the virtqueues (notifications suppressed)
    /// and the completion ring; returns whether either has something.
    fn poll(&mut self, name: &str) -> Result<bool> {
        let Some(mut poller) = self.poller.take() else {
            return Ok(false);
        };
        for aq in &mut self.queues {
            aq.queue
                .disable_notification(&self.mem)
                .map_err(Self::qerr(name, aq.index))?;
        }
        let (queues, mem, ring, paused) = (&self.queues, &self.mem, &mut self.ring, &self.paused);
        // A ring that cannot be read counts as work: pulling it reports the error. A queue out
        // of budget waits for completions, not for its ring.
        let mut found = poller.poll(|| {
            !ring.completion().is_empty()
                || {
                    // Completion work the kernel holds until the worker enters it.
                    let sq = ring.submission();
                    sq.taskrun() || sq.cq_overflow()
                }
                || queues.iter().zip(paused).any(|(q, p)| {
                    !p && q.throttled.is_none() && q.queue.has_available(mem).unwrap_or(true)
                })
        });
        if !found {
            for aq in &mut self.queues {
                found |= aq
                    .queue
                    .enable_notification(&self.mem)
                    .map_err(Self::qerr(name, aq.index))?;
            }
        }
        self.poller = Some(poller);
        Ok(found)
    }

    /// Submits what is queued and waits for at least one completion; the completions are left
    /// in `self.cqes`.
    fn wait(&mut self) -> Result<()> {
        self.wait_for(1)
    }

    /// Submits what is queued, waits for `min` completions (0: none), and leaves what has
    /// completed in `self.cqes`.
    fn wait_for(&mut self, min: usize) -> Result<()> {
        // Without anything to submit or wait for, no completion work pending in the kernel
        // (IORING_SQ_TASKRUN; a ring without COOP_TASKRUN never sets it, its completions are
        // posted without the worker's help) and no completions held back by an overflow, the
        // completion ring holds all there is: no syscall. (A polling worker at QD1 made three
        // io_uring_enter calls per request before.)
        let idle = min == 0 && {
            let sq = self.ring.submission();
            sq.is_empty() && !sq.taskrun() && !sq.cq_overflow()
        };
        if !idle {
            loop {
                match self.ring.submit_and_wait(min) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(io_err("io_uring wait")(e)),
                }
            }
        }
        self.cqes.clear();
        self.cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        Ok(())
    }
}

impl<D: ChainHandler> ActiveBackend<D> for ActiveIoUring {
    fn run(&mut self, dev: &mut D) -> Result<()> {
        let name = dev.name().to_string();
        let n = self.queues.len();
        if self.fresh {
            self.fresh = false;
            let mut touched = vec![false; n];
            for (q, t) in touched.iter_mut().enumerate() {
                *t = self.pull(dev, q)?;
            }
            self.interrupt(&name, &touched)?;
        }
        loop {
            // A queue throttled since the last wait gets its wake-up first.
            self.timer.arm(&self.queues)?;
            // Poll first (if on), after handing the kernel what is queued (what is polled for
            // may be its completion); with work found, only reap what has completed, then pull
            // every queue.
            if self.poller.is_some() && !self.ring.submission().is_empty() {
                self.ring.submit().map_err(io_err("io_uring submit"))?;
            }
            let polled = self.poll(&name)?;
            self.wait_for(usize::from(!polled))?;
            let cqes = std::mem::take(&mut self.cqes);
            let mut touched = std::mem::take(&mut self.touched);
            let mut kicked = std::mem::take(&mut self.kicked);
            // (After an early error return these are empty; resize keeps indexing in bounds.)
            touched.clear();
            touched.resize(n, false);
            kicked.clear();
            kicked.resize(n, false);
            let mut notified = false;
            for &(user, res, flags) in &cqes {
                let (kind, q, slot) = untoken(user);
                match kind {
                    KIND_QUEUE if q < n => {
                        let _ = self.queues[q].ioeventfd.read();
                        if !cqueue::more(flags) {
                            self.arm_queue(q)?;
                        }
                        kicked[q] = true;
                    }
                    KIND_NOTIFIER if slot == TIMER_SLOT => {
                        self.timer.fired();
                        if !cqueue::more(flags) {
                            self.watch_timer()?;
                        }
                        // Queues whose throttle ended are pulled below.
                        for (k, aq) in kicked.iter_mut().zip(&self.queues) {
                            *k |= aq.throttled.is_some();
                        }
                    }
                    KIND_NOTIFIER => {
                        notified = true;
                        if !cqueue::more(flags) {
                            self.arm_notifier()?;
                        }
                    }
                    KIND_CHAIN => {
                        let q = self.complete(dev, slot, res)?;
                        touched[q] = true;
                    }
                    KIND_EVENT if q < n => {
                        // One readable fd is enough to try again; the other polls stay armed
                        // and fire later harmlessly.
                        self.armed[q] = false;
                        self.blocked[q] = false;
                        self.poke[q] = true;
                    }
                    _ => log::warn!("{name}: unexpected completion {user:#x}"),
                }
            }
            for q in 0..n {
                if kicked[q] || self.paused[q] || polled {
                    touched[q] |= self.pull(dev, q)?;
                } else if self.poke[q] {
                    touched[q] |= self.device_io(dev, q)?;
                }
            }
            self.interrupt(&name, &touched)?;
            self.cqes = cqes;
            self.touched = touched;
            self.kicked = kicked;
            if notified {
                return Ok(());
            }
        }
    }

    fn queues(&self) -> &[ActiveQueue] {
        &self.queues
    }

    fn resume(&mut self, _dev: &mut D) {
        // The drain cancelled the device's own reads and stopped its event polls: start over,
        // and pull every queue as after DRIVER_OK.
        self.blocked.iter_mut().for_each(|b| *b = false);
        self.armed.iter_mut().for_each(|a| *a = false);
        self.poke.iter_mut().for_each(|p| *p = true);
        self.fresh = true;
    }

    fn drain(&mut self, dev: &mut D) -> Result<()> {
        let name = dev.name().to_string();
        let n = self.queues.len();
        // The device's own reads may wait for a packet forever: cancel them (they complete
        // with ECANCELED, or with what they read if they won the race).
        let own: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].as_ref().is_some_and(|f| f.chain.is_none()))
            .collect();
        for slot in own {
            let q = self.slots[slot].as_ref().map_or(0, |f| f.queue);
            let sqe = opcode::AsyncCancel::new(token(KIND_CHAIN, q, slot))
                .build()
                .user_data(token(KIND_EVENT, n, 0));
            self.push(sqe)?;
        }
        // No more polls for event fds either.
        self.blocked.iter_mut().for_each(|b| *b = true);
        while self.in_flight() > 0 {
            self.wait()?;
            let cqes = std::mem::take(&mut self.cqes);
            let mut touched = vec![false; n];
            for &(user, res, _) in &cqes {
                let (kind, _, slot) = untoken(user);
                if kind == KIND_CHAIN {
                    let q = self.complete(dev, slot, res)?;
                    touched[q] = true;
                }
            }
            self.interrupt(&name, &touched)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "lib_test.rs"]
mod tests;
