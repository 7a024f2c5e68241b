//! A virtio-pci modern driver: capability walk, status handshake, split queues, MSI-X.

use core::sync::atomic::{Ordering, fence};

use crate::{clock, cpu, mm, pci};

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
    /// No such device on any bus.
    NotFound,
    /// A required capability (virtio cfg_type, or 0x11 for MSI-X) is missing.
    NoCapability(#[allow(dead_code)] u8),
    /// A capability names a BAR that is I/O, unassigned or cannot be mapped.
    BadBar(#[allow(dead_code)] u8),
    /// The device did not finish a reset (status back to 0) within a second.
    ResetTimeout,
    /// The device is not a virtio 1.x device, or refused our features (FEATURES_OK).
    FeaturesRefused,
    /// A feature the caller requires is not offered.
    NotOffered(#[allow(dead_code)] &'static str),
    /// The queue does not exist.
    NoQueue(#[allow(dead_code)] u16),
}

/// The most queues the kit drives per device.
pub const MAX_QUEUES: usize = 8;

/// `VIRTIO_F_INDIRECT_DESC`.
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_EVENT_IDX`.
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;

/// What `Device::open` asks for.
pub struct Options {
    /// Device-specific and transport features to accept when offered (VERSION_1 always is).
    pub features: u64,
    /// Queues to set up.
    pub queues: usize,
    /// Packed rings (the device must offer VIRTIO_F_RING_PACKED).
    pub packed: bool,
    /// Largest queue size to use (at most 256).
    pub qsize: u16,
}

/// A virtio-pci device, brought up.
pub struct Device {
    /// Where it sits.
    pub bdf: pci::Bdf,
    common: usize,
    notify: usize,
    notify_mult: u32,
    device_cfg: Option<usize>,
    notify_off: [u16; MAX_QUEUES],
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Whether queue `i` has MSI-X vector `i` (delivered on CPU vector `IRQ_BASE + i`).
    pub msix: [bool; MAX_QUEUES],
    /// The queues set up.
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
    /// descriptors, one per chain when it goes indirect; packed rings take the next positions
    /// anyway). Returns the chain's ID.
    pub fn add_slot(&mut self, slot: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        match self {
            Ring::Split(q) => {
                let per = if q.ext.goes_indirect(bufs.len()) {
                    1
                } else {
                    bufs.len() as u16
                };
                q.add_at(slot * per, bufs)
            }
            Ring::Packed(q) => q.add(bufs),
        }
    }

    /// Uses what was negotiated: EVENT_IDX, and indirect tables at `indirect` (64 bytes per
    /// ring slot) when INDIRECT_DESC was.
    pub fn configure(&mut self, event_idx: bool, indirect: Option<usize>) {
        let ext = match self {
            Ring::Split(q) => &mut q.ext,
            Ring::Packed(q) => &mut q.ext,
        };
        ext.event_idx = event_idx;
        ext.indirect = indirect;
    }

    /// Asks the device for interrupts, or not (polling mode).
    pub fn set_interrupts(&mut self, on: bool) {
        match self {
            Ring::Split(q) => {
                q.ext.interrupts = on;
                if q.ext.event_idx {
                    // used_event: the next used entry, or half a ring of indices away.
                    let at = if on {
                        q.last_used
                    } else {
                        q.last_used.wrapping_add(0x8000)
                    };
                    w16(q.used_event(), at);
                } else {
                    // VRING_AVAIL_F_NO_INTERRUPT
                    w16(q.avail, u16::from(!on));
                }
            }
            // Driver event suppression: ENABLE (0) or DISABLE (1).
            Ring::Packed(q) => {
                q.ext.interrupts = on;
                w16(q.driver + 2, u16::from(!on));
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Whether the device wants a notification for what was published since the last one
    /// (VRING_USED_F_NO_NOTIFY, the avail event index, or the packed device event suppression);
    /// the answer counts as the notification being sent.
    pub fn should_kick(&mut self) -> bool {
        // Publishing must be visible before the device's suppression state is read.
        fence(Ordering::SeqCst);
        match self {
            Ring::Split(q) => {
                let (old, new) = (q.ext.kicked_at as u16, q.next_avail);
                q.ext.kicked_at = u64::from(new);
                if q.ext.event_idx {
                    let event = r16(q.avail_event());
                    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
                } else {
                    r16(q.used) & 1 == 0
                }
            }
            Ring::Packed(q) => {
                let (old, new) = (q.ext.kicked_at, q.next_avail);
                q.ext.kicked_at = new;
                match r16(q.device + 2) {
                    0 => true,
                    2 if q.ext.event_idx => {
                        let off_wrap = r16(q.device);
                        let (off, wrap) = (u64::from(off_wrap & 0x7fff), off_wrap & 0x8000 != 0);
                        let size = u64::from(q.size);
                        let abs = old + (off + size - old % size) % size;
                        abs < new && q.wrap(abs) == wrap
                    }
                    2 => true,
                    _ => false,
                }
            }
        }
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

/// What a queue does beyond the basics: negotiated extensions and notification state.
#[derive(Default)]
pub struct Ext {
    event_idx: bool,
    /// Where indirect tables go (64 bytes, up to 4 entries, per ring slot), if negotiated.
    indirect: Option<usize>,
    interrupts: bool,
    /// Where the available index stood at the last notification decision.
    kicked_at: u64,
}

impl Ext {
    fn goes_indirect(&self, n: usize) -> bool {
        self.indirect.is_some() && (2..=4).contains(&n)
    }
}

const DESC_F_INDIRECT: u16 = 4;

/// A packed virtqueue in the kit's memory (virtio 1.2 §2.8), driver side.
pub struct PackedQueue {
    size: u16,
    desc: usize,
    driver: usize,
    device: usize,
    next_avail: u64,
    last_used: u64,
    ndesc: [u16; 256],
    ext: Ext,
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
            ext: Ext::default(),
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

    /// Publishes a chain; the buffer ID is its first slot. The head's flags go last. Chains of
    /// 2-4 buffers go into an indirect table when that was negotiated.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let start = self.next_avail;
        let id = (start % u64::from(self.size)) as u16;
        if let Some(area) = self
            .ext
            .indirect
            .filter(|_| self.ext.goes_indirect(bufs.len()))
        {
            // Packed indirect entries are packed descriptors read in order (no NEXT).
            let table = area + usize::from(id) * 64;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let d = table + i * 16;
                w64(d, addr);
                w32(d + 8, len);
                w16(d + 12, 0);
                w16(d + 14, if write { DESC_F_WRITE } else { 0 });
            }
            let d = self.slot(start);
            w64(d, table as u64);
            w32(d + 8, 16 * bufs.len() as u32);
            w16(d + 12, id);
            fence(Ordering::Release);
            w16(d + 14, self.avail_flags(start, DESC_F_INDIRECT));
            self.ndesc[usize::from(id) % 256] = 1;
            self.next_avail += 1;
            return id;
        }
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
    ext: Ext,
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
            ext: Ext::default(),
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

    /// `used_event`, after the available ring's entries.
    fn used_event(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }

    /// `avail_event`, after the used ring's entries.
    fn avail_event(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }

    /// Publishes a chain of (address, length, device-writable) buffers; returns its head.
    /// Chains of 2-4 buffers go into an indirect table when that was negotiated.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.free;
        if let Some(area) = self
            .ext
            .indirect
            .filter(|_| self.ext.goes_indirect(bufs.len()))
        {
            let table = area + usize::from(head) * 64;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let d = table + i * 16;
                let mut flags = if write { DESC_F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= DESC_F_NEXT;
                }
                w64(d, addr);
                w32(d + 8, len);
                w16(d + 12, flags);
                w16(d + 14, (i + 1) as u16);
            }
            self.write_desc(
                head,
                table as u64,
                16 * bufs.len() as u32,
                DESC_F_INDIRECT,
                0,
            );
            self.free = (head + 1) % self.size;
            self.publish(head);
            return head;
        }
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
        let got = (r32(e) as u16, r32(e + 4));
        if self.ext.event_idx && self.ext.interrupts {
            // The next completion interrupts again.
            w16(self.used_event(), self.last_used);
        }
        Some(got)
    }
}

/// The first function that is virtio device `device_id` (1 = net, 2 = blk, 4 = rng).
pub fn find(device_id: u16) -> Option<pci::Bdf> {
    let want = 0x1af4 | (u32::from(0x1040 + device_id) << 16);
    let mut found = None;
    pci::for_each(|bdf| {
        if found.is_none() && pci::read32(bdf, 0) == want {
            found = Some(bdf);
        }
    });
    found
}

/// A capability's register block: BAR address + offset, mapped.
fn region(bdf: pci::Bdf, bar: u8, off: u32, len: u32) -> Result<usize, VirtioError> {
    let (base, _) = pci::bar(bdf, bar).ok_or(VirtioError::BadBar(bar))?;
    let addr = base
        .checked_add(u64::from(off))
        .ok_or(VirtioError::BadBar(bar))?;
    mm::map(addr, u64::from(len)).map_err(|_| VirtioError::BadBar(bar))?;
    Ok(addr as usize)
}

const STATUS: usize = 0x14;

impl Device {
    /// Brings up virtio device `device_id` with `opts`, queue `i` at `ring + i * 16 KiB`, its
    /// indirect tables (if negotiated) at `ring + 128 KiB + i * 16 KiB`.
    ///
    /// Follows virtio 1.2 §3.1.1 (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
    /// DRIVER_OK) and §4.1.4 (capabilities in any BAR, 32- or 64-bit; MSI-X when offered).
    pub fn open(device_id: u16, ring: usize, opts: &Options) -> Result<Device, VirtioError> {
        let bdf = find(device_id).ok_or(VirtioError::NotFound)?;
        // Memory decode and bus mastering, with a 16-bit access to the command register.
        let cmd = pci::read16(bdf, 0x04);
        pci::write16(bdf, 0x04, cmd | 0x6);
        let (mut common, mut notify, mut device_cfg, mut notify_mult) = (None, None, None, 0);
        let mut msix = None;
        let has_caps = pci::read16(bdf, 0x06) & (1 << 4) != 0;
        let mut at = if has_caps {
            u16::from(pci::read8(bdf, 0x34) & 0xfc)
        } else {
            0
        };
        let mut guard = 0;
        while at >= 0x40 && guard < 48 {
            guard += 1;
            let (id, next) = (
                pci::read8(bdf, at),
                u16::from(pci::read8(bdf, at + 1) & 0xfc),
            );
            if id == 0x09 {
                let typ = pci::read8(bdf, at + 3);
                let bar = pci::read8(bdf, at + 4);
                let off = pci::read32(bdf, at + 8);
                let len = pci::read32(bdf, at + 12);
                // The first capability of each type is the one to use (§4.1.4).
                match typ {
                    1 if common.is_none() => common = Some(region(bdf, bar, off, len)?),
                    2 if notify.is_none() => {
                        notify = Some(region(bdf, bar, off, len)?);
                        notify_mult = pci::read32(bdf, at + 16);
                    }
                    4 if device_cfg.is_none() => device_cfg = Some(region(bdf, bar, off, len)?),
                    _ => {}
                }
            } else if id == 0x11 && msix.is_none() {
                let ctrl = pci::read16(bdf, at + 2);
                let table = pci::read32(bdf, at + 4);
                let size = u32::from(ctrl & 0x7ff) + 1;
                let addr = region(bdf, (table & 7) as u8, table & !7, size * 16)?;
                msix = Some((at, addr, size as usize));
            }
            at = next;
        }
        let common = common.ok_or(VirtioError::NoCapability(1))?;
        let notify = notify.ok_or(VirtioError::NoCapability(2))?;

        // Reset (wait for it to finish), acknowledge, negotiate.
        w8(common + STATUS, 0);
        let deadline = clock::Deadline::after_ms(1000);
        while r8(common + STATUS) != 0 {
            if deadline.passed() {
                return Err(VirtioError::ResetTimeout);
            }
        }
        w8(common + STATUS, STATUS_ACK);
        w8(common + STATUS, STATUS_ACK | STATUS_DRIVER);
        w32(common, 0);
        let lo = r32(common + 4);
        w32(common, 1);
        let hi = r32(common + 4);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        if opts.packed && offered & VIRTIO_F_RING_PACKED == 0 {
            return Err(VirtioError::NotOffered("VIRTIO_F_RING_PACKED"));
        }
        let mut features = VIRTIO_F_VERSION_1 | (opts.features & offered);
        features &= !VIRTIO_F_RING_PACKED;
        if opts.packed {
            features |= VIRTIO_F_RING_PACKED;
        }
        w32(common + 0x08, 0);
        w32(common + 0x0c, features as u32);
        w32(common + 0x08, 1);
        w32(common + 0x0c, (features >> 32) as u32);
        w8(
            common + STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if r8(common + STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        // MSI-X on (enable set, function mask clear: a 16-bit write of the message control);
        // vector i -> the boot CPU, CPU vector IRQ_BASE + i, unmasked.
        let mut vectors = 0;
        if let Some((cap, _, size)) = msix {
            let ctrl = pci::read16(bdf, cap + 2);
            pci::write16(bdf, cap + 2, (ctrl | 0x8000) & !0x4000);
            vectors = size;
        }
        w16(common + 0x10, 0xffff); // no configuration-change vector
        let num_queues = usize::from(r16(common + 0x12));
        let mut dev = Device {
            bdf,
            common,
            notify,
            notify_mult,
            device_cfg,
            notify_off: [0; MAX_QUEUES],
            offered,
            features,
            msix: [false; MAX_QUEUES],
            queues: [const { None }; MAX_QUEUES],
        };
        for i in 0..opts.queues.min(MAX_QUEUES) {
            if i >= num_queues {
                return Err(VirtioError::NoQueue(i as u16));
            }
            w16(common + 0x16, i as u16);
            let max = r16(common + 0x18);
            if max == 0 {
                return Err(VirtioError::NoQueue(i as u16));
            }
            if let Some((_, table, _)) = msix
                && i < vectors
            {
                let entry = table + 16 * i;
                w32(entry, 0xfee0_0000 | ((cpu::apic_id() & 0xff) << 12));
                w32(entry + 4, 0);
                w32(entry + 8, u32::from(cpu::IRQ_BASE) + i as u32);
                w32(entry + 12, 0);
                w16(common + 0x1a, i as u16);
                // The device answers NO_VECTOR if it could not take the vector (§4.1.5.1.2).
                dev.msix[i] = r16(common + 0x1a) == i as u16;
            }
            let mut size = max.min(opts.qsize.clamp(1, 256));
            if !opts.packed {
                // Split queue sizes are powers of 2.
                size = 1 << (15 - size.leading_zeros());
            }
            let base = ring + i * 0x4000;
            // Fresh ring memory: a previous test may have left indices and flags there.
            for off in (0..0x4000).step_by(8) {
                // SAFETY: the caller gives `ring` as 16 KiB per queue of the kit's own memory.
                unsafe { core::ptr::write_volatile((base + off) as *mut u64, 0) };
            }
            let (queue, desc, driver, device) = if opts.packed {
                let p = PackedQueue::new(base, size);
                let (d, a, u) = (p.desc, p.driver, p.device);
                (Ring::Packed(p), d, a, u)
            } else {
                let sq = SplitQueue::new(base, size);
                let (d, a, u) = (sq.desc, sq.avail, sq.used);
                (Ring::Split(sq), d, a, u)
            };
            let mut queue = queue;
            queue.configure(
                features & VIRTIO_F_EVENT_IDX != 0,
                (features & VIRTIO_F_INDIRECT_DESC != 0).then_some(ring + 0x20000 + i * 0x4000),
            );
            w16(common + 0x18, size);
            w64(common + 0x20, desc as u64);
            w64(common + 0x28, driver as u64);
            w64(common + 0x30, device as u64);
            dev.notify_off[i] = r16(common + 0x1e);
            w16(common + 0x1c, 1);
            dev.queues[i] = Some(queue);
        }
        w8(
            common + STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        Ok(dev)
    }

    /// Notifies queue `q` if the device asked to be (notification suppression, EVENT_IDX).
    pub fn kick(&mut self, q: u16) {
        let wanted = self
            .queues
            .get_mut(usize::from(q))
            .and_then(Option::as_mut)
            .is_none_or(Ring::should_kick);
        if wanted {
            self.kick_now(q);
        }
    }

    /// Notifies queue `q` whatever the device asked.
    pub fn kick_now(&self, q: u16) {
        let off = self
            .notify_off
            .get(usize::from(q))
            .copied()
            .unwrap_or_default();
        w16(
            self.notify + usize::from(off) * self.notify_mult as usize,
            q,
        );
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
        r8(self.common + STATUS)
    }

    /// Resets the device (status 0) and waits up to a second for the reset to finish.
    pub fn reset(&self) -> bool {
        w8(self.common + STATUS, 0);
        let deadline = clock::Deadline::after_ms(1000);
        while r8(self.common + STATUS) != 0 {
            if deadline.passed() {
                return false;
            }
        }
        true
    }

    /// Whether the feature bit(s) `f` were negotiated.
    pub fn has(&self, f: u64) -> bool {
        self.features & f == f
    }

    /// A little-endian u64 of the device configuration, if the device has one.
    pub fn config_u64(&self, off: usize) -> Option<u64> {
        let cfg = self.device_cfg?;
        Some(u64::from(r32(cfg + off)) | (u64::from(r32(cfg + off + 4)) << 32))
    }

    /// A byte of the device configuration, if the device has one.
    pub fn config_u8(&self, off: usize) -> Option<u8> {
        Some(r8(self.device_cfg? + off))
    }

    /// A little-endian u16 of the device configuration, if the device has one.
    pub fn config_u16(&self, off: usize) -> Option<u16> {
        Some(r16(self.device_cfg? + off))
    }
}
