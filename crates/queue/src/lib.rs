//! `alioth-queue`: virtqueues as a device sees them.
//!
//! [`SplitQueue`] drives the split ring through the rust-vmm `virtio-queue` crate; [`PackedQueue`]
//! is Alioth's own packed ring (virtio 1.2 §2.8). Both implement [`VirtQueue`] and both hand out
//! [`DescChain`]s whose walk is bounded and validated: a cycle, a chain longer than the queue, a
//! nested indirect table, a buffer outside guest RAM, a readable buffer after a writable one or a
//! total length beyond 4 GiB is an error ([`QueueError`]), never a hang or a panic. A device
//! that gets one should fail the request or set NEEDS_RESET.
//!
//! Chains are independent of the ring once popped, so an asynchronous backend can keep one
//! in flight (its slot stays owned by the device) and return it later with
//! [`VirtQueue::push_used`].
//!
//! ```
//! use alioth_queue::testing::TestDriver;
//! use alioth_queue::{QueueFormat, VirtQueue, new_queue};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
//! let mut driver = TestDriver::new(&mem, QueueFormat::Split, 8, 0x10_0000, 0);
//! let id = driver.add(&[b"ping"], &[16]).unwrap();
//! let mut q = new_queue(8, driver.config(), driver.features(), &mem).unwrap();
//! let chain = q.pop(&mem).unwrap().unwrap();
//! assert_eq!(chain.readable_len(), 4);
//! chain.write_at(&mem, 0, b"pong").unwrap();
//! q.push_used(&mem, &chain, 4).unwrap();
//! assert_eq!(driver.used(), Some((id, 4)));
//! assert_eq!(driver.written(id), b"pong");
//! ```

mod chain;
mod packed;
mod split;
#[cfg(any(test, feature = "test-driver"))]
pub mod testing;

pub use chain::{ChainToken, DescChain, Iov};
pub use packed::PackedQueue;
pub use split::SplitQueue;

use vm_memory::GuestMemory;

/// Feature bit: indirect descriptors.
pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event indices.
pub const VIRTIO_F_EVENT_IDX: u32 = 29;
/// Feature bit: virtio 1.0+.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: packed ring.
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// Descriptor flag: the chain continues.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// The ring format of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFormat {
    /// Split virtqueue (descriptor table, available ring, used ring).
    Split,
    /// Packed virtqueue (one descriptor ring plus two event-suppression structures).
    Packed,
}

/// The guest-physical addresses and size a driver programmed for a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Descriptor table / descriptor ring.
    pub desc: u64,
    /// Driver area: available ring (split) or driver event suppression (packed).
    pub driver: u64,
    /// Device area: used ring (split) or device event suppression (packed).
    pub device: u64,
}

/// What can be wrong with a queue or a chain the driver gave us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue size is 0, above the maximum, or (split) not a power of two.
    #[error("invalid queue size {size} (max {max}{})", if *.split { ", power of two" } else { "" })]
    BadSize {
        /// Size asked for.
        size: u16,
        /// Maximum.
        max: u16,
        /// Whether the ring is split (needs a power of two).
        split: bool,
    },
    /// A ring area is misaligned or not inside guest RAM.
    #[error("{area} at {addr:#x} is misaligned or outside guest RAM")]
    BadRing {
        /// Which area.
        area: &'static str,
        /// Its address.
        addr: u64,
    },
    /// The driver published more chains than the queue holds.
    #[error("available index moved by {0}, more than the queue size")]
    BadAvailIndex(u16),
    /// A chain head or next index is outside the table.
    #[error("chain {head}: descriptor index out of range")]
    BadIndex {
        /// Head of the chain.
        head: u16,
    },
    /// The chain loops or is longer than the queue.
    #[error("chain {head}: longer than the queue size or cyclic")]
    TooLong {
        /// Head of the chain.
        head: u16,
    },
    /// An indirect descriptor inside an indirect table, or a malformed table.
    #[error("chain {head}: bad indirect descriptor table")]
    BadIndirect {
        /// Head of the chain.
        head: u16,
    },
    /// A buffer is not (entirely) in guest RAM.
    #[error("chain {head}: buffer {addr:#x}+{len:#x} is outside guest RAM")]
    OutsideRam {
        /// Head of the chain.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The buffers add up to more than 4 GiB.
    #[error("chain {head}: total length overflows 32 bits")]
    LengthOverflow {
        /// Head of the chain.
        head: u16,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("chain {head}: readable buffer after a writable one")]
    ReadableAfterWritable {
        /// Head of the chain.
        head: u16,
    },
    /// A token does not name a chain the device holds.
    #[error("returned chain {0} is not in flight")]
    NotInFlight(u16),
    /// The driver made a chain available whose ID is still in flight.
    #[error("chain {0} was made available again while still in flight")]
    AlreadyInFlight(u16),
    /// Guest memory could not be accessed.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
}

/// Result type of this crate.
pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// A virtqueue from the device's side. `M` is any vm-memory [`GuestMemory`]:
/// `GuestMemoryMmap` with or without a dirty bitmap, or the guard a `GuestMemoryAtomic` hands out.
pub trait VirtQueue: Send {
    /// The ring format.
    fn format(&self) -> QueueFormat;
    /// The queue size.
    fn size(&self) -> u16;
    /// The next available chain, `None` if there is none. An error means the driver broke the
    /// ring's rules; the queue should not be used further until reset.
    ///
    /// The chain's [`Iov`]s point into `mem`'s mappings: they stay valid while `mem` (or a
    /// clone sharing its regions, or the `GuestMemoryAtomic` snapshot it came from) is alive,
    /// so keep it alive until the chain's I/O is done.
    fn pop<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<DescChain>>;
    /// Takes back a chain that has been returned with [`VirtQueue::push_used`], to reuse its
    /// buffer lists for the next chains (dropping it instead is fine, only slower).
    fn recycle(&mut self, chain: DescChain);
    /// Whether the driver has made a chain available that [`VirtQueue::pop`] would return (a
    /// cheap look at one index or descriptor, for polling).
    fn has_available<M: GuestMemory>(&self, mem: &M) -> Result<bool>;
    /// Returns a chain to the driver with `len` bytes written to its writable buffers (which
    /// are marked dirty in `mem`'s bitmap).
    fn push_used<M: GuestMemory>(&mut self, mem: &M, chain: &DescChain, len: u32) -> Result<()>;
    /// After one or more [`VirtQueue::push_used`]: whether the driver wants an interrupt
    /// (EVENT_IDX or the "no interrupt" flag decide).
    fn needs_interrupt<M: GuestMemory>(&mut self, mem: &M) -> Result<bool>;
    /// Asks the driver to notify on new chains; returns whether chains are already waiting.
    fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<bool>;
    /// Asks the driver not to notify (the device is polling).
    fn disable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<()>;
    /// The ring position, encoded as vhost-user's GET_VRING_BASE encodes it: the next available
    /// index; for a packed ring the available wrap counter in bit 15 and the used index and
    /// its wrap counter in bits 16-31. Meaningful when nothing is in flight.
    fn ring_base(&self) -> u32;
    /// Continues a ring at `base` (the encoding of [`VirtQueue::ring_base`]; a packed base
    /// whose used half is 0 takes the available half for both), as vhost-user's
    /// SET_VRING_BASE asks. Only for a queue with nothing in flight.
    fn set_ring_base<M: GuestMemory>(&mut self, mem: &M, base: u32) -> Result<()>;
    /// The [`VirtQueue::ring_base`] the ring would have if the chains of `held` (popped, not
    /// yet returned, the most recent pops in pop order, as a receive queue's device holds
    /// them) had never been popped: where a new device continues so that it pops them again
    /// (a snapshot). The queue itself is unchanged.
    fn ring_base_before(&self, held: &[ChainToken]) -> u32;
    /// Puts back `chain`, which must be the one [`VirtQueue::pop`] returned last: the next pop
    /// returns it again (a device that may not take it yet, such as a rate-limited one, leaves
    /// it in the ring). Fails, changing nothing, for a chain that is not in flight.
    fn unpop(&mut self, chain: DescChain) -> Result<()>;
}

/// A queue of either format, as the driver negotiated it.
pub enum Queue {
    /// A split ring.
    Split(SplitQueue),
    /// A packed ring.
    Packed(PackedQueue),
}

macro_rules! each {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Queue::Split($q) => $e,
            Queue::Packed($q) => $e,
        }
    };
}

impl VirtQueue for Queue {
    fn format(&self) -> QueueFormat {
        each!(self, q => q.format())
    }
    fn size(&self) -> u16 {
        each!(self, q => q.size())
    }
    fn pop<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<DescChain>> {
        each!(self, q => q.pop(mem))
    }
    fn has_available<M: GuestMemory>(&self, mem: &M) -> Result<bool> {
        each!(self, q => q.has_available(mem))
    }
    fn recycle(&mut self, chain: DescChain) {
        each!(self, q => q.recycle(chain))
    }
    fn push_used<M: GuestMemory>(&mut self, mem: &M, chain: &DescChain, len: u32) -> Result<()> {
        each!(self, q => q.push_used(mem, chain, len))
    }
    fn needs_interrupt<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        each!(self, q => q.needs_interrupt(mem))
    }
    fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        each!(self, q => q.enable_notification(mem))
    }
    fn disable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<()> {
        each!(self, q => q.disable_notification(mem))
    }
    fn ring_base(&self) -> u32 {
        each!(self, q => q.ring_base())
    }
    fn set_ring_base<M: GuestMemory>(&mut self, mem: &M, base: u32) -> Result<()> {
        each!(self, q => q.set_ring_base(mem, base))
    }
    fn ring_base_before(&self, held: &[ChainToken]) -> u32 {
        each!(self, q => q.ring_base_before(held))
    }
    fn unpop(&mut self, chain: DescChain) -> Result<()> {
        each!(self, q => q.unpop(chain))
    }
}

/// Builds the queue the driver configured: packed if VIRTIO_F_RING_PACKED is in the negotiated
/// `features`, split otherwise; indirect descriptors and EVENT_IDX as negotiated. The size must
/// be at most `max_size`, and the rings must be aligned and inside guest RAM.
pub fn new_queue<M: GuestMemory>(
    max_size: u16,
    config: QueueConfig,
    features: u64,
    mem: &M,
) -> Result<Queue> {
    let has = |bit: u32| features & (1 << bit) != 0;
    let indirect = has(VIRTIO_F_INDIRECT_DESC);
    let event_idx = has(VIRTIO_F_EVENT_IDX);
    Ok(if has(VIRTIO_F_RING_PACKED) {
        Queue::Packed(PackedQueue::new(
            max_size, config, indirect, event_idx, mem,
        )?)
    } else {
        Queue::Split(SplitQueue::new(max_size, config, indirect, event_idx, mem)?)
    })
}

#[cfg(test)]
#[path = "queue_test.rs"]
mod tests;
