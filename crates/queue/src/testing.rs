//! A test driver: lays out and drives split and packed rings in guest memory the way a guest
//! driver (Linux's virtio_ring) does, so devices and backends can be tested through real rings.
//! Also offers raw writers for hostile-driver tests. Enable with the `test-driver` feature.

use std::collections::HashMap;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::packed::{
    DESC_F_AVAIL, DESC_F_USED, EVENT_FLAGS_DESC, EVENT_FLAGS_DISABLE, EVENT_FLAGS_ENABLE,
};
use crate::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueConfig, QueueFormat, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
};

/// Bytes of buffer space each driver manages after its rings.
pub const DATA_SIZE: u64 = 1 << 20;

struct InFlight {
    descs: Vec<u16>,
    ndesc: u16,
    writable: Vec<(u64, u32)>,
}

/// The guest side of one virtqueue, in any vm-memory [`GuestMemory`].
pub struct TestDriver<'a, M: GuestMemory = GuestMemoryMmap> {
    mem: &'a M,
    format: QueueFormat,
    size: u16,
    features: u64,
    desc: u64,
    driver: u64,
    device: u64,
    data: u64,
    data_next: u64,
    free: Vec<u16>,
    next_avail: u64,
    last_used: u64,
    kick_old: u64,
    in_flight: HashMap<u16, InFlight>,
    used_len: HashMap<u16, u32>,
    done: HashMap<u16, Vec<(u64, u32)>>,
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl<'a, M: GuestMemory> TestDriver<'a, M> {
    /// A driver for a queue of `size` entries whose rings start at `base`, followed by
    /// [`DATA_SIZE`] bytes of buffers. `features` may hold VIRTIO_F_EVENT_IDX and
    /// VIRTIO_F_INDIRECT_DESC (as bits); the ring format adds VIRTIO_F_RING_PACKED itself.
    pub fn new(mem: &'a M, format: QueueFormat, size: u16, base: u64, features: u64) -> Self {
        let n = u64::from(size);
        let desc = base;
        let driver = desc + 16 * n;
        let device = align(driver + 6 + 2 * n, 4);
        let data = align(device + 6 + 8 * n, 4096);
        let features = match format {
            QueueFormat::Packed => features | (1 << VIRTIO_F_RING_PACKED),
            QueueFormat::Split => features,
        };
        // Zero the rings, as a driver allocating them does.
        let zeros = vec![0u8; (data - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base)).unwrap();
        TestDriver {
            mem,
            format,
            size,
            features,
            desc,
            driver,
            device,
            data,
            data_next: data,
            free: (0..size).rev().collect(),
            next_avail: 0,
            last_used: 0,
            kick_old: 0,
            in_flight: HashMap::new(),
            used_len: HashMap::new(),
            done: HashMap::new(),
        }
    }

    /// The queue registers the driver would program.
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc: self.desc,
            driver: self.driver,
            device: self.device,
        }
    }

    /// The features this driver negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    fn wrap(&self, abs: u64) -> bool {
        (abs / u64::from(self.size)).is_multiple_of(2)
    }

    fn slot(&self, abs: u64) -> u64 {
        self.desc + (abs % u64::from(self.size)) * 16
    }

    /// Allocates `len` bytes of buffer space (wrapping around the data area).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = align(len.max(1), 16);
        assert!(len <= DATA_SIZE, "buffer larger than the data area");
        if self.data_next + len > self.data + DATA_SIZE {
            self.data_next = self.data;
        }
        let at = self.data_next;
        self.data_next += len;
        at
    }

    /// Writes bytes into guest memory.
    pub fn write_mem(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    /// Reads bytes from guest memory.
    pub fn read_mem(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn write_split_desc(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_mem(table + u64::from(idx) * 16, &b);
    }

    fn write_packed_desc(&self, at: u64, addr: u64, len: u32, id: u16, flags: u16, release: bool) {
        let mut b = [0u8; 14];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&id.to_le_bytes());
        self.write_mem(at, &b);
        let order = if release {
            Ordering::Release
        } else {
            Ordering::Relaxed
        };
        self.mem
            .store(flags.to_le(), GuestAddress(at + 14), order)
            .unwrap();
    }

    fn publish_split(&mut self, head: u16) {
        let idx = self.next_avail as u16;
        let at = self.driver + 4 + u64::from(idx % self.size) * 2;
        self.write_mem(at, &head.to_le_bytes());
        self.next_avail += 1;
        // Release: the ring entry and descriptors before the index that publishes them.
        self.mem
            .store(
                (self.next_avail as u16).to_le(),
                GuestAddress(self.driver + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    fn packed_flags(&self, abs: u64, flags: u16) -> u16 {
        if self.wrap(abs) {
            flags | DESC_F_AVAIL
        } else {
            flags | DESC_F_USED
        }
    }

    /// Adds a chain of `readable` buffers (with these contents) and `writable` buffers (of these
    /// sizes). Uses an indirect table when VIRTIO_F_INDIRECT_DESC was negotiated and the chain
    /// has more than one buffer. Returns the chain's ID, or `None` when the ring is full.
    pub fn add(&mut self, readable: &[&[u8]], writable: &[u32]) -> Option<u16> {
        let mut bufs: Vec<(u64, u32, u16)> = Vec::new();
        for r in readable {
            let at = self.alloc(r.len() as u64);
            self.write_mem(at, r);
            bufs.push((at, r.len() as u32, 0));
        }
        let mut wr = Vec::new();
        for &w in writable {
            // Like a guest's receive buffers, these are not cleared: the device fills them.
            let at = self.alloc(u64::from(w));
            bufs.push((at, w, DESC_F_WRITE));
            wr.push((at, w));
        }
        let indirect = self.has(VIRTIO_F_INDIRECT_DESC) && bufs.len() > 1;
        let ring_descs = if indirect { 1 } else { bufs.len() };
        match self.format {
            QueueFormat::Split => {
                if self.free.len() < ring_descs {
                    return None;
                }
                let idxs: Vec<u16> = (0..ring_descs).map(|_| self.free.pop().unwrap()).collect();
                if indirect {
                    let table = self.alloc(16 * bufs.len() as u64);
                    for (i, (a, l, f)) in bufs.iter().enumerate() {
                        let last = i + 1 == bufs.len();
                        let flags = f | if last { 0 } else { DESC_F_NEXT };
                        self.write_split_desc(table, i as u16, *a, *l, flags, i as u16 + 1);
                    }
                    let len = 16 * bufs.len() as u32;
                    self.write_split_desc(self.desc, idxs[0], table, len, DESC_F_INDIRECT, 0);
                } else {
                    for (i, (a, l, f)) in bufs.iter().enumerate() {
                        let last = i + 1 == bufs.len();
                        let flags = f | if last { 0 } else { DESC_F_NEXT };
                        let next = if last { 0 } else { idxs[i + 1] };
                        self.write_split_desc(self.desc, idxs[i], *a, *l, flags, next);
                    }
                }
                let head = idxs[0];
                self.in_flight.insert(
                    head,
                    InFlight {
                        descs: idxs,
                        ndesc: ring_descs as u16,
                        writable: wr,
                    },
                );
                self.publish_split(head);
                Some(head)
            }
            QueueFormat::Packed => {
                let used_slots: u64 = self.in_flight.values().map(|f| u64::from(f.ndesc)).sum();
                if self.free.is_empty() || used_slots + ring_descs as u64 > u64::from(self.size) {
                    return None;
                }
                let id = self.free.pop().unwrap();
                let start = self.next_avail;
                let entries: Vec<(u64, u32, u16)> = if indirect {
                    let table = self.alloc(16 * bufs.len() as u64);
                    for (i, (a, l, f)) in bufs.iter().enumerate() {
                        let mut b = [0u8; 16];
                        b[0..8].copy_from_slice(&a.to_le_bytes());
                        b[8..12].copy_from_slice(&l.to_le_bytes());
                        b[14..16].copy_from_slice(&f.to_le_bytes());
                        self.write_mem(table + i as u64 * 16, &b);
                    }
                    vec![(table, 16 * bufs.len() as u32, DESC_F_INDIRECT)]
                } else {
                    bufs.clone()
                };
                // Every descriptor but the head first; the head's flags last, with release.
                for (i, (a, l, f)) in entries.iter().enumerate().rev() {
                    let abs = start + i as u64;
                    let last = i + 1 == entries.len();
                    let flags = self.packed_flags(abs, f | if last { 0 } else { DESC_F_NEXT });
                    self.write_packed_desc(self.slot(abs), *a, *l, id, flags, i == 0);
                }
                self.next_avail += entries.len() as u64;
                self.in_flight.insert(
                    id,
                    InFlight {
                        descs: Vec::new(),
                        ndesc: entries.len() as u16,
                        writable: wr,
                    },
                );
                Some(id)
            }
        }
    }

    /// The next used chain: (ID, bytes written), or `None`.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let (id, len, advance) = match self.format {
            QueueFormat::Split => {
                let idx: u16 = self
                    .mem
                    .load(GuestAddress(self.device + 2), Ordering::Acquire)
                    .map(u16::from_le)
                    .unwrap();
                if idx == self.last_used as u16 {
                    return None;
                }
                let at = self.device + 4 + (self.last_used % u64::from(self.size)) * 8;
                let e = self.read_mem(at, 8);
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap()) as u16;
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                (id, len, 1)
            }
            QueueFormat::Packed => {
                let at = self.slot(self.last_used);
                let flags: u16 = self
                    .mem
                    .load(GuestAddress(at + 14), Ordering::Acquire)
                    .map(u16::from_le)
                    .unwrap();
                let w = self.wrap(self.last_used);
                if (flags & DESC_F_AVAIL != 0) != w || (flags & DESC_F_USED != 0) != w {
                    return None;
                }
                let e = self.read_mem(at + 8, 6);
                let len = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let id = u16::from_le_bytes([e[4], e[5]]);
                let n = self.in_flight.get(&id).map(|f| f.ndesc).unwrap_or(1);
                (id, len, u64::from(n))
            }
        };
        self.last_used += advance;
        let f = self
            .in_flight
            .remove(&id)
            .unwrap_or_else(|| panic!("device returned chain {id}, which is not in flight"));
        match self.format {
            QueueFormat::Split => self.free.extend(f.descs.iter().rev()),
            QueueFormat::Packed => self.free.push(id),
        }
        self.used_len.insert(id, len);
        self.done.insert(id, f.writable);
        Some((id, len))
    }

    /// Whether the device has returned a chain that [`TestDriver::used`] has not yet read.
    pub fn used_pending(&self) -> bool {
        fence(Ordering::SeqCst);
        match self.format {
            QueueFormat::Split => {
                let idx = u16::from_le_bytes(self.read_mem(self.device + 2, 2).try_into().unwrap());
                idx != self.last_used as u16
            }
            QueueFormat::Packed => {
                let at = self.slot(self.last_used);
                let flags = u16::from_le_bytes(self.read_mem(at + 14, 2).try_into().unwrap());
                let w = self.wrap(self.last_used);
                (flags & DESC_F_AVAIL != 0) == w && (flags & DESC_F_USED != 0) == w
            }
        }
    }

    /// The first `len` bytes (as reported in the used ring) of a completed chain's writable
    /// buffers.
    pub fn written(&self, id: u16) -> Vec<u8> {
        let mut left = self.used_len.get(&id).copied().unwrap_or(0) as usize;
        let mut out = Vec::new();
        for &(a, l) in self.done.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
            let n = left.min(l as usize);
            out.extend(self.read_mem(a, n));
            left -= n;
        }
        out
    }

    /// The writable buffers `(gpa, len)` of a completed chain.
    pub fn writable(&self, id: u16) -> &[(u64, u32)] {
        self.done.get(&id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether the device asked to be notified about the chains added since the last call
    /// (notification suppression, with EVENT_IDX when negotiated).
    pub fn kick_needed(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let (old, new) = (self.kick_old, self.next_avail);
        self.kick_old = new;
        match self.format {
            QueueFormat::Split => {
                if self.has(VIRTIO_F_EVENT_IDX) {
                    let at = self.device + 4 + 8 * u64::from(self.size);
                    let ev = u16::from_le_bytes(self.read_mem(at, 2).try_into().unwrap());
                    let (new, old) = (new as u16, old as u16);
                    new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
                } else {
                    let flags =
                        u16::from_le_bytes(self.read_mem(self.device, 2).try_into().unwrap());
                    flags & 1 == 0
                }
            }
            QueueFormat::Packed => {
                let e = self.read_mem(self.device, 4);
                let off_wrap = u16::from_le_bytes([e[0], e[1]]);
                match u16::from_le_bytes([e[2], e[3]]) & 3 {
                    EVENT_FLAGS_DISABLE => false,
                    EVENT_FLAGS_DESC => {
                        let size = u64::from(self.size);
                        let lap = new / size;
                        let wrap = off_wrap & 0x8000 != 0;
                        let lap = if self.wrap(lap * size) == wrap {
                            lap
                        } else {
                            lap.saturating_sub(1)
                        };
                        let event = lap * size + u64::from(off_wrap & 0x7fff);
                        old <= event && event < new
                    }
                    _ => true,
                }
            }
        }
    }

    /// Turns device interrupts on or off (the "no interrupt" flag / event suppression).
    pub fn set_interrupts(&self, enabled: bool) {
        match self.format {
            QueueFormat::Split => {
                self.write_mem(self.driver, &u16::from(!enabled).to_le_bytes());
            }
            QueueFormat::Packed => {
                let f = if enabled {
                    EVENT_FLAGS_ENABLE
                } else {
                    EVENT_FLAGS_DISABLE
                };
                self.write_mem(self.driver + 2, &f.to_le_bytes());
            }
        }
        fence(Ordering::SeqCst);
    }

    /// With EVENT_IDX: asks for an interrupt once the used ring reaches `count` completions
    /// (split) or descriptor slots (packed) since the queue started.
    pub fn set_used_event(&self, count: u64) {
        match self.format {
            QueueFormat::Split => {
                let at = self.driver + 4 + 2 * u64::from(self.size);
                self.write_mem(at, &(count as u16).to_le_bytes());
            }
            QueueFormat::Packed => {
                let off = (count % u64::from(self.size)) as u16;
                let off_wrap = off | if self.wrap(count) { 0x8000 } else { 0 };
                self.write_mem(self.driver, &off_wrap.to_le_bytes());
                self.write_mem(self.driver + 2, &EVENT_FLAGS_DESC.to_le_bytes());
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Hostile split driver: writes raw descriptors `(index, addr, len, flags, next)` and
    /// publishes `head`.
    pub fn split_raw(&mut self, descs: &[(u16, u64, u32, u16, u16)], head: u16) {
        for &(i, a, l, f, n) in descs {
            self.write_split_desc(self.desc, i, a, l, f, n);
        }
        self.publish_split(head);
    }

    /// Hostile split driver: writes an arbitrary available index.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.next_avail = u64::from(idx);
        self.write_mem(self.driver + 2, &idx.to_le_bytes());
    }

    /// Hostile packed driver: writes raw descriptors `(addr, len, id, flags)` at the next ring
    /// positions (the AVAIL/USED bits are added), head last.
    pub fn packed_raw(&mut self, descs: &[(u64, u32, u16, u16)]) {
        let start = self.next_avail;
        for (i, &(a, l, id, f)) in descs.iter().enumerate().rev() {
            let abs = start + i as u64;
            let flags = self.packed_flags(abs, f);
            self.write_packed_desc(self.slot(abs), a, l, id, flags, i == 0);
        }
        self.next_avail += descs.len() as u64;
    }

    /// Writes a raw indirect table of `(addr, len, flags, next)` entries; returns its address.
    pub fn indirect_table(&mut self, entries: &[(u64, u32, u16, u16)]) -> u64 {
        let table = self.alloc(16 * entries.len() as u64);
        for (i, &(a, l, f, n)) in entries.iter().enumerate() {
            self.write_split_desc(table, i as u16, a, l, f, n);
        }
        table
    }
}
