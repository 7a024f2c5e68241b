//! The device side of virtio: identity, features, config space, and per-chain work.

use std::os::fd::RawFd;

use alioth_queue::{ChainToken, DescChain, Iov};
use vm_memory::GuestMemoryMmap;

use crate::Result;

/// Virtio device IDs (virtio 1.2 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DeviceId {
    /// Network card.
    Net = 1,
    /// Block device.
    Block = 2,
    /// Console.
    Console = 3,
    /// Entropy source.
    Entropy = 4,
    /// Memory balloon.
    Balloon = 5,
    /// Socket device.
    Vsock = 19,
}

/// What every virtio device tells the transport.
pub trait Virtio: Send + 'static {
    /// A name for logs (`virtio-blk0`).
    fn name(&self) -> &str;
    /// The device type.
    fn device_id(&self) -> DeviceId;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn device_features(&self) -> u64;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The device-specific configuration space.
    fn config(&self) -> &[u8];
    /// Called when the driver sets DRIVER_OK, with the negotiated features.
    fn activate(&mut self, features: u64) -> Result<()> {
        let _ = features;
        Ok(())
    }
    /// Called on a device reset, after in-flight requests have completed.
    fn reset(&mut self) {}
    /// Called once after [`Virtio::activate`] when the device continues a snapshot in a new
    /// process: host-side state it could not keep (vsock's connections) is gone, and the
    /// driver may need telling.
    fn restored(&mut self) {}
}

/// What the transport needs to know of a device (taken before the device moves into its worker).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Name for logs.
    pub name: String,
    /// Device type.
    pub id: DeviceId,
    /// Offered features.
    pub features: u64,
    /// Queue maximum sizes.
    pub max_sizes: Vec<u16>,
    /// Configuration space.
    pub config: Vec<u8>,
}

impl DeviceInfo {
    /// A snapshot of `dev`.
    pub fn of<D: Virtio + ?Sized>(dev: &D) -> Self {
        DeviceInfo {
            name: dev.name().to_string(),
            id: dev.device_id(),
            features: dev.device_features(),
            max_sizes: dev.queue_max_sizes(),
            config: dev.config().to_vec(),
        }
    }
}

/// Host I/O a chain needs, performed by the backend.
#[derive(Debug)]
pub enum IoOp {
    /// Read into guest buffers at a file offset.
    Readv {
        /// File descriptor.
        fd: RawFd,
        /// Destination buffers (device-writable guest memory).
        iovs: Vec<Iov>,
        /// File offset.
        offset: u64,
    },
    /// Write guest buffers at a file offset.
    Writev {
        /// File descriptor.
        fd: RawFd,
        /// Source buffers (device-readable guest memory).
        iovs: Vec<Iov>,
        /// File offset.
        offset: u64,
    },
    /// Flush to stable storage.
    Fsync {
        /// File descriptor.
        fd: RawFd,
        /// `fdatasync` instead of `fsync`.
        datasync: bool,
    },
    /// Write guest buffers to a packet or stream descriptor (a tap queue) in one call, at its
    /// current position: one packet per call, never continued.
    Send {
        /// File descriptor.
        fd: RawFd,
        /// Source buffers (device-readable guest memory).
        iovs: Vec<Iov>,
    },
    /// Read one packet from a packet or stream descriptor (a tap queue) into guest buffers, at
    /// its current position. On a non-blocking descriptor with nothing to read it fails with
    /// `WouldBlock`; the backend then waits for the device's [`ChainHandler::event_fds`].
    Recv {
        /// File descriptor.
        fd: RawFd,
        /// Destination buffers (device-writable guest memory).
        iovs: Vec<Iov>,
    },
    /// `fallocate(fd, mode, offset, len)`: punch holes, zero ranges.
    Fallocate {
        /// File descriptor.
        fd: RawFd,
        /// Mode flags (`FALLOC_FL_*`).
        mode: i32,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Nothing for the host to do: the device already filled held chains itself (a socket
    /// device's non-blocking I/O, a control packet it generated). Only returned by
    /// [`ChainHandler::poll_io`]; the backend calls [`ChainHandler::io_done`] with `Ok(0)` at
    /// once.
    Nop,
}

impl IoOp {
    /// The operation's buffer list, if it has one (to give back through
    /// [`ChainHandler::recycle_iovs`] once the operation no longer needs it).
    pub fn into_iovs(self) -> Option<Vec<Iov>> {
        match self {
            IoOp::Readv { iovs, .. }
            | IoOp::Writev { iovs, .. }
            | IoOp::Send { iovs, .. }
            | IoOp::Recv { iovs, .. } => Some(iovs),
            _ => None,
        }
    }

    /// Bytes the operation transfers when it completes fully (0 for flushes and fallocate).
    pub fn transfer_len(&self) -> usize {
        match self {
            IoOp::Readv { iovs, .. }
            | IoOp::Writev { iovs, .. }
            | IoOp::Send { iovs, .. }
            | IoOp::Recv { iovs, .. } => iovs.iter().map(|i| i.len() as usize).sum(),
            _ => 0,
        }
    }
}

/// What a device decided for a chain.
#[derive(Debug)]
pub enum BufferAction {
    /// Perform this I/O, then call [`ChainHandler::complete`].
    Io(IoOp),
    /// Done: this many bytes were written to the chain's writable buffers.
    Written(u32),
    /// The chain breaks the device's protocol so badly that no status can be reported (for
    /// example, no room for the status byte): the device needs a reset.
    Invalid(String),
    /// The device keeps the chain (a receive buffer) for I/O it starts itself, and returns it
    /// through [`ChainHandler::io_done`].
    Hold,
    /// Not now (a rate limit): the backend puts the chain back in its ring and does not look
    /// at this queue again before the duration has passed.
    Throttle(std::time::Duration),
}

/// Per-chain work of a device, shared by every backend.
pub trait ChainHandler: Virtio {
    /// Decides what chain `chain` popped from queue `queue` needs.
    fn handle(&mut self, queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction;
    /// Finishes a chain whose [`IoOp`] completed with `result` (bytes transferred); returns the
    /// bytes written to the chain's writable buffers.
    fn complete(
        &mut self,
        queue: u16,
        chain: &DescChain,
        mem: &GuestMemoryMmap,
        result: std::io::Result<usize>,
    ) -> u32;

    /// Takes back the buffer list of an [`IoOp`] the backend has started (the kernel has its
    /// own copy), so that the device can reuse its allocation for a later operation.
    fn recycle_iovs(&mut self, iovs: Vec<Iov>) {
        drop(iovs);
    }

    /// I/O the device starts by itself on `queue` rather than for one chain: a read from a tap
    /// into receive buffers it holds ([`BufferAction::Hold`]). The backend calls it after
    /// popping the queue's chains, after each [`ChainHandler::io_done`], and when one of the
    /// queue's [`ChainHandler::event_fds`] becomes readable, until it returns `None`.
    fn poll_io(&mut self, queue: u16, mem: &GuestMemoryMmap) -> Option<IoOp> {
        let _ = (queue, mem);
        None
    }

    /// Finishes an operation from [`ChainHandler::poll_io`] that completed with `result`;
    /// pushes the held chains it filled, with the bytes written to each, onto `used`. A
    /// `WouldBlock` result means nothing was read: the backend waits for the event fds before
    /// polling the queue again.
    fn io_done(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
        result: std::io::Result<usize>,
        used: &mut Vec<(DescChain, u32)>,
    ) {
        let _ = (queue, mem, result, used);
    }

    /// Host descriptors whose readability means [`ChainHandler::poll_io`] of a queue may have
    /// work again: (descriptor, queue).
    fn event_fds(&self) -> Vec<(RawFd, u16)> {
        Vec::new()
    }

    /// Whether the device's event fds signal new work whatever its last operation returned:
    /// it drains them itself (a socket device behind its own epoll), so the backend watches
    /// them whenever [`ChainHandler::poll_io`] has nothing, not only after a read would block.
    fn event_driven(&self) -> bool {
        false
    }

    /// After [`ChainHandler::poll_io`] returned `None`: how long the device's own I/O on
    /// `queue` waits for a rate limit, if that is why. The backend then leaves the queue alone
    /// (kicks, polling, event fds) for that long, as for [`BufferAction::Throttle`].
    fn io_throttle(&mut self, queue: u16) -> Option<std::time::Duration> {
        let _ = queue;
        None
    }

    /// The chains of `queue` the device holds ([`BufferAction::Hold`]), in the order it popped
    /// them (they are the queue's most recent pops). A snapshot's ring position excludes them,
    /// so that the restored device pops them again.
    fn held(&self, queue: u16) -> Vec<ChainToken> {
        let _ = queue;
        Vec::new()
    }
}
