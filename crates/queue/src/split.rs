//! The split virtqueue, on rust-vmm's `virtio-queue`.
//!
//! `virtio-queue` owns the available and used rings (indices, memory ordering, EVENT_IDX in both
//! directions). The descriptor walk is Alioth's own: `virtio-queue`'s chain iterator stops
//! silently on a cycle, an out-of-range index or a nested indirect table, which would turn a
//! malformed chain into a shorter, valid-looking one. Here each of those is an error.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::chain::{ChainBuilder, ChainPool, ChainToken, InFlight, check_area};
use crate::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DescChain, QueueConfig, QueueError, QueueFormat,
    Result, VirtQueue,
};

/// A split virtqueue.
pub struct SplitQueue {
    q: Queue,
    size: u16,
    event_idx: bool,
    indirect: bool,
    in_flight: InFlight,
    pool: ChainPool,
    /// The driver's available index as last read: chains up to it are published, so popping
    /// them needs no new read of the index (one acquire load per batch, as Linux does).
    avail_seen: u16,
}

impl SplitQueue {
    /// A queue of the driver's `config`, at most `max_size` entries; `indirect` and `event_idx`
    /// are the negotiated features.
    pub fn new<M: GuestMemory>(
        max_size: u16,
        config: QueueConfig,
        indirect: bool,
        event_idx: bool,
        mem: &M,
    ) -> Result<Self> {
        let size = config.size;
        if size == 0 || size > max_size || !size.is_power_of_two() {
            return Err(QueueError::BadSize {
                size,
                max: max_size,
                split: true,
            });
        }
        let n = u64::from(size);
        check_area(mem, "descriptor table", config.desc, 16 * n, 16)?;
        check_area(mem, "available ring", config.driver, 6 + 2 * n, 2)?;
        check_area(mem, "used ring", config.device, 6 + 8 * n, 4)?;
        let bad_size = QueueError::BadSize {
            size,
            max: max_size,
            split: true,
        };
        let mut q = Queue::new(size).map_err(|_| bad_size.clone())?;
        q.try_set_size(size).map_err(|_| bad_size)?;
        q.set_desc_table_address(Some(config.desc as u32), Some((config.desc >> 32) as u32));
        q.set_avail_ring_address(
            Some(config.driver as u32),
            Some((config.driver >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(config.device as u32),
            Some((config.device >> 32) as u32),
        );
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Ok(SplitQueue {
            q,
            size,
            event_idx,
            indirect,
            in_flight: InFlight::new(usize::from(size)),
            pool: ChainPool::default(),
            avail_seen: 0,
        })
    }

    /// The driver's available index (acquire: the ring entries before it are visible after).
    fn avail_idx<M: GuestMemory>(&self, mem: &M) -> Result<u16> {
        let at = self.q.avail_ring() + 2;
        if let Some(p) = crate::chain::host_range(mem, at, 2) {
            // SAFETY: `host_range` checked that 2 bytes at `p` are guest RAM mapped while `mem`
            // is borrowed; the available ring is 2-aligned (checked at creation, and `at` is
            // the ring + 2). The guest writes it concurrently: an atomic load.
            let idx = unsafe { std::sync::atomic::AtomicU16::from_ptr(p.cast()) };
            return Ok(u16::from_le(idx.load(Ordering::Acquire)));
        }
        self.q
            .avail_idx(mem, Ordering::Acquire)
            .map(|w| w.0)
            .map_err(|_| QueueError::Memory(self.q.avail_ring()))
    }

    /// The head index in available-ring entry `pos` (modulo the size).
    fn avail_entry<M: GuestMemory>(&self, mem: &M, pos: u16) -> Result<u16> {
        let at = self.q.avail_ring() + 4 + 2 * u64::from(pos % self.size);
        if let Some(p) = crate::chain::host_range(mem, at, 2) {
            // SAFETY: as in `avail_idx`: 2 mapped, 2-aligned bytes of the ring.
            let v = unsafe { std::ptr::read_volatile(p.cast::<u16>()) };
            return Ok(u16::from_le(v));
        }
        mem.read_obj::<u16>(GuestAddress(at))
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(at))
    }

    fn read_desc<M: GuestMemory>(mem: &M, table: u64, idx: u16) -> Result<Descriptor> {
        let at = table + u64::from(idx) * 16;
        let Some(src) = crate::chain::host_range(mem, at, 16) else {
            return mem
                .read_obj(GuestAddress(at))
                .map_err(|_| QueueError::Memory(at));
        };
        // SAFETY: `host_range` checked that 16 bytes at `src` are guest RAM mapped while `mem`
        // is borrowed; [u8; 16] has no alignment. Volatile: the guest may be writing it.
        let b: [u8; 16] = unsafe { std::ptr::read_volatile(src.cast::<[u8; 16]>()) };
        let le =
            |r: std::ops::Range<usize>| b[r].iter().rev().fold(0u64, |v, x| v << 8 | u64::from(*x));
        Ok(Descriptor::new(
            le(0..8),
            le(8..12) as u32,
            le(12..14) as u16,
            le(14..16) as u16,
        ))
    }

    /// Walks from `start` in a table of `len` descriptors at `table`.
    fn walk<M: GuestMemory>(
        &self,
        mem: &M,
        b: &mut ChainBuilder,
        table: u64,
        len: u16,
        start: u16,
        nested: bool,
    ) -> Result<()> {
        let head = b.head();
        let mut idx = start;
        loop {
            if idx >= len {
                return Err(QueueError::BadIndex { head });
            }
            let d = Self::read_desc(mem, table, idx)?;
            let flags = d.flags();
            if flags & DESC_F_INDIRECT != 0 {
                if nested || !self.indirect || flags & DESC_F_NEXT != 0 {
                    return Err(QueueError::BadIndirect { head });
                }
                let bytes = d.len();
                let entries = bytes / 16;
                if bytes % 16 != 0 || entries == 0 || entries > u32::from(u16::MAX) {
                    return Err(QueueError::BadIndirect { head });
                }
                let addr = d.addr().0;
                if !mem.check_range(
                    GuestAddress(addr),
                    bytes as usize,
                    vm_memory::Permissions::Read,
                ) {
                    return Err(QueueError::OutsideRam {
                        head,
                        addr,
                        len: bytes,
                    });
                }
                return self.walk(mem, b, addr, entries as u16, 0, true);
            }
            b.push(mem, d.addr().0, d.len(), flags & DESC_F_WRITE != 0)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            idx = d.next();
        }
    }
}

impl VirtQueue for SplitQueue {
    fn format(&self) -> QueueFormat {
        QueueFormat::Split
    }

    fn size(&self) -> u16 {
        self.size
    }

    fn recycle(&mut self, chain: DescChain) {
        self.pool.give(chain);
    }

    fn has_available<M: GuestMemory>(&self, mem: &M) -> Result<bool> {
        let next = self.q.next_avail();
        Ok(self.avail_seen != next || self.avail_idx(mem)? != next)
    }

    fn pop<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<DescChain>> {
        let next = self.q.next_avail();
        if self.avail_seen == next {
            let avail = self.avail_idx(mem)?;
            let pending = avail.wrapping_sub(next);
            if pending > self.size {
                return Err(QueueError::BadAvailIndex(pending));
            }
            if pending == 0 {
                return Ok(None);
            }
            self.avail_seen = avail;
        }
        // (The walk refuses a head beyond the table.)
        let head = self.avail_entry(mem, next)?;
        self.q.set_next_avail(next.wrapping_add(1));
        let mut b = ChainBuilder::new(head, self.size, self.pool.take());
        self.walk(mem, &mut b, self.q.desc_table(), self.size, head, false)?;
        if !self.in_flight.insert(head) {
            return Err(QueueError::AlreadyInFlight(head));
        }
        Ok(Some(b.finish(head, 1)))
    }

    fn push_used<M: GuestMemory>(&mut self, mem: &M, chain: &DescChain, len: u32) -> Result<()> {
        let token = chain.token();
        if !self.in_flight.remove(token.id) {
            return Err(QueueError::NotInFlight(token.id));
        }
        chain.mark_written(mem, len);
        self.q
            .add_used(mem, token.id, len)
            .map_err(|_| QueueError::Memory(self.q.used_ring()))?;
        Ok(())
    }

    fn needs_interrupt<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        let avail = self.q.avail_ring();
        // Fences, then decides by used_event when EVENT_IDX is on.
        let wants = self
            .q
            .needs_notification(mem)
            .map_err(|_| QueueError::Memory(avail))?;
        if self.event_idx || !wants {
            return Ok(wants);
        }
        // virtio-queue does not look at VRING_AVAIL_F_NO_INTERRUPT; without EVENT_IDX it is
        // how the driver suppresses interrupts.
        const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
        let flags: u16 = mem
            .load(GuestAddress(avail), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(avail))?;
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }

    fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        self.q
            .enable_notification(mem)
            .map_err(|_| QueueError::Memory(self.q.used_ring()))
    }

    fn disable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<()> {
        if self.event_idx {
            // With EVENT_IDX the driver ignores the flags; an avail_event just behind our
            // position is one its index will not cross again (until 2^16 more chains).
            let at = self.q.used_ring() + 4 + 8 * u64::from(self.size);
            let behind = self.q.next_avail().wrapping_sub(1);
            return mem
                .store(behind.to_le(), GuestAddress(at), Ordering::Release)
                .map_err(|_| QueueError::Memory(at));
        }
        self.q
            .disable_notification(mem)
            .map_err(|_| QueueError::Memory(self.q.used_ring()))
    }

    fn ring_base(&self) -> u32 {
        u32::from(self.q.next_avail())
    }

    fn unpop(&mut self, chain: DescChain) -> Result<()> {
        let id = chain.token().id;
        if !self.in_flight.remove(id) {
            return Err(QueueError::NotInFlight(id));
        }
        self.q.set_next_avail(self.q.next_avail().wrapping_sub(1));
        self.pool.give(chain);
        Ok(())
    }

    fn ring_base_before(&self, held: &[ChainToken]) -> u32 {
        u32::from(self.q.next_avail().wrapping_sub(held.len() as u16))
    }

    fn set_ring_base<M: GuestMemory>(&mut self, _mem: &M, base: u32) -> Result<()> {
        // Nothing is in flight, so the used index has caught up with the available one.
        self.q.set_next_avail(base as u16);
        self.q.set_next_used(base as u16);
        self.avail_seen = base as u16;
        Ok(())
    }
}
