//! Workers: one thread per device, driven by the transport's wake events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use alioth_queue::{Queue, QueueConfig, VirtQueue, new_queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

#[cfg(doc)]
use crate::device::Virtio;
use crate::device::{BufferAction, ChainHandler, IoOp};
use crate::irq::IrqSender;
use crate::{Error, Result};

/// One queue as the driver set it up, with the ioeventfd its notifications arrive on.
#[derive(Clone)]
pub struct QueueSetup {
    /// Addresses and size.
    pub config: QueueConfig,
    /// Signalled (by KVM) when the driver notifies the queue.
    pub ioeventfd: Arc<EventFd>,
    /// Where the ring continues, in [`VirtQueue::ring_base`]'s encoding: 0 for a fresh ring, or
    /// what a previous worker reported (vhost-user's SET_VRING_BASE).
    pub base: u32,
}

/// A queue's index and its ring position ([`VirtQueue::ring_base`]) when its worker stopped.
pub type QueueState = (u16, u32);

/// What the transport tells a worker.
pub enum WakeEvent {
    /// DRIVER_OK: start with these negotiated features, queues (`None` for a queue the driver
    /// left disabled) and interrupt sender.
    Start {
        /// Negotiated features.
        features: u64,
        /// Queues by index.
        queues: Vec<Option<QueueSetup>>,
        /// Where interrupts go.
        irq: Arc<dyn IrqSender>,
    },
    /// The driver reset the device: finish in-flight requests, then stop using the queues.
    /// The sender (if any) gets the queues' final positions when the reset is complete.
    Reset(Option<Sender<Vec<QueueState>>>),
    /// The VM is being paused: complete what is in flight (used rings updated, the driver
    /// interrupted), then serve nothing until [`WakeEvent::Resume`]; the queues and the device
    /// keep their state. The sender hears when that is done.
    Pause(Sender<()>),
    /// Serve the queues again after [`WakeEvent::Pause`].
    Resume,
    /// The device was started to continue a snapshot ([`Virtio::restored`]).
    Restored,
    /// While paused: report where each queue's ring stands for a snapshot — its position
    /// with the chains the device holds put back ([`ChainHandler::held`]).
    Positions(Sender<Vec<QueueState>>),
    /// The VM is going away: like reset, then the thread ends.
    Shutdown,
}

/// A queue a running backend serves.
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The ring.
    pub queue: Queue,
    /// Its notification eventfd.
    pub ioeventfd: Arc<EventFd>,
    /// Until when the device asked not to be given this queue's chains
    /// ([`BufferAction::Throttle`]).
    pub throttled: Option<std::time::Instant>,
}

impl ActiveQueue {
    /// Queue `index` on `queue`, notified through `ioeventfd`, not throttled.
    pub fn new(index: u16, queue: Queue, ioeventfd: Arc<EventFd>) -> Self {
        ActiveQueue {
            index,
            queue,
            ioeventfd,
            throttled: None,
        }
    }

    /// Whether the queue is throttled now; a throttle that has run out is cleared.
    pub fn is_throttled(&mut self) -> bool {
        match self.throttled {
            Some(t) if t > std::time::Instant::now() => true,
            Some(_) => {
                self.throttled = None;
                false
            }
            None => false,
        }
    }
}

/// The earliest end of a throttle among `queues`.
pub fn next_unthrottle(queues: &[ActiveQueue]) -> Option<std::time::Instant> {
    queues.iter().filter_map(|q| q.throttled).min()
}

/// A backend's timer for throttled queues: armed for the earliest throttle's end; its
/// descriptor becomes readable then.
pub struct ThrottleTimer {
    timer: vmm_sys_util::timerfd::TimerFd,
    at: Option<std::time::Instant>,
}

fn timer_err(e: vmm_sys_util::errno::Error) -> Error {
    Error::Io {
        what: "timerfd".into(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

impl ThrottleTimer {
    /// A disarmed timer.
    pub fn new() -> Result<Self> {
        Ok(ThrottleTimer {
            timer: vmm_sys_util::timerfd::TimerFd::new().map_err(timer_err)?,
            at: None,
        })
    }

    /// Arms the timer for the earliest throttle of `queues` (if that changed).
    pub fn arm(&mut self, queues: &[ActiveQueue]) -> Result<()> {
        let next = next_unthrottle(queues);
        if next == self.at {
            return Ok(());
        }
        self.at = next;
        let Some(at) = next else {
            return Ok(());
        };
        // (A zero duration would disarm the timer.)
        let wait = at
            .saturating_duration_since(std::time::Instant::now())
            .max(std::time::Duration::from_micros(1));
        self.timer.reset(wait, None).map_err(timer_err)
    }

    /// Consumes an expiry (after its descriptor was readable).
    pub fn fired(&mut self) {
        let _ = self.timer.wait();
        self.at = None;
    }
}

impl std::os::fd::AsRawFd for ThrottleTimer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }
}

/// An event-loop flavour (epoll, io_uring) that can run a device.
pub trait Backend<D: ChainHandler>: Send + 'static {
    /// The running loop.
    type Active: ActiveBackend<D>;
    /// Starts serving `queues`. The loop must return from [`ActiveBackend::run`] when `notifier`
    /// becomes readable.
    fn activate(
        &mut self,
        dev: &mut D,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn IrqSender>,
        mem: GuestMemoryMmap,
        notifier: Arc<EventFd>,
    ) -> Result<Self::Active>;
}

/// A running event loop.
pub trait ActiveBackend<D: ChainHandler>: Send {
    /// Serves the queues until the worker's notifier fires (`Ok`), or until the driver breaks
    /// the protocol (`Err`: the device then needs a reset).
    fn run(&mut self, dev: &mut D) -> Result<()>;
    /// Completes every request in flight, updating the used rings and interrupting the driver,
    /// so that nothing acknowledged is lost across a reset.
    fn drain(&mut self, dev: &mut D) -> Result<()>;
    /// The queues served.
    fn queues(&self) -> &[ActiveQueue];
    /// Serves again after [`ActiveBackend::drain`] without a reset (a resumed pause): what
    /// the drain stopped (the device's own reads) starts again, and every queue is looked at.
    fn resume(&mut self, dev: &mut D) {
        let _ = dev;
    }
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Waiting for [`WakeEvent::Start`] (after creation or a reset).
    Idle = 0,
    /// Serving its queues.
    Running = 1,
    /// Stopped serving after a driver error; waits for a reset (the device's NEEDS_RESET).
    NeedsReset = 2,
    /// The thread has ended.
    Stopped = 3,
}

impl WorkerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => WorkerState::Idle,
            1 => WorkerState::Running,
            2 => WorkerState::NeedsReset,
            _ => WorkerState::Stopped,
        }
    }
}

/// Why a worker thread ended (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It was asked to.
    Shutdown,
    /// The transport went away.
    Disconnected,
    /// The device or backend panicked (the device then needs a reset).
    Panicked,
}

/// What serves a device's queues for a transport: an in-process [`Worker`], or an external
/// process (a vhost-user backend). The transport calls it on the driver's status changes.
pub trait DeviceRunner: Send + Sync {
    /// DRIVER_OK: serve `queues` (`None` for a queue the driver left disabled) with the
    /// negotiated `features`, interrupting the driver through `irq`.
    fn start(&self, features: u64, queues: Vec<Option<QueueSetup>>, irq: Arc<dyn IrqSender>);
    /// The driver reset the device: complete what is in flight and stop; returns where each
    /// queue stopped.
    fn reset(&self) -> Vec<QueueState>;
    /// Whether the device hit a driver error and waits for a reset.
    fn needs_reset(&self) -> bool;
    /// The VM is going away: stop for good.
    fn stop(&self);
    /// The VM is pausing: complete what is in flight and serve nothing until
    /// [`DeviceRunner::resume`]. Returns false if this runner cannot pause (its queues are
    /// served elsewhere, by a vhost-user backend).
    fn pause(&self) -> bool {
        false
    }
    /// Serve again after [`DeviceRunner::pause`].
    fn resume(&self) {}
    /// While paused: where each running queue's ring stands for a snapshot (see
    /// [`WakeEvent::Positions`]); `None` if this runner cannot say.
    fn positions(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// After [`DeviceRunner::start`]: the device continues a snapshot (see
    /// [`WakeEvent::Restored`]).
    fn restored(&self) {}
}

/// A device's worker thread.
pub struct Worker {
    name: String,
    tx: Sender<WakeEvent>,
    notifier: Arc<EventFd>,
    state: Arc<AtomicU8>,
    thread: std::sync::Mutex<Option<JoinHandle<WorkerExit>>>,
    on_failure: FailureHook,
}

/// Called (on the worker's thread) when a device or backend panics, with the device's name and
/// the panic message. The VMM stops the VM with it.
pub type FailureHandler = Box<dyn Fn(&str, &str) + Send + Sync>;

type FailureHook = Arc<std::sync::Mutex<Option<FailureHandler>>>;

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl Worker {
    /// Starts the worker thread of `dev` under `backend`. The device idles until
    /// [`WakeEvent::Start`].
    pub fn spawn<D, B>(dev: D, backend: B, mem: GuestMemoryMmap) -> Result<Worker>
    where
        D: ChainHandler,
        B: Backend<D>,
    {
        Self::spawn_with(dev, backend, mem, || Ok(()))
    }

    /// Like [`Worker::spawn`], running `init` on the new thread before it serves anything (a
    /// VMM installs the thread's seccomp filter there). If `init` fails the worker does not
    /// serve: the device reports NEEDS_RESET when started, and the failure hook hears why.
    pub fn spawn_with<D, B>(
        dev: D,
        backend: B,
        mem: GuestMemoryMmap,
        init: impl FnOnce() -> std::result::Result<(), String> + Send + 'static,
    ) -> Result<Worker>
    where
        D: ChainHandler,
        B: Backend<D>,
    {
        let name = dev.name().to_string();
        let notifier = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?);
        let state = Arc::new(AtomicU8::new(WorkerState::Idle as u8));
        let (tx, rx) = channel();
        let ctx = WorkerThread {
            dev,
            backend,
            mem,
            rx,
            notifier: notifier.clone(),
            state: state.clone(),
        };
        let on_failure: FailureHook = Arc::new(std::sync::Mutex::new(None));
        let hook = on_failure.clone();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let state = ctx.state.clone();
                // A panic must not leave the device looking alive with the guest's I/O hanging:
                // the device needs a reset, and whoever registered a handler hears why.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if let Err(e) = init() {
                        panic!("setting up the worker thread: {e}");
                    }
                    ctx.run()
                })) {
                    Ok(exit) => exit,
                    Err(p) => {
                        let msg = panic_message(p.as_ref());
                        state.store(WorkerState::NeedsReset as u8, Ordering::Release);
                        log::error!("{thread_name}: worker panicked: {msg}");
                        if let Some(f) = hook.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                            f(&thread_name, &msg);
                        }
                        WorkerExit::Panicked
                    }
                }
            })
            .map_err(io_err(format!("spawning {name}")))?;
        Ok(Worker {
            name,
            tx,
            notifier,
            state,
            thread: std::sync::Mutex::new(Some(thread)),
            on_failure,
        })
    }

    /// Registers what to do when the device or backend panics (replacing an earlier handler).
    pub fn on_failure(&self, f: impl Fn(&str, &str) + Send + Sync + 'static) {
        *self.on_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Sends an event and wakes the thread.
    pub fn wake(&self, ev: WakeEvent) {
        if self.tx.send(ev).is_ok() {
            let _ = self.notifier.write(1);
        } else {
            log::warn!("{}: worker is gone", self.name);
        }
    }

    /// Resets the device and waits until in-flight requests are complete and the queues are
    /// released (what a driver's write of status 0 requires before it reads 0 back). Returns
    /// where each queue that was running stopped (what vhost-user's GET_VRING_BASE reports).
    pub fn reset(&self) -> Vec<QueueState> {
        let (tx, rx) = channel();
        self.wake(WakeEvent::Reset(Some(tx)));
        rx.recv().unwrap_or_else(|_| {
            log::warn!("{}: worker ended during reset", self.name);
            Vec::new()
        })
    }

    /// Whether the device hit a driver error and waits for a reset (the transport reflects it as
    /// NEEDS_RESET in the status register).
    pub fn needs_reset(&self) -> bool {
        self.state() == WorkerState::NeedsReset
    }

    /// The worker's current state.
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Pauses the device (see [`WakeEvent::Pause`]) and waits until nothing is in flight.
    pub fn pause(&self) {
        let (tx, rx) = channel();
        self.wake(WakeEvent::Pause(tx));
        if rx.recv().is_err() {
            log::warn!("{}: worker ended during pause", self.name);
        }
    }

    /// Serves again after [`Worker::pause`].
    pub fn resume(&self) {
        self.wake(WakeEvent::Resume);
    }

    /// See [`WakeEvent::Positions`] (empty when the device is not running).
    pub fn positions(&self) -> Vec<QueueState> {
        let (tx, rx) = channel();
        self.wake(WakeEvent::Positions(tx));
        rx.recv().unwrap_or_default()
    }

    /// Stops the thread after it completes the requests in flight.
    pub fn shutdown(self) {
        self.stop();
    }

    /// Like [`Worker::shutdown`], for a worker that is shared; later calls do nothing.
    pub fn stop(&self) {
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            self.wake(WakeEvent::Shutdown);
            match t.join() {
                Ok(exit) => log::debug!("{}: worker ended: {exit:?}", self.name),
                Err(_) => log::error!("{}: worker thread failed", self.name),
            }
        }
    }
}

impl DeviceRunner for Worker {
    fn start(&self, features: u64, queues: Vec<Option<QueueSetup>>, irq: Arc<dyn IrqSender>) {
        self.wake(WakeEvent::Start {
            features,
            queues,
            irq,
        });
    }

    fn reset(&self) -> Vec<QueueState> {
        Worker::reset(self)
    }

    fn needs_reset(&self) -> bool {
        Worker::needs_reset(self)
    }

    fn stop(&self) {
        Worker::stop(self)
    }

    fn pause(&self) -> bool {
        Worker::pause(self);
        true
    }

    fn resume(&self) {
        Worker::resume(self)
    }

    fn positions(&self) -> Option<Vec<QueueState>> {
        Some(Worker::positions(self))
    }

    fn restored(&self) {
        self.wake(WakeEvent::Restored);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct WorkerThread<D, B> {
    dev: D,
    backend: B,
    mem: GuestMemoryMmap,
    rx: Receiver<WakeEvent>,
    notifier: Arc<EventFd>,
    state: Arc<AtomicU8>,
}

/// Puts `fd` in non-blocking mode (the flag belongs to the open file, so whoever shares it sees
/// it too; eventfd writers are unaffected unless the counter would overflow).
fn set_nonblocking(fd: &EventFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor the EventFd owns; the results are checked.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn wait_readable(fd: &EventFd) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
}

impl<D: ChainHandler, B: Backend<D>> WorkerThread<D, B> {
    fn set(&self, st: WorkerState) {
        self.state.store(st as u8, Ordering::Release);
    }

    fn run(self) -> WorkerExit {
        let state = self.state.clone();
        let exit = self.serve();
        state.store(WorkerState::Stopped as u8, Ordering::Release);
        exit
    }

    fn serve(mut self) -> WorkerExit {
        let name = self.dev.name().to_string();
        let mut active: Option<(B::Active, Arc<dyn IrqSender>)> = None;
        let mut broken = false;
        let mut paused = false;
        loop {
            match active.as_mut() {
                Some((a, irq)) if !broken && !paused => {
                    if let Err(e) = a.run(&mut self.dev) {
                        log::error!("{e}; the device needs a reset");
                        broken = true;
                        self.set(WorkerState::NeedsReset);
                        irq.config_irq();
                    }
                }
                _ => wait_readable(&self.notifier),
            }
            let _ = self.notifier.read();
            loop {
                let ev = match self.rx.try_recv() {
                    Ok(ev) => ev,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.stop(&mut active);
                        return WorkerExit::Disconnected;
                    }
                };
                match ev {
                    WakeEvent::Start {
                        features,
                        queues,
                        irq,
                    } => {
                        if active.is_some() {
                            log::warn!("{name}: started twice without a reset; ignored");
                            continue;
                        }
                        match self.start(features, queues, irq.clone()) {
                            Ok(a) => {
                                active = Some((a, irq));
                                self.set(WorkerState::Running);
                            }
                            Err(e) => {
                                log::error!("{name}: cannot start: {e}; the device needs a reset");
                                broken = true;
                                self.set(WorkerState::NeedsReset);
                                irq.config_irq();
                            }
                        }
                    }
                    WakeEvent::Pause(done) => {
                        if let Some((a, _)) = active.as_mut()
                            && !paused
                            && let Err(e) = a.drain(&mut self.dev)
                        {
                            log::error!("{name}: completing in-flight requests for a pause: {e}");
                        }
                        paused = true;
                        let _ = done.send(());
                    }
                    WakeEvent::Restored => {
                        self.dev.restored();
                        // Whatever the device now owes the driver goes out at the next look
                        // at its queues: make that look happen.
                        if let Some((a, _)) = active.as_mut() {
                            a.resume(&mut self.dev);
                        }
                    }
                    WakeEvent::Positions(tx) => {
                        let at = active
                            .as_ref()
                            .map(|(a, _)| {
                                a.queues()
                                    .iter()
                                    .map(|q| {
                                        let held = self.dev.held(q.index);
                                        (q.index, q.queue.ring_base_before(&held))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        if !paused {
                            log::warn!("{name}: ring positions asked while running");
                        }
                        let _ = tx.send(at);
                    }
                    WakeEvent::Resume => {
                        if paused && let Some((a, _)) = active.as_mut() {
                            a.resume(&mut self.dev);
                        }
                        paused = false;
                    }
                    WakeEvent::Reset(done) => {
                        let stopped = self.stop(&mut active);
                        broken = false;
                        paused = false;
                        self.set(WorkerState::Idle);
                        if let Some(done) = done {
                            let _ = done.send(stopped);
                        }
                    }
                    WakeEvent::Shutdown => {
                        self.stop(&mut active);
                        return WorkerExit::Shutdown;
                    }
                }
            }
        }
    }

    fn start(
        &mut self,
        features: u64,
        queues: Vec<Option<QueueSetup>>,
        irq: Arc<dyn IrqSender>,
    ) -> Result<B::Active> {
        let name = self.dev.name().to_string();
        let max = self.dev.queue_max_sizes();
        let mut active = Vec::new();
        for (i, setup) in queues.into_iter().enumerate() {
            let Some(setup) = setup else { continue };
            let index = i as u16;
            let Some(&max_size) = max.get(i) else {
                return Err(Error::Protocol {
                    dev: name,
                    queue: index,
                    reason: "the device has no such queue".into(),
                });
            };
            let qerr = |source| Error::Queue {
                dev: name.clone(),
                queue: index,
                source,
            };
            // The backends read the kick eventfd after each readiness notification; a blocking
            // one (a vhost-user frontend's may be) would stall the worker when a read finds the
            // count already consumed.
            set_nonblocking(&setup.ioeventfd)
                .map_err(io_err(format!("{name}: queue {index} eventfd")))?;
            let mut queue = new_queue(max_size, setup.config, features, &self.mem).map_err(qerr)?;
            queue.set_ring_base(&self.mem, setup.base).map_err(qerr)?;
            active.push(ActiveQueue::new(index, queue, setup.ioeventfd));
        }
        self.dev.activate(features)?;
        self.backend.activate(
            &mut self.dev,
            active,
            irq,
            self.mem.clone(),
            self.notifier.clone(),
        )
    }

    /// Drains and drops the running backend; returns where its queues stopped.
    fn stop(&mut self, active: &mut Option<(B::Active, Arc<dyn IrqSender>)>) -> Vec<QueueState> {
        let Some((mut a, _)) = active.take() else {
            return Vec::new();
        };
        if let Err(e) = a.drain(&mut self.dev) {
            log::error!("{}: draining in-flight requests: {e}", self.dev.name());
        }
        let stopped = a
            .queues()
            .iter()
            .map(|q| (q.index, q.queue.ring_base()))
            .collect();
        self.dev.reset();
        stopped
    }
}

/// Serves one queue synchronously: pops every available chain, lets the device handle it,
/// performs its I/O with `exec`, and returns it. Notifications stay disabled while working and
/// are re-enabled (and re-checked) at the end, unless `polling`: a backend that polls the ring
/// next keeps them suppressed and enables them itself when its poll window ends (enabling them
/// here let a driver that posts its next request right away kick for it: 20-40 % of the
/// requests at QD1).
pub fn process_queue<D: ChainHandler>(
    dev: &mut D,
    aq: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    polling: bool,
    exec: &mut dyn FnMut(&IoOp) -> std::io::Result<usize>,
) -> Result<bool> {
    let index = aq.index;
    // The device's name is only copied when there is an error to report.
    let qerr = |dev: &D, source| Error::Queue {
        dev: dev.name().to_string(),
        queue: index,
        source,
    };
    let mut done = false;
    if aq.is_throttled() {
        // Its chains wait in the ring; the backend comes back when the throttle ends.
        return Ok(false);
    }
    aq.queue
        .disable_notification(mem)
        .map_err(|e| qerr(dev, e))?;
    loop {
        while let Some(chain) = aq.queue.pop(mem).map_err(|e| qerr(dev, e))? {
            let written = match dev.handle(index, &chain, mem) {
                BufferAction::Hold => continue,
                BufferAction::Throttle(wait) => {
                    aq.queue.unpop(chain).map_err(|e| qerr(dev, e))?;
                    aq.throttled = Some(std::time::Instant::now() + wait);
                    return Ok(done);
                }
                BufferAction::Written(n) => n,
                BufferAction::Io(op) => {
                    let r = exec(&op);
                    if let Some(iovs) = op.into_iovs() {
                        dev.recycle_iovs(iovs);
                    }
                    dev.complete(index, &chain, mem, r)
                }
                BufferAction::Invalid(reason) => {
                    return Err(Error::Protocol {
                        dev: dev.name().to_string(),
                        queue: index,
                        reason,
                    });
                }
            };
            aq.queue
                .push_used(mem, &chain, written)
                .map_err(|e| qerr(dev, e))?;
            aq.queue.recycle(chain);
            done = true;
        }
        if polling
            || !aq
                .queue
                .enable_notification(mem)
                .map_err(|e| qerr(dev, e))?
        {
            break;
        }
    }
    done |= device_io(dev, aq, mem, exec)?;
    Ok(done)
}

/// Runs the device's own I/O on a queue ([`ChainHandler::poll_io`]) synchronously until it has
/// none or an operation would block; returns the filled chains to the driver. Returns whether
/// any chain was completed.
pub fn device_io<D: ChainHandler>(
    dev: &mut D,
    aq: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    exec: &mut dyn FnMut(&IoOp) -> std::io::Result<usize>,
) -> Result<bool> {
    let index = aq.index;
    let mut done = false;
    if aq.is_throttled() {
        return Ok(false);
    }
    let mut used = Vec::new();
    loop {
        let Some(op) = dev.poll_io(index, mem) else {
            // Out of work, or waiting for a rate limit: then come back when it allows.
            if let Some(wait) = dev.io_throttle(index) {
                aq.throttled = Some(std::time::Instant::now() + wait);
            }
            break;
        };
        let r = exec(&op);
        let blocked = matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        dev.io_done(index, mem, r, &mut used);
        for (chain, len) in used.drain(..) {
            aq.queue
                .push_used(mem, &chain, len)
                .map_err(|source| Error::Queue {
                    dev: dev.name().to_string(),
                    queue: index,
                    source,
                })?;
            done = true;
        }
        if blocked {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
#[path = "worker_test.rs"]
mod tests;
