//! `alioth-virtio`: the virtio device model.
//!
//! A device implements [`Virtio`] (identity, features, config space, queue shape) and
//! [`ChainHandler`] (what to do with one descriptor chain). It never touches threads, rings or
//! file descriptors' readiness: a [`Worker`] thread runs it under a [`Backend`] — the epoll
//! backend here ([`EpollBackend`]), or io_uring from `alioth-io-uring` — driven by [`WakeEvent`]s
//! from the transport (start with the negotiated features, queues, interrupt sender and
//! ioeventfds; reset; shutdown). [`DeviceStatus`] is the status register's state machine that
//! transports share.
//!
//! A device describes the host I/O a chain needs as an [`IoOp`] instead of performing it; the
//! backend performs it (synchronously for epoll, as an SQE for io_uring) and hands the result to
//! [`ChainHandler::complete`]. One device implementation thus serves every backend.
//!
//! ```
//! use alioth_virtio::{DeviceStatus, StatusBits, StatusChange};
//!
//! // VIRTIO_F_VERSION_1 is bit 32.
//! let mut status = DeviceStatus::new(1 << 32);
//! status.write(StatusBits::ACKNOWLEDGE | StatusBits::DRIVER);
//! status.set_driver_features_word(1, 1);
//! let ok = StatusBits::ACKNOWLEDGE | StatusBits::DRIVER | StatusBits::FEATURES_OK;
//! status.write(ok);
//! assert_eq!(status.write(ok | StatusBits::DRIVER_OK), StatusChange::Activate(1 << 32));
//! ```

mod device;
mod epoll;
pub mod event_set;
mod irq;
mod log_limit;
mod poll;
mod rate_limit;
mod status;
mod worker;

pub use device::{BufferAction, ChainHandler, DeviceId, DeviceInfo, IoOp, Virtio};
pub use epoll::{EpollBackend, execute_sync};
pub use event_set::EventSet;
pub use irq::{EventFdIrq, IrqSender};
pub use log_limit::LogLimiter;
pub use poll::PollWindow;
pub use rate_limit::{RateLimit, RateLimiter};
pub use status::{DeviceStatus, StatusBits, StatusChange};
pub use worker::{
    ActiveBackend, ActiveQueue, Backend, DeviceRunner, QueueSetup, QueueState, ThrottleTimer,
    WakeEvent, Worker, WorkerExit, WorkerState, device_io, next_unthrottle, process_queue,
};

/// The ring features every Alioth device offers: VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED,
/// VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC.
pub const RING_FEATURES: u64 = (1 << alioth_queue::VIRTIO_F_VERSION_1)
    | (1 << alioth_queue::VIRTIO_F_RING_PACKED)
    | (1 << alioth_queue::VIRTIO_F_EVENT_IDX)
    | (1 << alioth_queue::VIRTIO_F_INDIRECT_DESC);

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue the driver configured is invalid.
    #[error("{dev}: queue {queue}: {source}")]
    Queue {
        /// Device name.
        dev: String,
        /// Queue index.
        queue: u16,
        /// What is wrong.
        #[source]
        source: alioth_queue::QueueError,
    },
    /// A chain broke the device's protocol beyond what a status byte can report.
    #[error("{dev}: queue {queue}: {reason}")]
    Protocol {
        /// Device name.
        dev: String,
        /// Queue index.
        queue: u16,
        /// What is wrong.
        reason: String,
    },
    /// A host resource failed (eventfd, epoll, io_uring, thread).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
