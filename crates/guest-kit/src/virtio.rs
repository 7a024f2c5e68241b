//! A virtio-pci modern driver: capability walk, status handshake, split queues, MSI-X.

use core::sync::atomic::{Ordering, fence};

use crate::{cpu, pci};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;
const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    /// No such device on bus 0.
    NotFound,
    /// A capability is missing.
    NoCapability(#[allow(dead_code)] u8),
    /// The device refused our features.
    FeaturesRefused,
    /// The queue does not exist.
    NoQueue,
}

/// The most queues the kit drives per device.
pub const MAX_QUEUES: usize = 4;

/// A virtio-pci device, brought up with split queues.
pub struct Device {
    common: usize,
    notify: usize,
    notify_mult: u32,
    device_cfg: usize,
    /// Queue `i` uses MSI-X vector `i`, delivered on CPU vector `IRQ_BASE + i`.
    pub queues: [Option<Ring>; MAX_QUEUES],
}

/// A queue in either format. (No allocator: the packed variant's bookkeeping stays inline.)
#[allow(clippy::large_enum_variant)]
pub enum Ring {
    /// Split virtqueue.
    Split(SplitQueue),
    /// Packed virtqueue.
    Packed(PackedQueue),
}

impl Ring {
    /// Publishes a chain; returns its ID.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        match self {
            Ring::Split(q) => q.add(bufs),
            Ring::Packed(q) => q.add(bufs),
        }
    }

    /// Publishes a chain in slot `slot` of `n`-descriptor slots (split rings reuse the slot's
    /// descriptors; packed rings take the next positions anyway). Returns the chain's ID.
    pub fn add_slot(&mut self, slot: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        match self {
            Ring::Split(q) => q.add_at(slot * bufs.len() as u16, bufs),
            Ring::Packed(q) => q.add(bufs),
        }
    }

    /// Asks the device for interrupts, or not (polling mode).
    pub fn set_interrupts(&mut self, on: bool) {
        match self {
            // VRING_AVAIL_F_NO_INTERRUPT
            Ring::Split(q) => w16(q.avail, u16::from(!on)),
            // Driver event suppression: ENABLE (0) or DISABLE (1).
            Ring::Packed(q) => w16(q.driver + 2, u16::from(!on)),
        }
        fence(Ordering::SeqCst);
    }

    /// The next used element (ID, length), if any.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        match self {
            Ring::Split(q) => q.used(),
            Ring::Packed(q) => q.used(),
        }
    }

    /// Publishes a chain that never ends (a cycle, or every slot chained to the next).
    pub fn add_endless_chain(&mut self, buf: u64) {
        match self {
            Ring::Split(q) => {
                q.write_desc(0, buf, 16, DESC_F_NEXT, 1);
                q.write_desc(1, buf, 16, DESC_F_NEXT, 0);
                q.publish(0);
            }
            Ring::Packed(q) => q.add_all_chained(buf),
        }
    }
}

/// A packed virtqueue in the kit's memory (virtio 1.2 §2.8), driver side.
pub struct PackedQueue {
    size: u16,
    desc: usize,
    driver: usize,
    device: usize,
    next_avail: u64,
    last_used: u64,
    ndesc: [u16; 256],
}

impl PackedQueue {
    fn new(base: usize, size: u16) -> Self {
        PackedQueue {
            size,
            desc: base,
            driver: base + 16 * usize::from(size),
            device: base + 16 * usize::from(size) + 16,
            next_avail: 0,
            last_used: 0,
            ndesc: [0; 256],
        }
    }

    fn slot(&self, abs: u64) -> usize {
        self.desc + (abs % u64::from(self.size)) as usize * 16
    }

    fn wrap(&self, abs: u64) -> bool {
        (abs / u64::from(self.size)).is_multiple_of(2)
    }

    fn avail_flags(&self, abs: u64, flags: u16) -> u16 {
        if self.wrap(abs) {
            flags | DESC_F_AVAIL
        } else {
            flags | DESC_F_USED
        }
    }

    /// Publishes a chain; the buffer ID is its first slot. The head's flags go last.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let start = self.next_avail;
        let id = (start % u64::from(self.size)) as u16;
        for (i, &(addr, len, write)) in bufs.iter().enumerate().rev() {
            let abs = start + i as u64;
            let d = self.slot(abs);
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            w64(d, addr);
            w32(d + 8, len);
            w16(d + 12, id);
            if i == 0 {
                fence(Ordering::Release);
            }
            w16(d + 14, self.avail_flags(abs, flags));
        }
        self.ndesc[usize::from(id) % 256] = bufs.len() as u16;
        self.next_avail += bufs.len() as u64;
        id
    }

    /// Makes every slot available, each chained to the next: a chain with no end.
    pub fn add_all_chained(&mut self, buf: u64) {
        let start = self.next_avail;
        for i in (0..u64::from(self.size)).rev() {
            let abs = start + i;
            let d = self.slot(abs);
            w64(d, buf);
            w32(d + 8, 16);
            w16(d + 12, 0);
            if i == 0 {
                fence(Ordering::Release);
            }
            w16(d + 14, self.avail_flags(abs, DESC_F_NEXT));
        }
        self.next_avail += u64::from(self.size);
    }

    /// The next used element (ID, length), if any.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let d = self.slot(self.last_used);
        let flags = r16(d + 14);
        fence(Ordering::Acquire);
        let w = self.wrap(self.last_used);
        if (flags & DESC_F_AVAIL != 0) != w || (flags & DESC_F_USED != 0) != w {
            return None;
        }
        let id = r16(d + 12);
        let len = r32(d + 8);
        self.last_used += u64::from(self.ndesc[usize::from(id) % 256].max(1));
        Some((id, len))
    }
}

fn r8(a: usize) -> u8 {
    // SAFETY: an MMIO register inside the device's BAR, identity-mapped and user-accessible.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn r16(a: usize) -> u16 {
    // SAFETY: as for r8.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
fn r32(a: usize) -> u32 {
    // SAFETY: as for r8.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
fn w8(a: usize, v: u8) {
    // SAFETY: as for r8.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
fn w16(a: usize, v: u16) {
    // SAFETY: as for r8.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
fn w32(a: usize, v: u32) {
    // SAFETY: as for r8.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
fn w64(a: usize, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

/// A split virtqueue in the kit's memory.
pub struct SplitQueue {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    next_avail: u16,
    last_used: u16,
    free: u16,
}

impl SplitQueue {
    /// Places a queue of `size` entries at `base` (4 KiB aligned, zeroed, 16 KiB).
    fn new(base: usize, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * usize::from(size);
        let used = (avail + 6 + 2 * usize::from(size) + 4095) & !4095;
        SplitQueue {
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
            free: 0,
        }
    }

    /// Writes one raw descriptor (for hostile-driver tests).
    pub fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + usize::from(idx % self.size) * 16;
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }

    /// Publishes `head` in the available ring as it is (for hostile-driver tests).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * usize::from(self.next_avail % self.size);
        w16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        w16(self.avail + 2, self.next_avail);
    }

    /// Publishes a chain whose descriptors start at `head` (callers that keep several chains
    /// in flight give each its own range).
    pub fn add_at(&mut self, head: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        self.free = head;
        self.add(bufs)
    }

    /// Publishes a chain of (address, length, device-writable) buffers; returns its head.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.free;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (usize::from(head) + i) % usize::from(self.size);
            let d = self.desc + idx * 16;
            let last = i + 1 == bufs.len();
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            w64(d, addr);
            w32(d + 8, len);
            w16(d + 12, flags);
            w16(d + 14, ((idx + 1) % usize::from(self.size)) as u16);
        }
        self.free = ((usize::from(head) + bufs.len()) % usize::from(self.size)) as u16;
        let slot = self.avail + 4 + 2 * usize::from(self.next_avail % self.size);
        w16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        w16(self.avail + 2, self.next_avail);
        head
    }

    /// The next used element (head, length), if any.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let idx = r16(self.used + 2);
        fence(Ordering::Acquire);
        if idx == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * usize::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((r32(e) as u16, r32(e + 4)))
    }
}

impl Device {
    /// Brings up the virtio device `device_id` (1 = net, 2 = blk, 4 = rng) with `nq` queues,
    /// queue `i` at `ring + i * 16 KiB` with MSI-X vector `i` on CPU vector `IRQ_BASE + i`.
    pub fn open(
        device_id: u16,
        ring: usize,
        nq: usize,
        packed: bool,
    ) -> Result<Device, VirtioError> {
        Self::open_sized(device_id, ring, nq, packed, 16)
    }

    /// Like [`Device::open`], with queues of up to `qsize` entries (at most 256).
    pub fn open_sized(
        device_id: u16,
        ring: usize,
        nq: usize,
        packed: bool,
        qsize: u16,
    ) -> Result<Device, VirtioError> {
        let slot = (0..32u8)
            .find(|&s| pci::read32(s, 0) == 0x1af4 | (u32::from(0x1040 + device_id) << 16))
            .ok_or(VirtioError::NotFound)?;
        let bar = (u64::from(pci::read32(slot, 0x10) & !0xf)
            | (u64::from(pci::read32(slot, 0x14)) << 32)) as usize;
        // Memory decode and bus mastering.
        pci::write32(slot, 0x04, 0x6);
        let (mut common, mut notify, mut device_cfg, mut notify_mult) = (None, None, None, 0);
        let mut msix = None;
        let mut at = (pci::read32(slot, 0x34) & 0xff) as u8;
        let mut guard = 0;
        while at != 0 && guard < 48 {
            guard += 1;
            let head = pci::read32(slot, at);
            let (id, next) = (head & 0xff, ((head >> 8) & 0xff) as u8);
            if id == 0x09 {
                let typ = (head >> 24) as u8;
                let off = pci::read32(slot, at + 8) as usize;
                match typ {
                    1 => common = Some(bar + off),
                    2 => {
                        notify = Some(bar + off);
                        notify_mult = pci::read32(slot, at + 16);
                    }
                    4 => device_cfg = Some(bar + off),
                    _ => {}
                }
            } else if id == 0x11 {
                msix = Some((at, bar + (pci::read32(slot, at + 4) & !7) as usize));
            }
            at = next;
        }
        let common = common.ok_or(VirtioError::NoCapability(1))?;
        let notify = notify.ok_or(VirtioError::NoCapability(2))?;
        let device_cfg = device_cfg.ok_or(VirtioError::NoCapability(4))?;
        let (msix_cap, msix_table) = msix.ok_or(VirtioError::NoCapability(0x11))?;

        // Reset, acknowledge, negotiate.
        w8(common + 0x14, 0);
        while r8(common + 0x14) != 0 {}
        w8(common + 0x14, STATUS_ACK);
        w8(common + 0x14, STATUS_ACK | STATUS_DRIVER);
        w32(common, 1);
        let hi = r32(common + 4);
        if u64::from(hi) << 32 & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        w32(common + 0x08, 0);
        w32(common + 0x0c, 0);
        let mut features = VIRTIO_F_VERSION_1;
        if packed {
            if (u64::from(hi) << 32) & VIRTIO_F_RING_PACKED == 0 {
                return Err(VirtioError::FeaturesRefused);
            }
            features |= VIRTIO_F_RING_PACKED;
        }
        w32(common + 0x08, 1);
        w32(common + 0x0c, (features >> 32) as u32);
        w8(
            common + 0x14,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if r8(common + 0x14) & STATUS_FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        // MSI-X on; vector i -> LAPIC 0, CPU vector IRQ_BASE + i, unmasked.
        let ctrl = pci::read32(slot, msix_cap);
        pci::write32(slot, msix_cap, ctrl | (1 << 31));
        w16(common + 0x10, 0xffff); // no config vector
        let mut queues = [const { None }; MAX_QUEUES];
        for (i, q) in queues.iter_mut().enumerate().take(nq.min(MAX_QUEUES)) {
            let entry = msix_table + 16 * i;
            w32(entry, 0xfee0_0000);
            w32(entry + 4, 0);
            w32(entry + 8, u32::from(cpu::IRQ_BASE) + i as u32);
            w32(entry + 12, 0);
            w16(common + 0x16, i as u16);
            let max = r16(common + 0x18);
            if max == 0 {
                return Err(VirtioError::NoQueue);
            }
            let size = max.min(qsize.min(256));
            let base = ring + i * 0x4000;
            let (queue, desc, driver, device) = if packed {
                let p = PackedQueue::new(base, size);
                let (d, a, u) = (p.desc, p.driver, p.device);
                (Ring::Packed(p), d, a, u)
            } else {
                let sq = SplitQueue::new(base, size);
                let (d, a, u) = (sq.desc, sq.avail, sq.used);
                (Ring::Split(sq), d, a, u)
            };
            w16(common + 0x18, size);
            w16(common + 0x1a, i as u16);
            w64(common + 0x20, desc as u64);
            w64(common + 0x28, driver as u64);
            w64(common + 0x30, device as u64);
            w16(common + 0x1c, 1);
            *q = Some(queue);
        }
        w8(
            common + 0x14,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        Ok(Device {
            common,
            notify,
            notify_mult,
            device_cfg,
            queues,
        })
    }

    /// Notifies queue `q`.
    pub fn kick(&self, q: u16) {
        w16(self.common + 0x16, q);
        let off = usize::from(r16(self.common + 0x1e)) * self.notify_mult as usize;
        w16(self.notify + off, q);
    }

    /// Queue `q` (which `open` set up).
    pub fn queue(&mut self, q: usize) -> &mut Ring {
        match self.queues.get_mut(q).and_then(Option::as_mut) {
            Some(q) => q,
            None => panic!("queue {q} was not set up"),
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        r8(self.common + 0x14)
    }

    /// A little-endian u64 of the device configuration.
    pub fn config_u64(&self, off: usize) -> u64 {
        u64::from(r32(self.device_cfg + off)) | (u64::from(r32(self.device_cfg + off + 4)) << 32)
    }
}
