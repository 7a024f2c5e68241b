//! How a worker interrupts the driver.

use vmm_sys_util::eventfd::EventFd;

/// Sends interrupts to the driver. Transports implement it (virtio-pci: an irqfd per MSI-X
/// vector); tests use [`EventFdIrq`].
pub trait IrqSender: Send + Sync {
    /// The used ring of `queue` has new entries.
    fn queue_irq(&self, queue: u16);
    /// The configuration (or the device status, e.g. NEEDS_RESET) changed.
    fn config_irq(&self);
}

/// An [`IrqSender`] writing one eventfd per queue plus one for configuration changes — the shape
/// of irqfds with MSI routes.
pub struct EventFdIrq {
    /// One eventfd per queue.
    pub queues: Vec<EventFd>,
    /// The configuration-change eventfd.
    pub config: EventFd,
}

impl EventFdIrq {
    /// `n` queue eventfds and a config eventfd, non-blocking.
    pub fn new(n: usize) -> std::io::Result<Self> {
        let queues = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(EventFdIrq {
            queues,
            config: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
}

impl IrqSender for EventFdIrq {
    fn queue_irq(&self, queue: u16) {
        if let Some(fd) = self.queues.get(usize::from(queue))
            && let Err(e) = fd.write(1)
        {
            log::warn!("queue {queue} interrupt: {e}");
        }
    }

    fn config_irq(&self) {
        if let Err(e) = self.config.write(1) {
            log::warn!("config interrupt: {e}");
        }
    }
}
