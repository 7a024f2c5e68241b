//! What the device tests share: a device's worker on either backend, started on test-driver
//! rings with an eventfd per queue.

use std::sync::Arc;

use alioth_io_uring::IoUringBackend;
use alioth_mem::RamBus;
use alioth_queue::VIRTIO_F_VERSION_1;
use alioth_queue::testing::TestDriver;
use alioth_virtio::{ChainHandler, EpollBackend, EventFdIrq, QueueSetup, WakeEvent, Worker};
use vmm_sys_util::eventfd::EventFd;

/// Which backend runs the device.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Epoll,
    IoUring,
}

/// A running device: its worker, its interrupts (one eventfd per queue) and its kicks.
pub struct Started {
    pub worker: Worker,
    pub irq: Arc<EventFdIrq>,
    pub kicks: Vec<Arc<EventFd>>,
}

/// Spawns `dev`'s worker under `kind` and starts it on `drivers`' rings (queue i on the i-th),
/// with VERSION_1 and the drivers' ring features.
pub fn start<D: ChainHandler>(
    dev: D,
    kind: Kind,
    ram: &RamBus,
    drivers: &[&TestDriver],
) -> Started {
    let mem = ram.memory().clone();
    let worker = match kind {
        Kind::Epoll => Worker::spawn(dev, EpollBackend::default(), mem),
        Kind::IoUring => Worker::spawn(dev, IoUringBackend::new(64), mem),
    }
    .unwrap();
    let irq = Arc::new(EventFdIrq::new(drivers.len() + 1).unwrap());
    let kicks: Vec<_> = drivers
        .iter()
        .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
        .collect();
    worker.wake(WakeEvent::Start {
        features: drivers[0].features() | (1 << VIRTIO_F_VERSION_1),
        queues: drivers
            .iter()
            .zip(&kicks)
            .map(|(d, k)| {
                Some(QueueSetup {
                    config: d.config(),
                    ioeventfd: k.clone(),
                    base: 0,
                })
            })
            .collect(),
        irq: irq.clone(),
    });
    Started { worker, irq, kicks }
}
