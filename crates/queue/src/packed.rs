//! The packed virtqueue (virtio 1.2 §2.8), Alioth's own.
//!
//! Positions are kept as absolute counters (`next_avail`, `next_used` count descriptor slots
//! since the queue started), from which the ring index (`abs % size`) and the wrap counter
//! (`(abs / size)` even = 1) follow. That makes the EVENT_IDX test for interrupts exact across
//! ring wraps.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::chain::{ChainBuilder, ChainPool, ChainToken, InFlight, check_area};
use crate::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DescChain, QueueConfig, QueueError, QueueFormat,
    Result, VirtQueue,
};

/// Packed descriptor flag: available (driver's wrap counter).
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: used (device's wrap counter).
pub const DESC_F_USED: u16 = 1 << 15;
/// Event suppression: notifications enabled.
pub const EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression: notifications disabled.
pub const EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression: notify at the descriptor named by off_wrap (needs EVENT_IDX).
pub const EVENT_FLAGS_DESC: u16 = 2;
/// The largest packed queue.
pub const MAX_PACKED_SIZE: u16 = 1 << 15;

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

/// A packed virtqueue.
pub struct PackedQueue {
    size: u16,
    desc: u64,
    driver_event: u64,
    device_event: u64,
    indirect: bool,
    event_idx: bool,
    next_avail: u64,
    next_used: u64,
    signalled_used: u64,
    in_flight: InFlight,
    pool: ChainPool,
}

impl PackedQueue {
    /// A queue of the driver's `config`, at most `max_size` entries.
    pub fn new<M: GuestMemory>(
        max_size: u16,
        config: QueueConfig,
        indirect: bool,
        event_idx: bool,
        mem: &M,
    ) -> Result<Self> {
        let size = config.size;
        if size == 0 || size > max_size || size > MAX_PACKED_SIZE {
            return Err(QueueError::BadSize {
                size,
                max: max_size.min(MAX_PACKED_SIZE),
                split: false,
            });
        }
        check_area(
            mem,
            "descriptor ring",
            config.desc,
            16 * u64::from(size),
            16,
        )?;
        check_area(mem, "driver event suppression", config.driver, 4, 4)?;
        check_area(mem, "device event suppression", config.device, 4, 4)?;
        Ok(PackedQueue {
            size,
            desc: config.desc,
            driver_event: config.driver,
            device_event: config.device,
            indirect,
            event_idx,
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
            in_flight: InFlight::new(1 << 16),
            pool: ChainPool::default(),
        })
    }

    fn pos(&self, abs: u64) -> u16 {
        (abs % u64::from(self.size)) as u16
    }

    fn wrap(&self, abs: u64) -> bool {
        (abs / u64::from(self.size)).is_multiple_of(2)
    }

    fn slot(&self, abs: u64) -> u64 {
        self.desc + u64::from(self.pos(abs)) * 16
    }

    fn read_raw<M: GuestMemory>(mem: &M, at: u64) -> Result<RawDesc> {
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(at))
            .map_err(|_| QueueError::Memory(at))?;
        Ok(RawDesc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags: u16::from_le_bytes([b[14], b[15]]),
        })
    }

    fn load_u16<M: GuestMemory>(mem: &M, at: u64, order: Ordering) -> Result<u16> {
        mem.load::<u16>(GuestAddress(at), order)
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(at))
    }

    fn store_u16<M: GuestMemory>(mem: &M, at: u64, v: u16, order: Ordering) -> Result<()> {
        mem.store(v.to_le(), GuestAddress(at), order)
            .map_err(|_| QueueError::Memory(at))
    }

    fn is_avail(&self, flags: u16, wrap: bool) -> bool {
        (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
    }

    fn head_available<M: GuestMemory>(&self, mem: &M) -> Result<bool> {
        let flags = Self::load_u16(mem, self.slot(self.next_avail) + 14, Ordering::Acquire)?;
        Ok(self.is_avail(flags, self.wrap(self.next_avail)))
    }

    fn walk_indirect<M: GuestMemory>(
        &self,
        mem: &M,
        b: &mut ChainBuilder,
        d: RawDesc,
    ) -> Result<()> {
        let head = b.head();
        if !self.indirect || d.flags & DESC_F_NEXT != 0 || !d.len.is_multiple_of(16) || d.len == 0 {
            return Err(QueueError::BadIndirect { head });
        }
        let n = d.len / 16;
        if n > u32::from(self.size) {
            return Err(QueueError::TooLong { head });
        }
        if !mem.check_range(
            GuestAddress(d.addr),
            d.len as usize,
            vm_memory::Permissions::Read,
        ) {
            return Err(QueueError::OutsideRam {
                head,
                addr: d.addr,
                len: d.len,
            });
        }
        for i in 0..u64::from(n) {
            let e = Self::read_raw(mem, d.addr + i * 16)?;
            if e.flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::BadIndirect { head });
            }
            b.push(mem, e.addr, e.len, e.flags & DESC_F_WRITE != 0)?;
        }
        Ok(())
    }
}

impl VirtQueue for PackedQueue {
    fn format(&self) -> QueueFormat {
        QueueFormat::Packed
    }

    fn size(&self) -> u16 {
        self.size
    }

    fn recycle(&mut self, chain: DescChain) {
        self.pool.give(chain);
    }

    fn has_available<M: GuestMemory>(&self, mem: &M) -> Result<bool> {
        self.head_available(mem)
    }

    fn pop<M: GuestMemory>(&mut self, mem: &M) -> Result<Option<DescChain>> {
        if !self.head_available(mem)? {
            return Ok(None);
        }
        let head = self.pos(self.next_avail);
        let mut b = ChainBuilder::new(head, self.size, self.pool.take());
        let mut abs = self.next_avail;
        let mut ndesc: u16 = 0;
        let id = loop {
            // The head's flags were loaded with Acquire above; the driver wrote the rest of the
            // chain before it.
            let d = Self::read_raw(mem, self.slot(abs))?;
            ndesc += 1;
            if ndesc > self.size {
                return Err(QueueError::TooLong { head });
            }
            abs += 1;
            if d.flags & DESC_F_INDIRECT != 0 {
                self.walk_indirect(mem, &mut b, d)?;
                break d.id;
            }
            b.push(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0)?;
            if d.flags & DESC_F_NEXT == 0 {
                break d.id;
            }
        };
        self.next_avail = abs;
        if !self.in_flight.insert(id) {
            return Err(QueueError::AlreadyInFlight(id));
        }
        Ok(Some(b.finish(id, ndesc)))
    }

    fn push_used<M: GuestMemory>(&mut self, mem: &M, chain: &DescChain, len: u32) -> Result<()> {
        let token = chain.token();
        if token.ndesc == 0 || !self.in_flight.remove(token.id) {
            return Err(QueueError::NotInFlight(token.id));
        }
        chain.mark_written(mem, len);
        let at = self.slot(self.next_used);
        let mut b = [0u8; 6];
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[4..6].copy_from_slice(&token.id.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at + 8))
            .map_err(|_| QueueError::Memory(at))?;
        let flags = if self.wrap(self.next_used) {
            DESC_F_AVAIL | DESC_F_USED
        } else {
            0
        };
        // Release: the driver must see len and id before the flags that make the entry used.
        Self::store_u16(mem, at + 14, flags, Ordering::Release)?;
        self.next_used += u64::from(token.ndesc);
        Ok(())
    }

    fn needs_interrupt<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        // The used entries must be visible before the driver's suppression state is read.
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.signalled_used, self.next_used);
        let flags = Self::load_u16(mem, self.driver_event + 2, Ordering::Acquire)? & 3;
        Ok(match flags {
            EVENT_FLAGS_DISABLE => false,
            EVENT_FLAGS_DESC if self.event_idx => {
                let off_wrap = Self::load_u16(mem, self.driver_event, Ordering::Acquire)?;
                let off = u64::from(off_wrap & 0x7fff);
                let wrap = off_wrap & 0x8000 != 0;
                let new = self.next_used;
                // The absolute position of the event: in the lap of `new` if its wrap counter
                // matches, otherwise the lap before.
                let size = u64::from(self.size);
                let lap = new / size;
                let lap = if self.wrap(lap * size) == wrap {
                    lap
                } else {
                    lap.saturating_sub(1)
                };
                let event = lap * size + off;
                old <= event && event < new
            }
            _ => true,
        })
    }

    fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        if self.event_idx {
            let off_wrap = self.pos(self.next_avail)
                | if self.wrap(self.next_avail) {
                    0x8000
                } else {
                    0
                };
            Self::store_u16(mem, self.device_event, off_wrap, Ordering::Relaxed)?;
            Self::store_u16(
                mem,
                self.device_event + 2,
                EVENT_FLAGS_DESC,
                Ordering::Relaxed,
            )?;
        } else {
            Self::store_u16(
                mem,
                self.device_event + 2,
                EVENT_FLAGS_ENABLE,
                Ordering::Relaxed,
            )?;
        }
        // The driver must see notifications enabled before we look for work it may have added.
        fence(Ordering::SeqCst);
        self.head_available(mem)
    }

    fn disable_notification<M: GuestMemory>(&mut self, mem: &M) -> Result<()> {
        Self::store_u16(
            mem,
            self.device_event + 2,
            EVENT_FLAGS_DISABLE,
            Ordering::Relaxed,
        )
    }

    fn ring_base(&self) -> u32 {
        let enc = |abs: u64| u32::from(self.pos(abs)) | (u32::from(self.wrap(abs)) << 15);
        enc(self.next_avail) | (enc(self.next_used) << 16)
    }

    fn unpop(&mut self, chain: DescChain) -> Result<()> {
        let token = chain.token();
        if token.ndesc == 0 || !self.in_flight.remove(token.id) {
            return Err(QueueError::NotInFlight(token.id));
        }
        // Absolute positions only grow while popping: this steps back over its descriptors.
        self.next_avail = self.next_avail.wrapping_sub(u64::from(token.ndesc));
        self.pool.give(chain);
        Ok(())
    }

    fn ring_base_before(&self, held: &[ChainToken]) -> u32 {
        let back: u64 = held.iter().map(|t| u64::from(t.ndesc)).sum();
        let enc = |abs: u64| u32::from(self.pos(abs)) | (u32::from(self.wrap(abs)) << 15);
        // Positions repeat every two laps (index and wrap counter): step back modulo that.
        let period = 2 * u64::from(self.size);
        let at = (self.next_avail % period + period * (back / period + 1) - back) % period;
        enc(at) | (enc(self.next_used) << 16)
    }

    fn set_ring_base<M: GuestMemory>(&mut self, mem: &M, base: u32) -> Result<()> {
        let size = u64::from(self.size);
        let dec = |half: u32| {
            let idx = u64::from(half & 0x7fff) % size;
            if half & 0x8000 != 0 { idx } else { idx + size }
        };
        // Base 0 is ambiguous: index 0 after an odd number of laps (wrap counter 0), or what
        // frontends that predate packed rings send for a fresh ring (Linux's virtio_uml does).
        // Descriptor 0 tells: after a lap the device has written it with the USED flag set; in
        // a fresh ring it is zero or only made available (USED clear).
        let base = if base == 0 {
            let flags = Self::read_raw(mem, self.desc)?.flags;
            if flags & DESC_F_USED != 0 { 0 } else { 0x8000 }
        } else {
            base
        };
        let used = if base >> 16 == 0 { base } else { base >> 16 };
        self.next_avail = dec(base & 0xffff);
        self.next_used = dec(used & 0xffff);
        self.signalled_used = self.next_used;
        Ok(())
    }
}
